"""Fused SIGReg (spec section 3): Fourier moments of random projections.

For z (T, B, D) and directions A (D, P), x = z @ A (T, B, P) and the knots t_k = k dt:

    sums[0, t, k, p] = sum_b cos(t_k x[t, b, p])      sums[1, t, k, p] = sum_b sin(t_k x[t, b, p])
    C = sums[0] / n, S = sums[1] / n                   (n = sums[0, :, 0, :], the global batch)
    SIGReg = mean_{t,p} n * sum_k w_k ((C_k - phi_k)^2 + S_k^2)
    dSIGReg/dx = 2 / (T P) * sum_k w_k t_k (S_k cos(t_k x) - (C_k - phi_k) sin(t_k x))

Forward, one program per (t, block of P) with ``GROUPS`` warps: each warp projects its own
slab of ``BLOCK_B`` batch rows with a batched ``tl.dot`` (Triton lays the batch axis of a
3-D dot across warps), takes one sincos of dt * x and rotates it through the knots, which
are unrolled (K is a compile-time constant). At each knot the warp sums its slab over the
batch inside the warp and adds the result to that knot's accumulator, a register
(``acc_c`` / ``acc_s``: K - 1 of them per moment, knot 0 being exact: cos 0 = 1,
sin 0 = 0). The warps' accumulators meet once, after the last batch chunk, in one
cross-warp sum per knot; the program writes its (2, K, block) sums and its share of the
statistic, and ``partial.sum()`` adds the shares. Neither x nor the (T, B, P, K) tensor of
the reference reaches memory.

Backward, one program per (t, block of B, block of P): it recomputes its x tile and the
rotation, forms each knot's coefficients once from the sums (or reads them, in the
multi-process path, from d loss / d sums), and writes grad_x (T, B, P) float32 once
(2 MiB at T=4, B=128, P=1024); grad_z = grad_x @ A^T, and grad_A = z^T grad_x when A needs
a gradient, are cuBLAS matmuls (``torch.mm``), so each byte of z, A and grad_x moves once
rather than the projection being recomputed per block of D.

cos/sin at every knot come from one sincos of dt * x by rotation (angle addition); that
sincos is a quadrant reduction plus single-precision polynomials, so it needs no
libdevice call (no local-memory slow path) and gives the same bits under every Triton
version and in the interpreter.

Triton versions: the forward's per-knot accumulators are tuples of tensors carried through
the batch loop, which Triton compiles from 3.3 on (3.2's code generator keeps no tuple as a
loop variable: "NameError: acc_c is not defined"). Under Triton < 3.3
(:data:`TUPLE_ACCUMULATORS` false) the forward is the earlier ``_sigreg_fwd_loop_kernel``
instead: the knots a runtime loop over one (32, block of P) accumulator, a cross-warp sum
per knot of every batch block, the statistic divided by T P after the partial sum. It
writes the same sums, so the backward, which Triton 3.2 compiles, is the same kernel on
every version.

Everything accumulates in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import re

import torch
import triton
import triton.language as tl

from .. import _checks
from ..backend import triton_interpreter
from . import _eager
from ._interpreter import patch_scalar_index

if triton_interpreter():  # NumPy >= 2.4 with the interpreters of Triton < 3.8
    patch_scalar_index()

# Whether this Triton compiles the forward kernel's tuple accumulators (3.3 and later); read
# by the launcher at every call, so a test can force the Triton 3.2 forward.
TUPLE_ACCUMULATORS = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) >= (3, 3)

# pi / 2 split in three float32 parts (Cody-Waite) for the quadrant reduction, and the
# single-precision minimax polynomials of sin and cos on [-pi/4, pi/4] (Cephes sinf/cosf).
_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
_PIO2_A = tl.constexpr(1.5703125)
_PIO2_B = tl.constexpr(4.837512969970703125e-4)
_PIO2_C = tl.constexpr(7.54978995489188216e-8)
_S1 = tl.constexpr(-1.6666654611e-1)
_S2 = tl.constexpr(8.3321608736e-3)
_S3 = tl.constexpr(-1.9515295891e-4)
_C1 = tl.constexpr(4.166664568298827e-2)
_C2 = tl.constexpr(-1.388731625493765e-3)
_C3 = tl.constexpr(2.443315711809948e-5)


@triton.jit
def _sincos(theta):
    """(cos theta, sin theta) in float32 from polynomials: no libdevice call, no local memory,
    the same result under every Triton version and in the interpreter."""
    q = tl.floor(theta * _TWO_OVER_PI + 0.5)
    r = ((theta - q * _PIO2_A) - q * _PIO2_B) - q * _PIO2_C  # r in [-pi/4, pi/4]
    r2 = r * r
    sin_r = r + r * r2 * (_S1 + r2 * (_S2 + r2 * _S3))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (_C1 + r2 * (_C2 + r2 * _C3))
    quadrant = q.to(tl.int32) & 3
    swap = (quadrant & 1) == 1
    cos_t = tl.where(swap, sin_r, cos_r)
    sin_t = tl.where(swap, cos_r, sin_r)
    cos_t = tl.where((quadrant == 1) | (quadrant == 2), -cos_t, cos_t)
    sin_t = tl.where(quadrant >= 2, -sin_t, sin_t)
    return cos_t, sin_t


@triton.jit
def _project_tile(
    Z,
    A,
    t,
    offs_b,
    offs_p,
    mask_b,
    mask_p,
    D,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_ap,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_HALF_DOT: tl.constexpr,
):
    """x[t, offs_b, offs_p] = z[t, offs_b, :] @ A[:, offs_p], float32 (BLOCK_B, BLOCK_P)."""
    x = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        zt = tl.load(
            Z + t * stride_zt + offs_b[:, None] * stride_zb + dd[None, :] * stride_zd,
            mask=mask_b[:, None] & (dd[None, :] < D),
            other=0.0,
        )
        at = tl.load(
            A + dd[:, None] * stride_ad + offs_p[None, :] * stride_ap,
            mask=(dd[:, None] < D) & mask_p[None, :],
            other=0.0,
        )
        if UPCAST_HALF_DOT:  # the Triton interpreter mis-computes bfloat16 dots
            x += tl.dot(zt.to(tl.float32), at.to(zt.dtype).to(tl.float32), input_precision="ieee")
        else:
            x += tl.dot(zt, at.to(zt.dtype), input_precision=DOT_PRECISION)
    return x


@triton.jit
def _project_groups(
    Z,
    A,
    t,
    offs_b,
    offs_p,
    mask_b,
    mask_p,
    D,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_ap,
    GROUPS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_HALF_DOT: tl.constexpr,
):
    """x[t, offs_b[g, j], offs_p[i]] as float32 (GROUPS, BLOCK_P, BLOCK_B): a batched dot of
    the A^T tile (shared) with one (BLOCK_D, BLOCK_B) slab of z^T per group."""
    x = tl.zeros((GROUPS, BLOCK_P, BLOCK_B), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        at = tl.load(
            A + dd[None, :] * stride_ad + offs_p[:, None] * stride_ap,
            mask=mask_p[:, None] & (dd[None, :] < D),
            other=0.0,
        )
        zt = tl.load(
            Z + t * stride_zt + offs_b[:, None, :] * stride_zb + dd[None, :, None] * stride_zd,
            mask=mask_b[:, None, :] & (dd[None, :, None] < D),
            other=0.0,
        )
        at = tl.broadcast_to(at[None, :, :], (GROUPS, BLOCK_P, BLOCK_D)).to(zt.dtype)
        if UPCAST_HALF_DOT:  # the Triton interpreter mis-computes bfloat16 dots
            x += tl.dot(at.to(tl.float32), zt.to(tl.float32), input_precision="ieee")
        else:
            x += tl.dot(at, zt, input_precision=DOT_PRECISION)
    return x


@triton.jit(do_not_specialize=["T", "B"])
def _sigreg_fwd_kernel(
    Z,
    A,
    SUMS,
    PHI,
    W,
    PARTIAL,
    T,
    B,
    D,
    P,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_ap,
    dt,
    K: tl.constexpr,
    COMPUTE_STAT: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_HALF_DOT: tl.constexpr,
):
    # One program per (t, block of P), looping over the batch in chunks of GROUPS * BLOCK_B
    # rows: group g (one warp) takes rows g * BLOCK_B .. g * BLOCK_B + BLOCK_B - 1 of each.
    t = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    rows = tl.arange(0, GROUPS)[:, None] * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
    # acc_c[k - 1][g, i]: sum of cos(t_k x) over group g's rows so far, knots 1 .. K - 1
    acc_c = ()
    acc_s = ()
    for _ in tl.static_range(1, K):
        acc_c = acc_c + (tl.zeros((GROUPS, BLOCK_P), dtype=tl.float32),)
        acc_s = acc_s + (tl.zeros((GROUPS, BLOCK_P), dtype=tl.float32),)
    for b0 in range(0, B, GROUPS * BLOCK_B):
        offs_b = b0 + rows
        mask_b = offs_b < B
        x = _project_groups(
            Z,
            A,
            t,
            offs_b,
            offs_p,
            mask_b,
            mask_p,
            D,
            stride_zt,
            stride_zb,
            stride_zd,
            stride_ad,
            stride_ap,
            GROUPS,
            BLOCK_B,
            BLOCK_P,
            BLOCK_D,
            DOT_PRECISION,
            UPCAST_HALF_DOT,
        )
        c1, s1 = _sincos(x * dt)
        # rows past the batch start at (0, 0) and stay there under rotation
        c1 = tl.where(mask_b[:, None, :], c1, 0.0)
        s1 = tl.where(mask_b[:, None, :], s1, 0.0)
        c = c1
        s = s1
        next_c = ()
        next_s = ()
        for k in tl.static_range(1, K):
            if k > 1:
                c, s = c * c1 - s * s1, s * c1 + c * s1
            next_c = next_c + (acc_c[k - 1] + tl.sum(c, axis=2),)  # within the warp
            next_s = next_s + (acc_s[k - 1] + tl.sum(s, axis=2),)
        acc_c = next_c
        acc_s = next_s
    n = B * 1.0  # float32; no method call: an integer argument may be a constant
    base = SUMS + t * K * P + offs_p  # sums[0, t, 0, offs_p]
    tl.store(base, tl.zeros((BLOCK_P,), dtype=tl.float32) + n, mask=mask_p)  # cos 0 = 1 per row
    tl.store(base + T * K * P, tl.zeros((BLOCK_P,), dtype=tl.float32), mask=mask_p)
    if COMPUTE_STAT:
        phi = tl.load(PHI)
        stat = tl.zeros((BLOCK_P,), dtype=tl.float32) + tl.load(W) * (1.0 - phi) * (1.0 - phi)
    for k in tl.static_range(1, K):
        # the groups meet: one cross-warp sum of (cos, sin) per knot
        C, S = tl.split(tl.sum(tl.join(acc_c[k - 1], acc_s[k - 1]), axis=0))
        tl.store(base + k * P, C, mask=mask_p)
        tl.store(base + T * K * P + k * P, S, mask=mask_p)
        if COMPUTE_STAT:
            err = (C / n - tl.load(PHI + k)) * (C / n - tl.load(PHI + k)) + (S / n) * (S / n)
            stat += tl.load(W + k) * err
    if COMPUTE_STAT:
        share = tl.sum(tl.where(mask_p, stat, 0.0), axis=0) * (n / (T * P))
        tl.store(PARTIAL + t * tl.num_programs(1) + tl.program_id(1), share)


@triton.jit(do_not_specialize=["T", "B"])
def _sigreg_fwd_loop_kernel(
    Z,
    A,
    SUMS,
    PHI,
    W,
    PARTIAL,
    T,
    B,
    D,
    P,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_ap,
    dt,
    K,
    K_PAD: tl.constexpr,
    COMPUTE_STAT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_HALF_DOT: tl.constexpr,
):
    # The forward for Triton < 3.3 (no tuple accumulators): one program per (t, block of P),
    # looping over the whole batch; the knots are a runtime loop over a K_PAD accumulator.
    t = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    kk = tl.arange(0, K_PAD)
    acc_c = tl.zeros((K_PAD, BLOCK_P), dtype=tl.float32)
    acc_s = tl.zeros((K_PAD, BLOCK_P), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        x = _project_tile(
            Z,
            A,
            t,
            offs_b,
            offs_p,
            mask_b,
            mask_p,
            D,
            stride_zt,
            stride_zb,
            stride_zd,
            stride_ad,
            stride_ap,
            BLOCK_B,
            BLOCK_P,
            BLOCK_D,
            DOT_PRECISION,
            UPCAST_HALF_DOT,
        )
        c1, s1 = _sincos(x * dt)
        # rows past the batch start at (0, 0) and stay there under rotation
        c = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32) + mask_b[:, None].to(tl.float32)
        s = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
        for k in range(K):  # a runtime loop: unrolling all knots costs registers, not time
            acc_c += tl.where(kk[:, None] == k, tl.sum(c, axis=0)[None, :], 0.0)
            acc_s += tl.where(kk[:, None] == k, tl.sum(s, axis=0)[None, :], 0.0)
            c, s = c * c1 - s * s1, s * c1 + c * s1
    mask = (kk[:, None] < K) & mask_p[None, :]
    offs = (t * K + kk[:, None]) * P + offs_p[None, :]
    tl.store(SUMS + offs, acc_c, mask=mask)
    tl.store(SUMS + T * K * P + offs, acc_s, mask=mask)
    if COMPUTE_STAT:
        n = B * 1.0  # float32; no method call: an integer argument may be a constant
        phi = tl.load(PHI + kk, mask=kk < K, other=0.0)
        w = tl.load(W + kk, mask=kk < K, other=0.0)
        err = (acc_c / n - phi[:, None]) * (acc_c / n - phi[:, None]) + (acc_s / n) * (acc_s / n)
        err = tl.where(mask, err * w[:, None], 0.0)
        tl.store(PARTIAL + t * tl.num_programs(1) + pid_p, tl.sum(tl.sum(err, axis=1), axis=0) * n)


@triton.jit(do_not_specialize=["T", "B"])
def _sigreg_bwd_kernel(
    GRAD,
    Z,
    A,
    SUMS,
    PHI,
    W,
    GX,
    T,
    B,
    D,
    P,
    stride_zt,
    stride_zb,
    stride_zd,
    stride_ad,
    stride_ap,
    dt,
    K: tl.constexpr,
    SCALAR_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_HALF_DOT: tl.constexpr,
):
    # One program per (t, block of B, block of P): grad_x of its tile, written once.
    # grad_x = sum_{k >= 1} a_k cos(t_k x) - b_k sin(t_k x) (knot 0 has t_0 = 0), where
    # SCALAR_GRAD: GRAD is d loss / d SIGReg and SUMS the moment sums, so (spec section 3)
    #   a_k = 2 g w_k t_k S_k / (T P),  b_k = 2 g w_k t_k (C_k - phi_k) / (T P);
    # otherwise GRAD holds d loss / d sums (2, T, K, P): a_k = t_k GRAD[1], b_k = t_k GRAD[0].
    t = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    x = _project_tile(
        Z,
        A,
        t,
        offs_b,
        offs_p,
        mask_b,
        mask_p,
        D,
        stride_zt,
        stride_zb,
        stride_zd,
        stride_ad,
        stride_ap,
        BLOCK_B,
        BLOCK_P,
        BLOCK_D,
        DOT_PRECISION,
        UPCAST_HALF_DOT,
    )
    c1, s1 = _sincos(x * dt)
    if SCALAR_GRAD:
        n = tl.load(SUMS + t * K * P)  # sum of cos(0 * x) over the (global) batch
        scale = 2.0 * tl.load(GRAD) / (n * (T * P))
    c = c1
    s = s1
    g = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    for k in tl.static_range(1, K):
        if k > 1:
            c, s = c * c1 - s * s1, s * c1 + c * s1
        if SCALAR_GRAD:
            coef = scale * tl.load(W + k) * (k * dt)
            C = tl.load(SUMS + (t * K + k) * P + offs_p, mask=mask_p, other=0.0)
            S = tl.load(SUMS + ((T + t) * K + k) * P + offs_p, mask=mask_p, other=0.0)
            a_k = coef * S
            b_k = coef * (C - n * tl.load(PHI + k))
        else:
            b_k = tl.load(GRAD + (t * K + k) * P + offs_p, mask=mask_p, other=0.0) * (k * dt)
            a_k = tl.load(GRAD + ((T + t) * K + k) * P + offs_p, mask=mask_p, other=0.0) * (k * dt)
        g += a_k[None, :] * c - b_k[None, :] * s
    tl.store(
        GX + (t * B + offs_b[:, None]) * P + offs_p[None, :],
        g,
        mask=mask_b[:, None] & mask_p[None, :],
    )


# ------------------------------------------------------------------------------ launchers


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep float32 accuracy (3 TF32 passes); half inputs use their own MMA
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Tile configurations, chosen so that no target from sm_80 to sm_90 spills registers with
# Triton >= 3.8 at any size the launchers take (checked by tests/test_aot.py through
# Triton's JIT path, specialisation included). Forward: GROUPS warps, each taking its own
# BLOCK_B batch rows of every chunk of GROUPS * BLOCK_B rows. A batch that fits in one
# group's rows (B <= 16) takes one warp, so that a tiny batch does not pay for 64 rows
# (with half-width D steps and two pipeline stages: one warp with the main ones spilled
# 8-128 bytes on sm_86-90).
FWD_CONFIG = {"GROUPS": 4, "BLOCK_B": 16, "BLOCK_P": 16, "BLOCK_D": 32, "num_stages": 3}
BWD_CONFIG = {"BLOCK_B": 64, "BLOCK_P": 16, "BLOCK_D": 32, "num_warps": 4}
FWD_SMALL_BATCH = {**FWD_CONFIG, "GROUPS": 1, "BLOCK_D": 16, "num_stages": 2}
BWD_SMALL_BATCH = {**BWD_CONFIG, "BLOCK_B": 16, "num_warps": 1}


def fwd_config(B: int) -> dict:
    """Forward tiles for a batch of ``B`` rows."""
    return FWD_SMALL_BATCH if B <= FWD_CONFIG["BLOCK_B"] else FWD_CONFIG


def bwd_config(B: int) -> dict:
    """Backward tiles for a batch of ``B`` rows."""
    return BWD_SMALL_BATCH if B <= BWD_SMALL_BATCH["BLOCK_B"] else BWD_CONFIG


# The Triton < 3.3 forward (``_sigreg_fwd_loop_kernel``), with its tiles of before the tuple
# accumulators: widths D or P that are not multiples of 16 lose the /16 hints, and ptxas then
# spilled 16-24 bytes with the main tiles (P = 1 on sm_80/86/89, D = 191 on sm_86/89); those
# shapes take eight warps.
FWD_LOOP_CONFIG = {"BLOCK_B": 64, "BLOCK_P": 16, "BLOCK_D": 32, "num_warps": 4}
FWD_LOOP_RAGGED = {**FWD_LOOP_CONFIG, "num_warps": 8}


def fwd_loop_config(D: int, P: int) -> dict:
    """Tiles of the Triton < 3.3 forward for z of width ``D`` projected on ``P`` directions."""
    return FWD_LOOP_CONFIG if D % 16 == 0 and P % 16 == 0 else FWD_LOOP_RAGGED


# Knots: the forward unrolls them (K - 1 accumulators per moment); the Triton < 3.3 forward
# loops over a K_PAD = 32 accumulator.
KNOTS_MAX = 32


def fwd_constexprs(
    dtype: torch.dtype, knots: int, compute_stat: bool, config: dict, interpreter: bool = False
) -> dict:
    """Compile-time arguments of the forward kernel for z of ``dtype`` and tiles ``config``."""
    return dict(
        K=knots,
        COMPUTE_STAT=compute_stat,
        DOT_PRECISION=_dot_precision(dtype),
        UPCAST_HALF_DOT=interpreter,
        **{k: v for k, v in config.items() if k != "num_stages"},
    )


def fwd_loop_constexprs(
    dtype: torch.dtype, compute_stat: bool, config: dict, interpreter: bool = False
) -> dict:
    """Compile-time arguments of the Triton < 3.3 forward for z of ``dtype`` and tiles ``config``."""
    return dict(
        K_PAD=KNOTS_MAX,
        COMPUTE_STAT=compute_stat,
        DOT_PRECISION=_dot_precision(dtype),
        UPCAST_HALF_DOT=interpreter,
        **{k: v for k, v in config.items() if k != "num_warps"},
    )


def bwd_constexprs(
    dtype: torch.dtype, knots: int, scalar_grad: bool, config: dict, interpreter: bool = False
) -> dict:
    """Compile-time arguments of the backward kernel for z of ``dtype`` and tiles ``config``."""
    return dict(
        K=knots,
        SCALAR_GRAD=scalar_grad,
        DOT_PRECISION=_dot_precision(dtype),
        UPCAST_HALF_DOT=interpreter,
        **{k: v for k, v in config.items() if k != "num_warps"},
    )


def compile_cases():
    """``(name, call)`` pairs for the compile-faithful check (``_aot.py``): each launcher as
    the library calls it -- z (T, B, D) as ``emb.transpose(0, 1)`` of a (B, T, D) batch, A
    (D, P) float32, 17 knots -- in every input dtype at the training size (T=4, B=128,
    D=192, P=1024), and in float32 (plus bfloat16 at B=1) at edge sizes: one row, one
    direction, D = 1 and D = 191 with the one-warp tiles of a small batch (B <= 16) and with
    the main ones, and a batch that takes the forward's batch loop four times with a ragged
    last chunk (B=200). Both forwards are built whatever Triton is installed: ``fwd`` /
    ``sums`` (tuple accumulators, Triton >= 3.3) and ``fwd_loop`` / ``sums_loop`` (the
    forward of Triton < 3.3)."""
    real = {"real": (4, 128, 192, 1024)}
    edges = {
        "B=1": (4, 1, 192, 1024),
        "T=1": (1, 128, 192, 1024),
        "B=200": (2, 200, 192, 1024),
        "D=1": (4, 8, 1, 64),
        "D=1,B=40": (2, 40, 1, 64),
        "D=16,B=16,P=16": (2, 16, 16, 16),
        "D=16,B=17,P=16": (2, 17, 16, 16),
        "D=191,B=7,P=1000": (3, 7, 191, 1000),
        "D=191,B=70,P=1000": (3, 70, 191, 1000),
        "P=1": (2, 5, 24, 1),
        "P=1,B=33": (2, 33, 24, 1),
    }
    runs = [(size, shape, dtype) for size, shape in real.items() for dtype in _TRITON_DTYPES]
    runs += [(size, shape, torch.float32) for size, shape in edges.items()]
    runs.append(("B=1", edges["B=1"], torch.bfloat16))
    ops = ("fwd", "sums", "fwd_loop", "sums_loop", "bwd", "bwd+A", "sums_bwd", "sums_bwd+A")
    for size, shape, dtype in runs:
        for op in ops:
            yield f"{op}[{_TRITON_DTYPES[dtype]},{size}]", functools.partial(_compile_case, op, shape, dtype)


def _compile_case(op: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    # Nothing runs, so the values do not matter: uninitialised tensors of the right layout.
    T, B, D, P = shape
    knots = 17
    z = torch.empty(B, T, D, dtype=dtype).transpose(0, 1)
    A = torch.empty(D, P)
    phi, weights, sums = torch.empty(knots), torch.empty(knots), torch.empty(2, T, knots, P)
    dt = 3.0 / (knots - 1)
    need_grad_A = op.endswith("+A")
    if op in ("fwd", "sums"):  # the forward of Triton >= 3.3, whatever this Triton is
        _launch_fwd(z, A, phi, weights, dt, compute_stat=op == "fwd")
    elif op in ("fwd_loop", "sums_loop"):  # the forward of Triton < 3.3
        _launch_fwd_loop(z, A, phi, weights, dt, compute_stat=op == "fwd_loop")
    elif op.startswith("bwd"):
        sigreg_bwd(torch.ones(()), z, A, sums, phi, weights, dt, need_grad_A)
    else:
        sigreg_trig_sums_bwd(torch.empty(2, T, knots, P), z, A, dt, need_grad_A)


def _check(z: torch.Tensor, A: torch.Tensor, knots: int) -> None:
    if z.dim() != 3 or A.dim() != 2 or A.shape[0] != z.shape[2]:
        raise ValueError(
            f"sigreg kernel expects z (T, B, D) and A (D, P), got {_checks.shape(z)} and {_checks.shape(A)}"
        )
    if z.device != A.device:
        raise ValueError(f"z ({z.device}) and A ({A.device}) must be on the same device")
    if z.dtype not in _TRITON_DTYPES:
        raise ValueError(f"sigreg kernel supports float32, float16 and bfloat16 z, got {z.dtype}")
    if not 2 <= knots <= KNOTS_MAX:
        raise ValueError(f"the fused SIGReg supports 2 to {KNOTS_MAX} knots, got {knots}")


def _interpreter_operand(A: torch.Tensor, dtype: torch.dtype, interpreter: bool) -> torch.Tensor:
    """A as the kernels read it. The kernels round A to z's dtype (round to nearest even on
    the GPU); the interpreter's float32 -> bfloat16 cast truncates instead, which biases x,
    so under the interpreter A is rounded here, by torch, as the reference rounds it."""
    return A.to(dtype) if interpreter and dtype == torch.bfloat16 else A


def sigreg_fwd(
    z: torch.Tensor,
    A: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    dt: float,
    compute_stat: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Moment sums (2, T, K, P) float32 of z (T, B, D) projected on A (D, P) at the knots
    t_k = k dt, and, if ``compute_stat``, the SIGReg value (0-dim float32; phi, weights (K,))."""
    _check(z, A, phi.numel())
    launch = _launch_fwd if TUPLE_ACCUMULATORS else _launch_fwd_loop
    return launch(z, A, phi, weights, dt, compute_stat)


