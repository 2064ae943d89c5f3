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
# # Chapter 17 — Assembling and training a GPT
#
# The chapters before this one built parts: attention layers of every kind behind one registry
# (`build_attention(name, config)`), positions, the feed-forward network, the KV cache, a
# tokenizer. None of them is a language model on its own. This chapter puts them together into
# a GPT — a decoder-only transformer that reads a sequence of tokens and predicts, at every
# position, the next one — and trains it.
#
# We first write the model in the notebook, line by line, and look closely at one detail that is
# easy to skip: how its weights are initialised, and why the layers that write into the residual
# stream start smaller than the others. Then we check that our model and the book's module
# `attnbook.model.GPT` compute the same function, and count its parameters and its FLOPs by
# hand. Before training we see what cleaning removes from a corpus (TinyShakespeare needs
# almost nothing removed). We write the training loop in the notebook too, and check it against
# the book's `attnbook.train.train` to the last bit. Then `train` runs for real: 400 steps on a
# laptop CPU turn random weights into a model whose samples have the look of the text: words of
# the right lengths, capitals at the start of lines, punctuation, a few real words.
# Finally we swap the attention variant by its name, resume a stopped run from its checkpoint,
# load a checkpoint to sample, and fine-tune the trained model on a play it has never seen.
#
# **Learning goals**
#
# - Assemble a GPT from the book's modules: token and position embeddings, pre-norm blocks of
#   `build_attention(...)` + `MLP`, a final LayerNorm and an output layer tied to the embeddings.
# - Explain GPT-2's initialisation, and measure why the output projections of the residual
#   branches are scaled by $1/\sqrt{2 n_\text{layer}}$: without it the residual stream grows like
#   the square root of the depth and drowns the token embeddings.
# - Count the parameters ($12 d^2 + 13 d$ per block) and the training FLOPs per token
#   ($6N + 12\, n_\text{layer}\, d\, T$) by hand, and check both against the module and against
#   PyTorch's FLOP counter.
# - Say what `clean_text` removes from a corpus (encodings, invisible characters, repeated
#   paragraphs) and what it deliberately leaves, and prepare TinyShakespeare as character tokens.
# - Write the training loop: AdamW with weight decay on matrices only, a linear warm-up and a
#   cosine decay of the learning rate, a step (forward, backward, clip, update, zero the
#   gradients) and an evaluation on fixed batches. Check it against `attnbook.train.train` bit
#   for bit.
# - Train with `attnbook.train.train`, plot the loss curves, and sample with temperature and
#   top-k.
# - Switch the attention variant by name (`"gqa"`, `"local"`, `"linear"`, `"mla"`, ...) and
#   compare what each one costs in parameters and in cache memory.
# - Resume a run from its checkpoint (exactly as if it had never stopped) and load a trained
#   model to generate text.
# - Fine-tune the trained model on held-out text with the run's own vocabulary, and compare it
#   with a model trained on that text from scratch.

# %% [markdown]
# ## Setup
#
# Everything random is seeded. The compared outputs are shapes, integers, booleans and rounded
# numbers; the training losses, the timings and the samples depend on the machine's arithmetic
# (a different number of threads adds floats in a different order), so they sit in cells whose
# output the book's tests ignore, and each such cell asserts its claim with a tolerance instead.
#
# The data comes through `attnbook.data`, which downloads TinyShakespeare once and checks its
# sha256 (a machine without a network can point it at a local copy with `ATTNBOOK_DATA_MIRROR`).
# Training runs write their checkpoints into a temporary folder that the notebook deletes at the
# end.

# %%
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from attnbook.attention import AttentionConfig, available, build_attention
from attnbook.mlp import MLP
from attnbook.positions import PositionalEmbedding

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="attnbook-ch17-")  # removed at the end
runs = Path(workdir.name)  # every training run of this chapter gets a folder in here

# %% [markdown]
# ## 1. Version 1: a block
#
# A GPT is a stack of identical **blocks** between an embedding layer and an output layer. All the
# blocks read and write one tensor of shape `(B, T, n_embd)`, the **residual stream**: each block
# adds something to it instead of replacing it. A block has two such additions, each called a
# residual *branch*:
#
# 1. `x = x + attn(ln_1(x))`: attention is the only place where positions exchange information;
#    each position gathers what it needs from the positions before it (the layer is causal).
# 2. `x = x + mlp(ln_2(x))`: a feed-forward network then works on every position alone, with a
#    hidden layer four times wider than the stream (`attnbook.mlp.MLP`, GELU in the middle).
#
# The LayerNorms sit at the *entrance* of each branch ("pre-norm", GPT-2's layout). The branch
# always sees an input of a sensible scale, whatever has accumulated in the stream, and the
# stream itself is a plain sum that no normalisation ever rescales: the gradient of the loss
# reaches every block through the additions unchanged. The original transformer normalised
# *after* the addition ("post-norm"); Exercise 4 shows what that does to training.
#
# The attention layer is built by name from the registry, so the block does not know which
# variant it holds; everything the variant needs is in its `AttentionConfig`.

# %%
class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, attention, cfg, **options):
        super().__init__()
        d = cfg.n_embd
        self.ln_1 = nn.LayerNorm(d)  # normalises the input of the attention branch
        self.attn = build_attention(attention, cfg, **options)  # any variant, its own options
        self.ln_2 = nn.LayerNorm(d)  # normalises the input of the MLP branch
        self.mlp = MLP(d, 4 * d)  # d -> 4d -> GELU -> d

    def forward(self, x):  # x: (B, T, n_embd)
        x = x + self.attn(self.ln_1(x))  # positions talk to earlier positions
        return x + self.mlp(self.ln_2(x))  # each position thinks alone


# positions="learned": the model adds them to the embeddings, so the layer applies none itself
attn_cfg = AttentionConfig(n_embd=128, n_head=4, block_size=64, positions="learned")
block = Block("mha", attn_cfg)
x = torch.randn(2, 16, 128)
print("block:", tuple(x.shape), "->", tuple(block(x).shape))

# %% [markdown]
# ## 2. Version 2: the GPT around the blocks
#
# The rest of the model turns token ids into the stream and the stream into predictions:
#
# - `wte`, the token embedding: one learned vector of `n_embd` numbers per token id (`n_embd`,
#   GPT-2's name for the width of section 1, is the book's name for it too; $d$ below).
# - `wpe`, the position embedding: one learned vector per position `0 .. block_size - 1`
#   ([chapter 6](06_positions.ipynb)'s `PositionalEmbedding`). Attention itself is blind to order;
#   adding a position vector to each token vector is how GPT-2 tells the model where each token
#   sits. (RoPE and ALiBi, [chapter 6](06_positions.ipynb), work inside the attention layers
#   instead; the module below supports them.)
# - `h`, the `n_layer` blocks.
# - `ln_f`, a final LayerNorm: in a pre-norm model nothing has normalised the stream since the
#   embeddings, and by now it is a sum of `2 n_layer + 1` terms, so it is normalised once more.
# - `lm_head`, a linear layer from `n_embd` to `vocab_size`: one score (*logit*) per possible
#   next token, at every position. Softmax of the logits is the predicted distribution, and the
#   loss is its cross-entropy with the token that really comes next.
#
# `lm_head` is **tied** to `wte`: it uses the same weight matrix, `(vocab_size, n_embd)`. The
# logit of token `i` is then the dot product of the final vector with token `i`'s embedding, so
# the model predicts a token by making its final vector look like that token's embedding. GPT-2
# does this; it saves `vocab_size × n_embd` parameters (Exercise 2 counts what that means for
# GPT-2) and tends to help small models, whose rare tokens get little training signal otherwise.
#
# We name the parts as nanoGPT and GPT-2's checkpoints do (`transformer.wte`, `transformer.h.0.attn`,
# ...), so that weights can be moved between models by name (GPT-2's checkpoints differ in one
# name, the position table, which [chapter 19](19_loading_gpt2.ipynb) renames). Dropout is left out:
# a model this small, trained for a few hundred steps, does not overfit.

# %% [markdown]
# Before we write the class, here is the whole model in one picture, drawn by code (boxes and
# arrows, no data), with the shape of the tensor on each arrow; $d$ is `n_embd`. Read the left
# column from the bottom up. The token ids `idx`, `(B, T)`, pick rows of `wte`, one vector per
# token: `(B, T, d)`. The position table `wpe` gives one `(T, d)` block, the same for every
# sequence of the batch, and is added to it. The sum, the residual stream, goes through the
# `n_layer` blocks of `h` without changing shape, then through `ln_f`, and `lm_head` turns each
# position's vector into `vocab_size` logits, `(B, T, vocab_size)`. `F.cross_entropy` compares
# them with the targets (the same text shifted by one token) and returns one number, the mean
# loss over the `B × T` predictions. The blue dashed line is the tie: `lm_head` has no weight of
# its own. Dashed boxes depend on the configuration: `wpe` exists only for learned (or
# sinusoidal) positions, and `drop`, a dropout on the embeddings that `attnbook.model.GPT` has
# (`GPTConfig.dropout`, 0 by default), is left out of our version.
#
# The right side zooms into one block, section 1's `Block`. The stream goes straight up through
# two additions; each branch reads it through its LayerNorm, transforms it and adds the result
# back: `x = x + attn(ln_1(x))`, then `x = x + mlp(ln_2(x))`. The attention box is whichever
# variant the name asks for (`build_attention(attention, ...)` here, `GPTConfig.attention` in the
# module): the block only needs it to map `(B, T, d)` to `(B, T, d)`. In red, the last layer of
# each branch, `c_proj`: the only layers of a block whose output is added to the stream, and the
# ones that the last loop of `init_weights` draws with a smaller standard deviation (section 3
# measures why). In the class below, `__init__` builds the boxes under these names and `forward`
# follows the arrows from the bottom up.

# %%
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

EMB, BLOCK, HEAD, PROJ = "#dbe8f6", "#fde6cc", "#d9f0d3", "#f4a6a6"  # fill colour of each role


