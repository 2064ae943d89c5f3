"""Scaled dot-product attention: softmax(Q Kᵀ · scale + mask) · V.

Two implementations with the same arguments and the same results: ``sdpa_reference``, the
explicit math (it can return the weights; tests compare everything against it), and ``sdpa``,
``F.scaled_dot_product_attention`` (fused kernels where torch has one, its math fallback
otherwise). Masks broadcast against the scores ``(..., T_q, T_k)``: boolean (``True`` = may
attend) or float (added). ``is_causal=True`` needs ``T_q == T_k`` (in cached decoding pass
``causal_mask(T_q, T_k)``). ``enable_gqa=True``: query head ``h`` reads key/value head
``h // (n_head // n_kv_head)``. A fully masked row outputs zeros with all-zero weights, as torch
does from 2.5 on, so a padded batch has no NaN. Chapter 2 builds it.
"""

import torch
import torch.nn.functional as F

from .masks import causal_mask, restrict


def _check_inputs(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa):
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
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be boolean or float, got dtype {attn_mask.dtype}")
    if attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        raise ValueError(
            f"a float attn_mask must have the dtype of q ({q.dtype}), got {attn_mask.dtype}"
        )
    scores_shape = (*q.shape[:-1], t_k)
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        ok = False
    if not ok:
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
):
    """Attention written out: scores, mask, softmax, dropout, weighted sum of values.

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

    Returns:
        ``(..., T_q, v_dim)`` output, and ``(..., T_q, T_k)`` weights if ``return_weights``.
    """
    _check_inputs(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa)
    if is_causal:
        attn_mask = restrict(attn_mask, causal_mask(q.shape[-2], device=q.device))
    if enable_gqa:  # every key/value head serves a group of consecutive query heads
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)  # (..., n_head, T_k, head_dim)
        v = v.repeat_interleave(group, dim=-3)  # (..., n_head, T_k, v_dim)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T_q, T_k)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    # A row whose every score is -inf would give 0/0 = NaN in softmax (forward and backward):
    # give it finite scores, then zero its weights, so it attends to nothing.
    empty_rows = scores.isneginf().all(dim=-1, keepdim=True)  # (..., T_q, 1)
    weights = torch.softmax(scores.masked_fill(empty_rows, 0.0), dim=-1)  # (..., T_q, T_k)
    weights = weights.masked_fill(empty_rows, 0.0)
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
) -> torch.Tensor:
    """The fast path: ``F.scaled_dot_product_attention`` with the arguments of ``sdpa_reference``.

    Returns the ``(..., T_q, v_dim)`` output (the fused kernels do not form the weights; use
    ``sdpa_reference(..., return_weights=True)`` to see them).
    """
    _check_inputs(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa)
    if is_causal and attn_mask is not None:  # torch takes one or the other: fold them together
        attn_mask = restrict(attn_mask, causal_mask(q.shape[-2], device=q.device))
        is_causal = False
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
