"""Tiny corpora built once per session: dataset ``a`` (jsonl with bad records, BPE trained on it) and
dataset ``b`` (a glob over txt + parquet + jsonl, built through the sbtrain-data config tree)."""

import json

import pytest

from sbtrain.config.data import DataConfig, TokenizerConfig
from tests.corpus import make_docs, write_jsonl


def build(tmp_path, paths, name="ds", tokenizer=None, **data_kw):
    from sbtrain.data import build_indexed_dataset

    data = DataConfig(paths=[str(p) for p in paths], output=str(tmp_path / name), **data_kw)
    tok = tokenizer or TokenizerConfig(kind="train_bpe", vocab_size=300, min_frequency=2)
    return build_indexed_dataset(data, tok), str(tmp_path / name)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sbtrain.cli.app import RECIPES_DIR
    from sbtrain.cli.data import build_dataset

    root = tmp_path_factory.mktemp("corpus")
    docs_a = make_docs(400, seed=1, prefix="A")
    # Bad records between the good ones: 3 empty / whitespace-only, 1 null, 2 lines with invalid UTF-8.
    bad_a = docs_a[:100] + ["", "  \n\t "] + docs_a[100:250] + [None, "   "] + docs_a[250:]
    with open(root / "a.jsonl", "wb") as f:
        for i, d in enumerate(bad_a):
            f.write(json.dumps({"text": d}, ensure_ascii=False).encode() + b"\n")
            if i in (10, 300):
                f.write(b'{"text": "broken \xff\xfe bytes ' + str(i).encode() + b'"}\n')
    expected_a = [d for d in bad_a[:11] if d and d.strip()] + ["broken \ufffd\ufffd bytes 10"]
    expected_a += [d for d in bad_a[11:301] if d and d.strip()] + ["broken \ufffd\ufffd bytes 300"]
    expected_a += [d for d in bad_a[301:] if d and d.strip()]
    manifest_a, dir_a = build(root, [root / "a.jsonl"], name="a")

    docs_b = make_docs(300, seed=2, prefix="B")
    (root / "b").mkdir()
    # Plain text cut by data.text_unit=paragraph: blank lines (any number, whitespace-only too) separate documents.
    (root / "b" / "1.txt").write_text("\n\n".join(docs_b[:100]) + "\n \n\n", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs_b[100:200]}), root / "b" / "2.parquet")
    write_jsonl(root / "b" / "3.jsonl", docs_b[200:])
    overrides = [f"data.paths=[{root}/b/*]", f"data.output={root}/b_out", "data.text_unit=paragraph", "tokenizer=pretrained",
                 f"tokenizer.path={manifest_a['tokenizer']['path']}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose(config_name="build_data", overrides=overrides)
    GlobalHydra.instance().clear()
    manifest_b = build_dataset(cfg)
    return {"root": root, "a": dir_a, "b": str(root / "b_out"), "manifest_a": manifest_a, "manifest_b": manifest_b,
            "docs_a": expected_a, "docs_b": docs_b, "tokenizer": manifest_a["tokenizer"]["path"]}
