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
# # Chapter 2 — Scaled dot-product attention
#
# [Chapter 1](01_buggy_sketch.ipynb) ended with a working single-head self-attention. Its heart is
# one line of math,
#
# $$\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}} + M\right) V ,$$
#
# and every attention variant later in the book (multi-head, grouped-query, sliding-window,
# latent, ...) keeps this line and changes what goes into it. This chapter takes the line apart:
# what each factor does, why the scores are divided by $\sqrt{d}$, what the mask $M$ is and the
# several ways of writing it, and what happens in the corner case where a query is allowed to
# look at nothing at all.
#
# **Learning goals**
#
# - Compute attention by hand on a six-word sentence: scores, scaling, softmax, weighted sum,
#   with the shape of every intermediate, and read one row of the result.
# - Explain, with a measurement, why the scores are divided by $\sqrt{d}$: without it the
#   softmax saturates as $d$ grows and its gradient vanishes.
# - Write causal and padding masks, in boolean and additive form, combine them, and align a
#   causal mask correctly when there are fewer queries than keys (cached decoding).
# - Know what a fully masked query row does (naive softmax gives NaN), where it happens in
#   practice, and the behaviour `attnbook` and PyTorch define for it.
# - Draw attention weights and masks as heatmaps.
# - Check your own implementation against `F.scaled_dot_product_attention` and against
#   `attnbook.attention.sdpa_reference` / `sdpa`.

# %% [markdown]
# ## Setup
#
# Everything in this chapter is small enough to print. We fix the random seed before anything
# random happens and print tensors with two decimals (a few single numbers get three), so the
# numbers you see are the numbers you get. The chapter needs PyTorch 2.5 or later: that is the
# version from which `F.scaled_dot_product_attention` handles a query with nothing to attend to
# the way this chapter does (more on that below).

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

torch.manual_seed(0)
torch.set_printoptions(precision=2, sci_mode=False)
torch_ok = torch.__version__ >= (2, 5)
assert torch_ok, f"this chapter needs torch >= 2.5, found {torch.__version__}"
print("torch >= 2.5:", torch_ok)

# %% [markdown]
# ## A toy sentence
#
# Our sentence has six words: *the cat ate and it slept*. In a real model each word would be a
# token id looked up in a learned embedding table. Here we hand-make the embeddings instead, so
# that we know what they mean. Each word gets four features:
#
# | feature | meaning | words that have it |
# | --- | --- | --- |
# | 0 `thing` | refers to something | cat, dog (and a little bit: it) |
# | 1 `action` | is a verb | ate, slept, barked |
# | 2 `glue` | a function word | the, and |
# | 3 `pronoun` | stands for something said earlier | it |
#
# A little seeded noise makes words with the same features (the/and, ate/slept) differ slightly,
# as two real embeddings would. The vocabulary also holds words for a second sentence we will
# need later, and a `<pad>` token.

# %%
vocab = ["the", "cat", "ate", "and", "it", "slept", "dog", "barked", "<pad>"]
features = torch.tensor(
    [
        # thing action glue pronoun
        [0.0, 0.0, 1.0, 0.0],  # the
        [1.0, 0.0, 0.0, 0.0],  # cat
        [0.0, 1.0, 0.0, 0.0],  # ate
        [0.0, 0.0, 1.0, 0.0],  # and
        [0.3, 0.0, 0.0, 1.0],  # it
        [0.0, 1.0, 0.0, 0.0],  # slept
        [1.0, 0.0, 0.0, 0.0],  # dog
        [0.0, 1.0, 0.0, 0.0],  # barked
        [0.0, 0.0, 0.0, 0.0],  # <pad>
    ]
)
embedding = features + 0.1 * torch.randn(features.shape)  # (vocab, n_embd)


def encode(words):
    """Token ids of a list of words."""
    return torch.tensor([vocab.index(w) for w in words])


sentence = "the cat ate and it slept".split()
x = embedding[encode(sentence)]  # (T, n_embd)
T, n_embd = x.shape
print("sentence:", sentence)
print("x shape (T, n_embd):", tuple(x.shape))
print(x)

# %% [markdown]
# ## Queries, keys and values
#
# Attention lets every position ask a question of every other position. Each input vector is
# projected three ways:
#
# - a **query** $q_i$: what position $i$ is looking for,
# - a **key** $k_j$: what position $j$ offers to be found by,
# - a **value** $v_j$: what position $j$ hands over if it is chosen.
#
# The projections are matrices ($d_\text{model} \times d$, the width $d_\text{model}$ of the paper
# is `n_embd` in code, as in GPT-2) that a real model learns. Here $d$,
# the size of each query, key and value vector, is what [chapter 1](01_buggy_sketch.ipynb) called
# `d_out`; this chapter writes $d$ because that is the letter in $\sqrt{d}$. An untrained model
# starts with random projections, which would give us a random pattern to look at. So we take seeded
# random projections and add one hand-set direction to the query and key projections, the kind of
# rule a trained head might learn: *a pronoun's query asks "who is a thing?", and a thing's key
# answers "me"*. The value projection stays purely random.

# %%
d = 4  # size of each query / key / value vector (the "head dimension")
W_q = 0.3 * torch.randn(n_embd, d)  # (n_embd, d)
W_k = 0.3 * torch.randn(n_embd, d)  # (n_embd, d)
W_v = torch.randn(n_embd, d)  # (n_embd, d)
W_q[3, 0] += 3.0  # row: input feature 3 (pronoun), column: query component 0 ("a thing?")
W_k[0, 0] += 3.0  # thing feature   -> key component 0:   "I am a thing"

Q = x @ W_q  # (T, d)
K = x @ W_k  # (T, d)
V = x @ W_v  # (T, d)
print("Q, K, V shapes:", tuple(Q.shape), tuple(K.shape), tuple(V.shape))

# %% [markdown]
# ## The whole computation in one picture
#
# Before we take the formula apart step by step, here is all of it as a map, drawn by code
# (boxes and arrows, no data). Square blue boxes are tensors, labelled with the names the code
# of this chapter gives them and with their shapes; rounded orange boxes are operations, with
# the formula on top and the code that computes it underneath. Read it from left to right:
#
# - `x` is projected three times, into `Q`, `K` and `V`: that is the cell above, `Q = x @ W_q`
#   and so on, each `W` of shape `(n_embd, d)`. All three keep one row per word, `(T, d)`.
#   (The paper calls the width of queries and keys $d_k$ and that of values $d_v$; here both
#   are $d = 4$.)
# - Only `Q` and `K` go into the top row. Their product is the table of `scores` (Step 1),
#   which is multiplied by `scale` $= 1/\sqrt{d}$ (Step 2), gets the mask $M$ added and goes
#   through a softmax along each row (Step 3), giving the `weights`. Every tensor from `scores`
#   to `weights` is a $T \times T$ matrix, one row per query $i$ and one column per key $j$: $d$
#   has disappeared from the shapes.
# - `V` takes no part in choosing where to look. It travels along the bottom and is used only
#   in Step 4, `out = weights @ V`, where row $i$ of the output is the weighted average
#   $o_i = \sum_j w_{ij} v_j$ of the rows of `V`. So `out` has one row per query and the width
#   of the values, `(T, d)`.
# - The mask in the dashed box is optional: Steps 1–4 below use none. It enters the code as the
#   `mask` argument of the function `attention` written after them, and is first used in the
#   section on the causal mask. The picture shows that causal mask for our six words: query $i$
#   may see the keys $j \le i$ (blue, where $0$ is added) and none after it (white, where
#   $-\infty$ is added, so that the softmax gives them a weight of exactly 0). A boolean `mask`
#   has the same effect: `masked_fill` writes the $-\infty$ into the scores instead of adding it.

