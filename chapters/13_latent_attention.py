# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 13 — Multi-head latent attention
#
# [Chapter 4](04_mqa_gqa.ipynb) made the KV cache smaller by sharing: multi-query and grouped-query
# attention keep fewer key/value heads than query heads, so several query heads read the same keys.
# [Chapter 7](07_kv_cache.ipynb) built the cache and measured it. This chapter studies a different
# trade, **multi-head latent attention** (MLA), introduced with DeepSeek-V2 (DeepSeek-AI, 2024,
# "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"). MLA keeps a
# key head and a value head for *every* query head, but computes all of them from one short vector
# per token, the **latent**, and caches only that latent.
#
# Two problems stand in the way, and solving them is most of the chapter. First, rebuilding every
# head's keys and values from the cached latents at every generation step would cost a lot of
# arithmetic; a little linear algebra, **weight absorption**, lets attention work on the latents
# directly. Second, RoPE ([chapter 6](06_positions.ipynb)) breaks that algebra; the fix is to give
# position its own small set of coordinates, **decoupled RoPE**.
#
# **Learning goals**
#
# - Describe MLA's trade: a joint low-rank compression of keys and values into a latent of
#   `kv_lora_rank` numbers per token, rebuilt per head by up-projections, with only the latent
#   cached.
# - Derive weight absorption, $q_h \cdot (W^{UK}_h c) = (W^{UK\top}_h q_h) \cdot c$, check
#   numerically that attention over the latents gives the same output, and recognise it as
#   multi-query attention in latent space.
# - Show numerically that absorption breaks when RoPE rotates the rebuilt keys, explain why
#   (the rotation $R_{n-m}$ sits between the query and $W^{UK}_h$, so moving $W^{UK}_h$ to the
#   query side means passing through a matrix that changes with the key's position $n$), and repair
#   it with decoupled RoPE: extra rotated query dimensions per head and one shared rotated key.
# - Use `attnbook.attention.mla` (`MultiHeadLatentAttention`, `LatentCache`), generate with its
#   cache in both modes, naive and absorbed, and say which mode is cheaper when, by counting
#   FLOPs and by timing a decoding step.
# - Compare the cache per token of MLA with MHA, GQA and MQA, on a tiny model and on
#   DeepSeek-V2's shape.

# %% [markdown]
# ## Setup
#
# As in every chapter, we seed the random draws and print shapes, integers, booleans and rounded
# numbers; timings appear only in a cell whose output the book's tests ignore. As in
# [chapter 4](04_mqa_gqa.ipynb), everything runs on one thread: the matrices here are small, a
# second thread gains little on them, and when other programs compete for the cores, threads that
# wait for each other can make small operations many times slower. It also makes the timing of
# section 7 steadier.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnbook.attention import AttentionConfig, build_attention, causal_mask
from attnbook.kv_cache import KVCache
from attnbook.model import GPT, GPTConfig
from attnbook.positions import apply_rope, rope_cos_sin

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. A different trade
#
# [Chapter 4](04_mqa_gqa.ipynb)'s formula for the cache counts, per token and per layer, one key and
# one value for every key/value head:
#
# | attention | numbers cached per token and layer |
# | --- | --- |
# | MHA, $H$ heads of size $d_h$ | $2 H d_h$ |
# | GQA, $G$ key/value heads | $2 G d_h$ |
# | MQA | $2 d_h$ |
#
# GQA and MQA buy their saving by letting query heads *share* keys and values: fewer distinct
# key heads, less freedom for each query head to look for something of its own.
#
# Look at MHA's cache from another angle. The keys and values of a token are linear functions of
# the layer's (normalised) input $x$, a vector of $d = H d_h$ numbers: $k = W^K x$, $v = W^V x$.
# So the cache stores $2d$ numbers per token that have only $d$ degrees of freedom. We could
# cache $x$ instead, half the size, and rebuild keys and values from it at every step, at the
# price of recomputing them.
#
# MLA pushes this idea further. It *learns* a compression of each token into a **latent**
# $c = W^{DKV} x$ of $r$ numbers (`kv_lora_rank`, with $r$ much smaller than $2d$), and rebuilds
# every head's key and value from it with up-projections:
#
# $$k_h = W^{UK}_h\, c, \qquad v_h = W^{UV}_h\, c, \qquad h = 1 \ldots H.$$
#
# Every head still has its own keys and values (they differ, because each head has its own
# $W^{UK}_h$, $W^{UV}_h$), but all of them live in the same $r$-dimensional space, and the cache
# holds only $c$: $r$ numbers per token and layer, whatever the number of heads. ("LoRA" in the
# config names refers to this low-rank factorisation of the key projection, $W^{UK} W^{DKV}$
# in place of $W^K$, and likewise for the values.)
#
# ## 2. Version 1: low-rank keys and values, no positions yet
#
# We build the idea in the smallest form first: no positional information at all, keys and
# values rebuilt from the latent, a causal mask, and a cache that holds latents. Following
# DeepSeek-V2 (and `attnbook`), the latent is normalised with an RMSNorm right after the
# down-projection, which keeps the latents at a steady scale whatever the input; the
# normalised latent is what gets cached, and everything after it is linear in it, which the
# next section relies on.
#
# The cache is [chapter 7](07_kv_cache.ipynb)'s growing `torch.cat` cache, generalised to hold any
# number of tensors laid out as `(B, T, ...)`: version 1 caches one (the latents), version 2 below
# two. Like every cache in the book it offers `length` and `append`, which returns everything cached
# so far.

# %%
class LatentCatCache:
    """A growing cache: append(t1, t2, ...) adds T positions to each (B, T, ...) tensor."""

    def __init__(self):
        self.parts = None  # a tuple of (B, length, ...) tensors once something is cached

    @property
    def length(self):
        return 0 if self.parts is None else self.parts[0].shape[1]

    def append(self, *new):  # each (B, T_new, ...)
        if self.parts is None:
            self.parts = new
        else:
            pairs = zip(self.parts, new, strict=True)
            self.parts = tuple(torch.cat([old, n], dim=1) for old, n in pairs)
        return self.parts  # every position so far


class LatentKV(nn.Module):
    """Version 1: every head's keys and values rebuilt from one cached latent. No positions."""

    def __init__(self, n_embd, n_head, rank):
        super().__init__()
        self.n_head, self.head_dim, self.kv_lora_rank = n_head, n_embd // n_head, rank
        self.wq = nn.Linear(n_embd, n_embd)  # queries, as in MHA
        self.wkv_a = nn.Linear(n_embd, rank)  # W_DKV: a token -> its latent
        self.kv_norm = nn.RMSNorm(rank, eps=1e-6)
        self.k_up = nn.Linear(rank, n_embd, bias=False)  # W_UK: latent -> every head's key
        self.v_up = nn.Linear(rank, n_embd, bias=False)  # W_UV: latent -> every head's value
        self.c_proj = nn.Linear(n_embd, n_embd)

    def heads(self, t):  # (B, T, n_head * hd) -> (B, n_head, T, hd)
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, -1).transpose(1, 2)

    def forward(self, x, cache=None):  # x: (B, T, n_embd), the new tokens
        B, T, d = x.shape
        q = self.heads(self.wq(x))  # (B, H, T, hd)
        c = self.kv_norm(self.wkv_a(x))  # (B, T, r): all this layer keeps of each token
        if cache is not None:
            (c,) = cache.append(c)  # (B, T_k, r): the cached latents and the new ones
        k, v = self.heads(self.k_up(c)), self.heads(self.v_up(c))  # (B, H, T_k, hd) each
        mask = causal_mask(T, c.shape[1])  # (T, T_k), bottom-right aligned (chapter 7)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))  # (B, T, n_embd)


torch.manual_seed(0)
v1 = LatentKV(n_embd=64, n_head=4, rank=32)
for name, p in v1.named_parameters():
    print(f"{name:>15} {tuple(p.shape)}")
print(f"cached per token: {v1.kv_lora_rank} numbers (MHA of the same shape: 2 x 64 = 128)")

# %% [markdown]
# The latent is a quarter of what MHA would cache here. What does that cost? Stack the keys and
# values of all four heads of a token side by side: 128 numbers. In MHA they are a linear
# function of the token's 64 input numbers, so a sequence's key/value matrix has rank at most 64;
# in MLA they are a linear function of the 32 latent numbers, so rank at most 32. The singular
# values of the `(T, 128)` key/value matrix of 200 random tokens show it: an MHA layer (biases
# off, so the count is clean) against our latent layer.

