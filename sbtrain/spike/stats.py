"""Streaming statistics of spike counts (docs/DESIGN_NOTES.md §5): zero fraction, |s| histogram, spikes per
channel under each coding, silent channels, and the report's "N-step window" sparsity.

:class:`SpikeStats` is the ``recorder`` of :func:`sbtrain.models.spiking.apply_spiking`: it gets
``(module_name, int32 counts [..., d])`` for every spiked call and keeps, per spiked module, only a
histogram of the signed count values (a few hundred distinct values at most), the number of rows
(token-channel vectors) seen and one "ever nonzero" flag per channel. Every figure below is a
function of those, so memory does not grow with the data and the overall figures are the merged
histograms (each (token, channel) entry weighs the same, whatever its layer).

Figures (``entries`` = token-channel pairs seen):

- ``zero_fraction``: share of counts equal to 0.
- ``abs_histogram``: share of entries with ``|s|`` = 0, 1, ..., 15 and ``>15`` (17 bins).
- ``codings[c]``: ``spikes_per_channel`` (mean spikes one count emits under coding ``c``, taken
  from :func:`sbtrain.spike.codings.encode`, never re-derived), ``time_steps`` (T the coding needs
  for the largest count seen) and ``train_sparsity`` (zero share of the T-step trains). ``binary``
  cannot encode signed counts (a :class:`~sbtrain.spike.codings.CodingError` by design), so it is
  reported on ``|s|`` (the sign travels separately) and labelled ``binary_abs``; likewise
  ``bitwise_pure_abs``.
- ``silent_channel_fraction``: channels whose count was 0 on every token seen.

The "3-step window" sparsity. The report quotes 69.15% at k=3 for the 7B without saying how the
counts become 3-step trains. Each reading below is the share of zero (no spike) entries among all
time steps of all channels, with ``W = window`` (3) steps per window:

- ``bitwise_carry`` (PRIMARY): bitwise-bidirectional coding in windows of W steps. ``|s| <= 2^W-1``
  (7 for W=3) fits one window and emits popcount(|s|) spikes; a larger count carries its higher bits
  into extra windows: ``W * ceil(bitlen(|s|) / W)`` steps, popcount(|s|) spikes. A zero count still
  occupies one silent window.
- ``bitwise_clamp``: as above but ``|s|`` is clamped to ``2^W - 1`` (one window per count; counts
  above 7 become 7 = three spikes).
- ``ternary_clamp``: ternary rate code in one window: ``min(|s|, W)`` spikes out of W steps.
- ``ternary_carry``: ternary rate code, ``|s|`` spikes spread over ``W * max(1, ceil(|s| / W))``
  steps (counts above W carry into extra windows).
- ``zero_count``: a channel's whole window is silent iff its count is 0: the plain zero fraction.

Hand example (W=3): s=5 -> bitwise 101: 3 steps, 2 spikes; s=-9 -> bits 1001: carry 6 steps, 2
spikes, clamp 7=111: 3 steps, 3 spikes; ternary clamp 3 of 3, ternary carry 9 spikes in 9 steps.
"""

from __future__ import annotations

from collections import Counter

import torch

from sbtrain.spike.codings import CODINGS, encode, spikes_per_element, time_steps

HIST_BINS = 16  # |s| = 0..15, then one ">15" bin
WINDOW_READINGS = ("bitwise_carry", "bitwise_clamp", "ternary_clamp", "ternary_carry", "zero_count")
PRIMARY_READING = "bitwise_carry"


UNSIGNED_CODINGS = ("binary", "bitwise_pure")  # measured on |s|: they cannot encode a sign


def coding_label(coding: str) -> str:
    """The name a coding's figures carry in a report (the unsigned codings are measured on |s|)."""
    return f"{coding}_abs" if coding in UNSIGNED_CODINGS else coding


class LayerCounts:
    """The streaming tallies of one spiked module: signed count histogram, rows, channel activity."""

    def __init__(self, channels: int):
        self.channels = channels
        self.values: Counter[int] = Counter()
        self.rows = 0
        self.active = torch.zeros(channels, dtype=torch.bool)

    def update(self, counts: torch.Tensor) -> None:
        flat = counts.detach().reshape(-1, counts.shape[-1]).to("cpu", torch.int64)
        if flat.shape[1] != self.channels:
            raise ValueError(f"counts have {flat.shape[1]} channels, this module had {self.channels} before")
        self.rows += flat.shape[0]
        if not flat.numel():
            return
        self.active |= flat.ne(0).any(0)
        low = int(flat.min())
        # bincount over the shifted values is O(n); |s| <= k * d bounds its length.
        tally = torch.bincount((flat - low).flatten())
        for offset in tally.nonzero().flatten().tolist():
            self.values[offset + low] += int(tally[offset])

    @property
    def silent_channels(self) -> int:
        return int((~self.active).sum())


