"""Shared parity tolerances (spec section 9) and comparison helpers for the tests."""

from __future__ import annotations

import torch

# ||out - ref|| / ||ref||, fast path vs reference on the same inputs and weights.
TOLERANCES = {
    "fp32_elementwise": 1e-5,  # pure elementwise / reduction kernels
    "fp32_gemm": 1e-4,  # anything that goes through a matmul
    "bf16": 2e-2,  # bfloat16 paths
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error in float64; NaN anywhere gives inf so it never passes."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    denom = ref.norm()
    if denom == 0:
        raise AssertionError("reference is all zeros: parity on zeros proves nothing")
    return float((out - ref).norm() / denom)


def assert_close(out: torch.Tensor, ref: torch.Tensor, kind: str, what: str = "output") -> None:
    tol = TOLERANCES[kind]
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({kind})"


def assert_low_precision(
    out: torch.Tensor, ref_low: torch.Tensor, ref_fp32: torch.Tensor, what: str = "output"
) -> None:
    """A low-precision path may be off the float32 reference by the bf16 tolerance, or by at
    most twice the same-dtype reference's own error where that is larger."""
    err = rel_err(out, ref_fp32)
    own = rel_err(ref_low, ref_fp32)
    bound = max(TOLERANCES["bf16"], 2 * own)
    assert err <= bound, f"{what}: bf16 error {err:.3e} > {bound:.3e} (reference's own: {own:.3e})"


def assert_grads_close(grads: dict, ref_grads: dict, kind: str) -> None:
    """Compare named gradients. A gradient that is zero in exact arithmetic (e.g. of an
    attention key bias, to which softmax is invariant) is only rounding noise in both; those
    whose reference norm is below 1e-6 of the largest are compared in absolute terms."""
    assert grads.keys() == ref_grads.keys() and grads, "different or no gradients"
    scale = max(float(g.detach().double().norm()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        if float(ref.detach().double().norm()) < 1e-6 * scale:
            diff = float((grads[name].detach().double() - ref.detach().double()).norm())
            assert diff <= TOLERANCES[kind] * scale, f"grad {name}: |diff| {diff:.3e} (numerically zero)"
        else:
            assert_close(grads[name], ref, kind, f"grad {name}")
