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
# # Chapter 8 — FlashAttention: solutions
#
# Worked solutions to the exercises of `chapters/08_flash_attention.ipynb`. Each one states the
# reasoning first, then checks it with code and an `assert`. The chapter's helpers we need are
# repeated here, condensed (a notebook cannot import another). One thread, as in the chapter.

# %%
import math
import time

import torch

from attnbook.attention.flash import flash_attention, merge_partial

torch.manual_seed(0)
torch.set_num_threads(1)


def qkv(T, D=16, H=1, T_k=None, dtype=torch.float64, seed=0):
    """Random q (1, H, T, D) and k, v (1, H, T_k, D)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, H, T, D), (1, H, T_k or T, D), (1, H, T_k or T, D)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


# %% [markdown]
# ## Exercise 1 — any order
#
# After reading a set $A$ of scores, the online softmax holds $m_A = \max_{j \in A} s_j$ and
# $\ell_A = \sum_{j \in A} e^{s_j - m_A}$, whatever order it read them in: by induction, if that
# holds before a chunk $c$ arrives, the update gives $m' = \max(m_A, m_c) = m_{A \cup c}$ and
# $\ell' = \ell_A e^{m_A - m'} + \sum_{j \in c} e^{s_j - m'} = \sum_{j \in A \cup c} e^{s_j - m'}$.
# Equivalently: combining two states $(m_1, \ell_1)$ and $(m_2, \ell_2)$ gives
# $(\max(m_1, m_2),\ \ell_1 e^{m_1 - m'} + \ell_2 e^{m_2 - m'})$, which is symmetric and
# associative. The accumulator $a = \sum_j e^{s_j - m} v_j$ is rescaled by the same factor, so
# it too depends only on the set read. (In floating point the last bits depend on the order,
# as for any sum.) The chapter's `tiled_attention` with the key tiles in a given order:

# %%
def tiled_attention(q, k, v, block=16, order=None):
    """softmax(q kᵀ / sqrt(D)) v for q (T_q, D), k, v (T_k, ·), key tiles visited in `order`."""
    scale = q.shape[-1] ** -0.5
    starts = list(range(0, k.shape[0], block))
    m = torch.full((q.shape[0],), -math.inf, dtype=q.dtype)
    ell = torch.zeros(q.shape[0], dtype=q.dtype)
    acc = torch.zeros(q.shape[0], v.shape[-1], dtype=q.dtype)
    for i in order if order is not None else range(len(starts)):
        k0 = starts[i]
        s = q @ k[k0 : k0 + block].T * scale  # (T_q, bk)
        m_new = torch.maximum(m, s.amax(dim=1))
        rescale = torch.exp(m - m_new)
        p = torch.exp(s - m_new[:, None])
        ell = ell * rescale + p.sum(dim=1)
        acc = acc * rescale[:, None] + p @ v[k0 : k0 + block]
        m = m_new
    return acc / ell[:, None]


q, k, v = (t[0, 0] for t in qkv(40, T_k=100))
explicit = torch.softmax(q @ k.T / 4, dim=-1) @ v
n_tiles = -(-100 // 16)  # 7
orders = {"front to back": list(range(n_tiles)), "back to front": list(range(n_tiles))[::-1],
          "shuffled": torch.randperm(n_tiles, generator=torch.Generator().manual_seed(2)).tolist()}
for name, order in orders.items():
    same = torch.allclose(tiled_attention(q, k, v, order=order), explicit, atol=1e-12)
    print(f"key tiles {name:>13} {order}: equals the explicit math: {same}")
    assert same

# %% [markdown]
# This is what lets split-KV decoding (and ring attention) read the keys in any split and any
# order. (The backward pass is order-free for a simpler reason: with the final log-sum-exp
# saved, each tile's probabilities need nothing from the other tiles.)
#
# ## Exercise 2 — the tile size
#
# **Prediction.** A square tile of $b$ positions costs one $(b, D) @ (D, b)$ product plus a
# dozen elementwise calls. At $T = 2048$ the causal forward pass visits $n(n+1)/2$ tiles with
# $n = T/b$: 8256 tiles of 16, but only 10 of 512. Small tiles mean many Python calls, each with
# a fixed overhead of microseconds; large tiles mean few calls, but each tile's temporaries
# ($b^2$ scores, probabilities and their gradients) grow, and the diagonal tiles, computed in
# full and half masked, waste more: with $b = 512$ the 4 diagonal tiles hold 2 of the 10 tiles'
# worth of work that is thrown away. The optimum sits where per-call overhead is small compared
# with the arithmetic and the tile still fits the CPU's caches.

# %% tags=["nbval-ignore-output"]
def fwd_bwd_ms(fn, q, k, v, repeats=1):
    best = math.inf
    for i in range(repeats + 1):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        fn(q, k, v).sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best * 1e3


T = 2048
q, k, v = (t.float().requires_grad_() for t in qkv(T, D=64))
ms = {}
print(f"{'tile':>5} {'visited':>8} {'tile of scores':>15} {'fwd+bwd ms':>11}")
for b in (16, 32, 64, 128, 256, 512):
    n = T // b
    ms[b] = fwd_bwd_ms(lambda q, k, v, b=b: flash_attention(q, k, v, block_q=b, block_k=b), q, k, v)
    print(f"{b:>5} {n * (n + 1) // 2:>8} {b * b * 4 / 1024:>12.0f} KiB {ms[b]:>11.1f}")
best = min(ms, key=ms.get)
print("fastest tile on this machine:", best)
assert ms[16] > ms[best]  # the smallest tiles pay the most overhead

# %% [markdown]
# On the machine this was run on, 16-position tiles were the slowest by far (eight thousand
# tiles, each a dozen PyTorch calls) and the middle sizes the fastest; the largest tiles lost a
# little again. The numbers differ between machines; the shape — steep on the left, flat or
# slowly rising on the right — is the trade-off. GPU kernels choose tiles so that one tile's Q,
# K, V and accumulators fit the on-chip memory (FlashAttention-2 uses 64 to 128 positions for
# head size 128).
#
# ## Exercise 3 — three partial attentions
#
# **Reasoning.** Piece $c$ returns $O_c$ (its softmax over its own keys) and $L_c$, the
# log-sum-exp of its scores. The softmax over all keys divides by $\sum_c e^{L_c}$, so piece
# $c$'s true share is $w_c = e^{L_c} / \sum_{c'} e^{L_{c'}}$: that is the weight `merge_partial`
# gives. An empty piece has $L_c = -\infty$, weight 0, and its zero output does not matter.
# Averaging gives every piece a third whatever its scores; weighting by the number of keys is
# right only if every key had the same score. Both are wrong in general.

# %%
q, k, v = qkv(1, T_k=90)  # one decoding step against a cache of 90 positions
whole, whole_lse = flash_attention(q, k, v, causal=False, return_lse=True)
pieces = [(0, 20), (20, 20), (20, 90)]  # 20 keys, none (a device holding nothing yet), 70 keys
parts = [flash_attention(q, k[:, :, a:b], v[:, :, a:b], causal=False, return_lse=True)
         for a, b in pieces]
print("the empty piece: output all zero:", bool((parts[1][0] == 0).all()),
      "| log-sum-exp:", parts[1][1].flatten().tolist())
merged, merged_lse = merge_partial([o for o, _ in parts], [lse for _, lse in parts])
print("merged == one pass over 90 keys:", torch.allclose(merged, whole, atol=1e-12))
averaged = sum(o for o, _ in parts) / 3
by_count = sum(o * (b - a) / 90 for (o, _), (a, b) in zip(parts, pieces, strict=True))
for name, wrong in (("the average of the three", averaged), ("weighted by key counts", by_count)):
    print(f"{name:>24}: largest error {(wrong - whole).abs().max().item():.3f}")
assert torch.allclose(merged, whole, atol=1e-12)
assert not torch.allclose(averaged, whole, atol=1e-3)
assert not torch.allclose(by_count, whole, atol=1e-3)

# %% [markdown]
# ## Exercise 4 — ALiBi and a soft cap inside the tiles
#
# Both change a score as a function of the score and the positions, so they go where the tile
# of scores is made, before the running maximum: ALiBi subtracts $\text{slope}_h \cdot (i - j)$
# ([chapter 6](../06_positions.ipynb)), the soft cap replaces $s$ by $c \tanh(s / c)$ (Gemma 2 uses
# $c = 50$ in attention). The online softmax does not care what the scores are. Below, the chapter's
# `flash_forward` for one group of heads, with a
# `score_mod(s, positions of the queries, of the keys)` hook.

# %%
def flash_forward(q, k, v, score_mod=None, block=16):
    """Causal tiled attention of q, k, v (B, H, T, D), with score_mod applied to each tile."""
    T, scale = q.shape[2], q.shape[-1] ** -0.5
    out = torch.zeros_like(v)
    for q0 in range(0, T, block):
        q1 = min(q0 + block, T)
        qi = q[:, :, q0:q1]
        m = q.new_full(qi.shape[:-1], -math.inf)
        ell = q.new_zeros(qi.shape[:-1])
        acc = torch.zeros_like(qi[..., : v.shape[-1]])
        for k0 in range(0, q1, block):  # causal: key tiles after the query tile are skipped
            k1 = min(k0 + block, T)
            s = qi @ k[:, :, k0:k1].transpose(-2, -1) * scale  # (B, H, bq, bk)
            q_pos, k_pos = torch.arange(q0, q1)[:, None], torch.arange(k0, k1)[None, :]
            if score_mod is not None:
                s = score_mod(s, q_pos, k_pos)
            s = s.masked_fill(k_pos > q_pos, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1))
            rescale, p = torch.exp(m - m_new), torch.exp(s - m_new[..., None])
            ell = ell * rescale + p.sum(dim=-1)
            acc = acc * rescale[..., None] + p @ v[:, :, k0:k1]
            m = m_new
        out[:, :, q0:q1] = acc / ell[..., None]
    return out


H, T, cap = 4, 70, 5.0
slopes = torch.tensor([2.0 ** -(8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
q, k, v = qkv(T, H=H)
q = q * 3  # larger scores, so that the cap of 5 bites


def alibi(s, q_pos, k_pos):
    return s - slopes[:, None, None] * (q_pos - k_pos)  # (B, H, bq, bk)


def softcap(s, q_pos, k_pos):
    return cap * torch.tanh(s / cap)


causal = torch.ones(T, T, dtype=torch.bool).tril()
distance = torch.arange(T)[:, None] - torch.arange(T)
scores = q @ k.transpose(-2, -1) / 4  # (1, H, T, T), the explicit math's scores
for name, mod, explicit_scores in (
    ("ALiBi", alibi, scores - slopes[:, None, None] * distance),
    ("soft cap 5", softcap, cap * torch.tanh(scores / cap)),
):
    expected = torch.softmax(explicit_scores.masked_fill(~causal, -math.inf), dim=-1) @ v
    same = torch.allclose(flash_forward(q, k, v, mod), expected, atol=1e-12)
    print(f"{name:>10} inside the tiles == the explicit math: {same}")
    assert same
print("the cap bites: largest score", round(scores.max().item(), 1), "-> capped below", cap)
assert scores.max() > cap

# %% [markdown]
# Both keep the causal skipping: which keys a query may see is decided by the mask, and neither
# change turns a forbidden key into a visible one. ALiBi invites one more shortcut: its bias
# falls by $\text{slope}_h$ per position, so keys far enough back get weights below any
# threshold, and a kernel could skip those tiles like a window's. That is an *approximation*
# (the weights are tiny, not zero), and for heads with small slopes the cut-off distance is
# long; the soft cap, which bounds every score to $(-c, c)$, allows no such cut. (SDPA's fused
# kernel takes ALiBi as a float mask, [chapter 6](../06_positions.ipynb), and computes every tile.)
