"""Fused SIGReg (spec section 3): Fourier moments of random projections, never materialised.

For z (T, B, D) and directions A (D, P), x = z @ A and the knots t_k = k dt:

    sums[0, t, k, p] = sum_b cos(t_k x[t, b, p])      sums[1, t, k, p] = sum_b sin(t_k x[t, b, p])
    C = sums[0] / n, S = sums[1] / n                   (n = sums[0, :, 0, :], the global batch)
    SIGReg = mean_{t,p} n * sum_k w_k ((C_k - phi_k)^2 + S_k^2)
    dSIGReg/dx = 2 / (T P) * sum_k w_k t_k (S_k cos(t_k x) - (C_k - phi_k) sin(t_k x))

The forward kernel computes each x tile with ``tl.dot`` and keeps only the (2, T, K, P)
sums; the backward kernel recomputes x and the trigonometry and accumulates
``grad_z = grad_x @ A^T`` in registers, one (t, batch block, D block) tile per program.
Neither the (T, B, P, K) tensor of the reference nor x itself is ever written to memory.
cos/sin at every knot come from one sincos of dt * x by rotation (angle addition); that
sincos is a quadrant reduction plus single-precision polynomials, so it needs no
libdevice call (no local-memory slow path) and gives the same bits under every Triton
version and in the interpreter.

Everything accumulates in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _checks
from ..backend import triton_interpreter
from ._interpreter import patch_scalar_index

if triton_interpreter():  # NumPy >= 2.4 with the interpreters of Triton < 3.8
    patch_scalar_index()

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
    K,
    K_PAD: tl.constexpr,
    COMPUTE_STAT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_HALF_DOT: tl.constexpr,
):
    # one program per (t, block of P); loops over the whole batch
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
    GZ,
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
    K,
    SCALAR_GRAD: tl.constexpr,
    STORE_GX: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_HALF_DOT: tl.constexpr,
    GRAD_DOT_PRECISION: tl.constexpr,
):
    # One program per (t, block of B, block of D); loops over all P, recomputing x and the
    # trigonometry, and accumulates grad_z[t, block of B, block of D] in registers.
    # grad_x = sum_k t_k (a_k cos - b_k sin) where
    # SCALAR_GRAD: GRAD is d loss / d SIGReg and SUMS the moment sums, so (spec section 3)
    #   a_k = 2 g w_k S_k / (T P),  b_k = 2 g w_k (C_k - phi_k) / (T P);
    # otherwise GRAD holds d loss / d sums (2, T, K, P): a_k = GRAD[1], b_k = GRAD[0].
    t = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if SCALAR_GRAD:
        n = tl.load(SUMS + t * K * P)  # sum of cos(0 * x) over the (global) batch
        scale = 2.0 * tl.load(GRAD) / (T * P)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
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
        c = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32) + 1.0
        s = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
        g = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
        for k in range(1, K):  # knot 0 has t_0 = 0 and contributes nothing
            c, s = c * c1 - s * s1, s * c1 + c * s1
            if SCALAR_GRAD:
                base = SUMS + (t * K + k) * P + offs_p
                C = tl.load(base, mask=mask_p, other=0.0) / n
                S = tl.load(base + T * K * P, mask=mask_p, other=0.0) / n
                coef = scale * tl.load(W + k)
                a_k = coef * S
                b_k = coef * (C - tl.load(PHI + k))
            else:
                base = GRAD + (t * K + k) * P + offs_p
                b_k = tl.load(base, mask=mask_p, other=0.0)
                a_k = tl.load(base + T * K * P, mask=mask_p, other=0.0)
            g += (k * dt) * (a_k[None, :] * c - b_k[None, :] * s)
        g = tl.where(mask_b[:, None] & mask_p[None, :], g, 0.0)
        if STORE_GX:
            if tl.program_id(2) == 0:
                tl.store(
                    GX + (t * B + offs_b[:, None]) * P + offs_p[None, :],
                    g,
                    mask=mask_b[:, None] & mask_p[None, :],
                )
        at = tl.load(
            A + offs_d[:, None] * stride_ad + offs_p[None, :] * stride_ap,
            mask=mask_d[:, None] & mask_p[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(g, tl.trans(at), input_precision=GRAD_DOT_PRECISION)
    tl.store(
        GZ + (t * B + offs_b[:, None]) * D + offs_d[None, :],
        acc.to(GZ.dtype.element_ty),
        mask=mask_b[:, None] & mask_d[None, :],
    )


# ------------------------------------------------------------------------------ launchers


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep float32 accuracy (3 TF32 passes); half inputs use their own MMA
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Tile configurations, chosen so that no target from sm_80 to sm_90 spills registers with
# Triton >= 3.8 at any size the launchers take (checked by tests/test_aot.py through
# Triton's JIT path, specialisation included; Triton 3.2-3.6 spill 8-16 bytes in a few
# configurations). Widths D or P that are not multiples of 16 lose the /16 hints, and
# ptxas then spilled 16-24 bytes with the main tiles (P = 1 on sm_80/86/89, D = 191 on
# sm_86/89); those shapes take the RAGGED tiles instead.
FWD_CONFIG = {"BLOCK_B": 64, "BLOCK_P": 16, "BLOCK_D": 32, "num_warps": 4}
BWD_CONFIG = {"BLOCK_B": 16, "BLOCK_P": 32, "BLOCK_D": 32, "num_warps": 8}
FWD_RAGGED = {**FWD_CONFIG, "num_warps": 8}
BWD_RAGGED = {**BWD_CONFIG, "BLOCK_P": 16}


def fwd_config(D: int, P: int) -> dict:
    """Forward tiles for z of width ``D`` projected on ``P`` directions."""
    return FWD_CONFIG if D % 16 == 0 and P % 16 == 0 else FWD_RAGGED


def bwd_config(D: int, P: int) -> dict:
    """Backward tiles for z of width ``D`` projected on ``P`` directions."""
    return BWD_CONFIG if D % 16 == 0 and P % 16 == 0 else BWD_RAGGED


KNOTS_MAX = 32  # knots are a runtime loop over a K_PAD = 32 accumulator


def _tiles(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "num_warps"}


def fwd_constexprs(dtype: torch.dtype, compute_stat: bool, config: dict, interpreter: bool = False) -> dict:
    """Compile-time arguments of the forward kernel for z of ``dtype`` and tiles ``config``."""
    return dict(
        K_PAD=KNOTS_MAX,
        COMPUTE_STAT=compute_stat,
        DOT_PRECISION=_dot_precision(dtype),
        UPCAST_HALF_DOT=interpreter,
        **_tiles(config),
    )


def bwd_constexprs(
    dtype: torch.dtype, scalar_grad: bool, store_gx: bool, config: dict, interpreter: bool = False
) -> dict:
    """Compile-time arguments of the backward kernel for z of ``dtype`` and tiles ``config``."""
    return dict(
        SCALAR_GRAD=scalar_grad,
        STORE_GX=store_gx,
        DOT_PRECISION=_dot_precision(dtype),
        GRAD_DOT_PRECISION="tf32x3",
        UPCAST_HALF_DOT=interpreter,
        **_tiles(config),
    )


def compile_cases():
    """``(name, call)`` pairs for the compile-faithful check (``_aot.py``): each launcher as
    the library calls it -- z (T, B, D) as ``emb.transpose(0, 1)`` of a (B, T, D) batch, A
    (D, P) float32 -- in every input dtype at the training size (T=4, B=128, D=192,
    P=1024), and in float32 (plus bfloat16 at B=1) at edge sizes."""
    real = {"real": (4, 128, 192, 1024)}
    edges = {
        "B=1": (4, 1, 192, 1024),
        "T=1": (1, 128, 192, 1024),
        "D=1": (4, 8, 1, 64),
        "D=16,B=16,P=16": (2, 16, 16, 16),
        "D=191,B=7,P=1000": (3, 7, 191, 1000),
        "P=1": (2, 5, 24, 1),
    }
    runs = [(size, shape, dtype) for size, shape in real.items() for dtype in _TRITON_DTYPES]
    runs += [(size, shape, torch.float32) for size, shape in edges.items()]
    runs.append(("B=1", edges["B=1"], torch.bfloat16))
    for size, shape, dtype in runs:
        for op in ("fwd", "sums", "bwd", "bwd+A", "sums_bwd", "sums_bwd+A"):
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
    if op in ("fwd", "sums"):
        sigreg_fwd(z, A, phi, weights, dt, compute_stat=op == "fwd")
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


def sigreg_fwd(
    z: torch.Tensor,
    A: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    dt: float,
    compute_stat: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Moment sums (2, T, K, P) float32 and, if ``compute_stat``, the SIGReg value (0-dim)."""
    knots = phi.numel()
    _check(z, A, knots)
    T, B, D = z.shape
    P = A.shape[1]
    sums = torch.empty((2, T, knots, P), device=z.device, dtype=torch.float32)
    config = fwd_config(D, P)
    grid = (T, triton.cdiv(P, config["BLOCK_P"]))
    partial = torch.empty(grid, device=z.device, dtype=torch.float32) if compute_stat else sums
    _sigreg_fwd_kernel[grid](
        z,
        A,
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
        A.stride(0),
        A.stride(1),
        dt,
        K=knots,
        num_warps=config["num_warps"],
        **fwd_constexprs(z.dtype, compute_stat, config, triton_interpreter()),
    )
    stat = partial.sum() / (T * P) if compute_stat else None
    return sums, stat


