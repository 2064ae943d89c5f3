"""Causal linear attention: softmax replaced by a kernel feature map, in three equal forms.

Linear attention (Katharopoulos et al., 2020) weighs value ``s`` for query ``t`` by
``φ(q_t)·φ(k_s)`` with ``φ(x) = elu(x) + 1``, so the sum over keys can be taken first:

    y_t = φ(q_t) S_t / φ(q_t)·z_t,    S_t = Σ_{s≤t} φ(k_s) v_sᵀ,    z_t = Σ_{s≤t} φ(k_s)

``linear_attention_quadratic`` (the ``(T, T)`` weights, the reference), ``linear_attention_recurrent``
(one token at a time carrying ``(S, z)``) and ``linear_attention_chunked`` (quadratic inside
chunks, the state between them; the fast path) compute the same ``y``. RoPE rotates the features
and is used in the numerator only (RoFormer's choice), so the normaliser stays positive; ALiBi
is refused (no scores are formed). Registered as ``"linear"``; its cache is
``LinearAttentionCache``, the state ``(S, z)``. Chapter 11 derives the three forms.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_positive_int, check_positive_ints
from ..kv_cache import StateCache
from .config import AttentionConfig
from .masks import causal_mask
from .mha import MultiHeadAttention
from .registry import register_attention

EPS = 1e-6  # added to the normaliser, which the positive features keep away from zero anyway


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1``: positive everywhere, ``x + 1`` for ``x > 0``, ``exp(x)`` below."""
    return F.elu(x) + 1


def _rotated(q, k, q_rot, k_rot):
    """The numerator's features: the rotated ones where given, else the features themselves."""
    return (q if q_rot is None else q_rot), (k if k_rot is None else k_rot)


def linear_attention_quadratic(q, k, v, q_rot=None, k_rot=None, return_weights=False):
    """The quadratic form: the causal ``(T, T)`` weights, normalised, times the values.

    Args:
        q, k: ``(B, H, T, d)`` features ``φ(q)``, ``φ(k)`` (positive).
        v: ``(B, H, T, d_v)`` values.
        q_rot, k_rot: ``(B, H, T, d)`` the features rotated by RoPE, used in the numerator only;
            ``None`` means the features themselves (no RoPE).
        return_weights: also return the ``(B, H, T, T)`` weights ``w[t, s] = (q_rot_t·k_rot_s) /
            Σ_{s'≤t} q_t·k_s'`` (zero above the diagonal). Without RoPE each row sums to one;
            with RoPE the rows need not, and single weights can be negative.
    Returns:
        ``(B, H, T, d_v)``, and the weights if ``return_weights``.
    """
    nq, nk = _rotated(q, k, q_rot, k_rot)
    T = q.shape[-2]
    causal = causal_mask(T, device=q.device)  # (T, T)
    scores = (nq @ nk.transpose(-2, -1)).masked_fill(~causal, 0.0)  # (B, H, T, T)
    norm = (q @ k.transpose(-2, -1)).masked_fill(~causal, 0.0).sum(-1, keepdim=True)  # (B,H,T,1)
    weights = scores / (norm + EPS)  # (B, H, T, T)
    y = weights @ v  # (B, H, T, d_v)
    return (y, weights) if return_weights else y


def linear_attention_recurrent(q, k, v, q_rot=None, k_rot=None, state=None):
    """The recurrent form: ``S += k_rot_t v_tᵀ``, ``z += k_t``, ``y_t = q_rot_t S / q_t·z``.

    Args:
        q, k, v, q_rot, k_rot: as in ``linear_attention_quadratic``.
        state: ``(S, z)`` with ``S``: ``(B, H, d, d_v)`` and ``z``: ``(B, H, d)``, the sums over
            the tokens before these ``T``; ``None`` means none before (zeros).
    Returns:
        ``(B, H, T, d_v)`` and the state ``(S, z)`` after the last token.
    """
    nq, nk = _rotated(q, k, q_rot, k_rot)
    B, H, T, d = q.shape
    if state is None:
        state = q.new_zeros(B, H, d, v.shape[-1]), q.new_zeros(B, H, d)
    S, z = state  # (B, H, d, d_v), (B, H, d)
    ys = []
    for t in range(T):
        S = S + nk[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, d, d_v)
        z = z + k[:, :, t]  # (B, H, d)
        num = (nq[:, :, t, None, :] @ S).squeeze(-2)  # (B, H, d_v)
        norm = (q[:, :, t] * z).sum(-1, keepdim=True)  # (B, H, 1)
        ys.append(num / (norm + EPS))  # (B, H, d_v)
    return torch.stack(ys, dim=2), (S, z)  # (B, H, T, d_v)


