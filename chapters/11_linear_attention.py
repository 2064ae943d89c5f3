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
# # Chapter 11 — Linear attention: the kernel trick, recurrent and chunked forms
#
# Causal softmax attention over $T$ tokens fills a $T \times T$ triangle of scores, and during
# generation it keeps a KV cache that grows by one key and one value per token
# ([chapter 7](07_kv_cache.ipynb)). Chapters 9 and 10 cut the cost by letting each query see *fewer*
# keys. This chapter keeps every key but changes the arithmetic: **linear attention** (Katharopoulos
# et al. 2020, "Transformers are RNNs") replaces the exponential similarity of softmax by a dot
# product of *feature vectors*, $\phi(q) \cdot \phi(k)$. That one change lets us reorder a matrix
# product, and the reordered product never forms the $T \times T$ matrix at all. Its cost grows
# linearly with $T$, and during generation the whole past is summarised by a fixed-size **state**:
# the model becomes a recurrent network.
#
# There is a price, and we measure it too. A fixed-size state cannot remember an unbounded
# number of things exactly, and a small associative-recall probe shows where it breaks.
#
# **Learning goals**
#
# - Write softmax attention as "weights from a similarity, normalised", and see what changes when
#   the similarity is a dot product of positive features $\phi(q)\cdot\phi(k)$.
# - Use associativity, $(\phi(Q)\phi(K)^\top)V = \phi(Q)(\phi(K)^\top V)$, to turn $O(T^2)$ work
#   into $O(T)$; count the FLOPs of both orders.
# - Handle the causal mask with prefix sums: the state $S_t = \sum_{s \le t}\phi(k_s)v_s^\top$
#   and the normaliser $z_t = \sum_{s\le t}\phi(k_s)$.
# - Build the three forms — quadratic with a mask, recurrent, chunked — check that they agree
#   with each other and with `attnbook.attention.linear`, and say what each one is good for.
# - Explain how the module combines RoPE with linear attention, and why its normaliser keeps the
#   unrotated features.
# - Generate with the recurrent state and get the same tokens as full recomputation; compare the
#   state's bytes with a KV cache's as the sequence grows.
# - Show with a recall probe why a $d \times d_v$ state cannot store more than $d$ associations
#   exactly, while softmax attention over a cache can store many more.
# - Measure forward+backward time against $T$ for chunked linear attention and causal SDPA, and
#   find the crossover.

# %% [markdown]
# ## Setup
#
# Seeds everywhere; compared outputs are shapes, booleans, integers and rounded numbers. Timings
# vary by machine and are not checked.
#
# Every tensor in this chapter is small, and a second CPU thread buys little for small matrix
# products; on a machine that other programs share, two threads waiting for each other can even
# be many times *slower*. So, as in [chapter 4](04_mqa_gqa.ipynb), the whole chapter runs on one
# thread. That also makes the timings of section 8 steadier.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from attnbook.attention import (
    AttentionConfig,
    build_attention,
    causal_mask,
    sdpa,
    sdpa_reference,
)
from attnbook.attention.linear import (
    LinearAttention,
    LinearAttentionCache,
    elu_feature_map,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
)
from attnbook.kv_cache import KVCache
from attnbook.model import GPT, GPTConfig
from attnbook.positions import RotaryEmbedding

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. Attention as "weights from a similarity, normalised"
#
# [Chapter 2](02_scaled_dot_product_attention.ipynb) wrote causal attention as
# `softmax(Q Kᵀ / √d + mask) V`. Unfold the softmax and the same computation reads: for query $t$,
# give every visible key $s$ a **similarity** $\mathrm{sim}(q_t, k_s) = \exp(q_t\cdot k_s/\sqrt d)$,
# and return the average of the values weighted by these similarities,
#
# $$y_t = \frac{\sum_{s\le t} \mathrm{sim}(q_t, k_s)\, v_s}{\sum_{s \le t}\mathrm{sim}(q_t, k_s)}.$$
#
# The denominator (the **normaliser**) makes the weights sum to one. Nothing in this formula
# needs the exponential in particular: any similarity that is never negative gives a weighted
# average. Let us check the unfolded form against `sdpa` first, on one head.

# %%
torch.manual_seed(0)
T, d = 6, 8
q, k, v = torch.randn(3, T, d).unbind(0)  # (T, d) each: one head
mask = causal_mask(T)  # (T, T) bool, True where query t may see key s

sim = torch.exp(q @ k.T / d**0.5).masked_fill(~mask, 0.0)  # (T, T): 0 where not allowed
y_unfolded = (sim @ v) / sim.sum(dim=-1, keepdim=True)  # (T, d): weighted average of values
y_sdpa = sdpa(q, k, v, is_causal=True)  # (T, d)
print("unfolded softmax == sdpa:", torch.allclose(y_unfolded, y_sdpa, atol=1e-5))

# %% [markdown]
# Linear attention picks a similarity of a special shape: a **dot product of features**,
# $\mathrm{sim}(q, k) = \phi(q)\cdot\phi(k)$, where $\phi$ maps a vector to a vector of the same
# size (or another size; here the same). For the weights to be a proper average, the similarity
# must not be negative, so the features must be. Katharopoulos et al. chose
#
# $$\phi(x) = \mathrm{elu}(x) + 1 = \begin{cases} x + 1 & x > 0\\ e^{x} & x \le 0\end{cases}$$
#
# applied coordinate by coordinate: positive everywhere, smooth, and with a gradient that never
# vanishes entirely (unlike $\mathrm{relu}$). We write it as `phi`; the module has the same
# function as `elu_feature_map`. There is no $1/\sqrt d$ either: the scale of the features is
# the model's to learn.

# %%
def phi(x):
    """The feature map of this chapter: elu(x) + 1, coordinate by coordinate."""
    return F.elu(x) + 1


x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0])
print("x      :", x.tolist())
print("phi(x) :", [round(val, 4) for val in phi(x).tolist()])
assert torch.equal(phi(x), elu_feature_map(x))  # the module's feature map is the same

sim_lin = (phi(q) @ phi(k).T).masked_fill(~mask, 0.0)  # (T, T): phi(q_t) . phi(k_s)
y_lin = (sim_lin @ v) / sim_lin.sum(dim=-1, keepdim=True)  # (T, d)
print("linear-attention similarities all >= 0:", bool((sim_lin >= 0).all()),
      "| output shape:", tuple(y_lin.shape))

# %% [markdown]
# So far we have only swapped one similarity for another, and the cost is the same: a
# $T \times T$ matrix. The point of the swap is the next section.
#
# ## 2. The kernel trick: reorder the product
#
# Forget the causal mask for one moment (an encoder, where every query sees every key). Stack
# the features into matrices $\Phi_Q = \phi(Q)$ of shape $(T, d)$ and $\Phi_K = \phi(K)$, also
# $(T, d)$, and the values $V$, $(T, d_v)$. The numerator of all outputs at once is
#
# $$\underbrace{(\Phi_Q \Phi_K^\top)}_{(T,\,T)} V \;=\; \Phi_Q \underbrace{(\Phi_K^\top V)}_{(d,\,d_v)}$$
#
# — the same product, only bracketed differently (matrix multiplication is associative). This
# is the *kernel trick* of the chapter's title: a **kernel** is a similarity that can be written
# as $\phi(q)\cdot\phi(k)$ for some feature map $\phi$, and only such a similarity lets the keys
# be summed before the queries arrive. With
# softmax this is impossible: $\exp(q\cdot k)$ is not a dot product of finite feature vectors of
# $q$ and of $k$ (only of infinitely long ones, which Performers approximate with random
# features), so the $T \times T$ matrix must be formed and exponentiated entry by entry.
# With features, the right-hand side first squeezes all keys and values into one small
# $d \times d_v$ matrix, then lets every query read it. The normaliser reorders the same way:
# $\Phi_Q \Phi_K^\top \mathbf 1 = \Phi_Q (\Phi_K^\top \mathbf 1)$, where $\Phi_K^\top \mathbf 1 =
# \sum_s \phi(k_s)$ is a single vector of size $d$.
#
# Counting multiply-adds as 2 FLOPs, per head:
#
# | order | products | FLOPs |
# | --- | --- | --- |
# | left: $(\Phi_Q\Phi_K^\top)V$ | $(T,d)(d,T)$, then $(T,T)(T,d_v)$ | $2T^2 d + 2T^2 d_v$ |
# | right: $\Phi_Q(\Phi_K^\top V)$ | $(d,T)(T,d_v)$, then $(T,d)(d,d_v)$ | $2Td\,d_v + 2Td\,d_v$ |
#
# With $d = d_v$ the ratio is $T/d$: the right order wins as soon as the sequence is longer than
# a head is wide, and by a factor that keeps growing with $T$.