def box(ax, x, y, w, h, text, color, dashed=False, bold=False, fontsize=9, text_y=None):
    """A rounded box of size (w, h) centred at (x, y); its text centred at (x, text_y or y)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                facecolor=color, edgecolor="black", lw=1.6 if bold else 0.8,
                                linestyle="--" if dashed else "-"))
    ax.text(x, y if text_y is None else text_y, text, ha="center", va="center",
            fontsize=fontsize, fontweight="bold" if bold else "normal")


def arrow(ax, start, end, label="", dx=0.12, dy=0.0, **kw):
    """An arrow from start to end; its label (a tensor shape) sits beside the middle, moved by
    (dx, dy)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.2,
                                 shrinkA=0, shrinkB=2, color="black", **kw))
    x, y = (start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2 + dy
    ax.text(x, y, label, fontsize=8.5, family="monospace", va="center",
            ha="left" if dx > 0 else "right" if dx < 0 else "center")


def plus(ax, x, y, r=0.2):
    """A circled +: an addition into the residual stream."""
    ax.add_patch(Circle((x, y), r, facecolor="white", edgecolor="black", lw=1.2))
    ax.text(x, y, "+", ha="center", va="center", fontsize=13)


fig, ax = plt.subplots(figsize=(12, 8.4))
fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
ax.set(xlim=(0, 16), ylim=(0, 11.2))
ax.axis("off")

# Left: the whole model, bottom to top (token ids in, loss out).
cx, W = 3.0, 3.6  # the column's centre and its boxes' width
px = 6.1  # the column of wpe and targets
box(ax, cx, 0.45, W, 0.5, "idx: token ids  (B, T)", "white")  # the input: (B, T) integers
box(ax, cx, 1.6, W, 0.7, "wte = nn.Embedding(vocab_size, d)\none row per token id", EMB)
box(ax, px, 1.6, 2.2, 0.7, "wpe: one row per\nposition 0 … T−1", EMB, dashed=True)
ax.text(px, 0.75, "only for learned or\nsinusoidal positions", ha="center", va="center",
        fontsize=8, color="dimgrey")
plus(ax, cx, 2.65)  # (B, T, d) + (T, d): the positions broadcast over the batch
box(ax, cx, 3.55, W, 0.6, "drop = Dropout(GPTConfig.dropout)\n0 by default; NotebookGPT has none",
    "white", dashed=True, fontsize=8.5)
for k in (2, 1):  # two shadows behind the stack: the same block, n_layer times
    ax.add_patch(Rectangle((cx - W / 2 + 0.1 * k, 4.55 + 0.1 * k), W, 1.0, facecolor=BLOCK,
                           edgecolor="grey", lw=0.6))
box(ax, cx, 5.05, W, 0.9, "h: n_layer × Block\n(B, T, d) → (B, T, d)", BLOCK, bold=True)
box(ax, cx, 6.6, W, 0.5, "ln_f = LayerNorm(d)", HEAD)
box(ax, cx, 7.75, W, 0.7, "lm_head = Linear(d, vocab_size)\nweight tied to wte", HEAD)
box(ax, cx, 8.9, W, 0.5, "logits  (B, T, vocab_size)", "white")  # one score per next token
box(ax, cx, 10.3, W, 0.7, "F.cross_entropy(logits, targets)\nloss: the mean over B × T positions",
    HEAD, bold=True)
box(ax, px, 9.55, 2.2, 0.7, "targets  (B, T)\nidx shifted by one", "white")
arrow(ax, (cx, 0.7), (cx, 1.25), "(B, T)")
arrow(ax, (cx, 1.95), (cx, 2.45), "(B, T, d)")
arrow(ax, (px, 1.95), (cx + 0.2, 2.65), "(T, d)", dx=0.9, dy=0.5,
      connectionstyle="angle,angleA=90,angleB=0")
arrow(ax, (cx, 2.85), (cx, 3.25), "(B, T, d)")
arrow(ax, (cx, 3.85), (cx, 4.6), "(B, T, d)")
arrow(ax, (cx, 5.5 + 0.2), (cx, 6.35), "(B, T, d)")
arrow(ax, (cx, 6.85), (cx, 7.4), "(B, T, d)")
arrow(ax, (cx, 8.1), (cx, 8.65), "(B, T, vocab_size)")
arrow(ax, (cx, 9.15), (cx, 9.95))
arrow(ax, (px, 9.9), (cx + W / 2 + 0.05, 10.3), connectionstyle="angle,angleA=90,angleB=0")
# The tie: lm_head's weight is wte's weight, one (vocab_size, d) tensor used twice.
tie_x = cx - W / 2 - 0.45
ax.plot([cx - W / 2 - 0.05, tie_x, tie_x, cx - W / 2 - 0.05], [1.6, 1.6, 7.75, 7.75], ls="--",
        color="C0", lw=1.4)
ax.text(tie_x - 0.12, 4.7, "tied: one (vocab_size, d) tensor", rotation=90, ha="center",
        va="center", fontsize=8.5, color="C0")

# Right: one block, the residual stream going up, the two branches beside it.
fl, fr, fb, ft = 7.6, 15.8, 0.9, 9.3  # the frame of the zoomed block
ax.add_patch(Rectangle((fl, fb), fr - fl, ft - fb, fill=False, ls="--", edgecolor="grey"))
ax.text((fl + fr) / 2, ft + 0.25, "one Block of h (pre-norm), the same n_layer times",
        ha="center", va="center", fontsize=10, style="italic")
ax.plot([cx + W / 2 + 0.2, fl], [5.5 + 0.2, ft], ":", color="grey")  # zoom lines
ax.plot([cx + W / 2 + 0.2, fl], [4.6 + 0.2, fb], ":", color="grey")
sx, bx, bw = 8.7, 12.5, 5.6  # the stream's x; the branches' centre and width
ax.text(sx, 1.15, "x: (B, T, d)", ha="center", va="center", fontsize=9, family="monospace")
box(ax, bx, 1.85, bw, 0.45, "ln_1 = LayerNorm(d)", BLOCK)
box(ax, bx, 3.25, bw, 1.6, "attn = build_attention(GPTConfig.attention, ...)\n"
    "any registered variant: mha, gqa, mqa, local, linear, mla, ...\n"
    r"c_attn, then causal $\mathrm{softmax}(QK^\top/\sqrt{d_h} + \mathrm{mask})\,V$",
    BLOCK, text_y=3.0)
box(ax, bx, 3.8, 2.4, 0.3, r"c_proj  $(d \to d)$", PROJ, fontsize=8.5)
plus(ax, sx, 4.55)  # (B, T, d) + (B, T, d)
box(ax, bx, 5.3, bw, 0.45, "ln_2 = LayerNorm(d)", BLOCK)
box(ax, bx, 6.6, bw, 1.2, "mlp = MLP(d, 4d)\n" r"c_fc $(d \to 4d)$, then GELU", BLOCK,
    text_y=6.4)
box(ax, bx, 6.95, 2.4, 0.3, r"c_proj  $(4d \to d)$", PROJ, fontsize=8.5)
plus(ax, sx, 7.9)  # (B, T, d) + (B, T, d)
ax.text(sx + 0.15, 8.85, "x: (B, T, d), to the next block (after the last one: to ln_f)",
        ha="left", va="center", fontsize=9, family="monospace")
# The stream: straight up through the two additions (the skip paths).
arrow(ax, (sx, 1.35), (sx, 4.35))
arrow(ax, (sx, 4.75), (sx, 7.7))
arrow(ax, (sx, 8.1), (sx, 8.65))
# The branches: read the stream, normalise, transform, add back.
arrow(ax, (sx, 1.85), (bx - bw / 2 - 0.05, 1.85), "(B, T, d)", dx=0, dy=0.2)
arrow(ax, (bx, 2.08), (bx, 2.4))
arrow(ax, (bx, 4.1), (sx + 0.2, 4.55), connectionstyle="angle,angleA=90,angleB=0")
ax.text(sx + 0.4, 4.72, "x = x + attn(ln_1(x))", fontsize=8.5, family="monospace",
        ha="left", va="bottom")
arrow(ax, (sx, 5.3), (bx - bw / 2 - 0.05, 5.3), "(B, T, d)", dx=0, dy=0.2)
arrow(ax, (bx, 5.53), (bx, 5.95))
arrow(ax, (bx, 7.25), (sx + 0.2, 7.9), connectionstyle="angle,angleA=90,angleB=0")
ax.text(sx + 0.4, 8.07, "x = x + mlp(ln_2(x))", fontsize=8.5, family="monospace",
        ha="left", va="bottom")
ax.text(sx - 0.3, 3.1, "residual stream", rotation=90, ha="center", va="center", fontsize=8.5,
        color="dimgrey")
ax.text((fl + fr) / 2, 0.45, "red: the layers that write into the stream, drawn with std "
        r"$0.02/\sqrt{2\,n_\mathrm{layer}}$" "\n(scale_residual, section 3); "
        "every other weight matrix: std 0.02", ha="center", va="center", fontsize=8.5,
        color="firebrick")
plt.show()

# %%
class NotebookGPT(nn.Module):
    """A GPT-2-style language model assembled in this notebook (learned positions, no dropout)."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, attention="mha",
                 scale_residual=True, **attention_options):
        super().__init__()
        cfg = AttentionConfig(n_embd=n_embd, n_head=n_head, block_size=block_size,
                              positions="learned")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),  # token id -> vector
            wpe=PositionalEmbedding("learned", block_size, n_embd),  # position -> vector
            h=nn.ModuleList(Block(attention, cfg, **attention_options) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, two uses
        self.init_weights(scale_residual)

    def init_weights(self, scale_residual=True):
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if scale_residual:  # the projections that write into the residual stream (section 3)
            n_branches = 2 * len(self.transformer.h)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_branches))

    def forward(self, idx, targets=None):  # idx: (B, T) token ids
        B, T = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(T)  # (B, T, d) + (T, d)
        for block in self.transformer.h:
            x = block(x)  # (B, T, d)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss


# %% [markdown]
# A few remarks on the lines above:
#
# - `init_weights` is GPT-2's initialisation: every linear and embedding weight from a normal
#   distribution with standard deviation 0.02, every bias zero. LayerNorms keep PyTorch's
#   initialisation (scale 1, shift 0), so at first they only standardise.
# - The tied weight is visited twice by `self.modules()` (as `wte` and as `lm_head`) and drawn
#   twice; that is harmless, both draws have the same distribution. `parameters()` lists it once.
# - The last loop is the **scaled residual initialisation**; section 3 measures why it is there.
#
# We build a model of the size we will train in section 8: 65 characters, a context of 64, 4 blocks
# of 4 heads, `n_embd = 128`. Before any training, every logit is close to zero, the prediction is
# close to uniform over the 65 characters, and the loss should be close to $\ln 65 \approx 4.17$.

# %%
torch.manual_seed(0)
ours = NotebookGPT(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
idx = torch.randint(0, 65, (2, 64))
targets = torch.randint(0, 65, (2, 64))
logits, loss = ours(idx, targets)
print("logits:", tuple(logits.shape))
print(f"loss at initialisation: {loss.item():.2f}   ln(65) = {math.log(65):.2f}")
print("lm_head shares wte's weight:", ours.lm_head.weight is ours.transformer.wte.weight)
print(f"parameters: {sum(p.numel() for p in ours.parameters()):,}")

# %% [markdown]
# ## 3. Why the residual branches start small
#
# Every block adds two terms to the residual stream. At initialisation they are random, roughly
# independent of each other and of the stream, and the variance of a sum of independent terms is
# the sum of their variances. So after $L$ blocks, the stream's variance is the embeddings' plus
# $2L$ times what one branch adds: its standard deviation grows like $\sqrt{L}$. The branches do
# not see that growth (each reads its input through a LayerNorm), but everything downstream
# does: `ln_f` and `lm_head` receive a vector in which the token's own embedding is a small part
# and the rest is noise from random blocks — the deeper the model, the smaller the part. The
# later blocks are downstream too: a LayerNorm rescales the whole stream, and cannot pick the
# token's embedding out of the noise that earlier blocks added, so a block deep in such a model
# starts out reading mostly noise.
#
# GPT-2's remedy is to draw the weights of the last layer of each branch — `c_proj`, in attention
# and in the MLP alike — with a standard deviation divided by $\sqrt{2 n_\text{layer}}$. Each
# branch then adds $2 n_\text{layer}$ times less variance, and the total the blocks add no longer
# depends on the depth.
#
# Prediction first, in symbols. Say the embeddings have variance $e$ and one branch, drawn at
# 0.02, adds variance $v$. After $L$ blocks the stream has variance $e + 2Lv$ without the scaling,
# and $e + 2L \cdot v/(2L) = e + v$ with it: the same for models of every depth (within one
# model it still rises from $e$ after the embeddings to $e + v$ after the last block). We measure the standard
# deviation of the stream after the embeddings and after each block.

# %%
@torch.no_grad()
def stream_stds(model, idx):
    """Std of the residual stream after the embeddings and after each block (a list)."""
    x = model.transformer.wte(idx) + model.transformer.wpe(idx.shape[1])
    stds = [x.std().item()]
    for block in model.transformer.h:
        x = block(x)
        stds.append(x.std().item())
    return stds


def build(n_layer, scale_residual):
    torch.manual_seed(0)
    return NotebookGPT(65, 64, n_layer, 4, 128, scale_residual=scale_residual)


probe = torch.randint(0, 65, (8, 64), generator=torch.Generator().manual_seed(1))
deep_plain = stream_stds(build(24, scale_residual=False), probe)
deep_scaled = stream_stds(build(24, scale_residual=True), probe)
depths = [2, 4, 8, 16, 32]
final_plain = [stream_stds(build(n, False), probe)[-1] for n in depths]
final_scaled = [stream_stds(build(n, True), probe)[-1] for n in depths]

print(f"std after the embeddings: {deep_plain[0]:.3f}")
print(f"{'n_layer':>7} {'final std, 0.02 everywhere':>27} {'final std, scaled c_proj':>25}")
for n, a, b in zip(depths, final_plain, final_scaled, strict=True):
    print(f"{n:>7} {a:>27.3f} {b:>25.3f}")
assert 3.5 < final_plain[-1] / final_plain[0] < 4.5  # 16 times deeper: about sqrt(16) = 4
assert max(final_scaled) / min(final_scaled) < 1.1  # flat

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
ax0.plot(deep_plain, "o-", ms=3, color="C3", label="0.02 everywhere")
ax0.plot(deep_scaled, "o-", ms=3, color="C0", label=r"c_proj at 0.02 / $\sqrt{2 n_{layer}}$")
ax0.set_xlabel("blocks passed (0 = the embeddings)")
ax0.set_ylabel("std of the residual stream")
ax0.set_title("A 24-block GPT at initialisation")
ax0.legend()
ax1.plot(depths, final_plain, "o-", color="C3", label="0.02 everywhere")
ax1.plot(depths, final_scaled, "o-", color="C0", label="scaled c_proj")
ax1.plot(depths, [final_plain[0] * math.sqrt(n / depths[0]) for n in depths], ":", color="gray",
         label=r"$\propto \sqrt{n_{layer}}$")
ax1.set_xscale("log", base=2)
ax1.set_xticks(depths, [str(n) for n in depths])
ax1.set_xlabel("n_layer")
ax1.set_ylabel("std of the stream after the last block")
ax1.set_title("Entering ln_f, as a function of depth")
ax1.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The first printed line, the standard deviation after the embeddings, is what the
# initialisation predicts: `wte` and `wpe` are each drawn at 0.02, independently, so their sum
# has standard deviation $0.02\sqrt{2} \approx 0.028$.
#
# Without the scaling, the stream grows by a constant amount of *variance* per block: its
# standard deviation follows the $\sqrt{n_\text{layer}}$ curve, and a 32-block model enters
# `ln_f` with a stream thirteen times the size of its embeddings. With the scaling, the final
# standard deviation is the same at every depth. The share of the final stream's variance that
# still comes from the token and position embeddings, $e/(e + 2Lv)$ against $e/(e + v)$, tells
# the same story:

# %%
for label, stds in (("0.02 everywhere", deep_plain), ("scaled c_proj", deep_scaled)):
    share = (stds[0] / stds[-1]) ** 2
    print(f"24 blocks, {label:>15}: the embeddings are {100 * share:4.1f}% of the variance "
          f"that ln_f sees")

# %% [markdown]
# Both shares say that $v \approx 2e$: a random branch adds about twice the variance of the
# embeddings. Unscaled, $e / (e + 48 v) = 0.009$ gives $48 v \approx 110 e$, $v \approx 2.3 e$;
# scaled, $e / (e + v) = 0.337$ gives $v \approx 1.97 e$ (attention and MLP branches add
# different amounts, so $v$ is their average). This is a statement about the starting point only: training moves every weight,
# and the stream grows anyway as the blocks learn useful things to add. But a starting point
# where the input is buried under random noise is a slow one to learn from, and it gets worse
# with depth; with the scaling, a 4-block and a 48-block model start from the same place.
# `attnbook.model.GPT` applies it to every parameter named `c_proj.weight`, which covers each
# attention variant's output projection and both feed-forward networks.
#
# ## 4. The same model in `attnbook.model`
#
# The book's module `attnbook.model` is this notebook's GPT with more switches. `GPTConfig`
# holds the sizes and the choices; `GPT(config)` builds the model with the same part names.
# If our `NotebookGPT` and the module's `GPT` really are the same architecture, copying our
# weights into the module's model, by name, must give the same logits.

# %%
from attnbook.model import GPT, GPTConfig

model_cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
module_gpt = GPT(model_cfg)
same_names = set(module_gpt.state_dict()) == set(ours.state_dict())
module_gpt.load_state_dict(ours.state_dict())  # strict: every name must match
logits_module, loss_module = module_gpt(idx, targets)
assert same_names
assert torch.allclose(logits, logits_module, atol=1e-5)
assert torch.allclose(loss, loss_module, atol=1e-5)
print(f"{len(ours.state_dict())} tensors with the same names; logits equal (atol=1e-5): OK")

# %% [markdown]
# The 53 tensors are the model's 52 parameters (section 7's optimizer finds 18 matrices and 34
# vectors) plus `lm_head.weight`: `state_dict` lists the tied matrix under both of its names,
# `transformer.wte.weight` and `lm_head.weight`, while `parameters()` yields it once.
#
# What `GPTConfig` adds to our version, each a field with a default that gives GPT-2:
# `attention` and `attention_options` (any registered variant, section 9), `positions`
# (`"learned"`, `"sinusoidal"`, or `"rope"`/`"alibi"`, which live in the attention layers, or
# `"none"`; with these three the model has no `wpe`), `mlp="swiglu"`, `norm="rmsnorm"`,
# `norm_position="post"`, `tie_weights=False`, `dropout` and `bias`. Exercise 1 trains the
# combination that LLaMA made common. From here on we use the module.
#
# ## 5. Counting parameters and FLOPs
#
# **Parameters.** A block of width $d$ holds:
#
# | part | weights | biases |
# | --- | --- | --- |
# | `ln_1`, `ln_2` | $2d$ (scales) | $2d$ (shifts) |
# | `attn.c_attn` ($d \to 3d$: q, k, v) | $3d^2$ | $3d$ |
# | `attn.c_proj` ($d \to d$) | $d^2$ | $d$ |
# | `mlp.c_fc` ($d \to 4d$) | $4d^2$ | $4d$ |
# | `mlp.c_proj` ($4d \to d$) | $4d^2$ | $d$ |
#
# that is $12d^2 + 13d$. Around the blocks: `wte` ($V d$, shared with `lm_head`), `wpe`
# ($T_\text{max} d$) and `ln_f` ($2d$). `num_params()` leaves out the position embeddings, as
# nanoGPT does (they are only looked up, never multiplied, so they cost no FLOPs); it keeps the
# token embeddings in, because as `lm_head` they are also the output layer's matrix.

# %%
def hand_count(vocab_size, block_size, n_layer, n_embd):
    d = n_embd
    per_block = 12 * d * d + 13 * d
    return dict(blocks=n_layer * per_block, wte=vocab_size * d, ln_f=2 * d, wpe=block_size * d)


counts = hand_count(65, 64, 4, 128)
print(f"per block {12 * 128**2 + 13 * 128:,}, blocks {counts['blocks']:,}, wte {counts['wte']:,}, "
      f"ln_f {counts['ln_f']}, wpe {counts['wpe']:,}")
total_no_wpe = counts["blocks"] + counts["wte"] + counts["ln_f"]
print(f"hand count without wpe: {total_no_wpe:,}   module.num_params(): {module_gpt.num_params():,}")
print(f"hand count with wpe:    {total_no_wpe + counts['wpe']:,}   "
      f"num_params(non_embedding=False): {module_gpt.num_params(non_embedding=False):,}")
assert module_gpt.num_params() == total_no_wpe
assert module_gpt.num_params(non_embedding=False) == total_no_wpe + counts["wpe"]

# %% [markdown]
# Nearly all of it (98%) is in the blocks' matrices, $12 d^2$ per block; with 65 characters the
# embeddings are small. With GPT-2's 50,257-token vocabulary they are a third of GPT-2 small
# (Exercise 2).
#
# **FLOPs.** A weight matrix of $N_w$ numbers costs $2 N_w$ floating-point operations per token in
# the forward pass (one multiply and one add per weight). The backward pass costs twice that: one
# product for the gradient of the input, one for the gradient of the weight. So training costs
# about $6N$ per token, where $N$ is the number of parameters. Attention adds the products that
# involve no weights: the scores $QK^\top$ and the weighted sum of the values, each
# $2 \cdot T \cdot d$ per token and layer forward for a context of $T$, so $12\, n_\text{layer}\,
# d\, T$ with the backward pass. `flops_per_token()` is that estimate (PaLM's, appendix B).
#
# We can check it: PyTorch's `FlopCounterMode` counts the FLOPs of every matrix product that
# runs. We build the model with `impl="reference"` (the explicit attention math of
# [chapter 2](02_scaled_dot_product_attention.ipynb), so the scores are plain matrix products it can
# see) and count one forward and backward pass.

# %%
from torch.utils.flop_counter import FlopCounterMode

torch.manual_seed(0)
ref_gpt = GPT(dataclasses.replace(model_cfg, attention_options={"impl": "reference"}))
B, T = 2, 64
with FlopCounterMode(display=False) as counter:
    _, loss_ref = ref_gpt(torch.randint(0, 65, (B, T)), torch.randint(0, 65, (B, T)))
    loss_ref.backward()
counted = counter.get_total_flops() // (B * T)
n_vectors = sum(p.numel() for p in ref_gpt.parameters() if p.dim() < 2)  # biases, norms
estimate = ref_gpt.flops_per_token(seq_len=T)
print(f"flops_per_token() estimate: {estimate:,.0f}")
print(f"counted by FlopCounterMode: {counted:,}")
print(f"6 * (N - {n_vectors:,} biases and norm weights) + 12 * n_layer * d * T = "
      f"{6 * (ref_gpt.num_params() - n_vectors) + 12 * 4 * 128 * T:,}")
assert counted == 6 * (ref_gpt.num_params() - n_vectors) + 12 * 4 * 128 * T
assert abs(estimate - counted) / counted < 0.01

# %% [markdown]
# The count is exact once we remember that biases and LayerNorm parameters are not matrices: they
# are in $N$ but cost a handful of additions, not $6$ FLOPs each. The estimate is off by 0.8%.
# (The reference math computes the full $T \times T$ square of scores and masks the future half
# afterwards; the estimate counts that square too, so the two agree on attention.) One training
# step on a batch of 12 sequences of 64 tokens costs $768 \times 5.2$ million $\approx 4$ GFLOP;
# we will see below how long the CPU takes for it.
#
# ## 6. The data: TinyShakespeare, one character per token
#
# TinyShakespeare is about a megabyte of Shakespeare's plays in one text file. We tokenise it by
# character: 65 distinct characters, 65 token ids. ([Chapter 16](16_tokenization.ipynb)'s byte-pair
# encoding would give shorter sequences and a larger vocabulary; characters keep the model small and
# the first results quick, and the same pipeline takes `"gpt2"` or `"minbpe:512"`.)

# %%
from attnbook.data import TokenData, load_text, prepare

text = load_text("tinyshakespeare")
print(f"{len(text):,} characters, {len(set(text))} distinct")
print(text[:150])

# %% [markdown]
# **Cleaning first.** Text gathered from the web arrives with Windows line endings, invisible
# characters (zero-width spaces, byte-order marks), no-break spaces, letters in two Unicode
# spellings (`é` as one code point, or `e` plus a combining accent), and boilerplate repeated on
# every page. Each of these becomes tokens that the model must spend capacity on, and a
# repeated paragraph is a paragraph the model sees several times per epoch and may memorise.
# `attnbook.clean.clean_text` runs the usual steps and counts what each one changed. On a
# made-up scraped page:

# %%
from attnbook.clean import clean_text

footer = ("Sign up for our newsletter to get the latest news, offers and stories delivered to "
          "your inbox every morning.")  # 108 characters
page = (
    "\ufeffCafe\u0301 society\r\n\r\n"  # a byte-order mark; e + a combining accent; CR LF
    "The\u00a0queen\u200b arrived.   \r\n\r\n\r\n\r\n"  # no-break and zero-width spaces
    f"{footer}\r\n\r\nA second story.\r\n\r\n{footer}"  # the footer, twice
)
cleaned, report = clean_text(page)
print(report)
print(repr(cleaned))

# %% [markdown]
# Every count above is one kind of noise removed: the accent merged into `é`, the CR LF endings,
# the invisible byte-order mark and zero-width space, the no-break space, the trailing spaces, a
# run of blank lines, and the second copy of the footer. Paragraphs shorter than
# `min_duplicate_chars` (100 by default) may repeat, since in a play `"ROMEO:\nAy."` is a line,
# not a copy. Near-duplicates, language and quality filters are the next steps of a real
# pipeline and are not done here. TinyShakespeare was cleaned by whoever made it:

# %%
_, shakespeare_report = clean_text(text)
print(shakespeare_report)

# %% [markdown]
# Six characters: two lines ending in spaces and two runs of blank lines (the report counts
# lines and runs; what they removed is six characters), and no repeated
# paragraph of 100 characters or more. The book trains on the file as distributed, so that its
# losses stay comparable with nanoGPT's; `prepare(..., clean=True)` (or `attnbook prepare
# --clean`) cleans before encoding and keeps the report in `meta.json`.

# %% [markdown]
# `prepare` encodes the whole text once and writes the token ids to `train.bin` (the first 90%)
# and `val.bin` (the last 10%), with a `meta.json` that describes the encoding; a second call
# finds the files and returns at once. By default the folder lies in the book's download cache.
# `TokenData` memory-maps the two files (the operating system reads them in as they are used; the
# constructor reads them through once, to check that every id is below `vocab_size`) and draws
# batches: `batch_size` random windows of `block_size + 1` tokens, the first `block_size` as
# inputs `x` and the last `block_size` as targets `y`. Every position of a window is a training
# example: from `x[:t+1]` predict `y[t]`.

# %%
folder = prepare("tinyshakespeare", "char")  # the cache's folder (we do not print its path)
data = TokenData(folder)
enc = data.encoding
print({key: data.meta[key] for key in ("vocab_size", "dtype", "n_train", "n_val")})
print("vocabulary:", repr(enc.to_dict()["chars"]))
print("encode('To be'):", enc.encode("To be"))

batch_gen = torch.Generator().manual_seed(0)
xb, yb = data.get_batch("train", batch_size=4, block_size=64, generator=batch_gen)
print("x, y:", tuple(xb.shape), tuple(yb.shape), xb.dtype)
print("x[0] =", repr(enc.decode(xb[0])))
print("y[0] =", repr(enc.decode(yb[0])))
assert torch.equal(xb[:, 1:], yb[:, :-1])  # the targets are the inputs shifted by one

# %% [markdown]
# ## 7. The training loop, written out
#
# Section 8 trains with `attnbook.train.train`, the loop that the rest of the book and the
# command line use. Before we use it as a black box, we write the loop ourselves, in the pieces
# it is made of: the optimizer, the learning-rate schedule, one step, an evaluation, and the
# loop that calls them. Then we run `train` with the same settings and ask it for the same
# numbers: not roughly the same, the same bits.
#
# The settings live in a `TrainConfig`. It is only a dataclass and does nothing by itself: our
# loop reads its fields, and `train` gets the same object. Twenty steps are enough for the
# comparison (the cell prints how long they took here). We use the model of section 4 and
# batches of 12 windows of 64 characters. The learning rate peaks at 3e-3 after 5 warm-up steps
# and falls toward 3e-4, which it would reach at step 20; steps count from 0 in the schedule
# (the last step of this run is step 19) and from 1 in the logs. After steps 10 and 20 we evaluate on 4 fixed batches per split. The training loss
# is logged at every step (`log_interval=1`), so that each step can be compared. The fields we
# leave at their defaults are printed below.

# %%
from attnbook.train import TrainConfig, load_trained, lr_at, make_optimizer, read_metrics, train

loop_cfg = TrainConfig(
    model=model_cfg, out_dir=str(runs / "loop-check"), batch_size=12, max_iters=20, lr=3e-3,
    min_lr=3e-4, warmup_iters=5, lr_decay_iters=20, eval_interval=10, eval_iters=4,
    log_interval=1, ckpt_interval=20, device="cpu", seed=1337, progress=False,
)
print(f"defaults: weight_decay {loop_cfg.weight_decay}, betas ({loop_cfg.beta1}, "
      f"{loop_cfg.beta2}), grad_clip {loop_cfg.grad_clip}, grad_accum {loop_cfg.grad_accum}, "
      f"dtype {loop_cfg.dtype}")

# %% [markdown]
# **The optimizer.** AdamW is Adam with *decoupled* weight decay. Adam keeps two running
# averages for every parameter. One, $m$, averages the gradient ($\beta_1 = 0.9$: roughly the
# last 10 steps). The other, $v$, averages its square ($\beta_2 = 0.99$: roughly the last 100).
# Each step moves the parameter by $\text{lr} \cdot \hat m / (\sqrt{\hat v} + \epsilon)$, where
# the hats mark the averages corrected for having started at zero. The result is a step of
# about `lr` in every coordinate, whatever the scale of its gradient. Weight decay pulls the
# weights towards zero: with $\lambda$ = `weight_decay`, AdamW multiplies each weight by
# $1 - \text{lr} \cdot \lambda$ at every step, apart from the gradient step. (Adam with an L2 penalty in the loss would pass
# that pull through $\sqrt{\hat v}$ too, so weights with large gradients would hardly decay.)
#
# Only the **matrices** are decayed: the token and position tables and the weights of the
# linear layers. They hold nearly all the parameters, and their size decides how sharp the
# model's function can be. The vectors get no decay: biases and LayerNorm scales and shifts.
# There are few of them, and pulling a LayerNorm's scale towards zero would fight its purpose
# (scale 1 means plain standardisation). The rule is `p.dim() >= 2`, one test that finds every
# matrix of any attention variant without a list of names. AdamW takes *parameter groups*, each
# with its own settings, so this makes two groups with their own `weight_decay`. The learning
# rate is set in both groups at every step by the schedule. `make_optimizer(model, cfg)` in
# `attnbook.train` does exactly this. We write it again, and check that it builds the same two
# groups of the same tensors. We also ask, as `make_optimizer` does on the CPU and on CUDA GPUs,
# for PyTorch's *fused* AdamW. It computes the same update, but in one pass over each tensor's
# memory instead of one pass per arithmetic operation, which makes the step faster. (The
# default kernel rounds a few operations differently, so its weights would drift from ours in
# the last bits, and below we check `train` against our loop bit for bit.)

# %%
def build_optimizer(model, cfg):
    """AdamW with weight decay on the matrices (dim >= 2) only."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied matrix once
    matrices = [p for p in params if p.dim() >= 2]  # embeddings, linear weights
    vectors = [p for p in params if p.dim() < 2]  # biases, LayerNorm scales and shifts
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


torch.manual_seed(0)
probe_model = GPT(model_cfg)  # a model to look at (we train another one below)
ours_opt = build_optimizer(probe_model, loop_cfg)
module_opt = make_optimizer(probe_model, loop_cfg)
for name, group in zip(("decayed", "not decayed"), ours_opt.param_groups, strict=True):
    print(f"{name:>11}: {len(group['params'])} tensors, "
          f"{sum(p.numel() for p in group['params']):>7,} numbers, "
          f"weight_decay {group['weight_decay']}")


def settings(group):  # everything but the tensors: lr, betas, eps, weight_decay, ...
    return {k: v for k, v in group.items() if k != "params"}


same_groups = all(
    [id(p) for p in a["params"]] == [id(p) for p in b["params"]] and settings(a) == settings(b)
    for a, b in zip(ours_opt.param_groups, module_opt.param_groups, strict=True)
)
print("the same groups, with the same settings, as make_optimizer:", same_groups)
assert same_groups

# %% [markdown]
# **The learning-rate schedule** has two phases. At first the weights are random, and Adam's
# $v$ rests on a handful of gradients, so the first steps point in directions it knows poorly.
# A full-size step there can throw the model somewhere it is slow to recover from (Exercise 4
# shows a model that fails without a warm-up). So for $W$ = `warmup_iters` steps the rate
# rises linearly, $\text{lr} \cdot (s + 1) / (W + 1)$ at step $s$. It starts at
# $\text{lr}/(W+1)$, not at 0, because a step at rate 0 would be wasted. Then
# half a cosine takes it from `lr` at step `warmup_iters` down to `min_lr` at
# `lr_decay_iters`. The curve is flat at both ends and steepest in the middle, so the last steps
# are small and careful. After `lr_decay_iters` the rate stays at `min_lr` (section 10's resumed
# run is there). Steps count from 0 here; the step that `train` logs as step 1 ran at rate
# `lr_at(0)`. We write the schedule and compare it with `lr_at` at every step, for our 20 steps
# and for the 400 steps that section 8 runs.

# %%
def lr_schedule(step, cfg):
    """The learning rate of step `step` (from 0): linear warm-up, then cosine decay."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


long_cfg = dataclasses.replace(loop_cfg, max_iters=400, warmup_iters=30, lr_decay_iters=400)
same_lr = all(lr_schedule(s, cfg) == lr_at(s, cfg) for cfg in (loop_cfg, long_cfg)
              for s in range(450))
print("lr_schedule(s) == lr_at(s) at every step s < 450, for both schedules:", same_lr)
print("our run, steps 0, 4, 5, 12, 20:",
      [f"{lr_schedule(s, loop_cfg):.2e}" for s in (0, 4, 5, 12, 20)])
assert same_lr

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.2))
ax0.plot(range(20), [lr_schedule(s, loop_cfg) for s in range(20)], "o-", ms=4)
ax0.set_title("this section: 20 steps (warm-up 5)")
ax1.plot(range(420), [lr_schedule(s, long_cfg) for s in range(420)])
ax1.axvline(30, color="gray", ls=":", lw=1)
ax1.axvline(400, color="gray", ls=":", lw=1)
ax1.set_title("section 8: 400 steps (warm-up 30), then min_lr")
for ax in (ax0, ax1):
    ax.set_xlabel("step (from 0)")
    ax.set_ylabel("learning rate")
fig.tight_layout()
plt.show()

# %% [markdown]
# **One step** takes a batch of inputs `x` and targets `y`, both `(12, 64)`:
#
# 1. Set the learning rate in every parameter group (the optimizer reads it from there at each
#    step).
# 2. Forward: `model(x, y)` returns the logits and the loss, the mean cross-entropy over the
#    $12 \times 64$ predictions.
# 3. Backward: `loss.backward()` adds the gradient of the loss to every parameter's `.grad`.
# 4. Clip: `clip_grad_norm_` treats all the gradients as one long vector. If its length (its L2
#    norm) is above `grad_clip`, every gradient is scaled by
#    $\texttt{grad\_clip}/(\text{norm} + 10^{-6})$, here $1/(\text{norm} + 10^{-6})$. The
#    direction is kept and only the length is cut. Under Adam,
#    rescaling one step's gradient barely changes that step (Adam divides by the gradients'
#    running size anyway); what clipping protects is that running size, $v$, which one huge
#    gradient would inflate for about a hundred steps, shrinking the steps that follow. Early
#    in training the gradients are large and nearly every step is clipped, as the last line of
#    the loop's output (three cells below: "clipped at ... of 20 steps") shows. The function
#    returns the norm from before the clip, which we keep to look at.
# 5. `optimizer.step()`: AdamW updates every parameter from its gradient, as described above.
# 6. `optimizer.zero_grad(set_to_none=True)` drops the gradients. `backward` *adds* into
#    `.grad`, so without this the next step would use the sum of two steps' gradients.
#
# The loss we return is the one from before the update: this batch, under the weights the step
# started from. That is the number `train` logs as the step's `loss`.

# %%
def train_step(model, optimizer, x, y, lr, grad_clip):
    """One optimizer step on the batch (x, y); returns (loss, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr  # 1. this step's learning rate
    _, loss = model(x, y)  # 2. forward: mean cross-entropy over (B, T)
    loss.backward()  # 3. gradients into p.grad
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # 4. clip
    optimizer.step()  # 5. AdamW
    optimizer.zero_grad(set_to_none=True)  # 6. ready for the next backward
    return loss.item(), norm.item()

# %% [markdown]
# **Evaluation on fixed batches.** The loss of one training batch is noisy: 12 windows out of
# a million characters. To see whether the model improves, an evaluation averages the loss over
# `eval_iters` batches of each split. The batches come from a generator that is seeded afresh
# at every evaluation (`seed + 1` for the training split, `seed + 2` for validation). So every
# evaluation sees the same batches, and a change between two evaluations comes from the model,
# not from which windows were drawn. The evaluation needs no gradients (`torch.no_grad()`), and
# it runs in eval mode: `model.eval()` turns dropout off. Our model has no dropout, but a model
# with dropout would otherwise be judged at its noisiest. `model.train()` switches training
# mode back on at the end.
#
# One detail matters for exact agreement. `attnbook.train.evaluate` adds the batch losses in a
# float32 tensor and divides the sum by `eval_iters`. Adding them as Python floats (float64)
# could round differently in the last bits, so we do the same as `evaluate`. Evaluating the
# untrained probe model twice must give the same numbers, close to $\ln 65$.

# %%
@torch.no_grad()
def evaluate_fixed(model, data, cfg):
    """Mean loss over cfg.eval_iters fixed batches of each split: {"train": ..., "val": ...}."""
    model.eval()
    out = {}
    for i, split in enumerate(("train", "val")):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + i)  # the same batches every time
        total = torch.zeros(())  # a float32 sum, as attnbook.train.evaluate keeps it
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, cfg.model.block_size, gen)
            total += model(x, y)[1]
        out[split] = (total / cfg.eval_iters).item()
    model.train()
    return out


