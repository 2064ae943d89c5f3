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
# # Chapter 3 — Multi-head attention
#
# [Chapter 1](01_buggy_sketch.ipynb) ended with one causal attention head, `Head`, and
# [chapter 2](02_scaled_dot_product_attention.ipynb) took its one line of math apart. A transformer
# layer does not use one head, though: GPT-2 small runs 12 of them side by side in every layer, each
# with its own queries, keys and values, and glues their outputs together. Section 1 shows with
# two hand-built heads why one head is not enough. Then we start where chapter 1 started, from
# the hurried author's own multi-head class: it crashes at once, then works at one sequence
# length only, and its mask constant overflows in half precision. Fixed one bug at a time, it
# ends up computing exactly what the package's module computes (section 2). Then the chapter
# builds that layer twice more, to explain where it comes from. First the obvious way, as a
# Python list of `Head`s whose outputs are concatenated. Then the way every real implementation
# does it: one matrix multiplication produces the queries, keys and values of *all* heads at
# once, a reshape sorts them into heads, and a single attention call handles every head in
# parallel.
#
# The two versions compute the same function, and we will prove it by copying the weights of
# one into the other. We then check our batched module against PyTorch's own
# `torch.nn.MultiheadAttention`, count its parameters, and time all of them on a GPT-2-sized
# input.
#
# **Learning goals**
#
# - Explain why a layer uses several heads: each head has one softmax per query, so it mixes
#   whatever it attends to into one average. One head can spread its weight over several
#   positions, but it cannot keep two different relations apart; several heads can.
# - Find the bugs of the sketch's multi-head class from their symptoms (a `TypeError`, a mask
#   that fits only `T = block_size`, a `-1e10` that float16 cannot hold) and fix it until it
#   matches `attnbook.attention.MultiHeadAttention`; say when `-1e10` and $-\infty$ differ.
# - Build multi-head attention as a list of `Head`s plus an output projection.
# - Build the batched version: one fused `c_attn` projection (d → 3d), the
#   `view`/`transpose` into `(B, n_head, T, head_dim)`, one attention call, the merge back.
# - Say which rows of the fused weight belong to which head, and use that to copy weights
#   between the two versions (and into `torch.nn.MultiheadAttention`).
# - Know that `nn.MultiheadAttention`'s boolean masks mean the opposite of attnbook's.
# - Count the parameters ($4d^2 + 4d$, whatever the number of heads) and measure where the
#   time goes.

# %% [markdown]
# ## Setup
#
# We seed the random number generator before anything random happens and print shapes,
# booleans and rounded numbers only, so the outputs you see are the outputs you will get.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle
from torch import nn

from attnbook.attention import Head, causal_mask, sdpa_reference

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. Why more than one head?
#
# Look at one row of an attention matrix: it is a probability distribution over the earlier
# positions, produced by a single softmax. If a token needs two unrelated pieces of
# information — say, *what was the previous token?* and *where did I see this same token
# before?* — one head has to split its single distribution between them, and the value it
# returns is a blend of both answers. Several heads solve this: each has its own queries and
# keys, so each computes its own distribution, and their answers land in separate slots of the
# output.
#
# To see this without training anything, we hand-build two heads on a toy sequence. Each
# input vector has 16 features: a one-hot **position** (features 0–7) and a one-hot **token**
# (features 8–15, one per letter of a tiny 8-letter vocabulary).

# %%
letters = "abcdefgh"
text = "abcabdac"  # 8 tokens, with some repeats
T_toy = len(text)

x_toy = torch.zeros(1, T_toy, 16)  # (B=1, T=8, n_embd=16)
for t, ch in enumerate(text):
    x_toy[0, t, t] = 1.0  # position one-hot
    x_toy[0, t, 8 + letters.index(ch)] = 1.0  # token one-hot
print("x_toy:", tuple(x_toy.shape))
print(x_toy[0].int())

# %% [markdown]
# We use [chapter 1](01_buggy_sketch.ipynb)'s `Head` (from `attnbook.attention`) with `head_size=8`,
# so two heads together have 16 output features, the same as the input. A `Head` computes
# `q = x @ W_q.T`, `k = x @ W_k.T`, and the score `q · k / sqrt(8)`. We set the weights by hand:
#
# - **Head A, "previous token"**: the query of position $t$ is the one-hot of position $t-1$
#   (a shift matrix), the key of position $s$ is the one-hot of $s$. The score is large exactly
#   when $s = t - 1$. The shift matrix is `torch.diag(torch.ones(7), 1)`: its ones sit just
#   above the diagonal, at (row $i$, column $i+1$), so output feature $i$ reads input feature
#   $i+1$ and the one-hot of position $t$ comes out as the one-hot of $t-1$ (position 0 comes
#   out as zeros).
# - **Head B, "same token"**: query and key are both the token one-hot, so the score is large
#   wherever the key's token equals the query's token — at the query itself and at every
#   earlier copy of the same letter.
#
# The factor `sharp` scales the queries so that the softmax is nearly one-hot where a score is
# large.

# %%
sharp = 20.0
head_a = Head(n_embd=16, head_size=8, block_size=T_toy)
head_b = Head(n_embd=16, head_size=8, block_size=T_toy)
with torch.no_grad():
    for head in (head_a, head_b):
        for lin in (head.query, head.key, head.value):
            lin.weight.zero_()  # (head_size=8, n_embd=16), rows are output features
    head_a.query.weight[:, :8] = sharp * torch.diag(torch.ones(7), 1)  # position t -> t-1
    head_a.key.weight[:, :8] = torch.eye(8)  # position s -> s
    head_a.value.weight[:, 8:] = torch.eye(8)  # returns the token it looks at
    head_b.query.weight[:, 8:] = sharp * torch.eye(8)  # token -> token
    head_b.key.weight[:, 8:] = torch.eye(8)
    head_b.value.weight[:, :8] = torch.eye(8)  # returns the position it looks at


def head_weights(head, x):
    """The (B, T, T) attention weights of a chapter-1 Head: the same math as its forward."""
    q, k, v = head.query(x), head.key(x), head.value(x)  # (B, T, head_size) each
    _, w = sdpa_reference(q, k, v, is_causal=True, return_weights=True)
    return w  # (B, T, T)


w_a = head_weights(head_a, x_toy)[0]
w_b = head_weights(head_b, x_toy)[0]
print("head A, where each query looks most:", w_a.argmax(dim=-1).tolist())
print("head B, row of the last 'a' (t=6):  ", [round(w, 2) for w in w_b[6].tolist()])

# %% [markdown]
# Head A sends every position to the one before it (position 0 has nothing before it and
# looks at itself). Head B's row for the `a` at position 6 splits its weight evenly between
# the three `a`s at positions 0, 3 and 6, and gives nothing to the rest.
#
# What if a *single* head had to do both jobs? The natural single-head attempt is to add the
# two kinds of score: its query and key carry both the position part and the token part, 16
# features each. Two details in the code: this head divides its scores by $\sqrt{16}$ instead
# of $\sqrt{8}$, so we scale its queries by $\sqrt{2}$ to make its scores exactly head A's plus
# head B's; and we give it head A's value weights (the token one-hot) in its first 8 output
# features, so we can read from its output which token it thinks came before. We draw all three
# attention maps side by side.

# %%
head_ab = Head(n_embd=16, head_size=16, block_size=T_toy)
with torch.no_grad():
    # sqrt(2) undoes the larger divisor, sqrt(16) instead of sqrt(8): scores = A's + B's
    q_ab = torch.cat([head_a.query.weight, head_b.query.weight], dim=0)  # (16, 16)
    head_ab.query.weight.copy_(2**0.5 * q_ab)
    head_ab.key.weight.copy_(torch.cat([head_a.key.weight, head_b.key.weight], dim=0))
    head_ab.value.weight.zero_()
    head_ab.value.weight[:8] = head_a.value.weight  # features 0-7: the token it looks at
w_ab = head_weights(head_ab, x_toy)[0]

fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
panels = [
    (w_a, "head A: previous token"),
    (w_b, "head B: same token"),
    (w_ab, "one head doing both: blurred"),
]
for ax, (w, title) in zip(axes, panels, strict=True):
    im = ax.imshow(w.detach(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(title)
    ax.set_xticks(range(T_toy), [f"{c}{i}" for i, c in enumerate(text)])
    ax.set_yticks(range(T_toy), [f"{c}{i}" for i, c in enumerate(text)])
    ax.set_xlabel("key (attended to)")
axes[0].set_ylabel("query")
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
plt.show()

# %% [markdown]
# The third map is the point. The combined head's row for position 6 (`a`) puts weight on
# position 5 (the previous token) *and* on the earlier `a`s, so its output is an average of
# unrelated things. Read out its "previous token" at t=6 the way head A's is read, with an argmax
# over the token features:

# %%
t = 6
out_ab = head_ab(x_toy)[0, t, :8]  # (8,): the token features of its output at t=6
print(f"combined head, row t={t}:", [round(w, 2) for w in w_ab[t].tolist()])
features = {c: round(v, 2) for c, v in zip(letters, out_ab.tolist(), strict=True)}
print("its token features at t=6:", features)
print(f"combined head, t={t}: previous token =", letters[out_ab.argmax().item()],
      f"(head A: {letters[head_a(x_toy)[0, t].argmax().item()]})")
assert letters[out_ab.argmax().item()] == "a"  # wrong: the token before t=6 is 'd'

# %% [markdown]
# A quarter of the weight goes to each of positions 0, 3, 5 and 6; three of them hold an `a` and
# one (position 5) the `d` we asked for, so the output is three parts `a` to one part `d` and
# the argmax answers `a`: the single head gets the previous token wrong. Two heads keep the two
# questions apart: head A's answer lands in output
# features 0–7, head B's in features 8–15. Concatenating the heads keeps both answers side by
# side, each in its own features, where the output projection of a multi-head layer (`out_proj`
# in the sketch of section 2, `proj` in section 3) and the layers after it can read either one
# without the other getting in the way:

# %%
out_a, out_b = head_a(x_toy), head_b(x_toy)  # (1, 8, 8) each
both = torch.cat([out_a, out_b], dim=-1)  # (1, 8, 16)
print("concatenated:", tuple(both.shape))
print(f"t={t}: previous token =", letters[out_a[0, t].argmax().item()])
seen = (out_b[0, t] > 0.1).nonzero().flatten().tolist()  # head B returns positions
print(f"t={t}: positions of the '{text[t]}'s up to t =", seen)

# %% [markdown]
# Hand-built heads are only an illustration. In a trained model nobody assigns jobs; each head
# learns its own, and interpretability work finds exactly such specialists (heads that attend
# to the previous token, heads that find an earlier copy of the current token, ...) next to
# many heads with less legible patterns. What multi-head attention provides is the *room*: `n_head`
# independent distributions per query instead of one.
#
# So much for why. The next section shows how the hurried author wrote such a layer.

# %% [markdown]
# ## 2. The sketch's multi-head class
#
# What the class below does, in three steps. It projects the input to queries, keys and values
# of width `d_out` and cuts each into `num_heads` slices of `head_dim = d_out // num_heads`
# features, with a `view` to `(B, T, num_heads, head_dim)` and a `transpose` that moves the heads
# next to the batch, `(B, num_heads, T, head_dim)`. Every head then attends on its own slice, all
# heads in one batched product, as in [chapter 2](02_scaled_dot_product_attention.ipynb). Finally
# the inverse `transpose` and `view` put the heads' outputs side by side again, and `out_proj`
# mixes them; sections 4 and 5 explain the split and the merge in detail.
#
# The hurried author of [chapter 1](01_buggy_sketch.ipynb)'s sketch wrote this class, and we start
# from it the way chapter 1 started: run it as written, fix one bug per version (`MHASketchV1` to
# `MHASketchV4`, "sketch v1" to "sketch v4" for short), and stop when it computes what the
# package's `attnbook.attention.MultiHeadAttention` computes. Its head split and merge are
# correct. Two lines are not, and a third holds a questionable constant. Read it once and look
# for them.

# %%
class MHASketchV1(nn.Module):
    """Causal multi-head self-attention, written in a hurry."""

    def __init__(self, d_in, d_out, num_heads, block_size, dropout=0.1):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out)
        self.W_key = nn.Linear(d_in, d_out)
        self.W_value = nn.Linear(d_in, d_out)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x):
        B, T, _ = x.shape
        Q = self.W_query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        K = self.W_key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        V = self.W_value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        scores = Q @ K.transpose(-2, -1)
        scores = scores / torch.sqrt(torch.tensor(self.head_dim), dim=-1)
        scores = scores.masked_fill(self.mask == 0, -1e10)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        y = (weights @ V).transpose(1, 2).contiguous().view(B, T, self.d_out)
        return self.out_proj(y)


# %% [markdown]
# As in chapter 1, one helper builds every sketch version from the same seed, so all start
# from the same weights, with dropout 0 and in eval mode. The toy layer is 16 wide with 4 heads
# of 4 and `block_size = 8`; the inputs are a batch of 2 sequences of 6 tokens, shorter than
# `block_size` as every prompt is at first, and a batch of full length.

# %%
def build(cls):
    torch.manual_seed(0)  # same seed -> same initial weights in every version
    return cls(d_in=16, d_out=16, num_heads=4, block_size=8, dropout=0.0).eval()


torch.manual_seed(1)
x_short = torch.randn(2, 6, 16)  # (B, T=6, d): shorter than block_size
x_full = torch.randn(2, 8, 16)  # (B, T=block_size, d)

# %% [markdown]
# ### Bug 1: `torch.sqrt` with a `dim` argument

# %% tags=["raises-exception"]
build(MHASketchV1)(x_short)

# %% [markdown]
# **Why.** This is bug 4 of chapter 1 again: `torch.sqrt` works element by element, so it has
# no axis to choose and no `dim` parameter.
#
# **Fix.** The scale is a number known when the layer is built: `self.head_dim ** 0.5`, plain
# Python. Each sketch version subclasses the previous one and overrides `forward`; `# vN` marks
# the line that `MHASketchVN` changed.

# %%
class MHASketchV2(MHASketchV1):
    def forward(self, x):
        B, T, _ = x.shape
        Q = self.W_query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        K = self.W_key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        V = self.W_value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        scores = Q @ K.transpose(-2, -1)  # (B, num_heads, T, T)
        scores = scores / self.head_dim**0.5  # v2: a Python float
        scores = scores.masked_fill(self.mask == 0, -1e10)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        y = (weights @ V).transpose(1, 2).contiguous().view(B, T, self.d_out)
        return self.out_proj(y)


with torch.no_grad():
    print("T = block_size = 8:", tuple(build(MHASketchV2)(x_full).shape))

# %% [markdown]
# ### Bug 2: a mask that is not cut to the sequence
#
# At `T = block_size`, the length the author tested with, `MHASketchV2` runs. Now the shorter
# batch:

# %% tags=["raises-exception"]
build(MHASketchV2)(x_short)

# %% [markdown]
# **Why.** The buffer `self.mask` is `(block_size, block_size)` = `(8, 8)`; the scores are
# `(B, num_heads, T, T)` = `(2, 4, 6, 6)`. `masked_fill` broadcasts the mask against the scores,
# matching sizes from the last dimension backwards, and 8 against 6 is neither equal nor 1. So
# the class works at exactly one length, `T = block_size`: every shorter prompt fails, and so
# does text generation, which feeds the model a sequence that grows one token at a time.
#
# **Fix.** Cut the buffer to the sequence: `self.mask[:T, :T]`, the top-left `T × T` corner,
# which is the causal mask for `T` positions.

# %%
class MHASketchV3(MHASketchV2):
    def forward(self, x):
        B, T, _ = x.shape
        Q = self.W_query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        K = self.W_key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        V = self.W_value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        scores = Q @ K.transpose(-2, -1)  # (B, num_heads, T, T)
        scores = scores / self.head_dim**0.5
        scores = scores.masked_fill(self.mask[:T, :T] == 0, -1e10)  # v3: (T, T) corner
        weights = self.dropout(torch.softmax(scores, dim=-1))
        y = (weights @ V).transpose(1, 2).contiguous().view(B, T, self.d_out)
        return self.out_proj(y)


