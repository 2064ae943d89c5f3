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
# # Chapter 5 — Cross-attention
#
# Every attention layer so far let a sequence look at *itself*. Many tasks involve two
# sequences: a sentence and its translation, an audio clip and its transcript, a question and
# the document that answers it. The original transformer of "Attention Is All You Need" was
# built for exactly this: an **encoder** reads the source sequence once, and a **decoder**
# writes the target sequence one token at a time. At every step the decoder consults the
# source through **cross-attention**: the queries come from the decoder, the keys and values
# from the encoder's output (the *memory*).
#
# The math is the same softmax of scores times values as in chapters 2 and 3. What changes is
# where q, k and v come from, and that brings three practical questions with it: the two
# sequences have different lengths, the sources in a batch have different lengths (padding),
# and which mask, if any, cross-attention needs. We start where chapter 1 started, from the
# hurried author's own cross-attention class: it crashes when built, then on a transposed
# tensor, and once it runs it computes the wrong thing without a word; fixed one bug at a time,
# it ends up computing exactly what the package's module computes (section 1). Then we build the
# layer by hand, settle those questions with small experiments, and train a tiny
# encoder–decoder that learns to reverse digit strings in seconds on one CPU core (section 9
# prints how long it took).
# Its cross-attention map shows how it does it.
#
# **Learning goals**
#
# - Find and fix the three bugs of the sketch's cross-attention class: `super.__init__()` (a
#   `TypeError`), `K.T` on a 3-D tensor (a `UserWarning` announcing a deprecation, then a shape
#   error), and no division by $\sqrt{d}$, which raises nothing and shows only against a
#   reference.
# - Build cross-attention: queries from `x` (the decoder, length `T_q`), keys and values from
#   `memory` (the encoder, length `T_k`), with `T_q != T_k`.
# - Explain why cross-attention needs no causal mask, and why the decoder stays causal anyway.
# - Use a key padding mask on the source: padded keys get exactly zero weight, so a sequence's
#   result no longer depends on what it was batched with.
# - Match `torch.nn.MultiheadAttention(query, key, value, key_padding_mask=...)`, whose boolean
#   mask means the opposite of ours.
# - Write the decoder block (causal self-attention, cross-attention, MLP, each a pre-norm
#   residual layer) and the encoder block, and match them with the package's.
# - Train an encoder–decoder with teacher forcing, decode greedily, measure exact-match accuracy
#   on held-out strings, and read its cross-attention map.

# %% [markdown]
# ## Setup
#
# We seed the random number generator before anything random happens, and print shapes,
# booleans and rounded numbers only.
#
# One more line needs a word: `torch.set_num_threads(1)`. The model we train later is tiny
# (matrices of a few dozen rows), and on such sizes PyTorch spends more time coordinating
# threads than multiplying; one thread is as fast or faster. It also makes training
# bit-for-bit repeatable on a given CPU type and PyTorch build, whatever the number of cores
# of the machine, since the order of floating-point additions no longer depends on how work is
# split between threads. (A different CPU or PyTorch version may pick different kernels and
# differ in the last bits, which is why we print rounded numbers. Cells whose figures can
# change with the CPU, times and exact accuracies, are left out when the book is tested, and
# each asserts what the prose claims.)

# %%
import math
import time
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from torch import nn

from attnbook.attention import AttentionConfig, DecoderBlock, EncoderBlock, padding_mask
from attnbook.positions import PositionalEmbedding

torch.manual_seed(0)
torch.set_num_threads(1)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## The picture: an encoder, a decoder, and cross-attention between them
#
# Before we build anything, here is where cross-attention sits. The diagram below is drawn by
# code (boxes and arrows, no data): an encoder–decoder of the kind section 8 trains, with the
# shape of the tensor on each arrow. `B` is the batch size, `S` the source length, `T` the
# target length and `d` the model width (`n_embd`). The text and code use three names for the
# same two lengths, depending on the point of view:
#
# | | source, read by the encoder | target, written by the decoder |
# | --- | --- | --- |
# | the diagram | `S` | `T` |
# | one attention layer (sections 1–6) | `T_k`: the keys and values | `T_q`: the queries |
# | the model (sections 8–12) | `T_src` | `T_tgt` |
#
# The tokens at the bottom are one example of the reversal task of section 7: the
# source `8331`, padded to 8 positions, and the decoder's input, `BOS` followed by the target
# `1338`, padded to 9. Left out: the residual connections, the LayerNorm before each layer
# (section 6 writes them down) and the encoder's final LayerNorm (section 8).

# %%
ENC, DEC, MEM, XATT = "#dbe8f6", "#fde6cc", "#d9f0d3", "#f8d0d0"  # fill colour of each role


def box(ax, x, y, w, h, text, color, bold=False):
    """A rounded box of size (w, h) centred at (x, y), with centred text."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                facecolor=color, edgecolor="black", lw=1.6 if bold else 0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=9,
            fontweight="bold" if bold else "normal")


def frame(ax, left, bottom, right, top, title, side, title_y=None):
    """A dashed frame around the layers of a repeated block, its title along one side."""
    ax.add_patch(Rectangle((left, bottom), right - left, top - bottom, fill=False,
                           linestyle="--", edgecolor="grey"))
    x = left - 0.15 if side == "left" else right + 0.15
    y = (bottom + top) / 2 if title_y is None else title_y
    ax.text(x, y, title, rotation=90, ha="center", va="center", fontsize=9, color="dimgrey",
            style="italic")


def arrow(ax, start, end, label="", dx=0.12, dy=0.0, color="black", **kw):
    """An arrow from start to end; its label (a tensor shape) sits beside the middle, moved by
    (dx, dy)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.2,
                                 shrinkA=0, shrinkB=3, color=color, **kw))
    x, y = (start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2 + dy
    ax.text(x, y, label, fontsize=8.5, family="monospace", va="center",
            ha="left" if dx > 0 else "right" if dx < 0 else "center")


fig, ax = plt.subplots(figsize=(12, 7.2))
fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
ax.set(xlim=(0, 17.6), ylim=(0, 10.4))
ax.axis("off")
W = 3.8  # width of the encoder's and the decoder's boxes

# Encoder (left column): source tokens -> embeddings -> blocks, not causal -> memory.
ex = 2.5
box(ax, ex, 0.6, W, 0.7, "source tokens  (B, S)\n8  3  3  1  PAD  PAD  PAD  PAD", ENC)
box(ax, ex, 1.9, W, 0.6, "token + position embedding", ENC)
box(ax, ex, 3.9, W, 1.0,
    "self-attention, NOT causal:\nevery source token sees every\nother (padding mask only)", ENC)
box(ax, ex, 5.7, W, 0.6, "MLP", ENC)
frame(ax, ex - W / 2 - 0.2, 3.1, ex + W / 2 + 0.2, 6.3, "encoder block  × N_enc", "left")
box(ax, ex, 8.0, W, 0.7, "memory  (B, S, d)", MEM, bold=True)
arrow(ax, (ex, 0.95), (ex, 1.6))
arrow(ax, (ex, 2.2), (ex, 3.35), "(B, S, d)")
arrow(ax, (ex, 4.45), (ex, 5.4), "(B, S, d)")
arrow(ax, (ex, 6.0), (ex, 7.6), "(B, S, d)")

# Decoder (right column): target tokens -> embeddings -> blocks of three layers -> logits.
dx = 12.0
box(ax, dx, 0.6, W, 0.7, "target tokens  (B, T)\nBOS  1  3  3  8  PAD  PAD  PAD  PAD", DEC)
box(ax, dx, 1.9, W, 0.6, "token + position embedding", DEC)
box(ax, dx, 3.6, W, 0.8, "causal self-attention:\nposition t sees positions ≤ t", DEC)
box(ax, dx, 5.5, W, 1.0, "cross-attention (no causal mask)\n" r"softmax($QK^\top/\sqrt{d_h}$) V",
    XATT, bold=True)
box(ax, dx, 7.3, W, 0.6, "MLP", DEC)
frame(ax, dx - W / 2 - 0.2, 2.9, dx + W / 2 + 0.2, 7.9, "decoder block  × N_dec", "right",
      title_y=4.0)
box(ax, dx, 9.3, W, 0.7, "LayerNorm + linear head\nnext-token logits  (B, T, vocab)", DEC)
arrow(ax, (dx, 0.95), (dx, 1.6))
arrow(ax, (dx, 2.2), (dx, 3.15), "(B, T, d)")
arrow(ax, (dx, 4.05), (dx, 4.95), "queries (B, T, d)", dx=-0.12)
arrow(ax, (dx, 6.05), (dx, 7.0), "(B, T, d)")
arrow(ax, (dx, 7.6), (dx, 8.9), "(B, T, d)")

# Between them: the memory's keys and values, projected once per source (the CrossCache).
cx = 6.9
box(ax, cx, 5.5, 3.4, 1.5, "project_memory: c_kv(memory)\n→ CrossCache: K, V\n"
    "(B, n_head, S, head_dim)\nonce per source, reused at\nevery decoding step", MEM)
arrow(ax, (ex + W / 2 + 0.05, 8.0), (cx, 6.3), "(B, S, d)", dx=0.2, dy=0.55,
      connectionstyle="angle,angleA=0,angleB=90,rad=0")
arrow(ax, (cx + 1.75, 5.5), (dx - W / 2 - 0.05, 5.5), "K, V", dx=0, dy=0.22)

# The weights of one head: a row per target position (query), a column per source position.
gx, gy, T_icon, S_icon, cell = 15.3, 4.78, 9, 8, 0.16  # T = 9, S = 8 as below
for i in range(T_icon):
    for j in range(S_icon):
        ax.add_patch(Rectangle((gx + j * cell, gy + i * cell), cell, cell, facecolor=XATT,
                               edgecolor="white", lw=0.8))
ax.text(gx - 0.1, gy + T_icon * cell / 2, "T", ha="right", va="center", fontsize=9)
ax.text(gx + S_icon * cell / 2, gy + T_icon * cell + 0.1, "S", ha="center", va="bottom",
        fontsize=9)
arrow(ax, (dx + W / 2 + 0.05, 5.5), (gx - 0.3, 5.4), color="grey", linestyle=":")
ax.text(gx + S_icon * cell / 2, gy - 0.15,
        "weights  (B, n_head, T, S)\nper head: T rows × S columns",
        ha="center", va="top", fontsize=8.5, family="monospace")
plt.show()

# %% [markdown]
# What to look at, from the bottom up:
#
# - **Two stacks that read in different ways.** The encoder (blue, left) reads the whole
#   source at once: its self-attention is not causal, every source token may look at every
#   other, and only the padding mask hides the `PAD` positions. Its output, the **memory**,
#   keeps one row per source position, `(B, S, d)`. The decoder (orange, right) is causal: in
#   its self-attention, target position `t` sees positions `0..t` only.
# - **Three layers per decoder block instead of two.** Between the decoder's causal
#   self-attention and its MLP sits the red box, cross-attention: the one place where
#   information goes from the source to the target.
# - **Where its inputs come from.** The queries come from below, from the decoder's own
#   stream, `(B, T, d)`; the keys and values come from the side, from the memory,
#   `(B, S, d)`. The two lengths need not be equal (9 and 8 in the example), so each head's
#   weights are a `T × S` grid (the icon at the right): `(B, n_head, T, S)` for the layer, one
#   row per target position and one column per source position. Section 2 computes such a
#   grid, section 11 plots the trained model's. The output
#   has one row per query, `(B, T, d)`: the decoder's stream keeps its shape, whatever `S` is.
# - **What is computed once (green).** The memory does not change while the decoder writes,
#   so the keys and values projected from it can be computed once per source and reused at
#   every decoding step (section 6 shows how).

# %% [markdown]
# ## 1. The sketch's cross-attention class
#
# The hurried author of [chapter 1](01_buggy_sketch.ipynb)'s sketch also wrote a cross-attention
# layer, and we start from it the way chapter 1 started: run it as written, fix one bug per
# version, and stop when it computes what the package's `attnbook.attention.CrossAttention`
# computes. It has one head. The queries are projected from the decoder's states `x`,
# `(B, T_q, d)`, the keys and values from the encoder's output `memory`, `(B, T_k, d)`, and, like
# chapter 1's sketch, it keeps its last weights in `self.attn`. It has three bugs.
#
# Two of them you met in chapter 1: the call that initialises `nn.Module` (there left out, here
# misspelt) and `K.T` on a 3-D tensor; the third, the missing division by $\sqrt{d}$, is the
# subject of [chapter 2](02_scaled_dot_product_attention.ipynb). What is new is that the queries
# and the keys come from different sequences, of lengths `T_q ≠ T_k`. The weight matrix is then
# no longer square, so an axis mix-up shows in a shape: after bug 2 we see that a product written
# the wrong way round, `K @ Q.mT`, gives weights of shape `(B, T_k, T_q)`, which with equal
# lengths would have passed unnoticed.

# %%
class CrossSketchV1(nn.Module):
    """Single-head cross-attention, written in a hurry."""

    def __init__(self, d_in, d_out):
        super.__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=False)
        self.W_key = nn.Linear(d_in, d_out, bias=False)
        self.W_value = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x, memory):
        Q = self.W_query(x)  # from the decoder
        K = self.W_key(memory)  # from the encoder
        V = self.W_value(memory)
        scores = Q @ K.T
        weights = torch.softmax(scores, dim=-1)
        self.attn = weights.detach()
        return weights @ V


