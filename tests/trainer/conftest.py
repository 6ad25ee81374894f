"""Fixtures of the trainer tests: a tiny tokenized corpus built once per session."""

from __future__ import annotations

import pytest

from sbtrain.config.data import DataConfig, TokenizerConfig
from tests.corpus import make_docs, write_jsonl


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> str:
    from sbtrain.data import build_indexed_dataset

    root = tmp_path_factory.mktemp("train_corpus")
    write_jsonl(root / "docs.jsonl", make_docs(400, seed=3))
    data = DataConfig(paths=[str(root / "docs.jsonl")], output=str(root / "ds"))
    build_indexed_dataset(data, TokenizerConfig(kind="train_bpe", vocab_size=300))
    return str(root / "ds")


