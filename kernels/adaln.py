"""Fused AdaLN-Zero modulation (spec section 1, ConditionalBlock).

Three ops (``lewm_fast::<op>``, each one pass over the tokens; the public functional forms
are ``lewm_fast.adaln_modulate``, ``gated_residual`` and ``gated_adaln_modulate``):

``adaln``: the branch input of a ConditionalBlock,
    h = LayerNorm(x, eps1)                      (no affine; eps1 = 1e-6)
    m = h * (1 + scale) + shift
    y = LayerNorm(m, eps2) * weight + bias      (the branch's own affine norm; eps2 = 1e-5)
with gradients for x, shift, scale, weight and bias. The backward pass recomputes h and m
from x and the saved per-row statistics instead of storing them.

``gated_residual``: ``x + gate * y`` with gradients for all three.

``gated_adaln``: ``out = x + gate * res`` then ``y = adaln(out, ...)``, both
returned: a block's residual and the next branch's input (the MLP's within a block, the
next block's attention when blocks run back to back) in one kernel. ``y`` is computed
from ``out`` as stored, so the pair equals the two ops above one after the other; the
backward pass runs their two backward kernels.

x, shift, scale, gate, y are (..., D) with D innermost and contiguous; shift/scale/gate
may be strided views (e.g. chunks of the adaLN_modulation output). Everything
accumulates in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _checks
from ..backend import triton_interpreter
from . import _eager
from ._interpreter import patch_scalar_index

if triton_interpreter():  # NumPy >= 2.4 with the interpreters of Triton < 3.8
    patch_scalar_index()

# Programs of the backward kernel; each loops over row blocks and writes one partial row
# of the weight/bias gradients, summed afterwards (deterministic, no atomics).
_MAX_BWD_PROGRAMS = 512


@triton.jit
def modulate_norm(x, shift, scale, w, b, mask, D, eps1, eps2):
    """``LayerNorm(m, eps2) * w + b`` with ``m = LayerNorm(x, eps1) * (1 + scale) + shift``
    (the first LayerNorm without affine) for rows x (BLOCK_M, BLOCK_D) float32, zero where
    ``mask`` is False; shift, scale (BLOCK_M, BLOCK_D) and w, b (BLOCK_D,) float32. Returns
    y and the per-row (mean1, rstd1, mean2, rstd2). The one home of this math for every
    kernel that forms a ConditionalBlock branch input (here and ``block_step.py``)."""
    mean1 = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean1[:, None], 0.0)
    rstd1 = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps1)
    m = tl.where(mask, xc * rstd1[:, None] * (1.0 + scale) + shift, 0.0)
    mean2 = tl.sum(m, axis=1) / D
    mc = tl.where(mask, m - mean2[:, None], 0.0)
    rstd2 = 1.0 / tl.sqrt(tl.sum(mc * mc, axis=1) / D + eps2)
    y = mc * rstd2[:, None] * w[None, :] + b[None, :]
    return y, mean1, rstd1, mean2, rstd2


@triton.jit
def _modulate_norm_rows(
    x, SHIFT, SCALE, W, BIAS, Y, STATS, rows64, cols, mask_r, mask_c, D, stride_shift, stride_scale, stride_y,
    eps1, eps2,
):  # fmt: skip
    """Modulate-norm of the rows x (BLOCK_M, BLOCK_D) float32 (zero where masked): loads their
    shift/scale and the affine weight/bias, stores y and the per-row statistics."""
    mask = mask_r[:, None] & mask_c[None, :]
    shift = tl.load(SHIFT + rows64[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    scale = tl.load(SCALE + rows64[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    w = tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(BIAS + cols, mask=mask_c, other=0.0).to(tl.float32)
    y, mean1, rstd1, mean2, rstd2 = modulate_norm(x, shift, scale, w, b, mask, D, eps1, eps2)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(STATS + rows64 * 4 + 0, mean1, mask=mask_r)
    tl.store(STATS + rows64 * 4 + 1, rstd1, mask=mask_r)
    tl.store(STATS + rows64 * 4 + 2, mean2, mask=mask_r)
    tl.store(STATS + rows64 * 4 + 3, rstd2, mask=mask_r)


@triton.jit(do_not_specialize=["N"])
def _adaln_fwd_kernel(
    X,
    SHIFT,
    SCALE,
    W,
    BIAS,
    Y,
    STATS,
    N,
    D,
    stride_x,
    stride_shift,
    stride_scale,
    stride_y,
    eps1,
    eps2,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_r = rows < N
    mask_c = cols < D
    mask = mask_r[:, None] & mask_c[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _modulate_norm_rows(
        x, SHIFT, SCALE, W, BIAS, Y, STATS, rows64, cols, mask_r, mask_c, D, stride_shift, stride_scale,
        stride_y, eps1, eps2,
    )  # fmt: skip


@triton.jit(do_not_specialize=["N"])
def _adaln_bwd_kernel(
    DY,
    X,
    SHIFT,
    SCALE,
    W,
    STATS,
    DX,
    DSHIFT,
    DSCALE,
    DW_PART,
    DB_PART,
    N,
    D,
    stride_dy,
    stride_x,
    stride_shift,
    stride_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_c = cols < D
    w = tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_r = rows < N
        mask = mask_r[:, None] & mask_c[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + rows64[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        scale = tl.load(SCALE + rows64[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        mean1 = tl.load(STATS + rows64 * 4 + 0, mask=mask_r, other=0.0)
        rstd1 = tl.load(STATS + rows64 * 4 + 1, mask=mask_r, other=0.0)
        mean2 = tl.load(STATS + rows64 * 4 + 2, mask=mask_r, other=0.0)
        rstd2 = tl.load(STATS + rows64 * 4 + 3, mask=mask_r, other=0.0)

        h = tl.where(mask, (x - mean1[:, None]) * rstd1[:, None], 0.0)
        m = h * (1.0 + scale) + shift
        mh = tl.where(mask, (m - mean2[:, None]) * rstd2[:, None], 0.0)
        dw += tl.sum(dy * mh, axis=0)
        db += tl.sum(dy, axis=0)
        # affine LayerNorm backward
        dmh = dy * w[None, :]
        dm = rstd2[:, None] * (
            dmh - (tl.sum(dmh, axis=1) / D)[:, None] - mh * (tl.sum(dmh * mh, axis=1) / D)[:, None]
        )
        dm = tl.where(mask, dm, 0.0)
        # modulation backward
        dh = dm * (1.0 + scale)
        # plain LayerNorm backward
        dx = rstd1[:, None] * (
            dh - (tl.sum(dh, axis=1) / D)[:, None] - h * (tl.sum(dh * h, axis=1) / D)[:, None]
        )
        out = rows64[:, None] * D + cols[None, :]
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DSHIFT + out, dm.to(DSHIFT.dtype.element_ty), mask=mask)
        tl.store(DSCALE + out, (dm * h).to(DSCALE.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * D + cols, dw, mask=mask_c)
    tl.store(DB_PART + pid * D + cols, db, mask=mask_c)


@triton.jit(do_not_specialize=["N"])
def _gated_residual_fwd_kernel(
    X, GATE, Y, OUT, N, D, stride_x, stride_gate, stride_y, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows64[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + rows64[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows64[:, None] * D + cols[None, :], (x + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _gated_adaln_fwd_kernel(
    X,
    GATE,
    RES,
    SHIFT,
    SCALE,
    W,
    BIAS,
    OUT,
    Y,
    STATS,
    N,
    D,
    stride_x,
    stride_gate,
    stride_res,
    stride_shift,
    stride_scale,
    eps1,
    eps2,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = x + gate * res (stored), then y = the modulate-norm of out (as _adaln_fwd_kernel),
    computed from out as stored (rounded to its dtype), like the two kernels one after the other."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_r = rows < N
    mask_c = cols < D
    mask = mask_r[:, None] & mask_c[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows64[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(RES + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (x + g * r).to(OUT.dtype.element_ty)
    tl.store(OUT + rows64[:, None] * D + cols[None, :], out, mask=mask)
    o = tl.where(mask, out.to(tl.float32), 0.0)
    _modulate_norm_rows(
        o, SHIFT, SCALE, W, BIAS, Y, STATS, rows64, cols, mask_r, mask_c, D, stride_shift, stride_scale, D,
        eps1, eps2,
    )  # fmt: skip


@triton.jit(do_not_specialize=["N"])
def _gated_residual_bwd_kernel(
    DOUT,
    GATE,
    Y,
    DGATE,
    DY,
    N,
    D,
    stride_dout,
    stride_gate,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    do = tl.load(DOUT + rows64[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows64[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + rows64[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = rows64[:, None] * D + cols[None, :]
    tl.store(DGATE + out, (do * y).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DY + out, (do * g).to(DY.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launchers


MAX_D = 2048  # widest rows the fused kernels take; "auto" falls back to PyTorch above it


@functools.lru_cache(maxsize=64)
def row_config(D: int, backward: bool = False) -> dict:
    """Tile of the row-wise kernels: all of D in one block, rows to fill ~1K elements (~8 values
    of each row tile per thread); half as many rows in the modulate-norm backward, which
    holds about twice as many values per element (without the halving it spills one
    register at D = 191 on sm_90, Triton 3.9, found by tests/test_aot.py)."""
    if not 1 <= D <= MAX_D:
        raise ValueError(f"the fused AdaLN kernels take rows of 1 to {MAX_D} features, got {D}")
    block_d = max(16, triton.next_power_of_2(D))
    block_m = max(1, min(16, 1024 // block_d) // (2 if backward else 1))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": 4 if block_d <= 1024 else 8}


def compile_cases():
    """``(name, call)`` pairs for the compile-faithful check (``_aot.py``): each launcher as
    the library calls it -- shift/scale/gate as chunks of an (N, 6 D) adaLN_modulation output
    -- in every dtype combination the model uses at the planning (45,000 x 192) and training
    (384 x 192) sizes, and in float32 at edge sizes: one row, D = 1 and a width in each tile
    of ``row_config`` (multiples and non-multiples of 16, up to ``MAX_D``)."""
    dtypes = {  # (x, modulation, affine weight/bias, branch input y)
        "fp32": (torch.float32, torch.float32, torch.float32, torch.float32),
        # bf16 autocast (training and planning): an fp32 residual stream, bf16 modulation,
        # the branch input written in bf16 for the GEMM that reads it
        "fp32+bf16": (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
        "bf16": (torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
        "fp16": (torch.float16, torch.float16, torch.float16, torch.float16),
    }
    runs = [(f"{name},{size}", shape, dtypes[name]) for name in dtypes for size, shape in _REAL_ROWS.items()]
    edges = [(1, 192), (7, 1), (16, 16), (100, 191), (33, 17), (33, 48), (33, 100), (33, 320), (9, 1000)]
    edges.append((5, MAX_D))
    runs += [(f"fp32,N={n},D={d}", (n, d), dtypes["fp32"]) for n, d in edges]
    for label, shape, types in runs:
        for op in ("adaln_fwd", "adaln_bwd", "gated_residual_fwd", "gated_adaln_fwd", "gated_residual_bwd"):
            yield f"{op}[{label}]", functools.partial(_compile_case, op, shape, types)


_REAL_ROWS = {"plan": (45_000, 192), "train": (384, 192)}


def _compile_case(op: str, shape: tuple[int, int], types: tuple[torch.dtype, ...]) -> None:
    # Nothing runs, so the values do not matter: uninitialised tensors of the right layout.
    (N, D), (dtype, mod_dtype, w_dtype, y_dtype) = shape, types
    x, res, grad = (torch.empty(N, D, dtype=dtype) for _ in range(3))
    shift, scale, gate = torch.empty(N, 6 * D, dtype=mod_dtype).chunk(6, dim=-1)[:3]
    weight, bias = torch.empty(D, dtype=w_dtype), torch.empty(D, dtype=w_dtype)
    if op == "adaln_fwd":
        adaln_fwd(x, shift, scale, weight, bias, 1e-6, 1e-5, y_dtype)
    elif op == "adaln_bwd":
        adaln_bwd(grad.to(y_dtype), x, shift, scale, weight, torch.empty(N, 4))
    elif op == "gated_residual_fwd":
        gated_residual_fwd(x, gate, res)
    elif op == "gated_adaln_fwd":
        gated_adaln_fwd(x, gate, res, shift, scale, weight, bias, 1e-6, 1e-5, y_dtype)
    else:
        gated_residual_bwd(grad, gate, res)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """(N, D) view (or copy) with a unit inner stride."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, *others: torch.Tensor) -> int:
    D = x.shape[-1]
    for other in others:
        if other.shape != x.shape:
            raise ValueError(f"expected tensors of shape {_checks.shape(x)}, got {_checks.shape(other)}")
        if other.device != x.device:
            raise ValueError(f"expected tensors on {x.device}, got one on {other.device}")
    return D