# %% [markdown]
# `MHASketchV3` runs at both lengths. Does it compute what the package computes? The package's
# module keeps the query, key and value weights in one fused layer `c_attn` (section 4 explains
# the layout: the three `(d, d)` weights stacked, q on top) and calls the output projection
# `c_proj`. It is built from an `AttentionConfig`, which holds the sizes and options every
# attention variant shares ("Check against the module" at the end says more). Its field `impl`
# picks the kernel that computes the attention: `"reference"` is the formula written out
# (chapter 2's `sdpa_reference`), `"sdpa"` is PyTorch's fused `F.scaled_dot_product_attention`;
# both compute the same thing. The helper below copies a sketch's weights into the module; both
# have biases everywhere.

# %%
from attnbook.attention import AttentionConfig, MultiHeadAttention


@torch.no_grad()
def to_package(sketch, impl="reference"):
    """attnbook's MultiHeadAttention holding the sketch's weights (float32)."""
    cfg = AttentionConfig(n_embd=16, n_head=4, block_size=8, dropout=0.0, bias=True, impl=impl)
    module = MultiHeadAttention(cfg).eval()
    qkv = (sketch.W_query, sketch.W_key, sketch.W_value)
    module.c_attn.weight.copy_(torch.cat([lin.weight for lin in qkv]))  # (3d, d): q | k | v
    module.c_attn.bias.copy_(torch.cat([lin.bias for lin in qkv]))  # (3d,)
    module.c_proj.weight.copy_(sketch.out_proj.weight)  # (d, d)
    module.c_proj.bias.copy_(sketch.out_proj.bias)  # (d,)
    return module


d_s = 16  # the sketch's width
print(f"c_attn.weight {tuple(to_package(build(MHASketchV3)).c_attn.weight.shape)}: "
      f"rows 0-{d_s - 1} W_query, {d_s}-{2 * d_s - 1} W_key, {2 * d_s}-{3 * d_s - 1} W_value")
model3 = build(MHASketchV3)
with torch.no_grad():
    for xs in (x_short, x_full):
        same = torch.allclose(model3(xs), to_package(model3)(xs), atol=1e-5)
        print(f"T = {xs.shape[1]}: MHASketchV3 == attnbook MultiHeadAttention (atol 1e-5):", same)
        assert same

# %% [markdown]
# ### Bug 3: `-1e10` is not $-\infty$
#
# Equal. So is `-1e10` a bug at all? In float32 it does what $-\infty$ does. The softmax
# subtracts the row's largest score before it exponentiates (which changes nothing in the result,
# since the factor cancels between numerator and denominator, but keeps `exp` from overflowing).
# A causal row always keeps its own position, so its largest score is an ordinary number, and a
# masked entry becomes $e^{-10^{10} - \max}$, which underflows to exactly 0 in float32. So the
# masked weights are exactly 0 (unlike chapter 1's `1e-10`, a number near 0, which leaked). But
# `-1e10` is not $-\infty$, and the difference shows in two places.

# %%
print("softmax([0.5, -1e10]) =", torch.softmax(torch.tensor([0.5, -1e10]), dim=0))
print("float16's lowest finite number:", torch.finfo(torch.float16).min)

# %% [markdown]
# **Half precision.** float16, which halves the memory and is common on GPUs, has no number
# below -65504, so `-1e10` does not fit, and `masked_fill` refuses it. (bfloat16 has float32's
# range; there the class runs.)

# %% tags=["raises-exception"]
build(MHASketchV3).half()(x_short.half())

# %% [markdown]
# **A row with nothing to attend to.** A causal mask never masks a whole row, but a padding mask
# can ([chapter 2](02_scaled_dot_product_attention.ipynb)). With `-1e10` in every place, the
# scores of such a row are all equal and the softmax spreads the weight evenly over positions it
# was told to ignore, without a word. With $-\infty$, a plain softmax computes $0/0$ = NaN, which
# at least is loud; attnbook's `sdpa_reference` gives such a row zero weights on purpose.

# %%
everything = torch.ones(1, 3, dtype=torch.bool)  # one query, 3 keys, every key masked
scores_row = torch.zeros(1, 3)
print("masked with -1e10: ", torch.softmax(scores_row.masked_fill(everything, -1e10), dim=-1))
print("masked with -inf:  ",
      torch.softmax(scores_row.masked_fill(everything, float("-inf")), dim=-1))
_, w_empty = sdpa_reference(torch.ones(1, 4), torch.ones(3, 4), torch.ones(3, 4),
                            attn_mask=~everything, return_weights=True)  # True = may attend
print("attnbook's weights:", w_empty)

# %% [markdown]
# **Fix.** `float("-inf")`, as the package does: `sdpa_reference` masks with $-\infty$ (and
# `F.scaled_dot_product_attention` does the same with a boolean mask). $-\infty$ exists in every
# floating-point dtype and gives a weight of exactly 0 whatever the other scores are. A causal
# mask never empties a row, so the sketch's plain softmax is safe here; with padding masks a row
# can be empty, and the package's reference ([chapter 2](02_scaled_dot_product_attention.ipynb))
# returns zeros there.
#
# The other common choice is `torch.finfo(scores.dtype).min`, the lowest finite number of the
# dtype. It also fits every dtype, but it is a different number in each. And with it a fully
# masked row comes out uniform again, silently; with $-\infty$ that row is the one case to
# handle, and the package handles it explicitly.

# %%
class MHASketchV4(MHASketchV3):
    def forward(self, x):
        B, T, _ = x.shape
        Q = self.W_query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        K = self.W_key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        V = self.W_value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        scores = Q @ K.transpose(-2, -1)  # (B, num_heads, T, T)
        scores = scores / self.head_dim**0.5
        scores = scores.masked_fill(self.mask[:T, :T] == 0, float("-inf"))  # v4
        weights = self.dropout(torch.softmax(scores, dim=-1))  # (B, num_heads, T, T)
        y = (weights @ V).transpose(1, 2).contiguous().view(B, T, self.d_out)  # (B, T, d_out)
        return self.out_proj(y)  # (B, T, d_out)


model4 = build(MHASketchV4)
with torch.no_grad():
    for impl in ("reference", "sdpa"):
        module = to_package(model4, impl)
        for xs in (x_short, x_full):
            assert torch.allclose(model4(xs), module(xs), atol=1e-5), (impl, xs.shape)
    y_float = model4(x_short)
    y_half = build(MHASketchV4).half()(x_short.half())  # the same weights, in float16
print("MHASketchV4 == attnbook MultiHeadAttention, both kernels, T = 6 and 8 (atol 1e-5)")
print("float16 runs:", y_half.dtype, " finite:", bool(y_half.isfinite().all()),
      " close to float32 (atol 1e-2):", torch.allclose(y_half.float(), y_float, atol=1e-2))
assert y_half.isfinite().all() and torch.allclose(y_half.float(), y_float, atol=1e-2)

# %% [markdown]
# | sketch version | bug fixed | how it showed itself |
# | --- | --- | --- |
# | `MHASketchV1` → `V2` | `torch.sqrt(..., dim=-1)` | `TypeError` |
# | `MHASketchV2` → `V3` | the `(block_size, block_size)` mask used whole | `RuntimeError` for any `T` but `block_size` |
# | `MHASketchV3` → `V4` | masking with `-1e10` | nothing in float32; `RuntimeError` in float16; a fully masked row uniform, not NaN |
#
# The fixed class is the batched layer this chapter ends with. Section 1 said why a layer wants
# several heads; the rest of the chapter explains how this one computes them: the obvious
# version as a list of heads (section 3), and how one fused projection and a reshape replace the
# list (sections 4 and 5).

# %% [markdown]
# ## 3. Version 1: a list of heads
#
# `MHASketchV4` already works, but it keeps three separate `Linear`s for queries, keys and
# values and does the head split in one go, which hides where that split comes from. So the book
# builds multi-head attention again, from the single-head `Head` of chapter 1: version 1 below is
# a plain list of heads, and version 2 (section 5) fuses the heads' q, k and v into one `c_attn`
# and arrives at the same batched form as the sketch.
#
# Version 1 is the direct translation of "several heads, concatenated, then projected" into
# code. With
# `n_head` heads and a model width `d`, each head gets `head_size = d // n_head`, so the
# concatenation is `d` wide again, and a `d × d` linear layer (`proj`) mixes the heads'
# outputs. Without `proj` each head's answer would stay in its own slice of features forever;
# with it, every output feature can draw on every head.

