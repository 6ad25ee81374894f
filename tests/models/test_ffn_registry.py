"""The FFN registry's promise: a new FFN kind is one module (here: this test file and its HF fragment
``ffn_relu2_hf.py``) and nothing else changes. A squared-ReLU FFN (Primer's ``relu(x W_up)^2 W_down``)
registered here is built by ``model.ffn_pattern``, trains, is counted by ``sbtrain-info``, planned by
``sbtrain-plan`` with its own tensor-parallel split, runs under tp=2 equal to one process on gloo
(float64), and exports to an HF folder whose logits equal sbtrain's. The kind is registered only
while a test needs it (``relu2_kind``), so the rest of the suite sees the shipped kinds alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from sbtrain.config.model import FFN_KINDS, FFN_TP_CHECKS, ConfigError
from sbtrain.models import build_model
from sbtrain.models.ffn import FFNS, FfnKind, ffn_kind, register
from tests.distributed.harness import run_distributed
from tests.models.helpers import recipe

OVERRIDES = ["model.ffn_pattern=[dense,relu2]", "model.moe.num_experts=0"]


class ReLU2FFN(nn.Module):
    def __init__(self, d: int, inter: int, device=None, dtype=None):
        super().__init__()
        self.up_proj = nn.Linear(d, inter, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inter, d, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)).square())


def _tensor_parallel(ffn, tp_mesh, residual):
    from torch.distributed.tensor import Replicate

    parallelize_module(ffn, tp_mesh, {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel(output_layouts=residual)})
    parallelize_module(ffn, tp_mesh, PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)))


def _tp_check(cfg, tp):
    if cfg.intermediate_size % tp:
        raise ConfigError(f"relu2: model.intermediate_size={cfg.intermediate_size} is not divisible by parallel.tp={tp}")


RELU2 = FfnKind(
    name="relu2",
    summary="squared-ReLU MLP (test kind)",
    build=lambda cfg, device=None, dtype=None: ReLU2FFN(cfg.hidden_size, cfg.intermediate_size, device, dtype),
    tensor_parallel=_tensor_parallel,
    tp_split_dim=lambda name: 0 if name == "up_proj.weight" else 1 if name == "down_proj.weight" else None,
    activations=lambda s, cfg: (s.N * s.d * s.a + 2 * s.N * s.inter * s.a, s.N * s.inter * s.a),
    export_code=Path(__file__).parent / "ffn_relu2_hf.py",
    tp_check=_tp_check,
)


def ensure_registered() -> None:
    if "relu2" not in FFNS:
        register(RELU2)


@pytest.fixture
def relu2_kind():
    ensure_registered()
    yield RELU2
    for table in (FFNS, FFN_KINDS, FFN_TP_CHECKS):
        table.pop("relu2", None)


def tiny(**kw):
    return recipe("qwen2_tiny", [*OVERRIDES, "model.num_layers=2", "model.vocab_size=128", *kw.get("extra", [])])


def test_shipped_kinds_and_pattern_errors(relu2_kind):
    assert {"dense", "moe", "relu2"} <= set(FFNS)
    assert ffn_kind("moe").expert_parallel and not ffn_kind("dense").expert_parallel
    with pytest.raises(ConfigError, match="ffn_pattern entry 'relu3' is not an FFN kind"):
        recipe("qwen2_tiny", ["model.ffn_pattern=[relu3]", "model.num_layers=2"]).validate()
    with pytest.raises(ConfigError, match="ffn_pattern has 3 entries, which does not divide model.num_layers=2"):
        recipe("qwen2_tiny", ["model.ffn_pattern=[dense,dense,relu2]", "model.num_layers=2"]).validate()
    with pytest.raises(ConfigError, match="moe layers but model.moe.num_experts=0"):
        recipe("qwen2_tiny", ["model.ffn_pattern=[moe]", "model.num_layers=2", "model.moe.num_experts=0"]).validate()
    with pytest.raises(ConfigError, match="relu2: model.intermediate_size=.* parallel.tp=5"):
        from sbtrain.config.parallel import validate_tensor_parallel

        cfg = tiny(extra=["model.num_attention_heads=5", "model.num_key_value_heads=5", "model.head_dim=8",
                          "model.vocab_size=130", "model.intermediate_size=48"])
        cfg.ffn_pattern = ["relu2"]
        validate_tensor_parallel(cfg, 5)


def test_a_new_kind_trains_and_is_counted_and_planned(relu2_kind):
    from sbtrain.cli.info import model_info
    from sbtrain.config.parallel import ParallelConfig, resolve_dims
    from sbtrain.config.train import TrainerConfig
    from sbtrain.plan import plan_memory
    from sbtrain.plan.params import plan_params

    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.model.layers[1].mlp, ReLU2FFN) and model.model.layers[0].ffn_kind == "dense"
    ids = torch.randint(0, 128, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(ids, labels=ids)
        loss = out.loss_sum / out.num_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    info = model_info(cfg)
    assert info["params_total"] == sum(p.numel() for p in model.parameters()) and info["moe"] is None
    plan, _ = plan_params(cfg, resolve_dims(ParallelConfig(tp=2), 2))
    inter, d = cfg.intermediate_size, cfg.hidden_size
    # layer 1 (relu2): up + down halved by its own split, two norms whole; the mixer is split as ever
    layer0, layer1 = plan.blocks
    assert layer0.local - layer1.local == 3 * inter * d // 2 - 2 * inter * d // 2
    result = plan_memory(cfg, 2, ParallelConfig(tp=2), TrainerConfig(seq_len=16, micro_batch_size=1, max_steps=1))
    assert result.peak.total > 0


def _relu2_tp_worker(cases):
    ensure_registered()  # a pooled worker imports this module once: the kind lives in it from then on
    from tests.distributed.test_tensor_parallel import _tp_worker

    return _tp_worker(cases)


def test_a_new_kind_runs_tensor_parallel_equal_to_one_process(relu2_kind):
    from tests.distributed.test_tensor_parallel import check_close, init_state, train

    cfg = tiny()
    state = init_state(cfg)
    results = run_distributed(_relu2_tp_worker, 2, [("relu2", cfg, state, True)], timeout=240)
    model = build_model(cfg).double()
    model.load_state_dict(state)
    want = train(model, cfg)
    for step, (g, w) in enumerate(zip(results[0]["relu2"], want)):
        check_close(g["loss"], w["loss"], f"step {step} loss")
        for n in w["grads"]:
            check_close(g["grads"][n], w["grads"][n], f"step {step} grad {n}")


def test_a_new_kind_exports_to_hf(relu2_kind, tmp_path):
    pytest.importorskip("transformers")
    from sbtrain.export import export
    from sbtrain.models.weights import save_weights
    from tests.export.test_hf_export import load_hf

    cfg = tiny()
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    src = save_weights(model.state_dict().items(), cfg, tmp_path / "weights")
    out = export(src, tmp_path / "hf")
    assert "class SbtrainReLU2FFN" in (out / "modeling_sbtrain.py").read_text()
    hf = load_hf(out)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids, return_logits=True).logits
        got = hf(ids, use_cache=False).logits.float()
    assert (got - want).abs().max().item() < 1e-4
