"""Context-parallel scaling on this machine's CPU (``make bench-cp``): the tiny hybrid model
``sb7b_tiny`` (GLA + SWA layers; optionally ``sb76b_tiny`` for Ulysses traffic) trained at long
sequence lengths (default 16k and 64k tokens, micro batch 1, fp32) with CP=1 and CP=2 in one run.

Each configuration runs the real trainer path (validate_parallel -> make_mesh -> build_model ->
parallelize -> Trainer.train_step) in its own fresh gloo processes (CP=1 is a world of one), so
one configuration's memory never shows in another's. Per configuration it reports:

- bytes sent per rank per training step, by collective kind, counted at the call site by
  ``parallel.comm_stats`` (forward and backward sends; max over ranks). Only the mixers'
  collectives are counted (cp_linear, cp_swa_halo, cp_ulysses, ep_*): FSDP's parameter
  all-gathers / gradient reduce-scatters and the trainer's loss all-reduces are not.
- peak memory per rank: the growth of the process's resident set (Linux VmHWM, reset just
  before the first step) over the pre-step resident set, across all steps (warm-up included:
  activations of forward + backward, gradients, AdamW state, gathered parameters). With the
  allocator settings of ``make`` (CPU_ALLOC) freed memory stays resident, so this is the heap's
  high-water mark; max over ranks.
- step time: median over the timed steps after the warm-up ones (max over ranks), and tokens/s.

Baseline is CP=1 in the same run; ratios and the step-1 loss difference (a correctness check:
CP must not change the loss) stand beside each CP>1 row. PASS/FAIL lines check the targets:
linear-attention CP traffic independent of sequence length (cp_linear bytes at the longest /
shortest length <= 1.05) and per-rank peak memory at CP=2 <= 0.6 x CP=1 at the longest length.
Prints a table, writes ``benchmarks/out/cp_scaling.json`` and ``benchmarks/out/cp_scaling.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel import comm_stats
from sbtrain.bench.common import peak_rss_kb, reset_peak_rss, status_kb
from sbtrain.config.parallel import ParallelConfig, validate_parallel
from sbtrain.config.train import OptimConfig, TrainerConfig
from sbtrain.models import build_model
from sbtrain.trainer.distributed import make_mesh, parallelize
from sbtrain.trainer.optim import build_optimizer
from sbtrain.trainer.train_module import TrainModule
from sbtrain.trainer.trainer import Trainer
from tests.distributed.harness import run_distributed

ALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "MALLOC_CONF")
MEMORY_MEASURE = ("per-rank peak resident-set growth (VmHWM reset before step 1, minus VmRSS before it) over "
                  "warm-up + timed steps: activations (fwd+bwd), grads, AdamW state, gathered params")
COMM_MEASURE = ("bytes this rank sends per training step (fwd + bwd) at the mixers' collectives "
                "(parallel.comm_stats); FSDP and loss all-reduces not counted")


def model_config(name: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import sbtrain.config  # noqa: F401  registers the schema
    from sbtrain.cli.app import RECIPES_DIR

    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("info", overrides=[f"model={name}"]).model)


# -- in each worker process -----------------------------------------------------------------------
def measure_case(spec: dict) -> dict:
    """Build, parallelize and train ``warmup + steps`` steps on this rank; return its figures."""
    torch.set_num_threads(spec["threads"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    mcfg, T, n_steps = spec["model_cfg"], spec["seq_len"], spec["warmup"] + spec["steps"]
    pcfg = ParallelConfig(cp=spec["cp"], cp_linear=spec["cp_linear"])
    tcfg = TrainerConfig(global_batch_size=1, micro_batch_size=1, seq_len=T, max_steps=n_steps, precision="fp32",
                         activation_checkpointing=spec["ac"])
    dims = validate_parallel(pcfg, world, mcfg, tcfg)
    mesh = make_mesh(dims, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(mcfg)
    layout = parallelize(model, mesh, pcfg, tcfg)
    ocfg = OptimConfig(schedule="constant", warmup_steps=0)
    module = TrainModule.build(model, build_optimizer(model, ocfg), tcfg, ocfg, mesh=mesh, pcfg=pcfg,
                               expert_grad_divisor=layout["expert_grad_divisor"])
    trainer = Trainer(module=module, cfg=tcfg, optim_cfg=ocfg, train_data=None)
    # Every rank draws the same full sequences; the trainer keeps this rank's CP shard.
    batches = []
    for step in range(n_steps):
        ids = torch.randint(0, mcfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(step))
        batches.append([{"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}])
    gc.collect()
    rss_before = status_kb("VmRSS")
    method = reset_peak_rss()
    times, losses = [], []
    for step, micro_batches in enumerate(batches):
        if step == spec["warmup"]:
            comm_stats.reset()  # count the timed steps only
        if dist.is_initialized():
            dist.barrier()  # no rank's wait for a slower one counts as its step time
        start = time.perf_counter()
        stats = trainer.train_step(micro_batches)
        elapsed = time.perf_counter() - start
        losses.append(stats.loss)
        if step >= spec["warmup"]:
            times.append(elapsed)
    sent = {k: v["bytes"] / spec["steps"] for k, v in comm_stats.snapshot().items()}
    return {"step_s": statistics.median(times), "losses": losses, "sent_per_step": sent,
            "peak_mb": (peak_rss_kb(method) - rss_before) / 1024, "rss_before_mb": rss_before / 1024,
            "memory_method": method}


# -- in the parent ---------------------------------------------------------------------------------
def run_case(name: str, cfg, T: int, cp: int, args) -> dict:
    spec = {"model_cfg": cfg, "seq_len": T, "cp": cp, "cp_linear": args.cp_linear, "threads": args.threads, "ac": args.ac,
            "warmup": args.warmup, "steps": args.steps}
    ranks = run_distributed(measure_case, cp, spec, reuse=False, timeout=args.timeout)
    kinds = sorted({k for r in ranks for k in r["sent_per_step"]})
    step_s = max(r["step_s"] for r in ranks)
    return {
        "model": name, "seq_len": T, "cp": cp, "step_s": step_s, "tokens_per_s": T / step_s,
        "peak_mb_per_rank": max(r["peak_mb"] for r in ranks),
        "rss_before_mb": max(r["rss_before_mb"] for r in ranks),
        "sent_bytes_per_step": {k: max(r["sent_per_step"].get(k, 0.0) for r in ranks) for k in kinds},
        "loss_step1": ranks[0]["losses"][0], "losses": ranks[0]["losses"],
        "memory_method": ranks[0]["memory_method"],
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row against the CP=1 row of the same model and length."""
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["seq_len"] == r["seq_len"] and b["cp"] == 1),
                    None)
        if base is None:
            continue
        r["mem_vs_cp1"] = r["peak_mb_per_rank"] / base["peak_mb_per_rank"]
        r["speedup_vs_cp1"] = base["step_s"] / r["step_s"]
        r["loss_diff_vs_cp1"] = abs(r["loss_step1"] - base["loss_step1"])