# %%
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

TENSOR, OP = "#dbe8f6", "#fde6cc"  # fill colours: tensors (square boxes), operations (rounded)
BOX_H = 0.8  # height of every box
MID = {"ha": "center", "va": "center"}  # text centred on its point
ARROW = {"arrowstyle": "-|>", "mutation_scale": 13, "lw": 1.2, "shrinkA": 0, "shrinkB": 0}


def tensor_box(ax, x, y, name, shape, w=1.3):
    """A square box centred at (x, y) for a tensor: its name in the code, its shape below."""
    corner = (x - w / 2, y - BOX_H / 2)
    ax.add_patch(Rectangle(corner, w, BOX_H, facecolor=TENSOR, edgecolor="black"))
    ax.text(x, y + 0.15, name, fontsize=11, family="monospace", fontweight="bold", **MID)
    ax.text(x, y - 0.18, shape, fontsize=9.5, family="monospace", **MID)


def op_box(ax, x, y, formula, code, w=1.3):
    """A rounded box centred at (x, y) for an operation: its formula, the code below it."""
    corner, style = (x - w / 2, y - BOX_H / 2), "round,pad=0,rounding_size=0.2"
    ax.add_patch(FancyBboxPatch(corner, w, BOX_H, boxstyle=style, facecolor=OP, edgecolor="black"))
    ax.text(x, y + 0.15, formula, fontsize=11, **MID)
    ax.text(x, y - 0.18, code, fontsize=8.5, family="monospace", **MID)


def arrow(ax, start, end):
    """An arrow from the point start to the point end."""
    ax.add_patch(FancyArrowPatch(start, end, color="black", **ARROW))


fig, ax = plt.subplots(figsize=(13, 5.6))
fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
ax.set(xlim=(0, 16.4), ylim=(0, 7.0))
ax.axis("off")
title = "Scaled dot-product attention: data flow and shapes (here T = 6, n_embd = d = 4)"
ax.text(8.2, 6.6, title, fontsize=12, **MID)
y_q, y_k, y_v, y_s = 5.7, 4.1, 1.9, 4.9  # the rows of Q, K, V and of the scores

# x -> three projections -> Q, K, V
tensor_box(ax, 0.9, 3.9, "x", "(T, n_embd)", w=1.5)  # (T, n_embd)
for y, name in [(y_q, "q"), (y_k, "k"), (y_v, "v")]:
    arrow(ax, (1.65, 3.9), (2.4, y))
    op_box(ax, 3.1, y, rf"$x\,W_{name}$", f"x @ W_{name}", w=1.4)  # W_q: (n_embd, d)
    arrow(ax, (3.8, y), (4.35, y))
    tensor_box(ax, 5.0, y, name.upper(), "(T, d)")  # (T, d)

# Q, K -> scores -> scale -> + mask -> softmax -> weights
arrow(ax, (5.65, y_q), (6.35, y_s + 0.15))
arrow(ax, (5.65, y_k), (6.35, y_s - 0.15))
op_box(ax, 6.95, y_s, r"$Q\,K^\top$", "Q @ K.T", w=1.2)
arrow(ax, (7.55, y_s), (8.05, y_s))
tensor_box(ax, 8.75, y_s, "scores", "(T, T)", w=1.4)  # (T, T)
arrow(ax, (9.45, y_s), (9.75, y_s))
op_box(ax, 10.35, y_s, r"$\times\,1/\sqrt{d}$", "* scale", w=1.2)  # (T, T)
arrow(ax, (10.95, y_s), (11.35, y_s))
op_box(ax, 11.85, y_s, r"$+\,M$", "+ mask", w=1.0)  # (T, T)
arrow(ax, (12.35, y_s), (12.65, y_s))
op_box(ax, 13.55, y_s, "softmax per row", "dim=-1", w=1.8)  # (T, T), each row sums to 1
arrow(ax, (14.45, y_s), (14.7, y_s))
tensor_box(ax, 15.45, y_s, "weights", "(T, T)", w=1.5)  # (T, T)
note = "from scores to weights: (T, T) matrices,\nrow i = query i, column j = key j"
ax.text(8.9, 3.3, note, fontsize=9, style="italic", color="dimgray", **MID)

# the mask M, a (T, T) tensor, drawn for T = 6: the causal triangle, key j allowed if j <= i
mx, my, cell = 11.85, 2.95, 0.16  # centre of the mask's box, size of one cell of the grid
ax.add_patch(Rectangle((mx - 0.8, my - 0.85), 1.6, 1.7, fill=False, linestyle="--"))
ax.text(mx, my + 0.64, "mask  (T, T)", fontsize=9, family="monospace", **MID)
for i in range(6):  # query (row)
    for j in range(6):  # key (column)
        colour = "steelblue" if j <= i else "white"
        corner = (mx + (j - 3) * cell, my + 0.38 - (i + 1) * cell)
        ax.add_patch(Rectangle(corner, cell, cell, facecolor=colour, edgecolor="lightgray", lw=0.6))
ax.text(mx, my - 0.7, "causal, optional", fontsize=8.5, style="italic", **MID)
legend = "\n".join(["blue: 0", "(may attend)", r"white: $-\infty$", "(masked)"])
ax.text(mx + 0.95, my + 0.1, legend, fontsize=8.5, ha="left", va="center")
arrow(ax, (mx, my + 0.85), (mx, y_s - BOX_H / 2))

# weights, V -> weighted sum of the values -> out
arrow(ax, (15.45, y_s - BOX_H / 2), (15.45, y_v + BOX_H / 2))
arrow(ax, (5.65, y_v), (14.7, y_v))
op_box(ax, 15.45, y_v, r"$\Sigma_j\, w_{ij}\, v_j$", "weights @ V", w=1.5)  # (T, d)
arrow(ax, (15.45, y_v - BOX_H / 2), (15.45, 0.95))
tensor_box(ax, 15.45, 0.55, "out", "(T, d)")  # (T, d)
plt.show()

# %% [markdown]
# ## Step 1: scores
#
# How well does query $i$ match key $j$? The dot product $q_i \cdot k_j$ is large when the two
# vectors point the same way. All $T \times T$ dot products at once are one matrix product,
# $Q K^\top$: row $i$ holds the scores of query $i$ against every key.

# %%
scores = Q @ K.T  # (T, T): scores[i, j] = q_i . k_j
print("scores shape (T_q, T_k):", tuple(scores.shape))
print(scores)

