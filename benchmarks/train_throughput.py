"""Training throughput on this machine (``make bench-train``): our linear / hybrid tiny models (every
dense ``recipes/model/*_tiny.yaml``: ``sb7b_tiny``, ``gdn_tiny``, ...; ``--models`` picks), our
Transformer ``qwen2_tiny`` and HF transformers' ``Qwen2ForCausalLM`` built from the identical
config, same token batches, same machine, one run, at 2k and 8k tokens per sequence.

Each model trains (forward + backward + AdamW step, fp32) on the same random token batches,
the three interleaved step by step (so drift in the machine's speed hits all alike); tokens/s
is the median over timed steps after warm-up. Beside each ratio to HF Qwen2 stands
the ratio of the two models' training FLOPs per token (sbtrain.trainer.flops), so a speed-up
can be read against the work saved. Prints a table, writes benchmarks/out/train_throughput.json
and a PNG. The allocator settings in effect are printed and apply to every model alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import sbtrain.config  # noqa: F401
from sbtrain.cli.app import RECIPES_DIR
from sbtrain.models import build_model, count_parameters
from sbtrain.trainer.flops import flops_per_token

ALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "MALLOC_CONF")


def model_config(name: str):
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("info", overrides=[f"model={name}"]).model)


def default_models() -> list[str]:
    """Every dense tiny model recipe but the Transformer baseline (a new mixer's recipe joins by itself)."""
    names = sorted(p.stem for p in (RECIPES_DIR / "model").glob("*_tiny.yaml") if p.stem != "qwen2_tiny")
    return [n for n in names if not model_config(n).moe.num_experts]


def hf_qwen2(cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_base,
        tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=1 << 17, attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(hf_cfg)


def flops(cfg, seq_len: int) -> float:
    counts = count_parameters(build_model(cfg, device="meta"))
    body = counts["params_active"] - counts["params_embedding"] - counts["params_lm_head"]
    return flops_per_token(cfg, seq_len, body, counts["params_lm_head"])


def train_step(model, opt, ids, hf: bool) -> None:
    if hf:
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts labels itself
    else:
        out = model(ids[:, :-1], labels=ids[:, 1:])
        loss = out.loss_sum / out.num_tokens
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_interleaved(models: dict, batches, warmup: int) -> dict:
    """Step every model once per round, so drift in the machine's speed hits all alike."""
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in models.items()}
    times = {name: [] for name in models}
    for i, ids in enumerate(batches):
        for name, (model, hf) in models.items():
            start = time.perf_counter()
            train_step(model, opts[name], ids, hf)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma-separated model recipes (default: every dense *_tiny but qwen2_tiny)")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and length")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    alloc = {k: os.environ.get(k) for k in ALLOC_VARS if os.environ.get(k)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator env: {alloc or 'glibc defaults'}")
    cfg_tf = model_config("qwen2_tiny")
    names = args.models.split(",") if args.models else default_models()
    cfgs = {name: model_config(name) for name in names}
    rows = []
    for T in [int(x) for x in args.lengths.split(",")]:
        batches = [torch.randint(0, cfg_tf.vocab_size, (args.batch, T + 1)) for _ in range(args.warmup + args.steps)]
        torch.manual_seed(0)
        models = {
            "hf_qwen2": (hf_qwen2(cfg_tf).train(), True),
            "qwen2_tiny": (build_model(cfg_tf).train(), False),
            **{name: (build_model(cfg).train(), False) for name, cfg in cfgs.items()},
        }
        times = time_interleaved(models, batches, args.warmup)
        result = {}
        for name in models:
            tps = args.batch * T / statistics.median(times[name])
            fpt = flops(cfgs.get(name, cfg_tf), T)
            result[name] = {"tokens_per_s": tps, "step_s": statistics.median(times[name]), "flops_per_token": fpt}
        del models
        base = result["hf_qwen2"]
        for name, r in result.items():
            r["speed_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["flops_ratio_vs_hf"] = r["flops_per_token"] / base["flops_per_token"]
            rows.append({"seq_len": T, "model": name, **r})
    print(f"\n{'seq':>6} {'model':>11} {'tok/s':>9} {'step s':>8} {'speed/HF':>9} {'FLOPs/HF':>9}")
    for r in rows:
        print(f"{r['seq_len']:>6} {r['model']:>11} {r['tokens_per_s']:>9.0f} {r['step_s']:>8.2f} "
              f"{r['speed_vs_hf']:>9.2f} {r['flops_ratio_vs_hf']:>9.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "allocator": alloc, "batch": args.batch}
    (out / "train_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out / "train_throughput.png")
    print(f"\nwrote {out / 'train_throughput.json'} and {out / 'train_throughput.png'}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [next(r["tokens_per_s"] for r in rows if r["seq_len"] == T and r["model"] == m) for T in lengths]
        ax.bar([j + (i - (len(models) - 1) / 2) * width for j in range(len(lengths))], vals, width, label=m)
    ax.set_xticks(range(len(lengths)), [f"{T // 1024}k" for T in lengths])
    ax.set_ylabel("training tokens / s")
    ax.set_title("fp32 training throughput, this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
