"""``sbtrain-eval passkey``: a short synthetic retrieval fine-tune, then passkey accuracy at several
context lengths and needle depths, models side by side (issue #7, the long-context part).

Why a fine-tune first: a tiny model trained for minutes on prose scores zero on any retrieval
prompt, whatever its mixer. A few hundred steps on the task itself (loss on the answer digits
only) teach the format; what is left to measure is whether the model can *reach* the needle at a
distance, which is where linear attention is weak.

The task is built at the token level: each piece is tokenized on its own and the ids are
concatenated, so no BPE merge crosses a boundary and every position is exact::

    EOD  filler[:p]  " The pass key is" d1 .. dn ". Remember it."  filler[p:]  " What is the pass key? The pass key is"
    -> answer d1 .. dn

``length`` is the prompt's token count (EOD through the question): the context the answer is
decoded at. With ``free = length - (1 + needle + question)`` filler tokens, the needle starts at
token ``1 + round(depth * free)``: depth 0 right after EOD (farthest from the question), depth 1
right before it. Each digit is one token (the tokenizer's " 7" if every digit has one, else "7").
Filler ``text`` repeats the classic sentences ("The grass is green. ...") from a random phase;
``random`` draws ids from the tokenizer's vocabulary minus special ids, digits and the needle's
and question's tokens. :class:`PasskeyTask` holds token ids only, so a caller without a tokenizer
builds one from ids directly (the tests do); the CLI always uses the checkpoint's tokenizer.

Evaluation is greedy through the inference path: ``prefill`` the prompt, then ``decode_step`` one
digit at a time (constant-size state for linear attention, a growing cache for full attention).
A trial counts when every digit matches; ``digit_accuracy`` is the per-digit rate beside it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore

from sbtrain.config.data import TokenizerConfig
from sbtrain.eval.corpus import EvalError
from sbtrain.eval.scoring import eval_mode, model_device
from sbtrain.trainer.callbacks import Callback

FILLER_TEXT = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_PREFIX, NEEDLE_SUFFIX = " The pass key is", ". Remember it."
QUERY = " What is the pass key? The pass key is"
FILLERS = ("text", "random")


@dataclass
class FinetuneConfig:
    steps: int = 200  # optimizer steps on freshly generated samples (0: evaluate the checkpoint as it is)
    seq_len: str = "2k"  # prompt length of the training samples (4096, "2k"; the issue asks 1k-4k)
    min_seq_len: str | None = None  # each step draws its length in [min_seq_len, seq_len]; None: always seq_len
    lr: float = 3e-4
    # answer: loss on the key's digits only | all: on every next token as well (the repeated filler
    # text then trains copying from earlier context, the skill retrieval needs; far more signal per step)
    loss: str = "answer"
    warmup_steps: int = 10  # then cosine to 10% (sbtrain.trainer.optim)
    weight_decay: float = 0.0
    batch_size: int = 8  # samples per optimizer step
    micro_batch_size: int = 2  # samples per forward/backward
    eval_samples: int = 16  # fixed samples (at seq_len, mixed depths) the answer loss is measured on, before/after
    log_every: int = 10  # a console line every N steps
    save: bool = False  # write the fine-tuned weights (+ tokenizer) to <out>/finetuned/<label>/


@dataclass
class PasskeyConfig:
    ckpt: str | None = None  # weights dir or training checkpoint (sbtrain models only: prefill + decode_step)
    ckpts: list[str] = field(default_factory=list)  # more models, evaluated after ckpt (e.g. the Transformer)
    labels: list[str] = field(default_factory=list)  # one per model; default: the directory's name
    backend: str = "auto"  # auto | sbtrain (hf models have no constant-memory decode path here)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # tokenizer.path overrides the model's own
    lengths: list[str] = field(default_factory=lambda: ["1k", "2k", "4k"])  # prompt lengths (4096, "16k")
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle position in [0, 1]
    samples: int = 10  # trials per (length, depth)
    digits: int = 5  # digits of the pass key
    filler: str = "text"  # text (repeated sentences) | random (random vocabulary ids)
    seed: int = 0  # the trials of a (length, depth) cell depend on (seed, length, depth) only
    batch_size: int = 4  # prompts per prefill
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (the fine-tune needs fp32)
    device: str = "cpu"
    out: str | None = None  # directory for passkey.json + passkey.png; None: print only
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


ConfigStore.instance().store(name="passkey_schema", node=PasskeyConfig)


@dataclass
class Sample:
    prompt: list[int]  # EOD ... question: `length` ids
    answer: list[int]  # the digit tokens the model must produce
    key: str  # the digits, e.g. "47192"
    needle_start: int  # index of the needle's first token in prompt


@dataclass
class PasskeyTask:
    """The task in token ids: ``sample(length, depth, digits, rng)`` builds one trial."""

    digit_ids: list[int]  # the token of digit 0..9
    needle_prefix: list[int]
    needle_suffix: list[int]
    query: list[int]
    bos_id: int  # the first context token (EOD, as in the training stream EOD d1 EOD d2 ...)
    filler_text: list[int] | None = None  # a sentence repeated from a random phase ...
    filler_pool: list[int] | None = None  # ... or ids drawn uniformly from this pool

    def min_length(self, digits: int) -> int:
        return 1 + len(self.needle_prefix) + digits + len(self.needle_suffix) + len(self.query)

    def needle_start(self, length: int, depth: float, digits: int) -> int:
        if not 0.0 <= depth <= 1.0:
            raise EvalError(f"depth={depth} is outside [0, 1]: a depth is the needle's place in the filler as a "
                            "fraction (0: first token after EOD, 1: just before the question), e.g. depths=[0,0.5,1]")
        shortest = self.min_length(digits)
        if length < shortest:
            raise EvalError(f"length {length} is shorter than the {shortest} tokens of EOD + needle ({digits} digits) "
                            f"+ question: use lengths of at least {shortest} tokens (or fewer digits=)")
        return 1 + round(depth * (length - shortest))

    def filler(self, n: int, rng: random.Random) -> list[int]:
        if self.filler_text:
            phase = rng.randrange(len(self.filler_text))
            repeats = (n + phase) // len(self.filler_text) + 1
            return (self.filler_text * repeats)[phase:phase + n]
        return [self.filler_pool[rng.randrange(len(self.filler_pool))] for _ in range(n)]

    def sample(self, length: int, depth: float, digits: int, rng: random.Random) -> Sample:
        start = self.needle_start(length, depth, digits)
        key = [rng.randrange(10) for _ in range(digits)]
        answer = [self.digit_ids[d] for d in key]
        fill = self.filler(length - self.min_length(digits), rng)
        needle = self.needle_prefix + answer + self.needle_suffix
        prompt = [self.bos_id, *fill[:start - 1], *needle, *fill[start - 1:], *self.query]
        return Sample(prompt, answer, "".join(map(str, key)), start)


def task_from_tokenizer(tokenizer, bos_id: int, filler: str = "text") -> PasskeyTask:
    """The task in ``tokenizer``'s ids (see the module docstring for the layout)."""
    if filler not in FILLERS:
        raise EvalError(f"filler={filler!r} is not one of {FILLERS}")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    for form in (" {}", "{}"):  # one token per digit, with its leading space if the vocabulary has all ten
        ids = [encode(form.format(d)) for d in range(10)]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 10:
            digit_ids = [i[0] for i in ids]
            break
    else:
        raise EvalError("the tokenizer has no single token for every digit 0-9, which the passkey answer needs: "
                        "set tokenizer.path to a tokenizer with single-digit tokens (any byte-level BPE has them)")
    task = PasskeyTask(digit_ids, encode(NEEDLE_PREFIX), encode(NEEDLE_SUFFIX), encode(QUERY), bos_id)
    if filler == "text":
        task.filler_text = encode(FILLER_TEXT)
    else:
        banned = {*tokenizer.all_special_ids, bos_id, *digit_ids, *task.needle_prefix, *task.needle_suffix, *task.query}
        task.filler_pool = [i for i in range(len(tokenizer)) if i not in banned]
    return task


