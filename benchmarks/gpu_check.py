"""Driver of ``benchmarks/gpu_check.sh`` (issue 18's prepared GPU check): env, pytest_cuda, data,
train_sb7b (torchrun, a 1-rank NCCL group, checkpoint at the middle step), resume_sb7b (losses against the
uninterrupted run's), train_qwen2, throughput (tokens/s, TFLOP/s per device, MFU, peak memory), ops_bench
(benchmarks/gpu_ops.py), each timed into ``$OUT/gpu_check.json`` / ``.md``. ``--dry-run``: the same path on
the CPU (gloo, tiny shapes) without the GPU-only steps; its throughput share is of a measured CPU matmul,
never an MFU. Checkpoints are saved only where the check needs one (the trainer's end-of-run save: ~24 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # sbtrain, operators: run from the checkout
SHRINK = ["model.vocab_size=320", "model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
          "model.num_key_value_heads=1", "model.head_dim=32", "model.intermediate_size=128", "model.sliding_window=16"]
TRAINING = ("data", "train_sb7b", "resume_sb7b", "train_qwen2", "throughput")  # --only training
OP_LINE = re.compile(r"op (\w+) on (\w+) -> backend (\w+)")
SKIP_LINE = re.compile(r"op (\w+) on (\w+): skipped (\w+): (.*)")
ERROR_LINE = re.compile(r"^(error: |\w+(\.\w+)*(Error|Exception)\b)")
PEAK_LINE = re.compile(r"; peak (?P<peak_flops>\S+) FLOP/s \((?P<peak_source>.*)\); device (?P<device>\S+)")


def sh(cmd: list[str], log: Path, timeout: float, env: dict | None = None, check: str = "") -> int | None:
    """Run ``cmd`` in a session of its own, output to ``log``; on timeout kill that session (rc None).
    With ``check``, a non-zero or missing rc raises, naming the last error line of the log."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session started here: torchrun and its worker
            proc.wait()
            rc = None
    if check and rc != 0:
        text = log.read_text(errors="replace").splitlines()
        errors = [x for x in text if ERROR_LINE.match(x) and "ChildFailed" not in x]  # not torchrun's summary
        raise RuntimeError(f"{check} {'timed out' if rc is None else f'exit {rc}'}: {(errors or [''])[-1]}\n"
                           + "\n".join(text[-15:]))
    return rc


def _f(x, spec=".3g") -> str:
    return "—" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