first = evaluate_fixed(probe_model, data, loop_cfg)
second = evaluate_fixed(probe_model, data, loop_cfg)
print("the same numbers twice:", first == second)
print("both splits within 0.1 of ln(65) before training:",
      all(abs(v - math.log(65)) < 0.1 for v in first.values()))
assert first == second

# %% [markdown]
# **The loop.** To get `train`'s numbers, the loop must start the way `train` starts:
#
# - `torch.manual_seed(seed)` and then `GPT(cfg.model)`. The initial weights come from torch's
#   global generator, in the order in which the model builds its layers.
# - The optimizer (it draws nothing at random).
# - A generator of its own for the batches, seeded with `seed`. The order of the batches then
#   depends on nothing else: not on how many random numbers the initialisation took, and not on
#   the evaluations, which use generators of their own.
# - `torch.manual_seed(seed + rank)` once more. `train` does this for dropout, which must
#   differ between the processes of a data-parallel run. Here the rank is 0 and there is no
#   dropout, so it changes nothing; we keep it so that the two loops match line for line.
#
# Each step then draws one batch from that generator, calls `train_step` with
# `lr_schedule(step)`, and evaluates after every `eval_interval`-th step and after the last.
# `train` counts steps from 1 once they are done: the `loss` it logs for step 1 is the one that
# `train_step` returned for step 0.
#
# The cell below prints losses and a time, which depend on the machine's arithmetic, so the
# book's tests ignore its output. The asserts check the claims with a margin.

