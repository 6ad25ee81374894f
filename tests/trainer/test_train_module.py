"""The TrainModule's contract: one step calls its engine and components in a fixed order, normalises
by the global token count, and a new feature is a component, not an edit of the step.

Tiny float64 models on one process (the LM loss sum is fp32, hence bounds of 1e-6); the references
are computed here by hand.
"""

from __future__ import annotations

import pytest
import torch

from sbtrain.config.train import OptimConfig, TrainerConfig
from sbtrain.models import build_model
from sbtrain.trainer.components import ExpertBiasBalancing, SpikeSchedule, StepComponent
from sbtrain.trainer.engine import TorchEngine
from sbtrain.trainer.optim import build_optimizer
from sbtrain.trainer.train_module import TrainModule
from tests.models.helpers import recipe
from tests.trainer.test_observability import MOE, TINY, VOCAB, T

TCFG = TrainerConfig(global_batch_size=2, micro_batch_size=1, seq_len=T, max_steps=1)
OCFG = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", clip_grad=0.0)


def tiny(extra=(), name: str = "sb7b_tiny") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(recipe(name, [*TINY, *extra])).double()


def micro_batches(n: int = 2, seed: int = 0, ignore_first: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (1, T + 1), generator=gen)
        labels = tokens[:, 1:].clone()
        labels[:, :ignore_first] = -100
        out.append({"input_ids": tokens[:, :-1], "labels": labels})
    return out


class RecordingEngine(TorchEngine):
    """A TorchEngine that logs the protocol calls the step makes."""

    def __init__(self, model, optimizer):
        super().__init__(model, optimizer, clip_grad=0.0)
        self.calls: list[str] = []

    def set_gradient_sync(self, last):
        self.calls.append(f"sync={last}")

    def backward(self, objective):
        self.calls.append("backward")
        super().backward(objective)

    def step(self, set_lr, loss_finite, before_step):
        self.calls.append(f"step(finite={loss_finite})")
        return super().step(set_lr, loss_finite, before_step)


class Penalty(StepComponent):
    """A feature the step has never heard of: c * sum(p^2) added once per micro batch."""

    def __init__(self, model, c):
        self.model, self.c, self.events = model, c, []

    def on_step_start(self, step):
        self.events.append(("start", step))

    def objective(self, mb, out, scale, autocast):
        self.events.append("objective")
        return self.c * sum((p * p).sum() for p in self.model.parameters())

    def metrics(self, all_reduce, global_tokens):
        return {"penalty_tokens": global_tokens}

    def after_update(self, all_reduce):
        self.events.append("update")


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_step_calls_the_engine_in_order_and_normalises_by_global_tokens():
    model = tiny()
    engine = RecordingEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))
    module = TrainModule(engine)
    grads = {}
    batches = micro_batches(ignore_first=5)  # 11 target tokens each: 22 in the global batch
    stats = module.train_batch(batches, step=0, set_lr=lambda opt: None,
                               before_update=lambda: grads.update(_grads(model)))
    assert engine.calls == ["sync=False", "backward", "sync=True", "backward", "step(finite=True)"]
    assert stats.tokens == 22 and not stats.skipped
    # Reference: one forward over both sequences, token-sum / 22.
    reference = tiny()
    total = sum(reference(**mb).loss_sum for mb in batches) / 22
    total.backward()
    assert stats.loss == pytest.approx(total.item(), rel=1e-6)  # the loss sum is fp32
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-9)


def test_a_new_component_changes_the_step_without_touching_it():
    c = 1e-3
    model = tiny()
    penalty = Penalty(model, c)
    module = TrainModule(TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), clip_grad=0.0),
                         components=[penalty])
    grads = {}
    batches = micro_batches()
    stats = module.train_batch(batches, step=7, set_lr=lambda opt: None,
                               before_update=lambda: grads.update(_grads(model)))
    assert penalty.events == [("start", 7), "objective", "objective", "update"]
    assert stats.extra == {"penalty_tokens": 2 * T}
    reference = tiny()
    objective = sum(reference(**mb).loss_sum for mb in batches) / (2 * T)
    objective = objective + 2 * c * sum((p * p).sum() for p in reference.parameters())
    objective.backward()
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-9)


def test_a_non_finite_loss_skips_the_update_and_its_components():
    model = tiny()
    penalty = Penalty(model, 0.0)
    engine = RecordingEngine(model, torch.optim.SGD(model.parameters(), lr=1.0))
    module = TrainModule(engine, components=[penalty])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    before["lm_head.weight"][0, 0] = float("nan")
    stats = module.train_batch(micro_batches(), step=0, set_lr=lambda opt: None)
    assert stats.skipped and engine.calls[-1] == "step(finite=False)"
    assert "update" not in penalty.events
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], equal_nan=True)
    assert all(p.grad is None for p in model.parameters())


def test_build_gives_every_run_its_default_components():
    dense = TrainModule.build(tiny(), None, TCFG, OCFG)
    assert [type(c) for c in dense.components] == [SpikeSchedule]
    moe_model = tiny([*MOE, "model.moe.aux_free_balancing=true"], name="sb76b_tiny")
    moe = TrainModule.build(moe_model, build_optimizer(moe_model, OCFG), TCFG, OCFG)
    assert [type(c) for c in moe.components] == [SpikeSchedule, ExpertBiasBalancing]
    balancing = moe.components[1]
    bias = [layer.router.expert_bias.clone() for layer in balancing.layers]
    moe.train_batch(micro_batches(), step=0, set_lr=lambda opt: None)
    assert any(not torch.equal(b, layer.router.expert_bias) for b, layer in zip(bias, balancing.layers)), \
        "the expert bias follows the step's load"