# %% [markdown]
# Row 4 (the query of *it*; rows and columns are counted from 0) has one large entry, in column
# 1 (the key of *cat*); every other row is small, apart from the *cat* column (explained below,
# after the softmax), because no other word has a strong question to ask in this head.
#
# ## Step 2: scale
#
# Next the scores are multiplied by $1/\sqrt{d}$. With $d = 4$ that halves them. Why this
# particular factor is the subject of a whole section below; for now, note that it is a single
# number, so it does not change which key scores highest, only how sharply the softmax will
# prefer it.

# %%
scale = 1 / math.sqrt(d)
scaled = scores * scale  # (T, T)
print("scale = 1/sqrt(d) =", scale)
print(scaled)

# %% [markdown]
# ## Step 3: softmax
#
# The softmax along each row turns scores into **attention weights**: positive numbers that sum
# to 1, with larger scores getting exponentially more weight,
# $w_{ij} = e^{s_{ij}} / \sum_{j'} e^{s_{ij'}}$. Each row is a probability distribution over the
# keys: how much query $i$ takes from each position.

# %%
weights = torch.softmax(scaled, dim=-1)  # (T, T), softmax over the keys
print("weights shape:", tuple(weights.shape))
print(weights)
print("every row sums to 1:", torch.allclose(weights.sum(dim=-1), torch.ones(T)))

# %% [markdown]
# ## Step 4: weighted sum of values
#
# Finally each position's output is the weighted average of the value vectors, using its row of
# weights: $o_i = \sum_j w_{ij} v_j$, again one matrix product.

# %%
out = weights @ V  # (T, T) @ (T, d) -> (T, d)
print("output shape (T, d):", tuple(out.shape))
print(out)

# %% [markdown]
# ## Reading one row: which words does *it* look at?
#
# Row 4 of the weights says how the output for *it* was put together.

# %%
i = sentence.index("it")
for word, w in zip(sentence, weights[i].tolist(), strict=True):
    print(f"  it -> {word:<6} {w:.3f}  " + "#" * round(40 * w))
print("length of each key:", [f"{word} {n:.2f}" for word, n in zip(sentence, K.norm(dim=-1), strict=True)])

# %% [markdown]
# *It* puts almost all of its weight on *cat*, so its output is almost exactly the value vector
# of *cat*: attention has copied information about the cat into the position of the pronoun.
# The other rows are spread out (weights between 0.08 and 0.23, where 1/6 ≈ 0.17 would be
# uniform): their queries are small random vectors, and small score differences make small
# weight differences. One column still stands out in those rows, *cat*'s, in both directions:
# *the*, *cat* and *and* give it their lowest weight (0.08, from scores near −1.9), *ate* and
# *slept* their joint highest (0.19, tied with *it* at two decimals). The hand-set
# `W_k[0, 0] += 3` made *cat*'s key several times as long as the others (the key lengths are
# printed above), so even a small random query has a sizeable dot product with it, positive or
# negative depending on which way the query happens to point.
#
# An attention map shows all rows at once; the helper below draws one with the words on the
# axes, and we will reuse it. Exact zeros (masked entries, later) are left unlabelled so that the
# pattern stays visible, and light grid lines separate the cells.


# %%
def show_weights(ax, w, keys, queries, title, annotate=True):
    """Draw a (T_q, T_k) weight matrix (or a mask) as a heatmap with words on the axes."""
    im = ax.imshow(w, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right")
    ax.set_yticks(range(len(queries)), queries)
    # light lines between the cells, so that neighbouring cells of one colour stay distinct
    ax.set_xticks([c - 0.5 for c in range(1, len(keys))], minor=True)
    ax.set_yticks([r - 0.5 for r in range(1, len(queries))], minor=True)
    ax.grid(which="minor", color="lightgray", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title, fontsize=10)
    if annotate:
        for r in range(w.shape[0]):
            for c in range(w.shape[1]):
                value = float(w[r, c])
                if value == 0.0:  # masked: leave the cell blank
                    continue
                color = "white" if value > 0.6 else "black"
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    return im


fig, ax = plt.subplots(figsize=(5, 4.2), layout="constrained")
im = show_weights(ax, weights, sentence, sentence, "Attention weights, no mask")
fig.colorbar(im, ax=ax, label="weight")
plt.show()

# %% [markdown]
# ## Why divide by $\sqrt{d}$?
#
# Take a query and a key whose $d$ entries are independent with mean 0 and variance 1 (roughly
# what a well-initialised network produces). Their dot product $q \cdot k = \sum_{m=1}^{d} q_m k_m$
# is a sum of $d$ independent terms, each with mean 0 and variance $1 \cdot 1 = 1$. Variances of
# independent terms add, so
#
# $$\operatorname{Var}(q \cdot k) = d, \qquad \operatorname{Var}\!\left(\frac{q \cdot k}{\sqrt{d}}\right) = 1 .$$
#
# Let us measure it rather than trust the algebra: many random pairs, for several $d$.

# %%
torch.manual_seed(1)
dims = [1, 4, 16, 64, 256, 1024]
print(f"{'d':>5} {'Var(q.k)':>9} {'Var(q.k / sqrt d)':>18}")
ratios = []
for dim in dims:
    q_s = torch.randn(5000, dim, dtype=torch.float64)  # 5000 random queries
    k_s = torch.randn(5000, dim, dtype=torch.float64)  # and keys, entries ~ N(0, 1)
    dots = (q_s * k_s).sum(-1)  # (5000,) one dot product per pair
    ratios.append((dots / dim**0.5).var().item())  # = Var(q.k) / d
    print(f"{dim:>5} {dots.var().item():>9.1f} {ratios[-1]:>18.2f}")
assert all(abs(r - 1) < 0.15 for r in ratios), "Var(q.k) should grow like d"
print("Var(q.k) / d is within 15% of 1 for every d:", True)

# %% [markdown]
# The variance grows in proportion to $d$, so the typical size of a score grows like $\sqrt{d}$.
# Why is that bad? The softmax is sensitive to *differences* between scores: a gap of 5 between
# the largest score and the next gives the winner $e^5 \approx 150$ times the weight. One
# standard deviation of the scores is $\sqrt{d}$, about 32 at $d = 1024$ (the table prints the
# variance, 1047.7), so the scores span about $\pm 96$ (three standard deviations): the gaps
# are tens of units wide and the softmax becomes a hard one-hot choice. Two things go wrong then:
#
# 1. The head can only *pick* one key, not *mix* several.
# 2. The softmax's gradient vanishes. Its Jacobian is
#    $\partial p_a / \partial s_b = p_a(\delta_{ab} - p_b)$ for one row of scores $s$ and its
#    weights $p$, which is zero when one $p_a$ is 1 and the others are 0. A saturated head
#    receives almost no learning signal through its scores.
#
# Dividing by $\sqrt{d}$ brings the scores back to unit variance, whatever $d$ is. Below we
# measure three things for 500 rows of 16 random keys each, with and without the scaling, and
# average each over the rows: the largest weight in a row (1 = one-hot), the entropy of the row
# ($\ln 16 \approx 2.77$ = uniform, 0 = one-hot; [chapter 1](01_buggy_sketch.ipynb)'s Exercise 4 measured
# this one alone), and the size of the row's $16 \times 16$ softmax Jacobian, measured by its
# Frobenius norm $\lVert J \rVert_F = \sqrt{\sum_{i,j} J_{ij}^2}$ (how strongly the weights respond
# to the scores; 0 means no gradient gets through).

# %%
torch.manual_seed(2)
n_rows, n_keys = 500, 16
stats = {"unscaled": [], "scaled": []}  # per d: (max weight, entropy, Jacobian norm)
for dim in dims:
    q_s = torch.randn(n_rows, 1, dim)
    k_s = torch.randn(n_rows, n_keys, dim)
    raw = (q_s @ k_s.transpose(-2, -1)).squeeze(1)  # (n_rows, n_keys)
    for name, s in [("unscaled", raw), ("scaled", raw / dim**0.5)]:
        p = torch.softmax(s, dim=-1)  # (n_rows, n_keys)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (n_rows,)
        jac = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n_rows, n_keys, n_keys)
        stats[name].append(
            (
                p.max(-1).values.mean().item(),
                entropy.mean().item(),
                jac.norm(dim=(-2, -1)).mean().item(),
            )
        )

