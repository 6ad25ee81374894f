"""``sbtrain-spike stats|sweep ckpt=DIR data.path=DIR ...``: the spiking report (docs/DESIGN_NOTES.md §5).

- ``stats``: one pass over the validation tokens with spikes on (k, coding): per spiked layer and
  overall the zero fraction, |s| histogram, spikes per channel per coding, silent channels and the
  N-step window sparsity readings (:mod:`sbtrain.spike.stats`), the validation loss, and the energy
  per token (:mod:`sbtrain.spike.energy`). Writes ``<out>/spike_stats.json`` and a |s| histogram PNG.
- ``sweep``: the no-spike validation loss, then for every k in ``ks`` the loss with spikes on and
  the sparsity figures. Writes ``<out>/spike_sweep.json`` and a sparsity + loss vs k PNG.

The first word is the subcommand; it becomes the ``command=`` override before Hydra sees argv, so
``sbtrain-spike stats k=3`` and ``sbtrain-spike command=stats k=3`` are the same. The model comes from
a weights directory or a training checkpoint (:func:`sbtrain.export.hf_export.load_source`); the
tokens from a dataset built by ``sbtrain-data`` through the trainer's :class:`PackedLoader`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import sbtrain.spike.config  # noqa: F401  registers spike_schema in the ConfigStore
from sbtrain.config.model import ConfigError
from sbtrain.spike.config import COMMANDS, SpikeCommandConfig
from sbtrain.spike.stats import PRIMARY_READING, WINDOW_READINGS, SpikeStats, coding_label


def load_model(ckpt: str, device: torch.device):
    """The model of ``ckpt`` in eval mode, without the spiking hooks its own config may have installed
    (the no-spike baseline must be spike-free; every measured pass installs its own hooks)."""
    from sbtrain.export.hf_export import load_source
    from sbtrain.models.spiking import remove_spiking
    from sbtrain.models.weights import WeightsError

    try:
        model, source, kind = load_source(ckpt)
    except WeightsError as exc:
        raise ConfigError(f"ckpt={ckpt}: {exc}") from exc
    remove_spiking(model)
    return model.to(device).eval(), str(source), kind


def validation_batches(cfg: SpikeCommandConfig, vocab_size: int) -> list[dict]:
    """The micro batches read (at most ``eval_samples`` sequences), materialised once for every k."""
    from sbtrain.data.build import check_vocab
    from sbtrain.data.loader import IGNORE_INDEX, PackedLoader

    data = cfg.data
    check_vocab(data.path, vocab_size)
    m = cfg.micro_batch_size
    loader = PackedLoader([data.path], cfg.seq_len, m, m, seed=data.seed, valid_fraction=data.valid_fraction,
                          split_seed=data.split_seed)
    if data.valid_fraction > 0:
        # Drop the all-padding rows valid_batches adds to fill a micro batch: they would count as spiked tokens.
        # (The tail of the split's last row is still EOD padding: at most seq_len tokens.)
        batches = []
        for mb in loader.valid_batches(cfg.eval_samples):
            real = (mb["labels"] != IGNORE_INDEX).any(1)
            if real.any():
                batches.append({key: value[real] for key, value in mb.items()})
        return batches
    batches, taken = [], 0
    while taken < cfg.eval_samples:
        mb = loader.next_global_batch()[0]
        mb = {key: value[: cfg.eval_samples - taken] for key, value in mb.items()}
        batches.append(mb)
        taken += mb["input_ids"].shape[0]
    return batches


@torch.no_grad()
def measure(model, batches: list[dict], device: torch.device, stats: SpikeStats | None = None) -> float:
    """Validation loss (nats per target token) over ``batches``; feeds ``stats`` the token counts."""
    loss_sum, tokens = 0.0, 0
    for mb in batches:
        out = model(input_ids=mb["input_ids"].to(device), labels=mb["labels"].to(device))
        loss_sum += float(out.loss_sum)
        tokens += int(out.num_tokens)
        if stats is not None:
            stats.add_tokens(mb["input_ids"].numel())
    return loss_sum / max(tokens, 1)


def spike_config(model, cfg: SpikeCommandConfig, k: float):
    spike = copy.deepcopy(model.config.spike)
    spike.mode, spike.k = "eval", float(k)
    if cfg.max_count is not None:
        spike.max_count = cfg.max_count
    if cfg.spike_down_proj is not None:
        spike.spike_down_proj = cfg.spike_down_proj
    return spike


def spiked_run(model, cfg: SpikeCommandConfig, batches: list[dict], device: torch.device, k: float) -> dict:
    """One pass with spikes on at ``k``: loss, statistics and energy."""
    from sbtrain.models.spiking import apply_spiking, remove_spiking
    from sbtrain.spike.energy import OtherMatmuls, SpikedMatmul, analytic_macs, energy_report, fan_out

    stats = SpikeStats(cfg.window)
    names = apply_spiking(model, spike_config(model, cfg, k), stats)
    others = OtherMatmuls(model, names)
    try:
        loss = measure(model, batches, device, stats)
    finally:
        others.remove()
        remove_spiking(model)
    summary = stats.summary()
    modules = dict(model.named_modules())
    label = coding_label(cfg.coding)
    layers = [SpikedMatmul(name, stats.layers[name].channels, fan_out(modules[name]), stats.rows_per_token(name),
                           summary["layers"][name]["codings"][label]["spikes_per_channel"]) for name in stats.layers]
    other = {**others.macs_per_token(stats.tokens), **analytic_macs(model.config, cfg.seq_len)}
    return {"k": float(k), "valid_loss": loss, "stats": summary, "energy": energy_report(layers, other)}


def stats_table(run: dict, coding: str) -> str:
    label = coding_label(coding)
    head = f"{'layer':<40} {'zero':>6} {'silent':>6} {'spk/ch':>7} {'win3':>6}"
    lines = [f"k={run['k']:g} coding={coding} valid_loss={run['valid_loss']:.4f} tokens={run['stats']['tokens']}",
             head, "-" * len(head)]
    rows = [*run["stats"]["layers"].items(), ("overall", run["stats"]["overall"])]
    for name, s in rows:
        lines.append(f"{name:<40} {s['zero_fraction']:6.3f} {s['silent_channel_fraction']:6.3f} "
                     f"{s['codings'][label]['spikes_per_channel']:7.3f} {s['window'][PRIMARY_READING]:6.3f}")
    window = run["stats"]["overall"]["window"]
    lines.append("window readings: " + ", ".join(f"{r}={window[r]:.3f}" for r in WINDOW_READINGS)
                 + f" (primary: {PRIMARY_READING})")
    codings = run["stats"]["overall"]["codings"]
    lines.append("spikes/channel: " + ", ".join(f"{c}={v['spikes_per_channel']:.3f}" for c, v in codings.items()))
    e = run["energy"]
    lines.append(f"energy pJ/token spiked layers: spike={e['spiked_layers']['spike_pj']:.4g} "
                 f"fp16={e['spiked_layers']['fp16_pj']:.4g} int8={e['spiked_layers']['int8_pj']:.4g}; "
                 f"FP16/spike={e['spiked_layers']['fp16_over_spike']:.2f}x INT8/spike="
                 f"{e['spiked_layers']['int8_over_spike']:.2f}x; with unspiked matmuls (same on both sides, "
                 f"{e['with_other']['other_pj']:.4g} pJ): {e['with_other']['fp16_over_spike']:.2f}x / "
                 f"{e['with_other']['int8_over_spike']:.2f}x")
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    head = f"{'k':>6} {'valid_loss':>10} {'zero':>6} " + " ".join(f"{r[:13]:>13}" for r in WINDOW_READINGS)
    lines = [head, "-" * len(head)]
    for row in rows:
        if row["k"] is None:
            lines.append(f"{'off':>6} {row['valid_loss']:10.4f}")
            continue
        w = row["window"]
        lines.append(f"{row['k']:6g} {row['valid_loss']:10.4f} {row['zero_fraction']:6.3f} "
                     + " ".join(f"{w[r]:13.3f}" for r in WINDOW_READINGS))
    return "\n".join(lines)


def plot_histogram(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = run["stats"]["overall"]["abs_histogram"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(hist), list(hist.values()))
    ax.set_xlabel("|s| (spike count magnitude)")
    ax.set_ylabel("fraction of token-channel entries")
    ax.set_title(f"spike counts, k={run['k']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spiked = [r for r in rows if r["k"] is not None]
    ks = [r["k"] for r in spiked]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ks, [r["zero_fraction"] for r in spiked], "o-", label="zero_count")
    for reading in WINDOW_READINGS[:-1]:
        left.plot(ks, [r["window"][reading] for r in spiked], "o-", label=reading)
    left.set_xlabel("k")
    left.set_ylabel("sparsity")
    left.legend(fontsize=8)
    right.plot(ks, [r["valid_loss"] for r in spiked], "o-", label="spikes on")
    right.axhline(rows[0]["valid_loss"], color="gray", ls="--", label="no spikes")
    right.set_xlabel("k")
    right.set_ylabel("validation loss")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt") or OmegaConf.is_missing(cfg.data, "path"):
        raise ConfigError("ckpt= and data.path= are required: sbtrain-spike stats ckpt=DIR data.path=DATASET_DIR")
    spec: SpikeCommandConfig = OmegaConf.to_object(cfg).validate()
    device = torch.device("cuda" if spec.device == "auto" and torch.cuda.is_available() else
                          "cpu" if spec.device == "auto" else spec.device)
    model, source, kind = load_model(spec.ckpt, device)
    batches = validation_batches(spec, model.config.vocab_size)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": spec.command, "ckpt": source, "kind": kind, "coding": spec.coding, "seq_len": spec.seq_len,
              "sequences": sum(mb["input_ids"].shape[0] for mb in batches)}
    if spec.command == "stats":
        run = spiked_run(model, spec, batches, device, spec.k)
        report.update(run)
        print(stats_table(run, spec.coding), flush=True)
        if spec.plot:
            plot_histogram(run, out / "spike_stats.png")
    else:
        rows = [{"k": None, "valid_loss": measure(model, batches, device)}]
        for k in spec.ks:
            run = spiked_run(model, spec, batches, device, k)
            overall = run["stats"]["overall"]
            rows.append({"k": float(k), "valid_loss": run["valid_loss"], "zero_fraction": overall["zero_fraction"],
                         "window": overall["window"], "codings": overall["codings"],
                         "energy": run["energy"]["spiked_layers"]})
        report["rows"] = rows
        print(sweep_table(rows), flush=True)
        if spec.plot:
            plot_sweep(rows, out / "spike_sweep.png")
    if not all(math.isfinite(r) for r in _losses(report)):
        print("warning: a validation loss is not finite", flush=True)
    (out / f"spike_{spec.command}.json").write_text(json.dumps(report, indent=1))
    return report


def _losses(report: dict) -> list[float]:
    return [report["valid_loss"]] if "valid_loss" in report else [r["valid_loss"] for r in report["rows"]]


def with_subcommand(argv: list[str]) -> list[str]:
    """``stats k=3`` -> ``command=stats k=3``; a bare word that is not a subcommand is an error."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        if argv[0] not in COMMANDS:
            raise ConfigError(f"unknown subcommand {argv[0]!r}; use sbtrain-spike {{{'|'.join(COMMANDS)}}} key=value ...")
        return [f"command={argv[0]}", *argv[1:]]
    return list(argv)


def main(argv: list[str] | None = None) -> None:
    import sys

    from sbtrain.cli.app import fail, run_app

    try:
        argv = with_subcommand(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        fail(str(exc))
    run_app(task, "spike", argv)


if __name__ == "__main__":
    main()