# %%
torch.manual_seed(1)
x200 = torch.randn(1, 200, 64)
mha_layer = build_attention("mha", AttentionConfig(n_embd=64, n_head=4, bias=False))
with torch.no_grad():
    kv_mha = mha_layer.c_attn(x200)[0, :, 64:]  # (200, 128): keys | values, all heads
    c200 = v1.kv_norm(v1.wkv_a(x200))  # (1, 200, 32)
    kv_mla = torch.cat([v1.k_up(c200), v1.v_up(c200)], dim=-1)[0]  # (200, 128)
ranks = {name: int(torch.linalg.matrix_rank(m)) for name, m in (("MHA", kv_mha), ("MLA", kv_mla))}
print("rank of the (200, 128) key/value matrix:", ranks)

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, m, color in (("MHA layer", kv_mha, "C3"), ("latent layer, r = 32", kv_mla, "C0")):
    s = torch.linalg.svdvals(m)
    ax.semilogy(range(1, len(s) + 1), s / s[0], "o", ms=3, color=color, label=name)
ax.axvline(32, color="C0", ls=":", lw=1)
ax.axvline(64, color="C3", ls=":", lw=1)
ax.set_xlabel("index of the singular value")
ax.set_ylabel("singular value / largest")
ax.set_title("Keys and values of 4 heads (128 numbers per token), 200 tokens")
ax.legend()
plt.show()

# %% [markdown]
# Beyond index 32 the latent layer's singular values are rounding noise, about $10^{-7}$ of the
# largest: its keys and values *are* 32-dimensional. The bet of MLA is that a trained layer's
# keys and values are close to low-rank anyway, so that training with this constraint from the
# start loses little. (Exercise 4 measures how close to low-rank the keys and values of a small
# trained MHA layer are.)
#
# Caching works as in [chapter 7](07_kv_cache.ipynb), with latents in place of keys and values.
# Feeding 12 tokens one at a time through the cache must reproduce one pass over all 12:

# %%
torch.manual_seed(2)
x = torch.randn(2, 12, 64)
with torch.no_grad():
    full = v1(x)  # (2, 12, 64): one pass
    cache = LatentCatCache()
    stepwise = torch.cat([v1(x[:, t : t + 1], cache=cache) for t in range(12)], dim=1)
assert torch.allclose(stepwise, full, atol=1e-5)
print("cached latents:", tuple(cache.parts[0].shape), "(B, T, kv_lora_rank)")
print("one token at a time == one pass (atol=1e-5):", torch.allclose(stepwise, full, atol=1e-5))

# %% [markdown]
# Correct, and the cache is small. But look at what each decoding step now does: it multiplies
# *every* cached latent by $W^{UK}$ and $W^{UV}$ again, rebuilding all $H$ heads' keys and values
# for all $T_k$ positions. That is $2 \cdot T_k \cdot r \cdot 2d$ FLOPs per layer and step, far
# more than attention itself, and it grows with the context. (One multiply-add counts as 2 FLOPs,
# as PyTorch's `FlopCounterMode` counts them in section 7; prose that counts multiply-adds says
# so.) We saved memory by spending
# arithmetic. The next section takes that arithmetic back.
#
# ## 3. Absorbing the up-projections
#
# ### 3.1 Keys: move $W^{UK}$ to the query side
#
# For query head $h$ the score against key position $n$ is a dot product, and a dot product lets
# a matrix change sides:
#
# $$q_h \cdot k_{h,n} = q_h^\top W^{UK}_h c_n = (W^{UK\top}_h q_h)^\top c_n
#   = \tilde q_h \cdot c_n, \qquad \tilde q_h = W^{UK\top}_h q_h \in \mathbb{R}^r.$$
#
# So instead of turning every cached latent into a key, turn each *query* into a latent-space
# query $\tilde q_h$ once, and take its dot products with the cached latents directly. The key
# up-projection is "absorbed" into the query.
#
# In code we need each head's block of the up-projection. `k_up` is an `nn.Linear(r, d)`, so its
# weight has shape `(d, r) = (H * hd, r)`, and the rows `h*hd .. (h+1)*hd - 1` produce head `h`'s
# key: `k_up.weight.view(H, hd, r)[h]` is $W^{UK}_h$, of shape `(hd, r)`. In the `einsum` strings
# of this chapter `d` is the head dimension ($d_h$, `hd`), `r` the latent's, `t` a query's and `n`
# a key's position, as in the formulas.

# %%
with torch.no_grad():
    q = v1.heads(v1.wq(x))  # (B, H, T, hd)
    c = v1.kv_norm(v1.wkv_a(x))  # (B, T, r)
    k, v = v1.heads(v1.k_up(c)), v1.heads(v1.v_up(c))  # (B, H, T, hd): what version 1 builds
    W_UK = v1.k_up.weight.view(4, 16, 32)  # (H, hd, r): W_UK_h for each head h
    W_UV = v1.v_up.weight.view(4, 16, 32)  # (H, hd, r): W_UV_h
    q_lat = torch.einsum("bhtd,hdr->bhtr", q, W_UK)  # (B, H, T, r): W_UK_hᵀ q_h
    scores_naive = q @ k.transpose(-2, -1)  # (B, H, T, T): against rebuilt keys
    scores_absorbed = q_lat @ c[:, None].transpose(-2, -1)  # (B, H, T, T): against latents
print("query per head:", tuple(q.shape[-1:]), "-> absorbed query per head:", tuple(q_lat.shape[-1:]))
print("same scores (atol=5e-5):", torch.allclose(scores_absorbed, scores_naive, atol=5e-5))

# %% [markdown]
# ### 3.2 Values: move $W^{UV}$ to the output side
#
# The output of head $h$ is a weighted sum of its values, and the weights $a_{h,n}$ are plain
# numbers, so $W^{UV}_h$ can be pulled out of the sum:
#
# $$o_h = \sum_n a_{h,n}\, W^{UV}_h c_n = W^{UV}_h \Big(\sum_n a_{h,n}\, c_n\Big).$$
#
# Attend over the latents themselves, get one $r$-vector per head, and apply $W^{UV}_h$ once per
# query at the end. Put together, absorbed attention is: queries $\tilde q_h$ of size $r$, *one*
# key and value sequence (the latents), shared by all $H$ query heads. That is **multi-query
# attention ([chapter 4](04_mqa_gqa.ipynb)) in latent space**, and we can run it with the same call:
# `enable_gqa=True` with a single key/value head.
#
# One detail matters. The scores are the same numbers as before, so they must be scaled as
# before, by $1/\sqrt{d_h}$. `F.scaled_dot_product_attention` would otherwise scale by one over
# the square root of *its* query size, now $r$. We pass `scale=` explicitly, and also show what
# the default would do.

# %%
mask = causal_mask(12)  # (T, T)
with torch.no_grad():
    y_naive = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
    latents = c[:, None]  # (B, 1, T, r): one key/value "head" for all query heads
    o_lat = F.scaled_dot_product_attention(q_lat, latents, latents, attn_mask=mask,
                                           scale=16**-0.5, enable_gqa=True)  # (B, H, T, r)
    y_absorbed = torch.einsum("bhtr,hvr->bhtv", o_lat, W_UV)  # (B, H, T, hd): W_UV_h o_h
    o_default = F.scaled_dot_product_attention(q_lat, latents, latents, attn_mask=mask,
                                               enable_gqa=True)  # scale 1/sqrt(r): wrong
    y_default = torch.einsum("bhtr,hvr->bhtv", o_default, W_UV)
assert torch.allclose(y_absorbed, y_naive, atol=1e-5)
print("attention over latents == attention over rebuilt keys/values (atol=1e-5):",
      torch.allclose(y_absorbed, y_naive, atol=1e-5))
print(f"with SDPA's default scale 1/sqrt(r) instead: max |difference| = "
      f"{(y_default - y_naive).abs().max():.2f}")

