"""The generated conversation set of ``make sft``: valid records, deterministic, with every kind."""

from sbtrain.data.chat import check_messages
from sbtrain.data.chat_corpus import docstring_answers, make_conversations, write_conversations


def test_generated_conversations_are_valid_and_deterministic(tmp_path):
    records = make_conversations(300, seed=4)
    assert records == make_conversations(300, seed=4) != make_conversations(300, seed=5)
    questions = [check_messages(r, "messages")[-2]["content"] for r in records]  # every record is valid
    assert any(q.startswith("What does ") for q in questions)
    assert any(" plus " in q for q in questions) and any(q.startswith("Repeat after me") for q in questions)
    name, answer = docstring_answers()[0]
    assert "." in name and answer.endswith(".")
    info = write_conversations(tmp_path / "c.jsonl", 50, seed=4)
    assert info["conversations"] == 50 and len((tmp_path / "c.jsonl").read_text().splitlines()) == 50
