"""Grouped expert matmul: tokens sorted by expert times one weight per expert."""

from __future__ import annotations

import torch

from operators.registry import define_op


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x ``[N, Din]`` sorted by expert; w ``[E, Din, Dout]``; offs ``[E]`` int32 cumulative end
    row of each expert's tokens (torch._grouped_mm's convention; an expert may get none).
    Returns ``[N, Dout]``; rows past ``offs[-1]`` are zero."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or offs.numel() != w.shape[0]:
        raise ValueError(f"grouped_mm: x {tuple(x.shape)}, w {tuple(w.shape)}, offs {tuple(offs.shape)} do not fit")
    if x.shape[0] == 0 and w.shape[0]:
        # No rows (an expert-parallel rank that was sent no tokens): still an output that autograd
        # links to x and w, or this rank would skip the backward all-to-all and FSDP's gradient
        # reduce-scatter that the other ranks run, and the job would hang.
        return x @ w[0]
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e]
        start = end
    return out


# The op (its faster backends register on it from their own modules).
grouped_mm = define_op("grouped_mm", grouped_mm_reference)
