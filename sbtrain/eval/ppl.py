"""Perplexity and bits per byte of a corpus.

``evaluate_ppl(model, windows)`` is the building block (model in, numbers out, no file IO): a
trainer callback hands it the live model and windows made once with
:func:`sbtrain.eval.corpus.make_windows`. ``measure_ppl`` adds the corpus and the tokenizer;
``run`` is ``sbtrain-eval ppl``: one row per model, a printed table, ``<out>/ppl.json``.

ppl = exp(total NLL / scored tokens); bits per byte = total NLL / (ln 2 · UTF-8 bytes of the
scored text), which compares models with different tokenizers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from sbtrain.eval.corpus import Window, batches, make_windows, read_texts, tokenize_stream
from sbtrain.eval.scoring import eval_mode, model_device, token_nll


@dataclass
class PplStats:
    nll_sum: float  # nats, summed over scored tokens
    tokens: int  # scored tokens
    windows: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


def evaluate_ppl(model, windows: list[Window], batch_size: int = 1) -> PplStats:
    """Summed NLL and token count of ``windows`` under ``model`` (sbtrain or HF; its train/eval mode is
    restored afterwards)."""
    nll_sum, tokens = 0.0, 0
    with eval_mode(model):
        device = model_device(model)
        for input_ids, labels in batches(windows, batch_size):
            scores = token_nll(model, input_ids.to(device), labels.to(device))
            nll_sum += float(scores.nll.double().sum())
            tokens += int(scores.mask.sum())
    return PplStats(nll_sum, tokens, len(windows))


def bits_per_byte(nll_sum: float, text_bytes: int) -> float:
    return nll_sum / (math.log(2) * text_bytes)


def measure_ppl(loaded, texts: list[str], seq_len: int, stride: int | None = None, batch_size: int = 1,
                max_tokens: int | None = None) -> dict:
    """One result row for an :class:`sbtrain.eval.loading.EvalModel` on ``texts``."""
    stream = tokenize_stream(texts, loaded.tokenizer, loaded.eod_id, max_tokens)
    stats = evaluate_ppl(loaded.model, make_windows(stream, seq_len, stride), batch_size)
    return {**asdict(stats), "loss": stats.loss, "ppl": stats.ppl, "bytes": stream.text_bytes,
            "bpb": bits_per_byte(stats.nll_sum, stream.text_bytes), "seq_len": seq_len,
            "stride": seq_len if stride is None else stride}


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def run(cfg) -> list[dict]:
    """``sbtrain-eval ppl``: every model of ``cfg`` on the corpus; table + ``<out>/ppl.json``."""
    from sbtrain.eval.config import models_of
    from sbtrain.eval.loading import load_eval_model

    texts = read_texts(list(cfg.data.paths), cfg.data.format, cfg.data.text_field, cfg.data.max_documents,
                       text_unit=cfg.data.text_unit)
    rows = []
    for label, ckpt in models_of(cfg):
        loaded = load_eval_model(ckpt, cfg.backend, cfg.tokenizer.path, cfg.dtype, cfg.device, cfg.tokenizer.eod_token)
        row = measure_ppl(loaded, texts, cfg.seq_len, cfg.stride, cfg.batch_size, cfg.max_tokens)
        rows.append({"label": label, "ckpt": ckpt, "backend": loaded.backend, "tokenizer": loaded.tokenizer_path,
                     **row})
        del loaded
    return report(cfg, rows, ["label", "backend", "seq_len", "stride", "tokens", "loss", "ppl", "bpb"], "ppl.json")


def report(cfg, rows: list[dict], columns: list[str], name: str) -> list[dict]:
    """Print ``rows`` as a table and, with ``cfg.out``, write them to ``<out>/<name>``; returns them."""
    print(format_table(rows, columns), flush=True)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps({"data": list(cfg.data.paths), "results": rows}, indent=1))
        print(f"wrote {out / name}", flush=True)
    return rows


__all__ = ["PplStats", "bits_per_byte", "evaluate_ppl", "format_table", "measure_ppl", "report", "run"]