def _fwd_buffers(z, A, knots, grid, compute_stat):
    """The sums (2, T, K, P) and one float32 share of the statistic per program (or the sums
    again, unused, without the statistic); A as the kernels read it."""
    sums = torch.empty((2, z.shape[0], knots, A.shape[1]), device=z.device, dtype=torch.float32)
    partial = torch.empty(grid, device=z.device, dtype=torch.float32) if compute_stat else sums
    return sums, partial, _interpreter_operand(A, z.dtype, triton_interpreter())


def _launch_fwd(z, A, phi, weights, dt, compute_stat):
    """The forward with tuple accumulators (Triton >= 3.3): the statistic is partial.sum()."""
    T, B, D = z.shape
    P, knots = A.shape[1], phi.numel()
    config = fwd_config(B)
    grid = (T, _eager.cdiv(P, config["BLOCK_P"]))
    sums, partial, A_dot = _fwd_buffers(z, A, knots, grid, compute_stat)
    _sigreg_fwd_kernel[grid](
        z,
        A_dot,
        sums,
        phi,
        weights,
        partial,
        T,
        B,
        D,
        P,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        A_dot.stride(0),
        A_dot.stride(1),
        dt,
        num_warps=config["GROUPS"],
        num_stages=config["num_stages"],
        **fwd_constexprs(z.dtype, knots, compute_stat, config, triton_interpreter()),
    )
    return sums, (partial.sum() if compute_stat else None)


