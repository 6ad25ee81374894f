"""Prefill across N processes with context parallelism (``sbtrain-bench ttft cp=N``).

Each of N gloo processes builds the same model (same seed, so the same weights), takes its
contiguous 1/N of the prompt and runs the training forward's context-parallel mixers
(:class:`parallel.context_parallel.ContextParallel`: LASP-2 state exchange for GLA, a halo for
sliding windows, Ulysses for full attention) without autograd. The last rank holds the prompt's
last position and computes the first token's logits from it. What is timed is the time to
first token: a barrier, the sharded forward, the last rank's head, a barrier (so the slowest
rank sets the time). The decode cache is not assembled across ranks (its GLA states and window
keys sit on the last rank, full-attention keys on all): a cp>1 prefill answers the first token
only, which is what TTFT measures.

Threads: each rank gets ``threads // cp`` (at least one), so cp=N and cp=1 share the same cores.
The N processes are fresh interpreters (``spawn``) joined in one gloo group by :func:`run_ranks`;
a rank that raises, dies or outlives ``timeout_s`` fails the run with its rank and traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.context_parallel import ContextParallel
from sbtrain.bench.common import skips_run
from sbtrain.bench.config import format_length
from sbtrain.models import build_model


@torch.no_grad()
def cp_first_token_logits(model, input_ids: torch.Tensor, cp: ContextParallel) -> torch.Tensor | None:
    """Logits ``[B,V]`` (fp32) of the prompt's last position on the last CP rank; None elsewhere.
    ``input_ids`` is the whole prompt ``[B,T]`` (every rank builds it; each uses its shard)."""
    hidden, _ = model.hidden_states(cp.shard(input_ids), context_parallel=cp)
    if cp.rank != cp.size - 1:
        return None
    return model.lm_head(hidden[:, -1]).float()


def prompt_ids(vocab_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The prompt every ttft measurement of length ``seq_len`` uses (in-process and cp ranks alike)."""
    return torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed + seq_len))


