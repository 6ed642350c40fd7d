"""A performance model that runs on the CPU: kernels, FLOPs and bytes of the CUDA fast path,
and projected times on named GPUs. Every number here is a PROJECTION, never a measurement.

``lewm-fast bench --model [--out DIR]`` (or ``python -m bench --model``) writes
``DIR/model.json`` and ``DIR/model.md`` (default DIR: ``bench/model``) for:

- one CEM plan of 1 env and of 50 envs at the published setting (horizon 5, 300 samples,
  30 iterations, top 30), per CEM iteration and per plan, fp32 and bf16 (the solver's
  ``autocast=torch.bfloat16`` path, i.e. its :class:`LowPrecisionWeights` copy under
  autocast), paper-size model (``LeWMConfig.preset("paper")``);
- one training step at batch 128, 4 frames of 224 px, under each memory plan (``whole``,
  ``checkpoint``, ``two_pass``), fp32 and bf16 autocast: :func:`lewm_fast.train.forward_backward`
  (forward and backward; the optimizer step and gradient clipping are NOT included), eager,
  and as projected under ``TrainConfig.compile`` (below, "torch.compile");
- one SIGReg forward and backward at the training size (T=4, B=128, D=192, P=1024, 17 knots)
  on given directions, as ``bench_sigreg`` times it, z in fp32 and in bf16 (the embedding's
  dtype under the recipe's bf16 autocast): :func:`sigreg_counts`.

How it runs without a GPU
-------------------------
The model's tensors are fake CUDA tensors (``torch._subclasses.fake_tensor.FakeTensorMode``;
parameters are replaced by ``torch.empty_strided(..., device="cuda")`` made inside the
mode). Fake tensors carry shapes, dtypes and the CUDA dispatch keys but do no math, so
``backend="auto"`` picks the fused Triton ops (their registered fake implementations run)
and ``torch.autocast("cuda")`` applies. Three things a CPU-only torch cannot do are
handled explicitly:

1. *Planning* does not go through ``CEMSolver.solve`` (it needs a real device for CUDA
   graphs and generators): :func:`plan_counts` runs what the solve's graph holds --
   ``PlanningCost.encode`` once, then per iteration the body of ``CEMSolver._run``
   (``randn``, ``noise * std + mean``, candidate 0 = mean, ``PlanningCost.rollout_cost``,
   the csrc ``lewm_fast::cem_refit`` op, the NaN count) -- eagerly and without capture.
   One iteration is counted; a plan is the encoder pass plus ``n_steps`` iterations
   (every iteration issues the same kernels).
2. *Attention*: a CPU-only torch has no CUDA SDPA backends, so ``F.scaled_dot_product_attention``
   would decompose into the math path. A ``TorchFunctionMode`` routes it to the kernel the
   CUDA build picks for these shapes instead: ``aten._scaled_dot_product_flash_attention``
   for bf16/fp16 and ``aten._scaled_dot_product_efficient_attention`` for fp32 (head dim
   64; the priority order of ``torch.backends.cuda.sdp_kernel``: flash, then
   memory-efficient; also what :func:`lewm_fast.backend.choose_sdpa` picks for the encoder
   on sm80+ unless torch itself prefers cuDNN, which is not modelled). Their backward ops
   come from autograd.
3. *Device guard and autograd*: integer indexing of a CUDA tensor and recording its
   gradient need a CUDA device guard, which a torch built without CUDA lacks. There a
   10-line C++ file registering c10's no-op device guard for CUDA is compiled once
   (``torch.utils.cpp_extension``, cached next to the csrc builds) and loaded into the
   process (a torch with CUDA keeps its own guard). It needs a C++ compiler and ninja;
   without them the model raises saying so. The backward engine also needs a CUDA
   accelerator, so ``Tensor.backward`` is replaced *while counting only* by
   :func:`_walk_backward`, which calls the autograd graph's nodes in topological order
   in this thread, reduces and casts each gradient to the shape and dtype its node
   takes (as the engine's ``validate_outputs``), adds gradients that meet (``a + b``,
   one kernel each, as the engine's input buffer does) and hands a parameter its
   gradient as AccumulateGrad does (the buffer itself, no copy, when the strides match);
   the walk is used on every machine so the counts do not depend on it.
   ``torch.autocast("cuda")`` switches itself off when no GPU is present; while
   counting, its two availability checks are made to answer yes.

The counting rule (what becomes a kernel)
-----------------------------------------
Ops are counted at the ATen level by a ``TorchDispatchMode`` under the fake mode:

- free (0 kernels, 0 bytes): views and metadata (every op whose schema returns an alias
  of an input: view, reshape of a contiguous tensor, transpose, t, expand, split, chunk,
  unbind, select, slice, squeeze, unsqueeze, permute, alias, detach, ``_unsafe_view``,
  ``as_strided``), ``prim.device``, and allocations (``empty``, ``empty_strided``,
  ``new_empty``, ``empty_like``);
- ``lewm_fast::*`` custom ops: the kernels their launchers issue (:data:`CUSTOM_KERNELS`,
  read from ``kernels/adaln.py``, ``kernels/block_step.py`` and ``csrc/cem_refit_cuda.cu``),
  e.g. ``block_step`` = one kernel for a whole predictor block on the new tokens, ``adaln_bwd`` = the
  backward kernel + the two partial-row sums of dweight/dbias, ``cem_refit`` = one
  ``cem_refit_kernel`` launch; the SIGReg ops are itemised kernel by kernel
  (:func:`sigreg_kernels`, read from ``kernels/sigreg.py``): ``sigreg`` = the fused
  kernel + ``partial.sum()``, ``sigreg_bwd`` = the grad_x kernel + the cuBLAS
  ``grad_z = grad_x @ A^T`` (+ the cast to z's dtype for half z, + z^T grad_x when A needs
  a gradient);
- ATen ops that launch more than one kernel on CUDA (:data:`ATEN_KERNELS`): layer-norm
  backward with affine gradients (the dX kernel + the gamma/beta kernel), batch norm in
  training (statistics + apply; backward: reduce + elementwise), flash-attention backward
  (the dO.O preprocessing, the main kernel, the dQ conversion);
- every other ATen op is one kernel (a cuBLAS ``mm``/``addmm``/``bmm`` included: split-K
  or epilogue kernels cuBLAS may add are not counted; a Python-scalar ``scalar_tensor``
  or ``fill_`` is one kernel).

FLOPs per op are ``torch.utils.flop_counter``'s formulas (the registry
``FlopCounterMode`` uses: matmuls, convolutions, attention), the GEMM and attention work
of ``block_step`` (:func:`block_step_flops`), plus for the SIGReg kernels
their GEMM work (the forward kernel ``2 T B D P``; the backward kernel recomputes x,
``2 T B D P``, and the grad_z matmul is another ``2 T B D P``). Elementwise work counts
0 FLOPs (it is priced by its bytes), except the trigonometry inside the SIGReg kernels,
their main work: per (t, b, p) one sincos (:data:`SINCOS_FLOPS`), then for each knot after
the first a rotation (:data:`ROTATION_FLOPS`, from the second on) and its use (forward: 2,
the two batch sums; backward: 4, ``a_k cos - b_k sin`` into grad_x).

Bytes per kernel = bytes of its distinct tensor inputs + bytes of its outputs, each
tensor's elements counted once (an input passed twice counts once; a stride-0 broadcast
dimension counts once; an argument the op writes in place counts as written, not read).
A custom op's bytes are its op-level inputs and outputs (what its kernels must read and
write at least once), not its internal re-reads; an intermediate its launcher writes to
memory and reads back counts in both kernels (SIGReg's grad_x: written by the backward
kernel, read by the grad_z matmul).

torch.compile (a projection of a projection)
--------------------------------------------
Inductor was not run: compiling for CUDA needs a GPU. The compiled step's kernels are
projected from the eager step's, counted once with each compiled graph marked: the
forward of each piece :func:`lewm_fast.train.compile_step` compiles for the plan
(``whole_objective``; two_pass: ``encode_frames`` per chunk, ``head_objective``) and each
``backward`` call is one graph ("segment"); what runs between the pieces (two_pass's
``torch.cat`` and loop, the returned losses) stays eager. Every counted kernel records
which storages it reads (and which kernel wrote each) and writes. Then, per graph:

1. *Extern kernels stay as counted*: matmuls (``mm``/``addmm``/``bmm``), convolutions,
   attention (:data:`EXTERN`) and every ``lewm_fast::*`` custom op; inductor's default
   mode calls them as library kernels, without fusing neighbours into them.
2. *Common subexpressions merge*: an op repeating an earlier one of the same graph on the
   same input versions (autocast casts an activation once per Linear reading it) is
   dropped and its readers read the first one's output (AOTAutograd's CSE). Random ops
   never merge.
3. *Fusion*: the remaining (pointwise, reduction, normalisation, copy, random) kernels,
   split into runs between two extern kernels in program order, are joined along
   producer -> consumer edges inside a run; each joined group is one kernel per reduction
   it holds (:data:`REDUCTIONS`; a row-statistics LayerNorm is one, its backward with
   affine gradients two, a training BatchNorm one, ...), at least one.
4. *Bytes of a fused kernel* = the distinct tensors it reads from outside the group + the
   tensors it writes that something outside the group reads later (another kernel, the
   backward pass) or that outlive the step (gradients, BatchNorm statistics, the
   returned losses); intermediates stay in registers, and a group whose results nothing
   uses is dropped.
5. With CUDA graphs (the ``whole`` plan, as ``compile_step`` asks on CUDA), graph trees copy
   each fresh batch tensor into their static inputs (one copy kernel each, read + write)
   and the step clones its two losses.

Not modelled, so the projection errs high on bytes and kernels: the min-cut partitioner
recomputing cheap ops in the backward instead of saving them, horizontal fusion of
independent ops (e.g. the weight casts), epilogue fusion into matmuls (max-autotune);
and low: split reductions (one large reduction as two kernels).

A kernel's dtype, which picks the peak its FLOPs run at, is that of its first
floating-point input (mm: ``mat1``, attention: ``q`` or ``grad_out``), else of its first
floating-point output; ``block_step``'s is its Linear weights' (:data:`CUSTOM_DTYPES`: its
first input is the residual stream, float32 in bf16 planning).

Projected time of a kernel on a device = ``max(flops / peak_flops(dtype), bytes /
bandwidth)``, summed over kernels, plus ``launches x per-launch cost`` (one value for a
CUDA-graph replay, one for eager launch); the SIGReg kernels' trigonometry runs at the
float32 peak whatever their dtype (``Kernel.fp32_flops``). The peak table :data:`DEVICES` names a source
for every figure; the per-launch costs are assumptions (see :data:`LAUNCH_US`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lewm_fast.reference.jepa import action_width_of

__all__ = [
    "CUSTOM_KERNELS",
    "CUSTOM_FLOPS",
    "CUSTOM_DTYPES",
    "BLOCK_STEP_CAVEAT",
    "block_step_flops",
    "sigreg_kernels",
    "sigreg_trig_flops",
    "ATEN_KERNELS",
    "EXTERN",
    "REDUCTIONS",
    "compiled_kernels",
    "DEVICES",
    "LAUNCH_US",
    "KernelCounter",
    "count",
    "fake_cuda",
    "plan_counts",
    "train_counts",
    "sigreg_counts",
    "build_model",
    "project",
    "model_markdown",
    "workloads",
    "run_model",
    "write",
]

# --------------------------------------------------------------------------- counting rule

# Kernels each lewm_fast custom op launches (read from its launcher).
CUSTOM_KERNELS = {
    "adaln": 1,  # _adaln_fwd_kernel
    "adaln_bwd": 3,  # _adaln_bwd_kernel + dw_part.sum(0) + db_part.sum(0)
    "gated_residual": 1,  # _gated_residual_fwd_kernel
    "gated_residual_bwd": 1,  # _gated_residual_bwd_kernel
    "gated_adaln": 1,  # _gated_adaln_fwd_kernel
    "cem_refit": 1,  # cem_refit_kernel<<<envs, ...>>> (csrc/cem_refit_cuda.cu)
    "block_step": 1,  # _block_step_fwd_kernel: a whole predictor block on new tokens
}


def block_step_flops(args) -> int:
    """GEMM and attention FLOPs of ``lewm_fast::block_step`` (x (N, t, D), ..., past, to_qkv
    (3 inner, D), ..., fc1 (F, D), ...): per new token q/k/v, the output projection and the
    MLP's two GEMMs, and attention over its past + j + 1 positions (q.k and p.v, 2 inner
    FLOPs per position each); with ``kv_only`` the key and value GEMMs alone. The kernel's
    padding of D and F to powers of two is not counted."""
    x, past, qkv, fc1 = args[0], args[4], args[5], args[12]
    n, t, d = x.shape
    inner, f = qkv.shape[0] // 3, fc1.shape[0]
    if len(args) > 22 and args[22]:  # kv_only: the keys and values alone
        return int(n * t * 2 * d * 2 * inner)
    gemms = n * t * (2 * d * 3 * inner + 2 * inner * d + 2 * 2 * d * f)
    positions = sum(past + j + 1 for j in range(t))
    return int(gemms + n * 4 * inner * positions)


# What the plan rows leave out (model.md and the README say it under the tables)
BLOCK_STEP_CAVEAT = (
    "A plan's predictor block step is one kernel (`lewm_fast::block_step`) priced by its own "
    "inputs and outputs; the kernel also re-reads the block's weights (3.1 MB in bf16) in each "
    "program of 16-32 candidate rows, from L2, and a 1-env plan runs 19 such programs on a GPU's "
    "100+ SMs: neither is modelled, so the model's plan rows are lower bounds until measured."
)

# FLOPs of the custom ops whose work is GEMMs (the others are priced by their bytes)
CUSTOM_FLOPS = {"block_step": block_step_flops}
# The dtype a custom op's GEMMs run in, where it is not its first floating-point input's:
# block_step multiplies in its Linear weights' dtype (bf16 planning keeps a float32
# residual stream x, the first input, but bf16 weights)
CUSTOM_DTYPES = {"block_step": lambda args: args[5].dtype}

# ATen ops that launch more than one CUDA kernel; a callable gets (args, kwargs).
ATEN_KERNELS = {
    # dX kernel, plus the gamma/beta gradient kernel when affine gradients are requested
    "native_layer_norm_backward": lambda args, kwargs: 1 + int(any(args[-1][1:])),
    # training: batch statistics, then normalise (eval: one kernel)
    "native_batch_norm": lambda args, kwargs: 2 if args[5] else 1,
    "_native_batch_norm_legit": lambda args, kwargs: 2 if args[5] else 1,
    "_native_batch_norm_legit_functional": lambda args, kwargs: 2 if args[5] else 1,
    "native_batch_norm_backward": lambda args, kwargs: 2,  # reduce, then elementwise
    "_scaled_dot_product_flash_attention_backward": lambda args, kwargs: 3,  # dO.O, main, dQ convert
}

# torch.compile projection: ATen ops inductor leaves as library calls of their own ("extern
# kernels"); every lewm_fast custom op is one as well. All other ops are fusible.
EXTERN = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "convolution_backward",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward",
    "_flash_attention_forward",
    "_flash_attention_backward",
    "_efficient_attention_forward",
    "_efficient_attention_backward",
}

# Reductions a fusible op brings into its fused kernel group: one kernel each (a group of
# pointwise ops only is one kernel). A callable gets (args, kwargs).
REDUCTIONS = {
    "sum": 1,
    "mean": 1,
    "amax": 1,
    "amin": 1,
    "max": 1,
    "min": 1,
    "var": 1,
    "var_mean": 1,
    "std": 1,
    "norm": 1,
    "linalg_vector_norm": 1,
    "any": 1,
    "all": 1,
    "_softmax": 1,
    "_log_softmax": 1,
    "_softmax_backward_data": 1,
    "_log_softmax_backward_data": 1,
    "native_layer_norm": 1,  # the row statistics; normalising fuses into the same kernel
    "native_layer_norm_backward": ATEN_KERNELS["native_layer_norm_backward"],  # rows, then gamma/beta
    "native_batch_norm": lambda args, kwargs: int(bool(args[5])),  # training: the batch statistics
    "_native_batch_norm_legit": lambda args, kwargs: int(bool(args[5])),
    "_native_batch_norm_legit_functional": lambda args, kwargs: int(bool(args[5])),
    "native_batch_norm_backward": 1,  # the sums over the batch; dX fuses into its consumers
}


# ops that draw random numbers: two of them never compute the same value
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "exponential", "multinomial")


def _reductions(name: str, args, kwargs) -> int:
    rule = REDUCTIONS.get(name, 0)
    return rule(args, kwargs) if callable(rule) else rule


FREE = {
    "empty",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "empty_like",
    "device",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "lift_fresh",
    "_unsafe_view",  # a view whose result autograd treats as a fresh tensor
    "_reshape_alias",
    "promote_types",  # dtype arithmetic on the host: no tensor, no kernel
    "result_type",
}


SIGREG_OPS = ("sigreg", "sigreg_bwd", "sigreg_trig_sums", "sigreg_trig_sums_bwd")
# Floating-point operations of the SIGReg kernels' trigonometry per (t, b, p): the sincos
# of ``kernels/sigreg.py`` (a three-part quadrant reduction and two degree-3 polynomials, with
# the quadrant's sign flips) and one rotation by dt x (4 multiplies, 2 adds) per further knot.
SINCOS_FLOPS = 20
ROTATION_FLOPS = 6


def sigreg_trig_flops(T: int, B: int, P: int, knots: int, use: int) -> int:
    """FLOPs of one sincos per (t, b, p) and knots 1 .. K - 1 reached by rotation, each used
    with ``use`` operations (forward 2, backward 4)."""
    return T * B * P * (SINCOS_FLOPS + (knots - 2) * ROTATION_FLOPS + (knots - 1) * use)


def sigreg_kernels(name: str, args) -> list[Kernel]:
    """The kernels one ``lewm_fast::<name>`` SIGReg op launches (``kernels/sigreg.py``), each
    with its FLOPs (GEMM and trigonometry) and the bytes it reads and writes once (sizes at
    T=4, B=128, D=192, P=1024, K=17, float32 z):

    - ``sigreg`` / ``sigreg_trig_sums``: ``_sigreg_fwd_kernel`` reads z (384 KiB), A
      (768 KiB), phi and w, writes the sums (2, T, K, P) float32 (544 KiB) and, for
      ``sigreg``, one float32 share per program, which ``partial.sum()`` adds; under
      Triton < 3.3 (``TUPLE_ACCUMULATORS`` false) the forward is ``_sigreg_fwd_loop_kernel``,
      counted with the same FLOPs and bytes, and a division by T P follows the sum;
    - ``sigreg_bwd`` / ``sigreg_trig_sums_bwd``: ``_sigreg_bwd_kernel`` reads z, A and the
      sums (or d loss / d sums), writes grad_x (T, B, P) float32 (2 MiB); the cuBLAS
      ``grad_x @ A^T`` reads grad_x and A, writes grad_z float32; a cast to z's dtype
      follows for half z; with A needing a gradient, ``z^T @ grad_x`` (after copying a
      strided z to (T B, D), and a half z to float32).

    Each kernel runs at its operands' rate, as every counted kernel does: the two fused
    kernels at z's dtype (their projection is a ``tl.dot`` in z's dtype), except their
    trigonometry, float32 arithmetic whatever z's dtype, which is priced at the float32 rate
    (``Kernel.fp32_flops``); the matmuls and the partial sum at float32.
    :class:`KernelCounter` gives the op's dataflow to these kernels like any other op's: its
    inputs are read by the first, its outputs written by the last.
    """
    from lewm_fast.kernels import sigreg as kernel

    f32 = torch.float32
    if name in ("sigreg", "sigreg_trig_sums"):
        z, A, phi, weights, _ = args
        T, B, D = z.shape
        P, K = A.shape[1], phi.shape[0]
        sums = 2 * T * K * P * 4
        reads = tensor_bytes(z) + tensor_bytes(A) + tensor_bytes(phi) + tensor_bytes(weights)
        trig = sigreg_trig_flops(T, B, P, K, use=2)
        flops = 2 * T * B * D * P + trig
        if name == "sigreg_trig_sums":
            return [Kernel(f"lewm_fast::{name}", 1, flops, reads + sums, str(z.dtype), fp32_flops=trig)]
        tiles = kernel.fwd_config(B) if kernel.TUPLE_ACCUMULATORS else kernel.fwd_loop_config(D, P)
        shares = T * -(-P // tiles["BLOCK_P"]) * 4
        out = [
            Kernel("lewm_fast::sigreg", 1, flops, reads + sums + shares, str(z.dtype), fp32_flops=trig),
            Kernel("lewm_fast::sigreg (partial.sum)", 1, 0, shares + 4, str(f32)),
        ]
        if not kernel.TUPLE_ACCUMULATORS:  # Triton < 3.3: the sum is divided by T P
            out.append(Kernel("lewm_fast::sigreg (divide)", 1, 0, 8, str(f32)))
        return out
    if name == "sigreg_bwd":
        grad, z, A, sums, phi, weights, _, need_grad_A = args
        coefficients = sum(tensor_bytes(t) for t in (grad, sums, phi, weights))
    else:
        grad_sums, z, A, _, need_grad_A = args
        sums, coefficients = grad_sums, tensor_bytes(grad_sums)
    T, B, D = z.shape
    P, K = A.shape[1], sums.shape[2]
    gemm = 2 * T * B * D * P
    grad_x, grad_z32 = T * B * P * 4, T * B * D * 4
    z_bytes, a_bytes = tensor_bytes(z), tensor_bytes(A)

    def step(what: str, flops: int, nbytes: int, dtype: torch.dtype = f32) -> Kernel:
        return Kernel(f"lewm_fast::{name} ({what})", 1, flops, nbytes, str(dtype))

    trig = sigreg_trig_flops(T, B, P, K, use=4)
    fused_bytes = z_bytes + a_bytes + coefficients + grad_x
    out = [
        Kernel(f"lewm_fast::{name}", 1, gemm + trig, fused_bytes, str(z.dtype), fp32_flops=trig),
        step("mm grad_z", gemm, grad_x + a_bytes + grad_z32),
    ]
    if z.dtype != f32:
        out.append(step("cast grad_z", 0, grad_z32 + z_bytes))
    if need_grad_A:
        if not z.is_contiguous():  # z.reshape(T B, D) copies a strided z
            out.append(step("copy z", 0, 2 * z_bytes, z.dtype))
        if z.dtype != f32:
            out.append(step("z as float32", 0, z_bytes + grad_z32))
        out.append(step("mm grad_A", gemm, grad_z32 + grad_x + D * P * 4))
    return out


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _storage(t: torch.Tensor) -> int:
    """An id of the storage ``t`` views (a freed storage's id may be reused by a later
    allocation; the dataflow is still right because every allocation is written before
    it is read, which makes its writer the producer)."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return id(t)