def _launch_fwd_loop(z, A, phi, weights, dt, compute_stat):
    """The Triton < 3.3 forward: the statistic is partial.sum() / (T P)."""
    T, B, D = z.shape
    P, knots = A.shape[1], phi.numel()
    config = fwd_loop_config(D, P)
    grid = (T, _eager.cdiv(P, config["BLOCK_P"]))
    sums, partial, A_dot = _fwd_buffers(z, A, knots, grid, compute_stat)
    _sigreg_fwd_loop_kernel[grid](
        z,
        A_dot,
        sums,
        phi,
        weights,
        partial,
        T,
        B,
        D,
        P,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        A_dot.stride(0),
        A_dot.stride(1),
        dt,
        K=knots,
        num_warps=config["num_warps"],
        **fwd_loop_constexprs(z.dtype, compute_stat, config, triton_interpreter()),
    )
    return sums, (partial.sum() / (T * P) if compute_stat else None)


def _launch_bwd(z, A, dt, knots, need_grad_A, *, grad, sums=None, phi=None, weights=None):
    """grad_x (T, B, P) float32 from the kernel, then grad_z = grad_x @ A^T (and grad_A)."""
    T, B, D = z.shape
    P = A.shape[1]
    gx = torch.empty((T, B, P), device=z.device, dtype=torch.float32)
    scalar = sums is not None
    config = bwd_config(B)
    grid = (T, _eager.cdiv(B, config["BLOCK_B"]), _eager.cdiv(P, config["BLOCK_P"]))
    interpreter = triton_interpreter()
    A_dot = _interpreter_operand(A, z.dtype, interpreter)
    _sigreg_bwd_kernel[grid](
        grad,
        z,
        A_dot,
        sums if scalar else grad,
        phi if scalar else grad,
        weights if scalar else grad,
        gx,
        T,
        B,
        D,
        P,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        A_dot.stride(0),
        A_dot.stride(1),
        dt,
        num_warps=config["num_warps"],
        **bwd_constexprs(z.dtype, knots, scalar, config, interpreter),
    )
    gx = gx.view(T * B, P)
    A32 = A.to(torch.float32)
    gz = torch.mm(gx, A32.t()).view(T, B, D).to(z.dtype)
    grad_A = None
    if need_grad_A:
        grad_A = torch.mm(z.reshape(T * B, D).t().to(torch.float32), gx).to(A.dtype)
    return gz, grad_A


