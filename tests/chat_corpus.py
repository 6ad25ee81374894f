"""Synthetic conversations for the chat / SFT tests: arithmetic and colour questions whose answers
a tiny model can learn in a few steps, some with a system prompt and a second exchange."""

from __future__ import annotations

import json
import random

COLOURS = ("red", "blue", "green", "black", "white", "gold", "silver", "pink")


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a calculator."})
        if i % 4 == 0:
            colour = rng.choice(COLOURS)
            messages += [{"role": "user", "content": f"Say the colour {colour}."},
                         {"role": "assistant", "content": f"{colour.capitalize()}!"}]
        out.append({"messages": messages})
    return out


def write_conversations(path, records: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)
    return str(path)
