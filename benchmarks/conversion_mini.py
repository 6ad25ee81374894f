"""The report's conversion result in miniature (``make bench-convert``).

On the bundled corpus (the Python standard library's source, BPE 8192; ``make train`` builds
it), in one run:

1. ``teacher``: train ``qwen2_tiny`` (a plain Transformer) for T tokens;
2. write it as a Hugging Face Qwen2 folder and convert it with ``sbtrain-convert``'s code path
   to ``sb7b_tiny`` (GLA / SWA layers, attention projections reused, new gates small);
3. ``converted``: continue pretraining the converted model for a small budget (≤ 5% of T), new
   parameters with their own learning rate;
4. ``scratch_small``: ``sb7b_tiny`` from random init for the same small budget;
5. ``scratch_full``: ``sb7b_tiny`` from random init for T (skip with ``--skip-full``);
6. the same conversion to ``sb76b_tiny`` (intra-layer hybrid + MoE upcycling), continued for the
   small budget (``--skip-76b`` skips it);
7. ``converted_sb7b_kd``: the sb7b_tiny continuation again, with distillation from the teacher's
   logits (``distill.*``) and the body learning rate of the sweep in benchmarks/RESULTS.md
   (``--skip-kd`` skips it).

Every model is evaluated on the same held-out split of the corpus (fixed samples) and on
WikiText-2 valid (``../shared/data/wikitext-2/valid.txt`` if present, read by path; perplexity
per token of our BPE). Prints a table, saves benchmarks/out/conversion_mini.json and a PNG of
validation loss vs training tokens. Runs are resumable: each stage lives in its own directory
under ``--out`` and a rerun skips finished stages.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import sbtrain.config  # noqa: F401
from sbtrain.cli.app import RECIPES_DIR
from sbtrain.models.weights import save_weights
from sbtrain.train import train
from sbtrain.trainer.build import build_trainer

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
EVAL_SAMPLES = 64  # held-out samples of SEQ tokens, identical for every model
SEQ = 256
# The distilled continuation (the best of the variants in benchmarks/RESULTS.md).
KD_SETTINGS = ["optim.lr=5e-4", "optim.new_params.lr=6e-3", "distill.weight=1.0", "distill.temperature=2.0"]


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def common(args, out: Path, batch: int, micro: int) -> list[str]:
    return [
        f"data.datasets=[{args.data}]", "data.valid_fraction=0.02", f"trainer.seq_len={SEQ}",
        f"trainer.global_batch_size={batch}", f"trainer.micro_batch_size={micro}",
        f"trainer.eval_batches={EVAL_SAMPLES // micro}", f"trainer.out_dir={out}", "logger.wandb.mode=disabled",
        "logger.console=false", "logger.plot=false", "checkpoint.keep_last=1",
    ]


def run_stage(name: str, overrides: list[str]) -> dict:
    start = time.perf_counter()
    summary = train(compose_train(overrides))
    print(f"[{name}] step {summary['step']}, {summary['tokens']:,} tokens, last valid loss "
          f"{summary['last_valid_loss']}, {time.perf_counter() - start:.0f} s", flush=True)
    return summary


def final_model(overrides: list[str]):
    trainer, _ = build_trainer(compose_train(overrides))
    if trainer.maybe_resume("auto") is None:
        raise RuntimeError(f"no checkpoint for {overrides}")
    return trainer.model.eval(), trainer


@torch.no_grad()
def mean_loss(model, batches) -> float:
    total, count = 0.0, 0
    for mb in batches:
        out = model(input_ids=mb["input_ids"], labels=mb["labels"])
        total += float(out.loss_sum)
        count += int(out.num_tokens)
    return total / max(count, 1)


def wikitext_batches(tokenizer_dir: Path, max_tokens: int):
    from transformers import AutoTokenizer

    if not WIKITEXT.exists():
        return None
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(WIKITEXT.read_text(encoding="utf-8"))["input_ids"][: max_tokens + 1]
    ids = torch.tensor(ids)
    n = (ids.numel() - 1) // SEQ
    x = ids[: n * SEQ + 1]
    inputs, labels = x[:-1].view(n, SEQ), x[1:].reshape(n, SEQ)
    return [{"input_ids": inputs[i:i + 8], "labels": labels[i:i + 8]} for i in range(0, n, 8)]


def write_teacher_as_hf(model, tokenizer_dir: Path, out: Path) -> Path:
    """Our ``qwen2`` model is HF Qwen2 numerically and by tensor name: write the HF folder."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    c = model.config
    hf = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.resolved_head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings, max_position_embeddings=32768,
        use_sliding_window=False,
    )
    hf.architectures = ["Qwen2ForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib" / "tokenized"))
    p.add_argument("--out", default=str(ROOT / "runs" / "conversion_mini"))
    p.add_argument("--tokens", type=int, default=1_000_000, help="T: the teacher's (and full scratch run's) budget")
    p.add_argument("--small-fraction", type=float, default=0.05, help="the converted run's budget as a fraction of T")
    p.add_argument("--wikitext-tokens", type=int, default=65536)
    p.add_argument("--skip-full", action="store_true", help="skip the long from-scratch run")
    p.add_argument("--skip-76b", action="store_true")
    p.add_argument("--skip-kd", action="store_true", help="skip the distilled sb7b continuation")
    p.add_argument("--stage", default="all", help="run only this stage (teacher, scratch_full, ...), then stop")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "out"))
    args = p.parse_args()
    out = Path(args.out)
    T = args.tokens
    small = int(T * args.small_fraction)
    long_batch, short_batch = 16, 4  # 4096 tokens/step for T; 1024 for the small budget (more steps)
    long_steps, short_steps = math.ceil(T / (long_batch * SEQ)), math.ceil(small / (short_batch * SEQ))
    long_opt = ["optim.lr=2e-3", "optim.warmup_steps=20", f"trainer.max_steps={long_steps}",
                f"trainer.eval_every={max(long_steps // 8, 1)}"]
    short_opt = ["optim.lr=1e-3", "optim.warmup_steps=5", f"trainer.max_steps={short_steps}",
                 f"trainer.eval_every={max(short_steps // 5, 1)}"]
    stages = {
        "teacher": ["model=qwen2_tiny", *common(args, out / "teacher", long_batch, 8), *long_opt],
        "scratch_full": ["model=sb7b_tiny", *common(args, out / "scratch_full", long_batch, 8), *long_opt],
        "scratch_small": ["model=sb7b_tiny", *common(args, out / "scratch_small", short_batch, 4), *short_opt],
    }
    converted = {}
    for target in ("sb7b", "sb76b"):
        converted[f"converted_{target}"] = [
            f"model={target}_tiny", *common(args, out / f"converted_{target}", short_batch, 4), *short_opt,
            f"trainer.init_from={out / f'{target}_init'}", "optim.new_params.lr=3e-3",
            "optim.new_params.warmup_steps=2",
        ]
    converted["converted_sb7b_kd"] = [
        *converted["converted_sb7b"], f"trainer.out_dir={out / 'converted_sb7b_kd'}", *KD_SETTINGS,
        f"distill.teacher={out / 'teacher_weights'}",
    ]
    todo = [args.stage] if args.stage != "all" else (
        ["teacher", "convert", "converted_sb7b", "scratch_small"] + ([] if args.skip_full else ["scratch_full"])
        + ([] if args.skip_76b else ["converted_sb76b"]) + ([] if args.skip_kd else ["converted_sb7b_kd"]))
    tokenizer_dir = Path(args.data) / "tokenizer"
    for stage in todo:
        if stage == "convert":
            from sbtrain.convert import ConvertConfig, convert_hf

            teacher, _ = final_model(stages["teacher"])
            hf_dir = write_teacher_as_hf(teacher, tokenizer_dir, out / "teacher_hf")
            if not (out / "teacher_weights" / "config.yaml").exists():  # the distillation teacher
                save_weights(teacher.state_dict().items(), teacher.config, out / "teacher_weights")
            for target in ("sb7b", "sb76b"):
                if not (out / f"{target}_init" / "config.yaml").exists():
                    convert_hf(ConvertConfig(from_hf=str(hf_dir), target=f"{target}_tiny",
                                             out=str(out / f"{target}_init")))
            continue
        run_stage(stage, stages.get(stage) or converted[stage])
    if args.stage != "all":
        return
    report(args, out, stages, converted, tokenizer_dir, T, small)


