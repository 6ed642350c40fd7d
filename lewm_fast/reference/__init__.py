"""Plain PyTorch reference of LeWM: the semantics every fast path is tested against.

Readable, unfused code for the model (spec section 1), its functions and training step
(section 2), SIGReg (section 3) and the CEM planner (section 6). Tests, benchmarks and CPU
fallbacks import it; it never imports the fast code.
"""

from .cem import cem_plan, cem_plan_env, cem_refit
from .jepa import JEPA, jepa_loss
from .modules import (
    MLP,
    ARPredictor,
    Attention,
    ConditionalBlock,
    Embedder,
    FeedForward,
    KVCache,
    Transformer,
    modulate,
    setup_caches,
)
from .sigreg import SIGReg, draw_projections, sigreg_quadrature, sigreg_statistic
from .train import optimizer_step, train_step
from .vit import VIT_SIZES, ViTConfig, ViTModel, ViTOutput

__all__ = [
    "JEPA",
    "jepa_loss",
    "train_step",
    "optimizer_step",
    "cem_plan",
    "cem_plan_env",
    "cem_refit",
    "MLP",
    "ARPredictor",
    "Attention",
    "ConditionalBlock",
    "Embedder",
    "FeedForward",
    "KVCache",
    "Transformer",
    "modulate",
    "setup_caches",
    "SIGReg",
    "draw_projections",
    "sigreg_quadrature",
    "sigreg_statistic",
    "VIT_SIZES",
    "ViTConfig",
    "ViTModel",
    "ViTOutput",
]