# %% [markdown]
# Absorbed attention never forms a key or a value. Per decoding step it maps each new query into
# latent space ($H \cdot d_h \cdot r$ multiply-adds), reads the cached latents once for all heads,
# and maps each head's latent output back ($H \cdot d_h \cdot r$ again). What still grows with the
# context is attention itself, now on vectors of $r$ numbers instead of $d_h$: $2 H T_k r$
# multiply-adds for the scores and the weighted sum. That is $r / d_h$ times what MHA's attention
# costs (2 here, 4 at DeepSeek-V2's sizes), but $d_h$ times less than rebuilding the keys and
# values ($2 T_k r H d_h$). (The paper goes one step further and multiplies $W^{UV}$ into the
# output projection, once, for good. Exercise 2 does that and asks whether it pays.)
#
# ## 4. RoPE breaks the absorption
#
# ### 4.1 The attempt
#
# DeepSeek-V2, like most recent language models, uses RoPE ([chapter 6](06_positions.ipynb)), which
# rotates queries and keys by an angle proportional to their position: with $R_m$ the rotation for
# position $m$, the key of head $h$ at position $n$ becomes $R_n W^{UK}_h c_n$. Where could the
# rotation go in the absorbed computation? The query's rotation is no problem: rotate $q$ first,
# then absorb. But the key is never formed, and the latent $c_n$ is not a key (it lives in a
# different, $r$-dimensional space), so there is nothing to rotate. The natural attempt, "rotate the
# queries, absorb $W^{UK}$, dot with the latents", simply loses the keys' rotation. We rotate the
# queries and rebuilt keys of version 1 with [chapter 6](06_positions.ipynb)'s functions (head size
# 16, positions `0 .. 11`) and compare:

# %%
with torch.no_grad():
    cos, sin = rope_cos_sin(torch.arange(12), 16)  # (T, hd/2): angles of positions 0 .. 11
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, hd)
    scores_rope = q_rot @ k_rot.transpose(-2, -1)  # (B, H, T, T): what RoPE attention computes
    q_lat_rot = torch.einsum("bhtd,hdr->bhtr", q_rot, W_UK)  # rotate, then absorb
    scores_attempt = q_lat_rot @ c[:, None].transpose(-2, -1)  # (B, H, T, T)
mismatch = (scores_attempt - scores_rope).abs().max().item()
assert mismatch > 0.1, "the absorbed attempt should NOT reproduce RoPE's scores"
print(f"absorbed attempt vs RoPE scores: max |difference| = {mismatch:.2f}")
print("the attempt == rotated queries against UNrotated keys:",
      torch.allclose(scores_attempt, q_rot @ k.transpose(-2, -1), atol=5e-5))

# %% [markdown]
# ### 4.2 Why no matrix can be absorbed
#
# Write the score out. Rotations satisfy $R_m^\top R_n = R_{n-m}$ ([chapter 6](06_positions.ipynb):
# the score depends on the offset only), so
#
# $$ (R_m q_{h,m})^\top (R_n W^{UK}_h c_n) = q_{h,m}^\top \, R_{n-m} \, W^{UK}_h \, c_n .$$
#
# Absorption needs *one* matrix between the query and the latent that is the same for every key.
# Here it is $R_{n-m} W^{UK}_h$: the rotation $R_{n-m}$ sits between the query and $W^{UK}_h$, so
# moving $W^{UK}_h$ to the query side means passing through a matrix that changes with the key's
# position $n$. The only way to do it is a separate absorbed query for each key,
# $\tilde q_{h,m,n} = W^{UK\top}_h R_n^\top R_m q_{h,m}$: $T_k$ vectors of size $r$ per query
# and head, at least as much work as rebuilding the keys (the same for a single query,
# $T_q = 1$; $T_q$ times more for $T_q$ queries). Let us build those per-key
# queries ($R_n^\top$ is the rotation by minus the angle, so `apply_rope` with `-sin`) and check
# that they do reproduce RoPE's scores:

# %%
with torch.no_grad():
    q_per_key = q_rot[:, :, :, None].expand(-1, -1, -1, 12, -1)  # (B, H, T_q, T_k, hd)
    q_per_key = apply_rope(q_per_key, cos, -sin)  # R_nᵀ R_m q: rotated back by each key's angle
    q_lat_per_key = torch.einsum("bhmnd,hdr->bhmnr", q_per_key, W_UK)  # (B, H, T_q, T_k, r)
    scores_per_key = torch.einsum("bhmnr,bnr->bhmn", q_lat_per_key, c)  # (B, H, T_q, T_k)
print("one absorbed query per (query, key) pair:", tuple(q_lat_per_key.shape))
print("reproduces RoPE's scores (atol=5e-5):", torch.allclose(scores_per_key, scores_rope, atol=5e-5))

# %% [markdown]
# The algebra is fine; the bill is not: with RoPE on the rebuilt keys, decoding is back to
# paying for every cached position times $r$ times the head size.
#
# ### 4.3 Decoupled RoPE
#
# DeepSeek-V2's way out is to keep the two jobs apart. The latent part of the keys carries *no*
# position, so it can be absorbed. Position gets its own, small set of coordinates:
#
# - every query head gets $d_R$ extra numbers $q^R_h$ (`qk_rope_head_dim`), rotated by RoPE;
# - every token gets **one** extra key $k^R = \mathrm{RoPE}(W^{KR} x)$ of $d_R$ numbers, shared
#   by all heads (as in MQA), rotated by RoPE and cached as it is, next to the latent.
#
# The score of head $h$ adds the two parts (a concatenation of $[q_h, q^R_h]$ with
# $[W^{UK}_h c, k^R]$, scaled by $1/\sqrt{d_h + d_R}$):
#
# $$ \text{score}_{h}(m, n) = q_{h,m} \cdot (W^{UK}_h c_n) + q^R_{h,m} \cdot k^R_n
#    = \tilde q_{h,m} \cdot c_n + q^R_{h,m} \cdot k^R_n .$$
#
# The first term absorbs as before; the second is ordinary RoPE attention with one shared key of
# size $d_R$, already in the cache. The cache per token and layer grows from $r$ to $r + d_R$
# numbers.
#
# Version 2 below does this, in both modes. Its layout: `wq` makes, per head, $d_h$ position-
# free query numbers then $d_R$ rotary ones; `wkv_a` makes the latent then the shared rotary
# key. Both modes compute the same rotary scores; they differ in the latent part, exactly as in
# section 3. (The scores are written out explicitly here, to show the two terms.)
#
# The picture below puts the two modes side by side, at the sizes version 2 is built with in a
# moment ($d = 64$, 4 heads of $d_h = 16$, $r = 32$, $d_R = 8$): naive on the left, absorbed on
# the right. It is drawn by code (boxes and arrows, no data; reading that code is optional, and
# the text continues under the figure); each arrow names the weight it applies and the sizes it
# maps between, per token.

# %%
# drawing code only (boxes and arrows, no data): skip to the figure below
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

QUERY, LATENT, ROPE, HEADS = "#fde6cc", "#dbe8f6", "#d9f0d3", "#f8d0d0"  # fill colour of each role


def box(ax, x, y, text, color, w=2.6, h=0.9, fontsize=9.5):
    """A rounded box centred at (x, y); returns the midpoints of its top and bottom edges."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                facecolor=color, edgecolor="black", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return (x, y + h / 2 + 0.05), (x, y - h / 2 - 0.05)


def arrow(ax, start, end, label="", dx=0.12, at=0.5):
    """An arrow from start to end; its label sits beside the point a fraction `at` along it,
    moved right by dx (left of the arrow when dx < 0)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=13, lw=1.2,
                                 shrinkA=0, shrinkB=0, color="black"))
    if label:
        x = start[0] + at * (end[0] - start[0]) + dx
        y = start[1] + at * (end[1] - start[1])
        ax.text(x, y, label, fontsize=8.5, va="center", ha="left" if dx >= 0 else "right")


def shared_part(ax):
    """What both modes compute from a token x and cache: queries, latent c, rotary key k^R."""
    _, x_bottom = box(ax, 5, 9.7, "token $x$: 64 numbers", "white", w=3.4, h=0.5)  # (B, T, 64)
    ax.add_patch(Rectangle((3.6, 6.25), 6.3, 2.2, fill=False, linestyle="--",
                           edgecolor="grey"))  # the cache
    ax.text(7.55, 6.62, "cached per token:\n32 + 8 = 40 numbers", ha="center", va="center",
            fontsize=8.5, color="dimgrey", style="italic")
    q_top, q_bottom = box(ax, 1.6, 7.7, "queries, per head:\n$q_h$ (16) | $q^R_h$ (8, RoPE)",
                          QUERY, w=2.9)  # q, q_rope: (B, H, T, 16), (B, H, T, 8)
    c_top, c_bottom = box(ax, 5.0, 7.7, "latent $c$\n32 numbers", LATENT, w=2.2)  # (B, T_k, 32)
    r_top, r_bottom = box(ax, 8.4, 7.7, "$k^R$: 8 numbers, RoPE,\none for all heads", ROPE,
                          w=2.7)  # k_rope: (B, T_k, 8)
    arrow(ax, (4.0, x_bottom[1]), q_top, "wq\n64 → 4 × (16 + 8)", dx=-0.6)
    arrow(ax, x_bottom, c_top, "wkv_a, kv_norm\n64 → 32")
    arrow(ax, (6.2, x_bottom[1]), r_top, "wkv_a, RoPE\n64 → 8", dx=0.45)
    return q_bottom, c_bottom, r_bottom