def curve(out_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["tokens"], r["valid_loss"]) for r in records if r.get("kind") == "valid"]


def report(args, out: Path, stages: dict, converted: dict, tokenizer_dir: Path, T: int, small: int) -> None:
    wiki = wikitext_batches(tokenizer_dir, args.wikitext_tokens)
    rows = []
    runs = {"teacher": stages["teacher"], "converted_sb7b": converted["converted_sb7b"],
            "scratch_small": stages["scratch_small"]}
    if not args.skip_full:
        runs["scratch_full"] = stages["scratch_full"]
    if not args.skip_76b:
        runs["converted_sb76b"] = converted["converted_sb76b"]
    if not args.skip_kd:
        runs["converted_sb7b_kd"] = converted["converted_sb7b_kd"]
    for name, overrides in runs.items():
        model, trainer = final_model(overrides)
        valid = mean_loss(model, trainer.valid_data.batches())
        wiki_ppl = math.exp(mean_loss(model, wiki)) if wiki else float("nan")
        run_dir = Path(next(o for o in overrides if o.startswith("trainer.out_dir=")).split("=", 1)[1])
        rows.append({"run": name, "model": model.config.name, "train_tokens": trainer.tokens, "valid_loss": valid,
                     "wikitext2_ppl": wiki_ppl, "curve": curve(run_dir)})
    teacher = rows[0]["valid_loss"]
    print(f"\nT = {T:,} tokens; small budget = {small:,} ({small / T:.1%} of T); eval: {EVAL_SAMPLES} x {SEQ} "
          f"held-out tokens of the corpus; WikiText-2 valid {'(' + str(WIKITEXT) + ')' if wiki else 'absent'}")
    print(f"{'run':<18}{'model':<14}{'tokens':>12}{'valid loss':>12}{'vs teacher':>12}{'wiki ppl':>12}")
    for r in rows:
        print(f"{r['run']:<18}{r['model']:<14}{r['train_tokens']:>12,}{r['valid_loss']:>12.4f}"
              f"{r['valid_loss'] - teacher:>+12.4f}{r['wikitext2_ppl']:>12.1f}")
    by = {r["run"]: r for r in rows}
    best = min((r for r in rows if r["run"].startswith("converted_sb7b")), key=lambda r: r["valid_loss"])
    gap = best["valid_loss"] - teacher
    print(f"{'PASS' if gap <= 0.10 else 'FAIL'} converted sb7b_tiny ({best['run']}) within 0.10 nats of the "
          f"teacher ({gap:+.4f})")
    print(f"from scratch at the same small budget: {by['scratch_small']['valid_loss'] - teacher:+.4f} nats vs teacher")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "conversion_mini.json").write_text(json.dumps({"T": T, "small": small, "rows": rows}, indent=1))
    plot(rows, results / "conversion_mini.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['run']} ({r['model']})")
    ax.set_xscale("symlog", linthresh=1e4)
    ax.set_xlabel("training tokens (this run)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Conversion in miniature: teacher, converted, from scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
