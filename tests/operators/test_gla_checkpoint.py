"""The chunked GLA under activation checkpointing (issue #7, 128k on one CPU machine).

Non-reentrant ``torch.utils.checkpoint`` drops what a block saves for backward through
saved-tensor hooks and recomputes it in backward. Only tensors that go through
``ctx.save_for_backward`` pass those hooks: a tensor kept as a plain ctx attribute survives the
forward whatever the hooks do. These tests check that the chunked backend keeps no tensor data on
its ctx, that its per-chunk state (cumulative gate, chunk states, intra scores, packed values) is
freed right after a checkpointed forward, and that checkpointed gradients equal the plain ones and
the float64 oracle.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from operators.gla import chunk_kernels
from operators.gla.chunked import gla_chunked
from parallel.activation_checkpoint import apply_activation_checkpointing
from tests.operators.conformance import assert_close, tolerances
from tests.operators.test_gla import build, loss_of, make_inputs, run_oracle

# Cases of test_gla.CASES: GQA with an initial state; documents (packed copies, padding); scalar gate.
CASES = ["t130_c32_gqa7", "cu_seqlens", "scalar_gate"]
# None: the forward keeps chunk states for the backward; 0: over the cap, the backward recomputes them.
SAVE_MODES = pytest.mark.parametrize("save_bytes", [None, 0], ids=["saved_states", "recompute"])


def gla_of(leaves, C, cu):
    q, k, v, g, s0 = build(leaves)
    return gla_chunked(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=C)


def gradients(leaves, C, cu, *, checkpointed: bool):
    """(output, final state, {leaf: grad}) of a fixed loss, the GLA call optionally checkpointed."""
    if checkpointed:
        o, final = checkpoint(lambda *_: gla_of(leaves, C, cu), *leaves.values(), use_reentrant=False)
    else:
        o, final = gla_of(leaves, C, cu)
    grads = torch.autograd.grad(loss_of(o, final), list(leaves.values()))
    return o, final, dict(zip(leaves, grads))


def tensors_reachable(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, tuples, lists and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (tuple, list)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return []
    return [t for child in children for t in tensors_reachable(child, seen)]


@SAVE_MODES
@pytest.mark.parametrize("case", CASES)
def test_ctx_attributes_hold_no_tensor_data(monkeypatch, case, save_bytes):
    """Only layout metadata (integer document bounds) may live on the ctx; every float tensor the
    backward needs must be in saved_tensors, where saved-tensor hooks can reach it."""
    if save_bytes is not None:
        monkeypatch.setattr(chunk_kernels, "SAVE_STATES_BYTES", save_bytes)
    leaves, C, cu = make_inputs(case, torch.float32, "cpu")
    o, _ = gla_of(leaves, C, cu)
    ctx = o.grad_fn
    on_ctx = tensors_reachable(vars(ctx))
    floats = [tuple(t.shape) for t in on_ctx if t.is_floating_point()]
    assert not floats, f"float tensors kept as ctx attributes (invisible to checkpointing): {floats}"
    T = leaves["q"].shape[1]
    assert sum(t.numel() * t.element_size() for t in on_ctx) <= 8 * (T + 2), "ctx metadata grows like the tokens"
    assert len(ctx.saved_tensors) > 0


def _record_chunk_state(monkeypatch) -> list:
    """Weak references to the storages of every per-chunk tensor the kernel's forward returns for
    the backward (b, chunk states, intra scores) and of the packed values it is given."""
    refs, real_forward = [], chunk_kernels.forward

    def forward(q, k, v, g, *args, **kwargs):
        o, finals, saved = real_forward(q, k, v, g, *args, **kwargs)
        for t in (v, *(saved or ())):
            refs.append(weakref.ref(t.untyped_storage()))
        return o, finals, saved

    monkeypatch.setattr(chunk_kernels, "forward", forward)
    return refs


@pytest.mark.parametrize("checkpointed", [True, False], ids=["checkpointed", "plain"])
@pytest.mark.parametrize("case", ["t130_c32_gqa7", "cu_seqlens"])
def test_chunk_state_freed_after_checkpointed_forward(monkeypatch, case, checkpointed):
    """Checkpointed: nothing per chunk outlives the forward (the backward recomputes it). Plain:
    it is kept for the backward (the control that shows the probe sees the saved state)."""
    refs = _record_chunk_state(monkeypatch)
    leaves, C, cu = make_inputs(case, torch.float32, "cpu")
    fn = lambda *_: gla_of(leaves, C, cu)
    o, final = checkpoint(fn, *leaves.values(), use_reentrant=False) if checkpointed else fn()
    gc.collect()
    assert len(refs) == 4  # packed v, b, states, A
    alive = [r() is not None for r in refs]
    if checkpointed:
        assert not any(alive), f"per-chunk tensors still alive after a checkpointed forward: {alive}"
    else:
        assert all(alive[1:]), "the plain forward should keep b, states and A for its backward"
    loss_of(o, final).backward()  # and the graph still runs: the checkpoint recomputes what was dropped


@SAVE_MODES
@pytest.mark.parametrize("case", CASES)
def test_checkpointed_gradients_equal_plain(monkeypatch, case, save_bytes):
    """float64 leaves: the checkpointed backward reruns the same fp32 kernel, so its gradients equal
    the plain ones exactly, and both match the float64 token recurrence."""
    if save_bytes is not None:
        monkeypatch.setattr(chunk_kernels, "SAVE_STATES_BYTES", save_bytes)
    leaves, C, cu = make_inputs(case, torch.float64, "cpu", seed=7)
    o_ck, f_ck, g_ck = gradients(leaves, C, cu, checkpointed=True)
    o, f, g = gradients(leaves, C, cu, checkpointed=False)
    torch.testing.assert_close(o_ck, o, rtol=0, atol=0)
    torch.testing.assert_close(f_ck, f, rtol=0, atol=0)
    _, _, g64 = run_oracle(leaves, cu)
    for name in g:
        torch.testing.assert_close(g_ck[name], g[name], rtol=0, atol=0, msg=lambda m, n=name: f"d{n}: {m}")
        assert_close(g_ck[name], g64[name], **tolerances(torch.float32), name=f"d{name} vs oracle")


class _GLABlock(nn.Module):
    """A block whose parameters feed q, k, v and the gate of one chunked GLA call."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.shape = (heads, kv_heads, head_dim)
        self.qkvg = nn.Linear(d, (heads + 3 * kv_heads) * head_dim, dtype=torch.float64)

    def forward(self, x):
        B, T, _ = x.shape
        Hq, Hkv, D = self.shape
        q, k, v, g = self.qkvg(x).split([Hq * D, Hkv * D, Hkv * D, Hkv * D], dim=-1)
        g = torch.nn.functional.logsigmoid(g.reshape(B, T, Hkv, D)) / 4
        o, _ = gla_chunked(q.reshape(B, T, Hq, D).relu(), k.reshape(B, T, Hkv, D).relu(), v.reshape(B, T, Hkv, D), g,
                           chunk_size=16)
        return x + o.flatten(2).sum(-1, keepdim=True)


def test_model_blocks_under_full_activation_checkpointing():
    """The path the trainer takes (parallel.activation_checkpoint, mode full): parameter gradients
    equal those of the unwrapped blocks, and a second backward of a retained graph agrees."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(_GLABlock(16, 4, 2, 8) for _ in range(2))
    wrapped = nn.ModuleList(_GLABlock(16, 4, 2, 8) for _ in range(2))
    wrapped.load_state_dict(blocks.state_dict())
    assert apply_activation_checkpointing(wrapped, "full") == 2
    x = torch.randn(2, 40, 16, dtype=torch.float64)

    def grads(mods, retain=False):
        h = x
        for m in mods:
            h = m(h)
        loss = (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum()
        out = torch.autograd.grad(loss, list(mods.parameters()), retain_graph=retain)
        return out, loss

    plain, _ = grads(blocks)
    ck, _ = grads(wrapped)
    for a, b in zip(ck, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # retain_graph: a plain graph run backward twice reuses the saved tensors (ctx keeps its layout)
    h = x
    for m in blocks:
        h = m(h)
    first = torch.autograd.grad(h.sum(), list(blocks.parameters()), retain_graph=True)
    second = torch.autograd.grad(h.sum(), list(blocks.parameters()))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
