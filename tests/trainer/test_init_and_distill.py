"""Starting from converted weights: ``trainer.init_from``, the new parameters' own schedule with a
frozen-body phase, and distillation from a teacher's logits."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sbtrain.cli.app import RECIPES_DIR
from sbtrain.config.model import ConfigError
from sbtrain.config.train import DistillConfig, NewParamsConfig
from sbtrain.models.build import build_model, to_model_config
from sbtrain.models.weights import save_weights
from sbtrain.trainer.build import build_trainer
from tests.trainer.e2e import SMALL, run


def _weights(tmp_path, seed: int, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*SMALL, *overrides])
    model_cfg = to_model_config(cfg.model)
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    out = tmp_path / f"weights{seed}"
    save_weights(model.state_dict().items(), model_cfg, out)
    return out, model.state_dict()


def _final_weights(dataset, out, *extra) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*SMALL, f"data.datasets=[{dataset}]", f"trainer.out_dir={out}", *extra])
    trainer, _ = build_trainer(cfg)
    assert trainer.maybe_resume("auto") is not None
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_init_from_decides_the_starting_weights_not_the_seed(dataset, tmp_path):
    weights, _ = _weights(tmp_path, seed=7)
    common = ["trainer.max_steps=1", "trainer.eval_every=1", "trainer.eval_batches=2"]
    a = run(dataset, tmp_path / "a", *common, f"trainer.init_from={weights}", "trainer.seed=1")
    b = run(dataset, tmp_path / "b", *common, f"trainer.init_from={weights}", "trainer.seed=2")
    c = run(dataset, tmp_path / "c", *common, "trainer.seed=2")
    assert a["first_valid_loss"] == b["first_valid_loss"] != c["first_valid_loss"]


def test_frozen_body_phase_trains_only_the_new_parameters(dataset, tmp_path):
    weights, start = _weights(tmp_path, seed=7)
    extra = [f"trainer.init_from={weights}", "trainer.max_steps=2", "optim.new_params.freeze_body_steps=2",
             "optim.new_params.lr=1e-2", "optim.weight_decay=0.0"]
    run(dataset, tmp_path / "run", *extra)
    final = _final_weights(dataset, tmp_path / "run", *extra)
    new = [k for k in start if "gk_proj" in k or "g_norm" in k]
    body = [k for k in start if k not in new]
    assert new and all(not torch.equal(start[k], final[k]) for k in new), "new parameters did not train"
    assert all(torch.equal(start[k], final[k]) for k in body), "the body moved during the frozen phase"


def test_distillation_from_itself_starts_at_zero_kl(dataset, tmp_path):
    weights, _ = _weights(tmp_path, seed=7)
    out = tmp_path / "kd"
    run(dataset, out, f"trainer.init_from={weights}", f"distill.teacher={weights}", "distill.weight=0.5",
        "trainer.max_steps=3", "distill.temperature=2.0")
    kd = [json.loads(x)["kd_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
          if json.loads(x).get("kind") == "train"]
    assert kd[0] < 1e-6 < kd[-1], f"KL to an identical teacher must start at 0 and grow as the student moves: {kd}"


def test_distillation_needs_the_same_vocabulary(dataset, tmp_path):
    teacher, _ = _weights(tmp_path, 7, "model.vocab_size=352")
    with pytest.raises(ConfigError, match="vocab_size=352"):
        run(dataset, tmp_path / "bad", f"distill.teacher={teacher}", "distill.weight=1.0", "trainer.max_steps=1")


@pytest.mark.parametrize("cfg,message", [
    (DistillConfig(weight=-1.0), r"distill.weight=-1.0 must be >= 0"),
    (DistillConfig(weight=1.0, teacher="t", temperature=0.0), r"distill.temperature=0.0 must be positive"),
    (DistillConfig(weight=1.0), r"needs distill.teacher"),
    (NewParamsConfig(lr=0.0), r"optim.new_params.lr=0.0 must be positive"),
    (NewParamsConfig(freeze_body_steps=-2), r"optim.new_params.freeze_body_steps=-2 must be >= 0"),
])
def test_bad_distill_and_new_param_values_are_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_spike_aware_training_turns_on_at_train_from_step(dataset, tmp_path):
    """model.spike.train_from_step through the real Trainer, from saved weights (spike-aware continual
    pretraining; the spike switches come from the recipe, not the weights): identical to a run
    without spikes up to that step, different after it; the evaluation at that step already spikes."""
    weights, _ = _weights(tmp_path, seed=7)
    common = ["trainer.max_steps=4", "trainer.eval_every=2", f"trainer.init_from={weights}"]
    plain, late, post_hoc = tmp_path / "plain", tmp_path / "late", tmp_path / "post_hoc"
    run(dataset, plain, *common)
    run(dataset, late, *common, "model.spike.mode=train", "model.spike.train_from_step=2")
    run(dataset, post_hoc, *common, "model.spike.mode=eval")
    from tests.trainer.e2e import losses

    a, b = losses(plain), losses(late)
    assert [a[s] for s in (1, 2)] == [b[s] for s in (1, 2)]
    assert a[3] != b[3] and a[4] != b[4]
    va, vb = losses(plain, "valid"), losses(late, "valid")
    assert va[0] == vb[0] and va[2] != vb[2]
    assert losses(post_hoc) == a  # mode=eval trains without spikes ...
    assert all(losses(post_hoc, "valid")[s] != va[s] for s in va)  # ... and evaluates with them
