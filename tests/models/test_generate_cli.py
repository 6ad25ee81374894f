"""sbtrain-generate end to end on a tiny weights directory with its own BPE tokenizer: the CLI's
tokens equal :func:`sbtrain.models.generate` on the same checkpoint (greedy and seeded top-k
sampling), the text form is prompt + decoded continuation, and bad input exits 2 naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sbtrain.cli.generate import main
from sbtrain.data.tokenizer import train_bpe
from sbtrain.models import generate
from sbtrain.models.weights import save_weights
from tests.models.helpers import tiny_model

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.vocab_size=320", "model.intermediate_size=64",
        "model.sliding_window=4", "model.head_dim=16", "model.init_std=0.1"]
PROMPT = "def add(a, b): return a"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(weights dir with tokenizer/, the model, the tokenizer) for sb7b_tiny shrunk to a 2-layer toy."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("gen")
    texts = [f"def f{i}(a, b): return a + b * {i}\nclass C{i}: pass\n" for i in range(50)]
    train_bpe(texts, str(root / "tok"), vocab_size=300, min_frequency=1)
    model = tiny_model("sb7b_tiny", TINY)
    save_weights(model.state_dict().items(), model.config, root / "ckpt")
    shutil.copytree(root / "tok", root / "ckpt" / "tokenizer")
    return root / "ckpt", model, AutoTokenizer.from_pretrained(str(root / "tok"))


def cli_json(capsys, *args: str) -> dict:
    main(["format=json", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_greedy_cli_equals_generate(checkpoint, capsys):
    ckpt, model, tok = checkpoint
    got = cli_json(capsys, f"ckpt={ckpt}", f"prompt='{PROMPT}'", "max_new_tokens=12")
    ids = tok.encode(PROMPT, add_special_tokens=False)
    assert got["prompt_ids"] == ids and len(ids) > 4  # more tokens than the SWA window: the ring wraps
    expected = generate(model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
    assert got["new_ids"] == expected
    assert got["text"] == tok.decode(expected)


def test_sampled_cli_equals_generate_with_same_seed(checkpoint, capsys):
    ckpt, model, tok = checkpoint
    got = cli_json(capsys, f"ckpt={ckpt}", f"prompt='{PROMPT}'", "max_new_tokens=10", "temperature=1.5", "top_k=20",
                   "seed=7")
    ids = tok.encode(PROMPT, add_special_tokens=False)
    expected = generate(model, torch.tensor([ids]), 10, temperature=1.5, top_k=20,
                        generator=torch.Generator().manual_seed(7))[0, len(ids):].tolist()
    greedy = generate(model, torch.tensor([ids]), 10)[0, len(ids):].tolist()
    assert got["new_ids"] == expected and expected != greedy  # sampling really happened


def test_text_output_is_prompt_plus_continuation(checkpoint, capsys):
    ckpt, model, tok = checkpoint
    main([f"ckpt={ckpt}", f"prompt='{PROMPT}'", "max_new_tokens=5"])
    ids = tok.encode(PROMPT, add_special_tokens=False)
    new = generate(model, torch.tensor([ids]), 5)[0, len(ids):].tolist()
    assert capsys.readouterr().out == PROMPT + tok.decode(new) + "\n"


@pytest.mark.parametrize("args, message", [
    (["max_new_tokens=3"], "prompt is required"),
    (["prompt=x", "max_new_tokenz=3"], "did you mean max_new_tokens"),
    (["prompt=x", "temperature=-1"], "temperature=-1"),
    (["prompt=x", "format=yaml"], "format=yaml"),
])
def test_bad_input_exits_2(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main([f"ckpt={checkpoint[0]}", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_tokenizer_is_named(checkpoint, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint[0], bare, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(SystemExit):
        main([f"ckpt={bare}", "prompt=x"])
    assert "tokenizer.path=DIR" in capsys.readouterr().err
