"""Asynchronous checkpoints on 2 gloo ranks: the background save's collectives never touch a
group the training loop uses, DTensor shards stay sharded, errors reach ``wait()``, and a run
that checkpoints asynchronously every step, stopped and resumed, equals the uninterrupted run
bit for bit (losses, final parameters and optimizer state)."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor

from sbtrain.trainer import checkpoint as C
from tests.distributed.harness import run_distributed
from tests.distributed.parallel_cases import build_case

pytestmark = pytest.mark.distributed

SPEC = {"model": "sb7b", "global_batch": 4, "micro_batch": 1, "seq_len": 16, "optim": "adamw"}
# Every c10d collective, wrapped under both names (DCP calls ``dist.X``; c10d's own object
# collectives call the module-level functions), and the functional collectives DTensor uses.
C10D = ["barrier", "monitored_barrier", "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
        "gather", "gather_object", "scatter", "scatter_object_list", "broadcast", "broadcast_object_list", "reduce",
        "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend",
        "irecv", "batch_isend_irecv"]
FUNCOL = ["all_reduce", "all_gather_tensor", "all_gather_tensor_autograd", "reduce_scatter_tensor",
          "reduce_scatter_tensor_autograd", "all_to_all_single", "all_to_all_single_autograd", "broadcast",
          "all_reduce_coalesced", "all_gather_into_tensor_coalesced", "permute_tensor"]


def _spy(calls: list) -> list:
    """Record (thread name, collective, group) of every collective; returns the undo list."""
    undo = []
    c10d = dist.distributed_c10d
    for module, names in ((c10d, C10D), (dist, C10D), (funcol, FUNCOL)):
        for name in names:
            real = getattr(module, name, None)
            if real is None:
                continue
            sig = inspect.signature(real)

            @functools.wraps(real)
            def wrapper(*args, _real=real, _sig=sig, _name=f"{module.__name__}.{name}", **kwargs):
                bound = _sig.bind(*args, **kwargs)
                bound.apply_defaults()
                calls.append((threading.current_thread().name, _name, bound.arguments.get("group")))
                return _real(*args, **kwargs)

            setattr(module, name, wrapper)
            undo.append((module, name, real))
    return undo


def _collectives_during_async_save(directory: str) -> dict:
    trainer, data = build_case(SPEC, checkpoint_dir=None)
    trainer.train_step(data.next_global_batch())  # FSDP2 parameters and AdamW state: DTensors
    state = trainer.state_dict()
    flat = C.flatten(state)
    dtensors = {k: v for k, v in flat.items() if isinstance(v, DTensor)}
    for key, value in dtensors.items():  # the snapshot keeps the sharded layout, in its own memory
        copy = C.snapshot(value)
        assert isinstance(copy, DTensor), key
        assert copy.placements == value.placements and copy.device_mesh == value.device_mesh, key
        assert copy.to_local().untyped_storage().data_ptr() != value.to_local().untyped_storage().data_ptr(), key
        assert torch.equal(copy.to_local(), value.to_local()), key
    expected = {k: v.to_local().clone() for k, v in dtensors.items()}
    ck = C.Checkpointer(directory, async_save=True)
    group, world = C.async_group(), dist.distributed_c10d._get_default_group()

    # 1. Every collective the saver thread issues, recorded and checked here on every rank (a
    # wrong group fails both ranks alike, with this message, instead of hanging in step 2).
    calls: list = []
    undo = _spy(calls)
    try:
        ck.save(1, state, {"note": "async"})
        ck.wait()
    finally:
        for module, name, real in undo:
            setattr(module, name, real)
    saver = [(name, "checkpoint" if g is group else "default" if g in (None, world) else repr(g))
             for thread, name, g in calls if thread == C.ASYNC_THREAD_NAME]
    names = {name.rsplit(".", 1)[-1] for name, _ in saver}
    # Non-empty, or the spy would prove nothing: the checkpoint's barriers and DCP's plan exchange.
    assert {"barrier", "gather_object", "scatter_object_list"} <= names, names
    wrong = [(name, g) for name, g in saver if g != "checkpoint" or name.startswith(funcol.__name__)]
    assert not wrong, f"the background save issued collectives outside its own group: {wrong}"

    # 2. The training loop goes on with default-group collectives while a save runs, the ranks
    # issuing them at different moments relative to the saver's. (With the saver on the default
    # group, as before, this deadlocked: measured, both ranks stuck until the timeout.)
    ck.save(2, state, {"note": "async"})
    if dist.get_rank() == 1:
        time.sleep(0.05)
    for _ in range(20):
        dist.all_reduce(torch.ones(4))
    trainer.train_step(data.next_global_batch())  # changes every tensor the save snapshotted
    ck.wait()

    # What the checkpoint wrote is the snapshot, not the state after the next step.
    after = trainer.state_dict()
    meta = C.Checkpointer(directory).load(after)
    loaded = {k: v.to_local() for k, v in C.flatten(after).items() if k in expected}
    chunks = dist.checkpoint.FileSystemReader(str(Path(directory) / "step_00000002")).read_metadata()
    return {
        "group_ranks": dist.get_process_group_ranks(group),
        "group_backend": dist.get_backend(group),
        "is_world": group is world,
        "n_dtensors": len(dtensors),
        "restored": all(torch.equal(loaded[k], v) for k, v in expected.items()),
        "meta": (meta["step"], meta["note"]),
        "chunks": {k: len(m.chunks) for k, m in chunks.state_dict_metadata.items() if k in expected},
    }


def _async_error_reaches_wait(directory: str) -> dict:
    ck = C.Checkpointer(directory, async_save=True)
    ck.save(1, {"w": torch.ones(3)}, {})
    ck.wait()  # before the patch below: the first save must not see it
    real = C.dcp.save

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    C.dcp.save = disk_full
    try:
        ck.save(2, {"w": torch.full((3,), 2.0)}, {})
        try:
            ck.wait()
            raised = None
        except C.CheckpointError as exc:
            raised = str(exc)
        ck.wait()  # reported once
    finally:
        C.dcp.save = real
    latest = (Path(directory) / "latest").read_text().strip()
    state = {"w": torch.zeros(3)}
    C.Checkpointer(directory).load(state)
    ck.save(3, {"w": torch.full((3,), 3.0)}, {})  # the group is still usable afterwards
    ck.wait()
    return {"raised": raised, "latest": latest, "loaded": state["w"].tolist(),
            "after": (Path(directory) / "latest").read_text().strip()}


def test_async_save_collectives_use_only_the_checkpoint_group(tmp_path):
    got = run_distributed(_collectives_during_async_save, 2, str(tmp_path / "ckpt"), timeout=60)
    for out in got:
        assert out["group_ranks"] == [0, 1] and out["group_backend"] == "gloo" and not out["is_world"]
        assert out["n_dtensors"] > 10 and out["restored"] and out["meta"] == (2, "async")
        assert set(out["chunks"].values()) == {2}, "DTensor shards must be written as the sharded layout"


def test_async_save_error_is_raised_by_wait_and_previous_stays_latest(tmp_path):
    for out in run_distributed(_async_error_reaches_wait, 2, str(tmp_path / "ckpt"), timeout=60):
        assert out["raised"] and "No space left on device" in out["raised"]
        assert out["latest"] == "step_00000001" and out["loaded"] == [1.0, 1.0, 1.0]
        assert out["after"] == "step_00000003"


# -- end to end: the real training command, async checkpoint every step, dp=2 (FSDP) ------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from sbtrain.config.data import DataConfig, TokenizerConfig
    from sbtrain.data import build_indexed_dataset
    from tests.corpus import make_docs, write_jsonl

    root = tmp_path_factory.mktemp("async_ckpt_corpus")
    write_jsonl(root / "docs.jsonl", make_docs(400, seed=3))
    build_indexed_dataset(DataConfig(paths=[str(root / "docs.jsonl")], output=str(root / "ds")),
                          TokenizerConfig(kind="train_bpe", vocab_size=300))
    return str(root / "ds")


ASYNC = ["trainer.max_steps=20", "checkpoint.async_save=true", "checkpoint.every=1", "trainer.log_every=1"]


def _full_and_resumed(dataset: str, root: str) -> dict:
    from tests.trainer.e2e import run

    threads: list[str] = []  # proof that the command's saves did run in the background thread
    real = C.Checkpointer._save_guarded

    def counted(self, *args):
        threads.append(threading.current_thread().name)
        return real(self, *args)

    C.Checkpointer._save_guarded = counted
    try:
        full = run(dataset, Path(root) / "full", *ASYNC)
        first = run(dataset, Path(root) / "split", *ASYNC, "trainer.exit_at_step=10")
        second = run(dataset, Path(root) / "split", *ASYNC)
    finally:
        C.Checkpointer._save_guarded = real
    return {"summaries": [full, first, second], "threads": threads}


def _tensors(step_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert C.verify(step_dir) is None, step_dir
    out = tmp / f"{step_dir.parent.parent.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    return torch.load(out, weights_only=True)


def test_async_checkpoint_every_step_resumes_bit_exactly_at_dp2(dataset, tmp_path):
    from tests.trainer.e2e import losses

    out = run_distributed(_full_and_resumed, 2, dataset, str(tmp_path), timeout=300)
    assert all(o["threads"] == [C.ASYNC_THREAD_NAME] * 40 for o in out)  # 20 + 10 + 10 saves, all async
    full, first, second = out[0]["summaries"]
    assert first["stopped_by"] == "exit_at_step" and first["step"] == 10
    assert second["resumed_from"].endswith("step_00000010") and second["step"] == full["step"] == 20
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert list(a) == list(range(1, 21)) and a == b  # exact equality, fp32 on CPU
    for run_dir in ("full", "split"):
        ckpts = tmp_path / run_dir / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == [
            "latest", "step_00000018", "step_00000019", "step_00000020"]  # keep_last=3, no temp dirs
        assert (ckpts / "latest").read_text().strip() == "step_00000020"
    ref = _tensors(tmp_path / "full" / "checkpoints" / "step_00000020", tmp_path)
    got = _tensors(tmp_path / "split" / "checkpoints" / "step_00000020", tmp_path)
    assert ref.keys() == got.keys() and any(k.startswith("optim/") for k in ref)
    saved = dist.checkpoint.FileSystemReader(str(tmp_path / "split" / "checkpoints" / "step_00000020")).read_metadata()
    assert max(len(m.chunks) for m in saved.state_dict_metadata.values() if hasattr(m, "chunks")) == 2  # FSDP shards
    for key, value in ref.items():
        assert torch.equal(value, got[key]), f"{key} differs between the uninterrupted and the resumed run"
