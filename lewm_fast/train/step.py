"""One training step's forward and backward under a memory plan (spec section 2).

The loss is the reference one (:func:`lewm_fast.reference.jepa_loss`): on windows of T
frames, ``emb = projector(encoder CLS)``, then :func:`loss_head` -- the one home of the
loss formula in the fast code, also used by the trainer's validation and the probes'
1-step MSE. The plans change where activations live, never the maths:

- ``"whole"``: one forward and one backward on the whole batch.
- ``"checkpoint"``: the encoder keeps only each layer's input and recomputes the layer
  in the backward pass (``torch.utils.checkpoint``, RNG state preserved).
- ``"two_pass"``: exact feature-gradient caching. Pass 1 encodes the frames in chunks
  under ``no_grad`` and keeps only the CLS features (B*T, hidden). The projector, action
  encoder, predictor, both BatchNorms, SIGReg and the loss run on the *whole* batch, and
  the backward stops at the CLS features. Pass 2 re-runs each encoder chunk with grad and
  backpropagates its slice of the cached feature gradient. BatchNorm and SIGReg see the
  whole batch and the predictor's dropout draws its masks once, so the gradients are those
  of the whole-batch step (up to float summation order); only encoder activations are
  bounded by the chunk.

Random numbers are drawn in the same order in every plan (predictor dropout, then the
SIGReg projection; the LeWM encoder draws none), so a seeded step gives the same
gradients whatever the plan.

A step is made of named pieces, :class:`StepFunctions`: ``whole`` (pixels to the training
objective: the "whole" and "checkpoint" plans), ``encode`` (frames to CLS features: the
chunks of "two_pass") and ``head`` (CLS features to the objective: the rest of
"two_pass"). :func:`forward_backward` runs the eager ones unless given others, e.g. the
``torch.compile``-d ones of :func:`lewm_fast.train.compiled.compile_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import _checks
from ..backend import sdpa_context
from ..reference.jepa import action_width_of

__all__ = [
    "PLANS",
    "forward_backward",
    "loss_head",
    "default_chunk_size",
    "StepFunctions",
    "EAGER",
    "whole_objective",
    "head_objective",
    "encode_frames",
]

PLANS = ("whole", "checkpoint", "two_pass")


def default_chunk_size(batch_size: int) -> int:
    """Windows per encoder chunk of the two-pass plan when none is given: ceil(B / 4)."""
    return max(1, math.ceil(batch_size / 4))


def _check_batch(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, dict) or "pixels" not in batch or "action" not in batch:
        raise ValueError("batch must be a dict with 'pixels' (B, T, C, H, W) and 'action' (B, T, A)")
    pixels = _checks.tensor(batch["pixels"], "batch['pixels']", _checks.FRAMES)
    action = _checks.tensor(batch["action"], "batch['action']", ("B", "T", "A"))
    if not pixels.is_floating_point():
        raise ValueError(f"batch['pixels'] must be normalised floating-point frames, got {pixels.dtype}")
    _checks.same_leading(pixels, "batch['pixels']", action, "batch['action']", 2)
    b, t = pixels.shape[:2]
    if b < 1:
        raise ValueError("batch['pixels'] holds no windows (B = 0)")
    frames = getattr(model.predictor, "num_frames", None)
    if t < 2 or (frames is not None and t - 1 > frames):
        raise ValueError(
            f"windows must have T = history + 1 frames with 1 <= history <= {frames}, got T = {t}"
        )
    width = action_width_of(model)
    if width is not None and action.shape[-1] != width:
        raise ValueError(
            f"batch['action'] must have {width} numbers per model action, got {action.shape[-1]}"
        )
    return pixels, action


def _encode_frames(encoder: nn.Module, frames: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """CLS features (N, hidden) of frames (N, C, H, W); optionally one checkpoint per layer."""
    if not checkpoint:
        return encoder(frames, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    if not all(hasattr(encoder, name) for name in ("embeddings", "layers", "layernorm")):
        raise ValueError(
            "memory_plan='checkpoint' needs a lewm_fast ViT encoder (embeddings, layers, layernorm); "
            f"got {type(encoder).__name__}: use memory_plan='two_pass' for other encoders"
        )
    x = encoder.embeddings(frames, interpolate_pos_encoding=True)
    for layer in encoder.layers:
        x = _checkpoint(layer, x, use_reentrant=False)
    return encoder.layernorm(x)[:, 0]


def loss_head(
    model: nn.Module,
    emb: torch.Tensor,
    action: torch.Tensor,
    *,
    sigreg: nn.Module | None = None,
    lambd: float = 0.09,
    history_size: int | None = None,
    by_position: bool = False,
) -> dict[str, torch.Tensor]:
    """The LeWM loss after the encoder and projector (spec section 2), graph attached.

    emb (B, T, D) frame embeddings, action (B, T, A) model actions (NaN, at window
    edges, replaced by 0); H = ``history_size`` (default T - 1)::

        act_emb     = action_encoder(action)                                  (B, T, D)
        pred        = pred_proj(predictor(emb[:, :H], act_emb[:, :H]))         (B, H, D)
        target      = emb[:, 1:H+1]                               (not detached)
        pred_loss   = mean((pred - target)^2)          over B, H and D
        sigreg_loss = sigreg(emb.transpose(0, 1))      (T, B, D) -> scalar
        loss        = pred_loss + lambd * sigreg_loss

    Returns ``pred_loss`` and, when ``sigreg`` is given, ``sigreg_loss`` and ``loss``;
    ``by_position=True`` adds ``pred_loss_by_position`` (H,), the mean over B and D at
    each position (predicting frame i + 1 from frames 0..i). ValueError when H exceeds the
    predictor's ``num_frames`` (its positional embedding covers no more).
    """
    b, t = emb.shape[:2]
    history = t - 1 if history_size is None else history_size
    frames = getattr(model.predictor, "num_frames", None)
    if frames is not None and history > frames:
        raise ValueError(f"the predictor takes at most num_frames = {frames} time steps, got {history}")
    act_emb = model.action_encoder(torch.nan_to_num(action, 0.0))  # (B, T, D)
    pred = model.predictor(emb[:, :history], act_emb[:, :history])  # (B, H, D)
    pred = model.pred_proj(pred.flatten(0, 1)).view(b, history, -1)
    sq_err = (pred - emb[:, 1 : history + 1]).pow(2)  # (B, H, D)
    out = {"pred_loss": sq_err.mean()}
    if by_position:
        out["pred_loss_by_position"] = sq_err.mean(dim=(0, 2))
    if sigreg is not None:
        out["sigreg_loss"] = sigreg(emb.transpose(0, 1))  # (T, B, D)
        out["loss"] = out["pred_loss"] + lambd * out["sigreg_loss"]
    return out


def _autocast(device_type: str, dtype: torch.dtype | None):
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _objective(model, sigreg, emb, action, lambd, pred_scale):
    losses = loss_head(model, emb, action, sigreg=sigreg, lambd=lambd)
    # loss_head's loss, with the prediction term scaled by 1 / W for data parallelism
    objective = pred_scale * losses["pred_loss"] + lambd * losses["sigreg_loss"]
    return objective, losses["pred_loss"], losses["sigreg_loss"]


def whole_objective(
    model: nn.Module,
    sigreg: nn.Module,
    pixels: torch.Tensor,
    action: torch.Tensor,
    lambd: float,
    pred_scale: float,
    autocast_dtype: torch.dtype | None,
    checkpoint: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "whole" / "checkpoint" plans' forward: pixels (B, T, C, H, W), action (B, T, A)
    -> ``(objective, pred_loss, sigreg_loss)``, 0-dim, graph attached, where
    ``objective = pred_scale * pred_loss + lambd * sigreg_loss`` (see :func:`forward_backward`);
    ``checkpoint`` recomputes each encoder layer in the backward pass."""
    b, t = pixels.shape[:2]
    with _autocast(pixels.device.type, autocast_dtype):
        cls = _encode_frames(model.encoder, pixels.float().flatten(0, 1), checkpoint)  # (B*T, hidden)
        emb = model.projector(cls).view(b, t, -1)  # (B, T, D)
        return _objective(model, sigreg, emb, action, lambd, pred_scale)


