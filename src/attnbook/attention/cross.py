"""Cross-attention and the encoder-decoder blocks built around it.

In cross-attention the queries come from one sequence (the decoder's, ``x``: ``(B, T_q, n_embd)``)
and the keys and values from another (the encoder's output, ``memory``: ``(B, T_k, n_embd)``), of
any lengths. Compared with ``gqa.py`` (whose ``n_kv_head`` option it shares), three things change:

- the source's keys and values are projected once, by ``project_memory``, into a ``CrossCache``
  that the layer reads as its cache at every step (``project`` makes only the queries);
- there is no causal mask (the whole source is known), only the source's padding mask;
- no RoPE or ALiBi: positions are already inside ``x`` and ``memory``.

``EncoderBlock`` (pre-norm self-attention, not causal, + MLP) and ``DecoderBlock`` (pre-norm
causal self-attention + cross-attention + MLP) take positions from the embeddings (``positions``
"learned", "sinusoidal" or "none"); RoPE and ALiBi are refused. Chapter 5 builds them.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..mlp import MLP
from .base import Attention
from .config import AttentionConfig
from .gqa import GQAOptions
from .masks import restrict
from .mha import MultiHeadAttention


@dataclass(frozen=True)
class CrossCache:
    """What cross-attention reads at every decoding step: the source's keys and values
    ``(B, n_kv_head, T_k, head_dim)`` and its padding mask ``(B, T_k)`` (``True`` = real token)
    or None. ``length`` is ``T_k``."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.k.shape[2]


class CrossAttention(Attention):
    """Multi-head (or grouped-query, option ``n_kv_head``) attention from ``x`` to a source.

    ``forward(x, attn_mask=None, need_weights=False, cache)`` is ``Attention.forward`` with
    ``cache = project_memory(memory, memory_mask)``: x ``(B, T_q, n_embd)`` -> ``(B, T_q,
    n_embd)``, and the ``(B, n_head, T_q, T_k)`` weights with ``need_weights``.
    """

    Options = GQAOptions

    def __init__(self, config: AttentionConfig, **options):
        super().__init__(_block_config(config, causal=False), **options)
        self.n_kv_head = self.options.heads(config.n_head)
        d, kv = config.n_embd, self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(d, d, bias=config.bias)  # queries from the decoder
        self.c_kv = nn.Linear(d, 2 * kv, bias=config.bias)  # keys and values from the source

    def project_memory(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None):
        """The ``CrossCache`` of a source ``memory`` ``(B, T_k, n_embd)`` with its optional
        boolean padding mask ``memory_mask`` ``(B, T_k)``."""
        B, T_k = self.check_input(memory, "memory")
        if memory_mask is not None and (
            memory_mask.shape != (B, T_k) or memory_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"memory_mask must be a boolean (B, T_k) = {(B, T_k)} tensor, got "
                f"{memory_mask.dtype} {tuple(memory_mask.shape)}"
            )
        k, v = self.c_kv(memory).split(self.n_kv_head * self.head_dim, dim=2)  # 2 x (B, T_k, kv)
        # keys and values: (B, n_kv_head, T_k, head_dim)
        k = k.view(B, T_k, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T_k, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.config.qk_norm:
            k = self.k_norm(k).to(v.dtype)
        return CrossCache(k, v, memory_mask)

    def normalize(self, q: torch.Tensor, k):
        """QK-norm of the queries; the source's keys were normalised by ``project_memory``."""
        if not self.config.qk_norm:
            return q, k
        return self.q_norm(q).to(q.dtype), k

    def mask_widths(self, T: int, cache) -> tuple[int, ...]:
        """The source's positions (the cache holds them all)."""
        return 1, cache.length if isinstance(cache, CrossCache) else 1

    def project(self, x: torch.Tensor):
        """Queries ``(B, n_head, T_q, head_dim)``; the keys and values are the cache's."""
        B, T, d = x.shape
        return self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2), None, None

    def attend(self, q, k, v, attn_mask=None, need_weights: bool = False, cache=None):
        """Softmax attention over the source in ``cache``, its padding mask applied."""
        if not isinstance(cache, CrossCache):
            raise ValueError(
                "cross-attention reads the source from its cache: call it with "
                "cache=layer.project_memory(memory, memory_mask)"
            )
        if cache.k.shape[0] != q.shape[0]:
            raise ValueError(
                f"x and memory must have the same batch size, got {q.shape[0]} and "
                f"{cache.k.shape[0]}"
            )
        if cache.mask is not None:
            attn_mask = restrict(attn_mask, cache.mask[:, None, None, :])  # (B, 1, 1, T_k)
        return self.softmax_attend(q, cache.k, cache.v, attn_mask, need_weights)


def _block_config(config: AttentionConfig, causal: bool) -> AttentionConfig:
    if config.positions in ("rope", "alibi"):
        raise ValueError(
            f"the encoder-decoder layers take positions from the embeddings: use positions "
            f"'learned', 'sinusoidal' or 'none', got {config.positions!r}"
        )
    return replace(config, causal=causal, positions="none")


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: ``x + SelfAttn(LN(x))`` then ``x + MLP(LN(x))``, not causal.

    ``forward(x, mask=None)``: x ``(B, T, n_embd)``, mask ``(B, T)`` boolean (True = real token).
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        d = config.n_embd
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

    ``forward(x, memory=None, memory_mask=None, memory_kv=None)``: x ``(B, T_q, n_embd)``;
    memory ``(B, T_k, n_embd)`` with its optional boolean padding mask memory_mask ``(B, T_k)``,
    or instead ``memory_kv = block.cross_attn.project_memory(memory, memory_mask)``, computed
    once and reused at every decoding step.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        d = config.n_embd
        self.ln_1 = nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(_block_config(config, causal=True))
        self.ln_2 = nn.LayerNorm(d)
        self.cross_attn = CrossAttention(config)
        self.ln_3 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d, config.dropout, config.bias)

    def forward(self, x, memory=None, memory_mask=None, memory_kv=None):
        if (memory is None) == (memory_kv is None):
            raise ValueError("pass either memory or memory_kv=project_memory(memory), not both")
        if memory_kv is None:
            memory_kv = self.cross_attn.project_memory(memory, memory_mask)
        elif memory_mask is not None:
            raise ValueError("memory_kv carries its mask: pass memory_mask to project_memory")
        x = x + self.self_attn(self.ln_1(x))
        x = x + self.cross_attn(self.ln_2(x), cache=memory_kv)
        return x + self.mlp(self.ln_3(x))
