"""Operator benchmark on this machine's CPU: chunked GLA vs causal SDPA (``make bench-ops``).

For each length: forward time of ``ops.gla`` (backend ``chunked``) and of
``F.scaled_dot_product_attention(is_causal=True)``, their ratio, the GLA forward+backward time,
and the GLA's achieved GFLOP/s next to the fp32 matmul rate measured in the same run.
Prints a table, writes ``benchmarks/out/ops.json`` and ``benchmarks/out/ops.png``.

FLOPs counted for chunked GLA (per KV head, per chunk of C tokens; a standard count, the same
one fla uses): forward = 2*C^2*Dk (A = Q K^T) + 2*C^2*Dv (A V) + 2*C*Dk*Dv (Q S) +
2*C*Dk*Dv (K^T V); backward = 2 x forward; elementwise work is not counted.
SDPA causal forward = 2*T^2*D*H (half of the 4*T^2*D*H dense count), backward 2x that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from operators import ops

ALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "MALLOC_CONF")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,65536", help="comma-separated token counts (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="heads (GLA: Hq = Hkv) (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="head dim (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=64, help="GLA chunk size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, best is kept (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--sdpa-64k-backward", action="store_true", help="also time SDPA fwd+bwd at >= 64k (minutes)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(repeats: int) -> dict:
    """fp32 GFLOP/s of a square 2048^3 matmul and of a chunk-shaped batched one."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t_sq = best_time(lambda: a @ b, repeats + 2)
    x, y = torch.randn(1024, 64, 128), torch.randn(1024, 128, 128)
    torch.bmm(x, y)
    t_b = best_time(lambda: torch.bmm(x, y), repeats + 2)
    return {
        "square_2048": 2 * 2048**3 / t_sq / 1e9,
        "batched_1024x64x128x128": 2 * 1024 * 64 * 128 * 128 / t_b / 1e9,
    }


def gla_flops(T: int, H: int, D: int, C: int) -> float:
    chunks = -(-T // C)
    return H * chunks * (2 * C * C * D + 2 * C * C * D + 2 * C * D * D + 2 * C * D * D)


def bench_length(T: int, args) -> dict:
    H, D, C, r = args.heads, args.dim, args.chunk, args.repeats
    slow = T >= 32768
    row = {"T": T}
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, D)) / 16  # the 7B's per-dim gate

    def gla_fwd():
        with torch.no_grad():
            ops.gla.call_backend("chunked", q, k, v, g, chunk_size=C)

    gla_fwd()
    row["gla_fwd_s"] = best_time(gla_fwd, r)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    do = torch.randn(1, T, H, D)

    def gla_fwd_bwd():
        o, _ = ops.gla.call_backend("chunked", *leaves, chunk_size=C)
        o.backward(do)

    gla_fwd_bwd()
    row["gla_fwd_bwd_s"] = best_time(gla_fwd_bwd, r)
    fl = gla_flops(T, H, D, C)
    row["gla_fwd_gflops"] = fl / row["gla_fwd_s"] / 1e9
    row["gla_fwd_bwd_gflops"] = 3 * fl / row["gla_fwd_bwd_s"] / 1e9

    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA wants [B,H,T,D]

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    if not slow:
        sdpa_fwd()
    row["sdpa_fwd_s"] = best_time(sdpa_fwd, 1 if slow else r)
    row["gla_over_sdpa_fwd"] = row["gla_fwd_s"] / row["sdpa_fwd_s"]
    if not slow or args.sdpa_64k_backward:
        sl = [t.clone().requires_grad_() for t in (qs, ks, vs)]
        dos = torch.randn_like(qs)

        def sdpa_fwd_bwd():
            F.scaled_dot_product_attention(*sl, is_causal=True).backward(dos)

        row["sdpa_fwd_bwd_s"] = best_time(sdpa_fwd_bwd, 1 if slow else r)
        row["gla_over_sdpa_fwd_bwd"] = row["gla_fwd_bwd_s"] / row["sdpa_fwd_bwd_s"]
    row["sdpa_fwd_gflops"] = 2 * T * T * D * H / row["sdpa_fwd_s"] / 1e9
    return row


