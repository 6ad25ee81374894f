"""The op registry: selection by priority/availability/acceptance, SBTRAIN_OPS forcing, platform probe."""

import pytest
import torch

from operators import ops
from operators.platform import communication_backend, detect_platform
from operators.registry import Backend, Op


def _ref(x):
    return x + 1


@pytest.fixture
def op():
    o = Op("toy", _ref)
    o.register(Backend("fast", lambda x: x + 1, priority=10, accepts=lambda x: None if x.dtype == torch.float32 else "fp32 only"))
    o.register(Backend("broken", lambda x: x, priority=20, is_available=lambda: (_ for _ in ()).throw(ImportError("no lib"))))
    o.register(Backend("gpu", lambda x: x, priority=30, platforms=("cuda",)))
    return o


def test_highest_priority_available_accepting_backend_wins(op):
    assert op.select(torch.zeros(2)).name == "fast"  # broken unavailable, gpu wrong platform


def test_declined_call_falls_back_to_reference(op):
    assert op.select(torch.zeros(2, dtype=torch.float64)).name == "reference"
    assert op(torch.zeros(2, dtype=torch.float64)).tolist() == [1.0, 1.0]


def test_forced_backend_is_used(op, monkeypatch):
    monkeypatch.setenv("SBTRAIN_OPS", "toy:reference, other:x")
    assert op.select(torch.zeros(2)).name == "reference"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("toy:nosuch", "has no such backend; known: broken, fast, gpu, reference"),
        ("toy:broken", "not available on platform 'cpu'"),
        ("toy:gpu", "not available on platform 'cpu'"),
        ("toy", "must look like op:backend"),
    ],
)
def test_forcing_an_unusable_backend_is_an_error_not_a_fallback(op, monkeypatch, spec, message):
    monkeypatch.setenv("SBTRAIN_OPS", spec)
    with pytest.raises((ValueError, RuntimeError), match=message):
        op.select(torch.zeros(2))


def test_forced_backend_that_declines_names_the_reason(op, monkeypatch):
    monkeypatch.setenv("SBTRAIN_OPS", "toy:fast")
    with pytest.raises(RuntimeError, match="declines this call: fp32 only"):
        op(torch.zeros(2, dtype=torch.float64))


def test_choice_is_logged_once(op, caplog):
    caplog.set_level("INFO", logger="sbtrain.operators")
    op(torch.zeros(2))
    op(torch.zeros(3))
    assert [r.getMessage() for r in caplog.records].count("op toy on cpu -> backend fast") == 1


def test_every_op_has_a_reference_and_a_cpu_choice():
    from operators.registry import OPS

    assert {"gla", "gla_step", "attention", "rms_norm", "swiglu", "rotary", "grouped_mm", "linear_cross_entropy"} <= set(OPS)
    for op_ in OPS.values():
        assert "reference" in op_.available_backends("cpu")


def test_platform_probe_and_override(monkeypatch):
    detect_platform.cache_clear()
    try:
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        if expected == "cuda" and "metax" in torch.__version__.lower():
            expected = "maca"
        assert detect_platform() == expected
        for name in ("cpu", "cuda", "maca"):
            detect_platform.cache_clear()
            monkeypatch.setenv("SBTRAIN_PLATFORM", name)
            assert detect_platform() == name
        assert communication_backend("cpu") == "gloo"
        assert communication_backend("maca") == "nccl"
        detect_platform.cache_clear()
        monkeypatch.setenv("SBTRAIN_PLATFORM", "tpu")
        with pytest.raises(ValueError, match="SBTRAIN_PLATFORM='tpu' is not a platform; use one of cpu, cuda, maca"):
            detect_platform()
    finally:
        detect_platform.cache_clear()


def test_ops_module_exposes_ops():
    assert isinstance(ops.gla, Op) and ops.gla.reference is not None
