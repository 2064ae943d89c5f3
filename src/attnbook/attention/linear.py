"""Causal linear attention: softmax replaced by a kernel feature map, in three equal forms.

Softmax attention weighs value ``s`` for query ``t`` by ``exp(q_t·k_s)``. Linear attention
(Katharopoulos et al., 2020, "Transformers are RNNs") uses ``φ(q_t)·φ(k_s)`` instead, with the
positive feature map ``φ(x) = elu(x) + 1``. Because the weight is now a dot product of features,
the sum over keys can be taken *before* meeting the query:

    y_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)
        = φ(q_t) S_t / φ(q_t)·z_t,    S_t = Σ_{s≤t} φ(k_s) v_sᵀ  (d, d_v),   z_t = Σ_{s≤t} φ(k_s)  (d,)

Three forms compute the same ``y`` (q, k, v: ``(B, H, T, d)`` -> ``(B, H, T, d_v)``):

- ``linear_attention_quadratic``: the ``(T, T)`` weight matrix with the causal mask, O(T²);
  the reference, and the only form that can show the weights;
- ``linear_attention_recurrent``: one token at a time, carrying the state ``(S, z)``, O(T) but
  a Python loop; this is an RNN, and its state is all that generation needs to remember;
- ``linear_attention_chunked``: the sequence cut into chunks of ``chunk`` tokens: the quadratic
  form inside each chunk, the state between chunks, O(T · (chunk + d_v) · d); the fast path
  for training.

RoPE (this book's choice, the one of RoFormer, Su et al. 2021, section 3.3): rotate the
*features* ``φ(q)``, ``φ(k)`` and use the rotated ones in the numerator only. The numerator's
scores then depend on the offset between positions, as with softmax RoPE, and the normaliser
keeps the unrotated features, so it stays positive (rotated dot products can be negative or zero).
Rotating before ``φ`` would keep everything positive but lose the relative-offset property.
ALiBi biases scores that are never formed here, so it is refused.

Registered as ``"linear"``; its cache is ``LinearAttentionCache``, the state ``(S, z)``.
"""

import torch
import torch.nn.functional as F

from ..kv_cache import check_cache_sizes
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
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
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


class LinearAttentionCache:
    """The recurrent state of one linear-attention layer: ``S`` ``(B, H, d, d_v)``, ``z`` ``(B, H, d)``.

    Unlike a KV cache it does not grow: it holds two running sums, whatever the length. So
    ``bytes_per_token`` ("what one position costs", one sequence, one layer) is here the *whole
    state*, the same at every length: the cost of remembering any number of tokens.

    Args:
        batch_size, n_head, head_dim: the shape of the state; ``v_head_dim`` defaults to ``head_dim``.
        max_len: the most positions it will be fed (positions, e.g. RoPE's, stop at block_size).
        device, dtype: where and how the state is stored (a lower precision is cast back on read).
    """

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        v_head_dim: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        check_cache_sizes(batch_size=batch_size, n_head=n_head, head_dim=head_dim, max_len=max_len)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.S = torch.zeros(batch_size, n_head, head_dim, v_head_dim, device=device, dtype=dtype)
        self.z = torch.zeros(batch_size, n_head, head_dim, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, S: torch.Tensor, z: torch.Tensor, n_tokens: int) -> None:
        """Replace the state by the one after ``n_tokens`` more tokens."""
        if self.length + n_tokens > self.max_len:
            raise ValueError(
                f"linear attention cache overflow: it takes max_len={self.max_len} positions, "
                f"{self.length} are used and {n_tokens} more came; reset() it or build it with "
                f"a larger max_len"
            )
        self.S.copy_(S)
        self.z.copy_(z)
        self.length += n_tokens

    def reset(self) -> None:
        """Back to no tokens: zero sums."""
        self.S.zero_()
        self.z.zero_()
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes of the whole state of one sequence in this layer, at any length (see above)."""
        return (self.S[0].numel() + self.z[0].numel()) * self.S.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache."""
        return self.S.nbytes + self.z.nbytes


@register_attention("linear")
class LinearAttention(MultiHeadAttention):
    """Causal multi-head linear attention with the ``elu + 1`` feature map.

    Multi-head attention's projections; only the attention changes: ``φ(q)``, ``φ(k)`` instead
    of softmax, computed with the chunked form (``config.linear_chunk`` tokens per chunk), or
    with ``impl="reference"`` the quadratic form (the recurrent form when decoding with a cache).
    ``need_weights`` returns the quadratic form's normalised weights ``(B, n_head, T, T)``
    (see ``linear_attention_quadratic``; not with a cache, which keeps no keys).
    A cache from ``new_cache`` is the constant-size state ``(S, z)``.

    Supports positions ``"learned"``, ``"sinusoidal"``, ``"none"`` and ``"rope"`` (on the
    features, numerator only: see the module docstring); refuses ``"alibi"``, ``causal=False``
    and ``attn_mask``. ``config.dropout`` drops the output only (there are no weights to drop).
    """

    def __init__(self, config: AttentionConfig):
        if config.positions == "alibi":
            raise ValueError(
                "linear attention never forms the scores that ALiBi biases: choose positions "
                "'rope', 'learned', 'sinusoidal' or 'none', not 'alibi'"
            )
        if not config.causal:
            raise ValueError("linear attention here is causal (a running state): set causal=True")
        if config.n_kv_head not in (None, config.n_head):
            raise ValueError(
                f"linear attention has one key/value head per query head, got "
                f"n_kv_head={config.n_kv_head} and n_head={config.n_head}"
            )
        super().__init__(config)

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """An empty state ``(S, z)`` for this layer; ``max_len`` defaults to ``block_size``."""
        return LinearAttentionCache(
            batch_size, self.n_head, self.head_dim, **self._cache_options(max_len, device, dtype)
        )

    def forward(self, x: torch.Tensor, attn_mask=None, need_weights: bool = False, cache=None):
        B, T = self.check_input(x)
        if attn_mask is not None:
            raise ValueError("linear attention forms no scores to mask: attn_mask must be None")
        if need_weights and cache is not None:
            raise ValueError("need_weights needs the whole sequence: call it without a cache")
        start = 0 if cache is None else cache.length  # position of x's first token
        q, k, v = self.project(x)  # 3 x (B, n_head, T, hd)
        q, k = elu_feature_map(q), elu_feature_map(k)  # (B, n_head, T, hd), positive features
        q_rot = k_rot = None
        if self.rope is not None:
            q_rot, k_rot = self.rope(q, start), self.rope(k, start)  # for the numerator only
        weights = None
        if need_weights or (self.config.impl == "reference" and cache is None):
            y, weights = linear_attention_quadratic(q, k, v, q_rot, k_rot, return_weights=True)
        else:
            state = None if cache is None else (cache.S.to(q.dtype), cache.z.to(q.dtype))
            if self.config.impl == "reference":
                y, state = linear_attention_recurrent(q, k, v, q_rot, k_rot, state)
            else:
                y, state = linear_attention_chunked(
                    q, k, v, self.config.linear_chunk, q_rot, k_rot, state
                )  # (B, n_head, T, hd)
            if cache is not None:
                cache.update(*state, T)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, d_model): heads side by side
        y = self.resid_dropout(self.c_proj(y))  # (B, T, d_model)
        return (y, weights) if need_weights else y
