"""Position schemes: how a transformer learns where each token sits.

Attention by itself is permutation-equivariant, so position has to be put in, in one of three
places:

- ``learned`` and ``sinusoidal``: a vector per position added to the token embeddings
  (``PositionalEmbedding``);
- ``rope``: queries and keys rotated by an angle proportional to their position
  (``RotaryEmbedding``), so a score depends on the positions only through their offset; both
  pairings found in checkpoints (``"interleaved"``, GPT-J; ``"half"``, GPT-NeoX and LLaMA), with
  ``interleaved_to_half`` and ``half_to_interleaved`` to convert q/k weights;
- ``alibi``: a per-head penalty on the scores, linear in the distance (``alibi_bias``).

For cached decoding the embeddings take a ``start`` offset and ``alibi_bias`` aligns queries
with the last keys; RoPE and ALiBi have angles and distances for any position, the tables of
``learned`` and ``sinusoidal`` stop at ``block_size``. Chapter 6 builds them.
"""

import math

import torch
from torch import nn

ROPE_PAIRINGS = ("half", "interleaved")


# ---- learned and sinusoidal: vectors added to the embeddings ----------------------------------


def sinusoidal_embedding(n_positions: int, n_embd: int) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need": ``(n_positions, n_embd)``.

    Even columns ``2i`` hold ``sin(pos / 10000^(2i/n_embd))``, odd columns ``2i+1`` the cosine
    of the same angle, so each pair of columns is a clock running at its own frequency.
    """
    if n_positions <= 0 or n_embd <= 0:
        raise ValueError(f"n_positions and n_embd must be positive, got {n_positions}, {n_embd}")
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    inv_freq = 10000.0 ** (
        -torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd
    )  # (ceil(d/2),)
    angles = pos * inv_freq  # (P, ceil(d/2))
    table = torch.zeros(n_positions, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : n_embd // 2])
    return table.float()  # (P, n_embd)


class PositionalEmbedding(nn.Module):
    """A vector per position, learned (``nn.Embedding``) or sinusoidal (a fixed buffer).

    ``forward(T, start=0)`` returns the ``(T, n_embd)`` vectors of positions
    ``start .. start + T - 1``, to be added to ``(B, T, n_embd)`` token embeddings.
    """

    def __init__(self, kind: str, block_size: int, n_embd: int):
        super().__init__()
        if kind not in ("learned", "sinusoidal"):
            raise ValueError(f"kind must be 'learned' or 'sinusoidal', got {kind!r}")
        self.kind, self.block_size = kind, block_size
        if kind == "learned":
            self.table = nn.Embedding(block_size, n_embd)
        else:
            self.register_buffer(
                "sinusoid", sinusoidal_embedding(block_size, n_embd), persistent=False
            )

    def forward(self, T: int, start: int = 0) -> torch.Tensor:
        if start < 0 or start + T > self.block_size:
            raise ValueError(
                f"positions {start}..{start + T - 1} are outside the table of block_size="
                f"{self.block_size} positions"
            )
        if self.kind == "learned":
            return self.table.weight[start : start + T]  # (T, n_embd)
        return self.sinusoid[start : start + T]  # (T, n_embd)


# ---- RoPE: rotate queries and keys ----------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """Cosines and sines of the rotation angles, each ``(T, head_dim // 2)``.

    Pair ``i`` of a vector at position ``m`` is rotated by ``m * base^(-2i / head_dim)``.
    """
    if head_dim % 2:
        raise ValueError(
            f"RoPE rotates pairs of coordinates: head_dim must be even, got {head_dim}"
        )
    pairs = torch.arange(0, head_dim, 2, dtype=torch.float64)  # (head_dim/2,)
    inv_freq = base ** (-pairs / head_dim)  # (head_dim/2,)
    angles = positions.to(torch.float64)[:, None] * inv_freq  # (T, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "half"):
    """Rotate each coordinate pair of ``x`` (``(..., T, head_dim)``) by the given angles.

    ``cos`` and ``sin`` are ``(T, head_dim // 2)``; ``pairing`` says which coordinates form a pair:
    ``"half"`` pairs ``i`` with ``i + head_dim/2``, ``"interleaved"`` pairs ``2i`` with ``2i + 1``.
    """
    if x.shape[-1] % 2:
        raise ValueError(
            f"RoPE rotates pairs of coordinates: head_dim must be even, got {x.shape[-1]}"
        )
    if pairing == "half":
        x1, x2 = x.chunk(2, dim=-1)  # 2 x (..., T, head_dim/2)
    elif pairing == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]  # 2 x (..., T, head_dim/2)
    else:
        raise ValueError(f"pairing must be one of {ROPE_PAIRINGS}, got {pairing!r}")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    r1 = x1 * cos - x2 * sin  # (..., T, head_dim/2)
    r2 = x1 * sin + x2 * cos  # (..., T, head_dim/2)
    if pairing == "half":
        return torch.cat([r1, r2], dim=-1)  # (..., T, head_dim)
    return torch.stack([r1, r2], dim=-1).flatten(-2)  # (..., T, head_dim), pairs back side by side


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Index ``perm`` with ``x_half = x_interleaved[..., perm]``: ``[0, 2, 4, ..., 1, 3, 5, ...]``.

    To convert a model trained with interleaved RoPE to the half-split convention, permute the
    output rows of each head of the query and key projections with ``perm`` (see
    ``interleaved_to_half``); scores, and so the whole model, are unchanged.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(weight: torch.Tensor, n_head: int, inverse: bool) -> torch.Tensor:
    if n_head <= 0 or weight.shape[0] % n_head:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, not a multiple of n_head={n_head}: pass the q "
            f"or k rows alone (n_head * head_dim), and n_kv_head for the keys of GQA"
        )
    head_dim = weight.shape[0] // n_head
    perm = rope_permutation(head_dim)
    perm = perm.argsort() if inverse else perm
    per_head = weight.reshape(n_head, head_dim, *weight.shape[1:])  # (n_head, head_dim, ...)
    return per_head[:, perm].reshape(weight.shape)


def interleaved_to_half(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection ``(n_head * head_dim, d_in)`` (or its bias) reordered per head
    so that half-split RoPE gives the scores interleaved RoPE gave. For the keys of grouped-query
    attention pass ``n_kv_head``."""
    return _permute_heads(weight, n_head, inverse=False)


def half_to_interleaved(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_half``."""
    return _permute_heads(weight, n_head, inverse=True)


class RotaryEmbedding(nn.Module):
    """RoPE with cached angles for positions ``0 .. max_len - 1``, computed on the fly beyond.

    ``forward(x, start=0)`` rotates ``x`` of shape ``(..., T, head_dim)`` as positions
    ``start .. start + T - 1``: from the table where it holds them, otherwise by the same formula
    (``rope_cos_sin``), so a model whose caches are bounded can decode past ``block_size``.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0, pairing: str = "half"):
        super().__init__()
        if pairing not in ROPE_PAIRINGS:
            raise ValueError(f"rope_pairing must be one of {ROPE_PAIRINGS}, got {pairing!r}")
        cos, sin = rope_cos_sin(torch.arange(max_len), head_dim, base)  # 2 x (max_len, head_dim/2)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.pairing, self.max_len, self.head_dim, self.base = pairing, max_len, head_dim, base

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = x.shape[-2]
        if start < 0:
            raise ValueError(f"start must be a position >= 0, got {start}")
        if start + T <= self.max_len:
            cos, sin = self.cos[start : start + T], self.sin[start : start + T]
        else:  # past the table: (T, head_dim/2) each, from the formula
            positions = torch.arange(start, start + T, device=x.device)
            cos, sin = rope_cos_sin(positions, self.head_dim, self.base)
        return apply_rope(x, cos, sin, self.pairing)


# ---- ALiBi: a linear penalty on the scores ---------------------------------------------------


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The ALiBi slope of each head, ``(n_head,)``.

    For ``n`` a power of two the slopes are the geometric sequence ``2^(-8/n), 2^(-16/n), ...,
    2^(-8)``. For other counts, the paper takes the slopes of the nearest smaller power of two
    ``p`` and adds every other slope of the sequence for ``2p`` until there are ``n_head``.
    """
    if n_head <= 0:
        raise ValueError(f"n_head must be positive, got {n_head}")

    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(p) + geometric(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, t_q: int, t_k: int) -> torch.Tensor:
    """Additive score bias ``(n_head, t_q, t_k)``: ``-slope * |distance|`` between positions.

    Queries are the last ``t_q`` of ``t_k`` positions (bottom-right, as in ``causal_mask``), so
    a cached query at position ``t_k - 1`` is penalised by its true distance to each key. The
    paper defines ALiBi for causal models (distance to past keys); the symmetric ``|distance|``
    for non-causal layers is this book's choice.
    """
    if t_q <= 0 or t_k < t_q:
        raise ValueError(f"alibi_bias needs 0 < t_q <= t_k, got t_q={t_q}, t_k={t_k}")
    q_pos = torch.arange(t_k - t_q, t_k, device=slopes.device)  # (t_q,)
    k_pos = torch.arange(t_k, device=slopes.device)  # (t_k,)
    distance = (q_pos[:, None] - k_pos[None, :]).abs()  # (t_q, t_k)
    return -slopes[:, None, None] * distance  # (n_head, t_q, t_k)
