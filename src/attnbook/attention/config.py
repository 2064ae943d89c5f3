"""AttentionConfig: what every attention variant shares, validated when it is built.

Sizes, positions, the implementation, dropout, bias, causality and the four options of the
modern block (``qk_norm``, ``output_gate``, ``sinks``, ``softcap``: chapter 15), which every
variant inherits from the skeleton or refuses when built. A variant's own settings
(grouped-query attention's ``n_kv_head``, the sliding window's ``window``, ...) are the fields
of its ``Options``, given next to the config: ``build_attention("gqa", config, n_kv_head=2)``.
Every field is checked in ``__post_init__``, so a bad value fails at construction with a message
naming the field. Chapter 3 introduces it.
"""

import math
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
            ``attnbook.attention.flash``: no ALiBi, no attention dropout, no ``attn_mask``, no
            ``softcap``).
        qk_norm: RMSNorm of each head's queries and keys over ``head_dim`` (learned weights
            ``q_norm``, ``k_norm``, eps 1e-6, Qwen3's names), after the projection and before
            RoPE (OLMo 2, Qwen3, Gemma 3): the scores stay bounded however the weights grow.
        output_gate: gate the attention's output per element before the heads are mixed,
            ``y ⊙ sigmoid(gate_proj(x))`` (Qiu et al., 2025, "Gated Attention"; Qwen3-Next);
            ``gate_proj`` maps ``n_embd`` to the width ``c_proj`` reads, with a bias if ``bias``.
        sinks: a learned sink logit per query head (gpt-oss's ``sinks``, ``(n_head,)``, starting
            at 0): an extra term ``exp(sink_h)`` in every softmax denominator, with no value, so a
            head may attend to nothing. Kept fused on every path: ``sdpa`` adds a zero key and
            value whose score is the sink, ``flash`` rescales by ``sigmoid(lse - sink)``.
        softcap: ``c``, Gemma 2's logit soft-capping: the scaled scores become ``c · tanh(s /
            c)`` before the masks, ALiBi's bias added after (it is part of the mask); None: no
            cap. The fused SDPA kernels take no function of the scores, so with ``softcap``
            ``impl="sdpa"`` computes the explicit scores (``sdpa_reference``'s math) and
            ``impl="flash"`` is refused.
    Variants whose queries and keys are not per-head vectors of ``head_dim`` (MLA, DSA, linear
    attention, DeltaNet) refuse ``qk_norm``; those with no softmax (linear attention, DeltaNet)
    refuse ``sinks`` and ``softcap``; each says so when built.
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
    qk_norm: bool = False
    output_gate: bool = False
    sinks: bool = False
    softcap: float | None = None

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
        for name in ("qk_norm", "output_gate", "sinks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.softcap is not None and (
            isinstance(self.softcap, bool)
            or not isinstance(self.softcap, int | float)
            or not 0 < self.softcap < math.inf
        ):
            raise ValueError(
                f"softcap must be None (no cap) or a finite number > 0 (Gemma 2 caps attention "
                f"logits at 50.0), got {self.softcap!r}"
            )
        if self.impl == "flash" and self.softcap is not None:
            raise ValueError(
                f"impl='flash' applies no function to the scores in its tiles: it takes no "
                f"softcap, got softcap={self.softcap}; use impl='sdpa' or 'reference'"
            )

    @property
    def head_dim(self) -> int:
        """Size of one head's queries, keys and values: ``n_embd // n_head``."""
        return self.n_embd // self.n_head
