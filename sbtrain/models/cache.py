"""Decode state: a constant-size recurrent state for linear attention, a ring of exactly W past
keys/values for sliding-window attention, a preallocated cache growing by an eighth for full
attention.

The caches are inference-only (filled under ``torch.no_grad()``); every row of the batch has
the same length (no padding), and document masking does not apply to decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCache:
    """Keys (after RoPE) and values of one softmax mixer.

    ``window=None`` keeps every token. ``window=W`` keeps a ring of W slots: token p lives in
    slot ``p % W``. Order inside the ring does not matter: at a decode step every cached key is
    within the window of the query, and softmax over a set of keys is order-free.
    """

    def __init__(self, window: int | None):
        self.window = window
        # window=None: preallocated buffers of ``capacity`` tokens, the first ``length`` filled; they
        # grow by an eighth (at least GROW_MIN tokens) when full, so a decode step writes one slot
        # instead of copying the whole cache (a torch.cat per token is O(T) a step, O(T^2) a reply).
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # tokens seen so far

    GROW_MIN = 256

    def _reserve(self, needed: int) -> None:
        """Full attention: make room for ``needed`` tokens (amortised O(1) per decoded token)."""
        capacity = self.k.shape[1]
        if needed <= capacity:
            return
        new = max(needed, capacity + max(self.GROW_MIN, capacity // 8))
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = old.new_empty(old.shape[0], new, *old.shape[2:])
            buf[:, : self.length] = old[:, : self.length]
            setattr(self, name, buf)

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt's keys/values ``[B,T,Hkv,D]`` (the cache must be empty)."""
        if self.length:
            raise RuntimeError("KVCache.prefill on a non-empty cache; continue with one token at a time")
        T = k.shape[1]
        self.length = T
        if self.window is None:
            self.k, self.v = k, v  # no copy: the prompt's own tensors until the first step grows them
            return
        W = self.window
        self.k = k.new_zeros(k.shape[0], W, *k.shape[2:])
        self.v = v.new_zeros(v.shape[0], W, *v.shape[2:])
        keep = min(T, W)
        if keep:
            slots = torch.arange(T - keep, T, device=k.device) % W
            self.k[:, slots] = k[:, T - keep :]
            self.v[:, slots] = v[:, T - keep :]

    def step(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one token ``[B,1,Hkv,D]``; return the keys/values its query sees (past + current)."""
        if k.shape[1] != 1:
            raise ValueError(f"KVCache.step takes one token at a time, got {k.shape[1]}")
        if self.window is None:
            if self.k is None:
                self.k, self.v = k.new_empty(k.shape[0], 0, *k.shape[2:]), v.new_empty(v.shape[0], 0, *v.shape[2:])
            self._reserve(self.length + 1)
            self.k[:, self.length] = k[:, 0]
            self.v[:, self.length] = v[:, 0]
            self.length += 1
            return self.k[:, : self.length], self.v[:, : self.length]
        W = self.window
        filled = min(self.length, W)  # before the ring wraps, slot p holds token p
        keys = torch.cat([self.k[:, :filled], k], dim=1)
        values = torch.cat([self.v[:, :filled], v], dim=1)
        if W:
            self.k[:, self.length % W] = k[:, 0]
            self.v[:, self.length % W] = v[:, 0]
        self.length += 1
        return keys, values


@dataclass
class LayerCache:
    kv: KVCache | None = None  # softmax branch
    state: torch.Tensor | None = None  # linear branch: [B, Hkv, Dk, Dv] fp32

    @property
    def empty(self) -> bool:
        return self.state is None and (self.kv is None or self.kv.length == 0)


@dataclass
class DecodeCache:
    layers: list[LayerCache] = field(default_factory=list)
    seq_len: int = 0  # position of the next token

    def memory_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.state is not None:
                total += layer.state.numel() * layer.state.element_size()
            if layer.kv is not None and layer.kv.k is not None:
                kv = layer.kv
                # The tokens held: the ring's W slots, or the filled part of a full-attention buffer
                # (whose spare capacity, at most an eighth + GROW_MIN tokens, is not counted).
                tokens = kv.k.shape[1] if kv.window is not None else kv.length
                total += 2 * kv.k[:, :tokens].numel() * kv.k.element_size()
        return total
