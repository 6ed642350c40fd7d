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


class KVCache:
    """Static keys and values of one attention layer for incremental (cached) decoding.

    As gpt-fast's ``KVCache``: storage for ``capacity`` rows x ``length`` positions,
    allocated once per shape and then written in place, so the tensors a CUDA graph
    captured keep their addresses across replays. Rows are the batch (in planning, env x
    candidate); position p holds the key and value of the window's p-th token, side by
    side in one tensor ``kv`` (rows, length, 2 x inner), inner = heads x dim_head, in the
    order ``to_qkv`` returns them, so the new tokens' keys and values are one copy. Scratch
    state, not model state: not a parameter or buffer (no ``state_dict`` entry, no effect
    on checkpoints or ``.to()``), and a deep copy of the model starts with an empty cache.
    """

    def __init__(self):
        self.kv: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> KVCache:
        return KVCache()

    def reserve(self, rows: int, length: int, inner: int, dtype: torch.dtype, device) -> None:
        """Make room for ``rows`` x ``length`` keys and values of ``inner`` features each, in
        ``dtype`` on ``device``.

        Keeps the current storage when it has at least ``rows`` rows of that layout (so
        a batch split into chunks reuses the first chunk's storage), else allocates anew.
        """
        for name, value in (("rows", rows), ("length", length), ("inner", inner)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache.reserve: {name} must be a positive int, got {value!r}")
        kv, want = self.kv, torch.device(device)
        fits = (
            kv is not None
            and kv.shape[0] >= rows
            and tuple(kv.shape[1:]) == (length, 2 * inner)
            and kv.dtype == dtype
            # "cuda" (no index) names the cache's own "cuda:0" too: no needless reallocation
            and kv.device.type == want.type
            and want.index in (None, kv.device.index)
        )
        if not fits:
            self.kv = None  # free the old storage before allocating the new
            self.kv = torch.zeros(rows, length, 2 * inner, dtype=dtype, device=device)

    def views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``rows`` rows: (rows, length, inner) views each, inner
        stride 1. RuntimeError before :meth:`reserve` made room for them."""
        if self.kv is None or self.kv.shape[0] < rows:
            held = 0 if self.kv is None else self.kv.shape[0]
            raise RuntimeError(
                f"KVCache holds {held} rows, {rows} needed: call reserve (or setup_caches) first"
            )
        inner = self.kv.shape[-1] // 2
        return self.kv[:rows, :, :inner], self.kv[:rows, :, inner:]


def kv_cache_of(attn: nn.Module) -> KVCache:
    """``attn.kv_cache``, created empty on a module that predates it (an unpickled model)."""
    cache = attn.__dict__.get("kv_cache")
    if cache is None:
        cache = attn.kv_cache = KVCache()
    return cache


def setup_caches(
    predictor: nn.Module, rows: int, dtype: torch.dtype, device, length: int | None = None
) -> None:
    """Reserve every block's :class:`KVCache` for ``rows`` rows of ``length`` positions
    (default: the predictor's ``num_frames``, the longest window it takes) in ``dtype`` (the
    dtype ``to_qkv`` returns: the autocast dtype, or its weight's)."""
    if length is None:
        length = predictor.pos_embedding.shape[1]
    for block in predictor.transformer.layers:
        attn = block.attn
        kv_cache_of(attn).reserve(rows, length, attn.heads * attn.dim_head, dtype, device)


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention over time with its own input LayerNorm.

    ``kv_cache`` (:class:`KVCache`) holds earlier tokens' keys and values for
    :meth:`attend_cached`, the incremental form planning uses.
    """

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
        self.kv_cache = KVCache()

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

    def attend_cached(self, x: torch.Tensor, past: int, last_only: bool = False) -> torch.Tensor:
        """Causal attention of new normalised tokens x (N, t, D) at positions past .. past+t-1.

        Positions < ``past`` are read from ``kv_cache`` (filled by earlier calls for the same
        rows); the new tokens' keys and values are written into it. Equals
        ``attend(X)[:, past:]`` for the whole window X (N, past + t, D). With ``last_only``
        only the last token's output is computed: (N, 1, D). For inference (eval mode, no
        dropout, under ``torch.no_grad``: the cache is shared storage, not an autograd input).
        """
        n, t, _ = x.shape
        cache = kv_cache_of(self)
        keys, values = cache.views(n)
        if past + t > keys.shape[1]:
            raise ValueError(f"positions {past} .. {past + t - 1} do not fit a cache of {keys.shape[1]}")
        qkv = self.to_qkv(x)
        inner = self.heads * self.dim_head
        cache.kv[:n, past : past + t] = qkv[..., inner:]  # keys and values: one copy
        q = qkv[..., :inner]
        if last_only:
            q = q[:, -1:]
        rows = q.shape[1]
        q, k, v = (
            z.view(n, -1, self.heads, self.dim_head).transpose(1, 2)  # (N, heads, L, dim_head)
            for z in (q, keys[:, : past + t], values[:, : past + t])
        )
        if rows == 1:  # the newest token sees every position: no mask
            out = scaled_dot_product_attention(q, k, v)
        elif past == 0:
            out = scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new token j sees positions <= past + j
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(n, rows, self.heads * self.dim_head))


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

    def step(self, x: torch.Tensor, mod: torch.Tensor, past: int, last_only: bool = False) -> torch.Tensor:
        """The block on new tokens x (N, t, D) at window positions past .. past+t-1 (eval mode).

        ``mod`` (N, t, 6 D) is ``adaLN_modulation(c)`` of these tokens; earlier positions'
        keys/values come from ``attn.kv_cache`` and the new ones are written into it (see
        :meth:`Attention.attend_cached`). Equals ``forward(X, C)[:, past:]`` for the whole
        window; with ``last_only``, only the last token's output (N, 1, D).
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        attn_out = self.attn.attend_cached(self.attn_input(x, shift_msa, scale_msa), past, last_only)
        if last_only:
            x, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                z[:, -1:] for z in (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
            )
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

    def setup_caches(self, rows: int, dtype: torch.dtype, device) -> None:
        """Reserve every block's key/value cache (:class:`KVCache`) for ``rows`` rows of
        ``num_frames`` positions in ``dtype`` on ``device``; see :func:`setup_caches`."""
        setup_caches(self, rows, dtype, device)


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