class Report:
    def __init__(self, args):
        self.args, self.out, self.t0 = args, Path(args.out), time.perf_counter()
        self.data = {"mode": "dry-run" if args.dry_run else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "config": vars(args), "steps": {}}
        if args.wheels_report and Path(args.wheels_report).is_file():
            self.data["steps"]["wheels"] = json.loads(Path(args.wheels_report).read_text())

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0) if self.args.budget_s else 1e9

    def step(self, name: str, fn, cap: float, skip: str | None = None) -> dict:  # fn(limit): status, result, note, md
        only = self.args.only.split(",") if self.args.only else None
        if skip is None and only and name not in only and not (name in TRAINING and "training" in only):
            skip = "not in --only"
        if skip is None and min(cap, self.left()) < 15:
            skip = f"out of the time budget ({self.args.budget_s} s)"
        rec, start = {"required": True, "status": "skipped", "reason": skip}, time.perf_counter()
        if not skip:
            try:
                print(f"[gpu_check] {name} (limit {min(cap, self.left()):.0f} s)", flush=True)
                status, result, note, *table = fn(min(cap, self.left()))
                rec.update(status=status, result=result, note=note, table=table[0] if table else None)
            except Exception as exc:  # noqa: BLE001 - a step's failure is recorded and the next step runs
                rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        rec["wall_s"] = round(time.perf_counter() - start, 2)
        self.data["steps"][name] = rec
        print(f"[gpu_check] {name}: {rec['status']} ({rec['wall_s']} s)", flush=True)
        self.write()
        return rec

    def write(self) -> None:
        failed = [n for n, r in self.data["steps"].items() if r.get("required", True) and r["status"] == "failed"]
        self.data.update(wall_s=round(time.perf_counter() - self.t0, 1), failed=failed, ok=not failed)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        env, d = self.data["steps"].get("env", {}).get("result") or {}, self.data
        lines = [f"# GPU check (issue 18): {d['mode']}, {d['started']}", "", (
            f"Device: {env.get('device', 'CPU (no GPU used)')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"triton {env.get('triton')}, fla-core {env.get('fla-core')}, flash-attn {env.get('flash-attn')}; platform "
            f"{env.get('platform')}. **{'PASS' if d['ok'] else 'FAIL: ' + ', '.join(d['failed'])}** "
            f"in {d['wall_s']} s."),
            "", "| step | status | wall s | notes |", "|---|---|---|---|"]
        for name, r in d["steps"].items():
            note = (r.get("note") or r.get("reason") or r.get("error") or "").replace("|", "/").split("\n")[0]
            lines.append(f"| {name} | {r['status']} | {r.get('wall_s', '')} | {note[:600]} |")
        for r in d["steps"].values():
            lines += ["", *r["table"]] if r.get("table") else []
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def env_report(args) -> tuple:
    import importlib.metadata as md

    import torch

    from operators import ops
    from operators.platform import detect_platform, probe_platform, process_group_backend

    gpu, dev = not args.dry_run, "cpu" if args.dry_run else "cuda"
    have = {d.metadata["Name"].lower(): d.version for d in md.distributions()}
    names = ("triton", "fla-core", "flash-attn", "numpy", "megatron-core", "safetensors", "pytest")
    res = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, **{
           n: have.get(n) for n in names},
           "platform": detect_platform(), "process_group_backend": process_group_backend(device_type=dev),
           "platform_why": probe_platform(torch_version=torch.__version__, cuda_available=torch.cuda.is_available(),
                                          env=os.environ)[1]}
    if gpu:
        from sbtrain.trainer.flops import device_peak

        smi = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30,
                                                            check=False)
        res["nvidia_smi"] = (smi.stdout + smi.stderr).strip() if smi else "nvidia-smi not found"
        res["device"] = torch.cuda.get_device_name()
        res["bf16_dense_peak_flops"], res["peak_source"] = device_peak(res["device"], "bf16")
    # The registry's pick for calls shaped like sb7b's (28 query / 4 KV heads of 128, hidden 3584, vocab 152064).
    T, hq, hkv, D, d, V = (256, 28, 4, 128, 3584, 152064) if gpu else (64, 2, 1, 32, 64, 320)
    q, k, v, g, h = (torch.randn(*shape, device=dev, dtype=torch.bfloat16 if gpu else torch.float32)
                     for shape in ((1, T, hq, D), (1, T, hkv, D), (1, T, hkv, D), (1, T, hkv, D), (T, d)))
    head = (h, torch.randn(V, d, device=dev), torch.randint(0, V, (T,), device=dev))
    calls = {"gla": (ops.gla, (q, k, v, g.sigmoid().log()), {}), "attention_causal": (ops.attention, (q, k, v), {}),
             "attention_swa": (ops.attention, (q, k, v), {"window": 4096 if gpu else 16}),
             "linear_cross_entropy": (ops.linear_cross_entropy, head, {})}
    res["op_backends"] = {n: {"tensors": dev, "backend": (x := op.resolve(a, kw)).backend.name, "skipped": x.skipped}
                          for n, (op, a, kw) in calls.items()}
    del q, k, v, g, h, head, calls
    torch.cuda.empty_cache() if gpu else None  # the training runs are other processes: leave them the memory
    picks = ", ".join(f"{k} -> {v['backend']}" for k, v in res["op_backends"].items())
    return "ok", res, f"registry on {dev} tensors: {picks}"