# %%
class MultiHeadAttentionV1(nn.Module):
    """Causal multi-head attention as a Python list of chapter-1 Heads."""

    def __init__(self, n_embd, n_head, block_size, dropout=0.0):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        head_size = n_embd // n_head
        self.heads = nn.ModuleList(
            [Head(n_embd, head_size, block_size, dropout) for _ in range(n_head)]
        )
        self.proj = nn.Linear(n_embd, n_embd)  # mixes the concatenated heads
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # x: (B, T, n_embd)
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, n_head * head_size)
        return self.dropout(self.proj(out))  # (B, T, n_embd)


# %% [markdown]
# A small configuration, used for the rest of the chapter's checks: width 32, 4 heads of size
# 8, sequences of 10 tokens, a batch of 2.

# %%
B, T, d, n_head = 2, 10, 32, 4
head_dim = d // n_head
torch.manual_seed(0)
v1 = MultiHeadAttentionV1(n_embd=d, n_head=n_head, block_size=T)
x = torch.randn(B, T, d)
y1 = v1(x)
print("x:", tuple(x.shape), "-> y1:", tuple(y1.shape))
print("one head's output:", tuple(v1.heads[0](x).shape))

# %% [markdown]
# Each head is causal, so the whole layer is causal: changing the last token must not change
# any earlier output. A quick check, written as a function because section 6 uses it again (this
# is the kind of test that catches a wrong mask):

# %%
def is_causal(module, x):
    """True if changing the last position of x changes the module's last output row only."""
    x_changed = x.clone()
    x_changed[:, -1] = torch.randn_like(x[:, -1])  # a new last token, (B, d)
    with torch.no_grad():
        y, y_changed = module(x), module(x_changed)  # (B, T, d) each
    earlier_same = torch.allclose(y[:, :-1], y_changed[:, :-1])
    last_moved = not torch.allclose(y[:, -1], y_changed[:, -1])
    return earlier_same and last_moved


print("version 1 is causal (earlier outputs unchanged, last one changed):", is_causal(v1, x))

# %% [markdown]
# ## 4. From a loop to one matrix multiplication
#
# Version 1 is correct but wasteful. For every head it runs three small `Linear` layers
# (`d → head_dim`) and one attention, one after another. Notice first that the heads' query
# projections all read the same `x`. A `Linear` with weight $W$ (shape `(out, in)`) computes
# `x @ W.T`, so stacking the heads' query weights row-wise, head 0 on top, gives one `d × d`
# weight whose output is the heads' queries side by side:

# %%
W_q = torch.cat([h.query.weight for h in v1.heads], dim=0)  # (n_head * head_dim, d) = (d, d)
q_all = x @ W_q.T  # (B, T, d): head 0's query in columns 0..7, head 1's in 8..15, ...
q_loop = torch.cat([h.query(x) for h in v1.heads], dim=-1)  # (B, T, d)
print("W_q:", tuple(W_q.shape))
print("one matmul == loop of heads (atol=1e-5):", torch.allclose(q_all, q_loop, atol=1e-5))

# %% [markdown]
# The same holds for keys and values, and nothing stops us from stacking those too: one
# `Linear(d, 3d)` — called `c_attn` in GPT-2's code — computes every query, key and value of
# every head in one go. Its 3d output features are laid out like this (drawn for `d = 12` and
# 3 heads of size 4):

# %%
def draw_layout(d_draw=12, heads=3):
    hd = d_draw // heads
    colours = {"q": plt.cm.Blues, "k": plt.cm.Greens, "v": plt.cm.Oranges}
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for p, part in enumerate("qkv"):
        for h in range(heads):
            left = p * d_draw + h * hd
            shade = colours[part](0.25 + 0.35 * h / max(heads - 1, 1))
            ax.add_patch(Rectangle((left, 0), hd, 1, facecolor=shade, edgecolor="black"))
            ax.text(left + hd / 2, 0.5, f"{part}\nhead {h}", ha="center", va="center", fontsize=10)
        ax.annotate("", xy=(p * d_draw, 1.25), xytext=((p + 1) * d_draw, 1.25),
                    arrowprops=dict(arrowstyle="<->"))
        ax.text((p + 0.5) * d_draw, 1.4, f"{part}: columns {p * d_draw}..{(p + 1) * d_draw - 1}",
                ha="center")
    ax.set_xlim(-0.5, 3 * d_draw + 0.5)
    ax.set_ylim(-0.15, 1.7)
    ax.set_xticks(range(0, 3 * d_draw + 1, hd))
    ax.set_yticks([])
    ax.set_xlabel("output feature of c_attn (a column of c_attn(x), a row of c_attn.weight)")
    ax.set_title(f"c_attn output, d={d_draw}, n_head={heads}, head_dim={hd}")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    plt.show()


draw_layout()

# %% [markdown]
# Two splits turn this row of 3d features into heads:
#
# 1. `split(d, dim=2)` cuts it into three `(B, T, d)` tensors: q, k and v.
# 2. `view(B, T, n_head, head_dim)` cuts each of those into `n_head` consecutive groups of
#    `head_dim` features. A `view` reinterprets memory without copying, and the last dimension
#    is the one whose elements sit next to each other, so group `h` is exactly features
#    `h*head_dim .. (h+1)*head_dim - 1` — the head-`h` block in the picture.
#
# Finally `transpose(1, 2)` swaps the time and head axes: `(B, T, n_head, head_dim)` →
# `(B, n_head, T, head_dim)`. Now the heads sit in a *batch-like* dimension, and the attention
# math from [chapter 2](02_scaled_dot_product_attention.ipynb), which works on the last two
# dimensions `(T, head_dim)`, runs for every (batch, head) pair at once.
#
# Let us watch it happen on labels instead of numbers. We feed the reshape a tensor whose entry
# is the *column number* it came from, and check that head `h` of q received columns
# `h*head_dim ..` and head `h` of k received columns `d + h*head_dim ..`:

# %%
B_, T_, d_, nh_ = 1, 2, 12, 3  # tiny sizes for printing
hd_ = d_ // nh_
columns = torch.arange(3 * d_).expand(B_, T_, 3 * d_)  # (B, T, 3d): entry = its column number
q_lab, k_lab, v_lab = columns.split(d_, dim=2)  # 3 x (B, T, d)
q_lab = q_lab.view(B_, T_, nh_, hd_).transpose(1, 2)  # (B, n_head, T, head_dim)
k_lab = k_lab.view(B_, T_, nh_, hd_).transpose(1, 2)  # (B, n_head, T, head_dim)
print("q after the reshape:", tuple(q_lab.shape))
for h in range(nh_):
    print(f"head {h}: q gets columns {q_lab[0, h, 0].tolist()}, k gets {k_lab[0, h, 0].tolist()}")

# %% [markdown]
# Undoing it at the end is the mirror image: `transpose(1, 2)` back to `(B, T, n_head,
# head_dim)`, then `view(B, T, d)` to lay the heads side by side — the same concatenation
# version 1 did with `torch.cat`. But this `view` needs help, and the reason is worth knowing.
#
# A `view` never moves data; it only changes how the same memory is indexed, through each
# dimension's *stride* (how many elements one step along that dimension skips). So a `view`
# can always **split** a dimension into several. It can **merge** two neighbouring dimensions
# only if they are also adjacent in memory: one step along the outer one must skip exactly one
# full run of the inner one (outer stride = inner size × inner stride). That is why the split
# above worked even though q, a slice of `c_attn`'s output, is not contiguous. The merge is
# another matter: `transpose` swaps strides, not data, so afterwards `n_head` and `head_dim` are
# neighbours in the shape but not in memory.

# %%
y_heads = torch.randn(B_, nh_, T_, hd_)  # what attention returns: (B, n_head, T, head_dim)
y_t = y_heads.transpose(1, 2)  # (B, T, n_head, head_dim), the same memory
print("before transpose:", tuple(y_heads.shape), "strides", y_heads.stride())
print("after transpose: ", tuple(y_t.shape), "strides", y_t.stride())
adjacent = y_t.stride(2) == y_t.shape[3] * y_t.stride(3)
print("n_head and head_dim adjacent in memory:", adjacent)