def _coding_figures(values: torch.Tensor, weights: torch.Tensor, entries: int) -> dict:
    """Per coding: mean spikes per channel, time steps T and the zero share of the trains."""
    figures = {}
    for coding in CODINGS:
        train = encode(values.abs() if coding in UNSIGNED_CODINGS else values, coding)
        spikes = float((spikes_per_element(train) * weights).sum())
        steps = time_steps(train)
        figures[coding_label(coding)] = {
            "spikes_per_channel": spikes / entries,
            "time_steps": steps,
            "train_sparsity": 1.0 - spikes / (entries * steps),
        }
    return figures


def window_readings(values: torch.Tensor, weights: torch.Tensor, window: int = 3) -> dict:
    """The zero share of each N-step window reading (module docstring) for a count histogram."""
    magnitude = values.abs()
    bits = torch.tensor([max(1, int(v).bit_length()) for v in magnitude.tolist()], dtype=torch.int64)
    popcount = spikes_per_element(encode(values, "bitwise_bidirectional"))
    clamped_bits = spikes_per_element(encode(magnitude.clamp(max=2**window - 1), "bitwise_bidirectional",
                                             steps=window))
    ternary_clamped = spikes_per_element(encode(magnitude.clamp(max=window), "ternary", steps=window))
    ternary_all = spikes_per_element(encode(values, "ternary"))
    ones = torch.ones_like(values)
    readings = {
        "bitwise_carry": (popcount, window * (-(-bits // window))),
        "bitwise_clamp": (clamped_bits, window * ones),
        "ternary_clamp": (ternary_clamped, window * ones),
        "ternary_carry": (ternary_all, window * (-(-magnitude // window)).clamp(min=1)),
        "zero_count": (values.ne(0).long(), ones),
    }
    return {name: 1.0 - float((spikes * weights).sum()) / float((steps * weights).sum())
            for name, (spikes, steps) in readings.items()}


def summarize(values: Counter, window: int = 3) -> dict:
    """Every histogram-derived figure of a count histogram ``{signed count: occurrences}``."""
    entries = sum(values.values())
    if not entries:
        return {"entries": 0}
    keys = sorted(values)
    vals = torch.tensor(keys, dtype=torch.int64)
    weights = torch.tensor([values[v] for v in keys], dtype=torch.int64)
    hist = [0] * (HIST_BINS + 1)
    for v, n in zip(keys, weights.tolist()):
        hist[min(abs(v), HIST_BINS)] += n
    return {
        "entries": entries,
        "zero_fraction": values.get(0, 0) / entries,
        "mean_abs_count": float((vals.abs() * weights).sum()) / entries,
        "max_abs_count": int(vals.abs().max()),
        "abs_histogram": {**{str(i): hist[i] / entries for i in range(HIST_BINS)}, f">{HIST_BINS - 1}":
                          hist[HIST_BINS] / entries},
        "codings": _coding_figures(vals, weights, entries),
        "window": {"steps": window, "primary": PRIMARY_READING, **window_readings(vals, weights, window)},
    }


class SpikeStats:
    """Recorder for :func:`apply_spiking` that accumulates the figures of every spiked module."""

    def __init__(self, window: int = 3):
        if window < 1:
            raise ValueError(f"window={window} must be >= 1 time step")
        self.window = window
        self.layers: dict[str, LayerCounts] = {}
        self.tokens = 0

    def __call__(self, name: str, counts: torch.Tensor) -> None:
        if name not in self.layers:
            self.layers[name] = LayerCounts(counts.shape[-1])
        self.layers[name].update(counts)

    def add_tokens(self, n: int) -> None:
        """Tokens fed to the model (for rows per token: 1 for dense layers, top_k for routed experts)."""
        self.tokens += int(n)

    def rows_per_token(self, name: str) -> float:
        return self.layers[name].rows / self.tokens if self.tokens else 0.0

    def layer_summary(self, name: str) -> dict:
        layer = self.layers[name]
        return {"channels": layer.channels, "rows": layer.rows, "rows_per_token": self.rows_per_token(name),
                "silent_channel_fraction": layer.silent_channels / layer.channels,
                **summarize(layer.values, self.window)}

    def summary(self) -> dict:
        merged: Counter[int] = Counter()
        for layer in self.layers.values():
            merged.update(layer.values)
        channels = sum(layer.channels for layer in self.layers.values())
        silent = sum(layer.silent_channels for layer in self.layers.values())
        overall = {"channels": channels, "silent_channel_fraction": silent / channels if channels else 0.0,
                   **summarize(merged, self.window)}
        return {"tokens": self.tokens, "window": self.window, "overall": overall,
                "layers": {name: self.layer_summary(name) for name in self.layers}}


__all__ = ["HIST_BINS", "PRIMARY_READING", "UNSIGNED_CODINGS", "WINDOW_READINGS", "LayerCounts", "SpikeStats", "coding_label",
           "summarize", "window_readings"]
