"""``sbtrain-eval passkey``: the generator puts the needle where asked and the answer is the key; the
accuracy of a mocked model through prefill + decode_step equals a hand count; the fine-tune lowers
the answer loss (measured independently with token_nll); the CLI writes table, JSON and PNG equal to
the building blocks; bad depths / lengths exit 2 naming the fix."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sbtrain.cli.eval import main
from sbtrain.eval.corpus import EvalError
from sbtrain.eval.passkey import (
    FinetuneConfig,
    PasskeyBatches,
    PasskeyTask,
    evaluate_passkey,
    finetune,
    task_from_tokenizer,
    training_batch,
)
from sbtrain.eval.scoring import token_nll
from sbtrain.models.cache import DecodeCache
from tests.eval.conftest import make_model


@pytest.fixture(scope="module")
def task(tokenizer):
    return task_from_tokenizer(*tokenizer)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("filler", ["text", "random"])
def test_needle_at_the_requested_depth_and_answer_is_the_key(tokenizer, depth, filler):
    tok, eod = tokenizer
    task = task_from_tokenizer(tok, eod, filler)
    length, digits = 110, 4
    needle_len = len(task.needle_prefix) + digits + len(task.needle_suffix)
    free = length - 1 - needle_len - len(task.query)  # filler tokens around the needle
    sample = task.sample(length, depth, digits, random.Random(3))
    start = 1 + round(depth * free)
    assert sample.needle_start == start and len(sample.prompt) == length and sample.prompt[0] == eod
    needle = sample.prompt[start:start + needle_len]
    assert needle == task.needle_prefix + sample.answer + task.needle_suffix
    assert sample.prompt[-len(task.query):] == task.query
    if depth == 1.0:  # right before the question
        assert start + needle_len == length - len(task.query)
    assert tok.decode(sample.answer).replace(" ", "") == sample.key and len(sample.key) == digits
    assert tok.decode(needle).strip().startswith("The pass key is") and tok.decode(needle).endswith("Remember it.")
    # The key's digits appear nowhere but in the needle (the filler holds no digit tokens).
    assert sum(t in task.digit_ids for t in sample.prompt) == digits


def test_training_batch_scores_only_the_answer(task):
    batch = training_batch(task, 80, 3, 4, random.Random(0))
    assert batch["input_ids"].shape == (3, 80 + 4 - 1)
    scored = batch["labels"] != -100
    assert scored.sum(1).tolist() == [4, 4, 4] and scored[:, 79:].all()
    # The labels are the answer digits, and the answer is what the needle holds.
    for row in range(3):
        answer = batch["labels"][row, 79:].tolist()
        assert all(t in task.digit_ids for t in answer)
        assert batch["input_ids"][row, 80:].tolist() == answer[:-1]  # decoding feeds the answer back


def test_training_batch_with_every_label_is_the_shifted_sequence(task):
    answer = training_batch(task, 80, 3, 4, random.Random(0))
    every = training_batch(task, 80, 3, 4, random.Random(0), answer_only=False)
    assert torch.equal(every["input_ids"], answer["input_ids"])  # the same samples
    assert torch.equal(every["labels"][:, :-1], every["input_ids"][:, 1:]) and (every["labels"] != -100).all()
    assert torch.equal(every["labels"][:, 79:], answer["labels"][:, 79:])
    data = PasskeyBatches(task, (72, 72), 3, 2, 1, 2, seed=0, answer_only=False)
    assert all((b["labels"] != -100).all() for b in data.next_global_batch())  # what the fine-tune trains on
    assert all((b["labels"] != -100).sum() == 3 for b in data.batches())  # the probe: the 3 answer digits only


def test_finetune_on_every_token_still_reports_the_answer_loss(task):
    cfg = FinetuneConfig(steps=3, seq_len="72", lr=3e-3, warmup_steps=1, batch_size=2, micro_batch_size=1,
                         eval_samples=4, log_every=0, loss="all")
    model = make_model(seed=2)
    probe = PasskeyBatches(task, (72, 72), 3, 2, 1, 4, seed=0)  # answer labels only
    before = answer_loss(model, probe)
    report = finetune(model, task, cfg, digits=3, seed=0)
    assert report["loss"] == "all" and report["answer_loss_before"] == pytest.approx(before, rel=1e-5)
    assert report["answer_loss_after"] == pytest.approx(answer_loss(model, probe), rel=1e-5)
    with pytest.raises(EvalError, match="finetune.loss='most' is unknown"):
        finetune(model, task, FinetuneConfig(steps=1, seq_len="72", loss="most"), digits=3)


# -- accuracy against a hand count -------------------------------------------------------------------
ID_TASK = PasskeyTask(digit_ids=list(range(10)), needle_prefix=[11, 12], needle_suffix=[13], query=[14, 15],
                      bos_id=10, filler_pool=list(range(16, 32)))  # the pure token-id construction: no tokenizer


class RecallingMock(torch.nn.Module):
    """Stands in for a CausalLM in prefill/decode_step: reads the key out of the prompt and answers it
    correctly when the key's first digit is < 5 and the needle lies in the prompt's second half;
    otherwise only the last digit is wrong. Logs (prompt length, depth proxy, key, right) per trial."""

    def __init__(self, digits: int):
        super().__init__()
        self.digits, self.log = digits, []
        self.lm_head = torch.nn.Identity()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # model_device() needs a parameter

    def hidden_states(self, input_ids: torch.Tensor, cache: DecodeCache):
        if not cache.layers:  # prefill: plan the answers
            plans = []
            for row in input_ids.tolist():
                start = next(i for i in range(len(row)) if row[i:i + 2] == [11, 12])
                key = row[start + 2:start + 2 + self.digits]
                right = key[0] < 5 and start >= len(row) / 2
                plans.append(key if right else [*key[:-1], (key[-1] + 1) % 10])
                self.log.append((len(row), start, right))
            cache.layers, cache.seq_len = [torch.tensor(plans)], 0
        step = cache.seq_len
        cache.seq_len += 1
        onehot = torch.nn.functional.one_hot(cache.layers[0][:, step], 32).float()
        return onehot[:, None, :].expand(-1, input_ids.shape[1], -1), None


def test_accuracy_matches_a_hand_count():
    digits, lengths, depths, samples = 3, [24, 40], [0.0, 0.6, 1.0], 7
    mock = RecallingMock(digits)
    cells = evaluate_passkey(mock, ID_TASK, lengths, depths, samples, digits, seed=1, batch_size=3)
    assert [(c["length"], c["depth"]) for c in cells] == [(n, d) for n in lengths for d in depths]
    log = iter(mock.log)  # trials in cell order (3 + 3 + 1 per cell, same order)
    for cell in cells:
        trials = [next(log) for _ in range(samples)]
        assert all(length == cell["length"] for length, _, _ in trials)
        right = sum(ok for _, _, ok in trials)
        assert cell["correct"] == right and cell["accuracy"] == pytest.approx(right / samples)
        # A wrong answer misses exactly one digit of three.
        assert cell["digit_accuracy"] == pytest.approx((right * 3 + (samples - right) * 2) / (samples * 3))
    by_depth = {c["depth"]: c["accuracy"] for c in cells if c["length"] == 40}
    assert by_depth[0.0] == 0.0 and 0.0 < by_depth[1.0] < 1.0  # some right, some wrong, per the mock's rule
    again = evaluate_passkey(RecallingMock(digits), ID_TASK, lengths, depths, samples, digits, seed=1, batch_size=7)
    assert again == cells  # batching changes nothing


def test_bad_depth_and_short_length_name_the_fix():
    with pytest.raises(EvalError, match=r"depth=1.5 is outside \[0, 1\].*depths="):
        ID_TASK.needle_start(64, 1.5, 5)
    with pytest.raises(EvalError, match="use lengths of at least 11 tokens"):
        evaluate_passkey(RecallingMock(5), ID_TASK, [64, 10], [0.5], 1, 5)


# -- the fine-tune -----------------------------------------------------------------------------------
def answer_loss(model, data: PasskeyBatches) -> float:
    nll, tokens = 0.0, 0
    for batch in data.batches():
        scores = token_nll(model, batch["input_ids"], batch["labels"])
        nll, tokens = nll + float(scores.nll.double().sum()), tokens + int(scores.mask.sum())
    return nll / tokens


def test_finetune_lowers_the_answer_loss(task):
    model = make_model(seed=2)
    cfg = FinetuneConfig(steps=30, seq_len="72", lr=3e-3, warmup_steps=2, batch_size=4, micro_batch_size=2,
                         eval_samples=8, log_every=0)
    probe = PasskeyBatches(task, (72, 72), 3, 4, 2, 8, seed=0)  # the same fixed samples the fine-tune reports on
    before = answer_loss(model, probe)
    report = finetune(model, task, cfg, digits=3, seed=0)
    after = answer_loss(model, probe)
    assert report["answer_loss_before"] == pytest.approx(before, rel=1e-5)
    assert report["answer_loss_after"] == pytest.approx(after, rel=1e-5)
    assert after < before and len(report["losses"]) == 30 and not model.training


def test_a_signal_during_the_finetune_stops_the_command(task, monkeypatch):
    """SIGTERM makes the Trainer checkpoint and return; the passkey command must not then go on to
    evaluate a half-tuned model as if the fine-tune had finished."""
    import signal

    from sbtrain.trainer.trainer import Trainer

    def sigterm_seen(self):
        self._stop_signal = signal.SIGTERM
        return True

    monkeypatch.setattr(Trainer, "_stop_requested", sigterm_seen)
    cfg = FinetuneConfig(steps=30, seq_len="72", batch_size=2, micro_batch_size=1, eval_samples=2, log_every=0)
    with pytest.raises(EvalError, match="stopped by SIGTERM at step 1 of 30: nothing is evaluated"):
        finetune(make_model(seed=2), task, cfg, digits=3, seed=0)


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_writes_table_json_and_heatmap(weights_dir, tokenizer, task, tmp_path, capsys):
    from sbtrain.models.weights import save_weights

    other = make_model(seed=1)
    save_weights(other.state_dict().items(), other.config, tmp_path / "other")
    main(["passkey", f"ckpt={weights_dir}", f"ckpts=['{tmp_path / 'other'}']", "labels=[hybrid,other]",
          f"tokenizer.path={weights_dir / 'tokenizer'}", "lengths=[72,96]", "depths=[0,1]", "samples=3", "digits=2",
          "batch_size=2", "finetune.steps=2", "finetune.seq_len=72", "finetune.batch_size=2",
          "finetune.micro_batch_size=1", "finetune.eval_samples=2", "finetune.log_every=1", "finetune.save=true", f"out={tmp_path / 'out'}"])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "passkey.json").read_text())["results"]
    assert [r["label"] for r in results] == ["hybrid", "other"]
    assert (tmp_path / "out" / "passkey.png").stat().st_size > 1000
    assert "hybrid: passkey accuracy" in printed and "d=0" in printed and "finetune step 2/2" in printed
    # The second model's numbers are those of the building blocks on the same checkpoint.
    reference = make_model(seed=1)
    tuned = finetune(reference, task, FinetuneConfig(steps=2, seq_len="72", batch_size=2, micro_batch_size=1,
                                                     eval_samples=2, log_every=0), digits=2)
    assert results[1]["finetune"]["answer_loss_after"] == pytest.approx(tuned["answer_loss_after"], rel=1e-4)
    cells = evaluate_passkey(reference, task, [72, 96], [0.0, 1.0], 3, 2, batch_size=2)
    assert [c["correct"] for c in results[1]["cells"]] == [c["correct"] for c in cells]
    assert len(results[0]["cells"]) == 4 and results[0]["finetune"]["steps"] == 2
    saved = tmp_path / "out" / "finetuned" / "other"  # the fine-tuned weights, loadable for a later run
    from sbtrain.models import build_model
    from sbtrain.models.weights import load_config, load_into

    reloaded = build_model(load_config(saved))
    load_into(reloaded, saved)
    assert torch.allclose(reloaded.lm_head.weight, reference.lm_head.weight, atol=1e-6)
    assert not torch.allclose(reloaded.lm_head.weight, other.lm_head.weight, atol=1e-6)  # it did train
    assert (saved / "tokenizer").is_dir()


@pytest.mark.parametrize("override,message", [
    ("depths=[0,1.5]", "depth=1.5 is outside [0, 1]"),
    ("lengths=[16]", "use lengths of at least"),
    ("lengths=[4x]", "write e.g. 4096, 4k"),
    ("finetune.stepz=3", "did you mean finetune.steps"),
    ("filler=words", "filler='words' is not one of"),
    ("finetune.steps=1 finetune.batch_size=3", "finetune.batch_size=3 must be a multiple of"),
])
def test_bad_input_exits_2_naming_the_fix(weights_dir, override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["passkey", f"ckpt={weights_dir}", "finetune.steps=0", *override.split()])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