def pytest_cuda(out: Path, limit: float) -> tuple:
    log = out / "pytest_cuda.log"
    rc = sh([sys.executable, "-m", "pytest", "tests/operators", "-k", "cuda", "-v", "-p", "no:cacheprovider"], log,
            limit)
    text = log.read_text(errors="replace")
    n = {s.lower(): len(re.findall(rf"^\S+::\S+ {s}\b", text, re.MULTILINE)) for s in ("PASSED", "FAILED", "ERROR",
                                                                                      "SKIPPED")}
    m = re.search(r"collected (\d+) items(?: / (\d+) deselected)?(?: / (\d+) selected)?", text)
    res = {"rc": rc, "selected": int(m.group(3) or int(m.group(1)) - int(m.group(2) or 0)) if m else None, **n,
           "failures": re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)", text, re.MULTILINE)[:30], "log": log.name}
    note = (f"{n['passed']} passed, {n['failed']} failed, {n['error']} errors, {n['skipped']} skipped of "
            f"{res['selected']} selected" + (" (time limit reached)" if rc is None else ""))
    if n["failed"] or n["error"] or rc not in (0, None):
        return "failed", {**res, "tail": text.splitlines()[-15:]}, note
    return ("incomplete" if rc is None else "ok"), res, note


def write_dataset(directory: Path, vocab: int, n_tokens: int, doc_len: tuple[int, int], seed: int = 0) -> dict:
    """megatron .bin/.idx + manifest (as sbtrain-data writes) of Zipf-distributed ids ending in EOD 0."""
    import hashlib

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    from sbtrain.data.build import MANIFEST, MANIFEST_VERSION, dataset_prefix

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    p, ids = 1.0 / (np.arange(1, vocab) + 10.0) ** 1.1, rng.permutation(np.arange(1, vocab))
    dtype, prefix = np.uint16 if vocab <= 65535 else np.int32, dataset_prefix(str(directory))
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    total = docs = 0
    while total < n_tokens:
        body = ids[rng.choice(vocab - 1, size=int(rng.integers(*doc_len)), p=p / p.sum())]
        builder.add_document(np.append(body, 0).astype(dtype), [body.size + 1])
        total, docs = total + body.size + 1, docs + 1
    builder.finalize(get_idx_path(prefix))
    sha = hashlib.sha256(f"{hashlib.sha256(Path(get_idx_path(prefix)).read_bytes()).hexdigest()}:{total}".encode())
    manifest = {"version": MANIFEST_VERSION, "fingerprint": sha.hexdigest(), "prefix": "data",
                "dtype": np.dtype(dtype).name, "num_documents": docs, "num_tokens": total, "max_token_id": vocab - 1,
                "skipped": {}, "sources": [], "tokenizer": {"path": None, "kind": "synthetic", "sha256": "synthetic",
                                                            "vocab_size": vocab, "eod_id": 0, "eod_token": None}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {k: manifest[k] for k in ("num_documents", "num_tokens", "dtype")}


def overrides(args, model: str, data: Path, out: Path) -> list[str]:
    return [f"model={model}", *(SHRINK if args.dry_run else [f"model.num_layers={args.layers}"]),
            f"trainer.seq_len={args.seq}", f"trainer.global_batch_size={args.global_batch}",
            f"trainer.micro_batch_size={args.micro_batch}", f"trainer.precision={args.precision}",
            f"trainer.max_steps={args.steps}", f"checkpoint.every={args.steps // 2}",
            f"trainer.device={'cpu' if args.dry_run else 'cuda'}", f"data.datasets=[{data}]", "data.valid_fraction=0",
            "trainer.eval_every=0", "logger.wandb.mode=disabled", "logger.plot=false", f"trainer.out_dir={out}"]


def run_training(args, out: Path, name: str, ovr: list[str], save_steps: str, limit: float) -> dict:
    """torchrun the worker; keep the run's small files in $OUT/runs/<name>; return what it recorded."""
    run_dir = Path(next(o for o in ovr if o.startswith("trainer.out_dir=")).split("=", 1)[1])
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, "worker", "--save-steps", save_steps, "--", *ovr]
    (keep := out / "runs" / name).mkdir(parents=True, exist_ok=True)
    try:
        sh(cmd, keep / "stdout.log", limit, check=name)
    finally:
        for f in ("metrics.jsonl", "train.log", "config.yaml", "worker.json"):
            shutil.copy(run_dir / f, keep / f) if (run_dir / f).exists() else None
    rec, log = json.loads((keep / "worker.json").read_text()), (keep / "train.log").read_text(errors="replace")
    rec.update(kept=str(keep.relative_to(out)),
               op_backends={f"{op}@{plat}": b for op, plat, b in OP_LINE.findall(log)},
               op_skipped=[list(x) for x in SKIP_LINE.findall(log)][:20],
               records=[json.loads(x) for x in (keep / "metrics.jsonl").read_text().splitlines()],
               **(m.groupdict() if (m := PEAK_LINE.search(log)) else {}))
    return rec


