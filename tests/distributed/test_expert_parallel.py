"""Expert-parallel MoE (ep=2, gloo, float64) equals one process running the same MoE on all tokens.

* dispatch/combine: each rank has its own tokens, top-1 and top-2, one expert gets no token at
  all and rank 0 sends nothing to rank 1 (a zero split); outputs, input grads, summed router
  grads and the gathered expert grads match the single-process run on the concatenated tokens.
* token_group: one token set split over 2 ranks (with and without EP): the aux-loss shares sum
  to the unsplit aux loss and every gradient matches.
* a non-dividing EP degree fails naming num_experts and the EP size.
All cases run in one ``run_distributed`` call (a module fixture): worker start-up dominates.
Routing choices are built with a wide margin (target logit ~4 above the rest), so fp32 rounding
differences between the split and unsplit router matmuls cannot flip a top-k choice.
Bounds on max|diff| / max(1, max|ref|): float64's 1e-10 (measured <= 2.8e-16; output and aux
exactly equal) for everything but the router weight's gradient. The router runs in fp32 by design
(``x.float() @ weight.float().t()``), so its weight gradient is an fp32 sum over tokens that the
split runs add up in another order: measured 1.7e-8, bound 1e-7 (about one fp32 epsilon).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from parallel import comm_stats
from parallel.expert_parallel import shard_experts
from sbtrain.config.model import MoEConfig
from sbtrain.models.ffn.moe import MoE
from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.distributed

D, FFN, E, WORLD, T = 16, 24, 4, 2, 10  # T tokens per rank


def make_moe(num_experts: int = E, **kw) -> MoE:
    cfg = MoEConfig(**{"num_experts": num_experts, "top_k": 1, "num_shared_experts": 1, **kw})
    torch.manual_seed(0)
    moe = MoE(D, FFN, cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # router row e points at feature e: a token's top choice is set by its x
        moe.router.weight.mul_(0.05)
        moe.router.weight[:, :num_experts] += 4.0 * torch.eye(num_experts, dtype=torch.float64)
    return moe


def make_tokens(top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of both ranks ``[WORLD*T, D]`` and a loss probe. Rank 0's tokens pick only experts
    {0, 1} (both on rank 0: nothing goes to rank 1), rank 1's pick among {0, 1, 2}; expert 3
    is never chosen. The second choice (top-2) is set at half the strength of the first."""
    g = torch.Generator().manual_seed(7)
    x = 0.05 * torch.randn(WORLD * T, D, generator=g, dtype=torch.float64)
    for t in range(WORLD * T):
        allowed = [0, 1] if t < T else [0, 1, 2]
        first = allowed[t % len(allowed)]
        x[t, first] += 1.0
        if top_k == 2:
            x[t, allowed[(t + 1) % len(allowed)]] += 0.5
    probe = torch.randn(WORLD * T, D, generator=g, dtype=torch.float64)
    return x, probe


def reference(moe: MoE, x: torch.Tensor, probe: torch.Tensor) -> dict:
    """Single process: loss = <y, probe> + aux on all tokens; returns y, aux and every gradient."""
    moe.train()
    x = x.clone().requires_grad_()
    y, aux = moe(x.unsqueeze(0))
    ((y[0] * probe).sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return {"y": y[0].detach(), "aux": aux.detach(), "x_grad": x.grad, "grads": grads,
            "counts": moe.last_tokens_per_expert}


def _run_case(mesh, top_k: int, ep: bool, token_group: bool, aux_coef: float, z_coef: float, **moe_kw) -> dict:
    rank = dist.get_rank()
    moe = make_moe(top_k=top_k, aux_loss_coef=aux_coef, z_loss_coef=z_coef, **moe_kw)
    if ep:
        shard_experts(moe.experts, mesh)
    if token_group:
        moe.token_group = dist.group.WORLD
    x_all, probe_all = make_tokens(top_k)
    rows = slice(rank * T, (rank + 1) * T)
    x = x_all[rows].clone().requires_grad_()
    comm_stats.reset()
    y, aux = moe(x.unsqueeze(0))
    ((y[0] * probe_all[rows]).sum() + aux).backward()
    stats = comm_stats.snapshot()
    comm_stats.reset()  # the harness may reuse this process
    # Replicated params: sum the per-rank grads (what DP/CP all-reduce does). EP shards: gather.
    grads = {}
    for name, p in moe.named_parameters():
        if isinstance(p.grad, DTensor):
            grads[name] = p.grad.full_tensor()
        else:
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[name] = g
    return {"y": y[0].detach(), "aux": aux.detach(), "x_grad": x.grad, "grads": grads,
            "counts": moe.last_tokens_per_expert, "dropped": moe.last_dropped, "ep_sharded": [isinstance(p, DTensor) for p in
                                                               moe.experts.parameters()], "stats": stats}


# (top_k, ep, token_group, aux_loss_coef, z_loss_coef) per case.
CASES = {
    "ep_top1": (1, True, False, 0.0, 0.0),
    "ep_top2": (2, True, False, 0.0, 0.0),
    "token_group": (2, False, True, 0.1, 0.01),
    "token_group_ep": (2, True, True, 0.1, 0.01),
}
CAPACITY = 1.0  # cap = ceil(1.0 * T * 1 / E) = 3 per expert and source rank: rank 0 drops 2 + 2


def _bad_degree(mesh) -> str:
    moe = make_moe(num_experts=3)
    try:
        shard_experts(moe.experts, mesh)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _all_cases_worker() -> dict:
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    out = {name: _run_case(mesh, *args) for name, args in CASES.items()}
    out["ep_capacity"] = _run_case(mesh, 1, True, False, 0.0, 0.0, capacity_factor=CAPACITY)
    out["bad_degree"] = _bad_degree(mesh)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_all_cases_worker, WORLD, timeout=120)


