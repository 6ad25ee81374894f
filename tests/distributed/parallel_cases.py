"""Train tiny models for a few SGD steps under a parallel layout, through the real Trainer and
``sbtrain.trainer.distributed.parallelize``, and return what must equal the single process.

``train_case(spec)`` runs on every rank of a gloo group (or alone, for the reference): it builds
the same seeded model everywhere (on meta, each rank materialising its shards: build_parallel_model), feeds each data-parallel rank its share of a
fixed synthetic global batch, and records the loss and every parameter's gradient (as full
tensors) at every step. SGD, because Adam would turn rounding differences into lr-sized ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sbtrain.config.model import HybridConfig, ModelConfig, MoEConfig
from sbtrain.config.parallel import ParallelConfig, validate_parallel
from sbtrain.config.train import OptimConfig, TrainerConfig
from sbtrain.trainer.checkpoint import Checkpointer
from sbtrain.trainer.distributed import build_parallel_model, make_mesh
from sbtrain.trainer.engine import DeepSpeedStep
from sbtrain.trainer.optim import build_optimizer
from sbtrain.trainer.train_module import TrainModule
from sbtrain.trainer.trainer import Trainer

VOCAB = 96


def model_config(kind: str, **over) -> ModelConfig:
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, "sliding_window": 5, "init_std": 0.1}
    if kind == "qwen2":
        base.update(layer_pattern=["swa", "full"])
    elif kind == "sb7b":
        base.update(layer_pattern=["gla", "swa"])
    elif kind == "sb76b":
        base.update(layer_pattern=["hybrid_swa", "hybrid_full"],
                    hybrid=HybridConfig(num_sink_tokens=3, feature_map="sigmoid"),
                    moe=MoEConfig(num_experts=4, top_k=1, num_shared_experts=1, dense_layers=[0],
                                  aux_loss_coef=0.01, z_loss_coef=0.001))
    else:
        raise ValueError(kind)
    base.update(over)
    return ModelConfig(name=f"{kind}_test", **base).validate()


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a full copy of every gradient it steps with (after clipping)."""

    def __init__(self, named_params, lr):
        named_params = list(named_params)
        super().__init__([p for _, p in named_params], lr=lr)
        self.names = {id(p): n for n, p in named_params}
        self.recorded: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in self.names:  # (DeepSpeed steps flat partitions)
                    g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                    grads[self.names[id(p)]] = g.detach().clone()
        self.recorded.append(grads)
        return super().step(closure)