print(f"{'d':>5} | {'max weight':^17} | {'entropy':^17} | {'Jacobian norm':^17}")
print(f"{'':>5} | {'unscaled  scaled':^17} | {'unscaled  scaled':^17} | {'unscaled  scaled':^17}")
for dim, u, s in zip(dims, stats["unscaled"], stats["scaled"], strict=True):
    print(
        f"{dim:>5} | {u[0]:>7.2f} {s[0]:>8.2f} | {u[1]:>7.2f} {s[1]:>8.2f} | {u[2]:>7.2f} {s[2]:>8.2f}"
    )

# %% [markdown]
# The same numbers as a picture:

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
titles = ["largest weight in a row", "entropy of a row", "softmax Jacobian, Frobenius norm"]
ylabels = ["max weight (1 = one-hot)", "entropy (nats)", "Frobenius norm (mean over rows)"]
for m, (ax, title, ylabel) in enumerate(zip(axes, titles, ylabels, strict=True)):
    for name, style in [("unscaled", "o-"), ("scaled", "s--")]:
        label = "scores q·k" if name == "unscaled" else "scores q·k / √d"
        ax.plot(dims, [row[m] for row in stats[name]], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("head dimension d")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
axes[1].axhline(math.log(n_keys), color="gray", lw=0.8, ls=":", label="uniform (log 16)")
fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncols=3)
fig.suptitle(f"Softmax over {n_keys} random keys: saturation as d grows")
plt.show()

# %% [markdown]
# Without scaling, the largest weight climbs towards 1 and the entropy falls towards 0. The
# Jacobian norm first rises a little (0.28 at $d = 1$, 0.32 at $d = 4$: weights that move away
# from uniform can respond more), then falls steadily to 0.05 at $d = 1024$: the softmax
# saturates and stops passing gradient. With scaling, the three numbers move a little between
# $d = 1$ and $d = 4$ (the largest weight goes from 0.20 to 0.24: at $d = 1$ a row's scores are
# $q \cdot k_j$ for one random number $q$, so their spread is $|q|$, which is often small; as
# $d$ grows the spread settles near 1) and then stay flat all the way to $d = 1024$. The scaled
# rows are still not uniform (largest weight 0.25, entropy 2.35 against $\ln 16 \approx 2.77$
# for uniform); the point is that they stop depending on $d$. We turn that into a check:

# %%
unscaled_big, scaled_big = stats["unscaled"][-1], stats["scaled"][-1]  # d = 1024
assert unscaled_big[0] > 0.9, "unscaled softmax should be close to one-hot at d=1024"
assert unscaled_big[2] < 0.25 * scaled_big[2], "its Jacobian should be much smaller"
for m, what in enumerate(["max weight", "entropy", "Jacobian norm"]):
    from_4 = [row[m] for row in stats["scaled"][1:]]  # scaled, d = 4 .. 1024
    assert max(from_4) - min(from_4) < 0.05, f"scaled {what} should not depend on d"
print("d=1024 unscaled: max weight > 0.9 and Jacobian norm < 1/4 of the scaled one:", True)
print("scaled: all three within 0.05 of each other for d = 4 .. 1024:", True)

# %% [markdown]
# ## An attention function
#
# Time to wrap the four steps into a function, `attention(q, k, v, mask=None)`. Two choices
# make it useful beyond our toy sentence:
#
# - It works on any number of leading dimensions, `(..., T, d)`, so the same code handles one
#   sentence `(T, d)`, a batch `(B, T, d)` or a batch of heads `(B, H, T, d)`. That is why it
#   transposes with `k.transpose(-2, -1)` rather than `k.T`.
# - It takes an optional `mask` that is applied to the scores before the softmax. The mask may
#   be **boolean** (`True` = this query may attend to this key, the convention of
#   `F.scaled_dot_product_attention` and of `attnbook`), in which case `masked_fill` writes
#   `-inf` into the forbidden scores, or **additive** (a float tensor added to the scores, `-inf`
#   where attending is forbidden). Both forms are explained in the next sections.
#
# It returns the output and the weights, so that we can draw them.


