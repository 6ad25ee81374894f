"""Conversation records -> tokens + loss mask: the mask covers exactly the assistant turns, travels
with the tokens through packing, and bad records are named or counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbtrain.config.data import ChatConfig, DataConfig, TokenizerConfig
from sbtrain.data import build_indexed_dataset
from sbtrain.data.chat import BUILTIN_TEMPLATES, check_messages, encode_conversation, resolve_template
from sbtrain.data.loader import IGNORE_INDEX, PackedLoader
from sbtrain.data.sources import DataError
from sbtrain.data.tokenizer import load_tokenizer
from tests.chat_corpus import make_conversations, write_conversations

BPE = TokenizerConfig(kind="train_bpe", vocab_size=400, min_frequency=2)


def build_chat(tmp_path, records, name="chat", tokenizer=BPE, **chat_kw):
    path = write_conversations(tmp_path / f"{name}.jsonl", records)
    data = DataConfig(paths=[path], output=str(tmp_path / name), records="chat",
                      chat=ChatConfig(**{k: v for k, v in chat_kw.items() if k in ChatConfig.__dataclass_fields__}),
                      on_bad_record=chat_kw.get("on_bad_record", "error"))
    return build_indexed_dataset(data, tokenizer), str(tmp_path / name)


@pytest.fixture(scope="module")
def chat_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    manifest, out = build_chat(root, make_conversations(120, seed=3))
    return {"root": root, "manifest": manifest, "dir": out, "records": make_conversations(120, seed=3)}


def test_the_mask_covers_exactly_the_assistant_turns(chat_set):
    tok, _ = load_tokenizer(chat_set["manifest"]["tokenizer"]["path"])
    template = resolve_template(None, tok)  # the trained tokenizer carries chatml
    for record in chat_set["records"][:12]:
        messages = check_messages(record, "messages")
        ids, mask = encode_conversation(tok, messages, template)
        trained = tok.decode(ids[mask == 1].tolist())
        expected = "".join(f"{m['content']}<|im_end|>\n" for m in messages if m["role"] == "assistant")
        assert trained == expected
        # Everything else decodes to the prompt parts: system / user turns and the assistant headers.
        untrained = tok.decode(ids[mask == 0].tolist())
        assert all(m["content"] in untrained for m in messages if m["role"] != "assistant")
    everything = encode_conversation(tok, messages, template, "all")[1]
    assert everything.all()


def test_build_writes_a_mask_beside_the_tokens(chat_set):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest, out = chat_set["manifest"], chat_set["dir"]
    assert manifest["records"] == "chat" and manifest["num_documents"] == 120
    tokens, masks = IndexedDataset(f"{out}/data"), IndexedDataset(f"{out}/mask")
    assert list(tokens.sequence_lengths) == list(masks.sequence_lengths)
    trained = sum(int(masks[i].sum()) for i in range(len(masks)))
    assert trained == manifest["loss_mask"]["trained_tokens"] > 0
    eod = manifest["tokenizer"]["eod_id"]
    for i in range(5):
        assert tokens[i][-1] == eod and masks[i][-1] == 0  # the document end carries no loss (assistant mode)


def test_packed_labels_are_ignored_exactly_outside_the_mask(chat_set):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = chat_set["dir"]
    loader = PackedLoader([out], seq_len=64, global_batch_size=4, micro_batch_size=2, seed=1, shuffle_window=4)
    tokens, masks = IndexedDataset(f"{out}/data"), IndexedDataset(f"{out}/mask")
    stream_tokens = np.concatenate([tokens[i] for i in range(len(tokens))]).astype(np.int64)
    stream_mask = np.concatenate([masks[i] for i in range(len(masks))])
    for _ in range(3):
        for mb in loader.next_global_batch():
            for row in range(mb["input_ids"].shape[0]):
                labels = mb["labels"][row]
                ignored = labels == IGNORE_INDEX
                assert 0 < int(ignored.sum()) < labels.numel()
                # Each trained label is a token inside an assistant turn of some conversation.
                assert torch.isin(labels[~ignored], torch.from_numpy(stream_tokens[stream_mask == 1])).all()
    # Exactly: the labels of a sample are its next tokens where their mask is 1, IGNORE_INDEX elsewhere.
    first = PackedLoader([out], seq_len=len(stream_tokens) // 4, global_batch_size=1, micro_batch_size=1, seed=0,
                         shuffle_window=1)
    plan = first.sample_plan(0)
    from sbtrain.data.samples import materialize, materialize_mask

    sample, sample_mask = materialize(first.sets, plan), materialize_mask(first.sets, plan)
    batch = first.next_global_batch()[0]
    labels = batch["labels"][0]
    assert torch.equal(batch["input_ids"][0], torch.from_numpy(sample[:-1])), "masking reached the inputs"
    expected = torch.from_numpy(np.where(sample_mask[1:] == 1, sample[1:], IGNORE_INDEX))
    assert torch.equal(labels, expected)


def test_validation_batches_keep_inputs_and_mask_labels(chat_set):
    out = chat_set["dir"]
    loader = PackedLoader([out], seq_len=64, global_batch_size=2, micro_batch_size=2, valid_fraction=0.1)
    batches = list(loader.valid_batches())
    vocab = chat_set["manifest"]["tokenizer"]["vocab_size"]
    for mb in batches:
        assert (mb["input_ids"] >= 0).all() and (mb["input_ids"] < vocab).all()
        assert (mb["labels"] == IGNORE_INDEX).any() and (mb["labels"] != IGNORE_INDEX).any()


def test_bad_records_are_named_or_counted(tmp_path):
    good = make_conversations(30, seed=5)
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
           {"messages": [{"role": "user", "content": "anyone?"}]},
           {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
           {"text": "not a conversation"}]
    records = good[:10] + bad + good[10:]
    with pytest.raises(DataError, match=r"bad\.jsonl line 11: message 1 has role 'robot'.*data.on_bad_record=skip"):
        build_chat(tmp_path, records, name="bad")
    manifest, _ = build_chat(tmp_path, records, name="bad", on_bad_record="skip")
    assert manifest["num_documents"] == 30
    assert manifest["skipped"] == {"unknown_role": 1, "no_assistant": 1, "bad_message": 1, "no_messages": 1}
    assert manifest["loss_mask"]["first_skipped"][0].endswith("line 11: message 1 has role 'robot'; the roles are "
                                                              "system, user, assistant, tool")


def test_too_long_conversations_are_counted_not_cut(tmp_path):
    records = make_conversations(20, seed=6)
    records[3]["messages"][-1]["content"] = "very long answer " * 40
    manifest, _ = build_chat(tmp_path, records, name="long", max_tokens=60, on_bad_record="skip")
    assert manifest["skipped"] == {"too_long": 1} and manifest["num_documents"] == 19


def test_a_tokenizer_without_a_template_needs_one_named(tmp_path, chat_set):
    from transformers import AutoTokenizer

    plain = tmp_path / "plain_tok"
    tok = AutoTokenizer.from_pretrained(chat_set["manifest"]["tokenizer"]["path"])
    tok.chat_template = None
    tok.save_pretrained(plain)
    pretrained = TokenizerConfig(kind="pretrained", path=str(plain))
    with pytest.raises(DataError, match=r"has no chat template.*data.chat.template=chatml"):
        build_chat(tmp_path, make_conversations(5), name="notpl", tokenizer=pretrained)
    manifest, _ = build_chat(tmp_path, make_conversations(5), name="named", tokenizer=pretrained, template="chatml")
    assert manifest["loss_mask"]["template"] == "chatml"
    assert manifest["loss_mask"]["chat_template"] == BUILTIN_TEMPLATES["chatml"][0]
    with pytest.raises(DataError, match=r"data.chat.template='nope' is neither"):
        build_chat(tmp_path, make_conversations(5), name="nope", tokenizer=pretrained, template="nope")


def test_a_template_that_is_not_incremental_is_refused(tmp_path, chat_set):
    reversed_template = ("{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    path = tmp_path / "rev.jinja"
    path.write_text(reversed_template)
    tok = TokenizerConfig(kind="pretrained", path=chat_set["manifest"]["tokenizer"]["path"])
    with pytest.raises(DataError, match=r"does not render the conversation up to message \d as a prefix"):
        build_chat(tmp_path, make_conversations(5), name="rev", tokenizer=tok, template=str(path))
    manifest, _ = build_chat(tmp_path, make_conversations(5), name="rev_all", tokenizer=tok, template=str(path),
                             loss_on="all")
    assert manifest["loss_mask"]["trained_tokens"] == manifest["num_tokens"]
    assert json.loads(json.dumps(manifest))["records"] == "chat"


def test_worker_processes_build_the_same_dataset(tmp_path, chat_set):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    records = make_conversations(600, seed=8)
    records[7] = {"messages": [{"role": "user", "content": "no answer"}]}  # a skip, counted the same way
    tok = TokenizerConfig(kind="pretrained", path=chat_set["manifest"]["tokenizer"]["path"])
    one, dir_one = build_chat(tmp_path, records, name="one", tokenizer=tok, on_bad_record="skip")
    path = write_conversations(tmp_path / "two.jsonl", records)
    data = DataConfig(paths=[path], output=str(tmp_path / "two"), records="chat", num_proc=2, on_bad_record="skip")
    two = build_indexed_dataset(data, tok)
    assert (one["num_tokens"], one["skipped"], one["loss_mask"]["trained_tokens"]) == \
        (two["num_tokens"], two["skipped"], two["loss_mask"]["trained_tokens"])
    for prefix in ("data", "mask"):
        a, b = IndexedDataset(f"{dir_one}/{prefix}"), IndexedDataset(f"{tmp_path}/two/{prefix}")
        assert all(np.array_equal(a[i], b[i]) for i in range(len(a))) and len(a) == len(b) == 599


TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for call in m.get('tool_calls') or [] %}<call>{{ call['function']['name'] }}"
    "({{ call['function']['arguments'] }})</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tool_calls_and_tool_results_train_the_calls(tmp_path, chat_set):
    """An assistant turn that only calls a tool is trained on (the call as the template renders it);
    the tool's result is context, like a user turn."""
    tok, _ = load_tokenizer(chat_set["manifest"]["tokenizer"]["path"])
    path = tmp_path / "tools.jinja"
    path.write_text(TOOL_TEMPLATE)
    template = resolve_template(str(path))
    record = {"messages": [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "5"},
        {"role": "assistant", "content": "2 plus 3 is 5."}]}
    ids, mask = encode_conversation(tok, check_messages(record, "messages"), template)
    trained = tok.decode(ids[mask == 1].tolist())
    assert trained == '<call>add({"a": 2, "b": 3})</call><|im_end|>\n2 plus 3 is 5.<|im_end|>\n'
    no_call = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}
    with pytest.raises(ValueError, match="message 1 \\(assistant\\) has no text content"):
        check_messages(no_call, "messages")
