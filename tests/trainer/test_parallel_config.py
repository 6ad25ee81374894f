"""Layout validation runs before anything is built and names the bad value and the fix."""

from __future__ import annotations

import pytest

from sbtrain.config.model import ConfigError
from sbtrain.config.parallel import DeepSpeedConfig, ParallelConfig, validate_parallel
from sbtrain.config.train import TrainerConfig
from tests.distributed.parallel_cases import model_config


def _validate(world=4, model="sb76b", trainer=None, **parallel):
    tcfg = TrainerConfig(**{"global_batch_size": 8, "micro_batch_size": 1, "seq_len": 64, "max_steps": 1,
                            **(trainer or {})})
    return validate_parallel(ParallelConfig(**parallel), world, model_config(model), tcfg)


def test_dp_shard_fills_the_world_and_ep_borrows_from_it():
    dims = _validate(world=8, cp=2, ep=2)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.ep) == (1, 4, 2, 1, 2)
    assert dims.dp == 4 and dims.grad_reduce_size == 8


@pytest.mark.parametrize("kwargs,message", [
    ({"dp_shard": 3}, r"1\*3\*1\*1 = 3 but the world size is 4"),
    ({"cp": 3}, r"world size 4 is not divisible by parallel.dp_replicate\*cp\*tp"),
    ({"tp": 4}, r"num_key_value_heads=2 is not divisible by parallel.tp=4.*repeated"),
    ({"cp": 2, "trainer": {"seq_len": 31}}, r"trainer.seq_len=31 must be divisible by parallel.cp\*tp = 2\*1"),
    ({"ep": 4, "dp_shard": 2, "cp": 2}, r"parallel.ep=4 borrows its ranks from parallel.dp_shard=2"),
    ({"world": 3, "ep": 3}, r"parallel.ep=3 must divide the routed experts \(model.moe.num_experts=4\)"),
    ({"world": 2, "ep": 2, "model": "sb7b"}, r"needs a Mixture-of-Experts model"),
    ({"trainer": {"micro_batch_size": 3}}, r"global_batch_size=8 must be a multiple of trainer.micro_batch_size=3"),
    ({"engine": "megatron"}, r"parallel.engine='megatron' is unknown"),
    ({"cp_linear": "ring"}, r"parallel.cp_linear='ring' is unknown"),
    ({"tp": 2, "ep": 2, "dp_shard": 2}, r"tp=2 with parallel.ep=2 is not supported"),
    ({"engine": "deepspeed", "tp": 2}, r"parallel.tp=2 with parallel.engine=deepspeed"),
    ({"engine": "deepspeed", "dp_replicate": 2}, r"deepspeed has no replicate dimension"),
    ({"deepspeed": DeepSpeedConfig(accelerator="tpu")}, r"parallel.deepspeed.accelerator='tpu' is unknown"),
])
def test_bad_layouts_are_rejected_with_the_fix(kwargs, message):
    kwargs = dict(kwargs)
    world, model, trainer = kwargs.pop("world", 4), kwargs.pop("model", "sb76b"), kwargs.pop("trainer", None)
    with pytest.raises(ConfigError, match=message):
        _validate(world=world, model=model, trainer=trainer, **kwargs)
