"""Gated DeltaNet as a mixer kind (``sbtrain/models/mixers/gated_delta.py``), proven everywhere the
framework reads a kind: training, decode with constant memory, TP=2 and CP=2 equal one process on
gloo, conversion from an HF Qwen2 folder, export to HF, FLOPs / MFU, energy MACs and sbtrain-info.
The op itself (reference, chunked, fla) is tested in tests/operators/test_gated_delta.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sbtrain.convert.config import ConvertConfig
from sbtrain.convert.hf_import import convert_hf
from sbtrain.models import build_model, decode_step, prefill
from sbtrain.models.mixers import MIXERS, mixer_kind
from tests.convert.helpers import hf_model, load_converted, save_hf
from tests.distributed.harness import run_distributed
from tests.models.helpers import recipe

TINY = ["model.hidden_size=32", "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=8",
        "model.intermediate_size=64", "model.vocab_size=128", "model.sliding_window=5", "model.init_std=0.1",
        "model.num_layers=2"]


def gdn(overrides=(), dtype=torch.float64, seed=0):
    cfg = recipe("gdn_tiny", [*TINY, *overrides])
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype), cfg


def test_the_kind_is_registered_and_counted():
    kind = MIXERS["gated_delta"]
    cfg = recipe("gdn_tiny")
    assert cfg.layer_types()[:2] == ["gated_delta", "swa"]
    from sbtrain.cli.info import model_info
    from sbtrain.spike.energy import analytic_macs
    from sbtrain.trainer.flops import flops_per_token, mixer_flops_per_token

    info = model_info(cfg)
    assert info["layer_pattern"][0] == "gated_delta" and info["params_total"] > 0
    d = cfg.resolved_head_dim
    # Linear in nothing: the same FLOPs per token at every context length, unlike softmax attention.
    assert mixer_flops_per_token("gated_delta", 1024, cfg) == mixer_flops_per_token("gated_delta", 65536, cfg) > 0
    assert mixer_flops_per_token("gated_delta", 1024, cfg) == 6.0 * 4 * (64 * 5 * d + 3 * d * d)
    assert flops_per_token(cfg, 2048, 1000, 10) > 6.0 * 1010
    assert analytic_macs(cfg, 2048)["layers.0.gated_delta"] == (2 * 2 + 4) * d * d
    assert kind.decode_cache_bytes(cfg, 10, 2) == kind.decode_cache_bytes(cfg, 10_000, 2) == 2 * d * d * 4
    assert not kind.uses_rope and not kind.attends_all


def test_training_lowers_the_loss():
    model, cfg = gdn(dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        loss = out.loss_sum / out.num_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(p.grad is not None for p in model.parameters())  # the gates' parameters learn too


def test_decode_matches_forward_with_a_constant_state():
    model, cfg = gdn(["model.layer_pattern=[gated_delta]"])
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, return_logits=True).logits
        logits, cache = prefill(model, ids[:, :8])
        torch.testing.assert_close(logits.double(), full[:, 7], rtol=0, atol=1e-5)  # fp32 logits out
        size = cache.memory_bytes()
        for t in range(8, 24):
            step = decode_step(model, ids[:, t:t + 1], cache)
            torch.testing.assert_close(step.double(), full[:, t], rtol=0, atol=1e-5)
            assert cache.memory_bytes() == size  # constant memory: one state per layer
    per_sequence = mixer_kind("gated_delta").decode_cache_bytes(cfg, 24, 8)  # fp32 state bytes of one row
    assert size == cfg.num_layers * per_sequence * 2 * ids.shape[0]  # fp64 states here, 2 rows


def test_packed_documents_restart_the_state():
    model, cfg = gdn(["model.layer_pattern=[gated_delta]", "model.document_masking=true"])
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = model(ids, cu_seqlens=torch.tensor([0, 7, 20], dtype=torch.int32), return_logits=True).logits
        first, second = (model(part, return_logits=True).logits for part in (ids[:, :7], ids[:, 7:]))
    # fp32 inside a float64 model (RMSNorm, fp32 chunks) rounds packed and split runs differently: ~3e-7.
    torch.testing.assert_close(packed, torch.cat([first, second], 1), rtol=0, atol=1e-5)


# -- parallelism on gloo ------------------------------------------------------------------------
def test_tensor_parallel_matches_single_process():
    from tests.distributed.test_tensor_parallel import _tp_worker, check_close, init_state, train

    # fp32 chunks inside the float64 model (the chunked delta rule, RMSNorm, the loss), three SGD
    # steps at lr 1: measured up to 3e-6 relative (GLA's bound in test_tensor_parallel is 2e-6).
    tol = 1e-5

    cfg = recipe("gdn_tiny", TINY)
    state = init_state(cfg)
    results = run_distributed(_tp_worker, 2, [("gdn", cfg, state, True)], timeout=240)
    model = build_model(cfg).double()
    model.load_state_dict(state)
    want = train(model, cfg)
    for step, (g, w) in enumerate(zip(results[0]["gdn"], want)):
        check_close(g["loss"], w["loss"], f"step {step} loss", tol)
        for n in w["grads"]:
            check_close(g["grads"][n], w["grads"][n], f"step {step} grad {n}", tol)
            check_close(g["params"][n], w["params"][n], f"step {step} param {n}", tol)


CP_T = 32
CP_DOCS = [0, 5, 16, 17, 30, 32]  # a document spans shards 0-1, one starts exactly at 16


def _loss_and_grads(model, ids, labels, cu, cp=None):
    from parallel.context_parallel import ContextParallel

    model.zero_grad()
    if cp is None:
        out = model(ids, labels=labels, cu_seqlens=cu)
        loss = out.loss_sum
    else:
        group = dist.group.WORLD
        layout = ContextParallel(group, ids.shape[1], cu_seqlens=cu)
        out = model(layout.shard(ids), labels=layout.shard(labels), cu_seqlens=cu, context_parallel=layout)
        loss = out.loss_sum
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp is not None:
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
    return loss.detach(), grads


def _cp_worker(cfg, state, ids, labels, cases):
    model = build_model(cfg).double()
    model.load_state_dict(state)
    return {name: _loss_and_grads(model, ids, labels, cu, cp=True) for name, cu in cases.items()}


def test_context_parallel_matches_single_process():
    cfg = recipe("gdn_tiny", [*TINY, "model.document_masking=true"])
    torch.manual_seed(3)
    state = {k: v.double() for k, v in build_model(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (1, CP_T), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (1, CP_T), generator=gen)
    cases = {"no_documents": None, "documents": torch.tensor(CP_DOCS, dtype=torch.int32)}
    results = run_distributed(_cp_worker, 2, cfg, state, ids, labels, cases, timeout=240)
    model = build_model(cfg).double()
    model.load_state_dict(state)
    for name, cu in cases.items():
        loss, grads = _loss_and_grads(model, ids, labels, cu)
        got_loss, got_grads = results[0][name]
        assert abs(got_loss.item() - loss.item()) <= 2e-6 * max(1.0, abs(loss.item())), (name, got_loss, loss)
        for n, g in grads.items():
            err = (got_grads[n] - g).abs().max().item()
            assert err <= 2e-6 * max(1.0, g.abs().max().item()), (name, n, err)  # fp32 steps inside, as under TP


# -- conversion and export ----------------------------------------------------------------------
def test_converts_from_an_hf_qwen2_folder_and_exports_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sbtrain.export import export
    from tests.export.test_hf_export import load_hf

    src = save_hf(hf_model("qwen2"), tmp_path / "hf")
    out = convert_hf(ConvertConfig(from_hf=str(src), target="gdn_tiny", out=str(tmp_path / "out")))
    ours = load_converted(out)
    assert ours.config.layer_types() == ["gated_delta", "swa"]
    teacher = transformers.AutoModelForCausalLM.from_pretrained(src).state_dict()
    sd = ours.state_dict()
    for name in ("q_proj.weight", "k_proj.bias", "v_proj.weight", "o_proj.weight"):  # copied, not re-drawn
        assert torch.equal(sd[f"model.layers.0.self_attn.{name}"], teacher[f"model.layers.0.self_attn.{name}"])
    assert torch.equal(sd["model.layers.0.self_attn.A_log"], torch.zeros(2))  # new: the model's own init
    assert 0.01 < sd["model.layers.0.self_attn.a_proj.weight"].std().item() < 0.03

    hf = load_hf(export(out, tmp_path / "export"))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), ours(ids, return_logits=True).logits, rtol=0, atol=1e-4)
