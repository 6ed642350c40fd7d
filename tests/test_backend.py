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
