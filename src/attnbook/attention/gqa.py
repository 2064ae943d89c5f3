"""Grouped-query attention: ``n_kv_head`` key/value heads shared by groups of query heads.

Compared with ``mha.py`` only the projection changes: it makes ``n_head`` query heads but only
``n_kv_head`` key and value heads, so the KV cache is ``n_head / n_kv_head`` times smaller.
Query head ``h`` reads key/value head ``h // (n_head // n_kv_head)`` (consecutive query heads
form a group, as in ``F.scaled_dot_product_attention(enable_gqa=True)`` and Hugging Face);
the attention call does the sharing (on torch's fused kernels without copying K and V;
the math fallback, used with dropout, and the reference path repeat them). Registered as ``"gqa"``.
Chapter 4 builds it.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_positive_int
from .base import Attention
from .config import AttentionConfig
from .registry import register_attention


@dataclass(frozen=True)
class GQAOptions:
    """n_kv_head: key/value heads, dividing ``n_head``; ``None`` means one per query head."""

    n_kv_head: int | None = None

    def __post_init__(self):
        if self.n_kv_head is not None:
            check_positive_int("n_kv_head", self.n_kv_head)

    def heads(self, n_head: int) -> int:
        """``n_kv_head`` for a layer of ``n_head`` query heads (None: ``n_head``), checked to
        divide it."""
        n_kv_head = self.n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(
                f"n_kv_head={n_kv_head} does not divide n_head={n_head}: each key/value head "
                f"must serve the same number of query heads"
            )
        return n_kv_head


@register_attention("gqa")
class GroupedQueryAttention(Attention):
    """Grouped-query self-attention with ``n_kv_head`` key/value heads (its one option).

    ``n_kv_head == n_head`` is multi-head attention (same weights, same outputs as "mha");
    ``n_kv_head == 1`` is multi-query attention. ``n_kv_head=None`` means ``n_head``.
    The fused projection ``c_attn`` holds the query rows, then the key rows, then the value rows.
    """

    Options = GQAOptions

    def __init__(self, config: AttentionConfig, **options):
        super().__init__(config, **options)
        self.n_kv_head = self.options.heads(config.n_head)
        d, kv = config.n_embd, self.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(d, d + 2 * kv, bias=config.bias)  # q (d) | k (kv) | v (kv)

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return {"n_kv_head": max(1, n_head // 2)}

    def project(self, x: torch.Tensor):
        B, T, d = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([d, kv, kv], dim=2)  # (B, T, d), 2 x (B, T, kv)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        # keys and values: (B, n_kv_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return q, k, v
