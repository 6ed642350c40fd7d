"""Parity tolerances (spec section 9) and the comparison helpers the tests and benchmarks share.

Like ``torch.testing``: a fast path is compared with ``lewm_fast.reference`` on the same
inputs and weights by the relative L2 error ``||out - ref|| / ||ref||`` (in float64),
against one table of tolerances, so a tolerance is written in one place only.

>>> import torch
>>> from lewm_fast.testing import assert_close
>>> ref = torch.randn(4, 192)
>>> err = assert_close(ref * (1 + 1e-7), ref, "fp32_elementwise")  # returns the error

NaN or inf anywhere never passes; a reference that is all zeros is an error (parity on
zeros proves nothing). Each ``assert_*`` returns the error it measured, so a caller can
report it.
"""

from __future__ import annotations

import torch

from . import _checks

__all__ = ["TOLERANCES", "rel_err", "assert_close", "assert_low_precision", "assert_grads_close"]

# ||out - ref|| / ||ref||, fast path vs reference on the same inputs and weights.
TOLERANCES = {
    "fp32_elementwise": 1e-5,  # pure elementwise / reduction kernels
    "fp32_gemm": 1e-4,  # anything that goes through a matmul
    "bf16": 2e-2,  # bfloat16 paths
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN or inf anywhere gives inf so it never passes.

    Raises AssertionError on a shape mismatch or an all-zero reference.
    """
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {_checks.shape(out)} vs {_checks.shape(ref)}")
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    denom = ref.norm()
    if denom == 0:
        raise AssertionError("reference is all zeros: parity on zeros proves nothing")
    return float((out - ref).norm() / denom)


def assert_close(out: torch.Tensor, ref: torch.Tensor, kind: str, what: str = "output") -> float:
    """Assert ``rel_err(out, ref) <= TOLERANCES[kind]``; returns the error."""
    tol = TOLERANCES[kind]
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({kind})"
    return err


def assert_low_precision(
    out: torch.Tensor, ref_low: torch.Tensor, ref_fp32: torch.Tensor, what: str = "output"
) -> float:
    """A low-precision path may be off the float32 reference by the bf16 tolerance, or by at
    most twice the same-dtype reference's own error where that is larger; returns the error
    of ``out`` against ``ref_fp32``."""
    err = rel_err(out, ref_fp32)
    own = rel_err(ref_low, ref_fp32)
    bound = max(TOLERANCES["bf16"], 2 * own)
    assert err <= bound, f"{what}: bf16 error {err:.3e} > {bound:.3e} (reference's own: {own:.3e})"
    return err


def assert_grads_close(grads: dict, ref_grads: dict, kind: str) -> float:
    """Compare named gradients; returns the largest relative error.

    A gradient that is zero in exact arithmetic (e.g. of an attention key bias, to which
    softmax is invariant) is only rounding noise in both; those whose reference norm is
    below 1e-6 of the largest are compared in absolute terms (relative to that largest norm).
    """
    assert grads.keys() == ref_grads.keys() and grads, "different or no gradients"
    scale = max(float(g.detach().double().norm()) for g in ref_grads.values())
    worst = 0.0
    for name, ref in ref_grads.items():
        if float(ref.detach().double().norm()) < 1e-6 * scale:
            diff = float((grads[name].detach().double() - ref.detach().double()).norm())
            assert diff <= TOLERANCES[kind] * scale, f"grad {name}: |diff| {diff:.3e} (numerically zero)"
            worst = max(worst, diff / scale)
        else:
            worst = max(worst, assert_close(grads[name], ref, kind, f"grad {name}"))
    return worst
