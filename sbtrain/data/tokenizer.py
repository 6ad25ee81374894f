"""Tokenizers: a local HF folder, or a byte-level BPE trained on the corpus (development).

A trained BPE is saved as a normal HF tokenizer folder (tokenizer.json + config) so that
``AutoTokenizer.from_pretrained(folder)`` loads it later, with the EOD token as its eos_token.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

from sbtrain.data.sources import DataError

DEFAULT_EOD = "<|endoftext|>"


def train_bpe(texts: Iterable[str], out_dir: str, vocab_size: int, eod_token: str | None = None,
              min_frequency: int = 2) -> str:
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer folder; returns ``out_dir``."""
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
        special_tokens=[eod],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, whatever the corpus
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod)
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
