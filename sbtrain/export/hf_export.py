"""sbtrain model -> Hugging Face folder that ``AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)`` loads without sbtrain installed.

The source (``ckpt``) is either an sbtrain *weights directory* (``config.yaml`` + safetensors,
:mod:`sbtrain.models.weights`) or a *training checkpoint*: one ``step_XXXXXXXX`` DCP directory,
or a run's ``checkpoints/`` directory (its ``latest``, falling back to the newest intact one).
The folder written::

    config.json                    model_type "sbtrain", auto_map -> the two .py files below
    configuration_sbtrain.py       standalone copies (torch + transformers only)
    modeling_sbtrain.py
    model.safetensors              or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    config.yaml                    the exact sbtrain ModelConfig (for re-import into sbtrain)
    generation_config.json         greedy by default, decoding with the exported SbtrainCache (use_cache true)
    tokenizer files                from tokenizer (tokenizer.path=DIR on the CLI), the weights dir's tokenizer/, or the run's data manifest

Everything goes into a hidden sibling temp directory that is renamed onto ``out`` at the end.

``format="w8aspike"`` writes the same folder with int8 codes + fp32 scales for the linear weights,
the quantization and spike settings in config.json and a third standalone file,
``w8aspike_sbtrain.py`` (see :mod:`sbtrain.export.w8aspike_export`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sbtrain.config.model import ConfigError, ModelConfig
from sbtrain.export.config import FORMATS
from sbtrain.export.w8aspike_export import (
    W8A_CODE_FILE,
    W8A_REPORT_FILE,
    quantize_for_export,
    w8a_config,
    w8a_report,
    w8a_settings,
    w8a_tensors,
    w8a_total_bytes,
)
from sbtrain.models.build import build_model
from sbtrain.models.ffn import FFNS
from sbtrain.models.mixers import MIXERS
from sbtrain.models.mixers.hf import HERE as MIXERS_HF
from sbtrain.models.mixers.hf import exported_text
from sbtrain.models.model import CausalLM
from sbtrain.models.weights import CONFIG, WeightsError, save_weights

HERE = Path(__file__).resolve().parent
SBTRAIN_ROOT = HERE.parent
CODE_FILES = ("configuration_sbtrain.py", "modeling_sbtrain.py")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


MIXERS_BEGIN, MIXERS_END = "# --- sbtrain mixers: begin ---", "# --- sbtrain mixers: end ---"


def modeling_code() -> str:
    """``modeling_sbtrain.py`` as exported: the template with its mixer imports replaced by the text of
    the shared HF helpers, the decode cache and every registered kind's HF code (each file once, in
    registration order)."""
    template = (HERE / "modeling_sbtrain.py").read_text()
    head, rest = template.split(MIXERS_BEGIN, 1)
    tail = rest.split(MIXERS_END, 1)[1]
    shared = [MIXERS_HF / "common.py", MIXERS_HF / "cache.py"]
    kinds = [*MIXERS.values(), *FFNS.values()]
    files = list(dict.fromkeys([*shared, *(kind.export_code for kind in kinds)]))
    parts = [f"# -- from {f.relative_to(SBTRAIN_ROOT.parent).as_posix()} --\n{exported_text(f)}" for f in files]
    return head + "\n\n".join(parts) + tail


class ExportError(ConfigError):
    """A ``ckpt`` / ``out`` / ``tokenizer`` / ``dtype`` value the export cannot use."""


def resolve_source(ckpt: str | os.PathLike) -> tuple[str, Path]:
    """``("weights", dir)`` or ``("training", step_dir)`` for what ``ckpt`` names (as ``trainer.init_from``)."""
    from sbtrain.trainer.init_from import resolve

    try:
        return resolve(ckpt, knob="ckpt")
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def load_source(ckpt: str | os.PathLike) -> tuple[CausalLM, Path, str]:
    """The model with its weights (the architecture its run built), the resolved source directory and
    its kind."""
    from sbtrain.trainer.init_from import load_weights, model_config

    kind, path = resolve_source(ckpt)
    model = build_model(model_config(path, knob="ckpt"), device="cpu")
    load_weights(model, path, knob="ckpt")
    return model.eval(), path, kind


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for :class:`configuration_sbtrain.SbtrainConfig` (see its docstring for names)."""
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return {
        "model_type": "sbtrain",
        "architectures": ["SbtrainForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sbtrain.SbtrainConfig",
            "AutoModelForCausalLM": "modeling_sbtrain.SbtrainForCausalLM",
        },
        "name": cfg.name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_base": cfg.rope_base,
        "rope_yarn": plain["rope_yarn"],
        "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": cfg.sliding_window + 1,  # HF counts the current token
        "layer_kinds": cfg.layer_types(),
        "ffn_kinds": cfg.ffn_types(),
        "gla": plain["gla"],
        "hybrid": plain["hybrid"],
        "moe": plain["moe"],
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def find_tokenizer(source: Path, kind: str, tokenizer: str | os.PathLike | None) -> Path | None:
    """``tokenizer`` if given; else the weights dir's ``tokenizer/``; else the tokenizer named in
    the training run's first dataset manifest, when that folder still exists."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ExportError(f"tokenizer.path={tokenizer} is not a tokenizer folder (none of {TOKENIZER_FILES[:3]}...)")
        return path
    if kind == "weights":
        return source / "tokenizer" if (source / "tokenizer").is_dir() else None
    from sbtrain.trainer.init_from import run_data_manifest

    try:
        path = Path(run_data_manifest(source)["tokenizer"]["path"])
    except (KeyError, TypeError):
        return None
    return path if path.is_dir() else None


def add_chat_template(folder: Path, source: Path, kind: str) -> str | None:
    """Give an exported tokenizer without a chat template the one its SFT data was rendered with (the
    run's data manifest), so ``apply_chat_template`` renders what the model was fine-tuned on."""
    from sbtrain.trainer.init_from import run_data_manifest

    config_path = folder / "tokenizer_config.json"
    template = ((run_data_manifest(source) or {}).get("loss_mask") or {}).get("chat_template") if kind == "training" \
        else None
    if not template or not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if config.get("chat_template") or (folder / "chat_template.jinja").is_file():
        return None  # the tokenizer's own template wins
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2))
    return template


