"""The conversation set of ``make sft``: generated, nothing downloaded or committed.

Three kinds of exchange, so the SFT of the ``make train`` model (which has read the Python standard
library's source) has something in its own domain and something it can only learn as a format:

- "What does ``json.dumps`` do?" -> the first sentence of that function's docstring (the standard
  library of the running Python, the same text ``make train`` pretrained on);
- "What is 12 plus 7?" -> "12 plus 7 is 19.";
- "Repeat after me: <words>" -> the words.

Some conversations carry a system message or a second exchange. One JSON line per conversation:
``{"messages": [{"role": ..., "content": ...}, ...]}`` (docs/SFT.md).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
from pathlib import Path

MODULES = ("os", "os.path", "json", "re", "math", "string", "textwrap", "itertools", "functools", "collections",
           "shutil", "random", "statistics", "heapq", "bisect", "fnmatch", "glob", "base64", "hashlib", "copy",
           "operator", "difflib", "csv", "html", "urllib.parse", "zlib", "struct", "time", "calendar", "pathlib")
WORDS = ("red", "blue", "green", "river", "stone", "light", "cloud", "seven", "north", "paper", "quiet", "bright")
SYSTEM = "You are a helpful assistant for Python programmers."


def docstring_answers() -> list[tuple[str, str]]:
    """``(qualified name, first sentence of its docstring)`` for public functions of :data:`MODULES`."""
    out = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not callable(obj) or inspect.isclass(obj):
                continue
            doc = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
            sentence = doc.split(". ")[0].rstrip(".")
            if 15 <= len(sentence) <= 160 and "(" not in sentence[:1] and not sentence.startswith(attr + "("):
                out.append((f"{name}.{attr}", sentence + "."))
    return out


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = docstring_answers()

    def exchange() -> list[dict]:
        kind = rng.random()
        if kind < 0.5 and docs:
            name, answer = rng.choice(docs)
            return [{"role": "user", "content": f"What does {name} do?"}, {"role": "assistant", "content": answer}]
        if kind < 0.8:
            a, b = rng.randint(1, 40), rng.randint(1, 40)
            return [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        return [{"role": "user", "content": f"Repeat after me: {words}"}, {"role": "assistant", "content": words}]

    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
        messages += exchange()
        if rng.random() < 0.25:
            messages += exchange()
        out.append({"messages": messages})
    return out


def write_conversations(out: str | os.PathLike, n: int = 3000, seed: int = 0) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    records = make_conversations(n, seed)
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, out)
    return {"path": str(out), "conversations": len(records), "docstrings": len(docstring_answers())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/chat/conversations.jsonl")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write_conversations(args.out, args.n, args.seed)))


if __name__ == "__main__":
    main()