def _launch_bwd(z, A, dt, knots, need_grad_A, *, grad, sums=None, phi=None, weights=None):
    T, B, D = z.shape
    P = A.shape[1]
    gx = torch.empty((T, B, P), device=z.device, dtype=torch.float32) if need_grad_A else None
    gz = torch.empty((T, B, D), device=z.device, dtype=z.dtype)
    scalar = sums is not None
    config = bwd_config(D, P)
    grid = (T, triton.cdiv(B, config["BLOCK_B"]), triton.cdiv(D, config["BLOCK_D"]))
    _sigreg_bwd_kernel[grid](
        grad,
        z,
        A,
        sums if scalar else grad,
        phi if scalar else grad,
        weights if scalar else grad,
        gz,
        gx if gx is not None else grad,
        T,
        B,
        D,
        P,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        A.stride(0),
        A.stride(1),
        dt,
        K=knots,
        num_warps=config["num_warps"],
        **bwd_constexprs(z.dtype, scalar, need_grad_A, config, triton_interpreter()),
    )
    grad_A = None
    if need_grad_A:
        grad_A = torch.einsum("tbd,tbp->dp", z.to(torch.float32), gx).to(A.dtype)
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
    """(grad_z (T, B, D) in z's dtype, grad_A (D, P) or None) for d loss / d SIGReg ``grad``."""
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
    """(grad_z, grad_A or None) for d loss / d sums (2, T, K, P)."""
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


