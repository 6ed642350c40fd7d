"""Backend resolution: explicit choices, the environment override, clear failures."""

import pytest
import torch

from lewm_fast import backend


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve("auto", torch.randn(3), "op") == "torch"
    assert backend.resolve(None, torch.randn(3), "op", supported=("cuda", "triton", "torch")) == "torch"


def test_forced_torch_always_runs():
    assert backend.resolve("torch", torch.randn(3), "op") == "torch"


def test_forced_triton_on_cpu(monkeypatch):
    if not backend.triton_importable():
        with pytest.raises(backend.BackendUnavailableError, match="triton is not installed"):
            backend.resolve("triton", torch.randn(3), "op")
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backend.BackendUnavailableError, match="need CUDA"):
        backend.resolve("triton", torch.randn(3), "sigreg")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve("triton", torch.randn(3), "sigreg") == "triton"


def test_forced_backend_the_op_lacks():
    with pytest.raises(backend.BackendUnavailableError, match="has no 'cuda' backend"):
        backend.resolve("cuda", torch.randn(3), "sigreg", supported=("triton", "torch"))


def test_cuda_backend_reason_is_reported():
    with pytest.raises(backend.BackendUnavailableError, match="extension failed to build"):
        backend.resolve(
            "cuda",
            torch.randn(3),
            "refit",
            supported=("cuda", "torch"),
            cuda_unavailable_reason=lambda t: "extension failed to build",
        )


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.requested("auto") == "torch"
    assert backend.requested("triton") == "triton"  # an explicit choice wins
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="LEWM_FAST_BACKEND must be one of"):
        backend.requested("auto")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve("numba", torch.randn(3), "op")


def test_interpreter_scalar_index_patch():
    """Triton < 3.8 interpreters read scalars with int(array of shape (1,)), an error under
    NumPy >= 2.4; the patch reads one-element arrays with .item() and still refuses blocks."""
    import numpy as np

    from lewm_fast.kernels import _interpreter

    class Handle:
        def __init__(self, data):
            self.data = data

    class Scalar:
        def __init__(self, data):
            self.handle = Handle(data)

    assert _interpreter._scalar_index(Scalar(np.array([7], dtype=np.int32))) == 7
    assert _interpreter._scalar_index(Scalar(np.array(3))) == 3
    with pytest.raises(TypeError):
        _interpreter._scalar_index(Scalar(np.arange(4)))
    pytest.importorskip("triton")
    assert _interpreter.patch_scalar_index() and _interpreter.patch_scalar_index()  # idempotent


# ------------------------------------------------------------------ TF32 switches


class _Legacy:
    """torch < 2.9: only the ``allow_tf32`` flags."""

    def __init__(self, allow_tf32):
        self.allow_tf32 = allow_tf32


class _Precision:
    """torch >= 2.9: ``fp32_precision`` ("none" resolves through ``parent``); reading the legacy
    flag after a precision was set raises, as on torch 2.13."""

    def __init__(self, raw, parent="none"):
        self.raw, self.parent, self.touched = raw, parent, False

    @property
    def fp32_precision(self):
        return self.parent if self.raw == "none" else self.raw

    @fp32_precision.setter
    def fp32_precision(self, value):
        assert value in ("none", "ieee", "tf32")
        self.raw, self.touched = value, True

    @property
    def allow_tf32(self):
        if self.touched:
            raise RuntimeError("you have used a mix of the legacy and new APIs to set the TF32 flags")
        return self.fp32_precision == "tf32"


def _fake_backends(monkeypatch, matmul, cudnn):
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)


def test_tf32_with_the_legacy_flags(monkeypatch):
    matmul, cudnn = _Legacy(False), _Legacy(True)  # torch's defaults; no cudnn.conv
    _fake_backends(monkeypatch, matmul, cudnn)
    assert backend.tf32_state() == {"matmul": False, "conv": True}
    with backend.tf32(False):
        assert backend.tf32_state() == {"matmul": False, "conv": False}
        assert cudnn.allow_tf32 is False
    assert backend.tf32_state() == {"matmul": False, "conv": True}
    previous = backend.set_tf32(matmul=True)
    assert previous == {"matmul": False, "conv": True} and matmul.allow_tf32 is True and cudnn.allow_tf32
    backend.set_tf32(**previous)
    assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)


def test_tf32_with_fp32_precision_never_reads_the_legacy_flags(monkeypatch):
    matmul, conv = _Precision("none"), _Precision("tf32")  # torch 2.13's defaults
    cudnn = type("Cudnn", (), {"conv": conv, "allow_tf32": property(lambda self: 1 / 0)})()
    _fake_backends(monkeypatch, matmul, cudnn)
    assert backend.tf32_state() == {"matmul": False, "conv": True}
    with backend.tf32(True):
        assert backend.tf32_state() == {"matmul": True, "conv": True}
        assert matmul.raw == "tf32"
    assert (matmul.raw, conv.raw) == ("none", "tf32")  # inherited stays inherited
    with pytest.raises(RuntimeError, match="boom"), backend.tf32(False):
        assert backend.tf32_state() == {"matmul": False, "conv": False}
        assert (matmul.raw, conv.raw) == ("none", "none")  # "none" at every level means IEEE
        raise RuntimeError("boom")
    assert backend.tf32_state() == {"matmul": False, "conv": True}
    assert (matmul.raw, conv.raw) == ("none", "tf32")
    with pytest.raises(RuntimeError, match="mix"):
        conv.allow_tf32  # noqa: B018 (the fake is faithful: legacy reads raise once touched)


