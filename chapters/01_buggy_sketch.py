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
# # Chapter 1 — The buggy sketch
#
# This chapter starts with the problem attention solves and its simplest form, with no learned
# weights at all, on a six-word sentence. Then it turns to code.
#
# Somebody needed a causal single-head self-attention layer and wrote one in ten minutes. It
# looks like every attention snippet you have seen: three linear projections, a matrix product,
# a mask, a softmax, dropout. It also contains eight bugs. Some crash at once with a clear
# message; others run without complaint and return numbers that are quietly wrong, which is
# far worse, because nothing tells you to look.
#
# In this chapter we run the sketch, fix one bug at a time, and for every bug look at the
# evidence it leaves behind: the exception, or the wrong number together with a test that
# exposes it. The class grows in versions, `SketchV1` (as written) to `SketchV9` (fixed), so you
# can compare any two versions line by line. At the end we tidy the result into the two small
# classes the rest of the book builds on, `SelfAttention` and the causal `Head`, and check them
# against `attnbook.attention`.
#
# ## Learning goals
#
# - Say what problem attention solves, and compute its weight-free form, $\mathrm{softmax}(X
#   X^\top) X$, by hand on a toy sentence; say why it needs learned queries, keys and values.
# - State what single-head (causal) self-attention computes, and the properties that follow
#   from it: weights that are non-negative and sum to 1, outputs that are weighted averages of
#   value vectors, no dependence on future tokens, a deterministic forward pass in eval mode.
# - Recognise the usual bugs in attention code from their symptoms, including the silent ones.
# - Turn each property into a small numerical test that catches a whole class of bugs.
# - Explain why a causal mask belongs in a registered, non-persistent buffer.
# - Use `SelfAttention` and `Head` from `attnbook.attention`.
#
# The outputs stored in this notebook were produced with the PyTorch this book pins, 2.13 (the
# next cell prints the version you are running). Under another version, warnings, error
# messages and printed signatures may be worded differently; the numbers should not change.

# %%
import inspect
import math
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

print("torch", torch.__version__.split("+")[0])

# %% [markdown]
# ## Why attention: words that look at each other
#
# What a word means depends on the words around it. In "the cat sat on the mat", *sat* needs to
# know who sat, and *mat* where the sitting happened. A model that reads the sentence must let
# each word collect information from the others. Recurrent networks, the standard before
# transformers, read one word at a time and carried everything seen so far in one vector of
# fixed size; whatever word 1 had to tell word 50 had to survive 49 updates of that vector.
# Attention's answer is direct: every position may look at every other position, and builds its
# new vector as a **weighted average** of what it finds there, with a weight for each position
# that says how relevant it is.
#
# The simplest version has no learned weights at all. Give each word a vector; score every pair
# of words by the dot product of their vectors (similar vectors, large score); turn each row of
# scores into weights that are positive and sum to 1 with a softmax; replace each word by the
# weighted average of all the words' vectors. For a sentence stored as the rows of a matrix $X$
# (one row per word) that is three lines: $S = X X^\top$, $A = \mathrm{softmax}(S)$ row by
# row, $Y = A X$.
#
# Our vectors are made by hand, with four features we can read: how much a word names an
# animal, an object, an action, and how much it is a small function word (0 for not at all, 1.5
# for very).

# %%
words = ["the", "cat", "sat", "on", "the", "mat"]
X = torch.tensor([  # (6 words, 4 features): animal, object, action, function word
    [0.0, 0.0, 0.0, 1.5],  # the
    [1.5, 0.6, 0.0, 0.0],  # cat
    [0.45, 0.0, 1.5, 0.0],  # sat
    [0.0, 0.3, 0.45, 1.2],  # on
    [0.0, 0.0, 0.0, 1.5],  # the
    [0.0, 1.5, 0.0, 0.3],  # mat
])
S = X @ X.T  # (6, 6): S[i, j] = x_i . x_j, how similar word j is to word i
A = torch.softmax(S, dim=-1)  # (6, 6): each row sums to 1
Y = A @ X  # (6, 4): each word's new vector, a weighted average of all six
print("weights (row: the word that looks, column: the word it looks at)")
print("       " + " ".join(f"{w:>5}" for w in words))
for w, row in zip(words, A, strict=True):
    print(f"{w:>5}  " + " ".join(f"{a:5.2f}" for a in row.tolist()))
print("rows sum to 1:", torch.allclose(A.sum(-1), torch.ones(6)))
print("new vector of 'sat':", Y[2].numpy().round(2), " was", X[2].numpy())

# %% [markdown]
# The picture draws the same weights twice: as a grid, and as lines from each word to the words
# it looks at, thicker for larger weights (weights under 0.1 left out).

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.3]})
ax1.imshow(A, cmap="Blues", vmin=0, vmax=1)
ax1.set_xticks(range(6), words)
ax1.set_yticks(range(6), words)
for i in range(6):
    for j in range(6):
        ax1.text(j, i, f"{A[i, j]:.2f}", ha="center", va="center", fontsize=8,
                 color="white" if A[i, j] > 0.5 else "black")
ax1.set(xlabel="looks at (key)", ylabel="word that looks (query)",
        title="softmax(X Xᵀ): who looks at whom")
for i, w in enumerate(words):  # the words in two rows: lookers on top, looked-at below
    ax2.text(i, 1, w, ha="center", va="bottom", fontsize=11)
    ax2.text(i, 0, w, ha="center", va="top", fontsize=11)
    for j in range(6):
        if A[i, j] >= 0.1:
            ax2.plot([i, j], [0.95, 0.08], color="tab:blue", lw=6 * float(A[i, j]), alpha=0.7)
ax2.set(xlim=(-0.5, 5.5), ylim=(-0.3, 1.3), title="the same weights as lines (top looks at bottom)")
ax2.axis("off")
plt.show()

# %% [markdown]
# It works as a mechanism: every word now carries some of the others (*sat*'s new vector has
# picked up "object" and "function word" from its neighbours and kept only two thirds of its
# "action"). But it looks at the wrong things. Most words look mostly at themselves, because a
# vector is usually most similar to itself (always, among vectors of the same length: $x_i
# \cdot x_j \le \lVert x_i \rVert \lVert x_j \rVert$), and otherwise at words *like*
# themselves: the two *the*s look at each other as much as at themselves, and *on*, whose
# vector is shorter than theirs, looks at each *the* (0.26) a little more than at itself
# (0.24). Meanwhile *sat*, which needs its subject, gives *cat* 0.11, no more than it gives
# *on*. Similarity is not relevance. And the scores are symmetric, $S_{ij} = S_{ji}$: *cat*
# and *sat* find each other exactly as similar, although only one of them needs the other
# (the weights, 0.09 and 0.11, differ only because each row is normalised on its own). One
# more problem, for a model that predicts the next word: *on*, at position 3, gives 0.26 to
# the *the* at position 4, a word it should not have seen yet.
#
# The fixes are what the rest of the chapter builds. Each word gets three different learned
# vectors instead of one: a **query**, what it is looking for; a **key**, what it offers to be
# found by; and a **value**, what it hands over when found. The score of a pair is query times
# key, no longer symmetric and no longer largest on the diagonal, and training learns what
# relevance means. A **causal mask** hides the future. Here is the whole layer as somebody
# wrote it in a hurry.

