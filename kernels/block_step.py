"""One predictor block step for planning, in one kernel (spec section 1, ConditionalBlock).

CEM planning rolls the predictor forward for many candidate action sequences at once, one
or a few new tokens per candidate per step, with a key/value cache of the earlier tokens.
``lewm_fast::block_step`` is the whole ``ConditionalBlock`` for those new tokens, forward
only (planning needs no gradient), in one launch: for each new token x (eval mode, no
dropout), with mod = adaLN_modulation(c) split in shift/scale/gate for each branch,

    h   = attn.norm(modulate(LayerNorm(x, eps_norm1), shift_msa, scale_msa))
    q, k, v = h @ W_qkv^T per head; k, v stored in the cache at the token's position
    a   = softmax(q K^T / sqrt(dim_head)) V        causal, over the candidate's cached
                                                    positions 0 .. past + j (token j)
    x1  = x + gate_msa * (a @ W_out^T + b_out)
    h2  = mlp.net[0](modulate(LayerNorm(x1, eps_norm2), shift_mlp, scale_mlp))
    out = x1 + gate_mlp * (gelu_erf(h2 @ W1^T + b1) @ W2^T + b2)

modulate(a, shift, scale) = a * (1 + scale) + shift. Attention reads the keys and values
back from the cache, as stored (rounded to its dtype), like the reference, which reads
them from tensors of that dtype.

Tiling: a program owns ``BLOCK_C`` whole candidates, each as ``T_PAD`` rows (its new
tokens, padded to a power of two), so the tokens that attend to each other live in one
program and the only dependency through the cache is within it (a barrier between the
stores and the loads of each head). The GEMM inputs h and h2 (rows x D) are written once
to the rows' own slots of a scratch in the GEMM dtype (the output itself when its dtype
holds the GEMM dtype exactly) and read back ``BLOCK_K`` columns at a time, so every weight
tile is narrow: tiles spanning all of D spilled kilobytes. The program loops over the
heads: q, k, v (rows x dim_head) from ``BLOCK_K``-chunks of h and W_qkv, the store of k and
v, the softmax's running max and denominator over the cache positions (unrolled: ``past``
and ``t`` are compile-time constants, a handful of pairs in planning), then the head's
output ``BLOCK_DO`` columns at a time, each projected by its (``BLOCK_DO`` x D) tile of
W_out into a float32 (rows x D) accumulator. The MLP loops over the hidden width in chunks
of ``BLOCK_F``: ``gelu(h2 @ W1_chunk^T + b1) @ W2_chunk^T`` into a second accumulator.
Neither q, k, v, the attention output nor the MLP's hidden layer reaches memory; every
program reads all the block's weights (from L2 after the first programs).

GEMM operands are rounded to the Linear weights' dtype: bfloat16/float16 weights multiply
on the tensor cores as they are; float32 weights in three TF32 passes
(``input_precision="tf32x3"``, float32 accuracy: not plain TF32, so float32 planning keeps
the float32 GEMM tolerance). ``"ieee"`` would be exact too, but Triton lowers it to FMA
dots whose operands hold the whole reduction extent in each thread: 7-25 KB of spills at
every tile tried. Everything accumulates in float32 whatever the input dtypes (x, mod and
the LayerNorm parameters may each be float32 or half).

Under the Triton interpreter (``TRITON_INTERPRET=1``), which truncates float32 ->
bfloat16 casts and mis-computes half-precision dots, the kernel rounds to nearest even
by bit arithmetic and multiplies the rounded values in float32: the same numbers.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import triton
import triton.language as tl

from .. import _checks
from ..backend import triton_interpreter
from . import _eager
from ._interpreter import patch_scalar_index
from .adaln import modulate_norm

if triton_interpreter():  # NumPy >= 2.4 with the interpreters of Triton < 3.8
    patch_scalar_index()

MAX_D = 256  # model width: h, the residual and two (rows x D) accumulators stay in registers
MAX_DIM_HEAD = 128
MAX_WINDOW = 16  # past + t: the softmax over cache positions is unrolled
_LOG2E = 1.4426950408889634
_SMS = 132  # streaming multiprocessors assumed off CUDA (an H200's): the compile check's tiles
_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """x (float32) rounded to nearest even in ``dtype``; with ``EMULATE`` (the interpreter,
    whose float32 -> bfloat16 cast truncates) the rounding is done on the bits first, so the
    cast is exact."""
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mm(a, b, PRECISE: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b in float32 on the tensor cores: half operands as they are, float32 ones
    (``PRECISE``) in three TF32 passes (float32 accuracy); with ``EMULATE`` (the interpreter
    mis-computes half dots) exact float32 products of the same operands."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISE:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _modulate_norm(x, mod_row, SHIFT: tl.constexpr, W, B, cols, mask, mask_c, D, eps1, eps2):
    """LayerNorm(modulate(LayerNorm(x, eps1), shift, scale), eps2) * W + B for the rows x
    (ROWS, BLOCK_D) float32, zero where masked; shift and scale are the chunks ``SHIFT`` and
    ``SHIFT + 1`` of the rows' modulation (``mod_row``: each row's pointer)."""
    ptrs = mod_row[:, None] + cols[None, :]
    shift = tl.load(ptrs + SHIFT * D, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(ptrs + (SHIFT + 1) * D, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_c, other=0.0).to(tl.float32)
    y, _, _, _, _ = modulate_norm(x, shift, scale, w, b, mask, D, eps1, eps2)
    return tl.where(mask, y, 0.0)


@triton.jit
def _scores(q, k_rows, p: tl.constexpr, stride_kl, head_cols, tok, mask_kv, qk_scale, PAST: tl.constexpr):
    """q . K[p] * qk_scale for the rows q (ROWS, BLOCK_DH) float32, -inf where position p
    is a later new token than the row's (row j of a candidate sees 0 .. PAST + j).
    ``k_rows``: each row's pointer to its candidate's cache at position 0."""
    k = tl.load(k_rows[:, None] + p * stride_kl + head_cols[None, :], mask=mask_kv, other=0.0)
    s = tl.sum(q * k.to(tl.float32), axis=1) * qk_scale
    if p > PAST:
        s = tl.where(tok >= p - PAST, s, float("-inf"))
    return s


@triton.jit
def _softmax_stats(
    q, k_rows, stride_kl, head_cols, tok, mask_kv, qk_scale, PAST: tl.constexpr, T: tl.constexpr
):
    """Running max and denominator of each row's softmax over the positions 0 .. PAST+T-1
    (base 2: ``qk_scale`` = log2(e) / sqrt(dim_head))."""
    # position 0 is visible to every token: it starts the max, so no row sees -inf - -inf
    run_max = _scores(q, k_rows, 0, stride_kl, head_cols, tok, mask_kv, qk_scale, PAST)
    den = tl.full(run_max.shape, 1.0, tl.float32)
    for p in tl.static_range(1, PAST + T):
        s = _scores(q, k_rows, p, stride_kl, head_cols, tok, mask_kv, qk_scale, PAST)
        new_max = tl.maximum(run_max, s)
        den = den * tl.exp2(run_max - new_max) + tl.exp2(s - new_max)
        run_max = new_max
    return run_max, den


@triton.jit(do_not_specialize=["N"])
def _block_step_fwd_kernel(
    X, MOD, KC, VC, W_QKV, W_OUT, B_OUT, ATTN_W, ATTN_B, MLP_W, MLP_B, W1, B1, W2, B2, OUT, H,
    N, D, F, HEADS, DH,
    stride_xn, stride_xt, stride_mn, stride_mt, stride_kn, stride_kl, stride_vn, stride_vl,
    stride_qkv, stride_wout, stride_w1, stride_w2, stride_on, stride_ot, stride_hn, stride_ht,
    eps_norm1, eps_attn_norm, eps_norm2, eps_mlp_norm, qk_scale,
    PAST: tl.constexpr, T: tl.constexpr, T_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DO: tl.constexpr,
    BLOCK_F: tl.constexpr,
    PRECISE: tl.constexpr, EMULATE: tl.constexpr, KV_ONLY: tl.constexpr,
):  # fmt: skip
    ROWS: tl.constexpr = BLOCK_C * T_PAD
    dot_dtype: tl.constexpr = W_QKV.dtype.element_ty
    r = tl.arange(0, ROWS)
    cand = tl.program_id(0) * BLOCK_C + r // T_PAD  # row r: token r % T_PAD of a candidate
    tok = r % T_PAD
    mask_r = (cand < N) & (tok < T)
    cand64 = cand.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_c = cols < D
    mask = mask_r[:, None] & mask_c[None, :]
    x_ptrs = X + (cand64 * stride_xn + tok * stride_xt)[:, None] + cols[None, :]
    mod_row = MOD + cand64 * stride_mn + tok * stride_mt
    # The GEMM inputs h and h2 go through H (the rows' own slots, in the GEMM dtype or wider):
    # the GEMMs read them back BLOCK_K columns at a time, so a weight tile is BLOCK_K wide,
    # not D (whole-D tiles spill).
    h_row = H + cand64 * stride_hn + tok * stride_ht
    kk = tl.arange(0, BLOCK_K)

    # ---- attention sublayer
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    h = _modulate_norm(x, mod_row, 0, ATTN_W, ATTN_B, cols, mask, mask_c, D, eps_norm1, eps_attn_norm)
    tl.store(h_row[:, None] + cols[None, :], _round(h, dot_dtype, EMULATE).to(H.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    dh = tl.arange(0, BLOCK_DH)
    mask_dh = dh < DH
    do = tl.arange(0, BLOCK_DO)
    inner = HEADS * DH
    k_rows = KC + cand64 * stride_kn
    v_rows = VC + cand64 * stride_vn
    mask_kv = mask_r[:, None] & mask_dh[None, :]
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)  # the attention output projection
    for head in range(HEADS):
        head_cols = head * DH + dh
        q = tl.zeros((ROWS, BLOCK_DH), dtype=tl.float32)
        k = tl.zeros((ROWS, BLOCK_DH), dtype=tl.float32)
        v = tl.zeros((ROWS, BLOCK_DH), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            d = k0 + kk
            mask_d = d < D
            hk = tl.load(h_row[:, None] + d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            hk = hk.to(dot_dtype)
            # W_qkv[head * DH + j, d] as (BLOCK_K, BLOCK_DH) tiles; k's and v's rows follow q's
            w_ptrs = W_QKV + head_cols[None, :] * stride_qkv + d[:, None]
            mask_w = mask_d[:, None] & mask_dh[None, :]
            if not KV_ONLY:
                q += _mm(hk, tl.load(w_ptrs, mask=mask_w, other=0.0), PRECISE, EMULATE)
            k += _mm(hk, tl.load(w_ptrs + inner * stride_qkv, mask=mask_w, other=0.0), PRECISE, EMULATE)
            v += _mm(hk, tl.load(w_ptrs + 2 * inner * stride_qkv, mask=mask_w, other=0.0), PRECISE, EMULATE)
        k_new = k_rows[:, None] + (PAST + tok)[:, None] * stride_kl + head_cols[None, :]
        tl.store(k_new, _round(k, KC.dtype.element_ty, EMULATE), mask=mask_kv)
        v_new = v_rows[:, None] + (PAST + tok)[:, None] * stride_vl + head_cols[None, :]
        tl.store(v_new, _round(v, VC.dtype.element_ty, EMULATE), mask=mask_kv)
        if not KV_ONLY:  # keys/values only: no attention, no output
            tl.debug_barrier()  # the candidate's other tokens read these keys and values back
            # softmax(q K^T / sqrt(dim_head)) V, BLOCK_DO columns at a time, each times its
            # (BLOCK_DO, BLOCK_D) tile of W_out into acc (a whole-head tile spills)
            run_max, den = _softmax_stats(q, k_rows, stride_kl, head_cols, tok, mask_kv, qk_scale, PAST, T)
            for c0 in range(0, DH, BLOCK_DO):
                c = head * DH + c0 + do
                mask_o = (c0 + do) < DH
                o = tl.zeros((ROWS, BLOCK_DO), dtype=tl.float32)
                for p in tl.static_range(PAST + T):
                    s = _scores(q, k_rows, p, stride_kl, head_cols, tok, mask_kv, qk_scale, PAST)
                    vc = tl.load(
                        v_rows[:, None] + p * stride_vl + c[None, :], mask=mask_r[:, None] & mask_o[None, :]
                    )
                    o += tl.exp2(s - run_max)[:, None] * vc.to(tl.float32)
                o = o / den[:, None]
                # W_out[d, c] as a (BLOCK_DO, BLOCK_D) tile
                w_out = tl.load(
                    W_OUT + cols[None, :] * stride_wout + c[:, None],
                    mask=mask_o[:, None] & mask_c[None, :],
                    other=0.0,
                )
                acc += _mm(_round(o, dot_dtype, EMULATE), w_out, PRECISE, EMULATE)

    if not KV_ONLY:
        # ---- MLP sublayer; x is read again rather than held through the head loop
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(mod_row[:, None] + 2 * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b_out = tl.load(B_OUT + cols, mask=mask_c, other=0.0).to(tl.float32)
        x1 = tl.where(mask, x + gate * (acc + b_out[None, :]), 0.0)
        h = _modulate_norm(x1, mod_row, 3, MLP_W, MLP_B, cols, mask, mask_c, D, eps_norm2, eps_mlp_norm)
        tl.debug_barrier()  # every read of the attention's h is done
        tl.store(
            h_row[:, None] + cols[None, :], _round(h, dot_dtype, EMULATE).to(H.dtype.element_ty), mask=mask
        )
        tl.debug_barrier()
        fo = tl.arange(0, BLOCK_F)
        acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + fo
            mask_f = f < F
            a = tl.zeros((ROWS, BLOCK_F), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                d = k0 + kk
                mask_d = d < D
                hk = tl.load(h_row[:, None] + d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
                # W1[f, d] as a (BLOCK_K, BLOCK_F) tile
                w1 = tl.load(
                    W1 + f[None, :] * stride_w1 + d[:, None],
                    mask=mask_d[:, None] & mask_f[None, :],
                    other=0.0,
                )
                a += _mm(hk.to(dot_dtype), w1, PRECISE, EMULATE)
            a += tl.load(B1 + f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
            g = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))  # exact (erf) GELU
            # W2[d, f] as a (BLOCK_F, BLOCK_D) tile
            w2 = tl.load(
                W2 + cols[None, :] * stride_w2 + f[:, None], mask=mask_f[:, None] & mask_c[None, :], other=0.0
            )
            acc += _mm(_round(g, dot_dtype, EMULATE), w2, PRECISE, EMULATE)
        gate = tl.load(mod_row[:, None] + 5 * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b2 = tl.load(B2 + cols, mask=mask_c, other=0.0).to(tl.float32)
        out = x1 + gate * (acc + b2[None, :])
        tl.debug_barrier()  # OUT may be H itself: every read of h2 is done
        out_ptrs = OUT + (cand64 * stride_on + tok * stride_ot)[:, None] + cols[None, :]
        tl.store(out_ptrs, _round(out, OUT.dtype.element_ty, EMULATE), mask=mask)


# ------------------------------------------------------------------------------ launcher


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA), else the H200's 132 the compile check's
    tiles assume."""
    if device.type != "cuda":
        return _SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=64)
