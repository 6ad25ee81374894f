"""SFT demo: the ``make train`` model before and after ``make sft``, side by side.

    make train && make sft
    .venv/bin/python benchmarks/sft_demo.py --cpt runs/tiny_cpu-<time> --sft runs/tiny_sft-<time>

Both models get the same three prompts through ``sbtrain-generate chat=true`` (greedy, chatml) and the
same held-out conversations (generated with another seed than the training set) through
``sbtrain-eval chat_loss``. Prints a markdown table (the baseline is the CPT model, in the same run)
and writes ``<out>/sft_demo.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbtrain.cli.generate import GenerateConfig, chat
from sbtrain.data.chat_corpus import make_conversations
from sbtrain.eval.chat_loss import chat_loss
from sbtrain.eval.loading import chat_template_of, load_eval_model

PROMPTS = ("What is 12 plus 7?", "What does json.dumps do?", "Repeat after me: quiet river stone")


def reply(ckpt: str, prompt: str, max_new_tokens: int) -> dict:
    cfg = GenerateConfig(ckpt=ckpt, prompt=prompt, max_new_tokens=max_new_tokens, chat=True, template="chatml",
                         format="json")
    return chat(cfg, out=io.StringIO())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpt", required=True, help="the make-train run (out_dir or checkpoint)")
    parser.add_argument("--sft", required=True, help="the make-sft run")
    parser.add_argument("--held-out", type=int, default=200, help="held-out conversations (seed 1)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/out/sft_demo")
    args = parser.parse_args()

    held = [(f"held-out {i}", record) for i, record in enumerate(make_conversations(args.held_out, seed=1))]
    results = {}
    for name, ckpt in (("before (CPT)", args.cpt), ("after (SFT)", args.sft)):
        loaded = load_eval_model(ckpt)
        loss = chat_loss(loaded, held, chat_template_of(loaded, "chatml"))
        del loaded
        results[name] = {"ckpt": ckpt, "chat_loss": loss,
                         "replies": [reply(ckpt, p, args.max_new_tokens) for p in PROMPTS]}
    before, after = results["before (CPT)"], results["after (SFT)"]
    print(f"held-out assistant-token loss ({before['chat_loss']['conversations']} conversations, "
          f"{before['chat_loss']['tokens']} tokens): before {before['chat_loss']['loss']:.3f} -> "
          f"after {after['chat_loss']['loss']:.3f} ({after['chat_loss']['loss'] / before['chat_loss']['loss']:.2f}x)\n")
    print("| prompt | before SFT (CPT model) | after SFT |")
    print("|---|---|---|")
    for prompt, b, a in zip(PROMPTS, before["replies"], after["replies"]):
        def cell(r):
            text = r["reply"].replace("|", "\\|").replace("\n", "\\n")
            return f"`{text[:120]}`" + ("" if r["stopped_by"] == "end_of_turn" else f" ({r['stopped_by']})")
        print(f"| {prompt} | {cell(b)} | {cell(a)} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_demo.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'sft_demo.json'}")


if __name__ == "__main__":
    main()