# %%
torch.manual_seed(1)
T, d, dv = 512, 16, 16
PhiQ, PhiK, V = phi(torch.randn(T, d)), phi(torch.randn(T, d)), torch.randn(T, dv)

A = PhiQ @ PhiK.T  # (T, T): the big matrix
left = (A @ V) / A.sum(dim=-1, keepdim=True)  # (T, dv)
S_all, z_all = PhiK.T @ V, PhiK.sum(dim=0)  # (d, dv) and (d,): all keys, summed once
right = (PhiQ @ S_all) / (PhiQ @ z_all)[:, None]  # (T, dv)
print("A:", tuple(A.shape), "| S:", tuple(S_all.shape), "| z:", tuple(z_all.shape))
print("both orders agree:", torch.allclose(left, right, rtol=1e-4, atol=1e-5))

print(f"\n{'T':>6} {'left FLOPs':>14} {'right FLOPs':>12} {'ratio':>7}   (d = d_v = 64)")
for T_ in (64, 256, 1024, 4096, 16384):
    flops_left, flops_right = 2 * T_**2 * (64 + 64), 4 * T_ * 64 * 64
    print(f"{T_:>6} {flops_left:>14,} {flops_right:>12,} {flops_left / flops_right:>7.0f}")

# %% [markdown]
# The same two orders as a picture, drawn by code (no data): every matrix is a rectangle with
# one square per number, to scale, for $T = 12$ tokens, features of size $d = 4$ and values of
# size $d_v = 3$. The intermediate product of each order is orange; $Y$ (green) is the
# numerator of every output, the same in both rows (the normaliser, not drawn, follows the same
# two orders with a column of ones in place of $V$). Each arrow carries the FLOPs of its
# product, the terms of the table above, and the line under each row adds them up. What to
# look at:
#
# - **Top row, the left order** — the cell above's `A = PhiQ @ PhiK.T`, then `A @ V`. The first
#   product makes the orange $(T, T)$ matrix $A$: one number per (query, key) pair, so it grows
#   with the square of the sequence, and the second product has to read all of it.
# - **Middle row, the right order** — `S_all = PhiK.T @ V`, then `PhiQ @ S_all`. The first
#   product squeezes all keys and values into the orange $(d, d_v)$ matrix $S$, whose size does
#   not depend on $T$; then every query reads it. Same inputs, same $Y$, but 576 FLOPs instead
#   of 2,016 even at this tiny $T$, and the gap grows in proportion to $T$ (the ratio column
#   printed above).
# - **Bottom row, the causal version** — what section 3 builds next. With the causal mask,
#   query $t$ may read only keys $s \le t$, so instead of one $S$ it reads its own prefix state
#   $S_t$. These states form a running sum: start from zeros and add one outer product per
#   token, $\phi(k_t)v_t^\top$, a column of size $d$ times a row of size $d_v$. The state never
#   grows; only the number of terms summed into it does. In code this is one line of section
#   3.2's `recurrent_form`, `S = S + kf[..., t, :, None] * v[..., t, None, :]`, followed by the
#   read `qf[..., t, None, :] @ S`; the chunked form of section 3.3 adds a whole chunk of these
#   outer products at once, `S + kc.transpose(-2, -1) @ vc`. The normaliser grows alike,
#   $z_t = z_{t-1} + \phi(k_t)$.

# %%
from matplotlib.patches import FancyArrowPatch, Rectangle

INPUT, MIDDLE, OUTPUT = "#dbe8f6", "#f6a04d", "#d9f0d3"  # inputs, the intermediate, outputs


def matrix(ax, x, y, rows, cols, name, shape, color=INPUT, bold=False):
    """A rows x cols matrix drawn to scale (one square per entry), its left edge at x and its
    middle at height y; its name above it, its shape below. Returns its right edge."""
    bottom = y - rows / 2
    for i in range(rows):
        for j in range(cols):
            ax.add_patch(Rectangle((x + j, bottom + i), 1, 1, facecolor=color,
                                   edgecolor="white", lw=0.6))
    ax.add_patch(Rectangle((x, bottom), cols, rows, fill=False, edgecolor="black",
                           lw=2.2 if bold else 1.0))
    ax.text(x + cols / 2, bottom + rows + 0.4, name, ha="center", va="bottom", fontsize=12)
    if shape:
        ax.text(x + cols / 2, bottom - 0.4, shape, ha="center", va="top", fontsize=9.5,
                color="dimgray")
    return x + cols


def symbol(ax, x, y, text, width=2.0):
    """An operator or a word centred in a gap of the given width. Returns the gap's end."""
    ax.text(x + width / 2, y, text, ha="center", va="center", fontsize=15)
    return x + width


def arrow(ax, x, y, label="", length=4.0):
    """A horizontal arrow from x, its label (the FLOPs of the step) under it. Returns its end."""
    ax.add_patch(FancyArrowPatch((x + 0.4, y), (x + length - 0.4, y), arrowstyle="-|>",
                                 mutation_scale=16, lw=1.4, color="black"))
    ax.text(x + length / 2, y - 0.5, label, ha="center", va="top", fontsize=10.5)
    return x + length


T_pic, d_pic, dv_pic = 12, 4, 3  # T = 12 tokens, features d = 4, values d_v = 3
fig, ax = plt.subplots(figsize=(9.5, 11.4))
fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99)
ax.set_aspect("equal")
ax.axis("off")

# Left order: (Phi_Q Phi_K^T) V. The first product forms the (T, T) matrix A.
y = 42
ax.text(0, y + 8.5, r"Left order $(\Phi_Q \Phi_K^\top)\,V$: forms a $T \times T$ matrix",
        fontsize=13, fontweight="bold")
x = matrix(ax, 0, y, T_pic, d_pic, r"$\Phi_Q$", r"$(T, d)$")  # (T, d)
x = symbol(ax, x, y, r"$\times$")
x = matrix(ax, x, y, d_pic, T_pic, r"$\Phi_K^\top$", r"$(d, T)$")  # (d, T)
x = arrow(ax, x, y, r"$2T^2 d$")
x = matrix(ax, x, y, T_pic, T_pic, r"$A = \Phi_Q \Phi_K^\top$", r"$(T, T)$", MIDDLE,
           bold=True)  # (T, T)
x = symbol(ax, x, y, r"$\times$")
x = matrix(ax, x, y, T_pic, dv_pic, r"$V$", r"$(T, d_v)$")  # (T, d_v)
x = arrow(ax, x, y, r"$2T^2 d_v$")
x = matrix(ax, x, y, T_pic, dv_pic, r"$Y$", r"$(T, d_v)$", OUTPUT)  # (T, d_v)
left_flops = 2 * T_pic**2 * d_pic + 2 * T_pic**2 * dv_pic
ax.text(0, y - 8.6, rf"FLOPs: $2T^2 d + 2T^2 d_v$ = {left_flops:,} "
        rf"at $T = {T_pic}$, $d = {d_pic}$, $d_v = {dv_pic}$", fontsize=12)

# Right order: Phi_Q (Phi_K^T V). The first product forms the (d, d_v) matrix S.
y = 22
ax.text(0, y + 8.5, r"Right order $\Phi_Q\,(\Phi_K^\top V)$: forms a $d \times d_v$ state",
        fontsize=13, fontweight="bold")
