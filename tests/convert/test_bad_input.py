"""Every bad input is a clear error (naming the value and the fix) raised before anything is
written: no out directory, no temporary sibling, the existing out untouched."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from sbtrain.convert import ConversionError, ConvertConfig, UpcycleConfig, convert_hf
from tests.convert.helpers import hf_model, save_hf


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return hf_model("qwen2")


def assert_fails_cleanly(tmp_path, src, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=match):
        convert_hf(ConvertConfig(from_hf=str(src), out=str(out), **kwargs))
    assert not out.exists() and not (tmp_path / ".out.tmp").exists()


def edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    edit_config(src, model_type="gpt2")
    assert_fails_cleanly(tmp_path, src, r"model_type='gpt2' is not supported; the converter takes \('qwen2', 'llama'")


def test_rope_scaling_is_unsupported(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    edit_config(src, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}, rope_scaling=None)
    assert_fails_cleanly(tmp_path, src, "RoPE scaling 'llama3'; the converter takes plain RoPE .* or yarn")


@pytest.mark.parametrize("fields, match", [
    ({"truncate": False}, "truncate=False; sbtrain's YaRN implements truncate=True only"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5; sbtrain's YaRN implements partial_rotary_factor=1.0"),
    ({"factor": 0.5}, r"yarn factor=0.5 is below 1"),
])
def test_yarn_variants_outside_ours_are_refused(tmp_path, qwen, fields, match):
    src = save_hf(qwen, tmp_path / "hf")
    edit_config(src, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                      "original_max_position_embeddings": 64, **fields})
    assert_fails_cleanly(tmp_path, src, match)


def test_missing_shard(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf", shard="20KB")
    (src / "model-00002-of-00005.safetensors").unlink()
    assert_fails_cleanly(tmp_path, src, r"shard\(s\) \['model-00002-of-00005.safetensors'\] .* missing")


def test_no_safetensors(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    assert_fails_cleanly(tmp_path, src, "holds no model.safetensors.*safetensors only")


def test_head_count_the_target_cannot_take(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    edit_config(src, num_key_value_heads=3)
    assert_fails_cleanly(tmp_path, src, "num_attention_heads=4 and num_key_value_heads=3.*multiple of the KV heads")
    edit_config(src, num_key_value_heads=2, head_dim=7)
    assert_fails_cleanly(tmp_path, src, "head_dim=7 is odd")


def test_config_that_does_not_describe_the_weights(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    edit_config(src, intermediate_size=40)
    assert_fails_cleanly(tmp_path, src, r"mlp.gate_proj.weight has shape \(48, 32\), the target expects \(40, 32\)")


def test_dtype_mismatch_across_tensors_and_with_the_request(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    assert_fails_cleanly(tmp_path, src, "dtype=bfloat16 was requested but from_hf holds float32.*cast=true",
                         dtype="bfloat16")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.bfloat16)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_fails_cleanly(tmp_path, src,
                         r"mixes tensor dtypes \(float32: 26 e.g. lm_head.weight; bfloat16: 1 e.g. model.norm.weight\)")
    # The documented way out: an explicit cast.
    out = convert_hf(ConvertConfig(from_hf=str(src), out=str(tmp_path / "out"), dtype="bfloat16", cast=True))
    assert json.loads((out / "provenance.json").read_text())["dtype"] == "bfloat16"


def test_existing_out_needs_overwrite(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="out=.* already exists; pass overwrite=true"):
        convert_hf(ConvertConfig(from_hf=str(src), out=str(out)))
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConversionError, match="overlaps from_hf"):
        convert_hf(ConvertConfig(from_hf=str(src), out=str(src), overwrite=True))
    convert_hf(ConvertConfig(from_hf=str(src), out=str(out), overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "provenance.json").is_file()


def test_unknown_target_and_bad_moe_request(tmp_path, qwen):
    src = save_hf(qwen, tmp_path / "hf")
    assert_fails_cleanly(tmp_path, src, r"target='sb8b' is not a model recipe; use one of \[.*'sb7b'", target="sb8b")
    from sbtrain.config.model import ConfigError

    with pytest.raises(ConfigError, match="top_k=5 must be between 1 and model.moe.num_experts=4"):
        convert_hf(ConvertConfig(from_hf=str(src), out=str(tmp_path / "out"), target="sb76b",
                                 upcycle=UpcycleConfig(num_experts=4, top_k=5)))
    assert not (tmp_path / "out").exists()
