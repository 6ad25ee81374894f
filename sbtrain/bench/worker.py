"""One measurement point, run in a fresh interpreter by :func:`sbtrain.bench.common.run_worker`
(``python -m sbtrain.bench.worker '<json spec>'``) or in-process for quick runs.

``kind="train"``: one forward + backward of a model at T tokens (chunked cross-entropy, the
chosen activation checkpointing, no optimizer state); peak resident-set growth over the RSS
after the model is built. ``kind="decode"``: a decode cache at context T (random keys/values,
or a real prefill), then ``new_tokens`` greedy decode steps per repeat; the peak RSS while
decoding over the RSS of the bare model (cache + decode working memory), over the RSS just
before the steps (growth during decoding), and decode tokens/s. Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import gc
import json
import re
import resource
import statistics
import sys
import time

import torch

from sbtrain.bench.config import model_config
from sbtrain.models import build_model, decode_step, prefill
from sbtrain.models.cache import DecodeCache, KVCache

RESULT_PREFIX = "RESULT "
SEED_TOKENS = 16  # a real prefill this long builds every layer's cache before it is stretched to T


# -- resident-set probes (also re-exported by sbtrain.bench.common) --------------------------------
def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def reset_peak_rss() -> str:
    """Reset the kernel's resident-set high-water mark (VmHWM); else fall back to ru_maxrss,
    which is monotonic over the process (exact only in a fresh process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_rss_kb(method: str) -> int:
    return status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@torch.no_grad()
def fill_cache(model, T: int, fill: str = "synthetic", seed: int = 0, kv_device=None) -> tuple[torch.Tensor, DecodeCache]:
    """``(last logits, cache)`` as after a prompt of ``T`` tokens.

    ``fill="prefill"`` runs the real prefill. ``"synthetic"`` prefills a few tokens, then refills
    every softmax layer's KVCache (through its own ``prefill``, so the ring logic is the real one)
    with T random keys/values and sets the position to T: decode time and memory do not depend on
    the values, and a quadratic model's 128k prefill is not paid. ``kv_device="meta"`` allocates
    nothing (for counting bytes only; such a cache cannot decode)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    if fill == "prefill":
        return prefill(model, torch.randint(0, vocab, (1, T), generator=gen))
    logits, cache = prefill(model, torch.randint(0, vocab, (1, min(T, SEED_TOKENS)), generator=gen))
    for layer in cache.layers:
        if layer.kv is None:
            continue
        old, window = layer.kv.k, layer.kv.window
        # A ring keeps only its last W tokens: make just those (no T-long temporary whose freed
        # pages would stay resident and count as decode memory), then advance the position to T.
        kept = T if window is None else min(T, window)
        shape = (old.shape[0], kept, *old.shape[2:])
        device = kv_device or old.device
        make = torch.empty if str(device) == "meta" else torch.randn
        layer.kv = KVCache(window)
        layer.kv.prefill(make(shape, dtype=old.dtype, device=device), make(shape, dtype=old.dtype, device=device))
        layer.kv.length = T  # ring slot order is free (see KVCache): the W kept tokens stand for T - W .. T - 1
    cache.seq_len = T
    return logits, cache


def measure_train(spec: dict) -> dict:
    from parallel.activation_checkpoint import apply_activation_checkpointing

    cfg = model_config(spec["model"], spec.get("model_overrides", ()))
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(cfg).train()
    apply_activation_checkpointing(model.model.layers, spec.get("activation_checkpointing", "full"))
    T = spec["seq_len"]
    ids = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(spec.get("seed", 0)))
    gc.collect()
    rss_built = status_kb("VmRSS")
    method = reset_peak_rss()
    start = time.perf_counter()
    out = model(ids[:, :-1], labels=ids[:, 1:])
    loss = out.loss_sum / out.num_tokens
    loss.backward()
    elapsed = time.perf_counter() - start
    return {"peak_mb": (peak_rss_kb(method) - rss_built) / 1024, "rss_built_mb": rss_built / 1024,
            "fwd_bwd_s": elapsed, "loss": float(loss.detach()), "memory_method": method}


def measure_decode(spec: dict) -> dict:
    cfg = model_config(spec["model"], spec.get("model_overrides", ()))
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(cfg).eval()
    T, n = spec["seq_len"], spec["new_tokens"]
    gc.collect()
    rss_model = status_kb("VmRSS")
    start = time.perf_counter()
    logits, cache = fill_cache(model, T, spec.get("fill", "synthetic"), spec.get("seed", 0))
    fill_s = time.perf_counter() - start
    cache_bytes = cache.memory_bytes()
    token = logits.argmax(-1)
    logits = decode_step(model, token, cache)  # warm-up step, untimed (first-call costs)
    token = logits.argmax(-1)
    gc.collect()
    rss_before = status_kb("VmRSS")
    method = reset_peak_rss()
    runs = []
    for _ in range(spec.get("repeats", 1)):
        start = time.perf_counter()
        for _ in range(n):
            token = decode_step(model, token, cache).argmax(-1)
        runs.append(n / (time.perf_counter() - start))
    peak = peak_rss_kb(method)
    return {"decode_resident_mb": (peak - rss_model) / 1024, "growth_during_decode_mb": (peak - rss_before) / 1024,
            "rss_model_mb": rss_model / 1024, "rss_before_decode_mb": rss_before / 1024,
            "tokens_per_s": statistics.median(runs), "tokens_per_s_runs": runs, "cache_bytes": cache_bytes,
            "cache_bytes_after": cache.memory_bytes(), "fill_s": fill_s, "memory_method": method}


def measure(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    kind = spec["kind"]
    if kind == "train":
        return measure_train(spec)
    if kind == "decode":
        return measure_decode(spec)
    raise ValueError(f"unknown measurement kind {kind!r}")


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
