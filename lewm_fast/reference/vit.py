"""Plain PyTorch ViT encoder, numerically equivalent to Hugging Face ``ViTModel``.

Spec section 1: pre-norm blocks, exact (erf) GELU, LayerNorm eps 1e-12, qkv bias,
no dropout, final LayerNorm, ``add_pooling_layer=False``, no mask token. The module
names follow the transformers 5.x layout (``layers.{i}.attention.q_proj`` ...), so
``state_dict()`` of this module and of a transformers 5.x ``ViTModel`` agree key for
key; :mod:`lewm_fast.checkpoint` converts to and from the 4.x layout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .attention import scaled_dot_product_attention

# Named sizes of the published ``vit_hf(size=...)`` helper:
# (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT encoder (the subset of transformers' ``ViTConfig`` LeWM uses)."""

    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    intermediate_size: int = 768
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
        ):
            _checks.positive(getattr(self, name), f"ViTConfig.{name}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ViTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.patch_size > self.image_size:
            raise ValueError(
                f"ViTConfig.patch_size ({self.patch_size}) exceeds image_size ({self.image_size})"
            )

    @classmethod
    def from_size(cls, size: str = "tiny", **overrides) -> ViTConfig:
        """Config of a named size ("tiny", "small", "base", "large") with field overrides."""
        if size not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {size!r}; expected one of {sorted(VIT_SIZES)}")
        hidden, layers, heads, mlp = VIT_SIZES[size]
        fields = dict(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp
        )
        unknown = set(overrides) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown ViT config field(s) {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ViTOutput:
    """What ``ViTModel.forward`` returns; only ``last_hidden_state`` (N, 1 + patches, D) is used."""

    last_hidden_state: torch.Tensor


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, H/p * W/p, D)
        return self.projection(pixels).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(config)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an image of (height, width): bicubic resize of the patch grid."""
        pos = self.position_embeddings
        num_positions = pos.shape[1] - 1
        patch = self.config.patch_size
        new_h, new_w = height // patch, width // patch
        if new_h * new_w == num_positions and height == width:
            return pos
        side = int(math.sqrt(num_positions))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, -1)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixels: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        n, _, height, width = pixels.shape
        tokens = self.patch_embeddings(pixels)  # (N, P, D)
        cls = self.cls_token.expand(n, -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)  # (N, 1 + P, D)
        if interpolate_pos_encoding:
            return tokens + self.interpolate_pos_encoding(height, width)
        return tokens + self.position_embeddings


class ViTSelfAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, heads, L, D/heads)
            return t.view(n, length, heads, dim // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.o_proj(out.transpose(1, 2).reshape(n, length, dim))


class ViTMLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class ViTLayer(nn.Module):
    def __init__(self, config: ViTConfig, attention_class: type[nn.Module] = ViTSelfAttention):
        super().__init__()
        eps = config.layer_norm_eps
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = attention_class(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = ViTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x))


class ViTModel(nn.Module):
    """ViT encoder; ``forward(pixels (N, C, H, W))`` -> ``ViTOutput`` with (N, 1 + P, D) tokens.

    Initialisation follows transformers (truncated normal, std ``initializer_range``, for
    linear/conv weights, CLS token and position embeddings; zero biases; unit LayerNorms),
    so a model trained from scratch starts from the same distribution as the published one.
    ``attention_class`` builds each layer's attention from the config (lewm_fast's public
    encoder swaps in one with a fused q/k/v projection).
    """

    attention_class: type[nn.Module] = ViTSelfAttention

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        self.config = config or ViTConfig()
        self.embeddings = ViTEmbeddings(self.config)
        self.layers = nn.ModuleList(
            ViTLayer(self.config, self.attention_class) for _ in range(self.config.num_hidden_layers)
        )
        self.layernorm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=std)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=std)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None) -> ViTOutput:
        height, width = pixel_values.shape[-2:]
        size = self.config.image_size
        if not interpolate_pos_encoding and (height, width) != (size, size):
            raise ValueError(
                f"input image size ({height}x{width}) does not match the model ({size}x{size}); "
                "pass interpolate_pos_encoding=True to resize the position embeddings"
            )
        x = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        for layer in self.layers:
            x = layer(x)
        return ViTOutput(last_hidden_state=self.layernorm(x))
