"""sbtrain-bench end to end at tiny lengths (table + JSON + PNG with the expected fields), the
power-law fit and the extrapolation label, prefill FLOPs by hand, and the decode-cache bytes
against real prefills. No timing assertions: only the structure of timed results is checked."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sbtrain.bench.common import fit_power_law, prefill_flops, run_worker
from sbtrain.bench.config import BenchConfig, BenchError, parse_length, validate
from sbtrain.bench.memory import cache_bytes_formula
from sbtrain.bench.ttft import add_extrapolations, fit_model
from sbtrain.bench.worker import fill_cache
from sbtrain.cli.bench import main
from sbtrain.models import prefill
from tests.models.helpers import tiny_model

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.vocab_size=256", "model.intermediate_size=64",
        "model.sliding_window=16", "model.head_dim=16"]
TINY_ARG = "model_overrides=[" + ",".join(f'"{o}"' for o in TINY) + "]"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str) -> None:
    main(list(args))


def test_parse_length_accepts_k_and_rejects_junk():
    assert [parse_length(x) for x in ("4k", "128K", 4096, "64")] == [4096, 131072, 4096, 64]
    with pytest.raises(BenchError, match="4q"):
        parse_length("4q")


def test_power_law_fit_recovers_synthetic_exponent():
    Ts = [16384, 32768, 65536, 131072]
    p, c = fit_power_law(Ts, [3e-6 * T**1.37 for T in Ts])
    assert p == pytest.approx(1.37, abs=1e-9) and math.exp(c) == pytest.approx(3e-6, rel=1e-6)
    # fit_model fits only lengths >= fit_from; the short point (off the curve) is ignored.
    points = [{"seq_len": 4096, "seconds": 100.0, "measured": True}]
    points += [{"seq_len": T, "seconds": 2e-9 * T**2, "measured": True} for T in (16384, 32768, 65536)]
    fit = fit_model(points, 16384)
    assert fit["exponent"] == pytest.approx(2.0) and fit["fit_lengths"] == [16384, 32768, 65536]
    add_extrapolations(points, fit, [4096, 16384, 32768, 65536, 131072])
    extra = [p for p in points if not p["measured"]]
    assert [p["seq_len"] for p in extra] == [131072]
    assert extra[0]["seconds"] == pytest.approx(2e-9 * 131072**2, rel=1e-9)
    assert extra[0]["label"].startswith("extrapolated (t ~ T^2.00 fitted on 16k/32k/64k")


def test_prefill_flops_by_hand():
    model = tiny_model("qwen2_tiny", TINY)
    cfg = model.config
    head = model.lm_head.weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head - model.model.embed_tokens.weight.numel()
    T, d = 100, cfg.num_attention_heads * cfg.resolved_head_dim
    # causal attention forward: QK^T and AV, each 2 * d FLOPs per (query, key) pair, T/2 keys on average
    by_hand = T * 2 * body + cfg.num_layers * T * (2 * 2 * d * T / 2) + 2 * head
    assert prefill_flops(cfg, T) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("T", [20, 40])
def test_decode_cache_bytes_formula(T):
    """Transformer: 2 * L * T * d_kv * bytes; hybrid: the same bytes at every length; and both
    equal the real prefill's cache and the synthetic (meta) fill used by the benchmark."""
    for name in ("qwen2_tiny", "sb7b_tiny"):
        model = tiny_model(name, TINY)
        cfg = model.config
        _, cache = prefill(model, torch.randint(0, cfg.vocab_size, (1, T)))
        assert cache.memory_bytes() == cache_bytes_formula(cfg, T)
        for length in (T, 1000):
            assert fill_cache(model, length, kv_device="meta")[1].memory_bytes() == cache_bytes_formula(cfg, length)
        d_kv = cfg.num_key_value_heads * cfg.resolved_head_dim
        if name == "qwen2_tiny":
            assert cache.memory_bytes() == 2 * cfg.num_layers * T * d_kv * 4
        else:  # 1 GLA state (Hkv x D x D fp32) + 1 SWA ring of W, whatever T (T > W = 16 here)
            assert cache_bytes_formula(cfg, T) == cache_bytes_formula(cfg, 10 * T)
            assert cache.memory_bytes() == (cfg.num_key_value_heads * cfg.resolved_head_dim**2 * 4
                                            + 2 * cfg.sliding_window * d_kv * 4)


