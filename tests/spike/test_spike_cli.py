"""``sbtrain-spike stats|sweep`` end to end on a tiny model saved as a weights directory and a tiny
tokenized dataset, against references computed here (a naive recorder keeping every count)."""

from __future__ import annotations

import json

import pytest
import torch

from sbtrain.cli.spike import main as spike_cli
from sbtrain.config.data import DataConfig, TokenizerConfig
from sbtrain.config.model import SpikeConfig
from sbtrain.models.spiking import apply_spiking
from tests.corpus import make_docs, write_jsonl
from tests.models.helpers import tiny_model

TINY = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.head_dim=16", "model.intermediate_size=64", "model.sliding_window=16"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sbtrain.data import build_indexed_dataset
    from sbtrain.models.weights import save_weights

    root = tmp_path_factory.mktemp("spike")
    write_jsonl(root / "docs.jsonl", make_docs(60, seed=3))
    build_indexed_dataset(DataConfig(paths=[str(root / "docs.jsonl")], output=str(root / "ds")),
                          TokenizerConfig(kind="train_bpe", vocab_size=300))
    model = tiny_model("sb7b_tiny", TINY, seed=0)
    save_weights(model.state_dict().items(), model.config, root / "weights")
    return {"root": root, "data": str(root / "ds"), "ckpt": str(root / "weights"), "model": model}


def common(assets, out, *extra):
    return [f"ckpt={assets['ckpt']}", f"data.path={assets['data']}", "eval_samples=3", "seq_len=32",
            "micro_batch_size=2", f"out={out}", *extra]


def test_stats_writes_json_and_png_matching_a_naive_count(assets, tmp_path):
    spike_cli(["stats", *common(assets, tmp_path, "k=3", "coding=ternary")])
    report = json.loads((tmp_path / "spike_stats.json").read_text())
    assert (tmp_path / "spike_stats.png").read_bytes()[:8] == PNG_MAGIC
    assert report["command"] == "stats" and report["kind"] == "weights" and report["sequences"] == 3

    # Reference: the same 3 sequences (the loader's order) through the model, every count kept.
    from sbtrain.data.loader import PackedLoader

    loader = PackedLoader([assets["data"]], 32, 2, 2, seed=1234)
    ids = torch.cat([mb["input_ids"] for mb in loader.next_global_batch() + loader.next_global_batch()])[:3]
    kept: dict[str, list[torch.Tensor]] = {}
    model = assets["model"]
    apply_spiking(model, SpikeConfig(mode="eval", k=3.0), lambda name, c: kept.setdefault(name, []).append(c))
    with torch.no_grad():
        model(ids[:2]), model(ids[2:])
    apply_spiking(model, SpikeConfig(mode="off"))
    every = torch.cat([torch.cat([c.reshape(-1, c.shape[-1]) for c in cs]).flatten() for cs in kept.values()])
    overall = report["stats"]["overall"]
    assert set(report["stats"]["layers"]) == set(kept)
    assert overall["entries"] == every.numel()
    assert overall["zero_fraction"] == pytest.approx(float((every == 0).double().mean()))
    assert overall["codings"]["ternary"]["spikes_per_channel"] == pytest.approx(float(every.abs().double().mean()))
    q = kept["model.layers.0.self_attn.q_proj"]
    q = torch.cat([c.reshape(-1, c.shape[-1]) for c in q])
    silent = float((q == 0).all(0).double().mean())
    assert report["stats"]["layers"]["model.layers.0.self_attn.q_proj"]["silent_channel_fraction"] == silent
    energy = report["energy"]
    assert len(energy["layers"]) == len(kept) and energy["spiked_layers"]["fp16_over_spike"] > 0
    other = energy["other_macs_per_token"]
    assert other["lm_head"] == 32 * 320 and other["model.layers.0.self_attn.gk_proj.1"] == 16 * 16
    assert other["model.layers.1.mlp.down_proj"] == 64 * 32  # down_proj is not spiked by default
    assert other["layers.1.swa"] == 2 * 2 * 16 * (sum(min(t + 1, 17) for t in range(32)) / 32)
    assert torch.isfinite(torch.tensor(report["valid_loss"]))


def test_sweep_table_sparsity_falls_with_k(assets, tmp_path, capsys):
    spike_cli(["sweep", *common(assets, tmp_path, "ks=[2,4]", "data.valid_fraction=0.1")])
    report = json.loads((tmp_path / "spike_sweep.json").read_text())
    assert (tmp_path / "spike_sweep.png").read_bytes()[:8] == PNG_MAGIC
    baseline, k2, k4 = report["rows"]
    assert baseline["k"] is None and [k2["k"], k4["k"]] == [2.0, 4.0]
    for row in (k2, k4):
        assert torch.isfinite(torch.tensor(row["valid_loss"])) and row["valid_loss"] != baseline["valid_loss"]
    assert k2["zero_fraction"] > k4["zero_fraction"]
    assert k2["window"]["bitwise_clamp"] > k4["window"]["bitwise_clamp"]
    printed = capsys.readouterr().out
    assert "off" in printed and "bitwise_carry" in printed


@pytest.mark.parametrize("argv, message", [
    (["stats", "coding=morse"], "coding='morse' is unknown; use one of ('binary', 'ternary'"),
    (["stats", "coding=binary"], "needs non-negative counts, but spike counts of linear inputs are signed"),
    (["stats", "kk=3"], "did you mean k"),
    (["stat"], "unknown subcommand 'stat'; use sbtrain-spike {stats|sweep}"),
    (["sweep", "ks=[]"], "ks=[] must be a non-empty list"),
])
def test_bad_input_names_the_value_and_the_fix(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        spike_cli([*argv, f"ckpt={tmp_path}", f"data.path={tmp_path}", f"out={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_loaded_model_has_no_spikes_of_its_own_config(assets, tmp_path):
    """A model saved with model.spike.mode=eval gets hooks at build; the no-spike baseline must not."""
    import copy

    from sbtrain.cli.spike import load_model
    from sbtrain.models.weights import save_weights

    model = assets["model"]
    cfg = copy.deepcopy(model.config)
    cfg.spike.mode = "eval"
    save_weights(model.state_dict().items(), cfg, tmp_path / "spiky")
    loaded, _, kind = load_model(str(tmp_path / "spiky"), torch.device("cpu"))
    ids = torch.arange(16).view(1, 16)
    with torch.no_grad():
        assert kind == "weights" and torch.equal(loaded(ids, return_logits=True).logits,
                                                 model(ids, return_logits=True).logits)
