"""Multi-head latent attention (DeepSeek-V2, 2024): cache a small latent, not the keys and values.

Each token's keys and values are rebuilt from one latent vector ``c = RMSNorm(W_DKV x)`` of
``kv_lora_rank`` numbers (``mla_kv_norm=False`` drops the RMSNorm), shared by all heads: head ``h`` has key ``W_UK_h c`` and value
``W_UV_h c``. Generation then caches ``c`` instead of ``2 * n_head * head_dim`` numbers.

RoPE cannot be applied to ``W_UK_h c`` without spoiling the trick below, so position gets its own
*decoupled* coordinates: every head's query has ``qk_rope_head_dim`` extra rotated numbers, and
one rotated key ``k_rope = RoPE(W_KR x)`` is shared by all heads. A score is

    q_h · k_h = q_nope_h · (W_UK_h c) + q_rope_h · k_rope,    scaled by 1/sqrt(nope + rope),

and the cache holds ``c`` and ``k_rope``: ``kv_lora_rank + qk_rope_head_dim`` numbers per token
per layer. Queries may be compressed too (``q_lora_rank > 0``: down-projection, RMSNorm,
up-projection); that saves parameters and activations, not cache.

Two ways to attend, same outputs (``absorb``, from ``config.mla_absorb``):

- naive: expand every cached latent into per-head keys and values, then ordinary attention;
- absorbed: ``q_nope_h · (W_UK_h c) = (W_UK_hᵀ q_nope_h) · c``, so fold ``W_UK`` into the
  query and attend over the latents themselves, one key/value "head" shared by all query heads
  (multi-query attention in latent space; the values passed are the keys ``[c, k_rope]``, so
  SDPA's fused kernels apply, and the first ``kv_lora_rank`` output numbers are kept: the
  weighted latents); the output is a latent per head, and ``W_UV_h``
  (which could be multiplied into the output projection once, though at DeepSeek-V2's
  sizes the product is bigger than the two factors) maps it back. No per-head keys
  or values are ever formed, which is what makes decoding cheap.

Positions: ``"rope"`` rotates the decoupled part (``rope_pairing``, ``rope_base``); with
``"learned"``, ``"sinusoidal"`` and ``"none"`` the decoupled part is left unrotated (a plain
extra key shared by the heads); ``"alibi"`` biases the scores as in every variant, the decoupled
part unrotated. The up-projection has no bias, so the absorption is exact (a key bias would only
add a per-query constant to every score). Registered as ``"mla"``; cache: ``LatentCache``.
"""

from dataclasses import replace

import torch
from torch import nn

from ..kv_cache import check_cache_sizes
from ..positions import RotaryEmbedding
from .base import CausalSelfAttention
from .config import AttentionConfig
from .registry import register_attention

RMS_EPS = 1e-6


class LatentCache:
    """MLA's cache for one layer: latents ``(B, max_len, kv_lora_rank)`` and rotary keys
    ``(B, max_len, qk_rope_head_dim)``, preallocated. Same protocol as ``KVCache``:
    ``append`` returns everything cached so far, ``length``, ``reset``, ``bytes_per_token``.

    Args:
        batch_size, kv_lora_rank, rope_dim: the shape of what is cached.
        max_len: the most positions it holds.
        device, dtype: where and how it is stored (the layer casts a lower
            precision back when it reads).
    """

    def __init__(self, batch_size, kv_lora_rank, rope_dim, max_len, device=None, dtype=None):
        check_cache_sizes(
            batch_size=batch_size, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, max_len=max_len
        )
        dtype = dtype or torch.float32
        self.latent = torch.zeros(batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch_size, max_len, rope_dim, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor):
        """Store ``T`` new positions, ``latent`` ``(B, T, kv_lora_rank)`` and ``k_rope``
        ``(B, T, rope_dim)``; returns all cached ones, ``(B, length, ...)`` views of the storage."""
        B, _, R = self.latent.shape
        T, P = latent.shape[1], self.k_rope.shape[-1]
        if latent.shape != (B, T, R) or k_rope.shape != (B, T, P):
            raise ValueError(
                f"expected latent of shape {(B, T, R)} and k_rope of shape {(B, T, P)}, got "
                f"{tuple(latent.shape)} and {tuple(k_rope.shape)}"
            )
        if self.length + T > self.max_len:
            raise ValueError(
                f"latent cache overflow: it holds max_len={self.max_len} positions, {self.length} "
                f"are used and {T} more were appended; reset() it or build it with a larger max_len"
            )
        self.latent[:, self.length : self.length + T] = latent
        self.k_rope[:, self.length : self.length + T] = k_rope
        self.length += T
        return self.latent[:, : self.length], self.k_rope[:, : self.length]

    def reset(self) -> None:
        """Forget every cached position (the memory stays allocated)."""
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one position of one sequence: ``(kv_lora_rank + rope_dim) * itemsize``."""
        return (self.latent.shape[-1] + self.k_rope.shape[-1]) * self.latent.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache."""
        return self.latent.nbytes + self.k_rope.nbytes