fig, (left, right) = plt.subplots(1, 2, figsize=(13, 7))
for ax in (left, right):
    ax.set(xlim=(0, 10), ylim=(0, 10.1))
    ax.axis("off")

# Left, naive: every step rebuilds all heads' keys and values from the cached latents.
left.set_title("naive: per-head keys and values rebuilt from $c$")
q_bottom, c_bottom, r_bottom = shared_part(left)
k_top, k_bottom = box(left, 3.3, 4.8, "keys $k_h$: 4 heads × 16,\nfor every cached position",
                      HEADS, w=3.0)  # k: (B, H, T_k, 16)
v_top, v_bottom = box(left, 6.7, 4.8, "values $v_h$: 4 heads × 16,\nfor every cached position",
                      HEADS, w=3.0)  # (B, H, T_k, 16)
arrow(left, (4.6, c_bottom[1]), (3.9, k_top[1]), "k_up ($W^{UK}$)\n32 → 4 × 16", dx=-0.2, at=0.7)
arrow(left, (5.4, c_bottom[1]), (6.1, v_top[1]), "v_up ($W^{UV}$)\n32 → 4 × 16", dx=0.2, at=0.7)
att_top, att_bottom = box(left, 5, 3.0, r"$\mathrm{softmax}((q_h \cdot k_h + q^R_h \cdot k^R)"
                          r"\,/\,\sqrt{16 + 8})\; v_h$", "white", w=9.6, h=0.7, fontsize=11)
arrow(left, q_bottom, (1.6, att_top[1]), "$q_h$, $q^R_h$", at=0.25)
arrow(left, k_bottom, (3.3, att_top[1]))
arrow(left, v_bottom, (6.7, att_top[1]))
arrow(left, (9.2, r_bottom[1]), (9.2, att_top[1]))
o_top, o_bottom = box(left, 5, 1.7, "$o_h$: 4 heads × 16", "white", w=3.4, h=0.5)  # (B, H, T, 16)
arrow(left, att_bottom, o_top)
y_top, _ = box(left, 5, 0.4, "output: 64 numbers", "white", w=3.4, h=0.5)  # (B, T, 64)
arrow(left, o_bottom, y_top, "c_proj: 4 × 16 → 64")
left.text(0.05, 1.05, "k_up and v_up: one weight,\nwkv_b, in the module of\n"
          "section 5: 32 → 4 × (16 + 16)", fontsize=8.5, color="dimgrey", style="italic",
          va="center")

# Right, absorbed: W_UK moves into the queries, W_UV after the weighted sum of latents.
right.set_title("absorbed: attention over the latents $c$ themselves")
q_bottom, c_bottom, r_bottom = shared_part(right)
qt_top, qt_bottom = box(right, 2.0, 4.8, r"$\tilde q_h = W^{UK\top}_h q_h$" "\n4 heads × 32",
                        QUERY)  # q_lat: (B, H, T, 32)
arrow(right, (2.0, q_bottom[1]), qt_top, "k_up moved into\nthe query: 16 → 32", at=0.7)
att_top, att_bottom = box(right, 5, 3.0, r"$\mathrm{softmax}((\tilde q_h \cdot c + q^R_h \cdot "
                          r"k^R)\,/\,\sqrt{16 + 8})\; c$", "white", w=9.6, h=0.7, fontsize=11)
arrow(right, (0.45, q_bottom[1]), (0.45, att_top[1]), "$q^R_h$", at=0.2)
arrow(right, c_bottom, (5.0, att_top[1]), "keys = values = $c$:\none latent 'head' for all 4\n"
      "(MQA); no $k_h$, no $v_h$", at=0.55)
arrow(right, qt_bottom, (2.0, att_top[1]))
arrow(right, (9.2, r_bottom[1]), (9.2, att_top[1]))
o_top, o_bottom = box(right, 5, 1.7, r"$\tilde o_h$: 4 heads × 32 (latent)", "white", w=3.4,
                      h=0.5)  # weights @ c[:, None]: (B, H, T, 32)