x = matrix(ax, 0, y, d_pic, T_pic, r"$\Phi_K^\top$", r"$(d, T)$")  # (d, T)
x = symbol(ax, x, y, r"$\times$")
x = matrix(ax, x, y, T_pic, dv_pic, r"$V$", r"$(T, d_v)$")  # (T, d_v)
x = arrow(ax, x, y, r"$2T d\, d_v$")
x = matrix(ax, x, y, d_pic, dv_pic, r"$S$", r"$(d, d_v)$", MIDDLE, bold=True)  # (d, d_v)
x = symbol(ax, x, y, "then", width=4.5)
x = matrix(ax, x, y, T_pic, d_pic, r"$\Phi_Q$", r"$(T, d)$")  # (T, d)
x = symbol(ax, x, y, r"$\times$")
x = matrix(ax, x, y, d_pic, dv_pic, r"$S$", r"$(d, d_v)$", MIDDLE, bold=True)  # (d, d_v)
x = arrow(ax, x, y, r"$2T d\, d_v$")
x = matrix(ax, x, y, T_pic, dv_pic, r"$Y$", r"$(T, d_v)$", OUTPUT)  # (T, d_v)
right_flops = 2 * T_pic * d_pic * dv_pic + 2 * T_pic * d_pic * dv_pic
ax.text(0, y - 8.6, rf"FLOPs: $2Td\,d_v + 2Td\,d_v$ = {right_flops:,}, "
        rf"{left_flops / right_flops:.1f} times fewer", fontsize=12)

# Causal: S_t = S_{t-1} + phi(k_t) v_t^T, one outer product per token; S stays (d, d_v).
y = 1
ax.text(0, y + 9, r"Causal: the state is a running sum, $S_t = S_{t-1} + \phi(k_t)\, v_t^\top$",
        fontsize=13, fontweight="bold")
x = matrix(ax, 0, y, d_pic, dv_pic, r"$S_0 = 0$", r"$(d, d_v)$", "white")  # (d, d_v)
for t in (1, 2, 3):
    # above the arrow: what token t adds, phi(k_t) (d, 1) times v_t^T (1, d_v)
    term_x = matrix(ax, x + 0.3, y + 4.5, d_pic, 1, rf"$\phi(k_{t})$", "")  # (d, 1)
    term_x = symbol(ax, term_x, y + 4.5, r"$\times$", width=1.4)
    matrix(ax, term_x, y + 4.5, 1, dv_pic, rf"$v_{t}^\top$", "")  # (1, d_v)
    x = arrow(ax, x, y, rf"$+\,\phi(k_{t})\,v_{t}^\top$", length=6.5)
    x = matrix(ax, x, y, d_pic, dv_pic, rf"$S_{t}$", "", MIDDLE, bold=True)  # (d, d_v)
x = symbol(ax, x, y, r"$\cdots$", width=4.5)
x = matrix(ax, x, y, d_pic, dv_pic, r"$S_T = S$", r"$(d, d_v)$", MIDDLE, bold=True)
ax.text(0, y - 4.2, r"per token: $2d\,d_v$ to add $\phi(k_t)\,v_t^\top$, $2d\,d_v$ to read "
        r"$\phi(q_t)^\top S_t$; in all $2Td\,d_v + 2Td\,d_v$, as the right order,"
        "\n" r"and the state stays $d \times d_v$ however long the sequence grows",
        fontsize=11.5, va="top")

ax.set(xlim=(-0.5, 47), ylim=(-6.5, 51.5))
plt.show()

# %% [markdown]
# The matrix $S = \Phi_K^\top V = \sum_s \phi(k_s) v_s^\top$ is a sum of outer products, one per
# key-value pair. It is an **associative memory**: reading it with $\phi(q)$ gives
# $\sum_s (\phi(q)\cdot\phi(k_s))\, v_s$, every stored value weighted by how well its key
# matches the query. Keep that picture in mind; section 7 asks how much such a memory can hold.
#
# ## 3. Causal attention: prefix sums and a state
#
# With the causal mask, query $t$ may only read keys $s \le t$. The mask sits *between* the two
# products, $(\mathrm{mask} \odot \Phi_Q\Phi_K^\top)V$, and an element-wise mask cannot be moved
# through a matrix product, so the one-line reordering no longer applies. But look at one query:
#
# $$y_t = \frac{\phi(q_t)^\top \sum_{s\le t}\phi(k_s)v_s^\top}{\phi(q_t)^\top \sum_{s\le t}\phi(k_s)}
#       = \frac{\phi(q_t)^\top S_t}{\phi(q_t)\cdot z_t},\qquad
#   S_t = \sum_{s\le t}\phi(k_s)v_s^\top\ (d\times d_v),\quad z_t = \sum_{s\le t}\phi(k_s)\ (d).$$
#
# Each query needs the sums over its own **prefix**, and prefix sums are built by adding one
# term at a time: $S_t = S_{t-1} + \phi(k_t)v_t^\top$, $z_t = z_{t-1} + \phi(k_t)$. The pair
# $(S_t, z_t)$ is the **state** after token $t$. Its size does not depend on $t$. This gives three
# ways to compute the same outputs, which we now write one by one (on tensors of shape
# `(..., T, d)`, so that batch and head dimensions ride along).
#
# ### 3.1 The quadratic form
#
# The definition, written with the $(T, T)$ similarity matrix and the causal mask, as in
# section 1. It costs $O(T^2)$, but it is the reference, and the only form that can show the
# weights.

# %%
def quadratic_form(qf, kf, v):
    """qf, kf: (..., T, d) positive features; v: (..., T, dv) -> (..., T, dv)."""
    T = qf.shape[-2]
    sim = (qf @ kf.transpose(-2, -1)).masked_fill(~causal_mask(T), 0.0)  # (..., T, T)
    return (sim @ v) / sim.sum(dim=-1, keepdim=True)


# %% [markdown]
# ### 3.2 The recurrent form
#
# One token at a time: add the new key-value pair to the state, then read the state with the
# new query. This is an RNN whose hidden state is the matrix $S_t$ (plus the vector $z_t$). It
# does about $4 d\,d_v$ FLOPs per token (an outer product and a vector-matrix product), so $O(T)$
# in all, but as a Python loop of tiny operations it is slow for training. Its strength is
# generation: the state is all a new token needs from the past.

# %%
def recurrent_form(qf, kf, v, state=None):
    """One token at a time. Returns (..., T, dv) and the state (S, z) after the last token."""
    *batch, T, d = qf.shape
    if state is None:
        state = qf.new_zeros(*batch, d, v.shape[-1]), qf.new_zeros(*batch, d)
    S, z = state  # (..., d, dv), (..., d)
    ys = []
    for t in range(T):
        S = S + kf[..., t, :, None] * v[..., t, None, :]  # add the outer product phi(k_t) v_t^T
        z = z + kf[..., t, :]  # add phi(k_t)
        num = (qf[..., t, None, :] @ S).squeeze(-2)  # (..., dv): phi(q_t)^T S_t
        den = (qf[..., t, :] * z).sum(dim=-1, keepdim=True)  # (..., 1): phi(q_t) . z_t
        ys.append(num / den)
    return torch.stack(ys, dim=-2), (S, z)


# %% [markdown]
# ### 3.3 The chunked form
#
# Training wants big matrix products, not a loop over tokens; the quadratic form has them but
# costs $T^2$. The chunked form takes the best of both. Cut the sequence into chunks of $C$
# tokens. For a query in chunk $n$, the visible keys are of two kinds:
#
# - keys in **earlier chunks**: all of them are visible, so no mask is needed and the reordered
#   product works: read the state $S$ accumulated over the earlier chunks, $\phi(Q_n) S$;
# - keys in **its own chunk**: visible up to the query itself, so use the quadratic form on a
#   small $(C, C)$ block with a causal mask.
#
# The normaliser splits the same way. After the chunk, add its keys and values to the state,
# $S \leftarrow S + \phi(K_n)^\top V_n$, $z \leftarrow z + \sum \phi(K_n)$, and move on. Per
# chunk that is a few matrix products of sizes $C \times d$ and $d \times d_v$. In all, about
# $2TC(d + d_v)$ FLOPs inside the chunks and $4Td\,d_v$ for the state: linear in $T$, and the
# loop runs $T/C$ times instead of $T$.

# %%
def chunked_form(qf, kf, v, chunk, state=None):
    """Quadratic inside chunks of `chunk` tokens, the state between them. Returns y, (S, z)."""
    *batch, T, d = qf.shape
    if state is None:
        state = qf.new_zeros(*batch, d, v.shape[-1]), qf.new_zeros(*batch, d)
    S, z = state  # (..., d, dv), (..., d): everything before the current chunk
    ys = []
    for start in range(0, T, chunk):
        qc, kc, vc = (t[..., start : start + chunk, :] for t in (qf, kf, v))  # (..., C, .)
        C = qc.shape[-2]  # the last chunk may be shorter
        sim = (qc @ kc.transpose(-2, -1)).masked_fill(~causal_mask(C), 0.0)  # (..., C, C)
        num = qc @ S + sim @ vc  # (..., C, dv): earlier chunks + this chunk
        den = qc @ z[..., None] + sim.sum(dim=-1, keepdim=True)  # (..., C, 1)
        ys.append(num / den)
        S = S + kc.transpose(-2, -1) @ vc  # (..., d, dv): add this chunk's pairs
        z = z + kc.sum(dim=-2)  # (..., d)
    return torch.cat(ys, dim=-2), (S, z)


