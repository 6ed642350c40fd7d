"""Memory plans from a VRAM budget: a documented model of a training step's peak memory.

The model predicts the caching allocator's peak (``torch.cuda.max_memory_allocated``)
of one training step from the architecture, the batch and the plan. It is an estimate
built by counting the tensors autograd saves, not a measurement:

``peak = static + batch + max(encoder phase, head phase) + workspace``

- **static**: parameters, gradients and AdamW's two moments in float32 (16 bytes per
  parameter) plus autocast's bfloat16 weight copies (2 bytes per parameter).
- **batch**: the normalised pixels (B, T, 3, S, S) float32 held for the whole step.
- **encoder phase** (N = B*T frames of L = 1 + (S/p)^2 tokens, hidden D, MLP F, n layers):
  each ViT layer saves ``layer_bytes(D, F)`` per token: with bfloat16 autocast, the
  float32 residual input of both LayerNorms (2 x 4D), the bfloat16 cast of the attention
  input (2D; q, k and v are one GEMM), q, k, v and the attention output (4 x 2D), the cast
  MLP input (2D), the fc1 output and the GELU output (2 x 2F): ``20 D + 4 F`` bytes
  (float32: both LayerNorms' inputs and outputs, q, k, v, output, fc1 and GELU outputs,
  ``32 D + 8 F``). Attention is assumed to run a fused kernel (flash / memory-efficient /
  CPU flash) that saves no L x L matrix and returns its output in a layout the output
  projection reads without a copy.
  One more layer's worth is live at the start of the backward pass (the gradients of the
  top layer's activations).

  The final LayerNorm saves 4D per token, and under autocast the patch convolution saves
  a bfloat16 copy of its frames (6 S^2 bytes per frame).

  - whole: ``N (L (n layer_bytes + 4D) + 6 S^2) + N L layer_bytes``
  - checkpoint: only each layer's float32 input is kept, ``N (L (n + 1) 4D + 6 S^2)``,
    plus one layer recomputed with its gradients, ``2 N L layer_bytes``
  - two_pass: the CLS features and one chunk of c windows (c T frames) at a time:
    ``c T (L ((n + 1) layer_bytes + 4D) + 6 S^2) + N 8D``
- **head phase**: projector and pred_proj (hidden H: ~ 6 H + 12 D bytes per row in
  bfloat16), predictor (per token and block like the ViT layer with its attention width
  and MLP), SIGReg's projected batch (T B P x 12 bytes).
- **workspace**: 256 MiB for cuBLAS/cuDNN workspaces and allocator rounding.

A plan fits when ``peak <= headroom * budget`` (headroom 0.85: fragmentation, the CUDA
context where the budget is a card size, and the model's own error). "auto" takes the
first plan that fits in the order whole, checkpoint, two_pass (largest chunk first), the
order of increasing recomputation. The constants were derived on a CPU by counting
saved tensors (``tests/test_train.py`` checks them against ``saved_tensors_hooks`` on a
small model); they have not been calibrated against a GPU's allocator.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from .. import _checks
from ..config import LeWMConfig
from .step import PLANS, default_chunk_size

__all__ = [
    "MemoryEstimate",
    "estimate_peak",
    "choose_plan",
    "parse_size",
    "format_size",
    "free_vram",
    "cap_vram",
    "uncap_vram",
    "HEADROOM",
    "WORKSPACE_BYTES",
]

HEADROOM = 0.85
WORKSPACE_BYTES = 256 * 2**20
_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_size(text: str | int | float) -> int:
    """Bytes in a size such as ``"8GiB"``, ``"7.5G"``, ``"8000MB"`` or ``1073741824``.

    K/M/G/T and KiB/MiB/GiB/TiB are binary (powers of 1024), KB/MB/GB/TB decimal.
    """
    if isinstance(text, bool):
        raise ValueError(f"a memory size must be a number of bytes or a string like '8GiB', got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read the memory size {text!r}: expected a number with an optional unit "
                "B, K/KiB, M/MiB, G/GiB, T/TiB (binary) or KB, MB, GB, TB (decimal), e.g. '8GiB'"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(size)


def format_size(n: int | float) -> str:
    """``n`` bytes as GiB/MiB text."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_vram(device: torch.device | str) -> int | None:
    """Free memory on a CUDA device in bytes (``torch.cuda.mem_get_info``, NVML as a
    fallback); None for other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = _checks.with_index(device).index
    try:
        return int(torch.cuda.mem_get_info(index)[0])
    except RuntimeError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing or unusable
        return None


def cap_vram(device: torch.device | str, budget: int) -> bool:
    """Cap the caching allocator of CUDA ``device`` at ``budget`` bytes
    (``torch.cuda.set_per_process_memory_fraction``) when that is below the device's memory;
    True if it did, False there and for other devices. :func:`uncap_vram` lifts the cap.
    A device without an index (``cuda``) means the current one: torch refuses it here."""
    device = _checks.with_index(device)
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    if budget >= total:
        return False
    torch.cuda.set_per_process_memory_fraction(budget / total, device.index)
    return True


def uncap_vram(device: torch.device | str) -> None:
    """Lift :func:`cap_vram`'s cap: the allocator of CUDA ``device`` may take all its memory."""
    torch.cuda.set_per_process_memory_fraction(1.0, _checks.with_index(device).index)