def sigreg_bwd(
    grad: torch.Tensor,
    z: torch.Tensor,
    A: torch.Tensor,
    sums: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    dt: float,
    need_grad_A: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_z (T, B, D) in z's dtype, grad_A (D, P) or None) for d loss / d SIGReg ``grad``
    (0-dim), from the moment sums (2, T, K, P) of the forward."""
    return _launch_bwd(
        z,
        A,
        dt,
        phi.numel(),
        need_grad_A,
        grad=grad.to(torch.float32).reshape(1),
        sums=sums,
        phi=phi,
        weights=weights,
    )


def sigreg_trig_sums_bwd(
    grad_sums: torch.Tensor, z: torch.Tensor, A: torch.Tensor, dt: float, need_grad_A: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_z (T, B, D), grad_A (D, P) or None) for d loss / d sums ``grad_sums`` (2, T, K, P)."""
    return _launch_bwd(
        z, A, dt, grad_sums.shape[2], need_grad_A, grad=grad_sums.to(torch.float32).contiguous()
    )


# ------------------------------------------------------------------ torch.library ops
# lewm_fast::sigreg / sigreg_bwd (the statistic) and lewm_fast::sigreg_trig_sums /
# sigreg_trig_sums_bwd (the moment sums alone, for multi-process use); the Python objects
# are ``<op>_op``, beside the launchers ``<op>_fwd`` / ``<op>_bwd`` they call.


@torch.library.custom_op("lewm_fast::sigreg", mutates_args=())
def sigreg_op(
    z: torch.Tensor, A: torch.Tensor, phi: torch.Tensor, weights: torch.Tensor, dt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SIGReg value (0-dim float32) and the moment sums (2, T, K, P) it was computed from."""
    return _statistic_fwd(z, A, phi, weights, dt)


def _statistic_fwd(z, A, phi, weights, dt):
    sums, stat = sigreg_fwd(z, A, phi, weights, dt, compute_stat=True)
    return stat, sums


@sigreg_op.register_fake
def _(z, A, phi, weights, dt):
    return (
        z.new_empty((), dtype=torch.float32),
        z.new_empty((2, z.shape[0], phi.shape[0], A.shape[1]), dtype=torch.float32),
    )


@torch.library.custom_op("lewm_fast::sigreg_bwd", mutates_args=())
def sigreg_bwd_op(
    grad: torch.Tensor,
    z: torch.Tensor,
    A: torch.Tensor,
    sums: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    dt: float,
    need_grad_A: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gz, ga = sigreg_bwd(grad, z, A, sums, phi, weights, dt, need_grad_A)
    return gz, ga if ga is not None else A.new_empty(0)


def _fake_grads(z, A, need_grad_A):
    """(grad_z, grad_A) as the launchers return them: contiguous, whatever z's and A's
    strides (they come out of torch.mm); torch.compile checks the real strides against these."""
    return z.new_empty(z.shape), (A.new_empty(A.shape) if need_grad_A else A.new_empty(0))


@sigreg_bwd_op.register_fake
def _(grad, z, A, sums, phi, weights, dt, need_grad_A):
    return _fake_grads(z, A, need_grad_A)


def _sigreg_setup(ctx, inputs, output):
    z, A, phi, weights, dt = inputs
    ctx.save_for_backward(z, A, output[1], phi, weights)
    ctx.dt = dt
    ctx.need_grad_A = bool(A.requires_grad)


def _sigreg_backward(bwd):
    """The backward of lewm_fast::sigreg through ``bwd``: the custom op or its launcher."""

    def backward(ctx, grad_stat, grad_sums):
        z, A, sums, phi, weights = ctx.saved_tensors
        gz, ga = bwd(grad_stat, z, A, sums, phi, weights, ctx.dt, ctx.need_grad_A)
        return gz, (ga if ctx.need_grad_A else None), None, None, None

    return backward


sigreg_op.register_autograd(_sigreg_backward(sigreg_bwd_op), setup_context=_sigreg_setup)
_Statistic = _eager.function("_Statistic", _statistic_fwd, _sigreg_setup, _sigreg_backward(sigreg_bwd))


def statistic(z, A, phi, weights, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lewm_fast::sigreg's (value, sums), the custom op only where something traces the call
    (:func:`lewm_fast.kernels._eager.call`): the entry point of ``lewm_fast.SIGReg``."""
    return _eager.call(sigreg_op, _Statistic, _statistic_fwd, z, A, phi, weights, dt)


@torch.library.custom_op("lewm_fast::sigreg_trig_sums", mutates_args=())
def sigreg_trig_sums_op(
    z: torch.Tensor, A: torch.Tensor, phi: torch.Tensor, weights: torch.Tensor, dt: float
) -> torch.Tensor:
    """Moment sums (2, T, K, P) float32 of z (T, B, D) projected on A (D, P): sum_b cos(t_k x)
    and sum_b sin(t_k x) (for multi-process use)."""
    return _sums_fwd(z, A, phi, weights, dt)


def _sums_fwd(z, A, phi, weights, dt):
    return sigreg_fwd(z, A, phi, weights, dt, compute_stat=False)[0]


@sigreg_trig_sums_op.register_fake
def _(z, A, phi, weights, dt):
    return z.new_empty((2, z.shape[0], phi.shape[0], A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("lewm_fast::sigreg_trig_sums_bwd", mutates_args=())
def sigreg_trig_sums_bwd_op(
    grad_sums: torch.Tensor, z: torch.Tensor, A: torch.Tensor, dt: float, need_grad_A: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    gz, ga = sigreg_trig_sums_bwd(grad_sums, z, A, dt, need_grad_A)
    return gz, ga if ga is not None else A.new_empty(0)


@sigreg_trig_sums_bwd_op.register_fake
def _(grad_sums, z, A, dt, need_grad_A):
    return _fake_grads(z, A, need_grad_A)


def _sums_setup(ctx, inputs, output):
    z, A, phi, weights, dt = inputs
    ctx.save_for_backward(z, A)
    ctx.dt = dt
    ctx.need_grad_A = bool(A.requires_grad)


def _sums_backward(bwd):
    """The backward of lewm_fast::sigreg_trig_sums through ``bwd``: the custom op or its launcher."""

    def backward(ctx, grad_sums):
        z, A = ctx.saved_tensors
        gz, ga = bwd(grad_sums, z, A, ctx.dt, ctx.need_grad_A)
        return gz, (ga if ctx.need_grad_A else None), None, None, None

    return backward


sigreg_trig_sums_op.register_autograd(_sums_backward(sigreg_trig_sums_bwd_op), setup_context=_sums_setup)
_TrigSums = _eager.function("_TrigSums", _sums_fwd, _sums_setup, _sums_backward(sigreg_trig_sums_bwd))


def trig_sums(z, A, phi, weights, dt: float) -> torch.Tensor:
    """lewm_fast::sigreg_trig_sums's output, the custom op only where something traces the
    call (:func:`lewm_fast.kernels._eager.call`): the multi-process path of ``lewm_fast.SIGReg``."""
    return _eager.call(sigreg_trig_sums_op, _TrigSums, _sums_fwd, z, A, phi, weights, dt)
