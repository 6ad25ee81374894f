"""Cost of the observability callbacks when off (issue: "< 5% step time when off").

Step CPU time of sb7b_tiny (tiny_cpu shapes: T=256, batch 4, one thread) in three setups measured
round-robin in one process: the previous dispatch (a profiler range around every op call, no
callbacks), the default (observe off: no callbacks, one flag read per op call), and all four
callbacks constructed but never due. Also the registry's per-call dispatch cost on a tiny op.
Prints a table of median step times and ratios to the first setup.

    python benchmarks/observability_overhead.py [ROUNDS]
"""
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from operators import ops, registry
from sbtrain.config.observe import ObserveConfig
from sbtrain.config.train import OptimConfig, TrainerConfig
from sbtrain.eval.callback import EvalCallback
from sbtrain.models import build_model
from sbtrain.trainer.observability import (
    ModelStatsCallback,
    ProfilerCallback,
    SlowRankDetector,
    build_observability,
)
from sbtrain.trainer.optim import build_optimizer
from sbtrain.trainer.train_module import TrainModule
from sbtrain.trainer.trainer import Trainer
from tests.models.helpers import recipe

torch.set_num_threads(1)
TMP = tempfile.mkdtemp()
T, B = 256, 4
class Data:
    def __init__(self): self.g = torch.Generator().manual_seed(0)
    def next_global_batch(self):
        t = torch.randint(0, 8192, (B, T + 1), generator=self.g)
        return [{"input_ids": t[:, :-1], "labels": t[:, 1:]}]
    def state_dict(self): return {}
    def load_state_dict(self, s): pass

def trainer(callbacks):
    torch.manual_seed(0)
    model = build_model(recipe("sb7b_tiny"))
    tcfg = TrainerConfig(global_batch_size=B, micro_batch_size=B, seq_len=T, max_steps=10**6)
    ocfg = OptimConfig(lr=1e-4, warmup_steps=0)
    tr = Trainer(module=TrainModule.build(model, build_optimizer(model, ocfg), tcfg, ocfg), cfg=tcfg, optim_cfg=ocfg,
                 train_data=Data(), callbacks=callbacks)
    for cb in tr.callbacks: cb.on_fit_start(tr)
    return tr

def steps(tr, n):
    out = []
    for _ in range(n):
        t0 = time.process_time()  # CPU time of this process: less sensitive to other jobs on the box
        stats = tr.train_step(tr.train_data.next_global_batch())
        tr.step += 1
        tr._after_step(stats, 1.0)
        out.append(time.process_time() - t0)
    return out

never = 10**9
configs = {
    "old (record_function per op call, no observe)": (True, list),
    "new, observe off (default: no callbacks)": (False, lambda: build_observability(ObserveConfig(), TMP)),
    "new, all 4 callbacks constructed, never due": (False, lambda: [ProfilerCallback(never, 1, TMP),
        ModelStatsCallback(never), SlowRankDetector(never, 1.5), EvalCallback(never)]),
}
trainers = {k: (flag, trainer(make())) for k, (flag, make) in configs.items()}
times = {k: [] for k in configs}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    for k, (flag, tr) in trainers.items():
        registry.set_profiling(flag)
        s = steps(tr, 4)
        if rep: times[k] += s  # first round: warm-up
registry.set_profiling(False)
base = statistics.median(times[next(iter(configs))])
for k, v in times.items():
    print(f"{k:50s} median {statistics.median(v)*1e3:8.1f} ms/step  ratio {statistics.median(v)/base:.3f}  (n={len(v)})")

# registry dispatch overhead on a tiny op
x, w = torch.randn(4, 16), torch.ones(16)
for flag in (True, False):
    registry.set_profiling(flag)
    best = min(timeit.Timer(lambda: ops.rms_norm(x, w, 1e-6), timer=time.process_time).repeat(number=2000, repeat=15)) / 2000
    print(f"ops.rms_norm [4,16] PROFILING={flag}: {best*1e6:.2f} us/call")
registry.set_profiling(False)
fn = ops.rms_norm.select(x, w, 1e-6).fn
best = min(timeit.Timer(lambda: fn(x, w, 1e-6), timer=time.process_time).repeat(number=2000, repeat=15)) / 2000
print(f"backend fn called directly (no dispatch): {best*1e6:.2f} us/call")

# the callbacks' own per-step cost when never due, against the step time
tr = trainers[list(configs)[2]][1]
metrics = {"step_time_s": 0.1}
per = min(timeit.Timer(lambda: [cb.on_step_end(tr, metrics) or cb.on_before_optimizer_step(tr) for cb in tr.callbacks],
                       timer=time.process_time).repeat(number=2000, repeat=15)) / 2000
print(f"4 idle callbacks: {per*1e6:.2f} us/step = {per/base:.2e} of a step")