def adaln_fwd(x, shift, scale, weight, bias, eps1: float, eps2: float, out_dtype: torch.dtype | None = None):
    """y (x's shape, dtype ``out_dtype`` or x's) and per-row statistics (N, 4) float32: mean1,
    rstd1, mean2, rstd2. ``out_dtype`` is the dtype the next GEMM reads (bf16 under autocast):
    the kernel rounds once on store, so no cast kernel follows."""
    D = _check(x, shift, scale)
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(
            f"weight and bias must have shape ({D}), got {_checks.shape(weight)} and {_checks.shape(bias)}"
        )
    x2, s2, c2 = _rows(x, D), _rows(shift, D), _rows(scale, D)
    N = x2.shape[0]
    y = torch.empty((N, D), device=x.device, dtype=out_dtype or x.dtype)
    stats = torch.empty((N, 4), device=x.device, dtype=torch.float32)
    cfg = row_config(D)
    _adaln_fwd_kernel[(_eager.cdiv(N, cfg["BLOCK_M"]),)](
        x2,
        s2,
        c2,
        weight,
        bias,
        y,
        stats,
        N,
        D,
        x2.stride(0),
        s2.stride(0),
        c2.stride(0),
        y.stride(0),
        eps1,
        eps2,
        **cfg,
    )
    return y.view(x.shape), stats