# %% [markdown]
# ### 3.4 Do they agree?
#
# Same inputs through the three forms: a batch of 2 sequences, 3 heads, 50 tokens, features of
# size 8, values of size 6, chunks of 16 (so the last chunk is shorter, 50 = 3·16 + 2). The
# outputs must agree to float rounding, and the two forms that carry a state must end with the
# same $(S, z)$.

# %%
torch.manual_seed(2)
B, H, T, d, dv = 2, 3, 50, 8, 6
qf, kf = phi(torch.randn(B, H, T, d)), phi(torch.randn(B, H, T, d))  # positive features
v = torch.randn(B, H, T, dv)

y_quad = quadratic_form(qf, kf, v)
y_rec, (S_rec, z_rec) = recurrent_form(qf, kf, v)
y_chk, (S_chk, z_chk) = chunked_form(qf, kf, v, chunk=16)
print("output:", tuple(y_quad.shape), "| state S:", tuple(S_rec.shape), "| z:", tuple(z_rec.shape))
print("recurrent == quadratic:", torch.allclose(y_rec, y_quad, atol=1e-4))
print("chunked   == quadratic:", torch.allclose(y_chk, y_quad, atol=1e-4))
print("same final state      :", torch.allclose(S_chk, S_rec, atol=1e-3)
      and torch.allclose(z_chk, z_rec, atol=1e-3))

# %% [markdown]
# The state also lets us **split a sequence**: run the first 20 tokens, keep the state, run the
# other 30 starting from it. The result must be the run over all 50 tokens. This is exactly
# what generation will do (a prompt, then one token at a time), and it works for any split
# point, even one in the middle of a chunk:

# %%
y_a, state_a = chunked_form(qf[..., :20, :], kf[..., :20, :], v[..., :20, :], chunk=16)
y_b, _ = recurrent_form(qf[..., 20:, :], kf[..., 20:, :], v[..., 20:, :], state=state_a)
print("20 tokens chunked, then 30 recurrent from its state == one pass:",
      torch.allclose(torch.cat([y_a, y_b], dim=-2), y_quad, atol=1e-4))

# %% [markdown]
# The module `attnbook.attention.linear` has the same three forms, as
# `linear_attention_quadratic`, `linear_attention_recurrent` and `linear_attention_chunked`.
# They take features of shape `(B, H, T, d)` (the caller applies $\phi$), add a tiny `EPS` to
# the normaliser, and accept RoPE-rotated features (section 5). The module's chunked form has
# no Python loop over chunks: it computes every chunk's contribution $\phi(K_n)^\top V_n$ at
# once and gets the state entering each chunk with an (exclusive) cumulative sum over chunks.

# %%
y_mod_quad = linear_attention_quadratic(qf, kf, v)
y_mod_rec, (S_mod, z_mod) = linear_attention_recurrent(qf, kf, v)
y_mod_chk, (S_mod_chk, z_mod_chk) = linear_attention_chunked(qf, kf, v, chunk=16)
for name, ours, theirs in (("quadratic", y_quad, y_mod_quad), ("recurrent", y_rec, y_mod_rec),
                           ("chunked", y_chk, y_mod_chk)):
    print(f"module {name:<9} == ours: {torch.allclose(ours, theirs, atol=1e-4)}")
assert torch.allclose(S_mod_chk, S_rec, atol=1e-3) and torch.allclose(z_mod_chk, z_rec, atol=1e-3)

# %% [markdown]
# Why not compute every prefix state $S_1, \ldots, S_T$ at once with one `cumsum` over the
# sequence and skip the chunks? Because that stores a $d \times d_v$ matrix *per token*:
# $T d\, d_v$ numbers per head, against $T(d + d_v)$ for the keys and values themselves: 32
# times more for $d = d_v = 64$. The chunked form keeps one state per chunk, $T/C$ of them.
#
# How the work of the three forms grows with $T$, from the FLOP counts above (per head,
# $d = d_v = 64$, chunks of 64):

# %%
def form_flops(T, d=64, dv=64, C=64):
    return {
        "quadratic": 2 * T * T * (d + dv),  # the full (T, T) block, half of it masked away
        "recurrent": 4 * T * d * dv,  # an outer product and a read per token
        "chunked": 2 * T * C * (d + dv) + 4 * T * d * dv,  # (C, C) blocks + the state
    }


lengths = [2**i for i in range(6, 15)]  # 64 .. 16384
work = {name: [form_flops(T_)[name] for T_ in lengths] for name in form_flops(1)}
fig, ax = plt.subplots(figsize=(7, 4))
for (name, flops), style in zip(work.items(), ("o-", "s--", "^-"), strict=True):
    ax.loglog(lengths, flops, style, label=name)
ax.set_xlabel("sequence length T")
ax.set_ylabel("FLOPs per head")
ax.set_title("Work of the three forms (d = d_v = 64, chunk C = 64)")
ax.legend()
plt.show()
print("FLOPs at T=16384, relative to recurrent:",
      {name: round(f[-1] / work["recurrent"][-1], 1) for name, f in work.items()})
print("quadratic form at most as many FLOPs as chunked up to T =",
      max(T_ for T_, quad, chk in zip(lengths, work["quadratic"], work["chunked"], strict=True)
          if quad <= chk))

# %% [markdown]
# The quadratic form's line has slope 2 on log-log axes; the other two have slope 1. The chunked
# form does twice the recurrent form's FLOPs here: on top of the same state work, $4Td\,d_v$, its
# $(C, C)$ blocks cost $2TC(d + d_v)$, which is as much again when $C = d = d_v$ (and half of each
# block is masked away). But it does its work in $T/C$ large matrix products instead of $T$ tiny
# steps, which on real hardware is far faster. Section 8 measures it.
#
# At short lengths the order flips: up to $T = 128$ the quadratic form does no more FLOPs than
# the chunked one. For $T \le C$ the chunked form is a single chunk, that is the quadratic form
# plus a state it never needs; the chunk size trades the two costs against each other, and
# Exercise 2 asks which chunk is fastest in practice.
#
# ## 4. What the weights look like
#
# The quadratic form can return its weights, $w_{ts} = \phi(q_t)\cdot\phi(k_s) / \phi(q_t)\cdot
# z_t$. They are a proper distribution over the visible keys (Exercise 3 proves it), like
# softmax's. But they are *shaped* differently. Here is one head with the same random queries and
# keys, once through softmax and once through linear attention:

# %%
torch.manual_seed(3)
T, d = 24, 16
q1, k1, v1 = torch.randn(3, 1, 1, T, d).unbind(0)  # (1, 1, T, d): one sequence, one head
q1, k1 = 2 * q1, 2 * k1  # a sharper softmax, as trained heads often have
_, w_soft = sdpa_reference(q1, k1, v1, is_causal=True, return_weights=True)  # (1, 1, T, T)
_, w_lin = linear_attention_quadratic(phi(q1), phi(k1), v1, return_weights=True)

fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
for ax, w, title in ((axes[0], w_soft, "softmax"), (axes[1], w_lin, "linear (elu + 1)")):
    im = ax.imshow(w[0, 0], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"{title} weights")
    ax.set_xlabel("key position s")
axes[0].set_ylabel("query position t")
fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
plt.show()

rows = w_lin[0, 0]
print("linear weights >= 0:", bool((rows >= 0).all()),
      "| rows sum to 1:", torch.allclose(rows.sum(-1), torch.ones(T), atol=1e-5))
last = T - 1
print(f"largest weight of the last query (sees {T} keys): softmax "
      f"{w_soft[0, 0, last].max():.3f}, linear {w_lin[0, 0, last].max():.3f}")

