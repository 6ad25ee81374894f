"""``trainer.compile=true``: every block through ``torch.compile`` (default inductor backend), as
``sbtrain.trainer.distributed.parallelize`` applies it. The compiled run matches the eager one,
the ops the compiled blocks call as opaque custom ops have correct gradients, and no block kind
breaks its graph except where docs/COMPILE.md says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
import torch._dynamo.testing
from torch._dynamo.utils import counters

from operators.fast_elementwise import grouped_mm_torch
from operators.gla.chunked import gla_chunked
from operators.registry import prepare_for_compile, set_profiling
from sbtrain.export.hf_export import load_source
from sbtrain.models.layers import Rotary, default_position_ids
from sbtrain.models.mixers.base import MixerInputs
from tests.models.helpers import tiny_model
from tests.trainer.e2e import losses, run

STEPS = 3
TOL = 1e-4
# sb76b_tiny shrunk like e2e.SMALL: intra-layer hybrid (SWA branch with sink tokens beside the
# key-tied linear branch) and MoE in both layers; one block structure, so one compile.
MOE = [
    "model=sb76b_tiny",
    "model.layer_pattern=[hybrid_swa]",
    "model.moe.dense_layers=[]",
    "model.hybrid.num_sink_tokens=4",
]


def _train(dataset: str, out: Path, compiled: bool, extra: list[str]) -> tuple[dict, dict]:
    run(dataset, out, f"trainer.max_steps={STEPS}", f"trainer.compile={str(compiled).lower()}", *extra)
    model, _, _ = load_source(out)  # the parameters of the final checkpoint
    return losses(out), {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()  # drop the compiled code (and the models it holds) for the rest of the session


# inductor's C++ builds: ~15-25 s per model with a cold cache on 2 cores (up to ~1.5 min on a loaded
# machine), ~5 s with a warm one (docs/COMPILE.md)
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], MOE], ids=["sb7b_tiny", "sb76b_tiny_moe"])
def test_compiled_training_matches_eager(dataset, tmp_path, extra):
    counters.clear()
    eager_losses, eager_params = _train(dataset, tmp_path / "eager", False, extra)
    assert counters["stats"]["unique_graphs"] == 0
    compiled_losses, compiled_params = _train(dataset, tmp_path / "compiled", True, extra)
    assert counters["stats"]["unique_graphs"] > 0  # trainer.compile=true did compile the blocks
    assert list(eager_losses) == list(compiled_losses) == list(range(1, STEPS + 1))
    for step, loss in eager_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, abs=TOL), f"step {step}"
    assert eager_params.keys() == compiled_params.keys()
    for name, p in eager_params.items():
        torch.testing.assert_close(compiled_params[name], p, rtol=0, atol=TOL, msg=name)


# -- the opaque custom ops under compile (aot_eager: the autograd wiring, not inductor's codegen) --


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*inputs)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return [o.detach() for o in outs], [x.grad for x in inputs if x.is_floating_point()]


@pytest.mark.parametrize("docs", [False, True], ids=["batch", "documents"])
def test_compiled_chunked_gla_matches_eager(docs):
    torch.manual_seed(0)
    B, T, Hq, H, D = (1, 40, 4, 2, 8) if docs else (2, 40, 4, 2, 8)
    cu = torch.tensor([0, 7, 40]) if docs else None
    n = 2 if docs else B
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    g = -torch.rand(B, T, H, D)
    init = torch.randn(n, H, D, D)

    def fn(q, k, v, g, init):
        return gla_chunked(q, k, v, g, initial_state=init, output_final_state=True, cu_seqlens=cu, chunk_size=16)

    eager = _grads(fn, q, k, v, g, init)
    # with documents, check_gla_args reads cu_seqlens on the host: a graph break (docs/COMPILE.md)
    compiled = _grads(torch.compile(fn, backend="aot_eager", fullgraph=not docs), q, k, v, g, init)
    for a, b in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compiled_grouped_mm_matches_eager():
    torch.manual_seed(0)
    x, w = torch.randn(20, 8), torch.randn(3, 8, 12)
    offs = torch.tensor([6, 6, 17], dtype=torch.int32)  # expert 1 gets no rows, rows 17.. none

    def fn(x, w):
        return (grouped_mm_torch(x, w, offs),)

    eager = _grads(fn, x, w)
    compiled = _grads(torch.compile(fn, backend="aot_eager", fullgraph=True), x, w)
    assert compiled[0][0][17:].eq(0).all() and compiled[1][0][17:].eq(0).all()
    for a, b in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# -- graph breaks inside one block of each kind (dynamo only, no inductor) --

SMALL = [
    "model.vocab_size=320",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.intermediate_size=128",
    "model.sliding_window=16",
    "model.num_layers=2",
]
SB76B = ["model.layer_pattern=[hybrid_swa,hybrid_full]", "model.moe.dense_layers=[0]"]
DOCS = torch.tensor([0, 10, 32])  # document masking: two packed documents (model.document_masking)
# kind -> (recipe, overrides, layer, cu_seqlens, graph breaks expected, where: (file, piece of the
# source line)). docs/COMPILE.md explains each remaining break and the change that removes it.
BLOCKS = {
    "gla": ("sb7b_tiny", [], 0, None, 0, set()),
    "swa": ("sb7b_tiny", [], 1, None, 0, set()),
    "gla_spiking": ("sb7b_tiny", ["model.spike.mode=train"], 0, None, 0, set()),
    "hybrid_swa_sinks_dense": ("sb76b_tiny", SB76B, 0, None, 0, set()),
    # (router and dispatch count tokens per expert with a fixed-size scatter_add, not bincount)
    "hybrid_full_sinks_moe": ("sb76b_tiny", SB76B, 1, None, 0, set()),
    # check_gla_args / check_attention_args read the document bounds on the host, and SDPA runs
    # one call per document
    "gla_documents": ("sb7b_tiny", [], 0, DOCS, 4, {("operators/gla/reference.py", "cu_seqlens.tolist()")}),
    "swa_documents": (
        "sb7b_tiny",
        [],
        1,
        DOCS,
        5,
        {("operators/attention/reference.py", "cu_seqlens.tolist()"), ("operators/attention/sdpa.py", ".tolist()")},
    ),
}


def _explain(block, cfg, cu_seqlens=None):
    B, T = (1, 32) if cu_seqlens is not None else (2, 32)
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    rotary = Rotary(default_position_ids(B, T, cu_seqlens, "cpu"), cfg.resolved_head_dim, cfg.rope_base, cfg.rope_yarn)
    dynamo.reset()
    result = dynamo.explain(block)(x, MixerInputs(rotary, cu_seqlens))
    root = str(Path(__file__).resolve().parents[2]) + "/"
    sites = set()
    for reason in result.break_reasons:
        frame = reason.user_stack[-1]
        sites.add((frame.filename.removeprefix(root), frame.line))
    return result.graph_break_count, sites


def _matches(sites, expected) -> bool:
    return all(any(f == ef and piece in line for ef, piece in expected) for f, line in sites)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_graph_breaks_inside_a_block(kind):
    name, overrides, layer, cu_seqlens, expected_count, expected_sites = BLOCKS[kind]
    model = tiny_model(name, SMALL + overrides).train()
    prepare_for_compile()  # what compile_blocks does before compiling
    count, sites = _explain(model.model.layers[layer], model.config, cu_seqlens)
    assert _matches(sites, expected_sites), f"{kind}: new graph breaks {sites} (see docs/COMPILE.md)"
    assert count == expected_count, f"{kind}: {count} graph breaks at {sites}, expected {expected_count}"


def test_compiled_block_is_not_recompiled_by_eager_calls():
    """The op registry's walk is traced as plain reads once its caches are filled (a write in the
    trace would be a guard that the next call fails)."""
    model = tiny_model("sb7b_tiny", SMALL).train()
    prepare_for_compile()
    block = model.model.layers[0]
    cnt = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(block, backend=cnt)
    cfg = model.config
    for i in range(3):
        set_profiling(i == 1)  # a profiler window opening and closing: no recompile either
        x = torch.randn(2, 32, cfg.hidden_size, requires_grad=True)
        rotary = Rotary(default_position_ids(2, 32, None, "cpu"), cfg.resolved_head_dim, cfg.rope_base)
        y, aux = compiled(x, MixerInputs(rotary))
        (y.sum() + aux).backward()
        model.model.norm(x.detach())  # an eager op call between compiled calls
    set_profiling(False)
    assert cnt.frame_count == 1