# %% [markdown]
# One helper builds every version from the same seed, so all versions start from the same
# weights. The two sequences get different lengths, 5 queries and 7 keys, so that a mixed-up
# axis shows in a shape, and the width is 64, a common head size.

# %%
def build(cls, d=64):
    torch.manual_seed(0)  # same seed -> same initial weights in every version
    return cls(d_in=d, d_out=d)


torch.manual_seed(1)
x_dec = torch.randn(2, 5, 64)  # (B, T_q, d): the decoder's states
mem_enc = torch.randn(2, 7, 64)  # (B, T_k, d): the encoder's output

# %% [markdown]
# ### Bug 1: `super.__init__()`

# %% tags=["raises-exception"]
build(CrossSketchV1)

# %% [markdown]
# **Why.** Without parentheses, `super` is the built-in class itself, and `super.__init__()`
# calls that class's initialiser with no object to initialise: "needs an argument". Had it not
# raised, `nn.Module.__init__` would still not have run, and `self.W_query = ...` would fail as in
# chapter 1, with an `AttributeError`.
#
# **Fix.** `super().__init__()`. As in chapter 1, version 2 is a fresh `nn.Module` that borrows
# the unchanged `forward`; later versions subclass it and override `forward`, with `# vN` on the
# changed line.

# %%
class CrossSketchV2(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()  # v2
        self.W_query = nn.Linear(d_in, d_out, bias=False)
        self.W_key = nn.Linear(d_in, d_out, bias=False)
        self.W_value = nn.Linear(d_in, d_out, bias=False)

    forward = CrossSketchV1.forward  # unchanged, still buggy


model = build(CrossSketchV2)
print("parameters:", [name for name, _ in model.named_parameters()])

# %% [markdown]
# ### Bug 2: `K.T` on a 3-D tensor
#
# `K` is `(B, T_k, d)`. On a matrix `.T` swaps the two axes; on a tensor with more axes it
# reverses all of them. The PyTorch this book pins, 2.13, allows it with a `UserWarning`
# announcing a deprecation (shown once per process: restart the kernel to see it again); a
# later release may refuse it, and the cell reports either outcome.

# %%
K = model.W_key(mem_enc).detach()  # (B, T_k, d)
print("K:  ", tuple(K.shape))
try:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K_T = K.T
    print("K.T:", tuple(K_T.shape), "<- every axis reversed: (d, T_k, B)")
except RuntimeError as err:  # a PyTorch newer than 2.13 may refuse .T on a 3-D tensor
    caught = []
    print("K.T: RuntimeError:", str(err).split(".")[0])
if caught:  # empty when the warning was already shown in this process
    print(f"{caught[0].category.__name__}: {str(caught[0].message).split(' Consider')[0]}")

# %% [markdown]
# So `Q @ K.T` multiplies `(2, 5, 64)` by `(64, 7, 2)`: the product treats the first axis as a
# batch, and a batch of 2 cannot be paired with one of 64.

# %% tags=["raises-exception"]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the UserWarning was shown above
    model(x_dec, mem_enc)

# %% [markdown]
# **Fix.** Swap the last two axes only, `K.transpose(-2, -1)` (or `K.mT`), as chapter 1 did.

# %%
class CrossSketchV3(CrossSketchV2):
    def forward(self, x, memory):
        Q = self.W_query(x)  # (B, T_q, d_out)
        K = self.W_key(memory)  # (B, T_k, d_out)
        V = self.W_value(memory)  # (B, T_k, d_out)
        scores = Q @ K.transpose(-2, -1)  # v3: (B, T_q, T_k)
        weights = torch.softmax(scores, dim=-1)
        self.attn = weights.detach()
        return weights @ V


model3 = build(CrossSketchV3)
with torch.no_grad():
    y3 = model3(x_dec, mem_enc)
print("weights:", tuple(model3.attn.shape), " output:", tuple(y3.shape))

# %% [markdown]
# One row of weights per query and one column per key, and the output keeps the decoder's
# length. Had the product been written the other way round, `K @ Q.mT`, the weights would be
# `(2, 7, 5)`; only because `T_q ≠ T_k` does the shape give that away.
#
# ### Bug 3: no scaling
#
# Nothing crashes now, and every shape is right. What is left can only be found by comparing
# with a reference: chapter 2's `sdpa_reference`, the attention formula written out, applied to
# the layer's own queries, keys and values (it shares nothing else with the sketch).

# %%
from attnbook.attention import sdpa_reference


def off_reference(model, x, memory):
    """Largest |model output - sdpa_reference| on the model's own projections."""
    with torch.no_grad():
        Q, K, V = model.W_query(x), model.W_key(memory), model.W_value(memory)
        return (model(x, memory) - sdpa_reference(Q, K, V)).abs().max().item()


print(f"max |CrossSketchV3 - reference| = {off_reference(model3, x_dec, mem_enc):.2f}")
print(f"typical size of an output entry, mean |y|: {y3.abs().mean():.2f}")
assert off_reference(model3, x_dec, mem_enc) > 0.1

# %% [markdown]
# A difference of 1.49 on outputs whose entries are typically 0.41 in size is not rounding: the
# sketch computes something else. The reference has one knob the sketch might be missing:
# `scale`, the factor that multiplies the scores, which defaults to $1/\sqrt{d}$. Set it to 1,
# that is, no scaling at all, and the reference reproduces the sketch bit for bit:

# %%
with torch.no_grad():
    Q, K, V = model3.W_query(x_dec), model3.W_key(mem_enc), model3.W_value(mem_enc)
    y_unscaled = sdpa_reference(Q, K, V, scale=1.0)  # (B, T_q, d): scores not divided
print("CrossSketchV3 == sdpa_reference(Q, K, V, scale=1.0), bit for bit:",
      torch.equal(y3, y_unscaled))
assert torch.allclose(y3, y_unscaled, atol=1e-6)

# %% [markdown]
# So that is the bug: the sketch never divides the scores by $\sqrt{d}$. A dot product of $d$
# terms has a spread that grows like $\sqrt{d}$, so the unscaled scores get wider as the layer
# does, and the softmax sharper. Two measures of sharpness: the largest weight of a row and the
# row's entropy (1.95 = ln 7 for the uniform row over 7 keys, 0 for a one-hot row), averaged over
# the rows of a batch of 8 × 32 queries (`x_dec`'s 5 queries per sequence would make the
# averages noisy), unscaled (the sketch)
# against scaled (the reference), at three widths. The column `var q` is the variance of the
# projected queries' entries, explained below the table:

# %%
def row_entropy(weights):  # mean entropy of the rows, in nats
    return torch.special.entr(weights).sum(-1).mean().item()


print(f"uniform row over 7 keys: entropy {math.log(7):.2f}")
print(f"{'d':>4} | {'var q':>5} | {'score spread':>15} | {'largest weight':>15} | "
      f"{'row entropy':>15}")
print(f"{'':>4} | {'':>5} | {'unscaled scaled':>15} | {'unscaled scaled':>15} | "
      f"{'unscaled scaled':>15}")
for d_try in (16, 64, 256):
    m = build(CrossSketchV3, d=d_try)
    torch.manual_seed(1)
    x_try, mem_try = torch.randn(8, 32, d_try), torch.randn(8, 7, d_try)  # (B, T_q, d), (B, T_k, d)
    with torch.no_grad():
        Q, K, V = m.W_query(x_try), m.W_key(mem_try), m.W_value(mem_try)
        raw = Q @ K.mT  # (B, T_q, T_k), unscaled
        m(x_try, mem_try)  # fills m.attn: softmax(raw)
        _, w_ref = sdpa_reference(Q, K, V, return_weights=True)  # softmax(raw / sqrt(d))
    spread = f"{raw.std():8.2f} {(raw / d_try**0.5).std():6.2f}"
    largest = f"{m.attn.amax(-1).mean():8.2f} {w_ref.amax(-1).mean():6.2f}"
    entropy = f"{row_entropy(m.attn):8.2f} {row_entropy(w_ref):6.2f}"
    print(f"{d_try:>4} | {Q.var():5.2f} | {spread:>15} | {largest:>15} | {entropy:>15}")
    if d_try == 64:
        assert row_entropy(m.attn) < row_entropy(w_ref) - 0.5

# %% [markdown]
# Why is the scaled spread about 0.32 and not 1, as chapter 2's unit-variance queries and keys
# gave? `nn.Linear` draws its initial weights uniformly from $\pm 1/\sqrt{d}$, a variance of
# $1/(3d)$, so a projected entry of a unit-variance input, a sum of $d$ such terms, has
# variance about $1/3$ (the column `var q`). A score is a sum of $d$ products of two such
# entries, each of variance about $1/9$, so its standard deviation is about $\sqrt{d}/3$
# unscaled and $1/3$ scaled.
#
# Scaled, the spread stays near 0.3 at every width, and the rows stay close to uniform (largest
# weight 0.21 to 0.22, entropy 1.89 to 1.90), as an untrained layer's should. Unscaled, the spread
# roughly doubles each time $d$ grows fourfold (1.43, 2.58, 5.16), and the rows sharpen with it:
# at $d = 64$ the largest weight of a row averages 0.68 and the entropy is down to 0.89, at
# $d = 256$ 0.83 and 0.46. No error, no NaN, no wrong shape: just a layer that attends more
# sharply than the formula says, the more so the wider it is. A softmax that starts out this
# peaked also learns slowly, because its gradients are small
# ([chapter 2](02_scaled_dot_product_attention.ipynb) measures both).
#
# **Fix.** Divide the scores by the square root of the head size, here `K.shape[-1] ** 0.5`.
# The chapter writes that size four ways: with one head, as here, $d = d_k = d_h$ =
# `head_dim` (the width, section 2's key size, the diagram's head size, section 3's attribute);
# with several heads the scale uses `head_dim`, the size of one head, not the width.

# %%
class CrossSketchV4(CrossSketchV3):
    def forward(self, x, memory):
        Q = self.W_query(x)  # (B, T_q, d_out)
        K = self.W_key(memory)  # (B, T_k, d_out)
        V = self.W_value(memory)  # (B, T_k, d_out)
        scores = Q @ K.transpose(-2, -1) / K.shape[-1] ** 0.5  # v4: (B, T_q, T_k)
        weights = torch.softmax(scores, dim=-1)  # (B, T_q, T_k), each row sums to 1
        self.attn = weights.detach()
        return weights @ V  # (B, T_q, d_out)


model4 = build(CrossSketchV4)
print("CrossSketchV4 == reference (atol 1e-5):", off_reference(model4, x_dec, mem_enc) < 1e-5)
assert off_reference(model4, x_dec, mem_enc) < 1e-5

# %% [markdown]
# Finally the package. `attnbook.attention.CrossAttention` is multi-head and mixes its heads with
# an output projection `c_proj`; with one head and `c_proj` set to the identity it is the sketch.
# Its query projection `c_q` gets `W_query`. Keys and values are computed by one fused layer,
# `c_kv = Linear(d, 2d)`, whose weight is the key and value weights stacked (rows `k | v`), as
# chapter 3's `c_attn` stacks q, k and v. The module takes the memory's keys and values rather
# than the memory itself, through `cache=`; the comment in the cell says where they come from.

# %%
from attnbook.attention import CrossAttention

for impl in ("reference", "sdpa"):
    cfg = AttentionConfig(n_embd=64, n_head=1, dropout=0.0, bias=False, impl=impl)
    module = CrossAttention(cfg)
    with torch.no_grad():
        module.c_q.weight.copy_(model4.W_query.weight)  # (d, d)
        module.c_kv.weight.copy_(torch.cat([model4.W_key.weight, model4.W_value.weight]))  # (2d, d)
        module.c_proj.weight.copy_(torch.eye(64))  # the sketch has no output projection
        # project_memory turns memory into keys/values once; section 6 explains why
        y_module = module(x_dec, cache=module.project_memory(mem_enc))  # (B, T_q, d)
        assert torch.allclose(y_module, model4(x_dec, mem_enc), atol=1e-5), impl
print("CrossSketchV4 == attnbook CrossAttention (1 head, c_proj = identity; reference and sdpa, "
      "atol 1e-5)")

# %% [markdown]
# | version | bug fixed | how it showed itself |
# | --- | --- | --- |
# | v1 → v2 | `super.__init__()` | `TypeError` when the layer is built |
# | v2 → v3 | `K.T` on a 3-D tensor | a `UserWarning` announcing a deprecation (in 2.13), then a `RuntimeError`: batch 2 against 64 |
# | v3 → v4 | no division by $\sqrt{d}$ | silent: off the reference, rows sharper the wider the layer |
#
# The rest of the chapter takes the fixed layer apart: the math of one head with two sequences
# (section 2), several heads (section 3), and what a batch of sources of different lengths needs
# (section 4).

# %% [markdown]
# ## 2. Queries from one sequence, keys and values from another
#
# Self-attention computes `q`, `k` and `v` from the same input `x`. Cross-attention takes two
# inputs:
#
# - `x`, shape `(B, T_q, d)`: the sequence that *asks* (the decoder's hidden states);
# - `memory`, shape `(B, T_k, d)`: the sequence that is *asked* (the encoder's output).
#
# The queries are projected from `x`, the keys and the values from `memory`. Everything after
# the projections is unchanged: scores `q kᵀ / sqrt(d_k)`, softmax over the keys, weighted sum
# of the values. The function below is the same computation as `CrossSketchV4`, with plain
# weight matrices instead of `Linear` layers so that every shape is visible, and it returns the
# weights as well.

# %%
def cross_attention_1head(x, memory, w_q, w_k, w_v):
    """Single-head cross-attention; returns the output and the weights."""
    q = x @ w_q  # (B, T_q, d_k): one query per decoder position
    k = memory @ w_k  # (B, T_k, d_k): one key per source position
    v = memory @ w_v  # (B, T_k, d_v): one value per source position
    scores = q @ k.transpose(-2, -1) / k.shape[-1] ** 0.5  # (B, T_q, T_k)
    weights = torch.softmax(scores, dim=-1)  # each row: a distribution over the source
    return weights @ v, weights  # (B, T_q, d_v), (B, T_q, T_k)


torch.manual_seed(0)  # the state Setup left: what follows does not depend on section 1
B, T_q, T_k, d = 2, 5, 7, 16
x = torch.randn(B, T_q, d)  # stands in for the decoder's states
memory = torch.randn(B, T_k, d)  # stands in for the encoder's output
w_q, w_k, w_v = (torch.randn(d, d) / d**0.5 for _ in range(3))

out, weights = cross_attention_1head(x, memory, w_q, w_k, w_v)
print("x:", tuple(x.shape), " memory:", tuple(memory.shape))
print("weights:", tuple(weights.shape), " out:", tuple(out.shape))
print("rows sum to 1:", torch.allclose(weights.sum(-1), torch.ones(B, T_q)))

# %% [markdown]
# The weight matrix is `T_q × T_k` = 5 × 7: not square. Row `i` says how much decoder position
# `i` takes from each of the 7 source positions. The output has one row per *query*: the
# decoder's length goes in and comes out, and the source length only appears inside, summed
# away by the weighted average. That is why cross-attention can sit inside a decoder block
# whatever the length of the source.
#
# ### Why no causal mask?
#
# In the decoder's *self*-attention a causal mask stops position `i` from reading target
# tokens that come after it, which at generation time do not exist yet. Cross-attention reads
# a different sequence, and that sequence is complete before decoding starts: the encoder has
# read the whole source. "Later" on the key axis means "later in the source", not "in the
# future". A causal mask here would even make simple tasks impossible: to reverse a string,
# the *first* output token is the *last* source token, which a lower-triangular mask would
# hide.
#
# Cross-attention cannot leak future target tokens either, because each query row is computed
# from that row of `x` and from `memory`, never from other rows of `x`. We can check this:
# change decoder position 3 only, and see which output rows move.

# %%
x_changed = x.clone()
x_changed[:, 3] += 1.0  # perturb decoder position 3
out_changed, _ = cross_attention_1head(x_changed, memory, w_q, w_k, w_v)
rows_moved = (out_changed - out).abs().amax(dim=(0, 2)) > 0  # (T_q,)
print("output rows that changed:", rows_moved.nonzero().flatten().tolist())

# %% [markdown]
# Only row 3 changes. Mixing *between* decoder positions happens only in the decoder's
# self-attention, and that one is causal. So a decoder block (causal self-attention, then
# cross-attention, then an MLP, each applied row by row) is causal as a whole.

# %% [markdown]
# ## 3. Multi-head cross-attention as a module
#
# The multi-head version is [chapter 3](03_multi_head_attention.ipynb)'s layer with the projections
# split between the two inputs: `W_q` reads `x`, `W_k` and `W_v` read `memory`, and the heads are
# separated by the same `view` + `transpose` into `(B, n_head, T, head_dim)`. We keep three separate
# `Linear` layers here to make the roles plain (the `attnbook` module fuses `W_k` and `W_v` into
# one, which we will use when we copy weights at the end).
#
# The optional `memory_mask` has shape `(B, T_k)` and is `True` at real source tokens; it is
# explained in the next section. It is reshaped to `(B, 1, 1, T_k)` so that it broadcasts over
# heads and over queries: it masks whole *columns* of the weight matrix.

# %%
class MyCrossAttention(nn.Module):
    """Multi-head cross-attention, the math written out. Returns (output, weights)."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.W_q = nn.Linear(n_embd, n_embd)  # reads the decoder
        self.W_k = nn.Linear(n_embd, n_embd)  # reads the memory
        self.W_v = nn.Linear(n_embd, n_embd)  # reads the memory
        self.W_o = nn.Linear(n_embd, n_embd)  # mixes the heads

    def split_heads(self, t):  # (B, T, n_embd) -> (B, n_head, T, head_dim)
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x, memory, memory_mask=None):
        q = self.split_heads(self.W_q(x))  # (B, nh, T_q, hd)
        k = self.split_heads(self.W_k(memory))  # (B, nh, T_k, hd)
        v = self.split_heads(self.W_v(memory))  # (B, nh, T_k, hd)
        scores = q @ k.transpose(-2, -1) / self.head_dim**0.5  # (B, nh, T_q, T_k)
        if memory_mask is not None:
            keep = memory_mask[:, None, None, :]  # (B, 1, 1, T_k): whole columns
            scores = scores.masked_fill(~keep, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, nh, T_q, T_k)
        y = weights @ v  # (B, nh, T_q, hd)
        y = y.transpose(1, 2).reshape(x.shape)  # (B, T_q, n_embd): heads side by side
        return self.W_o(y), weights


n_head = 2
xattn = MyCrossAttention(d, n_head)
y, w = xattn(x, memory)
print("y:", tuple(y.shape), " weights:", tuple(w.shape))

# %% [markdown]
# ## 4. Padding: sources of different lengths in one batch
#
# To train on a batch, every source in it must have the same length, so shorter sources are
# *right-padded*: filled up to the batch's longest length with a special PAD token. Those
# padded positions are not blank. In a real model each of them becomes the PAD token's
# embedding plus a position vector, and then an ordinary row of `memory`, with an ordinary
# key that attracts attention like any other. Without a mask the decoder would mix made-up
# content into its answer, and worse, the answer for one sequence would depend on how long the
# *other* sequences in its batch happen to be.
#
# Let us see it. Sequence 0 has 7 real tokens, sequence 1 only 4, padded to 7.
# `padding_mask(lengths, T)` from `attnbook.attention` builds the `(B, T)` mask, `True` at
# real positions.

# %%
lengths = torch.tensor([7, 4])
memory_mask = padding_mask(lengths, T_k)  # (B, T_k), True = real source token
print(memory_mask.int())

# %% [markdown]
# As a reference we run sequence 1 *alone*, unpadded: 4 memory rows, no mask needed. The
# padded batch should reproduce that result exactly for sequence 1. Without a mask it does
# not; with the mask it does.

# %%
y_alone, _ = xattn(x[1:], memory[1:, :4])  # (1, T_q, d): the short sequence by itself
y_nomask, w_nomask = xattn(x, memory)  # the padded batch, no mask
y_mask, w_mask = xattn(x, memory, memory_mask)  # the padded batch, with the mask

print("no mask   == alone:", torch.allclose(y_nomask[1], y_alone[0], atol=1e-5))
print("with mask == alone:", torch.allclose(y_mask[1], y_alone[0], atol=1e-5))

# %% [markdown]
# Why does the mask restore the exact result? Masked scores become `-inf`, and
# `exp(-inf) = 0`, so the padded keys get a weight of exactly zero. The softmax then
# normalises over the real keys only, which is the same computation as attending to the 4
# real rows alone. Two consequences we can check: every weight on a padded key is 0, every row
# still sums to 1; and the *contents* of the padded rows no longer matter, so we can fill them
# with anything.

# %%
print("weight on padded keys, largest:", w_mask[1, :, :, 4:].max().item())
print("rows sum to 1:", torch.allclose(w_mask.sum(-1), torch.ones(B, n_head, T_q)))

memory_garbage = memory.clone()
memory_garbage[1, 4:] = 100 * torch.randn(3, d)  # overwrite sequence 1's padded rows
y_garbage, _ = xattn(x, memory_garbage, memory_mask)
print("padded rows overwritten, output unchanged:", torch.equal(y_garbage, y_mask))

# %% [markdown]
# The output is not just close: it is bit-for-bit the same, because a weight of exactly zero
# times any finite value adds exactly zero. The picture shows head 0 of sequence 1, without
# and with the mask: the mask empties the three padded columns and the real columns take
# over their share of every row.

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
panels = [(w_nomask, "no mask: padding takes weight"), (w_mask, "with the key padding mask")]
for ax, (wts, title) in zip(axes, panels, strict=True):
    im = ax.imshow(wts[1, 0].detach(), vmin=0, vmax=0.6, cmap="Blues")
    ax.axvline(3.5, color="tab:red", linestyle="--")  # real keys | padded keys
    ax.set_title(title)
    ax.set_xlabel("key (source position)")
    ax.set_xticks(range(T_k), ["0", "1", "2", "3", "pad", "pad", "pad"])
    for label in ax.get_xticklabels()[4:]:
        label.set_color("tab:red")
axes[0].set_ylabel("query (decoder position)")
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
plt.show()

# %% [markdown]
# Only the *keys* are masked, never the queries. Padding on the decoder side (targets of
# different lengths) is handled differently: the decoder's self-attention is causal, so a
# real target position never sees the padded positions after it, and the loss simply ignores
# the outputs at padded positions. Their rows are computed and thrown away.

# %% [markdown]
# ## 5. PyTorch's `nn.MultiheadAttention`: the same layer, the opposite mask
#
# `torch.nn.MultiheadAttention` does cross-attention when it is called with different
# tensors: `mha(query=x, key=memory, value=memory)`. Its input projection is one stacked
# matrix `in_proj_weight` of shape `(3d, d)`, rows `q | k | v`, so our three matrices stack
# into it directly. Its padding argument is `key_padding_mask`, shape `(B, T_k)` like ours,
# but in the opposite orientation: **`True` means "ignore this key"**. We pass `~memory_mask`.
# The weights it returns are averaged over the heads, because its switch
# `average_attn_weights` defaults to `True`, so we compare them with the mean of ours.

# %%
torch_mha = nn.MultiheadAttention(d, n_head, batch_first=True)
with torch.no_grad():
    q_k_v = (xattn.W_q, xattn.W_k, xattn.W_v)
    torch_mha.in_proj_weight.copy_(torch.cat([lin.weight for lin in q_k_v]))  # (3d, d), rows q|k|v
    torch_mha.in_proj_bias.copy_(torch.cat([lin.bias for lin in q_k_v]))
    torch_mha.out_proj.weight.copy_(xattn.W_o.weight)
    torch_mha.out_proj.bias.copy_(xattn.W_o.bias)

y_torch, w_torch = torch_mha(x, memory, memory, key_padding_mask=~memory_mask)
print("outputs agree:", torch.allclose(y_torch, y_mask, atol=1e-5))
w_mean = w_mask.mean(dim=1)  # average_attn_weights=True (the default): the mean over heads
print("weights agree (mean over heads):", torch.allclose(w_torch, w_mean, atol=1e-5))

# %% [markdown]
# What if we forget to invert the mask? Then `nn.MultiheadAttention` ignores the *real* keys
# and keeps the padding. Sequence 1 attends to its three padded positions only, and
# sequence 0, which has no padding, has every key hidden: its softmax is `0/0`, and the
# output is NaN.

# %%
y_wrong, w_wrong = torch_mha(x, memory, memory, key_padding_mask=memory_mask)  # not inverted
print("sequence 0 is NaN:", y_wrong[0].isnan().all().item())
print("sequence 1 weight on its real keys:", w_wrong[1, :, :4].sum().item())

# %% [markdown]
# The NaN depends on the code path. It appears above because `need_weights=True` (the
# default) makes the layer compute the softmax explicitly. With `need_weights=False` the layer
# calls PyTorch's fused attention kernel, which returns zeros for a row whose keys are all
# hidden: sequence 0 then comes out as just the output projection's bias, the same vector at
# every position, with no NaN to warn anyone. That silent case is the worse one.

# %%
y_quiet, _ = torch_mha(x, memory, memory, key_padding_mask=memory_mask, need_weights=False)
print("need_weights=False, sequence 0 is NaN:", y_quiet[0].isnan().any().item())
bias_rows = torch_mha.out_proj.bias.expand(T_q, d)  # (T_q, d): the bias at every position
print("sequence 0 == out_proj.bias:", torch.allclose(y_quiet[0], bias_rows, atol=1e-5))

# %% [markdown]
# A NaN in one example of a batch, a row that silently carries no information, or an
# example quietly attending to padding: the cost of a flipped boolean. In `attnbook` masks
# always mean `True` = may attend ([chapter 2](02_scaled_dot_product_attention.ipynb)),
# and every call that takes one says so in its docstring.

# %% [markdown]
# ## 6. Encoder and decoder blocks
#
# An attention layer is not yet a transformer layer. Each block of an encoder–decoder wraps
# its attention in the same pattern as GPT-2's *pre-norm* blocks: normalise a copy of the
# stream, transform it, add the result back. We now write the decoder block ourselves from
# pieces we already have, then the encoder block, and check both against `DecoderBlock` and
# `EncoderBlock` from `attnbook.attention`, the blocks the model of section 8 is built from.
#
# The decoder block takes the decoder's stream `y`, `(B, T_q, d)`, and the encoder's output
# `memory`, `(B, T_k, d)`, with its padding mask `memory_mask`, and applies three layers in
# turn:
#
# 1. **Causal self-attention**, `y = y + CausalSelfAttn(LN(y))`: the target positions exchange
#    information, each one with itself and the positions before it only. This is
#    [chapter 3](03_multi_head_attention.ipynb)'s layer, `attnbook.attention.MultiHeadAttention`,
#    built with `causal=True`.
# 2. **Cross-attention**, `y = y + CrossAttn(LN(y), memory, memory_mask)`: every target
#    position reads the source. This is section 3's `MyCrossAttention`; its queries come from
#    the normalised `y`, its keys and values from `memory` as it is (the encoder ends in a
#    LayerNorm of its own, section 8). It returns `(output, weights)`; the block keeps the
#    output.
# 3. **MLP**, `y = y + MLP(LN(y))`: `Linear(d → 4d)`, GELU, `Linear(4d → d)`, applied to every
#    position on its own. It mixes nothing between positions; that is attention's job.
#
# Each layer reads a normalised copy of the stream and *adds* its result to the stream (the
# residual connection), so `y` keeps its shape `(B, T_q, d)` from start to end and every
# layer contributes a correction to it. "Pre-norm" means that the LayerNorm sits before the
# layer, inside its branch; each of the three has its own LayerNorm (`ln_1`, `ln_2`, `ln_3`),
# with its own learned scale and shift. The block reads `memory` but never changes it: the
# encoder runs once per source, and every decoder block and every decoding step reuses its
# output.
#
# We give the parts the names the package uses (`ln_1`, `self_attn`, `ln_2`, `cross_attn`,
# `ln_3`, `mlp`, and `c_fc`, `c_proj` inside the MLP), so that its weights can be copied in by
# name. The attention layers are built with `positions="none"` because the blocks add no
# position information themselves: like GPT-2, our model will add a position vector to each
# token embedding before the first block.

# %%
from collections import OrderedDict

from attnbook.attention import MultiHeadAttention


def feed_forward(n_embd):
    """Linear(d -> 4d) -> GELU -> Linear(4d -> d), applied to every position on its own."""
    return nn.Sequential(OrderedDict(c_fc=nn.Linear(n_embd, 4 * n_embd), act=nn.GELU(),
                                     c_proj=nn.Linear(4 * n_embd, n_embd)))


class MyDecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to memory, MLP."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        causal = AttentionConfig(n_embd=n_embd, n_head=n_head, causal=True, positions="none")
        self.ln_1 = nn.LayerNorm(n_embd)
        self.self_attn = MultiHeadAttention(causal)  # chapter 3's layer, causal
        self.ln_2 = nn.LayerNorm(n_embd)
        self.cross_attn = MyCrossAttention(n_embd, n_head)  # section 3's layer
        self.ln_3 = nn.LayerNorm(n_embd)
        self.mlp = feed_forward(n_embd)

    def forward(self, y, memory, memory_mask=None):  # y: (B, T_q, d), memory: (B, T_k, d)
        y = y + self.self_attn(self.ln_1(y))  # 1. the target positions mix, causally
        y = y + self.cross_attn(self.ln_2(y), memory, memory_mask)[0]  # 2. read the source
        return y + self.mlp(self.ln_3(y))  # 3. every position on its own

# %% [markdown]
# The encoder block is the decoder block without the middle layer: there is no second
# sequence to read. Its self-attention differs in two ways. It is **not** causal: the whole
# source is known before anything is decoded, so every source token may look at every other,
# later ones included. And it takes the source's padding mask, `(B, T)` with `True` = real
# token, reshaped to `(B, 1, 1, T)` as in section 3, so that it hides whole key columns: no
# position, real or padded, reads the padded ones.

# %%
class MyEncoderBlock(nn.Module):
    """Pre-norm encoder block: self-attention (not causal, padding mask), then MLP."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        both_ways = AttentionConfig(n_embd=n_embd, n_head=n_head, causal=False, positions="none")
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = MultiHeadAttention(both_ways)  # no causal mask
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = feed_forward(n_embd)

    def forward(self, x, mask=None):  # x: (B, T, d), mask: (B, T), True = real token
        keys = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T): whole columns
        x = x + self.attn(self.ln_1(x), keys)
        return x + self.mlp(self.ln_2(x))

