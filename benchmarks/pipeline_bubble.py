"""Pipeline bubbles on this machine's CPU (gloo): every schedule of ``parallel.pipeline`` at pp=2
and pp=4 with 8 micro batches, measured beside the theoretical bubble.

The model is a stack of ``--layers`` equal compute blocks (Linear d x d + tanh, fp32, no sleep), cut
evenly over the schedule's global stages (pp for 1F1B, 2 pp for the others), so every schedule of
one pp does the same total work. Per rank and step:

- compute = wall time inside the stage's forward / backward / weight-backward calls
  (``PipelineStage.forward_one_chunk``, ``backward_one_chunk``, ``backward_weight_one_chunk``:
  compute only, the point-to-point waits are outside them);
- bubble = 1 - compute / step wall time (idle time, point-to-point waits and schedule overhead).

Reported: the mean and max over ranks of the median over the timed steps (after warm-up steps,
the first of which infers the stage shapes). Theory: ``parallel.pipeline.theoretical_bubble``
simulates torch's own action order with F = I = W = 1 (full backward 2) and free communication:
(p-1)/(m+p-1) for 1F1B, (p-1)/(v m+p-1) for Interleaved1F1B.

Caveat: with 2 cores, pp=4 runs 4 processes on 2 cores; a rank's compute then stretches while
others compute too, which hides idle time. Numbers from such a box are an upper bound on what the
schedule costs, not a clean measurement (the JSON records ``os.cpu_count()`` and the load).

    python benchmarks/pipeline_bubble.py [--pp 2 4] [--micro 8] [--steps 5]

Prints a table and writes ``benchmarks/out/pipeline_bubble.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel import pipeline as P
from tests.distributed.harness import run_distributed

SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBV", "DualPipeV")


class Blocks(nn.Module):
    """One global stage: ``n`` blocks x -> tanh(x W); the last stage returns (Σ y², aux 0)."""

    def __init__(self, d: int, n: int, is_last: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n))
        self.is_last = is_last

    def forward(self, x, aux=None):
        if aux is None:
            aux = x.new_zeros(())
        for layer in self.layers:
            x = torch.tanh(layer(x))
        if self.is_last:
            return x.pow(2).sum(), aux
        return x, aux


def _timed(stage, name: str, acc: list[float]) -> None:
    fn = getattr(stage, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[0] += time.perf_counter() - t

    setattr(stage, name, wrapper)


def worker(cfg: dict) -> list[dict]:
    torch.set_num_threads(1)
    pp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    out = []
    for schedule in cfg["schedules"]:
        n_stages = P.num_stages(schedule, pp)
        split = P.validate_pipeline(schedule, pp, cfg["micro"], cfg["layers"])
        torch.manual_seed(0)
        modules = [Blocks(cfg["d"], split[s], s == n_stages - 1) for s in P.stage_ids(schedule, pp, rank)]
        runtime = P.PipelineRuntime(modules, schedule=schedule, pp_group=group, n_microbatches=cfg["micro"])
        acc = [0.0]
        for stage in runtime.stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                _timed(stage, name, acc)
        x = torch.randn(cfg["micro"] * cfg["rows"], cfg["d"])
        steps, compute = [], []
        for i in range(cfg["warmup"] + cfg["steps"]):
            for p in runtime.parameters():
                p.grad = None
            dist.barrier()
            acc[0] = 0.0
            t = time.perf_counter()
            runtime.step(x, target=x, scale=1.0, aux_weight=0.0)
            wall = time.perf_counter() - t
            if i >= cfg["warmup"]:
                steps.append(wall)
                compute.append(acc[0])
        step, comp = statistics.median(steps), statistics.median(compute)
        out.append({"schedule": schedule, "rank": rank, "step_s": step, "compute_s": comp,
                    "bubble": max(0.0, 1 - comp / step)})
        del runtime
        dist.barrier()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=128, help="rows per micro batch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "pipeline_bubble.json"))
    args = ap.parse_args()
    rows = []
    for pp in args.pp:
        cfg = {"schedules": args.schedules, "micro": args.micro, "layers": args.layers, "d": args.d,
               "rows": args.rows, "steps": args.steps, "warmup": args.warmup}
        got = run_distributed(worker, pp, cfg, timeout=1800, reuse=False)
        for i, schedule in enumerate(args.schedules):
            per_rank = [g[i] for g in got]
            rows.append({
                "pp": pp, "schedule": schedule, "micro": args.micro,
                "stages": P.num_stages(schedule, pp),
                "step_s": max(r["step_s"] for r in per_rank),
                "compute_s_per_rank": [round(r["compute_s"], 4) for r in per_rank],
                "bubble_mean": statistics.mean(r["bubble"] for r in per_rank),
                "bubble_max": max(r["bubble"] for r in per_rank),
                "bubble_theory": P.theoretical_bubble(schedule, pp, args.micro),
                "bubble_1f1b_formula": (pp - 1) / (args.micro + pp - 1),
            })
    print(f"{'pp':>3} {'schedule':<16} {'stages':>6} {'step s':>8} {'bubble mean':>12} {'bubble max':>11} "
          f"{'theory':>7} {'(p-1)/(m+p-1)':>14}")
    for r in rows:
        print(f"{r['pp']:>3} {r['schedule']:<16} {r['stages']:>6} {r['step_s']:>8.3f} {r['bubble_mean']:>12.3f} "
              f"{r['bubble_max']:>11.3f} {r['bubble_theory']:>7.3f} {r['bubble_1f1b_formula']:>14.3f}")
    meta = {"cpu_count": os.cpu_count(), "loadavg_after": os.getloadavg(), "torch": torch.__version__,
            "backend": "gloo", "threads_per_rank": 1, "layers": args.layers, "d": args.d, "rows": args.rows,
            "steps": args.steps, "warmup": args.warmup,
            "measure": "bubble = 1 - (wall time inside stage forward/backward/weight-backward calls) / step wall "
                       "time, per rank, median over timed steps",
            "theory": "simulation of torch's action order, F=I=W=1, free communication"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