# %% [markdown]
# Softmax turns differences of scores into *ratios* of weights: a score larger by 3 gets $e^3
# \approx 20$ times the weight, so a few keys dominate a row. Linear attention's weights are ratios
# of dot products of positive vectors, and two positive vectors always overlap: every key gets a
# share, and the rows come out much flatter — close to a plain average of the visible values. The
# last query shows it: its largest weight is 0.912 under softmax but only 0.082 under linear
# attention, barely twice the uniform $1/24$. A trained model can push its features toward sparser,
# sharper patterns, but it cannot reproduce the exponential's "winner takes most". Section 7 returns
# to this.
#
# ## 5. Positions: RoPE on the features, and the normaliser
#
# Linear attention has no scores to add ALiBi's bias to, so the module refuses ALiBi. Learned
# and sinusoidal positions are added to the embeddings by the model and need nothing here. RoPE
# ([chapter 6](06_positions.ipynb)) rotates queries and keys so that their dot product depends on
# the offset $t - s$ only. The module follows RoFormer (Su et al. 2021, section 3.3, "RoPE with
# linear attention"), as its docstring explains:
#
# - it rotates the **features**, $R_t\phi(q_t)$ and $R_s\phi(k_s)$, after the feature map
#   (rotating before $\phi$ would keep everything positive, but $\phi$ would then destroy the
#   offset property, which relies on the rotation surviving into the dot product);
# - it uses the rotated features **in the numerator only**; the normaliser keeps the unrotated
#   ones.
#
# Why not rotate the normaliser too? A rotation mixes coordinates with cosines and sines, so
# rotated positive vectors are no longer positive, and their dot products can be negative. The
# unrotated normaliser is a sum of positive terms: nothing in it can cancel, it is at least as
# large as its largest term, and it only grows as tokens arrive. A rotated normaliser is a sum
# of terms of *either* sign; they can cancel and bring it arbitrarily close to zero (or below),
# and dividing by it would make the output explode or flip sign. The cost of the choice: with
# RoPE the weights no longer sum to exactly one (Exercise 3).

# %%
torch.manual_seed(4)
B, H, T, d = 1, 4, 256, 32
qf, kf = phi(torch.randn(B, H, T, d)), phi(torch.randn(B, H, T, d))
v = torch.randn(B, H, T, d)
rope = RotaryEmbedding(d, max_len=512)
qr, kr = rope(qf), rope(kf)  # rotated features, positions 0 .. T-1

visible = causal_mask(T)
plain_dots = (qf @ kf.transpose(-2, -1))[..., visible]  # every visible (t, s) pair
rot_dots = (qr @ kr.transpose(-2, -1))[..., visible]
print(f"unrotated feature dot products: all > 0: {bool((plain_dots > 0).all())}")
print(f"rotated feature dot products:   negative in {(rot_dots < 0).float().mean():.1%} of pairs")

# The two normalisers of every query: phi(q_t) . z_t, and the same sum with rotated features.
den_plain = (qf * kf.cumsum(dim=-2)).sum(dim=-1)  # (B, H, T): unrotated, what the module uses
den_rot = (qr * kr.cumsum(dim=-2)).sum(dim=-1)  # (B, H, T): rotated, what it avoids
ratio = den_rot / den_plain  # (B, H, T)
print(f"rotated / unrotated normaliser: smallest over all queries {ratio.min():.2f}; "
      f"at the last query, by head: {' '.join(f'{r:.2f}' for r in ratio[0, :, -1].tolist())}")

# The offset property: rotating as positions 100 .. 355 instead of 0 .. 255 changes nothing.
y0 = linear_attention_quadratic(qf, kf, v, q_rot=qr, k_rot=kr)
y100 = linear_attention_quadratic(qf, kf, v, q_rot=rope(qf, 100), k_rot=rope(kf, 100))
print("same output when every position is shifted by 100:", torch.allclose(y0, y100, atol=1e-4))

fig, ax = plt.subplots(figsize=(7, 3.8))
positions = torch.arange(T)
ax.plot(positions, den_plain[0, 0], label=r"unrotated: $\phi(q_t)\cdot z_t$ (the module's)")
ax.plot(positions, den_rot[0, 0], label=r"rotated: $R_t\phi(q_t)\cdot\sum_{s\leq t}R_s\phi(k_s)$")
ax.set_xlabel("query position t")
ax.set_ylabel("normaliser")
ax.set_title("The two normalisers of head 0, query by query")
ax.legend()
plt.show()

# %% [markdown]
# Neither normaliser reaches zero in this draw, but they part ways. The unrotated one grows
# steadily, one positive term per key. The rotated one falls behind, and mostly not because its
# terms cancel: only 2.2% of the rotated products are negative. Rotating turns the query's and
# the key's features by different angles, so most terms are smaller than their unrotated
# counterparts (each pair of features contributes a cosine-weighted product), and the sum grows
# more slowly: the smallest ratio of rotated to unrotated over all queries and heads is the 0.23
# printed above, and at the last query the ratio differs from head to head. Dividing by it would
# scale each output by a factor that depends on the query and its position; and in a sum of terms
# of either sign nothing keeps it away from zero, even though this draw stays clear of it. The
# unrotated sum cannot shrink.
#
# In the chunked form of section 3.3 the change is small: the products that build the numerator
# (the read of the state, the in-chunk similarities that multiply the values, the state update)
# take the rotated features, and those that build the normaliser take the plain ones, so the
# chunked form now carries a state $S$ of rotated keys next to a $z$ of plain ones. Written out,
# it matches the module's quadratic form given the same rotated features:

# %%
def chunked_form_rope(qf, kf, qr, kr, v, chunk):
    """chunked_form with RoPE (section 5): rotated features qr, kr in the numerator only."""
    *batch, T, d = qf.shape
    S, z = qf.new_zeros(*batch, d, v.shape[-1]), qf.new_zeros(*batch, d)
    ys = []
    for start in range(0, T, chunk):
        qc, kc, qrc, krc, vc = (t[..., start : start + chunk, :] for t in (qf, kf, qr, kr, v))
        future = ~causal_mask(qc.shape[-2])  # (C, C): True where the key comes after the query
        sim_rot = (qrc @ krc.transpose(-2, -1)).masked_fill(future, 0.0)  # for the numerator
        sim = (qc @ kc.transpose(-2, -1)).masked_fill(future, 0.0)  # for the normaliser
        num = qrc @ S + sim_rot @ vc  # (..., C, dv)
        den = qc @ z[..., None] + sim.sum(dim=-1, keepdim=True)  # (..., C, 1)
        ys.append(num / den)
        S, z = S + krc.transpose(-2, -1) @ vc, z + kc.sum(dim=-2)  # S holds rotated keys
    return torch.cat(ys, dim=-2)


y_chunk_rope = chunked_form_rope(qf, kf, qr, kr, v, chunk=64)  # (B, H, T, d)
print("chunked form with RoPE == module's quadratic form with rotated features (atol=1e-4):",
      torch.allclose(y_chunk_rope, y0, atol=1e-4))

# %% [markdown]
# ## 6. Generation with a constant-size state
#
# A cache for linear attention is the state $(S, z)$ of every head in every layer:
# `LinearAttentionCache`, made by `layer.new_cache(batch_size)`. During generation each new
# token adds its pair to the state and reads it, and nothing else about the past is kept.
#
# We need a small language model to generate with: the package's `GPT`
# ([chapter 7](07_kv_cache.ipynb)): a token embedding, four pre-norm blocks of
# attention + MLP with LayerNorms, and an LM head. `GPTConfig(attention="linear",
# attention_options={"linear_chunk": 16})` builds each block's attention with
# `build_attention("linear", cfg, linear_chunk=16)`, RoPE in `cfg`. Its weights are random (a
# cache is correct when it reproduces the full computation, whatever the weights), with PyTorch's
# default initialisation rather than `GPT`'s $N(0, 0.02)$, as chapter 7 explains. The blocks
# pass `cache=` to their attention layer, whatever kind of cache it is, and `model.new_caches`
# asks each layer for its own kind. `model.generate` makes its caches itself unless we pass it
# ours (`caches=`), which we do to look at them afterwards: it feeds the prompt first and then
# one token per step.

# %%
def tiny_gpt(attention, **options):
    """4 blocks of `attention`, 4 heads of 32, RoPE; PyTorch's default initialisation."""
    config = GPTConfig(vocab_size=256, block_size=512, n_layer=4, n_head=4, n_embd=128,
                       attention=attention, attention_options=options, positions="rope",
                       tie_weights=False)
    model = GPT(config).eval()
    for module in model.modules():  # not GPT's N(0, 0.02): see chapter 7
        if isinstance(module, nn.Linear | nn.Embedding):
            module.reset_parameters()
    return model


