"""DeepSpeed ZeRO-1/2/3 on 2 gloo ranks against one process on the same global batch.

The client optimizer is torch SGD with momentum (two param groups, weight decay on one): it is
linear in the gradient, so a wrong reduction (sum instead of mean, a rescaled loss, a missed
micro batch) shows up at full size in the parameters, and its momentum buffer is real optimizer
state for the checkpoint test. Clipping is on and active (the threshold is below the norm).
Each rank runs 2 micro batches per step through ``engine.module`` (as the trainer does): ZeRO-3
once kept only the last micro batch's gradient that way (norm 1.256 instead of 1.679 at step 0).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sbtrain.config.model import ModelConfig
from sbtrain.models.build import build_model
from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.distributed

STEPS, LR, CLIP, WORLD = 3, 0.5, 0.05, 2
ADAM_LR = 1e-2
SEQS, T, VOCAB = 4, 16, 64  # global batch: 4 sequences; each rank takes 2 as 2 micro batches


def _model_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, layer_pattern=["gla", "full"], sliding_window=8)


def _model():
    torch.manual_seed(0)
    return build_model(_model_config())


def _sgd(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.SGD([{"params": decay, "weight_decay": 0.01}, {"params": keep, "weight_decay": 0.0}],
                           lr=LR, momentum=0.9)


def _batches(step: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (SEQS, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, : 5 + step] = -100  # uneven token counts across ranks
    return [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(SEQS)]


def _reference(make_optimizer=_sgd, steps: int = STEPS, lr: float = LR) -> dict:
    """One process, the whole global batch, torch's clip_grad_norm_ and SGD (or ``make_optimizer``)."""
    model = _model()
    optim = make_optimizer(model)
    for group in optim.param_groups:
        group["lr"] = lr
    losses, norms, params = [], [], []
    for step in range(steps):
        mbs = _batches(step)
        tokens = sum(int((mb["labels"] != -100).sum()) for mb in mbs)
        loss = 0.0
        for mb in mbs:
            out = model(**mb)
            (out.loss_sum / tokens).backward()
            loss += float(out.loss_sum.detach()) / tokens
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss)
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return {"loss": losses, "norm": norms, "params": params}


