"""Hugging Face ``generate()`` speed of an exported hybrid (``sbtrain-export`` folder loaded with
``trust_remote_code=True``) with its decode cache (``SbtrainCache``), the same model without a cache
(every step recomputes the whole sequence), and HF transformers' ``Qwen2ForCausalLM`` built from
the config of the same width (``qwen2_tiny``, random weights, sdpa attention) with its KV cache,
at 1k / 8k / 32k tokens of context, one run, same machine, same prompts.

Greedy decoding of ``--new-tokens`` tokens after a random prompt of each length, batch 1, fp32.
A logits processor timestamps every step, so one ``generate()`` gives the prefill time (call to
the first token's logits) and the decode speed (the remaining tokens over the time between the
first and the last logits). Without a cache a step costs a whole forward over the context, so
contexts above ``--nocache-max`` are skipped (printed with the reason). Prints a table with each
decode speed as a ratio to cached Qwen2 at the same context, writes ``hf_generate.json`` and,
when matplotlib is installed, ``hf_generate.png`` under ``--out``.

``python benchmarks/hf_generate.py [--model sb7b_tiny] [--lengths 1024,8192,32768] [--new-tokens 16] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import hf_qwen2, model_config  # the Qwen2 baseline built as bench-train builds it

from sbtrain.export import export
from sbtrain.models import build_model
from sbtrain.models.weights import save_weights

BASELINE = "hf_qwen2 (cache)"


class StepClock:
    """A logits processor that records when each step's logits arrive (it changes nothing)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def cache_bytes(cache) -> int | None:
    """Tensor bytes of a returned cache: SbtrainCache counts its own; a DynamicCache its keys/values."""
    if cache is None:
        return None
    if hasattr(cache, "tensor_bytes"):
        return cache.tensor_bytes()
    tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def timed_generate(model, ids: torch.Tensor, new_tokens: int, use_cache: bool) -> dict:
    from transformers import LogitsProcessorList

    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0,
                             return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]))
    end = time.perf_counter()
    steps = clock.times
    decode_s = steps[-1] - steps[0]
    return {"prefill_s": steps[0] - start, "decode_tokens_per_s": (len(steps) - 1) / decode_s if decode_s > 0 else None,
            "generate_tokens_per_s": len(steps) / (end - start), "new_tokens": len(steps),
            "cache_bytes": cache_bytes(getattr(out, "cache", None))}


def exported_model(name: str, folder: Path):
    """Random-init sbtrain model of recipe ``name`` -> sbtrain-export -> AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(model_config(name)).eval()
    save_weights(model.state_dict().items(), model.config, folder / "weights")
    out = export(folder / "weights", folder / "hf")
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sb7b_tiny", help="sbtrain model recipe to export (recipes/model/)")
    p.add_argument("--baseline", default="qwen2_tiny", help="recipe whose shapes build HF Qwen2ForCausalLM")
    p.add_argument("--lengths", default="1024,8192,32768", help="comma-separated context lengths (prompt tokens)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated after each prompt")
    p.add_argument("--nocache-max", type=int, default=8192,
                   help="longest context run without a cache (each of its steps is a whole forward)")
    p.add_argument("--repeats", type=int, default=1,
                   help="generate() calls per point; the one with the median decode speed is kept (noisy machines)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error(f"--new-tokens={args.new_tokens} must be >= 2 (decode speed needs two timed steps)")
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    workdir = tempfile.TemporaryDirectory(prefix="hf_generate_")  # the export lives as long as the run
    hybrid = exported_model(args.model, Path(workdir.name))
    torch.manual_seed(0)
    qwen2 = hf_qwen2(model_config(args.baseline)).eval()
    models = {BASELINE: (qwen2, True), f"{args.model} (cache)": (hybrid, True),
              f"{args.model} (no cache)": (hybrid, False)}
    vocab = min(hybrid.config.vocab_size, qwen2.config.vocab_size)
    warm = torch.randint(1, vocab, (1, 16))
    for model, use_cache in models.values():  # first-call costs (allocations, lazy imports) out of the timings
        timed_generate(model, warm, 2, use_cache)
    rows, skipped = [], []
    for T in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(1, vocab, (1, T), generator=torch.Generator().manual_seed(T))
        for name, (model, use_cache) in models.items():
            if not use_cache and T > args.nocache_max:
                reason = (f"{name} at {T} tokens skipped: without a cache every one of the {args.new_tokens} steps "
                          f"is a whole {T}-token forward (raise --nocache-max={args.nocache_max} to run it)")
                print(reason, flush=True)
                skipped.append({"seq_len": T, "model": name, "reason": reason})
                continue
            runs = sorted((timed_generate(model, ids, args.new_tokens, use_cache) for _ in range(args.repeats)),
                          key=lambda run: run["decode_tokens_per_s"])
            result = runs[len(runs) // 2]
            rows.append({"seq_len": T, "model": name, **result})
            print(f"  {T:>6} {name:<24} prefill {result['prefill_s']:7.2f} s  "
                  f"decode {result['decode_tokens_per_s']:8.1f} tok/s", flush=True)
    for r in rows:
        base = next(b for b in rows if b["seq_len"] == r["seq_len"] and b["model"] == BASELINE)
        r["decode_speed_vs_qwen2"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    print(f"\n{'context':>7} {'model':<24} {'prefill s':>9} {'decode tok/s':>12} {'generate tok/s':>14} "
          f"{'cache MB':>9} {'decode vs Qwen2':>15}")
    for r in rows:
        mb = f"{r['cache_bytes'] / 2**20:9.2f}" if r["cache_bytes"] is not None else f"{'-':>9}"
        print(f"{r['seq_len']:>7} {r['model']:<24} {r['prefill_s']:>9.2f} {r['decode_tokens_per_s']:>12.1f} "
              f"{r['generate_tokens_per_s']:>14.1f} {mb} {r['decode_speed_vs_qwen2']:>15.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "model": args.model, "baseline": args.baseline, "new_tokens": args.new_tokens, "batch": 1,
            "dtype": "float32", "repeats": args.repeats, "command": " ".join(sys.argv)}
    (out / "hf_generate.json").write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))
    print(f"\nwrote {out / 'hf_generate.json'}")
    try:
        plot(rows, out / "hf_generate.png")
        print(f"wrote {out / 'hf_generate.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        points = [(r["seq_len"], r["decode_tokens_per_s"]) for r in rows if r["model"] == name]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("HF generate(), greedy, batch 1, fp32, this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
