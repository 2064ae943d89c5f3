"""AttentionConfig: the one validated dataclass every attention variant is built from.

Fields that only some variants use arrive with those variants; every field is checked in
``__post_init__`` so a bad value fails at construction with a message naming the field.
"""

from dataclasses import dataclass

IMPLEMENTATIONS = ("sdpa", "reference")


@dataclass
class AttentionConfig:
    """Sizes and switches of an attention layer.

    Args:
        d_model: width of the residual stream (the input and output size of the layer).
        n_head: number of query heads; must divide ``d_model``.
        dropout: dropout probability on the attention weights and on the output, in [0, 1).
        bias: whether the Q/K/V and output projections have a bias.
        causal: whether a position may only attend to itself and earlier positions.
        impl: ``"sdpa"`` (the fast path on ``F.scaled_dot_product_attention``) or
            ``"reference"`` (the explicit math of ``attnbook.attention.core``).
    """

    d_model: int = 768
    n_head: int = 12
    dropout: float = 0.0
    bias: bool = True
    causal: bool = True
    impl: str = "sdpa"

    def __post_init__(self):
        for name in ("d_model", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                f"choose n_head among the divisors of d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")

    @property
    def head_dim(self) -> int:
        """Size of one head's queries, keys and values: ``d_model // n_head``."""
        return self.d_model // self.n_head
