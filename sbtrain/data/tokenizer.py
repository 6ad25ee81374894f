"""Tokenizers: a local HF folder, or a byte-level BPE trained on the corpus (development).

A trained BPE is saved as a normal HF tokenizer folder (tokenizer.json + config) so that
``AutoTokenizer.from_pretrained(folder)`` loads it later, with the EOD token as its eos_token.

Long documents are tokenized in pieces (:func:`encode_texts`): a fast tokenizer holds about 190
bytes per character of its input while encoding (offsets, alignments, Python lists), so a 20 MB
one-line document needed 3.6 GB. A document longer than ``PIECE_CHARS`` is cut where a
pre-tokenizer cannot join the two sides, and the pieces' ids are concatenated:

- before a single space that has a non-space character on each side (``word| word``), or
- after a single newline that has a non-space character on each side (``word\n|word``).

For byte-level BPE with the GPT-2 or the Qwen2 / Llama-3 split regex (the tokenizers this project
trains or converts) no pre-token spans such a point and a pre-token's match does not depend on
text before its start, so the ids equal whole-document tokenization exactly. Whether a tokenizer
behaves so is checked once on a probe text (:func:`split_is_exact`); one that does not (e.g. a
SentencePiece tokenizer that prepends "▁" to every call) gets whole documents, as before.
Where a piece of ``PIECE_CHARS`` has no such point in its second half (a very long run of
letters without spaces: CJK text, minified data), it is cut at ``PIECE_CHARS`` characters: only
the tokens of the one run straddling that cut can differ from whole-document tokenization (the
cut acts as a word boundary; decode still gives back the text), one place per 64k characters.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from sbtrain.data.sources import DataError

DEFAULT_EOD = "<|endoftext|>"
PIECE_CHARS = 1 << 16  # longest piece of a document handed to the tokenizer
CALL_CHARS = 1 << 18  # characters per tokenizer call (several short documents share a call)
# Cut points: the index of a space between two non-spaces, or just after a newline between two non-spaces.
_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")
_PROBE = ("Hello world, it's 2024! Ünïcödé 文字 text\tand  two  spaces.\ndef f(x):\n    return x  # note\n\n"
          "Next paragraph: 3.14 + 42 = 45.14; don't stop.\r\nEnd\nof\nlines (parens) [brackets] -dash- x\ny")


def train_bpe(texts: Iterable[str], out_dir: str, vocab_size: int, eod_token: str | None = None,
              min_frequency: int = 2, special_tokens: Sequence[str] = (), chat_template: str | None = None) -> str:
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer folder; returns ``out_dir``.
    ``special_tokens`` (a chat template's turn markers) become whole tokens; ``chat_template`` is saved
    with the tokenizer, so it travels with it to training, generation and export."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eod = eod_token or DEFAULT_EOD
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly (round-trip is tested).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eod, *(t for t in special_tokens if t != eod)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, whatever the corpus
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod)
    if special_tokens:
        fast.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t != eod]})
    if chat_template:
        fast.chat_template = chat_template
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str, eod_token: str | None = None):
    """``(tokenizer, eod_id)`` from a local HF tokenizer folder."""
    if not path or not os.path.isdir(path):
        raise DataError(
            f"tokenizer.path={path!r} is not a local folder: give a folder with tokenizer.json / tokenizer_config.json "
            "(e.g. a model checkpoint), or train one with tokenizer=train_bpe"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 62  # whole documents are encoded; the "sequence too long" warning does not apply
    token = eod_token or tok.eos_token
    if token is None:
        raise DataError(f"tokenizer at {path} has no eos_token: set tokenizer.eod_token to a token of its vocabulary")
    eod_id = tok.convert_tokens_to_ids(token)
    if eod_id is None or eod_id == tok.unk_token_id:
        raise DataError(f"tokenizer.eod_token={token!r} is not in the vocabulary of {path}")
    return tok, int(eod_id)


_CACHED: dict[tuple[str, str | None], tuple] = {}


def cached_tokenizer(path: str, eod_token: str | None = None):
    """:func:`load_tokenizer`, once per process (the build's worker processes load the tokenizer from
    its folder once instead of unpickling it with every batch)."""
    key = (path, eod_token)
    if key not in _CACHED:
        _CACHED[key] = load_tokenizer(path, eod_token)
    return _CACHED[key]


def tokenizer_hash(tok) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalisation, special tokens)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow tokenizer: vocabulary and special tokens define the ids
        payload = json.dumps([sorted(tok.get_vocab().items()), tok.all_special_tokens])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def vocab_info(tok) -> tuple[int, str]:
    """(number of ids, numpy dtype name for the .bin): uint16 while every id fits, else int32."""
    n = len(tok)
    return n, ("uint16" if n < 65500 else "int32")


def split_long(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``piece_chars`` characters at the points the module describes."""
    if len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        end = start + piece_chars
        cut = end  # no cut point in the window's second half: a plain cut (see the module docstring)
        for m in _CUT.finditer(text, start + piece_chars // 2, end + 1):
            cut = m.start()
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def split_is_exact(tok) -> bool:
    """Whether cutting at our cut points leaves ``tok``'s ids unchanged (probed once per tokenizer)."""
    cached = getattr(tok, "_sbtrain_split_exact", None)
    if cached is None:
        whole = tok(_PROBE, add_special_tokens=False)["input_ids"]
        points = [0, *(m.start() for m in _CUT.finditer(_PROBE)), len(_PROBE)]  # cut at every cut point
        parts = tok([_PROBE[a:b] for a, b in itertools.pairwise(points)], add_special_tokens=False)["input_ids"]
        cached = [i for p in parts for i in p] == list(whole)
        tok._sbtrain_split_exact = cached
    return cached


def encode_texts(tok, texts: Sequence[str], piece_chars: int = PIECE_CHARS,
                 call_chars: int = CALL_CHARS) -> list[np.ndarray]:
    """Token ids (no special tokens) of each text as an int32 array, in bounded memory."""
    cut = split_is_exact(tok)
    pieces, owner = [], []
    for i, text in enumerate(texts):
        for piece in (split_long(text, piece_chars) if cut else [text]):
            pieces.append(piece)
            owner.append(i)
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    start = 0
    while start < len(pieces):
        end, size = start + 1, len(pieces[start])
        while end < len(pieces) and size + len(pieces[end]) <= call_chars:
            size += len(pieces[end])
            end += 1
        ids = tok(pieces[start:end], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for j, seq in zip(range(start, end), ids):
            parts[owner[j]].append(np.asarray(seq, dtype=np.int32))  # 4 bytes a token, not a Python int's 36
        start = end
    return [np.concatenate(p) if len(p) != 1 else p[0] for p in parts]
