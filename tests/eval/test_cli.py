"""``sbtrain-eval`` end to end: ppl and loss_by_position through the Hydra CLI write JSON (+ PNG)
whose numbers equal the building blocks' on the same windows; bad input exits 2 naming the fix."""

from __future__ import annotations

import json

import pytest

from sbtrain.cli.eval import SUBCOMMANDS, main
from sbtrain.eval import evaluate_ppl, make_windows, tokenize_stream
from sbtrain.eval.loss_by_position import loss_by_position
from tests.eval.conftest import make_model


def test_ppl_cli_writes_what_evaluate_ppl_computes(weights_dir, jsonl, texts, model, tokenizer, tmp_path, capsys):
    main(["ppl", f"ckpt={weights_dir}", f"data.paths=['{jsonl}']", "seq_len=16", "stride=8", "batch_size=2",
          f"out={tmp_path}"])
    printed = capsys.readouterr().out
    row = json.loads((tmp_path / "ppl.json").read_text())["results"][0]
    stats = evaluate_ppl(model, make_windows(tokenize_stream(texts, *tokenizer), 16, 8))
    assert row["tokens"] == stats.tokens and row["stride"] == 8 and row["label"] == weights_dir.name
    assert row["ppl"] == pytest.approx(stats.ppl, rel=1e-6)
    assert f"{row['ppl']:.4f}" in printed  # the table shows the same number


def test_loss_by_position_cli_two_models(weights_dir, jsonl, texts, tokenizer, tmp_path):
    from sbtrain.models.weights import save_weights

    other = make_model(seed=1)
    save_weights(other.state_dict().items(), other.config, tmp_path / "other")
    main(["loss_by_position", f"ckpt={weights_dir}", f"ckpts=['{tmp_path / 'other'}']", "labels=[base,other]",
          f"data.paths=['{jsonl}']", "seq_len=12", f"tokenizer.path={weights_dir / 'tokenizer'}",
          f"out={tmp_path / 'out'}"])
    results = json.loads((tmp_path / "out" / "loss_by_position.json").read_text())["results"]
    assert [r["label"] for r in results] == ["base", "other"]
    assert (tmp_path / "out" / "loss_by_position.png").stat().st_size > 1000
    expected = loss_by_position(other, make_windows(tokenize_stream(texts, *tokenizer), 12), 12).buckets()
    assert [b["loss"] for b in results[1]["buckets"]] == pytest.approx([b["loss"] for b in expected], rel=1e-6)
    assert results[0]["buckets"][0]["loss"] != pytest.approx(results[1]["buckets"][0]["loss"])


@pytest.mark.parametrize("argv,message", [
    (["pplx", "ckpt=x"], "unknown subcommand 'pplx'"),
    (["ppl", "seq_len=8", "stride=9"], "stride<=8"),
    (["ppl", "seq_lne=8"], "did you mean seq_len"),
    (["ppl", "seq_len=8"], "data.paths is empty"),
    (["ppl"], "no model given: set ckpt=DIR"),
    (["loss_by_position", "stride=4"], "drop stride="),
])
def test_bad_input_exits_2_naming_the_fix(argv, message, weights_dir, jsonl, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    if argv[-1] == "stride=9":
        argv = [*argv, f"ckpt={weights_dir}", f"data.paths=['{jsonl}']"]
    elif argv[-1] == "seq_len=8":
        argv = [*argv, f"ckpt={weights_dir}"]
    elif argv[-1] == "stride=4":
        argv = [*argv, f"ckpt={weights_dir}", f"data.paths=['{jsonl}']"]
    elif argv == ["ppl"]:
        argv = ["ppl", f"data.paths=['{jsonl}']"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_corpus_exits_2(weights_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(SystemExit):
        main(["ppl", f"ckpt={weights_dir}", f"data.paths=['{empty}']"])
    assert "holds no text" in capsys.readouterr().err


def test_subcommands_have_room_for_more():
    assert {"ppl", "loss_by_position"} <= set(SUBCOMMANDS)
