"""Decoding at long context (``sbtrain-bench decode``): memory and speed of token-by-token
decoding after a prompt of T tokens, per model, one fresh subprocess per point.

Each point fills a decode cache to T tokens (``decode_fill=synthetic``: random keys/values
through the real cache classes, no quadratic prefill paid; ``prefill``: a real prefill), takes
one untimed decode step, then times ``repeats`` runs of ``new_tokens`` greedy steps. Reported:
the peak resident set while decoding over that of the bare model (cache + decode working memory),
the growth during the steps alone, decode tokens/s (median of runs) and the cache bytes. Ratios
are against the model's shortest length (memory floored at 1 MB); targets for linear-memory
models at the longest length: resident memory and growth during decoding <= 1.2 x the shortest,
tokens/s >= 0.8 x. With ``decode_fill=prefill`` the prefill's freed heap stays resident under the
reuse-friendly allocator, so read the growth column then, not the resident one.
"""

from __future__ import annotations

import time

from sbtrain.bench.common import is_quadratic, meta, model_config, pyplot, report, run_worker
from sbtrain.bench.config import format_length, lengths, quadratic_max

MEMORY_RATIO_MAX = 1.2
SPEED_RATIO_MIN = 0.8
RESIDENT_FLOOR_MB = 1.0  # resident-set changes below a megabyte are page-granular noise: ratios use max(x, 1 MB)


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        base = min((b for b in rows if b["model"] == r["model"] and "error" not in b), key=lambda b: b["seq_len"],
                   default=None)
        if base is None or "error" in r:
            continue
        r["resident_vs_shortest"] = (max(r["decode_resident_mb"], RESIDENT_FLOOR_MB)
                                     / max(base["decode_resident_mb"], RESIDENT_FLOOR_MB))
        r["growth_vs_shortest"] = (max(r["growth_during_decode_mb"], RESIDENT_FLOOR_MB)
                                   / max(base["growth_during_decode_mb"], RESIDENT_FLOOR_MB))
        r["speed_vs_shortest"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["shortest"] = base["seq_len"]


def check_targets(rows: list[dict], quadratic: dict) -> list[dict]:
    checks = []
    for name, quad in quadratic.items():
        ok = [r for r in rows if r["model"] == name and "error" not in r]
        if quad or len(ok) < 2:
            continue
        longest = max(ok, key=lambda r: r["seq_len"])
        span = f"{format_length(longest['seq_len'])} vs {format_length(longest['shortest'])}"
        checks.append({"model": name, "target": f"decode resident memory {span} <= {MEMORY_RATIO_MAX}x",
                       "value": longest["resident_vs_shortest"],
                       "pass": longest["resident_vs_shortest"] <= MEMORY_RATIO_MAX})
        checks.append({"model": name, "target": f"RSS growth during decoding {span} <= {MEMORY_RATIO_MAX}x",
                       "value": longest["growth_vs_shortest"],
                       "pass": longest["growth_vs_shortest"] <= MEMORY_RATIO_MAX})
        checks.append({"model": name, "target": f"decode tokens/s {span} >= {SPEED_RATIO_MIN}x",
                       "value": longest["speed_vs_shortest"], "pass": longest["speed_vs_shortest"] >= SPEED_RATIO_MIN})
    return checks


def run(cfg) -> dict:
    Ts, qmax = lengths(cfg, "decode"), quadratic_max(cfg, "decode")
    model_cfgs = {name: model_config(name, cfg.model_overrides) for name in cfg.models}
    print(f"decode: fill={cfg.decode_fill}, {cfg.repeats} x {cfg.new_tokens} greedy steps per point, "
          f"{'fresh process per point' if cfg.fresh_process else 'in this process'}")
    rows = []
    for T in Ts:  # lengths outermost: drift in the machine's speed hits the models alike
        for name, mcfg in model_cfgs.items():
            if is_quadratic(mcfg) and T > qmax:
                continue
            spec = {"kind": "decode", "model": name, "model_overrides": list(cfg.model_overrides), "seq_len": T,
                    "new_tokens": cfg.new_tokens, "repeats": cfg.repeats, "fill": cfg.decode_fill, "seed": cfg.seed,
                    "threads": cfg.threads}
            start = time.perf_counter()
            r = run_worker(spec, cfg.fresh_process, cfg.timeout_s)
            print(f"  {name:>12} {format_length(T):>6}: " + (f"{r['tokens_per_s']:.1f} tok/s, resident "
                  f"{r['decode_resident_mb']:.1f} MB" if "error" not in r else r["error"])
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
            rows.append({"model": name, "seq_len": T, **r})
    add_ratios(rows)
    checks = check_targets(rows, {n: is_quadratic(c) for n, c in model_cfgs.items()})
    payload = {"meta": {**meta(cfg, "decode"), "fill": cfg.decode_fill, "new_tokens": cfg.new_tokens,
                        "repeats": cfg.repeats, "fresh_process": cfg.fresh_process,
                        "memory_measure": "peak RSS during the decode steps minus RSS of the built model (no cache)",
                        "ratio_floor_mb": RESIDENT_FLOOR_MB},
               "rows": rows, "checks": checks}
    print_table(rows)
    return report(cfg, "decode", payload, lambda png: plot(rows, png))


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':>12} {'context':>8} {'tok/s':>8} {'speed/short':>11} {'resident MB':>12} {'mem/short':>10} "
          f"{'growth MB':>10} {'cache MB':>9}")
    for r in sorted(rows, key=lambda r: (r["model"], r["seq_len"])):
        if "error" in r:
            print(f"{r['model']:>12} {format_length(r['seq_len']):>8}  {r['error']}")
            continue
        print(f"{r['model']:>12} {format_length(r['seq_len']):>8} {r['tokens_per_s']:8.1f} "
              f"{r.get('speed_vs_shortest', float('nan')):11.3f} {r['decode_resident_mb']:12.1f} "
              f"{r.get('resident_vs_shortest', float('nan')):10.3f} {r['growth_during_decode_mb']:10.1f} "
              f"{r['cache_bytes'] / 2**20:9.2f}")


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        ok = sorted((r for r in rows if r["model"] == name and "error" not in r), key=lambda r: r["seq_len"])
        ax1.loglog([r["seq_len"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=name)
        ax2.loglog([r["seq_len"] for r in ok], [max(r["decode_resident_mb"], 1e-2) for r in ok], "o-", label=name)
    ax1.set_title("decode tokens/s")
    ax2.set_title("resident MB while decoding (cache + work)")
    for ax in (ax1, ax2):
        ax.set_xlabel("context tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
