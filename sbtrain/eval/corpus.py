"""Evaluation text -> one token stream -> scoring windows.

Texts come from local files: plain text (``.txt``/``.raw``/``.text``, e.g. WikiText-2's
``valid.txt``) cut into documents by the rule ``sbtrain-data`` uses
(:func:`sbtrain.data.sources.read_text_file`: by default the whole file is one document, newlines
kept; ``text_unit="paragraph"``: one per block of non-blank lines), or jsonl (one document per
record, ``data.text_field``). A file with more than 1% invalid UTF-8 bytes is refused, as in
``sbtrain-data``. The stream is ``EOD d1 EOD d2 ... dn``: the leading EOD gives the first
token of the text a context (as lm-evaluation-harness' rolling log-likelihood does) and the
separators are never scored, so the scored tokens are exactly the text's tokens and bits per
byte divides by exactly the text's UTF-8 bytes.

Windows follow Hugging Face's perplexity guide: each window holds up to ``seq_len`` inputs,
starts ``stride`` tokens after the previous one, and scores only the targets the previous
window did not (``stride == seq_len``: non-overlapping windows, every target scored once).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sbtrain.config.model import ConfigError
from sbtrain.data.sources import DecodeStats, decoded_lines, parse_json_line, read_text_file
from sbtrain.eval.scoring import IGNORE

TEXT_EXTENSIONS = (".txt", ".raw", ".text", ".tokens")
JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")
MAX_UNDECODABLE_FRACTION = 0.01  # sbtrain-data's default data.max_undecodable_fraction


class EvalError(ConfigError):
    """Bad evaluation input (corpus, windows, checkpoint); the message names the value and the fix."""


@dataclass
class Window:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, labels[t] = target of position t, -100 = not scored


@dataclass
class TokenStream:
    tokens: torch.Tensor  # [N] long: EOD d1 EOD d2 ...
    scored: torch.Tensor  # [N] bool: True where the token is a text token (a target to score)
    text_bytes: int  # UTF-8 bytes of the text whose tokens are scored

    @property
    def num_scored(self) -> int:
        return int(self.scored.sum())


def expand_paths(paths: list[str]) -> list[str]:
    if not paths:
        raise EvalError("data.paths is empty: give the evaluation text, e.g. data.paths=[../shared/data/wikitext-2/"
                        "valid.txt] (plain text: one document per file; jsonl: one per record)")
    files: list[str] = []
    for spec in paths:
        spec = os.path.expanduser(str(spec))
        matched = [spec] if os.path.isfile(spec) else sorted(f for f in glob.glob(spec, recursive=True)
                                                             if os.path.isfile(f))
        if not matched:
            raise EvalError(f"data.paths entry {spec!r} matches no file: check the path or glob")
        files.extend(matched)
    return files


def file_format(path: str, declared: str | None) -> str:
    if declared is not None:
        if declared not in ("json", "text"):
            raise EvalError(f"data.format={declared!r} is not supported for evaluation: use json or text (or null)")
        return declared
    suffix = Path(path).suffix.lower()
    if suffix in JSON_EXTENSIONS:
        return "json"
    if suffix in TEXT_EXTENSIONS:
        return "text"
    raise EvalError(f"cannot tell the format of {path!r} from its extension: set data.format=json or data.format=text")


def _check_decoding(path: str, stats: DecodeStats) -> None:
    if stats.fraction > MAX_UNDECODABLE_FRACTION:
        raise EvalError(f"{path}: {stats.fraction:.1%} of its bytes ({stats.bad_bytes} of {stats.bytes}) are not valid "
                        f"UTF-8 (more than {MAX_UNDECODABLE_FRACTION:.0%}): it is not UTF-8 text; convert it to UTF-8 "
                        "or leave it out of data.paths")


def _json_texts(path: str, text_field: str, stats: DecodeStats) -> list[str]:
    texts = []
    for lineno, line in decoded_lines(path, stats):
        if not line.strip():
            continue
        record, why = parse_json_line(line)
        if why:
            raise EvalError(f"{path}:{lineno}: {why}: give jsonl (one JSON object per line), or data.format=text")
        if text_field not in record:
            raise EvalError(f"{path} line {lineno} has no field {text_field!r} (has {sorted(record)}): "
                            f"set data.text_field to the field holding the text")
        texts.append(record[text_field] if isinstance(record[text_field], str) else "")
    return texts


def read_texts(paths: list[str], fmt: str | None = None, text_field: str = "text",
               max_documents: int | None = None, text_unit: str = "file") -> list[str]:
    """The documents of ``paths`` (empty / whitespace-only ones dropped), in file order."""
    texts: list[str] = []
    for path in expand_paths(paths):
        stats = DecodeStats()
        if file_format(path, fmt) == "text":
            texts.extend(read_text_file(path, text_unit, stats))
        else:
            texts.extend(_json_texts(path, text_field, stats))
        _check_decoding(path, stats)
    texts = [t for t in texts if t.strip()]
    if max_documents is not None:
        texts = texts[:max_documents]
    if not texts:
        raise EvalError(f"data.paths={list(paths)} holds no text (every document is empty): point data.paths at "
                        "non-empty files, or check data.text_field / data.format")
    return texts


def tokenize_stream(texts: list[str], tokenizer, eod_id: int, max_tokens: int | None = None) -> TokenStream:
    """``EOD d1 EOD d2 ...``; with ``max_tokens``, only the first ``max_tokens`` text tokens are kept
    (the bytes of a cut document are then those of its decoded kept tokens)."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens, scored, text_bytes, budget = [], [], 0, max_tokens
    for text, ids in zip(texts, encoded):
        if budget is not None and budget <= 0:
            break
        if not ids:
            continue
        cut = budget is not None and len(ids) > budget
        ids = list(ids[:budget]) if cut else list(ids)
        text_bytes += len((tokenizer.decode(ids) if cut else text).encode("utf-8"))
        tokens += [eod_id, *ids]
        scored += [False] + [True] * len(ids)
        if budget is not None:
            budget -= len(ids)
    if not any(scored):
        raise EvalError("the evaluation text tokenizes to no tokens: check data.paths and tokenizer.path")
    return TokenStream(torch.tensor(tokens, dtype=torch.long), torch.tensor(scored), text_bytes)


