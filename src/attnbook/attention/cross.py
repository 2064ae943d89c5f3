"""Cross-attention and the encoder-decoder blocks built around it.

In cross-attention the queries come from one sequence (the decoder's, ``x``: ``(B, T_q, d)``)
and the keys and values from another (the encoder's output, ``memory``: ``(B, T_k, d)``), of any
lengths. No causal mask: the whole source is known. A key padding mask hides the padded
positions of the source. Position information is already inside ``x`` and ``memory``, so no
RoPE or ALiBi is applied here.

- ``CrossAttention``: the layer. ``project_memory`` computes the source's keys and values once,
  so a decoder generating token by token can reuse them (``kv=``) instead of recomputing them.
- ``EncoderBlock``: pre-norm self-attention (not causal) + MLP.
- ``DecoderBlock``: pre-norm causal self-attention + cross-attention + MLP.

The blocks take positions from the embeddings (``positions`` "learned", "sinusoidal" or "none");
RoPE and ALiBi are refused rather than silently dropped. Chapter 5 builds them.
"""

from dataclasses import replace

import torch
from torch import nn

from ..mlp import MLP
from .config import AttentionConfig
from .core import sdpa, sdpa_reference
from .mha import MultiHeadAttention


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (queries) to ``memory`` (keys and values).

    Args:
        config: ``d_model``, ``n_head``, ``dropout``, ``bias`` and ``impl`` are used.

    ``forward(x, memory=None, memory_mask=None, need_weights=False, kv=None)``:
        x: ``(B, T_q, d_model)``; memory: ``(B, T_k, d_model)``, or instead ``kv``, the
        ``(k, v)`` pair ``project_memory(memory)`` returned.
        memory_mask: ``(B, T_k)`` boolean, ``True`` at real (not padded) source positions.
        need_weights: also return the ``(B, n_head, T_q, T_k)`` weights.
    Returns ``(B, T_q, d_model)``, or ``(output, weights)`` with ``need_weights``.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        if config.n_kv_head not in (None, config.n_head):
            raise ValueError(
                f"CrossAttention has one key/value head per query head, got "
                f"n_kv_head={config.n_kv_head} and n_head={config.n_head}"
            )
        self.config = config
        self.n_head, self.head_dim = config.n_head, config.head_dim
        d = config.d_model
        self.c_q = nn.Linear(d, d, bias=config.bias)  # queries from the decoder
        self.c_kv = nn.Linear(d, 2 * d, bias=config.bias)  # keys and values from the encoder
        self.c_proj = nn.Linear(d, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def project_memory(self, memory: torch.Tensor):
        """Keys and values of the source, ``(B, n_head, T_k, head_dim)`` each."""
        _check_sequence("memory", memory, self.config.d_model)
        B, T_k, d = memory.shape
        k, v = self.c_kv(memory).split(d, dim=2)  # 2 x (B, T_k, d)
        k = k.view(B, T_k, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T_k, hd)
        v = v.view(B, T_k, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T_k, hd)
        return k, v

    def forward(self, x, memory=None, memory_mask=None, need_weights: bool = False, kv=None):
        d = self.config.d_model
        _check_sequence("x", x, d)
        if (memory is None) == (kv is None):
            raise ValueError("pass either memory or kv=project_memory(memory), not both or neither")
        k, v = self.project_memory(memory) if kv is None else kv  # 2 x (B, nh, T_k, hd)
        B, T_q, _ = x.shape
        if k.shape[0] != B:
            raise ValueError(
                f"x and memory must have the same batch size, got {B} and {k.shape[0]}"
            )
        T_k = k.shape[2]
        if memory_mask is not None and (
            memory_mask.shape != (B, T_k) or memory_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"memory_mask must be a boolean (B, T_k) = {(B, T_k)} tensor, got "
                f"{memory_mask.dtype} {tuple(memory_mask.shape)}"
            )
        q = self.c_q(x).view(B, T_q, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T_q, hd)
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, T_k)
        dropout_p = self.config.dropout if self.training else 0.0
        weights = None
        if need_weights or self.config.impl == "reference":
            y, weights = sdpa_reference(q, k, v, mask, dropout_p=dropout_p, return_weights=True)
        else:
            y = sdpa(q, k, v, mask, dropout_p=dropout_p)  # (B, nh, T_q, hd)
        y = y.transpose(1, 2).contiguous().view(B, T_q, d)  # (B, T_q, d)
        y = self.resid_dropout(self.c_proj(y))
        return (y, weights) if need_weights else y


def _check_sequence(name, t, d):
    if t.dim() != 3 or t.shape[-1] != d:
        raise ValueError(f"{name} must have shape (B, T, d_model={d}), got {tuple(t.shape)}")


def _block_config(config: AttentionConfig, causal: bool) -> AttentionConfig:
    if config.positions in ("rope", "alibi"):
        raise ValueError(
            f"the encoder-decoder blocks take positions from the embeddings: use positions "
            f"'learned', 'sinusoidal' or 'none', got {config.positions!r}"
        )
    return replace(config, causal=causal, positions="none")


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: ``x + SelfAttn(LN(x))`` then ``x + MLP(LN(x))``, not causal.

    ``forward(x, mask=None)``: x ``(B, T, d_model)``, mask ``(B, T)`` boolean (True = real token).
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        d = config.d_model
        self.ln_1 = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(_block_config(config, causal=False))
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d, config.dropout, config.bias)

    def forward(self, x, mask=None):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
            raise ValueError(
                f"mask must be a boolean (B, T) = {tuple(x.shape[:2])} tensor, got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the source, MLP.

    ``forward(x, memory=None, memory_mask=None, memory_kv=None)``: x ``(B, T_q, d_model)``;
    memory ``(B, T_k, d_model)``, or ``memory_kv = block.cross_attn.project_memory(memory)``
    computed once and reused; memory_mask ``(B, T_k)`` boolean (True = real source token).
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        d = config.d_model
        self.ln_1 = nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(_block_config(config, causal=True))
        self.ln_2 = nn.LayerNorm(d)
        self.cross_attn = CrossAttention(config)
        self.ln_3 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d, config.dropout, config.bias)

    def forward(self, x, memory=None, memory_mask=None, memory_kv=None):
        x = x + self.self_attn(self.ln_1(x))
        x = x + self.cross_attn(self.ln_2(x), memory, memory_mask, kv=memory_kv)
        return x + self.mlp(self.ln_3(x))