# %% tags=["nbval-ignore-output"]
t0 = time.perf_counter()
torch.manual_seed(loop_cfg.seed)  # the initial weights: torch's global generator
loop_model = GPT(loop_cfg.model)
loop_opt = build_optimizer(loop_model, loop_cfg)
data_gen = torch.Generator().manual_seed(loop_cfg.seed)  # the batches: a generator of their own
torch.manual_seed(loop_cfg.seed + 0)  # as train does, for dropout (rank 0; we have no dropout)
loop_model.train()
loop_losses, loop_norms, loop_evals = [], [], {}
for step in range(loop_cfg.max_iters):
    xs, ys = data.get_batch("train", loop_cfg.batch_size, loop_cfg.model.block_size, data_gen)
    loss_value, norm = train_step(loop_model, loop_opt, xs, ys, lr_schedule(step, loop_cfg),
                                  loop_cfg.grad_clip)
    loop_losses.append(loss_value)
    loop_norms.append(norm)
    done = step + 1  # steps completed, as train counts them
    if done % loop_cfg.eval_interval == 0 or done == loop_cfg.max_iters:
        loop_evals[done] = evaluate_fixed(loop_model, data, loop_cfg)
seconds = time.perf_counter() - t0
print(f"{loop_cfg.max_iters} steps in {seconds:.1f} s; training loss {loop_losses[0]:.3f} at "
      f"step 1, {loop_losses[-1]:.3f} at step {loop_cfg.max_iters}")