# %%
def attention(q, k, v, mask=None):
    """softmax(q kᵀ / sqrt(d) + mask) v for q (..., T_q, d), k (..., T_k, d), v (..., T_k, d_v).

    mask: None, a boolean tensor (True = may attend) or a float tensor added to the scores,
    broadcastable to (..., T_q, T_k). Returns (output (..., T_q, d_v), weights (..., T_q, T_k)).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))  # forbidden pairs get -inf
    elif mask is not None:
        scores = scores + mask  # additive form: 0 keeps a score, -inf removes it
    weights = torch.softmax(scores, dim=-1)  # (..., T_q, T_k)
    return weights @ v, weights  # (..., T_q, d_v), (..., T_q, T_k)


out_f, weights_f = attention(Q, K, V)
print("same output as the four steps:", torch.allclose(out_f, out, atol=1e-5))
print("same weights as the four steps:", torch.allclose(weights_f, weights, atol=1e-5))

# %% [markdown]
# ## The causal mask
#
# A decoder (a GPT) is trained to predict the next token at every position at once: position 0
# predicts word 1, position 1 predicts word 2, and so on, all from one forward pass over the
# whole sentence. If position 1 could attend to position 2, it could simply read the word it is
# supposed to predict, and the model would learn to copy instead of to predict. At generation
# time the future does not exist yet, so a model trained with a peek would fail.
#
# The **causal mask** forbids that: query $i$ may attend to key $j$ only if $j \le i$. As a
# boolean matrix it is the lower triangle, diagonal included.

# %%
causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): causal[i, j] = (j <= i)
print(causal.int())

out_c, weights_c = attention(Q, K, V, mask=causal)
print("weights with the causal mask:")
print(weights_c)
print("nothing above the diagonal:", bool((weights_c.triu(diagonal=1) == 0).all()))
print("every row still sums to 1:", torch.allclose(weights_c.sum(-1), torch.ones(T)))

# %% [markdown]
# Row 0 (*the*) can only see itself, so its weight there is 1. *It* (row 4) still finds *cat*,
# which comes before it. Masking works by putting $-\infty$ into the forbidden scores:
# $e^{-\infty} = 0$, so they get exactly zero weight and the remaining weights renormalise
# among the allowed keys.
#
# ## Padding masks: a batch of two sentences
#
# To process several sentences in one tensor they must have the same length. The shorter ones
# are **padded** with a filler token up to the longest. Our batch: the six-word sentence, and
# *the dog barked* followed by three `<pad>` tokens (right padding).

# %%
batch_words = [
    "the cat ate and it slept".split(),
    "the dog barked <pad> <pad> <pad>".split(),
]
lengths = torch.tensor([6, 3])  # real tokens per sentence
xb = embedding[torch.stack([encode(ws) for ws in batch_words])]  # (B, T, n_embd)
Qb, Kb, Vb = xb @ W_q, xb @ W_k, xb @ W_v  # each (B, T, d)
print("batch x:", tuple(xb.shape), " Q, K, V:", tuple(Qb.shape))

# %% [markdown]
# The pad tokens carry no meaning, so no real word should take information from them: the pad
# positions must be masked *as keys*. The padding mask therefore has one entry per key, per
# sentence, shape `(B, T_k)`; to apply it to scores of shape `(B, T_q, T_k)` we insert a query
# axis, `(B, 1, T_k)`, and let broadcasting repeat it for every query.

# %%
key_is_real = torch.arange(T)[None, :] < lengths[:, None]  # (B, T_k)
print("key padding mask (B, T_k):")
print(key_is_real.int())
pad_mask = key_is_real[:, None, :]  # (B, 1, T_k), broadcasts over the queries
out_p, weights_p = attention(Qb, Kb, Vb, mask=pad_mask)
print("weights of sentence 2 (the dog barked + 3 pads):")
print(weights_p[1])

# %% [markdown]
# Every row of sentence 2 spreads its weight over the three real words only; the pad columns
# are exactly 0. The pad *queries* (rows 3 to 5) still produce outputs: they attend to the real
# words like anyone else. That is harmless, because nothing downstream reads them (the loss
# ignores pad positions), and it avoids a problem we meet in a moment.
#
# And sentence 1, which has no padding, is unaffected by being batched with a shorter sentence:

# %%
print("sentence 1 in the batch == sentence 1 alone:", torch.allclose(out_p[0], out_f, atol=1e-5))

# %% [markdown]
# ## Boolean vs additive masks
#
# A mask can be written two ways.
#
# - **Boolean**: `True` where a query may attend. The attention code turns `False` into `-inf`
#   with `masked_fill`.
# - **Additive**: a float tensor that is simply added to the scores: `0` where allowed (the
#   score is unchanged), `-inf` where not. This form is more general: any finite value is a
#   *bias* on the scores. ALiBi ([chapter 6](06_positions.ipynb)) adds a distance penalty this way,
#   and T5 adds a learned relative-position bias.
#
# For a pure allow/forbid pattern the two give the same result. Careful with the direction of
# the boolean: `torch.nn.MultiheadAttention` uses the opposite convention for *both* of its
# boolean masks, `key_padding_mask` and `attn_mask` (`True` = may **not** attend), while
# `F.scaled_dot_product_attention` uses ours. [Chapter 3](03_multi_head_attention.ipynb) compares
# against that module and flips its masks with `~`. In this book `True` always means *may attend*.


# %%
def to_additive(mask):
    """Boolean mask (True = may attend) -> float mask (0 = may attend, -inf = may not)."""
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


causal_add = to_additive(causal)  # (T, T)
print(causal_add)
out_ca, weights_ca = attention(Q, K, V, mask=causal_add)
print("causal, boolean vs additive, same output:", torch.equal(out_ca, out_c))
out_pa, _ = attention(Qb, Kb, Vb, mask=to_additive(pad_mask))
print("padding, boolean vs additive, same output:", torch.equal(out_pa, out_p))

# %% [markdown]
# Not only close: bit-for-bit equal, because $s + 0 = s$ and $s + (-\infty) = -\infty$ exactly.
#
# ## Combining masks
#
# A decoder fed a padded batch needs both masks at once: a query may attend to a key if the key
# is in its past **and** the key is a real token. With booleans that is `&` (and broadcasting
# does the shape work: `(T, T)` & `(B, 1, T)` → `(B, T, T)`). With additive masks it is `+`:
# $0 + 0 = 0$, and anything plus $-\infty$ is $-\infty$.

# %%
both = causal & pad_mask  # (T, T) & (B, 1, T) -> (B, T, T)
print("combined mask shape:", tuple(both.shape))
print("sentence 2, causal & padding:")
print(both[1].int())
both_add = causal_add + to_additive(pad_mask)  # (B, T, T)
print("boolean & == additive +:", torch.equal(to_additive(both), both_add))

out_b, weights_b = attention(Qb, Kb, Vb, mask=both)
out_ba, _ = attention(Qb, Kb, Vb, mask=both_add)
print("same output:", torch.equal(out_b, out_ba))

# %% [markdown]
# ## Fewer queries than keys: where the causal mask sits
#
# During generation a model does not recompute the whole sentence for every new word. It keeps
# the keys and values of the words it has already seen (the **KV cache**,
# [chapter 7](07_kv_cache.ipynb)) and runs attention for the new word only: **one query over $T_k$
# keys**, the last of which is the new word's own key. That query sits at the *end* of the sequence,
# so it may see every key.
#
# In general, with $T_q$ queries that are the last $T_q$ of $T_k$ positions, query $i$ sits at
# position $T_k - T_q + i$ and may see keys $0 \ldots T_k - T_q + i$. The triangle must be
# aligned to the **bottom-right** corner of the $(T_q, T_k)$ matrix: `tril(diagonal=T_k - T_q)`.
#
# `F.scaled_dot_product_attention(..., is_causal=True)` instead aligns the triangle to the
# **top-left** corner (it takes `tril()` of a $(T_q, T_k)$ matrix of ones): it treats the queries
# as the *first* $T_q$ positions. With $T_q = T_k$ the two agree; otherwise they do not.


# %%
def causal_bottom_right(t_q, t_k):
    """(t_q, t_k) boolean mask for queries that are the last t_q of t_k positions."""
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)


def causal_top_left(t_q, t_k):
    """What is_causal=True uses: queries taken as the first t_q positions."""
    return torch.ones(t_q, t_k, dtype=torch.bool).tril()


for t_q in (1, 2):
    print(f"T_q={t_q}, T_k={T}   bottom-right (correct for a cache):   top-left (is_causal=True):")
    for br, tl in zip(
        causal_bottom_right(t_q, T).int(), causal_top_left(t_q, T).int(), strict=True
    ):
        print(f"{'':>13}{br.tolist()}{'':>18}{tl.tolist()}")

# %% [markdown]
# The same two masks for $T_q = 2$ as pictures: the two new words *it* and *slept* over all six
# keys. Bottom-right, *slept* sees everything and *it* everything but *slept*; top-left, they
# would see only *the* and *the cat*.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 2.6), layout="constrained")
show_weights(
    axes[0],
    causal_bottom_right(2, T).float(),
    sentence,
    sentence[-2:],
    "bottom-right (attnbook)",
    annotate=False,
)
show_weights(
    axes[1],
    causal_top_left(2, T).float(),
    sentence,
    sentence[-2:],
    "top-left (is_causal=True)",
    annotate=False,
)
fig.suptitle("Causal masks for 2 queries over 6 keys (dark = may attend, white = masked)")
plt.show()

# %% [markdown]
# Now concretely. Pretend *the cat ate and it* is already in the cache and *slept* arrives: its
# query is the last row of `Q`, attending over all six keys. With the bottom-right mask the
# result equals the last row of full causal attention over the sentence, which is exactly what
# a cache must reproduce. With `is_causal=True` the single query sees only key 0 (*the*), so its
# output is just the value of *the*.

# %%
q_new = Q[-1:]  # (1, d): the query of "slept"
out_br, _ = attention(q_new, K, V, mask=causal_bottom_right(1, T))
out_tl = F.scaled_dot_product_attention(q_new, K, V, is_causal=True)
print(
    "bottom-right == last row of full causal attention:",
    torch.allclose(out_br, out_c[-1:], atol=1e-5),
)
print(
    "is_causal=True == last row of full causal attention:",
    torch.allclose(out_tl, out_c[-1:], atol=1e-5),
)
print("is_causal=True == value of 'the' alone:", torch.allclose(out_tl, V[:1], atol=1e-5))

# %% [markdown]
# So when decoding from a cache, pass an explicit bottom-right mask (or, for a single query, no
# mask at all, since it may see everything) and never `is_causal=True`. `attnbook`'s
# `causal_mask(t_q, t_k)` is bottom-right aligned for this reason. PyTorch ships the same
# alignment as a ready-made mask object, `torch.nn.attention.bias.causal_lower_right(t_q, t_k)`,
# which `F.scaled_dot_product_attention` accepts as its `attn_mask` (and `causal_upper_left` is
# the `is_causal=True` pattern). With the last two words as queries:

# %%
from torch.nn.attention.bias import causal_lower_right

q_two = Q[-2:]  # (2, d): the queries of "it" and "slept"
out_lr = F.scaled_dot_product_attention(q_two, K, V, attn_mask=causal_lower_right(2, T))
out_two, _ = attention(q_two, K, V, mask=causal_bottom_right(2, T))
assert torch.allclose(out_lr, out_two, atol=1e-5) and torch.allclose(out_lr, out_c[-2:], atol=1e-5)
print("causal_lower_right == our bottom-right mask == last 2 rows of full causal:", True)

# %% [markdown]
# ## A fully masked row
#
# What if a query is allowed to attend to *no* key? Its scores are all $-\infty$, and the softmax
# computes $e^{-\infty} / \sum e^{-\infty} = 0/0$, which is NaN:

# %%
print(torch.softmax(torch.tensor([float("-inf")] * 4), dim=-1))

# %% [markdown]
# This happens for real. Batched generation usually pads prompts on the **left**, so that all
# of them end at the same position and the next token is appended at the same index for every
# sentence. Take *the dog barked* left-padded to six tokens. Under causal & padding, the pad
# query at position 0 may see only key 0, which is a pad; it has nothing to attend to. The same
# holds for positions 1 and 2.

# %%
left_words = "<pad> <pad> <pad> the dog barked".split()
xl = embedding[encode(left_words)]  # (T, n_embd)
Ql, Kl, Vl = xl @ W_q, xl @ W_k, xl @ W_v  # each (T, d)
left_real = torch.arange(T) >= T - 3  # (T_k,): the last 3 keys are real
left_mask = causal & left_real[None, :]  # (T, T)
print(left_mask.int())
print("rows with no allowed key:", (~left_mask.any(-1)).nonzero().flatten().tolist())

out_l, weights_l = attention(Ql, Kl, Vl, mask=left_mask)
print("weights:")
print(weights_l)
print("output rows containing NaN:", out_l.isnan().any(-1).nonzero().flatten().tolist())

# %% [markdown]
# Rows 0–2 are NaN. One might think this is harmless, since these are pad positions nobody
# reads. It is not: the output of one layer is the input of the next, where these rows become
# keys and values. They are masked there, with weight exactly 0, but $0 \times \text{NaN}$ is
# NaN, so the NaN leaks into the real tokens through the matrix product. Feeding the outputs
# through a second attention layer shows it:

# %%
out_l2, _ = attention(out_l, out_l, out_l, mask=left_mask)
print("after a second layer, NaN rows:", out_l2.isnan().any(-1).nonzero().flatten().tolist())
print("0 * nan =", 0.0 * float("nan"))

# %% [markdown]
# Now every position is NaN, including *the dog barked*, and the loss would be NaN too. The fix
# is to *define* what a query with nothing to look at returns: it attends to nothing, so its
# weights are all zero and its output is the zero vector. That is what `attnbook` does, and what
# `F.scaled_dot_product_attention` does from PyTorch 2.5 on (its implementation's behaviour,
# which the next cells check on CPU, rather than a documented promise). We add it to our function in three
# lines: find the rows whose scores are all $-\infty$; give those rows finite scores (0) before
# the softmax, so that it never computes $0/0$; and set their weights to zero after it. Zeroing
# the weights afterwards would be enough for the forward pass, but training also runs the
# backward pass through the softmax, and the softmax of an all-$-\infty$ row has NaN in its
# gradient as well. Replacing the scores first keeps the NaN out of both passes; `attnbook`'s
# `sdpa_reference` does the same.


# %%
naive_attention = attention  # keep the first version, to compare gradients below


def attention(q, k, v, mask=None):
    """softmax(q kᵀ / sqrt(d) + mask) v for q (..., T_q, d), k (..., T_k, d), v (..., T_k, d_v).

    mask: None, a boolean tensor (True = may attend) or a float tensor added to the scores,
    broadcastable to (..., T_q, T_k). A query row with no allowed key gets zero weights and a
    zero output. Returns (output (..., T_q, d_v), weights (..., T_q, T_k)).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    empty_rows = scores.isneginf().all(dim=-1, keepdim=True)  # (..., T_q, 1): no allowed key
    weights = torch.softmax(scores.masked_fill(empty_rows, 0.0), dim=-1)  # no 0/0 anywhere
    weights = weights.masked_fill(empty_rows, 0.0)  # (..., T_q, T_k): such a row attends to nothing
    return weights @ v, weights  # (..., T_q, d_v), (..., T_q, T_k)


