"""Resuming a run directory: a checkpoint of another model, tokenizer or vocabulary is refused
before anything in the run is overwritten (``trainer.resume_model_change=allow`` for deliberate
surgery), and metrics.jsonl holds one value per step after a resume, with a marker line."""

from __future__ import annotations

import json
import shutil

import pytest

from sbtrain.config.model import ConfigError
from sbtrain.trainer.callbacks import plot_loss_curve
from sbtrain.trainer.checkpoint import CheckpointError
from tests.corpus import make_docs, write_jsonl
from tests.trainer.e2e import SMALL, run

# SMALL with the Transformer instead of the hybrid (same widths: its tensors are a subset of the hybrid's).
QWEN = [("model=qwen2_tiny" if o == "model=sb7b_tiny" else o) for o in SMALL]


def _run_files(out) -> dict:
    """Every file of a run directory with its bytes (what a refused resume must leave alone)."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "train.log"}


def _qwen_run(dataset, out, *extra):
    """``run`` with the Transformer's overrides (``run`` prepends SMALL, whose model=sb7b_tiny Hydra
    would refuse to see twice)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sbtrain.cli.app import RECIPES_DIR
    from sbtrain.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*QWEN, f"data.datasets=[{dataset}]", f"trainer.out_dir={out}", *extra])
    return train(cfg)


def test_resume_with_another_architecture_is_refused_before_anything_is_written(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "trainer.max_steps=2")
    before = _run_files(out)
    with pytest.raises(ConfigError) as info:
        _qwen_run(dataset, out, "trainer.max_steps=4")
    message = str(info.value)
    assert "model.layer_pattern: checkpoint [gla, swa] vs this run [full]" in message, message
    assert "step_00000002" in message and "trainer.resume_model_change=allow" in message, message
    assert "model.name" not in message  # a name is not an architecture
    assert _run_files(out) == before  # config.yaml, metrics.jsonl, checkpoints: untouched


def test_allow_resumes_deliberately_and_a_partial_checkpoint_still_fails_clearly(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "trainer.max_steps=2")
    summary = _qwen_run(dataset, out, "trainer.max_steps=3", "trainer.resume_model_change=allow")
    assert summary["resumed_from"].endswith("step_00000002") and summary["step"] == 3
    assert "qwen2_tiny" in (out / "config.yaml").read_text()  # the run's record follows the accepted change
    # The other direction: the hybrid needs GLA tensors a Transformer checkpoint lacks. allow does
    # not make that loadable: the checkpoint's own check still names what is missing.
    other = tmp_path / "qwen"
    _qwen_run(dataset, other, "trainer.max_steps=2")
    with pytest.raises(CheckpointError, match=r"lacks \d+ entries the current run needs .*gk_proj"):
        run(dataset, other, "trainer.max_steps=3", "trainer.resume_model_change=allow")


def test_checkpoint_from_before_the_model_was_recorded_is_compared_by_its_run_config(dataset, tmp_path):
    from sbtrain.trainer.checkpoint import _sha256

    out = tmp_path / "run"
    run(dataset, out, "trainer.max_steps=1")
    step = out / "checkpoints" / "step_00000001"
    meta = json.loads((step / "meta.json").read_text())
    del meta["model_config"], meta["tokenizer"]  # what an older sbtrain wrote
    (step / "meta.json").write_text(json.dumps(meta))
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["meta.json"] = {"size": (step / "meta.json").stat().st_size, "sha256": _sha256(step / "meta.json")}
    (step / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"model.layer_pattern: checkpoint \[gla, swa\] vs this run \[full\]"):
        _qwen_run(dataset, out, "trainer.max_steps=2")
    assert run(dataset, out, "trainer.max_steps=2")["resumed_from"].endswith("step_00000001")


def test_vocabulary_change_is_named(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "trainer.max_steps=1")
    with pytest.raises(ConfigError, match="model.vocab_size: checkpoint 320 vs this run 352"):
        run(dataset, out, "trainer.max_steps=2", "model.vocab_size=352")


def test_tokenizer_change_is_refused(dataset, tmp_path):
    from sbtrain.config.data import DataConfig, TokenizerConfig
    from sbtrain.data import build_indexed_dataset

    write_jsonl(tmp_path / "other.jsonl", make_docs(120, seed=11))
    other = tmp_path / "other_ds"
    build_indexed_dataset(DataConfig(paths=[str(tmp_path / "other.jsonl")], output=str(other)),
                          TokenizerConfig(kind="train_bpe", vocab_size=280))
    out = tmp_path / "run"
    run(dataset, out, "trainer.max_steps=1")
    with pytest.raises(ConfigError, match=r"tokenizer: checkpoint [0-9a-f]{12}.* vs this run [0-9a-f]{12}"):
        run(str(other), out, "trainer.max_steps=2")
    # The same tokenizer under another dataset is no change: it resumes.
    shutil.copytree(dataset, tmp_path / "copy")
    assert run(str(tmp_path / "copy"), out, "trainer.max_steps=2")["resumed_from"]


def test_redone_steps_appear_once_in_metrics_with_a_resume_marker(dataset, tmp_path):
    out = tmp_path / "run"
    common = ["trainer.max_steps=6", "checkpoint.every=3", "trainer.eval_every=2"]
    first = run(dataset, out, *common, "trainer.exit_at_step=5")
    assert first["stopped_by"] == "exit_at_step"
    # As if killed after step 5 was logged but before its checkpoint was written: 4 and 5 are redone.
    shutil.rmtree(out / "checkpoints" / "step_00000005")
    second = run(dataset, out, *common)
    assert second["resumed_from"].endswith("step_00000003") and second["step"] == 6
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    valid_steps = [r["step"] for r in records if r["kind"] == "valid"]
    assert train_steps == [1, 2, 3, 4, 5, 6], train_steps
    assert valid_steps == [0, 2, 4, 6], valid_steps
    (marker,) = [r for r in records if r["kind"] == "resume"]
    assert marker["step"] == 3 and marker["checkpoint"].endswith("step_00000003") and marker["dropped"] == 3
    assert records.index(marker) == [r.get("step") for r in records].index(4) - 1  # right before the redone steps
    assert plot_loss_curve(out / "metrics.jsonl", tmp_path / "loss.png") is not None  # the marker is no loss
