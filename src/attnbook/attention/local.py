"""Sliding-window (local) attention: each query sees only the last ``window`` positions.

Query ``i`` attends to keys ``j`` with ``i - window < j <= i``: itself and the ``window - 1``
positions before it (``window`` is its option, next to gqa's ``n_kv_head``). Compared with
``gqa.py`` three things change:

- the mask is a band (``sliding_window_mask``) instead of a triangle;
- the fast path never forms the ``T x T`` scores: queries are cut into chunks of ``window``
  positions, and each chunk attends to its own chunk of keys and the one before
  (``blocked_local_attention``), so the work grows as ``T * window`` instead of ``T * T``;
- generation keeps only the last ``window`` positions (``RollingKVCache``), so the cache stops
  growing once the sequence is longer than the window.

The dense path (reference, weights, an extra mask, a short sequence) uses the band mask. Keys
are rotated before they are cached, so dropping old ones changes nothing. Chapter 9 builds it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_positive_int, check_positive_ints
from ..kv_cache import KVCache
from .config import AttentionConfig
from .core import sdpa
from .gqa import GQAOptions, GroupedQueryAttention
from .masks import restrict, sliding_window_mask
from .registry import register_attention


def blocked_local_attention(
    q, k, v, window, alibi_slopes=None, dropout_p=0.0, sinks=None, softcap=None
):
    """Causal sliding-window attention in ``O(T * window)``, one batched SDPA call over chunks.

    Args:
        q: ``(B, n_head, T, head_dim)`` queries, the last ``T`` of the ``T_k`` key positions.
        k, v: ``(B, n_kv_head, T_k, head_dim)``, ``T_k - T < window`` (the extra keys come from
            a cache, trimmed to the window). ``n_kv_head`` divides ``n_head`` (grouped-query attention).
        window: how many positions each query sees (itself included).
        alibi_slopes: ``(n_head,)`` ALiBi slopes, or None for no bias.
        dropout_p: dropout on the attention weights.
        sinks, softcap: as in ``sdpa`` (sinks ``(n_head, 1)``), or None.

    Returns ``(B, n_head, T, head_dim)``: what ``sdpa`` with ``sliding_window_mask`` returns.

    Keys are left-padded so that the ``W = window`` queries of chunk ``c`` sit at key chunk
    ``c + 1``; each query chunk then reads key chunks ``c`` and ``c + 1`` (``2W`` keys), and the
    same ``(W, 2W)`` band selects its keys in every chunk.
    """
    B, H, T, head_dim = q.shape
    W, P = window, k.shape[-2] - T  # P: keys before the first query, at most W - 1
    if not 0 <= P < W:
        raise ValueError(
            f"blocked_local_attention needs 0 <= T_k - T < window={window}, got "
            f"T_k={k.shape[-2]} keys for T={T} queries"
        )
    n = -(-T // W)  # number of query chunks
    pad = n * W - T  # the last chunk is padded to W queries; their outputs are dropped
    q = F.pad(q, (0, 0, 0, pad)).view(B, H, n, W, head_dim)  # (B, H, n, W, head_dim)
    q = q.transpose(1, 2).reshape(B * n, H, W, head_dim)  # chunks as a batch: (B * n, H, W, ·)

    def pairs(x):  # (B, n_kv_head, T_k, head_dim) -> (B * n, n_kv_head, 2W, head_dim)
        x = F.pad(x, (0, 0, W - P, pad))  # (B, n_kv_head, (n + 1) * W, head_dim)
        x = x.view(B, x.shape[1], n + 1, W, head_dim)  # (B, n_kv_head, n + 1, W, head_dim)
        x = torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)  # chunks c and c + 1 side by side
        return x.transpose(1, 2).reshape(B * n, -1, 2 * W, head_dim)

    k, v = pairs(k), pairs(v)  # (B * n, n_kv_head, 2W, head_dim) each
    row = torch.arange(W, device=q.device)[:, None]  # (W, 1): query r of a chunk
    col = torch.arange(2 * W, device=q.device)[None, :]  # (1, 2W): key l of the pair
    distance = W + row - col  # (W, 2W): how far back key l is from query r
    real = torch.arange((n + 1) * W, device=q.device) >= W - P  # ((n + 1) * W,): not padding
    real = real.view(n + 1, W)  # (n + 1, W)
    real = torch.cat([real[:-1], real[1:]], dim=1).repeat(B, 1)  # (B * n, 2W)
    mask = (distance >= 0) & (distance < W) & real[:, None, None, :]  # (B * n, 1, W, 2W)
    if alibi_slopes is not None:
        bias = -alibi_slopes[:, None, None].to(q.dtype) * distance  # (H, W, 2W)
        mask = restrict(bias, mask)  # (B * n, H, W, 2W): -inf outside the band
    y = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=k.shape[1] != H,
             softcap=softcap, sinks=sinks)  # fmt: skip
    y = y.view(B, n, H, W, head_dim).transpose(1, 2).reshape(B, H, n * W, head_dim)
    return y[:, :, :T]  # (B, n_head, T, head_dim)


class RollingKVCache(KVCache):
    """Keys and values of the last ``window`` positions of one layer, oldest first.

    Same protocol as ``KVCache``: ``append(k, v)`` stores ``T`` new positions and returns the keys
    and values the new queries may see (up to ``window - 1`` cached positions, then the ``T``
    new ones), ``length`` is the number of positions seen so far, ``reset()`` empties it,
    ``bytes_per_token`` is the cost of one cached position. The storage is
    ``(B, n_kv_head, min(window, max_len), head_dim)`` however long the sequence gets.

    Args:
        batch_size, n_kv_head, head_dim: the shape of what is cached.
        window: how many positions each query sees.
        max_len: the most positions the sequence will have; appending past it raises.
        device, dtype: where and how the tensors are stored (a lower precision is cast back
            by the attention).
    """

    def __init__(self, batch_size, n_kv_head, head_dim, window, max_len, device=None, dtype=None):
        check_positive_ints(window=window, max_len=max_len)
        slots = min(window, max_len)  # the storage never holds more than the window
        super().__init__(batch_size, n_kv_head, head_dim, slots, device=device, dtype=dtype)
        self.window, self.max_len = window, max_len

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store ``k``, ``v``: ``(B, n_kv_head, T, head_dim)``; return ``(B, n_kv_head, kept + T,
        head_dim)`` each, with ``kept = min(length, window - 1)`` cached positions first."""
        self._check(k, v)
        T = k.shape[-2]
        kept = min(self.length, self.window - 1, self.k.shape[2])  # before counting the new ones
        self._reserve(T)
        old = slice(self.k.shape[2] - kept, None)  # the last `kept` slots hold the newest positions
        # what the new queries may see: (B, n_kv_head, kept + T, head_dim) each
        k_all = torch.cat([self.k[:, :, old], k.to(self.k.dtype)], dim=2)
        v_all = torch.cat([self.v[:, :, old], v.to(self.v.dtype)], dim=2)
        keep = min(kept + T, self.k.shape[2])  # right-aligned: newest position in the last slot
        self.k[:, :, -keep:] = k_all[:, :, -keep:]
        self.v[:, :, -keep:] = v_all[:, :, -keep:]
        return k_all, v_all