torch.manual_seed(0)
model = tiny_gpt("linear", linear_chunk=16)  # linear_chunk: the option of "linear"
blocks = model.transformer.h  # the 4 blocks; blocks[i].attn is a LinearAttention
print(f"GPT with linear attention: {len(blocks)} layers, n_embd={model.config.n_embd}, "
      f"{model.config.n_head} heads of {blocks[0].attn.head_dim}, "
      f"chunks of {blocks[0].attn.options.linear_chunk}")

# %% [markdown]
# Without a cache, every step runs the chunked form over the whole sequence. With one, the first
# step runs the 20-token prompt (chunked, starting from a zero state) and stores the final
# state; every later step feeds one token, which the layer processes starting from the stored
# state. The tokens must be the same. After 60 new tokens the caches have seen 79 positions: the
# prompt and 59 generated tokens (the last token is returned, never fed back).

# %%
torch.manual_seed(1)
prompt = torch.randint(0, 256, (2, 20))  # 2 prompts of 20 tokens
caches = model.new_caches(batch_size=2)  # one LinearAttentionCache per block
bytes_before = sum(c.nbytes for c in caches)
out_plain = model.generate(prompt, 60, temperature=0, use_cache=False)  # recomputes each step
out_cached = model.generate(prompt, 60, temperature=0, caches=caches)
assert torch.equal(out_plain, out_cached)
assert torch.equal(model.generate(prompt, 60, temperature=0), out_plain)  # its own caches
print("cached decoding == full recomputation:", torch.equal(out_plain, out_cached))
print(f"cache type: {type(caches[0]).__name__}, positions seen: {caches[0].length}, "
      f"S {tuple(caches[0].S.shape)}, z {tuple(caches[0].z.shape)}")
print(f"state bytes, all layers, batch 2 (twice the per-sequence figure below), before and "
      f"after 79 positions: {bytes_before:,} and {sum(c.nbytes for c in caches):,}")

# %% [markdown]
# The state's shape never changed: `(B, n_head, head_dim, head_dim)` for $S$ and
# `(B, n_head, head_dim)` for $z$, whether it summarises 1 token or 500. A KV cache grows instead.
# Per layer and per sequence:
#
# - KV cache: $2 \cdot n_\text{head} \cdot d_h$ numbers **per token**
#   ([chapter 7](07_kv_cache.ipynb));
# - linear attention: $n_\text{head}(d_h^2 + d_h)$ numbers **in all**.
#
# They are equal at $T = (d_h + 1)/2$ tokens: the state weighs as much as the keys and values of
# about $d_h/2$ tokens. For our heads of 32 that is just 16.5 tokens. Beyond that the state is
# smaller, by a factor that grows without bound. Here are the module's byte counts for our tiny
# model and its softmax twin (same shape, `"mha"`), batch 1, fp32:

# %%
twin = tiny_gpt("mha")
n_layer = len(blocks)
state_bytes = n_layer * blocks[0].attn.new_cache(batch_size=1).nbytes  # all layers
kv_per_token = n_layer * twin.transformer.h[0].attn.new_cache(batch_size=1).bytes_per_token
hd, nh = blocks[0].attn.head_dim, model.config.n_head
assert state_bytes == n_layer * nh * (hd * hd + hd) * 4
assert kv_per_token == n_layer * 2 * nh * hd * 4

print(f"{'T':>6} {'KV cache bytes':>15} {'linear state bytes':>19} {'KV / state':>10}")
seq_lengths = [1, 16, 17, 64, 256, 512]
for T_ in seq_lengths:
    kv = T_ * kv_per_token
    print(f"{T_:>6} {kv:>15,} {state_bytes:>19,} {kv / state_bytes:>10.2f}")
print(f"crossover: the KV cache is larger from T = {state_bytes // kv_per_token + 1} on "
      f"((head_dim + 1) / 2 = {(hd + 1) / 2})")

# %%
Ts = torch.arange(1, 4097)
fig, ax = plt.subplots(figsize=(7, 4))
ax.loglog(Ts, Ts * kv_per_token, label="KV cache (mha), grows with T")
ax.loglog(Ts, torch.full_like(Ts, state_bytes), label="linear-attention state, constant")
ax.axvline((hd + 1) / 2, color="gray", ls=":", label="crossover T = (head_dim + 1) / 2")
ax.set_xlabel("tokens in the sequence T")
ax.set_ylabel("bytes, all 4 layers, one sequence")
ax.set_title("What generation keeps: our GPT, 4 heads of 32, fp32")
ax.legend()
plt.show()

# %% [markdown]
# ## 7. Why recall suffers
#
# The constant state is what makes linear attention cheap, and also what limits it. The state
# $S = \sum_s \phi(k_s)v_s^\top$ is a $d \times d_v$ matrix, and reading it is a linear map of
# the query's features, $\phi(q)^\top S$. Suppose the sequence contains $N$ key→value pairs
# (a name and a phone number, a variable and its value) and later asks for the value of one of
# its keys: **associative recall**. A KV cache stores all $N$ pairs separately, and softmax can
# pick out the matching one. A $d\times d_v$ matrix read linearly can store at most $d$
# associations exactly: to return $v_i$ for $N$ different keys, $K S = V$ must hold for the
# $(N, d)$ matrix of keys, and for $N > d$ random keys and values no $S$ satisfies those $N$
# equations. Even the *best* matrix (least squares, $S = K^+ V$) must then lose about a
# fraction $1 - d/N$ of what it stores. The reason: each column of $K S$ is a combination of the
# $d$ columns of $K$, so it lies in a $d$-dimensional subspace of $\mathbb R^N$, and the best
# $S$ returns the projection of each column of $V$ onto that subspace. A random vector of
# $\mathbb R^N$ has on average a fraction $d/N$ of its energy in a given $d$-dimensional subspace;
# the other $1 - d/N$ is lost.
#
# A training-free probe makes this concrete. Store $N$ random pairs (keys and values with
# coordinates drawn from $N(0, 1)$, $d = d_v = 64$), then query with each stored key and measure
# the relative error $\sum\|y - v\|^2 / \sum\|v\|^2$ (0 is perfect recall; 1 is as bad as
# answering zero, or the mean of the values). Four memories:
#
# - **softmax over a KV cache**: the pairs go into a `KVCache`; the query reads with `sdpa`
#   (standard $1/\sqrt d$ scale);
# - **linear attention (elu + 1)**: the pairs go through `linear_attention_chunked`, we keep
#   only its final state $(S, z)$, and read it as the recurrent form does;
# - **sum of outer products** ($\phi(x) = x$, no normaliser, $S = \sum_s k_s v_s^\top / d$):
#   the simplest linear memory;
# - **the best $d\times d_v$ matrix**: least squares, the ceiling for *any* state of this size
#   that is read linearly.

# %%
d_mem = dv_mem = 64


def recall_errors(N, reps=4):
    """Relative error of reading back N stored (key, value) pairs, four kinds of memory."""
    keys = torch.randn(reps, 1, N, d_mem)  # (R, 1 head, N, d): R independent trials
    vals = torch.randn(reps, 1, N, dv_mem)

    def rel(y):
        return float(((y - vals) ** 2).sum() / (vals**2).sum())

    cache = KVCache(reps, 1, d_mem, max_len=N)
    k_all, v_all = cache.append(keys, vals)  # (R, 1, N, d): every pair kept
    y_soft = sdpa(keys, k_all, v_all)  # the queries are the keys themselves

    kf = elu_feature_map(keys)
    _, (S, z) = linear_attention_chunked(kf, kf, vals, chunk=64)  # final state only
    y_lin = (kf @ S) / (kf @ z[..., None])  # (R, 1, N, dv): phi(q)^T S / phi(q) . z

    y_sum = keys @ (keys.transpose(-2, -1) @ vals) / d_mem  # identity features, no normaliser
    y_best = keys @ (torch.linalg.pinv(keys) @ vals)  # least-squares S, (d, dv)
    return {"softmax over KV cache": rel(y_soft), "linear attention (elu + 1)": rel(y_lin),
            "sum of outer products": rel(y_sum), "best d x d_v matrix": rel(y_best)}


