"""Learning-rate schedules and weight-decay groups."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from sbtrain.config.train import NewParamsConfig, OptimConfig
from sbtrain.trainer.optim import apply_lr, build_optimizer, lr_at


def _cfg(**kw):
    base = {"lr": 1.0, "min_lr_ratio": 0.1, "schedule": "cosine", "warmup_steps": 4, "decay_fraction": 0.25}
    base.update(kw)
    return SimpleNamespace(**base)


def test_cosine_warmup_then_decay_to_floor():
    cfg = _cfg()
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))  # non-increasing after warmup
    assert lrs[4] == pytest.approx(1.0)
    mid = 4 + 8  # half-way through the cosine
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, 20, cfg) == pytest.approx(0.1)


def test_wsd_is_flat_then_linear():
    cfg = _cfg(schedule="wsd", warmup_steps=0)
    lrs = [lr_at(s, 100, cfg) for s in range(101)]
    assert all(v == 1.0 for v in lrs[:76])
    assert lrs[100] == pytest.approx(0.1)
    assert lrs[88] == pytest.approx(1.0 - 0.9 * (0.88 - 0.75) / 0.25)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="optim.schedule='cosin' is not known; use one of cosine, wsd"):
        lr_at(5, 10, _cfg(schedule="cosin"))


def test_no_decay_on_vectors_and_named_parameters():
    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(10, 4), "proj": torch.nn.Linear(4, 4)})
    cfg = OptimConfig(no_decay=["embed_tokens"], weight_decay=0.1, lr=1e-3)
    opt = build_optimizer(model, cfg)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model["proj"].weight)}


def test_new_parameters_get_their_own_schedule_and_a_frozen_body_phase():
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4), "gk_proj": torch.nn.Linear(4, 2)})
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant",
                      new_params=NewParamsConfig(patterns=["gk_proj"], lr=1e-2, warmup_steps=0, freeze_body_steps=2))
    opt = build_optimizer(model, cfg)
    roles = {id(p): g["role"] for g in opt.param_groups for p in g["params"]}
    assert roles[id(model["gk_proj"].weight)] == "new" and roles[id(model["proj"].weight)] == "body"
    lrs = []
    for step in range(5):
        body = apply_lr(opt, step, 10, cfg)
        by_role = {g["role"]: g["lr"] for g in opt.param_groups}
        lrs.append((body, by_role["body"], by_role["new"]))
    # Body frozen for 2 steps, then its own warmup (step 2 -> 3/4 of peak); new params at their peak at once.
    assert lrs[0] == (0.0, 0.0, 1e-2) and lrs[1] == (0.0, 0.0, 1e-2)
    assert lrs[2] == (pytest.approx(7.5e-4),) * 2 + (1e-2,) and lrs[4][:2] == (1e-3, 1e-3)
