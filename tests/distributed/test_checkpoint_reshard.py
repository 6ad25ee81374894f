"""DCP checkpoints saved at one parallel layout load at another (and in one process): every
parameter and every optimizer-state tensor comes back equal, and training continues from it."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.parallel_cases import build_case, full_state

pytestmark = pytest.mark.distributed

BASE = {"global_batch": 4, "micro_batch": 1, "seq_len": 16, "optim": "adamw"}


def _save_then_load(directory: str, save: dict, load: dict) -> dict:
    trainer, data = build_case(save, seed=0, checkpoint_dir=directory)
    trainer.train_step(data.next_global_batch())
    trainer.step = 1
    trainer.save_checkpoint()
    saved = full_state(trainer)
    other, _ = build_case(load, seed=1, checkpoint_dir=directory)  # different weights until loaded
    assert other.maybe_resume("auto") is not None, "no checkpoint found to resume from"
    loaded = full_state(other)
    return {"saved": saved, "loaded": loaded, "step": other.step, "data": other.train_data.state_dict()}


def _assert_equal_states(a: dict, b: dict, label: str) -> None:
    assert a.keys() == b.keys(), f"{label}: state keys differ: {sorted(set(a) ^ set(b))[:6]}"
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{label}: {key} differs after loading"


@pytest.mark.parametrize("save,load", [
    ({"dp_replicate": 1}, {"cp": 2}),  # save dp=2 (FSDP), load cp=2
    ({"cp": 2}, {"dp_replicate": 1}),  # save cp=2, load dp=2
    ({"dp_replicate": 1}, {"tp": 2}),  # save dp=2 (FSDP), load tp=2 (DTensor TP plan)
])
def test_checkpoint_loads_at_another_layout(tmp_path, save, load):
    specs = ({**BASE, "model": "sb7b", **save}, {**BASE, "model": "sb7b", **load})
    out = run_distributed(_save_then_load, 2, str(tmp_path / "ckpt"), *specs, timeout=300)[0]
    _assert_equal_states(out["saved"], out["loaded"], f"{save} -> {load}")
    assert out["step"] == 1 and out["data"] == {"step": 1}
    # And in a single process, unsharded.
    single, _ = build_case({**BASE, "model": "sb7b"}, seed=2, checkpoint_dir=str(tmp_path / "ckpt"))
    assert single.maybe_resume("auto") is not None
    _assert_equal_states(out["saved"], full_state(single), f"{save} -> one process")


def test_expert_parallel_checkpoint_loads_without_ep(tmp_path):
    spec = {**BASE, "model": "sb76b"}
    out = run_distributed(_save_then_load, 2, str(tmp_path / "ckpt"), {**spec, "ep": 2}, {**spec, "cp": 2},
                          timeout=300)[0]
    _assert_equal_states(out["saved"], out["loaded"], "ep=2 -> cp=2")