def linear_attention_chunked(q, k, v, chunk, q_rot=None, k_rot=None, state=None):
    """The chunked form: quadratic inside chunks of ``chunk`` tokens, the state between them.

    The sequence is zero-padded to a multiple of ``chunk`` (zero features add nothing to the
    sums; the padded outputs are dropped). Chunk ``n`` sees the state of every earlier chunk,
    ``S_n = S_0 + Σ_{m<n} k_rot_mᵀ v_m`` (an exclusive cumulative sum over chunks), and
    itself through the causal ``(chunk, chunk)`` weights. The normaliser ``q_t·z_t`` is a
    cumulative sum of the keys over the whole sequence. O(T · chunk · d) time for the blocks plus
    O(T · d · d_v) for the states, no Python loop. Fewer than ``chunk`` tokens (a decoding step)
    are one chunk of their own length, not padded.

    Args:
        q, k, v, q_rot, k_rot, state: as in ``linear_attention_recurrent``.
        chunk: tokens per chunk, a positive integer.
    Returns:
        ``(B, H, T, d_v)`` and the state ``(S, z)`` after the last token.
    """
    check_positive_int("chunk", chunk)
    nq, nk = _rotated(q, k, q_rot, k_rot)
    B, H, T, d = q.shape
    dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, d, dv), q.new_zeros(B, H, d)
    S0, z0 = state  # (B, H, d, d_v), (B, H, d)
    z = z0[:, :, None] + k.cumsum(dim=2)  # (B, H, T, d): z_t, keys up to and with t
    norm = (q * z).sum(-1, keepdim=True)  # (B, H, T, 1)
    chunk = min(chunk, max(T, 1))  # a short input is one chunk, unpadded
    pad = -T % chunk
    N = (T + pad) // chunk
    nq, nk, v = (F.pad(t, (0, 0, 0, pad)).view(B, H, N, chunk, -1) for t in (nq, nk, v))
    kv = nk.transpose(-2, -1) @ v  # (B, H, N, d, d_v): what each chunk adds to S
    before = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1].cumsum(dim=2)], dim=2)
    S_before = S0[:, :, None] + before  # (B, H, N, d, d_v): the state entering each chunk
    causal = causal_mask(chunk, device=q.device)  # (C, C)
    scores = (nq @ nk.transpose(-2, -1)).masked_fill(~causal, 0.0)  # (B, H, N, C, C)
    num = nq @ S_before + scores @ v  # (B, H, N, C, d_v): earlier chunks + this chunk
    num = num.view(B, H, N * chunk, dv)[:, :, :T]  # (B, H, T, d_v)
    S = S_before[:, :, -1] + kv[:, :, -1]  # (B, H, d, d_v)
    return num / (norm + EPS), (S, z[:, :, -1])  # (B, H, T, d_v)


class LinearAttentionCache(StateCache):
    """The recurrent state of one linear-attention layer: ``S`` ``(B, H, d, d_v)``, ``z`` ``(B, H, d)``.

    The ``Cache`` protocol, but it does not grow: it holds two running sums, whatever the length.
    ``append`` adds new tokens to the sums and returns the state *before* them, which is what
    their queries read (each form adds the tokens' own contributions itself). ``bytes_per_token``
    is here the *whole state*, the same at every length: the cost of remembering any number of
    tokens.

    Args:
        batch_size, n_head, head_dim: the shape of the state; ``v_head_dim`` defaults to ``head_dim``.
        max_len: the most positions it will be fed; None: no limit.
        device, dtype: where and how the state is stored (a lower precision is cast back on read).
    """

    kind = "linear attention cache"

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int | None,
        v_head_dim: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        check_positive_ints(batch_size=batch_size, n_head=n_head, head_dim=head_dim)
        super().__init__(max_len)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.S = torch.zeros(batch_size, n_head, head_dim, v_head_dim, device=device, dtype=dtype)
        self.z = torch.zeros(batch_size, n_head, head_dim, device=device, dtype=dtype)

    def append(self, k: torch.Tensor, v: torch.Tensor, k_rot: torch.Tensor | None = None):
        """Add ``T`` tokens, features ``k`` ``(B, H, T, d)`` (``k_rot``: rotated by RoPE, for
        the numerator) and values ``v`` ``(B, H, T, d_v)``, to the sums; returns ``(S, z)``
        before them."""
        B, H, d, dv = self.S.shape
        T = k.shape[-2]
        expected = [(B, H, T, d), (B, H, T, dv), (B, H, T, d)]
        given = [k, v, k if k_rot is None else k_rot]
        if [tuple(t.shape) for t in given] != expected:
            raise ValueError(
                f"expected k, v, k_rot of shapes {expected}, got {[tuple(t.shape) for t in given]}"
            )
        if any(t.device != self.S.device for t in given):
            raise ValueError(
                f"the cache lives on {self.S.device}, got k, v, k_rot on "
                f"{[str(t.device) for t in given]}: build it with device=..."
            )
        # the new sums in the compute dtype, rounded to the cache's dtype once
        S = self.S.to(v.dtype) + given[2].transpose(-2, -1) @ v  # (B, H, d, d_v)
        z = self.z.to(k.dtype) + k.sum(dim=2)  # (B, H, d)
        self._reserve(T)  # nothing is stored if this raises
        before = self.S, self.z
        self.S, self.z = S.to(self.S.dtype), z.to(self.z.dtype)
        return before

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.S, self.z