def training_batch(task: PasskeyTask, length: int, rows: int, digits: int, rng: random.Random,
                   answer_only: bool = True) -> dict:
    """``rows`` samples of ``length`` at random depths; labels on the answer digits only, or with
    ``answer_only=False`` on every next token (prompt and answer)."""
    samples = [task.sample(length, rng.random(), digits, rng) for _ in range(rows)]
    sequence = torch.tensor([s.prompt + s.answer for s in samples])
    labels = sequence[:, 1:].clone()
    if answer_only:
        labels[:, :length - 1] = -100  # the target of input position t is token t + 1: the answer starts at `length`
    return {"input_ids": sequence[:, :-1], "labels": labels}


class PasskeyBatches:
    """The fine-tune's TrainData: fresh samples every step, a function of (seed, step) alone, so the
    state is the step count; ``batches()`` is the fixed set the answer loss is measured on (answer
    labels only, whatever ``answer_only`` says for the training batches)."""

    def __init__(self, task: PasskeyTask, lengths: tuple[int, int], digits: int, global_batch: int, micro: int,
                 eval_samples: int, seed: int, answer_only: bool = True):
        self.task, self.lengths, self.digits, self.seed, self.answer_only = task, lengths, digits, seed, answer_only
        self.global_batch, self.micro, self.eval_samples, self.step = global_batch, micro, eval_samples, 0

    def next_global_batch(self) -> list[dict]:
        rng = random.Random(f"passkey-train:{self.seed}:{self.step}")
        length = rng.randint(*self.lengths)  # one length per step: every micro batch is a rectangle
        self.step += 1
        return [training_batch(self.task, length, self.micro, self.digits, rng, self.answer_only)
                for _ in range(self.global_batch // self.micro)]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def batches(self):
        rng = random.Random(f"passkey-valid:{self.seed}")
        for start in range(0, self.eval_samples, self.micro):
            yield training_batch(self.task, self.lengths[1], min(self.micro, self.eval_samples - start), self.digits,
                                 rng)


class LossLog(Callback):
    """Keeps the step losses (for the JSON) and prints one line every ``every`` steps."""

    def __init__(self, every: int, kind: str = "answer"):
        self.every, self.kind, self.losses = every, kind, []

    def on_step_end(self, trainer, metrics):
        self.losses.append(metrics["loss"])
        if self.every and (trainer.step % self.every == 0 or trainer.step == trainer.total_steps):
            print(f"  finetune step {trainer.step}/{trainer.total_steps} {self.kind} loss {metrics['loss']:.4f} "
                  f"({metrics['tokens_per_s']:.0f} tok/s)", flush=True)


def finetune(model, task: PasskeyTask, cfg: FinetuneConfig, digits: int, seed: int = 0) -> dict:
    """Train ``model`` in place on the task with sbtrain's Trainer (AdamW, warmup + cosine, clipping);
    returns the answer loss on the fixed samples before and after, and the step losses."""
    from sbtrain.bench.config import parse_length
    from sbtrain.config.train import OptimConfig, TrainerConfig
    from sbtrain.trainer.optim import build_optimizer
    from sbtrain.trainer.train_module import TrainModule
    from sbtrain.trainer.trainer import Trainer

    longest = parse_length(cfg.seq_len)
    shortest = parse_length(cfg.min_seq_len) if cfg.min_seq_len is not None else longest
    for bad, message in [
        (cfg.steps < 1, f"finetune.steps={cfg.steps} must be >= 1 (finetune.steps=0 in the CLI skips the fine-tune)"),
        (shortest > longest, f"finetune.min_seq_len={cfg.min_seq_len} exceeds finetune.seq_len={cfg.seq_len}"),
        (cfg.micro_batch_size < 1 or cfg.batch_size % cfg.micro_batch_size,
         f"finetune.batch_size={cfg.batch_size} must be a multiple of finetune.micro_batch_size={cfg.micro_batch_size}"),
        (cfg.eval_samples < 1, f"finetune.eval_samples={cfg.eval_samples} must be >= 1"),
        (cfg.loss not in ("answer", "all"), f"finetune.loss={cfg.loss!r} is unknown; use answer or all"),
    ]:
        if bad:
            raise EvalError(message)
    task.needle_start(shortest, 0.0, digits)  # a too-short training length fails here, naming the fix
    data = PasskeyBatches(task, (shortest, longest), digits, cfg.batch_size, cfg.micro_batch_size, cfg.eval_samples,
                          seed, answer_only=cfg.loss == "answer")
    tcfg = TrainerConfig(global_batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, seq_len=longest,
                         max_steps=cfg.steps, eval_every=cfg.steps, eval_batches=0, device=model_device(model).type)
    ocfg = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay)
    losses = LossLog(cfg.log_every, cfg.loss)
    tcfg.validate()
    module = TrainModule.build(model, build_optimizer(model, ocfg), tcfg, ocfg)
    trainer = Trainer(module=module, cfg=tcfg, optim_cfg=ocfg, train_data=data, valid_data=data, callbacks=[losses])
    start = time.perf_counter()
    summary = trainer.fit()
    model.eval()
    if summary["stopped_by"]:  # the Trainer stops gracefully on SIGTERM / SIGUSR1; this command must stop too
        raise EvalError(f"the passkey fine-tune was stopped by {summary['stopped_by']} at step {trainer.step} of "
                        f"{cfg.steps}: nothing is evaluated on a half-tuned model; rerun to measure")
    return {"steps": cfg.steps, "seq_len": longest, "min_seq_len": shortest, "lr": cfg.lr, "loss": cfg.loss,
            "answer_loss_before": summary["first_valid_loss"], "answer_loss_after": summary["last_valid_loss"],
            "seconds": time.perf_counter() - start, "losses": losses.losses}


@torch.no_grad()
def greedy_answer(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` greedy tokens after ``prompts [B, T]``: prefill, then n - 1 decode steps."""
    from sbtrain.models.generate import decode_step, prefill

    logits, cache = prefill(model, prompts)
    tokens = []
    for i in range(n):
        tokens.append(logits.argmax(-1))
        if i + 1 < n:
            logits = decode_step(model, tokens[-1], cache)
    return torch.stack(tokens, dim=1)


def evaluate_passkey(model, task: PasskeyTask, lengths: list[int], depths: list[float], samples: int,
                     digits: int = 5, seed: int = 0, batch_size: int = 4) -> list[dict]:
    """One cell per (length, depth): ``samples`` trials, exact-match accuracy and per-digit accuracy."""
    if samples < 1 or digits < 1 or batch_size < 1:
        raise EvalError(f"samples={samples}, digits={digits} and batch_size={batch_size} must all be >= 1")
    for length in lengths:  # every bad length or depth before the first (possibly long) prefill
        for depth in depths:
            task.needle_start(length, depth, digits)
    cells = []
    with eval_mode(model):
        device = model_device(model)
        for length in lengths:
            for depth in depths:
                rng = random.Random(f"passkey-eval:{seed}:{length}:{depth}")
                trials = [task.sample(length, depth, digits, rng) for _ in range(samples)]
                correct = digits_right = 0
                for i in range(0, samples, batch_size):
                    chunk = trials[i:i + batch_size]
                    got = greedy_answer(model, torch.tensor([s.prompt for s in chunk], device=device), digits).cpu()
                    match = got == torch.tensor([s.answer for s in chunk])
                    correct += int(match.all(dim=1).sum())
                    digits_right += int(match.sum())
                cells.append({"length": length, "depth": depth, "samples": samples, "correct": correct,
                              "accuracy": correct / samples, "digit_accuracy": digits_right / (samples * digits)})
    return cells


def accuracy_table(result: dict) -> str:
    """Rows: lengths; columns: depths and their mean (exact-match accuracy)."""
    from sbtrain.bench.config import format_length
    from sbtrain.eval.ppl import format_table

    depths = sorted({c["depth"] for c in result["cells"]})
    rows = []
    for length in sorted({c["length"] for c in result["cells"]}):
        accuracy = {c["depth"]: c["accuracy"] for c in result["cells"] if c["length"] == length}
        rows.append({"length": format_length(length), **{f"d={d:g}": float(accuracy[d]) for d in depths},
                     "mean": sum(accuracy.values()) / len(accuracy)})
    return format_table(rows, ["length", *[f"d={d:g}" for d in depths], "mean"])


def plot_heatmaps(results: list[dict], path: Path) -> Path:
    """One accuracy heatmap per model, side by side: x = length, y = depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sbtrain.bench.config import format_length

    fig, axes = plt.subplots(1, len(results), figsize=(1.5 + 4.5 * len(results), 4.0), squeeze=False,
                             layout="constrained")
    for ax, result in zip(axes[0], results):
        lengths = sorted({c["length"] for c in result["cells"]})
        depths = sorted({c["depth"] for c in result["cells"]})
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for c in result["cells"]:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        for (i, j), value in zip([(i, j) for i in range(len(depths)) for j in range(len(lengths))], grid.flatten()):
            ax.text(j, i, f"{float(value):.2f}", ha="center", va="center", fontsize=8,
                    color="white" if float(value) < 0.2 or float(value) > 0.8 else "black")  # legible on dark ends
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (0 = start)")
        tuned = result.get("finetune")
        title = result.get("title") or result["label"] + (  # "title": a caller's own (e.g. a chained fine-tune)
            f" (fine-tuned {tuned['steps']} steps @ {format_length(tuned['seq_len'])})" if tuned else " (no fine-tune)")
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy (all digits)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg) -> list[dict]:
    """``sbtrain-eval passkey``: for every model, fine-tune (``finetune.steps``), evaluate every
    (length, depth); print one table per model, write ``<out>/passkey.json`` and ``<out>/passkey.png``."""
    from omegaconf import OmegaConf

    from sbtrain.bench.config import parse_length
    from sbtrain.eval.config import models_of
    from sbtrain.eval.loading import load_eval_model
    from sbtrain.models.model import CausalLM

    lengths, depths = [parse_length(x) for x in cfg.lengths], [float(d) for d in cfg.depths]
    if not lengths or not depths:
        raise EvalError("lengths=[] or depths=[] is empty: give e.g. lengths=[1k,4k] depths=[0,0.5,1]")
    if cfg.finetune.steps and cfg.dtype != "fp32":
        raise EvalError(f"dtype={cfg.dtype}: the fine-tune keeps fp32 weights; use dtype=fp32 or finetune.steps=0")
    fcfg = OmegaConf.to_object(cfg.finetune)
    if fcfg.save and not cfg.out:
        raise EvalError("finetune.save=true writes under out=DIR: set out=DIR (or drop finetune.save)")
    results = []
    for label, ckpt in models_of(cfg):
        loaded = load_eval_model(ckpt, cfg.backend, cfg.tokenizer.path, cfg.dtype, cfg.device, cfg.tokenizer.eod_token)
        if not isinstance(loaded.model, CausalLM):
            raise EvalError(f"ckpt={ckpt} loaded as a Hugging Face model: passkey decodes with sbtrain's prefill + "
                            "decode_step; give an sbtrain weights directory or checkpoint (backend=sbtrain)")
        task = task_from_tokenizer(loaded.tokenizer, loaded.eod_id, cfg.filler)
        for length in lengths:  # bad lengths / depths fail before minutes of fine-tuning
            for depth in depths:
                task.needle_start(length, depth, cfg.digits)
        tuned = None
        if fcfg.steps:
            print(f"{label}: fine-tuning {fcfg.steps} steps on passkey samples of {fcfg.seq_len} tokens", flush=True)
            tuned = finetune(loaded.model, task, fcfg, cfg.digits, cfg.seed)
            if fcfg.save and cfg.out:
                from sbtrain.models.weights import save_weights

                saved = save_weights(loaded.model.state_dict().items(), loaded.model.config,
                                     Path(cfg.out) / "finetuned" / label)
                loaded.tokenizer.save_pretrained(str(saved / "tokenizer"))
        start = time.perf_counter()
        cells = evaluate_passkey(loaded.model, task, lengths, depths, cfg.samples, cfg.digits, cfg.seed, cfg.batch_size)
        results.append({"label": label, "ckpt": ckpt, "tokenizer": loaded.tokenizer_path, "finetune": tuned,
                        "eval_seconds": time.perf_counter() - start, "cells": cells})
        print(f"\n{label}: passkey accuracy ({cfg.samples} trials per cell, {cfg.digits} digits)", flush=True)
        print(accuracy_table(results[-1]), flush=True)
        del loaded
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        settings = {k: resolved[k] for k in ("lengths", "depths", "samples", "digits", "filler", "seed", "finetune")}
        (out / "passkey.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
        png = plot_heatmaps(results, out / "passkey.png")
        print(f"wrote {out / 'passkey.json'} and {png}", flush=True)
    return results


__all__ = ["FinetuneConfig", "PasskeyBatches", "PasskeyConfig", "PasskeyTask", "Sample", "accuracy_table",
           "evaluate_passkey", "finetune", "greedy_answer", "plot_heatmaps", "run", "task_from_tokenizer",
           "training_batch"]