def adaln_bwd(dy, x, shift, scale, weight, stats):
    """(dx, dshift, dscale, dweight, dbias) for the upstream gradient dy."""
    D = x.shape[-1]
    dy2, x2, s2, c2 = _rows(dy, D), _rows(x, D), _rows(shift, D), _rows(scale, D)
    N = x2.shape[0]
    cfg = row_config(D, backward=True)
    programs = max(1, min(_MAX_BWD_PROGRAMS, _eager.cdiv(N, cfg["BLOCK_M"])))
    dx = torch.empty((N, D), device=x.device, dtype=x.dtype)
    dshift = torch.empty((N, D), device=x.device, dtype=shift.dtype)
    dscale = torch.empty((N, D), device=x.device, dtype=scale.dtype)
    dw_part = torch.empty((programs, D), device=x.device, dtype=torch.float32)
    db_part = torch.empty((programs, D), device=x.device, dtype=torch.float32)
    _adaln_bwd_kernel[(programs,)](
        dy2,
        x2,
        s2,
        c2,
        weight,
        stats,
        dx,
        dshift,
        dscale,
        dw_part,
        db_part,
        N,
        D,
        dy2.stride(0),
        x2.stride(0),
        s2.stride(0),
        c2.stride(0),
        **cfg,
    )
    shape = x.shape
    return (
        dx.view(shape),
        dshift.view(shape),
        dscale.view(shape),
        dw_part.sum(0).to(weight.dtype),
        db_part.sum(0).to(weight.dtype),
    )


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def gated_residual_fwd(x, gate, y):
    """x + gate * y, in the promoted dtype of the three."""
    D = _check(x, gate, y)
    x2, g2, y2 = _rows(x, D), _rows(gate, D), _rows(y, D)
    N = x2.shape[0]
    out = torch.empty((N, D), device=x.device, dtype=_result_dtype(x, gate, y))
    cfg = row_config(D)
    _gated_residual_fwd_kernel[(_eager.cdiv(N, cfg["BLOCK_M"]),)](
        x2,
        g2,
        y2,
        out,
        N,
        D,
        x2.stride(0),
        g2.stride(0),
        y2.stride(0),
        **cfg,
    )
    return out.view(x.shape)


