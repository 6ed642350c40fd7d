"""Model fixtures shared by the tests: small configs and randomised, identical weight copies."""

from __future__ import annotations

import torch
from torch import nn

import lewm_fast
from lewm_fast.encoder import split_qkv


# The "tiny" LeWM (2-layer ViT on 56 px frames, 2 predictor blocks), with dropout off so
# training-mode outputs are deterministic.
def small_config(**overrides) -> lewm_fast.LeWMConfig:
    values = {"predictor.dropout": 0.0}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return lewm_fast.LeWMConfig.preset("tiny").override(values)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Overwrite every parameter and BatchNorm statistic with fresh random values.

    The AdaLN-Zero layers start at zero (every block is the identity); parity on that
    would prove nothing, so tests always run on random weights.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1:  # LayerNorm / BatchNorm gains near 1, biases near 0
            p.copy_(1 + scale * noise if name.endswith("weight") else scale * noise)
        else:
            p.copy_(noise * p[0].numel() ** -0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model


def model_pair(config: lewm_fast.LeWMConfig, seed: int = 0):
    """(public lewm_fast.JEPA, reference JEPA) with identical random weights."""
    public = randomize_(config.build(), seed)
    reference = config.build(reference=True)
    reference.load_state_dict(public.state_dict())
    return public, reference


def published_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the gradients by published parameter name: the public encoder's fused q/k/v
    gradient is split (``lewm_fast.encoder.split_qkv``), so a public model's gradients and
    the reference's compare name for name."""
    return split_qkv({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def frames(*shape, generator=None) -> torch.Tensor:
    """Random normalised frames of the given shape (…, 3, H, W)."""
    return torch.randn(*shape, generator=generator)