def check_targets(rows: list[dict], lengths: list[int], cps: list[int]) -> list[dict]:
    checks = []
    short, long_ = min(lengths), max(lengths)
    for model in sorted({r["model"] for r in rows}):
        for cp in (c for c in cps if c > 1):
            def row(T, _m=model, _c=cp):
                return next(r for r in rows if r["model"] == _m and r["seq_len"] == T and r["cp"] == _c)

            a, b = row(short)["sent_bytes_per_step"].get("cp_linear"), row(long_)["sent_bytes_per_step"].get("cp_linear")
            if a and b and long_ > short:
                checks.append({"model": model, "cp": cp, "target": f"cp_linear bytes {long_}/{short} <= 1.05",
                               "value": b / a, "pass": b / a <= 1.05})
            if cp == 2 and "mem_vs_cp1" in row(long_):
                v = row(long_)["mem_vs_cp1"]
                checks.append({"model": model, "cp": cp, "target": f"peak mem/rank CP=2 <= 0.6 x CP=1 at {long_}",
                               "value": v, "pass": v <= 0.6})
    return checks


def print_table(rows: list[dict], kinds: list[str]) -> None:
    head = (f"{'model':>10} {'seq':>6} {'cp':>3} {'step s':>8} {'tok/s':>7} {'peak MB':>8} {'mem/CP1':>8} "
            f"{'speedup':>8} {'|dloss|':>8} " + " ".join(f"{k + ' KB':>{max(16, len(k) + 3)}}" for k in kinds))
    print(head)
    for r in rows:
        opt = [f"{r[k]:8.3f}" if k in r and r["cp"] > 1 else f"{'-':>8}"
               for k in ("mem_vs_cp1", "speedup_vs_cp1")]
        dl = f"{r['loss_diff_vs_cp1']:8.1e}" if "loss_diff_vs_cp1" in r and r["cp"] > 1 else f"{'-':>8}"
        sent = " ".join(f"{r['sent_bytes_per_step'].get(k, 0) / 1024:{max(16, len(k) + 3)}.1f}" for k in kinds)
        print(f"{r['model']:>10} {r['seq_len']:>6} {r['cp']:>3} {r['step_s']:8.2f} {r['tokens_per_s']:7.0f} "
              f"{r['peak_mb_per_rank']:8.0f} {opt[0]} {opt[1]} {dl} {sent}")