def head_objective(
    model: nn.Module,
    sigreg: nn.Module,
    cls: torch.Tensor,
    action: torch.Tensor,
    lambd: float,
    pred_scale: float,
    autocast_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "two_pass" plan's head: CLS features (B*T, hidden), action (B, T, A) ->
    ``(objective, pred_loss, sigreg_loss)`` as :func:`whole_objective`."""
    b, t = action.shape[:2]
    with _autocast(cls.device.type, autocast_dtype):
        emb = model.projector(cls).view(b, t, -1)  # (B, T, D)
        return _objective(model, sigreg, emb, action, lambd, pred_scale)


def encode_frames(
    encoder: nn.Module, frames: torch.Tensor, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """The "two_pass" plan's encoder chunk: frames (N, C, H, W) -> CLS features (N, hidden)."""
    with _autocast(frames.device.type, autocast_dtype):
        return _encode_frames(encoder, frames)


@dataclass(frozen=True)
class StepFunctions:
    """The pieces of a training step (see the module docstring), with their signatures:

    - ``whole(model, sigreg, pixels, action, lambd, pred_scale, autocast_dtype, checkpoint)``
      -> (objective, pred_loss, sigreg_loss): :func:`whole_objective`;
    - ``head(model, sigreg, cls, action, lambd, pred_scale, autocast_dtype)``: :func:`head_objective`;
    - ``encode(encoder, frames, autocast_dtype)`` -> cls: :func:`encode_frames`.

    ``cudagraphs``: the pieces replay CUDA graphs, whose outputs the next replay overwrites,
    so :func:`forward_backward` marks each step's start and copies the losses it returns.
    """

    whole: Callable = whole_objective
    head: Callable = head_objective
    encode: Callable = encode_frames
    cudagraphs: bool = False


EAGER = StepFunctions()


def _check_deterministic_encoder(encoder: nn.Module) -> None:
    for name, m in encoder.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training:
            raise ValueError(
                f"memory_plan='two_pass' re-runs the encoder, which must draw no random numbers; "
                f"encoder.{name} is an active dropout (p={m.p})"
            )


def _world_size(world_size: int | None) -> int:
    if world_size is not None:
        return _checks.positive(world_size, "world_size")
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def forward_backward(
    model: nn.Module,
    sigreg: nn.Module,
    batch: dict,
    memory_plan: str = "whole",
    chunk_size: int | None = None,
    lambd: float = 0.09,
    *,
    autocast_dtype: torch.dtype | None = None,
    world_size: int | None = None,
    functions: StepFunctions | None = None,
    sdpa_backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """Forward and backward of the LeWM training loss; gradients accumulate into ``.grad``.

    Args:
        model: a LeWM ``JEPA`` (public or reference classes) in training mode.
        sigreg: a SIGReg module, ``sigreg(z (T, B, D))`` -> scalar.
        batch: ``pixels`` (B, T, C, H, W) normalised floats, ``action`` (B, T, A); NaN
            actions (window edges) are replaced by 0.
        memory_plan: "whole", "checkpoint" or "two_pass" (see the module docstring).
        chunk_size: windows per encoder chunk of "two_pass" (default ceil(B / 4)).
        lambd: SIGReg weight.
        autocast_dtype: run the forward passes under ``torch.autocast`` with this dtype
            (e.g. ``torch.bfloat16``); None runs them in the parameters' dtype.
        world_size: data-parallel processes (default: the ``torch.distributed`` world size,
            1 without a process group). With W > 1 the backward uses
            ``pred_loss / W + lambd * sigreg_loss``: SIGReg all-reduces its moments (global
            batch), so *summing* ``.grad`` over the ranks gives the gradient of the global
            batch's loss.
        functions: the step's pieces (default :data:`EAGER`); the trainer passes
            :func:`lewm_fast.train.compiled.compile_step`'s when ``TrainConfig.compile`` is set.
        sdpa_backend: the attention backend to enable around the step
            (:func:`lewm_fast.backend.sdpa_context`; None: torch's own choice).

    Returns ``{"loss", "pred_loss", "sigreg_loss"}``, detached 0-dim float32 tensors
    (``pred_loss`` of this process's batch). No host synchronisation happens here.
    """
    if memory_plan not in PLANS:
        raise ValueError(f"memory_plan must be one of {PLANS}, got {memory_plan!r}")
    pixels, action = _check_batch(model, batch)
    b, t = pixels.shape[:2]
    if chunk_size is not None:
        if memory_plan != "two_pass":
            raise ValueError(f"chunk_size applies to memory_plan='two_pass' only, got plan {memory_plan!r}")
        _checks.positive(chunk_size, "chunk_size")
    if not isinstance(lambd, (int, float)) or isinstance(lambd, bool) or not math.isfinite(lambd):
        raise ValueError(f"lambd must be a finite number, got {lambd!r}")
    pred_scale = 1.0 / _world_size(world_size)
    fns = functions or EAGER

    with sdpa_context(sdpa_backend):
        if fns.cudagraphs:
            _mark_step_begin()
        if memory_plan == "two_pass":
            _check_deterministic_encoder(model.encoder)
            frames = pixels.float().flatten(0, 1)  # (B*T, C, H, W)
            step = (chunk_size or default_chunk_size(b)) * t  # frames per chunk
            # one autocast region around the chunks: eager autocast casts the weights once
            with torch.no_grad(), _autocast(pixels.device.type, autocast_dtype):
                cls = torch.cat([fns.encode(model.encoder, f, autocast_dtype) for f in frames.split(step)])
            cls.requires_grad_(True)
            objective, pred_loss, sigreg_loss = fns.head(
                model, sigreg, cls, action, lambd, pred_scale, autocast_dtype
            )
            objective.backward()
            for f, g in zip(frames.split(step), cls.grad.split(step)):
                fns.encode(model.encoder, f, autocast_dtype).backward(g)
        else:
            objective, pred_loss, sigreg_loss = fns.whole(
                model, sigreg, pixels, action, lambd, pred_scale, autocast_dtype, memory_plan == "checkpoint"
            )
            objective.backward()

    pred_loss, sigreg_loss = pred_loss.detach().float(), sigreg_loss.detach().float()
    if fns.cudagraphs:  # the next replay overwrites the graph's outputs
        pred_loss, sigreg_loss = pred_loss.clone(), sigreg_loss.clone()
    return {"loss": pred_loss + lambd * sigreg_loss, "pred_loss": pred_loss, "sigreg_loss": sigreg_loss}


def _mark_step_begin() -> None:
    """Tell CUDA graph trees a new training step starts (torch >= 2.1; a no-op before)."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()