def _key(t: torch.Tensor) -> tuple:
    try:
        storage = t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        storage = id(t)
    return (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a stride-0 dimension counts once)."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size() if t.numel() else 0


def _is_free(func) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in FREE or func.namespace == "prim":
        return True
    # an op whose every output aliases an input without writing it is a view
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@dataclass
class Kernel:
    op: str
    launches: int
    flops: int
    bytes: int
    dtype: str  # its first floating-point input's (else output's) dtype: the peak it runs at
    fp32_flops: int = 0  # of ``flops``, those at the float32 rate whatever ``dtype`` (SIGReg's trig)
    # For the compiled projection (see "torch.compile" in the module docstring):
    segment: int | None = None  # the compiled graph it would belong to (None: runs eagerly)
    extern: bool = True  # kept as its own kernel by inductor (GEMM, attention, custom op)
    reductions: int = 0  # reduction kernels it needs when fused
    reads: tuple = ()  # (storage, bytes, index of the kernel that wrote it or -1)
    writes: tuple = ()  # (storage, bytes)
    signature: tuple | None = None  # equal for ops computing equal values (None: never merged)


@dataclass
class Tally:
    """What one region of work launches: totals and a per-op breakdown."""

    kernels: list[Kernel] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels)

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self.kernels)

    def by_op(self) -> dict[str, int]:
        out: Counter = Counter()
        for k in self.kernels:
            out[k.op] += k.launches
        return dict(out.most_common())

    def summary(self) -> dict[str, Any]:
        return {"launches": self.launches, "flops": self.flops, "bytes": self.bytes}


