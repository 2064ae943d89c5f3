"""FlashAttention in PyTorch: softmax attention over tiles, never forming the ``T_q x T_k`` scores.

    y = flash_attention(q, k, v, causal=True)              # (B, n_head, T_q, v_head_dim)
    y, lse = flash_attention(q, k, v, return_lse=True)      # and the log-sum-exp per query

The forward pass (FlashAttention-2's loop order) walks query tiles, and for each the key tiles,
keeping a running maximum, a running sum and an unnormalised output (the online softmax); tiles
that the causal rule or the window hide entirely are skipped, only tiles on the edge are masked.
It saves q, k, v, the output and the log-sum-exp; the backward pass recomputes each tile's
probabilities from them (the log-sum-exp is differentiable too). ``merge_partial`` joins
attentions over disjoint key sets (split-KV decoding); ``add_sink`` adds a sink logit (gpt-oss)
to one. Queries are the last ``T_q`` of the ``T_k`` positions (bottom-right, as in cached
decoding); a query that sees no key outputs zeros. Chapter 8 builds it; ``impl="flash"`` uses it.
"""

import math

import torch

from ..checks import check_positive_ints

NEG_INF = float("-inf")


def _check(q, k, v, window, scale, block_q, block_k):
    """Raise ValueError, naming the value, for anything ``flash_attention`` cannot take."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, n_head, T, head_dim), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, H, _, D = q.shape
    if k.shape[:2] != v.shape[:2] or k.shape[0] != B or H % k.shape[1]:
        raise ValueError(
            f"k and v must have q's batch size and a number of heads that divides q's {H}, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != D or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k must have q's head_dim {D} and as many positions as v, got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    check_positive_ints(block_q=block_q, block_k=block_k)
    if window is not None:
        check_positive_ints(window=window)
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def _tiles(t_q, t_k, causal, window, block_q, block_k):
    """The key tiles each query tile must visit: ``(q0, q1, [(k0, k1, needs_mask), ...])``.

    Query ``i`` sits at position ``p = t_k - t_q + i`` and may see key ``j`` when ``j <= p``
    (causal) and ``j > p - window`` (window). A key tile that no query of the tile may see is
    skipped; one that every query sees whole needs no mask.
    """
    offset = t_k - t_q
    for q0 in range(0, t_q, block_q):
        q1 = min(q0 + block_q, t_q)
        first, last = q0 + offset, q1 - 1 + offset  # positions of the tile's queries
        keys = []
        for k0 in range(0, t_k, block_k):
            k1 = min(k0 + block_k, t_k)
            if (causal and k0 > last) or (window is not None and k1 - 1 <= first - window):
                continue  # every query of the tile is blind to this key tile
            partial = (causal and k1 - 1 > first) or (window is not None and k0 <= last - window)
            keys.append((k0, k1, partial))
        yield q0, q1, keys


def _tile_mask(q0, q1, k0, k1, offset, causal, window, device):
    """Boolean ``(q1 - q0, k1 - k0)``: which keys of the tile each query may see."""
    pos = torch.arange(q0, q1, device=device)[:, None] + offset  # (bq, 1)
    key = torch.arange(k0, k1, device=device)[None, :]  # (1, bk)
    allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= pos
    if window is not None:
        allowed &= key > pos - window
    return allowed


def _forward(q, k, v, causal, window, scale, block_q, block_k):
    """Output ``(B, H, T_q, D_v)`` and log-sum-exp ``(B, H, T_q)`` (``-inf``: no key seen)."""
    B, H, t_q, _ = q.shape
    H_kv, t_k = k.shape[1], k.shape[2]
    g = H // H_kv  # query heads per key/value head: they share one K and V by broadcasting
    qg = q.view(B, H_kv, g, t_q, -1)  # (B, H_kv, g, T_q, D): head h = (h // g, h % g)
    kg, vg = k[:, :, None], v[:, :, None]  # (B, H_kv, 1, T_k, D), (B, H_kv, 1, T_k, D_v)
    out = q.new_zeros(B, H_kv, g, t_q, v.shape[-1])
    lse = q.new_full((B, H_kv, g, t_q), NEG_INF)
    for q0, q1, keys in _tiles(t_q, t_k, causal, window, block_q, block_k):
        qi = qg[..., q0:q1, :]  # (B, H_kv, g, bq, D)
        m = q.new_full(qi.shape[:-1], NEG_INF)  # running maximum of the scores
        ell = q.new_zeros(qi.shape[:-1])  # running sum of exp(score - m)
        acc = q.new_zeros(*qi.shape[:-1], v.shape[-1])  # running sum of exp(score - m) v
        for k0, k1, partial in keys:
            s = qi @ kg[..., k0:k1, :].transpose(-2, -1) * scale  # (B, H_kv, g, bq, bk)
            if partial:
                allowed = _tile_mask(q0, q1, k0, k1, t_k - t_q, causal, window, q.device)
                s = s.masked_fill(~allowed, NEG_INF)
            m_new = torch.maximum(m, s.amax(dim=-1))  # (B, H_kv, g, bq)
            m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)  # rows with no key yet: exp -> 0
            p = torch.exp(s - m_safe[..., None])  # (B, H_kv, g, bq, bk)
            rescale = torch.exp(m - m_safe)  # shrinks what was summed under the old maximum
            ell = ell * rescale + p.sum(dim=-1)
            acc = acc * rescale[..., None] + p @ vg[..., k0:k1, :]  # (B, H_kv, g, bq, D_v)
            m = m_new
        seen = ell > 0  # (B, H_kv, g, bq): rows that saw at least one key
        out[..., q0:q1, :] = acc / torch.where(seen, ell, 1.0)[..., None]
        lse[..., q0:q1] = torch.where(seen, m + torch.log(torch.where(seen, ell, 1.0)), NEG_INF)
    return out.view(B, H, t_q, -1), lse.view(B, H, t_q)


def _backward(q, k, v, out, lse, d_out, d_lse, causal, window, scale, block_q, block_k):
    """Gradients of q, k, v, given those of the output and the log-sum-exp: each tile's
    probabilities recomputed as ``exp(score - lse)``."""
    B, H, t_q, _ = q.shape
    H_kv, t_k = k.shape[1], k.shape[2]
    g = H // H_kv
    qg, dog = q.view(B, H_kv, g, t_q, -1), d_out.view(B, H_kv, g, t_q, -1)
    kg, vg = k[:, :, None], v[:, :, None]
    lse = lse.view(B, H_kv, g, t_q, 1)
    lse = lse.masked_fill(lse == NEG_INF, 0.0)  # rows that saw no key: every p below is 0
    delta = (d_out * out).sum(dim=-1)  # (B, H, T_q): rowsum(dO * O) = Σ_j p_ij dp_ij
    if d_lse is not None:  # d lse_i / d s_ij = p_ij, so dS gains p_ij * d_lse_i
        delta = delta - d_lse
    delta = delta.view(B, H_kv, g, t_q, 1)
    dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, keys in _tiles(t_q, t_k, causal, window, block_q, block_k):
        qi, doi = qg[..., q0:q1, :], dog[..., q0:q1, :]  # (B, H_kv, g, bq, D), (.., D_v)
        for k0, k1, partial in keys:
            kj, vj = kg[..., k0:k1, :], vg[..., k0:k1, :]  # (B, H_kv, 1, bk, D), (.., D_v)
            s = qi @ kj.transpose(-2, -1) * scale  # (B, H_kv, g, bq, bk)
            p = torch.exp(s - lse[..., q0:q1, :])  # the forward's probabilities, recomputed
            if partial:
                allowed = _tile_mask(q0, q1, k0, k1, t_k - t_q, causal, window, q.device)
                p = p.masked_fill(~allowed, 0.0)
            dv[:, :, k0:k1] += (p.transpose(-2, -1) @ doi).sum(dim=2)  # a group shares K, V
            dp = doi @ vj.transpose(-2, -1)  # (B, H_kv, g, bq, bk)
            ds = p * (dp - delta[..., q0:q1, :])  # softmax's backward, delta for Σ_j p dp
            dq[..., q0:q1, :] += ds @ kj * scale
            dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ qi).sum(dim=2) * scale
    return dq.view_as(q), dk, dv


class FlashAttention(torch.autograd.Function):
    """``flash_attention`` as an autograd function: saves q, k, v, the output and the LSE only."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, block_q, block_k):
        out, lse = _forward(q, k, v, causal, window, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (causal, window, scale, block_q, block_k)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, d_out.contiguous(), d_lse, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    return_lse: bool = False,
):
    """Softmax attention computed tile by tile, with a backward pass that recomputes.

    Args:
        q: ``(B, n_head, T_q, head_dim)``; the queries are the last ``T_q`` of ``T_k`` positions.
        k, v: ``(B, n_kv_head, T_k, head_dim)`` and ``(B, n_kv_head, T_k, v_head_dim)``;
            ``n_kv_head`` divides ``n_head`` (query head ``h`` reads key/value head
            ``h // (n_head // n_kv_head)``).
        causal: a query sees only keys at its position or before.
        window: a query sees no key more than ``window - 1`` positions before its own (with
            ``causal``, the sliding window of chapter 9); None: no limit.
        scale: multiplies the scores; None means ``1 / sqrt(head_dim)``.
        block_q, block_k: tile sizes (queries, keys).
        return_lse: also return the log-sum-exp of each query's scores, ``(B, n_head, T_q)``.
    Returns ``(B, n_head, T_q, v_head_dim)``, or ``(output, lse)`` with ``return_lse``.
    """
    _check(q, k, v, window, scale, block_q, block_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = FlashAttention.apply(
        q.contiguous(), k, v, causal, window, scale, block_q, block_k
    )  # fmt: skip
    return (out, lse) if return_lse else out


def merge_partial(outputs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Join attentions of the same queries over disjoint sets of keys (split-KV decoding).

    ``outputs[i]`` ``(..., T_q, D_v)`` and ``lses[i]`` ``(..., T_q)`` are what attention over the
    ``i``-th set returned; the result, ``(output, lse)``, is attention over their union: each
    output weighted by ``exp(lse_i - lse)``, the share of the softmax's denominator its keys hold.
    """
    if not outputs or len(outputs) != len(lses):
        raise ValueError(
            f"need as many outputs as lses, at least one, got {len(outputs)} and {len(lses)}"
        )
    lse_all = torch.stack(lses)  # (n, ..., T_q)
    lse = torch.logsumexp(lse_all, dim=0)  # (..., T_q): -inf where no set has a key
    weights = torch.exp(lse_all - lse.masked_fill(lse == NEG_INF, 0.0))  # (n, ..., T_q)
    out = (weights[..., None] * torch.stack(outputs)).sum(dim=0)  # (..., T_q, D_v)
    return out, lse


def add_sink(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention ``out`` ``(..., T_q, D_v)`` with log-sum-exp ``lse`` ``(..., T_q)``, redone with
    a sink: one more term ``exp(sink)`` in each row's denominator, with no value (``sinks``
    broadcastable to ``(..., T_q)``). Every weight shrinks by ``Σ / (Σ + exp(sink))``, so the
    result is ``out · sigmoid(lse - sink)`` (``merge_partial`` with a part of zero output)."""
    return out * torch.sigmoid(lse - sinks.to(lse.dtype))[..., None]