# %% [markdown]
# ## 1. What the sketch is supposed to compute
#
# The input is a batch of sequences, each of $T$ vectors $x_0, \dots, x_{T-1}$ with $d_{in}$
# numbers each: a tensor of shape `(B, T, d_in)`. Single-head self-attention turns each vector
# $x_t$ into three new ones with learned matrices: a **query** $q_t = W_q x_t$ ("what am I
# looking for?"), a **key** $k_t = W_k x_t$ ("what do I contain?") and a **value**
# $v_t = W_v x_t$ ("what do I hand over?"), each of size $d_{out}$. Then, for every position
# $t$:
#
# 1. score every position $j$ it may look at: $s_{tj} = q_t \cdot k_j / \sqrt{d_{out}}$;
# 2. in **causal** attention (a language model predicting the next token), position $t$ may
#    look only at $j \le t$: the future is off limits;
# 3. turn the scores into weights with a softmax over $j$: $a_{tj} = e^{s_{tj}} / \sum_{j'
#    \le t} e^{s_{tj'}}$, so every weight is positive and the weights of a row sum to 1;
# 4. output the weighted average of the values: $y_t = \sum_{j \le t} a_{tj} v_j$.
#
# The most direct way to write this is a loop over positions. It is slow, but there is no
# mask and no transpose to get wrong: position $t$ simply never sees anything after it. We keep
# it as the **reference** that the fixed class must reproduce.

# %%
def reference_attention(x, W_q, W_k, W_v):
    """Causal single-head attention as a plain loop. W_* have nn.Linear's (d_out, d_in) layout."""
    B, T, _ = x.shape
    d_out = W_q.shape[0]
    y = torch.zeros(B, T, d_out)
    for b in range(B):
        for t in range(T):
            q = W_q @ x[b, t]  # (d_out,)
            keys = [W_k @ x[b, j] for j in range(t + 1)]  # only positions 0..t exist for t
            values = [W_v @ x[b, j] for j in range(t + 1)]
            scores = torch.stack([q @ k for k in keys]) / math.sqrt(d_out)  # (t + 1,)
            weights = torch.softmax(scores, dim=0)  # (t + 1,), sums to 1
            y[b, t] = sum(w * v for w, v in zip(weights, values, strict=True))
    return y  # (B, T, d_out)


# %% [markdown]
# Four properties follow from the definition, and each will become a test:
#
# - **shape**: `(B, T, d_in)` in, `(B, T, d_out)` out;
# - **weighted average**: the weights of a row are non-negative and sum to 1 (in eval mode:
#   dropout, in training, zeroes some weights and scales up the rest), so no output coordinate
#   can be larger in size than the largest value coordinate;
# - **causality**: changing token $T-1$ must not change outputs $0, \dots, T-2$;
# - **determinism**: in eval mode, the same input gives the same output every time.
#
# Our toy data: a batch of 2 sequences of 6 tokens, each token an 8-number vector, projected to
# 4 numbers. `block_size = 8` is the longest sequence the layer will accept.

# %%
torch.manual_seed(0)
B, T, d_in, d_out, block_size = 2, 6, 8, 4, 8
x = torch.randn(B, T, d_in)  # (B, T, d_in)
print("x:", tuple(x.shape))

# %% [markdown]
# ## 2. The sketch, as written
#
# Here it is. Read it once and see how many bugs you can find before we run it. (The
# `noqa` comments silence the linter's F821 "undefined name" warning so that this book's own
# lint check passes; remember that the linter had noticed something. The author also kept the
# last attention weights in `self.attn` for plotting, a habit we will be glad of.)

