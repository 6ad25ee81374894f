"""Per-token negative log-likelihood of a causal LM: the one scoring path every evaluation uses.

``token_nll(model, input_ids, labels)`` works on an sbtrain :class:`CausalLM` and on a Hugging Face
``*ForCausalLM`` alike (final hidden states, then the LM head applied in chunks of positions, so a
long window never holds ``[T, V]`` fp32 logits at once), which is what makes a baseline Transformer
and the model converted from it comparable: the same windows, the same arithmetic.

Labels follow sbtrain's convention: ``labels[:, t]`` is the target of position ``t`` (already
shifted), ``-100`` is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sbtrain.models.model import CausalLM

IGNORE = -100
HEAD_CHUNK = 1024  # positions per LM-head chunk: bounds the fp32 logits held at once


@dataclass
class TokenScores:
    nll: torch.Tensor  # [B, T] fp32, 0 where labels == -100
    greedy: torch.Tensor  # [B, T] bool: the target is the argmax (False where labels == -100)
    mask: torch.Tensor  # [B, T] bool: scored positions


def is_sbtrain(model) -> bool:
    return isinstance(model, CausalLM)


def final_hidden(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module | None]:
    """``([B,T,d] hidden, lm_head)``; for an HF model without a reachable decoder, ``(logits, None)``."""
    if is_sbtrain(model):
        hidden, _ = model.hidden_states(input_ids)  # under TP the plan hands out the whole sequence
        return hidden, model.lm_head
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module):
        out = decoder(input_ids=input_ids)
        hidden = out if isinstance(out, torch.Tensor) else out[0]  # Qwen2Model: BaseModelOutputWithPast
        return hidden, head
    return model(input_ids=input_ids, use_cache=False).logits, None


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    """Per-token NLL (nats, fp32) and greedy match of ``labels`` under ``model``."""
    if input_ids.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    hidden, head = final_hidden(model, input_ids)
    B, T = labels.shape
    nll = torch.zeros(B, T, dtype=torch.float32, device=labels.device)
    greedy = torch.zeros(B, T, dtype=torch.bool, device=labels.device)
    mask = labels != IGNORE
    for start in range(0, T, HEAD_CHUNK):
        stop = min(start + HEAD_CHUNK, T)
        piece = hidden[:, start:stop]
        logits = (head(piece) if head is not None else piece).float()
        target = labels[:, start:stop]
        safe = target.clamp_min(0)  # -100 rows are zeroed below
        loss = F.cross_entropy(logits.flatten(0, 1), safe.flatten(), reduction="none").view_as(target)
        nll[:, start:stop] = loss.masked_fill(~mask[:, start:stop], 0.0)
        greedy[:, start:stop] = (logits.argmax(-1) == target) & mask[:, start:stop]
    return TokenScores(nll, greedy, mask)


class eval_mode:
    """``with eval_mode(model):`` eval() inside, the caller's train/eval mode restored after (the
    trainer hands its live model to the evaluation functions)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return False


def model_device(model) -> torch.device:
    return next(model.parameters()).device


__all__ = ["IGNORE", "TokenScores", "eval_mode", "final_hidden", "is_sbtrain", "model_device", "token_nll"]
