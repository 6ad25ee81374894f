"""Context-parallel softmax attention on gloo equals single-process ``ops.attention``.

Sliding window (halo exchange) and full attention (Ulysses) at CP = 2 and 4, float64: the local
outputs and the q/k/v gradients equal the full-sequence reference sliced to the shard, and the
sink gradients summed over ranks equal the reference's (each rank owns its queries' share). Cases
cover windows below, equal to and above the shard length (multi-hop halos) and window 0, sinks,
GQA with query-head padding and KV-head replication, B = 2, and packed documents crossing a shard
boundary, starting exactly at one, and several per shard. The recorded halo traffic proves that
keys masked by a document boundary are never sent.

Everything is float64 with no fp32 step inside (the sdpa backend computes in the inputs' dtype),
so the bound is float64's: max|diff| <= 1e-10 * max(1, max|ref|); measured 7.4e-16 (CP = 2 and 4).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from operators import ops
from parallel import comm_stats
from parallel.context_parallel import ContextParallel
from parallel.context_parallel.ulysses import ulysses_layout
from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.distributed

T, D = 32, 8
TOL = 1e-10  # relative to max(1, max|ref|); float64 throughout, measured 7.4e-16
DOCS_A = [0, 5, 8, 11, 13, 20, 31, 32]  # CP=4: starts at 8, crosses 16 and 24, several per shard; CP=2: crosses 16
DOCS_B = [0, 3, 16, 17, 25, 32]  # starts exactly at 16; [3, 16) spans shards 0-1 at CP=4 (cuts a long halo)

# (window or None for Ulysses, B, Hq, Hkv, sinks, document bounds)
CASES = [
    (3, 2, 4, 2, 0, None),
    (8, 1, 4, 2, 2, None),
    (16, 2, 7, 1, 2, None),
    (20, 1, 4, 2, 0, None),
    (0, 1, 4, 2, 2, None),
    (5, 1, 4, 2, 2, DOCS_A),
    (20, 1, 7, 1, 0, DOCS_B),
    (8, 1, 4, 2, 0, DOCS_A),
    (3, 1, 4, 2, 2, DOCS_B),
    (None, 2, 4, 2, 0, None),
    (None, 1, 7, 1, 2, None),
    (None, 1, 4, 2, 2, DOCS_A),
    (None, 1, 7, 1, 0, DOCS_B),
    (None, 1, 2, 2, 2, None),  # CP=4: two ranks hold only padding query heads
    (None, 1, 8, 4, 0, None),  # heads split evenly: no padding, no replication
]


def make_case(index: int) -> dict[str, torch.Tensor | None]:
    _, B, Hq, Hkv, S, docs = CASES[index]
    g = torch.Generator().manual_seed(100 + index)
    t = {
        "q": torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64),
        "k": torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64),
        "v": torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64),
        "grad_out": torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64),
        "sink_k": torch.randn(S, Hkv, D, generator=g, dtype=torch.float64) if S else None,
        "sink_v": torch.randn(S, Hkv, D, generator=g, dtype=torch.float64) if S else None,
    }
    t["cu_seqlens"] = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    return t


def run_attention(tensors, window, cp=None):
    """Output and gradients of q, k, v, sinks for one case (whole sequence, or this rank's shard)."""
    shard = (lambda x: x) if cp is None else cp.shard
    leaves = {n: tensors[n].clone().requires_grad_() for n in ("sink_k", "sink_v") if tensors[n] is not None}
    leaves.update({n: shard(tensors[n]).clone().requires_grad_() for n in ("q", "k", "v")})
    sinks = {n: leaves.get(n) for n in ("sink_k", "sink_v")}
    if cp is None:
        out = ops.attention(
            leaves["q"], leaves["k"], leaves["v"], causal=True, window=window, cu_seqlens=tensors["cu_seqlens"], **sinks
        )
    else:
        out = cp.attention(leaves["q"], leaves["k"], leaves["v"], window=window, **sinks)
    out.backward(shard(tensors["grad_out"]))
    return {"out": out.detach(), **{f"grad_{n}": x.grad for n, x in leaves.items()}}


def _cp_worker(case_indices):
    results = []
    for index in case_indices:
        tensors = make_case(index)
        cp = ContextParallel(dist.group.WORLD, seq_len=T, cu_seqlens=tensors["cu_seqlens"])
        comm_stats.reset()
        result = run_attention(tensors, CASES[index][0], cp)
        result["sent"] = {k: s["bytes"] for k, s in comm_stats.snapshot().items()}
        results.append(result)
    comm_stats.reset()
    return results


def expected_halo_bytes(window, B, Hkv, docs, cp_size) -> int:
    """Forward + backward halo bytes over all ranks: each shard receives the keys before its start
    that are inside the window and inside its first document, and returns their gradients."""
    t, total = T // cp_size, 0
    for r in range(cp_size):
        start = r * t
        first = max(0, start - window, *([b for b in docs if b <= start] if docs else []))
        total += (start - first) * B * Hkv * 2 * D * 8
    return 2 * total


@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_softmax_matches_reference(cp_size):
    indices = list(range(len(CASES)))
    per_rank = run_distributed(_cp_worker, cp_size, indices, timeout=120)
    for i in indices:
        window, B, _, Hkv, _, docs = CASES[i]
        tensors = make_case(i)
        ref = run_attention(tensors, window)
        for name, ref_value in ref.items():
            if name.startswith("grad_sink"):  # replicated parameter: ranks hold shares of the gradient
                got = sum(per_rank[r][i][name] for r in range(cp_size))
            else:
                got = torch.cat([per_rank[r][i][name] for r in range(cp_size)], dim=1)
            err = (got - ref_value).abs().max().item()
            tol = TOL * max(1.0, ref_value.abs().max().item())
            assert err <= tol, f"case {i} {CASES[i]} cp={cp_size}: {name} max|diff| {err:.3g} > {tol:.3g}"
        sent = sum(per_rank[r][i]["sent"].get("cp_swa_halo", 0) for r in range(cp_size))
        if window is not None:
            assert sent == expected_halo_bytes(window, B, Hkv, docs, cp_size), f"case {i} cp={cp_size}: {sent} B"
        else:  # q, k, v in and o out, forward and backward, for the padded/replicated slots only
            layout = ulysses_layout(ref["out"].shape[2], Hkv, cp_size)
            slots = 2 * layout.q_slots + 2 * layout.kv_slots
            expected = 2 * B * (T // cp_size) * slots * D * 8 * (cp_size - 1) // cp_size
            assert sent == 0 and all(per_rank[r][i]["sent"]["cp_ulysses"] == expected for r in range(cp_size))


def test_ulysses_layout_pads_and_replicates_minimally():
    # DESIGN §7: 28 query heads padded to 32 and 4 KV heads replicated to 8 at CP=8.
    layout = ulysses_layout(28, 4, 8)
    assert (layout.q_slots, layout.kv_slots) == (32, 8)
    per_rank_q, per_rank_kv = layout.q_slots // 8, layout.kv_slots // 8
    for slot, head in enumerate(layout.q_index):  # every real query head lands next to its own KV head
        if head < 28:
            assert layout.kv_index[slot // per_rank_q * per_rank_kv + slot % per_rank_q // layout.q_slots_per_kv] == (
                head // 7
            )
    assert sorted(h for h in layout.q_index if h < 28) == list(range(28))
    # Forward bytes per rank, 7B-shaped layer at 128k tokens, bf16, D=128: q in + o out + k + v.
    t = 128 * 1024 // 8
    fwd = (2 * layout.q_slots + 2 * layout.kv_slots) * t * 128 * 2 * 7 // 8
    assert 280e6 < fwd < 310e6
    assert ulysses_layout(8, 4, 4).q_slots == 8 and ulysses_layout(7, 1, 4).kv_slots == 4
    with pytest.raises(ValueError, match="not a multiple"):
        ulysses_layout(6, 4, 2)
