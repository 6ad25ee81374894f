"""Read and check a local HF Transformers folder (Qwen2 / Qwen2.5, Llama, Mistral) without
loading its weights: config.json, the safetensors headers (names, shapes, dtypes) and lazy
per-tensor reads through memory-mapped files.

Everything that can make a conversion fail is checked here, before a byte is written:
unsupported architecture or variant (RoPE scaling other than YaRN, activation, MLP/o_proj biases), missing
shards, head counts, dtypes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import torch
from safetensors import SafetensorError, safe_open

from sbtrain.config.model import ConfigError, YarnConfig
from sbtrain.models.weights import WeightsError, weight_files

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed by our model


class ConversionError(ConfigError):
    """Input the converter cannot take; the message names the value and the fix."""


@dataclass
class HFSource:
    path: Path
    config: dict
    files: dict[str, Path]  # tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def config_hash(self) -> str:
        return hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()


def read_source(path: str | Path) -> HFSource:
    """config.json and every tensor header of an HF folder; raises :class:`ConversionError`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConversionError(f"from_hf={path} has no config.json; point from_hf at a local HF model folder")
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"from_hf={path}: model_type={model_type!r} is not supported; the converter takes {SUPPORTED_MODEL_TYPES} "
            f"(decoder-only SwiGLU Transformers with RoPE and RMSNorm)"
        )
    try:
        files = weight_files(path)
    except WeightsError as exc:  # a missing shard, or no safetensors at all (pytorch_model.bin)
        raise ConversionError(f"from_hf: {exc} (the converter reads safetensors only)") from exc
    source = HFSource(path, config, files)
    for file in sorted(set(files.values())):
        try:
            handle = safe_open(str(file), framework="pt")  # parses (and checks) the header: before anything is written
        except SafetensorError as exc:
            raise ConversionError(f"from_hf: {file} is truncated or corrupt (safetensors: {exc}); download or copy "
                                  "it again") from exc
        with handle as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if files.get(name) != file:
                    continue  # listed in the index under another shard
                view = f.get_slice(name)
                source.shapes[name] = tuple(view.get_shape())
                dtype = view.get_dtype()
                if dtype not in SAFETENSORS_DTYPES:
                    raise ConversionError(f"from_hf: tensor {name} has dtype {dtype}; only float tensors are expected")
                source.dtypes[name] = SAFETENSORS_DTYPES[dtype]
    listed = sorted(set(files) - set(source.shapes))
    if listed:
        raise ConversionError(f"from_hf: {len(listed)} tensor(s) named in the index are not in their shard, e.g. "
                              f"{listed[:3]}; copy the complete folder again")
    return source


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """RoPE base and, for a YaRN source, the ``model.rope_yarn`` fields (None: plain RoPE). Other
    scalings (linear, dynamic, llama3, longrope) are refused: they would change the positions."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    if scaling:  # the pre-v5 layout: rope_scaling={type|rope_type, factor, ...} beside a top-level rope_theta
        params = {**params, **scaling}
    kind = params.get("rope_type", params.get("type"))
    if kind not in (None, "default", "yarn"):
        raise ConversionError(f"from_hf uses RoPE scaling {kind!r}; the converter takes plain RoPE (rope_type "
                              f"default) or yarn")
    theta = config.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ConversionError("from_hf config.json gives no rope_theta (nor rope_parameters.rope_theta)")
    if kind != "yarn":
        return float(theta), None
    return float(theta), yarn_fields(config, params)


def yarn_fields(config: dict, params: dict) -> dict:
    """HF's yarn parameters as ``model.rope_yarn`` (transformers' _compute_yarn_parameters: the
    original length from a top-level original_max_position_embeddings, else the scaling's, else
    max_position_embeddings; factor from max / original when null; beta defaults 32 / 1)."""
    for key, default in (("partial_rotary_factor", 1.0), ("truncate", True)):
        if params.get(key, config.get(key, default)) != default:
            raise ConversionError(f"from_hf yarn has {key}={params.get(key, config.get(key))}; sbtrain's YaRN "
                                  f"implements {key}={default} only")
    original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or config.get("max_position_embeddings")
    if not original:
        raise ConversionError("from_hf yarn gives no original_max_position_embeddings (nor max_position_embeddings)")
    factor = params.get("factor") or config.get("max_position_embeddings", 0) / original
    if factor < 1:
        raise ConversionError(f"from_hf yarn factor={factor} is below 1: YaRN extends the context (factor >= 1)")
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim and factor > 1:  # DeepSeek's form, resolved here
        attention_factor = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all_dim * math.log(factor) + 1)
    return {"factor": float(factor), "original_max_position": int(original),
            "beta_fast": float(params.get("beta_fast") or YarnConfig.beta_fast),
            "beta_slow": float(params.get("beta_slow") or YarnConfig.beta_slow),
            "attention_factor": None if attention_factor is None else float(attention_factor)}


def source_window(config: dict) -> int | None:
    """The source's sliding window in our convention (W past + current, i.e. HF's value - 1), or
    None when no layer of the source uses one."""
    window = config.get("sliding_window")
    if window is None:
        return None
    if config["model_type"] == "qwen2" and not config.get("use_sliding_window", False):
        return None
    layer_types = config.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window) - 1


def source_shapes(source: HFSource) -> dict:
    """The ModelConfig fields that come from the source (shapes, norms, RoPE, ties, biases)."""
    c = source.config
    heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"from_hf hidden_act={c['hidden_act']!r}: only SwiGLU (silu) FFNs are supported")
    if c.get("mlp_bias"):
        raise ConversionError("from_hf has mlp_bias=true; sbtrain's FFN has no biases")
    head_dim = c.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConversionError(f"from_hf hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                                  f"and config.json gives no head_dim")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ConversionError(
            f"from_hf has num_attention_heads={heads} and num_key_value_heads={kv_heads}: the target's GQA needs "
            f"the query heads to be a multiple of the KV heads; this model cannot be converted"
        )
    if head_dim % 2:
        raise ConversionError(f"from_hf head_dim={head_dim} is odd; rotary embeddings need an even head dim")
    theta, yarn = rope_settings(c)
    return {
        **({"rope_yarn": yarn} if yarn else {}),
        "vocab_size": int(c["vocab_size"]),
        "hidden_size": hidden,
        "num_layers": int(c["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(head_dim),
        "intermediate_size": int(c["intermediate_size"]),
        "rms_norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "rope_base": theta,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in source.files,
    }


def check_dtypes(source: HFSource, names: set[str], requested: str | None, cast: bool) -> torch.dtype:
    """The one dtype of the tensors used, matched against the ``dtype=`` request; returns the output dtype."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in sorted(names):
        by_dtype.setdefault(source.dtypes[name], []).append(name)
    if len(by_dtype) > 1 and not (cast and requested is not None):
        summary = "; ".join(f"{str(d).removeprefix('torch.')}: {len(n)} e.g. {n[0]}" for d, n in by_dtype.items())
        raise ConversionError(f"from_hf mixes tensor dtypes ({summary}); save the model in one dtype, or pass "
                              f"dtype=NAME cast=true to convert everything to NAME")
    if requested is None:
        return next(iter(by_dtype))
    if requested not in DTYPE_NAMES:
        raise ConversionError(f"dtype={requested!r} is unknown; use one of {sorted(DTYPE_NAMES)}")
    want = DTYPE_NAMES[requested]
    have = sorted(str(d).removeprefix("torch.") for d in by_dtype)
    if set(by_dtype) != {want} and not cast:
        raise ConversionError(f"dtype={requested} was requested but from_hf holds {', '.join(have)} tensors; "
                              f"pass cast=true to convert, or drop dtype= to keep the source's")
    return want


class TensorReader:
    """Lazy reads from the source's shards (each file opened once, memory-mapped): only the
    tensors being converted are ever in memory."""

    def __init__(self, source: HFSource, dtype: torch.dtype):
        self.source, self.dtype = source, dtype
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def get(self, name: str) -> torch.Tensor:
        file = self.source.files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._handles[file].get_tensor(name).to(self.dtype)


__all__ = ["DTYPE_NAMES", "SUPPORTED_MODEL_TYPES", "ConversionError", "HFSource", "TensorReader", "check_dtypes",
           "read_source", "source_shapes", "source_window"]
