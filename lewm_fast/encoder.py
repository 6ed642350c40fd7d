"""The public ViT encoder: the reference ViT with query, key and value from one GEMM.

:class:`ViTModel` (what :func:`lewm_fast.vit_encoder` builds) is
:class:`lewm_fast.reference.ViTModel` (same config, forward and initial weights) whose
layers compute q, k and v with one ``Linear(D, 3D)``, ``attention.qkv``, instead of three
``Linear(D, D)``: one GEMM instead of three in the forward pass, with no copy.

The published names stay on the outside. ``state_dict()`` writes
``attention.{q,k,v}_proj.{weight,bias}`` (the transformers 5.x layout, in the reference's
key order; :mod:`lewm_fast.checkpoint` converts to and from 4.x) as views of the fused
tensors, and ``load_state_dict`` accepts them, concatenating the three into ``qkv``.
Parameters (``named_parameters()``, an optimizer's state) carry the fused name;
:func:`split_qkv` maps any name -> tensor mapping of the model (gradients, say) to the
published names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .reference import vit as _vit
from .reference.attention import scaled_dot_product_attention

__all__ = ["ViTModel", "ViTSelfAttention", "split_qkv", "published_parts", "QKV_NAMES"]

QKV_NAMES = ("q_proj", "k_proj", "v_proj")  # the published modules, in the order of the fused rows
_FUSED_KEY = re.compile(r"(?P<prefix>(?:.+\.)?)qkv\.(?P<param>weight|bias)")


def published_parts(key: str) -> tuple[str, str, str] | None:
    """The published (q, k, v) names of a fused key, or None for any other key.

    ``"layers.0.attention.qkv.weight"`` -> ``("layers.0.attention.q_proj.weight",
    "layers.0.attention.k_proj.weight", "layers.0.attention.v_proj.weight")``.
    """
    match = _FUSED_KEY.fullmatch(key)
    if match is None:
        return None
    prefix, param = match["prefix"], match["param"]
    return tuple(f"{prefix}{name}.{param}" for name in QKV_NAMES)


def split_qkv(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` keyed by the fused model's names -> keyed by the published names.

    Each ``<prefix>qkv.weight`` (3D, D) and ``<prefix>qkv.bias`` (3D,) becomes
    ``<prefix>{q,k,v}_proj.{weight,bias}`` ((D, D) and (D,): rows [0, D), [D, 2D) and
    [2D, 3D), as views), written where the fused entries were, in the reference ViT's
    order (q weight, q bias, k weight, ...). Every other entry is kept as it is.
    """
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in tensors.items():
        match = _FUSED_KEY.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        prefix = match["prefix"]
        if prefix in done:  # written with the other half of the pair
            continue
        done.add(prefix)
        fused = {p: tensors[f"{prefix}qkv.{p}"] for p in ("weight", "bias") if f"{prefix}qkv.{p}" in tensors}
        chunks = {p: t.chunk(3) for p, t in fused.items()}
        for i, name in enumerate(QKV_NAMES):
            for param, parts in chunks.items():
                out[f"{prefix}{name}.{param}"] = parts[i]
    return out


def _save_published(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: the published q/k/v entries in place of the fused ``qkv``."""
    own = [key for key in state_dict if key.startswith(prefix)]  # this module's, added last
    entries = {key: state_dict.pop(key) for key in own}
    state_dict.update(split_qkv(entries))


def _load_published(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Load-state-dict pre-hook: concatenate published q/k/v entries into ``qkv``.

    A state dict that holds the fused ``qkv`` entries itself loads as it is. Some but not
    all of q/k/v, or parts of the wrong shape, are load errors naming the published keys.
    """
    for param in ("weight", "bias"):
        keys = published_parts(f"{prefix}qkv.{param}")
        found = [key for key in keys if key in state_dict]
        if not found:
            continue
        parts = [state_dict.pop(key) for key in found]
        if len(found) < len(keys):
            absent = [key for key in keys if key not in found]
            error_msgs.append(
                f"missing key(s) {', '.join(absent)}: {prefix}qkv.{param} is {', '.join(keys)} stacked"
            )
            continue
        fused = getattr(module.qkv, param)
        want = (fused.shape[0] // 3, *fused.shape[1:])
        wrong = [(k, tuple(t.shape)) for k, t in zip(keys, parts) if tuple(t.shape) != want]
        if wrong:
            error_msgs.extend(
                f"size mismatch for {k}: copying a param with shape {shape}, the shape in current "
                f"model is {want}"
                for k, shape in wrong
            )
            continue
        state_dict[f"{prefix}qkv.{param}"] = torch.cat(parts)


class ViTSelfAttention(nn.Module):
    """ViT self-attention with q, k and v from one GEMM.

    ``qkv`` = Linear(D, 3D), the published ``q_proj``, ``k_proj`` and ``v_proj`` stacked
    row-wise; ``o_proj`` = Linear(D, D). ``forward(x (N, L, D))`` -> (N, L, D) =
    ``o_proj(softmax(q k^T / sqrt(d)) v)`` per head, d = D / heads.
    """

    def __init__(self, config: _vit.ViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o_proj = nn.Linear(dim, dim)
        if hasattr(self, "register_load_state_dict_pre_hook"):  # public API from torch 2.5
            self.register_state_dict_post_hook(_save_published)
            self.register_load_state_dict_pre_hook(_load_published)
        else:  # torch 2.4: the same hooks under their private names
            self._register_state_dict_hook(_save_published)
            self._register_load_state_dict_pre_hook(_load_published, with_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(n, length, 3, heads, dim // heads)  # one GEMM: (N, L, 3, heads, d)
        # Views, no copy. Unbinding the "3" axis (not a leading one) makes the backward's
        # stack of dq, dk, dv land in the (N, L, 3D) layout the GEMM backward reads: one copy.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (N, heads, L, d) each
        out = scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.o_proj(out.transpose(1, 2).reshape(n, length, dim))


class ViTModel(_vit.ViTModel):
    """The reference ViT encoder with :class:`ViTSelfAttention` (q, k, v in one GEMM).

    ``forward(pixels (N, C, H, W))`` -> ``ViTOutput`` with (N, 1 + P, D) tokens; the same
    config, forward and state-dict keys as :class:`lewm_fast.reference.ViTModel`. Built
    under the same seed, its initial weights are the reference's, q/k/v stacked (the fused
    weight draws the three from the generator in the same order).
    """

    attention_class = ViTSelfAttention