# %% [markdown]
# After the transpose, one step to the next head skips 8 elements (a whole `(T, head_dim)`
# block of the old layout) where a mergeable pair would need 4 (one `head_dim` run). So
# `view(B, T, d)` refuses, with a `RuntimeError` whose first line the cell prints (it goes on to
# suggest `.reshape(...)`). Failing loudly is the good outcome: no wrong numbers come out.

# %%
try:
    y_t.view(B_, T_, d_)  # merges n_head and head_dim, which are not adjacent in memory
    error = None
except RuntimeError as err:
    error = err
assert isinstance(error, RuntimeError) and "view" in str(error), error
print("view(B, T, d) after the transpose raised:", type(error).__name__)
print(str(error).splitlines()[0])

# %% [markdown]
# The fix is a `.contiguous()` in between: it copies the tensor into the order its shape
# describes, after which the merge is a plain `view`. (`reshape` would do the same copy on its
# own when needed, which is convenient but hides the copy.)

# %%
y_merged = y_heads.transpose(1, 2).contiguous().view(B_, T_, d_)  # (B, T, d)
same_as_cat = torch.equal(y_merged, torch.cat([y_heads[:, h] for h in range(nh_)], dim=-1))
print("merged:", tuple(y_merged.shape), " same as concatenating the heads:", same_as_cat)

# %% [markdown]
# ## 5. Version 2: the batched module
#
# Version 2 computes what `MHASketchV4` computes, with its three `Linear`s fused into one
# `c_attn`, the output projection renamed `c_proj`, and a switch for the attention kernel; its
# dropout applies to the weights, as the sketch's does, and to the output as well.
#
# Now the module itself. The attention step is [chapter 2](02_scaled_dot_product_attention.ipynb)'s
# math, written so that it does not care how many leading dimensions there are: `(B, T, head_dim)`
# for one head, `(B, n_head, T, head_dim)` for all of them.

# %%
def causal_attention(q, k, v, dropout_p=0.0):
    """softmax(q kᵀ / sqrt(head_dim) + causal mask) v, for q, k, v of shape (..., T, head_dim)."""
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (..., T, T)
    scores = scores.masked_fill(~causal_mask(T, device=q.device), float("-inf"))  # True = may attend
    weights = torch.softmax(scores, dim=-1)  # (..., T, T), each row sums to 1
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (..., T, head_dim)


# %% [markdown]
# The module has one fused projection `c_attn` (d → 3d, laid out q | k | v as drawn above) and
# one output projection `c_proj` (d → d). The names are GPT-2's, which makes a later chapter's
# weight loading easier to follow — with one trap: GPT-2's checkpoints store these layers as
# Hugging Face `Conv1D`s, whose weight is `(in, out)`, so `c_attn.weight` there is `(d, 3d)`, the
# transpose of our `nn.Linear`'s `(3d, d)`, and must be transposed on the way in.
#
# The argument `impl` picks the attention kernel: `"reference"` is our `causal_attention`,
# `"sdpa"` is PyTorch's `F.scaled_dot_product_attention`, which computes the same thing. When
# it picks a fused backend (flash or memory-efficient attention), it works through the keys in
# tiles and never stores the `(T, T)` matrix of weights. With dropout on CPU, or inputs no
# fused kernel supports, it falls back to its math backend, which does store them.

