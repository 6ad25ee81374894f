"""prefill(T) + decode steps agree with full forwards, with a SWA window small enough that the
ring cache wraps; greedy generate equals argmax of repeated full forwards."""

from __future__ import annotations

import pytest
import torch

from sbtrain.models import decode_step, generate, prefill
from tests.models.helpers import tiny_model

SMALL_WINDOW = ["model.sliding_window=8", "model.vocab_size=1024", "model.init_std=0.05"]
CASES = {
    "qwen2_tiny": ("qwen2_tiny", []),
    "qwen2_tiny_swa": ("qwen2_tiny", ["model.layer_pattern=[swa,full]"]),
    "sb7b_tiny": ("sb7b_tiny", []),
    "sb76b_tiny_shared": ("sb76b_tiny", []),
    "sb76b_tiny_separate": ("sb76b_tiny", ["model.hybrid.share_branch_projections=false"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_matches_forward(case):
    name, overrides = CASES[case]
    model = tiny_model(name, SMALL_WINDOW + overrides)
    T, steps = 37, 3  # T > window: the SWA ring has wrapped several times before decoding
    ids = torch.randint(0, model.config.vocab_size, (2, T + steps))
    with torch.no_grad():
        full = model(ids, return_logits=True).logits
        last, cache = prefill(model, ids[:, :T])
        torch.testing.assert_close(last, full[:, T - 1], atol=1e-5, rtol=1e-5)
        for s in range(steps):
            logits = decode_step(model, ids[:, T + s], cache)
            torch.testing.assert_close(logits, full[:, T + s], atol=1e-5, rtol=1e-5)
    # Constant-size state: SWA layers keep exactly W entries, GLA layers a [B,Hkv,D,D] state.
    for kind, layer in zip(model.config.layer_types(), cache.layers):
        if kind in ("swa", "hybrid_swa"):
            assert layer.kv.k.shape[1] == model.config.sliding_window
        if kind in ("gla", "hybrid_swa", "hybrid_full"):
            assert layer.state.shape == (2, model.config.num_key_value_heads, 64, 64)
        if kind in ("full", "hybrid_full"):
            assert layer.kv.length == T + steps <= layer.kv.k.shape[1]  # preallocated, spare slots


def test_greedy_generate_equals_repeated_forward_argmax():
    model = tiny_model("sb76b_tiny", SMALL_WINDOW)
    prompt = torch.randint(0, model.config.vocab_size, (2, 10))
    out = generate(model, prompt, max_new_tokens=5)
    expected = prompt
    with torch.no_grad():
        for _ in range(5):
            nxt = model(expected, return_logits=True).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(out, expected)


def test_sampling_with_top_k_stays_in_top_k():
    model = tiny_model("sb7b_tiny", SMALL_WINDOW)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    gen = torch.Generator().manual_seed(1)
    out = generate(model, prompt, max_new_tokens=1, temperature=1.0, top_k=3, generator=gen)
    with torch.no_grad():
        top3 = model(prompt, return_logits=True).logits[0, -1].topk(3).indices
    assert out[0, -1] in top3


def test_full_attention_cache_writes_in_place_and_grows_by_an_eighth():
    """A decode step writes one slot of a preallocated buffer; no per-token copy of the cache."""
    from sbtrain.models.cache import KVCache

    cache = KVCache(None)
    k = torch.randn(1, 2000, 2, 8)
    cache.prefill(k, k.clone())
    keys, _ = cache.step(torch.ones(1, 1, 2, 8), torch.ones(1, 1, 2, 8))
    grown = cache.k.shape[1]
    assert grown == 2000 + max(KVCache.GROW_MIN, 2000 // 8)
    assert torch.equal(keys[:, :2000], k) and torch.equal(keys[:, 2000], torch.ones(1, 2, 8))
    ptr = cache.k.data_ptr()
    for i in range(grown - 2001):
        keys, _ = cache.step(torch.full((1, 1, 2, 8), float(i)), torch.zeros(1, 1, 2, 8))
    assert cache.k.data_ptr() == ptr and keys.shape[1] == grown  # filled without reallocating
    assert torch.equal(keys[:, -1], torch.full((1, 2, 8), float(grown - 2002)))
