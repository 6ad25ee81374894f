"""The lm-evaluation-harness adapter, run through lm-eval's own API on local YAML tasks over local
jsonl (offline): multiple-choice log-likelihoods and accuracy, rolling log-likelihood, and greedy
generation equal what the tiny model gives when computed by hand with full logits / generate();
``sbtrain-eval lm_eval`` reports the same accuracy."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "doc1: alpha beta", "choices": ["gamma", "delta epsilon", "spike"], "answer": 1},
    {"question": "doc2: window token", "choices": ["linear attention", "decay"], "answer": 0},
    {"question": "doc3: ü é ß", "choices": ["omega", "pi rho", "tau!"], "answer": 2},
]


def write_tasks(root, tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS))
    (tmp_path / "roll.jsonl").write_text("".join(json.dumps({"text": q["question"] + " " + q["choices"][0]},
                                                            ensure_ascii=False) + "\n" for q in QUESTIONS))
    root.mkdir()
    (root / "tiny_mc.yaml").write_text(f"""task: sbtrain_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (root / "tiny_roll.yaml").write_text(f"""task: sbtrain_tiny_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'roll.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")


def hand_loglikelihood(model, tok, context_ids: list[int], continuation_ids: list[int]) -> float:
    whole = context_ids + continuation_ids
    with torch.no_grad():
        logp = model(torch.tensor([whole[:-1]]), return_logits=True).logits[0].double().log_softmax(-1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lm_eval")
    write_tasks(tmp_path / "tasks", tmp_path)
    return tmp_path / "tasks"


@pytest.fixture(scope="module")
def results(task_dir, weights_dir):
    from lm_eval.tasks import TaskManager

    import sbtrain.eval.lm_eval_adapter  # noqa: F401  registers "sbtrain"

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # skip ~10k built-in task YAMLs
    return lm_eval.simple_evaluate(model="sbtrain", model_args={"ckpt": str(weights_dir), "batch_size": 2},
                                   tasks=["sbtrain_tiny_mc", "sbtrain_tiny_roll"], task_manager=manager,
                                   log_samples=True, num_fewshot=0)


def test_multiple_choice_scores_equal_hand_loglikelihoods(results, model, tokenizer):
    tok, _ = tokenizer
    samples = sorted(results["samples"]["sbtrain_tiny_mc"], key=lambda s: s["doc_id"])
    correct = []
    for sample, q in zip(samples, QUESTIONS):
        context = encode(tok, q["question"])
        hand = []
        for choice in q["choices"]:
            whole = encode(tok, q["question"] + " " + choice)  # lm-eval: encode the whole, split after the context
            hand.append(hand_loglikelihood(model, tok, context, whole[len(context):]))
        got = [resp[0] for resp in sample["filtered_resps"]]
        assert got == pytest.approx(hand, abs=1e-4)
        correct.append(max(range(len(hand)), key=hand.__getitem__) == q["answer"])
    assert results["results"]["sbtrain_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_rolling_loglikelihood_equals_hand_sum(results, model, tokenizer):
    tok, eod = tokenizer
    samples = sorted(results["samples"]["sbtrain_tiny_roll"], key=lambda s: s["doc_id"])
    for sample, q in zip(samples, QUESTIONS):
        ids = encode(tok, q["question"] + " " + q["choices"][0])
        hand = hand_loglikelihood(model, tok, [eod], ids)  # shorter than max_length: one window after EOD
        got = sample["filtered_resps"][0]
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got == pytest.approx(hand, abs=1e-4)


def test_rolling_windows_cover_every_token_once(model, tokenizer):
    from sbtrain.eval.lm_eval_adapter import SbtrainLM

    tok, eod = tokenizer
    text = " ".join(q["question"] for q in QUESTIONS)
    lm = SbtrainLM(model=model, tokenizer=tok, eod_id=eod, max_length=5)
    ids = encode(tok, text)
    assert len(ids) > 10  # several windows
    # Each window predicts its tokens with at most 5 tokens of context: a hand loop over disjoint chunks.
    hand, start = 0.0, 0
    while start < len(ids):
        stop = min(start + 5, len(ids))
        context = ([eod] + ids)[max(stop - 5, 0):start + 1] if start == 0 else ids[stop - 6:start]
        hand += hand_loglikelihood(model, tok, context, ids[start:stop])
        start = stop
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0] == pytest.approx(hand, abs=1e-4)


def test_generate_until_is_greedy_decode(model, tokenizer):
    from sbtrain.eval.lm_eval_adapter import SbtrainLM
    from sbtrain.models import generate

    tok, eod = tokenizer
    lm = SbtrainLM(model=model, tokenizer=tok, eod_id=eod, max_length=64)
    prompts = [q["question"] for q in QUESTIONS]
    got = lm.generate_until([SimpleNamespace(args=(p, {"until": [], "max_gen_toks": 6})) for p in prompts])
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([encode(tok, prompt)])
        new = generate(model, ids, 6)[0, ids.shape[1]:].tolist()
        new = new[:new.index(eod)] if eod in new else new
        assert text == tok.decode(new)
    # A stop string cuts the text before it.
    first = got[0]
    if len(first) > 2:
        stop = first[1:3]
        cut = lm.generate_until([SimpleNamespace(args=(prompts[0], {"until": [stop], "max_gen_toks": 6}))])[0]
        assert cut == first.split(stop)[0]


def test_cli_lm_eval_subcommand(results, task_dir, weights_dir, tmp_path, capsys):
    from sbtrain.cli.eval import main

    main(["lm_eval", f"ckpt={weights_dir}", "harness.tasks=[sbtrain_tiny_mc]", f"harness.include_path={task_dir}",
          "harness.include_defaults=false", f"out={tmp_path}"])
    saved = json.loads((tmp_path / "lm_eval.json").read_text())[weights_dir.name]["results"]["sbtrain_tiny_mc"]
    assert saved["acc,none"] == results["results"]["sbtrain_tiny_mc"]["acc,none"]
    assert "acc,none" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["lm_eval", f"ckpt={weights_dir}", "harness.tasks=[no_such_task]", f"harness.include_path={task_dir}",
              "harness.include_defaults=false"])
    assert "harness.include_path" in capsys.readouterr().err
