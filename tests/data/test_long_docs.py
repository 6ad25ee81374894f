"""Long documents are tokenized in bounded pieces with the ids of whole-document tokenization (issue 21)."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from sbtrain.data.tokenizer import encode_texts, split_is_exact, split_long
from tests.corpus import make_docs

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _mixed_text(n_docs: int, seed: int) -> str:
    """Real-looking text with every kind of seam: single / double spaces, tabs, CRLF, blank lines, code, digits."""
    rng = random.Random(seed)
    seps = [" ", "  ", "\n", "\n\n", "\r\n", "\t", ". ", ",\n", " (x) ", "\n    ", " 1234 ", "'s ", "文字"]
    return "".join(d + rng.choice(seps) for d in make_docs(n_docs, seed=seed))


def _hf(tokenizer_object):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, eos_token="<|endoftext|>")


def _trained(pre_tokenizer, normalizer=None, decoder=None):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    tok.train_from_iterator([_mixed_text(200, 1)], trainer=trainer)
    return _hf(tok)


def test_pieces_give_whole_document_ids(corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    text = _mixed_text(300, 7)
    assert len(split_long(text, 200)) > 50 and "".join(split_long(text, 200)) == text
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert split_is_exact(tok)
    got = encode_texts(tok, [text, "short one", ""], piece_chars=200, call_chars=1000)
    assert got[0].tolist() == whole and got[0].dtype == np.int32
    assert got[1].tolist() == tok("short one", add_special_tokens=False)["input_ids"] and got[2].size == 0


def test_qwen2_style_split_is_exact_and_sentencepiece_style_falls_back():
    from tokenizers import Regex, normalizers, pre_tokenizers

    qwen_like = _trained(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), normalizers.NFC())
    text = _mixed_text(300, 9)
    assert split_is_exact(qwen_like)
    assert encode_texts(qwen_like, [text], piece_chars=150)[0].tolist() == \
        qwen_like(text, add_special_tokens=False)["input_ids"]
    # A Metaspace tokenizer prepends "▁" to every call: cutting would add one; it gets whole documents.
    sp_like = _trained(pre_tokenizers.Metaspace(prepend_scheme="always"))
    assert not split_is_exact(sp_like)
    assert encode_texts(sp_like, [text], piece_chars=150)[0].tolist() == \
        sp_like(text, add_special_tokens=False)["input_ids"]


def test_a_long_run_without_spaces_is_cut_at_the_limit():
    text = "x" * 25 + " tail"
    assert split_long(text, 10) == ["x" * 10, "x" * 10, "xxxxx tail"]
    assert split_long("aa bb cc dd ee", 6) == ["aa bb", " cc", " dd ee"]  # the last cut point in the 2nd half


MEMORY_PROBE = """
import json, resource, sys
from sbtrain.data.build import encode_batch
from sbtrain.data.tokenizer import load_tokenizer

tok_path, size = sys.argv[1], int(sys.argv[2])
block = open(sys.argv[3]).read()
text = (block * (size // len(block) + 1))[:size]  # one line of `size` characters, built without big temporaries
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
encode_batch(["warm up"], tok_path, None)
base = peak()
new = encode_batch([text], tok_path, None)["input_ids"][0]
new_growth = peak() - base
tok, _ = load_tokenizer(tok_path)
old = tok([text], add_special_tokens=False)["input_ids"][0]  # the old path: the whole document in one call
old_growth = peak() - base
print(json.dumps({"new": new_growth / size, "old": old_growth / size, "same": new[:-1].tolist() == old}))
"""


def test_multi_megabyte_single_line_in_bounded_memory(corpus, tmp_path):
    block = " ".join(d.replace("\n", " ") for d in make_docs(400, seed=4))  # ~40 kB, one line
    (tmp_path / "block.txt").write_text(block, encoding="utf-8")
    size = 4 << 20
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, corpus["tokenizer"], str(size),
                          str(tmp_path / "block.txt")], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    ratio = json.loads(res.stdout.strip().splitlines()[-1])
    assert ratio["same"]
    assert ratio["new"] < 60, ratio  # bytes of peak RSS growth per character of the document
    assert ratio["old"] > 60, ratio  # what one whole-document call costs (about 190x)


@pytest.mark.parametrize("streaming", [False, True])
def test_build_tokenizes_long_documents_like_whole_ones(tmp_path, corpus, streaming, monkeypatch):
    from sbtrain.config.data import TokenizerConfig
    from sbtrain.data import tokenizer as tokmod

    from .conftest import build

    text = _mixed_text(400, 3)
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    tok = TokenizerConfig(kind="pretrained", path=corpus["tokenizer"])
    m_whole, _ = build(tmp_path, [tmp_path / "long.txt"], name="whole", tokenizer=tok, streaming=streaming)
    monkeypatch.setattr(tokmod, "PIECE_CHARS", 300)  # many pieces in this small document
    monkeypatch.setattr(tokmod.encode_texts, "__defaults__", (300, 1000))
    m_cut, _ = build(tmp_path, [tmp_path / "long.txt"], name="cut", tokenizer=tok, streaming=streaming)
    assert m_cut["fingerprint"] == m_whole["fingerprint"] and m_cut["num_documents"] == 1
