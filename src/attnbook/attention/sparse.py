"""Causal BigBird-style sparse attention: global, window and random blocks.

Positions are cut into blocks of ``b = sparse_block``. Query block ``i`` sees key block ``j <= i``
when ``j < n_global_blocks``, when ``i - n_window_blocks < j``, or when ``j`` is one of the
``n_random_blocks`` blocks drawn for row ``i`` (``bigbird_pattern``, ``bigbird_mask``); inside a
block the causal rule applies. Compared with ``gqa.py``:

- the random blocks are drawn once per layer at construction and kept in a *persistent* buffer
  (the pattern is part of the model, so a checkpoint restores it);
- the fast path gathers each query block's visible key blocks and attends over them in one batched
  call (``block_sparse_attention``), never forming the ``T x T`` scores.

Generation keeps the ordinary ``KVCache`` (global and random blocks may lie anywhere in the
past). Registered as ``"sparse"``; chapter 10 builds it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_non_negative_int, check_positive_ints
from .config import AttentionConfig
from .core import sdpa
from .gqa import GQAOptions, GroupedQueryAttention
from .masks import restrict
from .registry import register_attention


def draw_random_blocks(n_rows: int, n_global: int, n_window: int, n_random: int) -> torch.Tensor:
    """The random key blocks of each query block row, ``(n_rows, n_random)``, ``-1`` = none.

    Row ``i`` holds ``min(n_random, eligible)`` distinct blocks drawn uniformly, in increasing
    order, from the ``eligible`` blocks ``n_global .. i - n_window``, then ``-1`` padding. Draws
    from torch's global generator.
    """
    table = torch.full((n_rows, n_random), -1, dtype=torch.long)  # (n_rows, n_random)
    for i in range(n_rows):
        eligible = max(i - n_window + 1 - n_global, 0)  # blocks n_global .. i - n_window
        picks = torch.randperm(eligible)[:n_random] + n_global  # (min(n_random, eligible),)
        table[i, : len(picks)] = picks.sort().values
    return table


def bigbird_pattern(n_blocks: int, n_global: int, n_window: int, random_blocks: torch.Tensor):
    """Which key block each query block sees: ``(n_blocks, n_blocks)`` integer codes.

    Args:
        n_blocks: number of blocks of the sequence.
        n_global, n_window: ``g`` and ``w`` of the module docstring.
        random_blocks: ``(n_rows, r)`` random blocks per row (``draw_random_blocks``),
            ``n_rows >= n_blocks``.

    Returns codes ``0`` none, ``1`` global, ``2`` window, ``3`` random (a block both global and
    in the window is "window"), on ``random_blocks``' device; nothing above the diagonal.
    """
    if n_blocks > random_blocks.shape[0]:
        raise ValueError(
            f"random blocks were drawn for {random_blocks.shape[0]} query blocks, got "
            f"n_blocks={n_blocks}: the sequence is longer than the layer's block_size"
        )
    i = torch.arange(n_blocks, device=random_blocks.device)[:, None]  # (n, 1): query block
    j = torch.arange(n_blocks, device=random_blocks.device)[None, :]  # (1, n): key block
    drawn = (random_blocks[:n_blocks, :, None] == j[:, None, :]).any(dim=1)  # (n, n)
    codes = torch.where(drawn, 3, 0)  # (n, n)
    codes = torch.where(j < n_global, 1, codes)  # (n, n)
    codes = torch.where(i - n_window < j, 2, codes)  # (n, n)
    return codes * (j <= i)  # (n, n): no block from the future


def bigbird_mask(t_q, t_k, block, n_global, n_window, random_blocks) -> torch.Tensor:
    """Boolean ``(t_q, t_k)`` mask, ``True`` where a query may attend: the block pattern of
    ``bigbird_pattern`` at positions, made causal inside the blocks.

    Queries are the last ``t_q`` of ``t_k`` positions (bottom-right, as in ``causal_mask``), so
    the query at position ``p = t_k - t_q + i`` uses row ``p // block`` of the pattern. On
    ``random_blocks``' device.
    """
    if t_q <= 0 or t_k < t_q:
        raise ValueError(f"bigbird_mask needs 0 < t_q <= t_k, got t_q={t_q}, t_k={t_k}")
    visible = bigbird_pattern(-(-t_k // block), n_global, n_window, random_blocks) > 0  # (n, n)
    q_pos = torch.arange(t_k - t_q, t_k, device=random_blocks.device)[:, None]  # (t_q, 1)
    k_pos = torch.arange(t_k, device=random_blocks.device)[None, :]  # (1, t_k)
    return visible[q_pos // block, k_pos // block] & (k_pos <= q_pos)  # (t_q, t_k)


def block_sparse_attention(
    q, k, v, block, n_global, n_window, random_blocks, alibi_slopes=None, dropout_p=0.0,
    sinks=None, softcap=None,
):  # fmt: skip
    """Causal BigBird attention in ``O(T * (g + w + r) * block)``, one batched SDPA call.

    Args:
        q: ``(B, n_head, T, head_dim)`` queries, ``T`` a multiple of ``block``.
        k, v: ``(B, n_kv_head, T, head_dim)``, the same ``T`` positions (no cache).
            ``n_kv_head`` divides ``n_head`` (grouped-query attention).
        block, n_global, n_window, random_blocks: the pattern, as in ``bigbird_pattern``.
        alibi_slopes: ``(n_head,)`` ALiBi slopes, or None for no bias.
        dropout_p: dropout on the attention weights.
        sinks, softcap: as in ``sdpa`` (sinks ``(n_head, 1)``), or None.

    Returns ``(B, n_head, T, head_dim)``: what ``sdpa`` with ``bigbird_mask`` returns.

    Each query block gathers the ``K = g + w + r`` (at most) key blocks its row of the pattern
    shows, in increasing order; rows that see fewer fill the rest with masked slots.
    """
    B, H, T, head_dim = q.shape
    if k.shape[-2] != T:
        raise ValueError(
            f"block_sparse_attention needs the keys of the T queries only, got T={T} queries "
            f"and T_k={k.shape[-2]} keys"
        )
    if T % block:
        raise ValueError(
            f"block_sparse_attention needs T to be a multiple of sparse_block={block}, got "
            f"T={T}: pad the sequence"
        )
    n = T // block  # number of blocks
    K = min(n, n_global + n_window + random_blocks.shape[1])  # most key blocks a row sees
    visible = bigbird_pattern(n, n_global, n_window, random_blocks) > 0  # (n, n)
    idx = torch.argsort(~visible, dim=1, stable=True)[:, :K]  # (n, K): the visible ones first
    real = visible.gather(1, idx).repeat_interleave(block, dim=1)  # (n, K * b): not a filler
    offset = torch.arange(block, device=q.device)  # (b,)
    k_pos = (idx[:, :, None] * block + offset).view(n, K * block)  # (n, K * b)
    q_pos = torch.arange(T, device=q.device).view(n, block)  # (n, b)
    distance = q_pos[:, :, None] - k_pos[:, None, :]  # (n, b, K * b)
    mask = ((distance >= 0) & real[:, None, :])[:, None]  # (n, 1, b, K * b)
    if alibi_slopes is not None:
        bias = -alibi_slopes[:, None, None, None].to(q.dtype) * distance  # (H, n, b, K * b)
        mask = restrict(bias.transpose(0, 1), mask)  # (n, H, b, K * b): -inf outside the pattern

    def gather(x):  # (B, h, T, head_dim) -> (B * n, h, K * b, head_dim): the visible key blocks
        x = x.transpose(1, 2).reshape(B, n, block, -1, head_dim)  # (B, n, b, h, head_dim)
        x = x.index_select(1, idx.flatten())  # (B, n * K, b, h, head_dim)
        return x.view(B * n, K * block, -1, head_dim).transpose(1, 2)

    q = q.transpose(1, 2).reshape(B * n, block, H, head_dim).transpose(1, 2)  # (B * n, H, b, ·)
    mask = mask.repeat(B, 1, 1, 1)  # (B * n, 1 or H, b, K * b)
    y = sdpa(q, gather(k), gather(v), mask, dropout_p=dropout_p, enable_gqa=k.shape[1] != H,
             softcap=softcap, sinks=sinks)  # fmt: skip
    return y.transpose(1, 2).reshape(B, T, H, head_dim).transpose(1, 2)  # (B, H, T, head_dim)


@dataclass(frozen=True)
class SparseOptions(GQAOptions):
    """sparse_block: block length (the pattern is chosen per block of queries and keys);
    n_global_blocks: the first blocks, seen by every query; n_window_blocks: each query block
    sees itself and the ``n_window_blocks - 1`` blocks before it; n_random_blocks: how many
    further past blocks each query block sees, drawn at random once per layer."""

    sparse_block: int = 64
    n_global_blocks: int = 2
    n_window_blocks: int = 3
    n_random_blocks: int = 3

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(sparse_block=self.sparse_block, n_window_blocks=self.n_window_blocks)
        check_non_negative_int("n_global_blocks", self.n_global_blocks)
        check_non_negative_int("n_random_blocks", self.n_random_blocks)


@register_attention("sparse")
class SparseAttention(GroupedQueryAttention):
    """Causal BigBird-style block-sparse self-attention (the pattern of the module docstring).

    Projections as in "gqa" (``n_kv_head=None`` means one key/value head per query head, with
    MHA's state_dict layout, plus the ``random_blocks`` buffer). ``forward(x, attn_mask=None,
    need_weights=False, cache=None)`` as in ``Attention``. ``pattern(n_blocks)`` is
    this layer's ``bigbird_pattern``, ``random_blocks`` its ``(ceil(block_size /
    sparse_block), n_random_blocks)`` draw.
    """

    Options = SparseOptions

    def __init__(self, config: AttentionConfig, **options):
        if not config.causal:
            raise ValueError("sparse attention is causal BigBird: causal must be True")
        if config.impl == "flash":
            raise ValueError(
                "impl='flash' masks by position only (causal, window), not by BigBird's block "
                "pattern: use impl='sdpa' or 'reference' for sparse attention"
            )
        super().__init__(config, **options)
        o = self.options
        n_rows = -(-config.block_size // o.sparse_block)  # query blocks of the longest sequence
        random_blocks = draw_random_blocks(
            n_rows, o.n_global_blocks, o.n_window_blocks, o.n_random_blocks
        )
        self.register_buffer("random_blocks", random_blocks)  # persistent: in the state_dict

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        block = max(1, T // 16)
        return dict(sparse_block=block, n_global_blocks=1, n_window_blocks=3, n_random_blocks=2)

    def pattern(self, n_blocks: int) -> torch.Tensor:
        """This layer's ``(n_blocks, n_blocks)`` block pattern (codes of ``bigbird_pattern``)."""
        o = self.options
        return bigbird_pattern(n_blocks, o.n_global_blocks, o.n_window_blocks, self.random_blocks)

    def covers_all(self, t_k: int) -> bool:
        """Whether the pattern over ``t_k`` positions is the whole causal triangle: at most
        ``g + w + r`` blocks, so every past block of every row is global, window or drawn."""
        o = self.options
        seen = o.n_global_blocks + o.n_window_blocks + self.random_blocks.shape[1]
        return -(-t_k // o.sparse_block) <= seen

    def softmax_attend(self, q, k, v, attn_mask=None, need_weights: bool = False):
        """Causal attention where the pattern covers everything, the pattern as a dense mask
        where needed (weights, reference, masks, cached keys), else block-sparse."""
        T, t_k = q.shape[-2], k.shape[-2]
        if t_k > self.config.block_size:  # the random blocks were drawn up to block_size
            raise ValueError(
                f"{t_k} positions: the sequence is longer than the layer's block_size="
                f"{self.config.block_size}"
            )
        dense = need_weights or self.config.impl == "reference" or attn_mask is not None
        if dense or T != t_k or self.covers_all(T):
            return super().softmax_attend(q, k, v, attn_mask, need_weights)
        o = self.options
        pad = -T % o.sparse_block  # padded positions come after every real one: causally unseen
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # (B, h, T + pad, head_dim) each
        y = block_sparse_attention(
            q, k, v, o.sparse_block, o.n_global_blocks, o.n_window_blocks, self.random_blocks,
            self.alibi_slopes, self.attn_dropout, self.row_sinks, self.config.softcap,
        )  # fmt: skip
        return y[:, :, :T], None  # (B, n_head, T, head_dim)

    def _mask(self, attn_mask, t_q, t_k, device):
        """The base class's mask (causal, ALiBi, extra mask), restricted to the BigBird pattern
        unless that covers everything."""
        if self.covers_all(t_k):
            return super()._mask(attn_mask, t_q, t_k, device)  # SDPA's causal kernel may apply
        attn_mask, _ = super()._mask(attn_mask, t_q, t_k, device)
        o = self.options
        allowed = bigbird_mask(
            t_q, t_k, o.sparse_block, o.n_global_blocks, o.n_window_blocks, self.random_blocks
        )
        return restrict(attn_mask, allowed), False