def test_tf32_follows_an_inherited_precision(monkeypatch):
    """A global ``torch.backends.fp32_precision = "tf32"`` reaches matmul through "none";
    forbidding TF32 pins "ieee" and the restore returns to inheriting."""
    matmul, conv = _Precision("none", parent="tf32"), _Precision("none", parent="tf32")
    _fake_backends(monkeypatch, matmul, type("Cudnn", (), {"conv": conv})())
    assert backend.tf32_state() == {"matmul": True, "conv": True}
    with backend.tf32(False):
        assert (matmul.raw, conv.raw) == ("ieee", "ieee")
    assert (matmul.raw, conv.raw) == ("none", "none")


def test_tf32_round_trips_on_the_installed_torch():
    """Whichever API this torch has: set, read back, restore; after it, TF32 state still reads."""
    before = backend.tf32_state()
    for enabled in (True, False):
        with backend.tf32(enabled):
            assert backend.tf32_state() == {"matmul": enabled, "conv": enabled}
        assert backend.tf32_state() == before
    previous = backend.set_tf32(conv=not before["conv"])
    assert previous == before and backend.tf32_state() == {**before, "conv": not before["conv"]}
    backend.set_tf32(**previous)
    assert backend.tf32_state() == before
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        assert torch.backends.cuda.matmul.fp32_precision == "none"  # torch's default, untouched
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"


# ------------------------------------------------------------------ attention backends

ENCODER = (3, 257, 64)  # the paper encoder's attention: heads, tokens, head_dim

# (device, dtype, shape, capability, torch's own pick, expected backend)
SDPA_RULES = [
    pytest.param("cuda", torch.bfloat16, ENCODER, (9, 0), "flash", "flash", id="sm90-bf16"),
    pytest.param("cuda", torch.bfloat16, ENCODER, (9, 0), "cudnn", "cudnn", id="sm90-torch-cudnn"),
    pytest.param("cuda", torch.float16, ENCODER, (8, 6), "flash", "flash", id="sm86-fp16"),
    pytest.param("cuda", torch.float32, ENCODER, (8, 9), "efficient", "efficient", id="sm89-fp32"),
    pytest.param("cuda", torch.bfloat16, ENCODER, (7, 5), "math", "math", id="sm75-bf16"),
    pytest.param("cuda", torch.float16, ENCODER, (7, 5), "efficient", "efficient", id="sm75-fp16"),
    pytest.param("cuda", torch.bfloat16, (3, 257, 320), (9, 0), "math", "efficient", id="head-dim-320"),
    pytest.param("cuda", torch.float16, (3, 257, 62), (8, 0), "math", "math", id="head-dim-62"),
    pytest.param("cpu", torch.float32, ENCODER, None, None, "flash", id="cpu-fp32"),
]


@pytest.mark.parametrize("device,dtype,shape,capability,default,expected", SDPA_RULES)
def test_sdpa_choice_rules(device, dtype, shape, capability, default, expected):
    """The documented rules of backend.choose_sdpa, with the device's capability and torch's
    own pick injected (no GPU needed); the reason names what decided."""
    choice = backend.choose_sdpa(device, dtype, shape, capability=capability, torch_default=default)
    assert choice.backend == expected
    assert choice.reason and choice.to_dict() == {"sdpa_backend": expected, "sdpa_reason": choice.reason}


def test_sdpa_choice_is_checked_against_what_torch_runs(monkeypatch):
    """Without injected facts the choice is checked on the device: torch's flash kernel on the
    CPU for the encoder; where torch would run something else, that is what is recorded."""
    assert backend.choose_sdpa("cpu", torch.float32, ENCODER).backend == "flash"
    monkeypatch.setattr(backend, "_torch_pick", lambda device, dtype, shape: "math")
    choice = backend.choose_sdpa("cpu", torch.float32, ENCODER)
    assert choice.backend == "math" and "cannot run flash" in choice.reason


def test_sdpa_context_keeps_the_math_fallback():
    """Under the encoder's backend, attention that backend cannot run (dropout on the CPU, as
    in the predictor) still runs, on the math kernel; None changes nothing; bad names raise."""
    q = torch.randn(2, 3, 5, 8)
    with backend.sdpa_context("flash"):
        assert torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5).shape == q.shape
        if hasattr(torch, "_fused_sdp_choice"):
            assert backend._sdpa_name(torch._fused_sdp_choice(q, q, q)) == "flash"
            assert backend._sdpa_name(torch._fused_sdp_choice(q, q, q, dropout_p=0.5)) == "math"
    with backend.sdpa_context(None):
        pass
    with pytest.raises(ValueError, match="SDPA backend"):
        backend.sdpa_context("flash3")
    with pytest.raises(ValueError, match="heads, length, head_dim"):
        backend.choose_sdpa("cpu", torch.float32, (3, 257))
