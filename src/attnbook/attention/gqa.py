"""Grouped-query attention: ``n_kv_head`` key/value heads shared by groups of query heads.

Compared with ``mha.py`` only the projection changes: it makes ``n_head`` query heads but only
``n_kv_head`` key and value heads, so the KV cache is ``n_head / n_kv_head`` times smaller.
Query head ``h`` reads key/value head ``h // (n_head // n_kv_head)`` (consecutive query heads
form a group, as in ``F.scaled_dot_product_attention(enable_gqa=True)`` and Hugging Face);
the attention call does the sharing (on torch's fused kernels without copying K and V;
the math fallback, used with dropout, and the reference path repeat them). Registered as ``"gqa"``.
Chapter 4 builds it.
"""

from dataclasses import replace

import torch
from torch import nn

from .base import CausalSelfAttention
from .config import AttentionConfig
from .registry import register_attention


@register_attention("gqa")
class GroupedQueryAttention(CausalSelfAttention):
    """Grouped-query self-attention with ``config.n_kv_head`` key/value heads.

    ``n_kv_head == n_head`` is multi-head attention (same weights, same outputs as "mha");
    ``n_kv_head == 1`` is multi-query attention. ``n_kv_head=None`` means ``n_head``.
    The fused projection ``c_attn`` holds the query rows, then the key rows, then the value rows.
    """

    def __init__(self, config: AttentionConfig):
        if config.n_kv_head is None:
            config = replace(config, n_kv_head=config.n_head)
        super().__init__(config, n_kv_head=config.n_kv_head)
        d, kv = config.d_model, config.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(d, d + 2 * kv, bias=config.bias)  # q (d) | k (kv) | v (kv)

    def project(self, x: torch.Tensor):
        B, T, d = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([d, kv, kv], dim=2)  # (B, T, d), 2 x (B, T, kv)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        return q, k, v
