"""BatchNorm running statistics recomputed for the current weights, and put back afterwards.

LeWM's ``projector`` and ``pred_proj`` each hold a ``BatchNorm1d`` (spec section 1). In
training mode it normalises with the batch's statistics; in eval mode with running
statistics, an exponential average (momentum 0.1) of the batch statistics of the last ~10
steps. On Two-Room the projector's BatchNorm input has a mean 40-70 times its spread
(median channel: |mean| 0.40, std 0.006; frames differ only by a small dot, so the CLS
features barely vary), so small weight updates move it by a sizeable part of the spread
and running statistics ~10 steps old mis-centre the embedding: midway through a 200-step
CPU run the running mean was 5.6 standard deviations off (median channel) and eval-mode
validation 11.1 against a training loss of 0.15; recalibrating the projector's BatchNorm
alone gave 0.108, pred_proj's alone 11.0. The lag lasts until the learning rate is close
to 0. :func:`recalibrated_batchnorm` recomputes the statistics on a few training batches
for an evaluation and restores them after it: the idea of
``torch.optim.swa_utils.update_bn``, but driving the JEPA's encoder and heads directly
(it has no ``forward``) and in eval mode (no dropout), so each BatchNorm sees the inputs
it sees at evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..backend import sdpa_context
from ..reference.jepa import eval_mode
from .step import _autocast, _encode_frames, loss_head

__all__ = ["head_batchnorms", "recalibrate_batchnorm", "recalibrated_batchnorm"]


def head_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers with running statistics in ``model.projector`` then
    ``model.pred_proj``, each in module order: the order their inputs depend on each other."""
    layers = []
    for head in (model.projector, model.pred_proj):
        layers += [
            m
            for m in head.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
    return layers


class _Moments:
    """Sums of a BatchNorm's input rows, (C,) float64, from a forward pre-hook."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm):
        self.count = 0
        self.sum = torch.zeros(layer.num_features, dtype=torch.float64, device=layer.running_mean.device)
        self.sum_sq = torch.zeros_like(self.sum)

    def __call__(self, module, args) -> None:
        x = args[0]
        rows = x.movedim(1, -1).reshape(-1, x.shape[1]).double()  # (N, C) or (N, C, L) -> (rows, C)
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sum_sq += rows.square().sum(0)

    def store(self, layer: nn.modules.batchnorm._BatchNorm) -> None:
        """Write the pooled mean and unbiased variance (all ranks' rows) into ``layer``."""
        moments = torch.cat([self.sum, self.sum_sq, self.sum.new_tensor([self.count])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(moments)
        c = layer.num_features
        n = moments[2 * c]
        mean = moments[:c] / n
        var = (moments[c : 2 * c] - n * mean.square()) / (n - 1).clamp_min(1)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var.clamp_min(0))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    autocast_dtype: torch.dtype | None = None,
    sdpa_backend: str | None = None,
) -> int:
    """Set the running statistics of the BatchNorm layers in ``model.projector`` and
    ``model.pred_proj`` (:func:`head_batchnorms`) to those of their inputs on ``batches``.

    ``batches``: training-window batches, ``pixels`` (B, T, C, H, W) normalised floats and
    ``action`` (B, T, A) (NaN at window edges, replaced by 0), as the trainer draws them.
    The model runs in eval mode (no dropout) as at evaluation: the encoder once per batch,
    CLS features (B*T, hidden) kept; then one pass over them per BatchNorm layer, in order,
    each with the layers before it already recalibrated::

        projector layer:  cls -> projector                                  (B*T, D)
        pred_proj layer:  emb = projector(cls) (B, T, D); pred_proj(predictor(emb[:, :T-1],
                          action_encoder(action)[:, :T-1]))                 (B*(T-1), D)

    Each layer gets ``running_mean`` = mean and ``running_var`` = unbiased variance of all
    its input rows (float64 sums; under ``torch.distributed``, summed over every process,
    so every process calls this). ``num_batches_tracked`` and every other parameter and
    buffer stay as they are. Returns the number of windows used (this process's).
    ValueError when ``batches`` is empty.
    """
    layers = head_batchnorms(model)
    with eval_mode(model), sdpa_context(sdpa_backend):
        cached = []
        for batch in batches:
            pixels = batch["pixels"]
            b, t = pixels.shape[:2]
            with _autocast(pixels.device.type, autocast_dtype):
                cls = _encode_frames(model.encoder, pixels.float().flatten(0, 1))  # (B*T, hidden)
            cached.append((cls, batch["action"], b, t))
        if not cached:
            raise ValueError("recalibrate_batchnorm needs at least one batch")
        in_pred_proj = {id(m) for m in model.pred_proj.modules()}
        for layer in layers:
            moments = _Moments(layer)
            handle = layer.register_forward_pre_hook(moments)
            try:
                for cls, action, b, t in cached:
                    with _autocast(cls.device.type, autocast_dtype):
                        emb = model.projector(cls).view(b, t, -1)  # (B, T, D)
                        if id(layer) in in_pred_proj:
                            loss_head(model, emb, action)
            finally:
                handle.remove()
            moments.store(layer)
    return sum(b for _, _, b, _ in cached)


@contextlib.contextmanager
def recalibrated_batchnorm(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    autocast_dtype: torch.dtype | None = None,
    sdpa_backend: str | None = None,
) -> Iterator[nn.Module]:
    """Run a block with the head BatchNorm statistics recalibrated on ``batches``
    (:func:`recalibrate_batchnorm`), then put every BatchNorm buffer back exactly as it was.

    The trainer wraps each validation and evaluation in it (``TrainConfig.bn_recalibrate``);
    whatever the block does to those buffers is undone too, and nothing else is touched.
    """
    layers = head_batchnorms(model)
    saved = [[b.detach().clone() for b in layer.buffers(recurse=False)] for layer in layers]
    try:
        recalibrate_batchnorm(model, batches, autocast_dtype=autocast_dtype, sdpa_backend=sdpa_backend)
        yield model
    finally:
        with torch.no_grad():
            for layer, old in zip(layers, saved):
                for buffer, value in zip(layer.buffers(recurse=False), old):
                    buffer.copy_(value)
