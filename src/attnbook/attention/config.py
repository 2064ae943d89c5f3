"""AttentionConfig: the one validated dataclass every attention variant is built from.

Fields that only some variants use arrive with those variants; every field is checked in
``__post_init__`` so a bad value fails at construction with a message naming the field.
Chapter 3 introduces it.
"""

from dataclasses import dataclass

from ..checks import check_non_negative_int, check_positive_int
from ..positions import ROPE_PAIRINGS

IMPLEMENTATIONS = ("sdpa", "reference")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes and switches of an attention layer.

    Args:
        d_model: width of the residual stream (the input and output size of the layer).
        n_head: number of query heads; must divide ``d_model``.
        n_kv_head: number of key/value heads for grouped-query attention ("gqa"); must divide
            ``n_head``. ``None`` means one per query head. "mha" and "mqa" fix it themselves.
        block_size: the longest sequence (prompt plus generated tokens) the layer handles.
        dropout: dropout probability on the attention weights and on the output, in [0, 1).
        bias: whether the Q/K/V and output projections have a bias.
        causal: whether a position may only attend to itself and earlier positions.
        positions: ``"learned"`` or ``"sinusoidal"`` (added to the embeddings by the model, so
            nothing to do in attention), ``"rope"`` (rotates q and k), ``"alibi"`` (a bias on
            the scores) or ``"none"``.
        rope_base: RoPE's base wavelength (10000 in most models).
        rope_pairing: ``"half"`` (GPT-NeoX / LLaMA) or ``"interleaved"`` (GPT-J / RoFormer).
        impl: ``"sdpa"`` (the fast path on ``F.scaled_dot_product_attention``) or
            ``"reference"`` (the explicit math of ``attnbook.attention.core``).
        window: sliding-window attention ("local"): each query sees itself and the
            ``window - 1`` positions before it.
        linear_chunk: chunk length of linear attention's chunked parallel form ("linear").
        sparse_block: block length of BigBird-style sparse attention ("sparse"): the pattern
            is chosen per block of queries and keys.
        n_global_blocks: "sparse": the first blocks of the sequence, seen by every query.
        n_window_blocks: "sparse": each query block sees itself and the ``n_window_blocks - 1``
            blocks before it.
        n_random_blocks: "sparse": how many further past blocks each query block sees, drawn at
            random once per layer.
        kv_lora_rank: size of multi-head latent attention's ("mla") cached key/value latent;
            ``None`` means ``4 * head_dim`` (DeepSeek-V2's ratio).
        q_lora_rank: size of MLA's query latent; 0 means the queries are not compressed.
        qk_nope_head_dim: MLA's per-head query/key size without RoPE; ``None`` means ``head_dim``.
        qk_rope_head_dim: MLA's per-head size of the decoupled rotary query and shared rotary
            key, even; ``None`` means about ``head_dim / 2`` (``max(2, 2 * (head_dim // 4))``).
        v_head_dim: MLA's per-head value size; ``None`` means ``head_dim``.
        mla_absorb: MLA's inference mode: ``False`` expands keys and values from the latent,
            ``True`` absorbs the up-projections and attends in latent space (same outputs).
        mla_kv_norm: MLA's RMSNorm on the key/value latent (DeepSeek-V2 has it); ``False``
            leaves the latent unnormalised, so keys and values are linear in the input, as a
            model converted from multi-head attention needs (``attnbook.convert``).
    """

    d_model: int = 768
    n_head: int = 12
    n_kv_head: int | None = None
    block_size: int = 1024
    dropout: float = 0.0
    bias: bool = True
    causal: bool = True
    positions: str = "learned"
    rope_base: float = 10000.0
    rope_pairing: str = "half"
    impl: str = "sdpa"
    window: int = 256
    linear_chunk: int = 64
    sparse_block: int = 64
    n_global_blocks: int = 2
    n_window_blocks: int = 3
    n_random_blocks: int = 3
    kv_lora_rank: int | None = None
    q_lora_rank: int = 0
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    mla_absorb: bool = False
    mla_kv_norm: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_head", "block_size", "window", "linear_chunk"):
            check_positive_int(name, getattr(self, name))
        for name in ("sparse_block", "n_window_blocks"):
            check_positive_int(name, getattr(self, name))
        for name in ("n_global_blocks", "n_random_blocks"):
            check_non_negative_int(name, getattr(self, name))
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                f"choose n_head among the divisors of d_model"
            )
        if self.n_kv_head is not None:
            check_positive_int("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head != 0:
                raise ValueError(
                    f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: each "
                    f"key/value head must serve the same number of query heads"
                )
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_non_negative_int("q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim is not None and self.qk_rope_head_dim % 2:
            raise ValueError(
                f"RoPE rotates pairs of coordinates: qk_rope_head_dim must be even, got "
                f"{self.qk_rope_head_dim}"
            )
        for name in ("mla_absorb", "mla_kv_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                f"RoPE rotates pairs of coordinates: head_dim = d_model / n_head must be even, "
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

    @property
    def head_dim(self) -> int:
        """Size of one head's queries, keys and values: ``d_model // n_head``."""
        return self.d_model // self.n_head
