"""Checkpoint integrity at scale, on 4 gloo ranks with an FSDP2 model: each rank hashes the files
it wrote (save) and its share of the files (resume), never all of them, and a damaged shard that
only one rank reads makes every rank take the same decision: fall back together (auto resume) or
raise together (an explicit path), never a hang or a split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from sbtrain.trainer import checkpoint as C
from tests.distributed.harness import run_distributed
from tests.distributed.parallel_cases import build_case

pytestmark = pytest.mark.distributed

WORLD = 4
SPEC = {"model": "sb7b", "global_batch": 4, "micro_batch": 1, "seq_len": 16, "optim": "adamw"}


def _counting_sha256(counter: dict):
    real = C._sha256

    def counted(path: Path) -> str:
        counter["bytes"] += path.stat().st_size
        counter["files"].append(path.name)
        return real(path)

    return real, counted


def _save_resume_corrupt(directory: str) -> dict:
    rank = dist.get_rank()
    counter: dict = {"bytes": 0, "files": []}
    real, counted = _counting_sha256(counter)
    C._sha256 = counted
    out: dict = {}
    try:
        trainer, data = build_case(SPEC, checkpoint_dir=directory)
        trainer.train_step(data.next_global_batch())
        trainer.step = 1  # (fit() counts steps; train_step does not)
        trainer.save_checkpoint()  # step 1, synchronous: default group
        out["save_sync"] = counter["bytes"]
        counter.update(bytes=0, files=[])
        trainer.train_step(data.next_global_batch())
        trainer.step = 2
        trainer.checkpointer = C.Checkpointer(directory, async_save=True)  # step 2 on the async gloo group
        trainer.save_checkpoint()
        trainer.checkpointer.wait()
        out["save_async"] = counter["bytes"]
        counter.update(bytes=0, files=[])

        resumed, _ = build_case(SPEC, checkpoint_dir=directory)
        meta = resumed.maybe_resume("auto")
        out["resume"], out["resume_files"] = counter["bytes"], list(counter["files"])
        out["resumed_step"] = (meta["step"], resumed.step)
        counter.update(bytes=0, files=[])

        step2 = Path(directory) / "step_00000002"
        out["sizes"] = {f.name: f.stat().st_size for f in step2.iterdir() if f.name != "manifest.json"}
        dist.barrier()
        if rank == 0:  # damage the shard only rank 2 wrote, so only rank 2 hashes it on load
            shard = step2 / "__2_0.distcp"
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            shard.write_bytes(bytes(raw))
        dist.barrier()
        fallback, _ = build_case(SPEC, checkpoint_dir=directory)
        meta = fallback.maybe_resume("auto")
        out["fallback"] = (Path(meta["path"]).name, fallback.step)
        out["checked_bad_shard"] = "__2_0.distcp" in counter["files"]
        try:
            build_case(SPEC, checkpoint_dir=directory)[0].maybe_resume(str(step2))
            out["explicit"] = None
        except C.CheckpointError as exc:
            out["explicit"] = str(exc)
    finally:
        C._sha256 = real
    return out


def test_each_rank_hashes_its_share_and_a_bad_shard_is_a_joint_decision(tmp_path):
    results = run_distributed(_save_resume_corrupt, WORLD, str(tmp_path / "ckpt"), timeout=180)
    sizes = results[0]["sizes"]
    total, biggest = sum(sizes.values()), max(sizes.values())
    assert sum(1 for name in sizes if name.endswith(".distcp")) == WORLD  # one shard file per rank
    bound = total / WORLD + biggest
    for what in ("save_sync", "save_async", "resume"):
        per_rank = [r[what] for r in results]
        print(f"{what}: bytes hashed per rank {per_rank} (checkpoint {total} bytes, bound {bound:.0f})")
        assert max(per_rank) <= bound, (what, per_rank, bound)
        assert sum(per_rank) >= total  # every file hashed by someone
    # On resume every file is verified exactly once, by one rank, and each shard by its writer.
    files = sorted(f for r in results for f in r["resume_files"])
    assert files == sorted(sizes), files
    for rank, r in enumerate(results):
        assert f"__{rank}_0.distcp" in r["resume_files"]
        assert r["resumed_step"] == (2, 2)
        assert r["fallback"] == ("step_00000001", 1), f"rank {rank} took {r['fallback']}"
        assert r["explicit"] and "not usable" in r["explicit"] and "__2_0.distcp does not match" in r["explicit"]
        assert r["checked_bad_shard"] == (rank == 2)  # only rank 2 read it, yet all ranks fell back
