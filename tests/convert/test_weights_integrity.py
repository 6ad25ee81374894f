"""A damaged weights directory (what sbtrain-convert / sbtrain-export write and trainer.init_from
reads) is an error naming the file and the fix, never a raw safetensors error or a silent NaN
start: the writer leaves a manifest (size + sha256 of every file) that the loader checks, and
every loaded tensor must be finite."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch

from sbtrain.config.model import ModelConfig
from sbtrain.models.build import build_model
from sbtrain.models.weights import MANIFEST, WeightsError, iter_weights, load_into, save_weights

CFG = {"name": "t", "vocab_size": 320, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 2,
       "num_key_value_heads": 1, "intermediate_size": 128, "sliding_window": 16, "layer_pattern": ["gla", "swa"]}


def _saved(tmp_path, **kwargs):
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = save_weights(model.state_dict().items(), cfg, tmp_path / "w", **kwargs)
    return out, cfg


def tensor_region(file, name) -> tuple[int, int]:
    """Byte range of tensor ``name``'s data inside a safetensors file (8-byte header length, JSON
    header, then the data block the offsets are relative to)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _overwrite_with_nan(file, name, nbytes=4096) -> None:
    start, end = tensor_region(file, name)
    assert end - start >= 2 * nbytes, "the tensor must be larger than the damage"
    offset = start + (end - start) // 2 // 4 * 4  # the middle of the tensor, on a float boundary
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", float("nan")) * (nbytes // 4))
    assert file.stat().st_size == size  # same size: only a checksum (or the values) can tell


def test_writer_leaves_a_manifest_of_every_file(tmp_path):
    out, _ = _saved(tmp_path, max_shard_bytes=40_000)  # several shards and an index
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    written = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert sorted(manifest) == written and len(written) > 3
    for name, entry in manifest.items():
        assert entry["size"] == (out / name).stat().st_size and len(entry["sha256"]) == 64


def test_truncated_file_names_the_file_and_the_fix(tmp_path):
    out, cfg = _saved(tmp_path)
    file = out / "model.safetensors"
    full = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(full - 1000)
    with pytest.raises(WeightsError) as info:
        load_into(build_model(cfg), out)
    assert str(info.value) == (
        f"{file} has {full - 1000} bytes, {MANIFEST} says {full}: the file is truncated or was not copied "
        "completely; re-run the conversion (sbtrain-convert ... overwrite=true) or copy the directory again")


def test_truncated_file_without_a_manifest_is_still_named(tmp_path, caplog):
    out, cfg = _saved(tmp_path)
    (out / MANIFEST).unlink()  # a directory written before manifests existed
    file = out / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 1000)
    with pytest.raises(WeightsError, match=rf"^{file} is truncated or corrupt \(safetensors: .+\); re-run the "
                                           r"conversion \(sbtrain-convert ... overwrite=true\)"):
        load_into(build_model(cfg), out)


def test_same_size_overwrite_fails_the_checksum(tmp_path):
    out, cfg = _saved(tmp_path)
    file = out / "model.safetensors"
    _overwrite_with_nan(file, "model.embed_tokens.weight")
    with pytest.raises(WeightsError) as info:
        load_into(build_model(cfg), out)
    assert str(info.value) == (
        f"{file} does not match its sha256 in {MANIFEST}: the file is corrupt; re-run the conversion "
        "(sbtrain-convert ... overwrite=true) or copy the directory again")


def test_nan_in_an_old_directory_names_the_tensor_and_the_file(tmp_path, caplog):
    out, cfg = _saved(tmp_path)
    (out / MANIFEST).unlink()
    file = out / "model.safetensors"
    _overwrite_with_nan(file, "model.embed_tokens.weight")
    with pytest.raises(WeightsError) as info:
        load_into(build_model(cfg), out)
    assert str(info.value) == (
        f"tensor model.embed_tokens.weight in {file} holds 1024 non-finite values (NaN/Inf): the file is corrupt "
        "or the model diverged before it was saved; re-run the conversion or use an earlier checkpoint")
    with pytest.raises(WeightsError, match="model.embed_tokens.weight in .* holds 1024 non-finite"):
        dict(iter_weights(out))  # every reader of the directory, not only init_from


def test_missing_manifest_is_a_warning_not_an_error(tmp_path, caplog):
    out, cfg = _saved(tmp_path)
    (out / MANIFEST).unlink()
    model = build_model(cfg)
    with caplog.at_level(logging.WARNING, logger="sbtrain.weights"):
        load_into(model, out)
    assert f"{out} has no {MANIFEST} (written by an older sbtrain): its files cannot be checked for damage; " \
           "re-run the conversion to add one" in caplog.text
    reference = dict(iter_weights(out))
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_converted_directory_verifies(tmp_path):
    pytest.importorskip("transformers")
    from sbtrain.convert import ConvertConfig, convert_hf
    from sbtrain.models.weights import verify_weights
    from tests.convert.helpers import hf_model, save_hf

    src = save_hf(hf_model("qwen2"), tmp_path / "hf")
    out = convert_hf(ConvertConfig(from_hf=str(src), out=str(tmp_path / "out")))
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert {"config.yaml", "model.safetensors", "provenance.json", "tokenizer/tokenizer.json"} <= set(manifest)
    verify_weights(out)  # rewritten after the tokenizer and provenance were added: it matches
    _overwrite_with_nan(out / "model.safetensors", "model.embed_tokens.weight", nbytes=1024)
    with pytest.raises(WeightsError, match="does not match its sha256"):
        verify_weights(out)


def test_truncated_hf_shard_is_named_before_anything_is_written(tmp_path):
    pytest.importorskip("transformers")
    from sbtrain.convert import ConversionError, ConvertConfig, convert_hf
    from tests.convert.helpers import hf_model, save_hf

    src = save_hf(hf_model("qwen2"), tmp_path / "hf", shard="20KB")
    shard = src / "model-00002-of-00005.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(ConversionError, match=rf"^from_hf: {shard} is truncated or corrupt \(safetensors: .+\); "
                                              "download or copy it again$"):
        convert_hf(ConvertConfig(from_hf=str(src), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
