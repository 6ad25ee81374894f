"""Build + load at real sizes (issue 17): wall time and per-rank peak RSS of building a >= 1B
parameter model (sb7b's width 3584, heads 28/4, vocab 152064, 2 layers) and loading a saved
weights directory into it, on 1 process (full build) and on 2 and 4 gloo ranks (FSDP2: built on
meta, each rank materialising, initialising and reading only its shards).

    .venv/bin/python benchmarks/build_load.py [--ranks 1 2 4] [--layers 2] [--out runs/build_load.json]

Peak = VmHWM (reset through /proc/self/clear_refs before the build) minus VmRSS then, inside
each worker, with glibc's mmap / trim thresholds at 128 KiB (the Makefile's memory-bench
setting) so that RSS tracks live memory. Prints a markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbtrain.config.model import ModelConfig
from tests.distributed.harness import run_distributed

BIG = {"vocab_size": 152064, "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
       "head_dim": 128, "intermediate_size": 18944, "layer_pattern": ["gla", "swa"]}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(cfg: dict, init_from: str | None) -> dict:
    """One rank: build (+ load) through the trainer's path; peak RSS above the starting RSS."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from sbtrain.config.parallel import ParallelConfig, validate_parallel
    from sbtrain.config.train import TrainerConfig
    from sbtrain.trainer.distributed import build_parallel_model, make_mesh

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 131072)  # M_MMAP_THRESHOLD
    gc.collect()
    libc.malloc_trim(0)
    mcfg = ModelConfig(name="big", **cfg).validate()
    pcfg, tcfg = ParallelConfig(), TrainerConfig(global_batch_size=8, micro_batch_size=1, seq_len=8, max_steps=1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    mesh = make_mesh(validate_parallel(pcfg, dist.get_world_size(), mcfg, tcfg), torch.device("cpu"))
    torch.manual_seed(0)
    model, _, counts = build_parallel_model(mcfg, mesh, pcfg, tcfg, torch.device("cpu"), init_from=init_from)
    seconds = time.perf_counter() - t0
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in model.parameters())
    return {"seconds": seconds, "peak_bytes": (_status_kb("VmHWM") - before) * 1024, "local_bytes": local,
            "params": counts["params_total"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="runs/build_load.json")
    args = ap.parse_args()
    cfg = {**BIG, "num_layers": args.layers}
    rows = []
    with tempfile.TemporaryDirectory(prefix="build_load-") as tmp:
        from sbtrain.models.build import build_model
        from sbtrain.models.weights import save_weights

        torch.manual_seed(0)
        full = build_model(ModelConfig(name="big", **cfg))
        save_weights(((k, v.detach()) for k, v in full.state_dict().items()), full.config, Path(tmp) / "w")
        del full
        gc.collect()
        for world in args.ranks:
            for init_from in (None, str(Path(tmp) / "w")):
                got = run_distributed(measure, world, cfg, init_from, timeout=900, reuse=False)
                row = {"ranks": world, "what": "build + load" if init_from else "build + init",
                       "seconds": max(g["seconds"] for g in got), "peak_gib": max(g["peak_bytes"] for g in got) / 2**30,
                       "shard_gib": max(g["local_bytes"] for g in got) / 2**30,
                       "full_gib": got[0]["params"] * 4 / 2**30, "params": got[0]["params"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| ranks | what | params | full fp32 GiB | shard GiB / rank | peak RSS GiB / rank | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['what']} | {r['params'] / 1e9:.2f}B | {r['full_gib']:.2f} | {r['shard_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['seconds']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