# %% [markdown]
# The package's blocks are built from an `AttentionConfig`: `EncoderBlock(cfg)(x, mask)` and
# `DecoderBlock(cfg)(y, memory, memory_mask)`. The next cell builds one of each, lists the
# decoder block's layers (the names we used) and runs both on the tensors of sections 2–4.

# %%
cfg = AttentionConfig(n_embd=d, n_head=n_head, dropout=0.0, positions="none")
enc_block, dec_block = EncoderBlock(cfg), DecoderBlock(cfg)
print("decoder block:", [name for name, _ in dec_block.named_children()])
mem_out = enc_block(memory, memory_mask)  # (B, T_k, d)
dec_out = dec_block(x, mem_out, memory_mask)  # (B, T_q, d)
print("encoder:", tuple(memory.shape), "->", tuple(mem_out.shape))
print("decoder:", tuple(x.shape), "->", tuple(dec_out.shape))

# %% [markdown]
# Do they compute what ours compute? We build our two blocks, copy the package blocks'
# weights into them and compare the outputs to `atol=1e-5`, without and with the padding
# mask. The LayerNorms, the self-attention and the MLP have the same parameters under the
# same names and load as they are. The cross-attention needs the mapping of section 1's last
# cell (sketch → package), the other way round and with the biases: `c_q` → `W_q`, the rows
# `k | v` of the fused `c_kv` → `W_k` and `W_v`, and `c_proj` → `W_o`.
#
# A third comparison uses the green path of the picture at the start. The memory does not
# change while the decoder writes, token after token, so neither do the keys and values
# projected from it: projecting them again at every decoding step repeats the same work.
# `CrossAttention.project_memory(memory, memory_mask)` applies `c_kv` once and returns a
# `CrossCache`: the keys and values, each `(B, n_head, T_k, head_dim)`, and the padding mask.
# The layer reads it through `cache=`, and then projects only the queries of the positions it
# is given. Each decoder block has its own `c_kv`, hence its own cache, all projected from the
# same memory. `DecoderBlock` accepts it in place of `memory` and `memory_mask`, as
# `memory_kv = block.cross_attn.project_memory(memory, memory_mask)`, and must give the same
# output as projecting the memory on the spot. (The simple decoding loop of section 10 does
# project the memory again at every step; exercise 3 replaces that with the cache.)
#
# Creating our blocks draws random initial weights, which the copy overwrites. We draw them
# inside `torch.random.fork_rng()`, which restores the random state afterwards, so every cell
# after this one draws the same random numbers as it would without these checks. The last
# lines repeat section 2's experiment on the whole block: change decoder position 3 and see
# which output rows move. (Section 2 added 1.0 to every coordinate. Here that change would
# not even reach the attention layers: a LayerNorm subtracts each row's mean, so it cancels a
# shift of all coordinates by the same amount. We flip the row's sign instead.)