def check_window_args(seq_len: int, stride: int | None) -> int:
    """The stride to use (``None`` -> ``seq_len``), or an error naming the fix."""
    if seq_len < 1:
        raise EvalError(f"seq_len={seq_len} must be >= 1")
    stride = seq_len if stride is None else stride
    if stride < 1:
        raise EvalError(f"stride={stride} must be >= 1 (stride=seq_len: non-overlapping windows)")
    if stride > seq_len:
        raise EvalError(f"stride={stride} > seq_len={seq_len} would skip tokens between windows: use "
                        f"stride<={seq_len} (stride={seq_len}: non-overlapping; smaller: sliding, more context)")
    return stride


def make_windows(stream: TokenStream, seq_len: int, stride: int | None = None) -> list[Window]:
    """Windows over the stream; every scored target lies in exactly one window's unmasked labels."""
    stride = check_window_args(seq_len, stride)
    tokens, scored = stream.tokens, stream.scored
    last = len(tokens) - 1  # inputs are positions [0, last); position t predicts token t + 1
    windows: list[Window] = []
    begin, covered = 0, 0  # inputs [0, covered) already had their targets scored
    while True:
        end = min(begin + seq_len, last)
        labels = tokens[begin + 1:end + 1].clone()
        labels[: max(covered - begin, 0)] = IGNORE  # targets an earlier window scored (sliding windows only)
        labels[~scored[begin + 1:end + 1]] = IGNORE  # document separators
        windows.append(Window(tokens[begin:end].clone(), labels))
        covered = end
        if end >= last:
            return windows
        begin += stride


def batches(windows: list[Window], batch_size: int):
    """Consecutive windows of equal length stacked into ``([B,L] input_ids, [B,L] labels)``."""
    group: list[Window] = []
    for window in windows:
        if group and (len(group) == batch_size or len(window.input_ids) != len(group[0].input_ids)):
            yield torch.stack([w.input_ids for w in group]), torch.stack([w.labels for w in group])
            group = []
        group.append(window)
    if group:
        yield torch.stack([w.input_ids for w in group]), torch.stack([w.labels for w in group])


__all__ = ["EvalError", "TokenStream", "Window", "batches", "check_window_args", "make_windows", "read_texts",
           "tokenize_stream"]
