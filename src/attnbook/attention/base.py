"""The skeleton every attention variant shares: project -> normalize -> position -> attend ->
gate -> out.

``forward`` is written once; a variant subclasses ``Attention`` and overrides only the stages it
changes, and declares its own settings as an ``Options`` dataclass (see ``registry``):

- ``project(x)``: queries ``(B, n_head, T, head_dim)``, keys and values ``(B, n_kv_head, T,
  head_dim)`` (fewer key/value heads than query heads is grouped-query attention);
- ``normalize(q, k)``: QK-norm (``config.qk_norm``), else nothing;
- ``position(q, k, start)``: RoPE rotates q and k (ALiBi biases the scores in
  ``softmax_attend``; learned and sinusoidal positions were added to the embeddings by the model);
- ``attend(q, k, v, attn_mask, need_weights, cache)``: append to the cache (``new_cache`` makes
  it), then ``softmax_attend`` over every cached position (with ``sinks`` and ``softcap``);
- ``gate(y, x)``: the output gate (``config.output_gate``), else nothing; ``out(y)`` merges
  the heads. Chapter 3 builds multi-head attention, its first variant; chapters 6 and 7 open
  it for positions and the cache, chapter 15 for the options of the modern block.
"""

import torch
from torch import nn

from ..kv_cache import KVCache
from ..positions import RotaryEmbedding, alibi_bias, alibi_slopes
from .config import AttentionConfig
from .core import sdpa, sdpa_reference
from .flash import add_sink, flash_attention
from .masks import causal_mask, restrict
from .registry import NoOptions, make_options

QK_NORM_EPS = 1e-6  # of q_norm and k_norm (Qwen3's rms_norm_eps)