@register_attention("mla")
class MultiHeadLatentAttention(CausalSelfAttention):
    """DeepSeek-V2 multi-head latent attention.

    Args:
        config: ``d_model``, ``n_head``, ``kv_lora_rank``, ``q_lora_rank``, ``qk_nope_head_dim``,
            ``qk_rope_head_dim``, ``v_head_dim`` (``None`` sizes are derived from ``head_dim``,
            see ``AttentionConfig``), ``mla_absorb``, and the usual ``dropout``, ``bias``,
            ``causal``, ``positions``, ``impl``. ``n_kv_head``, if set, must equal ``n_head``.

    Set the attribute ``absorb`` (initially ``config.mla_absorb``) to switch between the naive
    and the absorbed computation on the same weights. ``forward`` is
    ``CausalSelfAttention.forward``'s: ``(B, T, d_model)`` -> ``(B, T, d_model)``, with the
    cache from ``new_cache``; ``need_weights`` gives the ``(B, n_head, T, T_k)`` weights.
    """

    def __init__(self, config: AttentionConfig):
        if config.n_kv_head not in (None, config.n_head):
            raise ValueError(
                f"mla rebuilds a key/value head per query head from its latent, got "
                f"n_kv_head={config.n_kv_head} and n_head={config.n_head}: leave n_kv_head unset"
            )
        hd = config.head_dim
        config = replace(
            config,
            n_kv_head=config.n_head,
            kv_lora_rank=config.kv_lora_rank or 4 * hd,
            qk_nope_head_dim=config.qk_nope_head_dim or hd,
            qk_rope_head_dim=config.qk_rope_head_dim or max(2, 2 * (hd // 4)),
            v_head_dim=config.v_head_dim or hd,
        )
        super().__init__(config, n_kv_head=config.n_head)
        d, H, bias = config.d_model, config.n_head, config.bias
        self.rank, self.q_rank = config.kv_lora_rank, config.q_lora_rank
        self.nope, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.scale = (self.nope + self.rope_dim) ** -0.5  # not 1/sqrt of the absorbed size
        self.absorb = config.mla_absorb
        q_out = H * (self.nope + self.rope_dim)  # per head: q_nope | q_rope
        if self.q_rank:
            self.q_proj = nn.Sequential(
                nn.Linear(d, self.q_rank, bias=bias),  # W_DQ
                nn.RMSNorm(self.q_rank, eps=RMS_EPS),
                nn.Linear(self.q_rank, q_out, bias=bias),  # W_UQ and W_QR
            )
        else:
            self.q_proj = nn.Linear(d, q_out, bias=bias)
        self.kv_down = nn.Linear(d, self.rank + self.rope_dim, bias=bias)  # W_DKV | W_KR
        self.kv_norm = nn.RMSNorm(self.rank, eps=RMS_EPS) if config.mla_kv_norm else nn.Identity()
        self.kv_up = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)  # W_UK|W_UV
        self.c_proj = nn.Linear(H * self.v_dim, d, bias=bias)  # values are v_head_dim wide
        self.rope = None  # the decoupled part alone is rotated
        if config.positions == "rope":
            self.rope = RotaryEmbedding(
                self.rope_dim, config.block_size, config.rope_base, config.rope_pairing
            )

    def project(self, x: torch.Tensor):
        """Unlike the base class: ``q_nope`` ``(B, n_head, T, nope)``, ``q_rope``
        ``(B, n_head, T, rope)``, the latent ``(B, T, kv_lora_rank)`` and the shared,
        not yet rotated ``k_rope`` ``(B, T, rope)``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)  # (B,H,T,nope), (B,H,T,rope)
        latent, k_rope = self.kv_down(x).split(
            [self.rank, self.rope_dim], dim=-1
        )  # (B,T,r),(B,T,rope)
        return q_nope, q_rope, self.kv_norm(latent), k_rope

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """An empty ``LatentCache`` for this layer (``max_len`` defaults to ``block_size``)."""
        return LatentCache(
            batch_size, self.rank, self.rope_dim, **self._cache_options(max_len, device, dtype)
        )

    def forward(self, x: torch.Tensor, attn_mask=None, need_weights: bool = False, cache=None):
        B, T = self.check_input(x)
        start = 0 if cache is None else cache.length  # position of x's first token
        q_nope, q_rope, latent, k_rope = self.project(x)
        if self.rope is not None:
            q_rope, k_rope = self.rope(q_rope, start), self.rope(k_rope, start)  # rotated
        if cache is not None:
            latent, k_rope = cache.append(latent, k_rope)  # (B, T_k, r), (B, T_k, rope)
            latent, k_rope = latent.to(q_nope.dtype), k_rope.to(q_nope.dtype)
        w_uk, w_uv = self.kv_up.weight.view(self.n_head, -1, self.rank).split(
            [self.nope, self.v_dim], dim=1
        )  # (H, nope, r), (H, v, r)
        if self.absorb:
            q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r): W_UKᵀ q_nope
            q = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, T, r + rope)
            k = torch.cat([latent, k_rope], dim=-1)[:, None]  # (B, 1, T_k, r + rope)
            # values = keys, so SDPA's fused kernels apply (they want equal key and value
            # sizes) without sdpa padding a copy of the cache; the first r output numbers are
            # the weighted latents
            y, weights = self.attend(q, k, k, attn_mask, need_weights)  # (B, H, T, r + rope)
            y = y[..., : self.rank]  # (B, H, T, r)
            y = torch.einsum("bhtr,hvr->bhtv", y, w_uv)  # (B, H, T, v): W_UV on the output side
        else:
            k_nope = torch.einsum("btr,hnr->bhtn", latent, w_uk)  # (B, H, T_k, nope)
            v = torch.einsum("btr,hvr->bhtv", latent, w_uv)  # (B, H, T_k, v)
            k_rope = k_rope[:, None].expand(-1, self.n_head, -1, -1)  # (B, H, T_k, rope)
            q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, nope + rope)
            k = torch.cat([k_nope, k_rope], dim=-1)  # (B, H, T_k, nope + rope)
            y, weights = self.attend(q, k, v, attn_mask, need_weights)  # (B, H, T, v): sdpa
            # pads the narrower values with zeros for the fused kernel
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, H * v): heads side by side
        y = self.resid_dropout(self.c_proj(y))  # (B, T, d_model)
        return (y, weights) if need_weights else y
