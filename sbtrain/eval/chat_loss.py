"""``sbtrain-eval chat_loss``: the assistant-token loss of held-out conversations.

Each conversation of ``data.paths`` (records with ``data.chat.field`` = ``messages``, as
``sbtrain-data data.records=chat`` reads them) is rendered with the model's chat template
(:func:`sbtrain.eval.loading.chat_template_of`), masked exactly as SFT data is
(:func:`sbtrain.data.chat.encode_conversation`: assistant turns, or every token with
``chat.loss_on=all``) and scored alone, after one EOD token of context as in packed training. The
loss is Σ NLL of the trained-on tokens / their count over all conversations; bad records are counted
per reason, never scored.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter

import torch

from sbtrain.eval.corpus import EvalError
from sbtrain.eval.ppl import report
from sbtrain.eval.scoring import eval_mode, model_device, token_nll


def conversations(paths: list[str], field: str, max_documents: int | None) -> list[tuple[str, dict]]:
    """``(where, record)`` of every conversation record in ``paths`` (JSON Lines / JSON)."""
    from sbtrain.data.chat_records import records
    from sbtrain.data.sources import resolve_sources

    out = []
    with tempfile.TemporaryDirectory() as cache:
        for src in resolve_sources(list(paths), None):
            out += [(f"{src.path} {where}", record) for where, record in records(src, field, False, cache, "train")]
    if not out:
        raise EvalError(f"no conversation records in data.paths={list(paths)}")
    return out[:max_documents] if max_documents else out


def chat_loss(loaded, items: list[tuple[str, dict]], template, field: str = "messages", loss_on: str = "assistant",
              max_tokens: int | None = None) -> dict:
    """Assistant-token NLL of ``items`` under ``loaded`` (an :class:`sbtrain.eval.loading.EvalModel`)."""
    from sbtrain.data.chat import BadConversation, check_messages, encode_conversation

    nll_sum, tokens, scored, skipped = 0.0, 0, 0, Counter()
    device = model_device(loaded.model)
    with eval_mode(loaded.model):
        for _, record in items:
            try:
                ids, mask = encode_conversation(loaded.tokenizer, check_messages(record, field), template, loss_on)
            except BadConversation as exc:
                skipped[exc.reason] += 1
                continue
            if max_tokens is not None and ids.size + 1 > max_tokens:
                skipped["too_long"] += 1
                continue
            input_ids = torch.tensor([[loaded.eod_id, *ids[:-1].tolist()]], device=device)
            labels = torch.tensor(ids, device=device).masked_fill(torch.from_numpy(mask == 0).to(device), -100)[None]
            scores = token_nll(loaded.model, input_ids, labels)
            nll_sum += float(scores.nll.double().sum())
            tokens += int(scores.mask.sum())
            scored += 1
    loss = nll_sum / tokens if tokens else float("nan")
    return {"conversations": scored, "tokens": tokens, "loss": loss, "ppl": math.exp(loss) if tokens else float("nan"),
            "skipped": dict(skipped), "template": template.name, "loss_on": loss_on}


def run(cfg) -> list[dict]:
    """Every model of ``cfg`` on the conversations; a table and ``<out>/chat_loss.json``."""
    from omegaconf import OmegaConf

    from sbtrain.config.data import ChatConfig
    from sbtrain.eval.config import models_of
    from sbtrain.eval.loading import chat_template_of, load_eval_model

    chat_cfg = cfg.chat if isinstance(cfg.chat, ChatConfig) else OmegaConf.to_object(cfg.chat)
    chat_cfg.validate()
    items = conversations(list(cfg.data.paths), chat_cfg.field, cfg.data.max_documents)
    rows = []
    for label, ckpt in models_of(cfg):
        loaded = load_eval_model(ckpt, cfg.backend, cfg.tokenizer.path, cfg.dtype, cfg.device, cfg.tokenizer.eod_token)
        template = chat_template_of(loaded, chat_cfg.template)
        row = chat_loss(loaded, items, template, chat_cfg.field, chat_cfg.loss_on, chat_cfg.max_tokens)
        rows.append({"label": label, "ckpt": ckpt, "backend": loaded.backend, **row})
        del loaded
    return report(cfg, rows, ["label", "backend", "conversations", "tokens", "loss", "ppl"], "chat_loss.json")


__all__ = ["chat_loss", "conversations", "run"]