# %%
class SketchV1(nn.Module):
    """Causal single-head self-attention, written in a hurry."""

    def __init__(self, d_in, d_out, block_size, dropout=0.1):
        self.W_query = nn.Linear(d_in, d_out, bias=False)
        self.W_key = nn.Linear(d_in, d_out, bias=False)
        self.W_value = nn.Linear(d_in, d_out, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.d_out = d_out
        self.dropout = dropout

    def forward(self, x):
        T = x.shape[1]
        Q = W_query(x)  # noqa: F821
        K = W_key(x)  # noqa: F821
        V = W_value(x)  # noqa: F821
        scores = Q @ K.T
        scores = scores / torch.sqrt(torch.tensor(self.d_out), dim=-1)
        scores = scores.masked_fill(mask[:T, :T] == 0, 1e-10)  # noqa: F821
        weights = torch.softmax(scores, dim=-1)
        weights = F.dropout(weights, self.dropout)
        self.attn = weights.detach()
        return scores @ V


# %% [markdown]
# Every version of the class will be built through one helper. It seeds the random number
# generator first, so every version starts from the *same* weights and outputs can be compared
# across versions. Dropout is 0 unless we ask for it; it gets its own section near the end.

# %%
def build(cls, dropout=0.0):
    torch.manual_seed(0)  # same seed -> same initial weights in every version
    return cls(d_in=d_in, d_out=d_out, block_size=block_size, dropout=dropout)


# %% [markdown]
# ## 3. Bug 1: no `super().__init__()`
#
# We cannot even build it:

# %% tags=["raises-exception"]
model = build(SketchV1)

# %% [markdown]
# **Why.** `nn.Module` overrides attribute assignment. When you write
# `self.W_query = nn.Linear(...)`, the module does not just store the attribute: it records the
# sub-module in a dictionary `self._modules`, which is how `parameters()`, `.to(device)`,
# `state_dict()` and `train()`/`eval()` later find it. That dictionary is created by
# `nn.Module.__init__`. Skip the call, and the first sub-module assignment has nowhere to go.
# (Assigning a plain number such as `self.d_out` before `super().__init__()` happens to work,
# which is why this bug can hide until the first layer is added.)
#
# **Fix.** Call `super().__init__()` first thing in `__init__`. Version 2 is a fresh subclass of
# `nn.Module` (a subclass of `SketchV1` would have its `super().__init__()` land in the broken
# `SketchV1.__init__`) that borrows the unchanged `forward`: the line
# `forward = SketchV1.forward` works because a function defined in a class body is an ordinary
# Python function, so assigning it in another class body makes it a method of that class too,
# and `self` is then a `SketchV2`. From here on each version subclasses
# the previous one and overrides only the method that changes; a comment `# vN` marks the
# changed lines.

# %%
class SketchV2(nn.Module):
    def __init__(self, d_in, d_out, block_size, dropout=0.1):
        super().__init__()  # v2: creates _modules, _parameters, _buffers
        self.W_query = nn.Linear(d_in, d_out, bias=False)
        self.W_key = nn.Linear(d_in, d_out, bias=False)
        self.W_value = nn.Linear(d_in, d_out, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.d_out = d_out
        self.dropout = dropout

    forward = SketchV1.forward  # unchanged, still buggy


model = build(SketchV2)
print("parameters:", [name for name, _ in model.named_parameters()])
print("number of weights:", sum(p.numel() for p in model.parameters()))

# %% [markdown]
# Three weight matrices of shape `(4, 8)`, 96 numbers, all registered. Now the forward pass:
#
# ## 4. Bug 2: projections called without `self.`

# %% tags=["raises-exception"]
model(x)

# %% [markdown]
# **Why.** Inside a method, a bare name `W_query` is looked up among the local variables, then
# the module's globals, then the built-ins. It is never looked up on the object: that is what
# `self.` is for. The layers exist, as `self.W_query` and so on, but the code asks for a global
# that does not exist. (Had a global named `W_query` existed, say from an earlier notebook
# cell, the call would have silently used *that* one instead.) This is exactly what the
# linter's `F821 undefined name` had flagged.
#
# **Fix.** `self.W_query(x)` and friends.

# %%
class SketchV3(SketchV2):
    def forward(self, x):
        T = x.shape[1]
        Q = self.W_query(x)  # v3: self.
        K = self.W_key(x)  # v3: self.
        V = self.W_value(x)  # v3: self.
        scores = Q @ K.T
        scores = scores / torch.sqrt(torch.tensor(self.d_out), dim=-1)
        scores = scores.masked_fill(mask[:T, :T] == 0, 1e-10)  # noqa: F821
        weights = torch.softmax(scores, dim=-1)
        weights = F.dropout(weights, self.dropout)
        self.attn = weights.detach()
        return scores @ V


# %% [markdown]
# ## 5. Bug 3: `K.T` on a 3-D tensor
#
# `Q` and `K` have shape `(B, T, d_out)`. The scores should be `(B, T, T)`: one $T \times T$
# matrix of query-key dot products per sequence, $Q K^\top$ for each batch element. What does
# `K.T` give? On a matrix, `.T` swaps the two axes. On a tensor with more axes, it *reverses
# all of them*. The PyTorch this book pins, 2.13, still allows that but warns that it is
# deprecated and will become an error in a future release. The cell below reports either
# outcome, so it also runs on a PyTorch where `.T` has become an error. The warning goes to
# stderr, so we catch it and print only its first sentence.
#
# PyTorch issues this warning only once per process. If you re-run the cell (or ran a later
# cell with `.T` first), the last line of the output is missing; restart the kernel to see it
# again.

# %%
K = model.W_key(x).detach()  # (B, T, d_out); `model` is still the SketchV2 built in section 3
print("K:                  ", tuple(K.shape))
try:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K_T = K.T
    print("K.T:                ", tuple(K_T.shape), "<- every axis reversed, batch axis now last")
except RuntimeError as err:  # a PyTorch newer than 2.13 may refuse .T on a 3-D tensor
    caught = []
    print("K.T:                 RuntimeError:", str(err).split(".")[0])
print("K.transpose(-2, -1):", tuple(K.transpose(-2, -1).shape), "<- what we want")
print("K.mT:               ", tuple(K.mT.shape), "<- the same, shorter")
if caught:  # empty when the warning was already shown in this process
    message = str(caught[0].message).split(" Consider")[0]
    print(f"{caught[0].category.__name__}: {message}")

# %% [markdown]
# So `Q @ K.T` asks for `(2, 6, 4) @ (4, 6, 2)`. Matrix multiplication treats the leading axes
# as a batch, and a batch of 2 cannot be paired with a batch of 4:

# %% tags=["raises-exception"]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the deprecation warning was shown above
    model = build(SketchV3)
    model(x)

# %% [markdown]
# Here we were lucky. For some shapes the same line runs and is wrong without an error (only
# the warning, shown once). With one sequence (`B = 1`) whose length happens to equal `d_out`,
# the batch axes broadcast (1 against 4) and the inner sizes agree, so the product succeeds with
# a meaningless shape. Nor does the rest of a layer complain: `masked_fill` broadcasts the
# `(4, 4, 1)` scores against the `(4, 4)` mask to `(4, 4, 4)`, and the layer returns four
# outputs for a batch of one. Here are the steps of the (otherwise fixed) layer, by hand:

# %%
torch.manual_seed(1)
Q1 = torch.randn(1, 4, 4)  # (B=1, T=4, d_out=4): one sequence as long as d_out
K1 = torch.randn(1, 4, 4)
V1 = torch.randn(1, 4, 4)
future = torch.tril(torch.ones(4, 4)) == 0  # (T, T), True above the diagonal
print("Q1 @ K1.transpose(-2, -1):", tuple((Q1 @ K1.transpose(-2, -1)).shape), "<- right")
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation warning, shown above
        scores1 = Q1 @ K1.T / 2  # (1, 4, 4) @ (4, 4, 1)
except RuntimeError as err:  # a PyTorch newer than 2.13 may refuse .T on a 3-D tensor
    print("Q1 @ K1.T:                 RuntimeError:", str(err).split(".")[0])
else:
    print("Q1 @ K1.T:                ", tuple(scores1.shape), "<- runs, and is wrong")
    scores1 = scores1.masked_fill(future, float("-inf"))
    print("after masked_fill:        ", tuple(scores1.shape))
    y1 = torch.softmax(scores1, dim=-1) @ V1
    print("layer output:             ", tuple(y1.shape), "<- for an input of shape (1, 4, 8)")

# %% [markdown]
# **Fix.** Swap only the last two axes: `K.transpose(-2, -1)` (or `K.mT`, "matrix
# transpose"). Both work for any number of leading batch axes, which
# [chapter 3](03_multi_head_attention.ipynb) will need when a head axis joins the batch axis.

# %%
class SketchV4(SketchV3):
    def forward(self, x):
        T = x.shape[1]
        Q = self.W_query(x)
        K = self.W_key(x)
        V = self.W_value(x)
        scores = Q @ K.transpose(-2, -1)  # v4: (B, T, d_out) @ (B, d_out, T) -> (B, T, T)
        scores = scores / torch.sqrt(torch.tensor(self.d_out), dim=-1)
        scores = scores.masked_fill(mask[:T, :T] == 0, 1e-10)  # noqa: F821
        weights = torch.softmax(scores, dim=-1)
        weights = F.dropout(weights, self.dropout)
        self.attn = weights.detach()
        return scores @ V


# %% [markdown]
# ## 6. Bug 4: `torch.sqrt` with a `dim` argument

# %% tags=["raises-exception"]
model = build(SketchV4)
model(x)

# %% [markdown]
# **Why.** `torch.sqrt` is element-wise: each number gets its own square root, so there is no
# axis to choose and no `dim` parameter. (`dim` belongs to reductions and to softmax, which is
# probably where the author's fingers got the habit.) Deleting `dim` does fix the crash: the
# sketch already wraps the number in a tensor, and `torch.sqrt(torch.tensor(self.d_out))` returns
# `tensor(2.)`. But it builds a new tensor on every call for a number that never changes.
#
# A related pitfall is to drop the wrapping as well: `torch.sqrt` only accepts tensors, so the
# natural-looking `torch.sqrt(self.d_out)` fails.

# %%
print("torch.sqrt(torch.tensor(4)) =", torch.sqrt(torch.tensor(4)))
try:
    print("torch.sqrt(4) =", torch.sqrt(4))
except TypeError as err:
    print("torch.sqrt(4) -> TypeError:", err)

# %% [markdown]
# **Fix.** The scale is a plain number known when the layer is built, so compute it with plain
# Python: `self.d_out ** 0.5` (or `math.sqrt`). No tensor, no device, no dtype to worry about.
#
# Why divide by $\sqrt{d_{out}}$ at all? A dot product of two vectors with $d_{out}$ random
# entries of size about 1 has a spread of about $\sqrt{d_{out}}$; without the division, wide
# heads get large scores and a softmax that puts almost all the weight on one position.
# [Chapter 2](02_scaled_dot_product_attention.ipynb) measures this, and exercise 4 below asks you
# to.

# %%
class SketchV5(SketchV4):
    def forward(self, x):
        T = x.shape[1]
        Q = self.W_query(x)
        K = self.W_key(x)
        V = self.W_value(x)
        scores = Q @ K.transpose(-2, -1)  # (B, T, T)
        scores = scores / self.d_out**0.5  # v5: a Python float
        scores = scores.masked_fill(mask[:T, :T] == 0, 1e-10)  # noqa: F821
        weights = torch.softmax(scores, dim=-1)
        weights = F.dropout(weights, self.dropout)
        self.attn = weights.detach()
        return scores @ V


# %% [markdown]
# ## 7. Bug 5: a mask that does not exist

# %% tags=["raises-exception"]
model = build(SketchV5)
model(x)

# %% [markdown]
# **Why.** The same mistake as bug 2 in another form: the mask was registered as the buffer
# `self.tril`, and `mask` is a name from some other snippet. Again the linter knew.
#
# **Fix.** Use the buffer, cut to the current length: `self.tril[:T, :T]` is the
# lower-triangular matrix of ones for this sequence length, and `== 0` selects the future
# positions, above the diagonal. Everything else stays as it was, `1e-10` included.

# %%
class SketchV6(SketchV5):
    def forward(self, x):
        T = x.shape[1]
        Q = self.W_query(x)
        K = self.W_key(x)
        V = self.W_value(x)
        scores = Q @ K.transpose(-2, -1)  # (B, T, T)
        scores = scores / self.d_out**0.5
        scores = scores.masked_fill(self.tril[:T, :T] == 0, 1e-10)  # v6: the real buffer
        weights = torch.softmax(scores, dim=-1)
        weights = F.dropout(weights, self.dropout)
        self.attn = weights.detach()
        return scores @ V


model6 = build(SketchV6)
with torch.no_grad():
    y6 = model6(x)
print("output:", tuple(y6.shape))

# %% [markdown]
# It runs, and the shape is right. Many a sketch gets committed at this point. From here on,
# nothing will crash; each remaining bug has to be caught by checking a property from
# section 1. Two small helpers do the checks we will use over and over:
#
# - `value_ratio` divides the largest output coordinate by the largest value coordinate. A
#   weighted average can never exceed what it averages, so for correct attention the ratio is at
#   most 1, whatever the input. It needs the layer's value projection, which the sketch calls
#   `W_value`; for a layer that names it differently, pass it as the third argument.
# - `past_change` shifts the last token of every sequence and reports how much the outputs
#   at the *earlier* positions moved. For causal attention that is 0.

# %%
def value_ratio(model, x, value_proj=None):
    value_proj = model.W_value if value_proj is None else value_proj  # e.g. head.value
    with torch.no_grad():
        return (model(x).abs().max() / value_proj(x).abs().max()).item()


def past_change(model, x):
    x_new = x.clone()
    x_new[:, -1] = x_new[:, -1] + 3.0  # change only the last token
    with torch.no_grad():
        return (model(x_new)[:, :-1] - model(x)[:, :-1]).abs().max().item()


# %% [markdown]
# ## 8. Bug 6: returning `scores @ V`
#
# First the weighted-average test, at the toy input and at the same input ten times larger:

# %%
for scale in (1, 10):
    print(f"input x{scale:<2}  max|y| / max|V| = {value_ratio(model6, scale * x):.1f}")
with torch.no_grad():
    growth = (model6(10 * x).abs().max() / model6(x).abs().max()).item()
print(f"input x10 multiplies the output by {growth:.0f}")
assert value_ratio(model6, x) > 1 and round(growth) == 1000

# %% [markdown]
# Already at the toy input the output is bigger than anything it is supposed to be an average
# of, and ten times the input gives a thousand times the output. A weighted average of values
# grows at most like the values (10x here). A factor 1000 = 10 × 10 × 10 points to a product of
# three things that each scale with the input: $Q$, $K$ and $V$. The scores $QK^\top$ are
# quadratic in $x$, and the sketch multiplies them straight into $V$.
#
# The weights themselves were computed correctly; they are just never used:

# %%
with torch.no_grad():
    V6 = model6.W_value(x)
print("rows of self.attn sum to 1:  ", torch.allclose(model6.attn.sum(-1), torch.ones(B, T)))
print("output equals self.attn @ V: ", torch.allclose(y6, model6.attn @ V6))

# %% [markdown]
# And here is a twist. Run the causality test on this broken version:

# %%
print(f"change in past outputs: {past_change(model6, x):.4f}")
assert past_change(model6, x) < 1e-6

# %% [markdown]
# It passes, for the wrong reason. In `scores @ V` the masked scores are the numbers `1e-10`,
# and `1e-10 × V` is nothing, so the future really does not reach the past. The mask bug of the
# next section is hidden behind this one; fixing this bug will uncover it. That is worth
# remembering whenever a test passes on code you know to be broken.
#
# **Fix.** Return `weights @ V`: the softmax weights applied to the values.

# %%
class SketchV7(SketchV6):
    def forward(self, x):
        T = x.shape[1]
        Q = self.W_query(x)
        K = self.W_key(x)
        V = self.W_value(x)
        scores = Q @ K.transpose(-2, -1)  # (B, T, T)
        scores = scores / self.d_out**0.5
        scores = scores.masked_fill(self.tril[:T, :T] == 0, 1e-10)
        weights = torch.softmax(scores, dim=-1)  # (B, T, T)
        weights = F.dropout(weights, self.dropout)
        self.attn = weights.detach()
        return weights @ V  # v7: (B, T, T) @ (B, T, d_out) -> (B, T, d_out)


model7 = build(SketchV7)
for scale in (1, 10):
    print(f"input x{scale:<2}  max|y| / max|V| = {value_ratio(model7, scale * x):.2f}")
assert value_ratio(model7, x) <= 1 + 1e-6 and value_ratio(model7, 10 * x) <= 1 + 1e-6

# %% [markdown]
# ## 9. Bug 7: masking with `1e-10` instead of $-\infty$
#
# Now the causality test, again:

# %%
leak = past_change(model7, x)
print(f"change in past outputs: {leak:.2f}")
assert leak > 0.1

# %% [markdown]
# The future leaks into the past. Look at the weights of the first sequence. Row $t$ is query
# position $t$; everything to the right of the diagonal should be exactly 0:

# %%
model7(x)  # refresh model7.attn for input x
print(model7.attn[0].numpy().round(2))

# %% [markdown]
# **Why.** The author wanted masked positions to get (almost) no weight and reached for a tiny
# number. But the softmax exponentiates the *scores*: a score of `1e-10` is a score of
# essentially 0, and $e^0 = 1$. Compare that with the unnormalised weight $e^{s}$ of a
# *visible* position, before the softmax divides by the row sum:

# %%
with torch.no_grad():  # the scores of the first sequence, as version 7 computes them
    scores7 = model7.W_query(x[0]) @ model7.W_key(x[0]).transpose(-2, -1) / d_out**0.5  # (T, T)
visible = scores7[torch.tril(torch.ones(T, T)) == 1]  # the scores on or below the diagonal
print(f"visible scores s:  from {visible.min():.2f} to {visible.max():.2f}")
print(f"e^s:               from {visible.exp().min():.2f} to {visible.exp().max():.2f}")
print(f"masked score 1e-10: e^s = {math.exp(1e-10):.2f}")

# %% [markdown]
# A masked position gets an unnormalised weight of 1, right in the middle of what the visible
# positions get. So token 0, which should attend only to itself, spreads its attention almost
# evenly over the whole sequence. What the mask has to do is make the weight tiny, and the
# weight is $e^{\text{score}}$, so the score must be very *negative*: $-\infty$ gives
# $e^{-\infty} = 0$ exactly. (A large negative finite number such as `torch.finfo(dtype).min` is
# the other common choice.)
#
# **Fix.** `masked_fill(..., float("-inf"))`.

# %%
class SketchV8(SketchV7):
    def forward(self, x):
        T = x.shape[1]
        Q = self.W_query(x)
        K = self.W_key(x)
        V = self.W_value(x)
        scores = Q @ K.transpose(-2, -1)  # (B, T, T)
        scores = scores / self.d_out**0.5
        scores = scores.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # v8
        weights = torch.softmax(scores, dim=-1)  # (B, T, T), exactly 0 above the diagonal
        weights = F.dropout(weights, self.dropout)
        self.attn = weights.detach()
        return weights @ V  # (B, T, d_out)


model8 = build(SketchV8)
model8(x)  # fills model8.attn for input x
print(f"change in past outputs: {past_change(model8, x):.4f}")
print("weights above the diagonal all 0:", bool((model8.attn.triu(1) == 0).all()))
print("token 0's weights on tokens 1-5, v7:", [round(w, 3) for w in model7.attn[0, 0, 1:].tolist()],
      f" sum {model7.attn[0, 0, 1:].sum():.2f}")
assert past_change(model8, x) < 1e-6

# %% [markdown]
# The picture makes the difference plain. On the left, the leaking weights of version 7: the
# hatched cells above the diagonal, the future, are as bright as the rest, and token 0 gives
# 0.87 of its attention (five weights of ≈0.174) to tokens that have not happened yet. On the
# right, the causal weights of version 8: the hatched cells are exactly 0, and token 0, which can
# see only itself, gives itself all of its attention.

# %%
panels = [("v7: masked with 1e-10 (future leaks)", model7.attn[0]),
          ("v8: masked with -inf (causal)", model8.attn[0])]
# outline of the future (j > t): a staircase just right of the diagonal
stair_x = [k + 0.5 for k in range(T - 1) for _ in (0, 1)] + [T - 0.5]
stair_y = [k + dy for k in range(T - 1) for dy in (-0.5, 0.5)] + [T - 1.5]
fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4), constrained_layout=True)
for ax, (title, w) in zip(axes, panels, strict=True):
    image = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if j > i:  # a future position: hatched
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//",
                                           edgecolor="silver", linewidth=0))
            ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if w[i, j] < 0.6 else "black",
                    bbox={"boxstyle": "square,pad=0.15", "linewidth": 0,
                          "facecolor": plt.cm.viridis(float(w[i, j]))})
    ax.plot(stair_x, stair_y, color="red", linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel("key position j (attended to)")
    ax.set_ylabel("query position t")
fig.colorbar(image, ax=axes, label="attention weight", shrink=0.9)
fig.suptitle("Hatched, right of the red line: future positions, which must get weight 0")
plt.show()

# %% [markdown]
# One caution that comes with $-\infty$: if *every* position of a row is masked, the softmax
# computes $0/0$ and returns NaN. A causal mask always leaves the diagonal visible, so it cannot
# happen here, but padding masks can produce such rows
# ([chapter 2](02_scaled_dot_product_attention.ipynb) shows one and how to handle it).

# %%
print(torch.softmax(torch.full((3,), float("-inf")), dim=0))

# %% [markdown]
# ## 10. Bug 8: dropout that stays on at eval time
#
# Dropout on the attention weights zeroes random weights during training, which regularises the
# model. At evaluation time it must be off. Build version 8 with dropout 0.5, switch it to eval
# mode, and call it twice on the same input:

# %%
model8 = build(SketchV8, dropout=0.5).eval()
with torch.no_grad():
    first, second = model8(x), model8(x)
print("model8.training:", model8.training)
print("two eval calls give the same output:", torch.equal(first, second))
assert not torch.equal(first, second)

# %% [markdown]
# **Why.** `model.eval()` does only one thing: it sets the `training` flag to `False` on the
# module and every registered sub-module. The functional `F.dropout` is not a module and never
# looks at that flag. It has its own `training` argument, and its default is `True`:

# %%
dropout_params = inspect.signature(F.dropout).parameters
print("F.dropout arguments:", list(dropout_params))
print("default of training:", dropout_params["training"].default)

# %% [markdown]
# So `F.dropout(weights, self.dropout)` drops weights on every call, in training and in
# evaluation alike.
#
# **Fix.** Make dropout a sub-module, `nn.Dropout(p)`, which follows `train()` / `eval()`
# (writing `F.dropout(weights, p, training=self.training)` also works, but is easier to forget).
# This changes `__init__` as well as `forward`. Since this is the last version, here it is in
# full rather than as a subclass, so that you can read the fixed sketch top to bottom. It creates
# its layers in the same order as before, so `build` still gives it the same weights.

# %%
class SketchV9(nn.Module):
    """Causal single-head self-attention, every bug fixed."""

    def __init__(self, d_in, d_out, block_size, dropout=0.1):
        super().__init__()  # v2
        self.W_query = nn.Linear(d_in, d_out, bias=False)
        self.W_key = nn.Linear(d_in, d_out, bias=False)
        self.W_value = nn.Linear(d_in, d_out, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.d_out = d_out
        self.dropout = nn.Dropout(dropout)  # v9: a sub-module, follows train()/eval()

    def forward(self, x):
        T = x.shape[1]
        Q = self.W_query(x)  # v3, (B, T, d_out)
        K = self.W_key(x)  # v3, (B, T, d_out)
        V = self.W_value(x)  # v3, (B, T, d_out)
        scores = Q @ K.transpose(-2, -1)  # v4, (B, T, T)
        scores = scores / self.d_out**0.5  # v5
        scores = scores.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # v6, v8
        weights = torch.softmax(scores, dim=-1)  # (B, T, T)
        weights = self.dropout(weights)  # v9
        self.attn = weights.detach()
        return weights @ V  # v7, (B, T, d_out)


# %%
model9 = build(SketchV9, dropout=0.5).eval()
no_dropout = build(SketchV9, dropout=0.0).eval()
with torch.no_grad():
    first, second = model9(x), model9(x)
    print("two eval calls give the same output:    ", torch.equal(first, second))
    print("eval output equals the dropout-0 output:", torch.equal(first, no_dropout(x)))
    model9.train()
    print("two training calls differ (as they should):", not torch.equal(model9(x), model9(x)))
assert torch.equal(first, second) and torch.equal(first, no_dropout(x))

# %% [markdown]
# In eval mode the dropout is gone: the output is repeatable and equal to that of a model with no
# dropout at all. In training mode it is still there, as it should be.
#
# ## 11. The fixed sketch against the reference
#
# The final check compares version 9 with the loop of section 1, which shares none of its code:
# no mask, no transpose, no batched matrix products. They agree.

# %%
model9.eval()
with torch.no_grad():
    y9 = model9(x)
    y_ref = reference_attention(x, model9.W_query.weight, model9.W_key.weight,
                                model9.W_value.weight)
print("output:", tuple(y9.shape))
print("equal to the loop reference (atol 1e-5):", torch.allclose(y9, y_ref, atol=1e-5))
assert torch.allclose(y9, y_ref, atol=1e-5)

# %% [markdown]
# Here is the whole journey in one table.
#
# | version | bug fixed | how it showed itself |
# | --- | --- | --- |
# | v1 → v2 | no `super().__init__()` | `AttributeError` when the first layer is assigned |
# | v2 → v3 | `W_query(x)` instead of `self.W_query(x)` | `NameError` (and a linter warning) |
# | v3 → v4 | `K.T` on a 3-D tensor | deprecation warning (in 2.13), then a shape error, or for some shapes no error and a wrong shape |
# | v4 → v5 | `torch.sqrt(..., dim=-1)` | `TypeError` |
# | v5 → v6 | `mask` instead of `self.tril` | `NameError` (and a linter warning) |
# | v6 → v7 | `return scores @ V` | silent: output larger than the values; 10x input gives 1000x output |
# | v7 → v8 | `masked_fill(..., 1e-10)` | silent: the future leaks, exposed by the causality test once v7 was fixed |
# | v8 → v9 | `F.dropout(w, p)` | silent: two calls in eval mode give different outputs |
#
# ## 12. A bug checklist for your own attention code
#
# Most attention bugs fall into a few families, and each family has a quick check. Before you
# trust an attention layer, yours or someone else's:
#
# 1. **Construction.** `super().__init__()` is the first line of `__init__`; every layer and mask
#    is an attribute of `self` (a registered sub-module, parameter or buffer).
# 2. **Run a linter.** Undefined names (`W_query`, `mask`) are found before anything runs.
# 3. **Print shapes.** The scores must be `(..., T_q, T_k)`. Transpose with
#    `transpose(-2, -1)` or `.mT`, never `.T` on a batched tensor.
# 4. **Scale with a number.** Multiply by `d ** -0.5` or divide by `math.sqrt(d)`; `torch.sqrt`
#    wants a tensor and has no `dim`.
# 5. **Mask with $-\infty$** (or a very negative finite number), never with a number near 0 such
#    as `1e-10`.
#    Beware rows where everything is masked: they turn into NaN.
# 6. **Softmax over the keys**, the last axis: every row of the weights sums to 1 (before dropout).
# 7. **Return `weights @ V`.** Test: `max|y| <= max|V|`, and scaling the input by $c$ must not
#    scale the output by $c^3$.
# 8. **Causality test.** Change the future tokens; past outputs must not move. And remember
#    that one bug can hide another: re-run every test after every fix.
# 9. **Dropout as a module** (`nn.Dropout`) or with `training=self.training`. Test: two calls
#    in eval mode give identical outputs.
# 10. **Compare with a slow reference** on a tiny input: a loop you can check by eye.
#
# ## 13. Two tidy classes: `SelfAttention` and the causal `Head`
#
# The fixed sketch does its job, but two tidy-ups make it the building block of the next
# chapters.
#
# **Without a mask.** Not every attention is causal. In an encoder (or in cross-attention,
# [chapter 5](05_cross_attention.ipynb)) every token may look at every other one. Drop the mask and
# you get plain `SelfAttention`; we also allow a bias in the projections, as some models use one.

# %%
class SelfAttention(nn.Module):
    """Single-head self-attention without a mask: every position sees every position."""

    def __init__(self, d_in, d_out, qkv_bias=False, dropout=0.0):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        Q, K, V = self.W_query(x), self.W_key(x), self.W_value(x)  # (B, T, d_out) each
        scores = Q @ K.transpose(-2, -1) / self.d_out**0.5  # (B, T, T)
        weights = self.dropout(torch.softmax(scores, dim=-1))  # (B, T, T), rows sum to 1
        return weights @ V  # (B, T, d_out)


torch.manual_seed(0)
attention = SelfAttention(d_in, d_out).eval()
print("output:", tuple(attention(x).shape))
print(f"change in past outputs: {past_change(attention, x):.2f}  (not causal, by design)")
print(f"max|y| / max|V| = {value_ratio(attention, x):.2f}")

# %% [markdown]
# **With a causal mask, the classic way.** The causal `Head` below does what our version 9 does,
# written the way the well-known "GPT from scratch" lecture writes it, with a few choices of this
# book on top. From the lecture come:
#
# - the names: the layers are `key`, `query`, `value` and the sizes `n_embd`, `head_size`
#   (version 9 says `W_key`, `d_in`, `d_out`);
# - the scale, written as a multiplication by one over the square root of the head size
#   (`head_size ** -0.5` here) rather than a division by `d_out ** 0.5`: the same number;
# - no `self.attn`: the weights are not kept for plotting;
# - the order of the layers, `key` before `query`. Layers draw their initial weights in the
#   order they are created, so the same seed no longer gives the same weights as `SketchV9`:
#   `key` gets the weights version 9 gave `W_query`. That is why the final check copies
#   version 9's weights into a `Head` by name instead of re-seeding.
#
# The lecture's mask is the same as version 9's: a float `torch.tril(torch.ones(...))` compared with `== 0`,
# in an ordinary (persistent) buffer. This book changes three things:
#
# - the mask is a *boolean* lower triangle (`True` = may attend), built by
#   `attnbook.attention.causal_mask`, so that `~mask` selects the future;
# - it is registered as a **non-persistent buffer**, explained below;
# - `n_embd` and `block_size` are constructor arguments; in the lecture they are global settings
#   of the script and the head takes only `head_size`.
#
# Here is the mask for 5 positions:

# %%
from attnbook.attention import causal_mask

print(causal_mask(5).int())

# %%
class Head(nn.Module):
    """One head of causal self-attention with a lower-triangular mask buffer."""

    def __init__(self, n_embd, head_size, block_size, dropout=0.0):
        super().__init__()
        self.head_size = head_size
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        # (block_size, block_size) booleans; moves with the module, not saved in checkpoints
        self.register_buffer("tril", causal_mask(block_size), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, head_size) each
        scores = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, T, T)
        scores = scores.masked_fill(~self.tril[:T, :T], float("-inf"))  # hide the future
        weights = self.dropout(torch.softmax(scores, dim=-1))  # (B, T, T)
        return weights @ v  # (B, T, head_size)


# %% [markdown]
# **Why a buffer?** The mask is a tensor the module needs in `forward`, but it is not learned.
# There are three ways to keep it, and only one does everything we want:
#
# - as a **parameter** (`nn.Parameter`), the optimiser would update it and it would be counted
#   as a weight. Wrong.
# - as a **plain attribute** (`self.tril = causal_mask(...)`), it is invisible to the module:
#   `head.to("cuda")` moves the weights but leaves the mask on the CPU, and the first forward
#   pass fails with a device mismatch.
# - as a **buffer** (`register_buffer`), it moves with `.to(device)` together with the weights,
#   is not a parameter, and, with `persistent=False`, is left out of `state_dict()`, so a
#   checkpoint holds weights only. The mask is rebuilt from `block_size` anyway.
#
# Even without a GPU, PyTorch's `"meta"` device (tensors with shapes and no data) shows the same
# thing:

# %%
class PlainAttributeMask(nn.Module):
    def __init__(self, block_size):
        super().__init__()
        self.tril = causal_mask(block_size)  # plain attribute: the module does not know it


torch.manual_seed(0)
head = Head(n_embd=d_in, head_size=d_out, block_size=block_size)
print("parameters: ", [name for name, _ in head.named_parameters()])
print("buffers:    ", [name for name, _ in head.named_buffers()])
print("state_dict: ", list(head.state_dict()))
print("after .to('meta'), buffer on:         ",
      Head(d_in, d_out, block_size).to("meta").tril.device)
print("after .to('meta'), plain attribute on:", PlainAttributeMask(block_size).to("meta").tril.device)
same_seed_v9 = build(SketchV9)
print("same seed: head.key equals SketchV9's W_query:",
      torch.equal(head.key.weight, same_seed_v9.W_query.weight))

# %% [markdown]
# Finally, the causality test on `Head`, this time more demanding: replace *every* token from
# position 3 on with fresh random ones, and check that outputs 0, 1, 2 do not move at all, while
# the later outputs do.

# %%
torch.manual_seed(1)
x_future = x.clone()
x_future[:, 3:] = torch.randn(B, T - 3, d_in)  # new tokens at positions 3..5
head.eval()
with torch.no_grad():
    y_old, y_new = head(x), head(x_future)
print("outputs 0..2 unchanged:", torch.allclose(y_old[:, :3], y_new[:, :3], atol=1e-5))
print("outputs 3..5 changed:  ", not torch.allclose(y_old[:, 3:], y_new[:, 3:], atol=1e-5))
assert torch.allclose(y_old[:, :3], y_new[:, :3], atol=1e-5)

# %% [markdown]
# ## Check against the module
#
# `attnbook.attention.SelfAttention` and `attnbook.attention.Head` are these two classes, with
# argument checks added (bad sizes raise `ValueError`, and so does a sequence longer than
# `block_size`). Their parameters have the same names, so the notebook's weights load into them
# with a strict `load_state_dict`; the fixed sketch `SketchV9`, whose layers have other names
# (and other initial weights, since it creates them in another order), goes into a `Head` by
# renaming. All three must give the same outputs, to 1e-5.

# %%
from attnbook.attention import Head as LibHead
from attnbook.attention import SelfAttention as LibSelfAttention

torch.manual_seed(2)
x_check = torch.randn(3, block_size, d_in)  # (B, T, d_in), the longest allowed sequence

ours = SelfAttention(d_in, d_out, qkv_bias=True).eval()
lib = LibSelfAttention(d_in, d_out, qkv_bias=True).eval()
lib.load_state_dict(ours.state_dict())
assert torch.allclose(lib(x_check), ours(x_check), atol=1e-5)

lib_head = LibHead(d_in, d_out, block_size).eval()
lib_head.load_state_dict(head.state_dict())
assert torch.allclose(lib_head(x_check), head(x_check), atol=1e-5)

renamed = {"query.weight": model9.W_query.weight, "key.weight": model9.W_key.weight,
           "value.weight": model9.W_value.weight}
lib_head.load_state_dict(renamed)
assert torch.allclose(lib_head(x_check), model9.eval()(x_check), atol=1e-5)
print("SelfAttention, Head and the fixed sketch match attnbook.attention (atol 1e-5)")

# %% [markdown]
# ## Summary
#
# - Attention lets every word build its new vector as a weighted average of the others'.
#   Without learned weights, $\mathrm{softmax}(X X^\top) X$, the words of the toy sentence
#   looked mostly at themselves and at words like them, with symmetric scores, and at the future: learned
#   queries, keys and values and a causal mask are the fixes.
# - Causal single-head self-attention makes each output $y_t$ a softmax-weighted average of the
#   values at positions $j \le t$. A plain loop over positions, `reference_attention`, is the slow
#   reference, and four properties become tests: shape, weighted average (`value_ratio`),
#   causality (`past_change`) and determinism in eval mode.
# - The sketch was fixed one bug per version, `SketchV1` to `SketchV9`. The loud bugs crash: no
#   `super().__init__()` (`AttributeError`), `W_query` without `self.` and `mask` instead of
#   `self.tril` (`NameError`, both flagged by the linter), `torch.sqrt(..., dim=-1)`
#   (`TypeError`), and `K.T` on a 3-D tensor (a deprecation warning in torch 2.13, then a shape
#   error; for one sequence as long as `d_out` it runs, and an input of shape `(1, 4, 8)` gives an
#   output of shape `(4, 4, 4)`).
# - `return scores @ V` is silent: max|y| / max|V| = 1.2 at the toy input, and the input x10
#   multiplies the output by 1000, the mark of a product of $Q$, $K$ and $V$. Returning
#   `weights @ V` brings the ratio down to 0.24 (1.00 for the input x10).
# - Masking with `1e-10` is silent too: a masked score of `1e-10` has $e^s$ = 1.00, right among
#   the visible positions, so the future leaks (change in past outputs 0.33; row 0 of the weights
#   reads 0.13 0.17 0.17 0.17 0.17 0.17). The causality test had passed before (0.0000) only
#   because `scores @ V` hid the leak: re-run every test after every fix. With $-\infty$ the change
#   is 0.0000 and the weights above the diagonal are all 0; a row with nothing visible then gives
#   `tensor([nan, nan, nan])`, which a causal mask never produces but padding masks can
#   ([chapter 2](02_scaled_dot_product_attention.ipynb)).
# - The functional `F.dropout` ignores `eval()`: its `training` argument defaults to `True`, so two
#   eval calls of version 8 differed. With `nn.Dropout`, version 9's eval outputs are identical and
#   equal to the dropout-0 model's, training calls still differ, and `SketchV9` equals the loop
#   reference (atol 1e-5).
# - `SelfAttention` drops the mask (past outputs move by 1.43: not causal, by design). The causal
#   `Head` keeps a boolean `causal_mask` in a non-persistent buffer, which follows `.to()` (to
#   `meta`, where a plain attribute stays on `cpu`), is not a parameter and stays out of
#   `state_dict()`. Replacing tokens 3..5 leaves outputs 0..2 unchanged.
# - Both classes match `attnbook.attention.SelfAttention` and `Head` (atol 1e-5), and the fixed
#   sketch's weights load into `Head` by renaming. The chapter's checklist turns these bugs into
#   quick checks for any attention code.

# %% [markdown]
# ## Further reading
#
# - Vaswani et al., *Attention Is All You Need* (NeurIPS 2017): scaled dot-product attention, the
#   formula the fixed sketch computes.
# - Bahdanau, Cho and Bengio, *Neural Machine Translation by Jointly Learning to Align and
#   Translate* (ICLR 2015): where attention began, as alignment in translation.
# - Karpathy, *nanoGPT* (github.com/karpathy/nanoGPT) and the lecture *Let's build GPT*: the single
#   causal head this chapter's `Head` follows.

# %% [markdown]
# ## Exercises
#
# Worked solutions, each checked with an `assert`, are in
# [`solutions/01_buggy_sketch_solutions.ipynb`](solutions/01_buggy_sketch_solutions.ipynb). Try them
# first.
#
# 1. **Find the bug.** A colleague's head differs from `Head` in one character:
#    `torch.softmax(scores, dim=1)` instead of `dim=-1`. Before running anything, predict: do
#    the rows of the weights still sum to 1? Is the head still causal? Then check both with the
#    tests of this chapter and explain what you see. (`value_ratio` needs the head's value
#    projection as its third argument: `value_ratio(head, x, head.value)`.)
# 2. **Longer than `block_size`.** Predict what happens when you feed `T = block_size + 1`
#    tokens to the notebook's `Head`, and to `attnbook.attention.Head`. Verify, and say which
#    error message you would rather get at 2 a.m.
# 3. **Fixing dropout, right and wrong.** Three proposed fixes for version 8's dropout:
#    (a) call `torch.manual_seed(0)` at the start of `forward`; (b) pass
#    `training=self.training` to `F.dropout`; (c) use `nn.Dropout`. Which make two eval calls
#    agree? Which give the *right* eval output (the one without dropout)? What does (a) do to
#    training?
# 4. **The scale and the entropy.** For head sizes $d$ = 4, 16, 64, 256, draw random queries
#    and keys with standard normal entries and compute the average entropy of the attention rows,
#    once with scores scaled by $1/\sqrt{d}$ and once unscaled. Predict how each behaves as $d$
#    grows, then measure. Then make the queries and keys the way a real head does, with
#    `nn.Linear` layers at their default initialisation: does the conclusion change?
# 5. **A reusable checker.** Write `check_attention(layer, d_in)` that runs the shape,
#    weighted-average, causality and eval-determinism tests on any causal layer (you may assume
#    its value projection is `layer.value`) and returns which ones fail. It should leave the
#    layer in the mode it found it (training or eval) and leave the global random number
#    generator alone. Run it on `attnbook.attention.Head`, on the head of exercise 1 and on the
#    version-8 dropout head of exercise 3. Does the order of the tests matter?
