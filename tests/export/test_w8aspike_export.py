"""``format=w8aspike`` export: the folder holds int8 codes + fp32 scales and loads with
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` (no missing or unexpected
tensors); its fp32 logits equal sbtrain's fake-quant model (``apply_w8aspike``) within 1e-5 and
greedy ``generate()`` picks the same tokens as sbtrain's own ``generate()``. The match can fail:
the exported model without spikes is far from the spiked reference. ``format=hf`` is unchanged,
and bad ``format`` / ``w8a.method`` values name the choices."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from safetensors.torch import load_file

from sbtrain.cli.export import main as export_cli
from sbtrain.export import ExportError, export
from sbtrain.export.hf_export import HERE
from sbtrain.models import generate
from sbtrain.models.weights import save_weights
from sbtrain.spike.w8a import W8AError, apply_w8aspike, dequantize, quantize_weight
from tests.export.test_hf_export import VOCAB, load_hf, make_model, save_training_checkpoint

transformers = pytest.importorskip("transformers")

PROMPT_LEN, NEW_TOKENS = 20, 12


def saved(name: str, tmp_path):
    model = make_model(name)
    save_weights(model.state_dict().items(), model.config, tmp_path / "weights")
    return model, tmp_path / "weights"


def assert_same_as_fake_quant(model, hf, tol: float = 1e-5):
    ids = torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, return_logits=True).logits
        theirs = hf(ids).logits.float()
    assert (ours - theirs).abs().max().item() <= tol, (ours - theirs).abs().max().item()
    expected = generate(model, ids, NEW_TOKENS)
    got = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, expected), (got[:, PROMPT_LEN:], expected[:, PROMPT_LEN:])
    assert len(set(expected[:, PROMPT_LEN:].flatten().tolist())) > 1  # not a degenerate constant generation
    return ours


CASES = [("sb7b", "mse", 16), ("sb76b_shared", "absmax", 128), ("sb76b_separate", "mse", 16)]


@pytest.mark.parametrize(("name", "method", "group_size"), CASES, ids=[c[0] for c in CASES])
def test_w8aspike_round_trip(name, method, group_size, tmp_path):
    model, weights = saved(name, tmp_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    w8a = {"method": method, "k": 3.0, "group_size": group_size}
    out = export(weights, tmp_path / "hf", format="w8aspike", w8a=w8a)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "w8aspike_sbtrain.SbtrainW8ASpikeForCausalLM"
    assert config["w8aspike"]["method"] == method and config["w8aspike"]["group_size"] == group_size
    assert config["spike"]["mode"] == "eval" and config["spike"]["k"] == 3.0
    tensors = load_file(out / "model.safetensors")
    q_name = "model.layers.0.self_attn.q_proj.weight"
    assert q_name not in tensors and tensors[q_name + "_int8"].dtype == torch.int8
    reference = quantize_weight(original[q_name], method, group_size)
    assert torch.equal(tensors[q_name + "_int8"], reference.codes)
    assert torch.equal(tensors[q_name + "_scale"], reference.scales)
    assert tensors["lm_head.weight"].dtype == torch.float32  # lm_head and embeddings stay unquantized
    report = json.loads((out / "w8aspike_report.json").read_text())
    assert report["layers"][q_name]["clipped"] == reference.clipped
    assert report["clipped"] == sum(layer["clipped"] for layer in report["layers"].values())
    if "sb76b" in name:  # routed experts: codes in Linear orientation [E, Dout, Din]
        E, d_in, d_out = original["model.layers.1.mlp.experts.down_proj"].shape
        assert tensors["model.layers.1.mlp.experts.down_proj_int8"].shape == (E, d_out, d_in)
    hf = load_hf(out)
    apply_w8aspike(model, method=method, k=3.0, group_size=group_size)
    assert_same_as_fake_quant(model, hf)


def test_w8_only_export_and_spikes_matter(tmp_path):
    """``w8a.spike=false`` exports int8 weights without spikes; it matches the W8-only fake-quant
    model and is far from the spiked one (so the round trip above really checks the spikes)."""
    model, weights = saved("sb7b", tmp_path)
    out = export(weights, tmp_path / "hf", format="w8aspike", w8a={"spike": False})
    assert json.loads((out / "config.json").read_text())["spike"]["mode"] == "off"
    hf = load_hf(out)
    spiked = make_model("sb7b")
    apply_w8aspike(spiked, k=3.0)
    apply_w8aspike(model, spike=False)
    w8_logits = assert_same_as_fake_quant(model, hf)
    ids = torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (spiked(ids, return_logits=True).logits - w8_logits).abs().max().item() > 1e-2


def test_from_a_run_directory_with_its_config_yaml(tmp_path):
    """A run's out_dir holds config.yaml (the run config) beside checkpoints/: it is a training
    checkpoint, not a weights directory; the export quantizes the trained weights."""
    model = make_model("sb7b")
    save_training_checkpoint(model, tmp_path / "run")  # one optimizer step: the weights moved
    (tmp_path / "run" / "config.yaml").write_text("model:\n  name: sb7b_test\ntrainer:\n  seq_len: 8\n")
    out = export(tmp_path / "run", tmp_path / "hf", format="w8aspike", w8a={"method": "mse", "group_size": 16})
    apply_w8aspike(model, method="mse", group_size=16)
    assert_same_as_fake_quant(model.eval(), load_hf(out))


def test_cli_w8aspike_and_default_hf_unchanged(tmp_path):
    model, weights = saved("qwen2", tmp_path)
    export_cli([f"ckpt={weights}", f"out={tmp_path / 'w8a'}", "format=w8aspike", "w8a.method=mse", "w8a.k=2",
                "w8a.spike_down_proj=true", "w8a.group_size=16"])
    config = json.loads((tmp_path / "w8a" / "config.json").read_text())
    assert config["w8aspike"]["method"] == "mse" and config["spike"]["k"] == 2.0 and config["spike"]["spike_down_proj"]
    hf = load_hf(tmp_path / "w8a")
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # still tied
    apply_w8aspike(model, method="mse", k=2.0, spike_down_proj=True, group_size=16)
    assert_same_as_fake_quant(model, hf)
    export_cli([f"ckpt={weights}", f"out={tmp_path / 'hf'}"])  # format=hf stays the default
    assert "w8aspike" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not (tmp_path / "hf" / "w8aspike_sbtrain.py").exists()
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "hf" / "model.safetensors").values())


def test_bad_format_and_method_name_the_choices(tmp_path, capsys):
    _, weights = saved("qwen2", tmp_path)
    with pytest.raises(ExportError, match=r"format='onnx' is unknown.*'hf', 'w8aspike'"):
        export(weights, tmp_path / "out", format="onnx")
    with pytest.raises(W8AError, match=r"method='gptq' is unknown.*'absmax', 'mse'"):
        export(weights, tmp_path / "out", format="w8aspike", w8a={"method": "gptq"})
    for override, message in (("w8a.method=gptq", "'absmax', 'mse'"), ("w8a.methd=mse", "did you mean w8a.method")):
        with pytest.raises(SystemExit) as exit_info:
            export_cli([f"ckpt={weights}", f"out={tmp_path / 'out'}", "format=w8aspike", override])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, override
    assert not (tmp_path / "out").exists()


def test_bf16_export_keeps_int8_codes_and_fp32_scales(tmp_path):
    """With dtype=bf16 the unquantized tensors become bf16 but codes stay int8 and scales fp32 after
    loading (a bf16 scale would change every weight): every weight equals the fp32 fake-quant
    model's weight cast to bf16."""
    model, weights = saved("sb76b_shared", tmp_path)
    out = export(weights, tmp_path / "hf", format="w8aspike", dtype="bf16", w8a={"group_size": 16})
    hf_state = load_hf(out).state_dict()
    apply_w8aspike(model, group_size=16)
    ours = model.to(torch.bfloat16).state_dict()
    quantized = json.loads((out / "config.json").read_text())["w8aspike"]["quantized"]
    for name, transposed in quantized.items():
        codes, scales = hf_state[name + "_int8"], hf_state[name + "_scale"]
        assert codes.dtype == torch.int8 and scales.dtype == torch.float32, name
        weight = dequantize(codes, scales, 16, torch.bfloat16)
        assert torch.equal(weight.transpose(-1, -2) if transposed else weight, ours[name]), name
    assert hf_state["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_w8aspike_code_needs_no_sbtrain():
    """The extra modeling file imports only torch, transformers and the two sibling files."""
    tree = ast.parse((HERE / "w8aspike_sbtrain.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in ("configuration_sbtrain", "modeling_sbtrain"), node.module
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert {n.split(".")[0] for n in names} <= {"__future__", "math", "torch", "transformers"}, names
