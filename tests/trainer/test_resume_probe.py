"""Looking for a checkpoint must not touch the optimizer: a fresh run's first AdamW update is
the textbook first update (bias correction of step 1), with or without a checkpoint directory."""

from __future__ import annotations

import torch

from tests.distributed.parallel_cases import build_case, full_state

SPEC = {"global_batch": 2, "micro_batch": 1, "seq_len": 8, "model": "qwen2", "optim": "adamw", "steps": 1}


def _one_step(trainer, data) -> dict:
    trainer.train_step(data.next_global_batch())
    return full_state(trainer)


def test_resume_probe_leaves_adam_state_alone(tmp_path):
    plain = _one_step(*build_case(SPEC))
    probed, data = build_case(SPEC, checkpoint_dir=str(tmp_path / "empty"))
    assert probed.maybe_resume("auto") is None
    after_probe = _one_step(probed, data)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "step_00000001").mkdir()  # a checkpoint directory without a manifest
    broken, data = build_case(SPEC, checkpoint_dir=str(tmp_path / "bad"))
    assert broken.maybe_resume("auto") is None
    after_broken = _one_step(broken, data)
    for key, value in plain.items():
        assert torch.equal(value, after_probe[key]), f"{key} differs after an empty-directory resume probe"
        assert torch.equal(value, after_broken[key]), f"{key} differs after a failed resume probe"
