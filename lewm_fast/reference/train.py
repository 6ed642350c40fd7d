"""The reference training step (spec section 2), plain PyTorch: the semantics every memory
plan of :mod:`lewm_fast.train` is tested against.

One step on a window batch: ``loss = pred_loss + lambd * sigreg_loss`` from
:func:`lewm_fast.reference.jepa_loss` (whole batch, one forward, one backward), and the
published optimiser update: gradient clipping at ``max_norm`` then ``optimizer.step()``.
"""

from __future__ import annotations

import torch
from torch import nn

from .jepa import jepa_loss


def train_step(model: nn.Module, sigreg: nn.Module, batch: dict, lambd: float = 0.09) -> dict:
    """Forward and backward of the training loss on the whole batch; gradients land in ``.grad``.

    batch: ``pixels`` (B, T, C, H, W) normalised frames with T = 4 and ``action`` (B, T, A)
    (NaN window edges are replaced by 0). Gradients accumulate into existing ``.grad``
    (zero them first). Returns ``loss``, ``pred_loss``, ``sigreg_loss`` as detached 0-dim
    tensors.
    """
    losses = jepa_loss(model, sigreg, batch, lambd=lambd)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None = 1.0
) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping), step, zero the grads.

    Returns the pre-clip global L2 norm of the gradients (a 0-dim tensor).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
