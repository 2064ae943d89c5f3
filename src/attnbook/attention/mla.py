"""Multi-head latent attention (DeepSeek-V2, 2024): cache a small latent, not the keys and values.

Each token's keys and values come from one latent ``c = RMSNorm(W_DKV x)`` of ``kv_lora_rank``
numbers shared by all heads (head ``h``: key ``W_UK_h c``, value ``W_UV_h c``). RoPE gets its own
*decoupled* coordinates: ``qk_rope_head_dim`` rotated numbers per query head and one rotated key
``k_rope`` shared by the heads, so a score is ``q_nope_h · W_UK_h c + q_rope_h · k_rope`` and the
cache holds ``c`` and ``k_rope`` (``LatentCache``). Two ways to attend, same outputs (``absorb``):
naive (expand the latents into per-head keys and values) and absorbed (fold ``W_UK`` into the
query and attend over the latents themselves, one shared "head"; ``W_UV`` is applied to the
output). Queries may be compressed too (``q_lora_rank > 0``). Registered as ``"mla"``;
chapter 13 derives it.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_non_negative_int, check_positive_int, check_positive_ints
from ..kv_cache import Cache, KVCache
from ..positions import RotaryEmbedding
from .base import Attention
from .config import AttentionConfig
from .core import sdpa
from .registry import register_attention

RMS_EPS = 1e-6


class LatentCache(KVCache):
    """MLA's cache for one layer: a ``KVCache`` with one head whose "keys" are the shared rotary
    keys ``(B, 1, max_len, rope_dim)`` and whose "values" are the latents ``(B, 1, max_len,
    kv_lora_rank)``: what MLA's ``project`` returns as k and v. Both are stored side by side in
    one tensor ``kv`` ``(B, 1, max_len, kv_lora_rank + rope_dim)`` (latent, then rotary key),
    which the absorbed mode reads as it is, without copying the cache; ``k``, ``v``, ``latent``
    and ``k_rope`` are views of it.
    """

    kind = "latent cache"

    def __init__(self, batch_size, kv_lora_rank, rope_dim, max_len, device=None, dtype=None):
        check_positive_ints(
            batch_size=batch_size, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, max_len=max_len
        )
        Cache.__init__(self, max_len)
        self.kv_lora_rank = kv_lora_rank
        self.kv = torch.zeros(
            batch_size, 1, max_len, kv_lora_rank + rope_dim, device=device,
            dtype=dtype or torch.float32,
        )  # fmt: skip

    @property
    def k(self) -> torch.Tensor:
        return self.kv[..., self.kv_lora_rank :]  # (B, 1, max_len, rope_dim)

    @property
    def v(self) -> torch.Tensor:
        return self.kv[..., : self.kv_lora_rank]  # (B, 1, max_len, kv_lora_rank)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store ``T`` new rotary keys ``(B, 1, T, rope_dim)`` and latents ``(B, 1, T,
        kv_lora_rank)``; returns every cached one, as ``KVCache.append`` does."""
        self._check(k, v)
        start = self._reserve(k.shape[-2])
        self.kv[:, :, start : self.length] = torch.cat([v, k], dim=-1)
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv,)

    @property
    def latent(self) -> torch.Tensor:
        return self.v[:, 0]  # (B, max_len, kv_lora_rank)

    @property
    def k_rope(self) -> torch.Tensor:
        return self.k[:, 0]  # (B, max_len, rope_dim)


