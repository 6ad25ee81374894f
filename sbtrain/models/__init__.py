"""The model zoo: Transformer (qwen2), inter-layer hybrid GLA/SWA (sb7b), intra-layer parallel
hybrid with MoE (sb76b). Build with :func:`build_model`; configs live in ``recipes/model``."""

from sbtrain.models.build import build_model, count_parameters, init_weights, materialize, to_model_config
from sbtrain.models.cache import DecodeCache
from sbtrain.models.generate import decode_step, generate, prefill
from sbtrain.models.model import CausalLM, CausalLMOutput

__all__ = [
    "CausalLM", "CausalLMOutput", "DecodeCache", "build_model", "count_parameters", "decode_step",
    "generate", "init_weights", "materialize", "prefill", "to_model_config",
]
