"""Operator benchmark on a CUDA GPU: GLA backends (fla ``chunk_gla``, our torch ``chunked``)
against causal flash SDPA, bf16, forward and forward+backward, in one run.

Shapes: B=1, head dim 128; ``--heads 4 --kv-heads 4`` (the CPU benchmark's shape) and the 7B's
per-layer shape ``--heads 28 --kv-heads 4`` (GQA: fla expands k/v/g to 28 heads, the chunked
backend keeps the state per KV head). Writes a table and ``<out>/gpu_ops.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import ops


def cuda_time(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def bench(T: int, hq: int, hkv: int, D: int, dtype, backends=("fla", "chunked")) -> dict:
    dev = "cuda"
    q = torch.randn(1, T, hq, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, T, hkv, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, T, hkv, D, device=dev, dtype=dtype, requires_grad=True)
    g = F.logsigmoid(torch.randn(1, T, hkv, D, device=dev)).div(16).requires_grad_()
    row = {"T": T, "heads": hq, "kv_heads": hkv, "dim": D}
    for backend in ("fla", "chunked"):
        if backend not in backends or backend not in ops.gla.available_backends("cuda"):
            row[backend] = None
            continue

        def fwd(b=backend):
            with torch.no_grad():
                ops.gla.call_backend(b, q, k, v, g)

        def fwdbwd(b=backend):
            o, _ = ops.gla.call_backend(b, q, k, v, g)
            o.float().sum().backward()

        row[backend] = {"fwd_s": cuda_time(fwd), "fwdbwd_s": cuda_time(fwdbwd)}
    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

    def sdpa_fwdbwd():
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).float().sum().backward()

    row["sdpa"] = {"fwd_s": cuda_time(sdpa_fwd), "fwdbwd_s": cuda_time(sdpa_fwdbwd)}
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--heads", default="4:4,28:4", help="Hq:Hkv pairs")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--backends", default="fla,chunked", help="GLA backends to time")
    p.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).resolve().parent / "out")))
    args = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; gla backends {ops.gla.available_backends('cuda')}")
    rows = []
    for pair in args.heads.split(","):
        hq, hkv = (int(x) for x in pair.split(":"))
        for T in (int(x) for x in args.lengths.split(",")):
            rows.append(bench(T, hq, hkv, args.dim, torch.bfloat16, tuple(args.backends.split(","))))
            r = rows[-1]
            cells = []
            for name in ("fla", "chunked", "sdpa"):
                m = r[name]
                cells.append(f"{name} " + ("n/a" if m is None else f"{m['fwd_s'] * 1e3:8.2f}/{m['fwdbwd_s'] * 1e3:8.2f} ms"))
            ratio = (r["fla"] or r["chunked"])["fwd_s"] / r["sdpa"]["fwd_s"]
            print(f"T={T:>6} Hq={hq:>2} Hkv={hkv}: " + " | ".join(cells) + f" | best GLA/SDPA fwd {ratio:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_ops.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
