"""MoBA, Mixture of Block Attention (Lu et al., Moonshot AI, 2025): each query picks key chunks.

Keys are cut into chunks of ``moba_chunk_size`` positions. A query scores every chunk that lies
wholly in its past by its affinity to the chunk's mean key, ``s_i = q . mean(K_i)`` (a gate with
no parameters, per query head), and attends, with one softmax, to the union of its ``moba_topk``
chunks: its own chunk (the one holding its position, always chosen, seen causally) and the
``moba_topk - 1`` past chunks of highest score; never a future chunk. Compared with ``gqa.py``:

- the gate (``moba_gate``) picks the chunks from q and k, after RoPE; it passes no gradient;
- the fast path (``moba_attention``) attends each query's own chunk, then each past chunk by the
  queries that chose it, and joins the parts with the log-sum-exp merge of ``flash.py``;
- the dense path (weights, reference, an ``attn_mask``, a cache) masks with ``moba_mask``.

Generation keeps the ordinary ``KVCache``: a new query scores the complete chunks before its
own, and the last partial chunk is its own. Registered as ``"moba"``; chapter 14 builds it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_positive_ints
from .config import AttentionConfig
from .flash import add_sink, merge_partial
from .gqa import GQAOptions, GroupedQueryAttention
from .masks import causal_mask, restrict
from .registry import register_attention


def moba_gate(q: torch.Tensor, k: torch.Tensor, chunk_size: int, topk: int) -> torch.Tensor:
    """Which key chunks each query attends: boolean ``(B, n_head, T, n_chunks)``.

    Args:
        q: ``(B, n_head, T, head_dim)`` queries, the last ``T`` of the ``T_k`` key positions
            (bottom-right, as in ``causal_mask``): query ``i`` sits at ``p = T_k - T + i``.
        k: ``(B, n_kv_head, T_k, head_dim)`` keys; ``n_kv_head`` divides ``n_head`` (query head
            ``h`` scores the chunk means of key head ``h // (n_head // n_kv_head)``).
        chunk_size: positions per chunk; ``n_chunks = ceil(T_k / chunk_size)``.
        topk: chunks per query, its own chunk ``p // chunk_size`` included.

    The own chunk is always selected; of the chunks before it (complete, wholly in the past), the
    ``topk - 1`` with the highest ``q . mean(K_chunk)`` (computed in at least float32), or all of
    them if there are fewer; later chunks never. No gradient flows through the choice.
    """
    B, H, T, D = q.shape
    H_kv, t_k = k.shape[1], k.shape[2]
    if t_k < T:
        raise ValueError(f"moba_gate needs T_k >= T keys, got T={T} queries and T_k={t_k} keys")
    check_positive_ints(chunk_size=chunk_size, topk=topk)
    n, n_past = -(-t_k // chunk_size), t_k // chunk_size  # chunks, and the complete ones
    own = (torch.arange(t_k - T, t_k, device=q.device) // chunk_size)[:, None]  # (T, 1)
    chunk = torch.arange(n, device=q.device)  # (n,)
    selected = torch.zeros(B, H, T, n, dtype=torch.bool, device=q.device)
    if topk > 1 and n_past:
        dtype = torch.promote_types(q.dtype, torch.float32)  # the official code scores in fp32
        keys = k.detach()[:, :, : n_past * chunk_size].to(dtype)
        means = keys.view(B, H_kv, n_past, chunk_size, D).mean(dim=3)  # (B, H_kv, n_past, D)
        queries = q.detach().to(dtype).view(B, H_kv, H // H_kv, T, D)  # a group per key head
        scores = (queries @ means[:, :, None].transpose(-2, -1)).view(B, H, T, n_past)
        scores = scores.masked_fill(chunk[:n_past] >= own, float("-inf"))  # past chunks only
        picks = scores.topk(min(topk - 1, n_past), dim=-1).indices  # (B, H, T, <= topk - 1)
        selected.scatter_(-1, picks, True)
        selected &= chunk < own  # a pick among -inf scores (too few past chunks) is none
    return selected | (chunk == own)  # (B, H, T, n): and the own chunk


def moba_mask(q: torch.Tensor, k: torch.Tensor, chunk_size: int, topk: int) -> torch.Tensor:
    """Boolean ``(B, n_head, T, T_k)`` mask, ``True`` where a query may attend: the chunks of
    ``moba_gate`` (same arguments) at key positions, made causal."""
    T, t_k = q.shape[-2], k.shape[-2]
    selected = moba_gate(q, k, chunk_size, topk)  # (B, H, T, n)
    chunk_of_key = torch.arange(t_k, device=q.device) // chunk_size  # (T_k,)
    return selected[..., chunk_of_key] & causal_mask(T, t_k, device=q.device)  # (B, H, T, T_k)


class PartialAttention(torch.autograd.Function):
    """Softmax attention over one part of the keys, with the log-sum-exp that ``merge_partial``
    needs to join the parts: ``PartialAttention.apply(q, k, v, bias, dropout_p)``.

    ``q`` ``(..., M, head_dim)`` (already scaled); ``k``, ``v`` ``(..., N, head_dim)`` with
    leading dimensions that broadcast to q's (a key/value head serves a group of query heads);
    ``bias`` None or additive, broadcastable to the ``(..., M, N)`` scores (``-inf`` = masked;
    every row must see a key). Returns the output ``(..., M, head_dim)`` and the log-sum-exp
    ``(..., M)``. The backward pass is FlashAttention's (chapter 8), ``ds = p * (dp - delta)``
    with ``delta = rowsum(do * out) - dlse``, from the weights the forward pass kept.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, dropout_p):
        scores = q @ k.transpose(-2, -1)  # (..., M, N)
        if bias is not None:
            scores += bias
        top = scores.amax(dim=-1, keepdim=True)  # (..., M, 1)
        e = scores.sub_(top).exp_()  # unnormalised weights, in place of the scores
        total = e.sum(dim=-1, keepdim=True)  # (..., M, 1): the softmax's denominator
        keep = torch.rand_like(e) >= dropout_p if dropout_p > 0 else None  # dropout's draw
        out = (PartialAttention.dropped(e, keep, dropout_p) @ v).div_(total)  # (..., M, D)
        ctx.save_for_backward(q, k, v, e, total, out, keep)
        ctx.dropout_p = dropout_p
        return out, (top + torch.log(total)).squeeze(-1)

    @staticmethod
    def dropped(x, keep, dropout_p):
        """``x`` with dropout's ``keep`` draw applied (zeros elsewhere, the rest scaled up)."""
        return x if keep is None else x * keep / (1 - dropout_p)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, e, total, out, keep = ctx.saved_tensors
        d_scaled = d_out / total  # the weights' normalisation, folded into d_out's rows
        dv = PartialAttention.dropped(e, keep, ctx.dropout_p).transpose(-2, -1) @ d_scaled
        d_e = PartialAttention.dropped(d_scaled @ v.transpose(-2, -1), keep, ctx.dropout_p)
        delta = ((d_out * out).sum(dim=-1, keepdim=True) - d_lse[..., None]) / total
        d_scores = d_e.sub_(delta).mul_(e)  # (..., M, N)
        dq, dk = d_scores @ k, d_scores.transpose(-2, -1) @ q
        # summed over the query heads that share a key/value head
        return dq, dk.sum_to_size(k.shape), dv.sum_to_size(v.shape), None, None