out_l, weights_l = attention(Ql, Kl, Vl, mask=left_mask)
print(weights_l)
print("rows 0-2 of the output are zero:", bool((out_l[:3] == 0).all()))
out_l2, _ = attention(out_l, out_l, out_l, mask=left_mask)
print("no NaN after a second layer:", not out_l2.isnan().any().item())
torch_out = F.scaled_dot_product_attention(Ql, Kl, Vl, attn_mask=left_mask)
print("torch's SDPA agrees, zeros included:", torch.allclose(torch_out, out_l, atol=1e-5))

# %% [markdown]
# Now the gradient. We put a loss on the three real tokens only, as training would, and
# differentiate with respect to the queries, using the additive form of the left-padded mask
# (the form that ALiBi and T5's position biases take). With the boolean mask the naive gradient
# happens to be free of NaN, because `masked_fill` sends no gradient to the entries it
# overwrote; an additive mask passes the gradient of `scores + mask` straight through. The
# naive version then sends NaN back into the pad queries even though the loss never looks at
# them: their upstream gradient is zero, but the softmax's backward multiplies it by their NaN
# weights, and $0 \cdot \text{NaN} = \text{NaN}$. The fixed one does not, and its gradient equals
# `sdpa_reference`'s.

# %%
from attnbook.attention import sdpa_reference

