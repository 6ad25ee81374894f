"""Evaluation: perplexity / bits per byte, loss by position, an lm-evaluation-harness adapter.

The building blocks take a model (sbtrain ``CausalLM`` or a Hugging Face causal LM) and return
numbers, with no file IO, so a trainer callback can call them on the live model::

    stream = tokenize_stream(texts, tokenizer, eod_id)
    windows = make_windows(stream, seq_len=512, stride=256)
    stats = evaluate_ppl(model, windows)          # stats.ppl, stats.loss, stats.tokens
    by_pos = loss_by_position(model, make_windows(stream, 512)).buckets()  # from sbtrain.eval.loss_by_position

``sbtrain.eval.lm_eval_adapter`` (registered as lm-eval's ``sbtrain`` model) is imported only on
demand: lm-eval is an optional dependency and slow to import. ``loss_by_position`` is not
re-exported here: the function would shadow its module ``sbtrain.eval.loss_by_position``.
"""

from sbtrain.eval.corpus import EvalError, TokenStream, Window, make_windows, read_texts, tokenize_stream
from sbtrain.eval.ppl import PplStats, bits_per_byte, evaluate_ppl
from sbtrain.eval.scoring import token_nll

__all__ = [
    "EvalError", "PplStats", "TokenStream", "Window", "bits_per_byte", "evaluate_ppl", "make_windows", "read_texts",
    "token_nll", "tokenize_stream",
]
