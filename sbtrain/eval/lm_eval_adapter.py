"""lm-evaluation-harness model ``sbtrain``: any sbtrain checkpoint (or HF folder) as an lm-eval ``LM``.

Importing this module registers the model (lm-eval is imported here, never by the rest of
sbtrain: it is an optional dependency, ``lm-eval==0.4.*``, and takes seconds to import)::

    import sbtrain.eval.lm_eval_adapter  # noqa: F401  registers "sbtrain"
    lm_eval.simple_evaluate(model="sbtrain", model_args="ckpt=DIR,batch_size=8", tasks=[...])

or ``SbtrainLM(model=live_model, tokenizer=tok)`` for a model already in memory.

- ``loglikelihood``: context + continuation scored with the same per-token NLL as ``sbtrain-eval
  ppl`` (:func:`sbtrain.eval.scoring.token_nll`), requests of one length batched with right
  padding (causal models: padding after the last target changes nothing before it).
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens after the
  EOD prefix token, each scored like a loglikelihood request.
- ``generate_until``: greedy; sbtrain models prefill once and then decode token by token from the
  constant-memory cache (:mod:`sbtrain.models.generate`), HF models use ``generate``.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from sbtrain.eval.scoring import IGNORE, is_sbtrain, model_device, token_nll


@register_model("sbtrain")
class SbtrainLM(TemplateLM):
    def __init__(self, ckpt: str | None = None, model=None, tokenizer=None, eod_id: int | None = None,
                 backend: str = "auto", tokenizer_path: str | None = None, eod_token: str | None = None,
                 max_length: int = 2048,
                 batch_size: int | str = 1, max_gen_toks: int = 256, dtype: str = "fp32", device: str = "cpu",
                 **unused):
        super().__init__()
        if (ckpt is None) == (model is None):
            raise ValueError("give exactly one of ckpt=DIR (model_args) or model=<live model> with tokenizer=")
        if ckpt is not None:
            from sbtrain.eval.loading import load_eval_model

            loaded = load_eval_model(ckpt, backend, tokenizer_path, dtype, device, eod_token)
            model, tokenizer, eod_id = loaded.model, loaded.tokenizer, loaded.eod_id
        if tokenizer is None:
            raise ValueError("model= needs tokenizer= (an HF tokenizer)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._eot = int(eod_id if eod_id is not None else tokenizer.eos_token_id)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 1
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokenization ----
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "sbtrain").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring ----
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), all greedy)`` per ``(context ids, continuation ids)``;
        the input is cut from the left to ``max_length`` tokens."""
        rows = []
        for context, continuation in pairs:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs, targets = whole[:-1], whole[1:]
            labels = [IGNORE] * (len(targets) - len(continuation)) + targets[len(targets) - len(continuation):]
            rows.append((inputs, labels))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        device = model_device(self.model)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), self._eot, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            for row, i in enumerate(chunk):
                inputs, target = rows[i]
                ids[row, :len(inputs)] = torch.tensor(inputs)
                labels[row, :len(target)] = torch.tensor(target)
            scores = token_nll(self.model, ids.to(device), labels.to(device))
            for row, i in enumerate(chunk):
                mask = scores.mask[row]
                results[i] = (-float(scores.nll[row].double().sum()), bool(scores.greedy[row][mask].all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(logp for logp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation ----
    @torch.no_grad()
    def greedy_tokens(self, context: list[int], max_new: int, stop: list[str]) -> list[int]:
        """Greedy continuation of ``context``, stopping at EOD, ``max_new`` tokens or a stop string."""
        device = model_device(self.model)
        ids = torch.tensor([context], dtype=torch.long, device=device)
        if not is_sbtrain(self.model):
            out = self.model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=self._eot,
                                      pad_token_id=self._eot)
            return out[0, ids.shape[1]:].tolist()
        from sbtrain.models.generate import decode_step, prefill

        logits, cache = prefill(self.model, ids)
        generated: list[int] = []
        while len(generated) < max_new:
            token = int(logits.argmax(-1)[0])
            generated.append(token)
            if token == self._eot or (stop and any(s in self.tok_decode(generated) for s in stop)):
                break
            if len(generated) < max_new:
                logits = decode_step(self.model, torch.tensor([token], device=device), cache)
        return generated

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"the sbtrain lm-eval model decodes greedily only; got {gen_kwargs}")
            context_ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):]
            if not context_ids:
                context_ids = [self.prefix_token_id]
            tokens = self.greedy_tokens(context_ids, max_new, until)
            text = self.tok_decode([t for t in tokens if t != self._eot])
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            out.append(text)
        return out


def run(cfg) -> dict:
    """``sbtrain-eval lm_eval ckpt=DIR harness.tasks=[...]``: each model on the tasks; a table of every
    metric and ``<out>/lm_eval.json`` (lm-eval's results and configs, no per-sample logs)."""
    import json
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager

    from sbtrain.eval.config import models_of
    from sbtrain.eval.corpus import EvalError
    from sbtrain.eval.ppl import format_table

    harness = cfg.harness
    if not harness.tasks:
        raise EvalError("harness.tasks is empty: name lm-eval tasks, e.g. harness.tasks=[lambada_openai] "
                        "(local task YAMLs: harness.include_path=DIR)")
    manager = TaskManager(include_path=harness.include_path, include_defaults=harness.include_defaults)
    unknown = [t for t in harness.tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"harness.tasks {unknown} are not known to lm-eval: check the names, or point "
                        "harness.include_path at the folder of their YAMLs")
    limit = None if harness.limit is None else (int(harness.limit) if harness.limit >= 1 else harness.limit)
    everything, rows = {}, []
    for label, ckpt in models_of(cfg):
        lm = SbtrainLM(ckpt=ckpt, backend=cfg.backend, tokenizer_path=cfg.tokenizer.path,
                       eod_token=cfg.tokenizer.eod_token, dtype=cfg.dtype,
                       device=cfg.device, batch_size=cfg.batch_size, max_length=harness.max_length,
                       max_gen_toks=harness.max_gen_toks)
        result = lm_eval.simple_evaluate(model=lm, tasks=list(harness.tasks), num_fewshot=harness.num_fewshot,
                                         limit=limit, task_manager=manager, log_samples=False)
        everything[label] = {"ckpt": ckpt, "results": result["results"], "configs": result.get("configs", {})}
        for task, metrics in result["results"].items():
            for name, value in metrics.items():
                if isinstance(value, float) and not name.endswith("_stderr") and "_stderr," not in name:
                    rows.append({"label": label, "task": task, "metric": name, "value": value})
    print(format_table(rows, ["label", "task", "metric", "value"]), flush=True)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_eval.json").write_text(json.dumps(everything, indent=1, default=str))
        print(f"wrote {out / 'lm_eval.json'}", flush=True)
    return everything


__all__ = ["SbtrainLM", "run"]
