"""``sbtrain-info``: the expected parameter counts, one JSON line on stdout and no Hydra output
folders (in a subprocess, as a user runs it), friendly errors for typos and invalid configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sbtrain.cli import info
from sbtrain.cli.app import EXIT_CONFIG_ERROR, run_app
from tests.models.helpers import recipe

REPO = Path(__file__).resolve().parents[2]


def run_info_process(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "sbtrain.cli.info", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    "name, overrides, total, active",
    [
        ("sb7b", [], 7.6e9, 7.6e9),
        ("sb76b", [], 76.05e9, 11.89e9),
        ("sb76b", ["model.hybrid.share_branch_projections=false"], 76.88e9, 12.71e9),
    ],
)
def test_parameter_counts_match_the_report(name, overrides, total, active):
    result = info.model_info(recipe(name, overrides))
    assert abs(result["params_total"] / total - 1) < 0.01, result["params_total"]
    assert abs(result["params_active"] / active - 1) < 0.01, result["params_active"]
    assert len(result["layer_pattern"]) == 28
    if name == "sb76b":
        assert result["share_branch_projections"] == (not overrides)
        assert result["moe"]["num_experts"] == 16 and len(result["moe"]["moe_layers"]) == 21
        assert [i for i, k in enumerate(result["layer_pattern"]) if k == "hybrid_full"] == [6, 13, 20, 27]
    else:
        assert result["layer_pattern"][:2] == ["gla", "swa"] and result["moe"] is None


def test_cli_prints_exactly_one_json_line_and_writes_nothing(tmp_path):
    result = run_info_process("model=sb76b", "model.hybrid.share_branch_projections=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    printed = json.loads(lines[0])
    assert printed["model"] == "sb76b" and printed["share_branch_projections"] is False
    assert abs(printed["params_total"] / 76.88e9 - 1) < 0.01 and abs(printed["params_active"] / 12.71e9 - 1) < 0.01
    assert list(tmp_path.iterdir()) == []  # no outputs/ or .hydra folder, no chdir side effects


def test_cli_typo_exits_nonzero_naming_the_closest_key(tmp_path):
    result = run_info_process("model.hiden_size=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "'model.hiden_size'" in result.stderr and "model.hidden_size" in result.stderr


def run_in_process(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_app(info.task, "info", argv=argv)
    return exit_info.value.code, capsys.readouterr().err


def test_unknown_model_name_lists_choices(capsys):
    code, err = run_in_process(["model=sb7x"], capsys)
    assert code == EXIT_CONFIG_ERROR and "did you mean sb7b" in err


def test_nested_typo_suggests_the_sibling_key(capsys):
    code, err = run_in_process(["model=sb76b", "model.moe.topk=2"], capsys)
    assert code == EXIT_CONFIG_ERROR and "model.moe.top_k" in err


def test_invalid_config_gives_the_validation_message(capsys):
    code, err = run_in_process(["model=sb7b", "model.num_key_value_heads=5"], capsys)
    assert code == EXIT_CONFIG_ERROR
    assert "num_key_value_heads=5" in err and "Traceback" not in err