arrow(right, att_bottom, o_top)
y_top, _ = box(right, 5, 0.4, "output: 64 numbers", "white", w=3.4, h=0.5)  # (B, T, 64)
arrow(right, o_bottom, y_top, "v_up ($W^{UV}_h$): 32 → 16 per head, then c_proj\n"
      r"(or both at once: $W^O_h W^{UV}_h$, Exercise 2)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Start at the top, which the two modes share. From a token's 64 numbers, `wq` makes each
# head's query: 16 position-free numbers $q_h$ and 8 rotary ones $q^R_h$. `wkv_a` makes, from the
# same token, the latent $c$ (32 numbers, normalised by `kv_norm`) and the rotary key $k^R$
# (8 numbers, rotated, one for all heads). Only these two, inside the dashed frame, are cached:
# 40 numbers per token.
#
# Below the frame the modes part. On the left, `k_up` and `v_up` turn the latents into every
# head's keys and values (the red boxes), for each cached position and at every step: the
# arithmetic that section 2 complained about. On the right there are no red boxes. $W^{UK}_h$
# has moved into the query, which becomes $\tilde q_h$ of 32 numbers (section 3.1); the latents
# serve as the keys and also as the values, one sequence shared by the 4 query heads as in MQA;
# and $W^{UV}_h$ is applied to each head's weighted sum of latents $\tilde o_h$, on its way to
# `c_proj` (section 3.2). The rotary term $q^R_h \cdot k^R$ is the same on both sides, and both
# sides divide by $\sqrt{16 + 8}$, the size of a query head with its rotary part.
#
# The picture is also a map of `DecoupledMLA.forward` below. The top row is its first lines
# (`self.wq`, `self.wkv_a`, `self.kv_norm`, `self.rotate`), and `cache.append(c, k_rope)` fills
# the dashed frame. The rotary scores `q_rope @ k_rope[:, None].transpose(-2, -1)` are computed
# once, before the modes part. The left column is the two `else:` branches (`k` is the `einsum`
# of `c` with `W_UK`; the values, the `einsum` of `c` with `W_UV`); the right column is the two
# `if self.absorb:` branches (`q_lat`, the `einsum` of `q` with `W_UK`, is $\tilde q_h$, and
# the last `einsum` applies `W_UV` to `weights @ c[:, None]`, which is $\tilde o_h$).

# %%
class DecoupledMLA(nn.Module):
    """Version 2: position-free latent keys/values plus decoupled RoPE; naive or absorbed."""

    def __init__(self, n_embd, n_head, rank, rope_dim):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.kv_lora_rank, self.qk_rope_head_dim = rank, rope_dim
        self.wq = nn.Linear(n_embd, n_head * (self.head_dim + rope_dim))  # per head: q | q_rope
        self.wkv_a = nn.Linear(n_embd, rank + rope_dim)  # latent | k_rope (one for all heads)
        self.kv_norm = nn.RMSNorm(rank, eps=1e-6)
        self.k_up = nn.Linear(rank, n_embd, bias=False)  # W_UK
        self.v_up = nn.Linear(rank, n_embd, bias=False)  # W_UV
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.absorb = False

    def rotate(self, t, start):  # t: (..., T, rope_dim) at positions start .. start + T - 1
        cos, sin = rope_cos_sin(torch.arange(start, start + t.shape[-2]), self.qk_rope_head_dim)
        return apply_rope(t, cos, sin)

    def forward(self, x, cache=None):  # x: (B, T, n_embd)
        B, T, d = x.shape
        H, hd, r, dr = self.n_head, self.head_dim, self.kv_lora_rank, self.qk_rope_head_dim
        start = 0 if cache is None else cache.length  # position of x's first token
        q = self.wq(x).view(B, T, H, hd + dr).transpose(1, 2)  # (B, H, T, hd + dr)
        q, q_rope = q.split([hd, dr], dim=-1)  # (B, H, T, hd), (B, H, T, dr)
        c, k_rope = self.wkv_a(x).split([r, dr], dim=-1)  # (B, T, r), (B, T, dr)
        c = self.kv_norm(c)
        q_rope, k_rope = self.rotate(q_rope, start), self.rotate(k_rope, start)
        if cache is not None:
            c, k_rope = cache.append(c, k_rope)  # (B, T_k, r), (B, T_k, dr): all cached
        W_UK, W_UV = self.k_up.weight.view(H, hd, r), self.v_up.weight.view(H, hd, r)
        scores = q_rope @ k_rope[:, None].transpose(-2, -1)  # (B, H, T, T_k): the shared key
        if self.absorb:
            q_lat = torch.einsum("bhtd,hdr->bhtr", q, W_UK)  # (B, H, T, r)
            scores = scores + q_lat @ c[:, None].transpose(-2, -1)
        else:
            k = torch.einsum("btr,hdr->bhtd", c, W_UK)  # (B, H, T_k, hd): rebuilt keys
            scores = scores + q @ k.transpose(-2, -1)
        scores = scores * (hd + dr) ** -0.5
        scores = scores.masked_fill(~causal_mask(T, c.shape[1]), float("-inf"))
        weights = scores.softmax(dim=-1)  # (B, H, T, T_k)
        if self.absorb:
            y = torch.einsum("bhtr,hvr->bhtv", weights @ c[:, None], W_UV)  # (B, H, T, hd)
        else:
            y = weights @ torch.einsum("btr,hvr->bhtv", c, W_UV)  # (B, H, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))  # (B, T, n_embd)


torch.manual_seed(3)
v2 = DecoupledMLA(n_embd=64, n_head=4, rank=32, rope_dim=8)
outputs = {}
with torch.no_grad():
    for absorb in (False, True):
        v2.absorb = absorb
        outputs[absorb, "one pass"] = v2(x)
        cache = LatentCatCache()
        outputs[absorb, "cached"] = torch.cat([v2(x[:, t : t + 1], cache) for t in range(12)], 1)
reference = outputs[False, "one pass"]
for (absorb, how), y in outputs.items():
    mode = "absorbed" if absorb else "naive"
    print(f"{mode:>8}, {how:>8}: equals the naive pass (atol=1e-5):",
          torch.allclose(y, reference, atol=1e-5))
assert all(torch.allclose(y, reference, atol=1e-5) for y in outputs.values())
print("cache per token:", [tuple(p.shape[2:]) for p in cache.parts], "-> 32 + 8 = 40 numbers")

# %% [markdown]
# With position moved out of the latent part, absorption is exact again, and cached decoding
# (queries and keys rotated at their true positions `cache.length + t`) matches the full pass in
# both modes.
#
# DeepSeek-V2 uses $d_h = 128$, $r = 512 = 4 d_h$ and $d_R = 64 = d_h / 2$, with 128 heads and
# $d = 5120$; it also compresses the *queries* through a latent of 1536 numbers (`q_lora_rank`),
# which saves parameters and activations but, queries never being cached, not cache (Exercise 3).
# `attnbook` derives its defaults from the head size in the same ratios.
#
# ## 5. The module: `MultiHeadLatentAttention`
#
# `attnbook.attention.mla` implements version 2 with the full set of DeepSeek-V2's sizes, under
# the name `"mla"`. Its options, given next to the `AttentionConfig`, are `kv_lora_rank` ($r$,
# default $4 d_h$), `qk_rope_head_dim` ($d_R$, default about $d_h/2$), `qk_nope_head_dim` (the
# position-free part of a query/key head, default $d_h$), `v_head_dim` ($d_v$, default $d_h$),
# `q_lora_rank` (0: queries not compressed), `kv_norm` (the latent's RMSNorm, on by default) and
# `absorb`, the starting value of the layer's attribute `absorb`, which switches mode on the same
# weights.
#
# Its weights differ from version 2 in one place only: `wkv_b` holds $W^{UK}$ and $W^{UV}$
# together, per head (for each head, its key rows, then its value rows). The modules carry the
# names of DeepSeek's own code, as version 2's do: `wq` (or `wq_a`, `q_norm`, `wq_b` when the
# queries are compressed), `wkv_a` ($W^{DKV}$ and $W^{KR}$), `kv_norm` and `wkv_b`.

# %%
cfg = AttentionConfig(n_embd=64, n_head=4, positions="rope", block_size=64)
torch.manual_seed(4)
mla = build_attention("mla", cfg, kv_lora_rank=32, qk_rope_head_dim=8).eval()
print(type(mla).__name__, "| r =", mla.kv_lora_rank, "| d_R =", mla.qk_rope_head_dim,
      "| nope =", mla.qk_nope_head_dim, "| v =", mla.v_head_dim, "| absorb =", mla.absorb)
for name, p in mla.named_parameters():
    print(f"{name:>15} {tuple(p.shape)}")

# %% [markdown]
# In absorbed mode the module runs attention as section 3.2 did, one call of
# `F.scaled_dot_product_attention` (through `attnbook`'s `sdpa`) with a single key/value head
# shared by all query heads: per head the query is $[\tilde q_h, q^R_h]$ ($r + d_R$ numbers), and
# every position's key is $[c_n, k^R_n]$. One twist: for the values it passes *the keys again*,
# $[c_n, k^R_n]$, and keeps the first $r$ numbers of each head's output, the weighted sum of
# latents; the last $d_R$ (a weighted sum of rotary keys) are thrown away. The reason is speed:
# PyTorch's fused attention kernels take keys and values of one size only, and with values of $r$
# numbers against keys of $r + d_R$ it falls back to a plain kernel that, on this CPU, makes a
# decoding step several times slower. A few percent of extra arithmetic buys the fast kernel
# (section 7 counts it). `attnbook`'s `sdpa` does pad values narrower than the keys with zeros,
# for the same reason, and the naive mode relies on that. But if the values were the latents
# alone ($r$ wide) and the keys $[c, k^R]$ ($r + d_R$ wide), `sdpa` would pad the values,
# copying every cached latent at each step. Passing the keys again as values avoids the copy:
# the cache already stores each position's $[c_n, k^R_n]$ side by side.
#
# Same weights, both modes: the outputs and the attention weights agree (the weights come from
# the reference path when `need_weights=True`; the naive mode has $H$ key heads, the absorbed mode
# one shared latent "head", yet the weights are the same numbers).

# %%
with torch.no_grad():
    mla.absorb = False
    y_n, w_n = mla(x, need_weights=True)  # (B, T, d), (B, H, T, T)
    mla.absorb = True
    y_a, w_a = mla(x, need_weights=True)
    y_fast = mla(x)  # absorbed, fast path (F.scaled_dot_product_attention)
assert torch.allclose(y_a, y_n, atol=1e-5) and torch.allclose(w_a, w_n, atol=1e-5)
assert torch.allclose(y_fast, y_n, atol=1e-5)
print("outputs agree (atol=1e-5):", torch.allclose(y_a, y_n, atol=1e-5),
      "| weights agree:", torch.allclose(w_a, w_n, atol=1e-5),
      "| fast path agrees:", torch.allclose(y_fast, y_n, atol=1e-5))

# %% [markdown]
# Its cache is a `LatentCache`: preallocated latents `(B, max_len, r)` and rotary keys
# `(B, max_len, d_R)`, with the protocol of [chapter 7](07_kv_cache.ipynb)'s `KVCache` (`append`,
# `length`, `reset`, `bytes_per_token`, `nbytes`).

# %%
latent_cache = mla.new_cache(batch_size=2, max_len=64)
with torch.no_grad():
    mla(x, cache=latent_cache)  # prefill 12 positions
print(type(latent_cache).__name__, "| latent:", tuple(latent_cache.latent.shape),
      "| k_rope:", tuple(latent_cache.k_rope.shape), "| length:", latent_cache.length)
print("bytes per token (one sequence, one layer):", latent_cache.bytes_per_token,
      "= (32 + 8) x 4 bytes")

# %% [markdown]
# ## 6. Generating with a latent cache
#
# As in [chapter 7](07_kv_cache.ipynb), a cache is correct when cached generation reproduces
# generation without it. Our language model is the package's `GPT`
# ([chapter 7](07_kv_cache.ipynb), section 9:
# token embedding, pre-norm blocks of attention built by name plus an MLP, final LayerNorm, LM
# head), with MLA in every block, RoPE, and random weights with PyTorch's default initialisation
# rather than `GPT`'s $N(0, 0.02)$ (chapter 7 says why). We decode greedily without a cache
# (`model.generate(..., use_cache=False)`), then through `LatentCache`s in each mode: each MLA
# layer has an `absorb` switch, and `model.new_caches` gives every block its layer's cache. To
# read the caches afterwards we pass them to `GPT.generate` (`caches=`), which feeds the prompt
# first and then one token per step. The last generated
# token is never fed back (nothing comes after it), so after 16 prompt tokens and 40 new ones the
# caches hold 55 positions, not 56.

# %%
def tiny_gpt(attention):
    """4 blocks of `attention`, 4 heads of 32, RoPE; PyTorch's default initialisation."""
    config = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128,
                       attention=attention, positions="rope", tie_weights=False)
    model = GPT(config).eval()
    for module in model.modules():  # not GPT's N(0, 0.02): see chapter 7, section 9
        if isinstance(module, nn.Linear | nn.Embedding):
            module.reset_parameters()
    return model


