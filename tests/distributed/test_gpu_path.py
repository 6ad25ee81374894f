"""The GPU path's distributed rules, checked on gloo (issue 18):

- every tensor the trainer, FSDP, DTensor and the CP / EP collectives hand to a collective lives
  on the model's device (an NCCL group rejects CPU tensors at run time, never at import);
- MFU is per device: ``flops_per_token * tokens_per_s / (world * peak)``; on the CPU against a
  measured matmul it is labelled as such, never "mfu";
- gradient accumulation reduces once per optimizer step (FSDP2 no-sync), equal to one process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sbtrain.trainer.callbacks import Callback
from sbtrain.trainer.flops import PEAK_MEASURED, PEAK_OVERRIDE, Throughput
from sbtrain.trainer.model_stats import ModelStatsCallback
from tests.distributed.device_check import collectives_on_device
from tests.distributed.harness import run_distributed
from tests.distributed.parallel_cases import SyntheticData, assert_same_training, build_case, train_case

pytestmark = pytest.mark.distributed

BASE = {"global_batch": 4, "micro_batch": 1, "seq_len": 16}
LAYOUTS = [
    {**BASE, "model": "qwen2"},  # FSDP dp=2
    {**BASE, "model": "sb7b", "tp": 2},
    {**BASE, "model": "sb7b", "cp": 2, "docs": True},
    {**BASE, "model": "sb76b", "cp": 2},  # Ulysses + LASP-2 + sinks, MoE token statistics
    {**BASE, "model": "sb76b", "ep": 2},  # all-to-all dispatch
]


class _Validation:
    def __init__(self, spec: dict, dp_rank: int, dp: int):
        self.data = SyntheticData(spec, dp_rank, dp)

    def batches(self):
        yield from self.data.next_global_batch()


class _Record(Callback):
    all_ranks = True

    def __init__(self):
        self.metrics: list[dict] = []

    def on_step_end(self, trainer, metrics):
        self.metrics.append(dict(metrics))


def _fit_on_device_check(specs: list[dict]) -> list[list[tuple[str, str]]]:
    """fit() (train steps, evaluation, the stop-signal agreement, model statistics) under the check."""
    out = []
    for spec in specs:
        trainer, _ = build_case({**spec, "steps": 2})
        dp = trainer.mesh.dp if trainer.mesh is not None else 1
        trainer.valid_data = _Validation(spec, trainer.mesh.dp_rank if trainer.mesh else 0, dp)
        trainer.cfg.eval_every = 1
        trainer.callbacks = [ModelStatsCallback(every=1)]
        with collectives_on_device(trainer.device) as check:
            trainer.fit()
        assert check.seen, "no collective was seen: the check is not wired"
        out.append(check.violations)
    # The check itself catches a host tensor (as the trainer's token count once was).
    with collectives_on_device(torch.device("cpu")) as check:
        dist.all_reduce(torch.tensor(1.0))
    out.append(check.violations)
    return out


def test_every_collective_takes_device_tensors():
    got = run_distributed(_fit_on_device_check, 2, LAYOUTS, timeout=300)
    for rank, per_rank in enumerate(got):
        *layouts, control = per_rank
        for spec, violations in zip(LAYOUTS, layouts, strict=True):
            assert violations == [], f"rank {rank}, layout {spec}: collectives given host tensors: {violations[:5]}"
        assert control and "host tensor" in control[0][1], "the device check missed a host tensor"


def _mfu_metrics(peak: float, kind: str) -> list[dict]:
    trainer, _ = build_case({**BASE, "model": "sb7b", "steps": 2})
    trainer.throughput = Throughput(1.5e6, peak, kind)
    record = _Record()
    trainer.callbacks = [record]
    trainer.fit()
    return record.metrics


def _mfu_cases() -> dict:
    return {"override": _mfu_metrics(3e11, PEAK_OVERRIDE), "measured": _mfu_metrics(4e10, PEAK_MEASURED),
            "world": dist.get_world_size()}


def test_mfu_is_per_device_and_cpu_figure_is_not_called_mfu():
    got = run_distributed(_mfu_cases, 2, timeout=300)[0]
    assert got["world"] == 2
    for m in got["override"]:
        expected = 1.5e6 * m["tokens_per_s"] / (2 * 3e11)
        assert m["mfu"] == pytest.approx(expected, rel=1e-12)
        assert m["tflops_per_device"] == pytest.approx(1.5e6 * m["tokens_per_s"] / 2 / 1e12, rel=1e-12)
        assert "pct_of_measured_matmul" not in m
    for m in got["measured"]:
        assert "mfu" not in m, "a CPU matmul rate is not a hardware peak: no MFU"
        assert m["pct_of_measured_matmul"] == pytest.approx(100 * 1.5e6 * m["tokens_per_s"] / (2 * 4e10), rel=1e-12)


def _count_reduce_scatters(specs: list[dict]) -> list[dict]:
    """Per layout: reduce-scatters per optimizer step, the FSDP units, and the training record."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    counts: list[int] = []
    original = dist.reduce_scatter_single

    def counting(*args, **kwargs):  # FSDP2 reduce-scatters through this module attribute
        counts[-1] += 1
        return original(*args, **kwargs)

    for spec in specs:
        counts.clear()
        dist.reduce_scatter_single = counting
        try:
            trainer, data = build_case(spec)
            units = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
            stats = []
            for _ in range(trainer.cfg.max_steps):
                counts.append(0)
                stats.append(trainer.train_step(data.next_global_batch()))
        finally:
            dist.reduce_scatter_single = original
        out.append({"counts": list(counts), "units": units, "losses": [s.loss for s in stats]})
    return out


def test_gradient_accumulation_reduces_once_per_step():
    # 4 sequences, 2 ranks, micro batch 1: two micro batches per rank per step.
    specs = [{**BASE, "model": "sb7b", "grad_sync": "per_step"},
             {**BASE, "model": "sb7b", "grad_sync": "per_micro_batch"}]
    per_step, per_micro = run_distributed(_count_reduce_scatters, 2, specs, timeout=300)[0]
    assert per_step["units"] >= 3  # two blocks and the root
    assert per_step["counts"] == [per_step["units"]] * 3, per_step
    assert per_micro["counts"] == [2 * per_micro["units"]] * 3, per_micro
    ref = train_case({**specs[0], "dp_replicate": 1})
    assert per_step["losses"] == pytest.approx(ref["losses"], rel=1e-6)


def test_no_sync_accumulation_equals_single_process():
    spec = {**BASE, "model": "sb76b", "ep": 2, "grad_sync": "per_step"}
    got = run_distributed(train_case, 2, spec, timeout=300)[0]
    assert_same_training(train_case({**spec, "ep": 1}), got, str(spec))
