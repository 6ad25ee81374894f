"""Training inputs, data side (issue 21): a missing dataset path and a dataset smaller than one global batch
are refused with a message naming the value and the fix (a ConfigError, printed by the CLI without a traceback)."""

import logging
import os

import pytest

from sbtrain.config.data import DataConfig
from sbtrain.config.model import ConfigError
from sbtrain.data import DataError, check_vocab, loader_from_config
from sbtrain.data.build import read_manifest


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "no_manifest"])
def test_missing_dataset_is_named_with_what_a_dataset_holds(tmp_path, corpus, kind):
    path = str(tmp_path / "nope")
    if kind != "missing":
        os.makedirs(path)
    if kind == "no_manifest":
        for ext in ("bin", "idx"):
            os.link(os.path.join(corpus["a"], f"data.{ext}"), os.path.join(path, f"data.{ext}"))
    problem = {"missing": "does not exist", "empty_dir": "has no data.bin / data.idx / manifest.json",
               "no_manifest": "has no manifest.json"}[kind]
    what = r"a dataset is a folder written by sbtrain-data, holding data.bin, data.idx, manifest.json"
    # check_vocab runs first in training: it must fail as cleanly as the loader (it accepts a dataset without manifest).
    if kind != "no_manifest":
        with pytest.raises(DataError, match=rf"dataset '{path}' .*{what}.*data.output={path}"):
            check_vocab(path, 300)
    with pytest.raises(ConfigError, match=rf"dataset '{path}' {problem}: {what}; fix the path in data.datasets"):
        loader_from_config(DataConfig(datasets=[path]), seq_len=16, global_batch_size=2, micro_batch_size=2)


def test_relative_missing_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"dataset 'nope' \(from {tmp_path}\) does not exist"):
        check_vocab("nope", 300)


def _tokens(dataset_dir):
    return read_manifest(dataset_dir)["num_tokens"]


def test_dataset_smaller_than_a_global_batch_is_refused(corpus):
    tokens = _tokens(corpus["a"])
    seq_len, G = 511, 64  # 64 x 512 tokens per step: more than the whole dataset
    epochs = G * (seq_len + 1) / tokens
    assert epochs > 1
    cfg = DataConfig(datasets=[corpus["a"]])
    with pytest.raises(DataError, match=rf"fewer than one global batch of 64 sequences.*repeat it {epochs:.1f} times"):
        loader_from_config(cfg, seq_len, G, 8)
    # Given the run's length (train.py passes trainer.max_steps), the message also gives the run's epochs.
    with pytest.raises(DataError, match=rf"dataset {corpus['a']} holds {tokens // 512} training sequences of "
                                        rf"seq_len\+1=512 tokens \({tokens} tokens in \d+ documents\), fewer than one "
                                        rf"global batch of 64 sequences \(trainer.global_batch_size=64\): every step "
                                        rf"would repeat it {epochs:.1f} times; trainer.max_steps=100 would take "
                                        rf"{100 * epochs:.0f} epochs of it. Use more data.*data.allow_repeat=true"):
        loader_from_config(cfg, seq_len, G, 8, max_steps=100)
    # A dataset of exactly one global batch or more is fine.
    ok = int(tokens // 512)
    loader_from_config(cfg, seq_len, ok // 8 * 8, 8)


def test_allow_repeat_warns_with_the_epoch_count(corpus, caplog):
    cfg = DataConfig(datasets=[corpus["a"]], allow_repeat=True)
    with caplog.at_level(logging.WARNING):
        loader = loader_from_config(cfg, 511, 64, 8)
    assert "every step would repeat it" in caplog.text and "allowed by data.allow_repeat=true" in caplog.text
    assert len(loader.next_global_batch()) == 8  # and it trains


def test_validation_split_is_counted(corpus, caplog):
    tokens, n_docs = _tokens(corpus["a"]), read_manifest(corpus["a"])["num_documents"]
    # Fits one global batch with every document, not after holding half of them out.
    G = int(tokens * 0.8 // 65) // 4 * 4
    loader_from_config(DataConfig(datasets=[corpus["a"]]), 64, G, 4)
    with pytest.raises(DataError, match=rf"after holding out {round(n_docs / 2)} documents for validation"):
        loader_from_config(DataConfig(datasets=[corpus["a"]], valid_fraction=0.5), 64, G, 4)
    # A validation split shorter than one sequence is warned about.
    with caplog.at_level(logging.WARNING):
        loader_from_config(DataConfig(datasets=[corpus["a"]], valid_fraction=0.001), 511, 4, 4)
    assert f"the validation split of dataset {corpus['a']} holds" in caplog.text and "raise data.valid_fraction" in \
        caplog.text


def test_blend_share_is_checked_per_dataset(corpus):
    # Dataset b is large enough for 8 sequences of 65 alone, but not for 2/3 of 48 of them per step.
    cfg = DataConfig(datasets=[corpus["a"], corpus["b"]], weights=[1.0, 2.0])
    tokens_b = _tokens(corpus["b"])
    G = int(tokens_b / 65 * 1.5 / (2 / 3)) // 4 * 4
    with pytest.raises(DataError, match=rf"dataset {corpus['b']} .*fewer than its share \(weight 0.667\) of one "
                                        rf"global batch of {G} sequences"):
        loader_from_config(cfg, 64, G, 4)
