"""DeepSeek Sparse Attention (DeepSeek-V3.2-Exp, 2025): MLA over the tokens a lightning indexer picks.

Compared with mla.py, a small *lightning indexer* scores every past token ``s`` for each query
``t``, ``I_{t,s} = sum_j w_{t,j} ReLU(q_{t,j} · k_s)`` (``index_n_heads`` query heads of
``index_head_dim``, one LayerNorm'd key per token shared by them, RoPE on their first
``qk_rope_head_dim`` numbers, ``w`` a linear map of the token), and MLA attends only to the
``index_topk`` tokens of highest score (ties: the earliest). The cache adds the index keys to
MLA's latents (``IndexedLatentCache``); a decoding step reads every index key but only the
selected latents. The indexer learns by distillation, its input detached: in training the
layer keeps ``indexer_loss``, the KL from the main attention (summed over heads) to
``softmax(I_t)``, over every past token during the dense warm-up (``dense_warmup``: attention
dense, the indexer trained alone) and over the selected tokens afterwards. Registered as
``"dsa"``; chapter 14 builds it.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..checks import check_positive_int, check_positive_ints
from .config import AttentionConfig
from .core import sdpa, sdpa_reference
from .masks import causal_mask, restrict
from .mla import LatentCache, MLAOptions, MultiHeadLatentAttention
from .registry import register_attention

LN_EPS = 1e-6  # k_norm's, as in DeepSeek's code


def index_scores(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``I_{t,s} = sum_j weights[t, j] ReLU(q[j, t] · k[s])``: ``(B, T, T_k)``.

    Args:
        q: ``(B, index_n_heads, T, index_head_dim)`` the indexer's queries.
        weights: ``(B, T, index_n_heads)`` their weights (scale included).
        k: ``(B, T_k, index_head_dim)`` one key per token, in q's dtype or a lower one (a
            bfloat16 cache: then converted).
    """
    # keys first: one pass over them, every head at once
    logits = torch.einsum("bsd,bjtd->bsjt", k.to(q.dtype), q).relu()  # (B, T_k, n_heads, T)
    return torch.einsum("bsjt,btj->bts", logits, weights)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest ``scores`` of each row (last dimension), equal scores
    taken earliest first, so that the choice never depends on the row's length; ``-inf``
    scores are never chosen."""
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
    above, tied = scores > kth, scores == kth
    wanted = k - above.sum(-1, keepdim=True)  # how many of the tied ones to take
    return (above | (tied & (tied.cumsum(-1) <= wanted))) & (scores > float("-inf"))


def indexer_kl(p: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ``KL(p_t || softmax of I_t over the support)``.

    Args:
        p: ``(B, T, T_k)`` target distributions, zero outside the support.
        scores: ``(B, T, T_k)`` index scores.
        support: ``(B, T, T_k)`` boolean, the tokens the softmax runs over (a query with none
            contributes 0).
    """
    empty = ~support.any(-1, keepdim=True)  # (B, T, 1): finite scores there, no NaN
    log_q = scores.masked_fill(~support, float("-inf")).masked_fill(empty, 0.0).log_softmax(-1)
    kl = torch.xlogy(p, p) - p * log_q.masked_fill(~support, 0.0)  # (B, T, T_k)
    return kl.sum(-1).mean()


class IndexedLatentCache(LatentCache):
    """DSA's cache for one layer: MLA's ``LatentCache`` plus the indexer's keys ``index_k``
    ``(B, max_len, index_head_dim)``, stored in ``index_dtype`` (default: the cache's dtype;
    DeepSeek keeps them in FP8, bfloat16 halves them here)."""

    kind = "indexed latent cache"

    def __init__(
        self, batch_size, kv_lora_rank, rope_dim, index_head_dim, max_len, device=None,
        dtype=None, index_dtype=None,
    ):  # fmt: skip
        check_positive_int("index_head_dim", index_head_dim)
        super().__init__(batch_size, kv_lora_rank, rope_dim, max_len, device, dtype)
        self.index_k = torch.zeros(
            batch_size, max_len, index_head_dim, device=device, dtype=index_dtype or self.k.dtype
        )

    def append(self, k: torch.Tensor, v: torch.Tensor, index_k: torch.Tensor):
        """Store ``T`` new positions: rotary keys ``(B, 1, T, rope_dim)``, latents ``(B, 1, T,
        kv_lora_rank)`` and index keys ``(B, T, index_head_dim)``; returns every cached one
        (views of the storage, in the cache's dtypes)."""
        expected = (self.index_k.shape[0], k.shape[-2], self.index_k.shape[-1])
        if index_k.shape != expected or index_k.device != self.index_k.device:
            raise ValueError(
                f"expected index_k of shape {expected} on {self.index_k.device}, got "
                f"{tuple(index_k.shape)} on {index_k.device}"
            )
        k, v = super().append(k, v)
        self.index_k[:, self.length - index_k.shape[1] : self.length] = index_k
        return k, v, self.index_k[:, : self.length]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.kv, self.index_k

    @property
    def bytes_per_token(self) -> int:
        """The latent and rotary key (``LatentCache``'s) plus one index key."""
        return super().bytes_per_token + self.index_k.shape[-1] * self.index_k.element_size()


