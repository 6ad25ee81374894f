"""Cross-entropy of an LM head, reference form (materialises all logits; the oracle only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from operators.registry import define_op


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    group=None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Sum over tokens of ``-log softmax(hidden @ weight.T)[label]`` in fp32; tokens whose label
    is ``ignore_index`` count nothing. hidden ``[N, d]``, weight ``[V, d]``, labels ``[N]``.
    The reference supports only an unsharded head (``group=None``)."""
    if group is not None:
        raise ValueError("the reference cross-entropy takes an unsharded head; use the chunked backend for a sharded one")
    logits = hidden.float() @ weight.float().t()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


# The op (its faster backends register on it from their own modules).
linear_cross_entropy = define_op("linear_cross_entropy", linear_cross_entropy_reference)