torch.manual_seed(5)
n_pairs = [4, 8, 16, 32, 64, 128, 256, 512, 1024]
errors = [recall_errors(N) for N in n_pairs]
names = list(errors[0])
print(f"{'N':>5} " + " ".join(f"{name:>26}" for name in names))
for N, err in zip(n_pairs, errors, strict=True):
    print(f"{N:>5} " + " ".join(f"{err[name]:>26.2f}" for name in names))

# %%
fig, ax = plt.subplots(figsize=(10, 4.5))
for name, style in zip(names, ("o-", "s-", "^--", "d-"), strict=True):
    ax.semilogx(n_pairs, [err[name] for err in errors], style, label=name)
N_fine = torch.logspace(2, 10, 200, base=2)  # 4 .. 1024
ax.plot(N_fine, (1 - d_mem / N_fine).clamp(min=0), "k:", lw=1.5, label="ceiling: 1 - d/N")
ax.axvline(d_mem, color="gray", lw=0.8)
ax.text(d_mem * 1.1, 0.72, "N = d = 64", color="gray")
ax.set_xticks(n_pairs, labels=[str(N) for N in n_pairs])
ax.minorticks_off()
ax.set_ylim(-0.03, 1.2)
ax.set_xlabel("number of stored key-value pairs N")
ax.set_ylabel("relative retrieval error (0 = perfect)")
ax.set_title("Associative recall with d = d_v = 64")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
fig.tight_layout()
plt.show()

err = {name: [e[name] for e in errors] for name in names}
i64 = n_pairs.index(64)
assert max(err["best d x d_v matrix"][: i64 + 1]) < 1e-3  # exact up to N = d
assert all(abs(e - (1 - d_mem / N)) < 0.05 for N, e in zip(n_pairs[i64 + 1 :],
                                                          err["best d x d_v matrix"][i64 + 1 :],
                                                          strict=True))
assert max(err["softmax over KV cache"]) < 0.35 and min(err["linear attention (elu + 1)"]) > 0.4
print("best matrix: exact up to N = d, then about 1 - d/N; softmax stays low; elu + 1 never low")

# %% [markdown]
# The chart has four curves and the dotted ceiling. Three lessons come from the ceiling and the
# three linear memories; the softmax curve comes after them:
#
# - **The ceiling.** Even the best $64\times 64$ matrix recalls perfectly only up to $N = 64$
#   pairs, and then its error rises along $1 - d/N$: with 1024 pairs it keeps about 6% of what
#   it was told. No cleverness in *how* the state is written can beat this; only a larger state
#   can (larger heads, or feature maps with more features than $d$, as in Exercise 1).
# - **Plain sums are far from the ceiling.** Adding outer products, as linear attention does, lets
#   the keys interfere: each read returns its value plus crosstalk from every other pair, and the
#   crosstalk grows like $N/d$: 0.5 at $N = 32$, 1 at $N = d$, and off the chart beyond (16 at
#   $N = 1024$). Why $N/d$: reading with key $k_i$ returns $\sum_j (k_i\cdot k_j/d)\, v_j$. For $j = i$
#   the weight is $\|k_i\|^2/d \approx 1$, the wanted value; for random keys every other weight
#   $k_i\cdot k_j/d$ has mean 0 and variance $1/d$, so the $N - 1$ unwanted values add about
#   $(N-1)/d$ to the relative error. (Better *write* rules interfere less: the delta rule of Schlag,
#   Irie and Schmidhuber 2021, used by DeltaNet, subtracts what the memory already returns for a key
#   before adding the new pair. No write rule can beat the ceiling.)
# - **Positive features blur.** With $\phi = \mathrm{elu} + 1$ all features are positive, so
#   every key overlaps every other (section 4's flat weights), and the read is mostly the
#   average of all stored values: the error is near 1 for any $N$ beyond a handful. That is
#   why this curve (orange) levels off just under 1 while the plain sum (green) climbs off the
#   chart: the normaliser divides by the total weight, so the elu + 1 read is always a weighted
#   average of the stored values, close to their mean when the weights are flat (and the mean of
#   random values is near zero), which caps its error near 1; the unnormalised sum has no such
#   cap and piles up crosstalk without bound. A trained
#   model learns keys that suit its feature map better, but the ceiling stays.
#
# Softmax over the KV cache pays with memory that grows with $N$, and recalls almost perfectly up
# to a few hundred pairs; its error creeps up slowly only because with the $1/\sqrt d$ scale a
# stored key wins its softmax less decisively among 1024 competitors. This gap is why pure
# linear-attention models lag on recall-heavy tasks, and why recent designs enlarge the state,
# improve the write rule, or keep a few softmax layers.
#
# ## 8. Speed: chunked linear attention against causal SDPA
#
# Now the claim linear attention exists for: it is cheaper at long sequences. We time a forward
# and backward pass of the attention core alone — the projections are the same for both — on
# one sequence with 4 heads of 64:
#
# - **linear**: $\phi$ on queries and keys, then the module's `linear_attention_chunked`
#   (chunks of 64, the module's default);
# - **softmax**: `F.scaled_dot_product_attention(..., is_causal=True)` through `sdpa`, which on
#   CPU runs a fused flash-attention kernel, forward and backward.
#
# The chapter already runs on one thread (see the setup), which keeps the measurement steady on
# a shared machine; each function is warmed up once and we keep the best of 5 repeats (3 for
# the two longest sequences, which take longest). Timings vary by machine, so the numbers are
# not checked; the cell only asserts a loose speed-up.

# %%
def best_ms(fn, reps=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def fwd_bwd_linear(q, k, v):
    y, _ = linear_attention_chunked(elu_feature_map(q), elu_feature_map(k), v, chunk=64)
    y.sum().backward()


def fwd_bwd_softmax(q, k, v):
    sdpa(q, k, v, is_causal=True).sum().backward()


# %% tags=["nbval-ignore-output"]
timing_lengths = [128, 256, 512, 1024, 2048, 4096]
ms = {"linear (chunked)": [], "softmax (SDPA)": []}
torch.manual_seed(6)
assert torch.get_num_threads() == 1
for T_ in tqdm(timing_lengths, desc="timing"):  # a progress bar while it runs
    qkv = [torch.randn(1, 4, T_, 64, requires_grad=True) for _ in range(3)]
    reps = 5 if T_ <= 1024 else 3  # short runs are cheap: more repeats, less noise
    ms["linear (chunked)"].append(best_ms(lambda qkv=qkv: fwd_bwd_linear(*qkv), reps))
    ms["softmax (SDPA)"].append(best_ms(lambda qkv=qkv: fwd_bwd_softmax(*qkv), reps))
with torch.no_grad():  # the recurrent loop, forward only, for comparison
    qf_, kf_, v_ = (torch.rand(1, 4, 1024, 64) for _ in range(3))
    ms_rec = best_ms(lambda: linear_attention_recurrent(qf_, kf_, v_), reps=1)
    ms_chk = best_ms(lambda: linear_attention_chunked(qf_, kf_, v_, chunk=64), reps=1)

fig, ax = plt.subplots(figsize=(7, 4))
for (name, times), style in zip(ms.items(), ("o-", "s-"), strict=True):
    ax.loglog(timing_lengths, times, style, label=name)
ax.set_xticks(timing_lengths, labels=[str(T_) for T_ in timing_lengths])
ax.minorticks_off()
ax.set_xlabel("sequence length T")
ax.set_ylabel("forward + backward, ms (best of 3-5)")
ax.set_title("Attention core, 1 sequence, 4 heads of 64, CPU, 1 thread")
ax.legend()
plt.show()

ratios = [lin / soft for lin, soft in zip(*ms.values(), strict=True)]
for T_, lin, soft, r in zip(timing_lengths, *ms.values(), ratios, strict=True):
    print(f"T={T_:>5}: linear {lin:8.1f} ms   softmax {soft:8.1f} ms   linear/softmax {r:.2f}")
# the shortest length from which linear attention stays faster at every longer one
lasting = [T_ for i, T_ in enumerate(timing_lengths) if all(r < 1 for r in ratios[i:])]
print("linear attention is faster at every T from", lasting[0] if lasting else None,
      "on, on this machine")
print(f"forward at T=1024: recurrent loop {ms_rec:.0f} ms, chunked {ms_chk:.1f} ms")
assert ratios[-1] < 0.8, "chunked linear attention should beat causal SDPA clearly at T=4096"
assert ms_rec > 3 * ms_chk, "the Python loop of the recurrent form should be much slower"

# %% [markdown]
# What to look for (your numbers will differ): SDPA's line is steeper — slope near 2, the
# triangle of scores — while chunked linear attention's line is flatter, closer to linear than
# full attention's (though its time still more than doubles from 2048 to 4096 tokens in the
# runs we made). At short sequences softmax wins, because its fused kernel is
# tight and linear attention pays fixed costs (padding, the per-chunk states, several separate
# operations). In the runs on the 2-core CPU this book was written on (shared with other jobs),
# the lines crossed between 128 and 512 tokens, and at 4096 tokens linear attention was 5 to 9
# times faster. The recurrent form does the fewest FLOPs of all, yet its Python loop over 1024
# tokens is many times slower than the chunked form: work that comes in a few big matrix
# products beats less work in many small ones.
#
# On a GPU the crossover moves to longer sequences (flash attention is very fast there, and
# memory traffic rather than FLOPs decides), which is why practical linear-attention kernels are
# carefully fused chunked forms.
#
# ## Check against the module
#
# `LinearAttention` (registered as `"linear"`) is multi-head attention's projections with the
# chunked form in place of softmax: `c_attn` makes $q, k, v$, the layer applies $\phi$, rotates
# the features with RoPE for the numerator, runs `linear_attention_chunked` with its option
# `linear_chunk`, merges the heads and applies `c_proj`. That is what `impl="sdpa"` (the default)
# selects in a linear-attention layer, with or without a cache: with one, the chunked form starts
# from the cache's state. With `impl="reference"` it runs the quadratic form instead, and the
# recurrent form when it has a cache. The name `"sdpa"` is `AttentionConfig`'s name for every
# layer's fast path; a linear-attention layer calls no SDPA at all.
#
# We rebuild that forward pass from this chapter's pieces, using the module's weights: section 5's
# `chunked_form_rope`, our `chunked_form` with rotated features in the numerator. Then we compare it
# with both implementations of the layer, once over the whole sequence and once with a
# `LinearAttentionCache`: a 20-token prompt, then the other 17 tokens one at a time.

# %%
def our_forward(layer, x):
    """The module's forward pass from this chapter's pieces, with the layer's weights."""
    B, T, dm = x.shape
    H, hd = layer.n_head, layer.head_dim
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in layer.c_attn(x).split(dm, dim=2))
    qf, kf = phi(q), phi(k)  # (B, H, T, hd)
    qr, kr = layer.rope(qf), layer.rope(kf)  # rotated features, numerator only
    y = chunked_form_rope(qf, kf, qr, kr, v, layer.options.linear_chunk)
    return layer.c_proj(y.transpose(1, 2).reshape(B, T, dm))


