"""Context parallelism for any recurrence whose state is affine in its initial state (Gated
DeltaNet's delta rule, ...): the generic form a new linear mixer gets without writing its own.

Per KV head the state ``S [Dk, Dv]`` evolves as ``S_t = A_t S_{t-1} + B_t`` (for the gated delta
rule ``A_t = exp(g_t)(I - beta_t k_t k_t^T)``, ``B_t = beta_t k_t v_t^T``), so over a shard
``S_end = M S_begin + S_local`` with ``M = A_t ... A_1`` ``[Dk, Dk]``. Both come from ONE pass of
the op itself over the shard's last document segment, with the values widened by Dk zero columns
and the initial state ``[0 | I]``: the final state is then ``[S_local | M]`` (the zero columns
receive no writes, and the identity columns carry the transition). Then, as LASP-2 does for GLA:
one all-gather of ``[S_local, M]``, a local prefix combine ``S_in(r) = M_{r-1} S_in(r-1) +
S_local_{r-1}``, and a second pass of the op over the whole shard from ``S_in`` (for the first
local document when it began earlier; later documents start from zero). A document boundary in a
shard cuts the incoming state off (``M = 0``). Traffic per rank: ``Hkv·Dk·(Dv + Dk)`` numbers per
row, independent of the sequence length; counted under ``comm_stats`` kind ``cp_linear``.

The op must follow the contract ``op(q, k, v, *gates, initial_state=, output_final_state=,
cu_seqlens=) -> (o, final_state [N, Hkv, Dk, Dv])`` and accept ``Dv != Dk``.
"""

from __future__ import annotations

import torch

from parallel.context_parallel.linear import _AllGather, _state_dtype, check_shard


def _transition_and_local_state(op, q, k, v, gates, cp, op_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_local`` ``[R,Hkv,Dk,Dv]`` and ``M`` ``[R,Hkv,Dk,Dk]`` of this shard's last document segment."""
    B, t, Hkv, Dk = k.shape
    Dv = v.shape[-1]
    acc = _state_dtype(q.dtype)
    s = 0 if cp.docs is None else int(cp.docs.cu_seqlens[-2])
    v_ext = torch.cat([v[:, s:], v.new_zeros(B, t - s, Hkv, Dk)], dim=-1)
    eye = torch.eye(Dk, dtype=acc, device=q.device).expand(B, Hkv, Dk, Dk)
    init = torch.cat([torch.zeros(B, Hkv, Dk, Dv, dtype=acc, device=q.device), eye], dim=-1)
    _, final = op(q[:, s:], k[:, s:], v_ext, *(x[:, s:] for x in gates), initial_state=init,
                  output_final_state=True, **op_kwargs)
    local, transition = final[..., :Dv].to(acc), final[..., Dv:].to(acc)
    if cp.docs is not None and cp.docs.has_boundary:
        transition = transition * 0.0  # kept in the graph: every rank joins the gather's backward
    return local, transition


def _incoming_state(local, transition, cp) -> torch.Tensor:
    n_local = local.numel()
    gathered = _AllGather.apply(torch.cat([local.reshape(-1), transition.reshape(-1)]), cp.group)
    locals_ = gathered[:, :n_local].view(cp.size, *local.shape)
    transitions = gathered[:, n_local:].view(cp.size, *transition.shape)
    s_in = torch.zeros_like(local)
    for j in range(cp.rank):
        s_in = transitions[j] @ s_in + locals_[j]
    # Read the whole gathered tensor (weight 0) so that rank 0 too joins the backward collective.
    return s_in + 0.0 * gathered.sum()


def recurrent_context_parallel(op, q, k, v, *gates, cp, **op_kwargs) -> torch.Tensor:
    """``op(q, k, v, *gates)[0]`` of the whole sequence, sliced to this rank's shard.

    q ``[B,t,Hq,Dk]``, k ``[B,t,Hkv,Dk]``, v ``[B,t,Hkv,Dv]``, gates ``[B,t,Hkv,...]``: this rank's
    contiguous shard of ``cp.seq_len`` tokens per row. With documents (``cp.cu_seqlens``) B is 1."""
    check_shard(q, cp, "recurrence")
    if cp.size == 1:
        s_in = None
    else:
        s_in = _incoming_state(*_transition_and_local_state(op, q, k, v, gates, cp, op_kwargs), cp)
    if cp.docs is None:
        return op(q, k, v, *gates, initial_state=s_in, **op_kwargs)[0]
    if s_in is None:
        return op(q, k, v, *gates, cu_seqlens=cp.docs.cu_seqlens, **op_kwargs)[0]
    first = s_in * (1.0 if cp.docs.continues_previous else 0.0)  # multiplied, not dropped: see above
    n_docs = cp.docs.cu_seqlens.numel() - 1
    initial = torch.cat([first, first.new_zeros(n_docs - 1, *first.shape[1:])])
    return op(q, k, v, *gates, initial_state=initial, cu_seqlens=cp.docs.cu_seqlens, **op_kwargs)[0]


__all__ = ["recurrent_context_parallel"]