for done, losses in loop_evals.items():
    print(f"evaluated after step {done}: train {losses['train']:.3f}, val {losses['val']:.3f}")
print(f"gradient norm before clipping: {loop_norms[0]:.2f} at step 1; clipped at "
      f"{sum(n > loop_cfg.grad_clip for n in loop_norms)} of {loop_cfg.max_iters} steps")
assert abs(loop_losses[0] - math.log(65)) < 0.2
assert loop_losses[-1] < loop_losses[0] - 0.5
assert loop_evals[20]["val"] < loop_evals[10]["val"] < math.log(65)

# %% [markdown]
# **The check.** Now `train` runs with the same `TrainConfig` on the same data, and we read back
# what it recorded. `metrics.jsonl` holds, for each step, its training loss and the learning
# rate that step used. It also holds the evaluated losses after steps 10 and 20. The checkpoint
# written at step 20 holds the final weights. JSON stores a float as the shortest decimal that
# reads back to the same number, so comparing with `==` compares bits. We ask for four
# equalities: the 20 training losses, the 20 learning rates, the two evaluations, and every
# final weight.

# %%
train(loop_cfg, data)
loop_metrics = read_metrics(loop_cfg.out_dir)
step_lines = [m for m in loop_metrics if "loss" in m]
eval_lines = [m for m in loop_metrics if "val_loss" in m]
trained_by_train = load_trained(loop_cfg.out_dir)[0].state_dict()  # the checkpoint of step 20
checks = {
    "training loss of each of the 20 steps": [m["step"] for m in step_lines] == list(range(1, 21))
    and [m["loss"] for m in step_lines] == loop_losses,
    "learning rate of each step": [m["lr"] for m in step_lines]
    == [lr_schedule(s, loop_cfg) for s in range(20)],
    "evaluated losses after steps 10 and 20": loop_evals
    == {m["step"]: {"train": m["train_loss"], "val": m["val_loss"]} for m in eval_lines},
    "every final weight": all(torch.equal(w, loop_model.state_dict()[name])
                              for name, w in trained_by_train.items()),
}
for what, equal in checks.items():
    print(f"{what:>40}, bit for bit: {equal}")
assert all(checks.values())