def tile_config(N: int, t: int, D: int, F: int, precise: bool, sms: int = _SMS) -> dict:
    """Tile of the kernel for N candidates of t new tokens (width D, MLP width F):
    ``BLOCK_C`` candidates of ``T_PAD`` rows per program, the GEMMs' chunks of D
    (``BLOCK_K``), of the MLP's width (``BLOCK_F``) and of a head's output (``BLOCK_DO``).

    16 rows (``tl.dot``'s least) while 32 would leave fewer programs than the GPU has SMs
    (``sms``: the launcher passes its device's count; 132, an H200's, off CUDA), else 32
    with half-precision weights: more rows read the weights fewer times over; 64 spill.
    Float32 weights (three TF32 passes, twice the operand registers) keep
    16 rows and take smaller chunks. 8 warps, 4 for narrow rows (D <= 64). Registers per
    case and architecture: the compile check (``python -m lewm_fast.kernels._aot --case
    'block_step.*'``).
    """
    t_pad = triton.next_power_of_2(t)
    rows = 32 if not precise and N * t_pad >= sms * 32 else 16
    rows = max(rows, t_pad)
    return {
        "T_PAD": t_pad,
        "BLOCK_C": rows // t_pad,
        "BLOCK_K": min(16 if precise else 32, _pow2(D)),
        "BLOCK_DO": 16,
        "BLOCK_F": min(32 if precise else 64, _pow2(F)),
        "num_warps": 8 if D > 64 else 4,
        "num_stages": 1,
        # ptxas (CUDA 13) otherwise aims for 2-3 programs per SM, caps the registers at 128
        # (8 warps) or 168 (4 warps) and spills 8-32 bytes in some cases; with the cap at
        # the hardware's 255 none spills
        "maxnreg": 255,
    }