torch.manual_seed(5)
lm = tiny_gpt("mla")
blocks = lm.transformer.h  # the 4 blocks; blocks[i].attn is a MultiHeadLatentAttention
attn0 = blocks[0].attn
print(f"GPT with MLA: {len(blocks)} layers, n_embd={lm.config.n_embd}, {lm.config.n_head} "
      f"heads of {lm.config.n_embd // lm.config.n_head}, r={attn0.kv_lora_rank}, "
      f"d_R={attn0.qk_rope_head_dim}")
prompt = torch.randint(0, 256, (2, 16))
out_plain = lm.generate(prompt, 40, temperature=0, use_cache=False)  # recomputes each step
for absorb in (False, True):
    for block in blocks:
        block.attn.absorb = absorb
    caches = lm.new_caches(batch_size=2, max_len=64)  # one LatentCache per block
    out = lm.generate(prompt, 40, temperature=0, caches=caches)
    assert torch.equal(out, out_plain)
    print(f"{'absorbed' if absorb else 'naive':>8} mode, LatentCache: same 40 tokens as without "
          f"a cache: {torch.equal(out, out_plain)}; cached positions: {caches[0].length}")

# %% [markdown]
# Token for token the same, in both modes. How big is the cache as the sequence grows? We feed
# the generated sequence to the MLA model and to the same model built with MHA, through their own
# caches, and read the bytes in use after the prompt and every 8 tokens (all 4 layers, one
# sequence, fp32).

# %%
torch.manual_seed(5)
lm_mha = tiny_gpt("mha")
seq = out_plain[:1]  # (1, 56): one generated sequence
models = {"MLA": lm, "MHA": lm_mha}
grow_caches = {name: m.new_caches(batch_size=1, max_len=64) for name, m in models.items()}
print(f"{'tokens':>6} {'MLA bytes':>10} {'MHA bytes':>10}")
with torch.no_grad():
    for end in (16, 24, 32, 40, 48, 56):
        used = {}
        for name, m in models.items():
            cs = grow_caches[name]
            m(seq[:, cs[0].length : end], caches=cs)  # feed what is not cached yet
            used[name] = sum(c.length * c.bytes_per_token for c in cs)
        print(f"{end:>6} {used['MLA']:>10,} {used['MHA']:>10,}")
per_token = {name: cs[0].bytes_per_token for name, cs in grow_caches.items()}
print("bytes per token and layer:", per_token)

# %% [markdown]
# Both grow linearly with the sequence, MLA at $(r + d_R) \times 4 = (128 + 16) \times 4 = 576$
# bytes per token and layer, MHA at $2 \cdot 4 \cdot 32 \times 4 = 1024$. With only four heads
# the saving is modest, because MLA's cache does not depend on the number of heads at all,
# while MHA's is proportional to it. With the default $r = 4 d_h$ and 4 heads, the latent is
# no smaller than the token itself: $r = 4 \cdot 32 = 128 = d$, and with the rotary key MLA
# caches 144 numbers per token and layer, more than the token's own 128. MLA's ratios pay when
# $H$ is much larger than 4; section 8 shows what that means at 128 heads.
#
# ## 7. Naive or absorbed: which is cheaper when?
#
# Both modes give the same numbers, so the choice is about cost. Count the matrix-multiply FLOPs
# of one layer for $T$ new tokens attending over $T_k$ positions (batch 1, queries not
# compressed, every query-key pair counted as the reference path computes it). Both modes pay
# the projections $2T d\,H(d_h + d_R)$ (queries), $2 T d (r + d_R)$ (latent and rotary key) and
# $2 T H d_v d$ (output). Then:
#
# - **naive**: rebuild keys and values of all $T_k$ positions, $2 T_k r H (d_h + d_v)$; scores
#   $2 H T T_k (d_h + d_R)$; weighted sum of values $2 H T T_k d_v$;
# - **absorbed**: queries into latent space and outputs back, $2 H T r (d_h + d_v)$; scores
#   $2 H T T_k (r + d_R)$; weighted sum $2 H T T_k (r + d_R)$ (the values are the concatenated
#   latents and rotary keys, section 5).
#
# Decoding ($T = 1$) is where they part: for *every cached position*, naive pays
# $r(d_h + d_v)$ multiply-adds per head just to rebuild its key and value, absorbed pays
# $2(r + d_R)$ per head, scores and weighted sum together. In a full pass over a sequence (prefill or training,
# $T = T_k$) the rebuilding and the absorbing cost the same, $2 T r H (d_h + d_v)$, and what is
# left is the attention itself, on vectors of size $d_h + d_R$ (naive) or $r + d_R$ (absorbed):
# with $r = 4 d_h$, naive is cheaper.

# %%
def mla_flops(d, H, nope, rope, v, r, T, T_k, absorb):
    """Matrix-multiply FLOPs of one MLA layer (batch 1, q_lora_rank=0), T new tokens, T_k keys."""
    flops = 2 * T * d * H * (nope + rope) + 2 * T * d * (r + rope) + 2 * T * H * v * d
    if absorb:
        flops += 2 * H * T * r * (nope + v)  # W_UK into the queries, W_UV on the outputs
        flops += 2 * 2 * H * T * T_k * (r + rope)  # scores, sum of latents (and rotary keys)
    else:
        flops += 2 * T_k * r * H * (nope + v)  # rebuild every position's keys and values
        flops += 2 * H * T * T_k * (nope + rope) + 2 * H * T * T_k * v  # scores, sum of values
    return flops


def counted_flops(layer, T, T_k):
    """FLOPs counted by PyTorch for T new tokens on a cache holding T_k - T positions."""
    cache = layer.new_cache(batch_size=1, max_len=T_k)
    x = torch.randn(1, T_k, layer.config.n_embd)
    with torch.no_grad():
        if T_k > T:
            layer(x[:, : T_k - T], cache=cache)
        with FlopCounterMode(display=False) as counter:
            layer(x[:, T_k - T :], cache=cache)
    return counter.get_total_flops()


torch.manual_seed(6)
ref_layer = build_attention("mla", AttentionConfig(n_embd=128, n_head=4, positions="rope",
                                                   block_size=64, impl="reference")).eval()
sizes = dict(d=128, H=4, nope=32, rope=16, v=32, r=128)  # the sizes of section 6's MLA layers
for label, T, T_k in (("decode step", 1, 48), ("prefill", 48, 48)):
    for absorb in (False, True):
        ref_layer.absorb = absorb
        counted = counted_flops(ref_layer, T, T_k)
        assert counted == mla_flops(**sizes, T=T, T_k=T_k, absorb=absorb)
        print(f"{label:>11}, T={T:>2}, T_k={T_k}, {'absorbed' if absorb else 'naive':>8}: "
              f"{counted:>10,} FLOPs (formula: exact)")

# %% [markdown]
# The formula matches PyTorch's own count exactly. Now at a more realistic size: DeepSeek-V2's
# per-head sizes ($d_h = d_v = 128$, $r = 512$, $d_R = 64$) with 4 heads, $d = 512$ (the module's
# defaults for this shape), from short to long contexts.

