"""Multi-head self-attention, batched: one fused QKV projection, all heads in one call.

The heads are not a Python loop: the projection produces every head's queries, keys and
values at once, a reshape splits them into ``(B, n_head, T, head_dim)``, and one attention
call handles all heads. Registered as ``"mha"``. Chapter 3 builds it.
"""

import torch
from torch import nn

from .base import Attention
from .config import AttentionConfig
from .registry import register_attention


@register_attention("mha")
class MultiHeadAttention(Attention):
    """Multi-head self-attention: every query head has its own key and value head.

    Args:
        config: ``n_embd``, ``n_head``, ``dropout``, ``bias``, ``causal``, ``positions`` and
            ``impl`` (``"sdpa"``, the default fast path, or ``"reference"``, the explicit math).
        No options of its own.

    ``forward`` is ``Attention.forward``: ``(B, T, n_embd)`` -> ``(B, T, n_embd)``.
    """

    def __init__(self, config: AttentionConfig, **options):
        super().__init__(config, **options)
        d = config.n_embd
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)  # q, k, v for every head at once

    def project(self, x: torch.Tensor):
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, T, n_embd)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        return q, k, v
