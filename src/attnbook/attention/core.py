"""Scaled dot-product attention: softmax(Q Kᵀ · scale + mask) · V.

Two implementations with the same arguments and the same results: ``sdpa_reference``, the
explicit math (it can return the weights; tests compare everything against it), and ``sdpa``,
``F.scaled_dot_product_attention`` (fused kernels where torch has one, its math fallback
otherwise). Masks broadcast against the scores ``(..., T_q, T_k)``: boolean (``True`` = may
attend) or float (added). ``is_causal=True`` needs ``T_q == T_k`` (in cached decoding pass
``causal_mask(T_q, T_k)``). ``enable_gqa=True``: query head ``h`` reads key/value head
``h // (n_head // n_kv_head)``. A fully masked row outputs zeros with all-zero weights, as torch
does from 2.5 on, so a padded batch has no NaN. Chapter 2 builds it; chapter 15 adds ``softcap``
(Gemma 2's ``c · tanh(scores / c)``: ``sdpa`` then computes the explicit math) and ``sinks``
(gpt-oss: a logit per query row in the softmax's denominator, with no value).
"""

import torch
import torch.nn.functional as F

from .masks import additive_mask, causal_mask, restrict


def _broadcasts(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without growing it."""
    try:
        return torch.broadcast_shapes(shape, target) == tuple(target)
    except RuntimeError:
        return False


def _check_inputs(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa, softcap=None, sinks=None):
    """Raise ValueError, naming the argument, for anything the attention cannot take."""
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"q, k, v must have the same number of dimensions (at least 2: (..., T, head_dim)), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if enable_gqa and q.dim() < 3:
        raise ValueError(
            f"enable_gqa needs a head dimension: (..., n_head, T, head_dim), got {tuple(q.shape)}"
        )
    grouped = enable_gqa and k.shape[:-3] == q.shape[:-3] and q.shape[-3] % k.shape[-3] == 0
    if k.shape[:-2] != v.shape[:-2] or not (grouped or q.shape[:-2] == k.shape[:-2]):
        raise ValueError(
            f"q, k, v must share their leading (batch, head) dimensions (with enable_gqa=True, "
            f"k and v may have n_head / group heads), got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head_dim (last dimension), got {q.shape[-1]} and {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of positions, got {k.shape[-2]} and {v.shape[-2]}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    t_q, t_k = q.shape[-2], k.shape[-2]
    if is_causal and t_q != t_k:
        raise ValueError(
            f"is_causal=True needs T_q == T_k, got T_q={t_q}, T_k={t_k}; for queries at the end "
            f"of a longer key sequence pass attn_mask=causal_mask({t_q}, {t_k})"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}")
    if sinks is not None and not _broadcasts(sinks.shape, q.shape[:-1]):  # to (..., T_q)
        raise ValueError(
            f"sinks of shape {tuple(sinks.shape)} do not broadcast to the query rows' shape "
            f"{tuple(q.shape[:-1])} (..., T_q): one sink logit per query row"
        )
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be boolean or float, got dtype {attn_mask.dtype}")
    if attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        raise ValueError(
            f"a float attn_mask must have the dtype of q ({q.dtype}), got {attn_mask.dtype}"
        )
    scores_shape = (*q.shape[:-1], t_k)
    if not _broadcasts(attn_mask.shape, scores_shape):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' "
            f"shape {scores_shape} (..., T_q, T_k)"
        )


def sdpa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    enable_gqa: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """Attention written out: scores, (soft-capping), mask, softmax (with a sink), dropout,
    weighted sum of values.

    Args:
        q: ``(..., T_q, head_dim)`` queries.
        k: ``(..., T_k, head_dim)`` keys.
        v: ``(..., T_k, v_dim)`` values.
        attn_mask: boolean (``True`` = may attend) or additive float mask, broadcastable to
            ``(..., T_q, T_k)``.
        is_causal: add the causal mask (needs ``T_q == T_k``).
        dropout_p: dropout on the attention weights; pass 0 at evaluation, as with
            ``F.scaled_dot_product_attention``.
        scale: multiplies the scores; defaults to ``1 / sqrt(head_dim)``.
        return_weights: also return the attention weights (before dropout).
        enable_gqa: allow k, v with ``n_kv_head`` heads dividing q's ``n_head`` (dimension -3).
        softcap: ``c``: the scaled scores become ``c · tanh(scores / c)`` before the mask (Gemma
            2), so none exceeds ``c`` in size; None: no cap.
        sinks: sink logits broadcastable to ``(..., T_q)``, one per query row (a layer's
            ``(n_head,)`` sinks as ``sinks[:, None]``): an extra term ``exp(sink)`` in each row's
            softmax denominator, with no value, so the weights over the keys sum to less than 1.

    Returns:
        ``(..., T_q, v_dim)`` output, and ``(..., T_q, T_k)`` weights if ``return_weights``.
    """
    _check_inputs(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa, softcap, sinks)
    if is_causal:
        attn_mask = restrict(attn_mask, causal_mask(q.shape[-2], device=q.device))
    if enable_gqa:  # every key/value head serves a group of consecutive query heads
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)  # (..., n_head, T_k, head_dim)
        v = v.repeat_interleave(group, dim=-3)  # (..., n_head, T_k, v_dim)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T_q, T_k)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # in (-softcap, softcap)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    t_k = scores.shape[-1]
    if sinks is not None:  # one more column, the sink's logit, dropped after the softmax
        sink = sinks.to(scores.dtype)[..., None].expand(*scores.shape[:-1], 1)  # (..., T_q, 1)
        scores = torch.cat([scores, sink], dim=-1)  # (..., T_q, T_k + 1)
    # A row whose every score is -inf would give 0/0 = NaN in softmax (forward and backward):
    # give it finite scores, then zero its weights, so it attends to nothing.
    empty_rows = scores.isneginf().all(dim=-1, keepdim=True)  # (..., T_q, 1)
    weights = torch.softmax(scores.masked_fill(empty_rows, 0.0), dim=-1)[..., :t_k]
    weights = weights.masked_fill(empty_rows, 0.0)  # (..., T_q, T_k)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = dropped @ v  # (..., T_q, v_dim)
    return (out, weights) if return_weights else out


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    enable_gqa: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fast path: ``F.scaled_dot_product_attention`` with the arguments of ``sdpa_reference``.

    Returns the ``(..., T_q, v_dim)`` output (the fused kernels do not form the weights; use
    ``sdpa_reference(..., return_weights=True)`` to see them). The fused kernels take no function
    of the scores: with ``softcap`` this is ``sdpa_reference``'s explicit math. ``sinks`` stay
    fused: one more key and value, both zero, whose score is the sink's logit through the mask.
    """
    _check_inputs(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa, softcap, sinks)
    if softcap is not None:
        return sdpa_reference(
            q, k, v, attn_mask, is_causal, dropout_p, scale, enable_gqa=enable_gqa,
            softcap=softcap, sinks=sinks,
        )  # fmt: skip
    if is_causal and (attn_mask is not None or sinks is not None):
        # torch takes a mask or the causal flag, not both: fold them together
        attn_mask = restrict(attn_mask, causal_mask(q.shape[-2], device=q.device))
        is_causal = False
    if sinks is not None:
        attn_mask, k, v = _sink_column(q, k, v, attn_mask, sinks)
    v_dim = v.shape[-1]
    if v_dim < k.shape[-1]:  # the fused kernels want values as wide as keys, else torch takes
        v = F.pad(v, (0, k.shape[-1] - v_dim))  # its slow path: pad with zeros (..., T_k, head_dim)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )[..., :v_dim]  # (..., T_q, v_dim): the zero columns dropped


def _sink_column(q, k, v, attn_mask, sinks):
    """The mask, keys and values with one more position whose key and value are zero and whose
    score is the query row's sink logit: an additive mask ``(..., T_q, T_k + 1)`` and k, v with
    ``T_k + 1`` positions."""
    bias = torch.zeros((), dtype=q.dtype, device=q.device)  # no mask: 0 everywhere
    if attn_mask is not None:
        bias = additive_mask(attn_mask, q.dtype) if attn_mask.dtype == torch.bool else attn_mask
    rows = torch.broadcast_shapes(bias.shape[:-1], sinks.shape, q.shape[-2:-1])  # (..., T_q)
    column = sinks.to(q.dtype)[..., None].expand(*rows, 1)  # (..., T_q, 1)
    bias = torch.cat([bias.expand(*rows, k.shape[-2]), column], dim=-1)  # (..., T_q, T_k + 1)
    return bias, F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))  # k = v = 0 at the sink