# %%
big = dict(d=512, H=4, nope=128, rope=64, v=128, r=512)
lengths = [2**i for i in range(6, 15)]  # 64 .. 16384
decode = {a: [mla_flops(**big, T=1, T_k=n, absorb=a) for n in lengths] for a in (False, True)}
prefill = {a: [mla_flops(**big, T=n, T_k=n, absorb=a) for n in lengths] for a in (False, True)}

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, data, title, xlabel in (
    (axes[0], decode, "one decoding step (1 new token)", "cached positions T_k"),
    (axes[1], prefill, "a full pass (prefill, training)", "sequence length T"),
):
    ax.loglog(lengths, data[False], "o-", color="C3", label="naive: rebuild keys and values")
    ax.loglog(lengths, data[True], "o-", color="C0", label="absorbed: attend over latents")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("matrix-multiply FLOPs, one layer")
    ax.legend()
fig.suptitle("MLA layer, d=512, 4 heads of 128, r=512, d_R=64")
fig.tight_layout()
plt.show()
for i in (0, len(lengths) - 1):
    print(f"T_k = T = {lengths[i]:>5}: naive / absorbed = {decode[False][i] / decode[True][i]:.1f} "
          f"(decode step), {prefill[False][i] / prefill[True][i]:.2f} (full pass; absorbed costs "
          f"{prefill[True][i] / prefill[False][i]:.2f} times naive)")

# %% [markdown]
# For a decoding step, absorbed is almost 20 times cheaper (19.5) with 64 cached positions and
# more than 100 times with 16k, where the cost per cached position dominates: per head, naive pays
# $r(d_h + d_v) + d_h + d_R + d_v = 131{,}392$ multiply-adds for it, absorbed
# $2(r + d_R) = 1152$, a ratio of 114, which the printed 111.9 approaches. For a full pass, naive
# is cheaper, increasingly so as attention comes to dominate: the printed 0.29 at 16k means
# absorbed costs 3.43 times naive, approaching the limit
# $2(r + d_R)/(d_h + d_R + d_v) = 1152/320 = 3.6$ that the attention terms alone give. So a real implementation trains and
# prefills in the naive form and decodes in the absorbed form, with the same weights. Counting
# FLOPs is not the whole story: a decoding step is limited by memory traffic more than by
# arithmetic, and there absorbed wins twice, since it reads each cached latent once for all
# heads instead of materialising $H$ keys and values per position.
#
# Now the clock. We time one decoding step with 1023 cached positions (so $T_k = 1024$), and a
# prefill of 512 tokens, with the module in each mode at the size of the figure, on one thread,
# fastest of 5 runs (3 for the prefill), and print next to the measured ratios the FLOP ratios of
# `mla_flops` at exactly these sizes. Your timings will differ; the cell asserts only the
# direction, loosely.

# %% tags=["nbval-ignore-output"]
def fastest_ms(fn, reps=5):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, 1000 * (time.perf_counter() - t0))
    return best


torch.manual_seed(7)
timed = build_attention("mla", AttentionConfig(n_embd=512, n_head=4, positions="rope",
                                               block_size=1024)).eval()
x_long = torch.randn(1, 1024, 512)
timed_cache = timed.new_cache(batch_size=1, max_len=1024)
with torch.no_grad():
    timed(x_long[:, :1023], cache=timed_cache)  # 1023 cached positions


@torch.no_grad()
def decode_step():
    timed_cache.length = 1023  # rewind (chapter 7), then feed token 1024
    timed(x_long[:, 1023:], cache=timed_cache)


@torch.no_grad()
def prefill_512():
    timed(x_long[:, :512])


ms = {}
for absorb in (False, True):
    timed.absorb = absorb
    decode_step()  # warm-up
    prefill_512()
    ms[absorb] = fastest_ms(decode_step), fastest_ms(prefill_512, reps=3)
for absorb in (False, True):
    print(f"{'absorbed' if absorb else 'naive':>8}: decode step {ms[absorb][0]:.2f} ms, "
          f"prefill of 512 tokens {ms[absorb][1]:.1f} ms")
flop_ratio = {  # naive / absorbed, counted at the sizes timed
    "decode": mla_flops(**big, T=1, T_k=1024, absorb=False) / mla_flops(**big, T=1, T_k=1024,
                                                                        absorb=True),
    "prefill": mla_flops(**big, T=512, T_k=512, absorb=False) / mla_flops(**big, T=512, T_k=512,
                                                                         absorb=True),
}
time_ratio = {"decode": ms[False][0] / ms[True][0], "prefill": ms[False][1] / ms[True][1]}
for what in ("decode", "prefill"):
    print(f"naive / absorbed, {what:>7}: measured {time_ratio[what]:5.2f}, "
          f"FLOPs {flop_ratio[what]:5.2f}")
assert ms[True][0] < 0.7 * ms[False][0], "absorbed decoding should be clearly faster"
assert ms[False][1] < ms[True][1], "naive should be faster for a full pass"
assert time_ratio["decode"] < flop_ratio["decode"], "fixed costs shrink the decoding gain"

# %% [markdown]
# The FLOPs say naive / absorbed = 87.05 for this decoding step; the measured ratio, printed
# above, is far smaller (and changes from run to run): a decoding step of one small layer also pays fixed
# costs (Python, operator dispatch, small matrix products far from the processor's peak) that
# absorbing does not remove. For the prefill the FLOPs say 0.56, absorbed doing nearly twice the
# arithmetic; the measured ratio lands in the same region (printed above), since both modes are
# then large matrix products, though kernels differ in how close they get to peak. The direction
# is the one the count predicted: absorbed for decoding, naive for full passes.
#
# ## 8. The cache per token: MLA against MHA, GQA and MQA
#
# First the tiny model of section 6 (4 heads of 32, fp32), each variant's cache object made by
# the layer itself with `new_cache`; `bytes_per_token` is one sequence and one layer.

# %%
small = dict(n_embd=128, n_head=4, block_size=128, positions="rope")
variants = [("MHA", "mha", {}, "2 H d_h"), ("GQA-2", "gqa", {"n_kv_head": 2}, "2 G d_h"),
            ("MQA", "mqa", {}, "2 d_h"), ("MLA", "mla", {}, "r + d_R")]
print(f"{'variant':>7} {'cache':>11} {'formula':>8} {'numbers':>7} {'bytes':>5}")
for label, name, extra, formula in variants:
    layer_cache = build_attention(name, AttentionConfig(**small), **extra).new_cache(1, 128)
    n_numbers = layer_cache.bytes_per_token // 4  # fp32
    print(f"{label:>7} {type(layer_cache).__name__:>11} {formula:>8} {n_numbers:>7} "
          f"{layer_cache.bytes_per_token:>5}")

# %% [markdown]
# At this size MLA's 144 numbers sit between GQA with 2 key/value heads (128) and MHA (256),
# and its latent alone ($r = 128$) is as large as the token ($d = 128$).
# MLA's cache is $r + d_R = 4.5\,d_h$ numbers whatever the number of heads, which is the cache of
# GQA with 2.25 key/value heads (the DeepSeek-V2 paper makes the same comparison); MHA's is
# $2 H d_h$. The more heads, the larger the saving.
#
# For a realistic picture take DeepSeek-V2's shape: 60 layers, 128 heads of 128, $d = 5120$,
# $r = 512$, $d_R = 64$, `q_lora_rank` 1536, cache in bf16. We build the real MLA layer on
# PyTorch's `meta` device (shapes and dtypes, no storage, so nothing is allocated) and let it make
# its cache; for MHA, GQA and MQA with 128-wide heads we make `KVCache`s directly, as
# [chapter 7](07_kv_cache.ipynb) did.

# %%
n_layer_ds, ctx = 60, 32 * 1024
ds_cfg = AttentionConfig(n_embd=5120, n_head=128, block_size=ctx, positions="rope", bias=False)
ds_sizes = dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                v_head_dim=128)
with torch.device("meta"):
    ds_mla = build_attention("mla", ds_cfg, **ds_sizes)
per_layer = {}  # bytes per token, one layer
for label, n_kv_head in (("MHA", 128), ("GQA-8", 8), ("GQA-2", 2), ("MQA", 1)):
    kv_cache = KVCache(1, n_kv_head, 128, ctx, device="meta", dtype=torch.bfloat16)
    per_layer[label] = kv_cache.bytes_per_token
per_layer["MLA"] = ds_mla.new_cache(1, ctx, dtype=torch.bfloat16).bytes_per_token
print(f"{'variant':>7} {'numbers/layer':>13} {'KiB/token':>9} {'GiB at 32k tokens':>17}")
for label, b in per_layer.items():
    total = n_layer_ds * b  # all layers, one token
    print(f"{label:>7} {b // 2:>13,} {total / 1024:>9,.1f} {ctx * total / 2**30:>17,.2f}")
