"""``sbtrain-generate ckpt=DIR prompt="..." [max_new_tokens=N] [temperature=T] [top_k=K] [seed=S]``:
continue a prompt with a trained model, decoding with its cache (GLA state, SWA ring, full KV)
through :func:`sbtrain.models.generate`.

``chat=true``: ``prompt`` is a user message (``system=`` adds a system message); it is rendered with
the model's chat template (``template=``, else the tokenizer's, else the one its SFT data was built
with) and the reply is streamed token by token (:func:`sbtrain.models.generate.stream`) until the
template's end-of-turn marker, the EOD token or ``max_new_tokens``.

``ckpt`` is an sbtrain weights directory or a training checkpoint (a ``step_XXXXXXXX`` directory,
a run's ``checkpoints/`` or out_dir), as for ``sbtrain-export``. The tokenizer is the weights
dir's ``tokenizer/`` or the one named in the run's data manifest, unless ``tokenizer.path=DIR``
is given. The prompt is encoded without special tokens (as the trainer's documents are).
``format=text`` prints the prompt and its continuation; ``format=json`` one JSON line with the
token ids, the text and the decode speed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sbtrain.config.data import TokenizerConfig
from sbtrain.config.model import ConfigError

FORMATS = ("text", "json")


@dataclass
class GenerateConfig:
    ckpt: str = MISSING  # weights directory or training checkpoint
    prompt: str = MISSING  # text to continue (at least one token)
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy; else sample from softmax(logits / temperature)
    top_k: int | None = None  # sample among the k most likely tokens only (temperature > 0)
    seed: int = 0  # seed of the sampling generator
    threads: int | None = None  # torch threads; null: torch's default
    format: str = "text"  # text | json
    chat: bool = False  # prompt is a user message: apply the chat template and stream the assistant reply
    system: str | None = None  # chat: an optional system message
    template: str | None = None  # chat: chatml | a .jinja file; null: the tokenizer's, else the SFT data's
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # tokenizer.path=DIR overrides the ckpt's


class GenerateError(ConfigError):
    """A generate knob or input the command cannot use (exit status 2)."""


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def validate(cfg: GenerateConfig) -> GenerateConfig:
    if cfg.max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={cfg.max_new_tokens} must be >= 1")
    if cfg.temperature < 0:
        raise GenerateError(f"temperature={cfg.temperature} must be >= 0 (0 is greedy)")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise GenerateError(f"top_k={cfg.top_k} must be >= 1, or null for the whole vocabulary")
    if cfg.format not in FORMATS:
        raise GenerateError(f"format={cfg.format} is unknown; use one of {', '.join(FORMATS)}")
    return cfg


def load(ckpt: str, tokenizer_path: str | None):
    """(model in eval mode, tokenizer) of a checkpoint."""
    from sbtrain.data.tokenizer import load_tokenizer
    from sbtrain.export.hf_export import find_tokenizer, load_source
    from sbtrain.models.weights import WeightsError

    try:
        model, source, kind = load_source(ckpt)
    except WeightsError as exc:
        raise GenerateError(f"ckpt={ckpt}: {exc}") from exc
    folder = find_tokenizer(source, kind, tokenizer_path)
    if folder is None:
        raise GenerateError(f"ckpt={ckpt} has no tokenizer (no tokenizer/ folder, no data manifest naming one); "
                            "give tokenizer.path=DIR")
    tok, _ = load_tokenizer(str(folder))
    return model, tok


def end_of_turn(tok, template) -> str | None:
    """The text a template puts after an assistant message (chatml: ``<|im_end|>``): where a reply ends."""
    from sbtrain.data.chat import render

    mark = "\x00reply\x00"
    text = render(tok, [{"role": "user", "content": "u"}, {"role": "assistant", "content": mark}], template)
    return text.split(mark, 1)[1].strip() or None if mark in text else None


def chat(cfg: GenerateConfig, out=None) -> dict:
    """``chat=true``: render the prompt as a user turn, stream the reply, stop at the end of the turn."""
    import sys

    import torch

    from sbtrain.data.chat import render
    from sbtrain.eval.loading import EvalModel, chat_template_of
    from sbtrain.models.generate import stream

    out = out or sys.stdout
    model, tok = load(cfg.ckpt, cfg.tokenizer.path)
    eod_id = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None
    loaded = EvalModel(model, tok, eod_id, "sbtrain", str(_source_of(cfg.ckpt)), "")
    template = chat_template_of(loaded, cfg.template)
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": cfg.prompt}]
    prompt = render(tok, messages, template, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    stop = end_of_turn(tok, template)
    generator = torch.Generator().manual_seed(cfg.seed)
    ids, shown, text, stopped_by = [], "", "", "max_new_tokens"
    start = time.perf_counter()
    for token in stream(model, torch.tensor([prompt_ids]), cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator):
        if token == eod_id:
            stopped_by = "eod"
            break
        ids.append(token)
        text = tok.decode(ids, skip_special_tokens=False)
        if stop is not None and stop in text:
            text, stopped_by = text.split(stop, 1)[0], "end_of_turn"
        # Show what cannot turn into the end-of-turn marker any more (its pieces arrive token by token).
        ready = text if stopped_by == "end_of_turn" else text[:len(text) - _pending(text, stop)]
        if cfg.format == "text" and len(ready) > len(shown) and ready.startswith(shown):
            out.write(ready[len(shown):])
            out.flush()
        shown = ready if ready.startswith(shown) else shown
        if stopped_by == "end_of_turn":
            break
    elapsed = time.perf_counter() - start
    if cfg.format == "text":
        out.write(text[len(shown):] + "\n")  # a held-back tail that never became the marker
    return {"prompt": cfg.prompt, "rendered_prompt": prompt, "prompt_ids": prompt_ids, "new_ids": ids,
            "reply": text, "stopped_by": stopped_by, "template": template.name, "seconds": elapsed,
            "tokens_per_s": len(ids) / elapsed if elapsed else float("nan")}


def _pending(text: str, stop: str | None) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``stop`` (may still become it)."""
    if not stop:
        return 0
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def _source_of(ckpt: str):
    from sbtrain.export.hf_export import resolve_source

    return resolve_source(ckpt)[1]


