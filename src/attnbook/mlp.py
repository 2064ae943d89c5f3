"""The position-wise feed-forward network of a transformer block.

``MLP``: ``Linear(d_model -> hidden) -> GELU -> Linear(hidden -> d_model) -> dropout``, applied to
every position independently. (The GPT chapter adds the SwiGLU variant.)
"""

import torch
from torch import nn


class MLP(nn.Module):
    """Feed-forward block: ``(B, T, d_model) -> (B, T, d_model)``.

    Args:
        d_model: input and output width.
        hidden: inner width (4 * d_model in GPT-2 and the original transformer).
        dropout: dropout on the output, in [0, 1).
        bias: whether the two linear layers have biases.
    """

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model <= 0 or hidden <= 0:
            raise ValueError(f"d_model and hidden must be positive, got {d_model}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.c_fc = nn.Linear(d_model, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gelu(self.c_fc(x))  # (B, T, hidden)
        return self.dropout(self.c_proj(h))  # (B, T, d_model)
