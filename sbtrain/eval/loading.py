"""Load a model and its tokenizer for evaluation, whatever ``ckpt=`` names.

- an sbtrain weights directory (``config.yaml`` + safetensors) or a training checkpoint (a
  ``step_XXXXXXXX`` directory, a run's ``checkpoints/`` or its out_dir): sbtrain's own model,
  via :func:`sbtrain.export.hf_export.load_source`;
- a Hugging Face folder (``config.json`` + weights, no ``config.yaml``): transformers'
  ``AutoModelForCausalLM`` from the local folder (``trust_remote_code`` for our own export).

``backend=auto`` decides by those files; an sbtrain export holds both, so ``backend=hf`` scores it
through transformers (the baseline-vs-converted comparison) and ``backend=sbtrain`` through sbtrain.
The tokenizer is ``tokenizer_path`` if given, else the HF folder itself, the weights directory's
``tokenizer/``, or the one named in a training run's data manifest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sbtrain.eval.corpus import EvalError

BACKENDS = ("auto", "sbtrain", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: object
    eod_id: int
    backend: str  # sbtrain | hf
    source: str  # the directory the weights came from
    tokenizer_path: str


def pick_backend(ckpt: Path, backend: str) -> str:
    if backend not in BACKENDS:
        raise EvalError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    if (ckpt / "config.json").is_file() and not (ckpt / "config.yaml").is_file():
        return "hf"
    return "sbtrain"


def load_eval_model(ckpt: str, backend: str = "auto", tokenizer_path: str | None = None, dtype: str = "fp32",
                    device: str = "cpu", eod_token: str | None = None) -> EvalModel:
    from sbtrain.data.tokenizer import load_tokenizer
    from sbtrain.export.hf_export import find_tokenizer, load_source

    path = Path(ckpt)
    if not path.is_dir():
        raise EvalError(f"ckpt={ckpt} is not a directory: give an sbtrain weights directory, a training checkpoint "
                        "or a Hugging Face model folder")
    if dtype not in DTYPES:
        raise EvalError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    backend = pick_backend(path, backend)
    if backend == "hf":
        if not (path / "config.json").is_file():
            raise EvalError(f"ckpt={ckpt} has no config.json, so it is not a Hugging Face folder: use backend=sbtrain "
                            "for sbtrain weights directories and training checkpoints")
        from transformers import AutoModelForCausalLM

        # Remote code is imported as ``transformers_modules.<folder name>.*`` and cached in
        # sys.modules: two exports whose folders share a name would share the first one's classes.
        for name in [m for m in sys.modules if m.startswith("transformers_modules.")]:
            del sys.modules[name]
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=DTYPES[dtype])
        source, tok_dir = path, tokenizer_path or str(path)
    else:
        model, source, kind = load_source(path)
        model = model.to(DTYPES[dtype])
        found = find_tokenizer(source, kind, tokenizer_path)
        if found is None:
            raise EvalError(f"no tokenizer for ckpt={ckpt}: it has no tokenizer/ folder (nor a data manifest naming "
                            "one); set tokenizer.path=DIR (e.g. data/stdlib/tokenized/tokenizer)")
        tok_dir = str(found)
    tokenizer, eod_id = load_tokenizer(tok_dir, eod_token)  # EOD: the separator / first context token
    vocab = model.get_output_embeddings().weight.shape[0] if backend == "hf" else model.config.vocab_size
    if len(tokenizer) > vocab:
        raise EvalError(f"tokenizer {tok_dir} has {len(tokenizer)} tokens but the model only {vocab}: "
                        "set tokenizer.path to the tokenizer the model was trained with")
    return EvalModel(model.to(device).eval(), tokenizer, eod_id, backend, str(source), tok_dir)


def chat_template_of(loaded: EvalModel, name: str | None):
    """The chat template to talk to ``loaded`` with: ``name`` (built-in or a .jinja file) when given;
    else the tokenizer's own; else the one its SFT data was rendered with (the training run's first
    dataset manifest). Raises :class:`EvalError` naming the knob when there is none."""
    from sbtrain.data.chat import ChatTemplate, resolve_template
    from sbtrain.data.sources import DataError

    if name is not None or getattr(loaded.tokenizer, "chat_template", None):
        try:
            return resolve_template(name, loaded.tokenizer)
        except DataError as exc:
            raise EvalError(str(exc).replace("data.chat.template", "template")) from None
    from sbtrain.trainer.init_from import run_data_manifest

    try:
        return ChatTemplate(run_data_manifest(loaded.source)["loss_mask"]["chat_template"], "the SFT data's")
    except (KeyError, TypeError):
        raise EvalError(f"no chat template for {loaded.source}: its tokenizer has none and its training data "
                        "recorded none; name one with template=chatml or template=/path/to/template.jinja") from None


__all__ = ["BACKENDS", "EvalModel", "chat_template_of", "load_eval_model", "pick_backend"]
