"""Tensor + sequence parallelism (sbtrain.models.parallelize) on 2 gloo ranks equals one process.

Tiny models in float64: qwen2 (full + swa; also with tied embeddings, and without SP), sb7b
(gla + swa) and sb76b (hybrid_swa + hybrid_full with sinks and a 4-expert MoE layer; shared and
separate branch projections, and without SP). Same initial weights on both sides, 3 SGD steps:
the loss of every step (on both ranks), the MoE aux loss, every parameter's gradient (DTensor
grads gathered with ``full_tensor()``) and every parameter after each step match the
single-process run; so do the logits of ``return_logits``. Grads keep their parameter's
placement, losses come out as plain tensors, and validate_tensor_parallel names bad values.

The bound is fp32's, not float64's: a float64 model still has fp32 steps by design (RMSNorm
normalises in fp32 as HF does, the loss is the chunked fp32 cross-entropy, vocabulary-sharded
under TP, the MoE router runs in fp32, the chunked GLA in fp32 chunks; forcing
``gla:reference`` would leave the others), and the sharded sums round differently there. Measured
max|diff| / max(1, max|ref|) over every case, step, gradient and parameter: 3.6e-7 (qwen2_tied,
step 2 gradient); losses <= 1.1e-7; logits equal. Bound 2e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from sbtrain.config.model import ConfigError
from sbtrain.config.parallel import validate_tensor_parallel
from sbtrain.models import build_model
from sbtrain.models.parallelize import apply_tensor_parallel
from tests.distributed.harness import run_distributed
from tests.models.helpers import recipe

pytestmark = pytest.mark.distributed

STEPS, LR, B, T = 3, 1.0, 2, 16
TOL = 2e-6  # relative to max(1, max|ref|); see the module docstring
TINY = ["model.hidden_size=32", "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=8",
        "model.intermediate_size=64", "model.vocab_size=128", "model.sliding_window=5", "model.init_std=0.1"]
SB76B = [*TINY, "model.num_layers=2", "model.layer_pattern=[hybrid_swa,hybrid_full]",
         "model.hybrid.num_sink_tokens=3", "model.moe.dense_layers=[0]", "model.moe.expert_intermediate_size=16"]
QWEN2 = [*TINY, "model.num_layers=2", "model.layer_pattern=[full,swa]"]
# (name, recipe, overrides, sequence_parallel)
CASES = [
    ("qwen2", "qwen2_tiny", QWEN2, True),
    ("qwen2_no_sp", "qwen2_tiny", QWEN2, False),
    ("qwen2_tied", "qwen2_tiny", [*QWEN2, "model.tie_embeddings=true"], True),
    ("sb7b", "sb7b_tiny", [*TINY, "model.num_layers=2"], True),
    ("sb76b_shared", "sb76b_tiny", [*SB76B, "model.hybrid.share_branch_projections=true"], True),
    ("sb76b_separate", "sb76b_tiny", [*SB76B, "model.hybrid.share_branch_projections=false"], True),
    ("sb76b_no_sp", "sb76b_tiny", SB76B, False),
]


def make_batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[:, :3] = -100
    return ids, labels


def init_state(cfg) -> dict:
    torch.manual_seed(1)
    return {k: v.double() for k, v in build_model(cfg).state_dict().items()}


def train(model, cfg, full=lambda t: t) -> list[dict]:
    """3 SGD steps on one batch; per step: loss, grads and params after the step (gathered)."""
    ids, labels = make_batch(cfg.vocab_size)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    record = []
    for step in range(STEPS):
        out = model(ids, labels=labels, return_logits=step == 0)
        loss = out.loss_sum / out.num_tokens + out.aux_loss
        opt.zero_grad()
        loss.backward()
        grads = {n: full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
        entry = {"loss": loss.detach(), "aux": out.aux_loss.detach(), "grads": grads,
                 "params": {n: full(p.detach()).clone() for n, p in model.named_parameters()}}
        if step == 0:
            entry["logits"] = out.logits.detach()
        record.append(entry)
    return record


def _tp_worker(cases):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    results = {}
    for name, cfg, state, sequence_parallel in cases:
        model = build_model(cfg).double()
        model.load_state_dict(state)
        apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
        record = train(model, cfg, full=lambda t: t.full_tensor() if isinstance(t, DTensor) else t)
        for n, p in model.named_parameters():  # grads come out with the parameter's own placement
            assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, (name, n, p.grad)
        for entry in record:
            assert type(entry["loss"]) is torch.Tensor and type(entry["aux"]) is torch.Tensor, "plain tensors out"
        # Rank 1 returns only its losses (identical on every rank); rank 0 returns everything.
        results[name] = record if dist.get_rank() == 0 else [e["loss"] for e in record]
    return results


def check_close(got, want, what, tol=TOL):
    tol = tol * max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what}: max|diff| {err:.3g} > {tol:.3g}"


def test_tensor_parallel_matches_single_process():
    cases = []
    for name, recipe_name, overrides, sequence_parallel in CASES:
        cfg = recipe(recipe_name, overrides)
        cases.append((name, cfg, init_state(cfg), sequence_parallel))
    results = run_distributed(_tp_worker, 2, cases, timeout=240)
    for name, cfg, state, _ in cases:
        model = build_model(cfg).double()
        model.load_state_dict(state)
        want = train(model, cfg)
        got, losses_rank1 = results[0][name], results[1][name]
        for step, (g, w) in enumerate(zip(got, want)):
            check_close(g["loss"], w["loss"], f"{name} step {step} loss")
            check_close(losses_rank1[step], w["loss"], f"{name} step {step} loss on rank 1")
            check_close(g["aux"], w["aux"], f"{name} step {step} aux loss")
            assert g["grads"].keys() == w["grads"].keys()
            for n in w["grads"]:
                check_close(g["grads"][n], w["grads"][n], f"{name} step {step} grad {n}")
                check_close(g["params"][n], w["params"][n], f"{name} step {step} param {n}")
        check_close(got[0]["logits"], want[0]["logits"], f"{name} logits")
        if cfg.moe.num_experts:
            assert want[0]["aux"].item() > 0, "the MoE layer must contribute an aux loss"


@pytest.mark.parametrize(
    "overrides, tp, message",
    [
        (["model.num_attention_heads=6", "model.num_key_value_heads=2"], 4,
         "model.num_attention_heads=6 is not divisible by parallel.tp=4"),
        (["model.num_key_value_heads=2"], 4, "repeated 2 times (model.num_key_value_heads=4"),
        (["model.num_attention_heads=8", "model.num_key_value_heads=1"], 2, "model.num_key_value_heads=2"),
        (["model.intermediate_size=66"], 4, "model.intermediate_size=66 is not divisible by parallel.tp=4"),
        (["model.vocab_size=130"], 4, "pad the vocabulary to a multiple of tp (e.g. 132)"),
    ],
)
def test_validate_tensor_parallel_errors(overrides, tp, message):
    cfg = recipe("qwen2_tiny", [*TINY, "model.num_attention_heads=8", "model.num_key_value_heads=4", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_tensor_parallel(cfg, tp)


def test_validate_tensor_parallel_accepts():
    validate_tensor_parallel(recipe("sb76b_tiny"), 2)  # 4 q / 2 kv heads, vocab 8192, FFN 768