def brief(rec: dict) -> tuple:
    return "ok", {k: v for k, v in rec.items() if k != "records"}, (
        f"group {rec['process_group']}; all_reduce calls {rec['all_reduce_calls']}; ops {rec['op_backends']}")


def throughput(args, runs: dict) -> tuple:
    """Medians over the steps after ``--warmup`` of what the trainer logged; peak memory over all steps."""
    t = {}
    for model, rec in runs.items():
        rows = [r for r in rec["records"] if r.get("kind") == "train" and r["step"] > args.warmup and not r["skipped"]]
        x = t[model] = {"steps_used": [rows[0]["step"], rows[-1]["step"]], "peak_source": rec.get("peak_source")}
        for key in ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "pct_of_measured_matmul",
                    "step_time_s"):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            x[key] = statistics.median(vals) if vals else None
        x["memory_gb_peak"] = max(r["memory_gb"] for r in rec["records"] if r.get("kind") == "train")
        x["flops_per_token"] = x["tflops_per_device"] and x["tflops_per_device"] * 1e12 / x["tokens_per_s_per_device"]
    ratio = None  # both runs needed
    if t.get("sb7b", {}).get("tokens_per_s") and t.get("qwen2", {}).get("tokens_per_s"):
        ratio = t["sb7b"]["tokens_per_s"] / t["qwen2"]["tokens_per_s"]
    gpu = not args.dry_run  # on the CPU the share is of a measured matmul, which is no hardware peak: no MFU
    share = "MFU (bf16 dense datasheet peak)" if gpu else "% of a measured CPU matmul (no hardware peak)"
    first = next(iter(t.values()))
    table = [f"## Throughput: medians over steps {first['steps_used']}", "", (f"| model | tokens/s | TFLOP/s per "
             f"device | {share} | peak memory GB ({'CUDA allocated' if gpu else 'RSS'}) |"), "|---|---|---|---|---|"]
    table += [f"| {m} | {_f(x['tokens_per_s'], '.0f')} | {_f(x['tflops_per_device'])} | "
              f"{_f(x['mfu'], '.1%') if gpu else _f(x['pct_of_measured_matmul'], '.2f')} | "
              f"{_f(x['memory_gb_peak'], '.2f')} |" for m, x in t.items()]
    note = (f"sb7b / qwen2 tokens/s {_f(ratio, '.3f')}; model FLOPs per token "
            + " / ".join(f"{m} {_f(x['flops_per_token'])}" for m, x in t.items()) + f"; peak from {first['peak_source']}")
    return ("ok" if ratio else "failed"), {**t, "tokens_per_s_ratio_sb7b_over_qwen2": ratio}, note, table