class Attention(nn.Module):
    """Self-attention (causal unless ``config.causal`` is False) with positions and a KV cache;
    ``CrossAttention`` runs the same stages over a source's keys and values.

    ``Attention(config, **options)``: ``options`` are the fields of the variant's ``Options``
    (none here), kept as ``self.options``. The modern block's options add ``q_norm`` and
    ``k_norm`` (``nn.RMSNorm(head_dim)``, ``qk_norm``), ``gate_proj`` (``output_gate``) and the
    parameter ``sinks`` ``(n_head,)`` (``sinks``); each is None when its option is off.

    ``forward(x, attn_mask=None, need_weights=False, cache=None)``:
        x: ``(B, T, n_embd)``.
        attn_mask: optional extra mask (boolean, ``True`` = may attend, or additive float)
            broadcastable to ``(B, n_head, T, T_k)``, combined with the causal mask; for a key
            padding mask ``m`` of shape ``(B, T_k)`` pass ``m[:, None, None, :]``.
        need_weights: also return the ``(B, n_head, T, T_k)`` attention weights (computed on
            the reference path, whatever ``config.impl`` says).
        cache: a cache from ``new_cache``; ``x`` is then the next ``T`` tokens after the
            ``cache.length`` already cached, and ``T_k = cache.length + T``.
    Returns ``(B, T, n_embd)``, or ``(output, weights)`` with ``need_weights``.
    """

    Options = NoOptions
    window = None  # how many positions a query sees, itself included (None: all; local.py)

    def __init__(self, config: AttentionConfig, **options):
        super().__init__()
        self.config, self.options = config, make_options(type(self), options)
        # one key/value head per query head unless a variant shares them (gqa.py)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_head, config.head_dim
        self.output_projection(config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = self.k_norm = None
        if config.qk_norm:  # over head_dim, one weight shared by the heads (Qwen3)
            self.q_norm = nn.RMSNorm(config.head_dim, eps=QK_NORM_EPS)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=QK_NORM_EPS)
        # gpt-oss's sink logits, one per query head; 0: the sink counts as one key scoring 0
        self.sinks = nn.Parameter(torch.zeros(config.n_head)) if config.sinks else None
        self.scale = None  # softmax scale: None means 1/sqrt(the queries' size)
        self.rope = None
        if config.positions == "rope":
            self.rope = RotaryEmbedding(
                config.head_dim, config.block_size, config.rope_base, config.rope_pairing
            )
        slopes = alibi_slopes(config.n_head) if config.positions == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)  # (n_head,) or None

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        """The options this variant would choose for sequences of ``T`` tokens and ``n_head``
        heads (``compare`` and ``bench`` build every variant with them)."""
        return {}

    def output_projection(self, width: int) -> None:
        """``c_proj``, which mixes the heads' ``width = n_head * v_head_dim`` numbers into
        ``n_embd``, and with ``output_gate`` the ``gate_proj`` (``n_embd`` -> ``width``) that
        gates them (a variant with other value sizes calls it again, MLA)."""
        config = self.config
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.gate_proj = None
        if config.output_gate:
            self.gate_proj = nn.Linear(config.n_embd, width, bias=config.bias)

    def project(self, x: torch.Tensor):
        """Queries ``(B, n_head, T, head_dim)``, keys and values ``(B, n_kv_head, T, head_dim)``."""
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """An empty KV cache for this layer, for up to ``max_len`` positions (at most, and by
        default, ``block_size``).

        A variant whose cache is bounded (a rolling window, a recurrent state) takes any
        ``max_len``, and None means no limit: it may decode past ``block_size``."""
        return KVCache(
            batch_size, self.n_kv_head, self.head_dim, **self._cache_options(max_len, device, dtype)
        )

    def _cache_options(self, max_len, device, dtype, bounded: bool = False) -> dict:
        """``max_len``, and the device and dtype of this layer's weights unless given: the common
        cache arguments. A cache that grows (``bounded=False``) holds 1..``block_size``
        positions, None meaning ``block_size``; a bounded one any number, None meaning no limit."""
        if max_len is None and not bounded:
            max_len = self.config.block_size
        if not bounded and not 0 < max_len <= self.config.block_size:
            raise ValueError(
                f"max_len must be in 1..block_size={self.config.block_size}, got {max_len}: this "
                f"layer's cache grows with the sequence (a bounded one, a rolling window or a "
                f"recurrent state, may go past block_size)"
            )
        return dict(
            max_len=max_len,
            device=device if device is not None else self.c_proj.weight.device,
            dtype=dtype or self.c_proj.weight.dtype,
        )

    def check_input(self, x: torch.Tensor, name: str = "x") -> tuple[int, int]:
        """``(B, T)`` of an input ``x`` of shape ``(B, T, n_embd)`` in the weights' dtype (or
        under autocast); ValueError otherwise."""
        d, dtype = self.config.n_embd, self.c_proj.weight.dtype
        if x.dim() != 3 or x.shape[-1] != d:
            raise ValueError(f"{name} must have shape (B, T, n_embd={d}), got {tuple(x.shape)}")
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{name} is {x.dtype} but the layer's weights are {dtype}: convert one to the "
                f"other (layer.to(dtype) or x.to(dtype)), or run under torch.autocast"
            )
        return x.shape[0], x.shape[1]

    def mask_widths(self, T: int, cache) -> tuple[int, ...]:
        """The key counts an ``attn_mask``'s last dimension may have for ``T`` new queries (1
        broadcasts): every position so far."""
        return 1, T + (0 if cache is None else cache.length)

    def check_mask(self, attn_mask, B: int, T: int, cache) -> None:
        """ValueError unless ``attn_mask`` is None, or boolean or float and broadcastable to
        ``(B, n_head, T, T_k)`` with ``T_k`` one of ``mask_widths``."""
        if attn_mask is None:
            return
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                f"attn_mask must be boolean (True = may attend) or float (added to the scores), "
                f"got {attn_mask.dtype}"
            )
        widths = self.mask_widths(T, cache)
        leading = list(zip(attn_mask.shape[-2::-1], (T, self.n_head, B), strict=False))
        if (
            attn_mask.dim() > 4
            or attn_mask.shape[-1] not in widths
            or any(n not in (1, full) for n, full in leading)
        ):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B={B}, "
                f"n_head={self.n_head}, T={T}, T_k) with T_k in {widths}"
            )

    def forward(self, x: torch.Tensor, attn_mask=None, need_weights: bool = False, cache=None):
        B, T = self.check_input(x)
        self.check_mask(attn_mask, B, T, cache)
        start = 0 if cache is None else cache.length  # position of x's first token
        q, k, v = self.project(x)  # (B, n_head, T, head_dim), 2 x (B, n_kv_head, T, head_dim)
        q, k = self.normalize(q, k)  # QK-norm
        q, k = self.position(q, k, start)  # rotated by their positions (RoPE)
        y, weights = self.attend(q, k, v, attn_mask, need_weights, cache)  # like q
        y = self.gate(y, x)  # output gate
        y = self.out(y)  # (B, T, n_embd)
        return (y, weights) if need_weights else y

    def normalize(self, q: torch.Tensor, k: torch.Tensor):
        """QK-norm: each head's ``q`` and ``k`` RMSNorm'd over ``head_dim`` (``q_norm``,
        ``k_norm``), in their dtype; unchanged without ``qk_norm``."""
        if not self.config.qk_norm:
            return q, k
        return self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)

    def gate(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output gate: ``y`` ``(B, n_head, T, v_head_dim)`` times ``sigmoid(gate_proj(x))``,
        one gate per element of each head's output; unchanged without ``output_gate``."""
        if self.gate_proj is None:
            return y
        B, H, T, _ = y.shape
        g = self.gate_proj(x).view(B, T, H, -1).transpose(1, 2)  # (B, n_head, T, v_head_dim)
        return y * torch.sigmoid(g)

    def position(self, q: torch.Tensor, k: torch.Tensor, start: int):
        """RoPE: ``q`` and ``k`` rotated by their positions ``start, start + 1, ...``."""
        if self.rope is None:
            return q, k
        return self.rope(q, start), self.rope(k, start)

    def attend(self, q, k, v, attn_mask=None, need_weights: bool = False, cache=None):
        """With a ``cache``: append ``k``, ``v`` to it and attend over every cached position.

        Returns ``softmax_attend``'s output ``(B, n_head, T, head_dim)`` and weights (or None).
        """
        if cache is not None:
            k, v = self.read_cache(cache, k, v, q.dtype)  # (B, n_kv_head, T_k, head_dim)
        return self.softmax_attend(q, k, v, attn_mask, need_weights)

    @staticmethod
    def read_cache(cache, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        """Append ``k``, ``v`` to ``cache``; every cached position's keys and values (the cached
        ones, then these), cast to ``dtype`` (a cache may store a lower precision)."""
        k, v = cache.append(k, v)
        return k.to(dtype), v.to(dtype)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, n_head, T, v_head_dim)`` -> ``(B, T, n_embd)``: heads side by side, ``c_proj``,
        dropout."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, n_head * v_head_dim)
        return self.resid_dropout(self.c_proj(y))  # (B, T, n_embd)

    def softmax_attend(self, q, k, v, attn_mask=None, need_weights: bool = False):
        """Softmax attention of ``q`` ``(B, n_head, T, head_dim)`` over ``k``, ``v``
        ``(B, n_kv_head, T_k, head_dim)`` with this layer's masks (causal, ALiBi, ``attn_mask``) and
        ``self.scale``; fewer key/value heads than query heads means grouped-query attention.

        Returns the ``(B, n_head, T, head_dim)`` output and the ``(B, n_head, T, T_k)`` weights if
        ``need_weights`` (else None; with ``sinks`` each row of weights sums to less than 1).
        """
        sinks = self.row_sinks
        if self.config.impl == "flash" and not need_weights:
            if attn_mask is not None:
                raise ValueError(
                    "impl='flash' masks by position only (causal, window): it takes no attn_mask; "
                    "use impl='sdpa' for a padding or other mask"
                )
            y, lse = flash_attention(
                q, k, v, causal=self.config.causal, window=self.window, scale=self.scale,
                return_lse=True,
            )  # fmt: skip
            return (y if sinks is None else add_sink(y, lse, sinks)), None
        attn_mask, is_causal = self._mask(attn_mask, q.shape[-2], k.shape[-2], q.device)
        args = dict(
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.attn_dropout,
            scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1],
            softcap=self.config.softcap,
            sinks=sinks,
        )
        if need_weights or self.config.impl == "reference":
            return sdpa_reference(q, k, v, **args, return_weights=True)
        return sdpa(q, k, v, **args), None

    @property
    def row_sinks(self) -> torch.Tensor | None:
        """The sink logits of ``(B, n_head, T, ·)`` query rows, ``(n_head, 1)``, or None."""
        return None if self.sinks is None else self.sinks[:, None]

    @property
    def attn_dropout(self) -> float:
        """Dropout probability on the attention weights: ``config.dropout`` in training, else 0."""
        return self.config.dropout if self.training else 0.0

    def _mask(self, attn_mask, t_q, t_k, device):
        """The mask to attend with, and whether SDPA's own (top-left) causal flag can do it."""
        if self.alibi_slopes is not None:  # a float bias per head, the masks folded into it
            bias = alibi_bias(self.alibi_slopes, t_q, t_k).to(dtype=self.c_proj.weight.dtype)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                bias = restrict(bias, attn_mask)  # (.., n_head, t_q, t_k)
            elif attn_mask is not None:
                bias = bias + attn_mask
            attn_mask = bias
        if not self.config.causal or t_q == 1:  # one new query may see every cached key
            return attn_mask, False
        if t_q == t_k:  # no cache, or a first prefill: top-left and bottom-right agree
            return attn_mask, True
        return restrict(attn_mask, causal_mask(t_q, t_k, device=device)), False