# %%
@torch.no_grad()
def copy_block_weights(mine, theirs):
    """Load a package EncoderBlock's or DecoderBlock's weights into our block, layer by layer."""
    for name, layer in mine.named_children():
        source = getattr(theirs, name)
        if isinstance(layer, MyCrossAttention):  # c_q, c_kv (rows k | v), c_proj
            (w_k, w_v), (b_k, b_v) = source.c_kv.weight.chunk(2), source.c_kv.bias.chunk(2)
            layer.W_q.load_state_dict(source.c_q.state_dict())
            layer.W_k.load_state_dict({"weight": w_k, "bias": b_k})
            layer.W_v.load_state_dict({"weight": w_v, "bias": b_v})
            layer.W_o.load_state_dict(source.c_proj.state_dict())
        else:  # LayerNorm, self-attention, MLP: the same parameters under the same names
            layer.load_state_dict(source.state_dict())


with torch.random.fork_rng():  # random initial weights, overwritten below
    my_enc, my_dec = MyEncoderBlock(d, n_head), MyDecoderBlock(d, n_head)

with torch.no_grad():
    same = torch.allclose(my_dec(x, mem_out, memory_mask), dec_out, atol=1e-5)
    print("before copying the weights, decoder blocks agree:", same)
    copy_block_weights(my_enc, enc_block)
    copy_block_weights(my_dec, dec_block)
    for mask in (None, memory_mask):
        mem = enc_block(memory, mask)  # (B, T_k, d)
        ours = my_dec(x, mem, mask)  # (B, T_q, d)
        cache = dec_block.cross_attn.project_memory(mem, mask)  # CrossCache: k, v, mask
        checks = {
            "encoder": torch.allclose(my_enc(memory, mask), mem, atol=1e-5),
            "decoder": torch.allclose(dec_block(x, mem, mask), ours, atol=1e-5),
            "decoder, memory_kv=cache": torch.allclose(dec_block(x, memory_kv=cache), ours,
                                                       atol=1e-5),
        }
        print("padding mask:" if mask is not None else "no mask:     ", checks)
        assert all(checks.values()), (mask, checks)
    x_flipped = x.clone()
    x_flipped[:, 3] *= -1  # change decoder position 3
    moved = my_dec(x_flipped, mem_out, memory_mask) - my_dec(x, mem_out, memory_mask)
    rows_moved = moved.abs().amax(dim=(0, 2)) > 1e-6  # (T_q,)
    print("output rows that changed:", rows_moved.nonzero().flatten().tolist())

