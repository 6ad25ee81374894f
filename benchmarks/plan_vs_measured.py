"""``sbtrain-plan`` against measurement (issue 17): the predicted per-rank peak of a training step
beside the measured one, for layouts that exercise every term of the model (FSDP, TP, EP, CP,
activation checkpointing none / selective / full, fp32 and bf16).

Each layout runs the real training path (validate_parallel -> make_mesh -> build_model ->
parallelize -> build_optimizer -> Trainer.train_step, AdamW) in fresh gloo processes (world 1 or
2, one thread each) on medium models (width 512, 4 layers, vocabulary 16384, 2048 tokens: tensors
are hundreds of MB, far above the interpreter's noise). Per rank:

- baseline: the resident set after a warm-up step of a tiny model on the same layout (so the
  kernels' code pages and gloo's buffers are already in) and before the measured model is built;
- peak: the resident-set high-water mark (Linux VmHWM, reset after build + parallelize) over two
  steps (the second has AdamW's state, the steady state the plan predicts);
- measured = peak - baseline, max over ranks. With ``MALLOC_MMAP_THRESHOLD_=131072
  MALLOC_TRIM_THRESHOLD_=131072`` (set here, as ``make bench-memory`` does) every tensor above
  128 KB is its own mapping, so the resident set follows the live tensors;
- exact checks: parameter, gradient (before the optimizer step) and AdamW-state bytes held by the
  rank (unique storages) against the plan's rows.

Prints a table, writes ``benchmarks/out/plan_vs_measured.json`` and, with ``--results``, appends the
table to benchmarks/RESULTS.md. ``--only 'NAME;...'`` runs some layouts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

import torch

from sbtrain.bench.common import peak_rss_kb, reset_peak_rss, status_kb
from sbtrain.config.model import HybridConfig, ModelConfig, MoEConfig
from sbtrain.config.parallel import ParallelConfig, validate_parallel
from sbtrain.config.train import OptimConfig, TrainerConfig
from sbtrain.plan import plan_memory
from tests.distributed.harness import run_distributed

MB = 1 << 20
SEQ = 2048


def model_config(kind: str, tiny: bool = False) -> ModelConfig:
    """sb7b-like (GLA + SWA) or sb76b-like (hybrid SWA / full with sinks, MoE from layer 1)."""
    base = {"vocab_size": 16384, "hidden_size": 512, "num_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1536, "sliding_window": 512}
    if tiny:
        base.update(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, sliding_window=64)
    if kind == "sb7b":
        return ModelConfig(name="sb7b_medium", layer_pattern=["gla", "swa"], **base).validate()
    return ModelConfig(name="sb76b_medium", layer_pattern=["hybrid_swa", "hybrid_full"],
                       hybrid=HybridConfig(num_sink_tokens=16, feature_map="sigmoid"),
                       moe=MoEConfig(num_experts=4, top_k=1, num_shared_experts=1, dense_layers=[0],
                                     expert_intermediate_size=base["intermediate_size"] // 2,
                                     aux_loss_coef=0.01, z_loss_coef=0.001), **base).validate()


LAYOUTS = [  # name, world, model, parallel, trainer
    ("1 rank, no AC", 1, "sb7b", {}, {}),
    ("1 rank, full AC", 1, "sb7b", {}, {"activation_checkpointing": "full"}),
    ("1 rank, bf16", 1, "sb7b", {}, {"precision": "bf16"}),
    ("FSDP dp=2", 2, "sb7b", {}, {}),
    ("FSDP dp=2, selective AC", 2, "sb7b", {}, {"activation_checkpointing": "selective"}),
    ("TP=2", 2, "sb7b", {"tp": 2}, {}),
    ("CP=2", 2, "sb7b", {"cp": 2}, {}),
    ("EP=2 (MoE)", 2, "sb76b", {"ep": 2}, {}),
    ("CP=2, full AC, bf16", 2, "sb7b", {"cp": 2}, {"activation_checkpointing": "full", "precision": "bf16"}),
    ("CP=2 (MoE: Ulysses, halo)", 2, "sb76b", {"cp": 2}, {}),
    ("TP=2, bf16", 2, "sb7b", {"tp": 2}, {"precision": "bf16"}),
    # Short sequences: parameters, gradients, AdamW state and FSDP's gathered units dominate.
    ("FSDP dp=2, full AC, seq 512", 2, "sb76b", {}, {"activation_checkpointing": "full", "seq_len": 512}),
    ("FSDP dp=2, bf16 params, seq 512", 2, "sb7b", {"param_dtype": "bf16"}, {"precision": "bf16", "seq_len": 512}),
    ("DeepSpeed ZeRO-2 dp=2", 2, "sb7b", {"engine": "deepspeed"}, {}),
]


def configs(kind: str, world: int, par: dict, tr: dict, tiny: bool = False):
    mcfg = model_config(kind, tiny)
    pcfg = ParallelConfig(**par)
    dp = world // (pcfg.cp * pcfg.tp)
    tr = {**tr, "seq_len": 64} if tiny else {"seq_len": SEQ, **tr}
    tcfg = TrainerConfig(global_batch_size=dp, micro_batch_size=1, max_steps=2, **tr)
    return mcfg, pcfg, tcfg


def _unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class Batches:
    """One random micro batch per data-parallel rank and step (seeded: the same on every TP / CP rank)."""

    def __init__(self, vocab: int, seq: int, step_seed: int = 0):
        self.vocab, self.seq, self.step = vocab, seq, step_seed

    def next_global_batch(self):
        self.step += 1
        ids = torch.randint(0, self.vocab, (1, self.seq + 1), generator=torch.Generator().manual_seed(self.step))
        return [{"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _trainer(mcfg, pcfg, tcfg, mesh):
    from sbtrain.models import build_model
    from sbtrain.trainer.distributed import parallelize
    from sbtrain.trainer.optim import build_optimizer
    from sbtrain.trainer.train_module import TrainModule
    from sbtrain.trainer.trainer import Trainer

    torch.manual_seed(0)
    model = build_model(mcfg)
    layout = parallelize(model, mesh, pcfg, tcfg)
    ocfg = OptimConfig(lr=1e-4, schedule="constant", warmup_steps=0)
    optimizer = build_optimizer(model, ocfg)
    deepspeed = None
    if pcfg.engine == "deepspeed":
        from parallel.deepspeed_engine import DeepSpeedEngine

        deepspeed = DeepSpeedEngine(model, optimizer, zero_stage=pcfg.deepspeed.zero_stage, precision=tcfg.precision,
                                    clip_grad=ocfg.clip_grad, platform="cpu", reduce_dtype=pcfg.reduce_dtype)
    module = TrainModule.build(model, optimizer, tcfg, ocfg, mesh=mesh, pcfg=pcfg, deepspeed=deepspeed,
                               expert_grad_divisor=layout["expert_grad_divisor"])
    return Trainer(module=module, cfg=tcfg, optim_cfg=ocfg, train_data=Batches(mcfg.vocab_size, tcfg.seq_len))


def measure(kind: str, world: int, par: dict, tr: dict) -> dict:
    """On every rank: warm up on a tiny model, then build, parallelize and run two steps."""
    import torch.distributed as dist

    from sbtrain.trainer.distributed import make_mesh

    torch.set_num_threads(1)
    mcfg, pcfg, tcfg = configs(kind, world, par, tr, tiny=True)
    mesh = make_mesh(validate_parallel(pcfg, world, mcfg, tcfg), torch.device("cpu"))
    warm = _trainer(mcfg, pcfg, tcfg, mesh)
    warm.train_step(warm.train_data.next_global_batch())
    del warm
    gc.collect()
    mcfg, pcfg, tcfg = configs(kind, world, par, tr)
    validate_parallel(pcfg, world, mcfg, tcfg)
    baseline = status_kb("VmRSS")
    trainer = _trainer(mcfg, pcfg, tcfg, mesh)
    gc.collect()
    method = reset_peak_rss()
    held = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):  # gradients are complete here, AdamW's state from step 1 exists
        held["grads"] = _unique_bytes(p.grad for p in params if p.grad is not None)
        held["optimizer"] = _unique_bytes(t for s in trainer.optimizer.state.values() for t in s.values()
                                          if torch.is_tensor(t))
        return step(*args, **kwargs)

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    if not hasattr(trainer.engine, "deepspeed"):  # DeepSpeed steps its own flat partitions: no per-parameter state to read
        trainer.optimizer.step = recording_step
    start = time.perf_counter()
    losses = [trainer.train_step(trainer.train_data.next_global_batch()).loss for _ in range(2)]
    return {"rank": dist.get_rank() if dist.is_initialized() else 0, "measured_mb": (peak_rss_kb(method) - baseline) / 1024,
            "baseline_mb": baseline / 1024, "params": _unique_bytes(params), "grads": None,
            "optimizer": None, **held,
            "seconds": time.perf_counter() - start, "losses": losses, "memory_method": method}


def predict(kind: str, world: int, par: dict, tr: dict) -> dict:
    mcfg, pcfg, tcfg = configs(kind, world, par, tr)
    return plan_memory(mcfg, world, pcfg, tcfg, device="cpu").to_json()


def run_layout(name: str, world: int, kind: str, par: dict, tr: dict, timeout: float) -> dict:
    plan = predict(kind, world, par, tr)
    start = time.perf_counter()
    ranks = run_distributed(measure, world, kind, world, par, tr, reuse=False, timeout=timeout)
    worst = max(ranks, key=lambda r: r["measured_mb"])
    predicted = plan["peak_bytes"] / MB
    exact = {k: [r[k] for r in ranks] for k in ("params", "grads", "optimizer")}
    row = {"layout": name, "world": world, "model": plan["model"], "predicted_mb": predicted,
           "measured_mb": worst["measured_mb"], "ratio": predicted / worst["measured_mb"],
           "per_rank_measured_mb": [r["measured_mb"] for r in ranks], "peak_moment": plan["peak_moment"],
           "plan_bytes": plan["bytes"], "plan_held_gib": plan["held_gib"], "measured_state_bytes": exact,
           "state_exact": None if None in exact["grads"] else all(max(exact[k]) == b for k, b in state_rows(plan).items()),
           "wall_s": time.perf_counter() - start, "losses_rank0": ranks[0]["losses"]}
    print(f"{name:>26}: predicted {predicted:7.0f} MB, measured {worst['measured_mb']:7.0f} MB, ratio "
          f"{row['ratio']:.3f}, state exact {row['state_exact']} ({row['wall_s']:.0f} s)", flush=True)
    return row


def state_rows(plan: dict) -> dict:
    """The plan's steady parameter / gradient / AdamW-state bytes of this rank."""
    return {k: plan["state_bytes"][k] for k in ("params", "grads", "optimizer")}


