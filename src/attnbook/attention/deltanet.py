"""The delta rule and Gated DeltaNet: linear attention that corrects its memory and forgets.

Compared with linear.py, the state ``S`` ``(d_k, d_v)`` is written differently, read the same
(``o_t = S_tᵀ q_t``), and three things change:

- **delta rule** (Schlag et al. 2021, DeltaNet): the write replaces what the memory returns for
  ``k_t`` by ``v_t`` at a rate ``β_t`` in (0, 1): ``S_t = S_{t-1} + k_t u_tᵀ`` with the error
  ``u_t = β_t (v_t - S_{t-1}ᵀ k_t)``, instead of adding ``k_t v_tᵀ``;
- **gate** (Gated DeltaNet, Yang, Kautz and Hatamizadeh 2025): the memory first decays by
  ``α_t = exp(g_t)`` in (0, 1], one per head and token, so ``S_{t-1}`` above is ``α_t S_{t-1}``;
- **no normaliser**: keys and queries are L2-normalised, the output goes through an RMSNorm.

Three forms compute the same output: ``delta_rule_recurrent`` (token by token: the reference and
the decoding step), ``delta_rule_chunked`` (the UT transform inside chunks, the state between
them: training) and ``delta_rule_weights`` (the ``(T, T)`` matrix the rule amounts to). Each takes
``delta=False`` to drop the correction, which leaves (gated) linear attention. Registered as
``"deltanet"`` and ``"gated_deltanet"``; their cache is ``DeltaNetCache``. Chapter 12 derives it.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive_int, check_positive_ints
from ..kv_cache import StateCache
from .config import AttentionConfig
from .linear import check_state_config
from .masks import causal_mask
from .mha import MultiHeadAttention
from .registry import register_attention

NORM_EPS = 1e-6  # of the L2 normalisation of queries and keys, and of the output RMSNorm


def delta_rule_recurrent(q, k, v, beta, g=None, state=None, delta=True):
    """One token at a time: decay, write the error, read.

    Args:
        q, k: ``(B, H, T, d_k)`` queries (scaled as they should be read) and keys (unit length
            for the delta rule to be stable).
        v: ``(B, H, T, d_v)`` values.
        beta: ``(B, H, T)`` write strengths: the layers' are in (0, 1); with unit keys any
            ``β`` in [0, 2] keeps the state bounded (2 reflects it along ``k``).
        g: ``(B, H, T)`` log decays ``<= 0`` (``α_t = exp(g_t)``), or None for no decay.
        state: ``(B, H, d_k, d_v)`` the state before these tokens, or None for zeros.
        delta: False writes ``β_t k_t v_tᵀ`` (gated linear attention) instead of the error.
    Returns:
        ``(B, H, T, d_v)`` outputs and the state after the last token.
    """
    B, H, T, dk = k.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state  # (B, H, d_k, d_v)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, :, t, None, None].exp()  # forget: (B, H, d_k, d_v)
        k_t, v_t, b_t = k[:, :, t], v[:, :, t], beta[:, :, t, None]  # (B,H,d_k), (B,H,d_v), (B,H,1)
        if delta:
            v_t = v_t - (k_t[:, :, None] @ S).squeeze(-2)  # what the memory gets wrong for k_t
        S = S + k_t[..., :, None] * (b_t * v_t)[..., None, :]  # (B, H, d_k, d_v)
        outs.append((q[:, :, t, None] @ S).squeeze(-2))  # read: (B, H, d_v)
    return torch.stack(outs, dim=2), S  # (B, H, T, d_v)


def _decay_within(g, C):
    """From log decays ``g`` ``(..., C)``: the cumulative ones ``b`` (``b_i = g_1 + .. + g_i``) and
    the ``(..., C, C)`` matrix ``exp(b_i - b_j)`` for ``j <= i``, zero above the diagonal
    (masked before ``exp``, so nothing overflows; every kept entry is at most 1)."""
    b = g.cumsum(dim=-1)  # (..., C)
    lower = causal_mask(C, device=g.device)  # (C, C), j <= i
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    return b, decay  # (..., C), (..., C, C)


def _intra_chunk(q, k, v, beta, g, delta):
    """What each chunk ``(..., C, ·)`` computes on its own: ``u'`` ``(..., C, d_v)`` and ``w``
    ``(..., C, d_k)`` with ``u = u' - w S_0``; the decayed causal scores ``q kᵀ ⊙ Γ``
    ``(..., C, C)``; the cumulative log decays ``b`` ``(..., C)``.

    The errors ``u_i = β_i (v_i - γ_i S_0ᵀ k_i - Σ_{j<i} (γ_i/γ_j) (k_i·k_j) u_j)`` are the
    system ``(I + A) u = β v - β γ k S_0`` with ``A_ij = β_i (γ_i/γ_j) k_i·k_j`` for ``j < i``;
    the unit lower-triangular ``I + A`` is solved once for both right-hand sides (the UT
    transform; ``w`` is the WY representation's). Without ``delta``, ``A = 0``, ``u = β v``.
    """
    C = k.shape[-2]
    b, decay = _decay_within(g, C)  # (..., C), (..., C, C) with Γ_ij = γ_i / γ_j
    attn = (q @ k.transpose(-2, -1)) * decay  # (..., C, C): causal, decayed scores
    bv = beta[..., None] * v  # (..., C, d_v)
    if not delta:
        return bv, torch.zeros_like(k), attn, b
    below = causal_mask(C, device=k.device).tril(-1)  # (C, C): j < i
    A = (beta[..., None] * (k @ k.transpose(-2, -1)) * decay).masked_fill(~below, 0.0)
    rhs = torch.cat([bv, (beta * b.exp())[..., None] * k], dim=-1)  # (..., C, d_v + d_k)
    solve = torch.promote_types(A.dtype, torch.float32)  # at least float32 (autocast's bf16)
    eye = torch.eye(C, dtype=solve, device=k.device)
    sol = torch.linalg.solve_triangular(
        eye + A.to(solve), rhs.to(solve), upper=False, unitriangular=True
    ).to(rhs.dtype)
    u_, w = sol.split([v.shape[-1], k.shape[-1]], dim=-1)  # (..., C, d_v), (..., C, d_k)
    return u_, w, attn, b


def delta_rule_chunked(q, k, v, beta, chunk, g=None, state=None, delta=True):
    """Chunks of ``chunk`` tokens: the UT transform inside each, the state carried between them.

    Inside a chunk starting from ``S_0``, with ``γ_i = α_1 ⋯ α_i``, the errors satisfy
    ``(I + A) u = β v - β γ k S_0`` (``A`` as in ``_intra_chunk``), a unit lower-triangular
    system solved once for ``[u', w]`` so that ``u = u' - w S_0``; then every output and the next
    state are matrix products: ``o = γ q S_0 + (q kᵀ ⊙ Γ) u`` and
    ``S_C = γ_C S_0 + Σ_j (γ_C/γ_j) k_j u_jᵀ``. Everything except the state is computed for all
    chunks at once; a loop over chunks carries the state. The sequence is zero-padded (``β = 0``,
    ``g = 0``: padding writes and forgets nothing); fewer than ``chunk`` tokens are one chunk.

    Args:
        q, k, v, beta, g, state, delta: as in ``delta_rule_recurrent``.
        chunk: tokens per chunk, a positive integer.
    Returns:
        ``(B, H, T, d_v)`` outputs and the state after the last token.
    """
    check_positive_int("chunk", chunk)
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    if g is None:
        g = beta.new_zeros(B, H, T)
    C = min(chunk, max(T, 1))  # a short input is one chunk, unpadded
    pad = -T % C
    N = (T + pad) // C
    q, k, v = (F.pad(t, (0, 0, 0, pad)).view(B, H, N, C, -1) for t in (q, k, v))
    beta, g = (F.pad(t, (0, pad)).view(B, H, N, C) for t in (beta, g))
    u_, w, attn, b = _intra_chunk(q, k, v, beta, g, delta)
    q_in = q * b.exp()[..., None]  # (B, H, N, C, d_k): γ_i q_i reads the entering state
    k_out = k * (b[..., -1:] - b).exp()[..., None]  # (γ_C/γ_j) k_j: what reaches the next state
    S = q.new_zeros(B, H, dk, dv) if state is None else state  # (B, H, d_k, d_v)
    keep = b[..., -1, None, None].exp()  # (B, H, N, 1, 1): γ_C, what a chunk keeps of S
    outs = []
    # unbind, not indexing in the loop: each index's backward would write a whole zero tensor
    for u_n, w_n, q_n, a_n, k_n, keep_n in zip(
        *(t.unbind(2) for t in (u_, w, q_in, attn, k_out, keep)), strict=True
    ):
        u = u_n - w_n @ S  # (B, H, C, d_v): the errors given the state
        outs.append(q_n @ S + a_n @ u)  # (B, H, C, d_v)
        S = S * keep_n + k_n.transpose(-2, -1) @ u  # (B, H, d_k, d_v)
    o = torch.stack(outs, dim=2).view(B, H, N * C, dv)[:, :, :T]  # (B, H, T, d_v)
    return o, S


def delta_rule_weights(q, k, beta, g=None, delta=True):
    """The ``(B, H, T, T)`` matrix ``W`` with ``o = W v`` from a zero state: ``(q kᵀ ⊙ Γ)
    (I + A)⁻¹ diag(β)``, the whole sequence as one chunk. Lower-triangular (causal); without
    ``delta``, ``(q kᵀ ⊙ Γ) diag(β)``: (gated) linear attention's weights, unnormalised."""
    B, H, T, _ = k.shape
    if g is None:
        g = beta.new_zeros(B, H, T)
    eye = torch.eye(T, dtype=k.dtype, device=k.device).expand(B, H, T, T)  # values: one-hot
    u_, _, attn, _ = _intra_chunk(q, k, eye, beta, g, delta)  # u' = (I + A)⁻¹ diag(β)
    return attn @ u_  # (B, H, T, T)


class DeltaNetCache(StateCache):
    """The decoding state of one DeltaNet layer: ``S`` ``(B, H, d_k, d_v)`` and, with a short
    convolution, its last ``conv_size - 1`` inputs ``(B, channels, conv_size - 1)``.

    The ``Cache`` protocol, but it does not grow. ``append(x)`` takes the convolution's inputs
    ``(B, channels, T)`` of ``T`` new tokens, keeps their tail, and returns them with the cached
    inputs before them and the state before them: what the layer reads. The layer runs the rule
    and stores the state after them with ``write_state``. ``bytes_per_token`` is the *whole*
    state, the same at every length (as for ``LinearAttentionCache``).

    Args:
        batch_size, n_head, head_dim: the shape of the state (``d_k = d_v = head_dim``).
        max_len: the most positions it will be fed; None: no limit.
        conv_channels, conv_size: the short convolution's inputs and taps (1 tap keeps none).
        device, dtype: where and how it is stored (a lower precision is cast back on read).
    """

    kind = "DeltaNet state"

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int | None,
        conv_channels: int,
        conv_size: int,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        check_positive_ints(
            batch_size=batch_size, n_head=n_head, head_dim=head_dim, conv_size=conv_size
        )
        super().__init__(max_len)
        self.S = torch.zeros(batch_size, n_head, head_dim, head_dim, device=device, dtype=dtype)
        self.conv = torch.zeros(
            batch_size, conv_channels, conv_size - 1, device=device, dtype=dtype
        )

    def append(self, x: torch.Tensor):
        """Reserve ``T`` positions for the convolution inputs ``x`` ``(B, channels, T)``; returns
        ``x`` with the cached inputs before it ``(B, channels, conv_size - 1 + T)`` and the state
        before these tokens, both in ``x``'s dtype."""
        B, channels, tail = self.conv.shape
        if x.dim() != 3 or tuple(x.shape[:2]) != (B, channels):
            raise ValueError(f"expected inputs of shape ({B}, {channels}, T), got {tuple(x.shape)}")
        if x.device != self.S.device:
            raise ValueError(
                f"the cache lives on {self.S.device}, got inputs on {x.device}: build it with "
                f"device=..."
            )
        self._reserve(x.shape[-1])  # nothing is stored if this raises
        window = torch.cat([self.conv.to(x.dtype), x], dim=-1)  # (B, channels, tail + T)
        self.conv = window[..., window.shape[-1] - tail :].to(self.conv.dtype)
        return window, self.S.to(x.dtype)

    def write_state(self, S: torch.Tensor) -> None:
        """Store the state ``(B, H, d_k, d_v)`` after the appended tokens."""
        self.S = S.to(self.S.dtype)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.S, self.conv


@dataclass(frozen=True)
class DeltaNetOptions:
    """Named as in fla's DeltaNet layer.

    chunk_size: tokens per chunk of the chunked form (the fast path).
    use_short_conv: a causal depthwise convolution of ``conv_size`` taps on q, k and v.
    conv_size: its taps (the token itself and ``conv_size - 1`` before it).
    use_gate: the output ``RMSNorm(o) * silu(g_proj(x))`` instead of ``RMSNorm(o)``.
    use_delta: the delta rule's write of the error; False writes ``β_t k_t v_tᵀ`` instead
        ((gated) linear attention with this layer's convolution and norms: an ablation).
    """

    chunk_size: int = 64
    use_short_conv: bool = True
    conv_size: int = 4
    use_gate: bool = False
    use_delta: bool = True

    def __post_init__(self):
        check_positive_ints(chunk_size=self.chunk_size, conv_size=self.conv_size)
        for name in ("use_short_conv", "use_gate", "use_delta"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class GatedDeltaNetOptions(DeltaNetOptions):
    """DeltaNet's options; Gated DeltaNet layers gate their output by default."""

    use_gate: bool = True


class DeltaInputs(NamedTuple):
    """What ``project`` hands ``attend`` besides q and k: everything else made from ``x``."""

    v: torch.Tensor  # (B, T, n_embd) values, before the short convolution
    beta: torch.Tensor  # (B, n_head, T) write strengths in (0, 1)
    g: torch.Tensor | None  # (B, n_head, T) log decays <= 0, or None (no forgetting)
    gate: torch.Tensor | None  # (B, T, n_embd) the output gate before silu, or None


@register_attention("deltanet")
class DeltaNet(MultiHeadAttention):
    """DeltaNet (Yang et al. 2024): multi-head attention's projections, the delta rule instead
    of softmax.

    ``c_attn`` makes q, k, v; ``b_proj`` one ``β = sigmoid(·)`` per head and token; the short
    convolution (``use_short_conv``) mixes each with the tokens just before, then silu; q and k
    are L2-normalised (RoPE, if chosen, rotates them after that: not in the papers, allowed so
    that a comparison can give every variant the same positions), q scaled by ``1/sqrt(d)``; the
    chunked form (``impl="reference"``: the recurrent one) gives each head's output, RMSNorm'd
    (and gated with ``use_gate``), then ``c_proj``. ``need_weights`` returns
    ``delta_rule_weights`` (before the norm). Refuses ``"alibi"``, ``causal=False``,
    ``impl="flash"`` and ``attn_mask``; ``config.dropout`` drops the output only. Of the modern
    block's options it takes ``output_gate`` (after the RMSNorm, with ``use_gate=False`` only).
    """

    Options = DeltaNetOptions

    def __init__(self, config: AttentionConfig, **options):
        check_state_config(config, "DeltaNet")
        if config.qk_norm:
            raise ValueError(
                "DeltaNet L2-normalises q and k itself (after its short convolution), as the "
                "delta rule needs unit keys: set qk_norm=False"
            )
        super().__init__(config, **options)
        d, o = config.n_embd, self.options
        if config.output_gate and o.use_gate:
            raise ValueError(
                f"{type(self).__name__} with use_gate=True already gates its output, "
                f"RMSNorm(o) * silu(g_proj(x)): set use_gate=False for output_gate's sigmoid "
                f"gate instead, or output_gate=False"
            )
        self.b_proj = nn.Linear(d, config.n_head, bias=config.bias)  # β per head
        self.conv1d = None  # fla's q_conv1d, k_conv1d, v_conv1d side by side: one depthwise conv
        if o.use_short_conv:
            self.conv1d = nn.Conv1d(3 * d, 3 * d, o.conv_size, groups=3 * d, bias=False)
        self.g_proj = nn.Linear(d, d, bias=config.bias) if o.use_gate else None
        self.o_norm = nn.RMSNorm(config.head_dim, eps=NORM_EPS)

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return {"chunk_size": min(64, T)}

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """An empty state (and convolution inputs) for this layer, fed up to ``max_len``
        positions (None: no limit, as the state does not grow)."""
        taps = self.options.conv_size if self.conv1d is not None else 1  # 1: keeps no inputs
        return DeltaNetCache(
            batch_size, self.n_head, self.head_dim, conv_channels=3 * self.config.n_embd,
            conv_size=taps, **self._cache_options(max_len, device, dtype, bounded=True),
        )  # fmt: skip

    def log_decay(self, x: torch.Tensor):
        """No forgetting in DeltaNet: None (Gated DeltaNet returns ``(B, n_head, T)``)."""
        return None

    def project(self, x: torch.Tensor):
        """q, k ``(B, T, n_embd)`` and ``DeltaInputs``, all before the short convolution (which
        reads the cache, so ``attend`` runs it)."""
        q, k, v = self.c_attn(x).split(self.config.n_embd, dim=2)  # 3 x (B, T, n_embd)
        beta = self.b_proj(x).sigmoid().transpose(1, 2)  # (B, n_head, T)
        gate = self.g_proj(x) if self.g_proj is not None else None  # (B, T, n_embd)
        return q, k, DeltaInputs(v, beta, self.log_decay(x), gate)

    def position(self, q: torch.Tensor, k: torch.Tensor, start: int):
        """Nothing here: RoPE rotates the normalised q and k inside ``attend``."""
        return q, k

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, n_embd)`` -> ``(B, n_head, T, head_dim)``."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def attend(self, q, k, inputs: DeltaInputs, attn_mask=None, need_weights=False, cache=None):
        """Short convolution, silu, L2 norm, (RoPE), the delta rule over the cache's state,
        RMSNorm (and gate): ``(B, n_head, T, head_dim)``, and the weights or None."""
        if attn_mask is not None:
            raise ValueError("DeltaNet forms no scores to mask: attn_mask must be None")
        if need_weights and cache is not None:
            raise ValueError("need_weights needs the whole sequence: call it without a cache")
        T, start = q.shape[1], 0 if cache is None else cache.length
        x = torch.cat([q, k, inputs.v], dim=2).transpose(1, 2)  # (B, 3 n_embd, T)
        state = None
        if cache is not None:
            x, state = cache.append(x)  # (B, 3 n_embd, conv_size - 1 + T), (B, H, d, d)
        elif self.conv1d is not None:
            x = F.pad(x, (self.options.conv_size - 1, 0))  # causal: zeros before the first token
        if self.conv1d is not None:
            x = self.conv1d(x)  # (B, 3 n_embd, T)
        q, k, v = F.silu(x[..., x.shape[-1] - T :].transpose(1, 2)).chunk(3, dim=2)
        q, k, v = self.heads(q), self.heads(k), self.heads(v)  # (B, n_head, T, head_dim)
        q, k = F.normalize(q, dim=-1, eps=NORM_EPS), F.normalize(k, dim=-1, eps=NORM_EPS)
        if self.rope is not None:
            q, k = self.rope(q, start), self.rope(k, start)
        q = q / math.sqrt(self.head_dim)
        beta, g, delta = inputs.beta, inputs.g, self.options.use_delta
        weights = None
        if need_weights:
            weights = delta_rule_weights(q, k, beta, g, delta=delta)  # (B, n_head, T, T)
            o = weights @ v
        elif self.config.impl == "reference":
            o, state = delta_rule_recurrent(q, k, v, beta, g, state, delta=delta)
        else:
            o, state = delta_rule_chunked(
                q, k, v, beta, self.options.chunk_size, g, state, delta=delta
            )
        if cache is not None:
            cache.write_state(state)
        o = self.o_norm(o)  # (B, n_head, T, head_dim)
        if inputs.gate is not None:
            o = o * F.silu(self.heads(inputs.gate))
        return o, weights


@register_attention("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (Yang, Kautz and Hatamizadeh 2025): compared with DeltaNet, the state
    decays by ``α_t = exp(g_t)`` per head before each write, and the output is gated.

    ``g_t = -exp(A_log) · softplus(a_proj(x_t) + dt_bias)``, Mamba-2's parametrisation: ``A``
    a per-head rate (drawn in (0, 16]), ``dt`` a per-head step (drawn in [0.001, 0.1], stored
    through softplus's inverse), so that a new layer forgets at rates spread over several
    orders of magnitude.
    """

    Options = GatedDeltaNetOptions

    def __init__(self, config: AttentionConfig, **options):
        super().__init__(config, **options)
        H = config.n_head
        self.a_proj = nn.Linear(config.n_embd, H, bias=False)  # the decay's input, per head
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1e-4, 16).log())  # (H,)
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(0.1)).exp()  # (H,)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """``g`` ``(B, n_head, T)``, each ``<= 0``: how much of the state each token keeps."""
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)  # (B, T, n_head)
        return g.transpose(1, 2)