torch.manual_seed(7)
x = torch.randn(2, 37, 64)  # 37 tokens: 4 chunks of 8, and 5
for impl in ("sdpa", "reference"):  # chunked form; or quadratic form, recurrent with a cache
    cfg = AttentionConfig(n_embd=64, n_head=4, block_size=64, positions="rope", impl=impl)
    torch.manual_seed(8)  # the same weights for both implementations
    layer = build_attention("linear", cfg, linear_chunk=8).eval()
    assert isinstance(layer, LinearAttention)
    with torch.no_grad():
        ours = our_forward(layer, x)
        assert torch.allclose(layer(x), ours, atol=1e-5), impl
        cache = layer.new_cache(batch_size=2)
        assert isinstance(cache, LinearAttentionCache)
        steps = [layer(x[:, :20], cache=cache)]  # the prompt, from a zero state
        steps += [layer(x[:, t : t + 1], cache=cache) for t in range(20, 37)]  # one at a time
        assert torch.allclose(torch.cat(steps, dim=1), ours, atol=1e-5), impl
        assert cache.length == 37
print("LinearAttention, impl 'sdpa' and 'reference', full pass and cached decoding == this "
      "chapter's chunked form with RoPE (atol=1e-5): OK")

# %% [markdown]
# ## Summary
#
# - Attention is a weighted average with weights from a similarity, normalised. Linear
#   attention uses a dot product of positive features, $\phi(q)\cdot\phi(k)$ with
#   $\phi = \mathrm{elu} + 1$, instead of $\exp(q\cdot k/\sqrt d)$.
# - A dot product of features lets the product be reordered:
#   $(\Phi_Q\Phi_K^\top)V = \Phi_Q(\Phi_K^\top V)$, $O(T^2 d)$ becomes $O(T d^2)$.
# - Causally, each query reads the prefix sums $S_t = \sum_{s\le t}\phi(k_s)v_s^\top$ and
#   $z_t = \sum_{s\le t}\phi(k_s)$: the state. Three forms compute the same thing — quadratic
#   (reference, shows weights), recurrent (generation), chunked (training).
# - With RoPE the module rotates the features in the numerator only; the normaliser keeps the
#   unrotated, positive features so it never approaches zero.
# - Generation keeps a state of $n_\text{head}(d_h^2 + d_h)$ numbers per layer, whatever the
#   length; a KV cache passes it after about $d_h/2$ tokens and keeps growing.
# - The price: a $d\times d_v$ state recalls at most $d$ random associations exactly. Plain sums
#   pile up crosstalk (an error of about $N/d$, past 1 beyond $N = d$); positive features blur
#   every read towards the mean of the values (an error near 1 from a handful of pairs on);
#   beyond $N = d$ neither does better than answering zero. Softmax over a cache recalls far
#   better.
# - Measured: chunked linear attention beats causal SDPA from a few hundred tokens on (CPU).

# %% [markdown]
# ## Further reading
#
# - Katharopoulos, Vyas, Pappas and Fleuret, *Transformers are RNNs: Fast Autoregressive
#   Transformers with Linear Attention* (ICML 2020): the elu + 1 feature map and the recurrent form.
# - Choromanski et al., *Rethinking Attention with Performers* (ICLR 2021): random features that
#   approximate softmax.
# - Arora et al., *Zoology: Measuring and Improving Recall in Efficient Language Models* (ICLR
#   2024): the recall limit of a fixed-size state.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/11_linear_attention_solutions.ipynb`](solutions/11_linear_attention_solutions.ipynb).
# Predict first, then check with code.
#
# 1. **Another feature map.** Replace $\phi = \mathrm{elu} + 1$ by $\phi = \mathrm{relu}$.
#    (a) Predict: do the quadratic, recurrent and chunked forms still agree? Check it. What can
#    go wrong with the normaliser that cannot go wrong with elu + 1? (b) Rerun the recall probe
#    of section 7 with relu features: better or worse than elu + 1, and why? (c) Make the
#    features *larger* than $d$: concatenate $\mathrm{relu}(x)$ and $\mathrm{relu}(-x)$ (size
#    $2d$). What happens to the ceiling, and to the state's size?
# 2. **Choose the chunk size.** Time forward+backward of `linear_attention_chunked` at
#    $T = 1024$ (4 heads of 64) for chunks of 4, 16, 64, 256 and 1024 tokens. Predict the shape
#    of the curve from the FLOP count $2TC(d + d_v) + 4Td\,d_v$ and from what the module
#    stores per chunk. Which chunk is fastest, and what is the form with `chunk = T`?
# 3. **A proper distribution?** Prove that without RoPE the quadratic form's weights in each row
#    are non-negative and sum to one, so that every output coordinate lies between the smallest
#    and largest value the query can see. Check it on the module's weights. Then turn on RoPE:
#    find a negative weight and a row that does not sum to one, and explain why the output can
#    leave the range of the values.
# 4. **A 7B-style layer.** A layer shaped like Llama 2 7B has 32 heads of 128 and stores its
#    cache in fp16. Compute the bytes of one sequence's linear-attention state per layer and for
#    32 layers, and of the KV cache per token. From what length is the KV cache larger, and how
#    many times larger is it at 4096 tokens? Check your numbers with `LinearAttentionCache` and
#    `KVCache` built on the `meta` device (shapes, no memory).
# 5. **Train it.** The probe of section 7 stored random pairs; a trained layer chooses its own
#    keys and values. Train a single attention layer (`"mha"` and `"linear"`, 2 heads of 16, no
#    positions) for 200 steps to recall 32 key→value pairs, each pair given as one token (key
#    embedding plus value embedding), from 16 query tokens. Predict the two accuracies first.
#    Does training close the gap, and why not entirely?
