"""The MetaX (MACA) platform of operators/, exercised on a CPU box.

The probe is fed fake process states; the backend walk is asked with the platform, the device
type and each backend's availability as inputs; the MetaX tuning table is checked against fake
Triton autotuners; the recipe's override table is installed through the config schema.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from operators import maca, ops, registry
from operators.platform import communication_backend, detect_platform, probe_platform
from operators.registry import Backend, Op, select_backend
from sbtrain.config.model import ConfigError
from sbtrain.config.operators import FlaTuningConfig, MacaConfig, OperatorsConfig, OverridesConfig


@pytest.fixture
def maca_process(monkeypatch):
    """This process believes it runs on MACA (the probe is cached: cleared before and after)."""
    detect_platform.cache_clear()
    monkeypatch.setenv("SBTRAIN_PLATFORM", "maca")
    monkeypatch.delenv("SBTRAIN_OPS", raising=False)
    yield
    detect_platform.cache_clear()


@pytest.fixture
def restore_tables():
    """Put back the process-wide override and tuning tables whatever the test installs."""
    overrides, tuning = registry.get_overrides(), {op: dict(k) for op, k in maca._user_tuning.items()}
    yield
    registry.set_overrides(overrides)
    maca.set_tuning(tuning)


# ---- platform probe and communicator --------------------------------------------------------

def _name(text):
    return lambda: text


@pytest.mark.parametrize(
    "version, env, device, expected, why",
    [
        ("2.8.0+metax2.33.0.4", {}, "", "maca", "torch version '2.8.0+metax2.33.0.4' contains 'metax'"),
        ("2.4.0+maca", {}, "", "maca", "contains 'maca'"),
        ("2.6.0", {"MACA_PATH": "/opt/maca"}, "", "maca", "MACA_PATH=/opt/maca is set"),
        ("2.6.0", {"MACA_HOME": "/opt/maca"}, "", "maca", "MACA_HOME=/opt/maca is set"),
        ("2.6.0", {}, "MetaX C500", "maca", "device name 'MetaX C500' contains 'metax'"),
        ("2.6.0", {}, "NVIDIA H100 80GB HBM3", "cuda", "without MetaX clues"),
    ],
)
def test_probe_tells_maca_from_cuda(version, env, device, expected, why):
    platform, reason = probe_platform(torch_version=version, cuda_available=True, env=env, device_name=_name(device))
    assert platform == expected and why in reason


def test_probe_without_a_device_is_cpu_and_the_override_wins():
    assert probe_platform(torch_version="2.8.0+metax", cuda_available=False, env={}, device_name=_name(""))[0] == "cpu"
    forced = probe_platform(torch_version="2.6.0+cpu", cuda_available=False, env={"SBTRAIN_PLATFORM": " MACA "})
    assert forced == ("maca", "SBTRAIN_PLATFORM=maca")
    with pytest.raises(ValueError, match="SBTRAIN_PLATFORM='metax' is not a platform; use one of cpu, cuda, maca"):
        probe_platform(torch_version="2.6.0", cuda_available=True, env={"SBTRAIN_PLATFORM": "metax"})


def test_detect_platform_honours_sbtrain_platform_and_picks_the_communicator(maca_process):
    assert detect_platform() == "maca"
    assert communication_backend() == "nccl"  # MACA's torch routes nccl to MCCL
    assert communication_backend("maca") == "nccl"
    assert communication_backend("maca", device_type="cpu") == "gloo"  # CPU tensors: gloo on any box
    assert communication_backend("cpu") == "gloo" and communication_backend("cuda") == "nccl"
    with pytest.raises(ValueError, match="platform 'rocm' is unknown"):
        communication_backend("rocm")


# ---- the walk: maca -> cuda-alike -> reference, with reasons --------------------------------

@pytest.fixture
def toy():
    op = Op("toy_maca", lambda x: x + 1)
    op.register(Backend("mx", lambda x: x + 1, priority=5, platforms=("maca",)))
    op.register(Backend("cu", lambda x: x + 1, priority=40, platforms=("cuda",),
                        accepts=lambda x: None if x.dtype == torch.float32 else f"dtype {x.dtype} unsupported"))
    op.register(Backend("cpu_fast", lambda x: x + 1, priority=50, platforms=("cpu",)))
    return op


def test_maca_walks_its_own_backends_before_the_cuda_alike_ones(toy):
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    # mx has the lowest priority but the MetaX tier comes first.
    assert select_backend(toy, platform="maca", device_type="cuda", available={"mx": True}, args=(x32,)).backend.name == "mx"
    # MetaX backend missing: the cuda-alike one takes the call.
    sel = select_backend(toy, platform="maca", device_type="cuda", available={"mx": "mxlib not importable"}, args=(x32,))
    assert sel.backend.name == "cu" and sel.skipped == [("mx", "mxlib not importable")]
    # ... and when it declines too, the reference; cpu_fast is never considered for a device call.
    sel = select_backend(toy, platform="maca", device_type="cuda", available={"mx": False}, args=(x64,))
    assert sel.backend.name == "reference"
    assert sel.skipped == [("mx", "marked unavailable"), ("cu", "dtype torch.float64 unsupported")]
    # A plain CUDA process never sees the MetaX backend.
    sel = select_backend(toy, platform="cuda", device_type="cuda", args=(x64,))
    assert sel.backend.name == "reference" and [name for name, _ in sel.skipped] == ["cu"]


def test_cpu_tensors_on_a_maca_box_go_to_cpu_backends_and_say_why(toy):
    sel = select_backend(toy, platform="maca", device_type="cpu", args=(torch.zeros(2),))
    assert sel.backend.name == "cpu_fast"
    assert dict(sel.skipped) == {
        "mx": "tensor on cpu (the maca backend needs a maca device)",
        "cu": "tensor on cpu (the maca backend needs a maca device)",
    }


def test_real_gla_walk_on_maca():
    static = {"platform": "maca", "device_type": "cuda", "args": None}
    assert select_backend(ops.gla, available={"fla_maca": True}, **static).backend.name == "fla_maca"
    sel = select_backend(ops.gla, available={"fla_maca": "fla not importable"}, **static)
    assert sel.backend.name == "chunked" and sel.skipped == [("fla_maca", "fla not importable")]
    # Per call: fla declines float64 before anything else, the chunked backend takes it.
    q = torch.zeros(1, 4, 2, 16, dtype=torch.float64)
    sel = select_backend(ops.gla, platform="maca", device_type="cuda", available={"fla_maca": True}, args=(q, q, q, q))
    assert sel.backend.name == "chunked"
    assert sel.skipped == [("fla_maca", "dtype float64 unsupported by fla's Triton kernels")]
    # MetaX flash-attn (FA2 API) is the attention choice; gla_step's cuda fla is the cuda-alike fallback.
    assert select_backend(ops.attention, available={"flash_attn": True}, **static).backend.name == "flash_attn"
    sel = select_backend(ops.gla_step, available={"fla_maca": "fla not importable", "fla": True}, **static)
    assert sel.backend.name == "fla" and sel.skipped == [("fla_maca", "fla not importable")]


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla is installed here")
def test_the_real_probe_reports_fla_missing():
    sel = select_backend(ops.gla, platform="maca", device_type="cuda", args=None)
    assert sel.backend.name == "chunked" and sel.skipped == [("fla_maca", "fla not importable")]


def test_cpu_call_under_sbtrain_platform_maca_runs_cpu_code_and_logs_why(maca_process, caplog):
    caplog.set_level("INFO", logger="sbtrain.operators")
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 16), torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    g, state = -torch.rand(1, 1, 16), torch.randn(1, 1, 16, 16)
    ops.gla_step._logged.clear()
    out, new_state = ops.gla_step(q, k, v, g, state)
    ref_out, ref_state = ops.gla_step.reference(q, k, v, g, state)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(new_state, ref_state, rtol=0, atol=0)
    messages = [r.getMessage() for r in caplog.records]
    assert "op gla_step on cpu -> backend reference" in messages
    assert "op gla_step on cpu: skipped fla_maca: tensor on cpu (the maca backend needs a maca device)" in messages
    assert "op gla_step on cpu: skipped fla: tensor on cpu (the maca backend needs a maca device)" in messages
    qs = torch.randn(1, 8, 2, 16)
    assert ops.gla.select(qs, qs, qs, -torch.rand(1, 8, 2, 16)).name == "chunked"


# ---- the MetaX tuning table -----------------------------------------------------------------

def test_tuning_defaults_and_merge():
    merged = maca.merge_tuning({"gla": {"num_warps": 2, "block_v": None}})
    assert merged["gla"] == {**maca.DEFAULT_MACA_TUNING["gla"], "num_warps": 2}
    assert merged["gla_step"] == maca.DEFAULT_MACA_TUNING["gla_step"]
    assert maca.DEFAULT_MACA_TUNING["gla"]["num_warps"] == 4  # the table itself is untouched
    for bad, message in [
        ({"attention": {"num_warps": 2}}, "op 'attention' has no MetaX tuning; tuned ops: gla, gla_step"),
        ({"gla": {"warps": 2}}, "knob 'warps' is unknown; knobs: block_k, block_v, num_warps, num_stages"),
        ({"gla": {"block_k": 48}}, r"operators.maca.gla.block_k=48 must be a positive power of two"),
        ({"gla": {"num_warps": 0}}, "must be a positive power of two"),
    ]:
        with pytest.raises(ValueError, match=message):
            maca.merge_tuning(bad)


def _config(bk, bv, warps, stages):
    return SimpleNamespace(kwargs={"BK": bk, "BV": bv}, num_warps=warps, num_stages=stages)


def _kernel(name, configs):
    return SimpleNamespace(configs=list(configs), cache={"old": 1}, fn=SimpleNamespace(__name__=name))


def test_restrict_autotuned_keeps_configs_within_the_limits():
    nvidia = [_config(bk, bv, w, s) for bk in (32, 64) for bv in (64, 128) for w in (2, 4, 8) for s in (2, 3)]
    kernel = _kernel("chunk_gla_fwd_kernel_o", nvidia)
    limits = {"block_k": 64, "block_v": 64, "num_warps": 4, "num_stages": 2}
    report = maca.restrict_autotuned([kernel, object()], limits)
    expected = [c for c in nvidia if c.kwargs["BV"] == 64 and c.num_warps <= 4 and c.num_stages == 2]
    assert kernel.configs == expected and len(expected) == 4
    assert report == [("chunk_gla_fwd_kernel_o", 4, 24)] and kernel.cache == {}
    # A new table filters fla's original list again (it can widen as well as narrow).
    maca.restrict_autotuned([kernel], {**limits, "num_warps": 8, "block_v": 128})
    assert kernel.configs == [c for c in nvidia if c.num_stages == 2]
    # No config fits: fla's list stays.
    maca.restrict_autotuned([kernel], {**limits, "num_warps": 1})
    assert kernel.configs == nvidia


def test_apply_tuning_reaches_fla_modules(monkeypatch, restore_tables):
    fake = ModuleType("fake_fla_chunk")
    fake.kernel = _kernel("k", [_config(64, 64, w, 1) for w in (1, 2, 4, 8)])
    monkeypatch.setitem(sys.modules, "fake_fla_chunk", fake)
    monkeypatch.setitem(maca.FLA_MODULES, "gla", ("fake_fla_chunk", "fla_module_that_does_not_exist"))
    monkeypatch.setattr(maca, "_applied", {})
    maca.set_tuning({"gla": {"num_warps": 2}})
    maca._apply_tuning("gla")
    assert [c.num_warps for c in fake.kernel.configs] == [1, 2]
    maca.set_tuning({})
    maca._apply_tuning("gla")
    assert [c.num_warps for c in fake.kernel.configs] == [1, 2, 4]  # the default: 4 warps of 64 lanes


# ---- the recipe's table ---------------------------------------------------------------------

def test_recipe_override_changes_the_choice_and_env_wins(monkeypatch, restore_tables):
    monkeypatch.delenv("SBTRAIN_OPS", raising=False)
    q = torch.randn(1, 8, 2, 16)
    g = -torch.rand(1, 8, 2, 16)
    assert ops.gla.select(q, q, q, g).name == "chunked"
    OperatorsConfig(overrides={"gla": "naive"}).apply()
    assert ops.gla.select(q, q, q, g).name == "reference"
    monkeypatch.setenv("SBTRAIN_OPS", "gla:chunked")
    assert ops.gla.select(q, q, q, g).name == "chunked"
    monkeypatch.delenv("SBTRAIN_OPS")
    OperatorsConfig(overrides={"attention": "flash_attn"}).apply()  # strict: unusable here is an error
    with pytest.raises(RuntimeError, match="operators.overrides forces attention:flash_attn, which is not available"):
        ops.attention.select(q, q, q)
    OperatorsConfig().apply()
    assert ops.gla.select(q, q, q, g).name == "chunked" and registry.get_overrides() == {}


def test_bad_override_names_the_choices(restore_tables):
    OperatorsConfig(overrides={"gla": "chunked"}).apply()
    with pytest.raises(ConfigError, match="op 'gla' has no backend 'triton'; backends: chunked, fla, fla_maca, reference"):
        OperatorsConfig(overrides={"gla": "triton"}).apply()
    with pytest.raises(ConfigError, match="operators.maca.gla.num_warps=3 must be a positive power of two"):
        OperatorsConfig(overrides={"gla": "naive"}, maca=MacaConfig(gla=FlaTuningConfig(num_warps=3))).apply()
    with pytest.raises(ValueError, match="op 'glaa' is unknown; ops: attention, .*gla, gla_step,"):
        registry.set_overrides({"glaa": "chunked"})
    assert registry.get_overrides() == {"gla": "chunked"}  # a bad table installs nothing


def test_the_schema_has_one_override_field_per_registered_op(restore_tables):
    assert set(OverridesConfig().__dataclass_fields__) == set(registry.OPS)  # built from the registry
    for op in registry.OPS:
        OperatorsConfig(overrides={op: "reference"}).apply()
    with pytest.raises(ConfigError, match="op 'glaa' is unknown; ops: attention,"):
        OperatorsConfig(overrides={"glaa": "chunked"}).apply()


def test_train_schema_carries_the_operators_tables(restore_tables):
    GlobalHydra.instance().clear()
    from sbtrain.cli.app import RECIPES_DIR

    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["operators.overrides={gla: naive}", "operators.maca.gla.num_warps=2"])
        for typo in ("operators.maca.gla.num_warp=2", "operators.overrides.glaa=chunked"):
            with pytest.raises(Exception, match=typo.split("=")[0].split(".")[-1]):
                compose("train", overrides=[typo])
    GlobalHydra.instance().clear()
    operators_cfg = OmegaConf.to_object(cfg.operators)
    assert operators_cfg.maca == MacaConfig(gla=FlaTuningConfig(num_warps=2))
    operators_cfg.apply()
    assert registry.get_overrides() == {"gla": "reference"}
    assert maca.tuning("gla") == {**maca.DEFAULT_MACA_TUNING["gla"], "num_warps": 2}
