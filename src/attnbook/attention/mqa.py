"""Multi-query attention: every query head shares one key head and one value head.

It is grouped-query attention with a single group (``n_kv_head = 1``): the KV cache shrinks by
a factor ``n_head`` compared with multi-head attention. Registered as ``"mqa"``.
Chapter 4 builds it.
"""

from .config import AttentionConfig
from .gqa import GroupedQueryAttention
from .registry import register_attention


@register_attention("mqa")
class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query self-attention: ``n_head`` query heads, one key/value head."""

    def __init__(self, config: AttentionConfig, **options):
        n_kv_head = options.pop("n_kv_head", 1)
        if n_kv_head not in (None, 1):
            raise ValueError(
                f"mqa has a single key/value head, got n_kv_head={n_kv_head}: "
                f"use 'gqa' for {n_kv_head} key/value heads"
            )
        super().__init__(config, n_kv_head=1, **options)

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return {}
