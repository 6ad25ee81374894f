"""``convert_hf(cfg)``: an HF Transformer folder -> an sbtrain weights directory for a hybrid target.

Mapping (docs/DESIGN_NOTES.md §4/§6), by target tensor name (the model's state dict on the meta device
lists them, so the output always matches :func:`sbtrain.models.weights.load_into`):

- embeddings, RMSNorms, dense FFNs, lm_head: copied (tied embeddings are written under both names);
- a tensor the teacher has under the same name (``q/k/v/o_proj`` in every mixer kind): copied;
  a mixer kind may name another teacher tensor for one of its own (``MixerKind.hf_source``: the
  hybrid's separate ``linear_{q,k,v,o}_proj`` start from q/k/v/o);
- new parameters: the model's own init rule (:func:`sbtrain.models.build.init_specs`: Linear
  weights and other random tensors ~ N(0, init_std) drawn from (seed, name), biases zero, norms
  ones, betas at ``hybrid.beta_init``, expert bias zero);
- MoE layers: upcycled from the layer's dense FFN (:mod:`sbtrain.convert.upcycle`).

Everything is planned and checked first (source shapes and dtypes, target config, output
folder), then tensors are produced one at a time from memory-mapped shards and streamed into
:func:`save_weights`, so memory holds one output shard plus the tensor being built.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sbtrain import RECIPES_DIR as SBTRAIN_RECIPES
from sbtrain.config.model import ModelConfig
from sbtrain.convert.config import ConvertConfig
from sbtrain.convert.hf_source import (
    ConversionError,
    HFSource,
    TensorReader,
    check_dtypes,
    read_source,
    source_shapes,
    source_window,
)
from sbtrain.convert.upcycle import routed_expert_weight, shared_expert_weight, upcycle_factors
from sbtrain.models.build import build_model, init_specs, to_model_config
from sbtrain.models.ffn import layer_ffns
from sbtrain.models.mixers import layer_mixers, mixer_kind
from sbtrain.models.weights import save_weights, write_manifest

RECIPES_DIR = SBTRAIN_RECIPES / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

Producer = Callable[[TensorReader], torch.Tensor]


def target_recipe(target: str) -> dict:
    path = RECIPES_DIR / f"{target}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConversionError(f"target={target!r} is not a model recipe; use one of {options}")
    node = OmegaConf.to_container(OmegaConf.load(path))
    node.pop("defaults", None)
    return node


def layer_kinds(recipe: dict, cfg: ConvertConfig, num_layers: int) -> list[str]:
    """Per-layer mixer kinds: ``layer_pattern=`` or the recipe's, repeated over the source depth.

    When the recipe's pattern mixes one kind that attends over the whole past (``attends_all``:
    the 76B's ``hybrid_full``) with one that does not, and does not tile the depth (sb76b lists 28
    layers), the global layers are placed every p-th layer counted back from the last, p = pattern
    length / global layers in it (the 76B's 6, 13, 20, 27 of 28 is p = 7); ``full_attention_layers=``
    places them by index instead."""
    pattern = list(cfg.layer_pattern) if cfg.layer_pattern is not None else list(recipe["layer_pattern"])
    kinds = [pattern[i % len(pattern)] for i in range(num_layers)]
    distinct = list(dict.fromkeys(pattern))
    global_kinds = [k for k in distinct if mixer_kind(k).attends_all]
    pair = (global_kinds[0], next(k for k in distinct if k != global_kinds[0])) \
        if len(global_kinds) == 1 and len(distinct) == 2 else None
    if cfg.layer_pattern is None and num_layers % len(pattern) and pair is not None:
        period = len(pattern) // pattern.count(pair[0])
        kinds = [pair[0] if (num_layers - 1 - i) % period == 0 else pair[1] for i in range(num_layers)]
    if cfg.full_attention_layers is not None:
        if pair is None:
            raise ConversionError(f"full_attention_layers= applies to targets whose pattern pairs one global kind "
                                  f"with one local kind (sb76b: hybrid_full / hybrid_swa), not {distinct}; give "
                                  f"layer_pattern= with one kind per layer instead")
        for index in cfg.full_attention_layers:
            if not 0 <= index < num_layers:
                raise ConversionError(f"full_attention_layers contains {index}, outside 0..{num_layers - 1}")
        full = set(cfg.full_attention_layers)
        kinds = [pair[0] if i in full else pair[1] for i in range(num_layers)]
    return kinds


def target_config(source: HFSource, cfg: ConvertConfig) -> tuple[ModelConfig, dict]:
    """The target's ModelConfig (shapes from the source, the rest from the recipe and overrides)
    and notes on the choices made, for provenance."""
    recipe = target_recipe(cfg.target)
    shapes = source_shapes(source)
    node = {**recipe, **shapes, "name": f"{cfg.target}_from_{source.model_type}"}
    kinds = layer_kinds(recipe, cfg, shapes["num_layers"])
    period = cfg.layer_pattern if cfg.layer_pattern is not None else recipe["layer_pattern"]
    node["layer_pattern"] = list(period) if kinds == [period[i % len(period)] for i in range(len(kinds))] \
        and shapes["num_layers"] % len(period) == 0 else kinds
    src_window = source_window(source.config)
    if cfg.window is not None:
        node["sliding_window"], window_from = cfg.window, "window= override"
    elif src_window is not None:
        node["sliding_window"], window_from = src_window, "source's sliding_window - 1"
    else:
        window_from = f"target recipe {cfg.target}"
    if cfg.init_std is not None:
        node["init_std"] = cfg.init_std
    hybrid = dict(node.get("hybrid", {}))
    if cfg.share_branch_projections is not None:
        hybrid["share_branch_projections"] = cfg.share_branch_projections
    if cfg.num_sink_tokens is not None:
        hybrid["num_sink_tokens"] = cfg.num_sink_tokens
    node["hybrid"] = hybrid
    moe = dict(node.get("moe", {}))
    up = cfg.upcycle
    for key in ("num_experts", "top_k", "num_shared_experts"):
        if getattr(up, key) is not None:
            moe[key] = getattr(up, key)
    if up.dense_layers is not None:
        moe["dense_layers"] = list(up.dense_layers)
    else:  # the recipe's dense layers that exist in this depth
        moe["dense_layers"] = [i for i in moe.get("dense_layers", []) if i < shapes["num_layers"]]
    moe["expert_intermediate_size"] = None  # experts are copies of the dense FFN: same width
    node["moe"] = moe
    model_cfg = to_model_config(node)  # ConfigError (e.g. top_k > num_experts) names the bad value
    notes = {"window": model_cfg.sliding_window, "window_from": window_from, "source_window": src_window,
             "layer_types": model_cfg.layer_types()}
    return model_cfg, notes


def _seeded_normal(name: str, shape, std: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std) from a generator keyed by (seed, name): reproducible whatever the write order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(tuple(shape), generator=gen) * std).to(dtype)


def plan_tensors(source: HFSource, model_cfg: ModelConfig, cfg: ConvertConfig):
    """``[(target name, producer, kind)]`` for every tensor of the target and the source tensors
    read; checks every copied shape against the target. kind: copy / reuse / new / upcycle."""
    model = build_model(model_cfg, device="meta")
    meta = model.state_dict()
    std, seed = model_cfg.init_std, cfg.seed
    rules = init_specs(model, std)  # how the model initialises a tensor the teacher does not have
    buffers = {n for n, _ in model.named_buffers()}  # fp32 by design (the router's expert bias)
    kinds, ffns = layer_mixers(model_cfg), layer_ffns(model_cfg)
    moe = model_cfg.moe
    factors = upcycle_factors(cfg.upcycle.scale, moe.num_experts, moe.top_k, moe.num_shared_experts) \
        if moe.num_experts else None
    plan: list[tuple[str, Producer, str]] = []
    used: set[str] = set()

    def need(src: str, shape: tuple[int, ...], target: str) -> None:
        if src not in source.shapes:
            raise ConversionError(f"from_hf lacks tensor {src!r} (needed for {target}); the folder is incomplete "
                                  f"or not a {source.model_type} checkpoint")
        if source.shapes[src] != tuple(shape):
            raise ConversionError(f"from_hf tensor {src} has shape {source.shapes[src]}, the target expects "
                                  f"{tuple(shape)} for {target}; config.json does not describe these weights")
        used.add(src)

    for name, ref in meta.items():
        shape, dt = tuple(ref.shape), ref.dtype
        m = LAYER.fullmatch(name)
        rest = m.group(2) if m else ""
        prefix = f"model.layers.{m.group(1)}." if m else ""
        # The mixer kind says which teacher tensor a parameter starts from (hybrid: linear_* <- q/k/v/o).
        mixer_src = None
        if rest.startswith("self_attn."):
            rel = rest.removeprefix("self_attn.")
            mixer_src = prefix + "self_attn." + kinds[int(m.group(1))].hf_source(rel)
        upcycled = ffns[int(m.group(1))].upcycled_from(rest.removeprefix("mlp.")) if rest.startswith("mlp.") else None
        if name in source.shapes and upcycled is None:
            need(name, shape, name)
            plan.append((name, lambda r, s=name: r.get(s), "copy"))
        elif name == "lm_head.weight" and model_cfg.tie_embeddings:
            need("model.embed_tokens.weight", shape, name)
            plan.append((name, lambda r: r.get("model.embed_tokens.weight"), "copy"))
        elif mixer_src is not None and mixer_src != name and mixer_src in source.shapes:
            need(mixer_src, shape, name)
            plan.append((name, lambda r, s=mixer_src: r.get(s), "reuse"))
        elif upcycled is not None:  # the FFN kind builds it from the teacher's dense FFN (MoE upcycling)
            (dense_rel, role), which = upcycled, upcycled[0].split("_proj")[0]
            dense = f"{prefix}mlp.{dense_rel}"
            if role == "routed":  # [E, Din, Dout] <- the dense [Dout, Din]
                expected = (shape[2], shape[1])
                fn = (lambda r, d=dense, f=factors[which]: routed_expert_weight(r.get(d), f, moe.num_experts, r.dtype))
            else:  # shared: [S*I, d] (gate/up) or [d, S*I] (down)
                s_count = moe.num_shared_experts
                expected = (shape[0], shape[1] // s_count) if which == "down" else (shape[0] // s_count, shape[1])
                fn = (lambda r, d=dense, f=factors[which], w=which:
                      shared_expert_weight(r.get(d), f, moe.num_shared_experts, w, r.dtype))
            need(dense, expected, name)
            plan.append((name, fn, "upcycle"))
        elif name in rules:  # new: the model's own init rule, drawn reproducibly from (seed, name)
            kind, value = rules[name][2]
            fp32 = name in buffers
            if kind == "normal":
                fn = (lambda r, n=name, s=shape, v=value, f=fp32:
                      _seeded_normal(n, s, v, seed, torch.float32 if f else r.dtype))
            else:
                fn = lambda r, s=shape, v=value, f=fp32: torch.full(s, v, dtype=torch.float32 if f else r.dtype)
            plan.append((name, fn, "new"))
        else:
            raise ConversionError(f"the target has a tensor {name} {tuple(shape)} ({dt}) the converter has no rule "
                                  f"for, and the source has no tensor of that name; give its module an init_specs()")
    skipped = {n for n in source.shapes if n.endswith("rotary_emb.inv_freq")}
    if model_cfg.tie_embeddings:
        skipped.add("lm_head.weight")  # some tied checkpoints also store the head
    unused = sorted(set(source.shapes) - used - skipped)
    if unused:
        raise ConversionError(f"from_hf has {len(unused)} tensor(s) the target has no place for, e.g. {unused[:4]} "
                              f"(an unsupported variant: o_proj/MLP biases, extra norms?)")
    return plan, used, factors


def check_output(source: HFSource, out: Path, overwrite: bool) -> None:
    src, dst = source.path.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConversionError(f"out={out} overlaps from_hf={source.path}; write the converted model elsewhere")
    if dst.exists() and not overwrite:
        raise ConversionError(f"out={out} already exists; pass overwrite=true to replace it, or choose another out")


def convert_hf(cfg: ConvertConfig) -> Path:
    """The whole ``sbtrain-convert`` import as a function; returns the written directory."""
    if isinstance(cfg, dict) or OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ConvertConfig), cfg))
    source = read_source(cfg.from_hf)
    out = Path(cfg.out)
    check_output(source, out, cfg.overwrite)
    model_cfg, notes = target_config(source, cfg)
    plan, used, factors = plan_tensors(source, model_cfg, cfg)
    dtype = check_dtypes(source, used, cfg.dtype, cfg.cast)
    # Everything is checked: from here on, write.
    with TensorReader(source, dtype) as reader:
        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, produce, _ in plan:
                yield name, produce(reader)

        save_weights(stream(), model_cfg, out, max_shard_bytes=cfg.max_shard_bytes,
                     metadata={"source": str(source.path.resolve()), "target": cfg.target})
    tokenizer = copy_tokenizer(source.path, out)
    counts: dict[str, int] = {}
    for _, _, kind in plan:
        counts[kind] = counts.get(kind, 0) + 1
    provenance = {
        "source": str(source.path.resolve()),
        "source_model_type": source.model_type,
        "source_config_sha256": source.config_hash(),
        "target": cfg.target,
        "model_name": model_cfg.name,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": cfg.seed,
        "init_std": model_cfg.init_std,
        "mapping": {
            "tensors": counts,
            "copy": "embeddings, norms, dense FFNs, lm_head, q/k/v/o (in every layer kind)",
            "reuse": "q/k/v/o copied into the linear branch (share_branch_projections=false)",
            "new": "GLA gates / sinks / routers N(0, init_std), biases 0, output norms 1, betas beta_init",
            "upcycle": "experts (routed and shared) = scaled copies of the layer's dense FFN",
        },
        **notes,
        "upcycle": None if factors is None else {
            "scale": cfg.upcycle.scale, "factors": factors, "num_experts": model_cfg.moe.num_experts,
            "top_k": model_cfg.moe.top_k, "num_shared_experts": model_cfg.moe.num_shared_experts,
            "dense_layers": list(model_cfg.moe.dense_layers),
            "assumes": "softmax router without top-k renormalisation at near-uniform probabilities",
        },
        "tokenizer_files": tokenizer,
        "overrides": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    write_manifest(out)  # again, now that the tokenizer and provenance are there: the manifest covers every file
    return out


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    if names:
        (out / "tokenizer").mkdir(exist_ok=True)
        for n in names:
            shutil.copy2(source / n, out / "tokenizer" / n)
    return names


__all__ = ["convert_hf", "layer_kinds", "plan_tensors", "target_config", "target_recipe"]