left_add = to_additive(left_mask)  # (T, T): 0 / -inf, rows 0-2 all -inf
grads = {}
for name, fn in [("naive", naive_attention), ("fixed", attention)]:
    q_g = Ql.clone().requires_grad_()
    out_g, _ = fn(q_g, Kl, Vl, mask=left_add)
    out_g[3:].sum().backward()  # a loss on the real tokens only
    grads[name] = q_g.grad
    print(f"{name} attention: NaN in the gradient of the queries:", q_g.grad.isnan().any().item())
q_g = Ql.clone().requires_grad_()
sdpa_reference(q_g, Kl, Vl, attn_mask=left_add)[3:].sum().backward()
assert grads["naive"].isnan().any() and not grads["fixed"].isnan().any()
assert torch.allclose(grads["fixed"], q_g.grad, atol=1e-5)
print("fixed gradient == sdpa_reference's gradient:", True)

# %% [markdown]
# Two remarks. First, the real rows 3–5 did not change: the fix only touches rows that were NaN.
# Second, right padding with a key-only padding mask never creates such a row (a pad query at the
# end still sees the real words before it), which is one reason training code pads on the right;
# a fully masked row appears with left padding, with an empty sequence (length 0), or when the
# pad *queries* are masked as well.
#
# ## Attention maps
#
# Masks and weights are both $(T_q, T_k)$ matrices, so both read well as heatmaps. First the
# masks of this chapter (dark = may attend):

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), layout="constrained")
show_weights(axes[0], causal.float(), sentence, sentence, "causal", annotate=False)
words_r, words_l = batch_words[1], left_words
show_weights(axes[1], both[1].float(), words_r, words_r, "causal & right padding", annotate=False)
show_weights(axes[2], left_mask.float(), words_l, words_l, "causal & left padding", annotate=False)
fig.suptitle("Masks (dark = may attend, white = masked); with left padding, rows 0-2 are empty")
plt.show()

# %% [markdown]
# Then the attention weights they produce on our two sentences. Compare the first map with the
# unmasked one earlier: every row is renormalised over its past. In the right-padded sentence the
# pad columns are empty; in the left-padded one the pad rows are empty too (all-zero weights).
# The real rows are the same in both panels: nothing in this attention knows where a token sits
# in the sequence, which is what positions ([chapter 6](06_positions.ipynb)) add.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
show_weights(axes[0], weights_c, sentence, sentence, "the cat ate and it slept, causal")
show_weights(axes[1], weights_b[1], words_r, words_r, "right padded: causal & padding")
im = show_weights(axes[2], weights_l, words_l, words_l, "left padded: causal & padding")
fig.colorbar(im, ax=list(axes), label="weight", shrink=0.8)
plt.show()

# %% [markdown]
# ## Our function against `F.scaled_dot_product_attention`
#
# PyTorch ships the same computation as one fused function,
# `F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, scale=None)`, with the
# same boolean convention (`True` = may attend) and the same zero rows for fully masked queries.
# With its fused back-ends (flash, memory-efficient) it can avoid forming the $T_q \times T_k$
# weight matrix in memory, which is why it is faster on long sequences; its plain "math"
# fallback, used for some inputs, does form it, as ours does. Let us check that ours agrees on
# random multi-head inputs `(B, H, T, d)` under a range of masks, including per-head masks,
# additive masks, fewer queries than keys, and rows with nothing to attend to. Every case,
# including the empty rows and $T_q < T_k$, asserts a maximum absolute difference below
# $10^{-5}$.