class KernelCounter(TorchDispatchMode):
    """Counts kernels, FLOPs and bytes of the ATen/custom ops it sees (see the module docstring)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import FlopCounterMode

        self._flop_registry = FlopCounterMode().flop_registry
        self.tally = Tally()
        self.segment: int | None = None  # set by _graph_segments while a compiled piece runs
        self.last_writer: dict[int, int] = {}  # storage -> index of the kernel that wrote it last

    def _flops(self, func, args, kwargs, out) -> int:
        formula = self._flop_registry.get(func._overloadpacket)
        if formula is None:
            return 0
        return int(formula(*args, **kwargs, out_val=out))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_free(func):
            return out
        name = func._schema.name.split("::")[-1]
        itemised = func.namespace == "lewm_fast" and name in SIGREG_OPS
        if itemised:
            launches = flops = 0  # sigreg_kernels lists the kernels, FLOPs and bytes
        elif func.namespace == "lewm_fast":
            if name not in CUSTOM_KERNELS:
                raise KeyError(f"lewm_fast::{name} has no kernel count in CUSTOM_KERNELS")
            launches = CUSTOM_KERNELS[name]
            flops = CUSTOM_FLOPS[name](args) if name in CUSTOM_FLOPS else 0
        else:
            rule = ATEN_KERNELS.get(name)
            launches = rule(args, kwargs) if rule else 1
            flops = self._flops(func, args, kwargs, out)
        written = {
            i
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        }
        reads, writes = {}, {}
        positional = list(args) + [
            kwargs[a.name] for a in func._schema.arguments[len(args) :] if a.name in kwargs
        ]
        for i, value in enumerate(positional):
            for t in _tensors(value):
                (writes if i in written else reads)[_key(t)] = t
        for t in _tensors(out):
            writes.setdefault(_key(t), t)
        tensors = [*reads.values(), *writes.values()]
        # the rate a kernel runs at is its operands': the first floating-point input (an
        # attention kernel's float32 log-sum-exp output does not make it a float32 kernel)
        floats = [t.dtype for t in reads.values() if t.is_floating_point()]
        floats = floats or [t.dtype for t in writes.values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
        if func.namespace == "lewm_fast" and name in CUSTOM_DTYPES:
            dtype = CUSTOM_DTYPES[name](args)
        nbytes = sum(tensor_bytes(t) for t in tensors)
        if itemised:
            items = sigreg_kernels(name, args)
        else:
            items = [Kernel(f"{func.namespace}::{name}", launches, flops, nbytes, str(dtype))]
        signature = None
        if not written and not any(word in name for word in _RANDOM):
            signature = (name, self._signature(positional), self._signature(sorted(kwargs.items())))
        read_flow = tuple(
            (_storage(t), tensor_bytes(t), self.last_writer.get(_storage(t), -1)) for t in reads.values()
        )
        write_flow = tuple((_storage(t), tensor_bytes(t)) for t in writes.values())
        # an op's inputs are read by its first kernel and its outputs written by its last (the
        # intermediates of an itemised op, such as SIGReg's grad_x, stay inside the op)
        first, last = len(self.tally.kernels), len(self.tally.kernels) + len(items) - 1
        for storage, _ in write_flow:
            self.last_writer[storage] = last
        extern = func.namespace != "aten" or name in EXTERN
        for index, item in enumerate(items, start=first):
            self.tally.kernels.append(
                dataclasses.replace(
                    item,
                    segment=self.segment,
                    extern=extern,
                    reductions=0 if extern else _reductions(name, args, kwargs),
                    reads=read_flow if index == first else (),
                    writes=write_flow if index == last else (),
                    signature=signature,
                )
            )
        return out

    def _signature(self, value):
        """A hashable description of an op argument; a tensor by its storage's version (the
        kernel that wrote it last) and its view, so equal signatures compute equal values."""
        if isinstance(value, torch.Tensor):
            storage = _storage(value)
            return ("tensor", storage, self.last_writer.get(storage, -1), _key(value)[1:])
        if isinstance(value, (list, tuple)):
            return tuple(self._signature(v) for v in value)
        return repr(value)


def compiled_kernels(kernels: list[Kernel], final: set[tuple[int, int]]) -> list[Kernel]:
    """The kernels of ``kernels`` (one counted step, in program order) as the torch.compile
    projection sees them (the rule is in the module docstring, "torch.compile").

    ``final``: the (kernel index, storage) writes that outlive the step (gradients,
    BatchNorm statistics, returned losses); other writes no later kernel reads are dead and
    a compiled graph drops them.
    """
    kernels, final, merged = _common_subexpressions(kernels, final)
    readers: dict[tuple[int, int], set[int]] = {}
    for i, k in enumerate(kernels):
        for storage, _, producer in k.reads:
            if producer >= 0:
                readers.setdefault((producer, storage), set()).add(i)
    out: list[Kernel] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.extend(_fuse(run, kernels, readers, final))
            run.clear()

    for i, k in enumerate(kernels):
        if i in merged:
            continue
        if k.segment is None or k.extern:
            flush()
            out.append(k)
        else:
            if run and kernels[run[-1]].segment != k.segment:
                flush()
            run.append(i)
    flush()
    return out


def _common_subexpressions(kernels: list[Kernel], final: set[tuple[int, int]]):
    """Merge, inside each compiled graph, an op that repeats an earlier one on the same input
    versions (autocast casts one activation once per Linear that reads it; AOTAutograd's CSE
    keeps one cast). Returns the kernels with their reads pointing at the kept op's outputs,
    ``final`` likewise, and the indices of the merged (dropped) kernels."""
    first: dict[tuple, int] = {}
    alias: dict[tuple[int, int], tuple[int, int]] = {}
    merged: set[int] = set()
    out = []
    for i, k in enumerate(kernels):
        reads = []
        for storage, nbytes, producer in k.reads:
            producer, storage = alias.get((producer, storage), (producer, storage))
            reads.append((storage, nbytes, producer))
        k = dataclasses.replace(k, reads=tuple(reads))
        out.append(k)
        if k.segment is None or k.extern or k.signature is None:
            continue
        key = (k.segment, k.signature)
        if key in first:
            kept = out[first[key]]
            merged.add(i)
            for (s, _), (s_kept, _) in zip(k.writes, kept.writes):
                alias[(i, s)] = (first[key], s_kept)
        else:
            first[key] = i
    final = {alias.get(w, w) for w in final}
    return out, final, merged


def _fuse(run: list[int], kernels: list[Kernel], readers, final) -> list[Kernel]:
    """Fused kernels of a run of fusible kernels: one group per set of kernels connected by
    producer -> consumer edges inside the run."""
    parent = {i: i for i in run}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in run:
        for _, _, producer in kernels[i].reads:
            if producer in parent:
                parent[root(i)] = root(producer)
    groups: dict[int, list[int]] = {}
    for i in run:
        groups.setdefault(root(i), []).append(i)
    fused = []
    for members in groups.values():
        inside = set(members)
        inputs: dict[tuple[int, int], int] = {}
        outputs: dict[tuple[int, int], int] = {}
        for i in members:
            for storage, nbytes, producer in kernels[i].reads:
                if producer not in inside:
                    key = (producer, storage)
                    inputs[key] = max(inputs.get(key, 0), nbytes)
            for storage, nbytes in kernels[i].writes:
                key = (i, storage)
                if (readers.get(key, set()) - inside) or key in final:
                    outputs[key] = max(outputs.get(key, 0), nbytes)
        if not outputs:
            continue  # nothing it computes is used: a compiled graph drops it
        dtypes = [kernels[i].dtype for i in members]
        fused.append(
            Kernel(
                "inductor::fused",
                max(1, sum(kernels[i].reductions for i in members)),
                sum(kernels[i].flops for i in members),
                sum(inputs.values()) + sum(outputs.values()),
                max(dtypes, key=lambda d: getattr(torch, d.removeprefix("torch.")).itemsize),
                segment=kernels[members[0]].segment,
                extern=False,
            )
        )
    return fused


class CudaAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to the fused kernel a CUDA build picks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        dropout = kwargs.get("dropout_p", 0.0)
        causal = kwargs.get("is_causal", False)
        if kwargs.get("attn_mask") is not None or len(args) > 3:
            return func(*args, **kwargs)
        if torch.is_autocast_enabled("cuda") if _autocast_takes_device() else torch.is_autocast_enabled():
            dtype = (
                torch.get_autocast_dtype("cuda") if hasattr(torch, "get_autocast_dtype") else torch.bfloat16
            )
            q, k, v = (t.to(dtype) for t in (q, k, v))
        if q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout, causal)[0]
        grad = any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled()
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, dropout, causal)[0]


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cuda")
    except TypeError:
        return False
    return True


# ------------------------------------------------------------------- fake CUDA and autograd

_GUARD_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
namespace {
// A device guard for CUDA that does nothing: lets autograd record fake CUDA tensors on a
// torch built without CUDA. Streams report device 0, like the fake tensors.
struct NoOpCudaGuard final : c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA> {
  c10::Stream getStream(c10::Device) const noexcept override {
    return c10::Stream(c10::Stream::DEFAULT, c10::Device(c10::DeviceType::CUDA, 0));
  }
};
}  // namespace
C10_REGISTER_GUARD_IMPL(CUDA, NoOpCudaGuard);
"""


