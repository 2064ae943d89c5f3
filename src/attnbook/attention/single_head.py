"""Single-head self-attention, as chapter 01 leaves it once every bug is fixed.

- ``SelfAttention``: one head, every position attends to every position (no mask).
- ``Head``: one causal head with a lower-triangular mask buffer, the classic lecture version
  that multi-head attention (chapter 03) concatenates.

Both write the attention out by hand, on purpose; ``core.py`` holds the shared, tested
implementation that the multi-head modules call.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive_ints
from .masks import causal_mask


def _check_dropout(dropout):
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def _check_input(x, width, name):
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"x must have shape (B, T, {name}={width}), got {tuple(x.shape)}")


class SelfAttention(nn.Module):
    """Single-head self-attention without a mask.

    Args:
        d_in: size of each input vector.
        d_out: size of the queries, keys, values and of each output vector.
        qkv_bias: whether the query/key/value projections have a bias.
        dropout: dropout probability on the attention weights (active in training only).

    ``forward(x)`` maps ``(B, T, d_in)`` to ``(B, T, d_out)``.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        check_positive_ints(d_in=d_in, d_out=d_out)
        _check_dropout(dropout)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.d_in, "d_in")
        Q = self.W_query(x)  # (B, T, d_out)
        K = self.W_key(x)  # (B, T, d_out)
        V = self.W_value(x)  # (B, T, d_out)
        scores = Q @ K.transpose(-2, -1) / self.d_out**0.5  # (B, T, T)
        weights = self.dropout(F.softmax(scores, dim=-1))  # (B, T, T), rows sum to 1
        return weights @ V  # (B, T, d_out)


class Head(nn.Module):
    """One head of causal self-attention with a lower-triangular mask buffer.

    Args:
        n_embd: size of each input vector.
        head_size: size of the queries, keys, values and of each output vector.
        block_size: longest sequence the mask buffer covers.
        dropout: dropout probability on the attention weights (active in training only).

    ``forward(x)`` maps ``(B, T, n_embd)`` with ``T <= block_size`` to ``(B, T, head_size)``;
    position t only sees positions ``<= t``.
    """

    def __init__(self, n_embd: int, head_size: int, block_size: int, dropout: float = 0.0):
        super().__init__()
        check_positive_ints(n_embd=n_embd, head_size=head_size, block_size=block_size)
        _check_dropout(dropout)
        self.n_embd, self.head_size, self.block_size = n_embd, head_size, block_size
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        # a buffer moves with .to(device) but is not a parameter; non-persistent: not in checkpoints
        self.register_buffer("tril", causal_mask(block_size), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.n_embd, "n_embd")
        T = x.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.block_size}")
        q = self.query(x)  # (B, T, head_size)
        k = self.key(x)  # (B, T, head_size)
        v = self.value(x)  # (B, T, head_size)
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, T, T)
        wei = wei.masked_fill(~self.tril[:T, :T], float("-inf"))  # (B, T, T)
        wei = self.dropout(F.softmax(wei, dim=-1))  # (B, T, T)
        return wei @ v  # (B, T, head_size)