def gated_adaln_fwd(
    x, gate, res, shift, scale, weight, bias, eps1: float, eps2: float, out_dtype: torch.dtype | None = None
):
    """out = x + gate * res (promoted dtype) and y = the modulate-norm of out (``out_dtype``,
    default out's dtype), with out's per-row statistics (N, 4) float32: one kernel for
    gated_residual_fwd then adaln_fwd."""
    D = _check(x, gate, res, shift, scale)
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(
            f"weight and bias must have shape ({D}), got {_checks.shape(weight)} and {_checks.shape(bias)}"
        )
    x2, g2, r2, s2, c2 = (_rows(t, D) for t in (x, gate, res, shift, scale))
    N = x2.shape[0]
    dtype = _result_dtype(x, gate, res)
    out = torch.empty((N, D), device=x.device, dtype=dtype)
    y = torch.empty((N, D), device=x.device, dtype=out_dtype or dtype)
    stats = torch.empty((N, 4), device=x.device, dtype=torch.float32)
    cfg = row_config(D)
    _gated_adaln_fwd_kernel[(_eager.cdiv(N, cfg["BLOCK_M"]),)](
        x2,
        g2,
        r2,
        s2,
        c2,
        weight,
        bias,
        out,
        y,
        stats,
        N,
        D,
        x2.stride(0),
        g2.stride(0),
        r2.stride(0),
        s2.stride(0),
        c2.stride(0),
        eps1,
        eps2,
        **cfg,
    )
    return out.view(x.shape), y.view(x.shape), stats


