"""Scaled dot-product attention for any batch size.

PyTorch's fused CUDA attention kernels (flash and memory-efficient) put the batch on a
grid axis that holds at most 65,535 blocks, so a larger batch fails with "invalid
configuration argument" (pytorch/pytorch#146704, #142228). Planning batches envs x
samples (50 x 1000 = 50,000 rows already), so attention here runs in batch chunks of at
most :data:`MAX_BATCH`; rows are independent, so the result is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MAX_BATCH", "scaled_dot_product_attention"]

MAX_BATCH = 65535


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over the last two axes of q (N, heads, Lq, d) and k, v
    (N, heads, Lk, d).

    Same as :func:`torch.nn.functional.scaled_dot_product_attention` (``attn_mask``: a
    boolean (Lq, Lk) mask, True where a query may attend, shared by every row), in chunks
    of at most ``MAX_BATCH`` rows of the leading axis N.
    """
    n = q.shape[0]
    if n <= MAX_BATCH:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
        )
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                q[i : i + MAX_BATCH],
                k[i : i + MAX_BATCH],
                v[i : i + MAX_BATCH],
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
            )
            for i in range(0, n, MAX_BATCH)
        ]
    )