def training(args, report: Report) -> None:
    out, state, mid = report.out, {}, args.steps // 2

    def data(limit):
        # Runs + checkpoints outside $OUT (copied back): /dev/shm or /tmp, room for one (fp32 weights, 2 moments).
        need = 1.3 * 12 * (2 * 152064 * 3584 + args.layers * 2.4e8) / 1e9
        free = {p: shutil.disk_usage(p).free / 1e9 for p in ("/dev/shm", "/tmp") if os.path.isdir(p)}
        best = next((p for p in free if free[p] >= need), max(free, key=free.get))
        state["s"] = Path(args.scratch or (Path(args.out).resolve() / "scratch" if args.dry_run else
                                           Path(best) / f"sbtrain_gpu_check_{os.getpid()}"))
        space = {} if args.dry_run else {"need_gb": round(need, 1), "free_gb": free}
        n = args.steps * args.global_batch * (args.seq + 1) * 2
        res = write_dataset(state["s"] / "data", 320 if args.dry_run else 152064, n, (args.seq // 8, args.seq * 2))
        return "ok", {**res, "scratch": str(state["s"]), **space}, f"{res['num_tokens']} tokens in {state['s']}"

    if report.step("data", data, 120)["status"] != "ok":
        for name in TRAINING[1:]:
            report.step(name, None, 1, skip="no dataset")
        return
    s = state["s"]

    def train(model, save):
        return lambda limit: brief(state.setdefault(model, run_training(
            args, out, model, overrides(args, model, s / "data", s / model), save, limit)))

    def resume(limit):
        ckpt = s / "sb7b" / "checkpoints" / f"step_{mid:08d}"
        b = run_training(args, out, "sb7b_resumed", [*overrides(args, "sb7b", s / "data", s / "sb7b_resumed"),
                                                     f"trainer.resume={ckpt}"], "", limit)
        shutil.rmtree(ckpt.parent, ignore_errors=True)
        a, r = ({x["step"]: x["loss"] for x in run["records"] if x["kind"] == "train"} for run in (state["sb7b"], b))
        want = list(range(mid + 1, args.steps + 1))
        diffs = [abs(a[i] - r[i]) / max(abs(a[i]), 1e-12) for i in want if i in a and i in r]
        res = {"checkpoint_step": mid, "compared_steps": [want[0], want[-1]], "steps_found": len(diffs),
               "bit_exact": len(diffs) == len(want) and all(a[i] == r[i] for i in want),
               "first_resumed_step_exact": a.get(mid + 1) == r.get(mid + 1), "max_rel_diff": max(diffs, default=None),
               "rtol": args.resume_rtol, "uninterrupted": [a.get(i) for i in want], "resumed": [r.get(i) for i in want],
               "resumed_from": b.get("resumed_from"), "resumed_run": brief(b)[1]}
        note = (f"steps {want[0]}-{want[-1]} after the step-{mid} checkpoint: bit-exact {res['bit_exact']}, first step "
                f"exact {res['first_resumed_step_exact']}, max rel diff {_f(res['max_rel_diff'])} "
                f"(rtol {args.resume_rtol})")
        return ("ok" if len(diffs) == len(want) and max(diffs) <= args.resume_rtol else "failed"), res, note

    # The Transformer first: it needs no Triton compilation, so its figures exist even if the
    # hybrid's first fla call (JIT + autotune, 81 s on an H200) eats the time.
    ok_c = report.step("train_qwen2", train("qwen2", ""), args.train_timeout)["status"] == "ok"
    ok_a = report.step("train_sb7b", train("sb7b", str(mid)), args.train_timeout)["status"] == "ok"
    report.step("resume_sb7b", resume, args.train_timeout, skip=None if ok_a else "no uninterrupted run")
    done = [m for m, ok in (("sb7b", ok_a), ("qwen2", ok_c)) if ok]
    report.step("throughput", lambda limit: throughput(args, {m: state[m] for m in done}), 30,
                skip=None if done else "no training run finished")
    shutil.rmtree(s, ignore_errors=True)


def ops_bench(args, out: Path, limit: float) -> tuple:
    cmd = [sys.executable, "benchmarks/gpu_ops.py", "--lengths", args.ops_lengths, "--heads", "28:4", "--backends",
           "fla", "--out", str(out / "ops_bench")]
    sh(cmd, out / "ops_bench.log", limit, check="gpu_ops.py")
    rows = [x for x in (out / "ops_bench.log").read_text().splitlines() if x.startswith(("T=", "NVIDIA", "fla"))]
    table = ["## fla chunk_gla vs SDPA (flash), bf16, B=1, 28/4 heads of 128: fwd / fwd+bwd (benchmarks/gpu_ops.py)",
             "", "```", *rows, "```"]
    return "ok", json.loads((out / "ops_bench" / "gpu_ops.json").read_text()), f"lengths {args.ops_lengths}", table


def worker(argv: list[str]) -> None:
    """``sbtrain.train`` in a torchrun rank with a process group at world size 1 too (the trainer makes one only
    for WORLD_SIZE > 1), checkpoints only at ``--save-steps``, and a record of the group and its all_reduces."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from operators.platform import process_group_backend
    from sbtrain.cli.app import run_app
    from sbtrain.train import report, train
    from sbtrain.trainer.trainer import Trainer

    saves, ovr = {int(x) for x in argv[argv.index("--save-steps") + 1].split(",") if x}, argv[argv.index("--") + 1:]
    device = next(o.split("=")[1] for o in ovr if o.startswith("trainer.device="))
    rec: dict = {"process_group": {"initialized_by": "sbtrain.train"}, "all_reduce_calls": {}, "checkpoint_saves": []}
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(process_group_backend(device_type=device), timeout=timedelta(seconds=900))
        rec["process_group"]["initialized_by"] = "gpu_check (world size 1)"
    all_reduce, save = dist.all_reduce, Trainer.save_checkpoint

    def counting_all_reduce(tensor, *a, **kw):
        rec["all_reduce_calls"][tensor.device.type] = rec["all_reduce_calls"].get(tensor.device.type, 0) + 1
        return all_reduce(tensor, *a, **kw)

    def save_checkpoint(self):
        if self.step in saves:
            rec["checkpoint_saves"].append(self.step)
            save(self)

    dist.all_reduce, Trainer.save_checkpoint = counting_all_reduce, save_checkpoint

    def task(cfg):
        summary = train(cfg)
        rec["process_group"].update(backend=str(dist.get_backend()), world=dist.get_world_size())
        rec.update(summary=summary, resumed_from=summary.get("resumed_from"))
        if dist.get_rank() == 0:
            Path(summary["out_dir"], "worker.json").write_text(json.dumps(rec, indent=1, default=str))
            print(report(summary), flush=True)

    try:
        run_app(task, "train", argv=ovr)
    finally:
        dist.destroy_process_group() if dist.is_initialized() else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:]) or 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run"])
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny shapes; no GPU-only steps")
    for flag, kind, default, text in (  # None: the GPU default, (the dry run's)
            ("out", str, os.environ.get("OUT", "runs/gpu_check"), None), ("scratch", str, None, "runs and checkpoints"),
            ("only", str, "", "comma list: env, pytest_cuda, training (or one of its steps), ops_bench"),
            ("layers", int, 4, None), ("seq", int, None, "8192 (64)"), ("steps", int, None, "30 (6)"),
            ("warmup", int, None, "steps left out of the medians: 5 (2)"), ("global-batch", int, None, "2 (4)"),
            ("micro-batch", int, None, "1 (2)"), ("precision", str, "bf16", None),
            ("nproc", int, 1, "ranks per torchrun (1 on the GPU; 1 or 2 in a dry run)"),
            ("resume-rtol", float, None, "largest relative loss difference after the resume: 1e-4 (0)"),
            ("budget-s", float, None, "for the whole run; steps that do not fit are skipped: 460 (none)"),
            ("pytest-timeout", float, 120, None), ("train-timeout", float, 300, None),
            ("ops-timeout", float, 120, None),
            ("ops-lengths", str, "8192,32768,131072", None), ("wheels-report", str, None, "from gpu_check.sh")):
        p.add_argument(f"--{flag}", type=kind, default=default, help=text)
    args = p.parse_args(argv)
    for key, gpu, dry in (("seq", 8192, 64), ("steps", 20, 6), ("warmup", 4, 2), ("global_batch", 2, 4),
                          ("micro_batch", 1, 2), ("resume_rtol", 1e-4, 0.0), ("budget_s", 460, 0)):
        if getattr(args, key) is None:
            setattr(args, key, dry if args.dry_run else gpu)
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    rep = Report(args)
    gpu_only = "needs a GPU" if args.dry_run else None
    rep.step("env", lambda limit: env_report(args), 120)
    training(args, rep)
    rep.step("ops_bench", lambda limit: ops_bench(args, out, limit), args.ops_timeout, skip=gpu_only)
    # Last: the CUDA operator suite takes what time is left (it did not finish in 120 s on an H200).
    rep.step("pytest_cuda", lambda limit: pytest_cuda(out, limit), args.pytest_timeout, skip=gpu_only)
    print((out / "gpu_check.md").read_text(), flush=True)
    return 0 if rep.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
