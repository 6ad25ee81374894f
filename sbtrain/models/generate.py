"""Inference: prefill a prompt into a :class:`DecodeCache`, decode one token at a time, generate.

Prefill runs the chunked ops (``ops.gla`` keeps its final state, attention stores keys and
values); a decode step runs ``ops.gla_step`` on the constant-size state and attention over the
cache (a ring of exactly W past tokens for sliding-window layers, everything for full layers).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sbtrain.models.cache import DecodeCache
from sbtrain.models.model import CausalLM


@torch.no_grad()
def prefill(model: CausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, DecodeCache]:
    """Run the prompt ``[B,T]``; return (logits of the last position ``[B,V]`` fp32, cache)."""
    cache = DecodeCache()
    hidden, _ = model.hidden_states(input_ids, cache=cache)
    return model.lm_head(hidden[:, -1]).float(), cache


@torch.no_grad()
def decode_step(model: CausalLM, token: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """Feed one token per row (``[B]`` or ``[B,1]``); return its next-token logits ``[B,V]`` fp32."""
    if not cache.layers:
        raise ValueError("decode_step needs a cache filled by prefill()")
    token = token.reshape(-1, 1)
    hidden, _ = model.hidden_states(token, cache=cache)
    return model.lm_head(hidden[:, -1]).float()


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when ``temperature == 0``; else softmax(logits / T) restricted to the top k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt ``[B,T]`` -> ``[B, T + max_new_tokens]`` (greedy by default)."""
    logits, cache = prefill(model, input_ids)
    out = [input_ids]
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator)
        out.append(token.unsqueeze(1))
        if step + 1 < max_new_tokens:
            logits = decode_step(model, token, cache)
    return torch.cat(out, dim=1)


@torch.no_grad()
def stream(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """One prompt ``[1,T]``: yield each new token as soon as it is chosen (the caller may stop early,
    e.g. at an end-of-turn marker; the next step is only computed when asked for)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream() decodes one prompt; got a batch of {input_ids.shape[0]}")
    logits, cache = prefill(model, input_ids)
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator)
        yield int(token[0])
        logits = decode_step(model, token, cache)