# %%
torch.manual_seed(3)
B, H, Tq, Tk, D = 2, 3, 7, 7, 16
q_r, k_r, v_r = torch.randn(B, H, Tq, D), torch.randn(B, H, Tk, D), torch.randn(B, H, Tk, D)
lens = torch.tensor([7, 4])
right_pad = (torch.arange(Tk)[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, T_k)
left_pad = (torch.arange(Tk)[None, :] >= Tk - lens[:, None])[:, None, None, :]  # (B, 1, 1, T_k)
tril = torch.ones(Tq, Tk, dtype=torch.bool).tril()
cases = {
    "no mask": None,
    "causal (boolean)": tril,
    "causal (additive)": to_additive(tril),
    "right padding & causal": right_pad & tril,
    "left padding & causal (empty rows)": left_pad & tril,
    "random per-head boolean": torch.rand(B, H, Tq, Tk) > 0.5,
    "random float bias + -inf": torch.randn(Tq, Tk).masked_fill(~tril, float("-inf")),
}
pairs = {}  # name -> (ours, theirs)
for name, mask in cases.items():
    pairs[name] = (
        attention(q_r, k_r, v_r, mask=mask)[0],
        F.scaled_dot_product_attention(q_r, k_r, v_r, attn_mask=mask),
    )
pairs["causal mask vs is_causal=True"] = (
    attention(q_r, k_r, v_r, mask=tril)[0],
    F.scaled_dot_product_attention(q_r, k_r, v_r, is_causal=True),
)
q_1 = q_r[:, :, -2:]  # (B, H, 2, D): the last two queries over all 7 keys
pairs["T_q=2 < T_k=7, bottom-right mask"] = (
    attention(q_1, k_r, v_r, mask=causal_bottom_right(2, Tk))[0],
    F.scaled_dot_product_attention(q_1, k_r, v_r, attn_mask=causal_bottom_right(2, Tk)),
)
for name, (ours, theirs) in pairs.items():
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, (name, diff)
    print(f"{name:<36} max |diff| < 1e-5: {diff < 1e-5}")

# %% [markdown]
# ## Check against the module
#
# The book's package holds the tested versions of everything in this chapter:
#
# - `attnbook.attention.sdpa_reference(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0,
#   scale=None, return_weights=False)`: the explicit math, like our `attention`, and it can return
#   the weights;
# - `attnbook.attention.sdpa(...)`: the same arguments on the fast path,
#   `F.scaled_dot_product_attention`;
# - `attnbook.attention.causal_mask(t_q, t_k=None)` (bottom-right aligned),
#   `padding_mask(lengths, t)` → `(B, t)` for right padding, and `additive_mask(mask)`.
#
# The cell below feeds the same tensors to our notebook functions and to the module, and asserts
# that masks agree exactly and outputs and weights agree within an absolute tolerance of $10^{-5}$.
# Every case is compared with both `sdpa_reference` and `sdpa`. One case passes a padding mask
# *and* `is_causal=True`: `F.scaled_dot_product_attention` itself refuses that combination
# ("Explicit attn_mask should not be set when is_causal=True"), so `attnbook`'s `sdpa` first folds
# the causal mask into the given one, exactly as `sdpa_reference` does.

# %%
from attnbook.attention import additive_mask, causal_mask, padding_mask, sdpa, sdpa_reference

# the masks: ours vs the module's
assert torch.equal(causal_mask(T), causal)
assert all(torch.equal(causal_mask(t_q, 9), causal_bottom_right(t_q, 9)) for t_q in range(1, 10))
assert torch.equal(padding_mask(lengths, T), key_is_real)
assert torch.equal(additive_mask(both), to_additive(both))

pad = padding_mask(lens, Tk)[:, None, None, :]  # (B, 1, 1, T_k): right padding
# flip(-1) reverses each row of the right-padding mask, so the real tokens come last: left padding
left_pad_m = padding_mask(lens, Tk).flip(-1)[:, None, None, :]  # (B, 1, 1, T_k)
causal_m = causal_mask(Tq)  # (T_q, T_k), the module's causal mask
# name -> ((q, k, v), mask for our attention, keyword arguments for the module)
qkv_r = (q_r, k_r, v_r)
module_cases = {
    "no mask": (qkv_r, None, {}),
    "causal": (qkv_r, tril, {"attn_mask": causal_m}),
    "padding & causal": (qkv_r, pad & tril, {"attn_mask": pad & causal_m}),
    "left padding & causal": (qkv_r, left_pad_m & tril, {"attn_mask": left_pad_m & causal_m}),
    "additive causal": (qkv_r, to_additive(tril), {"attn_mask": additive_mask(causal_m)}),
    "padding mask + is_causal=True": (qkv_r, pad & tril, {"attn_mask": pad, "is_causal": True}),
    "T_q=2 < T_k=7 (cached decoding)": (
        (q_1, k_r, v_r),
        causal_bottom_right(2, Tk),
        {"attn_mask": causal_mask(2, Tk)},
    ),
    "toy sentence, left padded": ((Ql, Kl, Vl), left_mask, {"attn_mask": left_mask}),
}
atol = 1e-5
for name, ((q, k, v), mask, kwargs) in module_cases.items():
    ours, ours_w = attention(q, k, v, mask=mask)
    ref, ref_w = sdpa_reference(q, k, v, **kwargs, return_weights=True)
    fast = sdpa(q, k, v, **kwargs)
    assert torch.allclose(ours, ref, atol=atol) and torch.allclose(ours_w, ref_w, atol=atol), name
    assert torch.allclose(ours, fast, atol=atol), name
print(f"masks identical; on {len(module_cases)} cases (atol {atol}):")
print("notebook attention == sdpa_reference (outputs and weights) == sdpa (outputs)")

# %% [markdown]
# ## Summary
#
# - Attention is four steps: scores $QK^\top$, scale by $1/\sqrt{d}$, softmax over the keys,
#   weighted sum of the values. Each row of the weights says where one position reads from.
# - $\operatorname{Var}(q\cdot k) = d$ for unit-variance entries; without the $1/\sqrt{d}$ the
#   softmax saturates as $d$ grows and its gradient vanishes.
# - Masks decide who may attend to whom. Boolean (`True` = may attend) and additive ($0$ / $-\infty$)
#   forms are equivalent for allow/forbid patterns; combine booleans with `&`, additive masks with
#   `+`. Causal masks for $T_q < T_k$ must be aligned bottom-right; `is_causal=True` aligns
#   top-left.
# - A query with nothing to attend to gives NaN in a naive softmax, and the NaN spreads through
#   later layers; the defined behaviour is zero weights and a zero output. Give such rows finite
#   scores before the softmax and zero their weights after it, so that neither the forward nor
#   the backward pass sees $0/0$.
#
# ## Further reading
#
# - Vaswani et al., *Attention Is All You Need* (2017), section 3.2: scaled dot-product attention
#   and the $\sqrt{d_k}$ argument.
# - Luong, Pham and Manning, *Effective Approaches to Attention-based Neural Machine Translation*
#   (EMNLP 2015): dot-product scores against additive ones.
# - Bahdanau, Cho and Bengio (ICLR 2015): the first attention weights drawn as maps.
#
# ## Exercises
#
# Worked solutions, with code and checks, are in
# [`solutions/02_scaled_dot_product_attention_solutions.ipynb`](solutions/02_scaled_dot_product_attention_solutions.ipynb).
# Try each one first, and for the "predict" questions write your prediction down before running
# anything.
#
# 1. **Scale as a temperature.** `F.scaled_dot_product_attention` and `sdpa_reference` take a
#    `scale` argument that replaces $1/\sqrt{d}$. Predict what the attention weights and the
#    output of the toy sentence become as `scale → 0` and as `scale → ∞`. Then verify with
#    `scale=1e-6` and `scale=1e6`. (This chapter's `attention` has no `scale` argument, and
#    `F.scaled_dot_product_attention` does not return the weights, so use
#    `sdpa_reference(Q, K, V, scale=..., return_weights=True)`, which returns both.) Which limit
#    is "average everything" and which is "look up one key"?
# 2. **Softmax is shift-invariant.** Show on paper that $\operatorname{softmax}(s + c) =
#    \operatorname{softmax}(s)$ for any constant $c$, and check it numerically. Then compute a
#    softmax "by the formula", `exp(s) / exp(s).sum()`, on the scores `[1000., 999., 998.]`:
#    what goes wrong, and how does subtracting `s.max()` first fix it? Write a stable softmax
#    that also handles a row of all `-inf` the way this chapter's `attention` does.
# 3. **A local window.** Build a boolean mask in which each token may attend to itself and the
#    two tokens before it, and nothing else (a sliding window of size 3,
#    [chapter 9](09_sliding_window.ipynb)'s topic). Use only `torch.ones`, `tril` and `&`/`~`. Draw
#    it for $T = 6$, use it with `attention` on the toy sentence, and check that each row has at
#    most 3 non-zero weights.
# 4. **The future leaks.** Replace the last word of the toy sentence (*slept* → *barked*) and
#    recompute the outputs, once without a mask and once with the causal mask. Which positions'
#    outputs change in each case? Explain why a model trained without the mask would learn to
#    cheat at next-word prediction.
# 5. **Minus a billion is not minus infinity.** Some code masks with a large finite number,
#    `scores.masked_fill(~mask, -1e9)`, instead of `-inf`. Predict what that version outputs (a)
#    for ordinary rows and (b) for the fully masked rows of the left-padded example. Verify,
#    and say which behaviour you would prefer and why. Bonus: what happens to $-10^9$ in
#    float16, whose largest finite magnitude is 65504?
