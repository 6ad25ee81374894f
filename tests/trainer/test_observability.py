"""Observability callbacks: each writes what it promises, checked against hand computations.

Tiny models (hidden 32, 2 layers, T=16) trained a few steps by a Trainer built directly; the
references are computed in the test from tensors captured by the test's own hooks.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException

from operators import ops, registry
from sbtrain.config.model import ConfigError
from sbtrain.config.observe import EvalObserveConfig, ObserveConfig, SlowRankConfig
from sbtrain.config.train import OptimConfig, TrainerConfig
from sbtrain.eval.callback import EvalCallback
from sbtrain.models import build_model
from sbtrain.models.ffn.moe import MoE
from sbtrain.models.spiking import SpikeInput
from sbtrain.trainer.callbacks import Callback, JSONLMetrics
from sbtrain.trainer.model_stats import group_of
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

T, VOCAB = 16, 64
TINY = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.head_dim=16", "model.intermediate_size=64", "model.sliding_window=8"]
MOE = ["model.layer_pattern=[hybrid_swa,hybrid_full]", "model.moe.dense_layers=[0]", "model.moe.capacity_factor=1.0", "model.hybrid.num_sink_tokens=2"]


class RandomData:
    """Seeded random tokens: two micro batches of one sequence per step; ``sleep_s`` per step
    imitates a slow data loader."""

    def __init__(self, seed: int = 0, sleep_s: float = 0.0):
        self.gen = torch.Generator().manual_seed(seed)
        self.sleep_s = sleep_s

    def _mb(self) -> dict:
        tokens = torch.randint(0, VOCAB, (1, T + 1), generator=self.gen)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def next_global_batch(self) -> list[dict]:
        time.sleep(self.sleep_s)
        return [self._mb(), self._mb()]

    def batches(self):  # validation split
        gen = torch.Generator().manual_seed(99)
        for _ in range(3):
            tokens = torch.randint(0, VOCAB, (2, T + 1), generator=gen)
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_trainer(model, callbacks, steps: int, data=None, valid=None) -> Trainer:
    tcfg = TrainerConfig(global_batch_size=2, micro_batch_size=1, seq_len=T, max_steps=steps)
    ocfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", clip_grad=1e-3)
    module = TrainModule.build(model, build_optimizer(model, ocfg), tcfg, ocfg)
    return Trainer(module=module, cfg=tcfg, optim_cfg=ocfg, train_data=data or RandomData(), valid_data=valid,
                   callbacks=callbacks)


def tiny(name: str, extra: list[str] = ()):
    torch.manual_seed(0)
    return build_model(recipe(name, [*TINY, *extra]))


def records(path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


class Capture(Callback):
    """Grabs the gradients where the stats callback reads them, and counts steps for the hooks."""

    def __init__(self):
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.step = 0

    def on_before_optimizer_step(self, trainer):
        self.grads[trainer.step + 1] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                        if p.grad is not None}

    def on_step_end(self, trainer, metrics):
        self.step = trainer.step


def test_grad_norms_and_gla_decay_match_hand_computation(tmp_path):
    model = tiny("sb7b_tiny")  # layer 0 GLA, layer 1 SWA
    capture = Capture()
    gates: list[tuple[int, torch.Tensor]] = []  # (step being run, gk_proj output)
    gla = model.model.layers[0].self_attn
    gla.gk_proj.register_forward_hook(lambda m, a, out: gates.append((capture.step + 1, out.detach().clone())))
    metrics = tmp_path / "metrics.jsonl"
    make_trainer(model, [JSONLMetrics(metrics), ModelStatsCallback(every=2), capture], steps=4).fit()

    stats = records(metrics, "model_stats")
    assert [r["step"] for r in stats] == [2, 4]
    for rec in stats:
        by_layer: dict[str, float] = {}
        for name, grad in capture.grads[rec["step"]].items():
            by_layer[group_of(name)] = by_layer.get(group_of(name), 0.0) + float(grad.double().pow(2).sum())
        assert set(rec["grad_norm"]) == {"embed_tokens", "layers.0", "layers.1", "norm", "lm_head"}
        for layer, sq in by_layer.items():
            assert rec["grad_norm"][layer] == pytest.approx(math.sqrt(sq), rel=1e-6)
        # taken before clipping (clip_grad=1e-3 clips every step): together they make the step's reported global norm
        (train,) = [r for r in records(metrics, "train") if r["step"] == rec["step"]]
        assert math.hypot(*rec["grad_norm"].values()) == pytest.approx(train["grad_norm"], rel=1e-6)

        outs = torch.cat([o.reshape(-1, o.shape[-1]) for s, o in gates if s == rec["step"]])
        assert outs.shape[0] == 2 * T  # both micro batches of that step
        # the model's own fp32 decay, averaged over the step's tokens in float64
        alpha_d = torch.exp(F.logsigmoid(outs.float()) / gla.gate_normalizer).double().mean(0).numpy()
        memory = 1.0 / (1.0 - alpha_d)
        decay = rec["gla_decay"]
        assert list(decay) == ["layers.0"]  # the SWA layer has no decay
        assert decay["layers.0"]["alpha_mean"] == pytest.approx(alpha_d.mean(), rel=1e-6)
        assert decay["layers.0"]["alpha_std"] == pytest.approx(alpha_d.std(), rel=1e-6)
        assert decay["layers.0"]["memory_mean"] == pytest.approx(memory.mean(), rel=1e-6)
        assert decay["layers.0"]["memory_median"] == pytest.approx(np.median(memory), rel=1e-6)
    assert len(gla.gk_proj._forward_hooks) == 1  # after the sampled steps only the test's own hook is left


def test_train_cli_wires_observe_overrides(dataset, tmp_path):
    from tests.trainer.e2e import run

    summary = run(dataset, tmp_path, "trainer.max_steps=2", "observe.model_stats.every=2",
                  "observe.profile.start_step=0", "observe.profile.num_steps=1", "observe.eval.every=2")
    assert summary["step"] == 2
    (evaluated,) = records(tmp_path / "metrics.jsonl", "eval")  # sbtrain.train passes eval_callback
    assert evaluated["step"] == 2 and evaluated["ppl"] > 1
    (stats,) = records(tmp_path / "metrics.jsonl", "model_stats")
    assert stats["step"] == 2 and set(stats["gla_decay"]) == {"layers.0"} and "layers.1" in stats["grad_norm"]
    (profile,) = records(tmp_path / "metrics.jsonl", "profile")
    assert profile["first_step"] == 1 and (tmp_path / "profile" / "trace_rank0.json").exists()


def test_moe_load_drop_rate_and_router_entropy(tmp_path):
    model = tiny("sb76b_tiny", MOE)  # layer 1 is MoE: 4 experts top-1, capacity factor 1 (drops)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE)
    router_inputs, counts = [], []
    moe.router.register_forward_hook(  # the input and the weight as the forward saw them (before the step)
        lambda m, a, out: router_inputs.append(a[0].detach().double() @ m.weight.detach().double().t()))
    moe.register_forward_hook(lambda m, a, out: counts.append(m.last_tokens_per_expert.clone()))
    metrics = tmp_path / "metrics.jsonl"
    make_trainer(model, [JSONLMetrics(metrics), ModelStatsCallback(every=1)], steps=1).fit()

    (rec,) = records(metrics, "model_stats")
    stats = rec["moe"]["layers.1"]
    total = torch.stack(counts).sum(0).double()
    assert sum(stats["load"]) == pytest.approx(1.0)
    assert stats["load"] == pytest.approx((total / total.sum()).tolist())
    cap = math.ceil(1.0 * T * 1 / 4)  # capacity per micro batch: ceil(cf * N * k / E)
    dropped = sum(int((c - cap).clamp(min=0).sum()) for c in counts)
    assert stats["drop_rate"] == pytest.approx(dropped / float(total.sum()))
    probs = torch.cat(router_inputs).softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert stats["router_entropy"] == pytest.approx(float(entropy), rel=1e-5)
    assert 0 < stats["router_entropy"] <= math.log(4)


def test_spike_rates_are_one_minus_zero_fraction(tmp_path):
    model = tiny("sb7b_tiny", ["model.spike.mode=train"])
    seen: dict[str, list[float]] = {}  # layer -> [zeros, total] of the spiked inputs

    def after_spike(name):
        def hook(module, args):  # registered after the spiking hook: sees the spiked input
            acc = seen.setdefault(group_of(name), [0.0, 0.0])
            acc[0] += float((args[0] == 0).sum())
            acc[1] += args[0].numel()
        return hook

    spiked = [(n, m) for n, m in model.named_modules()
              if any(isinstance(h, SpikeInput) for h in m._forward_pre_hooks.values())]
    assert spiked
    for name, module in spiked:
        module.register_forward_pre_hook(after_spike(name))
    metrics = tmp_path / "metrics.jsonl"
    make_trainer(model, [JSONLMetrics(metrics), ModelStatsCallback(every=1)], steps=1).fit()

    (rec,) = records(metrics, "model_stats")
    assert set(rec["spike_rate"]) == set(seen) == {"layers.0", "layers.1"}
    for layer, (zeros, total) in seen.items():
        assert rec["spike_rate"][layer] == pytest.approx(1.0 - zeros / total)
    assert all(0 < r < 1 for r in rec["spike_rate"].values())
    assert all(h.recorder is None for _, m in spiked for h in m._forward_pre_hooks.values()
               if isinstance(h, SpikeInput))  # the recorder is detached after the sampled step


def test_profiler_trace_names_op_and_backend(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    profiler = ProfilerCallback(start_step=1, num_steps=1, directory=tmp_path / "prof")
    make_trainer(tiny("sb7b_tiny"), [JSONLMetrics(metrics), profiler], steps=3).fit()

    assert registry.PROFILING is False  # the window closed
    trace = json.loads((tmp_path / "prof" / "trace_rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    expected = f"sbtrain::gla[{ops.gla.select(*_gla_args()).name}]"
    assert expected in names
    assert any(n.startswith("sbtrain::linear_cross_entropy[") for n in names)
    (rec,) = records(metrics, "profile")
    assert rec["first_step"] == 2 and rec["step"] == 2


def _gla_args():
    q = torch.rand(2, T, 2, 16)
    kv = torch.rand(2, T, 1, 16)
    return q, kv, kv, -torch.rand(2, T, 1, 16)


def test_registry_names_backends_only_while_profiling():
    args = _gla_args()

    def range_names() -> set:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops.gla(*args)
        return {e.name for e in prof.events() if e.name.startswith("sbtrain::")}

    assert range_names() == set()  # off: no record_function on the dispatch path
    registry.set_profiling(True)
    try:
        assert range_names() == {f"sbtrain::gla[{ops.gla.select(*args).name}]"}
    finally:
        registry.set_profiling(False)


SLEEP_S = 0.5  # rank 1's data loader per step: well above a tiny step's compute even on a loaded machine


def _slow_rank_worker(model_cfg, metrics_path: str) -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    rank = dist.get_rank()
    detector = SlowRankDetector(every=2, factor=1.5)
    trainer = make_trainer(build_model(model_cfg), [JSONLMetrics(metrics_path), detector], steps=2,
                           data=RandomData(seed=rank, sleep_s=SLEEP_S if rank == 1 else 0.0))
    trainer.fit()
    return detector.last


def test_slow_rank_detector_names_the_sleeping_rank(tmp_path):
    from tests.distributed.harness import run_distributed

    metrics = tmp_path / "metrics.jsonl"
    results = run_distributed(_slow_rank_worker, 2, recipe("sb7b_tiny", TINY), str(metrics))
    for last in results:
        assert last["slowest_rank"] == 1 and last["slow"]
        # rank 0 waited for rank 1 in the token-count all-reduce: that wait is not its busy time
        assert last["busy_s"][1] >= SLEEP_S > last["busy_s"][0] / 2
    (rec,) = records(metrics, "slow_rank")  # rank 0 writes it once
    assert rec["slowest_rank"] == 1 and rec["step"] == 2


def _fsdp_stats_worker(spec: dict) -> dict:
    from tests.distributed.parallel_cases import build_case

    trainer, _ = build_case(spec)
    stats = ModelStatsCallback(every=1)
    trainer.callbacks.append(stats)  # on every rank: it joins the collectives
    trainer.fit()
    return stats.last


def test_model_stats_under_fsdp_equal_single_process():
    """2 ranks, FSDP-sharded (DTensor) gradients, each rank half the global batch: the per-layer
    norms, decay, loads and entropies describe the whole batch, as one process computes them."""
    from tests.distributed.harness import run_distributed

    spec = {"model": "sb76b", "global_batch": 4, "micro_batch": 1, "seq_len": 8, "steps": 1}
    reference = _fsdp_stats_worker(spec)
    for got in run_distributed(_fsdp_stats_worker, 2, spec):
        assert set(got["grad_norm"]) == set(reference["grad_norm"])
        for layer, norm in reference["grad_norm"].items():
            assert got["grad_norm"][layer] == pytest.approx(norm, rel=1e-4)
        for layer, moe in reference["moe"].items():
            assert got["moe"][layer]["load"] == pytest.approx(moe["load"], abs=1e-12)
            assert got["moe"][layer]["router_entropy"] == pytest.approx(moe["router_entropy"], rel=1e-5)
        for layer, decay in reference["gla_decay"].items():
            assert got["gla_decay"][layer] == pytest.approx(decay, rel=1e-5)


def test_eval_callback_records_ppl_of_validation_windows(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    data = RandomData()
    model = tiny("sb7b_tiny")
    callback = EvalCallback(every=2, loss_by_position=True, max_batches=2)
    make_trainer(model, [JSONLMetrics(metrics), callback], steps=2, valid=data).fit()

    # by hand, on the model as it was at step 2 (the last step): exp(summed token loss / tokens)
    model.eval()
    with torch.no_grad():
        outs = [model(input_ids=mb["input_ids"], labels=mb["labels"]) for mb in list(data.batches())[:2]]
    loss = sum(float(o.loss_sum) for o in outs) / sum(int(o.num_tokens) for o in outs)
    (rec,) = records(metrics, "eval")
    assert rec["step"] == 2 and rec["eval_tokens"] == 2 * 2 * T
    assert rec["loss"] == pytest.approx(loss, rel=1e-5)
    assert rec["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    buckets = rec["loss_by_position"]
    assert sum(b["tokens"] for b in buckets) == 2 * 2 * T
    assert sum(b["nll_sum"] for b in buckets) == pytest.approx(loss * 2 * 2 * T, rel=1e-5)


def test_observe_config_typos_and_bad_values_are_errors(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from sbtrain.cli.app import RECIPES_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="evry"):
            compose("train", overrides=["observe.model_stats.evry=2"])
        cfg = compose("train", overrides=["observe.model_stats.every=2", "observe.slow_rank.every=5"])
    observe = OmegaConf.to_object(cfg.observe)
    kinds = [type(cb) for cb in build_observability(observe, tmp_path)]
    assert kinds == [ModelStatsCallback, SlowRankDetector]
    assert build_observability(ObserveConfig(), tmp_path) == []  # everything off by default
    with pytest.raises(ConfigError, match="observe.slow_rank.factor"):
        ObserveConfig(slow_rank=SlowRankConfig(factor=0.5)).validate()
    with pytest.raises(ConfigError, match="observe.model_stats.every=-1"):
        build_observability(ObserveConfig(model_stats=type(observe.model_stats)(every=-1)), tmp_path)
    # observe.eval: the eval room is above the trainer, so the caller hands the callback class in.
    evaluating = ObserveConfig(eval=EvalObserveConfig(every=3, loss_by_position=True))
    (callback,) = build_observability(evaluating, tmp_path, eval_batches=2, eval_callback=EvalCallback)
    assert isinstance(callback, EvalCallback)
    assert (callback.every, callback.ppl, callback.by_position, callback.max_batches) == (3, True, True, 2)
    with pytest.raises(ValueError, match="eval_callback=sbtrain.eval.callback.EvalCallback"):
        build_observability(evaluating, tmp_path)
