"""SFT on conversations: assistant-only loss from a CPT checkpoint, zero gradient on the prompt
tokens, packing-invariant loss, and context parallelism equal to one process."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from sbtrain.config.data import ChatConfig, DataConfig, TokenizerConfig
from sbtrain.data import build_indexed_dataset
from sbtrain.data.loader import IGNORE_INDEX, PackedLoader
from sbtrain.trainer.batches import PackedBatches
from tests.chat_corpus import make_conversations, write_conversations
from tests.corpus import make_docs, write_jsonl
from tests.distributed.harness import run_distributed
from tests.distributed.parallel_cases import model_config
from tests.trainer.e2e import losses, run

VOCAB = 320


@pytest.fixture(scope="module")
def chat_sets(tmp_path_factory):
    """A conversation set (BPE trained on it, chatml) and a plain-text set with the same tokenizer."""
    root = tmp_path_factory.mktemp("sft")
    chat = DataConfig(paths=[write_conversations(root / "chat.jsonl", make_conversations(400, seed=11))],
                      output=str(root / "chat"), records="chat", chat=ChatConfig())
    manifest = build_indexed_dataset(chat, TokenizerConfig(kind="train_bpe", vocab_size=VOCAB, min_frequency=2))
    text_path = root / "text.jsonl"
    write_jsonl(text_path, make_docs(200, seed=12, prefix="T"))
    text = DataConfig(paths=[str(text_path)], output=str(root / "text"))
    build_indexed_dataset(text, TokenizerConfig(kind="pretrained", path=manifest["tokenizer"]["path"]))
    return {"chat": str(root / "chat"), "text": str(root / "text"), "manifest": manifest}


@pytest.fixture(scope="module")
def sft_run(chat_sets, tmp_path_factory):
    """A 4-step CPT run on plain text, then 30 SFT steps from its checkpoint (experiment=tiny_sft)."""
    root = tmp_path_factory.mktemp("sft_run")
    cpt, sft = root / "cpt", root / "sft"
    run(chat_sets["text"], cpt, "trainer.max_steps=4", "trainer.eval_every=0")
    summary = run(chat_sets["chat"], sft, "experiment=tiny_sft", f"trainer.init_from={cpt}", "trainer.max_steps=30",
                  "trainer.eval_every=10", "trainer.eval_batches=4", "optim.warmup_steps=2", "trainer.seq_len=64")
    return {"cpt": cpt, "sft": sft, "summary": summary}


def test_sft_from_a_cpt_checkpoint_lowers_the_assistant_loss(sft_run):
    valid = losses(sft_run["sft"], "valid")
    assert valid[30] < 0.7 * valid[0], f"the assistant-token validation loss must fall: {valid}"
    # Only assistant tokens count: far fewer trained tokens than tokens seen.
    assert 0 < sft_run["summary"]["tokens"] < 0.6 * 30 * 4 * 64
    assert sft_run["summary"]["step"] == 30


def test_chat_generation_streams_the_reply_until_the_end_of_turn(sft_run):
    import io

    from sbtrain.cli.generate import GenerateConfig, chat
    from sbtrain.cli.generate import load as load_model
    from sbtrain.models import generate

    cfg = GenerateConfig(ckpt=str(sft_run["sft"]), prompt="What is 3 plus 4?", max_new_tokens=24, chat=True)
    streamed = io.StringIO()
    result = chat(cfg, out=streamed)
    assert result["rendered_prompt"] == "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    assert streamed.getvalue() == result["reply"] + "\n"
    assert "<|im_" not in streamed.getvalue(), "a piece of the end-of-turn marker was streamed"
    model, tok = load_model(str(sft_run["sft"]), None)
    greedy = generate(model, torch.tensor([result["prompt_ids"]]), len(result["new_ids"]))[0, len(result["prompt_ids"]):]
    assert greedy.tolist() == result["new_ids"], "streaming must pick the tokens generate() picks"
    if result["stopped_by"] == "end_of_turn":
        assert tok.decode(result["new_ids"]).startswith(result["reply"] + "<|im_end|>")


def test_chat_loss_scores_the_assistant_tokens_and_falls_with_sft(sft_run, chat_sets, tmp_path):
    from sbtrain.eval.chat_loss import chat_loss, conversations
    from sbtrain.eval.loading import chat_template_of, load_eval_model

    held = make_conversations(12, seed=99)
    path = write_conversations(tmp_path / "held.jsonl", [*held, {"messages": [{"role": "user", "content": "hi"}]}])
    items = conversations([path], "messages", None)
    rows = {}
    for name in ("cpt", "sft"):
        loaded = load_eval_model(str(sft_run[name]))
        rows[name] = chat_loss(loaded, items, chat_template_of(loaded, "chatml"))
    assert rows["sft"]["loss"] < rows["cpt"]["loss"]
    assert rows["sft"]["skipped"] == {"no_assistant": 1} and rows["sft"]["conversations"] == 12
    # Exactly the tokens SFT trains on: the same conversations built as a dataset count them too.
    manifest = build_indexed_dataset(
        DataConfig(paths=[write_conversations(tmp_path / "same.jsonl", held)], output=str(tmp_path / "same"),
                   records="chat", chat=ChatConfig(template="chatml")),
        TokenizerConfig(kind="pretrained", path=chat_sets["manifest"]["tokenizer"]["path"]))
    assert rows["sft"]["tokens"] == manifest["loss_mask"]["trained_tokens"]


def _chat_loader(directory: str, seq_len: int, boundaries: bool) -> PackedLoader:
    return PackedLoader([directory], seq_len=seq_len, global_batch_size=1, micro_batch_size=1, seed=3,
                        shuffle_window=1, document_boundaries=boundaries)


def _model(document_masking: bool = True):
    from sbtrain.models import build_model

    torch.manual_seed(0)
    return build_model(model_config("sb7b", vocab_size=VOCAB, document_masking=document_masking)).double()


def test_prompt_tokens_get_no_gradient(chat_sets):
    model = _model()
    mb = PackedBatches.to_model(_chat_loader(chat_sets["chat"], 96, True).next_global_batch()[0])
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    model.model.norm.register_forward_hook(keep)
    model(**mb).loss_sum.backward()
    grad = captured["hidden"].grad[0]  # [T, d]: the logits' input at each position
    ignored = mb["labels"][0] == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert torch.count_nonzero(grad[ignored]) == 0, "a prompt position received gradient"
    assert (grad[~ignored].abs().sum(-1) > 0).all()


def test_packed_and_unpacked_conversations_give_the_same_loss(chat_sets):
    model = _model()
    mb = PackedBatches.to_model(_chat_loader(chat_sets["chat"], 128, True).next_global_batch()[0])
    bounds = mb["cu_seqlens"].tolist()
    assert len(bounds) > 3, "the sample must pack several conversations"
    with torch.no_grad():
        packed = model(**mb)
        alone = [model(mb["input_ids"][:, a:b], mb["labels"][:, a:b]) for a, b in itertools.pairwise(bounds)]
    tokens = sum(int(o.num_tokens) for o in alone)
    assert int(packed.num_tokens) == tokens
    unpacked = sum(o.loss_sum.double() for o in alone) / tokens
    assert float(packed.loss_sum) / tokens == pytest.approx(float(unpacked), rel=1e-6)


def _cp_step(directory: str, cp: int) -> dict:
    import torch.distributed as dist

    from parallel.mesh import ParallelDims
    from sbtrain.config.parallel import ParallelConfig
    from sbtrain.config.train import OptimConfig, TrainerConfig
    from sbtrain.trainer.train_module import TrainModule

    model = _model()
    mesh = ParallelDims(1, dist.get_world_size() // cp, cp, 1, 1).build_mesh() if dist.is_initialized() else None
    tcfg = TrainerConfig(global_batch_size=1, micro_batch_size=1, seq_len=128, max_steps=1)
    ocfg = OptimConfig(lr=0.0, schedule="constant", warmup_steps=0, clip_grad=0.0)
    module = TrainModule.build(model, torch.optim.SGD(model.parameters(), lr=0.0), tcfg, ocfg, mesh=mesh,
                               pcfg=ParallelConfig(cp=cp))
    grads = {}
    mb = PackedBatches.to_model(_chat_loader(directory, 128, True).next_global_batch()[0])
    stats = module.train_batch([mb], 0, lambda opt: None,
                               lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    if dist.is_initialized():  # what the data-parallel wrapper (FSDP) does over the dp x cp ranks: average
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
    return {"loss": stats.loss, "tokens": stats.tokens, "grads": grads}


def test_context_parallel_sft_equals_one_process(chat_sets):
    one = _cp_step(chat_sets["chat"], 1)
    two = run_distributed(_cp_step, 2, chat_sets["chat"], 2, timeout=120)
    for got in two:
        assert got["tokens"] == one["tokens"]
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-6)
        for name, grad in one["grads"].items():
            # fp32 chunks inside the GLA op and the loss: measured max |diff| 5e-8 on gradients of up to 0.3.
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=2e-7, msg=name)


def test_the_stream_holds_back_what_may_become_the_end_of_turn_marker():
    from sbtrain.cli.generate import _pending

    assert _pending("5 plus 2 is 7.<|im_", "<|im_end|>") == len("<|im_")
    assert _pending("5 plus 2 is 7.<", "<|im_end|>") == 1
    assert _pending("a < b", "<|im_end|>") == 0 and _pending("abc", None) == 0


def test_the_export_serves_the_chat_model(sft_run, tmp_path):
    """The exported folder carries the tokenizer with the SFT data's chat template (the make-train
    tokenizer has none), and transformers' cached generate() replies as sbtrain-generate chat=true."""
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sbtrain.cli.generate import GenerateConfig, chat
    from sbtrain.export import export

    out = export(sft_run["sft"], tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = chat(GenerateConfig(ckpt=str(sft_run["sft"]), prompt="What is 3 plus 4?", max_new_tokens=12, chat=True),
                out=io.StringIO())
    assert prompt == ours["rendered_prompt"]
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([ours["prompt_ids"]])
    new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(ours["new_ids"]), do_sample=False,
                      pad_token_id=0)[0, ids.shape[1]:]
    assert new.tolist() == ours["new_ids"]


def test_export_gives_a_template_less_tokenizer_the_sft_datas_template(chat_sets, tmp_path):
    from transformers import AutoTokenizer

    from sbtrain.export.hf_export import add_chat_template

    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / "meta.json").write_text(json.dumps({"config": {"data": {"datasets": [chat_sets["chat"]]}}}))
    tok = AutoTokenizer.from_pretrained(chat_sets["manifest"]["tokenizer"]["path"])
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    expected = chat_sets["manifest"]["loss_mask"]["chat_template"]
    assert add_chat_template(tmp_path / "tok", step, "training") == expected
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template == expected
    assert add_chat_template(tmp_path / "tok", step, "training") is None  # its own template now wins
    assert add_chat_template(tmp_path / "tok", step, "weights") is None
