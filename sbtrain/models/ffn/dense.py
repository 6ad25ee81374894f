"""FFN kind ``dense``: the SwiGLU MLP (``models.layers.MLP``, HF names ``gate_proj`` / ``up_proj`` /
``down_proj``), every layer's FFN in a model without experts.

Tensor parallelism: gate / up column-parallel, down row-parallel (Megatron's MLP), the sequence
gathered at its input and reduce-scattered at its output under sequence parallelism.
"""

from __future__ import annotations

from pathlib import Path

from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from sbtrain.config.model import ConfigError, ModelConfig
from sbtrain.models.ffn.registry import FfnKind, register
from sbtrain.models.layers import MLP
from sbtrain.models.mixers.saved_bytes import Shapes, lin_in


def mlp_saved(s: Shapes, inter: int, tokens: int, input_counted: bool = False) -> int:
    """SwiGLU: the Linears' inputs, gate and up outputs (silu and the product save them), silu's
    output, the product (down_proj's input): four [tokens, inter] tensors."""
    x = 0 if (input_counted and s.a == 4) else lin_in(s, 2, s.d, tokens)
    return x + 4 * tokens * inter * s.a


def mlp_workspace(s: Shapes, inter: int, tokens: int) -> int:
    """The product's backward makes d(silu) and d(up) [tokens, inter] before the saved factors go."""
    return 2 * tokens * inter * s.a


def _activations(s: Shapes, cfg: ModelConfig) -> tuple[int, int]:
    # Without TP the FFN's fp32 input is the post-norm output: not saved again by the norm.
    return mlp_saved(s, s.inter, s.N), mlp_workspace(s, s.inter, s.N)


def _tensor_parallel(mlp: MLP, tp_mesh, residual) -> None:
    parallelize_module(mlp, tp_mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                      "down_proj": RowwiseParallel(output_layouts=residual)})
    parallelize_module(mlp, tp_mesh, PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)))


def _tp_split_dim(name: str) -> int | None:
    if name.startswith(("gate_proj.", "up_proj.")):
        return 0  # column-parallel: output features
    return 1 if name == "down_proj.weight" else None  # row-parallel: input features


def _tp_check(cfg: ModelConfig, tp: int) -> None:
    if cfg.intermediate_size % tp:
        raise ConfigError(
            f"model.intermediate_size={cfg.intermediate_size} is not divisible by parallel.tp={tp}: the dense FFN "
            f"is split by columns; choose parallel.tp dividing it"
        )


register(FfnKind(
    name="dense",
    summary="SwiGLU MLP: down(silu(gate(x)) * up(x))",
    build=lambda cfg, device=None, dtype=None: MLP(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype),
    tensor_parallel=_tensor_parallel,
    tp_split_dim=_tp_split_dim,
    activations=_activations,
    export_code=Path(__file__).parent / "hf" / "dense.py",
    tp_check=_tp_check,
))

__all__ = ["mlp_saved", "mlp_workspace"]
