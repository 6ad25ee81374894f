"""Spike codings: expand integer spike counts into spike trains over time steps, exactly decodable.

A train is an int8 tensor ``[T, *counts.shape]`` (time first). Every coding has
``encode(counts, steps=None) -> train`` and ``decode(train) -> counts`` (int64) with
``decode(encode(s)) == s`` for every count in its range; :func:`time_steps` is ``T`` and
:func:`num_spikes` the number of nonzero entries (a -1 is one spike, of negative sign).

- ``binary``                {0,1}, rate code: ``s`` ones then zeros; T = max count. Non-negative
  counts only (a signed input is an error naming ``ternary`` and ``bitwise_bidirectional``).
- ``ternary``               {-1,0,1}: ``|s|`` steps of ``sign(s)``; T = max |count|.
- ``bitwise_pure``          {0,1}: the binary digits of ``s >= 0``, MSB first, step t of T weighs
  ``2^(T-1-t)``; spikes = popcount(s). 5 -> [1,0,1]: 3 steps, 2 spikes.
- ``bitwise_bidirectional`` {-1,0,1}: the bits of ``|s|`` (MSB first) each carrying ``sign(s)``
  (sign and magnitude in one ternary spike): -5 -> [-1,0,-1]: 3 steps, 2 spikes.
- ``twos_complement``       {0,1}: n-bit two's complement, MSB first, decode weights
  ``-2^(n-1), 2^(n-2), ..., 1``; range ``[-2^(n-1), 2^(n-1)-1]``. -5 with n=4 -> [1,0,1,1].

``steps`` fixes T (the bit width for the bitwise codings); None uses the smallest T that holds
every count of the input (at least 1). A T too small for a count is an error naming the count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TRAIN_DTYPE = torch.int8


class CodingError(ValueError):
    """Counts a coding cannot represent; the message names the value and an alternative."""


def _as_counts(counts: torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(counts)
    if counts.is_floating_point():
        if not torch.equal(counts, counts.round()):
            raise CodingError("spike counts must be integers; got a float tensor with fractional values")
    elif counts.dtype == torch.bool or counts.is_complex():
        raise CodingError(f"spike counts must be an integer tensor, got dtype {counts.dtype}")
    return counts.to(torch.int64)


def _max_abs(counts: torch.Tensor) -> int:
    return int(counts.abs().max()) if counts.numel() else 0


def _require_non_negative(counts: torch.Tensor, coding: str) -> None:
    if counts.numel() and int(counts.min()) < 0:
        raise CodingError(
            f"the {coding} coding needs non-negative counts, got {int(counts.min())}; for signed counts use "
            f"'ternary', 'bitwise_bidirectional' or 'twos_complement'"
        )


def _steps(needed: int, steps: int | None, coding: str) -> int:
    if steps is None:
        return max(1, needed)
    if steps < needed:
        raise CodingError(f"{coding}: steps={steps} is too few, the counts need {needed}; pass steps >= {needed}")
    return steps


def _bit_width(magnitude: int) -> int:
    return max(1, magnitude.bit_length())


def _bits_msb_first(values: torch.Tensor, width: int) -> torch.Tensor:
    """``[width, ...]`` 0/1 digits of the non-negative int64 ``values``, most significant first."""
    shifts = torch.arange(width - 1, -1, -1, device=values.device).view(-1, *([1] * values.dim()))
    return (values.unsqueeze(0) >> shifts) & 1


def _place_weights(train: torch.Tensor) -> torch.Tensor:
    """``2^(T-1-t)`` per step, shaped to broadcast against ``train``."""
    T = train.shape[0]
    return (2 ** torch.arange(T - 1, -1, -1, device=train.device, dtype=torch.int64)).view(-1, *([1] * (train.dim() - 1)))


def encode_binary(counts: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    counts = _as_counts(counts)
    _require_non_negative(counts, "binary")
    T = _steps(_max_abs(counts), steps, "binary")
    t = torch.arange(T, device=counts.device).view(-1, *([1] * counts.dim()))
    return (t < counts.unsqueeze(0)).to(TRAIN_DTYPE)


def encode_ternary(counts: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    counts = _as_counts(counts)
    T = _steps(_max_abs(counts), steps, "ternary")
    t = torch.arange(T, device=counts.device).view(-1, *([1] * counts.dim()))
    return ((t < counts.abs().unsqueeze(0)) * counts.sign().unsqueeze(0)).to(TRAIN_DTYPE)


def decode_rate(train: torch.Tensor) -> torch.Tensor:
    """binary and ternary: the count is the signed number of spikes."""
    return train.to(torch.int64).sum(0)


def encode_bitwise_pure(counts: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    counts = _as_counts(counts)
    _require_non_negative(counts, "bitwise_pure")
    T = _steps(_bit_width(_max_abs(counts)), steps, "bitwise_pure")
    return _bits_msb_first(counts, T).to(TRAIN_DTYPE)


def encode_bitwise_bidirectional(counts: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    counts = _as_counts(counts)
    T = _steps(_bit_width(_max_abs(counts)), steps, "bitwise_bidirectional")
    return (_bits_msb_first(counts.abs(), T) * counts.sign().unsqueeze(0)).to(TRAIN_DTYPE)


def decode_bitwise(train: torch.Tensor) -> torch.Tensor:
    """bitwise_pure and bitwise_bidirectional: sum of (signed) bits times ``2^(T-1-t)``."""
    return (train.to(torch.int64) * _place_weights(train)).sum(0)


def twos_complement_width(counts: torch.Tensor) -> int:
    """The smallest n with every count in ``[-2^(n-1), 2^(n-1)-1]`` (at least 1)."""
    counts = _as_counts(counts)
    if not counts.numel():
        return 1
    hi, lo = int(counts.max()), int(counts.min())
    return max(1, hi.bit_length() + 1 if hi > 0 else 1, (-lo - 1).bit_length() + 1 if lo < 0 else 1)


def encode_twos_complement(counts: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    counts = _as_counts(counts)
    needed = twos_complement_width(counts)
    if steps is not None and steps < needed:
        raise CodingError(
            f"twos_complement: {steps} bits hold [{-(2 ** (steps - 1))}, {2 ** (steps - 1) - 1}], but the counts span "
            f"[{int(counts.min())}, {int(counts.max())}]; pass steps >= {needed}"
        )
    T = steps if steps is not None else needed
    pattern = counts & ((1 << T) - 1)  # the unsigned T-bit pattern of a two's complement int64
    return _bits_msb_first(pattern, T).to(TRAIN_DTYPE)


def decode_twos_complement(train: torch.Tensor) -> torch.Tensor:
    weights = _place_weights(train).clone()
    weights[0] = -weights[0]  # the MSB weighs -2^(n-1)
    return (train.to(torch.int64) * weights).sum(0)


Encoder = Callable[..., torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]

CODINGS: dict[str, tuple[Encoder, Decoder]] = {
    "binary": (encode_binary, decode_rate),
    "ternary": (encode_ternary, decode_rate),
    "bitwise_pure": (encode_bitwise_pure, decode_bitwise),
    "bitwise_bidirectional": (encode_bitwise_bidirectional, decode_bitwise),
    "twos_complement": (encode_twos_complement, decode_twos_complement),
}
SIGNED_CODINGS = ("ternary", "bitwise_bidirectional", "twos_complement")


def _coding(name: str) -> tuple[Encoder, Decoder]:
    if name not in CODINGS:
        raise CodingError(f"spike coding {name!r} is unknown; use one of {tuple(CODINGS)}")
    return CODINGS[name]


def encode(counts: torch.Tensor, coding: str, steps: int | None = None) -> torch.Tensor:
    """The spike train ``[T, *counts.shape]`` (int8) of integer ``counts`` under ``coding``."""
    return _coding(coding)[0](counts, steps)


def decode(train: torch.Tensor, coding: str) -> torch.Tensor:
    """The int64 counts a train of ``coding`` encodes (exact inverse of :func:`encode`)."""
    return _coding(coding)[1](train)


def time_steps(train: torch.Tensor) -> int:
    return int(train.shape[0])


def num_spikes(train: torch.Tensor) -> int:
    """Total spikes in the train (a -1 counts as one spike)."""
    return int(torch.count_nonzero(train))


def spikes_per_element(train: torch.Tensor) -> torch.Tensor:
    """Spikes of each encoded count, shape ``train.shape[1:]`` (int64)."""
    return train.ne(0).sum(0)


__all__ = [
    "CODINGS", "SIGNED_CODINGS", "CodingError", "decode", "encode", "num_spikes", "spikes_per_element", "time_steps",
    "twos_complement_width",
]
