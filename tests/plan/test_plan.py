"""sbtrain-plan: exact per-rank state bytes, the TP / EP / FSDP placement against the real
parallelisms, the activation formulas against what autograd saves, the CLI and its errors, and
full-size models planned on the meta device without allocating."""

from __future__ import annotations

import json

import pytest
import torch

from sbtrain.cli.plan import main as plan_cli
from sbtrain.config.model import ConfigError, HybridConfig, ModelConfig, MoEConfig
from sbtrain.config.parallel import ParallelConfig, resolve_dims
from sbtrain.config.train import TrainerConfig
from sbtrain.models.build import build_model
from sbtrain.models.ffn import layer_ffns
from sbtrain.plan import plan_memory
from sbtrain.plan.activations import Shapes, block_activations, head_saved, per_forward
from sbtrain.plan.params import local_shape, plan_params

BASE = {"vocab_size": 97, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "intermediate_size": 48, "sliding_window": 5}


def tiny(kind: str = "sb7b", **over) -> ModelConfig:
    cfg = dict(BASE, layer_pattern=["gla", "swa"])
    if kind == "sb76b":
        cfg.update(layer_pattern=["hybrid_swa", "hybrid_full"], hybrid=HybridConfig(num_sink_tokens=3),
                   moe=MoEConfig(num_experts=4, top_k=1, num_shared_experts=1, dense_layers=[0], z_loss_coef=1e-3))
    cfg.update(over)
    return ModelConfig(name=f"{kind}_plan_test", **cfg).validate()


def trainer(**over) -> TrainerConfig:
    return TrainerConfig(**{"global_batch_size": -1, "micro_batch_size": 1, "seq_len": 64, "max_steps": 1, **over})


def test_fsdp_dp2_state_bytes_equal_a_hand_count():
    # Rank 0 keeps ceil(rows / 2) rows of every tensor (FSDP2 pads dim 0): fp32 params and grads,
    # two fp32 AdamW moments per element plus one fp32 step per tensor.
    half = lambda rows, cols=1: -(-rows // 2) * cols
    d, q, kv, inter, vocab = 32, 32, 16, 48, 97
    attn = half(q, d) + half(q) + 2 * (half(kv, d) + half(kv)) + half(d, q)  # q/k/v (+bias), o
    mlp = 2 * half(inter, d) + half(d, inter)
    norms = 2 * half(d)
    gla = attn + half(16, d) + half(kv, 16) + half(kv) + half(8) + mlp + norms  # gate stages, g_norm
    swa = attn + mlp + norms
    root = 2 * half(vocab, d) + half(d)
    elements, tensors = root + gla + swa, 3 + (7 + 4 + 5) + (7 + 5)  # root; attn, gate + g_norm, norms + mlp
    result = plan_memory(tiny(), 2, ParallelConfig(), trainer())
    assert result.state == {"params": 4 * elements, "grads": 4 * elements, "optimizer": 8 * elements + 4 * tensors}
    assert result.peak.params == 4 * elements and result.layout["dp_shard"] == 2


def test_tp2_halves_exactly_the_sharded_projections():
    cfg = tiny("sb76b", vocab_size=96, hybrid=HybridConfig(num_sink_tokens=3, share_branch_projections=False))
    dims1, dims2 = resolve_dims(ParallelConfig(), 1), resolve_dims(ParallelConfig(tp=2), 2)
    sharded = ("q_proj", "k_proj", "v_proj", "o_proj", "gk_proj.1", "sink_", "beta_", "embed_tokens", "lm_head")
    ffns = layer_ffns(cfg)
    assert [f.name for f in ffns] == ["dense", "moe"]  # layer 1's MoE runs replicated under TP
    for name, p in build_model(cfg, device="meta").named_parameters():
        moe = name.startswith("model.layers.1.mlp")
        ffn = ffns[int(name.split(".")[2])] if name.startswith("model.layers.") else None
        one, two = (torch.Size(local_shape(name, tuple(p.shape), ffn, d)).numel() for d in (dims1, dims2))
        dense_ffn = ".mlp." in name and not moe and "norm" not in name
        expected = one // 2 if any(s in name for s in sharded) or dense_ffn else one
        assert two == expected, name
    full, split = (plan_memory(cfg, w, ParallelConfig(tp=t), trainer()).state["params"] for w, t in ((1, 1), (2, 2)))
    assert full / 2 < split < full  # norms, the gate's first stage and the MoE layer stay whole


def test_ep2_holds_half_the_routed_experts():
    cfg = tiny("sb76b")
    plan, _ = plan_params(cfg, resolve_dims(ParallelConfig(ep=2), 2))
    experts = plan.experts[1]
    assert experts.local == 4 * 3 * 32 * 48 // 2 and not experts.sharded  # dp_shard/ep = 1: outside FSDP
    assert plan.experts[0] is None  # layer 0 keeps a dense FFN


def _real_local_elements(specs):
    """Rank 0's parameter elements after the real parallelize (TP / EP / FSDP) on 2 gloo ranks."""
    import torch.distributed as dist

    from sbtrain.config.parallel import validate_parallel
    from sbtrain.trainer.distributed import make_mesh, parallelize

    out = []
    for kind, par in specs:
        mcfg, pcfg = tiny(kind, vocab_size=96), ParallelConfig(**par)
        tcfg = trainer(global_batch_size=2 // (pcfg.cp * pcfg.tp))
        mesh = make_mesh(validate_parallel(pcfg, 2, mcfg, tcfg), torch.device("cpu"))
        model = build_model(mcfg)
        parallelize(model, mesh, pcfg, tcfg)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        out.append((dist.get_rank(), sum(t.numel() for t in local)))
    return out


@pytest.mark.distributed
def test_placement_matches_the_real_parallelisms():
    from tests.distributed.harness import run_distributed

    specs = [("sb7b", {"tp": 2}), ("sb76b", {"tp": 2}), ("sb76b", {"ep": 2}), ("sb7b", {}), ("sb76b", {"cp": 2})]
    rank0 = run_distributed(_real_local_elements, 2, specs)[0]
    for (kind, par), (_, real) in zip(specs, rank0):
        plan, _ = plan_params(tiny(kind, vocab_size=96), resolve_dims(ParallelConfig(**par), 2))
        assert plan.elements() == real, (kind, par)


def _saved_bytes(model, ids, bf16: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(ids[:, :-1], labels=ids[:, 1:])
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["sb7b", "sb76b"])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("B, T", [(1, 256), (2, 128), (1, 200)])
def test_activation_formulas_equal_what_autograd_saves(kind, bf16, B, T):
    # Windowed SWA (W=16 < T), full attention with sinks, GLA on whole and partial chunks, MoE.
    cfg = tiny(kind, sliding_window=16, vocab_size=96)
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    s = Shapes(B=B, T=T, cp=1, tp=1, d=32, hq=4, hkv=2, D=8, inter=48, a=2 if bf16 else 4, window=16,
               sinks=cfg.hybrid.num_sink_tokens, gate_rank=cfg.gla.gate_rank, vocab_rows=96)
    linear = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in model.model.layers]
    predicted = per_forward(s, True) + head_saved(s, "cpu", bf16)[0] + sum(
        block_activations(s, cfg, i, linear[i], bf16).saved for i in range(cfg.num_layers))
    # Exact but for a few scalar-sized MoE statistics (tens of bytes).
    assert predicted == pytest.approx(_saved_bytes(model, ids, bf16), abs=64)


def run_plan(capsys, *argv):
    plan_cli(list(argv))
    return capsys.readouterr().out


def test_cli_prints_the_table_and_one_json_line(capsys):
    out = run_plan(capsys, "model=sb7b_tiny", "world=2", "trainer.seq_len=256", "trainer.activation_checkpointing=full")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[2:8]] == ["params", "grads", "optimizer", "activations", "transient",
                                                         "total"]
    payload = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(payload) == 1
    gib = payload[0]["per_rank_gib"]
    assert payload[0]["dp_shard"] == 2 and gib["total"] == pytest.approx(sum(gib[r] for r in gib if r != "total"),
                                                                          abs=0.002)


