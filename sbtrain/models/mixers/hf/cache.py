"""The exported model's decode cache (transformers ``Cache``), as sbtrain's own ``models/cache.py``:
per layer the softmax branch's keys/values (every past column for full attention, a ring of the
last W for sliding-window attention) and the linear branch's recurrent state (constant size), plus
each row's count of real tokens (the position of its next token). Sink tokens are parameters, not
cache. Padding columns are kept with ``real=False`` (no later query attends to them) and never
reach a recurrent state (the mixers zero their write and decay). Plain torch + transformers:
pasted into the export (see ``__init__``)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

# --- exported code below ---


def position_ids_from(start: torch.Tensor | None, real: torch.Tensor | None, batch: int, length: int,
                      device) -> torch.Tensor:
    """``[B,T]`` positions of T new columns: each row counts its real tokens only, from ``start`` ``[B]``
    (a cache's ``next_position``; None: 0), so with left padding the first real token is position 0;
    padding columns get 0, as HF derives positions from attention_mask."""
    if start is None:
        start = torch.zeros(batch, dtype=torch.long, device=device)
    if real is None:
        return start[:, None] + torch.arange(length, device=device)
    return (start[:, None] + real.long().cumsum(-1) - 1).masked_fill(~real, 0)


class SbtrainKV:
    """Keys (after RoPE), values and a real-token flag per column of one softmax branch.

    ``window=None`` keeps every column in a buffer that grows by an eighth (at least GROW_MIN
    columns) when full, so a decode step writes one slot instead of copying the cache.
    ``window=W`` keeps a ring of W slots, column c in slot ``c % W``: whatever the context length,
    exactly the W columns a new query can still reach."""

    GROW_MIN = 256

    def __init__(self, window: int | None):
        self.window = window
        self.k = self.v = self.real = None  # [B, slots, Hkv, D] x2, [B, slots] bool
        self.length = 0  # columns seen (padding included)

    def extend(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None):
        """Add T columns (k/v ``[B,T,Hkv,D]``, real ``[B,T]`` bool or None: all real); return what their
        queries attend over: ``(keys, values, key_real, first column)``, the keys being consecutive
        columns that end with the T new ones."""
        if real is None:
            real = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        if self.window is None:
            return self._extend_full(k, v, real)
        return self._extend_ring(k, v, real)

    def _extend_full(self, k, v, real):
        L, T = self.length, k.shape[1]
        if self.k is None:
            # The prompt's own tensors, no copy (``real`` may be shared with other layers): the next
            # extend finds the buffer full and moves them into buffers of this layer's own.
            self.k, self.v, self.real = k, v, real
        else:
            self._reserve(L + T)
            self.k[:, L:L + T], self.v[:, L:L + T], self.real[:, L:L + T] = k, v, real
        self.length = L + T
        return self.k[:, :L + T], self.v[:, :L + T], self.real[:, :L + T], 0

    def _reserve(self, needed: int) -> None:
        capacity = self.k.shape[1]
        if needed <= capacity:
            return
        new = max(needed, capacity + max(self.GROW_MIN, capacity // 8))
        for name in ("k", "v", "real"):
            old = getattr(self, name)
            buf = old.new_zeros(old.shape[0], new, *old.shape[2:])
            buf[:, :self.length] = old[:, :self.length]
            setattr(self, name, buf)

    def _extend_ring(self, k, v, real):
        W, L, T = self.window, self.length, k.shape[1]
        if self.k is None:
            self.k, self.v = k.new_zeros(k.shape[0], W, *k.shape[2:]), v.new_zeros(v.shape[0], W, *v.shape[2:])
            self.real = real.new_zeros(real.shape[0], W)
        held = min(L, W)
        order = torch.arange(L - held, L, device=k.device) % max(W, 1)  # the held columns, oldest first
        keys = torch.cat([self.k[:, order], k], dim=1)  # indexing copies: the ring may be overwritten below
        values = torch.cat([self.v[:, order], v], dim=1)
        key_real = torch.cat([self.real[:, order], real], dim=1)
        keep = min(T, W)
        if keep:
            slots = torch.arange(L + T - keep, L + T, device=k.device) % W
            self.k[:, slots], self.v[:, slots], self.real[:, slots] = k[:, T - keep:], v[:, T - keep:], real[:, T - keep:]
        self.length = L + T
        return keys, values, key_real, L - held

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.real) if t is not None]

    def select_rows(self, index: torch.Tensor) -> None:
        for name in ("k", "v", "real"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, index))


class SbtrainLayerCache:
    """One layer's decode state: ``kv`` (softmax branch) and/or ``state`` (the linear branch's
    ``[B,Hkv,Dk,Dv]`` in fp32, or fp64 for an fp64 model); the hybrid layers hold both."""

    def __init__(self):
        self.kv: SbtrainKV | None = None
        self.state: torch.Tensor | None = None

    def softmax_cache(self, window: int | None) -> SbtrainKV:
        if self.kv is None:
            self.kv = SbtrainKV(window)
        return self.kv

    def tensors(self) -> list[torch.Tensor]:
        return (self.kv.tensors() if self.kv is not None else []) + ([self.state] if self.state is not None else [])

    def select_rows(self, index: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv.select_rows(index)
        if self.state is not None:
            self.state = self.state.index_select(0, index)


class SbtrainCache(Cache):
    """The decode cache of an exported sbtrain model: :class:`SbtrainLayerCache` per layer.

    The model's forward creates it (``use_cache=True``; ``generate()`` does not build a
    ``DynamicCache`` for this model) and returns it; pass it back as ``cache=`` (or its older name
    ``past_key_values=``) with the next tokens. ``get_seq_length()`` counts columns, padding
    included (what ``generate()`` slices inputs by); ``next_position`` counts each row's real
    tokens. A recurrent state cannot be rolled back, so ``crop`` (assisted decoding) is refused."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[SbtrainLayerCache() for _ in range(num_layers)])
        self.columns = 0
        self.next_position: torch.Tensor | None = None  # [B] long

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: windowed and linear layers are constant size, full layers grow

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers 4.x's name
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.columns > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [layer.kv is not None and layer.kv.window is not None for layer in self.layers]

    @property
    def is_linear(self) -> list[bool]:
        return [layer.kv is None and layer.state is not None for layer in self.layers]

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def batch_size(self) -> int:
        return -1 if self.next_position is None else self.next_position.shape[0]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        raise NotImplementedError("SbtrainCache is filled by the sbtrain mixers themselves (cache.layers[i]); "
                                  "it has no HF-style update()")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"SbtrainCache cannot remove {tokens_to_remove} tokens: linear-attention states "
                                  "cannot be rolled back (assisted / speculative decoding is not supported)")

    def reset(self) -> None:
        self.layers = [SbtrainLayerCache() for _ in self.layers]
        self.columns, self.next_position = 0, None

    def check_batch(self, batch: int) -> None:
        if self.next_position is not None and self.next_position.shape[0] != batch:
            raise ValueError(f"the cache holds {self.next_position.shape[0]} rows but the input has {batch}; "
                             "continue a cache with the same batch it was filled with")

    def advance(self, real: torch.Tensor | None, batch: int, length: int, device) -> None:
        """Count T columns seen by every layer, and each row's real tokens among them."""
        start = self.next_position if self.next_position is not None else torch.zeros(batch, dtype=torch.long,
                                                                                      device=device)
        self.next_position = start + (length if real is None else real.long().sum(-1))
        self.columns += length

    def tensor_bytes(self) -> int:
        """Bytes of every tensor the cache holds (a full layer's spare capacity included)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(indices)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.batch_size
        if rows > 0:
            self.batch_select_indices(torch.arange(rows, device=self.next_position.device).repeat_interleave(repeats))
