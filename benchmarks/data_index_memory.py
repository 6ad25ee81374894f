"""Memory of opening a huge dataset index on every rank (issue 17): RSS growth per rank, old code vs new.

Writes a megatron ``.bin/.idx`` of N tiny documents (1-3 uint16 tokens each) directly, without a
tokenizer, then opens it with ``PackedLoader`` in 2 subprocesses at once (dp ranks 0 and 1) that take
one global batch and a ``state_dict()``; each child reports its peak RSS (VmHWM, reset after imports)
and private (anonymous) RSS growth. ``--old-src DIR`` runs the same children against another checkout
(``git archive HEAD sbtrain | tar -x -C DIR``) to show the figures before the change.

    python benchmarks/data_index_memory.py --docs 50000000 [--old-src /tmp/old] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 22


def write_index(folder: str, n: int, seed: int = 0, min_len: int = 1, max_len: int = 3) -> dict:
    """``folder/data.bin|.idx`` (megatron's format, version 1, uint16; documents of ``min_len..max_len`` tokens)
    + a minimal manifest; returns sizes and the time it took."""
    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n, dtype=np.int32)
    with open(os.path.join(folder, "data.bin"), "wb") as f:
        f.writelines(rng.integers(1, 300, int(lengths[c:c + CHUNK].sum()), dtype=np.uint16).tobytes() for c in range(0, n, CHUNK))
    with open(os.path.join(folder, "data.idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))  # header, version, uint16
        f.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))  # sequences, documents + 1
        f.write(lengths.tobytes())
        at = 0
        for c in range(0, n, CHUNK):  # byte offset of every sequence
            part = lengths[c:c + CHUNK].astype(np.int64) * 2
            f.write((np.cumsum(part) - part + at).tobytes())
            at += int(part.sum())
        for c in range(0, n + 1, CHUNK):
            f.write(np.arange(c, min(c + CHUNK, n + 1), dtype=np.int64).tobytes())
    manifest = {"fingerprint": f"synthetic-{n}-{seed}-{min_len}-{max_len}", "tokenizer": {"eod_id": 0, "sha256": "none"}}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    sizes = {p: os.path.getsize(os.path.join(folder, p)) for p in ("data.bin", "data.idx")}
    return {"documents": n, "tokens": int(lengths.sum(dtype=np.int64)), "bytes": sizes,
            "write_s": round(time.perf_counter() - t0, 2)}


CHILD = r"""
import json, sys, time
import numpy as np, torch
from sbtrain.data.loader import PackedLoader
import megatron.core.datasets.indexed_dataset
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak below is the open's, not the imports'
base = status()
t0 = time.perf_counter()
ds, rank, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
loader = PackedLoader([ds], seq_len=64, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=size,
                      valid_fraction=0.001, shuffle_window=64)
loader.next_global_batch()
state = loader.state_dict()
end = status()
print(json.dumps({"rank": rank, "seconds": round(time.perf_counter() - t0, 2),
                  "peak_rss_growth": end["VmHWM"] - base["VmRSS"], "anon_growth": end["RssAnon"] - base["RssAnon"],
                  "file_growth": end["RssFile"] - base["RssFile"], "samples_consumed": state["samples_consumed"]}))
"""


def measure(dataset: str, src: str = str(ROOT), ranks: int = 2, env: dict | None = None) -> list[dict]:
    """Open ``dataset`` in ``ranks`` concurrent subprocesses importing sbtrain from ``src``; their reports."""
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)  # src first: its sbtrain wins
    e = {**os.environ, **(env or {}), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, dataset, str(r), str(ranks)], env=e, cwd=src,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise RuntimeError(f"child failed ({p.returncode}):\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _mb(x: int) -> str:
    return f"{x / 2**20:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=50_000_000)
    ap.add_argument("--dir", default=None, help="where to write the index (default: a temporary folder)")
    ap.add_argument("--old-src", default=None, help="a checkout of the code before the change, to compare")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or os.path.join(tmp, "big")
        written = write_index(folder, args.docs)
        print(f"wrote {written['documents']} documents, {written['tokens']} tokens: .bin "
              f"{_mb(written['bytes']['data.bin'])}, .idx {_mb(written['bytes']['data.idx'])} in {written['write_s']} s")
        runs = {}
        if args.old_src:
            runs["old"] = measure(folder, args.old_src)
        env = {"SBTRAIN_INDEX_CACHE": os.path.join(tmp, "cache")}  # fresh: the first run builds it
        runs["new_cold"] = measure(folder, env=env)  # the ranks race: one builds the cache, the other waits for it
        runs["new_warm"] = measure(folder, env=env)  # every rank only maps the cache
        print("| code | rank | seconds | peak RSS growth | private (anon) growth | file-backed growth |")
        print("|---|---|---|---|---|---|")
        for name, reports in runs.items():
            for r in reports:
                print(f"| {name} | {r['rank']} | {r['seconds']} | {_mb(r['peak_rss_growth'])} | {_mb(r['anon_growth'])} "
                      f"| {_mb(r['file_growth'])} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"index": written, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