@dataclass(frozen=True)
class DSAOptions(MLAOptions):
    """MLA's options and the lightning indexer's, with DeepSeek's names (DeepSeek-V3.2-Exp:
    ``index_n_heads=64``, ``index_head_dim=128``, ``index_topk=2048``; the defaults here suit
    the book's small models).

    index_n_heads: the indexer's query heads.
    index_head_dim: size of its queries and keys, at least ``qk_rope_head_dim`` (their first
        numbers, rotated with RoPE); ``None`` means ``2 * qk_rope_head_dim`` (DeepSeek's 128 =
        2 x 64).
    index_topk: how many tokens each query attends to.
    """

    index_n_heads: int = 4
    index_head_dim: int | None = None
    index_topk: int = 8

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(index_n_heads=self.index_n_heads, index_topk=self.index_topk)
        if self.index_head_dim is not None:
            check_positive_int("index_head_dim", self.index_head_dim)


class Indexer(nn.Module):
    """DeepSeek-V3.2-Exp's lightning indexer, with DeepSeek's module names: ``wq_b`` (queries
    from MLA's query latent; ``wq`` from the token when MLA's queries are not compressed),
    ``wk`` and ``k_norm`` (one LayerNorm'd key per token), ``weights_proj`` (a weight per head,
    scaled by ``1/sqrt(n_heads * head_dim)``). DeepSeek's Hadamard rotation of q and k is left
    out: it is orthogonal (scores unchanged) and serves its FP8 rounding only.
    """

    def __init__(self, n_embd, q_lora_rank, n_heads, head_dim, rope_dim, bias=True):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        if q_lora_rank:
            self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=bias)
        else:
            self.wq = nn.Linear(n_embd, n_heads * head_dim, bias=bias)
        self.wk = nn.Linear(n_embd, head_dim, bias=bias)
        self.k_norm = nn.LayerNorm(head_dim, eps=LN_EPS)
        self.weights_proj = nn.Linear(n_embd, n_heads, bias=bias)
        self.scale = (n_heads * head_dim) ** -0.5  # DeepSeek's n_heads^-1/2 · head_dim^-1/2

    def forward(self, x: torch.Tensor, qr: torch.Tensor | None = None):
        """Queries ``(B, n_heads, T, head_dim)``, weights ``(B, T, n_heads)`` and keys ``(B, T,
        head_dim)`` of the tokens ``x`` ``(B, T, n_embd)`` (``qr`` ``(B, T, q_lora_rank)``: MLA's
        query latent, or None), not yet rotated (``rotate``)."""
        B, T, _ = x.shape
        q = self.wq_b(qr) if qr is not None else self.wq(x)  # (B, T, n_heads * head_dim)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, ·)
        return q, self.weights_proj(x) * self.scale, self.k_norm(self.wk(x))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, start: int, rope):
        """``q`` and ``k`` with their first ``rope_dim`` numbers rotated by ``rope`` as positions
        ``start, start + 1, ...``, as DeepSeek's indexer does."""
        split = [self.rope_dim, self.head_dim - self.rope_dim]
        q_pe, q_nope = q.split(split, dim=-1)  # (B, n_heads, T, rope_dim), (..., rest)
        k_pe, k_nope = k.split(split, dim=-1)  # (B, T, rope_dim), (B, T, rest)
        q = torch.cat([rope(q_pe, start), q_nope], dim=-1)
        return q, torch.cat([rope(k_pe, start), k_nope], dim=-1)


class IndexerInputs(NamedTuple):
    """What ``project`` hands ``attend`` besides the queries and rotary keys: the latents and
    the indexer's projections (of detached inputs; RoPE still to come)."""

    latent: torch.Tensor  # (B, 1, T, kv_lora_rank) MLA's latents
    q: torch.Tensor  # (B, index_n_heads, T, index_head_dim) the indexer's queries
    weights: torch.Tensor  # (B, T, index_n_heads) their weights
    k: torch.Tensor  # (B, T, index_head_dim) its keys