def check_state_config(config: AttentionConfig, name: str) -> None:
    """ValueError for what a layer that keeps a running state instead of scores cannot do:
    ALiBi (no scores to bias), ``causal=False`` (the state holds the past only),
    ``impl="flash"`` (no softmax to tile), ``sinks`` and ``softcap`` (no softmax, no scores).
    ``name`` names the layer in the message."""
    if config.positions == "alibi":
        raise ValueError(
            f"{name} never forms the scores that ALiBi biases: choose positions 'none', 'rope', "
            f"'learned' or 'sinusoidal', not 'alibi'"
        )
    if not config.causal:
        raise ValueError(f"{name} is causal (a running state): set causal=True")
    if config.impl == "flash":
        raise ValueError(
            f"{name} has no softmax for impl='flash' to tile: use impl='sdpa' (the chunked "
            f"form) or 'reference'"
        )
    if config.sinks or config.softcap is not None:
        raise ValueError(
            f"{name} has no softmax for a sink to join and forms no scores to cap: it takes "
            f"neither sinks nor softcap, got sinks={config.sinks}, softcap={config.softcap}; use "
            f"a softmax variant ('mha', 'gqa', 'local', ...) for them"
        )


@dataclass(frozen=True)
class LinearOptions:
    """linear_chunk: chunk length of the chunked form (the fast path)."""

    linear_chunk: int = 64

    def __post_init__(self):
        check_positive_int("linear_chunk", self.linear_chunk)


@register_attention("linear")
class LinearAttention(MultiHeadAttention):
    """Causal multi-head linear attention with the ``elu + 1`` feature map.

    Multi-head attention's projections; only the attention changes: ``φ(q)``, ``φ(k)`` instead
    of softmax, computed with the chunked form (``linear_chunk`` tokens per chunk, its option), or
    with ``impl="reference"`` the quadratic form (the recurrent form when decoding with a cache).
    ``need_weights`` returns the quadratic form's normalised weights ``(B, n_head, T, T)``
    (see ``linear_attention_quadratic``; not with a cache, which keeps no keys).
    A cache from ``new_cache`` is the constant-size state ``(S, z)``.

    Supports positions ``"learned"``, ``"sinusoidal"``, ``"none"`` and ``"rope"`` (on the
    features, numerator only: see the module docstring); refuses ``"alibi"``, ``causal=False``
    and ``attn_mask``. ``config.dropout`` drops the output only (there are no weights to drop).
    Of the modern block's options it takes ``output_gate`` only.
    """

    Options = LinearOptions

    def __init__(self, config: AttentionConfig, **options):
        check_state_config(config, "linear attention")
        if config.qk_norm:
            raise ValueError(
                "linear attention's queries and keys are the positive features elu + 1, which "
                "an RMSNorm weight could make negative (and the normaliser with them): set "
                "qk_norm=False, or use 'deltanet', which L2-normalises q and k itself"
            )
        super().__init__(config, **options)

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return {"linear_chunk": min(64, T)}

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """An empty state ``(S, z)`` for this layer, fed up to ``max_len`` positions (None: no
        limit, as the state does not grow)."""
        options = self._cache_options(max_len, device, dtype, bounded=True)
        return LinearAttentionCache(batch_size, self.n_head, self.head_dim, **options)

    def project(self, x: torch.Tensor):
        """Multi-head attention's projections, queries and keys through ``φ``: positive features
        ``(B, n_head, T, head_dim)``, and the values."""
        q, k, v = super().project(x)  # 3 x (B, n_head, T, head_dim)
        return elu_feature_map(q), elu_feature_map(k), v

    def position(self, q: torch.Tensor, k: torch.Tensor, start: int):
        """Nothing here: RoPE rotates the features inside ``attend``, for the numerator only."""
        return q, k

    def attend(self, q, k, v, attn_mask=None, need_weights: bool = False, cache=None):
        """A state update instead of softmax: the chunked form (the quadratic one with
        ``impl="reference"`` or ``need_weights``, the recurrent one when decoding with it), the
        cache's state ``(S, z)`` carrying every earlier token."""
        if attn_mask is not None:
            raise ValueError("linear attention forms no scores to mask: attn_mask must be None")
        if need_weights and cache is not None:
            raise ValueError("need_weights needs the whole sequence: call it without a cache")
        q_rot, k_rot = q, k  # the numerator's features: rotated by their positions with RoPE
        if self.rope is not None:
            start = 0 if cache is None else cache.length
            q_rot, k_rot = self.rope(q, start), self.rope(k, start)
        if need_weights or (self.config.impl == "reference" and cache is None):
            return linear_attention_quadratic(q, k, v, q_rot, k_rot, return_weights=True)
        state = None
        if cache is not None:  # the sums before these tokens; the cache now holds them too
            state = tuple(t.to(q.dtype) for t in cache.append(k, v, k_rot))
        if self.config.impl == "reference":
            return linear_attention_recurrent(q, k, v, q_rot, k_rot, state)[0], None
        chunk = self.options.linear_chunk
        return linear_attention_chunked(q, k, v, chunk, q_rot, k_rot, state)[0], None