def gated_residual_bwd(dout, gate, y):
    """(dgate, dy); dx is dout itself."""
    D = gate.shape[-1]
    do2, g2, y2 = _rows(dout, D), _rows(gate, D), _rows(y, D)
    N = do2.shape[0]
    dgate = torch.empty((N, D), device=gate.device, dtype=gate.dtype)
    dy = torch.empty((N, D), device=y.device, dtype=y.dtype)
    cfg = row_config(D)
    _gated_residual_bwd_kernel[(_eager.cdiv(N, cfg["BLOCK_M"]),)](
        do2,
        g2,
        y2,
        dgate,
        dy,
        N,
        D,
        do2.stride(0),
        g2.stride(0),
        y2.stride(0),
        **cfg,
    )
    return dgate.view(gate.shape), dy.view(y.shape)


# ------------------------------------------------------------------ torch.library ops
# lewm_fast::adaln / adaln_bwd, lewm_fast::gated_residual / gated_residual_bwd and
# lewm_fast::gated_adaln (its backward runs adaln_bwd then gated_residual_bwd); the Python
# objects are ``<op>_op``, beside the launchers ``<op>_fwd`` / ``<op>_bwd`` they call.
# Callers use ``adaln`` / ``gated_residual`` / ``gated_adaln``, which run the custom op only
# while something traces (kernels/_eager.py: its dispatch is most of a small call's cost).


