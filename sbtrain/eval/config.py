"""Typed schema of ``sbtrain-eval <subcommand>`` (``recipes/eval.yaml``), stored in Hydra's
ConfigStore as ``eval_schema`` so a mistyped key (``seq_lne=512``) is an error.

The models: ``ckpt=DIR`` and/or ``ckpts=[DIR, ...]`` (evaluated in that order, each labelled by
``labels=[...]`` or its directory name), so a baseline and its converted model share one table
and one plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from sbtrain.config.data import ChatConfig, TokenizerConfig
from sbtrain.eval.corpus import EvalError


@dataclass
class EvalDataConfig:
    paths: list[str] = field(default_factory=list)  # local files / globs: .txt or .jsonl
    format: str | None = None  # json | text; None: from each file's extension
    # plain text, the rule sbtrain-data uses too: file (a .txt is one document) | paragraph (one
    # document per blank-line-separated block); newlines are kept as text either way
    text_unit: str = "file"
    text_field: str = "text"  # jsonl field holding the text
    max_documents: int | None = None  # only the first N documents


@dataclass
class HarnessConfig:
    """``sbtrain-eval lm_eval``: lm-evaluation-harness tasks (needs ``pip install lm-eval==0.4.*``)."""

    tasks: list[str] = field(default_factory=list)  # task names (lm-eval's, or from include_path)
    include_path: str | None = None  # a folder of extra task YAMLs (e.g. local jsonl tasks)
    include_defaults: bool = True  # also index lm-eval's built-in tasks (slow: ~10k YAMLs)
    num_fewshot: int | None = None
    limit: float | None = None  # examples per task (int), or a fraction (< 1)
    max_length: int = 2048  # tokens of context per request
    max_gen_toks: int = 256


@dataclass
class EvalConfig:
    ckpt: str | None = None  # weights dir, training checkpoint (step dir, checkpoints/, run dir) or HF folder
    ckpts: list[str] = field(default_factory=list)  # more models, evaluated after ckpt
    labels: list[str] = field(default_factory=list)  # one per model; default: the directory's name
    backend: str = "auto"  # auto | sbtrain | hf (an sbtrain export folder is scored by transformers with hf)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # tokenizer.path overrides the model's own
    seq_len: int = 2048  # window length (tokens of input)
    stride: int | None = None  # None: seq_len (non-overlapping); smaller: sliding windows (ppl only)
    batch_size: int = 1  # windows per forward
    max_tokens: int | None = None  # score only the first N tokens of the corpus (quick looks)
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "cpu"
    out: str | None = None  # directory for the JSON (+ PNG); None: print only
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # lm_eval subcommand only
    # chat_loss subcommand: the messages field, the template (null: the model's own), loss_on, max_tokens
    chat: ChatConfig = field(default_factory=ChatConfig)


def models_of(cfg) -> list[tuple[str, str]]:
    """``[(label, ckpt)]`` of a config: ``ckpt`` first, then ``ckpts``."""
    ckpts = ([cfg.ckpt] if cfg.ckpt else []) + list(cfg.ckpts)
    if not ckpts:
        raise EvalError("no model given: set ckpt=DIR (or ckpts=[DIR1,DIR2] to compare several)")
    labels = list(cfg.labels)
    if labels and len(labels) != len(ckpts):
        raise EvalError(f"labels={labels} has {len(labels)} entries for {len(ckpts)} models {ckpts}: "
                        "give one label per model, or none")
    if not labels:
        labels = [str(c).rstrip("/").rsplit("/", 1)[-1] or str(c) for c in ckpts]
        labels = [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    if len(set(labels)) != len(labels):
        raise EvalError(f"labels={labels} repeat a name: give each model its own label")
    return list(zip(labels, ckpts))


def register_eval_schema() -> None:
    """Store the schema as ``eval_schema`` (idempotent: ConfigStore overwrites)."""
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


register_eval_schema()

__all__ = ["EvalConfig", "EvalDataConfig", "HarnessConfig", "models_of", "register_eval_schema"]
