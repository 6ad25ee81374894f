"""The exported model's decode cache (``SbtrainCache``): transformers ``generate()`` with the cache,
batch 2 with left padding, picks the same 64 greedy tokens as sbtrain's own cached decoding of each
prompt alone (GLA + SWA, the 76B's hybrid with sinks + MoE, Gated DeltaNet + SWA, full + SWA with
YaRN), and the same tokens as ``generate(use_cache=False)``; a forward continued from a returned
cache equals one forward over the whole sequence; the GLA / SWA cache does not grow with the
context; the W8ASpike export decodes through the same cache; bad caches and masks are clear errors."""

from __future__ import annotations

import pytest
import torch

from sbtrain.export import export
from sbtrain.models import build_model, generate
from sbtrain.models.weights import save_weights
from sbtrain.spike.w8a import apply_w8aspike
from tests.export.test_hf_export import BASE, CONFIGS, VOCAB, load_hf

transformers = pytest.importorskip("transformers")

CACHE_CONFIGS = {
    "sb7b": CONFIGS["sb7b"],  # gla + swa
    "sb76b_shared": CONFIGS["sb76b_shared"],  # hybrid_swa + hybrid_full, 4 sinks, MoE
    "gdn": dict(BASE, name="gdn_test", layer_pattern=["gated_delta", "swa"]),
    "yarn": CONFIGS["yarn"],  # swa + full, YaRN
}
PROMPT_LENS, NEW_TOKENS, PAD = (9, 17), 64, 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models' tensors are tiny: intra-op threads gain nothing, and on a busy 2-core machine
    OpenMP's waiting threads made this file 10x slower (115 s against 8 s with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (sbtrain model, exported HF model), each exported once for the module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = build_model(CACHE_CONFIGS[name]).eval()
            root = tmp_path_factory.mktemp(name)
            save_weights(model.state_dict().items(), model.config, root / "weights")
            cache[name] = model, load_hf(export(root / "weights", root / "hf"))
        return cache[name]

    return get