# %% [markdown]
# Before the copy the two decoder blocks disagree (different random weights); after it, every
# comparison is `True`, with and without the padding mask, and with the precomputed
# `CrossCache`. So the package's `EncoderBlock` and `DecoderBlock` are the blocks we just wrote
# (their MLP ends in a dropout, which does nothing at `dropout=0`), and from here on the
# chapter uses them: the model of section 8 stacks them, and section 11 looks inside the
# package block's `cross_attn`. Changing decoder position 3 moved output rows `[3, 4]` only
# (position 3 and every later one; `T_q = 5`): the whole block is causal, as section 2 argued, because its only layer that mixes target
# positions is the causal self-attention.

# %% [markdown]
# ## 7. The task: reversing digit strings
#
# We need a task where the right alignment between source and target is known, so that we can
# check what cross-attention learns. Reversal is ideal: output token `i` of a length-`L`
# string is source token `L - 1 - i`, an anti-diagonal. The vocabulary has 13 tokens:
#
# - `PAD = 0`, `BOS = 1` (beginning of the target), `EOS = 2` (end of the target);
# - the digits 0–9 as tokens 3–12.
#
# Sources have 3 to 8 digits, drawn uniformly, right-padded to 8. The target of a source of
# length `L` is its reverse followed by `EOS`: `L + 1` tokens, padded to 9.