@pytest.mark.parametrize("argv, message", [
    (["world=3", "parallel.tp=2"], "world size 3 is not divisible by parallel.dp_replicate*cp*tp"),
    (["world=3", "parallel.tp=3"], "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["world=2", "parallel.ep=2"], "needs a Mixture-of-Experts model"),
    (["wrld=2"], "did you mean world"),
    (["world=0"], "world=0 must be >= 1"),
])
def test_bad_layouts_are_the_training_runs_config_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        plan_cli(["model=sb7b_tiny", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_layout_raises_config_error_before_any_build():
    with pytest.raises(ConfigError, match="trainer.seq_len=63 must be divisible by parallel.cp"):
        plan_memory(tiny(), 2, ParallelConfig(cp=2), trainer(seq_len=63))


def _rss_kb() -> int:
    from sbtrain.bench.common import status_kb

    return status_kb("VmRSS")


def test_full_size_models_plan_on_meta_without_allocating(capsys):
    before = _rss_kb()
    out = run_plan(capsys, "model=sb76b", "world=128", "parallel.ep=8", "trainer.seq_len=8192",
                   "trainer.precision=bf16", "trainer.activation_checkpointing=full")
    out += run_plan(capsys, "model=sb7b", "world=8", "parallel.dp_shard=8", "trainer.seq_len=8192",
                    "trainer.precision=bf16", "trainer.activation_checkpointing=full")
    grown_mb = (_rss_kb() - before) / 1024
    assert grown_mb < 300, f"planning grew the resident set by {grown_mb:.0f} MB"
    sb76b, sb7b = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    assert sb76b["ep"] == 8 and sb76b["dp_shard"] == 128 and sb7b["dp_shard"] == 8
    # 76B fp32 parameters are 304 GB; each rank holds its FSDP / EP share only.
    assert 1 < sb76b["per_rank_gib"]["params"] < 304 / 8 and sb7b["per_rank_gib"]["params"] == pytest.approx(
        7.62e9 * 4 / 8 / 2**30, rel=0.01)


def test_deepspeed_stages_shard_more_state():
    totals = [plan_memory(tiny(), 2, {"engine": "deepspeed", "deepspeed": {"zero_stage": z}}, trainer()).state
              for z in (1, 2, 3)]  # a plain dict, as from a recipe
    assert totals[0]["grads"] > totals[1]["grads"] and totals[1]["params"] > totals[2]["params"]
