"""Spike-aware continual pretraining vs spiking applied post hoc (``make bench-spike-cpt``).

Starting from a trained ``sb7b_tiny`` (by default the final checkpoint of ``make bench-convert``'s
``scratch_full`` run: 1M tokens of the bundled corpus; trained here with the same settings if it
is missing), two continuations of the same length, data and learning rate:

- ``spike_aware``: ``model.spike.mode=train`` with ``model.spike.train_from_step=S`` — the first S
  steps train without spikes, the last part of the run trains with spikes on (STE gradients);
- ``post_hoc``: trains without spikes (``model.spike.mode=eval``: its evaluations are spiked, so its
  validation curve is the post-hoc spiked loss).

Every final model (and the starting one) is then evaluated on the same held-out samples with
spikes off and with spikes on (k as given): the table shows how much of the spiking penalty
spike-aware training recovers. Prints the table, saves benchmarks/out/spike_cpt.json and a PNG
of validation loss vs step. Resumable: finished runs are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conversion_mini import EVAL_SAMPLES, SEQ, common, curve, final_model, mean_loss, run_stage

from sbtrain.config.model import SpikeConfig
from sbtrain.models.spiking import apply_spiking, remove_spiking
from sbtrain.models.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]


def base_overrides(args, run_dir: Path) -> list[str]:
    """The settings of bench-convert's ``scratch_full`` (sb7b_tiny, 1M tokens, 4096 tokens/step)."""
    steps = math.ceil(1_000_000 / (16 * SEQ))
    return ["model=sb7b_tiny", *common(args, run_dir, 16, 8), "optim.lr=2e-3", "optim.warmup_steps=20",
            f"trainer.max_steps={steps}", f"trainer.eval_every={max(steps // 8, 1)}"]


def losses_with_and_without_spikes(model, batches, k: float, max_count: int | None) -> tuple[float, float]:
    remove_spiking(model)
    plain = mean_loss(model, batches)
    apply_spiking(model, SpikeConfig(mode="eval", k=k, max_count=max_count))
    spiked = mean_loss(model, batches)
    remove_spiking(model)
    return plain, spiked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib" / "tokenized"))
    p.add_argument("--base", default=str(ROOT / "runs" / "conversion_mini" / "scratch_full"),
                   help="run directory of the trained sb7b_tiny to start from (trained here if absent)")
    p.add_argument("--out", default=str(ROOT / "runs" / "spike_cpt"))
    p.add_argument("--steps", type=int, default=60, help="length of each continuation (1024 tokens per step)")
    p.add_argument("--spike-from", type=int, default=20, help="spike-aware run: spikes on from this step")
    p.add_argument("--k", type=float, default=3.0)
    p.add_argument("--max-count", type=int, default=None, help="clamp |s| (model.spike.max_count); default none")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "out"))
    args = p.parse_args()
    out = Path(args.out)

    base_run = base_overrides(args, Path(args.base))
    if not (Path(args.base) / "checkpoints" / "latest").exists():
        run_stage("base", base_run)
    weights = out / "base_weights"
    if not (weights / "config.yaml").exists():
        model, _ = final_model(base_run)
        save_weights(model.state_dict().items(), model.config, weights)

    cont = ["model=sb7b_tiny", f"trainer.init_from={weights}", f"optim.lr={args.lr}", "optim.warmup_steps=5",
            f"trainer.max_steps={args.steps}", f"trainer.eval_every={max(args.steps // 6, 1)}", f"model.spike.k={args.k}",
            f"model.spike.max_count={'null' if args.max_count is None else args.max_count}"]
    runs = {
        "spike_aware": [*cont, *common(args, out / "spike_aware", 4, 4), "model.spike.mode=train",
                        f"model.spike.train_from_step={args.spike_from}"],
        "post_hoc": [*cont, *common(args, out / "post_hoc", 4, 4), "model.spike.mode=eval"],
    }
    for name, overrides in runs.items():
        run_stage(name, overrides)  # resumes an unfinished run; a finished one returns at once

    rows = []
    for name, overrides in [("start", base_run), *runs.items()]:
        model, trainer = final_model(overrides)
        batches = list(trainer.valid_data.batches())
        plain, spiked = losses_with_and_without_spikes(model, batches, args.k, args.max_count)
        rows.append({"run": name, "train_tokens": trainer.tokens, "loss_no_spikes": plain, "loss_spiked": spiked,
                     "spike_penalty": spiked - plain,
                     "curve": curve(out / name) if name in runs else []})
    by = {r["run"]: r for r in rows}
    print(f"\nsb7b_tiny, spikes k={args.k} (|s| <= {args.max_count or 'inf'}) on {', '.join(SpikeConfig().targets)} inputs; continuation "
          f"{args.steps} steps x 1024 tokens, spike-aware from step {args.spike_from}; eval {EVAL_SAMPLES} x {SEQ} "
          "held-out tokens")
    print(f"{'run':<14}{'tokens':>12}{'no spikes':>12}{'spiked':>12}{'penalty':>10}")
    for r in rows:
        print(f"{r['run']:<14}{r['train_tokens']:>12,}{r['loss_no_spikes']:>12.4f}{r['loss_spiked']:>12.4f}"
              f"{r['spike_penalty']:>+10.4f}")
    recovered = by["post_hoc"]["loss_spiked"] - by["spike_aware"]["loss_spiked"]
    print(f"spike-aware training recovers {recovered:+.4f} nats of spiked loss vs post hoc "
          f"({recovered / max(by['post_hoc']['spike_penalty'], 1e-9):.0%} of the post-hoc penalty)")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "spike_cpt.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    plot(rows, args, results / "spike_cpt.png")


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["run"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in (("spike_aware", f"spike-aware (spikes from step {args.spike_from})"),
                        ("post_hoc", "trained without spikes, evaluated spiked (post hoc)")):
        xs, ys = zip(*by[name]["curve"])
        ax.plot([x // (4 * SEQ) for x in xs], ys, marker="o", ms=3, label=label)
    ax.axhline(by["post_hoc"]["loss_no_spikes"], color="gray", ls="--", label="post_hoc run, no spikes")
    ax.axvline(args.spike_from, color="gray", ls=":", lw=1)
    ax.set_xlabel("continuation step")
    ax.set_ylabel("validation loss (nats/token)")
    clamp = f", |s| <= {args.max_count}" if args.max_count is not None else ""
    ax.set_title(f"Spike-aware continual pretraining, sb7b_tiny, k={args.k}{clamp}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