EXACT = {True: "yes", False: "no", None: "n/a (DeepSpeed)"}


def table(rows: list[dict]) -> str:
    out = [("| layout | model | world | predicted peak (MB) | measured peak (MB) | predicted / measured | "
            "params/grads/AdamW bytes exact | peak moment (plan) |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['model']} | {r['world']} | {r['predicted_mb']:.0f} | {r['measured_mb']:.0f} | "
                   f"{r['ratio']:.3f} | {EXACT[r['state_exact']]} | {r['peak_moment']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="layout names (substrings) separated by ';'")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "plan_vs_measured.json"))
    parser.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    wanted = [w.strip() for w in args.only.split(";") if w.strip()]
    layouts = [x for x in LAYOUTS if not wanted or any(w in x[0] for w in wanted)]
    start = time.perf_counter()
    rows = [run_layout(name, world, kind, par, tr, args.timeout) for name, world, kind, par, tr in layouts]
    text = table(rows)
    print("\n" + text)
    within = sum(abs(r["ratio"] - 1) <= 0.15 for r in rows)
    verdict = f"{within} of {len(rows)} layouts within ±15 % (target: at least 6)"
    print(verdict)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}", "torch": torch.__version__,
            "allocator": ALLOC, "seq_len": SEQ, "total_s": time.perf_counter() - start,
            "memory_measure": "max over ranks of VmHWM over 2 steps minus VmRSS before the model is built "
                              "(after a tiny warm-up step on the same layout)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "verdict": verdict}, indent=1))
    if args.results:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(results_section(text, verdict, meta))


def results_section(text: str, verdict: str, meta: dict) -> str:
    return (f"\n## sbtrain-plan vs measured (issue 17) — `python benchmarks/plan_vs_measured.py --results`\n\n"
            f"Machine: {meta['machine']}, torch {meta['torch']}; allocator "
            f"`MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072` (set by the script); seq "
            f"{meta['seq_len']}, micro batch 1, AdamW; {meta['memory_measure']}; plan: `sbtrain.plan.plan_memory(..., "
            f"device=\"cpu\")`, nothing allocated. Whole run {meta['total_s'] / 60:.1f} min.\n\n{text}\n\n{verdict}.\n")


if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in ALLOC.items()):  # glibc reads these at process start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOC})
    main()
