"""Pipeline-parallel training cases (module level, for ``run_distributed``) and their one-process
reference: a tiny float64 model, the same micro batches, the trainer's objective per micro batch
(``loss_sum * dp / global_tokens + aux / micro_batches``, DP averaging the gradients), 3 SGD steps.

``pipeline_train(case)`` runs on every rank of a pp (x dp) group and returns this rank's losses and
the gradients of the parameters it holds, by the full model's names; ``reference_train(case)``
runs the unsplit model in one process on the whole global batch (all dp ranks' micro batches, one
after another: scale 1 / global_tokens, aux weight 1 / (dp * micro_batches))."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from parallel.pipeline import PipelineRuntime, all_reduce_gradients, stage_ids
from sbtrain.config.model import HybridConfig, ModelConfig, MoEConfig
from sbtrain.models.build import build_model
from sbtrain.models.pipeline_stages import build_stage_modules, pipeline_batch, validate_pipeline_model

VOCAB, SEQ, LR, STEPS, EVAL_STEP = 64, 24, 0.5, 3, 99


def model_config(kind: str, **over) -> ModelConfig:
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, "sliding_window": 5, "init_std": 0.1}
    if kind == "sb7b":  # tiny hybrid: GLA and SWA layers
        base.update(layer_pattern=["gla", "swa"])
    elif kind == "sb76b":  # tiny MoE: parallel hybrid mixers, dense FFN at layer 0, MoE at 1..3
        base.update(layer_pattern=["hybrid_swa", "hybrid_full"],
                    hybrid=HybridConfig(num_sink_tokens=3, feature_map="sigmoid"),
                    moe=MoEConfig(num_experts=4, top_k=1, num_shared_experts=1, dense_layers=[0],
                                  aux_loss_coef=0.01, z_loss_coef=0.001))
    else:
        raise ValueError(kind)
    base.update(over)
    return ModelConfig(name=f"{kind}_pp_test", **base).validate()


def case_config(case: dict) -> ModelConfig:
    return model_config(case["model"], document_masking=bool(case.get("docs")),
                        tie_embeddings=bool(case.get("tied")), num_layers=case.get("layers", 4))


def make_model(case: dict):
    torch.manual_seed(1234)
    return build_model(case_config(case), dtype=torch.float64)


def global_batch(case: dict, step: int) -> list[dict]:
    """The step's micro batches of the whole global batch (dp ranks' shares consecutive)."""
    dp, m, b = case.get("dp", 1), case["micro"], case.get("mb", 1)
    gen = torch.Generator().manual_seed(100 + step)
    rows = torch.randint(0, VOCAB, (dp * m * b, SEQ + 1), generator=gen)
    out = []
    for i in range(dp * m):
        r = rows[i * b:(i + 1) * b]
        mb = {"input_ids": r[:, :-1].clone(), "labels": r[:, 1:].clone()}
        mb["labels"][:, 0] = -100
        mb["labels"][:, (i + step) % SEQ] = -100  # an uneven count of target tokens per micro batch
        if case.get("docs"):
            # Documents of uneven lengths, a different count per micro batch (cu_seqlens lengths vary).
            inner = (3 + i % 4, 9 + step % 5, 14 + 2 * (i % 3), 20 - i % 2)[:1 + i % 4]
            cuts = sorted({0, SEQ, *inner})
            mb["cu_seqlens"] = torch.tensor(cuts, dtype=torch.int32)
        out.append(mb)
    return out


def _objective_weights(case: dict, micro_batches: list[dict], dp: int) -> tuple[float, float, int]:
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
    return dp / tokens, 1.0 / case["micro"], tokens


def reference_train(case: dict) -> dict:
    """One process, the unsplit model, every micro batch of the global batch in order."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tiny shapes: extra threads only fight the gloo workers for the cores
    try:
        return _reference_train(case)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def _reference_train(case: dict) -> dict:
    model = make_model(case)
    model.train()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=LR)
    dp = case.get("dp", 1)
    losses, auxes, grads = [], [], []
    for step in range(STEPS):
        mbs = global_batch(case, step)
        scale, aux_weight, tokens = _objective_weights(case, mbs, 1)
        aux_weight /= dp
        opt.zero_grad(set_to_none=True)
        loss_sum = aux_sum = 0.0
        for mb in mbs:
            out = model(mb["input_ids"], labels=mb["labels"], cu_seqlens=mb.get("cu_seqlens"))
            (out.loss_sum * scale + out.aux_loss * aux_weight).backward()
            loss_sum += float(out.loss_sum.detach().double())
            aux_sum += float(out.aux_loss.detach().double()) * aux_weight
        losses.append(loss_sum / tokens)
        auxes.append(aux_sum)
        grads.append({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
        opt.step()
        if step == 0:  # an evaluation between two training steps (the schedule switches modes)
            model.eval()
            with torch.no_grad():
                evals = [float(model(mb["input_ids"], labels=mb["labels"], cu_seqlens=mb.get("cu_seqlens"))
                               .loss_sum.double()) for mb in global_batch(case, EVAL_STEP)]
            model.train()
    return {"losses": losses, "aux": auxes, "grads": grads, "eval": sum(evals)}


def pipeline_train(case: dict, pp_group: dist.ProcessGroup, dp_mesh: DeviceMesh | None) -> dict:
    """This rank's pipeline run of ``case``: losses, aux and the gradients of its parameters.
    With ``dp_mesh``: plain DP (gradients all-reduced after the step) or, with ``case["fsdp"]``,
    FSDP2 ``fully_shard`` on every stage module (the schedule defers its reduction to the end)."""
    pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    dp_group = dp_mesh.get_group() if dp_mesh is not None else None
    dp = dist.get_world_size(dp_group) if dp_group is not None else 1
    dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
    cfg = case_config(case)
    split = validate_pipeline_model(cfg, case["schedule"], pp, case["micro"], case.get("split"), case.get("virtual"))
    model = make_model(case)  # tiny: built whole, then cut (the stages share its parameters)
    model.train()
    local = stage_ids(case["schedule"], pp, pp_rank, case.get("virtual"))
    modules = build_stage_modules(model, split, local)
    del model
    if case.get("fsdp"):
        for m in modules:
            fully_shard(m, mesh=dp_mesh)
    runtime = PipelineRuntime(modules, schedule=case["schedule"], pp_group=pp_group, n_microbatches=case["micro"],
                              virtual_stages=case.get("virtual"))
    names: dict[int, list[str]] = {}
    for m in modules:
        for n, p in m.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
    params = list(runtime.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    losses, auxes, grads = [], [], []
    for step in range(STEPS):
        mbs = global_batch(case, step)
        scale, aux_weight, tokens = _objective_weights(case, mbs, dp)
        mine = mbs[dp_rank * case["micro"]:(dp_rank + 1) * case["micro"]]
        batch = pipeline_batch(mine, cfg)
        opt.zero_grad(set_to_none=True)
        result = runtime.step(*batch["args"], target=batch["target"], scale=scale, aux_weight=aux_weight,
                              **batch["kwargs"])
        if not case.get("fsdp"):
            all_reduce_gradients(params, dp_group)
        stats = torch.stack([result.loss_sum, result.aux_sum])
        if dp_group is not None:
            dist.all_reduce(stats, group=dp_group)
        losses.append(float(stats[0]) / tokens)
        auxes.append(float(stats[1]) / dp)
        grads.append({n: _full(p.grad).detach().clone() for p in params if p.grad is not None for n in names[id(p)]})
        opt.step()
        if step == 0:  # an evaluation between two training steps (the schedule switches modes)
            for m in modules:
                m.eval()
            mine = global_batch(case, EVAL_STEP)[dp_rank * case["micro"]:(dp_rank + 1) * case["micro"]]
            batch = pipeline_batch(mine, cfg)
            ev = runtime.eval_step(*batch["args"], target=batch["target"], **batch["kwargs"]).loss_sum.clone()
            if dp_group is not None:
                dist.all_reduce(ev, group=dp_group)
            evaluation = float(ev)
            for m in modules:
                m.train()
    return {"losses": losses, "aux": auxes, "grads": grads, "eval": evaluation, "stages": local}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_cases(cases: list[dict], dp: int = 1) -> list[dict]:
    """Every case on this rank; the world is dp x pp, pp innermost (ranks 2k, 2k+1 one pipeline)."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "pp"))
    torch.set_default_dtype(torch.float64)
    return [pipeline_train({**case, "dp": dp}, mesh["pp"].get_group(), mesh["dp"] if dp > 1 else None)
            for case in cases]


def merge_ranks(results: list[dict]) -> dict:
    """The pipeline's losses (every rank reports the same) and every rank's gradients together."""
    merged = {"losses": results[0]["losses"], "aux": results[0]["aux"], "eval": results[0]["eval"], "grads": []}
    for r in results[1:]:
        assert (r["losses"], r["aux"], r["eval"]) == (merged["losses"], merged["aux"], merged["eval"]), \
            "ranks disagree on the loss"
    for step in range(STEPS):
        g: dict[str, torch.Tensor] = {}
        for r in results:
            for n, t in r["grads"][step].items():
                if n in g:  # dp replicas hold the same (all-reduced) gradient
                    assert torch.equal(g[n], t), f"{n}: dp replicas differ after the all-reduce"
                g[n] = t
        merged["grads"].append(g)
    return merged


def max_diff(ref: dict, got: dict) -> float:
    """max|Δ| over loss, aux and every gradient of every step; every reference gradient must exist."""
    worst = 0.0
    for a, b in zip(ref["losses"] + ref["aux"] + [ref["eval"]], got["losses"] + got["aux"] + [got["eval"]],
                    strict=True):
        worst = max(worst, abs(a - b))
    for step, (ga, gb) in enumerate(zip(ref["grads"], got["grads"], strict=True)):
        missing = set(ga) - set(gb)
        assert not missing, f"step {step}: no pipeline gradient for {sorted(missing)[:4]}"
        for n, a in ga.items():
            assert a.shape == gb[n].shape, f"{n}: shape {tuple(gb[n].shape)} vs {tuple(a.shape)}"
            worst = max(worst, (a - gb[n]).abs().max().item())
    return worst