def plot(rows: list[dict], kinds: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for model in sorted({r["model"] for r in rows}):
        for cp in sorted({r["cp"] for r in rows}):
            sel = sorted((r for r in rows if r["model"] == model and r["cp"] == cp), key=lambda r: r["seq_len"])
            Ts = [r["seq_len"] for r in sel]
            ax2.loglog(Ts, [r["peak_mb_per_rank"] for r in sel], "o-", label=f"{model} CP={cp}")
            ax3.loglog(Ts, [r["step_s"] for r in sel], "o-", label=f"{model} CP={cp}")
            if cp == 1:
                continue
            for k in kinds:
                vals = [(r["seq_len"], r["sent_bytes_per_step"][k] / 1024) for r in sel
                        if r["sent_bytes_per_step"].get(k)]
                if vals:
                    ax1.loglog(*zip(*vals), "o-", label=f"{model} CP={cp} {k}")
    for ax, ylabel, title in ((ax1, "KB sent per rank per step", "mixer traffic (fwd+bwd)"),
                              (ax2, "MB per rank", "peak resident growth over the steps"),
                              (ax3, "seconds", "median step time")):
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sb7b_tiny", help="comma-separated recipes, e.g. sb7b_tiny,sb76b_tiny")
    p.add_argument("--lengths", default="16384,65536", help="tokens per sequence (default: %(default)s)")
    p.add_argument("--cps", default="1,2", help="context-parallel degrees, 1 (the baseline) first")
    p.add_argument("--cp-linear", default="allgather", choices=("allgather", "scan"), help="GLA CP exchange")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (counted in peak memory)")
    p.add_argument("--ac", default="none", choices=("none", "selective", "full"),
                   help="activation checkpointing for every configuration alike (long sequences on small hosts)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (same for every CP)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per configuration before giving up")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    cps = [int(x) for x in args.cps.split(",")]
    if 1 not in cps:
        raise SystemExit(f"--cps={args.cps} has no 1: the CP=1 baseline is needed for the ratios; add it")
    alloc = {k: os.environ.get(k) for k in ALLOC_VARS if os.environ.get(k)}
    print(f"torch {torch.__version__}, {args.threads} thread(s) per rank, allocator env: {alloc or 'glibc defaults'}")
    if not alloc:
        print("  note: without CPU_ALLOC freed memory returns to the OS; run via `make bench-cp` (docs/DESIGN_NOTES.md §7)")
    print(f"memory: {MEMORY_MEASURE}\ntraffic: {COMM_MEASURE}\nfp32, micro batch 1, cp_linear={args.cp_linear}")
    rows = []
    for name in args.models.split(","):
        cfg = model_config(name)
        for T in lengths:
            for cp in cps:
                t0 = time.perf_counter()
                rows.append(run_case(name, cfg, T, cp, args))
                print(f"  {name} T={T} CP={cp}: {time.perf_counter() - t0:.0f} s", flush=True)
    add_ratios(rows)
    kinds = sorted({k for r in rows for k in r["sent_bytes_per_step"]})
    print()
    print_table(rows, kinds)
    checks = check_targets(rows, lengths, cps)
    print()
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['model']} CP={c['cp']}: {c['target']} (got {c['value']:.3f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads_per_rank": args.threads, "activation_checkpointing": args.ac, "allocator": alloc, "micro_batch": 1,
            "dtype": "float32", "cp_linear": args.cp_linear, "warmup_steps": args.warmup, "timed_steps": args.steps,
            "memory_measure": MEMORY_MEASURE, "traffic_measure": COMM_MEASURE}
    (out / "cp_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=1))
    if not args.no_plot:
        plot(rows, kinds, out / "cp_scaling.png")
    print(f"\nwrote {out / 'cp_scaling.json'}" + ("" if args.no_plot else f" and {out / 'cp_scaling.png'}"))


if __name__ == "__main__":
    main()
