"""DeepSpeed ZeRO-3 checkpoints at scale: each rank saves and loads only its own partitions
(``DeepSpeedEngine.checkpoint_state_dict``, ``parallel/deepspeed_sharded.py``). Split from
test_deepspeed.py, whose model, optimizer and training step these tests reuse."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sbtrain.models.build import build_model
from tests.distributed.harness import run_distributed
from tests.distributed.test_deepspeed import CLIP, WORLD, _assert_close, _model, _model_config, _sgd, _train

pytestmark = pytest.mark.distributed

BIG_LAYERS, BIG_WIDTH = 8, 2048  # 8 x 2048^2 = 33.6M fp32 parameters; weights + 2 Adam moments 403 MB


class _Stack(torch.nn.Module):
    """Big square layers (tensors dominate the process's memory) and an odd-sized bias, so the
    ZeRO-3 partitions cut rows in the middle."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(BIG_WIDTH, BIG_WIDTH, bias=False) for _ in range(BIG_LAYERS))
        self.out = torch.nn.Linear(BIG_WIDTH, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x).square().mean()


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _big_steps(engine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x = torch.randn(2, BIG_WIDTH, generator=torch.Generator().manual_seed(step * 10 + dist.get_rank()))
        loss = engine.module(x)
        engine.backward(loss)
        engine.step(1e-3)
        engine.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _zero3_sharded_save_worker(directory: str) -> dict:
    import ctypes

    from parallel.deepspeed_engine import DeepSpeedEngine
    from sbtrain.trainer.checkpoint import Checkpointer, flatten

    # What MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 do at start-up (this worker
    # is already running): every tensor of 128 KiB or more is its own mmap, returned on free, so
    # the resident size follows the live tensors.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 131072)  # M_MMAP_THRESHOLD

    def build(seed):
        torch.manual_seed(seed)
        return DeepSpeedEngine(_Stack(), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), zero_stage=3)

    engine = build(0)
    _big_steps(engine, range(1))
    ck = Checkpointer(directory)
    before = _rss()
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts from the current RSS
        f.write("5")
    state = engine.checkpoint_state_dict()
    sharded = sum(1 for v in flatten(state).values() if type(v).__name__ == "ShardedTensor")
    ck.save(1, state, {})
    peak = _peak_rss_since_reset() - before
    del state
    before = _rss()  # the same measure on the full-tensor path, for contrast
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    full = engine.state_dict()["model"]
    gathered = _peak_rss_since_reset() - before
    sums = {k: float(v.double().sum()) for k, v in full.items()}
    del full
    uninterrupted = _big_steps(engine, range(1, 3))
    del engine
    resumed = build(1)  # another init: the load must overwrite every weight and moment
    template = resumed.checkpoint_state_dict()
    Checkpointer(directory).load(template)
    resumed.load_state_dict(template)
    after = _big_steps(resumed, range(1, 3))
    return {"uninterrupted": uninterrupted, "resumed": after, "peak": peak, "gathered": gathered, "sharded": sharded,
            "sums": sums}


def test_zero3_checkpoint_is_sharded_and_resumes_bit_exactly(tmp_path):
    """ZeRO-3 on 4 ranks, 34M parameters + AdamW: the save holds no full tensor on any rank (peak
    resident growth <= full state / 4 + one tensor), and a fresh engine resumed from it continues
    exactly like the uninterrupted one. A plain model reads the sharded checkpoint too."""
    from sbtrain.trainer.checkpoint import Checkpointer

    world = 4
    results = run_distributed(_zero3_sharded_save_worker, world, str(tmp_path), timeout=300, reuse=False)
    params = BIG_LAYERS * BIG_WIDTH**2 + 3 * BIG_WIDTH + 3
    full_state, one_tensor = 3 * 4 * params, 4 * BIG_WIDTH**2
    for rank, res in enumerate(results):
        assert res["sharded"] == 3 * (BIG_LAYERS + 2), res["sharded"]  # weights, exp_avg, exp_avg_sq
        assert res["resumed"] == res["uninterrupted"], f"rank {rank}: {res['resumed']} vs {res['uninterrupted']}"
        assert res["gathered"] >= full_state / 3, res["gathered"]  # the measure sees full weights when there are
        assert res["peak"] <= full_state / world + one_tensor, \
            f"rank {rank}: save grew RSS by {res['peak'] / 2**20:.0f} MiB (bound {(full_state / world + one_tensor) / 2**20:.0f})"
    print("zero3 save peak RSS growth per rank (MiB):", [round(r["peak"] / 2**20, 1) for r in results],
          "full-tensor state_dict():", [round(r["gathered"] / 2**20, 1) for r in results],
          "full state", round(full_state / 2**20), "MiB")
    torch.manual_seed(5)
    plain = _Stack()
    state = {"model": {k: torch.zeros_like(v) for k, v in plain.state_dict().items()}}
    Checkpointer(tmp_path).load(state)
    for key, value in state["model"].items():  # the boxes of 4 partitions reassemble the full tensors
        assert float(value.double().sum()) == results[0]["sums"][key], key


def _zero3_across_layouts_worker(directory: str) -> dict:
    """ZeRO-3 saves its partitions; a ZeRO-1 engine (full tensors) loads them and saves full
    tensors, which a fresh ZeRO-3 engine loads back into its partitions: all three then take the
    same step, so weights, momentum and groups survived both conversions."""
    from parallel.deepspeed_engine import DeepSpeedEngine
    from sbtrain.trainer.checkpoint import Checkpointer

    saver = DeepSpeedEngine(_model(), _sgd, zero_stage=3, clip_grad=CLIP)
    _train(saver, range(2))
    Checkpointer(f"{directory}/z3").save(2, saver.checkpoint_state_dict(), {})
    torch.manual_seed(1)
    middle = DeepSpeedEngine(build_model(_model_config()), _sgd, zero_stage=1, clip_grad=CLIP)
    state = middle.checkpoint_state_dict()  # ZeRO-1: full tensors
    Checkpointer(f"{directory}/z3").load(state)
    middle.load_state_dict(state)
    Checkpointer(f"{directory}/z1").save(2, middle.checkpoint_state_dict(), {})
    torch.manual_seed(2)
    back = DeepSpeedEngine(build_model(_model_config()), _sgd, zero_stage=3, clip_grad=CLIP)
    state = back.checkpoint_state_dict()
    Checkpointer(f"{directory}/z1").load(state)
    back.load_state_dict(state)
    torch.manual_seed(3)
    direct = DeepSpeedEngine(build_model(_model_config()), _sgd, zero_stage=3, clip_grad=CLIP)
    direct.load_state_dict(middle.state_dict())  # full tensors straight in: each rank takes its boxes
    return {name: _train(engine, range(2, 3))["params"][0] for name, engine in
            (("saver", saver), ("zero1", middle), ("zero3", back), ("direct", direct))}


def test_zero3_partitions_convert_to_full_tensors_and_back(tmp_path):
    res = run_distributed(_zero3_across_layouts_worker, WORLD, str(tmp_path), timeout=180)[0]
    _assert_close(res["zero1"], res["saver"], "ZeRO-1 resumed from ZeRO-3 partitions")
    _assert_close(res["zero3"], res["saver"], "ZeRO-3 resumed from full tensors")
    _assert_close(res["direct"], res["saver"], "ZeRO-3 loaded a full state_dict() directly")


def _trainer_zero3_async_resume(directory: str) -> dict:
    """Through the Trainer: ZeRO-3 checkpoints asynchronously (the snapshot copies this rank's
    partitions only) while the next step already changes them; a fresh trainer resumed from it
    takes the same steps as the uninterrupted one, bit for bit, and an FSDP2 trainer resumed from
    it (DCP reshards the partition boxes into row shards) the same steps up to rounding."""
    from sbtrain.trainer.checkpoint import Checkpointer
    from tests.distributed.parallel_cases import build_case

    spec = {"model": "sb7b", "global_batch": 4, "micro_batch": 1, "seq_len": 16, "optim": "adamw",
            "engine": "deepspeed", "zero_stage": 3}
    trainer, data = build_case(spec)
    trainer.checkpointer = Checkpointer(directory, async_save=True)
    for _ in range(2):
        trainer.train_step(data.next_global_batch())
    trainer.step = 2  # (fit() counts steps; train_step does not)
    trainer.save_checkpoint()
    uninterrupted = [trainer.train_step(data.next_global_batch()).loss for _ in range(2)]
    trainer.checkpointer.wait()
    resumed, data2 = build_case(spec, seed=1, checkpoint_dir=directory)
    meta = resumed.maybe_resume("auto")
    after = [resumed.train_step(data2.next_global_batch()).loss for _ in range(2)]
    fsdp_spec = {k: v for k, v in spec.items() if k not in ("engine", "zero_stage")}
    fsdp, data3 = build_case(fsdp_spec, seed=2, checkpoint_dir=directory)  # FSDP2 row shards from the boxes
    fsdp.maybe_resume("auto")
    in_fsdp = [fsdp.train_step(data3.next_global_batch()).loss for _ in range(2)]
    return {"uninterrupted": uninterrupted, "resumed": after, "step": (meta["step"], resumed.step), "fsdp": in_fsdp}


def test_trainer_zero3_async_checkpoint_resumes_bit_exactly(tmp_path):
    for res in run_distributed(_trainer_zero3_async_resume, WORLD, str(tmp_path), timeout=180):
        assert res["step"] == (2, 2)
        assert res["resumed"] == res["uninterrupted"]
        assert res["fsdp"] == pytest.approx(res["uninterrupted"], rel=1e-5)  # another engine: rounding only


def _zero3_full_state(engine) -> dict:
    sd = engine.state_dict()  # full tensors: weights and momentum by name
    out = {f"model/{k}": v for k, v in sd["model"].items()}
    out.update({f"optim/{n}/{k}": v for n, st in sd["optim"]["state"].items() for k, v in st.items() if v.dim()})
    return out


def _zero3_save_at(directory: str) -> dict:
    from parallel.deepspeed_engine import DeepSpeedEngine
    from sbtrain.trainer.checkpoint import Checkpointer

    engine = DeepSpeedEngine(_model(), _sgd, zero_stage=3, clip_grad=CLIP)
    _train(engine, range(2))
    Checkpointer(directory).save(2, engine.checkpoint_state_dict(), {})
    return _zero3_full_state(engine)


def _zero3_load_at(directory: str) -> dict:
    from parallel.deepspeed_engine import DeepSpeedEngine
    from sbtrain.trainer.checkpoint import Checkpointer

    torch.manual_seed(3)
    engine = DeepSpeedEngine(build_model(_model_config()), _sgd, zero_stage=3, clip_grad=CLIP)
    state = engine.checkpoint_state_dict()
    Checkpointer(directory).load(state)
    engine.load_state_dict(state)
    return _zero3_full_state(engine)


def test_zero3_checkpoint_loads_at_another_world_size(tmp_path):
    """Partitions saved by 2 ranks, loaded into the partitions of 4 (other boxes): DCP reshards."""
    saved = run_distributed(_zero3_save_at, 2, str(tmp_path), timeout=180)[0]
    loaded = run_distributed(_zero3_load_at, 4, str(tmp_path), timeout=180)
    for rank, got in enumerate(loaded):
        assert got.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(got[key], value), f"rank {rank}: {key}"
