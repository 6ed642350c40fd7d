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
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import _checks
from ..reference.jepa import action_width_of

__all__ = ["PLANS", "forward_backward", "loss_head", "default_chunk_size"]

PLANS = ("whole", "checkpoint", "two_pass")


def default_chunk_size(batch_size: int) -> int:
    """Windows per encoder chunk of the two-pass plan when none is given: ceil(B / 4)."""
    return max(1, math.ceil(batch_size / 4))


def _check_batch(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, dict) or "pixels" not in batch or "action" not in batch:
        raise ValueError("batch must be a dict with 'pixels' (B, T, C, H, W) and 'action' (B, T, A)")
    pixels = _checks.tensor(batch["pixels"], "batch['pixels']", ("B", "T", "C", "H", "W"))
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

    device_type = pixels.device.type
    enabled = autocast_dtype is not None

    def autocast():
        return torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled)

    frames = pixels.float().flatten(0, 1)  # (B*T, C, H, W)

    if memory_plan == "two_pass":
        _check_deterministic_encoder(model.encoder)
        step = (chunk_size or default_chunk_size(b)) * t  # frames per chunk
        with torch.no_grad(), autocast():
            cls = torch.cat([_encode_frames(model.encoder, f) for f in frames.split(step)])
        cls.requires_grad_(True)
    else:
        with autocast():
            cls = _encode_frames(model.encoder, frames, checkpoint=memory_plan == "checkpoint")

    with autocast():
        losses = loss_head(model, model.projector(cls).view(b, t, -1), action, sigreg=sigreg, lambd=lambd)
    # loss_head's loss, with the prediction term scaled by 1 / W for data parallelism
    objective = pred_scale * losses["pred_loss"] + lambd * losses["sigreg_loss"]
    objective.backward()

    if memory_plan == "two_pass":
        feature_grad = cls.grad
        for f, g in zip(frames.split(step), feature_grad.split(step)):
            with autocast():
                out = _encode_frames(model.encoder, f)
            out.backward(g)

    pred_loss = losses["pred_loss"].detach().float()
    sigreg_loss = losses["sigreg_loss"].detach().float()
    return {"loss": pred_loss + lambd * sigreg_loss, "pred_loss": pred_loss, "sigreg_loss": sigreg_loss}
