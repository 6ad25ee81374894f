import os

import numpy as np
import pytest

from sbtrain.config.data import DataConfig, TokenizerConfig
from sbtrain.data import DataError, build_indexed_dataset, check_vocab
from tests.corpus import make_docs, write_jsonl

from .conftest import build


def _decode_all(dataset_dir, tokenizer_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ds = IndexedDataset(os.path.join(dataset_dir, "data"))
    return tok, [np.array(ds[i]) for i in range(len(ds))]  # copies: the views die with the mmap


def test_round_trip_and_manifest_counts(corpus):
    m = corpus["manifest_a"]
    tok, docs = _decode_all(corpus["a"], corpus["tokenizer"])
    assert tok.eos_token == "<|endoftext|>" and m["tokenizer"]["eod_id"] == tok.eos_token_id
    assert m["num_documents"] == len(docs) == len(corpus["docs_a"])
    assert m["num_tokens"] == sum(d.size for d in docs)
    assert m["skipped"] == {"empty": 3, "null": 1}
    assert m["invalid_utf8"] == {"policy": "replace", "replaced_lines": 2, "replaced_bytes": 4,
                                 "max_undecodable_fraction": 0.01}
    assert m["sources"][0]["invalid_utf8_lines"] == 2 and m["sources"][0]["sha256_scope"] == "full"
    assert m["dtype"] == "uint16" and docs[0].dtype == np.uint16
    assert m["max_token_id"] == max(int(d.max()) for d in docs) < m["tokenizer"]["vocab_size"] == 300
    for text, ids in zip(corpus["docs_a"], docs):
        assert ids[-1] == tok.eos_token_id and (ids[:-1] != tok.eos_token_id).all()
        assert tok.decode(ids.tolist()) == text + "<|endoftext|>"


def test_glob_over_text_parquet_jsonl(corpus):
    m = corpus["manifest_b"]
    assert [s["format"] for s in m["sources"]] == ["text", "parquet", "json"]
    assert [s["documents"] for s in m["sources"]] == [100, 100, 100]
    assert m["skipped"] == {} and m["text_unit"] == "paragraph"  # blank lines separate paragraphs, are no documents
    assert m["tokenizer"]["sha256"] == corpus["manifest_a"]["tokenizer"]["sha256"]
    tok, docs = _decode_all(corpus["b"], corpus["tokenizer"])
    assert [tok.decode(d.tolist()) for d in docs] == [t + "<|endoftext|>" for t in corpus["docs_b"]]


def test_invalid_utf8_error_names_file_and_line(tmp_path, corpus):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "bad \xc3\x28"}\n')
    tok = TokenizerConfig(kind="pretrained", path=corpus["tokenizer"])
    with pytest.raises(DataError, match=rf"invalid UTF-8 in {path} line 3.*data.invalid_utf8=replace"):
        build(tmp_path, [path], tokenizer=tok, invalid_utf8="error")
    assert not os.path.exists(tmp_path / "ds") and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_missing_text_field_names_fields(tmp_path, corpus):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, make_docs(5), field="content")
    tok = TokenizerConfig(kind="pretrained", path=corpus["tokenizer"])
    with pytest.raises(DataError, match=r"c.jsonl has no field 'text'; its fields are \['content', 'id'\]"):
        build(tmp_path, [path], tokenizer=tok)


@pytest.mark.parametrize("streaming,num_proc", [(True, 1), (True, 2), (False, 2)])
def test_streaming_and_workers_give_the_same_tokens(tmp_path, corpus, streaming, num_proc):
    tok = TokenizerConfig(kind="pretrained", path=corpus["tokenizer"])
    m, out = build(tmp_path, [corpus["root"] / "b" / "*"], tokenizer=tok, streaming=streaming, num_proc=num_proc,
                   text_unit="paragraph")
    assert m["fingerprint"] == corpus["manifest_b"]["fingerprint"]
    with open(os.path.join(out, "data.bin"), "rb") as f, open(os.path.join(corpus["b"], "data.bin"), "rb") as g:
        assert f.read() == g.read()


def test_offline_hub_name_fails_fast(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(DataError, match=r"'someorg/somecorpus' is not a local file or glob.*offline"):
        build(tmp_path, ["someorg/somecorpus"])
    assert time.time() - t < 5
    with pytest.raises(DataError, match=r"matches no file"):
        build(tmp_path, [str(tmp_path / "nothing" / "*.jsonl")])


def test_check_vocab(corpus):
    max_id = corpus["manifest_a"]["max_token_id"]
    assert check_vocab(corpus["a"], max_id + 1) == max_id
    with pytest.raises(DataError, match=rf"token id {max_id} >= model vocab_size={max_id}"):
        check_vocab(corpus["a"], max_id)
    # Without a manifest the tokens themselves are scanned.
    os.makedirs(corpus["root"] / "nomanifest", exist_ok=True)
    for ext in ("bin", "idx"):
        src, dst = os.path.join(corpus["a"], f"data.{ext}"), corpus["root"] / "nomanifest" / f"data.{ext}"
        if not dst.exists():
            os.link(src, dst)
    with pytest.raises(DataError, match=rf"token id {max_id} >= model vocab_size=10"):
        check_vocab(str(corpus["root"] / "nomanifest"), 10)


def test_bad_settings_fail_early(tmp_path, corpus):
    with pytest.raises(DataError, match=r"data.output=.* exists.*data.overwrite=true"):
        build_indexed_dataset(DataConfig(paths=[corpus["root"] / "a.jsonl"], output=corpus["a"]),
                              TokenizerConfig(kind="pretrained", path=corpus["tokenizer"]))
    with pytest.raises(Exception, match=r"tokenizer.path is not set.*tokenizer=train_bpe"):
        build(tmp_path, [corpus["root"] / "a.jsonl"], tokenizer=TokenizerConfig())
    with pytest.raises(Exception, match=r"data.invalid_utf8='drop' is not one of"):
        build(tmp_path, [corpus["root"] / "a.jsonl"], invalid_utf8="drop")


def test_cli_typo_is_named():
    from sbtrain.cli.app import precheck

    msg = precheck("build_data", ["data.text_fild=body"])
    assert "data.text_fild" in msg and "data.text_field" in msg
    assert "train_bpe" in precheck("build_data", ["tokenizer=train_bp"])
