"""Time to first token (``sbtrain-bench ttft``): prefill time of each model over prompts of
growing length, in one run, on the same random tokens.

Prefill = :func:`sbtrain.models.prefill`: one forward over the prompt through the decode-cache
path (chunked GLA, block-local SWA, fused causal SDPA), final norm on every position, LM head on
the last one only. Models are timed round-robin per repeat, so drift in the machine's speed hits
all alike; a point is the median of its repeats. Models with full-attention layers are measured
up to ``quadratic_max_length`` (once above ``single_repeat_above``) and extrapolated beyond from
the exponent fitted to their measured points (labelled ``extrapolated``). Beside each speed-up
over the baseline stands the ratio of the two models' prefill FLOPs at that length.
"""

from __future__ import annotations

import statistics
import time

import torch

from sbtrain.bench.common import (
    allocator_note,
    extrapolate,
    fit_power_law,
    is_quadratic,
    meta,
    model_config,
    prefill_flops,
    pyplot,
    report,
)
from sbtrain.bench.config import format_length, lengths, parse_length, quadratic_max
from sbtrain.models import build_model, prefill

EXPONENT_MAX = 1.15  # linear-time models, fitted between fit_from and the longest length
FLOP_EFFICIENCY_MIN = 0.6  # measured speed-up >= 0.6 x FLOP ratio, every length >= fit_from
SPEEDUP_AT_128K_MIN = 25.0
WARMUP_TOKENS = 256


def fit_model(points: list[dict], fit_from: int) -> dict:
    """Exponent over the measured points at >= fit_from tokens (all measured points if fewer than two)."""
    measured = [p for p in points if p["measured"]]
    chosen = [p for p in measured if p["seq_len"] >= fit_from]
    if len({p["seq_len"] for p in chosen}) < 2:
        chosen = measured
    if len({p["seq_len"] for p in chosen}) < 2:
        return {"exponent": None, "log_coef": None, "fit_lengths": [p["seq_len"] for p in chosen]}
    p, c = fit_power_law([x["seq_len"] for x in chosen], [x["seconds"] for x in chosen])
    return {"exponent": p, "log_coef": c, "fit_lengths": [x["seq_len"] for x in chosen]}


def add_extrapolations(points: list[dict], fit: dict, wanted: list[int]) -> None:
    have = {p["seq_len"] for p in points}
    if fit["exponent"] is None:
        return
    for T in wanted:
        if T not in have:
            points.append({"seq_len": T, "seconds": extrapolate(fit["exponent"], fit["log_coef"], T), "runs": [],
                           "measured": False,
                           "label": f"extrapolated (t ~ T^{fit['exponent']:.2f} fitted on "
                                    f"{'/'.join(format_length(x) for x in fit['fit_lengths'])})"})
    points.sort(key=lambda p: p["seq_len"])


def compare(results: dict, baseline: str) -> list[dict]:
    """Speed-up of every model over the baseline, beside the prefill-FLOP ratio, per length."""
    rows = []
    base = {p["seq_len"]: p for p in results[baseline]["points"]}
    for name, res in results.items():
        if name == baseline:
            continue
        for p in res["points"]:
            b = base.get(p["seq_len"])
            if b is None:
                continue
            speedup = b["seconds"] / p["seconds"]
            ratio = b["flops"] / p["flops"]
            rows.append({"model": name, "baseline": baseline, "seq_len": p["seq_len"], "speedup": speedup,
                         "flop_ratio": ratio, "speedup_over_flop_ratio": speedup / ratio,
                         "extrapolated": not (p["measured"] and b["measured"])})
    return rows


def check_targets(results: dict, comparisons: list[dict], fit_from: int) -> list[dict]:
    checks = []
    for name, res in results.items():
        if res["quadratic"] or res["fit"]["exponent"] is None or min(res["fit"]["fit_lengths"]) < fit_from:
            continue
        e = res["fit"]["exponent"]
        checks.append({"model": name, "target": f"prefill exponent <= {EXPONENT_MAX} over "
                       f"{format_length(min(res['fit']['fit_lengths']))}..{format_length(max(res['fit']['fit_lengths']))}",
                       "value": e, "pass": e <= EXPONENT_MAX})
    for c in comparisons:
        if results[c["model"]]["quadratic"] or c["seq_len"] < fit_from:
            continue
        tag = f" at {format_length(c['seq_len'])}" + (" (extrapolated baseline)" if c["extrapolated"] else "")
        checks.append({"model": c["model"], "target": f"speedup >= {FLOP_EFFICIENCY_MIN} x FLOP ratio{tag}",
                       "value": c["speedup_over_flop_ratio"], "pass": c["speedup_over_flop_ratio"] >= FLOP_EFFICIENCY_MIN})
        if c["seq_len"] == 128 * 1024:
            checks.append({"model": c["model"], "target": f"speedup >= {SPEEDUP_AT_128K_MIN:g}x{tag}",
                           "value": c["speedup"], "pass": c["speedup"] >= SPEEDUP_AT_128K_MIN})
    return checks