def test_ttft_cli_writes_table_json_png_and_labels_extrapolation(tmp_path, capsys):
    run_cli("ttft", "lengths=[32,64,128]", "repeats=2", f"out={tmp_path}", "fit_from=32",
            "quadratic_max_length=64", "single_repeat_above=32", TINY_ARG)
    table = capsys.readouterr().out
    assert "prefill s" in table and "FLOP ratio" in table and "extrapolated" in table
    data = json.loads((tmp_path / "ttft.json").read_text())
    assert (tmp_path / "ttft.png").read_bytes()[:8] == PNG_MAGIC
    hybrid, tf = data["results"]["sb7b_tiny"], data["results"]["qwen2_tiny"]
    assert [len(p["runs"]) for p in hybrid["points"]] == [2, 2, 2] and not hybrid["quadratic"]
    # Transformer: median of 2 up to single_repeat_above, one run up to quadratic_max_length, then extrapolated
    assert [len(p["runs"]) for p in tf["points"]] == [2, 1, 0] and tf["quadratic"]
    assert [p["measured"] for p in tf["points"]] == [True, True, False]
    assert tf["points"][2]["label"].startswith("extrapolated")
    p, c = fit_power_law([32, 64], [tf["points"][0]["seconds"], tf["points"][1]["seconds"]])
    assert tf["fit"]["exponent"] == pytest.approx(p)
    assert tf["points"][2]["seconds"] == pytest.approx(math.exp(c) * 128**p, rel=1e-9)
    rows = {c["seq_len"]: c for c in data["comparisons"]}
    assert sorted(rows) == [32, 64, 128] and rows[128]["extrapolated"] and not rows[64]["extrapolated"]
    for T, row in rows.items():
        hp = next(x for x in hybrid["points"] if x["seq_len"] == T)
        bp = next(x for x in tf["points"] if x["seq_len"] == T)
        assert row["speedup"] == pytest.approx(bp["seconds"] / hp["seconds"])
        assert row["flop_ratio"] == pytest.approx(bp["flops"] / hp["flops"])
    assert any("exponent" in c["target"] for c in data["checks"])


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["allgather", "scan"])
def test_ttft_cp2_prefill_matches_in_process_first_token(tmp_path, capsys, method):
    """cp=2: two gloo ranks prefill halves of the prompt through the CP mixers (GLA state exchange,
    SWA halo, Ulysses); the last rank's first-token logits must equal the in-process prefill's."""
    run_cli("ttft", "lengths=[64,128]", "repeats=1", "cp=2", f"cp_linear={method}", "threads=2", f"out={tmp_path}",
            "fit_from=64", "plot=false", TINY_ARG)
    out = capsys.readouterr().out
    assert "context-parallel prefill, cp=2 (1 thread(s) per rank)" in out
    data = json.loads((tmp_path / "ttft.json").read_text())
    cp = data["cp"]
    assert cp["degree"] == 2 and cp["linear_method"] == method and cp["threads_per_rank"] == 1
    rows = {(r["model"], r["seq_len"]): r for r in cp["comparisons"]}
    assert sorted(rows) == [("qwen2_tiny", 64), ("qwen2_tiny", 128), ("sb7b_tiny", 64), ("sb7b_tiny", 128)]
    for (name, T), r in rows.items():
        single = next(p for p in data["results"][name]["points"] if p["seq_len"] == T)
        assert r["seconds_cp1"] == single["seconds"] and r["speedup_vs_cp1"] == pytest.approx(
            single["seconds"] / r["seconds_cp"])
        assert r["max_abs_logit_diff"] < 1e-4, (name, T, r["max_abs_logit_diff"])
    cp_checks = [c for c in data["checks"] if "first-token logits" in c["target"]]
    assert len(cp_checks) == 4 and all(c["pass"] for c in cp_checks)


