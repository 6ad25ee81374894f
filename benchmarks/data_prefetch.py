"""Step time with the next global batch built in the background (data.prefetch) vs on demand (issue 17).

A synthetic dataset (documents of 50-3000 tokens) is packed at seq_len 16384 with cu_seqlens; each
"step" takes this rank's micro batches and then sleeps for a synthetic compute time (a GPU step
releases the GIL the same way). The compute delay defaults to the measured on-demand batch build
time, where prefetching should approach a 2x shorter step. Prints a table; ``--json`` writes it.

    python benchmarks/data_prefetch.py [--steps 30] [--compute-ms auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_index_memory import write_index

from sbtrain.data.loader import PackedLoader
from sbtrain.data.prefetch import PrefetchLoader

KW = {"seq_len": 16384, "global_batch_size": 64, "micro_batch_size": 2, "dp_rank": 0, "dp_size": 2,
      "document_boundaries": True, "shuffle_window": 128}


def run(dataset: str, depth: int, steps: int, compute_s: float) -> dict:
    inner = PackedLoader([dataset], **KW)
    loader = PrefetchLoader(inner, depth, pin_memory=False) if depth else inner
    loader.next_global_batch()  # warm-up: first window packed, files mapped
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        loader.next_global_batch()
        wait += time.perf_counter() - t
        time.sleep(compute_s)
    total = time.perf_counter() - t0
    if depth:
        loader.close()
    return {"prefetch": depth, "step_ms": 1e3 * total / steps, "data_wait_ms": 1e3 * wait / steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compute-ms", default="auto", help="synthetic compute per step; auto: the build time")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = os.path.join(tmp, "ds")
        write_index(ds, 200_000, min_len=50, max_len=3000)
        build = run(ds, 0, args.steps, 0.0)["step_ms"] / 1e3
        compute = build if args.compute_ms == "auto" else float(args.compute_ms) / 1e3
        rows = [run(ds, depth, args.steps, compute) for depth in (0, 2)]
    ratio = rows[0]["step_ms"] / rows[1]["step_ms"]
    print(f"batch build (on demand, no compute): {1e3 * build:.1f} ms; synthetic compute {1e3 * compute:.1f} ms; "
          f"{KW['global_batch_size'] // KW['dp_size']} samples of {KW['seq_len']} tokens per rank-step")
    print("| data.prefetch | step (ms) | waiting for data (ms) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['prefetch']} | {r['step_ms']:.1f} | {r['data_wait_ms']:.1f} |")
    print(f"step time prefetch 0 / prefetch 2: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"build_ms": 1e3 * build, "compute_ms": 1e3 * compute, "rows": rows,
                                               "ratio": ratio, "config": KW}, indent=1))


if __name__ == "__main__":
    main()