def is_model_file(name: str) -> bool:
    """Files of ours a tokenizer folder (possibly a whole HF model folder) must not overwrite."""
    reserved = {"config.json", "generation_config.json", CONFIG, "model.safetensors.index.json", *CODE_FILES}
    return name in reserved or name.endswith((".safetensors", ".bin", ".py", ".pt"))


def is_previous_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "sbtrain"
    except (OSError, ValueError, AttributeError):
        return False


def export(ckpt: str | os.PathLike, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
           dtype: str | None = None, max_shard_bytes: int = 4 * 2**30, format: str = "hf", w8a=None) -> Path:
    """Write the HF folder for ``ckpt`` at ``out`` (replacing it atomically); returns ``out``.

    ``format="w8aspike"``: int8 weights + spike activations with the settings ``w8a`` (a
    :class:`sbtrain.export.config.W8AConfig`, a dict of its fields, or None for the defaults);
    see :mod:`sbtrain.export.w8aspike_export`."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is unknown; use one of {FORMATS} (hf: the weights as they are; "
                          "w8aspike: int8 weights + spike activations, w8a.*)")
    settings = w8a_settings(w8a) if format == "w8aspike" else None
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype={dtype} is not supported; use one of {sorted(DTYPES)} or leave it unset to keep "
                          "the checkpoint's dtype")
    try:
        model, source, kind = load_source(ckpt)
    except WeightsError as exc:
        raise ExportError(f"ckpt={ckpt}: {exc}") from exc
    cfg = model.config
    out = Path(out)
    if out.resolve() == source.resolve():
        raise ExportError(f"out={out} is the source checkpoint; choose another directory")
    if out.exists() and any(out.iterdir()) and not is_previous_export(out):
        raise ExportError(f"out={out} exists and is not an earlier sbtrain export; choose an empty or new directory")
    target = DTYPES[dtype] if dtype is not None else model.model.embed_tokens.weight.dtype
    names = [n for n in model.state_dict() if not (cfg.tie_embeddings and n == "lm_head.weight")]
    state = model.state_dict()
    # The router's expert bias is fp32 by design (a selection offset); everything else follows dtype.
    quantized = quantize_for_export(model, settings) if settings is not None else {}
    tensors = w8a_tensors(state, names, quantized, target)
    total = w8a_total_bytes(state, names, quantized, target)
    tmp = out.with_name(f".{out.name}.export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, cfg, tmp, max_shard_bytes=max_shard_bytes, metadata={"total_size": total})
    config = hf_config(cfg, target)
    code_files = CODE_FILES
    if settings is not None:
        config, code_files = w8a_config(config, model, settings), (*CODE_FILES, W8A_CODE_FILE)
        (tmp / W8A_REPORT_FILE).write_text(w8a_report(quantized, settings))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"use_cache": True, "do_sample": False}, indent=1))
    for name in code_files:
        if name == "modeling_sbtrain.py":
            (tmp / name).write_text(modeling_code())
        else:
            shutil.copyfile(HERE / name, tmp / name)
    tok = find_tokenizer(source, kind, tokenizer)
    if tok is not None:
        for file in tok.iterdir():
            if file.is_file() and not is_model_file(file.name):
                shutil.copyfile(file, tmp / file.name)
        add_chat_template(tmp, source, kind)
    if out.exists():  # move the old export aside first so `out` is never half-written
        old = out.with_name(f".{out.name}.export.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


__all__ = ["ExportError", "export", "hf_config", "load_source", "resolve_source"]