def run(cfg: GenerateConfig) -> dict:
    """Generate and return ``{prompt_ids, new_ids, text, ...}`` (the CLI prints it)."""
    import torch

    from sbtrain.models import generate

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load(cfg.ckpt, cfg.tokenizer.path)
    prompt_ids = tok.encode(cfg.prompt, add_special_tokens=False)
    if not prompt_ids:
        raise GenerateError(f"prompt={cfg.prompt!r} encodes to no tokens; give some text")
    if max(prompt_ids) >= model.config.vocab_size:
        raise GenerateError(f"the tokenizer produced id {max(prompt_ids)} but the model's vocabulary has "
                            f"{model.config.vocab_size} ids: tokenizer.path names another model's tokenizer")
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    out = generate(model, torch.tensor([prompt_ids]), cfg.max_new_tokens, temperature=cfg.temperature,
                   top_k=cfg.top_k, generator=generator)
    elapsed = time.perf_counter() - start
    new_ids = out[0, len(prompt_ids):].tolist()
    return {"prompt": cfg.prompt, "prompt_ids": prompt_ids, "new_ids": new_ids,
            "text": tok.decode(new_ids, skip_special_tokens=False), "seconds": elapsed,
            "tokens_per_s": len(new_ids) / elapsed}


def task(cfg: DictConfig) -> dict:
    try:
        gen_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GenerateConfig), cfg))
    except MissingMandatoryValue as exc:
        raise GenerateError(f"{exc.full_key} is required: sbtrain-generate ckpt=DIR prompt=\"...\"") from exc
    if gen_cfg.chat:
        result = chat(validate(gen_cfg))
        if gen_cfg.format == "json":
            print(json.dumps(result), flush=True)
        return result
    result = run(validate(gen_cfg))
    if gen_cfg.format == "json":
        print(json.dumps(result), flush=True)
    else:
        print(gen_cfg.prompt + result["text"], flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    from sbtrain.cli.app import run_app

    run_app(task, "generate", argv)


if __name__ == "__main__":
    main()
