"""One rule for plain text, shared by sbtrain-data and sbtrain-eval (issue 21): a document per file by
default, per blank-line-separated block with text_unit=paragraph, newlines kept as text."""

import os

import numpy as np
import pytest

from sbtrain.config.data import DataConfig, TokenizerConfig

from .conftest import build

TEXT = ("def f(x):\n    return x  # first paragraph\n\n\n"
        "Second paragraph, line one.\r\nline two ü é ß\n  \t \n"
        "  indented third\n")


def _built_docs(dataset_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(os.path.join(dataset_dir, "data"))
    return [np.array(ds[i]).tolist() for i in range(len(ds))]


@pytest.fixture
def two_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(TEXT.encode())
    (tmp_path / "in" / "b.txt").write_bytes(b"\xef\xbb\xbfone more file\nwith two lines\n")  # a BOM: dropped
    return [str(tmp_path / "in" / "a.txt"), str(tmp_path / "in" / "b.txt")]


@pytest.mark.parametrize("unit,expected", [
    ("file", [TEXT, "one more file\nwith two lines\n"]),
    ("paragraph", ["def f(x):\n    return x  # first paragraph",
                   "Second paragraph, line one.\r\nline two ü é ß", "  indented third",
                   "one more file\nwith two lines"]),
])
def test_build_and_eval_read_the_same_documents(tmp_path, corpus, two_files, unit, expected):
    from transformers import AutoTokenizer

    from sbtrain.eval.corpus import read_texts

    kw = {} if unit == "file" else {"text_unit": unit}  # file: the default of both tools
    texts = read_texts(two_files, **kw)
    tok = TokenizerConfig(kind="pretrained", path=corpus["tokenizer"])
    manifest, out = build(tmp_path, two_files, tokenizer=tok, **kw)
    hf = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    eod = manifest["tokenizer"]["eod_id"]
    # The same documents, hence the same tokens, in the built dataset and in the evaluation stream.
    assert _built_docs(out) == [hf(t, add_special_tokens=False)["input_ids"] + [eod] for t in texts]
    assert texts == expected
    # Newlines survive the round trip: they are text, not separators.
    decoded = [hf.decode(ids[:-1]) for ids in _built_docs(out)]
    assert decoded == expected and "\n" in decoded[0]
    assert [s["documents"] for s in manifest["sources"]] == ([1, 1] if unit == "file" else [3, 1])


def test_text_documents_rule():
    from sbtrain.data.sources import text_documents

    lines = ["\n", "a\n", "b\n", "   \n", "\n", "c"]
    assert list(text_documents(lines, "paragraph")) == ["a\nb", "c"]
    assert list(text_documents(lines, "file")) == ["\na\nb\n   \n\nc"]
    assert list(text_documents([" \n", "\t\n"], "file")) == []  # whitespace only: no document


def test_text_unit_is_a_schema_key():
    from sbtrain.cli.app import precheck

    assert precheck("build_data", ["data.text_unit=paragraph", "data.on_bad_record=skip",
                                   "data.max_undecodable_fraction=0.5"]) is None
    msg = precheck("build_data", ["data.text_units=paragraph"])
    assert "data.text_units" in msg and "data.text_unit" in msg
    with pytest.raises(Exception, match=r"data.text_unit='line' is not one of \('file', 'paragraph'\)"):
        DataConfig(text_unit="line").validate()
