"""Pieces shared by the benchmarks: model configs from recipes, the allocator note, resident-set
probes, the power-law fit, prefill FLOPs, fresh-process workers and the output files.

``model_config`` lives in :mod:`sbtrain.bench.config` and the resident-set probes in
:mod:`sbtrain.bench.worker` (the fresh-process worker needs them and must not import this module,
which starts it); both are re-exported here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from sbtrain.bench import worker
from sbtrain.bench.config import BenchError, model_config
from sbtrain.bench.worker import RESULT_PREFIX, peak_rss_kb, reset_peak_rss, status_kb
from sbtrain.models.mixers import layer_mixers

ALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "MALLOC_CONF")
# The folder holding the sbtrain package: the checkout, or site-packages for an installed copy.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


# -- models ----------------------------------------------------------------------------------------
def is_quadratic(cfg) -> bool:
    """True when some layer attends over the whole past (time and KV cache grow with T)."""
    return any(kind.attends_all for kind in layer_mixers(cfg))


def skips_run(cfg, seq_len: int, repeat: int, quadratic_max: int, single_above: int) -> bool:
    """ttft's rule for full-attention models: nothing above ``quadratic_max`` (extrapolated there),
    one run only above ``single_above``."""
    return is_quadratic(cfg) and (seq_len > quadratic_max or (seq_len > single_above and repeat > 0))


def prefill_flops(cfg, seq_len: int) -> float:
    """Forward FLOPs of a prefill over ``seq_len`` tokens, LM head on the last position only.

    Per token: 2 x (active non-embedding, non-head parameters) + the mixers' forward share (a third
    of :func:`sbtrain.trainer.flops.mixer_flops_per_token`, which counts forward + backward);
    plus 2 x head parameters once."""
    from sbtrain.models import build_model, count_parameters
    from sbtrain.trainer.flops import mixer_flops_per_token

    counts = count_parameters(build_model(cfg, device="meta"))
    body = counts["params_active"] - counts["params_embedding"] - counts["params_lm_head"]
    head = counts["params_lm_head"] or counts["params_embedding"]  # tied head: the embedding matrix
    mixers = sum(mixer_flops_per_token(kind, seq_len, cfg) for kind in cfg.layer_types()) / 3.0
    return seq_len * (2.0 * body + mixers) + 2.0 * head


# -- environment and memory -----------------------------------------------------------------------
def allocator_env() -> dict:
    return {k: os.environ[k] for k in ALLOC_VARS if os.environ.get(k)}


def allocator_note() -> str:
    alloc = allocator_env()
    note = f"allocator env: {alloc or 'glibc defaults'}"
    if not alloc:
        note += " (freed memory returns to the OS; run via make for the reuse-friendly setting, docs/DESIGN_NOTES.md §7)"
    return note


# -- fitting --------------------------------------------------------------------------------------
def fit_power_law(lengths: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares fit of ``log t = p log T + c``; returns ``(p, c)`` (needs two lengths)."""
    if len(set(lengths)) < 2:
        raise ValueError(f"a power-law fit needs at least two distinct lengths, got {lengths}")
    xs, ys = [math.log(x) for x in lengths], [math.log(y) for y in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    p = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return p, my - p * mx


def extrapolate(p: float, c: float, length: int) -> float:
    return math.exp(c + p * math.log(length))


# -- fresh-process workers ------------------------------------------------------------------------
def run_worker(spec: dict, fresh_process: bool, timeout_s: float) -> dict:
    """Run ``sbtrain.bench.worker.measure(spec)`` in a fresh interpreter (so that no earlier
    point's memory shows in this one), or in this process for quick runs."""
    if not fresh_process:
        return worker.measure(spec)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        done = subprocess.run([sys.executable, "-m", "sbtrain.bench.worker", json.dumps(spec)], check=False, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s (raise timeout_s=)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# -- output ---------------------------------------------------------------------------------------
def write_json(out_dir: str | Path, name: str, payload: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def meta(cfg, subcommand: str) -> dict:
    return {"subcommand": subcommand, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "allocator": allocator_env(), "dtype": "float32", "batch": 1,
            "model_overrides": list(cfg.model_overrides)}


def report(cfg, name: str, payload: dict, plot) -> dict:
    """The shared ending of every subcommand: PASS/FAIL per target, ``<out>/<name>.json`` and,
    with ``cfg.plot``, ``plot(png_path)``; returns the payload."""
    for c in payload["checks"]:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['model']}: {c['target']} (got {c['value']:.4g})")
    path = write_json(cfg.out, name, payload)
    if cfg.plot:
        plot(path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if cfg.plot else ""))
    return payload


__all__ = [
    "ALLOC_VARS", "BenchError", "allocator_env", "allocator_note", "extrapolate", "fit_power_law", "is_quadratic",
    "meta", "model_config", "peak_rss_kb", "prefill_flops", "pyplot", "report", "reset_peak_rss", "run_worker",
    "skips_run", "status_kb", "write_json",
]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
