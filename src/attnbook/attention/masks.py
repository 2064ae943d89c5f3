"""Attention masks as boolean tensors.

Orientation, everywhere in attnbook: ``True`` means "this query may attend to this key",
``False`` means "masked out". A mask is indexed ``[..., query, key]``.

- ``causal_mask``: each query sees its own position and earlier ones.
- ``padding_mask``: which key positions of a right-padded batch are real tokens.
- ``sliding_window_mask``: a causal band, each query seeing the last ``window`` positions (and
  the first ``sink_tokens``, attention sinks).
- ``additive_mask``: the same information as a float bias (0 where allowed, -inf where masked).
- ``restrict``: a mask of either kind further restricted by a boolean one (e.g. made causal).
Chapter 2 builds them.
"""

import torch


def causal_mask(t_q: int, t_k: int | None = None, device=None) -> torch.Tensor:
    """Boolean causal mask of shape ``(t_q, t_k)``, ``True`` where a query may attend.

    The queries are taken to be the *last* ``t_q`` of the ``t_k`` key positions (bottom-right
    alignment): query ``i`` sits at position ``t_k - t_q + i`` and sees keys ``0 .. t_k - t_q + i``.
    With ``t_q == t_k`` this is the usual lower triangle; with one query and a cache of ``t_k``
    keys the single query sees every key. (``F.scaled_dot_product_attention(is_causal=True)``
    aligns top-left instead, which only agrees when ``t_q == t_k``.)
    """
    t_k = t_q if t_k is None else t_k
    if t_q <= 0 or t_k <= 0:
        raise ValueError(f"t_q and t_k must be positive, got t_q={t_q}, t_k={t_k}")
    if t_k < t_q:
        raise ValueError(
            f"causal_mask needs at least as many keys as queries (queries are the last t_q "
            f"positions), got t_q={t_q} > t_k={t_k}"
        )
    ones = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    return ones.tril(diagonal=t_k - t_q)  # (t_q, t_k)


def padding_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """Key padding mask of shape ``(B, t)``: ``True`` at the real tokens of right-padded sequences.

    Args:
        lengths: ``(B,)`` integer tensor, the true length of each sequence, each in ``[0, t]``.
        t: the padded length.

    Index the result ``[:, None, :]`` to mask ``(B, T_q, T_k)`` scores, or ``[:, None, None, :]``
    for ``(B, n_head, T_q, T_k)`` scores.
    """
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D integer tensor, got shape {tuple(lengths.shape)} "
            f"and dtype {lengths.dtype}"
        )
    if t <= 0:
        raise ValueError(f"t must be positive, got {t}")
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > t):
        raise ValueError(f"every length must be in [0, t={t}], got {lengths.tolist()}")
    positions = torch.arange(t, device=lengths.device)  # (t,)
    return positions[None, :] < lengths[:, None]  # (B, t)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turn a boolean mask into an additive float mask: 0 where ``True``, -inf where ``False``."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean tensor, got dtype {mask.dtype}")
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, float("-inf"))


def restrict(mask: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """``mask`` (None, boolean or additive float) with every pair ``allowed`` forbids masked too.

    Returns a mask of the same kind as ``mask`` (boolean when ``mask`` is None), broadcast
    against ``allowed``.
    """
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def sliding_window_mask(
    t_q: int, t_k: int, window: int, device=None, sink_tokens: int = 0
) -> torch.Tensor:
    """Boolean ``(t_q, t_k)`` mask, ``True`` where a query may attend: a band ``window`` wide,
    and the first ``sink_tokens`` positions (attention sinks, StreamingLLM) for every later query.

    Queries are the last ``t_q`` of ``t_k`` positions (bottom-right, as in ``causal_mask``):
    query ``i`` sits at ``p = t_k - t_q + i`` and sees keys ``j <= p`` with ``p - j < window``
    or ``j < sink_tokens``.
    """
    if t_q <= 0 or t_k < t_q:
        raise ValueError(f"sliding_window_mask needs 0 < t_q <= t_k, got t_q={t_q}, t_k={t_k}")
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    q_pos = torch.arange(t_k - t_q, t_k, device=device)  # (t_q,)
    k_pos = torch.arange(t_k, device=device)  # (t_k,)
    distance = q_pos[:, None] - k_pos[None, :]  # (t_q, t_k)
    return (distance >= 0) & ((distance < window) | (k_pos < sink_tokens))  # (t_q, t_k)
