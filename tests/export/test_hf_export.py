"""HF export: every layer kind and FFN kind, from a weights directory and from a real DCP training
checkpoint, loads with ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``
with no missing or unexpected tensors, gives sbtrain's fp32 logits within 1e-4, and greedy
``generate()`` picks the same 16 tokens as sbtrain's own ``generate()``."""

from __future__ import annotations

import ast
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_state_dict

from sbtrain.cli.export import main as export_cli
from sbtrain.export import ExportError, export
from sbtrain.export.hf_export import CODE_FILES, HERE, modeling_code
from sbtrain.models import build_model, generate
from sbtrain.models.weights import save_weights
from sbtrain.trainer.checkpoint import Checkpointer

transformers = pytest.importorskip("transformers")

VOCAB, PROMPT_LEN, NEW_TOKENS = 128, 20, 16
BASE = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "sliding_window": 5, "init_std": 0.2}  # window 5 < prompt: the band matters
CONFIGS = {
    "sb7b": dict(BASE, name="sb7b_test", layer_pattern=["gla", "swa"], gla={"gate_rank": 8, "gate_normalizer": 4.0}),
    "sb76b_shared": dict(
        BASE, name="sb76b_test", layer_pattern=["hybrid_swa", "hybrid_full"],
        hybrid={"share_branch_projections": True, "num_sink_tokens": 4},
        moe={"num_experts": 4, "top_k": 1, "num_shared_experts": 1, "dense_layers": [0]},
    ),
    "sb76b_separate": dict(
        BASE, name="sb76b_sep_test", layer_pattern=["hybrid_swa", "hybrid_full"], num_layers=2,
        hybrid={"share_branch_projections": False, "num_sink_tokens": 3},
        moe={"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "norm_topk_prob": True,
             "router_activation": "sigmoid"},
    ),
    "qwen2": dict(BASE, name="qwen2_test", layer_pattern=["full"], num_layers=2, tie_embeddings=True),
    # YaRN over an original context of 4 (prompt 20 + 16): stretched frequencies and the cos/sin scale
    "yarn": dict(BASE, name="yarn_test", layer_pattern=["swa", "full"], num_layers=2, rope_base=100.0,
                 rope_yarn={"factor": 4.0, "original_max_position": 4}),
}


def make_model(name: str):
    torch.manual_seed(0)
    return build_model(CONFIGS[name]).eval()


def save_training_checkpoint(model, run_dir):
    """A checkpoint exactly as the trainer writes one: get_state_dict + Checkpointer, meta with the config."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, VOCAB, (1, 8)), labels=torch.randint(0, VOCAB, (1, 8))).loss_sum.backward()
    optimizer.step()  # real optimizer state in the checkpoint; the weights moved, the export must see that
    optimizer.zero_grad()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": {"step": 3, "tokens": 24}}
    meta = {"config": {"model": OmegaConf.to_container(OmegaConf.structured(model.config))}, "model": "x"}
    return Checkpointer(run_dir / "checkpoints").save(3, state, meta)


def load_hf(path):
    # transformers imports remote code as ``transformers_modules.<folder name>.<file>`` and keeps it
    # in sys.modules: two exports in one process whose folders share a name (every test's "hf")
    # would otherwise reuse the first one's classes.
    for name in [m for m in sys.modules if m.startswith("transformers_modules.")]:
        del sys.modules[name]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


def assert_matches(model, hf):
    ids = torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, return_logits=True).logits
        theirs = hf(ids).logits.float()
    assert (ours - theirs).abs().max().item() <= 1e-4, (ours - theirs).abs().max().item()
    expected = generate(model, ids, NEW_TOKENS)
    got = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, expected), (got[:, PROMPT_LEN:], expected[:, PROMPT_LEN:])
    assert len(set(expected[:, PROMPT_LEN:].flatten().tolist())) > 1  # not a degenerate constant generation


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_from_weights_directory(name, tmp_path):
    model = make_model(name)
    save_weights(model.state_dict().items(), model.config, tmp_path / "weights")
    out = export(tmp_path / "weights", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sbtrain.SbtrainForCausalLM"
    assert config["sliding_window"] == BASE["sliding_window"] + 1  # HF counts the current token
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temp dir left
    hf = load_hf(out)
    assert_matches(model, hf)
    if model.config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_from_training_checkpoint(name, tmp_path):
    model = make_model(name)
    step_dir = save_training_checkpoint(model, tmp_path / "run")
    # The run directory (-> checkpoints/latest) and the step directory name the same checkpoint.
    out = export(tmp_path / "run", tmp_path / "hf")
    assert_matches(model, load_hf(out))
    again = export(step_dir, tmp_path / "hf_step")
    assert load_file(again / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()


def test_sharded_bf16_export_and_cli(tmp_path):
    model = make_model("sb7b")
    save_weights(model.state_dict().items(), model.config, tmp_path / "weights")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    export_cli([f"ckpt={tmp_path / 'weights'}", f"out={tmp_path / 'hf'}", "dtype=bf16", "max_shard_bytes=20000",
                f"tokenizer.path={tmp_path / 'tok'}"])
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (out / "tokenizer_config.json").is_file()
    hf = load_hf(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for key, value in hf.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_export_is_sensitive_to_the_config(tmp_path):
    """The match above can fail: the same weights under a wrong window (W instead of W + 1) or
    a wrong gate normaliser give logits far outside the tolerance."""
    model = make_model("sb7b")
    save_weights(model.state_dict().items(), model.config, tmp_path / "weights")
    out = export(tmp_path / "weights", tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, return_logits=True).logits
    for key, value in (("sliding_window", BASE["sliding_window"]), ("gla", {"gate_rank": 8, "gate_normalizer": 8.0})):
        config = json.loads((out / "config.json").read_text())
        config[key] = value
        (out / "config.json").write_text(json.dumps(config))
        wrong = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            assert (wrong(ids).logits - ours).abs().max().item() > 1e-3, key


def test_exported_code_needs_no_sbtrain():
    """The two .py files written into every export import only torch, transformers and each other
    (modeling_sbtrain.py as exported: every registered mixer kind's HF code pasted in)."""
    allowed = {"__future__", "math", "typing", "torch", "transformers"}
    for name in CODE_FILES:
        text = modeling_code() if name == "modeling_sbtrain.py" else (HERE / name).read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: only the sibling config file
                assert node.module == "configuration_sbtrain", (name, node.module)
                continue
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)


def test_unknown_source_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a model")
    with pytest.raises(ExportError, match="neither an sbtrain weights directory .* nor a training checkpoint"):
        export(tmp_path / "junk", tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        export_cli([f"ckpt={tmp_path / 'junk'}", f"out={tmp_path / 'hf'}"])
    assert exit_info.value.code == 2 and "neither an sbtrain weights directory" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