def _check(
    x, mod, k_cache, v_cache, past, qkv_weight, out_weight, out_bias, attn_norm_weight, attn_norm_bias,
    mlp_norm_weight, mlp_norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, heads, dim_head,
):  # fmt: skip
    """ValueError, saying what was expected, for any input the kernel cannot take."""
    named = {
        "x": x, "mod": mod, "k_cache": k_cache, "v_cache": v_cache, "qkv_weight": qkv_weight,
        "out_weight": out_weight, "out_bias": out_bias, "attn_norm_weight": attn_norm_weight,
        "attn_norm_bias": attn_norm_bias, "mlp_norm_weight": mlp_norm_weight,
        "mlp_norm_bias": mlp_norm_bias, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias,
        "fc2_weight": fc2_weight, "fc2_bias": fc2_bias,
    }  # fmt: skip
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    heads = _checks.positive(heads, "heads")
    dim_head = _checks.positive(dim_head, "dim_head")
    past = _checks.integer(past, "past", 0)
    for name, rank in (("x", 3), ("mod", 3), ("k_cache", 3), ("v_cache", 3)):
        if named[name].dim() != rank:
            raise ValueError(
                f"{name} must be 3-D (N, t, D) / (N, L, heads*dim_head), got {_checks.shape(named[name])}"
            )
    N, t, D = x.shape
    inner = heads * dim_head
    F = fc1_weight.shape[0] if fc1_weight.dim() == 2 else -1
    L = k_cache.shape[1]
    expected = {
        "mod": (N, t, 6 * D),
        "k_cache": (N, L, inner),
        "v_cache": (N, L, inner),
        "qkv_weight": (3 * inner, D),
        "out_weight": (D, inner),
        "out_bias": (D,),
        "attn_norm_weight": (D,),
        "attn_norm_bias": (D,),
        "mlp_norm_weight": (D,),
        "mlp_norm_bias": (D,),
        "fc1_weight": (F, D),
        "fc1_bias": (F,),
        "fc2_weight": (D, F),
        "fc2_bias": (D,),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"{name} must have shape {_checks.shape(shape)} for x {_checks.shape(x)}, heads={heads}, "
                f"dim_head={dim_head} (inner {inner}), F={F}, cache length {L}; "
                f"got {_checks.shape(named[name])}"
            )
    if t < 1 or past + t > L:
        raise ValueError(f"need 1 <= t and past + t <= cache length: t={t}, past={past}, L={L}")
    if past + t > MAX_WINDOW:
        raise ValueError(f"past + t must be at most {MAX_WINDOW} (the kernel unrolls it), got {past + t}")
    if D > MAX_D or dim_head > MAX_DIM_HEAD:
        raise ValueError(
            f"the kernel takes D <= {MAX_D} and dim_head <= {MAX_DIM_HEAD}, got {D} and {dim_head}"
        )
    for name, t_ in named.items():
        if t_.device != x.device:
            raise ValueError(f"{name} is on {t_.device}, expected x's device {x.device}")
        if t_.dtype not in _GEMM_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t_.dtype}")
        if t_.numel() and t_.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit inner stride, got strides {t_.stride()}")
    gemm = qkv_weight.dtype
    for name in ("out_weight", "fc1_weight", "fc2_weight", "k_cache", "v_cache"):
        if named[name].dtype != gemm:
            raise ValueError(
                f"{name} must have the GEMM dtype (qkv_weight's, {gemm}), got {named[name].dtype}"
            )


