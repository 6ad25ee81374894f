"""Fixtures of the evaluation tests: a byte-level BPE trained on a tiny generated corpus, a tiny
hybrid model (GLA + sliding window 6, so context beyond the window and the decay both matter) saved
as a weights directory with its tokenizer, and evaluation texts in jsonl and plain text."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.corpus import make_docs, write_jsonl

VOCAB = 320
MODEL = {"name": "sb7b_eval_test", "vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64, "sliding_window": 6,
         "init_std": 0.2, "layer_pattern": ["gla", "swa"], "gla": {"gate_rank": 4, "gate_normalizer": 4.0}}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from sbtrain.data.tokenizer import train_bpe

    return train_bpe(make_docs(300, seed=5), str(tmp_path_factory.mktemp("tok") / "tokenizer"), vocab_size=300)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from sbtrain.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)  # (tokenizer, eod_id)


def make_model(seed: int = 0, **overrides):
    from sbtrain.models import build_model

    torch.manual_seed(seed)
    return build_model(dict(MODEL, **overrides)).eval()


@pytest.fixture(scope="session")
def model():
    return make_model()


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory, model, tokenizer_dir):
    from sbtrain.models.weights import save_weights

    out = tmp_path_factory.mktemp("weights") / "tiny"
    save_weights(model.state_dict().items(), model.config, out)
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    return out


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_docs(12, seed=11, prefix="eval ")


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("evaldata") / "eval.jsonl"
    write_jsonl(path, texts)
    return path