def own_chunk_parts(q, k, v, chunk_size, alibi_slopes=None, dropout_p=0.0):
    """Each query's attention to its own chunk, causal, as parts for ``merge_partial``.

    ``q`` ``(B, n_head, T, head_dim)`` already scaled, ``T`` a multiple of ``chunk_size``;
    ``k``, ``v`` and the rest as in ``moba_attention``. Returns a list of outputs ``(B, n_head,
    T, head_dim)`` and a list of log-sum-exps ``(B, n_head, T)``, one of each per part
    (``-inf``: the part is empty there).

    The chunks are a batch. A chunk of even size goes in two halves: each half attends itself
    causally, the second also attends the first whole, so the quarter of the scores above the
    halves' diagonals is never computed.
    """
    B, H, T, D = q.shape
    H_kv, C = k.shape[1], chunk_size
    n, sub = T // C, C // 2 if C % 2 == 0 else C  # chunks; halves, or the whole chunk

    def pieces(x):  # (B, h, T, D) -> (B, H_kv, h / H_kv, n, C / sub, sub, D)
        return x.view(B, H_kv, -1, n, C // sub, sub, D)

    def queries(x):  # (B, H_kv, group, n, C / sub, sub, ...) -> (B, n_head, T, ...)
        return x.reshape(B, H, T, *x.shape[6:])

    def bias(distance):  # additive bias at these (query - key) distances: ALiBi's, or 0
        if alibi_slopes is None:
            return torch.zeros(distance.shape, dtype=q.dtype, device=q.device)
        return -alibi_slopes.to(q.dtype).view(H_kv, -1, 1, 1, 1, 1) * distance

    qs, ks, vs = pieces(q), pieces(k), pieces(v)  # a group of query heads per key/value head
    distance = torch.arange(sub, device=q.device)[:, None] - torch.arange(sub, device=q.device)
    causal = bias(distance).masked_fill(distance < 0, float("-inf"))
    y, lse = PartialAttention.apply(qs, ks, vs, causal, dropout_p)  # each piece, itself
    outputs, lses = [queries(y)], [queries(lse)]
    if sub < C:  # the second halves attend the first halves: (B, H_kv, group, n, 1, sub, ·)
        y, lse = PartialAttention.apply(
            qs[..., 1:, :, :], ks[..., :1, :, :], vs[..., :1, :, :], bias(distance + sub), dropout_p
        )
        outputs.append(queries(torch.cat([torch.zeros_like(y), y], dim=4)))  # first halves: none
        lses.append(queries(torch.cat([torch.full_like(lse, float("-inf")), lse], dim=4)))
    return outputs, lses


def past_chunk_parts(q, k, v, past, chunk_size, alibi_slopes=None, dropout_p=0.0):
    """Each query's attention to each past chunk it chose, as parts for ``merge_partial``.

    ``q`` ``(B, n_head, T, head_dim)`` already scaled, ``T`` a multiple of ``chunk_size``;
    ``past`` ``(B, n_head, T, T / chunk_size)`` boolean, the chosen chunks that lie wholly
    before each query's own; the rest as in ``moba_attention``. Returns outputs ``(B, n_head, T, S, head_dim)`` and log-sum-exps ``(B,
    n_head, T, S)``, ``S`` the most past chunks a query chose (``-inf``: fewer chosen).

    Past chunk ``j`` is attended whole by the queries that chose it (FlashAttention's
    variable-length call in the official code): they are gathered as its rows, in order, padded
    to the most that any head sends it.
    """
    B, H, T, D = q.shape
    H_kv, C, n = k.shape[1], chunk_size, past.shape[-1]
    widths = past.sum(dim=2).amax(dim=(0, 1)).tolist()  # (n,): the most a head sends chunk j
    R = sum(widths)  # rows of every chunk; row R is an empty part
    first = torch.tensor([sum(widths[:j]) for j in range(n)], device=q.device)  # (n,)
    row = torch.where(past, past.cumsum(dim=2) - 1 + first, R)  # (B, H, T, n): row of (t, j)
    t = torch.arange(T, device=q.device)[:, None].expand(T, n).reshape(1, 1, T * n)
    query = torch.zeros(B, H, R + 1, dtype=torch.long, device=q.device)  # padding rows: query 0
    query = query.scatter(2, row.view(B, H, T * n), t.expand(B, H, -1))[..., :R]  # row -> t
    q_rows = q.gather(2, query[..., None].expand(-1, -1, -1, D)).view(B, H_kv, -1, R, D)
    kc, vc = (x.view(B, H_kv, 1, n, C, D) for x in (k, v))
    ys, lses = [], []
    parts = q_rows.split(widths, dim=3), query.split(widths, dim=2), kc.unbind(3), vc.unbind(3)
    for j, (qj, tj, kj, vj) in enumerate(zip(*parts, strict=True)):  # (B, H_kv, g, M, D), ...
        if not widths[j]:
            continue
        bias = None  # every key of a past chunk is before its queries: nothing to mask
        if alibi_slopes is not None:  # (B, H_kv, g, M, C): minus slope times the distance
            key = torch.arange(j * C, (j + 1) * C, device=q.device)  # (C,)
            slopes = alibi_slopes.to(q.dtype).view(H_kv, -1, 1, 1)
            bias = -slopes * (tj.view(B, H_kv, -1, widths[j], 1) - key)
        y, lse = PartialAttention.apply(qj, kj, vj, bias, dropout_p)  # (B, H_kv, g, M, ·)
        ys.append(y.reshape(B, H, -1, D))
        lses.append(lse.reshape(B, H, -1))
    ys.append(q.new_zeros(B, H, 1, D))  # row R: an empty part
    lses.append(q.new_full((B, H, 1), float("-inf")))
    y_rows, lse_rows = torch.cat(ys, dim=2), torch.cat(lses, dim=2)  # (B, H, R + 1, ·)
    S = past.sum(dim=-1).max().item()
    row = row.sort(dim=-1).values[..., :S].reshape(B, H, T * S)  # each query's rows first
    y_past = y_rows.gather(2, row[..., None].expand(-1, -1, -1, D)).view(B, H, T, S, D)
    return y_past, lse_rows.gather(2, row).view(B, H, T, S)


def moba_attention(
    q, k, v, chunk_size, topk, alibi_slopes=None, dropout_p=0.0, scale=None, sinks=None
):
    """MoBA without forming the ``T x T`` scores: ``O(T * topk * chunk_size)``.

    Args:
        q: ``(B, n_head, T, head_dim)`` queries.
        k, v: ``(B, n_kv_head, T, head_dim)``, the same ``T`` positions (no cache);
            ``n_kv_head`` divides ``n_head`` (grouped-query attention).
        chunk_size, topk: as in ``moba_gate``.
        alibi_slopes: ``(n_head,)`` ALiBi slopes, or None for no bias (the gate ignores it).
        dropout_p: dropout on the attention weights.
        scale: multiplies the scores; defaults to ``1 / sqrt(head_dim)``.
        sinks: ``(n_head, 1)`` sink logits (``add_sink`` on the merged parts), or None.

    Returns ``(B, n_head, T, head_dim)``: what ``sdpa`` with ``moba_mask`` returns.

    As in the official code, the parts of each query's keys are attended apart and joined by
    ``merge_partial``: its own chunk (``own_chunk_parts``) and each past chunk it chose
    (``past_chunk_parts``).
    """
    T, D = q.shape[-2:]
    if k.shape[-2] != T:
        raise ValueError(
            f"moba_attention needs the keys of the T queries only, got T={T} queries and "
            f"T_k={k.shape[-2]} keys: use moba_mask for queries after cached keys"
        )
    C = chunk_size
    selected = moba_gate(q, k, C, topk)  # (B, n_head, T, n)
    n = selected.shape[-1]
    own = torch.arange(n * C, device=q.device)[:, None] // C  # (n * C, 1): each one's chunk
    chunk = torch.arange(n, device=q.device)  # (n,)
    # in whole chunks: the padding comes after every real query, so no real query sees it
    past = F.pad(selected, (0, 0, 0, n * C - T)) & (chunk < own)  # (B, n_head, n * C, n)
    q = q * (D**-0.5 if scale is None else scale)
    q, k, v = (F.pad(x, (0, 0, 0, n * C - T)) if T % C else x for x in (q, k, v))
    outputs, lses = own_chunk_parts(q, k, v, C, alibi_slopes, dropout_p)
    if past.any():
        y_past, lse_past = past_chunk_parts(q, k, v, past, C, alibi_slopes, dropout_p)
        outputs, lses = outputs + list(y_past.unbind(3)), lses + list(lse_past.unbind(3))
    y, lse = merge_partial(outputs, lses)  # (B, n_head, n * C, head_dim), (B, n_head, n * C)
    if sinks is not None:
        y = add_sink(y, lse, sinks)
    return y[:, :, :T]  # (B, n_head, T, head_dim)


@dataclass(frozen=True)
class MoBAOptions(GQAOptions):
    """moba_chunk_size: positions per key chunk; moba_topk: chunks each query attends, its own
    included (as in the official code, which selects ``moba_topk - 1`` past chunks).

    The defaults keep the paper's top-3 and give GPT-2's 1024 positions 16 chunks of 64, the
    paper's 8K context in chunks of 512; with ``moba_topk`` at least the number of chunks, MoBA
    is full causal attention.
    """

    moba_chunk_size: int = 64
    moba_topk: int = 3

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(moba_chunk_size=self.moba_chunk_size, moba_topk=self.moba_topk)


@register_attention("moba")
class MoBAAttention(GroupedQueryAttention):
    """Causal self-attention where each query attends its top-``moba_topk`` key chunks (MoBA).

    Projections as in "gqa" (``n_kv_head=None`` means one key/value head per query head, with
    MHA's state_dict layout). ``forward(x, attn_mask=None, need_weights=False, cache=None)`` as in
    ``Attention``; the weights are zero outside the chosen chunks. Cached decoding chooses chunks
    too (the official code decodes with full attention), so it gives what the full pass gives.
    ``sinks`` on every path; ``softcap`` takes the dense path (``PartialAttention`` applies no
    function to the scores).
    """

    Options = MoBAOptions

    def __init__(self, config: AttentionConfig, **options):
        if not config.causal:
            raise ValueError("MoBA routes each query to past chunks only: causal must be True")
        if config.impl == "flash":
            raise ValueError(
                "impl='flash' masks by position only (causal, window), not by MoBA's chosen "
                "chunks: use impl='sdpa' or 'reference' for moba"
            )
        super().__init__(config, **options)

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return dict(moba_chunk_size=max(1, T // 16), moba_topk=3)  # the paper's 8K: 512 and 3

    def covers_all(self, t_k: int) -> bool:
        """Whether every query of ``t_k`` positions sees its whole past: at most ``moba_topk``
        chunks."""
        return -(-t_k // self.options.moba_chunk_size) <= self.options.moba_topk

    def softmax_attend(self, q, k, v, attn_mask=None, need_weights: bool = False):
        """Causal attention where the chunks cover everything, ``moba_mask`` as a dense mask where
        needed (weights, reference, masks, cached keys), else ``moba_attention``."""
        T, t_k = q.shape[-2], k.shape[-2]
        o = self.options
        if self.covers_all(t_k):
            return super().softmax_attend(q, k, v, attn_mask, need_weights)
        dense = need_weights or self.config.impl == "reference" or attn_mask is not None
        if dense or T != t_k or self.config.softcap is not None:
            allowed = moba_mask(q, k, o.moba_chunk_size, o.moba_topk)  # (B, n_head, T, T_k)
            return super().softmax_attend(q, k, v, restrict(attn_mask, allowed), need_weights)
        y = moba_attention(
            q, k, v, o.moba_chunk_size, o.moba_topk, self.alibi_slopes, self.attn_dropout,
            self.scale, self.row_sinks,
        )  # fmt: skip
        return y, None  # (B, n_head, T, head_dim)