@torch.library.custom_op("lewm_fast::adaln", mutates_args=())
def adaln_op(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps1: float,
    eps2: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return adaln_fwd(x, shift, scale, weight, bias, eps1, eps2, out_dtype)


@adaln_op.register_fake
def _(x, shift, scale, weight, bias, eps1, eps2, out_dtype):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty(x.shape, device=x.device, dtype=out_dtype), x.new_empty((n, 4), dtype=torch.float32)


@torch.library.custom_op("lewm_fast::adaln_bwd", mutates_args=())
def adaln_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    stats: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return adaln_bwd(dy, x, shift, scale, weight, stats)


@adaln_bwd_op.register_fake
def _(dy, x, shift, scale, weight, stats):
    return (
        torch.empty(x.shape, device=x.device, dtype=x.dtype),
        torch.empty(x.shape, device=x.device, dtype=shift.dtype),
        torch.empty(x.shape, device=x.device, dtype=scale.dtype),
        torch.empty_like(weight),
        torch.empty_like(weight),
    )


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, eps1, eps2, out_dtype = inputs
    ctx.save_for_backward(x, shift, scale, weight, output[1])


def _adaln_backward(bwd):
    """The backward of lewm_fast::adaln through ``bwd``: the custom op or its launcher."""

    def backward(ctx, dy, dstats):
        x, shift, scale, weight, stats = ctx.saved_tensors
        dx, dshift, dscale, dw, db = bwd(dy.contiguous(), x, shift, scale, weight, stats)
        return dx, dshift, dscale, dw, db, None, None, None

    return backward


adaln_op.register_autograd(_adaln_backward(adaln_bwd_op), setup_context=_adaln_setup)
_Adaln = _eager.function("_Adaln", adaln_fwd, _adaln_setup, _adaln_backward(adaln_bwd), (1,))


def adaln(x, shift, scale, weight, bias, eps1: float, eps2: float, out_dtype: torch.dtype):
    """lewm_fast::adaln's (y, stats), the custom op only where something traces the call
    (:func:`lewm_fast.kernels._eager.call`): the entry point of ``lewm_fast.adaln``."""
    return _eager.call(adaln_op, _Adaln, adaln_fwd, x, shift, scale, weight, bias, eps1, eps2, out_dtype)


@torch.library.custom_op("lewm_fast::gated_residual", mutates_args=())
def gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_fwd(x, gate, y)


@gated_residual_op.register_fake
def _(x, gate, y):
    return torch.empty(x.shape, device=x.device, dtype=_result_dtype(x, gate, y))


@torch.library.custom_op("lewm_fast::gated_residual_bwd", mutates_args=())
def gated_residual_bwd_op(
    dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_bwd(dout, gate, y)


@gated_residual_bwd_op.register_fake
def _(dout, gate, y):
    return torch.empty(gate.shape, device=gate.device, dtype=gate.dtype), torch.empty(
        y.shape, device=y.device, dtype=y.dtype
    )


def _gated_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gated_backward(bwd):
    """The backward of lewm_fast::gated_residual through ``bwd``: the custom op or its launcher."""

    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dgate, dy = bwd(dout.contiguous(), gate, y)
        return dout.to(ctx.x_dtype), dgate, dy

    return backward


gated_residual_op.register_autograd(_gated_backward(gated_residual_bwd_op), setup_context=_gated_setup)
_GatedResidual = _eager.function(
    "_GatedResidual", gated_residual_fwd, _gated_setup, _gated_backward(gated_residual_bwd)
)


def gated_residual(x, gate, y):
    """lewm_fast::gated_residual's output, the custom op only where something traces the call
    (:func:`lewm_fast.kernels._eager.call`): the entry point of ``lewm_fast.gated_residual``."""
    return _eager.call(gated_residual_op, _GatedResidual, gated_residual_fwd, x, gate, y)


@torch.library.custom_op("lewm_fast::gated_adaln", mutates_args=())
def gated_adaln_op(
    x: torch.Tensor,
    gate: torch.Tensor,
    res: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps1: float,
    eps2: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_adaln_fwd(x, gate, res, shift, scale, weight, bias, eps1, eps2, out_dtype)


@gated_adaln_op.register_fake
def _(x, gate, res, shift, scale, weight, bias, eps1, eps2, out_dtype):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    dtype = _result_dtype(x, gate, res)
    return (
        torch.empty(x.shape, device=x.device, dtype=dtype),
        torch.empty(x.shape, device=x.device, dtype=out_dtype),
        x.new_empty((n, 4), dtype=torch.float32),
    )


def _gated_adaln_setup(ctx, inputs, output):
    x, gate, res, shift, scale, weight, bias, eps1, eps2, out_dtype = inputs
    ctx.save_for_backward(gate, res, shift, scale, weight, output[0], output[2])
    ctx.x_dtype = x.dtype


def _gated_adaln_backward(norm_bwd, residual_bwd):
    """The backward of lewm_fast::gated_adaln through ``norm_bwd`` and ``residual_bwd``: the
    custom ops or their launchers."""

    def backward(ctx, dout, dy, dstats):
        gate, res, shift, scale, weight, out, stats = ctx.saved_tensors
        dnorm, dshift, dscale, dw, db = norm_bwd(dy.contiguous(), out, shift, scale, weight, stats)
        dtotal = (dnorm + dout).contiguous()  # out feeds the norm and the caller's residual stream
        dgate, dres = residual_bwd(dtotal, gate, res)
        return dtotal.to(ctx.x_dtype), dgate, dres, dshift, dscale, dw, db, None, None, None

    return backward


gated_adaln_op.register_autograd(
    _gated_adaln_backward(adaln_bwd_op, gated_residual_bwd_op), setup_context=_gated_adaln_setup
)
_GatedAdaln = _eager.function(
    "_GatedAdaln",
    gated_adaln_fwd,
    _gated_adaln_setup,
    _gated_adaln_backward(adaln_bwd, gated_residual_bwd),
    (2,),
)


def gated_adaln(x, gate, res, shift, scale, weight, bias, eps1: float, eps2: float, out_dtype: torch.dtype):
    """lewm_fast::gated_adaln's (out, y, stats), the custom op only where something traces
    the call (:func:`lewm_fast.kernels._eager.call`): the entry point of
    ``lewm_fast.gated_adaln_modulate``."""
    args = (x, gate, res, shift, scale, weight, bias, eps1, eps2, out_dtype)
    return _eager.call(gated_adaln_op, _GatedAdaln, gated_adaln_fwd, *args)