@register_attention("dsa")
class DeepSeekSparseAttention(MultiHeadLatentAttention):
    """DeepSeek Sparse Attention: MLA restricted, per query, to the ``index_topk`` tokens the
    ``indexer`` (an ``Indexer``) scores highest.

    Args:
        config: as for MLA; causal only, ``impl`` "sdpa" or "reference".
        options: ``DSAOptions``' fields.

    Attributes: ``absorb`` (MLA's two modes, same outputs); ``index_topk``; ``dense_warmup``
    (default False; True: attention over every past token, as MLA, for the indexer's warm-up);
    ``indexer_loss``: after a forward pass in training mode, the indexer's KL loss
    (``indexer_kl``; it reaches only the indexer's weights, and the attention's output never
    reaches them), else None. An ``attn_mask`` must have 1 in its head dimension (one choice of
    tokens serves every head); it masks the index scores too. RoPE rotates the indexer's queries
    and keys as well; with learned or sinusoidal positions the indexer sees them in the tokens,
    with ALiBi (which biases MLA's scores) or none it sees no position.

    A step with a cache in the absorbed mode gathers the selected latents and rotary keys and
    attends over them alone; every other call masks MLA's attention to the selected tokens.
    """

    Options = DSAOptions

    def __init__(self, config: AttentionConfig, **options):
        if not config.causal:
            raise ValueError("DSA picks among past tokens: causal must be True (for a "
                             "non-causal layer use 'mla')")  # fmt: skip
        if config.impl == "flash":
            raise ValueError(
                "impl='flash' masks by position only, not by the indexer's choice of tokens: use "
                "impl='sdpa' or 'reference' for dsa"
            )
        super().__init__(config, **options)
        o = self.options
        index_head_dim = o.index_head_dim or 2 * self.qk_rope_head_dim
        if index_head_dim < self.qk_rope_head_dim:  # checked here: the sizes are resolved
            raise ValueError(
                f"index_head_dim={index_head_dim} is smaller than qk_rope_head_dim="
                f"{self.qk_rope_head_dim}, the indexer's rotary part: choose index_head_dim >= "
                f"{self.qk_rope_head_dim}"
            )
        self.index_head_dim, self.index_topk = index_head_dim, o.index_topk
        self.indexer = Indexer(
            config.n_embd, self.q_lora_rank, o.index_n_heads, index_head_dim,
            self.qk_rope_head_dim, config.bias,
        )  # fmt: skip
        self.dense_warmup = False
        self.indexer_loss = None

    @classmethod
    def options_for_length(cls, T: int, n_head: int) -> dict:
        return {"index_topk": max(1, T // 4)}

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        """An empty ``IndexedLatentCache`` (``max_len`` defaults to ``block_size``)."""
        options = self._cache_options(max_len, device, dtype)
        return IndexedLatentCache(
            batch_size, self.kv_lora_rank, self.qk_rope_head_dim, self.index_head_dim, **options
        )

    def check_mask(self, attn_mask, B: int, T: int, cache) -> None:
        """MLA's checks, and a head dimension of 1."""
        super().check_mask(attn_mask, B, T, cache)
        if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] != 1:
            raise ValueError(
                f"dsa's indexer picks one set of tokens for every head: attn_mask must have 1 in "
                f"its head dimension, got shape {tuple(attn_mask.shape)}"
            )

    def project(self, x: torch.Tensor):
        """MLA's queries and rotary keys, and ``IndexerInputs``: the latents and the indexer's
        projections of ``x`` and MLA's query latent (recomputed), both detached."""
        q, k_rope, latent = super().project(x)
        qr = self.q_norm(self.wq_a(x)).detach() if self.q_lora_rank else None
        return q, k_rope, IndexerInputs(latent, *self.indexer(x.detach(), qr))

    def attend(self, q, k, inputs: IndexerInputs, attn_mask=None, need_weights=False, cache=None):
        """Index scores over every cached token, the top-k chosen, MLA over them; in training,
        ``indexer_loss``. ``q`` ``(B, n_head, T, nope + rope)``, ``k`` the rotary keys ``(B, 1,
        T, rope)``. Returns ``(B, n_head, T, v_head_dim)`` and MLA's weights (or None)."""
        start = 0 if cache is None else cache.length
        index_q, index_w, index_k = inputs.q, inputs.weights, inputs.k
        if self.rope is not None:
            index_q, index_k = self.indexer.rotate(index_q, index_k, start, self.rope)
        v = inputs.latent
        if cache is not None:  # in the cache's dtype: the gather casts only what it reads
            k, v, index_k = cache.append(k, v, index_k)  # (B,1,T_k,rope), (B,1,T_k,r), (B,T_k,·)
        T, t_k = q.shape[-2], k.shape[-2]
        scores = index_scores(index_q, index_w, index_k)  # (B, T, T_k)
        scores = scores.masked_fill(~causal_mask(T, t_k, device=q.device), float("-inf"))
        per_query = attn_mask  # the attn_mask without its head dimension (of size 1)
        if attn_mask is not None and attn_mask.dim() >= 3:
            per_query = attn_mask.select(-3, 0)  # (B or 1, T or 1, T_k)
        if per_query is not None and per_query.dtype == torch.bool:
            scores = scores.masked_fill(~per_query, float("-inf"))
        elif per_query is not None:
            scores = scores + per_query  # as DeepSeek adds its mask
        dense = self.dense_warmup or self.index_topk >= t_k
        support = scores > float("-inf") if dense else top_k_mask(scores, self.index_topk)
        mask = attn_mask if dense else restrict(attn_mask, support[:, None])  # (B, 1, T, T_k)
        if not dense and cache is not None and self.absorb and not need_weights:
            y, weights = self._gathered_attend(q, k, v, support, per_query, start), None
        else:
            y, weights = super().attend(q, k.to(q.dtype), v.to(q.dtype), mask, need_weights)
        self.indexer_loss = None
        if self.training:
            p = self._head_summed_weights(q, k.to(q.dtype), v.to(q.dtype), mask)
            self.indexer_loss = indexer_kl(p, scores, support)
        return y, weights

    def _gathered_attend(self, q, k_rope, latent, chosen, per_query, start: int):
        """Absorbed MLA over the chosen cached tokens alone: only their latents and rotary keys
        are read. ``chosen`` ``(B, T, T_k)`` holds at most ``index_topk`` per row; ``per_query``
        the attn_mask without its head dimension (or None). Returns ``(B, n_head, T, v)``."""
        B, H, T, _ = q.shape
        n = min(self.index_topk, chosen.shape[-1])
        picked, idx = chosen.to(torch.uint8).topk(n, dim=-1)  # (B, T, n): the chosen ones first

        def gather(x):  # (B, 1, T_k, d) -> (B, T, n, d): the chosen positions of each query
            rows = [x[b, 0].index_select(0, idx[b].flatten()) for b in range(B)]  # (T * n, d)
            return torch.stack(rows).view(B, T, n, -1).to(q.dtype)

        kv = torch.cat([gather(latent), gather(k_rope)], dim=-1)  # (B, T, n, r + rope)
        mask = (picked > 0)[:, :, None]  # (B, T, 1, n): every head sees the same tokens
        if per_query is not None:  # the attn_mask at the chosen positions
            gathered = per_query.expand(B, T, -1).gather(-1, idx)[:, :, None]  # (B, T, 1, n)
            mask = mask & gathered if gathered.dtype == torch.bool else restrict(gathered, mask)
        if self.alibi_slopes is not None:
            distance = torch.arange(start, start + T, device=q.device)[:, None] - idx  # (B,T,n)
            bias = -self.alibi_slopes[:, None] * distance[:, :, None].to(q.dtype)  # (B,T,H,n)
            mask = restrict(bias, mask) if mask.dtype == torch.bool else bias + mask
        attention = sdpa_reference if self.config.impl == "reference" else sdpa
        q_abs = self.absorbed_query(q).transpose(1, 2)  # (B, T, H, r + rope): H rows per query
        y = attention(q_abs, kv, kv, mask, dropout_p=self.attn_dropout, scale=self.scale,
                      softcap=self.config.softcap, sinks=self.sinks)  # fmt: skip
        w_uv = self.wkv_b.weight.view(H, -1, self.kv_lora_rank)[:, self.qk_nope_head_dim :]
        return torch.einsum("bthr,hvr->bhtv", y[..., : self.kv_lora_rank], w_uv)  # (B,H,T,v)

    @torch.no_grad()
    def _head_summed_weights(self, q, k_rope, latent, attn_mask) -> torch.Tensor:
        """The indexer's target: MLA's attention weights under ``attn_mask`` summed over the
        heads and L1-normalised, ``(B, T, T_k)``, one head at a time (no ``(B, H, T, T_k)``)."""
        q_abs, kv = self.absorbed_query(q), torch.cat([latent, k_rope], dim=-1)
        mask, is_causal = self._mask(attn_mask, q.shape[-2], kv.shape[-2], q.device)
        per_head = mask is not None and mask.dim() >= 3 and mask.shape[-3] != 1  # ALiBi
        p = 0
        softcap, sinks = self.config.softcap, self.row_sinks  # (n_head, 1) or None
        for h in range(self.n_head):
            m = mask[..., h : h + 1, :, :] if per_head else mask
            sink = None if sinks is None else sinks[h : h + 1]  # (1, 1)
            _, w = sdpa_reference(q_abs[:, h : h + 1], kv, kv, m, is_causal, scale=self.scale,
                                  return_weights=True, softcap=softcap, sinks=sink)  # fmt: skip
            p = p + w[:, 0]  # (B, T, T_k)
        return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
