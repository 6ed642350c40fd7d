"""lewm_fast: a performance-engineered PyTorch library for LeWorldModel (LeWM).

Drop-in replacements for the published classes (switching is an import change)::

    import lewm_fast
    model = lewm_fast.LeWMConfig.preset("paper").build()      # 18,034,478 parameters
    sigreg = lewm_fast.SIGReg(knots=17, num_proj=1024)
    model = lewm_fast.load_pretrained("path/to/checkpoint")    # config.json + weights.pt

``lewm_fast.sigreg`` and ``lewm_fast.adaln_modulate`` / ``gated_residual`` /
``gated_adaln_modulate`` are the functional forms of the fused ops.
``lewm_fast.reference`` holds the plain PyTorch semantics every fast path is tested
against; ``lewm_fast.envs`` the Two-Room environment, ``lewm_fast.data`` its datasets
and training windows, and ``lewm_fast.train`` the memory-aware trainer.
``lewm_fast.accelerate(model)`` / ``from_published(model)`` / ``accelerate_sigreg()`` put
stable-worldmodel's LeWM and SIGReg on lewm_fast's modules (:mod:`lewm_fast.swm`). Importing
this package never touches a GPU.
"""

from .adaln import adaln_modulate, gated_adaln_modulate, gated_residual
from .checkpoint import convert_encoder_keys, load_pretrained, save_pretrained
from .config import LeWMConfig
from .model import JEPA, MLP, ARPredictor, ConditionalBlock, Embedder, vit_encoder
from .sigreg import SIGReg, sigreg
from .swm import accelerate, accelerate_sigreg, from_published

__version__ = "0.1.0"

__all__ = [
    "JEPA",
    "ARPredictor",
    "ConditionalBlock",
    "Embedder",
    "MLP",
    "SIGReg",
    "sigreg",
    "adaln_modulate",
    "gated_residual",
    "gated_adaln_modulate",
    "vit_encoder",
    "LeWMConfig",
    "load_pretrained",
    "save_pretrained",
    "convert_encoder_keys",
    "accelerate",
    "accelerate_sigreg",
    "from_published",
    "__version__",
]
