"""Plain PyTorch building blocks of LeWM: predictor, action encoder and projectors.

Spec section 1. Class names, constructor arguments and parameter names are the
published ones, so published weights load key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import scaled_dot_product_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation: ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


class FeedForward(nn.Module):
    """``LayerNorm -> Linear -> GELU -> Dropout -> Linear -> Dropout`` (parameters ``net.{0,1,4}``)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def after_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The block past its own LayerNorm ``net[0]``, on already-normalised h."""
        for layer in self.net[1:]:
            h = layer(h)
        return h


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention over time with its own input LayerNorm."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = (
            nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        return self.attend(self.norm(x), causal)

    def attend(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Attention on already-normalised tokens x (B, T, D) -> (B, T, D)."""
        b, t, _ = x.shape
        q, k, v = (
            part.view(b, t, self.heads, self.dim_head).transpose(1, 2)  # (B, heads, T, dim_head)
            for part in self.to_qkv(x).chunk(3, dim=-1)
        )
        drop = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal)
        return self.to_out(out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))


class ConditionalBlock(nn.Module):
    """Transformer block with AdaLN-Zero conditioning on a per-token vector ``c``.

    ``adaLN_modulation(c)`` splits into shift/scale/gate for attention and MLP;
    ``x += gate_msa * attn(modulate(norm1(x)))`` then ``x += gate_mlp * mlp(modulate(norm2(x)))``.
    The modulation layer starts at zero, so a fresh block is the identity.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.mlp = FeedForward(dim, mlp_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) tokens, c: (B, T, D) conditioning -> (B, T, D).

        Same as ``x += gate_msa * attn(modulate(norm1(x)))``, ``x += gate_mlp *
        mlp(modulate(norm2(x)))``, written with the three pieces a fused backend replaces.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=-1
        )
        attn_out = self.attn.attend(self.attn_input(x, shift_msa, scale_msa))
        x, h = self.gated_mlp_input(x, gate_msa, attn_out, shift_mlp, scale_mlp)
        return self.gated(x, gate_mlp, self.mlp.after_norm(h))

    def attn_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``attn.norm(modulate(norm1(x), shift, scale))``: the attention branch's normalised input."""
        return self.attn.norm(modulate(self.norm1(x), shift, scale))

    def mlp_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``mlp.net[0](modulate(norm2(x), shift, scale))``: the MLP branch's normalised input."""
        return self.mlp.net[0](modulate(self.norm2(x), shift, scale))

    def gated(self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gated residual ``x + gate * y``."""
        return x + gate * y

    def gated_mlp_input(
        self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x' = gated(x, gate, y)`` and ``mlp_input(x', shift, scale)``: the residual after
        the attention branch and the MLP branch's input."""
        x = self.gated(x, gate, y)
        return x, self.mlp_input(x, shift, scale)

    def gated_attn_input(
        self, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x' = gated(x, gate, y)`` (the previous block's last residual) and
        ``attn_input(x', shift, scale)``: lets a caller run consecutive blocks with the
        residual and the next branch input fused."""
        x = self.gated(x, gate, y)
        return x, self.attn_input(x, shift, scale)


class Transformer(nn.Module):
    """Stack of conditional blocks with optional input/cond/output projections and a final LayerNorm."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        block_class: type[nn.Module] = ConditionalBlock,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.layers = nn.ModuleList(
            block_class(hidden_dim, heads, dim_head, mlp_dim, dropout) for _ in range(depth)
        )
        self.input_proj = nn.Linear(input_dim, hidden_dim) if input_dim != hidden_dim else nn.Identity()
        self.cond_proj = nn.Linear(input_dim, hidden_dim) if input_dim != hidden_dim else nn.Identity()
        self.output_proj = nn.Linear(hidden_dim, output_dim) if hidden_dim != output_dim else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        c = self.cond_proj(c)
        for block in self.layers:
            x = block(x, c)
        return self.output_proj(self.norm(x))


class ARPredictor(nn.Module):
    """Autoregressive, action-conditioned next-embedding predictor.

    ``forward(x (B, T, input_dim), c (B, T, input_dim))`` adds ``pos_embedding[:, :T]`` to x,
    applies embedding dropout and a causal AdaLN-Zero transformer conditioned on c, and
    returns (B, T, output_dim): position t predicts the embedding at t + 1.
    """

    block_class: type[nn.Module] = ConditionalBlock

    def __init__(
        self,
        *,
        num_frames: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        input_dim: int,
        hidden_dim: int,
        output_dim: int | None = None,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
    ):
        super().__init__()
        self.num_frames = num_frames
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames, input_dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(
            input_dim,
            hidden_dim,
            output_dim or input_dim,
            depth,
            heads,
            dim_head,
            mlp_dim,
            dropout,
            block_class=self.block_class,
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        x = self.dropout(x + self.pos_embedding[:, :t])
        return self.transformer(x, c)


class Embedder(nn.Module):
    """Action encoder: per-step ``Conv1d(kernel 1)`` then ``Linear -> SiLU -> Linear``.

    ``forward(x (B, T, input_dim))`` -> (B, T, emb_dim); the input is cast to float32.
    """

    def __init__(self, input_dim: int = 10, smoothed_dim: int = 10, emb_dim: int = 10, mlp_scale: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv1d(input_dim, smoothed_dim, kernel_size=1, stride=1)
        self.embed = nn.Sequential(
            nn.Linear(smoothed_dim, mlp_scale * emb_dim),
            nn.SiLU(),
            nn.Linear(mlp_scale * emb_dim, emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.float().transpose(1, 2)).transpose(1, 2)  # conv over time
        return self.embed(x)


class MLP(nn.Module):
    """``Linear -> norm -> activation -> Linear`` (parameters ``net.{0,1,3}``).

    LeWM's ``projector`` and ``pred_proj`` use ``norm_fn=nn.BatchNorm1d`` on (N, D) inputs.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int | None = None,
        norm_fn=nn.LayerNorm,
        act_fn=nn.GELU,
    ):
        super().__init__()
        norm = norm_fn(hidden_dim) if norm_fn is not None else nn.Identity()
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            norm,
            act_fn(),
            nn.Linear(hidden_dim, output_dim or input_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