FLOAT64_TOL = 1e-10
ROUTER_GRAD_TOL = 1e-7  # the fp32 router's weight gradient


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, bound: float = FLOAT64_TOL) -> None:
    tol = bound * max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert got.shape == ref.shape and err <= tol, f"{what}: max|diff|={err:.3g} > {tol:.3g}"


def check_grads(results: list[dict], ref: dict) -> None:
    for name, g in ref["grads"].items():
        bound = ROUTER_GRAD_TOL if name == "router.weight" else FLOAT64_TOL
        assert_close(results[0]["grads"][name], g, f"grad {name}", bound)
        assert g.abs().max() > 0, f"reference grad {name} is zero: the check would prove nothing"
    assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"], "input grad")


@pytest.mark.parametrize("top_k", [1, 2])
def test_ep_dispatch_matches_single_process(results, top_k):
    results = [r[f"ep_top{top_k}"] for r in results]
    x_all, probe_all = make_tokens(top_k)
    ref = reference(make_moe(top_k=top_k, aux_loss_coef=0.0), x_all, probe_all)
    assert ref["counts"][3] == 0 and (ref["counts"][:3] > 0).all(), "test setup: expert 3 must be empty"
    assert results[0]["counts"][2:].sum() == 0, "test setup: rank 0 must send nothing to rank 1"
    assert all(all(r["ep_sharded"]) for r in results)
    assert_close(torch.cat([r["y"] for r in results]), ref["y"], "output")
    check_grads(results, ref)
    # Local routing counts (global expert ids) add up to the single-process counts.
    assert torch.equal(results[0]["counts"] + results[1]["counts"], ref["counts"])
    for r in results:  # one dispatch and one combine all-to-all of the token rows per forward
        assert r["stats"]["ep_dispatch"]["calls"] == 2 and r["stats"]["ep_combine"]["calls"] == 1
    assert results[0]["stats"]["ep_combine"]["bytes"] > 0


@pytest.mark.parametrize("ep", [False, True])
def test_token_group_aux_shares_sum_to_full_aux(results, ep):
    # Same token set as above, now one sequence split over the 2 ranks (context parallel).
    results = [r["token_group_ep" if ep else "token_group"] for r in results]
    x_all, probe_all = make_tokens(2)
    ref = reference(make_moe(top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01), x_all, probe_all)
    shares = [r["aux"] for r in results]
    assert_close(shares[0] + shares[1], ref["aux"], "sum of aux shares")
    assert not torch.allclose(shares[0], ref["aux"] / 2), "shares should differ from half the aux (uneven routing)"
    assert_close(torch.cat([r["y"] for r in results]), ref["y"], "output")
    check_grads(results, ref)
    assert results[0]["stats"]["moe_aux_counts"]["calls"] == 1


def test_non_dividing_ep_degree_is_rejected(results):
    for msg in [r["bad_degree"] for r in results]:
        assert "num_experts=3" in msg and "EP size 2" in msg, msg


def test_ep_capacity_is_applied_per_source_rank(results):
    # Under EP each rank drops its own over-capacity assignments before dispatch, exactly what the
    # non-EP layer does on that rank's tokens: the reference is one single-process MoE per rank.
    results = [r["ep_capacity"] for r in results]
    x_all, probe_all = make_tokens(1)
    refs = []
    for rank in range(WORLD):
        rows = slice(rank * T, (rank + 1) * T)
        moe = make_moe(top_k=1, aux_loss_coef=0.0, capacity_factor=CAPACITY)
        refs.append(reference(moe, x_all[rows], probe_all[rows]))
        assert results[rank]["dropped"] == moe.last_dropped
    assert refs[0]["y"].ne(0).any() and results[0]["dropped"] == 4, "test setup: rank 0 must drop tokens"
    assert_close(torch.cat([r["y"] for r in results]), torch.cat([r["y"] for r in refs]), "output")
    assert_close(torch.cat([r["x_grad"] for r in results]), torch.cat([r["x_grad"] for r in refs]), "input grad")
    for name in refs[0]["grads"]:
        bound = ROUTER_GRAD_TOL if name == "router.weight" else FLOAT64_TOL
        assert_close(results[0]["grads"][name], refs[0]["grads"][name] + refs[1]["grads"][name], f"grad {name}", bound)