# %% [markdown]
# All four agree bit for bit, so our loop does everything that `train` does to the weights in
# this run. The two runs start from the same weights, see the same batches in the same order,
# use the same learning rate at every step, and make the same update. Had any detail differed,
# the numbers would have parted from the first step it touched, at the latest in their last
# bits. Decaying the biases and norm weights too, clipping after the optimizer step, or
# shifting the schedule by one step would each break the equality. Averaging the evaluation in
# float64 would break the evaluated losses. One slip would go unnoticed here: drawing the
# batches from torch's global generator. `train` reseeds that generator with the same seed just
# before the loop, and without dropout nothing else draws from it, so it happens to give the
# same batches. With dropout it would not, because the dropout masks would take numbers from
# between the batches.
#
# The check does not cover the parts of `train` that this configuration leaves idle: gradient
# accumulation, mixed precision, data parallelism, `torch.compile`. In this run they are exact
# no-ops, which is why we can ask for equality and not for a tolerance:
#
# - with `grad_accum=1` the loss is divided by 1, and the batch is one micro-batch;
# - with `dtype="float32"` autocast is off, and the disabled `GradScaler` passes the loss and
#   the optimizer step through unchanged;
# - with one process there is no gradient to average across processes.
#
# What `train` adds around the loop is bookkeeping: checkpoints, the metrics file, the progress
# bar, the stop on a non-finite loss, and resuming, which section 10 tests in the same bit-for-bit
# way. The equality holds on one machine with one number of threads. On another machine both
# loops change their last bits together.

# %% [markdown]
# ## 8. Training
#
# `attnbook.train.train(TrainConfig(...))` is the training loop that the rest of the book (and the
# command line) uses: section 7's loop, with checkpoints, metrics and resuming around it. A step
# draws a batch, runs the model forward and backward, clips the gradient's norm to 1, and takes
# an AdamW step. The learning rate rises linearly for `warmup_iters` steps, then follows a
# cosine down to `min_lr` at `lr_decay_iters`. Every `eval_interval` steps it measures the mean
# loss on `eval_iters` fixed batches of each split, so that the validation curve is not just
# noise, and it writes checkpoints into `out_dir`.
#
# The run below is sized for a laptop: the model of section 4 (0.8M parameters), batches of
# 12 × 64 characters, 400 steps at a peak learning rate of 3e-3. A high learning rate is fine
# for a model this small and this short a run; nanoGPT's longer CPU example uses 1e-3. We set
# `device="cpu"` so the notebook behaves the same on a machine with a GPU. Training shows a
# progress bar with the step, the latest loss and, after an evaluation, the validation loss.

# %%
out_dir = runs / "shakespeare-char"
train_cfg = TrainConfig(
    model=model_cfg, out_dir=str(out_dir), data="tinyshakespeare", encoding="char",
    batch_size=12, max_iters=400, lr=3e-3, min_lr=3e-4, warmup_iters=30, lr_decay_iters=400,
    eval_interval=50, eval_iters=8, log_interval=10, ckpt_interval=200,
    device="cpu", seed=1337,
)
print("learning rate at steps 0, 29, 100, 200, 399:",
      [f"{lr_at(s, train_cfg):.2e}" for s in (0, 29, 100, 200, 399)])
tokens_per_step = train_cfg.batch_size * model_cfg.block_size
n_tokens = train_cfg.max_iters * tokens_per_step
print(f"tokens per step: {tokens_per_step}, {train_cfg.max_iters} steps -> {n_tokens:,} tokens "
      f"({n_tokens / data.meta['n_train']:.2f} passes over the training text)")

# %% [markdown]
# Now the run. The cell prints the time it took on the machine that executed this notebook
# (evaluations and checkpoints included), and the speed of a training step (the median of the
# logged steps) in GFLOP/s from section 5's count of FLOPs per token: unlike seconds, a rate in
# GFLOP/s can be compared between models of different sizes, and with the peak rate of a
# processor.

# %% tags=["nbval-ignore-output"]
t0 = time.perf_counter()
result = train(train_cfg, data)
seconds = time.perf_counter() - t0
# the median training step, evaluations not included
step_ms = statistics.median(m["ms_per_iter"] for m in read_metrics(out_dir) if "ms_per_iter" in m)
flops = module_gpt.flops_per_token() * tokens_per_step  # one training step's FLOPs
print(f"{result.step} steps ({result.stopped}) in {seconds:.1f} s on {torch.get_num_threads()} "
      f"threads: {step_ms:.0f} ms per step, {flops / step_ms / 1e6:.0f} GFLOP/s")
print(f"best validation loss: {result.best_val_loss:.4f}")
assert result.step == 400 and result.stopped == "max_iters"
assert result.best_val_loss < 2.35, "400 steps should take the model below the bigram level"

# %% [markdown]
# On a machine shared with other work, the wall time can be far above 400 times the median step:
# the median ignores the steps that waited for a processor, and the evaluations and checkpoints
# come on top.
#
# The run wrote, into `out_dir`, its configuration (`config.json`), its metrics
# (`metrics.jsonl`, one JSON object per line) and checkpoints. `read_metrics` returns the metric
# lines as dictionaries: every 10 steps the training loss of that step's batch (with the learning
# rate and the speed), and every 50 steps the evaluated losses of both splits.
#
# Two reference levels help to read the curve. A model that ignores the context and knows only
# how often each character occurs can reach the **unigram** entropy of the text; one that
# predicts each character from the one before it, the **bigram** conditional entropy. We compute
# both from the training tokens by counting (an exact count on the training text, so a slight
# flattery of what a model could reach on unseen text).

# %%
train_ids = torch.from_numpy(data.tokens["train"].astype("int64"))  # (n_train,)
pairs = torch.zeros(65, 65, dtype=torch.float64)  # pairs[a, b]: how often b follows a
ones = torch.ones(len(train_ids) - 1, dtype=torch.float64)
pairs.index_put_((train_ids[:-1], train_ids[1:]), ones, accumulate=True)
p_first = pairs.sum(1) / pairs.sum()  # frequency of each character
p_next = pairs / pairs.sum(1, keepdim=True).clamp(min=1)  # P(b | a)
unigram = torch.special.entr(p_first).sum().item()
bigram = (p_first[:, None] * torch.special.entr(p_next)).sum().item()
print(f"uniform {math.log(65):.3f}, unigram {unigram:.3f}, bigram {bigram:.3f} nats per character")

# %%
metrics = read_metrics(out_dir)
logged = [m for m in metrics if "loss" in m]
evals = [m for m in metrics if "val_loss" in m]
print(f"{len(logged)} training-loss lines, {len(evals)} evaluations, keys:",
      sorted(logged[0]), sorted(evals[0]))

fig, ax = plt.subplots(figsize=(10, 4))
ax.plot([m["step"] for m in logged], [m["loss"] for m in logged], color="C0", alpha=0.5,
        label="training loss (one batch)")
ax.plot([m["step"] for m in evals], [m["train_loss"] for m in evals], "s-", color="C0", ms=8,
        mfc="none", label="train split (8 fixed batches)")
ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", color="C3",
        label="validation split (8 fixed batches)")
for level, name, style in ((math.log(65), "uniform guess", ":"), (unigram, "unigram", "--"),
                           (bigram, "bigram", "-.")):
    ax.axhline(level, color="gray", ls=style, lw=1, label=f"{name} level, {level:.2f}")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats per character)")
ax.set_title("A 4-block GPT learning TinyShakespeare, character by character")
ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
fig.tight_layout()
plt.show()

# %% tags=["nbval-ignore-output"]
print("training loss (one batch) at the first logged steps:",
      ", ".join(f"{m['step']}: {m['loss']:.2f}" for m in logged[:3]))
print("evaluated losses (step: train / val):")
for m in evals:
    print(f"  {m['step']:>4}: {m['train_loss']:.3f} / {m['val_loss']:.3f}")
assert logged[1]["loss"] < unigram  # past the unigram level by step 20
assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
assert abs(evals[-1]["val_loss"] - evals[-1]["train_loss"]) < 0.15, "no overfitting yet"

# %% [markdown]
# How to read the curve: the loss starts at $\ln 65 \approx 4.17$, and the first logged point,
# step 10, is already at 3.40, close to the unigram level, 3.31 (spaces and `e` are common, `Z`
# is not); by step 20 (2.89) it is past it. Then comes a slower stretch towards the bigram
# level, 2.45 (after `q` comes `u`, after a newline a capital). Below that the
# model must use the longer context — which letters make up a word, that a name in
# capitals ends with a colon and a newline — and that is where attention starts to earn its keep.
# The train and validation losses (squares and dots) stay together: 400 steps of 768 characters
# see the training text a third of a time, far from memorising it.
#
# A loss is a number; a sample shows what it means. `train` returned a summary (`result`), not the
# model: the trained weights are in the checkpoint it wrote last, and `load_trained(out_dir)` builds
# the model back from it, in eval mode (section 11 looks at what else it returns). `generate` then
# samples one character at a time. Two knobs shape the sampling: `temperature=0.8` divides the
# logits by 0.8 before the softmax, sharpening the distribution a little, and `top_k=10` forbids
# every character outside the ten most likely; both cut the long tail of unlikely characters that
# makes samples noisy (Exercise 3 measures them).
#
# The model reads at most 64 characters, and `generate`'s KV cache ([chapter 7](07_kv_cache.ipynb))
# holds at most `block_size` positions, so for a sample of 300 characters we pass `use_cache=False`:
# every step then runs the model on the last 64 characters, a sliding window over the text.

# %% tags=["nbval-ignore-output"]
trained, _, _ = load_trained(out_dir)  # the model; its TrainConfig and data description
prompt = torch.tensor([enc.encode("ROMEO:\n")])  # (1, 7)
sample_gen = torch.Generator().manual_seed(42)
out = trained.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=10,
                       use_cache=False, generator=sample_gen)
print(enc.decode(out[0]))
assert out.shape == (1, 7 + 300)

# %% [markdown]
# After 400 steps the model has learnt the *look* of the text: groups of letters of a word's
# length between spaces, the commonest short words ("the", "my", "that"), capitals at the start
# of lines, commas and full stops, and among many near-misses a few real words. Spelling takes
# longer, and meaning far more training and a larger model;
# `python -m attnbook.train` (end of section 11) runs nanoGPT's longer CPU example.
#
# ## 9. Switching the attention variant by name
#
# Nothing in `GPT` knows which attention it holds: the block asks the registry for
# `config.attention` and passes `config.attention_options` on to the variant, which declares them
# in its own file (gqa's `n_kv_head`, local's `window`, ...; an option the variant does not know
# is refused when the config is built, with the list of those it does). So each variant of this
# book is a one-field change of the same configuration. Each of them also brings its own cache:
# `model.new_caches(batch_size, max_len)` asks every layer for an empty one.
# The loop below builds the model of section 4 with each variant and measures, without
# special-casing any, its parameters and the bytes of its caches for one sequence of 32 and of
# 64 positions (fp32). The difference between the two says how the cache grows with the context.
# The options are small so that each pattern matters within 64 positions: a window of 16
# positions (`local`), blocks of 16 (`sparse`), chunks of 16 (`linear`).

# %%
variant_options = {
    "mha": {},
    "gqa": {"n_kv_head": 2},
    "mqa": {},
    "local": {"window": 16},
    "sparse": {"sparse_block": 16, "n_global_blocks": 1, "n_window_blocks": 1, "n_random_blocks": 1},
    "linear": {"linear_chunk": 16},
    "mla": {"kv_lora_rank": 64},
}
assert set(variant_options) <= set(available())


def cache_bytes(model, length):
    return sum(cache.nbytes for cache in model.new_caches(batch_size=1, max_len=length))


