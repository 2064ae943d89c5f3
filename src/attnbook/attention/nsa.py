"""Native Sparse Attention (Yuan et al., DeepSeek, ACL 2025): three gated branches per query.

Compared with ``gqa.py``, query ``t`` attends three times over the same keys and values and adds
the outputs with per-head gates ``g = sigmoid(g_proj(x_t))``:

- compression: the keys (values) are cut into blocks of ``l`` positions every ``d`` positions,
  and ``φ`` maps each block to one key (value) (``compress``); ``t`` sees the blocks ending at or
  before it;
- selection: the compression branch's probabilities rank the blocks of ``l'`` positions (paper
  eq. 9, summed over the query heads of a key/value head, which share the choice); ``t`` attends
  over the ``n`` best (``select_blocks``: the first block and its two latest always among them);
- sliding window: the last ``w`` positions, as in ``local.py``.

Deviations: one k, v serve the three branches (as in fla's implementation; the paper gives each its
own), so the cache is the plain ``KVCache`` and the compressed keys are recomputed from it; ``φ`` is
linear (the paper's is an MLP). Registered as ``"nsa"``; chapter 14 builds it.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive_ints
from .config import AttentionConfig
from .core import sdpa, sdpa_reference
from .flash import flash_attention
from .gqa import GQAOptions, GroupedQueryAttention
from .local import blocked_local_attention
from .masks import causal_mask, restrict, sliding_window_mask
from .registry import register_attention


def compress(x: torch.Tensor, phi: Callable, block: int, stride: int) -> torch.Tensor:
    """One vector per block of ``block`` positions starting every ``stride`` positions.

    Args:
        x: ``(B, h, T, D)`` keys or values.
        phi: maps flattened blocks ``(..., block * D)`` (position-major) to ``(..., D_out)``
            (the layer's ``phi_k``, ``phi_v``).
        block, stride: ``l`` and ``d``; block ``i`` holds positions ``i*d .. i*d + l - 1``.
    Returns ``(B, h, n_cmp, D_out)``, ``n_cmp = (T - l) // d + 1`` (0 when ``T < l``).
    """
    B, h, T, D = x.shape
    if T < block:
        return phi(x.new_zeros(B, h, 0, block * D))  # (B, h, 0, D_out)
    blocks = x.unfold(2, block, stride)  # (B, h, n_cmp, D, l)
    return phi(blocks.transpose(-1, -2).reshape(B, h, blocks.shape[2], block * D))


def compression_mask(t_q: int, t_k: int, block: int, stride: int, device=None) -> torch.Tensor:
    """Boolean ``(t_q, n_cmp)``: compressed block ``i`` ends at ``i*d + l - 1``, at or before the
    query. Queries are the last ``t_q`` of ``t_k`` positions (bottom-right, as ``causal_mask``)."""
    n_cmp = 0 if t_k < block else (t_k - block) // stride + 1
    ends = torch.arange(n_cmp, device=device) * stride + block - 1  # (n_cmp,)
    return ends <= torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (t_q, n_cmp)


def selection_scores(p_cmp, block: int, stride: int, select_block: int, n_sel: int):
    """Paper eq. 9: the importance of each selection block from the compression probabilities.

    Args:
        p_cmp: ``(..., n_cmp)`` compression branch probabilities.
        block, stride, select_block: ``l``, ``d``, ``l'`` (``d`` divides ``l`` and ``l'``).
        n_sel: number of selection blocks, ``ceil(T_k / l')``.
    Returns ``(..., n_sel)``: block ``j`` (positions ``j*l' .. (j+1)*l' - 1``) sums each compressed
    block's probability times the number of ``d``-position steps the two blocks share.
    """
    steps, per_select = block // stride, select_block // stride
    n_cmp = p_cmp.shape[-1]
    units = p_cmp.new_zeros(*p_cmp.shape[:-1], n_sel * per_select)  # (..., n_sel * l'/d)
    for m in range(steps):  # compressed block i covers the steps i .. i + l/d - 1
        units[..., m : m + n_cmp] += p_cmp
    return units.view(*units.shape[:-1], n_sel, per_select).sum(-1)  # (..., n_sel)


def select_blocks(scores: torch.Tensor, t_k: int, select_block: int, select_count: int):
    """The blocks each query attends to in the selection branch.

    Args:
        scores: ``(B, h, T, n_sel)`` importance of each selection block for the last ``T`` of
            ``t_k`` positions (``selection_scores``, summed over a key/value head's query heads).
        select_block, select_count: ``l'`` and ``n``.
    Returns ``indices`` ``(B, h, T, k)`` (long) and ``valid`` ``(B, h, T, k)`` (bool), ``k =
    min(n, n_sel)``: the ``k`` highest-scoring blocks that start at or before the query, best
    first, ties to the earlier block; block 0 and the blocks holding the query and the one before
    always come first. Where fewer than ``k`` blocks exist, the rest are not ``valid``.
    """
    T, n_sel = scores.shape[-2:]
    latest = torch.arange(t_k - T, t_k, device=scores.device)[:, None] // select_block  # (T, 1)
    j = torch.arange(n_sel, device=scores.device)  # (n_sel,)
    forced = (j == 0) | (j == latest) | (j == latest - 1)  # (T, n_sel)
    scores = scores.masked_fill(forced, float("inf")).masked_fill(j > latest, float("-inf"))
    values, indices = scores.sort(dim=-1, descending=True, stable=True)  # (B, h, T, n_sel)
    k = min(select_count, n_sel)
    return indices[..., :k], values[..., :k] > float("-inf")


def selection_mask(indices, valid, t_k: int, select_block: int) -> torch.Tensor:
    """Boolean ``(B, h, T, t_k)``: the keys of each query's selected blocks, at or before it."""
    n_sel = -(-t_k // select_block)
    chosen = indices.new_zeros(*indices.shape[:-1], n_sel, dtype=torch.bool)
    chosen = chosen.scatter(-1, indices, valid)  # (B, h, T, n_sel)
    keys = chosen.repeat_interleave(select_block, dim=-1)[..., :t_k]  # (B, h, T, t_k)
    return keys & causal_mask(indices.shape[-2], t_k, device=indices.device)


def compressed_attention(q, k_cmp, v_cmp, t_k: int, block: int, stride: int, attn_mask=None,
                         dropout_p: float = 0.0, reference: bool = False):  # fmt: skip
    """The compression branch, dense over the compressed keys.

    Args:
        q: ``(B, n_head, T, D)``, the last ``T`` of ``t_k`` positions.
        k_cmp, v_cmp: ``(B, n_kv_head, n_cmp, D)`` from ``compress``.
        attn_mask: optional boolean mask over the raw keys, broadcastable to ``(B, n_head, T,
            t_k)``: a compressed block is seen only where all of its keys are.
        dropout_p: dropout on the attention weights.
        reference: the output by ``sdpa_reference`` (else ``sdpa``).
    Returns the output ``(B, n_head, T, D)`` and the probabilities ``(B, n_head, T, n_cmp)``
    (before dropout, without gradient; all zero for a query that sees no block).
    """
    T, gqa = q.shape[-2], k_cmp.shape[1] != q.shape[1]
    mask = compression_mask(T, t_k, block, stride, q.device)  # (T, n_cmp)
    if attn_mask is not None and mask.shape[-1]:
        keys = attn_mask.expand(*attn_mask.shape[:-1], t_k)  # (..., t_k)
        mask = mask & keys.unfold(-1, block, stride).all(-1)  # (..., T, n_cmp)
    attention = sdpa_reference if reference else sdpa
    out = attention(q, k_cmp, v_cmp, mask, dropout_p=dropout_p, enable_gqa=gqa)
    with torch.no_grad():  # the fused kernel keeps its probabilities to itself: again, explicitly
        B, H, _, D = q.shape
        h = k_cmp.shape[1]
        scores = q.reshape(B, h, H // h * T, D) @ k_cmp.transpose(-1, -2) * D**-0.5
        scores = scores.view(B, H, T, -1).masked_fill(~mask, float("-inf"))  # (B, H, T, n_cmp)
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # no block seen: all zero
    return out, probs


def block_importance(p_cmp, n_kv_head: int, t_k: int, block, stride, select_block):
    """``(B, n_head, T, n_cmp)`` probabilities -> ``(B, n_kv_head, T, n_sel)`` scores for
    ``select_blocks``: eq. 9, summed over the query heads that share a key/value head."""
    B, H, T, n_cmp = p_cmp.shape
    shared = p_cmp.view(B, n_kv_head, H // n_kv_head, T, n_cmp).sum(2)  # (B, h, T, n_cmp)
    return selection_scores(shared, block, stride, select_block, -(-t_k // select_block))


def selected_attention(q, k, v, indices, valid, select_block: int, tile: int = 64):
    """The selection branch without a ``T x T`` matrix: each query over its selected blocks.

    Args:
        q: ``(B, n_head, T, D)``; k, v: ``(B, n_kv_head, T, D)``, the same ``T`` positions (no
            cache). Query head ``h`` reads key/value head ``h // G``, ``G = n_head / n_kv_head``.
        indices, valid: ``(B, n_kv_head, T, n)`` from ``select_blocks``.
        select_block: ``l'``.
        tile: query rows per tile (below).
    Returns ``(B, n_head, T, D)``: what ``sdpa`` with ``selection_mask`` returns.

    Every query's own block is attended causally, block by block. The other (query, block)
    pairs, whose keys all precede the query, are grouped by block into tiles of ``tile`` rows (a
    row holds the ``G`` query heads that share the choice), each tile reading one block, so that
    ``flash_attention`` does them all in one batch. A query's blocks are then joined by their
    log-sum-exps, as ``merge_partial`` (flash.py) joins parts.
    """
    B, H, T, D = q.shape
    h, t_k, n = k.shape[1], k.shape[2], indices.shape[-1]
    if t_k != T:
        raise ValueError(
            f"selected_attention needs the keys of the T queries only, got T={T} queries and "
            f"T_k={t_k} keys"
        )
    G, L, n_sel, dev = H // h, select_block, -(-T // select_block), q.device
    Z, P, U = B * h, B * h * T * n, B * h * n_sel  # sequences, pairs, blocks of all sequences

    def by_block(x):  # (B, heads, T, D) -> (B * n_sel, heads, l', D)
        x = F.pad(x, (0, 0, 0, n_sel * L - T))  # (B, heads, n_sel * l', D)
        return x.view(B, -1, n_sel, L, D).transpose(1, 2).reshape(B * n_sel, -1, L, D)

    def by_row(x):  # (B, H, T, D') -> (Z, T, G, D'): a row holds a group's query heads
        return x.reshape(B, h, G, T, -1).transpose(2, 3).reshape(Z, T, G, -1)

    own, own_lse = flash_attention(
        by_block(q), by_block(k), by_block(v), block_q=L, block_k=L, return_lse=True
    )  # (B * n_sel, H, l', D), (B * n_sel, H, l')
    own = own.view(B, n_sel, H, L, D).transpose(1, 2).reshape(B, H, n_sel * L, D)[:, :, :T]
    own_lse = own_lse.view(B, n_sel, H, L).transpose(1, 2).reshape(B, H, n_sel * L)[..., :T]

    with torch.no_grad():  # where each other pair goes: tile, slot
        latest = torch.arange(T, device=dev)[:, None] // L  # (T, 1): the query's own block
        other = valid & (indices != latest)  # (B, h, T, n)
        seq = torch.arange(Z, device=dev).view(B, h, 1, 1)
        bucket = torch.where(other, seq * n_sel + indices, U).flatten()  # (P,): U for none
        counts = torch.zeros(U + 1, dtype=torch.long, device=dev).index_add_(
            0, bucket, torch.ones_like(bucket)
        )  # (U + 1,): pairs per block
        order = bucket.argsort(stable=True)  # the pairs grouped by block
        rank = torch.empty_like(bucket)  # (P,): the pair's place among its block's pairs
        rank[order] = torch.arange(P, device=dev) - (counts.cumsum(0) - counts)[bucket[order]]
        tiles = (counts[:U] + tile - 1) // tile  # (U,): tiles per block
        ends = tiles.cumsum(0)  # (U,)
        n_tiles = (P - Z * T) // tile + U  # at least sum(tiles): the own blocks are not here
        start = F.pad(ends - tiles, (0, 1), value=n_tiles)  # (U + 1,): first tile of a block
        slot = start[bucket] * tile + rank  # (P,): a row of the tiles (past them: none)
        slot_row = torch.zeros(n_tiles * tile + 1, dtype=torch.long, device=dev)
        row = torch.arange(Z * T, device=dev).repeat_interleave(n)  # (P,): the query row
        slot_row = slot_row.index_put_((slot.clamp(max=n_tiles * tile),), row)[:-1]
        tile_block = torch.searchsorted(ends, torch.arange(n_tiles, device=dev), right=True)
        tile_block = tile_block.clamp_(max=U - 1)  # (n_tiles,): the block a tile reads

    def tiled(x, index, rows):  # gather rows of x: (N, ...) -> (n_tiles, 1, rows, D)
        return x.index_select(0, index).view(n_tiles, 1, rows, D)

    rows = tiled(by_row(q).reshape(Z * T, G, D), slot_row, tile * G)
    keys = tiled(F.pad(k, (0, 0, 0, n_sel * L - T)).reshape(U, L, D), tile_block, L)
    values = tiled(F.pad(v, (0, 0, 0, n_sel * L - T)).reshape(U, L, D), tile_block, L)
    out, lse = flash_attention(rows, keys, values, causal=False, block_q=tile * G, block_k=L,
                               return_lse=True)  # fmt: skip
    # (n_tiles, 1, tile * G, ·) -> each pair's rows, in query order: (Z, T, n, G, ·)
    pick = slot.clamp(max=n_tiles * tile - 1)
    out = out.view(n_tiles * tile, G, D).index_select(0, pick).view(Z, T, n, G, D)
    lse = lse.view(n_tiles * tile, G).index_select(0, pick).view(Z, T, n, G)
    lse = lse.masked_fill(~other.reshape(Z, T, n, 1), float("-inf"))  # not another block
    # merge_partial's join, for n + 1 parts at once: each weighted by exp(lse - m), m any
    # constant per query (the largest: nothing overflows), then divided by the weights' sum
    own, own_lse = by_row(own), by_row(own_lse[..., None])[..., 0]  # (Z, T, G, D), (Z, T, G)
    m = torch.maximum(own_lse, lse.amax(2)).detach()  # (Z, T, G)
    w_own, w = torch.exp(own_lse - m), torch.exp(lse - m[:, :, None])  # (Z, T, G), (Z, T, n, G)
    y = w_own[..., None] * own + (w[..., None] * out).sum(2)  # (Z, T, G, D)
    y = y / (w_own + w.sum(2))[..., None]
    return y.view(B, h, T, G, D).transpose(2, 3).reshape(B, H, T, D)


def gate(g: torch.Tensor, y_cmp, y_slc, y_win) -> torch.Tensor:
    """``g`` ``(B, n_head, T, 3)`` weighs the branches' outputs ``(B, n_head, T, D)``."""
    return g[..., 0:1] * y_cmp + g[..., 1:2] * y_slc + g[..., 2:3] * y_win


@dataclass(frozen=True)
class NSAOptions(GQAOptions):
    """NSA's sizes (the paper's symbol; its values in brackets).

    compress_block (``l``): positions per compressed block [32];
    compress_stride (``d``): positions between consecutive compressed blocks [16]; divides ``l``
        and ``l'`` (blocks overlap when ``d < l``);
    select_block (``l'``): positions per selection block [64];
    select_count (``n``): blocks each query selects, the first block and its two latest among
        them, so at least 3 [16];
    window (``w``): positions the sliding window sees, the query included [512].
    The defaults suit sequences of 64 to 256 tokens.
    """

    compress_block: int = 8
    compress_stride: int = 4
    select_block: int = 16
    select_count: int = 4
    window: int = 32

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(
            compress_block=self.compress_block, compress_stride=self.compress_stride,
            select_block=self.select_block, select_count=self.select_count, window=self.window,
        )  # fmt: skip
        for name in ("compress_block", "select_block"):
            if getattr(self, name) % self.compress_stride:
                raise ValueError(
                    f"compress_stride={self.compress_stride} must divide {name}="
                    f"{getattr(self, name)} (eq. 9 counts the steps of d positions a compressed "
                    f"and a selection block share): choose sizes that are multiples of it"
                )
        if self.select_count < 3:
            raise ValueError(
                f"select_count must be at least 3 (the first block and the query's two latest "
                f"blocks are always selected), got {self.select_count}"
            )


class NSAValues(NamedTuple):
    """What ``project`` hands ``attend`` in place of the values."""

    v: torch.Tensor  # (B, n_kv_head, T, head_dim)
    g: torch.Tensor  # (B, n_head, T, 3) gates of the compression, selection, window branches


class NSAWeights(NamedTuple):
    """Each branch's attention weights, before the gates."""

    cmp: torch.Tensor  # (B, n_head, T, n_cmp) over the compressed blocks (no gradient)
    slc: torch.Tensor  # (B, n_head, T, T_k) over the selected blocks' positions
    win: torch.Tensor  # (B, n_head, T, T_k) over the window


@register_attention("nsa")
class NativeSparseAttention(GroupedQueryAttention):
    """Native Sparse Attention: the three gated branches of the module docstring.

    Projections as in "gqa", plus ``phi_k`` and ``phi_v`` (``φ``: a linear map of a flattened
    block of ``l`` keys or values to one, shared by the key/value heads; its weights differ per
    position in the block, which is the paper's intra-block position encoding; ``phi_k`` has no
    bias, a shift of every compressed key that the softmax ignores) and ``g_proj`` (``x`` ->
    ``(B, T, n_head, 3)`` gates before the sigmoid). ``forward`` as in ``Attention``:
    ``need_weights`` returns ``NSAWeights``; ``attn_mask`` must be boolean (a compressed block is
    seen where all its keys are). Keys are rotated (RoPE) before they are compressed.

    The fast path (``nsa_attention``: ``impl="sdpa"``, no cache behind the queries, no mask, no
    weights, no attention dropout) never forms ``T x T`` scores; otherwise the selection and
    window branches are dense masks over ``T x T_k``. The compression branch is dense over the
    ``T_k / d`` compressed keys either way. Refuses ``sinks`` and ``softcap``.
    """

    Options = NSAOptions

    def __init__(self, config: AttentionConfig, **options):
        if not config.causal:
            raise ValueError("NSA selects blocks of the past: causal must be True")
        if config.impl == "flash":
            raise ValueError(
                "impl='flash' masks by position only, not by NSA's chosen blocks and compressed "
                "keys: use impl='sdpa' or 'reference' for nsa"
            )
        if config.positions == "alibi":
            raise ValueError(
                "NSA's compressed keys have no single distance for ALiBi to bias: choose "
                "positions 'rope', 'learned', 'sinusoidal' or 'none', not 'alibi'"
            )
        if config.sinks or config.softcap is not None:
            raise ValueError(
                f"NSA's three softmaxes and its block ranking (from the compression branch's "
                f"probabilities) take neither sinks nor softcap, got sinks={config.sinks}, "
                f"softcap={config.softcap}; its gates already let a head shrink a branch to "
                f"nothing: use 'moba', 'sparse' or 'local' for sparse attention with them"
            )
        super().__init__(config, **options)
        o, D = self.options, config.head_dim
        self.phi_k = nn.Linear(o.compress_block * D, D, bias=False)  # φ for keys
        self.phi_v = nn.Linear(o.compress_block * D, D, bias=config.bias)  # φ for values
        self.g_proj = nn.Linear(config.n_embd, 3 * config.n_head, bias=config.bias)

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        select_block = 4 * max(1, min(16, T // 64))  # l' = 64 from T = 1024 on
        n_sel = -(-T // select_block)
        return dict(
            n_kv_head=max(1, n_head // 2),
            compress_block=select_block // 2,
            compress_stride=select_block // 4,
            select_block=select_block,
            select_count=max(3, min(16, n_sel // 4)),
            window=max(4, min(512, T // 8)),
        )

    def check_mask(self, attn_mask, B: int, T: int, cache) -> None:
        """Also refuse a float mask: NSA cannot add a bias to a compressed block."""
        super().check_mask(attn_mask, B, T, cache)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(
                f"NSA takes a boolean attn_mask (True = may attend), got {attn_mask.dtype}: a "
                f"compressed block has no single score to add a bias to"
            )

    def project(self, x: torch.Tensor):
        """Queries ``(B, n_head, T, head_dim)``, keys ``(B, n_kv_head, T, head_dim)`` and
        ``NSAValues`` (the values and the gates in (0, 1))."""
        q, k, v = super().project(x)
        B, T, _ = x.shape
        g = self.g_proj(x).view(B, T, self.n_head, 3).sigmoid().transpose(1, 2)  # (B, H, T, 3)
        return q, k, NSAValues(v, g)

    def attend(self, q, k, inputs: NSAValues, attn_mask=None, need_weights=False, cache=None):
        """The three branches over every cached position, gated: ``(B, n_head, T, head_dim)``,
        and ``NSAWeights`` or None."""
        v, g = inputs
        if cache is not None:
            k, v = self.read_cache(cache, k, v, q.dtype)  # (B, n_kv_head, T_k, head_dim)
        o, T, t_k = self.options, q.shape[-2], k.shape[-2]
        k_cmp = compress(k, self.phi_k, o.compress_block, o.compress_stride)
        v_cmp = compress(v, self.phi_v, o.compress_block, o.compress_stride)
        reference = self.config.impl == "reference"
        if not (need_weights or reference or attn_mask is not None or self.attn_dropout or T < t_k):
            return nsa_attention(q, k, v, k_cmp, v_cmp, g, o), None
        y_cmp, w_cmp = compressed_attention(
            q, k_cmp, v_cmp, t_k, o.compress_block, o.compress_stride, attn_mask,
            self.attn_dropout, reference,
        )  # fmt: skip
        scores = block_importance(
            w_cmp, self.n_kv_head, t_k, o.compress_block, o.compress_stride, o.select_block
        )  # (B, n_kv_head, T, n_sel)
        indices, valid = select_blocks(scores, t_k, o.select_block, o.select_count)
        chosen = selection_mask(indices, valid, t_k, o.select_block)  # (B, n_kv_head, T, t_k)
        chosen = chosen.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, T, t_k)
        band = sliding_window_mask(T, t_k, o.window, q.device)  # (T, t_k)
        y_slc, w_slc = self.softmax_attend(q, k, v, restrict(attn_mask, chosen), need_weights)
        y_win, w_win = self.softmax_attend(q, k, v, restrict(attn_mask, band), need_weights)
        weights = NSAWeights(w_cmp, w_slc, w_win) if need_weights else None
        return gate(g, y_cmp, y_slc, y_win), weights


def nsa_attention(q, k, v, k_cmp, v_cmp, g, sizes: NSAOptions):
    """NSA's fast path: the three branches for ``T`` queries over their own ``T`` positions.

    Args:
        q: ``(B, n_head, T, D)``; k, v: ``(B, n_kv_head, T, D)``.
        k_cmp, v_cmp: ``(B, n_kv_head, n_cmp, D)``, ``compress`` of k and v.
        g: ``(B, n_head, T, 3)`` gates of the compression, selection and window branches.
        sizes: the ``NSAOptions`` (``l``, ``d``, ``l'``, ``n``, ``w``).
    Returns ``(B, n_head, T, D)``, with no ``T x T`` matrix: the selection branch is
    ``selected_attention`` (causal attention where every block is selected), the window
    ``blocked_local_attention`` (causal attention where ``w >= T``). No dropout.
    """
    s, T, gqa = sizes, q.shape[-2], k.shape[1] != q.shape[1]
    y_cmp, p_cmp = compressed_attention(q, k_cmp, v_cmp, T, s.compress_block, s.compress_stride)
    if -(-T // s.select_block) <= s.select_count:  # every block is selected
        y_slc = sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        scores = block_importance(
            p_cmp, k.shape[1], T, s.compress_block, s.compress_stride, s.select_block
        )  # (B, n_kv_head, T, n_sel)
        indices, valid = select_blocks(scores, T, s.select_block, s.select_count)
        y_slc = selected_attention(q, k, v, indices, valid, s.select_block)
    if s.window >= T:
        y_win = sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y_win = blocked_local_attention(q, k, v, s.window)
    return gate(g, y_cmp, y_slc, y_win)