@dataclass(frozen=True)
class LocalOptions(GQAOptions):
    """window: how many positions each query sees, itself included."""

    window: int = 256

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("window", self.window)


@register_attention("local")
class LocalAttention(GroupedQueryAttention):
    """Causal sliding-window self-attention: each query sees the last ``window`` positions.

    Projections as in "gqa" (``n_kv_head=None`` means one key/value head per query head, with
    MHA's state_dict layout). ``forward(x, attn_mask=None, need_weights=False, cache=None)`` as in
    ``Attention``. It decodes with the ``RollingKVCache`` of ``new_cache``, or with a
    full ``KVCache``, of which it reads only the last ``window - 1 + T`` keys; ``attn_mask`` may
    cover every position so far (``cache.length + T`` keys) or only those, and the
    ``need_weights`` weights cover only those: ``(B, n_head, T, min(T_k, window - 1 + T))``.
    """

    Options = LocalOptions

    def __init__(self, config: AttentionConfig, **options):
        if not config.causal:
            raise ValueError("local attention is a causal sliding window: causal must be True")
        super().__init__(config, **options)

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return {"window": max(1, T // 8)}

    @property
    def window(self) -> int:
        return self.options.window

    def mask_widths(self, T: int, cache) -> tuple[int, ...]:
        """Every position so far, or only the last ``window - 1 + T`` (those the queries see)."""
        everything = super().mask_widths(T, cache)[1]
        return 1, everything, min(everything, self.window - 1 + T)

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """A ``RollingKVCache`` of ``min(window, max_len)`` positions (``max_len`` defaults to
        ``block_size``)."""
        return RollingKVCache(
            batch_size,
            self.n_kv_head,
            self.head_dim,
            self.window,
            **self._cache_options(max_len, device, dtype),
        )

    def softmax_attend(self, q, k, v, attn_mask=None, need_weights: bool = False):
        """The band as a dense mask where that is as cheap (or needed), else the blocked path.
        Keys older than the window of the first query (a full KVCache holds them) are dropped."""
        T = q.shape[-2]
        window = self.window
        keep = window - 1 + T  # the keys some query of this chunk may see
        k, v = k[:, :, -keep:], v[:, :, -keep:]  # (B, n_kv_head, T_k <= keep, head_dim)
        if attn_mask is not None and attn_mask.shape[-1] > k.shape[-2]:
            attn_mask = attn_mask[..., -k.shape[-2] :]  # a mask over every position: the kept
        dense = need_weights or self.config.impl != "sdpa" or attn_mask is not None
        if dense or T <= window:  # one chunk: the band is already O(T * window); or flash
            return super().softmax_attend(q, k, v, attn_mask, need_weights)
        y = blocked_local_attention(
            q, k, v, window, self.alibi_slopes, self.attn_dropout, self.row_sinks,
            self.config.softcap,
        )  # fmt: skip
        return y, None

    def _mask(self, attn_mask, t_q, t_k, device):
        """The base class's mask (ALiBi, extra mask) restricted to the sliding window."""
        attn_mask, _ = super()._mask(attn_mask, t_q, t_k, device)
        band = sliding_window_mask(t_q, t_k, self.window, device)  # (t_q, t_k)
        return restrict(attn_mask, band), False
