"""The generic context-parallel form for affine-state recurrences (``parallel/context_parallel/
recurrent.py``) equals one process, on 2 and 4 gloo ranks, in float64: output and every input
gradient. Proven here on GLA's float64 reference (its state is affine in the initial state too),
so the form is checked without any knowledge of the op; Gated DeltaNet's model-level case lives
in tests/models/test_gated_delta_mixer.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from operators import ops
from parallel.context_parallel import ContextParallel
from tests.distributed.harness import run_distributed
from tests.distributed.test_cp_linear import CASES, make_problem

pytestmark = pytest.mark.distributed
TOL = 1e-10  # float64 throughout (the reference op): measured ~1e-15


def _worker(cases):
    out = {}
    for name, B, T, Hq, Hkv, gate, docs in cases:
        (q, k, v, g), do = make_problem(B, T, Hq, Hkv, gate, seed=11)
        cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
        cp = ContextParallel(dist.group.WORLD, T, cu_seqlens=cu)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        o = cp.recurrent(ops.gla.reference, *(cp.shard(t) for t in leaves))
        grads = torch.autograd.grad((o * cp.shard(do)).sum(), leaves)
        grads = [gr.clone() for gr in grads]
        for gr in grads:
            dist.all_reduce(gr)  # each rank holds its shard's contribution to every input's gradient
        out[name] = (o.detach(), grads)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_recurrent_cp_matches_single_process(world):
    results = run_distributed(_worker, world, CASES, timeout=240)
    for name, B, T, Hq, Hkv, gate, docs in CASES:
        (q, k, v, g), do = make_problem(B, T, Hq, Hkv, gate, seed=11)
        cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        o = ops.gla.reference(*leaves, cu_seqlens=cu)[0]
        want = torch.autograd.grad((o * do).sum(), leaves)
        local = T // world
        for rank in range(world):
            got_o, got_grads = results[rank][name]
            assert (got_o - o[:, rank * local:(rank + 1) * local]).abs().max().item() <= TOL, (name, rank)
            for label, a, b in zip("qkvg", got_grads, want):
                assert (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item()), (name, rank, label)
