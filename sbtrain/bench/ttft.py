"""Time to first token (``sbtrain-bench ttft``): prefill time of each model over prompts of
growing length, in one run, on the same random tokens.

Prefill = :func:`sbtrain.models.prefill`: one forward over the prompt through the decode-cache
path (chunked GLA, block-local SWA, fused causal SDPA), final norm on every position, LM head on
the last one only. Models are timed round-robin per repeat, so drift in the machine's speed hits
all alike; a point is the median of its repeats. Models with full-attention layers are measured
up to ``quadratic_max_length`` (once above ``single_repeat_above``) and extrapolated beyond from
the exponent fitted to their measured points (labelled ``extrapolated``). Beside each speed-up
over the baseline stands the ratio of the two models' prefill FLOPs at that length.

With ``cp=N`` every model is also prefilled across N gloo processes with context parallelism
(:mod:`sbtrain.bench.cp_prefill`) in the same run: beside the cp=1 time stand the cp=N time, the
speed-up and the largest first-token logit difference (checked: context parallelism must not
change the answer).
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
    skips_run,
)
from sbtrain.bench.config import format_length, lengths, parse_length, quadratic_max
from sbtrain.bench.cp_prefill import compare_cp, prompt_ids, run_cp, threads_per_rank
from sbtrain.models import build_model, prefill

EXPONENT_MAX = 1.15  # linear-time models, fitted between fit_from and the longest length
FLOP_EFFICIENCY_MIN = 0.6  # measured speed-up >= 0.6 x FLOP ratio, every length >= fit_from
SPEEDUP_AT_128K_MIN = 25.0
WARMUP_TOKENS = 256
CP_LOGIT_TOL = 1e-3  # fp32: cp=N reorders sums (state exchange, all-to-all); a wrong shard is off by whole units


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


def time_prefills(models: dict, Ts: list[int], cfg, qmax: int, single_above: int) -> tuple[dict, dict]:
    """``(points per model, first-token logits per model and length)``."""
    points = {name: [] for name in models}
    logits = {name: {} for name in models}
    for T in Ts:
        ids = prompt_ids(min(m.config.vocab_size for m in models.values()), T, cfg.seed)
        runs = {name: [] for name in models}
        for r in range(cfg.repeats):
            for name, model in models.items():
                if skips_run(model.config, T, r, qmax, single_above):
                    continue
                start = time.perf_counter()
                logits[name][T] = prefill(model, ids)[0]
                runs[name].append(time.perf_counter() - start)
        for name, ts in runs.items():
            if ts:
                points[name].append({"seq_len": T, "seconds": statistics.median(ts), "runs": ts, "measured": True,
                                     "label": f"median of {len(ts)}" if len(ts) > 1 else "one run"})
                print(f"  {name:>12} {format_length(T):>6}: {statistics.median(ts):9.3f} s ({len(ts)} run(s))",
                      flush=True)
    return points, logits


def check_cp(rows: list[dict]) -> list[dict]:
    return [{"model": r["model"], "target": f"cp={r['cp']} first-token logits equal cp=1 within {CP_LOGIT_TOL:g} at "
             f"{format_length(r['seq_len'])}", "value": r["max_abs_logit_diff"],
             "pass": r["max_abs_logit_diff"] <= CP_LOGIT_TOL} for r in rows]


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
    points, logits = time_prefills(models, Ts, cfg, qmax, single_above)
    cp = None
    if cfg.cp > 1:
        print(f"context-parallel prefill: {cfg.cp} gloo processes, cp_linear={cfg.cp_linear}", flush=True)
        cp_points, cp_logits = run_cp(models, Ts, cfg, qmax, single_above, WARMUP_TOKENS)
        cp = {"degree": cfg.cp, "linear_method": cfg.cp_linear, "points": cp_points,
              "threads_per_rank": threads_per_rank(cfg),
              "comparisons": compare_cp(points, cp_points, logits, cp_logits, cfg.cp)}
    results = {}
    for name, model in models.items():
        fit = fit_model(points[name], fit_from)
        add_extrapolations(points[name], fit, Ts)
        for p in points[name]:
            p["flops"] = prefill_flops(model.config, p["seq_len"])
        results[name] = {"quadratic": is_quadratic(model.config), "fit": fit, "points": points[name]}
    comparisons = compare(results, cfg.baseline)
    checks = check_targets(results, comparisons, fit_from) + (check_cp(cp["comparisons"]) if cp else [])
    payload = {"meta": {**meta(cfg, "ttft"), "matmul_flops": matmul, "quadratic_max_length": qmax,
                        "single_repeat_above": single_above, "fit_from": fit_from, "repeats": cfg.repeats},
               "results": results, "comparisons": comparisons, "cp": cp, "checks": checks}
    print_table(results, comparisons, cfg.baseline)
    if cp:
        print_cp_table(cp)
    return report(cfg, "ttft", payload, lambda png: plot(results, png, cp))


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


def print_cp_table(cp: dict) -> None:
    print(f"\ncontext-parallel prefill, cp={cp['degree']} ({cp['threads_per_rank']} thread(s) per rank) vs in-process")
    print(f"{'model':>12} {'prompt':>7} {'cp=1 s':>9} {'cp=' + str(cp['degree']) + ' s':>9} {'speedup':>8} "
          f"{'max |dlogit|':>13}")
    for r in cp["comparisons"]:
        print(f"{r['model']:>12} {format_length(r['seq_len']):>7} {r['seconds_cp1']:9.3f} {r['seconds_cp']:9.3f} "
              f"{r['speedup_vs_cp1']:8.2f} {r['max_abs_logit_diff']:13.2e}")


def plot(results: dict, path, cp: dict | None = None) -> None:
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
        if cp and cp["points"].get(name):
            pts = cp["points"][name]
            ax.loglog([p["seq_len"] for p in pts], [p["seconds"] for p in pts], "s:", color=line.get_color(),
                      label=f"{name} cp={cp['degree']}")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill seconds (time to first token)")
    ax.set_title("prefill time, this CPU, fp32, batch 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
