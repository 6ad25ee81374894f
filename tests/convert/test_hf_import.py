"""``convert_hf`` against HF Transformers: a conversion whose layers all become SWA with a
window >= T is exact (logits within 1e-4 fp32) for Qwen2 (q/k/v bias) and Llama (no bias), from
single-file and sharded folders, untied and tied embeddings; Mistral's own sliding window is carried over with the W = HF - 1
convention (and HF's value itself would be caught). sb76b: upcycled experts, random routers,
reused projections, loads with ``load_into``; the CLI writes the same thing."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from sbtrain.convert import ConvertConfig, UpcycleConfig, convert_hf
from sbtrain.convert.upcycle import upcycle_factors
from sbtrain.models.weights import weight_files
from tests.convert.helpers import hf_model, load_converted, save_hf
from tests.operators.conformance import rel_rms_error

T = 12


def logits_diff(ours, hf, ids) -> float:
    with torch.no_grad():
        return (ours(ids, return_logits=True).logits - hf(input_ids=ids).logits.float()).abs().max().item()


@pytest.mark.parametrize("model_type, shard, tie", [("qwen2", None, False), ("qwen2", "20KB", False),
                                                    ("llama", "20KB", False), ("llama", None, True)])
def test_all_swa_conversion_reproduces_hf_logits(tmp_path, model_type, shard, tie):
    hf = hf_model(model_type, tie=tie)
    src = save_hf(hf, tmp_path / "hf", shard=shard)
    assert (src / "model.safetensors.index.json").is_file() == (shard is not None)
    out = convert_hf(ConvertConfig(from_hf=str(src), target="sb7b", out=str(tmp_path / "out"),
                                   layer_pattern=["swa"], window=64))
    ours = load_converted(out)
    assert ours.config.layer_types() == ["swa", "swa"] and ours.config.sliding_window == 64
    assert ours.config.attention_bias == (model_type == "qwen2") and ours.config.tie_embeddings == tie
    ids = torch.randint(0, 96, (2, T))
    assert logits_diff(ours, hf, ids) < 1e-4
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["generation_config.json", "tokenizer.json",
                                                                     "tokenizer_config.json"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source_model_type"] == model_type and len(provenance["source_config_sha256"]) == 64
    assert provenance["mapping"]["tensors"] == {"copy": len(weight_files(out))}


def test_mistral_window_is_hf_minus_one(tmp_path):
    hf = hf_model("mistral", sliding_window=5)  # HF: 5 tokens including the current one
    src = save_hf(hf, tmp_path / "hf")
    ids = torch.randint(0, 96, (2, T))
    out = convert_hf(ConvertConfig(from_hf=str(src), out=str(tmp_path / "out"), layer_pattern=["swa"]))
    ours = load_converted(out)
    assert ours.config.sliding_window == 4
    assert json.loads((out / "provenance.json").read_text())["window_from"] == "source's sliding_window - 1"
    assert logits_diff(ours, hf, ids) < 1e-4
    # HF's number taken as ours (off by one) is caught: the window matters at this length.
    wrong = load_converted(convert_hf(ConvertConfig(from_hf=str(src), out=str(tmp_path / "w"), layer_pattern=["swa"],
                                                    window=5)))
    assert logits_diff(wrong, hf, ids) > 1e-3


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("model_type, layout, extra", [("qwen2", "rope_parameters", {}), ("llama", "rope_scaling", {}),
                                                       ("llama", "rope_parameters", {"mscale": 1.0, "mscale_all_dim": 0.5})])
def test_yarn_source_converts_with_its_scaling(tmp_path, model_type, layout, extra):
    """A YaRN source (Qwen2.5's documented 128k setting) becomes model.rope_yarn; logits match HF's
    for both config layouts (v5 rope_parameters, and the older rope_scaling + top-level rope_theta)
    at positions past the original length, and differ without the scaling."""
    hf = hf_model(model_type, rope={**YARN, **extra})  # extra: DeepSeek's mscale form of the attention factor
    src = save_hf(hf, tmp_path / "hf")
    if layout == "rope_scaling":
        config = json.loads((src / "config.json").read_text())
        config.pop("rope_parameters")
        config.update(rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 64})
        (src / "config.json").write_text(json.dumps(config))
    out = convert_hf(ConvertConfig(from_hf=str(src), target="sb7b", out=str(tmp_path / "out"),
                                   layer_pattern=["swa"], window=128))
    ours = load_converted(out)
    yarn = ours.config.rope_yarn
    assert (yarn.factor, yarn.original_max_position, yarn.beta_fast, yarn.beta_slow) == (4.0, 64, 32.0, 1.0)
    ids = torch.randint(0, 96, (1, 100))
    assert logits_diff(ours, hf, ids) < 1e-4
    plain = load_converted(convert_hf(ConvertConfig(from_hf=str(save_hf(hf_model(model_type), tmp_path / "p")),
                                                    out=str(tmp_path / "po"), layer_pattern=["swa"], window=128)))
    assert logits_diff(plain, hf, ids) > 1e-2


def closed_form_linear_attention(q, k, v, log_decay):
    """float64, written out: ``o_t = scale * sum_{s<=t} sum_i q_t,i k_s,i prod_{s<r<=t} exp(g_r,i) v_s``
    per query head (its KV head is ``h // (Hq / Hkv)``), scale = 1/sqrt(D); q, k already through
    the feature map. With ``g = 0`` (no forgetting) this is ``sum_{s<=t} (q_t . k_s) v_s * scale``."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    cum = log_decay.cumsum(0)  # [T, Hkv, D]
    out = torch.zeros(T, Hq, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        for s in range(t + 1):
            decay = (cum[t] - cum[s]).exp()  # prod over s < r <= t
            for h in range(Hq):
                kv = h // group
                out[t, h] += (q[t, h] * k[s, kv] * decay[kv]).sum() * v[s, kv]
    return out * D**-0.5


def rms_norm64(x, weight, eps):
    return x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * weight.double()


def linear64(x, layer, prefix=""):
    proj = {n: getattr(layer, f"{prefix}{n}_proj") for n in "qkvo"}
    out = []
    for n in "qkv":
        w, b = proj[n].weight.double(), proj[n].bias
        out.append(x @ w.t() + (0 if b is None else b.double()))
    return out, proj["o"].weight.double()


def mixer_io(model, index, ids):
    """Input and output of layer ``index``'s mixer in a forward of ``ids`` (batch 1), whose
    logits must be finite."""
    seen = {}
    hook = model.model.layers[index].self_attn.register_forward_hook(
        lambda module, args, output: seen.update(x=args[0].detach(), y=output.detach())
    )
    try:
        with torch.no_grad():
            assert torch.isfinite(model(ids, return_logits=True).logits).all()
    finally:
        hook.remove()
    return seen["x"][0].double(), seen["y"][0].double()


def gla_layer64(layer, x, cfg):
    """A converted GLA mixer in float64 from its weights: relu feature maps, decay
    ``g = logsigmoid(gk_proj(x)) / gate_normalizer``, per-head g_norm, o_proj."""
    T, hd = x.shape[0], cfg.resolved_head_dim
    (q, k, v), wo = linear64(x, layer)
    q, k, v = q.view(T, -1, hd).relu(), k.view(T, -1, hd).relu(), v.view(T, -1, hd)
    w0, w1, b1 = layer.gk_proj[0].weight.double(), layer.gk_proj[1].weight.double(), layer.gk_proj[1].bias.double()
    g = torch.nn.functional.logsigmoid(x @ w0.t() @ w1.t() + b1).view(T, -1, hd) / cfg.gla.gate_normalizer
    o = rms_norm64(closed_form_linear_attention(q, k, v, g), layer.g_norm.weight, cfg.rms_norm_eps)
    return o.flatten(1) @ wo.t()


def test_sb7b_default_pattern_gates_are_new_and_small(tmp_path):
    src = save_hf(hf_model("qwen2"), tmp_path / "hf")
    out = convert_hf(ConvertConfig(from_hf=str(src), target="sb7b", out=str(tmp_path / "out")))
    ours = load_converted(out)
    assert ours.config.layer_types() == ["gla", "swa"] and ours.config.sliding_window == 4096
    sd = ours.state_dict()
    gate = sd["model.layers.0.self_attn.gk_proj.0.weight"]
    assert 0.01 < gate.std().item() < 0.03  # init_std 0.02
    assert torch.equal(sd["model.layers.0.self_attn.gk_proj.1.bias"], torch.zeros(16))
    assert torch.equal(sd["model.layers.0.self_attn.g_norm.weight"], torch.ones(8))
    # The converted GLA layer is the documented recurrence: its output equals the closed form in
    # float64, with the converted gate (mild decay, ~exp(-0.04) per step) and with the gate fixed
    # at zero decay (g = 0, no forgetting: o_t = sum_{s<=t} (relu(q_t) . relu(k_s)) v_s * scale).
    # Relative RMS error of the fp32 model, measured: 2.2e-7 both ways (bound 1e-6).
    gen = torch.Generator().manual_seed(0)
    layer, ids = ours.model.layers[0].self_attn, torch.randint(0, 96, (1, T), generator=gen)
    x, y = mixer_io(ours, 0, ids)
    error = rel_rms_error(y, gla_layer64(layer, x, ours.config))
    assert error < 1e-6, f"GLA mixer vs float64 closed form: relative RMS error {error:.2e}"
    with torch.no_grad():
        layer.gk_proj[1].bias.fill_(1e4)  # logsigmoid(1e4) = 0: every decay exactly 1
        layer.g_norm.weight.copy_(1 + 0.1 * torch.randn(8, generator=gen))  # a non-trivial output norm
    x, y = mixer_io(ours, 0, ids)
    gate = x @ layer.gk_proj[0].weight.double().t() @ layer.gk_proj[1].weight.double().t() + 1e4
    assert torch.all(torch.nn.functional.logsigmoid(gate.float()) == 0)
    error = rel_rms_error(y, gla_layer64(layer, x, ours.config))
    assert error < 1e-6, f"GLA mixer vs float64 closed form: relative RMS error {error:.2e}"


@pytest.mark.parametrize("scale", ["report", "exact"])
def test_sb76b_upcycled_experts_router_and_reused_projections(tmp_path, scale):
    src = save_hf(hf_model("qwen2", num_layers=4), tmp_path / "hf", shard="30KB")
    cfg = ConvertConfig(from_hf=str(src), target="sb76b", out=str(tmp_path / "out"), num_sink_tokens=4,
                        share_branch_projections=False,
                        upcycle=UpcycleConfig(scale=scale, num_experts=4, top_k=1, num_shared_experts=1))
    out = convert_hf(cfg)
    ours = load_converted(out)
    c = ours.config
    # sb76b keeps 0,1,2 dense (its 4,6,... do not exist here); full attention every 7th counted from the last.
    assert [c.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert c.layer_types() == ["hybrid_swa", "hybrid_swa", "hybrid_swa", "hybrid_full"]
    hf_sd = {k: v for k, v in hf_model("qwen2", num_layers=4).state_dict().items()}
    sd = ours.state_dict()
    f = upcycle_factors(scale, 4, 1, 1)
    if scale == "report":
        assert abs(f["alpha"] - 1.25 ** (-1 / 3)) < 1e-12  # (S + k/N)^(-1/3), S=1, k=1, N=4
    for which in ("gate", "up", "down"):
        dense = hf_sd[f"model.layers.3.mlp.{which}_proj.weight"]
        experts = sd[f"model.layers.3.mlp.experts.{which}_proj"]
        assert experts.shape == (4, *dense.t().shape)
        for e in range(4):
            torch.testing.assert_close(experts[e], f[which] * dense.t(), rtol=1e-6, atol=0)
        torch.testing.assert_close(sd[f"model.layers.3.mlp.shared_expert.{which}_proj.weight"], f[which] * dense,
                                   rtol=1e-6, atol=0)
        assert torch.equal(sd[f"model.layers.2.mlp.{which}_proj.weight"], hf_sd[f"model.layers.2.mlp.{which}_proj.weight"])
    if scale == "exact":
        assert f["gate"] == 1.0 and abs(f["up"] * f["down"] - 0.8) < 1e-12
    router = sd["model.layers.3.mlp.router.weight"]
    assert router.shape == (4, 32) and 0.01 < router.std().item() < 0.03
    for proj in ("q", "k", "v", "o"):
        ref = hf_sd[f"model.layers.1.self_attn.{proj}_proj.weight"]
        assert torch.equal(sd[f"model.layers.1.self_attn.{proj}_proj.weight"], ref)
        assert torch.equal(sd[f"model.layers.1.self_attn.linear_{proj}_proj.weight"], ref)
    assert sd["model.layers.0.self_attn.sink_k"].shape == (4, 2, 8)
    assert torch.equal(sd["model.layers.0.self_attn.beta_attn"], torch.full((32,), 0.5))
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["upcycle"]["scale"] == scale and provenance["mapping"]["tensors"]["upcycle"] == 6
    # The linear branch of a converted hybrid layer is the documented key-tied recurrence:
    # k = sigmoid(k_pre), q = sigmoid(q_pre), decay alpha = 1 - k (g = log(1 - k)), on the reused
    # linear_q/k/v projections, then linear_norm, beta_linear and linear_o_proj averaged with the
    # softmax branch's o_proj. With beta_attn = 0 the softmax branch drops out (its o_proj has no
    # bias), and the mixer's output equals the closed form in float64 (relative RMS error of the
    # fp32 model, measured: 1.3e-7; bound 1e-6).
    layer, hd, gen = ours.model.layers[1].self_attn, c.resolved_head_dim, torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.beta_attn.zero_()
        layer.beta_linear.copy_(0.5 + 0.1 * torch.randn(32, generator=gen))
        layer.linear_norm.weight.copy_(1 + 0.1 * torch.randn(hd, generator=gen))
    x, y = mixer_io(ours, 1, torch.randint(0, 96, (1, T), generator=gen))
    (q_pre, k_pre, v), wo = linear64(x, layer, prefix="linear_")
    q, k, v = q_pre.view(T, -1, hd).sigmoid(), k_pre.view(T, -1, hd).sigmoid(), v.view(T, -1, hd)
    lin = rms_norm64(closed_form_linear_attention(q, k, v, torch.log1p(-k)), layer.linear_norm.weight, c.rms_norm_eps)
    want = 0.5 * ((layer.beta_linear.double() * lin.flatten(1)) @ wo.t())
    error = rel_rms_error(y, want)
    assert error < 1e-6, f"hybrid linear branch vs float64 closed form: relative RMS error {error:.2e}"


def test_cli_writes_the_conversion(tmp_path, capsys):
    from sbtrain.cli import convert as cli
    from sbtrain.cli.app import run_app

    src = save_hf(hf_model("llama"), tmp_path / "hf")
    out = tmp_path / "out"
    run_app(cli.task, "convert", [f"from_hf={src}", "target=sb7b", f"out={out}", "layer_pattern=[gla,swa]",
                                  "window=8"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["out"] == str(out) and line["window"] == 8 and line["layer_types"] == ["gla", "swa"]
    assert load_converted(out).config.sliding_window == 8
    with pytest.raises(SystemExit) as exc:  # a typo in a key is an error naming the key
        run_app(cli.task, "convert", [f"from_hf={src}", f"out={out}", "windw=8"])
    assert exc.value.code == 2 and "window" in capsys.readouterr().err