print(f"{'variant':>7} {'cache kind':>20} {'parameters':>10} {'cache at 32':>11} "
      f"{'cache at 64':>11} {'bytes per added token':>21}")
variant_cfgs = {}
for name, options in variant_options.items():
    cfg = dataclasses.replace(model_cfg, attention=name, attention_options=options)
    variant_cfgs[name] = cfg
    torch.manual_seed(0)
    m = GPT(cfg)
    at_32, at_64 = cache_bytes(m, 32), cache_bytes(m, 64)
    kind = type(m.new_caches(1)[0]).__name__
    print(f"{name:>7} {kind:>20} {m.num_params():>10,} {at_32:>11,} {at_64:>11,} "
          f"{(at_64 - at_32) // 32:>21,}")

# %% [markdown]
# What the table says, variant by variant (chapters 4 and 7 to 13 explain each):
#
# - **mha, gqa, mqa** grow their cache by `2 × n_layer × n_kv_head × head_dim × 4` bytes per token:
#   4,096 with 4 key/value heads, half with 2, a quarter with 1. Sharing heads also removes
#   parameters from the key and value projections.
# - **local** keeps a rolling window of 16 positions: its cache stops growing once it is full, so
#   a longer context costs nothing more. Its parameters are MHA's: only the mask differs.
# - **sparse** has MHA's projections and MHA's full cache; its saving is in the work of the
#   attention itself, not in memory.
# - **linear** keeps a recurrent state of fixed size, whatever the length: zero bytes per added
#   token. The state is as large as about 16 positions of MHA's cache, so it costs more than a KV
#   cache for very short sequences and far less for long ones (at 1,024 tokens, 62 times less).
# - **mla** caches one latent vector of 64 numbers per token and layer, plus a small key of 16
#   numbers shared by the heads (the decoupled part that RoPE rotates when `positions="rope"`, [chapter
#   13](13_latent_attention.ipynb); with this model's learned positions nothing rotates it),
#   instead of 256 for keys and values, at the price of extra projections: $(64 + 16) \times 4$
#   layers $\times$ 4 bytes = 1,280 bytes per token.
#
# The same switch works for training. As a check that each variant really trains, not only
# builds, we run every one for 10 steps (the loss must fall from about 4.17) — far too short to
# compare them; [chapter 18](18_comparing_variants.ipynb) trains them all under identical
# conditions. Three warm-up steps to a peak of 3e-3 is aggressive, and a loss can jump for a
# step or two in the middle of such a run (above $\ln 65 \approx 4.17$ even); only the two ends
# matter here.

# %% tags=["nbval-ignore-output"]
short = dict(max_iters=10, warmup_iters=3, lr_decay_iters=10, eval_interval=10, eval_iters=2,
             log_interval=1, ckpt_interval=10, progress=False)
print(f"{'variant':>7} {'loss at step 1':>14} {'loss at step 10':>15} {'seconds':>7}")
for name, cfg in variant_cfgs.items():
    run_cfg = dataclasses.replace(train_cfg, model=cfg, out_dir=str(runs / f"short-{name}"),
                                  **short)
    t0 = time.perf_counter()
    train(run_cfg, data)
    dt = time.perf_counter() - t0
    losses = [m["loss"] for m in read_metrics(run_cfg.out_dir) if "loss" in m]
    print(f"{name:>7} {losses[0]:>14.3f} {losses[-1]:>15.3f} {dt:>7.1f}")
    assert losses[-1] < losses[0] - 0.3, f"{name} did not learn in 10 steps"

# %% [markdown]
# The seconds column is not a speed comparison. At 64 positions every variant's attention is a
# small part of a step, and `sparse`, `linear` and `mla` add work there (a block mask, a chunked
# recurrence, extra projections) whose savings only show at long contexts;
# [chapter 18](18_comparing_variants.ipynb) measures speed and memory where they do.
#
# The command line takes the same fields as flags, and each variant's options as flags of their
# own (named as the variant names them; `--attention_options '{"n_kv_head": 2}'` is the same in
# JSON). `--run_name gqa-2` trains in the folder `runs/gqa-2`, and a second call with the same
# name resumes there:
#
# ```
# attnbook train --attention gqa --n_kv_head 2 --positions rope --run_name gqa-2
# ```
#
# ## 10. Resuming a run
#
# A long run gets interrupted: a laptop sleeps, a job hits its time limit. `train` writes a
# checkpoint every `ckpt_interval` steps, at every evaluation that improves the validation loss,
# and at the end: a folder `checkpoints/step_NNNNNNN/` with the weights (`model.safetensors`)
# and `state.pt`, which holds the optimizer's moments, the step, the random generators' states and
# the configuration. The last `keep_last` checkpoints (2 by default) are kept, and the best
# one. Calling `train` again with the same `out_dir` finds the newest checkpoint and continues
# from it.
#
# Our run ended at step 400. We call `train` again with `max_iters=420`: it must start at step
# 401, not at 1. The learning-rate schedule was planned to end at step 400, so the extra steps
# run at `min_lr`; to plan a longer run from the start, set `lr_decay_iters` to its last step.

# %%
from attnbook.train import checkpoint_dirs

print("newest checkpoint before:", checkpoint_dirs(out_dir)[-1].name)
longer_cfg = dataclasses.replace(train_cfg, max_iters=420)
resumed = train(longer_cfg, data)
steps_logged = [m["step"] for m in read_metrics(out_dir) if "loss" in m]
print("reached step:", resumed.step)
print("training-loss lines, last five steps:", steps_logged[-5:])
every_tenth_once = steps_logged == list(range(10, 421, 10))
print("one line per logged step, no restart from step 1:", every_tenth_once)
print("newest checkpoint after: ", checkpoint_dirs(out_dir)[-1].name)
assert resumed.step == 420 and every_tenth_once

# %% [markdown]
# The metrics file holds one line per logged step, from 10 to 420, with no second step 10: the
# second call resumed at step 401. A run that is killed rather than finished has usually logged
# a few steps past its last checkpoint: say it died at step 330, and its last checkpoint is from
# step 300. The resumed run then starts at step 301, drops the lines of steps 310 to 330, and
# logs them again as it redoes those steps, so the file never holds a step twice.
#
# "Continues from the checkpoint" can mean something weaker than it should. A resumed run is
# *exactly* the run that never stopped only if everything that shapes the future is restored:
# the weights, AdamW's running averages, the step (for the learning rate), and the state of the
# random generator that draws the batches. Let us test that claim on a tiny model, cheaply: one
# run of 20 steps, and one of 10 steps that is then resumed to 20. On the same machine they must
# agree bit for bit.

# %%
from attnbook.train import load_checkpoint

tiny_cfg = dataclasses.replace(
    train_cfg, model=GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32),
    max_iters=20, warmup_iters=5, lr_decay_iters=20, eval_interval=10, eval_iters=2,
    log_interval=1, ckpt_interval=10, progress=False,
)
train(dataclasses.replace(tiny_cfg, out_dir=str(runs / "straight")), data)
train(dataclasses.replace(tiny_cfg, out_dir=str(runs / "stopped"), max_iters=10), data)
train(dataclasses.replace(tiny_cfg, out_dir=str(runs / "stopped")), data)  # resumes at 11


def losses_and_weights(folder):
    losses = [m["loss"] for m in read_metrics(folder) if "loss" in m]
    model = GPT(tiny_cfg.model)
    load_checkpoint(checkpoint_dirs(folder)[-1], model)
    return losses, model.state_dict()


losses_a, weights_a = losses_and_weights(runs / "straight")
losses_b, weights_b = losses_and_weights(runs / "stopped")
print("20 training losses identical:", len(losses_a) == 20 and losses_a == losses_b)
print("final weights identical:", all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a))

# %% [markdown]
# ## 11. Loading a checkpoint and generating
#
# A trained run is a folder. `load_trained(out_dir)` reads its newest checkpoint (or, with
# `best=True`, the one with the lowest validation loss) and returns the model in eval mode, the
# `TrainConfig` it was trained with, and a description of its data (the prepared folder's
# `meta.json`, copied into every checkpoint), whose `"encoding"` entry rebuilds the tokenizer — so
# the run's folder alone is enough to turn ids back into text.

# %%
from attnbook.data import Encoding

model, cfg_loaded, meta_loaded = load_trained(out_dir)
encoding = Encoding.from_dict(meta_loaded["encoding"])
print("model:", type(model).__name__, "| eval mode:", not model.training,
      "| attention:", cfg_loaded.model.attention, "| layers:", cfg_loaded.model.n_layer,
      "| encoding:", encoding)
print(f"parameters: {model.num_params():,}, trained for {cfg_loaded.max_iters} steps")

# %% [markdown]
# Two samples from the resumed model, now with the KV cache on (`use_cache=True`, the default):
# the prompt and the new tokens must fit in `block_size = 64` positions, and each new token costs
# one cached step instead of a pass over the whole context. The `generator` makes the draws
# repeatable on one machine.

# %% tags=["nbval-ignore-output"]
prompts = ["KING RICHARD:\n", "Good morrow, "]
gen = torch.Generator().manual_seed(7)
for p in prompts:
    ids = torch.tensor([encoding.encode(p)])
    out = model.generate(ids, max_new_tokens=64 - ids.shape[1], temperature=0.8, top_k=10,
                         generator=gen)
    print(encoding.decode(out[0]))
    print("-" * 40)
    assert out.shape[1] == 64

# %% [markdown]
# **From the command line.** Training and sampling have commands: `attnbook train --help` lists
# one flag per field of `TrainConfig` and `GPTConfig` (all but `vocab_size`, which comes from
# the data). For instance
#
# ```
# python -m attnbook.train --max_iters 2000 --out_dir runs/shakespeare-char
# attnbook generate --out_dir runs/shakespeare-char --prompt "ROMEO:" --max_new_tokens 300
# ```
#
# trains nanoGPT's CPU example (the defaults of `TrainConfig`: this chapter's model, 2000
# steps at 1e-3) in a few minutes on a laptop and samples from it; run it again with a larger
# `--max_iters` and it resumes. Longer runs belong in a terminal, not in a notebook.

# %% [markdown]
# ## 12. Fine-tuning on another corpus
#
# Training from random weights is the expensive part. Fine-tuning starts from a trained model
# instead and continues training on the text we care about, often a small one. Our run's last
# 10% of TinyShakespeare was its validation split, and it ends with the first scenes of *The
# Tempest*: Prospero, Miranda, Ariel and Caliban never appeared in the text the model trained
# on. We cut the play out as a corpus of its own.

# %%
tempest_text = text[text.index("\n\nMaster:\nBoatswain!") + 2 :]
tempest_file = runs / "tempest.txt"
tempest_file.write_text(tempest_text, encoding="utf-8")
print(f"{len(tempest_text):,} characters, from {tempest_text[:30]!r}")
print("in the pretraining split:", tempest_text[:200] in text[: data.meta["n_train"]])