class SyntheticData:
    """A fixed global batch per step; this data-parallel rank takes its contiguous share."""

    def __init__(self, spec: dict, dp_rank: int, dp: int):
        self.spec, self.dp_rank, self.dp, self.step = spec, dp_rank, dp, 0

    def next_global_batch(self) -> list[dict]:
        s = self.spec
        G, mb, T = s["global_batch"], s["micro_batch"], s["seq_len"]
        gen = torch.Generator().manual_seed(1000 + self.step)
        self.step += 1
        ids = torch.randint(0, VOCAB, (G, T + 1), generator=gen)
        per_rank = G // self.dp
        mine = ids[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        out = []
        for i in range(0, per_rank, mb):
            rows = mine[i:i + mb]
            batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:].clone()}
            batch["labels"][:, 0] = -100  # some ignored targets, as after a document start
            if s.get("docs"):
                # Packed row with documents of uneven lengths crossing every shard boundary.
                n = rows.shape[0] * T
                bounds = sorted({0, n, *[b for b in (3, 11, T // 2 + 1, T + 5, 2 * T - 7) if 0 < b < n]})
                batch = {"input_ids": batch["input_ids"].reshape(1, -1), "labels": batch["labels"].reshape(1, -1),
                         "cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}
            out.append(batch)
        return out

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def build_case(spec: dict, seed: int = 0, checkpoint_dir: str | None = None) -> tuple[Trainer, SyntheticData]:
    """A Trainer for ``spec`` on the current process group (or alone). ``spec["optim"]`` picks
    ``sgd`` (default: a RecordingSGD) or ``adamw`` (the real optimizer, for checkpoint tests)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mcfg = model_config(spec["model"], document_masking=bool(spec.get("docs")), **spec.get("model_over", {}))
    pcfg = ParallelConfig(**{k: spec[k] for k in ("dp_replicate", "cp", "tp", "ep", "cp_linear", "engine") if k in spec})
    if "zero_stage" in spec:
        pcfg.deepspeed.zero_stage = spec["zero_stage"]
    tcfg = TrainerConfig(global_batch_size=spec["global_batch"], micro_batch_size=spec["micro_batch"],
                         seq_len=spec["seq_len"], max_steps=spec.get("steps", 3))
    dims = validate_parallel(pcfg, world, mcfg, tcfg)
    mesh = make_mesh(dims, torch.device("cpu"))
    torch.manual_seed(seed)
    # The real runs' path: on a mesh (FSDP engine) built on meta, sharded, then each rank
    # materialises and initialises only its shards; alone (and DeepSpeed) a full build.
    model, layout, _ = build_parallel_model(mcfg, mesh, pcfg, tcfg, torch.device("cpu"))
    ocfg = OptimConfig(lr=0.5 if spec.get("optim", "sgd") == "sgd" else 1e-2, schedule="constant", warmup_steps=0,
                       clip_grad=spec.get("clip", 0.0))
    if spec.get("optim", "sgd") == "sgd":
        optimizer = RecordingSGD(model.named_parameters(), lr=ocfg.lr)
    else:
        optimizer = build_optimizer(model, ocfg)
    deepspeed = None
    if pcfg.engine == "deepspeed" and mesh is not None:
        from parallel.deepspeed_engine import DeepSpeedEngine

        deepspeed = DeepSpeedEngine(model, optimizer, zero_stage=pcfg.deepspeed.zero_stage,
                                    clip_grad=ocfg.clip_grad or None)
    pcfg.grad_sync = spec.get("grad_sync", "per_step")
    module = TrainModule.build(model, optimizer, tcfg, ocfg, mesh=mesh, pcfg=pcfg, deepspeed=deepspeed,
                               expert_grad_divisor=layout["expert_grad_divisor"])
    data = SyntheticData(spec, mesh.dp_rank if mesh else 0, dims.dp)
    checkpointer = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    trainer = Trainer(module=module, cfg=tcfg, optim_cfg=ocfg, train_data=data, checkpointer=checkpointer)
    return trainer, data


def train_case(spec: dict) -> dict:
    trainer, data = build_case(spec)
    stats, params = [], []
    for _ in range(trainer.cfg.max_steps):
        stats.append(trainer.train_step(data.next_global_batch()))
        params.append({k[len("param/"):]: v for k, v in full_state(trainer).items() if k.startswith("param/")})
    return {"losses": [s.loss for s in stats], "aux": [s.aux_loss for s in stats],
            "grad_norms": [s.grad_norm for s in stats], "params": params,
            # A DeepSpeed engine steps its own flat partitions: gradients by name only without it.
            "grads": getattr(trainer.optimizer, "recorded", None)}


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer-state tensor as a full tensor, keyed by parameter name."""
    if isinstance(trainer.engine, DeepSpeedStep):
        return {f"param/{k}": v.detach().clone() for k, v in trainer.engine.deepspeed.state_dict()["model"].items()}
    out = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for n, p in trainer.model.named_parameters():
        out[f"param/{n}"] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    for p, st in trainer.optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                out[f"optim/{names[id(p)]}/{key}"] = (value.full_tensor() if isinstance(value, DTensor)
                                                      else value).detach().clone()
    return out


def assert_same_training(ref: dict, got: dict, label: str, tol: float = 1e-5) -> None:
    """Loss, aux loss, gradient norm and every gradient at every step, at tol * max(1, |ref|inf)."""
    for step, (a, b) in enumerate(zip(ref["losses"], got["losses"], strict=True)):
        assert abs(a - b) <= tol * max(1.0, abs(a)), f"{label}: step {step} loss {b} vs single process {a}"
    for step, (a, b) in enumerate(zip(ref["aux"], got["aux"], strict=True)):
        assert abs(a - b) <= tol * max(1.0, abs(a)), f"{label}: step {step} aux loss {b} vs {a}"
    for step, (a, b) in enumerate(zip(ref["grad_norms"], got["grad_norms"], strict=True)):
        assert abs(a - b) <= tol * max(1.0, abs(a)), f"{label}: step {step} grad norm {b} vs {a}"
    for step, (pa, pb) in enumerate(zip(ref["params"], got["params"], strict=True)):
        for name, a in pa.items():
            err = (a - pb[name]).abs().max().item()
            assert err <= tol * max(1.0, a.abs().max().item()), f"{label}: step {step} {name} differs by {err:.3g}"
    if got["grads"] is None:  # a DeepSpeed engine steps flat partitions: checked through params above
        return
    for step, (ga, gb) in enumerate(zip(ref["grads"], got["grads"], strict=True)):
        assert ga.keys() == gb.keys(), f"{label}: step {step} gradient names differ: {set(ga) ^ set(gb)}"
        for name, a in ga.items():
            b = gb[name]
            assert a.shape == b.shape, f"{label}: {name} shape {tuple(b.shape)} vs {tuple(a.shape)}"
            bound = tol * max(1.0, a.abs().max().item())
            err = (a - b).abs().max().item()
            assert err <= bound, f"{label}: step {step} grad of {name} differs by {err:.3g} (tol {bound:.3g})"