# %%
class MultiHeadAttentionV2(nn.Module):
    """Causal multi-head attention with a fused QKV projection and all heads in one call."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, impl="reference"):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if impl not in ("reference", "sdpa"):
            raise ValueError(f"impl must be 'reference' or 'sdpa', got {impl!r}")
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.dropout_p, self.impl = dropout, impl  # a probability, handed to the kernel
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q | k | v, all heads
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # mixes the heads
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape  # C = n_embd
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        p = self.dropout_p if self.training else 0.0
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = causal_attention(q, k, v, dropout_p=p)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


torch.manual_seed(0)
v2 = MultiHeadAttentionV2(d, n_head)
print(v2)
print("y2:", tuple(v2(x).shape))

# %% [markdown]
# ## 6. Copying version 1's weights into version 2
#
# If the two versions really compute the same function, then with the same weights they must
# give the same output. The layout picture tells us where each of version 1's weights goes:
# row `r` of `c_attn.weight` (shape `(3d, d)`) belongs to part `r // d` (0 = q, 1 = k, 2 = v)
# and, inside that part, to head `(r % d) // head_dim`. So the q block is the heads' query
# weights stacked in head order, then the same for keys and values. `proj` maps one-to-one
# onto `c_proj`.
#
# One detail: [chapter 1](01_buggy_sketch.ipynb)'s `Head` has no bias in its query/key/value layers,
# while `c_attn` has one (GPT-2's does). A zero bias adds nothing, so we zero it.

# %%
@torch.no_grad()
def copy_v1_into_v2(v1, v2):
    heads = v1.heads
    W_q = torch.cat([h.query.weight for h in heads], dim=0)  # (d, d), head h in rows h*hd..
    W_k = torch.cat([h.key.weight for h in heads], dim=0)  # (d, d)
    W_v = torch.cat([h.value.weight for h in heads], dim=0)  # (d, d)
    v2.c_attn.weight.copy_(torch.cat([W_q, W_k, W_v], dim=0))  # (3d, d): q | k | v
    if v2.c_attn.bias is not None:
        v2.c_attn.bias.zero_()  # chapter 1's heads have no q/k/v bias
    v2.c_proj.weight.copy_(v1.proj.weight)  # (d, d)
    v2.c_proj.bias.copy_(v1.proj.bias)  # (d,)


copy_v1_into_v2(v1, v2)
y1, y2 = v1(x), v2(x)
assert torch.allclose(y1, y2, atol=1e-5), (y1 - y2).abs().max()
print("v1 (list of heads) == v2 (batched), atol=1e-5:", torch.allclose(y1, y2, atol=1e-5))

# %% [markdown]
# Both kernels of version 2 agree as well: switching `impl` to `"sdpa"` (same weights) changes
# how the attention is computed, not what it computes.

# %%
v2_fast = MultiHeadAttentionV2(d, n_head, impl="sdpa")
v2_fast.load_state_dict(v2.state_dict())
y2_fast = v2_fast(x)
assert torch.allclose(y2, y2_fast, atol=1e-5)
print("v2 reference == v2 sdpa, atol=1e-5:", torch.allclose(y2, y2_fast, atol=1e-5))

# %% [markdown]
# Had we put the key weights first, or forgotten a transpose, the shapes would still fit and
# the module would still run. Shape-correct but scrambled reshapes are the classic multi-head
# bug, and not every test sees them. Replace `view(...).transpose(1, 2)` after the split by
# `reshape(B, n_head, T, head_dim)`, leaving the merge as it is, and position t's row is filled
# from other positions, some of them later ones: the layer stops being causal,
# so section 3's `is_causal(module, x)` catches it too. Drop it on both sides (split and merge),
# (`reshape(B, T, C)` at the end too), and the layer is still causal, just wrong: only this
# comparison with a trusted version
# catches that. The comparison catches both, which is why the equality test is worth more than
# any number of shape prints. (Exercise 5 works through both variants.) Version 2 as written,
# with either kernel, passes the causality check:

# %%
print("version 2 is causal, reference and sdpa kernels:", is_causal(v2, x), is_causal(v2_fast, x))
assert is_causal(v2, x) and is_causal(v2_fast, x)

# %% [markdown]
# ## 7. Against `torch.nn.MultiheadAttention`
#
# PyTorch ships its own multi-head attention. Its parameters map one-to-one onto ours:
#
# | ours | `nn.MultiheadAttention` | shape |
# | --- | --- | --- |
# | `c_attn.weight` | `in_proj_weight` (q, k, v stacked the same way) | `(3d, d)` |
# | `c_attn.bias` | `in_proj_bias` | `(3d,)` |
# | `c_proj.weight`, `c_proj.bias` | `out_proj.weight`, `out_proj.bias` | `(d, d)`, `(d,)` |
#
# Its interface differs in three ways. It takes `query, key, value` separately (it also does
# cross-attention), so for self-attention we pass `x` three times. It expects `(T, B, d)`
# unless we say `batch_first=True`. And it is not causal by itself: we pass a mask. We give it
# a fresh version 2 with random biases, so that the biases are tested too.

# %%
torch.manual_seed(1)
mha = MultiHeadAttentionV2(d, n_head)  # random weights and biases
mha_torch = nn.MultiheadAttention(embed_dim=d, num_heads=n_head, batch_first=True)
with torch.no_grad():
    mha_torch.in_proj_weight.copy_(mha.c_attn.weight)
    mha_torch.in_proj_bias.copy_(mha.c_attn.bias)
    mha_torch.out_proj.weight.copy_(mha.c_proj.weight)
    mha_torch.out_proj.bias.copy_(mha.c_proj.bias)
print({name: tuple(p.shape) for name, p in mha_torch.named_parameters()})

# %% [markdown]
# Now the trap. [Chapter 2](02_scaled_dot_product_attention.ipynb) warned about it; here is what
# it does to you. In attnbook, a boolean mask
# says `True` = *may attend*. In `nn.MultiheadAttention` (and in its `key_padding_mask`), a boolean
# mask says `True` = *not allowed*. The two conventions are exact opposites. The inversion belongs
# to `nn.MultiheadAttention` and `nn.Transformer`, not to PyTorch as a whole:
# `F.scaled_dot_product_attention`'s boolean `attn_mask` uses `True` = *may attend*, like attnbook.

# %%
allowed = causal_mask(4)  # attnbook: True where a query may attend
print("attnbook causal mask (True = may attend):")
print(allowed.int())
print("what nn.MultiheadAttention wants (True = masked out):")
print((~allowed).int())

# %% [markdown]
# Hand our mask to PyTorch unchanged and it does the reverse of what we meant. Its averaged
# attention weights (returned by default) show each query looking only at *later* positions,
# and the last query, which is allowed nothing at all, comes out as NaN:

# %%
x4 = x[:1, :4]  # (1, 4, d)
y_wrong, w_wrong = mha_torch(x4, x4, x4, attn_mask=allowed)  # wrong orientation!
print("head-averaged weights, rounded (one row per query):")
for row in w_wrong[0].tolist():
    print([round(w, 2) for w in row])
print("NaN in the output rows:", y_wrong[0].isnan().any(dim=-1).tolist())

# %% [markdown]
# The NaN comes from a plain softmax over a row whose every score is `-inf`: $0/0$. That is
# what `nn.MultiheadAttention` does when it forms the weights itself (`need_weights=True`, as
# here) in torch 2.13. `F.scaled_dot_product_attention`'s math backend uses a "safe" softmax
# that returns zeros for such a row instead, as attnbook does
# ([chapter 2](02_scaled_dot_product_attention.ipynb)), so whether this row shows NaN or zeros
# depends on the code path and may change between torch versions. Either way it is a symptom of the
# wrong mask, not a number to use.

# %% [markdown]
# With the mask inverted, PyTorch's module and ours agree. Passing `need_weights=False` tells
# PyTorch we do not want the (head-averaged) weights; here, with gradients on, it then hands
# the attention to `F.scaled_dot_product_attention` instead of forming the weights itself.
# Which route it takes also depends on training/evaluation mode and `torch.no_grad()`, and
# section 9 shows that this matters for speed.

# %%
y_ours = mha(x)
y_torch, _ = mha_torch(x, x, x, attn_mask=~causal_mask(T), need_weights=False)
assert torch.allclose(y_ours, y_torch, atol=1e-5)
print("ours == nn.MultiheadAttention, atol=1e-5:", torch.allclose(y_ours, y_torch, atol=1e-5))

# %% [markdown]
# A float mask sidesteps the question: `0` where attention is allowed and `-inf` where it is
# not means the same thing to everyone, because it is simply added to the scores.

# %%
float_mask = torch.zeros(T, T).masked_fill(~causal_mask(T), float("-inf"))  # (T, T)
y_torch_f, _ = mha_torch(x, x, x, attn_mask=float_mask, need_weights=False)
print("float mask gives the same result:", torch.allclose(y_ours, y_torch_f, atol=1e-5))

# %% [markdown]
# ## 8. Counting parameters
#
# `c_attn` has a `3d × d` weight and `3d` biases; `c_proj` has `d × d` and `d`. In total
#
# $$ 3d^2 + 3d + d^2 + d = 4d^2 + 4d .$$
#
# The number of heads does not appear: more heads means *narrower* heads (`head_dim = d /
# n_head`), and the total width of all queries (and keys, and values) stays `d`. Heads are a
# way of dividing the same parameters, not of adding more. Version 1 has the same weights but
# no q/k/v bias, so $4d^2 + d$.

# %%
def n_params(module):
    return sum(p.numel() for p in module.parameters())


print(f"{'d':>4} {'n_head':>6} {'4d²+4d':>9} {'v2':>9} {'torch':>9} {'v1 (4d²+d)':>11}")
for width, heads in [(32, 1), (32, 4), (32, 32), (768, 12)]:
    formula = 4 * width**2 + 4 * width
    p2 = n_params(MultiHeadAttentionV2(width, heads))
    pt = n_params(nn.MultiheadAttention(width, heads, batch_first=True))
    p1 = n_params(MultiHeadAttentionV1(width, heads, block_size=4))
    assert p2 == pt == formula and p1 == 4 * width**2 + width
    print(f"{width:>4} {heads:>6} {formula:>9,} {p2:>9,} {pt:>9,} {p1:>11,}")

# %% [markdown]
# At GPT-2 small's width (d = 768) one attention layer holds 2,362,368 parameters; its 12
# layers hold about 28 million of the model's 124 million.

# %% [markdown]
# ## 9. How fast is each version?
#
# All our implementations do the same projections, and the hand-written ones the same
# attention arithmetic too; the fused causal kernel does only about half the attention FLOPs
# (see below). Counting 2 floating-point operations per multiply-add, the projections cost
# $8d^2$ FLOPs per token ($6d^2$ for `c_attn`, $2d^2$ for `c_proj`). For the attention, each
# token and head computes $T$ dot products of length `head_dim` (the scores) and a weighted sum
# of $T$ value vectors of length `head_dim`, $2 \cdot T \cdot$ `head_dim` FLOPs each; times
# `n_head` that is $4Td$ per token (counting every key, as a kernel that ignores the causal
# mask does). What differs is how the work is organised:
#
# - **loop of heads** (version 1): 3 × `n_head` small projections and `n_head` attention
#   calls, one after another, each materialising its own `(B, T, T)` weights;
# - **batched reference** (version 2, `impl="reference"`): one big projection, then all heads
#   at once — but the weights are one `(B, n_head, T, T)` tensor. At `B=8, T=1024, n_head=12`
#   that is 100 million floats (400 MB), written and read several times (scores, mask,
#   softmax, product). Two or three such tensors are alive at once, so this row needs about
#   1 GB of memory at its peak: on a laptop short of memory, lower `Bb` in the cell below;
# - **SDPA fast path** (version 2, `impl="sdpa"`): with no dropout, the CPU picks the fused
#   flash kernel, which works through the keys in tiles and never stores the full weights;
#   with `is_causal=True` it also skips the tiles that lie entirely above the diagonal
#   ([chapter 8](08_flash_attention.ipynb) builds that algorithm);
# - **`nn.MultiheadAttention`, eval + mask**: PyTorch's module as you would call it for
#   inference, in `eval()` mode under `torch.no_grad()`, with the causal mask. Those are the
#   conditions for its native "fast path" (`torch._native_multi_head_attention`). On CPU with a
#   mask, that path computes the scores with a batched matrix product and a masked softmax: it
#   builds the full `(B, n_head, T, T)` weights, like our batched reference;
# - **`nn.MultiheadAttention`, train + is_causal**: the same module in training mode (its
#   dropout is 0, so nothing else changes). Outside the native fast path it runs
#   `F.multi_head_attention_forward`, which with `need_weights=False` calls
#   `F.scaled_dot_product_attention`. Given the hint `is_causal=True` (the module still wants
#   the mask as well), it drops the mask and passes `is_causal` to SDPA: the same fused kernel as
#   our fast path, on inputs of the same shape (a cell after the timings lists the calls). The
#   work around that call is not the same: the module moves the batch axis second and copies the
#   projected q | k | v into a `(3, T, B, d)` layout before it splits them.
#
# We time a GPT-2-sized layer: `B=8, T=1024, d=768, 12 heads`, forward only, under
# `torch.no_grad()`, every module but the last in `eval()` mode. On a laptop CPU the slower
# versions take seconds per forward pass, so we first time one call of each (which doubles as a
# warm-up), then time each 3 more times, or 5 if 5 rounds fit in about 15 seconds, and report
# the median, the middle one of the sorted times. Timings depend on the machine and on what else
# runs on it, so the cell's output is not checked; the cell asserts only the orderings that the
# text below relies on.

# %% tags=["nbval-ignore-output"]
torch.manual_seed(0)
Bb, Tb, db, nhb = 8, 1024, 768, 12
xb = torch.randn(Bb, Tb, db)
torch_mask = ~causal_mask(Tb)  # True = masked out, PyTorch's orientation
mha_eval = nn.MultiheadAttention(db, nhb, batch_first=True).eval()
mha_train = nn.MultiheadAttention(db, nhb, batch_first=True).train()  # dropout=0.0
candidates = {
    "loop of heads": MultiHeadAttentionV1(db, nhb, block_size=Tb).eval(),
    "batched reference": MultiHeadAttentionV2(db, nhb, impl="reference").eval(),
    "SDPA fast path": MultiHeadAttentionV2(db, nhb, impl="sdpa").eval(),
    "nn.MHA, eval + mask": lambda x: mha_eval(
        x, x, x, attn_mask=torch_mask, need_weights=False
    )[0],
    "nn.MHA, train + is_causal": lambda x: mha_train(
        x, x, x, attn_mask=torch_mask, need_weights=False, is_causal=True
    )[0],
}


def time_once(fn):
    start = time.perf_counter()
    fn(xb)
    return time.perf_counter() - start


with torch.no_grad():
    first = {name: time_once(fn) for name, fn in candidates.items()}  # warm-up and estimate
    reps = 5 if 5 * sum(first.values()) <= 15 else 3  # odd, so the median is one of them
    times = {
        name: sorted(time_once(fn) for _ in range(reps))[reps // 2]
        for name, fn in candidates.items()
    }

fast = times["SDPA fast path"]
n_threads = torch.get_num_threads()
print(f"B={Bb}, T={Tb}, d={db}, n_head={nhb}, median of {reps} forward passes, "
      f"{n_threads} CPU thread{'s' if n_threads > 1 else ''}")
for name, sec in times.items():
    print(f"{name:>26}: {1000 * sec:8.1f} ms   {sec / fast:5.2f}x the fast path")
assert fast < times["batched reference"], "the fused kernel should beat materialised weights"
assert fast < 1.25 * times["loop of heads"], "the fast path should not be slower than the loop"
assert times["nn.MHA, train + is_causal"] < times["batched reference"], "SDPA route expected"
assert fast < times["nn.MHA, eval + mask"], "the eval-mode call forms the full weights"

# %% tags=["nbval-ignore-output"]
fig, ax = plt.subplots(figsize=(8, 3.4))
names = list(times)
ms = [1000 * times[n] for n in names]
bars = ax.barh(names, ms, color=["C0", "C1", "C2", "C3", "C4"])
ax.bar_label(bars, [f" {times[n] / fast:.1f}× fast path" for n in names])
ax.invert_yaxis()
ax.set_xlim(0, 1.3 * max(ms))  # room for the labels
ax.set_xlabel("forward pass, ms (median; lower is better)")
ax.set_title(
    f"multi-head attention, B={Bb}, T={Tb}, d={db}, {nhb} heads, "
    f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
)
plt.show()

# %% [markdown]
# Which kernel does each version run? `torch.profiler` answers that, but here a smaller tool is
# enough: `attnbook.calls.CallLog`, a `TorchDispatchMode` (PyTorch's hook for seeing every
# operation that reaches the kernels; it lives in `torch.utils._python_dispatch`), records the
# name and first input shape of each call. We run each version once on a small input, 4 heads of 16, and keep the calls that do
# the attention and the copies.

# %%
from attnbook.calls import CallLog  # a TorchDispatchMode that records the calls

torch.manual_seed(0)
Bs, Ts, ds, nhs = 2, 64, 64, 4  # small: only the names and shapes of the calls matter
xs_small = torch.randn(Bs, Ts, ds)
mask_small = ~causal_mask(Ts)  # True = masked out, PyTorch's orientation
mha_eval_small = nn.MultiheadAttention(ds, nhs, batch_first=True).eval()
mha_train_small = nn.MultiheadAttention(ds, nhs, batch_first=True).train()
small = {
    "batched reference": MultiHeadAttentionV2(ds, nhs, impl="reference").eval(),
    "SDPA fast path": MultiHeadAttentionV2(ds, nhs, impl="sdpa").eval(),
    "nn.MHA, eval + mask": lambda x: mha_eval_small(
        x, x, x, attn_mask=mask_small, need_weights=False
    )[0],
    "nn.MHA, train + is_causal": lambda x: mha_train_small(
        x, x, x, attn_mask=mask_small, need_weights=False, is_causal=True
    )[0],
}
shown = ("_scaled_dot_product_flash_attention_for_cpu", "_native_multi_head_attention",
         "_softmax", "bmm", "clone")
kernels = {}
with torch.no_grad():
    for name, fn in small.items():
        with CallLog() as log:
            fn(xs_small)
        kernels[name] = [call for call in log.calls if call[0] in shown]
        print(f"{name}:")
        for op, shape in kernels[name]:
            print(f"    {op} {shape}")
flash = ("_scaled_dot_product_flash_attention_for_cpu", (Bs, nhs, Ts, ds // nhs))
assert flash in kernels["SDPA fast path"] and flash in kernels["nn.MHA, train + is_causal"]

# %% [markdown]
# Our fast path and the training-mode `nn.MultiheadAttention` call the same flash kernel on
# `(B, n_head, T, head_dim)` inputs; the module also makes two `clone`s, of its input moved to
# `(T, B, d)` and of the projected q | k | v in a `(3, T, B, d)` layout. The eval-mode call goes
# into one native operation, `_native_multi_head_attention`, and our log does not see inside it;
# `torch.profiler` does, and finds there a `bmm` and a `_masked_softmax` on `(B, n_head, T, T)`
# scores: like the batched reference, with its `bmm` and `_softmax`, it forms the full weights.
#
# What to take from the table. The first line of its output gives the number of CPU threads of
# the stored run, and your numbers will differ; the cell asserts only the orderings below.
#
# - Where the weights are stored, the time goes to them. The batched reference, the loop of
#   heads and the eval-mode `nn.MultiheadAttention` all form `(T, T)` weights for every head and
#   run behind the fused kernel (asserted for the first and last; for the loop, in all our runs),
#   which never stores them and, being causal, skips the tiles above the diagonal. Between those
#   three the order varied from run to run: batching the heads saves per-call overhead, which
#   matters little on a CPU when every call is already a large matrix product, and costs one huge
#   `(B, n_head, T, T)` tensor instead of `n_head` smaller ones. Batching pays off when the heads
#   are small or the hardware is very wide (a GPU launching one kernel instead of twelve); a fused
#   kernel pays off everywhere.
# - `nn.MultiheadAttention` is as fast as the path it takes. In training mode with
#   `is_causal=True` it shares our fast path's kernel (shown above). Against its own eval-mode
#   call and against our fast path its place varied from run to run and machine to machine,
#   ahead in some runs and behind in others (on a quiet 2-core machine its eval-mode call, one
#   fused native kernel, came out ahead of its training-mode call): the kernel call is shared, and the
#   work around it that is not (the copies above) is small next to the kernel. Which path a call
#   takes depends on the mode, `no_grad()`, the mask type, the number of heads and your PyTorch
#   version; when speed matters, list the calls as above (or with
#   `torch.profiler`) and look for `_scaled_dot_product_flash_attention` among them.
#
# The projections do the same arithmetic in every row (the loop merely cuts it into smaller
# products), so most of the differences come from the attention step. As T grows, that step's
# cost grows like $T^2$ while the projections' grows like $T$ — exercise 1 finds where the two
# cross.

# %% [markdown]
# ## Check against the module
#
# The package version of this chapter is `attnbook.attention.MultiHeadAttention`, built from an
# `AttentionConfig`. It has the same `c_attn` / `c_proj` layout as our version 2, so our
# `state_dict` loads into it directly. We check both of its kernels against our version 2 (whose
# weights are copied from version 1), and build it once more through the registry with
# `build_attention("mha", cfg)`, the way later chapters will choose an attention variant by
# name. The config holds what every variant shares (sizes, positions, dropout, bias, causality,
# the kernel); a variant's own settings are keyword options next to it, declared in the
# variant's file: [chapter 4](04_mqa_gqa.ipynb)'s grouped-query attention is
# `build_attention("gqa", cfg, n_kv_head=2)`, [chapter 9](09_sliding_window.ipynb)'s sliding window
# `build_attention("local", cfg, window=16)`. Multi-head attention has none.

# %%
from attnbook.attention import available, build_attention  # the others came in section 2

y_v2 = v2(x)  # v2 holds version 1's weights (section 6)
for impl in ("reference", "sdpa"):
    cfg = AttentionConfig(n_embd=d, n_head=n_head, dropout=0.0, bias=True, causal=True, impl=impl)
    module = MultiHeadAttention(cfg)
    module.load_state_dict(v2.state_dict())
    assert torch.allclose(module(x), y_v2, atol=1e-5), impl

# the defaults fill the rest: block_size=1024, dropout=0.0, bias=True, causal=True,
# positions="learned", impl="sdpa" (a third kernel, "flash", comes in chapter 8)
built = build_attention("mha", AttentionConfig(n_embd=d, n_head=n_head))
built.load_state_dict(v2.state_dict())
assert isinstance(built, MultiHeadAttention) and torch.allclose(built(x), y1, atol=1e-5)
print("'mha' registered:", "mha" in available())
print("attnbook MultiHeadAttention (reference and sdpa) == our v2 == v1: OK (atol=1e-5)")

# %% [markdown]
# ## Summary
#
# - One head has one softmax per query, so it blends whatever it attends to into one average. Two
#   hand-built heads on `abcabdac` keep two relations apart: head A finds the previous token (at
#   t=6, `d`), head B the same token (its row for the last `a`, t=6, puts 0.33 on positions 0, 3
#   and 6). One head scoring both blurs them; concatenating the heads keeps each answer in its own
#   features.
# - The sketch's multi-head class, `MHASketchV1`, crashed on `torch.sqrt(..., dim=-1)`
#   (`TypeError`); with a plain `head_dim ** 0.5` it ran at `T = block_size = 8` only, since its
#   `(8, 8)` mask does not broadcast against `(2, 4, 6, 6)` scores (`RuntimeError`), until cut to
#   `self.mask[:T, :T]`. Masking with `-1e10` then gave exactly the package's float32 outputs, but
#   float16 cannot hold it (`masked_fill` raises) and a fully masked row comes out uniform
#   (0.333 each) where $-\infty$ gives NaN and attnbook zeros. With `float("-inf")`, `MHASketchV4`
#   equals `attnbook.attention.MultiHeadAttention` (both kernels, T = 6 and 8, atol 1e-5) and runs
#   in float16.
# - Version 1 is a `ModuleList` of causal `Head`s whose outputs are concatenated and mixed by a
#   `proj` layer; changing the last token leaves every earlier output unchanged.
# - Version 2 runs all heads at once: one fused `c_attn` (q | k | v, each cut into heads in order),
#   `view` and `transpose(1, 2)` to `(B, n_head, T, head_dim)`, one attention call, and the merge
#   back. After the transpose `n_head` and `head_dim` are no longer adjacent in memory (strides
#   `(24, 4, 8, 1)`), so `view(B, T, d)` raises a `RuntimeError` until `.contiguous()` copies the
#   tensor.
# - Both versions compute one function: with version 1's weights copied into `c_attn` and `c_proj`,
#   version 1 == version 2 and its `"reference"` kernel == its `"sdpa"` kernel; a version 2 with
#   random biases == `torch.nn.MultiheadAttention` with the same weights in `in_proj` /
#   `out_proj`; all at atol=1e-5.
# - `nn.MultiheadAttention`'s boolean masks mean `True` = masked out, the opposite of attnbook's:
#   handed our causal mask unchanged, each query looked only at later positions and the last row
#   came out NaN. Invert it (`~causal_mask(T)`) or pass a float mask with `-inf` where masked.
# - The layer has $4d^2 + 4d$ parameters whatever the number of heads: 4,224 at d = 32 with 1, 4
#   or 32 heads, 2,362,368 at GPT-2 small's d = 768 (version 1, without q/k/v biases, has
#   $4d^2 + d$). More heads means narrower heads, not more weights.
# - Timed on this machine at B=8, T=1024, d=768, n_head=12 (forward only): the fused SDPA kernel
#   (ours, or `nn.MultiheadAttention`'s training path) was the fastest; the loop of heads and the
#   batched reference, which stores the full
#   `(B, n_head, T, T)` weights, were well behind it. `nn.MultiheadAttention` is as fast as the
#   path it takes: in eval mode with a mask it formed the full weights and ran behind our
#   fused kernel, in the range of the hand-written versions; in training mode with
#   `is_causal=True` it ran the same fused kernel as our fast path, and its place against its
#   own eval-mode call and our fast path changed with the machine and its load.
# - `attnbook.attention.MultiHeadAttention`, built from an `AttentionConfig` or by name with
#   `build_attention("mha", cfg)`, has the same `c_attn` / `c_proj` layout: our weights load into
#   it, and both its kernels match versions 2 and 1 (atol=1e-5).

# %% [markdown]
# ## Further reading
#
# - Vaswani et al., *Attention Is All You Need* (2017), section 3.2.2: multi-head attention.
# - Michel, Levy and Neubig, *Are Sixteen Heads Really Better than One?* (NeurIPS 2019): many heads
#   can be pruned after training.
# - Voita, Talbot, Moiseev, Sennrich and Titov, *Analyzing Multi-Head Self-Attention* (ACL 2019):
#   what individual heads specialise in.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/03_multi_head_attention_solutions.ipynb`](solutions/03_multi_head_attention_solutions.ipynb).
# Try each one first: write down your prediction, then check it with code.
#
# 1. **Where does the time go?** Count the floating-point operations of one forward pass of
#    multi-head attention (matrix products only, 2 FLOPs per multiply-add, causal mask ignored):
#    the projections and the attention step, as functions of `B, T, d`. Predict the sequence
#    length at which the attention step costs as much as the projections. Does it depend on
#    `n_head`? Check your formula with `torch.utils.flop_counter.FlopCounterMode`, on a module
#    built with `impl="reference"`: the counter sees the reference path's matrix products but
#    not the inside of the fused CPU SDPA kernel (with the default `impl="sdpa"` it reports the
#    projections only). Then find the crossover from the counter's own numbers, split by
#    operation (`counter.get_flop_counts()`).
# 2. **Heads have no order.** Predict: if you permute the heads of a `MultiHeadAttention`
#    (reorder the head blocks inside the q, k and v parts of `c_attn`, weights and biases), and
#    permute the *columns* of `c_proj.weight` the same way, does the output change? What if
#    you permute `c_attn` only? Verify both.
# 3. **Padding.** Two sequences of lengths 6 and 10, right-padded to 10, go through a
#    *non-causal* module (`AttentionConfig(..., causal=False)`, as in an encoder). Pass a key
#    padding mask (`attnbook.attention.padding_mask`, reshaped to broadcast over heads and
#    queries) and show that the real positions of the short sequence get exactly the output
#    they get when that sequence runs alone, unpadded. Do the same with
#    `nn.MultiheadAttention`'s `key_padding_mask` — mind the orientation. Then predict: does a
#    *causal* module need the padding mask at all for right-padded sequences?
# 4. **Per-head maps.** `MultiHeadAttention.forward(x, need_weights=True)` returns the weights
#    of every head, shape `(B, n_head, T, T)`. Plot the heads of one example side by side.
#    Check that each row sums to 1 and that nothing lies above the diagonal, and that their
#    mean over heads is what `nn.MultiheadAttention` returns as its (default, averaged)
#    weights.
# 5. **Find the bug.** Someone writes the head split as
#    `q = q.reshape(B, self.n_head, T, self.head_dim)` (and the same for k and v) — no
#    transpose, and the shape is right; the merge at the end stays as in the module. Predict
#    what goes wrong, then find a *test* that catches it. (Hints: which input positions end up
#    in "row t" of head h? Is the layer still causal? Why would `view` instead of `reshape`
#    have refused?) Then drop the transpose in the merge too: which of your tests still
#    catches it?
