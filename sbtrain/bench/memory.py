"""Memory vs sequence length (``sbtrain-bench memory``): training peak memory of one forward +
backward per model and length, and the decode cache's bytes per context length.

Training: each point runs in a fresh subprocess (``fresh_process=true``): build the model, apply
activation checkpointing, then forward + backward at T tokens with the chunked cross-entropy (no
full logits, no optimizer state); memory = peak resident set (VmHWM reset after the build, or
ru_maxrss) minus the resident set after the model is built. Models with full-attention layers
stop at ``quadratic_max_length``. Decode cache: :meth:`DecodeCache.memory_bytes` of a cache
stretched to T tokens (:func:`sbtrain.bench.worker.fill_cache` on the meta device: the real
cache classes, nothing allocated), beside the closed form :func:`cache_bytes_formula` — constant
for the hybrid (GLA states + SWA rings of W), ``2 * L * T * d_kv * bytes`` for the Transformer.
"""

from __future__ import annotations

import time

import torch

from sbtrain.bench.common import is_quadratic, meta, model_config, pyplot, report, run_worker
from sbtrain.bench.config import format_length, lengths, quadratic_max
from sbtrain.bench.worker import fill_cache
from sbtrain.models import build_model
from sbtrain.models.mixers import layer_mixers


def cache_bytes_formula(cfg, T: int, dtype_bytes: int = 4) -> int:
    """Decode-cache bytes after T tokens, as each layer's kind declares them: a softmax branch keeps
    K and V for T tokens (full) or a ring of W slots (SWA); a linear branch an fp32 state per KV head."""
    return sum(kind.decode_cache_bytes(cfg, T, dtype_bytes) for kind in layer_mixers(cfg))


def cache_rows(cfg, model_cfgs: dict, Ts: list[int]) -> list[dict]:
    rows = []
    for name, mcfg in model_cfgs.items():
        torch.manual_seed(cfg.seed)
        model = build_model(mcfg).eval()
        for T in Ts:
            measured = fill_cache(model, T, kv_device="meta")[1].memory_bytes()
            rows.append({"model": name, "seq_len": T, "cache_bytes": measured,
                         "formula_bytes": cache_bytes_formula(mcfg, T)})
    return rows


def train_rows(cfg, model_cfgs: dict, Ts: list[int], qmax: int) -> list[dict]:
    rows = []
    for name, mcfg in model_cfgs.items():
        for T in Ts:
            if is_quadratic(mcfg) and T > qmax:
                continue
            spec = {"kind": "train", "model": name, "model_overrides": list(cfg.model_overrides), "seq_len": T,
                    "activation_checkpointing": cfg.activation_checkpointing, "seed": cfg.seed,
                    "threads": cfg.threads}
            start = time.perf_counter()
            r = run_worker(spec, cfg.fresh_process, cfg.timeout_s)
            print(f"  {name:>12} {format_length(T):>6}: " + (f"peak {r['peak_mb']:.0f} MB" if "error" not in r
                  else r["error"]) + f" ({time.perf_counter() - start:.0f} s)", flush=True)
            rows.append({"model": name, "seq_len": T, **r})
    return rows


def check_targets(train: list[dict], cache: list[dict], model_cfgs: dict) -> list[dict]:
    checks = []
    for name, mcfg in model_cfgs.items():
        sizes = [r["cache_bytes"] for r in cache if r["model"] == name]
        exact = all(r["cache_bytes"] == r["formula_bytes"] for r in cache if r["model"] == name)
        checks.append({"model": name, "target": "decode-cache bytes == closed form at every length",
                       "value": float(exact), "pass": exact})
        if not is_quadratic(mcfg):
            checks.append({"model": name, "target": "decode-cache bytes constant in T (max/min)",
                           "value": max(sizes) / min(sizes), "pass": max(sizes) == min(sizes)})
        done = [r for r in train if r["model"] == name]
        if done:
            longest = max(done, key=lambda r: r["seq_len"])
            checks.append({"model": name, "target": f"forward+backward at {format_length(longest['seq_len'])} completes",
                           "value": float("error" not in longest), "pass": "error" not in longest})
    return checks


def run(cfg) -> dict:
    Ts, qmax = lengths(cfg, "memory"), quadratic_max(cfg, "memory")
    model_cfgs = {name: model_config(name, cfg.model_overrides) for name in cfg.models}
    print(f"training memory: fwd+bwd, activation_checkpointing={cfg.activation_checkpointing}, chunked CE, "
          f"{'fresh process per point' if cfg.fresh_process else 'in this process'}; full-attention models "
          f"up to {format_length(qmax)}")
    cache = cache_rows(cfg, model_cfgs, Ts)
    train = train_rows(cfg, model_cfgs, Ts, qmax)
    checks = check_targets(train, cache, model_cfgs)
    payload = {"meta": {**meta(cfg, "memory"), "activation_checkpointing": cfg.activation_checkpointing,
                        "fresh_process": cfg.fresh_process, "quadratic_max_length": qmax,
                        "memory_measure": "peak RSS during fwd+bwd minus RSS after the model is built"},
               "train": train, "cache": cache, "checks": checks}
    print_table(train, cache)
    return report(cfg, "memory", payload, lambda png: plot(train, cache, png))


def print_table(train: list[dict], cache: list[dict]) -> None:
    print(f"\n{'model':>12} {'tokens':>7} {'train peak MB':>14} {'fwd+bwd s':>10} {'cache MB':>10} {'formula MB':>11}")
    for c in cache:
        t = next((r for r in train if r["model"] == c["model"] and r["seq_len"] == c["seq_len"]), None)
        if t is None:
            peak, secs = f"{'-':>14}", f"{'-':>10}"
        elif "error" in t:
            peak, secs = f"{'failed':>14}", f"{'-':>10}"
        else:
            peak, secs = f"{t['peak_mb']:14.0f}", f"{t['fwd_bwd_s']:10.2f}"
        print(f"{c['model']:>12} {format_length(c['seq_len']):>7} {peak} {secs} {c['cache_bytes'] / 2**20:10.2f} "
              f"{c['formula_bytes'] / 2**20:11.2f}")


def plot(train: list[dict], cache: list[dict], path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["model"] for r in cache):
        ok = [r for r in train if r["model"] == name and "error" not in r]
        if ok:
            ax1.loglog([r["seq_len"] for r in ok], [max(r["peak_mb"], 1e-3) for r in ok], "o-", label=name)
        sel = [r for r in cache if r["model"] == name]
        ax2.loglog([r["seq_len"] for r in sel], [r["cache_bytes"] / 2**20 for r in sel], "o-", label=name)
    ax1.set_title("training fwd+bwd: peak RSS over the built model")
    ax1.set_ylabel("MB")
    ax2.set_title("decode cache")
    ax2.set_ylabel("MB")
    for ax in (ax1, ax2):
        ax.set_xlabel("tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
