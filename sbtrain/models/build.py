"""Build a model from its config (on the meta device for full sizes), initialise it, count it."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sbtrain.config.model import ModelConfig
from sbtrain.models.ffn import ffn_kind
from sbtrain.models.layers import RMSNorm
from sbtrain.models.model import CausalLM
from sbtrain.models.spiking import apply_spiking


def to_model_config(cfg: ModelConfig | DictConfig | dict) -> ModelConfig:
    """A validated :class:`ModelConfig` from a dataclass, a Hydra node or a plain dict."""
    if isinstance(cfg, ModelConfig):
        return cfg.validate()
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is ModelConfig:
        return OmegaConf.to_object(cfg).validate()
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, cfg)  # unknown keys raise here, naming the key
    return OmegaConf.to_object(merged).validate()


def build_model(cfg: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CausalLM:
    """The model on ``device``; real devices get :func:`init_weights`, ``meta`` allocates nothing.

    The init seed is drawn from the global RNG here, on every device (``model.init_seed``), so a
    meta build materialised later (:func:`materialize`, or sharded by
    :func:`sbtrain.trainer.distributed.build_parallel_model`) gets the same weights as a direct
    build made at the same RNG state."""
    model_cfg = to_model_config(cfg)
    # Drawn before construction: nn.Linear's own reset_parameters consumes the global RNG on a
    # real device and not on meta (its values are overwritten by init_weights anyway).
    seed = int(torch.randint(0, 2**62, (1,)).item())
    model = CausalLM(model_cfg, device=device, dtype=dtype)
    apply_spiking(model)  # model.spike: hooks on the chosen linear inputs (none when mode=off)
    model.init_seed = seed
    if torch.device(device).type != "meta":
        init_weights(model)
    return model


# Every random tensor is drawn in blocks of dim-0 rows of (about) this many elements, each block
# from its own generator seeded by (init seed, parameter name, block index): a rank holding any
# shard draws only the blocks its rows touch, one at a time, and gets bit for bit the slice of
# the full init (peak: its shard plus one block). The block size depends on the full shape only.
INIT_BLOCK_NUMEL = 1 << 22
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter name without activation-checkpoint / compile wrapper segments (the seed key)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def init_specs(model: nn.Module, std: float) -> dict[str, tuple[nn.Module, str, tuple]]:
    """``{canonical name: (owner module, attribute, (kind, value))}`` for every parameter and
    buffer; kind ``normal`` (value = std) or ``const``. A tensor without a rule is an error."""
    out: dict[str, tuple[nn.Module, str, tuple]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        rules: dict[str, tuple] = {}
        if isinstance(module, nn.Linear):
            rules = {"weight": ("normal", std), "bias": ("const", 0.0)}
        elif isinstance(module, nn.Embedding):
            rules = {"weight": ("normal", std)}
        elif isinstance(module, RMSNorm):
            rules = {"weight": ("const", 1.0)}
        if hasattr(module, "init_specs"):
            rules.update(module.init_specs(std))
        for rel, rule in rules.items():
            owner_path, _, attr = rel.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if getattr(owner, attr, None) is not None:
                out.setdefault(canonical_name(f"{mname}.{rel}" if mname else rel), (owner, attr, rule))
    return out


def local_region(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's piece of ``t`` (a DTensor: from its placements
    and mesh; a plain tensor: all of it). Every placement sbtrain produces (FSDP's Shard(0) and
    _StridedShard over TP, TP's Shard(0/1), EP's Shard(0), Replicate) is a contiguous box."""
    if hasattr(t, "device_mesh") and hasattr(t, "placements"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(t.shape), (0,) * t.dim()


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fill_normal(t: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Normal(0, std) into this rank's piece of ``t``: exactly that slice of the full init."""
    local = t.to_local() if hasattr(t, "to_local") else t
    if local.numel() == 0:
        return
    shape, offset = local_region(t)
    full = tuple(t.shape) or (1,)
    shape, offset = shape or (1,), offset or (0,)
    view = local.view(shape)
    row = math.prod(full[1:])
    rows = max(1, INIT_BLOCK_NUMEL // max(row, 1))
    start, stop = offset[0], offset[0] + shape[0]
    for b in range(start // rows, -(-stop // rows)):
        r0, r1 = b * rows, min(full[0], (b + 1) * rows)
        gen = torch.Generator(device=local.device).manual_seed(_block_seed(seed, name, b))
        block = torch.empty((r1 - r0, *full[1:]), device=local.device, dtype=torch.float32)
        block.normal_(0.0, std, generator=gen)
        lo, hi = max(r0, start), min(r1, stop)
        piece = block[lo - r0:hi - r0]
        for d in range(1, len(full)):
            piece = piece.narrow(d, offset[d], shape[d])
        view[lo - start:hi - start].copy_(piece)


@torch.no_grad()
def init_weights(model: CausalLM, std: float | None = None, seed: int | None = None) -> CausalLM:
    """Normal(0, init_std) weights, zero biases, unit norms, betas at beta_init, zero expert bias.

    Each tensor is drawn from its own seed (``seed`` or ``model.init_seed``, and its name), so a
    full build and any sharded one (DTensor parameters, after ``to_empty``) agree exactly."""
    std = model.config.init_std if std is None else std
    seed = getattr(model, "init_seed", 0) if seed is None else seed
    specs = init_specs(model, std)
    done: set[int] = set()
    for name, (owner, attr, (kind, value)) in specs.items():
        t = getattr(owner, attr)
        if id(t) in done:  # tied weights: drawn once, under the first name
            continue
        done.add(id(t))
        if kind == "normal":
            fill_normal(t, value, seed, name)
        else:
            (t.to_local() if hasattr(t, "to_local") else t).fill_(value)
    named = {canonical_name(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    named |= {canonical_name(n) for n, _ in model.named_buffers(remove_duplicate=False)}
    if named - set(specs):
        raise TypeError(f"no init rule for {sorted(named - set(specs))[:5]}: give the module an init_specs()")
    return model


def materialize(model: CausalLM, device: str | torch.device = "cpu") -> CausalLM:
    """Allocate a meta-built model on ``device`` and initialise it (ties are restored)."""
    model.to_empty(device=device)
    model.tie_weights()
    return init_weights(model)


def count_parameters(model: CausalLM) -> dict:
    """Total, active-per-token and embedding parameter counts (tied weights counted once).

    Active = everything except what a token does not use, as each FFN kind declares it
    (``FfnKind.inactive_params``: a MoE layer's routed experts beyond ``top_k / num_experts``;
    router and shared expert count fully).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(ffn_kind(layer.ffn_kind).inactive_params(layer.mlp) for layer in model.model.layers)
    embedding = model.model.embed_tokens.weight.numel()
    lm_head = 0 if model.config.tie_embeddings else model.lm_head.weight.numel()
    return {
        "params_total": total,
        "params_active": total - inactive,
        "params_embedding": embedding,
        "params_lm_head": lm_head,
    }