@sigreg_bwd_op.register_fake
def _(grad, z, A, sums, phi, weights, dt, need_grad_A):
    return torch.empty_like(z), (torch.empty_like(A) if need_grad_A else A.new_empty(0))


def _sigreg_setup(ctx, inputs, output):
    z, A, phi, weights, dt = inputs
    ctx.save_for_backward(z, A, output[1], phi, weights)
    ctx.dt = dt
    ctx.need_grad_A = bool(A.requires_grad)


def _sigreg_backward(ctx, grad_stat, grad_sums):
    z, A, sums, phi, weights = ctx.saved_tensors
    gz, ga = sigreg_bwd_op(grad_stat, z, A, sums, phi, weights, ctx.dt, ctx.need_grad_A)
    return gz, (ga if ctx.need_grad_A else None), None, None, None


sigreg_op.register_autograd(_sigreg_backward, setup_context=_sigreg_setup)


@torch.library.custom_op("lewm_fast::sigreg_trig_sums", mutates_args=())
def sigreg_trig_sums_op(
    z: torch.Tensor, A: torch.Tensor, phi: torch.Tensor, weights: torch.Tensor, dt: float
) -> torch.Tensor:
    """Moment sums (2, T, K, P) float32 of z (T, B, D) projected on A (D, P): sum_b cos(t_k x)
    and sum_b sin(t_k x) (for multi-process use)."""
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
    return torch.empty_like(z), (torch.empty_like(A) if need_grad_A else A.new_empty(0))


def _sums_setup(ctx, inputs, output):
    z, A, phi, weights, dt = inputs
    ctx.save_for_backward(z, A)
    ctx.dt = dt
    ctx.need_grad_A = bool(A.requires_grad)


def _sums_backward(ctx, grad_sums):
    z, A = ctx.saved_tensors
    gz, ga = sigreg_trig_sums_bwd_op(grad_sums, z, A, ctx.dt, ctx.need_grad_A)
    return gz, (ga if ctx.need_grad_A else None), None, None, None


sigreg_trig_sums_op.register_autograd(_sums_backward, setup_context=_sums_setup)
