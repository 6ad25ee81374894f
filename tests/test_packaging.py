"""A regular (non-editable) install works on its own: built from a copy of the project with pip
(no network, no dependency reinstalled) into a temporary folder, it holds every module and every
recipe, and ``python -m sbtrain.train experiment=tiny_cpu`` run from outside the checkout, with only
that folder on PYTHONPATH, trains a few steps on a tiny corpus built here (about 12 s on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import make_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sbtrain", "parallel", "operators")
# What pip reads from a checkout: the metadata, the packages and the recipes (sbtrain/recipes links there).
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in")
PROJECT_DIRS = (*PACKAGES, "recipes")
TINY = [  # tests/trainer/e2e.py's small model and batches, 2 steps
    "model.vocab_size=320", "model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.intermediate_size=128", "model.sliding_window=16", "trainer.seq_len=32",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.eval_every=2",
    "trainer.eval_batches=1", "data.valid_fraction=0.05", "logger.console=false", "logger.wandb.mode=disabled",
    "logger.plot=false",
]


def offline_env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "SBTRAIN_"))}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def run(args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, (f"{' '.join(args)} exited {done.returncode}:\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The project installed with ``pip install --no-deps --no-build-isolation --target``, from a copy
    (the build writes build/ and *.egg-info next to the sources; the checkout is left alone)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, site = tmp / "src", tmp / "site"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)], cwd=tmp, env=offline_env(tmp / "nothing"), timeout=300)
    return site


def test_install_holds_every_module_and_recipe(site):
    """A package folder without ``__init__.py`` is skipped by ``packages = find:``; a recipe not matched
    by ``[options.package_data]`` is left behind. Both only show in an install."""
    wanted = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
              if "__pycache__" not in p.parts}
    recipes = ROOT / "recipes"
    wanted |= {f"sbtrain/recipes/{p.relative_to(recipes).as_posix()}" for p in recipes.rglob("*.yaml")}
    installed = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    missing = sorted(wanted - installed)
    assert not missing, f"not in a regular install (setup.cfg [options.packages.find] / package_data): {missing}"
    assert not (site / "sbtrain" / "recipes").is_symlink()  # copied, not a link back into the checkout
    assert not (site / "tests").exists()  # the test harness (tests/distributed/harness.py) does not ship


def test_installed_package_trains_tiny_cpu(site, tmp_path):
    from sbtrain.config.data import DataConfig, TokenizerConfig
    from sbtrain.data import build_indexed_dataset

    write_jsonl(tmp_path / "corpus.jsonl", make_docs(300, seed=3))
    build_indexed_dataset(DataConfig(paths=[str(tmp_path / "corpus.jsonl")], output=str(tmp_path / "tokenized")),
                          TokenizerConfig(kind="train_bpe", vocab_size=300, min_frequency=2))
    work = tmp_path / "elsewhere"  # outside the checkout: nothing may come from the repo
    work.mkdir()
    env = offline_env(site)

    probe = ("import json, operators, parallel, sbtrain; print(json.dumps({'sbtrain': sbtrain.__file__, "
             "'operators': operators.__file__, 'parallel': parallel.__file__, 'recipes': str(sbtrain.RECIPES_DIR)}))")
    where = json.loads(run([sys.executable, "-c", probe], cwd=work, env=env, timeout=120).stdout.splitlines()[-1])
    for name, path in where.items():
        assert Path(path).resolve().is_relative_to(site.resolve()), f"{name} comes from {path}, not from {site}"
    assert (Path(where["recipes"]) / "experiment" / "tiny_cpu.yaml").is_file()

    out = tmp_path / "run"
    train = [sys.executable, "-m", "sbtrain.train", "experiment=tiny_cpu", f"data.datasets=[{tmp_path / 'tokenized'}]",
             f"trainer.out_dir={out}", *TINY]
    done = run(train, cwd=work, env=env, timeout=240)
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"summary"')))["summary"]
    assert summary["step"] == 2 and summary["out_dir"] == str(out)
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    assert not any(work.iterdir()), f"the run wrote into its working folder: {sorted(work.iterdir())}"