# %% [markdown]
# **The same ids.** A `"char"` encoding built from the play alone would number only the
# characters the play uses, so its ids would name other letters than the ones the model learned:
# the model would read nonsense and say nothing about it. The new corpus must be encoded with the
# run's own encoding, which `load_trained` returns with the model. (`attnbook train --init_from
# runs/NAME --data tempest.txt` does this itself, and refuses a corpus with a character the
# run's vocabulary lacks.)

# %%
from attnbook.data import get_encoding
from attnbook.train import evaluate

pretrained, _, pretrained_meta = load_trained(out_dir)
run_encoding = Encoding.from_dict(pretrained_meta["encoding"])
own = get_encoding("char", tempest_text)
print(f"the play's own vocabulary: {own.vocab_size} characters; the run's: "
      f"{run_encoding.vocab_size}")
print("'Miranda' as the run reads it:", run_encoding.encode("Miranda"))
print("'Miranda' in the play's own ids:", own.encode("Miranda"))
tempest = TokenData(prepare(str(tempest_file), run_encoding, out_dir=runs / "tempest-char"))
print({key: tempest.meta[key] for key in ("vocab_size", "n_train", "n_val")})

# %% [markdown]
# Two runs of the same 60 steps on the same batches of the play, each at a learning rate suited
# to its start: one starts from the pretrained weights (`init_from`) at a lower learning rate, 1e-3 without warm-up, so as not to
# wreck what the model knows; the other starts from random weights at section 8's peak rate,
# 3e-3, with a warm-up of 10 steps and the cosine down to 3e-4 at step 60 (the end of the run).
# We measure both on the play's validation split, and the pretrained model before any
# fine-tuning.

# %% tags=["nbval-ignore-output"]
ft_steps = 60
ft_common = dict(data=str(tempest_file), max_iters=ft_steps, lr_decay_iters=ft_steps,
                 eval_interval=15, ckpt_interval=ft_steps, progress=False)  # fmt: skip
ft_runs = {
    "fine-tuned": dataclasses.replace(train_cfg, out_dir=str(runs / "fine-tuned"),
                                      init_from=str(out_dir), lr=1e-3, min_lr=1e-4,
                                      warmup_iters=0, **ft_common),
    "from scratch": dataclasses.replace(train_cfg, out_dir=str(runs / "scratch"),
                                        warmup_iters=10, **ft_common),
}  # fmt: skip
before = evaluate(pretrained, tempest, ft_runs["fine-tuned"], torch.device("cpu"))["val"]
ft_curves = {}
for name, cfg in ft_runs.items():
    train(cfg, tempest)
    ft_curves[name] = [(m["step"], m["val_loss"]) for m in read_metrics(cfg.out_dir)
                       if "val_loss" in m]  # fmt: skip
print(f"pretrained, before fine-tuning: validation loss on the play {before:.3f}")
for name, curve in ft_curves.items():
    print(f"{name:>12} after {ft_steps} steps: {curve[-1][1]:.3f}   (curve: "
          + ", ".join(f"{step}: {loss:.3f}" for step, loss in curve) + ")")
assert ft_curves["fine-tuned"][-1][1] < before < ft_curves["from scratch"][-1][1]

# %% tags=["nbval-ignore-output"]
fig, ax = plt.subplots(figsize=(6.5, 3.4))
ax.axhline(before, color="gray", ls=":", label="pretrained, before fine-tuning")
for name, curve in ft_curves.items():
    steps, losses = zip(*curve, strict=True)  # [(step, loss), ...] -> steps, losses
    ax.plot(steps, losses, marker="o", label=name)
ax.set_xlabel("steps on The Tempest")
ax.set_ylabel("validation loss on the play (nats)")
ax.set_title("Sixty steps on a new corpus, from pretrained or random weights")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# This run printed 2.321 nats before fine-tuning, 2.161 after 60 steps on the play, and 2.597
# for the model trained from scratch for the same 60 steps (your last digits may differ; the
# cell asserts the order). Before any fine-tuning the pretrained model already scores better
# on a play it never saw than the model from scratch does after 60 steps: it knows English
# spelling, verse and the `NAME:` layout of a speech. Sixty steps on the play lower its loss
# further, by learning the play's own names and words, while the model from random weights is
# still learning which characters follow which. The gap is the point of pretraining: the
# general knowledge is paid for once, and each new corpus needs only a little training. Sixty
# steps of 12 × 64 characters are about one and a half passes over the play's 31,189 training
# characters; trained much longer, a model memorises a corpus this small, which its validation
# curve shows as a loss that rises again.

# %% [markdown]
# ## Check against the module
#
# Section 4 compared our `NotebookGPT` with `attnbook.model.GPT` at initialisation. That test
# is weaker than it looks: at initialisation every LayerNorm has scale 1 and shift 0, so all of
# them compute the same function, and every bias is 0. A block that fed `ln_2` to the attention
# and `ln_1` to the MLP would pass it. Trained weights have no such symmetries: every norm and
# bias has learnt its own values. We copy the weights of `model`, the checkpoint that section 11
# loaded (the resumed run, step 420), into a fresh `NotebookGPT` and compare logits and loss on
# a validation batch.

# %%
ours_trained = NotebookGPT(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
ours_trained.load_state_dict(model.state_dict())
xv, yv = data.get_batch("val", batch_size=8, block_size=64,
                        generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    logits_ours, loss_ours = ours_trained(xv, yv)
    logits_mod, loss_mod = model(xv, yv)
assert torch.allclose(logits_ours, logits_mod, atol=1e-5)
assert torch.allclose(loss_ours, loss_mod, atol=1e-5)
assert loss_mod < 2.6  # and it is a trained model
print("NotebookGPT with the trained weights == attnbook.model.GPT: logits within atol=1e-5, OK")

# %%
workdir.cleanup()  # delete every run of this chapter
print("temporary runs deleted:", not runs.exists())

# %% [markdown]
# ## Summary
#
# - A GPT is token and position embeddings, a stack of pre-norm blocks — `x + attn(ln_1(x))`,
#   `x + mlp(ln_2(x))` — a final LayerNorm and an output layer tied to the token embeddings.
#   `attnbook.model.GPT(GPTConfig(...))` is exactly that, with switches for positions, MLP,
#   norm, norm position, tying and the attention variant.
# - GPT-2 initialises weights at 0.02 and the output projections of the residual branches at
#   $0.02/\sqrt{2 n_\text{layer}}$: without the scaling, the residual stream grows like
#   $\sqrt{n_\text{layer}}$ and buries the embeddings under noise at initialisation.
# - A block has $12d^2 + 13d$ parameters; training costs about $6N + 12\, n_\text{layer}\, d\, T$
#   FLOPs per token, exactly $6$ per matrix weight plus the attention scores.
# - A training loop is a few pieces. AdamW decays the matrices only. The learning rate warms up
#   linearly and then decays along a cosine. A step runs forward and backward, clips the
#   gradient norm, updates the weights and zeroes the gradients. An evaluation averages the loss
#   over fixed batches. Written in the notebook with the same seeds, generators and order of
#   operations, the loop reproduces `train`'s losses and weights bit for bit.
# - `prepare` encodes a corpus once, `TokenData` draws random windows, `train(TrainConfig(...))`
#   trains with warm-up and cosine decay, evaluates, checkpoints and logs metrics;
#   `read_metrics` returns them. 400 steps on a CPU take TinyShakespeare from
#   4.17 nats per character to below the bigram level.
# - The attention variant is one field, `attention`, plus its `attention_options`; each variant
#   brings its own cache through `new_caches`.
# - `clean_text` removes what scraped text carries (Unicode spellings, invisible characters,
#   repeated paragraphs) and counts it; TinyShakespeare needed six characters removed.
# - Fine-tuning starts from a trained run (`init_from`) and encodes the new corpus with the run's
#   own vocabulary; on *The Tempest*, held out from pretraining, it beats training from scratch
#   for the same steps by a wide margin (section 12's printed losses).
# - A run resumes from its newest checkpoint, bit for bit as if it had not stopped;
#   `load_trained` returns the model, its configuration and its data's description (with the
#   encoding), ready to `generate` and decode.

# %% [markdown]
# ## Further reading
#
# - Radford et al., *Language Models are Unsupervised Multitask Learners* (2019): GPT-2, the model
#   assembled here.
# - Loshchilov and Hutter, *Decoupled Weight Decay Regularization* (ICLR 2019): AdamW.
# - Xiong et al., *On Layer Normalization in the Transformer Architecture* (ICML 2020): pre-norm
#   against post-norm.
# - Shazeer, *GLU Variants Improve Transformer* (2020), and Zhang and Sennrich, *Root Mean Square
#   Layer Normalization* (NeurIPS 2019): SwiGLU and RMSNorm.
# - Howard and Ruder, *Universal Language Model Fine-tuning for Text Classification* (ACL 2018),
#   and Gururangan et al., *Don't Stop Pretraining: Adapt Language Models to Domains and Tasks*
#   (ACL 2020): fine-tuning a pretrained language model on the text of a new domain.
# - Lee et al., *Deduplicating Training Data Makes Language Models Better* (ACL 2022): what
#   repeated text does to training, and exact and near-duplicate removal.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/17_training_a_gpt_solutions.ipynb`](solutions/17_training_a_gpt_solutions.ipynb). Keep
# every run tiny (a few hundred steps of a small model): the point is the comparison, not the final
# loss.
#
# 1. **LLaMA-style against GPT-2-style.** LLaMA replaced three parts of GPT-2's block: SwiGLU
#    instead of the GELU MLP, RMSNorm instead of LayerNorm, RoPE instead of learned positions
#    (and no biases). Build both with `GPTConfig` (`mlp="swiglu", norm="rmsnorm",
#    positions="rope", bias=False`) at 2 blocks of width 64, and predict the difference in
#    parameter count before you print it (where do the parameters go, and where do they come
#    from?). Then train both for the same 200 steps and compare the validation loss. Is the
#    difference larger than what changing the seed alone does?
# 2. **Weight tying.** Predict how many parameters `tie_weights=False` adds to this chapter's
#    model, and to GPT-2 small (`vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
#    n_embd=768`), and what share of GPT-2's parameters the token embeddings are. Check with
#    `num_params()` (build GPT-2 on PyTorch's `meta` device: shapes without memory). Does a tied
#    model's `state_dict` store the matrix twice, and does its checkpoint?
# 3. **Temperature, top-k, top-p.** Train a small model (or reuse one from Exercise 1). For a
#    sample generated at temperature 0.5, 0.8, 1.0 and 1.5, and with `top_k=5` and `top_p=0.9` at
#    temperature 1, measure the average entropy (in bits) of the distribution each character was
#    actually drawn from. Predict the order first. What entropy does `top_k=1` give, and which
#    other setting of `generate` produces exactly the same text?
# 4. **Post-norm without warm-up.** Train a 6-block, width-64 model (a context of 32 is enough)
#    for 200 steps at a learning rate of 3e-3 three times: pre-norm without warm-up, post-norm
#    (`norm_position="post"`) without warm-up, and post-norm with the learning rate warmed up
#    over the whole run (`warmup_iters=200`). Predict which one fails, then explain what the
#    warm-up changes. What does the failed model predict?
