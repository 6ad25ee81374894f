"""Pipeline parallelism (``parallel/pipeline.py`` + ``sbtrain/models/pipeline_stages.py``) trains
exactly like one process: for pp=2 with every schedule (1F1B, Interleaved1F1B, ZBV, DualPipeV), on
the tiny hybrid (GLA + SWA) and the tiny MoE (parallel hybrid mixers, MoE aux + z losses), the loss,
the aux loss, an evaluation between steps and every parameter's gradient over 3 SGD steps equal the
unsplit float64 model running the same micro batches one after another, at max|Δ| <= 1e-10
(measured: 0 for pp alone, <= 6e-17 with dp). Also pp=2 x dp=2 (plain all-reduce and FSDP2), and
every layout error before a model is built. All distributed cases of a world size run in one
``run_distributed`` call (worker start-up dominates)."""

from __future__ import annotations

import pytest
import torch

from parallel import pipeline as P
from sbtrain.models.build import build_model
from sbtrain.models.pipeline_stages import (
    build_stage_modules,
    pipeline_batch,
    validate_pipeline_model,
)
from tests.distributed import pipeline_cases as pc
from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.distributed

TOL = 1e-10

PP2_CASES = [
    {"model": "sb7b", "schedule": "1F1B", "micro": 4, "docs": True},
    {"model": "sb7b", "schedule": "Interleaved1F1B", "micro": 8},
    {"model": "sb7b", "schedule": "ZBV", "micro": 4, "tied": True},
    {"model": "sb7b", "schedule": "DualPipeV", "micro": 4, "docs": True},
    {"model": "sb76b", "schedule": "1F1B", "micro": 8, "mb": 2},
    {"model": "sb76b", "schedule": "Interleaved1F1B", "micro": 4, "docs": True, "layers": 6, "split": [1, 2, 2, 1]},
    {"model": "sb76b", "schedule": "ZBV", "micro": 8, "docs": True},
    {"model": "sb76b", "schedule": "DualPipeV", "micro": 4, "tied": True},
]

DP2_CASES = [
    {"model": "sb76b", "schedule": "1F1B", "micro": 4, "docs": True},  # plain all-reduce over dp
    {"model": "sb7b", "schedule": "ZBV", "micro": 4, "fsdp": True},  # FSDP2 fully_shard per stage
    {"model": "sb76b", "schedule": "Interleaved1F1B", "micro": 4, "fsdp": True},
]


def _check(cases: list[dict], dp: int) -> None:
    got = run_distributed(pc.run_cases, 2 * dp, cases, dp, timeout=300)
    for i, case in enumerate(cases):
        ref = pc.reference_train({**case, "dp": dp})
        merged = pc.merge_ranks([rank[i] for rank in got])
        err = pc.max_diff(ref, merged)
        assert err <= TOL, f"{case} dp={dp}: max|Δ| {err:.3g} vs one process"
        assert (ref["aux"][0] > 0) == (case["model"] == "sb76b"), "the MoE aux loss must be exercised"


def test_pp2_every_schedule_equals_single_process():
    _check(PP2_CASES, dp=1)


def test_pp2_dp2_equals_single_process():
    _check(DP2_CASES, dp=2)


# ----- without processes: placement, layout errors, the cut itself