def layer_bytes(dim: int, mlp: int, precision: str, attn_width: int | None = None) -> int:
    """Bytes a pre-norm transformer layer saves per token for its backward pass (see module doc)."""
    inner = dim if attn_width is None else attn_width
    if precision == "bf16":
        # LN inputs (f32), the attention input's cast (one qkv GEMM), q/k/v + output, MLP cast,
        # fc1 + GELU out
        return 2 * 4 * dim + 2 * dim + 4 * 2 * inner + 2 * dim + 2 * 2 * mlp
    # LN inputs and outputs, q/k/v + output, fc1 + GELU out
    return 4 * 4 * dim + 4 * 4 * inner + 2 * 4 * mlp


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted allocator peak of one training step under a plan, in bytes, by part."""

    plan: str
    chunk_size: int | None
    peak_bytes: int
    static_bytes: int
    batch_bytes: int
    encoder_bytes: int
    head_bytes: int
    workspace_bytes: int

    def describe(self) -> str:
        chunk = f" (chunks of {self.chunk_size} windows)" if self.plan == "two_pass" else ""
        return (
            f"memory plan {self.plan}{chunk}: predicted peak {format_size(self.peak_bytes)} "
            f"(weights+grads+AdamW {format_size(self.static_bytes)}, batch {format_size(self.batch_bytes)}, "
            f"encoder activations {format_size(self.encoder_bytes)}, head {format_size(self.head_bytes)}, "
            f"workspace {format_size(self.workspace_bytes)})"
        )


@functools.lru_cache(maxsize=32)
def _num_params(config: LeWMConfig) -> int:
    # parameters of the built model, without building it: count on the meta device
    with torch.device("meta"):
        model = config.build(reference=True)
    return sum(p.numel() for p in model.parameters())


def estimate_peak(
    config: LeWMConfig,
    batch_size: int,
    plan: str = "whole",
    chunk_size: int | None = None,
    precision: str = "bf16",
    num_frames: int | None = None,
    num_proj: int = 1024,
) -> MemoryEstimate:
    """Predicted peak bytes of one training step (see the module docstring for the model).

    ``batch_size`` windows of ``num_frames`` (default history + 1) frames each, on this
    process; ``chunk_size`` windows per encoder chunk for "two_pass" (default ceil(B/4)).
    """
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    _checks.positive(batch_size, "batch_size")
    t = num_frames or config.predictor.num_frames + 1
    vit = config.encoder.vit_config()
    d, f, n_layers = vit.hidden_size, vit.intermediate_size, vit.num_hidden_layers
    tokens = 1 + vit.num_patches
    act = 2 if precision == "bf16" else 4

    params = _num_params(config)
    static = 16 * params + (2 * params if precision == "bf16" else 0)
    batch = batch_size * t * 3 * vit.image_size**2 * 4

    per_layer = layer_bytes(d, f, precision)
    frame_cast = 3 * vit.image_size**2 * 2 if precision == "bf16" else 0  # patch conv input copy
    frames = batch_size * t
    if plan == "whole":
        encoder = (
            frames * (tokens * (n_layers * per_layer + 4 * d) + frame_cast) + frames * tokens * per_layer
        )
    elif plan == "checkpoint":
        encoder = frames * (tokens * (n_layers + 1) * 4 * d + frame_cast) + 2 * frames * tokens * per_layer
    else:
        chunk = chunk_size or default_chunk_size(batch_size)
        _checks.positive(chunk, "chunk_size")
        chunk_frames = min(chunk, batch_size) * t
        encoder = chunk_frames * (tokens * ((n_layers + 1) * per_layer + 4 * d) + frame_cast) + frames * d * 8

    pc, pp = config.predictor, config.projector
    history = t - 1
    rows = frames + batch_size * history  # projector rows + pred_proj rows
    mlp_rows = rows * (3 * act * pp.hidden_dim + 4 * pp.hidden_dim + 12 * pp.output_dim)
    predictor = (
        batch_size
        * history
        * pc.depth
        * (
            layer_bytes(pc.hidden_dim, pc.mlp_dim, precision, pc.heads * pc.dim_head)
            + 8 * act * pc.hidden_dim
        )
    )
    sigreg = 12 * frames * num_proj
    head = mlp_rows + predictor + sigreg

    peak = static + batch + max(encoder, head) + WORKSPACE_BYTES
    return MemoryEstimate(
        plan,
        (chunk_size or default_chunk_size(batch_size)) if plan == "two_pass" else None,
        int(peak),
        int(static),
        int(batch),
        int(encoder),
        int(head),
        WORKSPACE_BYTES,
    )


def choose_plan(
    config: LeWMConfig,
    batch_size: int,
    budget_bytes: int | None,
    *,
    plan: str = "auto",
    chunk_size: int | None = None,
    precision: str = "bf16",
    headroom: float = HEADROOM,
) -> MemoryEstimate:
    """The memory plan for a step of ``batch_size`` windows within ``budget_bytes``.

    ``plan="auto"``: the first of whole, checkpoint, two_pass (chunks from B/2 windows
    down to 1) whose predicted peak is at most ``headroom * budget``; with no budget (a
    CPU) "whole". A named plan is returned as asked (its estimate may exceed the budget;
    the caller warns). Raises ValueError when even two_pass with 1-window chunks does
    not fit, naming the smallest budget that would.
    """
    if plan != "auto" and plan not in PLANS:
        raise ValueError(f"memory plan must be 'auto' or one of {PLANS}, got {plan!r}")
    if budget_bytes is not None:
        _checks.positive(budget_bytes, "budget_bytes")
    if plan != "auto":
        return estimate_peak(config, batch_size, plan, chunk_size if plan == "two_pass" else None, precision)
    if budget_bytes is None:
        return estimate_peak(config, batch_size, "whole", None, precision)
    limit = headroom * budget_bytes
    for name in ("whole", "checkpoint"):
        estimate = estimate_peak(config, batch_size, name, None, precision)
        if estimate.peak_bytes <= limit:
            return estimate
    chunks = [chunk_size] if chunk_size else sorted({max(1, batch_size // 2**k) for k in range(1, 12)})[::-1]
    for chunk in chunks:
        estimate = estimate_peak(config, batch_size, "two_pass", chunk, precision)
        if estimate.peak_bytes <= limit:
            return estimate
    smallest = estimate_peak(config, batch_size, "two_pass", chunks[-1], precision)
    raise ValueError(
        f"no memory plan fits a VRAM budget of {format_size(budget_bytes)} at batch {batch_size}: the "
        f"smallest, two_pass with {chunks[-1]}-window chunks, needs about {format_size(smallest.peak_bytes)} "
        f"(budget x {headroom} must cover it); lower the batch size or raise --vram-budget"
    )
