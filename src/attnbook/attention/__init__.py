"""Attention variants and the registry that builds them by name.

    from attnbook.attention import AttentionConfig, available, build_attention
    attn = build_attention("mha", AttentionConfig(n_embd=64, n_head=4))
    y = attn(x)  # x: (B, T, 64) -> y: (B, T, 64)
    gqa = build_attention("gqa", AttentionConfig(n_embd=64, n_head=4), n_kv_head=2)  # its option

Importing this package imports every variant module, so ``available()`` lists them all.
Chapter 3 introduces the registry.
"""

from .base import Attention
from .config import AttentionConfig
from .core import sdpa, sdpa_reference
from .cross import CrossAttention, CrossCache, DecoderBlock, EncoderBlock
from .deltanet import DeltaNet, GatedDeltaNet
from .dsa import DeepSeekSparseAttention, IndexedLatentCache, Indexer
from .flash import flash_attention, merge_partial
from .gqa import GroupedQueryAttention
from .linear import LinearAttention
from .local import LocalAttention
from .masks import additive_mask, causal_mask, padding_mask, restrict, sliding_window_mask
from .mha import MultiHeadAttention
from .mla import MultiHeadLatentAttention
from .moba import MoBAAttention
from .mqa import MultiQueryAttention
from .nsa import NativeSparseAttention
from .registry import attention_class, available, build_attention, register_attention
from .single_head import Head, SelfAttention
from .sparse import SparseAttention

__all__ = [
    "AttentionConfig",
    "Attention",
    "CrossAttention",
    "CrossCache",
    "DecoderBlock",
    "DeepSeekSparseAttention",
    "DeltaNet",
    "EncoderBlock",
    "GatedDeltaNet",
    "GroupedQueryAttention",
    "Head",
    "IndexedLatentCache",
    "Indexer",
    "LinearAttention",
    "LocalAttention",
    "MoBAAttention",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "MultiQueryAttention",
    "NativeSparseAttention",
    "SelfAttention",
    "SparseAttention",
    "additive_mask",
    "attention_class",
    "available",
    "build_attention",
    "causal_mask",
    "flash_attention",
    "merge_partial",
    "padding_mask",
    "register_attention",
    "restrict",
    "sdpa",
    "sdpa_reference",
    "sliding_window_mask",
]