def rank_main(spec: dict) -> dict:
    """One rank of a cp=N ttft run (called through :func:`run_ranks`).

    ``spec``: models (name -> ModelConfig), lengths, repeats, seed, threads, cp_linear,
    quadratic_max, single_above, warmup_tokens. Returns per model and length the timed runs, and
    on the last rank the first-token logits of the last run (for the equivalence check)."""
    torch.set_num_threads(spec["threads"])
    group = dist.group.WORLD
    models = {}
    for name, mcfg in spec["models"].items():
        torch.manual_seed(spec["seed"])
        models[name] = build_model(mcfg).eval()
        size = dist.get_world_size(group)
        warm = max(size, spec["warmup_tokens"] // size * size)
        cp_first_token_logits(models[name], torch.zeros(1, warm, dtype=torch.long),
                              ContextParallel(group, warm, linear_method=spec["cp_linear"]))
    vocab = min(m.config.vocab_size for m in models.values())
    runs = {name: {} for name in models}
    logits = {name: {} for name in models}
    for T in spec["lengths"]:
        ids = prompt_ids(vocab, T, spec["seed"])
        cp = ContextParallel(group, T, linear_method=spec["cp_linear"])
        for r in range(spec["repeats"]):
            for name, model in models.items():
                if skips_run(model.config, T, r, spec["quadratic_max"], spec["single_above"]):
                    continue
                dist.barrier(group)
                start = time.perf_counter()
                out = cp_first_token_logits(model, ids, cp)
                dist.barrier(group)
                runs[name].setdefault(T, []).append(time.perf_counter() - start)
                if out is not None:
                    logits[name][T] = out
    return {"runs": runs, "logits": logits, "rank": dist.get_rank(group)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, fn, world_size: int, port: int, timeout_s: float, result_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        # A file, not a queue: tensors sent through a multiprocessing queue live in the sender's shared memory.
        torch.save(fn(*args), os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _first_failure(result_dir: str) -> str:
    """The traceback of the rank that failed first (the others usually fail in a collective after it)."""
    errors = sorted((os.path.getmtime(os.path.join(result_dir, f)), f)
                    for f in os.listdir(result_dir) if f.endswith(".err"))
    if not errors:
        return ""
    rank = errors[0][1].removeprefix("rank").removesuffix(".err")
    with open(os.path.join(result_dir, errors[0][1])) as f:
        return f"rank {rank} failed first:\n{f.read()}"


def run_ranks(fn, world_size: int, *args, timeout_s: float = 600.0) -> list:
    """``fn(*args)`` on ``world_size`` fresh local processes in one gloo group; their results by rank.

    ``fn`` must be a module-level function. A rank that raises or dies stops the others and raises
    RuntimeError with the traceback of the rank that failed first; so does a run still going after
    ``timeout_s`` seconds."""
    with tempfile.TemporaryDirectory(prefix="sbtrain-cp-") as result_dir:
        context = mp.start_processes(_rank_entry, args=(fn, world_size, _free_port(), timeout_s, result_dir, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"context-parallel prefill: ranks still running after "
                                       f"timeout_s={timeout_s:.0f} s (raise timeout_s=)")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise RuntimeError(f"context-parallel prefill with {world_size} processes failed: "
                               f"{_first_failure(result_dir) or exc}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def threads_per_rank(cfg) -> int:
    """``threads // cp`` (at least one): cp=N ranks share the cores the in-process prefill uses."""
    return max(1, (cfg.threads or torch.get_num_threads()) // cfg.cp)


def run_cp(models: dict, Ts: list[int], cfg, qmax: int, single_above: int, warmup_tokens: int) -> tuple[dict, dict]:
    """Time cp=``cfg.cp`` prefills in ``cfg.cp`` fresh gloo processes; returns
    ``(points per model, first-token logits per model and length)`` in the in-process layout."""
    spec = {"models": {name: m.config for name, m in models.items()}, "lengths": Ts, "repeats": cfg.repeats,
            "seed": cfg.seed, "threads": threads_per_rank(cfg), "cp_linear": cfg.cp_linear,
            "quadratic_max": qmax, "single_above": single_above, "warmup_tokens": warmup_tokens}
    ranks = run_ranks(rank_main, cfg.cp, spec, timeout_s=cfg.timeout_s)
    last = next(r for r in ranks if r["rank"] == cfg.cp - 1)
    points = {}
    for name in models:
        points[name] = []
        for T in Ts:
            ts = ranks[0]["runs"][name].get(T)
            if not ts:
                continue
            points[name].append({"seq_len": T, "seconds": statistics.median(ts), "runs": ts, "measured": True,
                                 "label": (f"median of {len(ts)}" if len(ts) > 1 else "one run")
                                 + f", cp={cfg.cp} x {spec['threads']} thread(s)"})
            print(f"  {name:>12} {format_length(T):>6} cp={cfg.cp}: {statistics.median(ts):9.3f} s ({len(ts)} run(s))",
                  flush=True)
    return points, last["logits"]


def compare_cp(single: dict, multi: dict, single_logits: dict, multi_logits: dict, cp: int) -> list[dict]:
    """Per model and length measured both ways: the cp=N speed-up over cp=1 and the largest
    first-token logit difference (context parallelism must not change the answer)."""
    rows = []
    for name, points in multi.items():
        base = {p["seq_len"]: p for p in single.get(name, []) if p["measured"]}
        for p in points:
            b = base.get(p["seq_len"])
            if b is None:
                continue
            diff = (multi_logits[name][p["seq_len"]] - single_logits[name][p["seq_len"]]).abs().max().item()
            rows.append({"model": name, "seq_len": p["seq_len"], "cp": cp, "seconds_cp1": b["seconds"],
                         "seconds_cp": p["seconds"], "speedup_vs_cp1": b["seconds"] / p["seconds"],
                         "max_abs_logit_diff": diff})
    return rows
