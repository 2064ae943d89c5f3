"""Sliding-window (local) attention: each query sees only the last ``window`` positions.

Query ``i`` attends to keys ``j`` with ``i - window < j <= i``: itself and the ``window - 1``
positions before it (``window`` is its option, next to gqa's ``n_kv_head``); with
``sink_tokens`` (StreamingLLM's attention sinks) also the first ``sink_tokens`` positions.
Compared with ``gqa.py`` three things change:

- the mask is a band (``sliding_window_mask``) instead of a triangle;
- the fast path never forms the ``T x T`` scores: queries are cut into chunks of ``window``
  positions, and each chunk attends to its own chunk of keys and the one before, and to the
  sinks (``blocked_local_attention``), so the work grows as ``T * (window + sink_tokens)``;
- generation keeps only the sinks and the last ``window`` positions (``RollingKVCache``), so the
  cache stops growing: with RoPE or ALiBi a model of such layers decodes past ``block_size``.

The dense path (reference, weights, an extra mask, a short sequence) uses the band mask. Keys
are rotated before they are cached, so dropping old ones changes nothing. Chapter 9 builds it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_non_negative_int, check_positive_int
from ..kv_cache import KVCache
from .config import AttentionConfig
from .core import sdpa
from .gqa import GQAOptions, GroupedQueryAttention
from .masks import restrict, sliding_window_mask
from .registry import register_attention


def blocked_local_attention(
    q, k, v, window, alibi_slopes=None, dropout_p=0.0, sink_k=None, sink_v=None, start=None,
    sinks=None, softcap=None,
):  # fmt: skip
    """Causal sliding-window attention in ``O(T * (window + S))``, one batched SDPA call over chunks.

    Args:
        q: ``(B, n_head, T, head_dim)`` queries, at positions ``start .. start + T - 1``.
        k, v: ``(B, n_kv_head, T_k, head_dim)``, the keys of positions ``start - P .. start + T
            - 1`` with ``P = T_k - T < window`` (the extra keys come from a cache, trimmed to the
            window). ``n_kv_head`` divides ``n_head`` (grouped-query attention).
        window: how many positions each query sees (itself included).
        alibi_slopes: ``(n_head,)`` ALiBi slopes, or None for no bias.
        dropout_p: dropout on the attention weights.
        sink_k, sink_v: ``(B, n_kv_head, S, head_dim)``, the keys of positions ``0 .. S - 1``
            (attention sinks), which every later query sees besides its window; None: none.
        start: the position of the first query (default ``P``: ``k`` starts at position 0);
            only the sinks need it.
        sinks, softcap: sink logits ``(n_head, 1)`` and the cap, as in ``sdpa``, or None.

    Returns ``(B, n_head, T, head_dim)``: what ``sdpa`` with ``sliding_window_mask`` (and
    ``sink_tokens=S``) returns.

    Keys are left-padded so that the ``W = window`` queries of chunk ``c`` sit at key chunk
    ``c + 1``; each query chunk then reads the sinks and key chunks ``c`` and ``c + 1`` (``S + 2W``
    keys), and the same ``(W, 2W)`` band selects its keys in every chunk. A sink that is also a
    key of the pair is seen through the band only, so no key counts twice.
    """
    B, H, T, head_dim = q.shape
    W, P = window, k.shape[-2] - T  # P: keys before the first query, at most W - 1
    if not 0 <= P < W:
        raise ValueError(
            f"blocked_local_attention needs 0 <= T_k - T < window={window}, got "
            f"T_k={k.shape[-2]} keys for T={T} queries"
        )
    S = 0 if sink_k is None else sink_k.shape[-2]
    start = P if start is None else start
    if start < P:
        raise ValueError(f"start={start} puts the first of the T_k={k.shape[-2]} keys before 0")
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
    bias = None
    if alibi_slopes is not None:
        bias = -alibi_slopes[:, None, None].to(q.dtype) * distance  # (H, W, 2W)
    if S:
        pos = start + torch.arange(n * W, device=q.device).view(n, W, 1)  # (n, W, 1): queries
        sink = torch.arange(S, device=q.device)  # (S,): the sinks' positions
        to_sink = pos - sink  # (n, W, S): how far back each sink is
        # seen through the sink columns: not in the future, and not already a key of the pair
        seen = (to_sink >= 0) & ((sink < start - P) | (to_sink >= W))  # (n, W, S)
        mask = torch.cat([seen.repeat(B, 1, 1)[:, None], mask.expand(B * n, 1, W, 2 * W)], -1)
        k = torch.cat([_per_chunk(sink_k, n), k], dim=2)  # (B * n, n_kv_head, S + 2W, head_dim)
        v = torch.cat([_per_chunk(sink_v, n), v], dim=2)
        if bias is not None:
            to_sink = -alibi_slopes[:, None, None, None].to(q.dtype) * to_sink  # (H, n, W, S)
            to_sink = to_sink.transpose(0, 1).repeat(B, 1, 1, 1)  # (B * n, H, W, S)
            bias = torch.cat([to_sink, bias.expand(B * n, H, W, 2 * W)], dim=-1)
    if bias is not None:
        mask = restrict(bias, mask)  # (B * n, H, W, S + 2W): -inf where no key may be seen
    y = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=k.shape[1] != H,
             softcap=softcap, sinks=sinks)  # fmt: skip
    y = y.view(B, n, H, W, head_dim).transpose(1, 2).reshape(B, H, n * W, head_dim)
    return y[:, :, :T]  # (B, n_head, T, head_dim)


def _per_chunk(x, n):
    """``(B, n_kv_head, S, head_dim)`` -> ``(B * n, n_kv_head, S, head_dim)``: a copy per chunk."""
    B, H_kv, S, head_dim = x.shape
    return x[:, None].expand(B, n, H_kv, S, head_dim).reshape(B * n, H_kv, S, head_dim)


class RollingKVCache(KVCache):
    """Keys and values of the first ``sink_tokens`` and the last ``window`` positions of one
    layer: StreamingLLM's cache (without sinks, Mistral's rolling buffer).

    Same protocol as ``KVCache``: ``append(k, v)`` stores ``T`` new positions and returns the keys
    and values the new queries may see: the sinks, then up to ``window - 1`` cached positions
    after them, then the ``T`` new ones (so, while nothing was dropped, every position so far
    in order). ``length`` is the number of positions seen so far, ``reset()`` empties it,
    ``bytes_per_token`` is the cost of one cached position. The storage is ``(B, n_kv_head,
    min(sink_tokens + window, max_len), head_dim)`` however long the sequence gets (sinks first,
    then the newest positions, oldest first): it is ``bounded``, so ``max_len=None`` feeds it any
    number of positions.

    Positions: keys are cached after RoPE rotated them, so each keeps its true position, and a
    query at position ``p`` scores sink ``j`` at its true distance ``p - j`` (ALiBi too): cached
    decoding equals a full pass with ``sliding_window_mask(..., sink_tokens)`` at any length.
    StreamingLLM instead numbers positions within the cache (the sinks ``0 ..``, the window
    right after them) and rotates keys as they are read, so that no distance exceeds the cache's
    size; here, past ``block_size``, the sinks are at distances the model never trained on.

    Args:
        batch_size, n_kv_head, head_dim: the shape of what is cached.
        window: how many positions each query sees, itself included.
        max_len: the most positions the sequence will have (appending past it raises); None:
            no limit.
        sink_tokens: how many first positions stay visible to every query (0: none).
        device, dtype: where and how the tensors are stored (a lower precision is cast back
            by the attention).
    """

    bounded = True

    def __init__(
        self, batch_size, n_kv_head, head_dim, window, max_len=None, sink_tokens=0, device=None,
        dtype=None,
    ):  # fmt: skip
        check_positive_int("window", window)
        check_non_negative_int("sink_tokens", sink_tokens)
        if max_len is not None:
            check_positive_int("max_len", max_len)
        slots = window + sink_tokens  # the storage never holds more than sinks and window
        slots = slots if max_len is None else min(slots, max_len)
        super().__init__(batch_size, n_kv_head, head_dim, slots, device=device, dtype=dtype)
        self.window, self.sink_tokens, self.max_len = window, sink_tokens, max_len

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store ``k``, ``v``: ``(B, n_kv_head, T, head_dim)``; return ``(B, n_kv_head, sinks +
        kept + T, head_dim)`` each: ``sinks = min(length, sink_tokens)`` cached sink positions,
        then ``kept = min(length - sinks, window - 1)`` cached positions, then the new ones."""
        self._check(k, v)
        T = k.shape[-2]
        start = self._reserve(T)  # the new positions: start .. start + T - 1
        slots = self.k.shape[2]
        sink_slots = min(self.sink_tokens, slots)  # the first slots hold positions 0, 1, ...
        sinks = min(start, sink_slots)  # cached sinks
        kept = min(start - sinks, self.window - 1)  # cached positions past them the queries see
        new_sinks = max(0, min(start + T, sink_slots) - start)  # new positions that are sinks
        # what the new queries may see: (B, n_kv_head, sinks + kept + T, head_dim) each; the last
        # `kept` slots hold the newest cached positions
        k_all = torch.cat(
            [self.k[:, :, :sinks], self.k[:, :, slots - kept :], k.to(self.k.dtype)], 2
        )
        v_all = torch.cat(
            [self.v[:, :, :sinks], self.v[:, :, slots - kept :], v.to(self.v.dtype)], 2
        )
        self.k[:, :, start : start + new_sinks] = k_all[:, :, start : start + new_sinks]
        self.v[:, :, start : start + new_sinks] = v_all[:, :, start : start + new_sinks]
        recent = slice(sinks + new_sinks, None)  # the positions past the sinks, newest last
        keep = min(k_all.shape[2] - recent.start, slots - sink_slots)  # right-aligned in slots
        if keep:
            self.k[:, :, slots - keep :] = k_all[:, :, recent][:, :, -keep:]
            self.v[:, :, slots - keep :] = v_all[:, :, recent][:, :, -keep:]
        return k_all, v_all


