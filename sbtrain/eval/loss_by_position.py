"""Mean loss per token position, in log-spaced buckets: does a model use long context?

Over non-overlapping windows of the eval length, the target at index ``t`` of a window is
predicted from ``t + 1`` tokens of context: its *position* is ``t + 1``, in ``1..seq_len``.
Buckets are ``[1,2), [2,4), [4,8), ...``, the last one ending at ``seq_len + 1`` (for seq_len 256:
``..., [64,128), [128,257)``). Bucket k holds one target per window per position, so the first
buckets rest on few tokens: read them with the token counts in the JSON. A model that uses
its context has a falling curve; one that forgets (a too-short window, a broken decay) flattens.

``loss_by_position(model, windows)`` is the building block (model in, numbers out); ``run`` is
``sbtrain-eval loss_by_position``: several models on one corpus, a table, ``<out>/loss_by_position.json``
and ``<out>/loss_by_position.png`` (one labelled curve per model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sbtrain.eval.corpus import EvalError, Window, batches, make_windows, read_texts, tokenize_stream
from sbtrain.eval.scoring import eval_mode, model_device, token_nll


@dataclass
class PositionLoss:
    nll_sum: torch.Tensor  # [seq_len] float64: summed NLL of targets at position t + 1
    count: torch.Tensor  # [seq_len] int64: scored targets at that position

    def buckets(self) -> list[dict]:
        return position_buckets(self.nll_sum, self.count)


def position_buckets(nll_sum: torch.Tensor, count: torch.Tensor) -> list[dict]:
    """``[{start, end, tokens, nll_sum, loss}]`` over log-spaced position buckets ``[start, end)``."""
    seq_len = len(count)
    out, start = [], 1
    while start <= seq_len:
        end = 2 * start
        if end >= seq_len and start > 1:  # a power-of-two seq_len would leave a last bucket of one position: merge it
            end = seq_len + 1
        nll, n = float(nll_sum[start - 1:end - 1].sum()), int(count[start - 1:end - 1].sum())
        out.append({"start": start, "end": end, "tokens": n, "nll_sum": nll, "loss": nll / n if n else float("nan")})
        start = end
    return out


def loss_by_position(model, windows: list[Window], seq_len: int | None = None, batch_size: int = 1) -> PositionLoss:
    """Per-position NLL sums and counts of ``windows`` (whose length is at most ``seq_len``)."""
    seq_len = seq_len or max(len(w.input_ids) for w in windows)
    nll_sum = torch.zeros(seq_len, dtype=torch.float64)
    count = torch.zeros(seq_len, dtype=torch.int64)
    with eval_mode(model):
        device = model_device(model)
        for input_ids, labels in batches(windows, batch_size):
            if input_ids.shape[1] > seq_len:
                raise ValueError(f"a window of {input_ids.shape[1]} tokens is longer than seq_len={seq_len}")
            scores = token_nll(model, input_ids.to(device), labels.to(device))
            length = input_ids.shape[1]
            nll_sum[:length] += scores.nll.double().sum(0).cpu()
            count[:length] += scores.mask.sum(0).cpu()
    return PositionLoss(nll_sum, count)


def plot(results: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        kept = [b for b in result["buckets"] if b["tokens"]]
        # Each bucket is drawn at its geometric centre on a log axis.
        xs = [(b["start"] * (b["end"] - 1)) ** 0.5 for b in kept]
        ax.plot(xs, [b["loss"] for b in kept], marker="o", label=result["label"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position in the window (log-spaced buckets)")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg) -> list[dict]:
    """``sbtrain-eval loss_by_position``: every model of ``cfg``; table, JSON and PNG under ``out``."""
    from sbtrain.eval.config import models_of
    from sbtrain.eval.loading import load_eval_model
    from sbtrain.eval.ppl import format_table

    if cfg.stride not in (None, cfg.seq_len):
        raise EvalError(f"stride={cfg.stride}: loss_by_position uses non-overlapping windows (a position is the "
                        "context length within one window); drop stride=, or use sbtrain-eval ppl for sliding windows")
    texts = read_texts(list(cfg.data.paths), cfg.data.format, cfg.data.text_field, cfg.data.max_documents,
                       text_unit=cfg.data.text_unit)
    results = []
    for label, ckpt in models_of(cfg):
        loaded = load_eval_model(ckpt, cfg.backend, cfg.tokenizer.path, cfg.dtype, cfg.device, cfg.tokenizer.eod_token)
        stream = tokenize_stream(texts, loaded.tokenizer, loaded.eod_id, cfg.max_tokens)
        windows = make_windows(stream, cfg.seq_len, cfg.seq_len)  # non-overlapping: position = context length
        positions = loss_by_position(loaded.model, windows, cfg.seq_len, cfg.batch_size)
        results.append({"label": label, "ckpt": ckpt, "backend": loaded.backend, "seq_len": cfg.seq_len,
                        "tokens": int(positions.count.sum()), "buckets": positions.buckets()})
        del loaded
    rows = [{"bucket": f"[{b['start']},{b['end']})", **{r["label"]: r["buckets"][i]["loss"] for r in results}}
            for i, b in enumerate(results[0]["buckets"])]
    print(format_table(rows, ["bucket", *[r["label"] for r in results]]), flush=True)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "loss_by_position.json").write_text(json.dumps({"data": list(cfg.data.paths), "results": results},
                                                              indent=1))
        png = plot(results, out / "loss_by_position.png", f"loss by position, windows of {cfg.seq_len} tokens")
        print(f"wrote {out / 'loss_by_position.json'} and {png}", flush=True)
    return results


__all__ = ["PositionLoss", "loss_by_position", "plot", "position_buckets", "run"]