# %%
PAD, BOS, EOS = 0, 1, 2
VOCAB = 13
MIN_LEN, MAX_LEN = 3, 8


def random_sources(n, generator):
    """n right-padded digit strings of 3-8 digits: tokens (n, MAX_LEN), lengths (n,)."""
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=generator)
    digits = torch.randint(0, 10, (n, MAX_LEN), generator=generator) + 3  # tokens 3..12
    return digits.masked_fill(~padding_mask(lengths, MAX_LEN), PAD), lengths


def reversed_targets(src, lengths):
    """The reversed digits then EOS, padded: (n, T + 1)."""
    n, T = src.shape
    j = torch.arange(T)
    mirror = (lengths[:, None] - 1 - j).clamp(min=0)  # (n, T): source index for output j
    body = src.gather(1, mirror).masked_fill(j >= lengths[:, None], PAD)  # (n, T)
    tgt = torch.cat([body, torch.full((n, 1), PAD)], dim=1)  # (n, T + 1)
    tgt[torch.arange(n), lengths] = EOS
    return tgt


def to_text(tokens):
    """Digits as a string, up to the first EOS or PAD."""
    chars = []
    for t in tokens.tolist():
        if t in (EOS, PAD):
            break
        chars.append(str(t - 3) if t >= 3 else "<BOS>")
    return "".join(chars)


gen = torch.Generator().manual_seed(1)
src_demo, len_demo = random_sources(3, gen)
tgt_demo = reversed_targets(src_demo, len_demo)
print(src_demo)
print(tgt_demo)
for s, t in zip(src_demo, tgt_demo, strict=True):
    print(f"{to_text(s):>8} -> {to_text(t)}")

# %% [markdown]
# The training set has 20,000 random strings. The held-out set has 1,000 strings that do
# **not** occur in the training set, so a perfect score cannot come from memorising. (There
# are over a hundred million strings of 3–8 digits, so almost every long held-out string is
# new anyway. The short ones are the exception. Each length gets about 3,300 of the training
# draws: there are only 1,000 strings of length 3, so nearly all of them occur in the training
# set, and of the 10,000 strings of length 4 about a quarter do. That is why the held-out set,
# printed per length below, has only a handful of length-3 strings and fewer of length 4 than
# of the longer lengths.)

# %%
N_TRAIN, N_TEST = 20_000, 1_000
src_train, len_train = random_sources(N_TRAIN, gen)
seen = {to_text(s) for s in src_train}
src_pool, len_pool = random_sources(3 * N_TEST, gen)
fresh = torch.tensor([to_text(s) not in seen for s in src_pool])
src_test, len_test = src_pool[fresh][:N_TEST], len_pool[fresh][:N_TEST]

tgt_train, tgt_test = reversed_targets(src_train, len_train), reversed_targets(src_test, len_test)
mask_train, mask_test = padding_mask(len_train, MAX_LEN), padding_mask(len_test, MAX_LEN)
print("train:", tuple(src_train.shape), " held-out:", tuple(src_test.shape))
print("held-out strings seen in training:", sum(to_text(s) in seen for s in src_test))
print("held-out strings per length 3..8:", torch.bincount(len_test, minlength=9)[3:].tolist())

# %% [markdown]
# So the held-out accuracy for length 3, when we print it per length later, rests on just
# 7 strings; for the other lengths it rests on 150 or more.

# %% [markdown]
# ## 8. A tiny encoder–decoder
#
# This is a minimal model for this chapter's experiment, not a general-purpose one. It has:
#
# - **encoder**: token embedding + learned position embedding, 2 `EncoderBlock`s, a final
#   LayerNorm; it turns the source into `memory`, `(B, 8, 64)`;
# - **decoder**: its own token and position embeddings, 1 `DecoderBlock`, a final LayerNorm and
#   a linear head that scores the 13 tokens.
#
# Why two encoder blocks? The encoder has work to do before the decoder can find anything:
# to reverse, the decoder needs each source token's position counted from the *end* of its
# string, which depends on the string's length, and the learned position embeddings only
# give the position from the start. Nor can a token see where its string ends: the padding
# mask hides the `PAD` positions as keys, so the encoder has to work out the length from the
# real tokens, by attending to them. Gathering the length and using it is easier in two rounds
# of self-attention. With a single encoder block the model gets a little less right in the
# same 160 steps; section 10 trains one and compares the held-out exact match.
#
# The position embeddings come from `attnbook.positions`, which [chapter 6](06_positions.ipynb)
# builds and explains. All we need here: `PositionalEmbedding("learned", max_len, d)` holds a
# trainable `(max_len, d)` table, and calling it with a length `T` returns its first `T` rows, a
# `(T, d)` tensor that broadcasts over the batch when added to the token embeddings.

# %%
class TinySeq2Seq(nn.Module):
    """A minimal encoder-decoder for the digit tasks of this chapter."""

    def __init__(self, n_embd=64, n_head=4, n_enc=2, n_dec=1, max_len=16):
        super().__init__()
        cfg = AttentionConfig(n_embd=n_embd, n_head=n_head, block_size=max_len, dropout=0.0,
                              positions="none")
        self.src_tok = nn.Embedding(VOCAB, n_embd)
        self.src_pos = PositionalEmbedding("learned", max_len, n_embd)
        self.encoder = nn.ModuleList([EncoderBlock(cfg) for _ in range(n_enc)])
        self.ln_enc = nn.LayerNorm(n_embd)
        self.tgt_tok = nn.Embedding(VOCAB, n_embd)
        self.tgt_pos = PositionalEmbedding("learned", max_len, n_embd)
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(n_dec)])
        self.ln_dec = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, VOCAB)

    def encode(self, src, src_mask):  # (B, T_src) tokens -> (B, T_src, n_embd) memory
        h = self.src_tok(src) + self.src_pos(src.shape[1])
        for block in self.encoder:
            h = block(h, src_mask)
        return self.ln_enc(h)

    def decode(self, tgt_in, memory, src_mask):  # (B, T_tgt) tokens -> (B, T_tgt, VOCAB) logits
        h = self.tgt_tok(tgt_in) + self.tgt_pos(tgt_in.shape[1])
        for block in self.decoder:
            h = block(h, memory, src_mask)
        return self.lm_head(self.ln_dec(h))

    def forward(self, src, src_mask, tgt_in):
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)


torch.manual_seed(0)
model = TinySeq2Seq()
print("parameters:", sum(p.numel() for p in model.parameters()))

# %% [markdown]
# ## 9. Training with teacher forcing
#
# The decoder is trained like a language model, conditioned on the source. Its input is the
# target shifted right by one, with `BOS` in front; its label at every position is the next
# target token:
#
# | position | 0 | 1 | 2 | 3 | 4 |
# | --- | --- | --- | --- | --- | --- |
# | decoder input | `BOS` | 7 | 2 | 5 | `PAD` |
# | label | 7 | 2 | 5 | `EOS` | `PAD` (ignored) |
#
# (The table shows digits; the tensors hold token ids, id = digit + 3, as the next cell
# prints for the first training example.)
#
# This is **teacher forcing**: during training the decoder always sees the *correct* previous
# tokens, not its own guesses, so all positions are trained in one parallel forward pass (the
# causal mask in the decoder's self-attention keeps each position from peeking at its label).
# `F.cross_entropy(..., ignore_index=PAD)` leaves the padded positions out of the loss.

