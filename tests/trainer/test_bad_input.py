"""Bad training inputs are one clear message naming the key, the value and the fix: optimizer
values are checked before anything is built, a key in the wrong group suggests the right one,
and no command prints a traceback for bad input unless SBTRAIN_DEBUG=1 asks for it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sbtrain.cli.app import precheck
from sbtrain.config.model import ConfigError
from sbtrain.config.train import OptimConfig
from tests.trainer.e2e import ROOT, SMALL, run


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr=-1.0 must be > 0 (the peak learning rate)"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0 (the peak learning rate)"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers in [0, 1)"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must be in [0, 1] (the final lr is optim.lr x min_lr_ratio)"),
    ("optim.decay_fraction=2", "optim.decay_fraction=2.0 must be in [0, 1] (wsd: the share of steps that decay)"),
    ("optim.schedule=cosin", "optim.schedule='cosin' is unknown; use one of cosine, wsd, constant, linear"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0 must be >= 0 (0: no clipping)"),
])
def test_optimizer_values_fail_before_training(dataset, tmp_path, override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        run(dataset, tmp_path, "trainer.max_steps=1", override)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_default_optimizer_config_is_valid():
    from sbtrain.config.train import SCHEDULES
    from sbtrain.trainer.optim import SCHEDULES as IMPLEMENTED

    assert OptimConfig().validate() is not None
    assert SCHEDULES == IMPLEMENTED  # the schema's list is the trainer's
    with pytest.raises(ConfigError, match=r"optim.lr=nan must be > 0"):
        OptimConfig(lr=float("nan")).validate()


def test_a_key_in_the_wrong_group_suggests_the_right_one():
    message = precheck("train", ["trainer.lr=1e-3"])
    assert message.startswith("unknown config key 'trainer.lr' in override 'trainer.lr=1e-3'; did you mean optim.lr"), \
        message
    # Typos inside the right group still find their sibling first.
    assert "did you mean trainer.max_steps" in precheck("train", ["trainer.max_stepz=5"])


def _cli(tmp_path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SBTRAIN_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", **({"SBTRAIN_DEBUG": "1"} if debug else {}))
    return subprocess.run([sys.executable, "-m", "sbtrain.train", *args, f"trainer.out_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_bad_value_is_one_line_without_a_traceback_unless_debugging(tmp_path):
    plain = _cli(tmp_path, "optim.lr=-1", "trainer.max_steps=1")
    assert plain.returncode == 2, plain.stderr
    assert "Traceback" not in plain.stdout + plain.stderr
    assert "error: optim.lr=-1.0 must be > 0 (the peak learning rate)\n" in plain.stderr
    debug = _cli(tmp_path, "optim.lr=-1", "trainer.max_steps=1", debug=True)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError: optim.lr=-1.0" in debug.stderr


def test_damaged_weights_and_checkpoints_are_clean_errors_on_the_command_line(dataset, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sbtrain.cli.app import RECIPES_DIR
    from sbtrain.models.build import build_model, to_model_config
    from sbtrain.models.weights import save_weights

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        model_cfg = to_model_config(compose("train", overrides=SMALL).model)
    weights = save_weights(build_model(model_cfg).state_dict().items(), model_cfg, tmp_path / "weights")
    file = weights / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    common = [*SMALL, f"data.datasets=[{dataset}]", "trainer.max_steps=1"]
    bad = _cli(tmp_path, *common, f"trainer.init_from={weights}")
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr, bad.stderr
    assert f"error: {file} has {file.stat().st_size} bytes, weights_manifest.json says " in bad.stderr
    missing = _cli(tmp_path, *common, f"trainer.resume={tmp_path / 'nowhere'}")
    assert missing.returncode == 1 and "Traceback" not in missing.stdout + missing.stderr, missing.stderr
    assert f"error: checkpoint {tmp_path / 'nowhere'} is not usable: no manifest.json" in missing.stderr