def test_stage_placement():
    assert [P.stage_ids("1F1B", 4, r) for r in range(4)] == [[0], [1], [2], [3]]
    assert [P.stage_ids("Interleaved1F1B", 2, r) for r in range(2)] == [[0, 2], [1, 3]]
    assert P.stage_ids("Interleaved1F1B", 2, 1, virtual_stages=3) == [1, 3, 5]
    for name in ("ZBV", "DualPipeV"):  # V: rank r holds r and 2pp-1-r
        assert [P.stage_ids(name, 4, r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
        assert P.last_stage_rank(name, 4) == 0
    assert P.last_stage_rank("1F1B", 4) == 3 and P.last_stage_rank("Interleaved1F1B", 2) == 1
    assert P.default_split(10, 4) == [2, 3, 3, 2]
    for p, m in ((2, 8), (4, 8), (4, 5)):  # the simulation of torch's order gives the textbook bubble
        assert P.theoretical_bubble("1F1B", p, m) == pytest.approx((p - 1) / (m + p - 1))
        assert P.theoretical_bubble("Interleaved1F1B", p, 8) == pytest.approx((p - 1) / (2 * 8 + p - 1))


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "GPipe"}, "unknown schedule 'GPipe'"),
    ({"schedule": "zbv"}, "did you mean 'ZBV'"),
    ({"split": [2, 0, 1, 1]}, "leaves stage(s) [1] without a layer"),
    ({"split": [2, 2, 1, 1]}, "sums to 6 layers but the model has 4; e.g. [1, 1, 1, 1]"),
    ({"split": [2, 2]}, "has 2 entries but the layout has 4 stages"),
    ({"schedule": "1F1B", "pp": 4, "micro": 2}, "needs >= 4 micro batches; got 2; use 4"),
    ({"schedule": "DualPipeV", "micro": 3}, "DualPipeV with pp=2 (4 stages) needs >= 4 micro batches; got 3; use 4"),
    ({"schedule": "Interleaved1F1B", "micro": 5}, "divisible by max(1, n // pp) = 2; got 5; use 6"),
    ({"pp": 1}, "pp=1"),
    ({"schedule": "ZBV", "virtual": 3}, "exactly 2 stage(s) per rank"),
    ({"schedule": "1F1B", "tied": True},
     "tie_embeddings=true needs the embedding (stage 0, pp rank 0) and the LM head (stage 1, pp rank 1)"),
])
def test_layout_errors_before_building(kwargs, message):
    kw = {"schedule": "Interleaved1F1B", "pp": 2, "micro": 4, **kwargs}
    cfg = pc.model_config("sb7b", tie_embeddings=kw.get("tied", False))
    with pytest.raises(ValueError) as err:
        validate_pipeline_model(cfg, kw["schedule"], kw["pp"], kw["micro"], kw.get("split"), kw.get("virtual"))
    assert message in str(err.value)


def test_tied_embeddings_allowed_on_v_schedules():
    cfg = pc.model_config("sb7b", tie_embeddings=True)
    for name in ("ZBV", "DualPipeV"):
        assert validate_pipeline_model(cfg, name, 2, 4) == [1, 1, 1, 1]
    model = build_model(cfg)
    with pytest.raises(ValueError, match="must be on one rank"):
        build_stage_modules(model, [2, 2], [1])


def test_stages_keep_names_and_chain_to_the_full_model():
    """Stages carry the model's parameter names (a DCP checkpoint maps 1:1) and, run in order on
    one process, give the full model's loss and aux bit for bit (documents included)."""
    for kind in ("sb7b", "sb76b"):
        case = {"model": kind, "docs": True, "micro": 2, "layers": 6}
        torch.set_default_dtype(torch.float64)
        try:
            model = pc.make_model(case)
            stages = build_stage_modules(model, [1, 3, 2], [0, 1, 2])
            names = [n for s in stages for n in s.state_dict()]
            assert sorted(names) == sorted(model.state_dict()) and len(names) == len(set(names))
            assert "model.layers.3.post_attention_layernorm.weight" in stages[1].state_dict()
            mbs = pc.global_batch(case, 0)
            batch = pipeline_batch(mbs, pc.case_config(case))
            for i, mb in enumerate(mbs):
                kw = {k: v[i:i + 1] for k, v in batch["kwargs"].items()}
                x = batch["args"][0][i:i + 1]
                out = (x,)
                for s in stages:
                    out = s(*out, **kw)
                full = model(mb["input_ids"], labels=mb["labels"], cu_seqlens=mb["cu_seqlens"])
                assert torch.equal(out[0], full.loss_sum) and torch.equal(out[1], full.aux_loss)
        finally:
            torch.set_default_dtype(torch.float32)