def test_memory_cli_in_process(tmp_path, capsys):
    run_cli("memory", "lengths=[64,128]", f"out={tmp_path}", "fresh_process=false", "quadratic_max_length=64", TINY_ARG)
    assert "train peak MB" in capsys.readouterr().out
    data = json.loads((tmp_path / "memory.json").read_text())
    assert (tmp_path / "memory.png").read_bytes()[:8] == PNG_MAGIC
    trained = sorted((r["model"], r["seq_len"]) for r in data["train"])
    assert trained == [("qwen2_tiny", 64), ("sb7b_tiny", 64), ("sb7b_tiny", 128)]  # full attention stops at 64
    assert all(r["peak_mb"] >= 0 and math.isfinite(r["loss"]) for r in data["train"])
    assert len(data["cache"]) == 4 and all(c["pass"] for c in data["checks"])


def test_decode_cli_in_process(tmp_path, capsys):
    run_cli("decode", "lengths=[32,64]", "new_tokens=3", "repeats=1", f"out={tmp_path}", "fresh_process=false",
            TINY_ARG)
    assert "tok/s" in capsys.readouterr().out
    data = json.loads((tmp_path / "decode.json").read_text())
    assert (tmp_path / "decode.png").read_bytes()[:8] == PNG_MAGIC
    rows = {(r["model"], r["seq_len"]): r for r in data["rows"]}
    assert sorted(rows) == [("qwen2_tiny", 32), ("qwen2_tiny", 64), ("sb7b_tiny", 32), ("sb7b_tiny", 64)]
    tf32 = rows[("qwen2_tiny", 32)]
    # the Transformer's cache gains one token per decode step (1 warm-up + 3 timed)
    assert tf32["cache_bytes_after"] - tf32["cache_bytes"] == 4 * (tf32["cache_bytes"] // 32)
    assert rows[("sb7b_tiny", 32)]["cache_bytes"] == rows[("sb7b_tiny", 64)]["cache_bytes"]
    assert {"decode_resident_mb", "tokens_per_s", "speed_vs_shortest"} <= set(rows[("sb7b_tiny", 64)])


@pytest.mark.slow
def test_fresh_process_worker_matches_in_process():
    """The subprocess protocol (the benchmarks' default): same point, same cache bytes and loss."""
    spec = {"kind": "train", "model": "sb7b_tiny", "model_overrides": TINY, "seq_len": 32,
            "activation_checkpointing": "full"}
    fresh, here = run_worker(spec, fresh_process=True, timeout_s=300), run_worker(spec, fresh_process=False, timeout_s=0)
    assert "error" not in fresh, fresh
    assert fresh["loss"] == pytest.approx(here["loss"], rel=1e-6) and fresh["peak_mb"] >= 0


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown benchmark 'nope'"),
    ([], "usage: sbtrain-bench"),
    (["ttft", "lenghts=[64]"], "did you mean lengths"),
    (["ttft", "lengths=[4q]"], "4q"),
    (["ttft", "baseline=sb7b_tiny", "models=[qwen2_tiny]"], "baseline=sb7b_tiny is not in models"),
    (["memory", "activation_checkpointing=most"], "activation_checkpointing=most"),
    (["ttft", "cp=2", "lengths=[64,65]"], "lengths ['65'] are not divisible by cp=2"),
    (["decode", "cp=2"], "cp=2 applies to ttft only"),
    (["ttft", "cp=2", "cp_linear=ring"], "cp_linear=ring is unknown"),
    (["ttft", "cp=0"], "cp=0 must be >= 1"),
])
def test_bad_input_exits_2_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_validate_catches_unknown_model():
    from sbtrain.bench.common import model_config

    validate(BenchConfig(), "ttft")
    with pytest.raises(BenchError, match="sb7x"):
        model_config("sb7x")
