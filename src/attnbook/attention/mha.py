"""Multi-head self-attention, batched: one fused QKV projection, all heads in one call.

The heads are not a Python loop: the projection produces every head's queries, keys and
values at once, a reshape splits them into ``(B, n_head, T, head_dim)``, and one attention
call handles all heads. Registered as ``"mha"``.
"""

import torch
from torch import nn

from .config import AttentionConfig
from .core import sdpa, sdpa_reference
from .registry import register_attention


@register_attention("mha")
class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (causal unless ``config.causal`` is False).

    Args:
        config: ``d_model``, ``n_head``, ``dropout``, ``bias``, ``causal`` and ``impl``
            (``"sdpa"``, the default fast path, or ``"reference"``, the explicit math).

    ``forward(x, attn_mask=None, need_weights=False)``:
        x: ``(B, T, d_model)``.
        attn_mask: optional extra mask (boolean, ``True`` = may attend, or additive float)
            broadcastable to ``(B, n_head, T, T)``, combined with the causal mask; for a key
            padding mask ``m`` of shape ``(B, T)`` pass ``m[:, None, None, :]``.
        need_weights: also return the ``(B, n_head, T, T)`` attention weights (computed on
            the reference path, whatever ``impl`` says).
    Returns ``(B, T, d_model)``, or ``(output, weights)`` with ``need_weights``.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.config = config
        self.n_head, self.head_dim = config.n_head, config.head_dim
        d = config.d_model
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)  # q, k, v for every head at once
        self.c_proj = nn.Linear(d, d, bias=config.bias)  # mixes the concatenated heads
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask=None, need_weights: bool = False):
        d = self.config.d_model
        if x.dim() != 3 or x.shape[-1] != d:
            raise ValueError(f"x must have shape (B, T, d_model={d}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, T, d_model)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        args = dict(
            attn_mask=attn_mask,
            is_causal=self.config.causal,
            dropout_p=self.config.dropout if self.training else 0.0,
        )
        weights = None
        if need_weights or self.config.impl == "reference":
            y, weights = sdpa_reference(q, k, v, **args, return_weights=True)
        else:
            y = sdpa(q, k, v, **args)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, d)  # (B, T, d_model): heads side by side
        y = self.resid_dropout(self.c_proj(y))  # (B, T, d_model)
        return (y, weights) if need_weights else y
