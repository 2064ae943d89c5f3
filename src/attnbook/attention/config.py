"""AttentionConfig: what every attention variant shares, validated when it is built.

Sizes, positions, the implementation, dropout, bias and causality. A variant's own settings
(grouped-query attention's ``n_kv_head``, the sliding window's ``window``, ...) are the fields
of its ``Options``, given next to the config: ``build_attention("gqa", config, n_kv_head=2)``.
Every field is checked in ``__post_init__``, so a bad value fails at construction with a message
naming the field. Chapter 3 introduces it.
"""

from dataclasses import dataclass

from ..checks import check_positive_ints
from ..positions import ROPE_PAIRINGS

IMPLEMENTATIONS = ("sdpa", "reference", "flash")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes and switches of an attention layer.

    Args:
        n_embd: width of the residual stream (the input and output size of the layer).
        n_head: number of query heads; must divide ``n_embd``.
        block_size: the longest sequence (prompt plus generated tokens) the layer handles.
        dropout: dropout probability on the attention weights and on the output, in [0, 1).
        bias: whether the Q/K/V and output projections have a bias.
        causal: whether a position may only attend to itself and earlier positions.
        positions: ``"learned"`` or ``"sinusoidal"`` (added to the embeddings by the model, so
            nothing to do in attention), ``"rope"`` (rotates q and k), ``"alibi"`` (a bias on
            the scores) or ``"none"``.
        rope_base: RoPE's base wavelength (10000 in most models).
        rope_pairing: ``"half"`` (GPT-NeoX / LLaMA) or ``"interleaved"`` (GPT-J / RoFormer).
        impl: ``"sdpa"`` (the fast path on ``F.scaled_dot_product_attention``), ``"reference"``
            (the explicit math of ``attnbook.attention.core``) or ``"flash"`` (the tiles of
            ``attnbook.attention.flash``: no ALiBi, no attention dropout, no ``attn_mask``).
    """

    n_embd: int = 768
    n_head: int = 12
    block_size: int = 1024
    dropout: float = 0.0
    bias: bool = True
    causal: bool = True
    positions: str = "learned"
    rope_base: float = 10000.0
    rope_pairing: str = "half"
    impl: str = "sdpa"

    def __post_init__(self):
        check_positive_ints(n_embd=self.n_embd, n_head=self.n_head, block_size=self.block_size)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"choose n_head among the divisors of n_embd"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                f"RoPE rotates pairs of coordinates: head_dim = n_embd / n_head must be even, "
                f"got head_dim={self.head_dim}"
            )
        if not self.rope_base > 1.0:
            raise ValueError(f"rope_base must be greater than 1, got {self.rope_base!r}")
        if self.rope_pairing not in ROPE_PAIRINGS:
            raise ValueError(
                f"rope_pairing must be one of {ROPE_PAIRINGS}, got {self.rope_pairing!r}"
            )
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        if self.impl == "flash" and (self.positions == "alibi" or self.dropout > 0):
            raise ValueError(
                f"impl='flash' masks by position only and drops no attention weights: it takes "
                f"neither positions='alibi' nor dropout > 0, got positions={self.positions!r}, "
                f"dropout={self.dropout}; use impl='sdpa'"
            )

    @property
    def head_dim(self) -> int:
        """Size of one head's queries, keys and values: ``n_embd // n_head``."""
        return self.n_embd // self.n_head
