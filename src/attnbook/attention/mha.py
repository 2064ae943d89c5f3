"""Multi-head self-attention, batched: one fused QKV projection, all heads in one call.

The heads are not a Python loop: the projection produces every head's queries, keys and
values at once, a reshape splits them into ``(B, n_head, T, head_dim)``, and one attention
call handles all heads. Registered as ``"mha"``. Chapter 3 builds it.
"""

from dataclasses import replace

import torch
from torch import nn

from .base import CausalSelfAttention
from .config import AttentionConfig
from .registry import register_attention


@register_attention("mha")
class MultiHeadAttention(CausalSelfAttention):
    """Multi-head self-attention: every query head has its own key and value head.

    Args:
        config: ``d_model``, ``n_head``, ``dropout``, ``bias``, ``causal``, ``positions`` and
            ``impl`` (``"sdpa"``, the default fast path, or ``"reference"``, the explicit math).
            ``n_kv_head``, if set, must equal ``n_head``.

    ``forward`` is ``CausalSelfAttention.forward``: ``(B, T, d_model)`` -> ``(B, T, d_model)``.
    """

    def __init__(self, config: AttentionConfig):
        if config.n_kv_head not in (None, config.n_head):
            raise ValueError(
                f"mha has one key/value head per query head, got n_kv_head={config.n_kv_head} "
                f"and n_head={config.n_head}: use 'gqa' for fewer key/value heads"
            )
        config = replace(config, n_kv_head=config.n_head)
        super().__init__(config, n_kv_head=config.n_head)
        d = config.d_model
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)  # q, k, v for every head at once

    def project(self, x: torch.Tensor):
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, T, d_model)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        return q, k, v