def _train(engine, steps: range, lr: float = LR) -> dict:
    """The trainer's step on this rank's micro batches (objective = loss_sum * dp / global tokens)."""
    rank, dp = dist.get_rank(), dist.get_world_size()
    losses, norms, params = [], [], []
    for step in steps:
        mine = _batches(step)[rank * SEQS // dp : (rank + 1) * SEQS // dp]
        tokens = torch.tensor(float(sum(int((mb["labels"] != -100).sum()) for mb in mine)))
        dist.all_reduce(tokens)
        loss = torch.zeros(())
        for mb in mine:
            out = engine.module(**mb)
            engine.backward(out.loss_sum * dp / tokens)
            loss += out.loss_sum.detach()
        dist.all_reduce(loss)
        norm, stepped = engine.step(lr)
        assert stepped
        engine.zero_grad()
        losses.append(float(loss / tokens))
        norms.append(norm)
        params.append(engine.state_dict()["model"])
    return {"loss": losses, "norm": norms, "params": params}


def _zero_worker(stage: int) -> dict:
    from parallel.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(_model(), _sgd, zero_stage=stage, clip_grad=CLIP)
    return _train(engine, range(STEPS))


def _assert_close(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    for name, r in ref.items():
        delta = (got[name].double() - r.double()).abs().max().item()
        bound = 1e-5 * max(1.0, r.abs().max().item())
        assert delta <= bound, f"{what}: {name} differs by {delta:.3g} (bound {bound:.3g})"


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_single_process(stage, reference):
    assert min(reference["norm"]) > CLIP  # clipping is exercised on every step
    results = run_distributed(_zero_worker, WORLD, stage, timeout=180)
    for rank, res in enumerate(results):
        for step in range(STEPS):
            assert res["loss"][step] == pytest.approx(reference["loss"][step], rel=1e-5, abs=1e-6)
            assert res["norm"][step] == pytest.approx(reference["norm"][step], rel=1e-5)
            _assert_close(res["params"][step], reference["params"][step], f"ZeRO-{stage} rank {rank} step {step}")


def _checkpoint_worker(directory: str) -> dict:
    """ZeRO-2 trains 2 steps and saves through our DCP Checkpointer; a ZeRO-1 engine loads it and
    both take a third step: the same parameters prove weights and optimizer state round-trip."""
    from parallel.deepspeed_engine import DeepSpeedEngine
    from sbtrain.trainer.checkpoint import Checkpointer

    saver = DeepSpeedEngine(_model(), _sgd, zero_stage=2, clip_grad=CLIP)
    _train(saver, range(2))
    saved = saver.state_dict()
    Checkpointer(directory).save(2, saved, {})
    torch.manual_seed(1)  # a different init, so loading must overwrite every weight
    loader = DeepSpeedEngine(build_model(_model_config()), _sgd, zero_stage=1, clip_grad=CLIP)
    state = loader.state_dict()
    Checkpointer(directory).load(state)
    loader.load_state_dict(state)
    after_saver = _train(saver, range(2, 3))["params"][0]
    after_loader = _train(loader, range(2, 3))["params"][0]
    return {"saved": saved["model"], "after_saver": after_saver, "after_loader": after_loader}


def test_checkpoint_is_dcp_and_loads_elsewhere(tmp_path):
    from sbtrain.trainer.checkpoint import Checkpointer

    results = run_distributed(_checkpoint_worker, WORLD, str(tmp_path), timeout=180)
    res = results[0]
    _assert_close(res["after_loader"], res["after_saver"], "ZeRO-1 resumed from a ZeRO-2 checkpoint")
    # A plain model (no DeepSpeed, no process group) loads the DeepSpeed checkpoint.
    torch.manual_seed(2)
    plain = build_model(_model_config())
    state = {"model": {k: v.clone() for k, v in plain.state_dict().items()}}
    Checkpointer(tmp_path).load(state)
    plain.load_state_dict(state["model"])
    for name, value in plain.state_dict().items():
        assert torch.equal(value, res["saved"][name]), name


def test_validate_deepspeed_rejects_tp_and_ep():
    from parallel.deepspeed_engine import validate_deepspeed

    validate_deepspeed(3, cp=2)  # CP is more data ranks: fine
    with pytest.raises(ValueError, match="parallel.tp=2"):
        validate_deepspeed(2, tp=2)
    with pytest.raises(ValueError, match="parallel.ep=4"):
        validate_deepspeed(1, ep=4)
    with pytest.raises(ValueError, match="zero_stage=0"):
        validate_deepspeed(0)


def _adamw(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": keep, "weight_decay": 0.0}],
                             lr=ADAM_LR)


def _offload_worker(optimizer: str, steps: int) -> dict:
    from parallel.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(_model(), _sgd if optimizer == "sgd" else _adamw, zero_stage=2, offload_optimizer=True,
                             clip_grad=CLIP)
    inner = type(engine.optimizer.optimizer).__name__
    return {**_train(engine, range(steps), lr=LR if optimizer == "sgd" else ADAM_LR), "inner": inner}


def test_zero2_cpu_offload_matches_single_process(reference):
    """ZeRO-2 with the optimizer offloaded to the CPU, the client's torch SGD stepping on the CPU
    partitions: no C++ extension is built, so it runs in CI (2 steps, ~5 s)."""
    results = run_distributed(_offload_worker, WORLD, "sgd", 2, timeout=600)
    assert results[0]["inner"] == "SGD"
    for step in range(2):
        _assert_close(results[0]["params"][step], reference["params"][step], f"offload step {step}")


# The first use JIT-compiles DeepSpeed's cpu_adam C++ extension: 77 s measured on this 2-core box
# (g++ + ninja, cold cache), ~1 s from torch's extension cache afterwards; the test itself ~5 s.
# Worth it in CI: it is the trainer's real offload path (parallel.deepspeed.offload_optimizer).


@pytest.mark.slow
def test_zero2_cpu_offload_adamw_uses_cpu_adam():
    """The trainer's offload path: a torch AdamW becomes DeepSpeedCPUAdam with the same groups and
    hyperparameters; 2 steps equal torch's AdamW in one process."""
    results = run_distributed(_offload_worker, WORLD, "adamw", 2, timeout=600)
    assert results[0]["inner"] == "DeepSpeedCPUAdam"
    ref = _reference(_adamw, 2, ADAM_LR)
    for step in range(2):
        _assert_close(results[0]["params"][step], ref["params"][step], f"CPUAdam offload step {step}")