def time_prefills(models: dict, Ts: list[int], cfg, qmax: int, single_above: int) -> dict:
    points = {name: [] for name in models}
    for T in Ts:
        ids = torch.randint(0, min(m.config.vocab_size for m in models.values()), (1, T),
                            generator=torch.Generator().manual_seed(cfg.seed + T))
        runs = {name: [] for name in models}
        for r in range(cfg.repeats):
            for name, model in models.items():
                quadratic = is_quadratic(model.config)
                if quadratic and (T > qmax or (T > single_above and r > 0)):
                    continue
                start = time.perf_counter()
                prefill(model, ids)
                runs[name].append(time.perf_counter() - start)
        for name, ts in runs.items():
            if ts:
                points[name].append({"seq_len": T, "seconds": statistics.median(ts), "runs": ts, "measured": True,
                                     "label": f"median of {len(ts)}" if len(ts) > 1 else "one run"})
                print(f"  {name:>12} {format_length(T):>6}: {statistics.median(ts):9.3f} s ({len(ts)} run(s))",
                      flush=True)
    return points


def run(cfg) -> dict:
    from sbtrain.trainer.flops import measure_matmul_flops

    Ts, qmax, single_above = lengths(cfg, "ttft"), quadratic_max(cfg, "ttft"), parse_length(cfg.single_repeat_above)
    fit_from = parse_length(cfg.fit_from)
    matmul = measure_matmul_flops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {allocator_note()}; "
          f"fp32 matmul {matmul / 1e9:.1f} GFLOP/s in this run")
    models = {}
    for name in cfg.models:
        torch.manual_seed(cfg.seed)
        models[name] = build_model(model_config(name, cfg.model_overrides)).eval()
        prefill(models[name], torch.zeros(1, min(WARMUP_TOKENS, Ts[0]), dtype=torch.long))  # first-call costs
    points = time_prefills(models, Ts, cfg, qmax, single_above)
    results = {}
    for name, model in models.items():
        fit = fit_model(points[name], fit_from)
        add_extrapolations(points[name], fit, Ts)
        for p in points[name]:
            p["flops"] = prefill_flops(model.config, p["seq_len"])
        results[name] = {"quadratic": is_quadratic(model.config), "fit": fit, "points": points[name]}
    comparisons = compare(results, cfg.baseline)
    checks = check_targets(results, comparisons, fit_from)
    payload = {"meta": {**meta(cfg, "ttft"), "matmul_flops": matmul, "quadratic_max_length": qmax,
                        "single_repeat_above": single_above, "fit_from": fit_from, "repeats": cfg.repeats},
               "results": results, "comparisons": comparisons, "checks": checks}
    print_table(results, comparisons, cfg.baseline)
    return report(cfg, "ttft", payload, lambda png: plot(results, png))


def print_table(results: dict, comparisons: list[dict], baseline: str) -> None:
    print(f"\n{'model':>12} {'prompt':>7} {'prefill s':>10} {'tok/s':>9} {'speedup':>8} {'FLOP ratio':>10}  how")
    for name, res in results.items():
        for p in res["points"]:
            c = next((c for c in comparisons if c["model"] == name and c["seq_len"] == p["seq_len"]), None)
            speed = f"{c['speedup']:8.2f} {c['flop_ratio']:10.2f}" if c else f"{'-':>8} {'-':>10}"
            how = p["label"] + (f"; vs {baseline} extrapolated" if c and c["extrapolated"] and p["measured"] else "")
            print(f"{name:>12} {format_length(p['seq_len']):>7} {p['seconds']:10.3f} {p['seq_len'] / p['seconds']:9.0f} "
                  f"{speed}  {how}")
    for name, res in results.items():
        e = res["fit"]["exponent"]
        print(f"{name}: fitted exponent {'n/a' if e is None else f'{e:.3f}'} over "
              f"{'/'.join(format_length(x) for x in res['fit']['fit_lengths'])}")


def plot(results: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, res in results.items():
        e = res["fit"]["exponent"]
        label = f"{name} (exponent {e:.2f})" if e is not None else name
        meas = [p for p in res["points"] if p["measured"]]
        line = ax.loglog([p["seq_len"] for p in meas], [p["seconds"] for p in meas], "o-", label=label)[0]
        extra = [p for p in res["points"] if not p["measured"]]
        if extra:
            xs, ys = [meas[-1]["seq_len"]] + [p["seq_len"] for p in extra], [meas[-1]["seconds"]] + [p["seconds"] for p in extra]
            ax.loglog(xs, ys, "o--", mfc="none", color=line.get_color(), label=f"{name} extrapolated")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill seconds (time to first token)")
    ax.set_title("prefill time, this CPU, fp32, batch 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
