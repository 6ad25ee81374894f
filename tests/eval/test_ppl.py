"""Perplexity, bits per byte and loss by position against hand computations with full logits:
non-overlapping windows, sliding windows (a hand loop after HF's perplexity guide), the bucket sums,
and an exported HF folder scored by transformers giving the same numbers as the sbtrain weights."""

from __future__ import annotations

import math

import pytest
import torch

from sbtrain.eval import (
    EvalError,
    evaluate_ppl,
    make_windows,
    read_texts,
    tokenize_stream,
)
from sbtrain.eval.loading import load_eval_model
from sbtrain.eval.loss_by_position import loss_by_position, position_buckets
from sbtrain.eval.ppl import measure_ppl


def hand_stream(texts, tokenizer, eod):
    """EOD d1 EOD d2 ...: the token list and which positions are text tokens."""
    tokens, scored = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += [eod, *ids]
        scored += [False] + [True] * len(ids)
    return tokens, scored


def target_logprobs(model, inputs: list[int], targets: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([inputs]), return_logits=True).logits[0].double()
    logp = logits.log_softmax(-1)
    return [logp[t, y].item() for t, y in enumerate(targets)]


def hand_sliding(model, tokens, scored, seq_len, stride):
    """HF's guide: windows start every `stride`, each scores only the targets past the previous end."""
    nll, count, prev_end, last = 0.0, 0, 0, len(tokens) - 1
    for begin in range(0, last, stride):
        end = min(begin + seq_len, last)
        new = end - prev_end
        logp = target_logprobs(model, tokens[begin:end], tokens[begin + 1:end + 1])
        for t in range(end - begin - new, end - begin):
            if scored[begin + t + 1]:
                nll -= logp[t]
                count += 1
        prev_end = end
        if end == last:
            break
    return nll, count


@pytest.fixture(scope="module")
def stream(texts, tokenizer):
    tok, eod = tokenizer
    return tokenize_stream(texts, tok, eod)


def test_stream_scores_every_text_token_once(texts, tokenizer, stream):
    tok, eod = tokenizer
    tokens, scored = hand_stream(texts, tok, eod)
    assert stream.tokens.tolist() == tokens and stream.scored.tolist() == scored
    assert stream.text_bytes == sum(len(t.encode("utf-8")) for t in texts)  # texts hold ü é ß: bytes != chars
    for seq_len, stride in [(16, 16), (16, 5), (7, 7), (10, 1)]:
        labels = torch.cat([w.labels for w in make_windows(stream, seq_len, stride)])
        kept = labels[labels != -100].tolist()
        assert kept == [t for t, s in zip(tokens, scored) if s], (seq_len, stride)


@pytest.mark.parametrize("seq_len,stride", [(16, None), (16, 6), (9, 9)])
def test_ppl_matches_hand_loop(model, tokenizer, texts, stream, seq_len, stride):
    tok, eod = tokenizer
    tokens, scored = hand_stream(texts, tok, eod)
    nll, count = hand_sliding(model, tokens, scored, seq_len, stride or seq_len)
    stats = evaluate_ppl(model, make_windows(stream, seq_len, stride), batch_size=3)
    assert stats.tokens == count == sum(scored)
    assert stats.nll_sum == pytest.approx(nll, rel=1e-5)
    assert stats.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_sliding_differs_from_non_overlapping(model, stream):
    # The SWA window is 6 but GLA carries state: more context changes the scores.
    assert evaluate_ppl(model, make_windows(stream, 8, 4)).nll_sum != pytest.approx(
        evaluate_ppl(model, make_windows(stream, 8)).nll_sum, rel=1e-6)


def test_bits_per_byte_and_model_mode_restored(weights_dir, texts, model):
    loaded = load_eval_model(str(weights_dir))
    loaded.model.train()
    row = measure_ppl(loaded, texts, seq_len=16)
    assert loaded.model.training  # the live model's mode is restored
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert row["bytes"] == text_bytes
    assert row["bpb"] == pytest.approx(row["nll_sum"] / (math.log(2) * text_bytes), rel=1e-12)
    stream = tokenize_stream(texts, loaded.tokenizer, loaded.eod_id)
    assert row["nll_sum"] == pytest.approx(evaluate_ppl(model, make_windows(stream, 16)).nll_sum, rel=1e-6)


def test_loss_by_position_buckets(model, tokenizer, texts, stream):
    tok, eod = tokenizer
    seq_len = 12
    result = loss_by_position(model, make_windows(stream, seq_len), seq_len, batch_size=2)
    buckets = result.buckets()
    assert [(b["start"], b["end"]) for b in buckets] == [(1, 2), (2, 4), (4, 8), (8, 13)]
    total = evaluate_ppl(model, make_windows(stream, seq_len))
    assert sum(b["tokens"] for b in buckets) == total.tokens
    assert sum(b["tokens"] * b["loss"] for b in buckets) == pytest.approx(total.nll_sum, rel=1e-6)
    # Position 1 by hand: the first target of every window, predicted from one token.
    tokens, scored = hand_stream(texts, tok, eod)
    firsts = [(tokens[b], tokens[b + 1]) for b in range(0, len(tokens) - 1, seq_len) if scored[b + 1]]
    nll = [-target_logprobs(model, [x], [y])[0] for x, y in firsts]
    assert buckets[0]["tokens"] == len(firsts)
    assert buckets[0]["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert position_buckets(torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.long))[-1]["end"] == 6


def test_hf_export_scores_like_sbtrain_weights(weights_dir, texts, tmp_path):
    pytest.importorskip("transformers")
    from sbtrain.export import export

    hf_dir = export(weights_dir, tmp_path / "hf")
    ours = measure_ppl(load_eval_model(str(weights_dir)), texts, seq_len=16, stride=8)
    hf = load_eval_model(str(hf_dir), backend="hf")
    assert hf.backend == "hf" and type(hf.model).__name__ == "SbtrainForCausalLM"
    theirs = measure_ppl(hf, texts, seq_len=16, stride=8)
    assert theirs["tokens"] == ours["tokens"]
    assert theirs["nll_sum"] == pytest.approx(ours["nll_sum"], rel=1e-5)
    assert theirs["bpb"] == pytest.approx(ours["bpb"], rel=1e-5)


def test_bad_input_names_the_fix(tmp_path, stream):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(EvalError, match="holds no text"):
        read_texts([str(empty)])
    with pytest.raises(EvalError, match=r"stride<=8"):
        make_windows(stream, 8, 9)
    with pytest.raises(EvalError, match="data.text_field"):
        read_texts([str(empty)], text_field="body")
    with pytest.raises(EvalError, match="matches no file"):
        read_texts([str(tmp_path / "missing.txt")])


def test_training_checkpoint_scores_like_weights_dir(weights_dir, model, tokenizer_dir, texts, tmp_path):
    from omegaconf import OmegaConf

    from sbtrain.trainer.checkpoint import Checkpointer

    meta = {"config": {"model": OmegaConf.to_container(OmegaConf.structured(model.config))}}
    Checkpointer(tmp_path / "run" / "checkpoints").save(2, {"model": dict(model.state_dict())}, meta)
    with pytest.raises(EvalError, match="tokenizer.path"):  # no manifest names a tokenizer: the error says so
        load_eval_model(str(tmp_path / "run"))
    from_run = measure_ppl(load_eval_model(str(tmp_path / "run"), tokenizer_path=tokenizer_dir), texts, seq_len=16)
    assert from_run["nll_sum"] == pytest.approx(measure_ppl(load_eval_model(str(weights_dir)), texts, 16)["nll_sum"],
                                                rel=1e-6)
