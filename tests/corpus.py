"""Tiny generated corpora shared by the data and trainer tests (no files, no network)."""

import json
import random

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "spike", "linear", "attention", "gate", "decay", "window", "token"]


def make_docs(n: int, seed: int = 0, prefix: str = ""):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
        docs.append(f"{prefix}doc{i}: " + " ".join(words) + rng.choice([".", "!", " ü é ß."]))
    return docs


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({field: d, "id": len(d)}, ensure_ascii=False) + "\n" for d in docs)