@dataclass(frozen=True)
class LocalOptions(GQAOptions):
    """window: how many positions each query sees, itself included.

    sink_tokens: how many first positions of the sequence every later query sees besides its
    window (StreamingLLM's attention sinks; 0: none). Any number is allowed: a sink inside a
    query's window is seen once, ``sink_tokens >= window`` adds the sinks the window no longer
    holds, and ``sink_tokens >= block_size`` makes every position of a forward pass a sink (full
    causal attention) while the cache keeps ``sink_tokens + window`` positions.
    """

    window: int = 256
    sink_tokens: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("window", self.window)
        check_non_negative_int("sink_tokens", self.sink_tokens)


@register_attention("local")
class LocalAttention(GroupedQueryAttention):
    """Causal sliding-window self-attention: each query sees the last ``window`` positions, and
    the first ``sink_tokens``.

    Projections as in "gqa" (``n_kv_head=None`` means one key/value head per query head, with
    MHA's state_dict layout). ``forward(x, attn_mask=None, need_weights=False, cache=None)`` as in
    ``Attention``. It decodes with the ``RollingKVCache`` of ``new_cache`` (any number of
    positions: ``max_len=None``), or with a full ``KVCache``, of which it reads only the sinks and
    the last ``window - 1 + T`` keys; ``attn_mask`` may cover every position so far
    (``cache.length + T`` keys) or only those, and the ``need_weights`` weights cover only those.
    ``impl="flash"`` masks by the window only: it refuses ``sink_tokens > 0``.
    """

    Options = LocalOptions

    def __init__(self, config: AttentionConfig, **options):
        if not config.causal:
            raise ValueError("local attention is a causal sliding window: causal must be True")
        super().__init__(config, **options)
        if config.impl == "flash" and self.sink_tokens:
            raise ValueError(
                f"impl='flash' masks by the window only, not by sink_tokens={self.sink_tokens}: "
                f"use impl='sdpa' (or sink_tokens=0)"
            )

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return {"window": max(1, T // 8)}

    @property
    def window(self) -> int:
        return self.options.window

    @property
    def sink_tokens(self) -> int:
        return self.options.sink_tokens

    def kept(self, n: int, T: int) -> tuple[int, int]:
        """For ``T`` queries, the last of ``n`` positions: how many sinks they see, and how many
        of the newest positions past the sinks (their windows)."""
        sinks = min(self.sink_tokens, n)
        return sinks, min(n - sinks, self.window - 1 + T)

    def mask_widths(self, T: int, cache) -> tuple[int, ...]:
        """Every position so far, or only the sinks and the windows (those the queries see)."""
        everything = super().mask_widths(T, cache)[1]
        return 1, everything, sum(self.kept(everything, T))

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """A ``RollingKVCache`` of ``min(sink_tokens + window, max_len)`` positions, fed up to
        ``max_len`` positions (None: no limit)."""
        return RollingKVCache(
            batch_size,
            self.n_kv_head,
            self.head_dim,
            self.window,
            sink_tokens=self.sink_tokens,
            **self._cache_options(max_len, device, dtype, bounded=True),
        )

    def attend(self, q, k, v, attn_mask=None, need_weights: bool = False, cache=None):
        """``Attention.attend``, telling ``softmax_attend`` how many positions there are so far:
        with a ``RollingKVCache`` the keys skip from the sinks to the window."""
        n = q.shape[-2] + (0 if cache is None else cache.length)  # these T queries included
        if isinstance(cache, RollingKVCache) and (
            cache.window < self.window or cache.sink_tokens < self.sink_tokens
        ):
            raise ValueError(
                f"the RollingKVCache keeps window={cache.window}, sink_tokens="
                f"{cache.sink_tokens}, less than this layer sees (window={self.window}, "
                f"sink_tokens={self.sink_tokens}): build it with layer.new_cache"
            )
        if cache is not None:
            k, v = self.read_cache(cache, k, v, q.dtype)  # (B, n_kv_head, T_k, head_dim)
        return self.softmax_attend(q, k, v, attn_mask, need_weights, n)

    def softmax_attend(self, q, k, v, attn_mask=None, need_weights: bool = False, n=None):
        """The band and sinks as a dense mask where that is as cheap (or needed), else the
        blocked path.

        ``k``, ``v``: ``(B, n_kv_head, T_k, head_dim)``, the sinks first (positions ``0, 1,
        ...``), then the newest positions up to ``n - 1`` (``n`` defaults to ``T_k``: every
        position). Keys no query sees (a full KVCache holds them) are dropped first.
        """
        T, window = q.shape[-2], self.window
        n = k.shape[-2] if n is None else n
        sinks, recent = self.kept(n, T)
        dense = need_weights or self.config.impl != "sdpa" or attn_mask is not None
        if not dense and T > window:  # several chunks: the blocked path, O(T * (window + sinks))
            band = min(n, window - 1 + T)  # the keys in some query's window: the newest
            k_band, v_band = k[:, :, k.shape[2] - band :], v[:, :, v.shape[2] - band :]
            sink_k, sink_v = (k[:, :, :sinks], v[:, :, :sinks]) if sinks else (None, None)
            slopes, dropout_p = self.alibi_slopes, self.attn_dropout
            y = blocked_local_attention(
                q, k_band, v_band, window, slopes, dropout_p, sink_k, sink_v, start=n - T,
                sinks=self.row_sinks, softcap=self.config.softcap,
            )  # fmt: skip
            return y, None
        if sinks + recent < k.shape[-2]:  # (B, n_kv_head, sinks + recent, head_dim) each
            k, v = (torch.cat([x[:, :, :sinks], x[:, :, x.shape[2] - recent :]], 2) for x in (k, v))
        if attn_mask is not None and attn_mask.shape[-1] == n > sinks + recent:  # every position
            attn_mask = torch.cat([attn_mask[..., :sinks], attn_mask[..., n - recent :]], -1)
        if self.config.impl == "flash" and not need_weights:  # no sinks: a window, no mask
            return super().softmax_attend(q, k, v, attn_mask, need_weights)
        # Over the kept keys' indices the band is the band over positions: past the sinks they
        # are the newest positions, and once keys were dropped every query sees every sink.
        allowed = sliding_window_mask(T, k.shape[-2], window, q.device, self.sink_tokens)
        if self.alibi_slopes is not None:  # the true distances, the sinks' included
            k_pos = torch.cat([torch.arange(sinks), torch.arange(n - recent, n)]).to(q.device)
            to_key = torch.arange(n - T, n, device=q.device)[:, None] - k_pos  # (T, T_k)
            bias = -self.alibi_slopes[:, None, None] * to_key  # (n_head, T, T_k)
            bias = bias.to(self.c_proj.weight.dtype)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                bias = restrict(bias, attn_mask)
            elif attn_mask is not None:
                bias = bias + attn_mask
            attn_mask = bias
        return super().softmax_attend(q, k, v, restrict(attn_mask, allowed), need_weights)

    def _mask(self, attn_mask, t_q, t_k, device):
        """``softmax_attend`` built the whole mask (band, sinks, ALiBi, ``attn_mask``)."""
        return attn_mask, False