def _cuda_guard_reason() -> str | None:
    """None when autograd can record fake CUDA tensors here (building the no-op guard if needed)."""
    if torch.version.cuda is not None or torch.version.hip is not None:
        return None
    return _load_guard()


_GUARD_STATE: dict[str, str | None] = {}


def require_cuda_guard() -> None:
    """Raise RuntimeError when fake CUDA tensors cannot be indexed or differentiated here."""
    reason = _cuda_guard_reason()
    if reason is not None:
        raise RuntimeError(f"the performance model cannot run on this machine: {reason}")


def _load_guard() -> str | None:
    if "reason" in _GUARD_STATE:
        return _GUARD_STATE["reason"]
    import hashlib

    from lewm_fast import _csrc

    reason = None
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
        digest = hashlib.sha256((_GUARD_SOURCE + torch.__version__).encode()).hexdigest()[:16]
        folder = _csrc.cache_dir() / "perf_model" / f"noop_cuda_guard-{digest}"
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / "noop_cuda_guard.cpp"
        if not source.exists():
            source.write_text(_GUARD_SOURCE)
        cpp_extension.load(
            name=f"lewm_fast_noop_cuda_guard_{digest}",
            sources=[str(source)],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, unwritable cache
        reason = f"building the no-op CUDA device guard failed: {type(exc).__name__}: {str(exc)[-300:]}"
    _GUARD_STATE["reason"] = reason
    return reason


def _as_input_of(node, slot: int, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` reduced and cast to what ``node`` takes at ``slot``, as the engine's
    ``validate_outputs`` does (a broadcast input gets ``sum_to_size``)."""
    metadata = getattr(node, "_input_metadata", None)
    if metadata is None or slot >= len(metadata):
        return grad
    shape = tuple(metadata[slot].shape)
    if tuple(grad.shape) != shape:
        grad = grad.sum_to_size(shape)
    if grad.dtype != metadata[slot].dtype:
        grad = grad.to(metadata[slot].dtype)
    return grad


_WALKS = iter(range(1 << 62))


def _walk_backward(roots: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Run the autograd graph of ``roots`` node by node in this thread (see the docstring).

    ``torch._C._current_graph_task_id`` answers one id for the whole walk, as inside the
    engine: non-reentrant checkpointing recomputes a segment once per graph task (outside
    the engine it would draw a fresh id, and recompute, at every unpack)."""
    walk_id = next(_WALKS)
    original = torch._C._current_graph_task_id
    torch._C._current_graph_task_id = lambda: walk_id
    try:
        _run_graph(roots, grads)
    finally:
        torch._C._current_graph_task_id = original


def _run_graph(roots, grads) -> None:
    pending: dict[Any, list] = {}
    order: list = []
    seen: set = set()

    def visit(node) -> None:  # post-order DFS without recursion limits
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if n in seen:
                continue
            seen.add(n)
            stack.append((n, True))
            for child, _ in n.next_functions:
                if child is not None and child not in seen:
                    stack.append((child, False))

    for root in roots:
        if root.grad_fn is not None:
            visit(root.grad_fn)
    for root, grad in zip(roots, grads):
        if grad is None:
            grad = torch.ones_like(root)
        if root.grad_fn is None:
            continue
        pending.setdefault(root.grad_fn, [None])[0] = grad
    for node in reversed(order):
        inputs = pending.pop(node, None)
        if inputs is None or all(g is None for g in inputs):
            continue
        inputs += [None] * (len(getattr(node, "_input_metadata", ())) - len(inputs))
        if type(node).__name__ == "AccumulateGrad":
            _accumulate(node.variable, inputs[0])
            continue
        outputs = node.apply(*inputs) if hasattr(node, "_forward_cls") else node(*inputs)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        for (child, slot), grad in zip(node.next_functions, outputs):
            if child is None or grad is None:
                continue
            grad = _as_input_of(child, slot, grad)
            buffer = pending.setdefault(child, [])
            buffer.extend([None] * (slot + 1 - len(buffer)))
            buffer[slot] = grad if buffer[slot] is None else buffer[slot] + grad


def _accumulate(variable: torch.Tensor, grad: torch.Tensor) -> None:
    """What the engine's AccumulateGrad does with ``grad``: the first gradient of a step is
    stolen (no kernel) when its strides match the variable's, else copied into a tensor that
    matches (one kernel); a later one is added in place (one kernel). Calling the node from
    Python would copy every time: the walk's own references make the buffer look shared."""
    if variable.grad is None:
        dense = grad.stride() == variable.stride() or grad.numel() <= 1
        variable.grad = grad if dense else torch.empty_like(variable).copy_(grad)
    else:
        variable.grad.add_(grad)


@contextlib.contextmanager
def _counting_patches():
    """Inside this block only: ``Tensor.backward`` runs :func:`_walk_backward`, and
    ``torch.autocast("cuda")`` is not switched off for want of a real GPU (its two
    availability checks answer yes). Restored on exit."""
    import torch.cuda.amp.common as amp_common

    saved = [
        (torch.Tensor, "backward", torch.Tensor.backward),
        (amp_common, "amp_definitely_not_available", amp_common.amp_definitely_not_available),
        (torch.cuda, "is_bf16_supported", torch.cuda.is_bf16_supported),
    ]

    def backward(self, gradient=None, *args, **kwargs):
        _walk_backward([self], [gradient])

    torch.Tensor.backward = backward
    if not torch.cuda.is_available():
        amp_common.amp_definitely_not_available = lambda: False
        torch.cuda.is_bf16_supported = lambda *args, **kwargs: True
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _fake_like(t: torch.Tensor, requires_grad: bool | None = None) -> torch.Tensor:
    out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cuda")
    return out


def fake_cuda(module: nn.Module) -> nn.Module:
    """Replace ``module``'s parameters and buffers by fake CUDA tensors (call inside a FakeTensorMode)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(_fake_like(p), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = _fake_like(b)
    return module


@contextlib.contextmanager
def _graph_segments(counter: KernelCounter):
    """Inside this block ``Tensor.backward`` (the walk of :func:`_counting_patches`) counts
    its kernels as one compiled graph (a new ``counter.segment``); yields ``piece(fn)``,
    which wraps a step piece so that its forward is one too."""
    segments = iter(range(1 << 62))
    walk = torch.Tensor.backward

    def within(fn):
        def run(*args, **kwargs):
            counter.segment = next(segments)
            try:
                return fn(*args, **kwargs)
            finally:
                counter.segment = None

        return run

    torch.Tensor.backward = within(walk)
    try:
        yield within
    finally:
        torch.Tensor.backward = walk


@contextlib.contextmanager
def count():
    """Yields a :class:`KernelCounter`; ops run inside are counted (enter inside a FakeTensorMode)."""
    counter = KernelCounter()
    with CudaAttention(), counter:
        yield counter


# ------------------------------------------------------------------------ workloads

PUBLISHED = {"horizon": 5, "num_samples": 300, "n_steps": 30, "topk": 30}
TRAIN_BATCH = 128
TRAIN_FRAMES = 4
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def build_model(preset: str = "paper") -> nn.Module:
    """The lewm_fast JEPA of ``LeWMConfig.preset(preset)`` on the CPU, with real weights."""
    from lewm_fast import LeWMConfig

    torch.manual_seed(0)
    return LeWMConfig.preset(preset).build()


def _autocast(dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def plan_counts(model: nn.Module, envs: int, autocast: torch.dtype | None, plan: dict | None = None) -> dict:
    """Kernels/FLOPs/bytes of one CEM plan on the CUDA fast path (module docstring, point 1).

    ``model``: a lewm_fast JEPA on the CPU (it is copied, never changed). Returns
    ``{"encode", "per_iter", "per_plan"}`` summaries plus ``"iter_ops"`` (kernels per op).
    """
    import copy

    from torch._subclasses.fake_tensor import FakeTensorMode

    from lewm_fast import _csrc
    from lewm_fast.plan.cost import LowPrecisionWeights, PlanningCost
    from lewm_fast.reference.modules import setup_caches

    plan = {**PUBLISHED, **(plan or {})}
    require_cuda_guard()
    _csrc.define_ops()  # the lewm_fast::cem_refit schema and its fake implementation
    width = action_width_of(model)
    model = copy.deepcopy(model).eval()
    if autocast is not None:
        model = LowPrecisionWeights(model, autocast).sync()
    size = model.encoder.config.image_size
    horizon, samples = plan["horizon"], plan["num_samples"]
    with FakeTensorMode(), torch.no_grad(), _counting_patches():
        fake_cuda(model)
        cost = PlanningCost(model, history_size=3)
        pixels = torch.empty(envs, 1, 3, size, size, device="cuda")
        goal = torch.empty(envs, 1, 3, size, size, device="cuda")
        mean = torch.zeros(envs, horizon, width, device="cuda")
        std = torch.full_like(mean, 1.0)
        nan_count = torch.zeros(envs, dtype=torch.int32, device="cuda")
        with count() as encode:
            with _autocast(autocast):
                emb, goal_emb = cost.encode(pixels, goal)
        # reserved once per shape, before a plan (in the solver's warm-up before graph capture)
        setup_caches(model.predictor, envs * samples, autocast or torch.float32, "cuda")
        with count() as step:  # the body of CEMSolver._run, one iteration
            noise = torch.randn(envs, samples, horizon, width, device="cuda")
            candidates = noise * std.unsqueeze(1) + mean.unsqueeze(1)
            candidates[:, 0] = mean
            with _autocast(autocast):
                costs = cost.rollout_cost(emb, goal_emb, candidates).float()
            args = (x.float().contiguous() for x in (candidates, costs, mean, std))
            mean, std, _, nans = torch.ops.lewm_fast.cem_refit(*args, plan["topk"])
            nan_count += nans
    enc, it = encode.tally, step.tally
    steps = plan["n_steps"]
    return {
        "settings": {"envs": envs, **plan, "precision": "fp32" if autocast is None else "bf16"},
        "encode": enc.summary(),
        "per_iter": it.summary(),
        "per_plan": {
            "launches": enc.launches + steps * it.launches,
            "flops": enc.flops + steps * it.flops,
            "bytes": enc.bytes + steps * it.bytes,
        },
        "iter_ops": it.by_op(),
        "_kernels": enc.kernels + steps * it.kernels,
    }


def train_counts(
    model: nn.Module, memory_plan: str, autocast: torch.dtype | None, batch: int = TRAIN_BATCH
) -> dict:
    """Kernels/FLOPs/bytes of one ``forward_backward`` at ``batch`` windows (module docstring,
    point 3), eagerly, and under ``TrainConfig.compile`` as projected ("torch.compile" in the
    module docstring) under ``"compiled"``."""
    import copy

    from torch._subclasses.fake_tensor import FakeTensorMode

    from lewm_fast import SIGReg
    from lewm_fast.train import StepFunctions, compile_step, forward_backward
    from lewm_fast.train.step import encode_frames, head_objective, whole_objective

    require_cuda_guard()
    model = copy.deepcopy(model).train()
    sigreg = SIGReg(knots=17, num_proj=1024)
    size = model.encoder.config.image_size
    width = action_width_of(model)
    cudagraphs = compile_step(memory_plan, "cuda").cudagraphs  # what TrainConfig.compile asks for
    with FakeTensorMode():
        fake_cuda(model)
        fake_cuda(sigreg)
        data = {
            "pixels": torch.empty(batch, TRAIN_FRAMES, 3, size, size, device="cuda"),
            "action": torch.empty(batch, TRAIN_FRAMES, width, device="cuda"),
        }
        with _counting_patches(), count() as counter, _graph_segments(counter) as piece:
            pieces = StepFunctions(piece(whole_objective), piece(head_objective), piece(encode_frames))
            out = forward_backward(
                model, sigreg, data, memory_plan=memory_plan, autocast_dtype=autocast, functions=pieces
            )
        lasting = [p.grad for m in (model, sigreg) for p in m.parameters() if p.grad is not None]
        lasting += [*model.buffers(), *out.values()]
        final = {(counter.last_writer[s], s) for s in map(_storage, lasting) if s in counter.last_writer}
        extra = []
        if cudagraphs:  # graph trees copy the fresh batch into their static inputs, clone the losses
            for t in data.values():
                extra.append(Kernel("cudagraph::input_copy", 1, 0, 2 * tensor_bytes(t), str(t.dtype)))
            extra += [Kernel("aten::clone", 1, 0, 8, "torch.float32") for _ in range(2)]
    tally = counter.tally
    compiled = Tally(compiled_kernels(tally.kernels, final) + extra)
    return {
        "settings": {
            "batch": batch,
            "frames": TRAIN_FRAMES,
            "image_size": size,
            "memory_plan": memory_plan,
            "precision": "fp32" if autocast is None else "bf16",
            "optimizer_step": False,
        },
        **tally.summary(),
        "ops": tally.by_op(),
        "_kernels": tally.kernels,
        "compiled": {
            "what": "PROJECTION of TrainConfig.compile's step (inductor) by the fusion rule of the "
            "module docstring; inductor was not run",
            "cudagraphs": cudagraphs,
            **compiled.summary(),
            "ops": compiled.by_op(),
            "_kernels": compiled.kernels,
        },
    }


SIGREG_SHAPE = {"T": 4, "B": 128, "D": 192, "P": 1024, "knots": 17}


def sigreg_counts(dtype: torch.dtype = torch.float32, shape: dict | None = None) -> dict:
    """Kernels/FLOPs/bytes of one SIGReg forward and backward on fake CUDA tensors:
    z (T, B, D) of ``dtype`` requiring a gradient, given directions A (D, P) float32 (no
    gradient), ``knots`` knots (default :data:`SIGREG_SHAPE`, the training size). This is
    ``lewm_fast.sigreg(z, A)`` then ``backward()``, as ``bench_sigreg`` times it; the
    quadrature comes from a fake-CUDA :class:`lewm_fast.SIGReg` module, so no cached
    quadrature of the functional form is made inside the fake mode. Besides the SIGReg ops
    the count holds the seed gradient of ``backward()`` (one fill); grad z becomes ``z.grad``
    without a copy, its strides matching z's (point 3 above)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lewm_fast import SIGReg
    from lewm_fast.sigreg import _dispatch

    require_cuda_guard()
    s = {**SIGREG_SHAPE, **(shape or {})}
    module = SIGReg(knots=s["knots"], num_proj=s["P"])
    with FakeTensorMode(), _counting_patches():
        fake_cuda(module)
        z = torch.empty(s["T"], s["B"], s["D"], device="cuda", dtype=dtype, requires_grad=True)
        A = torch.empty(s["D"], s["P"], device="cuda")
        with count() as fwd:
            value = _dispatch(z, A, module.t, module.phi, module.weights, "auto", False)
        with count() as bwd:
            value.backward()
    kernels = fwd.tally.kernels + bwd.tally.kernels
    tally = Tally(kernels)
    return {
        "settings": {**s, "precision": "fp32" if dtype == torch.float32 else "bf16"},
        "fwd": fwd.tally.summary(),
        "bwd": bwd.tally.summary(),
        **tally.summary(),
        "ops": tally.by_op(),
        "_kernels": kernels,
    }


# ---------------------------------------------------------------------------- projection

# Device peaks. "datasheet" figures are NVIDIA's dense (no sparsity) peaks; the H200's
# "measured" ones are the rates measured on such a machine that issue 11 reports (not yet
# measured by lewm_fast's own bench.harness.measure_peaks). ``nvml_name`` is the
# device name NVML reports, which joins measured bench/results to these projections.
DEVICES = {
    "H200": {
        "nvml_name": "NVIDIA H200",
        "bf16_tflops": 790.0,
        "fp32_tflops": 67.0,
        "bandwidth_gbps": 4300.0,
        "sources": {
            "bf16_tflops": "about 790 TFLOP/s bf16 matmul as measured on an H200, reported in issue 11 (not "
            "measured by lewm_fast); datasheet: 989 dense "
            "(1,979 with sparsity), NVIDIA H200 Tensor Core GPU datasheet",
            "fp32_tflops": "datasheet: 67 TFLOPS FP32 (NVIDIA H200 datasheet); fp32 matmul without TF32",
            "bandwidth_gbps": "about 4.3 TB/s copy as measured on an H200, reported in issue 11 "
            "(not measured by lewm_fast); datasheet 4.8 TB/s",
        },
    },
    "RTX 4090": {
        "nvml_name": "NVIDIA GeForce RTX 4090",
        "bf16_tflops": 165.2,
        "fp32_tflops": 82.6,
        "bandwidth_gbps": 1008.0,
        "sources": {
            "bf16_tflops": "NVIDIA Ada GPU architecture whitepaper (V2.01), GeForce RTX 4090 table: peak "
            "BF16 "
            "tensor TFLOPS with FP32 accumulate, dense (330.4 with sparsity); the table text was not "
            "retrievable when checked (issue 11); third-party cross-check: 147.09 listed for the "
            "114-SM RTX 4090 D scales to 165.2 at 128 SMs",
            "fp32_tflops": "NVIDIA Ada whitepaper, peak FP32 TFLOPS (non-tensor), not retrieved when "
            "checked; "
            "third-party listings (TechPowerUp-derived) agree: 16,384 cores x 2 x 2,520 MHz = 82.58",
            "bandwidth_gbps": "21 Gbps GDDR6X on 384 bits = 1,008 GB/s (Ada whitepaper, not retrieved when "
            "checked; third-party listings agree: 1,008 GB/s)",
        },
    },
    "RTX 3060 Ti": {
        "nvml_name": "NVIDIA GeForce RTX 3060 Ti",
        "bf16_tflops": 32.4,
        "fp32_tflops": 16.2,
        "bandwidth_gbps": 448.0,
        "sources": {
            "bf16_tflops": "derived: the GA10x SM's dense FP16/BF16 tensor rate with FP32 accumulate "
            "(NVIDIA Ampere GA102 whitepaper: RTX 3070, 46 SMs at 1,725 MHz = 40.6 TFLOPS) at 38 SMs "
            "and 1,665 MHz boost",
            "fp32_tflops": "derived: 4,864 CUDA cores x 2 x 1,665 MHz boost (NVIDIA product page figures; "
            "no primary TFLOPS figure retrieved when checked)",
            "bandwidth_gbps": "derived: 14 Gbps GDDR6 on 256 bits = 448 GB/s (no primary page retrieved "
            "when checked)",
        },
    },
}

# Per-launch costs in microseconds: ASSUMPTIONS, not measured or datasheet figures; to be
# calibrated with ``python -m lewm_fast.bench.profile_plan`` on a GPU.
LAUNCH_US = {
    "graph": 1.0,  # a kernel node replayed from a CUDA graph (device-side gap)
    "eager": 6.0,  # one PyTorch op launched from Python (dispatch + cudaLaunchKernel)
}


def _kernel_seconds(kernels: list[Kernel], device: dict) -> float:
    total = 0.0
    for k in kernels:
        low = k.dtype in ("torch.bfloat16", "torch.float16")
        peak = (device["bf16_tflops"] if low else device["fp32_tflops"]) * 1e12
        compute = (k.flops - k.fp32_flops) / peak + k.fp32_flops / (device["fp32_tflops"] * 1e12)
        total += max(compute, k.bytes / (device["bandwidth_gbps"] * 1e9))
    return total


def project(kernels: list[Kernel], launches: int) -> dict[str, dict[str, float]]:
    """Projected milliseconds per device: ``work`` (roofline sum), ``graph`` and ``eager``."""
    out = {}
    for name, device in DEVICES.items():
        work = _kernel_seconds(kernels, device) * 1e3
        out[name] = {
            "work_ms": work,
            "graph_ms": work + launches * LAUNCH_US["graph"] / 1e3,
            "eager_ms": work + launches * LAUNCH_US["eager"] / 1e3,
        }
    return out


# ------------------------------------------------------------------------------- report


def run_model(preset: str = "paper", envs=(1, 50), memory_plans=None, sigreg: bool = True) -> dict:
    """Every count and projection of the module docstring as one JSON-ready dict.

    ``envs``: the plan workloads (one per number of envs); ``memory_plans``: the training
    steps' memory plans (None: every plan of ``lewm_fast.train.step.PLANS``; ``()``: none);
    ``sigreg``: count the SIGReg op at the training size (``"sigreg"``, headline fp32).
    A plan's headline counts (``launches_per_iter``, ``flops``, ...) are fp32, the solver's
    default; ``train_step``'s are ``whole`` in bf16, the recipe's (the first plan given
    otherwise), eager, with ``launches_compiled`` / ``bytes_compiled`` the projection under
    ``TrainConfig.compile``. Each entry names its headline under ``"headline"``.
    """
    model = build_model(preset)
    out: dict[str, Any] = {
        "what": "PROJECTION from a performance model (bench/perf_model.py), not a measurement",
        "model": preset,
        "torch": torch.__version__,
        "counting_rule": "bench/perf_model.py module docstring",
        "devices": DEVICES,
        "launch_us": {**LAUNCH_US, "source": "assumption"},
    }
    for n in envs:
        key = f"plan_{n}env"
        entry: dict[str, Any] = {}
        for precision, dtype in PRECISIONS.items():
            counts = plan_counts(model, n, dtype)
            kernels = counts.pop("_kernels")
            counts["projection_per_plan"] = project(kernels, counts["per_plan"]["launches"])
            entry[precision] = counts
        fp32 = entry["fp32"]
        entry.update(
            launches_per_iter=fp32["per_iter"]["launches"],
            launches_per_plan=fp32["per_plan"]["launches"],
            flops=fp32["per_plan"]["flops"],
            bytes=fp32["per_plan"]["bytes"],
            headline="fp32",
        )
        out[key] = entry
    if memory_plans is None:
        from lewm_fast.train.step import PLANS as memory_plans
    if memory_plans:
        entry = {}
        for plan in memory_plans:
            for precision, dtype in PRECISIONS.items():
                counts = train_counts(model, plan, dtype)
                kernels = counts.pop("_kernels")
                counts["projection"] = project(kernels, counts["launches"])
                compiled = counts["compiled"]
                compiled["projection"] = project(compiled.pop("_kernels"), compiled["launches"])
                entry[f"{plan}_{precision}"] = counts
        headline = "whole_bf16" if "whole" in memory_plans else f"{memory_plans[0]}_bf16"
        entry.update({k: entry[headline][k] for k in ("launches", "flops", "bytes")}, headline=headline)
        entry.update(
            launches_compiled=entry[headline]["compiled"]["launches"],
            bytes_compiled=entry[headline]["compiled"]["bytes"],
        )
        out["train_step"] = entry
    if sigreg:
        entry = {}
        for precision, dtype in PRECISIONS.items():
            counts = sigreg_counts(dtype or torch.float32)
            kernels = counts.pop("_kernels")
            counts["projection"] = project(kernels, counts["launches"])
            entry[precision] = counts
        entry.update({k: entry["fp32"][k] for k in ("launches", "flops", "bytes")}, headline="fp32")
        out["sigreg"] = entry
    return out


def workloads(result: dict) -> list[dict[str, Any]]:
    """The projected workloads of a :func:`run_model` result, in table order: one dict per
    workload and precision with ``label``, ``kind`` ("plan", "train" or "op"), ``settings``,
    ``launches``, ``flops``, ``bytes``, ``per_iter_launches`` (plans), ``projection``
    (device -> ``work_ms``/``graph_ms``/``eager_ms``; plans: per plan) and ``times``: the
    projected times that apply, ``("graph", "eager")`` for plans and the SIGReg op (both are
    run), and for a training step ``("eager",)``, or ``("graph",)`` when its compiled step
    replays CUDA graphs. A training step's compiled projection follows its eager row, with
    ``settings["compile"]`` True and "compiled" in its label."""
    out = []
    for key, entry in result.items():
        if not (key.startswith("plan_") and isinstance(entry, dict)):
            continue
        for precision in PRECISIONS:
            c = entry[precision]
            s = c["settings"]
            out.append(
                {
                    "label": f"plan, {s['envs']} env{'s' if s['envs'] > 1 else ''} "
                    f"({s['num_samples']} x {s['n_steps']} CEM)",
                    "kind": "plan",
                    "settings": s,
                    **c["per_plan"],
                    "per_iter_launches": c["per_iter"]["launches"],
                    "projection": c["projection_per_plan"],
                    "times": ("graph", "eager"),
                }
            )
    for c in (result.get("sigreg") or {}).values():
        if isinstance(c, dict) and "projection" in c:
            s = c["settings"]
            size = f"T={s['T']}, B={s['B']}, D={s['D']}, P={s['P']}, K={s['knots']}"
            out.append(
                {
                    "label": f"SIGReg fwd+bwd ({size})",
                    "kind": "op",
                    "settings": s,
                    **{k: c[k] for k in ("launches", "flops", "bytes")},
                    "projection": c["projection"],
                    "times": ("graph", "eager"),
                }
            )
    for c in (result.get("train_step") or {}).values():
        if isinstance(c, dict) and "projection" in c:
            s = c["settings"]
            label = f"training step, batch {s['batch']}, {s['memory_plan']}"
            steps = [(c, {**s, "compile": False}, label, ("eager",))]
            if "compiled" in c:
                graphs = c["compiled"]["cudagraphs"]
                name = f"{label}, compiled" + (" (CUDA graphs)" if graphs else "")
                times = ("graph",) if graphs else ("eager",)
                steps.append((c["compiled"], {**s, "compile": True}, name, times))
            for counts, settings, name, times in steps:
                out.append(
                    {
                        "label": name,
                        "kind": "train",
                        "settings": settings,
                        **{k: counts[k] for k in ("launches", "flops", "bytes")},
                        "projection": counts["projection"],
                        "times": times,
                    }
                )
    return out


def format_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def format_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1e3:.2f} s"
    return f"{ms:.3g} ms" if ms >= 1 else f"{ms * 1e3:.3g} us"


def model_markdown(result: dict) -> str:
    """The projection tables of a :func:`run_model` result (markdown)."""
    devices = list(DEVICES)
    lines = [
        "Projected by the performance model (`lewm-fast bench --model`, bench/perf_model.py): "
        "kernel counts, FLOPs and bytes of the CUDA fast path counted on fake tensors, priced "
        "with device peaks and assumed per-launch costs. Not measured.",
        "",
        "| workload | precision | kernels (launches per plan or step) | FLOP | bytes | "
        + " | ".join(f"{d} graph / eager" for d in devices)
        + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in devices) + " |",
    ]
    for w in workloads(result):
        proj = w["projection"]
        kernels = f"{w['launches']:,}"
        if w["kind"] == "plan":
            kernels += f" ({w['per_iter_launches']} per iteration)"
        cells = [
            " / ".join(format_ms(proj[d][f"{t}_ms"]) if t in w["times"] else "—" for t in ("graph", "eager"))
            for d in devices
        ]
        lines.append(
            f"| {w['label']} | {w['settings']['precision']} | {kernels} | {format_count(w['flops'])} "
            f"| {format_count(w['bytes'])}B | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Time per kernel = max(FLOP / peak, bytes / bandwidth), summed, plus kernels x "
        f"{LAUNCH_US['graph']:g} us (CUDA-graph replay) or {LAUNCH_US['eager']:g} us (eager launch); "
        "the per-launch costs are assumptions. Training steps run eagerly, except the compiled "
        "whole-batch step, which replays CUDA graphs; a compiled row is a projection of "
        "TrainConfig.compile's step by the fusion rule of bench/perf_model.py (inductor was not "
        "run). Peaks: "
        + "; ".join(
            f"{d} {v['bf16_tflops']:g} TFLOP/s bf16, {v['fp32_tflops']:g} fp32, {v['bandwidth_gbps']:g} GB/s"
            for d, v in DEVICES.items()
        )
        + " (sources in model.json; H200 bf16 and bandwidth: rates measured on an H200 as "
        "reported in issue 11, not by lewm_fast; the rest datasheet or derived). " + BLOCK_STEP_CAVEAT,
    ]
    return "\n".join(lines) + "\n"


def write(result: dict, folder: str | os.PathLike) -> tuple[Path, Path]:
    from lewm_fast._io import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "model.json", folder / "model.md"
    write_text_atomic(paths[0], json.dumps(result, indent=2) + "\n")
    write_text_atomic(paths[1], "## Performance model (projected, not measured)\n\n" + model_markdown(result))
    return paths


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--model", *sys.argv[1:]]))