def plot(rows, rate, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = [r["T"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.loglog(Ts, [r["gla_fwd_s"] for r in rows], "o-", label="GLA chunked fwd")
    ax1.loglog(Ts, [r["gla_fwd_bwd_s"] for r in rows], "o--", label="GLA chunked fwd+bwd")
    ax1.loglog(Ts, [r["sdpa_fwd_s"] for r in rows], "s-", label="SDPA causal fwd")
    pairs = [(r["T"], r["sdpa_fwd_bwd_s"]) for r in rows if "sdpa_fwd_bwd_s" in r]
    if pairs:
        ax1.loglog(*zip(*pairs), "s--", label="SDPA causal fwd+bwd")
    ax1.set_xlabel("tokens")
    ax1.set_ylabel("seconds")
    ax1.set_title("time (CPU, fp32)")
    ax1.legend()
    ax2.semilogx(Ts, [r["gla_fwd_gflops"] for r in rows], "o-", label="GLA fwd")
    ax2.semilogx(Ts, [r["gla_fwd_bwd_gflops"] for r in rows], "o--", label="GLA fwd+bwd")
    ax2.axhline(rate["square_2048"], color="gray", ls=":", label="fp32 matmul 2048^3")
    ax2.set_xlabel("tokens")
    ax2.set_ylabel("GFLOP/s")
    ax2.set_title("GLA achieved rate")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    alloc = {k: os.environ.get(k) for k in ALLOC_VARS}
    print("allocator:", ", ".join(f"{k}={v}" for k, v in alloc.items() if v) or "glibc defaults (no overrides)")
    if not alloc["MALLOC_MMAP_MAX_"] and not alloc["LD_PRELOAD"]:
        print("  note: fresh >32 MB tensors page-fault on every call; run via `make bench-ops` (docs/DESIGN_NOTES.md §7)")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, B=1 heads={args.heads} dim={args.dim} "
        f"fp32, GLA chunk {args.chunk}, per-dim gates, Hq=Hkv"
    )
    print("GLA FLOPs per head per chunk: fwd 2C^2Dk + 2C^2Dv + 2CDkDv + 2CDkDv, bwd counted as 2x fwd")
    rate = matmul_rate(args.repeats)
    print(
        f"fp32 matmul: {rate['square_2048']:.1f} GFLOP/s (2048^3), "
        f"{rate['batched_1024x64x128x128']:.1f} GFLOP/s (bmm 1024 x 64x128 @ 128x128)"
    )
    rows = []
    head = (
        f"{'T':>7} {'GLA fwd s':>10} {'SDPA fwd s':>10} {'GLA/SDPA':>9} {'GLA f+b s':>10} {'SDPA f+b s':>10} "
        f"{'fwd GF/s':>9} {'f+b GF/s':>9} {'f+b %mm':>8}"
    )
    print(head)
    for T in (int(x) for x in args.lengths.split(",")):
        row = bench_length(T, args)
        row["gla_fwd_bwd_pct_of_matmul"] = 100 * row["gla_fwd_bwd_gflops"] / rate["square_2048"]
        rows.append(row)
        sb = f"{row['sdpa_fwd_bwd_s']:10.3f}" if "sdpa_fwd_bwd_s" in row else f"{'(skipped)':>10}"
        print(
            f"{T:>7} {row['gla_fwd_s']:10.3f} {row['sdpa_fwd_s']:10.3f} {row['gla_over_sdpa_fwd']:9.4f} "
            f"{row['gla_fwd_bwd_s']:10.3f} {sb} {row['gla_fwd_gflops']:9.1f} {row['gla_fwd_bwd_gflops']:9.1f} "
            f"{row['gla_fwd_bwd_pct_of_matmul']:7.1f}%",
            flush=True,
        )
    os.makedirs(args.out, exist_ok=True)
    result = {
        "allocator": alloc,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {"heads": args.heads, "dim": args.dim, "chunk": args.chunk, "dtype": "float32"},
        "flops_formula": "GLA fwd per head per chunk: 2C^2Dk + 2C^2Dv + 2CDkDv + 2CDkDv; bwd = 2x fwd",
        "matmul_gflops": rate,
        "rows": rows,
    }
    with open(os.path.join(args.out, "ops.json"), "w") as f:
        json.dump(result, f, indent=2)
    if not args.no_plot:
        plot(rows, rate, os.path.join(args.out, "ops.png"))
    print(f"wrote {os.path.join(args.out, 'ops.json')}" + ("" if args.no_plot else " and ops.png"))


if __name__ == "__main__":
    main()