@dataclass(frozen=True)
class MLAOptions:
    """MLA's sizes, with DeepSeek's names (``None`` sizes are derived from ``head_dim``).

    kv_lora_rank: size of the cached key/value latent; ``None`` means ``4 * head_dim``.
    q_lora_rank: size of the query latent; 0 means the queries are not compressed.
    qk_nope_head_dim: per-head query/key size without RoPE; ``None`` means ``head_dim``.
    qk_rope_head_dim: per-head size of the decoupled rotary query and shared rotary key, even;
        ``None`` means about ``head_dim / 2`` (``max(2, 2 * (head_dim // 4))``).
    v_head_dim: per-head value size; ``None`` means ``head_dim``.
    absorb: start in the absorbed mode (attend in latent space) instead of the naive one.
    kv_norm: RMSNorm on the latent (DeepSeek-V2 has it); ``False`` keeps keys and values linear
        in the input, as a model converted from multi-head attention needs (``convert.py``).
    """

    kv_lora_rank: int | None = None
    q_lora_rank: int = 0
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    absorb: bool = False
    kv_norm: bool = True

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_non_negative_int("q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim is not None and self.qk_rope_head_dim % 2:
            raise ValueError(
                f"RoPE rotates pairs of coordinates: qk_rope_head_dim must be even, got "
                f"{self.qk_rope_head_dim}"
            )
        for name in ("absorb", "kv_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


@register_attention("mla")
class MultiHeadLatentAttention(Attention):
    """DeepSeek-V2 multi-head latent attention, with DeepSeek's module and size names.

    Args:
        config: the usual ``n_embd``, ``n_head``, ``dropout``, ``bias``, ``causal``,
            ``positions``, ``impl``.
        options: ``MLAOptions``' fields; the sizes they resolve to are the attributes
            ``kv_lora_rank``, ``q_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
            ``v_head_dim``.

    Modules: ``wq`` (or ``wq_a``, ``q_norm``, ``wq_b`` with ``q_lora_rank > 0``), ``wkv_a``
    (W_DKV and W_KR), ``kv_norm``, ``wkv_b`` (W_UK and W_UV per head), ``c_proj`` (and
    ``gate_proj`` with ``output_gate``). Set the attribute ``absorb`` to switch between the naive
    and the absorbed computation on the same weights. ``forward`` is ``Attention.forward``'s.
    Takes ``sinks`` and ``softcap``; refuses ``qk_norm``.
    """

    Options = MLAOptions

    def __init__(self, config: AttentionConfig, **options):
        if config.qk_norm:
            raise ValueError(
                "qk_norm normalises per-head queries and keys of head_dim, but MLA's queries are "
                "q_nope | q_rope and its keys a shared latent (DeepSeek normalises the latent: "
                "option kv_norm): set qk_norm=False, or use 'mha' or 'gqa' for QK-norm"
            )
        super().__init__(config, **options)
        o, head_dim = self.options, config.head_dim
        d, H, bias = config.n_embd, config.n_head, config.bias
        r, q_r = o.kv_lora_rank or 4 * head_dim, o.q_lora_rank
        nope, dv = o.qk_nope_head_dim or head_dim, o.v_head_dim or head_dim
        rope = o.qk_rope_head_dim or max(2, 2 * (head_dim // 4))
        self.kv_lora_rank, self.q_lora_rank = r, q_r
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = nope, rope, dv
        self.scale = (nope + rope) ** -0.5  # not 1/sqrt of the absorbed size
        self.absorb = o.absorb
        if q_r:  # compressed queries: down, RMSNorm, up
            self.wq_a = nn.Linear(d, q_r, bias=bias)  # W_DQ
            self.q_norm = nn.RMSNorm(q_r, eps=RMS_EPS)
            self.wq_b = nn.Linear(q_r, H * (nope + rope), bias=bias)  # W_UQ | W_QR per head
        else:
            self.wq = nn.Linear(d, H * (nope + rope), bias=bias)  # W_Q | W_QR per head
        self.wkv_a = nn.Linear(d, r + rope, bias=bias)  # W_DKV | W_KR
        self.kv_norm = nn.RMSNorm(r, eps=RMS_EPS) if o.kv_norm else nn.Identity()
        self.wkv_b = nn.Linear(r, H * (nope + dv), bias=False)  # W_UK | W_UV per head
        self.output_projection(H * dv)  # values are v_head_dim wide
        self.rope = None  # the decoupled part alone is rotated
        if config.positions == "rope":
            self.rope = RotaryEmbedding(
                rope, config.block_size, config.rope_base, config.rope_pairing
            )

    def project(self, x: torch.Tensor):
        """Queries ``(B, n_head, T, nope + rope)`` (``q_nope | q_rope`` per head), and as keys and
        values what is cached: the shared, not yet rotated ``k_rope`` ``(B, 1, T, rope)`` and the
        latent ``(B, 1, T, kv_lora_rank)``."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, H, T, nope + rope)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return q, k_rope[:, None], self.kv_norm(latent)[:, None]  # (B,H,T,·), (B,1,T,·) x 2

    def position(self, q: torch.Tensor, k: torch.Tensor, start: int):
        """RoPE rotates the decoupled part only: ``q_rope`` and the shared ``k_rope``."""
        if self.rope is None:
            return q, k
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat([q_nope, self.rope(q_rope, start)], dim=-1), self.rope(k, start)

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """An empty ``LatentCache`` for this layer (``max_len`` defaults to ``block_size``)."""
        options = self._cache_options(max_len, device, dtype)
        return LatentCache(batch_size, self.kv_lora_rank, self.qk_rope_head_dim, **options)

    def attend(self, q, k, v, attn_mask=None, need_weights: bool = False, cache=None):
        """``k``: rotary keys ``(B, 1, T, rope)``, ``v``: latents ``(B, 1, T, r)``, cached
        first; then per-head keys and values are expanded (naive) or the queries absorbed."""
        if cache is not None:
            k, v = self.read_cache(cache, k, v, q.dtype)  # (B, 1, T_k, rope), (B, 1, T_k, r)
        k_rope, latent = k, v
        r, nope = self.kv_lora_rank, self.qk_nope_head_dim
        w_kv_b = self.wkv_b.weight.view(self.n_head, -1, r)  # (H, nope + v, r)
        w_uk, w_uv = w_kv_b.split([nope, self.v_head_dim], dim=1)  # (H, nope, r), (H, v, r)
        if self.absorb:
            q = self.absorbed_query(q)  # (B, H, T, r + rope)
            if cache is not None:  # latents and rotary keys side by side, as cached: no copy
                k = cache.kv[:, :, : cache.length].to(q.dtype)  # (B, 1, T_k, r + rope)
            else:
                k = torch.cat([latent, k_rope], dim=-1)  # (B, 1, T_k, r + rope)
            # values = keys, so SDPA's fused kernels apply (they want equal key and value
            # sizes) without sdpa padding a copy of the cache; the first r output numbers are
            # the weighted latents
            if q.shape[-2] == 1 and not need_weights and self.config.impl == "sdpa":
                y, weights = self._decode_step(q, k, attn_mask), None
            else:
                y, weights = self.softmax_attend(q, k, k, attn_mask, need_weights)
            return torch.einsum("bhtr,hvr->bhtv", y[..., :r], w_uv), weights  # (B, H, T, v)
        k_nope = torch.einsum("bctr,hnr->bhtn", latent, w_uk)  # (B, H, T_k, nope), c = 1
        v = torch.einsum("bctr,hvr->bhtv", latent, w_uv)  # (B, H, T_k, v)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_head, -1, -1)], dim=-1)  # (B,H,T_k,·)
        # (B, H, T, v): sdpa pads the narrower values with zeros for the fused kernel
        return self.softmax_attend(q, k, v, attn_mask, need_weights)

    def absorbed_query(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, r + rope)``: ``W_UKᵀ q_nope`` beside ``q_rope``, the query that attends over
        ``[latent | k_rope]`` in the absorbed mode (``q``: ``(B, H, T, nope + rope)``)."""
        r, nope = self.kv_lora_rank, self.qk_nope_head_dim
        w_uk = self.wkv_b.weight.view(self.n_head, -1, r)[:, :nope]  # (H, nope, r)
        q_nope, q_rope = q.split([nope, self.qk_rope_head_dim], dim=-1)
        return torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope], dim=-1)

    def _decode_step(self, q: torch.Tensor, kv: torch.Tensor, attn_mask) -> torch.Tensor:
        """Absorbed attention of one new token: its heads' queries ``(B, H, 1, r + rope)`` as the
        query *rows* of one SDPA call over the shared ``kv`` ``(B, 1, T_k, r + rope)``, which is
        then read once for all heads (grouped-query SDPA expands it per head). The layer's mask
        for one query (``attn_mask``, ALiBi) moves from the head dimension to the rows.
        Returns ``(B, H, 1, r + rope)``."""
        mask, _ = self._mask(attn_mask, 1, kv.shape[-2], q.device)  # (.., H or 1, 1, T_k)
        if mask is not None:
            mask = mask[(None,) * (4 - mask.dim())].transpose(-3, -2)  # (.., 1, H or 1, T_k)
        y = sdpa(q.transpose(1, 2), kv, kv, mask, dropout_p=self.attn_dropout, scale=self.scale,
                 softcap=self.config.softcap, sinks=self.sinks)  # fmt: skip
        return y.transpose(1, 2)  # (B, H, 1, r + rope)
