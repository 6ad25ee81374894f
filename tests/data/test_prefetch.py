"""data.prefetch: batches built in a background thread are the batches of the plain loader, the state
describes what training consumed (not what was built ahead), and a resume or seek drops what was built."""

from __future__ import annotations

import threading

import pytest
import torch

from sbtrain.data import PackedLoader
from sbtrain.data.prefetch import PrefetchLoader
from tests.data.test_cursor import dataset  # noqa: F401  (module fixture: 300 documents, no tokenizer)

KW = {"seq_len": 32, "global_batch_size": 8, "micro_batch_size": 2, "seed": 3, "shuffle_window": 6,
      "document_boundaries": True}


def _steps(loader, n: int) -> list[list[dict]]:
    return [loader.next_global_batch() for _ in range(n)]


def _same(a: list[list[dict]], b: list[list[dict]]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(mx.keys() == my.keys() and all(torch.equal(mx[k], my[k]) for k in mx)
                                 for mx, my in zip(x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("dp", [(0, 1), (1, 2)])
def test_prefetch_gives_the_plain_loader_batches(dataset, depth, dp):  # noqa: F811
    rank, size = dp
    plain = _steps(PackedLoader([dataset], dp_rank=rank, dp_size=size, **KW), 9)
    pre = PrefetchLoader(PackedLoader([dataset], dp_rank=rank, dp_size=size, **KW), depth)
    try:
        assert _same(_steps(pre, 9), plain)
    finally:
        pre.close()


def test_state_counts_consumed_batches_and_resume_is_exact(dataset):  # noqa: F811
    reference = PackedLoader([dataset], **KW)
    straight = _steps(reference, 10)
    pre = PrefetchLoader(PackedLoader([dataset], **KW), depth=2)
    try:
        first = _steps(pre, 4)
        while pre._queue.qsize() < 2:  # let the thread run ahead: 2 built batches queued (a third may be in hand)
            threading.Event().wait(0.01)
        assert pre.loader.samples_consumed >= 6 * KW["global_batch_size"]  # the inner loader is ahead ...
        state = pre.state_dict()
        assert state["samples_consumed"] == pre.samples_consumed == 4 * KW["global_batch_size"]  # ... the state not
        plain = PackedLoader([dataset], **KW)
        for _ in range(4):
            plain.next_global_batch()
        assert state == plain.state_dict()
        resumed = PrefetchLoader(PackedLoader([dataset], **KW), depth=2)
        resumed.load_state_dict(state)
        assert _same(first + _steps(resumed, 6), straight)
        resumed.close()
        # A seek on the running loader drops the batches it built ahead and rewinds to the state.
        _steps(pre, 2)
        pre.load_state_dict(state)
        assert pre.state_dict() == state
        assert _same(_steps(pre, 6), straight[4:])
    finally:
        pre.close()


def test_new_stage_through_the_prefetcher(dataset):  # noqa: F811
    pre = PrefetchLoader(PackedLoader([dataset], **KW), depth=2)
    _steps(pre, 3)
    state = pre.state_dict()
    pre.close()
    a, b = PackedLoader([dataset], **{**KW, "seq_len": 16}), PrefetchLoader(PackedLoader([dataset], **{**KW, "seq_len": 16}), 1)
    a.load_state_dict(state)
    b.load_state_dict(state)
    assert b.stage == 1 and b.total_samples == 24
    assert _same(_steps(b, 4), _steps(a, 4))
    assert b.state_dict() == a.state_dict() and b.progress() == a.progress()
    b.close()


class SlowSource:
    """A fake loader whose batches take long to build; it records when a build starts and what the caller holds."""

    def __init__(self):
        self.n = 0
        self.started = [threading.Event() for _ in range(8)]
        self.release = [threading.Event() for _ in range(8)]

    def state_dict(self) -> dict:
        return {"samples_consumed": self.n}

    def load_state_dict(self, state, new_stage=None) -> None:
        self.n = state["samples_consumed"]

    def next_global_batch(self) -> list[dict]:
        i = self.n
        self.started[i].set()
        assert self.release[i].wait(10), "the test never released this batch"
        self.n += 1
        return [{"input_ids": torch.full((1, 4), i)}]


def test_the_next_batch_is_built_while_the_consumer_is_busy():
    src = SlowSource()
    pre = PrefetchLoader(src, depth=1, pin_memory=False)
    try:
        src.release[0].set()
        batch0 = pre.next_global_batch()
        assert int(batch0[0]["input_ids"][0, 0]) == 0 and pre.state_dict() == {"samples_consumed": 1}
        # The consumer is now "running a step" and has not asked for batch 1: the thread is building it anyway.
        assert src.started[1].wait(10)
        src.release[1].set()
        # With depth 1 batch 1 waits in the queue and batch 2 is being built; the state is still after batch 0.
        assert src.started[2].wait(10)
        assert pre.state_dict() == {"samples_consumed": 1} and src.n == 2
        assert int(pre.next_global_batch()[0]["input_ids"][0, 0]) == 1
        assert pre.state_dict() == {"samples_consumed": 2}
    finally:
        for e in src.release:
            e.set()
        pre.close()


def test_an_error_in_the_thread_reaches_the_consumer():
    class Broken(SlowSource):
        def next_global_batch(self):
            raise RuntimeError("disk gone")

    pre = PrefetchLoader(Broken(), depth=1, pin_memory=False)
    with pytest.raises(RuntimeError, match="disk gone"):
        pre.next_global_batch()


def test_config_knob(tmp_path):
    from sbtrain.config.data import DataConfig
    from sbtrain.config.model import ConfigError

    assert DataConfig().prefetch == 2
    with pytest.raises(ConfigError, match="data.prefetch"):
        DataConfig(prefetch=-1).validate()


def test_pinning_happens_in_the_thread_when_asked(monkeypatch):
    """CUDA-less here: pin_memory is replaced by a marker. With pin_memory=None (the default) a process that has
    not initialised CUDA pins nothing."""
    pinned = []

    def fake_pin(self):
        pinned.append(threading.current_thread().name)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    for pin, calls in ((True, ["sbtrain-prefetch"]), (None, [])):
        pinned.clear()
        src = SlowSource()
        src.release[0].set()
        pre = PrefetchLoader(src, depth=1, pin_memory=pin)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no device to set in the thread
        assert int(pre.next_global_batch()[0]["input_ids"][0, 0]) == 0
        for e in src.release:
            e.set()
        pre.close()
        assert pinned[:1] == calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_on_cuda(dataset):  # noqa: F811
    """Once CUDA is initialised (as the trainer does before its first batch) batches come pinned, and a
    non-blocking copy to the device gives the plain loader's tensors."""
    torch.cuda.init()
    plain = _steps(PackedLoader([dataset], **KW), 4)
    pre = PrefetchLoader(PackedLoader([dataset], **KW), depth=2)
    try:
        got = _steps(pre, 4)
    finally:
        pre.close()
    assert all(t.is_pinned() for step in got for mb in step for t in mb.values())
    on_device = [[{k: v.to("cuda", non_blocking=True) for k, v in mb.items()} for mb in step] for step in got]
    torch.cuda.synchronize()
    assert _same([[{k: v.cpu() for k, v in mb.items()} for mb in step] for step in on_device], plain)