# %%
def decoder_inputs(tgt):
    """BOS + the target shifted right by one, EOS removed: (n, T + 1)."""
    shifted = torch.cat([torch.full((tgt.shape[0], 1), BOS), tgt[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == EOS, PAD)


tgt_in_train = decoder_inputs(tgt_train)
print("decoder input:", tgt_in_train[0].tolist())
print("label:        ", tgt_train[0].tolist())
print("as text: source", to_text(src_train[0]), "| input", to_text(tgt_in_train[0]),
      "| label", to_text(tgt_train[0]))

# %% [markdown]
# The training loop: batches of 128 in an order fixed by its own seeded generator, AdamW with
# a one-cycle learning-rate schedule (a short warm-up, then a decay), 160 steps, about one
# pass over the training set. The cell measures its own time and checks the 30-second budget
# on the CPU time the training used (with one thread that is the wall-clock time on an idle
# machine; on a busy one the wall-clock time also counts the waiting for other programs).

# %% tags=["nbval-ignore-output"]
def train(model, src, src_mask, tgt, steps=160, batch_size=128, lr=3e-3, seed=2, log_every=20):
    """Teacher-forced training; returns the list of losses."""
    tgt_in = decoder_inputs(tgt)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)  # fixed batch order
    batches = torch.randperm(src.shape[0], generator=order).split(batch_size)
    losses = []
    model.train()
    for step in range(steps):
        idx = batches[step % len(batches)]
        logits = model(src[idx], src_mask[idx], tgt_in[idx])  # (b, T + 1, VOCAB)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[idx].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.4f}")
    model.eval()
    return losses


wall0, cpu0 = time.perf_counter(), time.process_time()
losses = train(model, src_train, mask_train, tgt_train)
wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
print(f"trained in {wall:.1f} s wall-clock, {cpu:.1f} s of CPU time")
assert cpu < 30, f"training took {cpu:.1f} s of CPU time, over the 30 s budget"
assert losses[-1] < 0.05, losses[-1]

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(losses)
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (log scale)")
ax.set_title("Training loss, reversal task")
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## 10. Greedy decoding and held-out accuracy
#
# At test time there is no correct previous token to feed in: the decoder must consume its
# own output. Greedy decoding starts from `[BOS]`, runs the decoder, appends the most likely
# next token, and repeats. The encoder runs once; `memory` is reused at every step. We decode
# the whole held-out set as one batch, for 9 steps (the longest target: 8 digits + `EOS`).
#
# A string counts as correct only if every token up to and including `EOS` is right
# (**exact match**): one wrong digit, a missing or an extra one, and it fails. The cell prints
# the held-out exact match, overall and per source length, and a few decoded examples.

# %% tags=["nbval-ignore-output"]
@torch.no_grad()
def greedy_decode(model, src, src_mask, steps=None):
    """Greedy decoding: (B, steps) generated tokens (BOS not included)."""
    steps = src.shape[1] + 1 if steps is None else steps
    memory = model.encode(src, src_mask)  # once per source
    out = torch.full((src.shape[0], 1), BOS)
    for _ in range(steps):
        logits = model.decode(out, memory, src_mask)  # (B, t, VOCAB)
        next_tok = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        out = torch.cat([out, next_tok], dim=1)
    return out[:, 1:]


def exact_match(pred, tgt):
    """(B,) True where pred equals tgt at every position up to and including tgt's EOS."""
    upto_eos = torch.cumsum(tgt == EOS, dim=1) - (tgt == EOS).long() == 0  # (B, T)
    return ((pred == tgt) | ~upto_eos).all(dim=1)


pred_test = greedy_decode(model, src_test, mask_test)
correct = exact_match(pred_test, tgt_test)
accuracy = correct.float().mean().item()
print(f"held-out exact match: {accuracy:.2%}")
for L in range(MIN_LEN, MAX_LEN + 1):
    sel = len_test == L
    print(f"  length {L}: {correct[sel].float().mean().item():.2%} of {sel.sum().item()}")
for i in range(5):
    verdict = "ok" if correct[i] else "WRONG"
    print(f"{to_text(src_test[i]):>8} -> {to_text(pred_test[i]):<8} ({verdict})")
assert accuracy >= 0.95

# %% [markdown]
# Section 8 promised a comparison: the same model with one encoder block instead of two,
# trained the same way (same seed, same batches, 160 steps). Its random draws happen inside
# `torch.random.fork_rng()`, so the cells after this one draw what they would without it.

# %% tags=["nbval-ignore-output"]
with torch.random.fork_rng():
    torch.manual_seed(0)
    model_1enc = TinySeq2Seq(n_enc=1)
    train(model_1enc, src_train, mask_train, tgt_train, log_every=0)
correct_1enc = exact_match(greedy_decode(model_1enc, src_test, mask_test), tgt_test)
accuracy_1enc = correct_1enc.float().mean().item()
print(f"held-out exact match: {accuracy_1enc:.2%} with 1 encoder block, "
      f"{accuracy:.2%} with 2")
assert accuracy_1enc < accuracy

# %% [markdown]
# ## 11. The cross-attention map
#
# What did cross-attention learn? `DecoderBlock` calls its `cross_attn` layer without asking
# for the weights. To look at them without changing the block, we attach a **forward hook**
# to the layer: PyTorch calls it after every forward pass with the layer's inputs, and the
# hook calls the layer's `forward` once more with `need_weights=True` and keeps the weights.
# (It calls `module.forward`, not `module(...)`: calling the module would run the hook again,
# forever.)
#
# With `with_kwargs=True` the hook receives the positional arguments *and* the keyword
# arguments of the call, so it repeats the call exactly as the block made it, whichever
# arguments the block passes by position and which by name.

# %%
captured = []


def keep_cross_weights(module, args, kwargs, output):
    _, weights = module.forward(*args, **{**kwargs, "need_weights": True})
    captured.append(weights)  # (B, n_head, T_tgt, T_src)


cross = model.decoder[0].cross_attn
handle = cross.register_forward_hook(keep_cross_weights, with_kwargs=True)
with torch.no_grad():
    model(src_test, mask_test, decoder_inputs(tgt_test))  # teacher-forced pass, held-out set
handle.remove()
cross_w = captured[0]
print("cross-attention weights:", tuple(cross_w.shape))

# %% [markdown]
# We plot one held-out string of 7 different digits: each head on its own, and the mean of the
# four. Rows are decoder positions, labelled with the token each one *predicts*; columns are
# the source digits, with the padded position at the right.

# %%
i_ex = next(i for i in range(N_TEST) if len_test[i] == 7 and len(set(to_text(src_test[i]))) == 7)
L_ex = int(len_test[i_ex])
src_labels = [to_text(t.view(1)) or "PAD" for t in src_test[i_ex]]
tgt_labels = list(to_text(tgt_test[i_ex])) + ["EOS"]
maps = [cross_w[i_ex, h, : L_ex + 1] for h in range(cross_w.shape[1])]
maps.append(cross_w[i_ex, :, : L_ex + 1].mean(0))
expected = torch.tensor([*range(L_ex - 1, -1, -1), 0])  # mirrored source position; EOS: 0
on_line = (maps[-1].argmax(dim=-1) == expected).sum().item()  # rows where the mean peaks there
assert on_line >= L_ex - 1, on_line  # the mean of heads: on the anti-diagonal

fig, axes = plt.subplots(1, len(maps), figsize=(15, 3.4), sharey=True, layout="constrained")
for h, (ax, m) in enumerate(zip(axes, maps, strict=True)):
    im = ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
    ax.set_title(f"head {h}" if h < len(maps) - 1 else "mean of heads")
    ax.set_xticks(range(MAX_LEN), src_labels, fontsize=8)
    ax.set_xlabel("source")
axes[0].set_yticks(range(L_ex + 1), tgt_labels)
axes[0].set_ylabel("predicting")
fig.suptitle(f"Cross-attention while reversing {to_text(src_test[i_ex])} (held-out)")
fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
plt.show()

# %% [markdown]
# The anti-diagonal is there: to predict the first output digit the decoder looks at the last
# source digit, then the one before it, and so on; to predict `EOS` it looks at the first
# source digit, the one it has just emitted. The mean of the heads peaks on that line in all
# rows but at most two (the cell asserts that much), and single heads need not follow it. The heads
# differ in sharpness, some spread their weight over a neighbour, and in the plot some rows of
# single heads (and one row of the mean) peak one place off, most often on the source digit
# the decoder has just copied, next to the one it needs. (Which rows, and which heads, can
# change on another CPU type; the mean's line is what the cell checks.)
# That need not cost accuracy: the four heads vote together, and the encoder's
# self-attention has already mixed some information between positions, so a row of `memory`
# is not only "its" digit. The padded column is empty. (We chose a string without repeated
# digits on purpose: when a digit occurs twice, either copy gives the right answer, and the
# heads often split their weight between the two.)
#
# Over the whole held-out set, how often is the most-attended source position (mean of the
# heads) exactly the mirrored one, `L - 1 - i`?

# %% tags=["nbval-ignore-output"]
mean_w = cross_w.mean(dim=1)  # (B, T_tgt, T_src)
hits = total = 0
for b in range(mean_w.shape[0]):
    L = int(len_test[b])
    argmax = mean_w[b, :L].argmax(dim=-1)  # (L,): predicting the L digits
    hits += (argmax == torch.arange(L - 1, -1, -1)).sum().item()
    total += L
print(f"most-attended source position is the mirrored one for {hits / total:.1%} of target digits")
assert hits / total > 0.6

# %% [markdown]
# ## 12. Padding in the trained model
#
# Section 4 showed the property on a bare layer; now on the trained model. Two checks on the
# whole held-out set:
#
# 1. the cross-attention weights on padded source positions are exactly zero;
# 2. if we replace every `PAD` in the sources by a random digit, keeping the same mask, the
#    logits do not change and neither do the decoded strings. The mask hides those positions
#    from the encoder's self-attention (as keys) and from the decoder's cross-attention.

# %%
padded_keys = ~mask_test[:, None, None, :]  # (B, 1, 1, T_src), broadcasts over heads, rows
largest = cross_w.masked_select(padded_keys).max().item()
print("largest weight on a padded source position:", largest)

scrambled = torch.where(mask_test, src_test, torch.randint(3, 13, src_test.shape))
print("padded positions changed:", (scrambled != src_test).sum().item())
with torch.no_grad():
    tgt_in_test = decoder_inputs(tgt_test)
    logits = model(src_test, mask_test, tgt_in_test)
    logits_scrambled = model(scrambled, mask_test, tgt_in_test)
print("logits unchanged:", torch.allclose(logits, logits_scrambled, atol=1e-5))
pred_scrambled = greedy_decode(model, scrambled, mask_test)
print("decoded strings unchanged:", torch.equal(pred_scrambled, pred_test))

# %% [markdown]
# Note what the encoder does at the padded positions themselves: those rows of `memory` are
# computed (they are queries too, and attend to the real tokens), and they do change when we
# scramble the padding. No one reads them, since they are masked everywhere they could be
# used as keys.

# %% [markdown]
# ## Check against the module
#
# The package version of this chapter's layer is `attnbook.attention.CrossAttention`, built
# from an `AttentionConfig`. Its projections are `c_q` (`d → d`, reads `x`), `c_kv`
# (`d → 2d`, reads `memory`, rows `k | v`) and `c_proj`. So our `W_q` goes to `c_q`, our `W_k`
# and `W_v` stacked go to `c_kv`, and `W_o` to `c_proj`. It reads the source through
# `module(x, cache=module.project_memory(memory, memory_mask))`, the `CrossCache` of section 6;
# its `memory_mask` has our orientation (`(B, T_k)`, `True` = real token).
#
# The tensors are the ones of sections 2–4, from far back: `xattn` is section 3's
# `MyCrossAttention` (width `d = 16`, 2 heads), `x` the decoder states `(2, 5, 16)` and
# `memory` the source rows `(2, 7, 16)` of section 2, and `memory_mask` section 4's `(2, 7)`
# mask for sources of 7 and 4 real tokens. We build the module with both settings of `impl`,
# `"reference"` (the explicit math) and `"sdpa"` (PyTorch's fused kernel), and compare with
# and without the padding mask, to a tolerance of `atol=1e-5`. One caveat: returning the
# weights needs the explicit math, so with `need_weights=True` even the `"sdpa"` module runs
# the reference path. In the loop below only the first assert of the `"sdpa"` round tests the
# fused kernel; the other two check the outputs and the weights of the reference path.

# %%
from attnbook.attention import CrossAttention

for impl in ("reference", "sdpa"):
    module = CrossAttention(AttentionConfig(n_embd=d, n_head=n_head, impl=impl))
    with torch.no_grad():
        module.c_q.weight.copy_(xattn.W_q.weight)
        module.c_q.bias.copy_(xattn.W_q.bias)
        module.c_kv.weight.copy_(torch.cat([xattn.W_k.weight, xattn.W_v.weight]))  # rows k | v
        module.c_kv.bias.copy_(torch.cat([xattn.W_k.bias, xattn.W_v.bias]))
        module.c_proj.weight.copy_(xattn.W_o.weight)
        module.c_proj.bias.copy_(xattn.W_o.bias)
        for mask in (None, memory_mask):
            ours, ours_w = xattn(x, memory, mask)
            source = module.project_memory(memory, mask)  # keys, values and mask, once
            assert torch.allclose(module(x, cache=source), ours, atol=1e-5), (impl, mask)
            theirs, theirs_w = module(x, cache=source, need_weights=True)
            assert torch.allclose(theirs, ours, atol=1e-5), (impl, mask)
            assert torch.allclose(theirs_w, ours_w, atol=1e-5), (impl, mask)
print("attnbook CrossAttention (reference, sdpa; with and without padding) == ours: OK (atol=1e-5)")

# %% [markdown]
# ## Summary
#
# - The sketch's single-head cross-attention, `CrossSketchV1`, failed when built:
#   `super.__init__()` without parentheses (`TypeError: descriptor '__init__' of 'super' object
#   needs an argument`). Then `K.T` turned `(2, 7, 64)` keys into `(64, 7, 2)` (a `UserWarning`
#   announcing a deprecation in torch 2.13) and the product failed, batch 2 against 64; with
#   `K.transpose(-2, -1)` the weights are `(2, 5, 7)`. Without $1/\sqrt{d}$ it ran silently off
#   chapter 2's `sdpa_reference` (by up to 1.49), which with `scale=1.0` reproduced it bit for
#   bit, and its rows were too sharp (at $d = 64$: largest weight
#   0.68 against 0.22, entropy 0.89 against 1.90). Fixed, it equals
#   `attnbook.attention.CrossAttention` with one head and `c_proj` the identity (both kernels,
#   atol 1e-5).
# - Cross-attention is the attention of chapters 2 and 3 with its inputs split: queries from
#   the decoder's stream `x`, keys and values from the encoder's output `memory`. The weights
#   are `T_q × T_k`, not square (`(2, 5, 7)` for 5 queries and 7 keys), and the output keeps the
#   decoder's length.
# - It needs no causal mask: the source is complete before decoding starts, and each output row
#   depends only on its own query row (perturbing decoder position 3 moved output rows `[3]`
#   only). A decoder block is therefore causal as long as its self-attention is.
# - Sources of different lengths need a key padding mask, `(B, T_k)` with `True` = real token:
#   padded keys get a weight of exactly `0.0`, the padded batch then reproduces the short
#   sequence run alone, and overwriting the padded rows leaves the output bit-for-bit unchanged.
# - `nn.MultiheadAttention(x, memory, memory)` computes the same layer (outputs and head-averaged
#   weights agree), but its `key_padding_mask` means `True` = ignore. Passed without inverting
#   it, it turned the unpadded sequence into NaN with `need_weights=True` and, silently, into
#   nothing but the output bias with `need_weights=False`.
# - A pre-norm decoder block is three residual layers, `y + Layer(LN(y))`: causal
#   self-attention, cross-attention, MLP; the encoder block has no cross-attention and a
#   self-attention that is not causal. Written out from [chapter 3](03_multi_head_attention.ipynb)'s
#   layer, our `MyCrossAttention` and an MLP, they match the package's `EncoderBlock` and
#   `DecoderBlock` (atol=1e-5, with and without the padding mask, and with the decoder reading a
#   precomputed `CrossCache`), and changing decoder position 3 moved the block's output rows
#   `[3, 4]` only.
# - `EncoderBlock` (self-attention, not causal, then an MLP) and `DecoderBlock` (causal
#   self-attention, cross-attention, MLP) make a tiny encoder–decoder of 171533 parameters.
#   Trained with teacher forcing for 160 steps on 20000 strings, it reverses held-out strings of
#   3 to 8 digits, none of them seen in training, by greedy decoding: 99.90% exact match when
#   this notebook was executed (the cell asserts at least 95%).
# - Its cross-attention learned the task's alignment: the mean of the heads follows the
#   anti-diagonal, and for 85.3% of the held-out target digits the most-attended source position
#   is the mirrored one; single heads are less regular. Padded positions get a weight of `0.0` in
#   the trained model, and replacing all 1885 padded tokens by random digits changes neither the
#   logits nor the decoded strings.
# - `attnbook.attention.CrossAttention` matches our layer with both kernels, with and without
#   padding (atol=1e-5). Its `project_memory` turns the source into a `CrossCache` (keys, values
#   and padding mask), projected once per source and read at every decoding step, the green
#   path of the diagram at the start.

# %% [markdown]
# ## Further reading
#
# - Bahdanau, Cho and Bengio (ICLR 2015): attention from a decoder to an encoder, the first
#   cross-attention.
# - Vaswani et al., *Attention Is All You Need* (2017): the encoder-decoder transformer and its
#   three attention layers.
# - Raffel et al., *Exploring the Limits of Transfer Learning with a Unified Text-to-Text
#   Transformer* (JMLR 2020): T5, a modern encoder-decoder.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/05_cross_attention_solutions.ipynb`](solutions/05_cross_attention_solutions.ipynb).
# Try each one first: write down your prediction, then check it with code.
#
# 1. **Sorting instead of reversing.** Change the target to the *sorted* digits of the source
#    (`4170 -> 0147`) and train the same model. Before you look: what should the
#    cross-attention map look like now? It cannot be a fixed diagonal, since the position of
#    the next digit depends on the string. What happens when a digit occurs twice? Plot the
#    map for a held-out string and measure how often the most-attended source position holds
#    the digit being predicted.
# 2. **Forget the mask.** Take the trained reversal model and evaluate it with
#    `memory_mask=None` everywhere (encoder and decoder). Predict the held-out accuracy, then
#    measure it, per source length. Which lengths suffer most, and which not at all? Then
#    show that without the mask the answer for a string depends on how much padding it
#    carries: pad the same strings to width 8 and to width 12 and compare the decoded results,
#    with and without the mask.
# 3. **Cache the encoder's keys and values.** Greedy decoding calls `decode` once per step, and
#    every call projects the whole `memory` to keys and values again with `c_kv`, although
#    `memory` never changes. Write a decoding loop that computes each decoder layer's
#    cross-attention `k` and `v` once, before the first step, and only projects the new
#    queries afterwards. Show that it produces exactly the same tokens (and logits within
#    `1e-5`), and count how many times `c_kv` runs in each version. (The module has what you
#    need: `CrossAttention.project_memory(memory, memory_mask)` returns the keys, values and
#    mask as a `CrossCache`, and `DecoderBlock` accepts it as `memory_kv=` in place of
#    `memory` and `memory_mask`. Explain why reusing them gives the same result.)
# 4. **Longer strings than in training.** The model never saw strings longer than 8. Predict
#    its exact-match accuracy on strings of length 9 and 10 (padded to width 10), then
#    measure it. Which part of the model has never been trained for those positions? Look at
#    where the first few output digits come from, using the cross-attention map.