ratio = per_layer["MHA"] / per_layer["MLA"]
print(f"MHA / MLA = {ratio:.1f}; MLA = GQA with {per_layer['MLA'] / (2 * 128 * 2):.2f} kv heads")

# %%
names = {"MHA": "MHA\n128 kv heads", "GQA-8": "GQA\n8 kv heads", "GQA-2": "GQA\n2 kv heads",
         "MQA": "MQA\n1 kv head", "MLA": "MLA\nr=512, d_R=64"}
kib = [n_layer_ds * b / 1024 for b in per_layer.values()]
fig, ax = plt.subplots(figsize=(8, 4))
bars = ax.bar([names[k] for k in per_layer], kib, color=["C3", "C1", "C1", "C2", "C0"])
ax.set_yscale("log")
ax.set_ylim(10, 2e4)
for bar, value in zip(bars, kib, strict=True):
    ax.text(bar.get_x() + bar.get_width() / 2, value * 1.15, f"{value:,.1f}", ha="center")
ax.set_ylabel("KiB per token (all 60 layers, bf16)")
ax.set_title("KV cache per token, DeepSeek-V2's shape (128 heads of 128)")
plt.show()

# %% [markdown]
# Against MHA of the same shape, MLA's cache is 57 times smaller: 67.5 KiB per token instead of
# 3.75 MiB, so a 32k-token sequence needs about 2 GiB of cache instead of 120 GiB. It is a little
# larger than GQA with 2 key/value heads and about twice MQA's. As for quality, the DeepSeek-V2
# paper ranks MHA above GQA and MQA, and reports that MLA, with this small cache, did better than
# MHA in its comparisons. A reason to expect MLA to do well: every head keeps keys and values of
# its own, and the compression is learned, instead of forcing heads to share.

# %% [markdown]
# ## Check against the module
#
# Finally, version 2 and `MultiHeadLatentAttention` must be the same function. We copy version 2's
# weights into the module built with the same sizes: `wq`, `wkv_a`, `kv_norm` and `c_proj`
# have the same layout; `wkv_b` is version 2's `k_up` and `v_up` interleaved per head (head $h$'s
# 16 key rows, then its 16 value rows). Then we compare one full pass in both modes, and
# token-by-token decoding with the module's `LatentCache` against version 2 with our
# `LatentCatCache`, including the cached latents and rotary keys themselves.

# %%
module = build_attention("mla", cfg, kv_lora_rank=32, qk_rope_head_dim=8).eval()  # 4 heads, RoPE
with torch.no_grad():
    for name in ("wq", "wkv_a", "kv_norm", "c_proj"):
        getattr(module, name).load_state_dict(getattr(v2, name).state_dict())
    per_head = torch.cat([v2.k_up.weight.view(4, 16, 32), v2.v_up.weight.view(4, 16, 32)], dim=1)
    module.wkv_b.weight.copy_(per_head.reshape(4 * 32, 32))  # (H * (nope + v), r)

    checks = []
    for absorb in (False, True):
        v2.absorb = module.absorb = absorb
        checks.append(torch.allclose(module(x), v2(x), atol=1e-5))
        mine, theirs = LatentCatCache(), module.new_cache(batch_size=2, max_len=64)
        for t in range(12):
            step = x[:, t : t + 1]
            checks.append(torch.allclose(module(step, cache=theirs), v2(step, mine), atol=1e-5))
        checks.append(torch.allclose(theirs.latent[:, :12], mine.parts[0], atol=1e-5))
        checks.append(torch.allclose(theirs.k_rope[:, :12], mine.parts[1], atol=1e-5))
assert all(checks)
print(f"MultiHeadLatentAttention == DecoupledMLA, naive and absorbed, one pass and 12 cached "
      f"steps (atol=1e-5), same cache contents (atol=1e-5): {len(checks)} checks OK")

# %% [markdown]
# ## Summary
#
# - MLA compresses each token into a latent $c$ of $r$ numbers (`kv_lora_rank`), shared by all
#   heads, and rebuilds every head's key and value with up-projections $W^{UK}_h$, $W^{UV}_h$.
#   Only the latent is cached, so the cache does not grow with the number of heads.
# - **Absorption**: $q_h \cdot (W^{UK}_h c) = (W^{UK\top}_h q_h) \cdot c$, and $W^{UV}_h$ can be
#   applied after the weighted sum. Attention then runs over the latents themselves, like
#   multi-query attention in an $r$-dimensional space, with the scale of the original head size.
# - **RoPE on the rebuilt keys breaks absorption**: the rotation $R_{n-m}$ sits between the
#   query and $W^{UK}_h$, so moving $W^{UK}_h$ to the query side means passing through a matrix
#   that changes with the key's position $n$. Decoupled RoPE gives position its
#   own $d_R$ rotated query numbers per head and one shared rotated key per token, cached next to
#   the latent: $r + d_R$ numbers per token and layer.
# - Both modes give the same outputs. Decoding is far cheaper absorbed (no keys or values are
#   rebuilt); full passes (training, prefill) are cheaper naive, because attention over size-$r$
#   vectors costs more than over size-$d_h$ ones.
# - With DeepSeek-V2's shape the cache is 57 times smaller than MHA's, about the size of GQA with
#   2.25 key/value heads.

# %% [markdown]
# ## Further reading
#
# - DeepSeek-AI, *DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language
#   Model* (2024), section 2.1: multi-head latent attention and decoupled RoPE.
# - DeepSeek-AI, *DeepSeek-V3 Technical Report* (2024): MLA at scale, with the same sizes.
# - Ainslie et al. (2023), GQA: the cache-size baseline MLA is compared with.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/13_latent_attention_solutions.ipynb`](solutions/13_latent_attention_solutions.ipynb).
# Predict first, then check with code.
#
# 1. **Why one shared rotary key?** Every head has rotary query numbers of its own, but each token
#    has a single rotary key $k^R$, shared by all heads. Suppose instead every head had its own
#    rotary key of $d_R$ numbers. At DeepSeek-V2's shape (60 layers, 128 heads of 128, $r = 512$,
#    $d_R = 64$, bf16 cache), predict the cache per token and layer of this variant, and compare
#    it with MLA's and MHA's. How many 32k-token sequences fit in 80 GB of cache memory with each
#    of the three? Check with `LatentCache` (its rotary part can have any width) and `KVCache` on
#    the `meta` device. Would absorption still work?
# 2. **Fold $W^{UV}$ into the output projection.** The output projection `c_proj` applies a
#    block $W^O_h$ of shape `(d, d_v)` to each head's output, so $W^O_h W^{UV}_h$, of shape
#    `(d, r)`, can be computed once. Build this folded projection for a small module, feed it the
#    per-head latent outputs of absorbed attention, and check it gives the module's output. Then
#    count parameters and multiply-adds per token with and without folding, for DeepSeek-V2's
#    sizes: does folding pay?
# 3. **What `q_lora_rank` saves, and what it does not.** Build DeepSeek-V2's layer (on `meta`)
#    with `q_lora_rank=1536` and with `q_lora_rank=0`. Predict, then count, the parameters of the
#    query path in each, and compare their caches. Why can compressing the queries never shrink
#    the cache?
# 4. **How low-rank are a trained layer's keys and values?** Train a one-layer MHA model briefly
#    on a copying task, collect the keys and values (all heads side by side) of a batch, and plot
#    the relative error of the best rank-$r$ approximation (SVD) against $r$, for the trained
#    layer and for its initialisation. Then replace the layer's keys and values by their rank-$r$
#    projection (a latent of $r$ numbers) and measure the loss as $r$ shrinks.
# 5. **Chunks: where does absorbing stop paying?** Chunked prefill ([chapter 7](07_kv_cache.ipynb))
#    feeds $T$ new tokens at once onto a cache of $T_k \gg T$ positions. With `mla_flops`, find the
#    chunk size $T^*$ above which naive is cheaper, at the $d = 512$ sizes of section 7 (`big`:
#    4 heads of 128, $r = 512$, $d_R = 64$); derive an approximate
#    formula for $T^*$ in terms of $r$, $d_h$, $d_v$ and $d_R$, and check the FLOP count at one
#    chunk size with `FlopCounterMode`.
