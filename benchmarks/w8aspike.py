"""W8ASpike: validation-loss change of int8 weights + spiking activations vs the unquantized model
(``make bench-w8aspike``).

For each checkpoint (weights directory, training run or checkpoint folder) the unquantized loss
is the baseline, measured in the same run on the same held-out samples; then each combination of
scale method (absmax, mse) and activations (W8 only, W8 + spikes at k) is applied with
:func:`sbtrain.spike.w8a.apply_w8aspike` to a fresh copy and evaluated. Prints a table and saves
benchmarks/out/w8aspike.json. Default checkpoints: the runs of ``make bench-convert``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbtrain.data.loader import PackedLoader
from sbtrain.export.hf_export import load_source
from sbtrain.spike.w8a import apply_w8aspike, validation_loss

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "conversion_mini"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="*", default=[str(RUNS / "teacher_weights"), str(RUNS / "scratch_full"),
                                                str(RUNS / "converted_sb7b"),
                                                str(RUNS / "converted_sb76b")])
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib" / "tokenized"))
    p.add_argument("--samples", type=int, default=16, help="held-out samples of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=float, default=3.0)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "out"))
    args = p.parse_args()
    # The held-out split of the training runs (valid_fraction 0.02, the default split seed).
    loader = PackedLoader([args.data], seq_len=args.seq_len, global_batch_size=4, micro_batch_size=4,
                          valid_fraction=0.02, split_seed=4321)
    batches = list(loader.valid_batches(max_samples=args.samples))
    tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    rows = []
    for ckpt in args.ckpts:
        model = load_source(ckpt)[0]
        base = validation_loss(model, batches)
        row = {"ckpt": ckpt, "model": model.config.name, "tokens": tokens, "loss": base, "variants": {}}
        for method in ("absmax", "mse"):
            for spike in (False, True):
                model = load_source(ckpt)[0]
                report = apply_w8aspike(model, method=method, k=args.k, spike=spike)
                loss = validation_loss(model, batches)
                row["variants"][f"{method}{'+spikes' if spike else ' W8 only'}"] = {
                    "loss": loss, "delta": loss - base, "clipped": report["clipped"], "codes": report["codes"],
                    "max_rel_error": report["max_rel_error"]}
        rows.append(row)
        del model
    names = list(rows[0]["variants"])
    print(f"\nW8ASpike (int8 per output channel, groups of 128; spikes k={args.k}); {tokens} held-out tokens; "
          "loss change vs the unquantized model")
    print(f"{'model':<12}{'unquantized':>12}" + "".join(f"{n:>18}" for n in names) + f"{'clipped (mse)':>16}")
    for r in rows:
        clipped = r["variants"]["mse W8 only"]
        print(f"{r['model']:<12}{r['loss']:>12.4f}" + "".join(f"{r['variants'][n]['delta']:>+18.5f}" for n in names)
              + f"{clipped['clipped']:>8,} / {clipped['codes'] / 1e6:.1f}M")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "w8aspike.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"json: {out / 'w8aspike.json'}")


if __name__ == "__main__":
    main()