def left_padded(lengths=PROMPT_LENS, seed: int = 3):
    """(prompts, ids [B, max], attention_mask [B, max]): random prompts padded on the left with PAD."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return prompts, ids, mask


def hf_greedy(hf, ids, mask, new_tokens: int, **kwargs):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
                       **kwargs)


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_cached_generate_matches_sbtrain_decoding(name, exported):
    model, hf = exported(name)
    prompts, ids, mask = left_padded()
    out = hf_greedy(hf, ids, mask, NEW_TOKENS, return_dict_in_generate=True)
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        expected = generate(model, prompt[None], NEW_TOKENS)[0, len(prompt):]  # sbtrain's cache, no padding
        assert torch.equal(out.sequences[row, width:], expected), (row, out.sequences[row, width:], expected)
    assert len(set(out.sequences[:, width:].flatten().tolist())) > 4  # not a degenerate constant generation
    # Decoded through the cache: it saw the prompt and every generated token but the last, one step each.
    assert type(out.cache).__name__ == "SbtrainCache"
    assert out.cache.get_seq_length() == width + NEW_TOKENS - 1
    assert out.cache.next_position.tolist() == [len(p) + NEW_TOKENS - 1 for p in prompts]
    # The mask matters: read as real tokens, the padding changes the short row's continuation.
    unmasked = hf_greedy(hf, ids, torch.ones_like(mask), 16)
    assert not torch.equal(unmasked[0, width:], out.sequences[0, width:width + 16])


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_continuing_a_returned_cache_equals_one_forward(name, exported):
    """Prompt, then 16 more tokens, then one, each forward continuing the cache the previous one
    returned (as ``cache=`` and as ``past_key_values=``), with padding in the prompt: the logits
    of every position equal one forward over the whole padded sequence."""
    _, hf = exported(name)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        whole = hf(ids, attention_mask=mask, use_cache=False)
        first = hf(ids[:, :13], attention_mask=mask[:, :13])
        second = hf(ids[:, 13:29], attention_mask=mask[:, :29], cache=first.cache)
        third = hf(ids[:, 29:], attention_mask=mask, past_key_values=second.cache)
    assert whole.cache is None and first.cache is second.cache is third.cache
    pieces = torch.cat([first.logits, second.logits, third.logits], dim=1)
    assert (pieces - whole.logits).abs().max().item() <= 1e-5, (pieces - whole.logits).abs().max().item()
    # The cache matters: the same continuation without it differs.
    with torch.no_grad():
        alone = hf(ids[:, 13:29], attention_mask=mask[:, 13:29], use_cache=False).logits
    assert (alone - whole.logits[:, 13:29]).abs().max().item() > 1e-3


def test_generate_continues_a_cache_from_a_forward(exported):
    """A cache a forward filled with the padded prompt but its last column, passed to generate() with
    the whole prompt (HF's convention: generate feeds the columns the cache has not seen), gives the
    tokens generate() gives from scratch."""
    _, hf = exported("sb76b_shared")
    _, ids, mask = left_padded(seed=11)
    fresh = hf_greedy(hf, ids, mask, 12)
    with torch.no_grad():
        cache = hf(ids[:, :-1], attention_mask=mask[:, :-1]).cache
    assert torch.equal(hf_greedy(hf, ids, mask, 12, cache=cache), fresh)


@pytest.mark.parametrize("name", ["sb7b", "sb76b_shared"])
def test_generate_with_and_without_cache_agree(name, exported):
    _, hf = exported(name)
    _, ids, mask = left_padded(seed=7)
    cached = hf_greedy(hf, ids, mask, 24)
    recomputed = hf_greedy(hf, ids, mask, 24, use_cache=False)
    assert torch.equal(cached, recomputed), (cached[:, ids.shape[1]:], recomputed[:, ids.shape[1]:])


def test_w8aspike_export_decodes_padded_batches_through_the_cache(tmp_path):
    """The W8ASpike folder (int8 weights, spiked inputs) decodes through the same cache: a left-padded
    batch gives, row by row, the tokens of sbtrain's fake-quant model decoding each prompt alone."""
    torch.manual_seed(0)
    model = build_model(CACHE_CONFIGS["sb76b_shared"]).eval()
    save_weights(model.state_dict().items(), model.config, tmp_path / "weights")
    hf = load_hf(export(tmp_path / "weights", tmp_path / "hf", format="w8aspike", w8a={"group_size": 16}))
    apply_w8aspike(model, k=3.0, group_size=16)
    prompts, ids, mask = left_padded()
    got = hf_greedy(hf, ids, mask, 24)
    for row, prompt in enumerate(prompts):
        assert torch.equal(got[row, ids.shape[1]:], generate(model, prompt[None], 24)[0, len(prompt):]), row


def test_gla_swa_cache_does_not_grow_with_the_context(exported):
    """sb7b (GLA + SWA, window W = 5 past tokens): after a 4096-token context the cache holds exactly
    the bytes it holds after 1024 tokens, and after more decoding steps: one fp32 state per GLA
    layer, a ring of W keys/values (+ real flags) per SWA layer. A full-attention layer's grows."""
    model, hf = exported("sb7b")
    cfg = model.config
    hd = cfg.resolved_head_dim
    W, B = cfg.sliding_window, 1
    kinds = cfg.layer_types()
    state = B * cfg.num_key_value_heads * hd * hd * 4
    ring = 2 * B * W * cfg.num_key_value_heads * hd * 4 + B * W  # keys, values (fp32), real flags (bool)
    expected = kinds.count("gla") * state + kinds.count("swa") * ring

    def cache_bytes(hf_model, context: int) -> int:
        ids = torch.randint(1, VOCAB, (B, context), generator=torch.Generator().manual_seed(context))
        return hf_greedy(hf_model, ids, None, 4, return_dict_in_generate=True).cache.tensor_bytes()

    assert cache_bytes(hf, 1024) == cache_bytes(hf, 4096) == expected
    _, full = exported("yarn")  # swa + full: the full layer keeps every key
    assert cache_bytes(full, 4096) > cache_bytes(full, 1024)


def test_bad_cache_and_mask_are_clear_errors(exported):
    _, hf = exported("sb7b")
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        with pytest.raises(TypeError, match="cache is a DynamicCache; an sbtrain model decodes with the SbtrainCache"):
            hf(ids, cache=transformers.DynamicCache())
        with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 1, 6, 6\) must be 2-D"):
            hf(ids, attention_mask=torch.ones(2, 1, 6, 6))
        cache = hf(ids).cache
        with pytest.raises(ValueError, match="the cache holds 2 rows but the input has 1"):
            hf(ids[:1, :1], cache=cache)
        with pytest.raises(ValueError, match="pass the cache once"):
            hf(ids[:, :1], cache=cache, past_key_values=cache)
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(1)