def block_step_fwd(
    x, mod, k_cache, v_cache, past: int, qkv_weight, out_weight, out_bias, attn_norm_weight,
    attn_norm_bias, mlp_norm_weight, mlp_norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
    heads: int, dim_head: int, eps_norm1: float, eps_attn_norm: float, eps_norm2: float,
    eps_mlp_norm: float, kv_only: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The ConditionalBlock's output (N, t, D) in x's dtype for t new tokens per candidate.

    x (N, t, D): the new tokens (residual stream); mod (N, t, 6D): their adaLN_modulation
    output (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; any outer
    strides); k_cache, v_cache (N, L, heads*dim_head) in the GEMM dtype (qkv_weight's), any
    outer strides: positions [0, past) hold the earlier tokens' keys and values, and the
    kernel writes the new tokens' at past .. past+t-1 (nothing else). The weights are the
    block's (attn.to_qkv, attn.to_out[0], attn.norm, mlp.net[0], mlp.net[1], mlp.net[4]);
    the Linear weights share one dtype, the GEMMs'. See the module docstring for the formula.

    ``kv_only``: only write the new tokens' keys and values into the caches (their branch
    input and the k/v GEMMs; no query, attention, output projection or MLP) and return an
    empty (N, 0, D) tensor: for the tokens of a window whose outputs nothing reads (the last
    block of a planning step needs only the last token's output; the others' keys and
    values still feed its attention).
    """
    _check(
        x, mod, k_cache, v_cache, past, qkv_weight, out_weight, out_bias, attn_norm_weight,
        attn_norm_bias, mlp_norm_weight, mlp_norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
        heads, dim_head,
    )  # fmt: skip
    N, t, D = x.shape
    F = fc1_weight.shape[0]
    out = torch.empty((N, 0 if kv_only else t, D), device=x.device, dtype=x.dtype)
    if N == 0:
        return out
    precise = qkv_weight.dtype == torch.float32
    cfg = tile_config(N, t, D, F, precise, _sm_count(x.device))
    # out doubles as the scratch of the GEMM inputs when it holds the GEMM dtype exactly
    exact = not kv_only and (x.dtype == qkv_weight.dtype or x.dtype == torch.float32)
    h = out if exact else torch.empty((N, t, D), device=x.device, dtype=qkv_weight.dtype)
    if kv_only:
        out = h  # never written: only its pointer and strides are passed
    _block_step_fwd_kernel[(_eager.cdiv(N, cfg["BLOCK_C"]),)](
        x, mod, k_cache, v_cache, qkv_weight, out_weight, out_bias, attn_norm_weight, attn_norm_bias,
        mlp_norm_weight, mlp_norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out, h,
        N, D, F, heads, dim_head,
        x.stride(0), x.stride(1), mod.stride(0), mod.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), qkv_weight.stride(0), out_weight.stride(0),
        fc1_weight.stride(0), fc2_weight.stride(0), out.stride(0), out.stride(1), h.stride(0), h.stride(1),
        eps_norm1, eps_attn_norm, eps_norm2, eps_mlp_norm, _LOG2E / math.sqrt(dim_head),
        PAST=past, T=t, BLOCK_D=_pow2(D), BLOCK_DH=_pow2(dim_head), PRECISE=precise,
        EMULATE=triton_interpreter(), KV_ONLY=kv_only, **cfg,
    )  # fmt: skip
    return torch.empty((N, 0, D), device=x.device, dtype=x.dtype) if kv_only else out


# ------------------------------------------------------------------ torch.library op
# lewm_fast::block_step, forward only (planning), mutating the two caches; its Python object
# is ``block_step_op``. Callers use ``block_step``, which runs the custom op only while
# something traces (kernels/_eager.py: its dispatch is most of a small call's host cost).


@torch.library.custom_op("lewm_fast::block_step", mutates_args=("k_cache", "v_cache"))
def block_step_op(
    x: torch.Tensor,
    mod: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    past: int,
    qkv_weight: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    attn_norm_weight: torch.Tensor,
    attn_norm_bias: torch.Tensor,
    mlp_norm_weight: torch.Tensor,
    mlp_norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    heads: int,
    dim_head: int,
    eps_norm1: float,
    eps_attn_norm: float,
    eps_norm2: float,
    eps_mlp_norm: float,
    kv_only: bool = False,
) -> torch.Tensor:
    return block_step_fwd(
        x, mod, k_cache, v_cache, past, qkv_weight, out_weight, out_bias, attn_norm_weight,
        attn_norm_bias, mlp_norm_weight, mlp_norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
        heads, dim_head, eps_norm1, eps_attn_norm, eps_norm2, eps_mlp_norm, kv_only,
    )  # fmt: skip


@block_step_op.register_fake
def _(x, mod, k_cache, v_cache, past, *rest):
    kv_only = len(rest) > 17 and rest[17]
    n, t, d = x.shape
    return torch.empty((n, 0 if kv_only else t, d), device=x.device, dtype=x.dtype)


def block_step(*args, **kwargs) -> torch.Tensor:
    """lewm_fast::block_step's output, with :func:`block_step_fwd`'s arguments: the custom op
    where something traces the call (:func:`lewm_fast.kernels._eager.tracing`), else the
    launcher directly. Forward only: RuntimeError if grad mode is on and an input requires
    grad (planning runs under ``torch.no_grad()`` or ``torch.inference_mode()``).
    Positional arguments are the fast path (keywords are bound to positions first)."""
    if kwargs:
        args = _SIGNATURE.bind(*args, **kwargs).args
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "lewm_fast::block_step is forward-only (planning): call it under torch.no_grad() or "
            "torch.inference_mode(), or detach the inputs that require grad"
        )
    if _eager.tracing(tensors):
        return block_step_op(*args)
    return block_step_fwd(*args)


_SIGNATURE = inspect.signature(block_step_fwd)


# -------------------------------------------------------------------- compile cases


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (D, heads, dim_head, F): the LeWM predictor's block and odd shapes
_REAL = (192, 16, 64, 2048)
_ODD = {"D=48,H=3,dh=16,F=100": (48, 3, 16, 100), "D=20,H=2,dh=10,F=33": (20, 2, 10, 33)}


def compile_cases():
    """``(name, call)`` pairs for the compile-faithful check (``_aot.py``): the launcher as
    planning calls it -- x and mod slices of bigger tensors, caches views into a (depth, N,
    L, inner) buffer -- at the real block and planning sizes (N = 300 for one environment,
    15,000 for fifty; t = 1 after 0, 1 or 2 cached tokens, and the t = 3 first step) with
    bfloat16 and float32 weights, float32 tokens with bfloat16 weights and modulation, the
    float16 first step, two odd shapes, and the keys/values-only step (``kv_only``: the
    first two tokens of a shifted window in the last block) in bfloat16 and float32."""
    steps = ((0, 1), (1, 1), (2, 1), (0, 3))
    runs = []
    for n in (300, 15_000):
        for past, t in steps:
            for w in (torch.bfloat16, torch.float32):
                name = f"{_DTYPE_NAMES[w]},N={n},past={past},t={t}"
                runs.append((name, _REAL, n, past, t, (w, w, w)))
        runs.append(
            (f"fp32+bf16,N={n},past=2,t=1", _REAL, n, 2, 1, (torch.float32, torch.bfloat16, torch.bfloat16))
        )
    runs.append(("fp16,N=300,past=0,t=3", _REAL, 300, 0, 3, (torch.float16,) * 3))
    for label, shape in _ODD.items():
        runs.append((f"fp32,{label},N=7,past=1,t=2", shape, 7, 1, 2, (torch.float32,) * 3))
        runs.append((f"bf16,{label},N=7,past=1,t=2", shape, 7, 1, 2, (torch.bfloat16,) * 3))
    runs = [(*run, False) for run in runs]
    runs.append(("bf16,N=15000,past=0,t=2,kv_only", _REAL, 15_000, 0, 2, (torch.bfloat16,) * 3, True))
    runs.append(("fp32,N=300,past=0,t=2,kv_only", _REAL, 300, 0, 2, (torch.float32,) * 3, True))
    for name, shape, n, past, t, dtypes, kv_only in runs:
        yield f"block_step_fwd[{name}]", functools.partial(_compile_case, shape, n, past, t, dtypes, kv_only)


def _compile_case(shape, N, past, t, dtypes, kv_only=False):
    # Nothing runs, so the values do not matter: uninitialised tensors of the right layout.
    (D, heads, dim_head, F), (x_dtype, mod_dtype, w_dtype) = shape, dtypes
    inner, L, depth = heads * dim_head, 3 if past + t <= 3 else past + t, 6
    x = torch.empty(N, L, D, dtype=x_dtype)[:, past : past + t]
    mod = torch.empty(N, L, depth * 6 * D, dtype=mod_dtype)[:, past : past + t, 6 * D : 12 * D]
    k_cache, v_cache = torch.empty(2, depth, N, L, inner, dtype=w_dtype)[:, 1]
    norms = [torch.empty(D) for _ in range(4)]
    block_step_fwd(
        x, mod, k_cache, v_cache, past, torch.empty(3 * inner, D, dtype=w_dtype),
        torch.empty(D, inner, dtype=w_dtype), torch.empty(D), *norms,
        torch.empty(F, D, dtype=w_dtype), torch.empty(F), torch.empty(D, F, dtype=w_dtype), torch.empty(D),
        heads, dim_head, 1e-6, 1e-5, 1e-6, 1e-5, kv_only,
    )  # fmt: skip
