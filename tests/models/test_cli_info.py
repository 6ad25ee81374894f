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


def expected_counts(name: str, share_branch_projections: bool = True) -> tuple[int, int]:
    """(total, active) parameters of sb7b / sb76b, written out from the architecture (Qwen2.5-7B
    shapes) independently of the model code, so that a missing bias, norm or sink fails."""
    V, d, L, Hq, Hkv, hd, ffn = 152064, 3584, 28, 28, 4, 128, 18944
    embeddings = V * d  # embed_tokens
    lm_head = V * d  # untied
    final_norm = d
    block_norms = 2 * d  # input_layernorm, post_attention_layernorm
    q_proj = d * Hq * hd + Hq * hd  # with bias
    k_proj = v_proj = d * Hkv * hd + Hkv * hd  # with bias
    o_proj = Hq * hd * d  # no bias
    qkvo = q_proj + k_proj + v_proj + o_proj
    mlp = 3 * d * ffn  # SwiGLU gate/up/down, no biases
    if name == "sb7b":
        # 14 GLA layers (0, 2, ..., 26): gk_proj = Linear(d, 16, no bias) -> Linear(16, Hkv*hd, bias),
        # and g_norm (per-head RMSNorm); 14 SWA layers: q/k/v/o only.
        gla_extra = d * 16 + 16 * Hkv * hd + Hkv * hd + hd
        total = embeddings + lm_head + final_norm + L * (block_norms + qkvo + mlp) + 14 * gla_extra
        return total, total
    # sb76b: every layer a hybrid: q/k/v/o (twice when the branches do not share them), 128 sink
    # keys and values per KV head, attn_norm + linear_norm (per head), beta_attn + beta_linear
    # (per channel); the key-tied decay has no parameters of its own.
    sinks, E = 128, 16
    hybrid_extra = 2 * sinks * Hkv * hd + 2 * hd + 2 * Hq * hd
    mixer = (1 if share_branch_projections else 2) * qkvo + hybrid_extra
    dense_layers, moe_layers = 7, 21  # dense FFN at 0, 1, 2, 4, 6, 8, 10
    routed = 3 * E * d * ffn  # 16 experts of the dense FFN's size
    moe = E * d + routed + mlp  # router (no bias) + routed experts + 1 shared expert
    total = embeddings + lm_head + final_norm + L * (block_norms + mixer) + dense_layers * mlp + moe_layers * moe
    active = total - moe_layers * (routed - routed // E)  # top-1: one routed expert of 16 per token
    return total, active


@pytest.mark.parametrize(
    "name, overrides, total, active",
    [
        ("sb7b", [], 7_616_542_976, 7_616_542_976),  # the report: 7.6B
        ("sb76b", [], 76_059_156_992, 11_898_102_272),  # 76.05B / 11.89B
        ("sb76b", ["model.hybrid.share_branch_projections=false"], 76_881_369_600, 12_720_314_880),  # 76.88B / 12.71B
    ],
)
def test_parameter_counts_match_the_report(name, overrides, total, active):
    assert (total, active) == expected_counts(name, share_branch_projections=not overrides)
    result = info.model_info(recipe(name, overrides))
    assert (result["params_total"], result["params_active"]) == (total, active)
    assert result["params_embedding"] == result["params_lm_head"] == 152064 * 3584
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
    assert (printed["params_total"], printed["params_active"]) == expected_counts("sb76b", share_branch_projections=False)
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
