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
# # Chapter 7 — The KV cache: generation without recomputation
#
# A language model writes one token at a time. To produce token $t+1$ it runs on tokens
# $0 \ldots t$ and reads the prediction at the last position; then it appends the new token and
# does it all again. Written naively, every step pushes the *whole* sequence through every layer,
# although only one position is new. This chapter finds out exactly what is recomputed, keeps the
# part that can be kept — the keys and values of every layer — in a **KV cache**, and shows that
# generation with the cache gives the same tokens as generation without it, only faster.
#
# Along the way we meet the one place where caching is easy to get wrong (the causal mask must be
# aligned differently when there are fewer queries than keys), measure the time per token with and
# without the cache, and check [chapter 4](04_mqa_gqa.ipynb)'s formula for the memory a cache takes,
# for multi-head, grouped-query and multi-query attention, on our toy model and on a
# 7-billion-parameter one.
#
# **Learning goals**
#
# - Say what a generation step without a cache recomputes, and why the keys and values of earlier
#   positions never change (causality), so they can be stored instead.
# - Build a KV cache twice: a growing one (`torch.cat`) and a preallocated one with a maximum
#   length, a clear overflow error and `reset()`, the design of `attnbook.kv_cache.KVCache`.
# - Explain why cached decoding needs a *bottom-right* aligned causal mask, and show the wrong
#   output that `is_causal=True` (top-left) gives.
# - Decode greedily with and without a cache and get identical tokens, with RoPE (the rotation
#   starts at `cache.length`) and with learned positions (the embedding does).
# - Prefill a prompt at once or in chunks, with the same result.
# - Check that the chapter's hand-written model computes, bit for bit, what the package's
#   `attnbook.model.GPT` computes, cached or not, and see why the later chapters re-initialise a
#   random `GPT` before testing a cache on it.
# - Measure time per generated token against position, and explain why the speed-up is far
#   smaller than the work saved; check the cache's memory for MHA, GQA and MQA against
#   [chapter 4](04_mqa_gqa.ipynb)'s formula, per token and at 4k tokens.

# %% [markdown]
# ## Setup
#
# We seed every random draw and print shapes, integers, booleans and rounded numbers only;
# timings appear only in cells whose output the book's tests ignore (they assert instead).

# %%
import copy
import time
from contextlib import contextmanager

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from attnbook.attention import AttentionConfig, build_attention, causal_mask, sdpa
from attnbook.mlp import MLP
from attnbook.positions import PositionalEmbedding

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. A tiny language model to generate with
#
# The package has a documented language model, `attnbook.model.GPT`, but here we assemble a
# **minimal causal language model** by hand, so that every place a cache passes through is in
# view; section 9 checks that it computes exactly what `GPT` computes, bit for bit, and the later
# chapters use `GPT`. It has the usual shape:
#
# - a token embedding (`wte`), plus learned position vectors (`wpe`) when `positions="learned"`;
# - `n_layer` pre-norm blocks, each `x + attn(ln_1(x))` then `x + mlp(ln_2(x))`, with the
#   attention built by name from `attnbook` (`"mha"`, `"gqa"`, `"mqa"`);
# - a final LayerNorm and a linear head giving one logit per vocabulary entry.
#
# Its weights stay random. A trained model would write nicer text, but caching is a question of
# arithmetic, not of meaning: a cache is correct when it reproduces the outputs of the full
# computation, whatever the weights are. Random weights are enough to test that, and to time it.
#
# One argument of the forward pass is the subject of this chapter: `caches`, one cache per layer
# (each attention layer accepts its own through `cache=`). From them the model reads `start`, the
# position of the first token it is given: with learned positions the model itself adds the
# position vectors, so it must know where the tokens sit in the sequence; with RoPE the attention
# layers rotate queries and keys, and read the position from their cache themselves.

# %%
class Block(nn.Module):
    """Pre-norm transformer block: attention, then MLP, each added to the residual stream."""

    def __init__(self, attention, cfg, options):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = build_attention(attention, cfg, **options)  # e.g. gqa's n_kv_head (section 8)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd)

    def forward(self, x, cache=None, attn_mask=None):  # x: (B, T, n_embd)
        # attn_mask is passed through for exercise 1's padding masks
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, cache=cache)
        return x + self.mlp(self.ln_2(x))  # (B, T, n_embd)


class TinyLM(nn.Module):
    """A minimal causal LM for this chapter: embeddings, n_layer blocks, LM head. Random weights."""

    def __init__(self, attention="mha", positions="rope", vocab_size=256, n_embd=128, n_head=4,
                 n_layer=4, block_size=512, impl="sdpa", **options):
        # impl: "sdpa" or "reference" (exercise 4 counts FLOPs on the explicit math);
        # options: a variant's own arguments, passed to every attention layer
        super().__init__()
        self.cfg = AttentionConfig(n_embd=n_embd, n_head=n_head, block_size=block_size,
                                   positions=positions, impl=impl)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = None  # RoPE (or no positions): the attention layers handle positions
        if positions == "learned":
            self.wpe = PositionalEmbedding("learned", block_size, n_embd)
        self.blocks = nn.ModuleList(Block(attention, self.cfg, options) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def embed(self, idx, start=0):  # idx: (B, T) token ids at positions start .. start+T-1
        x = self.wte(idx)  # (B, T, n_embd)
        if self.wpe is not None:
            x = x + self.wpe(idx.shape[1], start)  # (T, n_embd), broadcast over the batch
        return x

    def forward(self, idx, caches=None, attn_mask=None):
        start = 0 if caches is None else caches[0].length  # how many positions are cached
        x = self.embed(idx, start)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i], attn_mask=attn_mask)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)


torch.manual_seed(0)
model = TinyLM(positions="rope").eval()
n_params = sum(p.numel() for p in model.parameters())
print(f"TinyLM: {len(model.blocks)} layers, n_embd={model.cfg.n_embd}, "
      f"{model.cfg.n_head} heads of {model.cfg.head_dim}, {n_params:,} parameters")

# %% [markdown]
# Greedy generation without a cache is a loop of three lines: run the model on everything so far,
# take the most likely next token at the last position, append it. Everything runs under
# `torch.no_grad()`, since we never train here.

# %%
@torch.no_grad()
def generate_plain(model, prompt, n_new):
    """Greedy decoding that recomputes the whole sequence at every step."""
    idx = prompt  # (B, T0)
    for _ in range(n_new):
        logits = model(idx)  # (B, T, vocab): every position, again
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)  # (B, T + 1)
    return idx


torch.manual_seed(1)
prompt = torch.randint(0, 256, (2, 16))  # a batch of 2 prompts of 16 token ids
out_plain = generate_plain(model, prompt, n_new=40)
print("prompt:", tuple(prompt.shape), "-> generated:", tuple(out_plain.shape))
print("first new tokens of row 0:", out_plain[0, 16:28].tolist())

# %% [markdown]
# (A model with random weights may fall into short repeats, here `137, 97, 137, 97` in row 0;
# that is expected and does not matter: we only ever compare one way of computing against
# another.)
#
# ## 2. What the naive loop recomputes
#
# Take the step that appends token $t$. The model runs on $t+1$ positions, but for positions
# $0 \ldots t-1$ it computes exactly what it computed one step earlier. The reason is causality:
# in every layer, the output at position $s$ depends on the inputs at positions $0 \ldots s$
# only. So the hidden state of position $s$ in every layer — and with it the key and value that
# layer computes from it — is fixed the moment token $s$ is known. Appending tokens later cannot
# change it.
#
# Let us check this on the model: run it on the first 10 tokens and on the first 11, and compare
# the hidden states of positions 0..9 after the embedding and after every block.

# %%
@torch.no_grad()
def hidden_states(model, idx):
    """The residual stream after the embedding and after each block: a list of (B, T, d)."""
    x = model.embed(idx)
    states = [x]
    for block in model.blocks:
        x = block(x)
        states.append(x)
    return states


short = hidden_states(model, out_plain[:, :10])
longer = hidden_states(model, out_plain[:, :11])
same = [torch.allclose(a, b[:, :10], atol=1e-5) for a, b in zip(short, longer, strict=True)]
print("positions 0..9 unchanged, per layer (embedding, block 0..3):", same)

# %% [markdown]
# Every layer agrees (to float rounding: the two runs multiply matrices of different shapes).
# Since a key or value of layer $\ell$ is a linear function of the (normalised) hidden state
# entering layer $\ell$, the keys and values of old positions are identical too. The only genuinely
# new work at each step is the new position: its embedding, its query, key and value in every
# layer, its attention over all keys, its MLP, and its logits.
#
# How much is wasted? Count, for a prompt of $P$ tokens and $N$ generated tokens:
#
# - **token passes**: how many positions go through the projections and MLPs. Without a cache,
#   step $i$ processes $P+i$ positions, so $\sum_{i<N} (P+i)$ in all — quadratic in the length.
#   With a cache, the prompt once, then one position per step: $P + N - 1$.
# - **attention scores**: a causal pass over $T$ positions fills $T(T+1)/2$ query-key pairs.
#   Without a cache that is paid again at every step — cubic in total. With a cache, step $i$
#   adds one query against $P+i$ keys.
#
# With a cache, the whole generation does exactly the work of *one* causal forward pass over the
# final sequence (minus its last token, which is never fed back in).

# %%
def work(P, N):
    T = [P + i for i in range(N)]  # sequence length the model reads at step i
    plain = dict(tokens=sum(T), scores=sum(t * (t + 1) // 2 for t in T))
    L = P + N - 1  # positions ever fed to the cached model
    cached = dict(tokens=L, scores=L * (L + 1) // 2)
    return plain, cached


plain_w, cached_w = work(P=16, N=256)
for key in ("tokens", "scores"):
    print(f"{key:>7}: without cache {plain_w[key]:>10,}   with cache {cached_w[key]:>7,}   "
          f"ratio {plain_w[key] / cached_w[key]:.1f}")

# %% [markdown]
# For 256 new tokens after a 16-token prompt, the naive loop pushes about 136 times as many
# positions through the projections and MLPs, and fills about 91 times as many attention
# scores. The arithmetic is not the whole story on a real machine (the next sections measure
# time), but it says where the saving comes from.
#
# ## 3. A first cache, and the mask it needs
#
# A KV cache for one layer is simply two growing tensors: keys and values of every position seen
# so far, laid out like the attention layer's own `k` and `v`, `(B, n_kv_head, T, head_dim)`.
# Each step appends the new positions along the time axis and hands back *everything*, because
# the new query attends over all keys. The cache also knows its `length`: the number of cached
# positions, which is the position of the next token to arrive.
#
# Before we write one, here is the whole life of a cache in one picture, drawn by code (cells
# and arrows, no data): one layer, a prompt of 5 tokens, then the first three decoding steps.
# Time runs downwards; each band is one call of the model.

# %%
from matplotlib.patches import FancyArrowPatch, Rectangle

NEW, CACHED, SCORE, MASKED = "#fdbf6f", "#a6cee3", "#b2df8a", "#e6e6e6"  # fill of each role
PROMPT, N_DECODE, MAX_LEN = 5, 3, 8  # prompt tokens, decoding steps drawn, cache slots drawn
X_Q, X_K, X_NOTE = 4.5, 6.0, 14.4  # left edge of the query boxes, of slot 0, of the shape notes
ROW = 0.8  # height of one row: the K or V cache, or one query's scores


def cell(ax, x, y, text="", color="white", dashed=False, bold=False):
    """A 1 × ROW cell (a cache slot, a query, a score) with its lower-left corner at (x, y)."""
    ax.add_patch(Rectangle((x, y), 1, ROW, facecolor=color, lw=1.6 if bold else 0.8,
                           edgecolor="grey" if dashed else "black",
                           linestyle="--" if dashed else "-"))
    ax.text(x + 0.5, y + ROW / 2, text, ha="center", va="center", fontsize=11)


def arrow(ax, start, end, color="black", lw=1.1, **kw):
    """An arrow from point start to point end."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=lw,
                                 color=color, shrinkA=2, shrinkB=2, **kw))


def cache_rows(ax, y, start, T):
    """K and V after this step's append, (B, n_kv_head, T_cached, head_dim) each, drawn along
    T_cached = start + T only: one slot is one position, a (B, n_kv_head, head_dim) slice."""
    for r, name in enumerate("kv"):
        row_y = y - r * ROW
        ax.text(X_K - 0.15, row_y + ROW / 2, f"{name.upper()} cache", ha="right", va="center",
                fontsize=10)
        for j in range(MAX_LEN):
            if j < start:  # computed at an earlier step, read from the cache now
                cell(ax, X_K + j, row_y, rf"${name}_{j}$", CACHED)
            elif j < start + T:  # computed at this step and appended
                cell(ax, X_K + j, row_y, rf"${name}_{j}$", NEW, bold=True)
            else:  # not written yet
                cell(ax, X_K + j, row_y, dashed=True)


def score_rows(ax, y, start, T):
    """The (T, start + T) strip of the causal score matrix (per batch row and head): query i
    sits at position start + i and may see keys 0 .. start + i."""
    for i in range(T):
        row_y, pos = y - i * ROW, start + i
        cell(ax, X_Q, row_y, rf"$q_{pos}$", NEW, bold=True)
        arrow(ax, (X_Q + 1, row_y + ROW / 2), (X_K, row_y + ROW / 2), color="grey")
        for j in range(start + T):  # one score per cached key; keys after pos are masked
            cell(ax, X_K + j, row_y, color=SCORE if j <= pos else MASKED)


def draw_step(ax, y, start, T, title, notes):
    """One call of the model: T new tokens on top of `start` cached positions, the top of its
    K row at y. Writes `notes` (the shapes) beside it; returns the y of its last query row."""
    ax.text(0.9, y + ROW, title, ha="left", va="top", fontsize=10.5, linespacing=1.5)
    cache_rows(ax, y, start, T)
    score_rows(ax, y - 2 * ROW - 0.25, start, T)
    for i, line in enumerate(notes):
        ax.text(X_NOTE, y + ROW / 2 - i * 0.45, line, ha="left", va="center", fontsize=9,
                family="monospace")
    return y - (T + 1) * ROW - 0.25


fig, ax = plt.subplots(figsize=(13, 10.5))
fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
ax.set(xlim=(0, 24), ylim=(1.3, 22.4))
ax.axis("off")

y_top = 20.0  # top of the prefill's K row
for j in range(MAX_LEN):  # column headers: the position of each key
    ax.text(X_K + j + 0.5, y_top + ROW + 0.35, str(j), ha="center", va="center", fontsize=10)
ax.text(X_K + MAX_LEN / 2, y_top + ROW + 0.95, "position in the sequence = cache slot = key",
        ha="center", va="center", fontsize=10)

# Step 0, the prefill: the whole prompt at once into an empty cache.
last_q = draw_step(ax, y_top, 0, PROMPT, "step 0: prefill\nfeed the prompt: $T = 5$\nstart = 0",
                   ["computed: q          (B, n_head,    5, head_dim)",
                    "          k, v       (B, n_kv_head, 5, head_dim)",
                    "read from the cache: nothing (it is empty)",
                    "append returns k, v  (B, n_kv_head, T_cached=5, head_dim)",
                    "scores (B, n_head, 5, 5), causal_mask(5, 5):",
                    "a triangle, keys after the query masked"])

# Steps 1..3, decoding: one token each, the one just predicted.
for s in range(1, N_DECODE + 1):
    n_cached = PROMPT + s - 1  # cache.length before this step
    y_top = last_q - 1.9  # leave room for the red next-token arrow
    ax.text(X_Q + 0.55, y_top + ROW + 0.5, f"token {n_cached} = argmax of the logits at "
            f"position {n_cached - 1}, fed next", color="C3", fontsize=9, va="center")
    arrow(ax, (X_Q, last_q + ROW / 2), (X_Q, y_top - 2 * ROW - 0.25 + ROW / 2), color="C3",
          connectionstyle="arc3,rad=0.5")
    last_q = draw_step(ax, y_top, n_cached, 1,
                       f"step {s}: decode\nfeed 1 token: $T = 1$\nstart = {n_cached}",
                       ["computed: q          (B, n_head,    1, head_dim)",
                        "          k, v       (B, n_kv_head, 1, head_dim)",
                        f"read from the cache: k, v of positions 0..{n_cached - 1}",
                        f"append returns k, v  (B, n_kv_head, T_cached={n_cached + 1}, head_dim)",
                        f"scores (B, n_head, 1, {n_cached + 1}): one full row, no mask"])

arrow(ax, (0.45, 21.2), (0.45, last_q), lw=1.5)  # the time axis, top to bottom
ax.text(0.2, 21.0, "time", rotation=90, ha="center", va="top", fontsize=10)

legend = [(NEW, False, "computed at this step"), (CACHED, False, "read from the cache"),
          ("white", True, "free slot"), (SCORE, False, r"score $q_i \cdot k_j$ computed"),
          (MASKED, False, r"masked: key after the query ($j > i$)")]
for x, (color, dashed, label) in zip((1.0, 5.4, 9.6, 12.6, 17.2), legend, strict=True):
    ax.add_patch(Rectangle((x, 1.6), 0.6, 0.45, facecolor=color, lw=0.8,
                           edgecolor="grey" if dashed else "black",
                           linestyle="--" if dashed else "-"))
    ax.text(x + 0.8, 1.82, label, va="center", fontsize=10)
plt.show()


# %% [markdown]
# What to look at:
#
# - **Two kinds of step.** Step 0, the **prefill**, feeds the whole prompt at once: its 5
#   queries, keys and values are all computed (orange), and nothing is read, since the cache is
#   empty. Every later step is a **decoding step**: it feeds the one token just predicted from
#   the logits at the last position (the red arrows), computes one query, one key and one value
#   (orange), and *reads* the keys and values of every earlier position from the cache (blue)
#   instead of computing them again.
# - **The cache rows.** K and V are `(B, n_kv_head, T_cached, head_dim)` tensors; the drawing
#   shows only their time axis, one slot per position. `T_cached` grows 5, 6, 7, 8: each step
#   appends its new positions at the end, and `start`, the cache's `length` before the step, is
#   the position of the first token it feeds. The dashed slots are not written yet: a growing
#   cache does not have them, a preallocated one (section 4) reserves them in advance.
# - **The score strips.** Under each cache, one row per query and one column per key: the
#   scores that step computes. The prefill fills a $5 \times 5$ causal triangle. A decoding
#   step fills one full row: its query is the newest position, so it may see every cached key
#   and needs no mask. In general a call with `T` new tokens on `start` cached ones fills a
#   `(T, start + T)` strip whose triangle sits in the **bottom-right** corner: that is the mask
#   this section is named after. Stack the strips and you get the $8 \times 8$ causal matrix of
#   one forward pass over positions 0..7. If generation stops after step 3, whose prediction
#   (token 8) is never fed back, that is one pass over the final sequence minus its last token:
#   §2's count, drawn.
#
# In the code below, `HandAttention.forward` is one band: `layer.project(x)` computes the
# orange `q`, `k` and `v` of the tokens fed, `cache.append(k, v)` writes the orange slots and
# returns all of K and V (blue and orange), and `causal_mask(T, k.shape[2])` is the strip.
# `generate`, further down, makes the calls: the whole prompt first, then one token per step.
#
# Version 1 appends with `torch.cat`:

# %%
class CatCache:
    """Version 1: keys and values of one layer, grown with torch.cat at every append."""

    def __init__(self):
        self.k = self.v = None  # (B, n_kv_head, length, head_dim) once something is cached

    @property
    def length(self):
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v):  # k, v: (B, n_kv_head, T_new, head_dim)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v  # (B, n_kv_head, length, head_dim): every position so far


# %% [markdown]
# Now an attention layer that uses it, written out by hand so that nothing is hidden. It borrows
# the weights of an `attnbook` layer (the fused projection `project`, the RoPE rotation `rope`,
# the output projection `c_proj`) and does the cached forward pass itself. The two borrowed
# methods: `layer.project(x)` takes the `(B, T, d)` input and returns `q`, `(B, n_head, T,
# head_dim)`, and `k`, `v`, `(B, n_kv_head, T, head_dim)` each; `layer.rope(t, start)` rotates
# a `(B, heads, T, head_dim)` tensor as positions `start .. start + T - 1` and returns the same
# shape (`layer.rope` is `None` in a layer without RoPE). The steps:
#
# 1. project only the **new** tokens `x` to queries, keys and values;
# 2. rotate q and k with RoPE **at their true positions** `start .. start + T - 1`, where
#    `start = cache.length` (rotating them as positions `0 .. T-1` would be a bug);
# 3. append k and v to the cache and get back all keys and values;
# 4. attend with a causal mask, merge the heads, project.
#
# Step 4 has a trap. The new queries are the *last* `T` of `T_k = start + T` positions: query `i`
# sits at position `start + i` and may see keys `0 .. start + i`. The causal triangle must be
# aligned to the **bottom-right** corner of the `(T, T_k)` score matrix, which
# `attnbook.attention.causal_mask(T, T_k)` does. The tempting one-liner
# `F.scaled_dot_product_attention(..., is_causal=True)` aligns it **top-left** instead
# ([chapter 2](02_scaled_dot_product_attention.ipynb)): it treats the queries as the *first* `T`
# positions. The two agree when `T == T_k` (the prefill of an empty cache) and nowhere else. The
# class below can do either, so we can compare.

# %%
class HandAttention(nn.Module):
    """Cached attention written out around an attnbook layer (not ALiBi; ignores attn_mask)."""

    def __init__(self, layer, align="bottom-right"):
        super().__init__()
        self.layer, self.align = layer, align

    def forward(self, x, attn_mask=None, cache=None):  # x: (B, T, d) new tokens; attn_mask unused
        layer, (B, T, d) = self.layer, x.shape
        start = 0 if cache is None else cache.length  # position of x's first token
        q, k, v = layer.project(x)  # (B, n_head, T, hd), k and v: (B, n_kv_head, T, hd)
        if layer.rope is not None:
            q, k = layer.rope(q, start), layer.rope(k, start)  # rotated at their true positions
        if cache is not None:
            k, v = cache.append(k, v)  # (B, n_kv_head, start + T, hd)
        gqa = layer.n_kv_head != layer.n_head
        if self.align == "top-left":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = causal_mask(T, k.shape[2])  # (T, start + T), bottom-right aligned
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d): heads side by side
        return layer.c_proj(y)


# %% [markdown]
# Test it on one layer: run it on 12 random inputs at once (no cache), then feed the same inputs
# one at a time through a cache, with each alignment.

# %%
layer = model.blocks[0].attn  # an attnbook MultiHeadAttention with RoPE
x = torch.randn(1, 12, 128)
with torch.no_grad():
    full = HandAttention(layer)(x)  # (1, 12, 128): one pass, T_q == T_k
    steps = {}
    for align in ("bottom-right", "top-left"):
        attn, cache = HandAttention(layer, align), CatCache()
        steps[align] = torch.cat([attn(x[:, t : t + 1], cache=cache) for t in range(12)], dim=1)
print("full pass equals the layer's own forward:", torch.allclose(full, layer(x), atol=1e-5))
print("one token at a time, max |difference| from the full pass at positions 0..11:")
for align, y in steps.items():
    err = (y - full).abs().amax(dim=(0, 2))  # (12,): the largest error at each position
    print(f"{align:>12}:", [round(e, 3) for e in err.tolist()])

# %% [markdown]
# Bottom-right alignment reproduces the full pass (the difference is float rounding, 0.0 at
# three decimals everywhere). Top-left gets position 0 right and every other position wrong. Here is why,
# concretely: with one query and a cache of $S$ keys, `is_causal=True` builds the top-left
# triangle of a `(1, S)` matrix — a single `True`, at key 0. The query sees *only the first
# token*, whatever it is, and the attention output is that token's value vector, unmixed:

# %%
with torch.no_grad():
    q, k, v = layer.project(x)  # (1, n_head, 12, hd) each; positions do not matter here
    q_last = q[:, :, -1:]  # (1, n_head, 1, hd): the query of the newest position
    y_top_left = F.scaled_dot_product_attention(q_last, k, v, is_causal=True)  # (1, n_head, 1, hd)
print("mask is_causal=True uses for 1 query, 12 keys:", torch.ones(1, 12).tril().int().tolist())
print("output == value of key 0:", torch.allclose(y_top_left, v[:, :, :1]))
print("causal_mask(1, 12), what a cache needs:      ", causal_mask(1, 12).int().tolist())

# %% [markdown]
# A mistake like this does not crash. In a whole model it just produces different text, as
# generating with the hand-written layers in place of the model's own shows. We deep-copy the
# model, wrap each block's attention, and give each layer a `CatCache`. The generation loop now
# feeds the whole prompt on the first step (the prefill: it fills the caches with the
# prompt's keys and values) and only the newest token on every later step. The last generated
# token is never fed back, so the caches end up holding `P + N - 1` positions.

# %%
def new_caches(model, make_cache):
    """One cache per layer: make_cache(attention_layer) -> a cache."""
    return [make_cache(block.attn) for block in model.blocks]


@torch.no_grad()
def generate(model, prompt, n_new, caches=None):
    """Greedy decoding; with caches the first step prefills the prompt, later ones feed 1 token."""
    idx, feed = prompt, prompt  # (B, T0): the first step feeds the whole prompt
    for _ in range(n_new):
        if caches is None:
            logits = model(idx)  # (B, T, vocab): recompute everything
        else:
            logits = model(feed, caches)  # (B, T_feed, vocab): only what is not cached yet
        feed = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1): the next token
        idx = torch.cat([idx, feed], dim=1)
    return idx


def compare_new(out, ref, P=16):
    """How many generated tokens agree with ref, and where each row first differs (1-based)."""
    same = out[:, P:] == ref[:, P:]  # (B, N): new tokens only
    if same.all():
        return f"all {same.numel()} new tokens agree"
    first = [int((~row).nonzero()[0]) + 1 if not row.all() else None for row in same]
    agree = f"{int(same.sum())} of {same.numel()} new tokens agree"
    return f"{agree}; rows first differ at new token {first}"


def with_hand_attention(model, align):
    clone = copy.deepcopy(model)
    for block in clone.blocks:
        block.attn = HandAttention(block.attn, align)
    return clone


for align in ("bottom-right", "top-left"):
    hand = with_hand_attention(model, align)
    caches = new_caches(hand, lambda attn: CatCache())
    out = generate(hand, prompt, n_new=40, caches=caches)
    print(f"{align:>12}: same tokens as without a cache: {torch.equal(out, out_plain)}; "
          f"cached positions: {caches[0].length}")
    print(f"{'':>12}  {compare_new(out, out_plain)}")

# %% [markdown]
# With the bottom-right mask, cached generation is token-for-token the same as the naive loop;
# with `is_causal=True` each row goes its own way from the second generated token on. The two
# tokens that agree are the first of each row: they come from the prefill, where the two masks
# agree.
#
# `attnbook` protects you twice. Its `sdpa` refuses `is_causal=True` when the query and key
# lengths differ, with a message that says what to pass instead:

# %%
try:
    sdpa(q_last, k, v, is_causal=True)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# And its attention layers (`Attention.forward`, the base of MHA, GQA and MQA) already
# do what `HandAttention` does with `align="bottom-right"`: with `cache=...` they rotate q and k
# from position `cache.length`, call `cache.append(k, v)`, and build `causal_mask(T, T_k)` for
# a block of `T > 1` new tokens on top of a cache. For a single new token (`T = 1`, every
# decoding step) they build no mask at all: `causal_mask(1, T_k)` is all `True` anyway, since
# the newest position may see every key. They only ever touch the cache through `length` and
# `append`, so *any* object with those two members works — including our `CatCache`. From here
# on we drop `HandAttention` and pass caches straight to the model's own layers:

# %%
caches = new_caches(model, lambda attn: CatCache())
out_cat = generate(model, prompt, n_new=40, caches=caches)
assert torch.equal(out_cat, out_plain)
print("module layers + CatCache: same tokens as without a cache:", torch.equal(out_cat, out_plain))
print("cached keys of layer 0:", tuple(caches[0].k.shape), "(B, n_kv_head, P + N - 1, head_dim)")

# %% [markdown]
# ## 4. Version 2: a preallocated cache
#
# `CatCache` is correct but allocates a new, slightly larger pair of tensors at every step and
# copies the whole cache into it. The copy costs about as much as attention's own read of the
# cache, so it does not change the complexity, but it churns the memory allocator, briefly needs
# twice the cache's memory, and makes the memory use grow unpredictably during generation. A
# server wants to know up front how much memory a request will take.
#
# Version 2 allocates keys and values for `max_len` positions once, writes each new block of
# positions in place, and returns *views* of the filled part (no copy). This brings two
# obligations: it must refuse, with a clear message, to go past `max_len`, and it needs a
# `reset()` so the same memory can serve the next sequence (only the length is reset; the old
# numbers stay behind but are never read, because only the first `length` positions are
# returned).

# %%
class PreallocatedCache:
    """Version 2: keys and values for max_len positions, allocated once, filled in place."""

    def __init__(self, batch_size, n_kv_head, head_dim, max_len, dtype=torch.float32):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len, self.length = max_len, 0

    def append(self, k, v):  # k, v: (B, n_kv_head, T_new, head_dim)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"cache full: {self.length} of {self.max_len} positions used, cannot add "
                f"{k.shape[2]} more; call reset() or allocate a larger max_len"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # views, no copy

    def reset(self):
        self.length = 0


def prealloc(max_len, batch_size=2):
    return lambda attn: PreallocatedCache(batch_size, attn.n_kv_head, attn.head_dim, max_len)


caches = new_caches(model, prealloc(max_len=64))
out_pre = generate(model, prompt, n_new=40, caches=caches)
assert torch.equal(out_pre, out_plain)
print("PreallocatedCache: same tokens as without a cache:", torch.equal(out_pre, out_plain))
print(f"positions used: {caches[0].length} of {caches[0].max_len}; "
      f"keys stored as {tuple(caches[0].k.shape)}")

# %% [markdown]
# **Overflow.** A cache of `max_len` positions holds a prompt of `P` tokens and `N` generated
# ones as long as `P + N - 1 <= max_len` (remember, the last token is never fed back). With
# `max_len=24` and a 16-token prompt that is 9 new tokens; asking for 10 must fail loudly, not
# write past the end or silently drop positions:

# %%
caches = new_caches(model, prealloc(max_len=24))
generate(model, prompt, n_new=9, caches=caches)
print("9 new tokens fit; cache length:", caches[0].length)
for cache in caches:
    cache.reset()
try:
    generate(model, prompt, n_new=10, caches=caches)
except ValueError as err:
    print("10 new tokens -> ValueError:", err)

# %% [markdown]
# **Reset and reuse.** After `reset()` the same caches serve a fresh sequence, and give exactly
# what brand-new caches give. (Forgetting the reset is a classic bug: the new prompt would be
# appended after the old sequence, and attend to it.)

# %%
torch.manual_seed(2)
other_prompt = torch.randint(0, 256, (2, 16))
for cache in caches:
    cache.reset()
reused = generate(model, other_prompt, n_new=8, caches=caches)
fresh = generate(model, other_prompt, n_new=8, caches=new_caches(model, prealloc(max_len=24)))
print("reset caches == new caches:", torch.equal(reused, fresh))
print("== no cache:               ", torch.equal(reused, generate_plain(model, other_prompt, 8)))

# %% [markdown]
# ## 5. Learned positions: the model must pass the offset
#
# With RoPE, positions live inside attention, which reads `cache.length` itself. With learned (or
# sinusoidal) position vectors, positions are *added to the embeddings* before the first block,
# by the model. So the model must ask the cache where the new tokens sit: `TinyLM.forward` reads
# `start = caches[0].length` and adds `wpe(T, start)`, the vectors of positions
# `start .. start + T - 1`. We build the same tiny model with learned positions and check both the
# correct version and a subclass that forgets the offset (it always adds positions `0 .. T-1`).

# %%
torch.manual_seed(0)
model_learned = TinyLM(positions="learned").eval()


class ForgetfulLM(TinyLM):
    """The bug: embeds every fed token as if the sequence started at position 0."""

    def embed(self, idx, start=0):
        return super().embed(idx, start=0)


forgetful = ForgetfulLM(positions="learned").eval()
forgetful.load_state_dict(model_learned.state_dict())

plain_learned = generate_plain(model_learned, prompt, n_new=40)
for name, m in (("with the offset", model_learned), ("offset forgotten", forgetful)):
    out = generate(m, prompt, n_new=40, caches=new_caches(m, prealloc(max_len=64)))
    print(f"{name:>16}: same tokens as without a cache: {torch.equal(out, plain_learned)}")
    print(f"{'':>16}  {compare_new(out, plain_learned)}")

# %% [markdown]
# The forgetful model gets the first generated token of each row right (it comes from the
# prefill, which starts at 0 anyway) and then treats every new token as if it stood at
# position 0. The naive loop never shows this bug, because it always starts at 0 — one more
# reason to test cached generation *against* uncached generation.

# %% [markdown]
# ## 6. Prefill in chunks
#
# The first step feeds the whole prompt at once. For a very long prompt that step is big in two
# ways. Its activations grow with the prompt: every layer holds `(T, 3d)` queries, keys and
# values and a `(T, 4d)` MLP hidden layer for all `T` positions at once. (On the reference
# attention path it also builds a `T × T` score matrix per head; the fused SDPA kernel never
# stores that matrix.) And it takes long: a server that is also decoding other requests would
# make all of them wait for the whole prefill, whereas chunks can be scheduled between, or
# alongside, their decoding steps. So prompts are often **prefilled in chunks**: the first
# chunk goes into an empty cache, the next chunk attends to the cached positions *and* causally
# within itself, and so on. Each chunk is a block of `T > 1` queries at the end of `T_k` keys —
# the bottom-right mask again, now with a real triangle in it. For a chunk of 3 tokens after 5
# cached ones, each new query sees the 5 cached keys and, among the new ones, itself and those
# before it; the top-left triangle would hide most of the cache from every query:

# %%
print("causal_mask(3, 8), bottom-right: 3 new queries after 5 cached keys")
print(causal_mask(3, 8).int())
print("torch.ones(3, 8).tril(), top-left, what is_causal=True would use")
print(torch.ones(3, 8).tril().int())

# %% [markdown]
# Prefilling a 45-token prompt in one go, and in chunks of 16, 16 and 13, must leave the same
# numbers in the caches and give the same logits for the last position:

# %%
torch.manual_seed(3)
long_prompt = torch.randint(0, 256, (2, 45))
with torch.no_grad():
    at_once = new_caches(model, prealloc(max_len=64))
    logits_once = model(long_prompt, at_once)[:, -1]  # (B, vocab)
    chunked = new_caches(model, prealloc(max_len=64))
    for start in range(0, 45, 16):
        chunk = long_prompt[:, start : start + 16]  # (B, 16), the last one (B, 13)
        mask_shape = (chunk.shape[1], chunked[0].length + chunk.shape[1])
        logits_chunk = model(chunk, chunked)[:, -1]
        print(f"chunk at positions {start:>2}..{start + chunk.shape[1] - 1:>2}: "
              f"mask (T_q, T_k) = {mask_shape}")

same_logits = torch.allclose(logits_chunk, logits_once, atol=1e-5)
same_cache = all(
    torch.allclose(a.k[:, :, :45], b.k[:, :, :45], atol=1e-5)
    and torch.allclose(a.v[:, :, :45], b.v[:, :, :45], atol=1e-5)
    for a, b in zip(at_once, chunked, strict=True)
)
assert same_logits and same_cache
print("chunked prefill == prefill at once (atol=1e-5): logits", same_logits, "| caches", same_cache)

# %% [markdown]
# ## 7. Time per generated token
#
# Now the payoff. We generate 256 tokens after a 16-token prompt, batch size 1, without a
# cache and with one, and time the whole generation, keeping the fastest of three runs of each,
# since a run can only be slowed down, never sped up, by other programs. Timings depend on your machine and on
# what else runs on it, so the output of the timing cells is not checked by the book's tests;
# the cells assert their claims instead (here: same tokens, and the cache is faster). A short
# warm-up run first keeps one-time costs out of the measurement. We time on a single thread:
# one sequence through a model this small gains little from more threads, and a single-threaded
# measurement suffers much less when other programs compete for the cores.
#
# The thread count is a global setting of PyTorch, so we change it only inside a `with` block
# that puts the previous count back when the block ends — also when an assert in it fails, so the
# notebook never stays single-threaded by accident.

# %%
@contextmanager
def single_thread():
    """Run the body of a `with` block on one thread; restore the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)  # runs even if the block raised


# %% tags=["nbval-ignore-output"]
torch.manual_seed(4)
prompt_1 = torch.randint(0, 256, (1, 16))
P, N = prompt_1.shape[1], 256
total_plain = total_cached = float("inf")  # the fastest of 3 runs of each
with single_thread():
    generate(model, prompt_1, 8)  # warm-up, both paths
    generate(model, prompt_1, 8, caches=new_caches(model, prealloc(P + N, batch_size=1)))
    for _ in range(3):
        t0 = time.perf_counter()
        out_a = generate(model, prompt_1, N)
        t1 = time.perf_counter()
        caches_1 = new_caches(model, prealloc(P + N, batch_size=1))  # allocation timed too
        out_b = generate(model, prompt_1, N, caches=caches_1)
        t2 = time.perf_counter()
        total_plain, total_cached = min(total_plain, t1 - t0), min(total_cached, t2 - t1)
    n_threads = torch.get_num_threads()
assert torch.equal(out_a, out_b), "cached generation must give the same tokens"
assert total_cached < total_plain, "the cache should make generation faster"
print(f"{N} generated tokens, prompt {P}, batch 1, {n_threads} thread, fastest of 3 runs")
print(f"without cache: {total_plain:.2f} s   with cache: {total_cached:.2f} s   "
      f"speed ratio: {total_plain / total_cached:.1f}x")
print(f"per generated token: {1000 * total_plain / N:.1f} ms without cache, "
      f"{1000 * total_cached / N:.1f} ms with cache")

# %% [markdown]
# The cache wins clearly, but by a factor far below the token ratio of §2. The arithmetic saved
# is real (Exercise 4 counts it exactly); what the cache does not remove is the fixed cost every
# step pays whatever its size — Python, the dispatch of each PyTorch operator, four layers of
# tiny matrix products that keep the processor far from its peak (the next cell measures how
# far) — and for a model this small that fixed cost is most of a cached step.
#
# Where does the difference come from? We time single steps at a range of sequence lengths `T`
# (the number of tokens the step attends over).
#
# **How we time one step.** Without a cache, a step at length `T` runs the model on all `T`
# tokens. With a cache, it feeds one token into caches holding `T - 1` positions. To get those
# caches without regenerating, we cache the whole sequence once and **rewind**: setting `length` back to `T - 1` on a preallocated cache forgets every later
# position, since only the first `length` are ever read. (Real systems rewind this way too, for
# instance to throw away tokens that speculative decoding guessed wrong.) So the plot does not
# show the steps of the generation timed above: each point is a separate single step, reached by
# rewinding, timed 15 times in 15 sweeps over all lengths, of which we keep the fastest; it
# times the model call alone, so it comes out below the previous cell's per-token times, which
# also include each step's `argmax` and `torch.cat` and, since every run lasts seconds, each
# interruption by other programs during it (on a busy machine, several times below).
#
# **Prediction before you look.** Without a cache, the step time should grow about linearly with
# `T` (projections and MLPs on `T` positions, plus attention that grows like `T²`); with a
# cache, each step processes one position and only its attention read grows with `T`, a tiny
# part of the step for a model this small.

# %% tags=["nbval-ignore-output"]
seq = out_b  # (1, P + N): the sequence just generated
step_caches = new_caches(model, prealloc(P + N, batch_size=1))
with torch.no_grad():
    model(seq[:, :-1], step_caches)  # cache every position once


@torch.no_grad()
def step_plain(T):
    model(seq[:, :T])  # T tokens, from scratch


@torch.no_grad()
def step_cached(T):
    for cache in step_caches:
        cache.length = T - 1  # rewind: positions T-1 and later are forgotten
    model(seq[:, T - 1 : T], step_caches)  # 1 token, attending over T keys


def fastest_ms(step, lengths, reps=15):
    """Fastest of `reps` timings of step(T) for each T; the repetitions sweep all lengths."""
    best = [float("inf")] * len(lengths)
    for _ in range(reps):
        for j, T in enumerate(lengths):
            t0 = time.perf_counter()
            step(T)
            best[j] = min(best[j], 1000 * (time.perf_counter() - t0))
    return best


lengths = list(range(P, P + N + 1, 32))  # 16, 48, ..., 272
with single_thread():
    ms_plain = fastest_ms(step_plain, lengths)
    ms_cached = fastest_ms(step_cached, lengths)

fig, ax = plt.subplots(figsize=(8, 4))
ax.plot(lengths, ms_plain, "o-", color="C3", label="without cache: the model runs on T tokens")
ax.plot(lengths, ms_cached, "o-", color="C0", label="with cache: 1 token, T - 1 cached")
ax.set_xlabel("sequence length T at this step (tokens attended over)")
ax.set_ylabel("time for one step, ms (fastest of 15)")
ax.set_ylim(0, 1.1 * max(ms_plain))
ax.set_title(f"One decoding step, TinyLM ({len(model.blocks)} layers, d={model.cfg.n_embd}), "
             f"batch 1, CPU, 1 thread")
ax.legend(loc="upper left")
plt.show()
assert ms_plain[-1] > 2 * ms_plain[0], "without a cache, a step should grow with T"
assert ms_cached[-1] < ms_plain[-1] / 2, "a cached step should be much cheaper at T=272"
print(f"step at T={lengths[-1]}: {ms_plain[-1]:.1f} ms without cache, "
      f"{ms_cached[-1]:.1f} ms with cache")

# How far from the processor's peak is a cached step? It does about 2 FLOPs (a multiply and an
# add) per weight of its linear layers, plus 2 * 2 * T * n_embd per layer for attention's
# q.k and weights.v; a large matrix product on the same thread shows what the core can do.
n_linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))
T_last, d_model = lengths[-1], model.cfg.n_embd
step_flops = 2 * n_linear + 4 * len(model.blocks) * T_last * d_model
step_gflops = step_flops / (ms_cached[-1] / 1000) / 1e9
a_big = torch.randn(512, 512)
with single_thread():
    big_ms = min(fastest_ms(lambda T: a_big @ a_big, [0], reps=5))
big_gflops = 2 * 512**3 / (big_ms / 1000) / 1e9
print(f"cached step at T={T_last}: {step_flops / 1e6:.2f} MFLOP in {ms_cached[-1]:.1f} ms = "
      f"{step_gflops:.1f} GFLOP/s; a 512 x 512 matrix product: {big_gflops:.1f} GFLOP/s")
assert step_gflops < big_gflops / 2, "a cached step of this tiny model is far from the peak"

# %% [markdown]
# What the measurements show (your numbers will differ; the shape should not):
#
# - **Without a cache** the step time grows with the sequence length: each step redoes the
#   projections and MLPs of every earlier position, and its attention grows quadratically.
#   Summed over a generation, that is quadratic (and eventually cubic) total cost, so the speed
#   ratio of the previous cell grows with the number of generated tokens.
# - **With a cache** the step time is nearly flat (an isolated spike is an interruption by
#   another program, not the cache). It is not exactly constant — each step reads
#   the whole cache in attention — but for this model the fixed part (four layers of small matrix
#   products, plus Python overhead) dominates. Its arithmetic runs at a small fraction of the
#   rate a large matrix product reaches on the same core (the last line of the cell). For a large
#   model, the step is limited by how fast
#   memory delivers what it reads: at batch 1 with a moderate context, that is mostly the
#   weights; with a long context or a large batch, once the cache rivals the weights
#   ([chapter 4](04_mqa_gqa.ipynb) drew where that happens; the next section recalls the numbers),
#   the cache read dominates. That is why the cache's *size* matters so much.
#
# ## 8. How much memory the cache takes
#
# [Chapter 4](04_mqa_gqa.ipynb) derived the size of the cache: per layer and per position it stores
# one key and one value vector for every key/value head, so per token of one sequence
# $2 \times n_\text{layer} \times n_\text{kv\_head} \times \text{head\_dim} \times
# \text{bytes per number}$, with no query heads in it: MQA and GQA shrink the cache by
# `n_head / n_kv_head`.
#
# The formula is only as good as our understanding of what a model stores, so here we measure
# it from an actual cache. Each attention layer makes its own with `layer.new_cache(batch_size,
# max_len)`: an `attnbook.kv_cache.KVCache`, the design of our version 2, whose tensors `k` and
# `v` have shape `(B, n_kv_head, max_len, head_dim)`, and whose `bytes_per_token` reports what
# one position of one sequence costs in that layer. (That `KVCache` behaves like our
# `PreallocatedCache` is checked in "Check against the module" at the end of the chapter.)
# What do we measure?
#
# - **What `nbytes` misses.** `bytes_per_token` and `k.nbytes` are both computed from a shape
#   and an element size, so checking the formula against them alone would be a little circular;
#   and the view of the filled positions that `append` returns counts only the filled part.
# - **What the storage sees.** `t.untyped_storage().nbytes()` is the block of memory PyTorch
#   actually allocated under a tensor: the dtype the cache really stores (a cache that kept
#   float64, or copied what it was given, would show it), the whole preallocated block behind a
#   view, and, summed over every tensor the cache object holds (each block counted once), any
#   tensor besides `k` and `v`.
# - **What we divide by.** The number of sequences times the number of positions the cache has
#   room for, which gives bytes per token of one sequence.
#
# First our tiny model, built
# with each variant (4 query heads of 32; GQA with 2 key/value heads), fp32, with caches for the
# batch of 2 prompts and room for 512 positions; the memory is measured before and after the
# 16-token prompts run through it:

# %%
def kv_bytes_per_token(n_layer, n_kv_head, head_dim, bytes_per_elem):
    """Chapter 4's formula: KV-cache bytes for one token of one sequence, every layer."""
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_elem


def storage_bytes(caches):
    """Bytes allocated under every tensor the caches hold, each block of memory counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for c in caches for t in vars(c).values() if isinstance(t, torch.Tensor)}
    return sum(storages.values())


batch, max_len = 2, 512  # every cache: the 2 prompts, room for 512 positions each
print(f"{'variant':>7} {'n_kv_head':>9} {'held before':>11} {'held after':>10} "
      f"{'bytes/token':>11} {'KiB per sequence at 512':>23}")
tiny_bytes = {}
for name, options in (("mha", {}), ("gqa", {"n_kv_head": 2}), ("mqa", {})):
    m = TinyLM(attention=name, **options).eval()
    caches = [block.attn.new_cache(batch_size=batch, max_len=max_len) for block in m.blocks]
    held_before = storage_bytes(caches)  # every layer, nothing cached yet
    with torch.no_grad():
        m(prompt, caches)  # fills positions 0..15 of every layer's cache
    held = storage_bytes(caches)  # every layer, 16 positions filled
    per_token = held // (batch * max_len)  # per position of one sequence, every layer
    n_kv, hd = m.blocks[0].attn.n_kv_head, m.cfg.head_dim
    assert held == held_before  # preallocated: filling allocates nothing
    assert per_token == sum(c.bytes_per_token for c in caches)  # what the caches report
    assert per_token == kv_bytes_per_token(len(m.blocks), n_kv, hd, 4)  # the formula, fp32
    tiny_bytes[name] = per_token
    print(f"{name:>7} {n_kv:>9} {held_before:>11,} {held:>10,} {per_token:>11,} "
          f"{max_len * per_token / 1024:>23,.0f}")
filled = caches[0].k[:, :, : caches[0].length]  # what attention reads: a view, no copy
print(f"MQA, layer 0, after the prompts: {caches[0].length} of {max_len} positions filled; "
      f"the filled view {tuple(filled.shape)} has nbytes {filled.nbytes:,}, "
      f"its storage {filled.untyped_storage().nbytes():,} bytes")

# %% [markdown]
# Measured, reported and computed agree for every variant, in fp32 (4 bytes a number), with
# nothing held besides the keys and values. The cache is a preallocated block: it holds
# `max_len` positions' worth of memory from the start, and feeding the prompts changes nothing
# (held before == held after), although only 16 of the 512 positions are filled. The last line
# shows the difference the storage makes: the view of the filled positions, what attention
# reads, counts 16 positions' bytes in its `nbytes`, while the memory under it is the whole
# block of 512.
#
# As in [chapter 4](04_mqa_gqa.ipynb), the realistic case is a 7B-class model shaped like Llama 2
# 7B: 32 layers, 32 query heads of 128 (`n_embd = 4096`), cache in fp16, with all 32 key/value
# heads (MHA), 8 (GQA, the shape of Mistral 7B), 1 (MQA) or a number between. Its weights would
# take a few hundred megabytes per layer that we do not need, so we build one layer on PyTorch's
# `meta` device, which records shapes and allocates nothing, and ask it for a cache on the CPU in
# `float16` (a cache may store a lower precision than the layer computes in; the layer casts what
# it reads back). The cache tensors are real: MHA's keys and values for 4096 tokens take 64 MiB
# per layer. Every layer of the model is identical, so the model's cache per token is 32 times
# one layer's.

# %%
n_layer_7b, n_head_7b, head_dim_7b, ctx = 32, 32, 128, 4096
cfg_7b = AttentionConfig(n_embd=n_head_7b * head_dim_7b, n_head=n_head_7b, block_size=ctx,
                         bias=False)
measured = {}
print(f"{'n_kv_head':>9} {'cache.k':>22} {'MiB/layer (k+v)':>15} {'KiB/token':>9} "
      f"{'GiB at 4k':>10}")
for n_kv in (32, 16, 8, 4, 2, 1):
    with torch.device("meta"):
        layer_7b = build_attention("gqa", cfg_7b, n_kv_head=n_kv)  # shapes only, no weights
    cache = layer_7b.new_cache(batch_size=1, max_len=ctx, device="cpu", dtype=torch.float16)
    held = storage_bytes([cache])  # the memory under k and v, this layer
    measured[n_kv] = held // ctx * n_layer_7b  # per token, all 32 layers
    formula = kv_bytes_per_token(n_layer_7b, n_kv, head_dim_7b, 2)
    assert measured[n_kv] == formula == n_layer_7b * cache.bytes_per_token
    print(f"{n_kv:>9} {str(tuple(cache.k.shape)):>22} {held // 2**20:>15} "
          f"{measured[n_kv] // 1024:>9} {ctx * measured[n_kv] / 2**30:>10.4f}")
print("measured == formula == 32 x bytes_per_token, for every n_kv_head")

# %%
fig, ax = plt.subplots(figsize=(7.5, 3.6))
names = ["32 (MHA,\nLlama 2 7B)", "16", "8 (GQA,\nMistral 7B)", "4", "2", "1 (MQA)"]
kib = [measured[n] / 1024 for n in (32, 16, 8, 4, 2, 1)]
bars = ax.bar(names, kib, color=["C0", "C7", "C1", "C7", "C7", "C2"])  # grey: shapes between
ax.bar_label(bars, [f"{v:g} KiB" for v in kib])
ax.set_xlabel("key/value heads per layer (32 query heads)")
ax.set_ylabel("KiB per token")
ax.set_ylim(0, 620)
ax.set_title("KV cache per token, 7B-style model (32 layers, fp16), measured from KVCache")
plt.show()

# %% [markdown]
# The cache per token is exactly proportional to the number of key/value heads, and it is the
# same number whether we multiply it out or ask the tensors. (The coloured bars are the three
# shapes named on their ticks, the grey ones the shapes between; MQA's cache for 4k tokens is
# 0.0625 GiB, 64 MiB.) The measurement agrees with
# [chapter 4](04_mqa_gqa.ipynb): half a mebibyte per token for MHA, 2 GiB for one 4k-token
# sequence, so eight such sequences (16 GiB) outweigh the model's 12.6 GiB of fp16 weights
# (6.7 billion parameters at 2 bytes each, counted in chapter 4);
# GQA-8 divides that by 4, MQA by 32. Every doubling of the context or of the batch doubles the
# cache, while the weights stay put. This is why long-context models share key/value heads, and
# why later chapters look at caches that do not grow with the context at all (a sliding window,
# [chapter 9](09_sliding_window.ipynb); a compressed latent,
# [chapter 13](13_latent_attention.ipynb); a fixed-size recurrent state,
# [chapter 11](11_linear_attention.ipynb)).

# %% [markdown]
# ## 9. The same model, from the package: `attnbook.model.GPT`
#
# `TinyLM` is written out in this chapter so that you can see every place a cache passes
# through. The package has the documented version of the same model, `attnbook.model.GPT`,
# configured by a `GPTConfig`: any attention variant by name and its options, any of the
# position schemes, `forward(idx, targets=None, caches=None)` returning `(logits, loss)`,
# `new_caches(batch_size, max_len)` giving one cache per block (the layer's own `new_cache`:
# for these variants, section 8's `KVCache`), and `generate(idx, max_new_tokens,
# temperature=1.0)`, which decodes with the cache (`use_cache=False` recomputes, like
# `generate_plain`). Its default `temperature=1.0` *samples* the next token from the softmax;
# `temperature=0` takes the most likely one, the greedy decoding of this chapter. It reads
# `start = caches[0].length` exactly as `TinyLM.forward` does.
#
# "The same" is a claim we can check. We build a `GPT` with `TinyLM`'s sizes and positions (read
# from `tiny.cfg`), copy `TinyLM`'s weights into it, and compare. Its parameters have the same
# shapes under other names (`blocks.0.attn.c_attn.weight` becomes
# `transformer.h.0.attn.c_attn.weight`: nanoGPT's and GPT-2's names), so renaming the keys of the
# `state_dict` is all the copying needs; `load_state_dict` is strict and would fail on a missing
# or extra tensor. One switch must be turned off: by default `GPT` **ties** its output layer to
# the token embedding (one matrix for both), where `TinyLM` has a separate `lm_head`. The two
# models then run the same operations on the same tensors in the same order, so we ask for
# equality to the last bit (`torch.equal`), not equality within a tolerance.

# %%
from attnbook.model import GPT, GPTConfig


def as_gpt(tiny):
    """A GPT with tiny's sizes and positions, holding a copy of tiny's weights."""
    config = GPTConfig(vocab_size=tiny.wte.num_embeddings, block_size=tiny.cfg.block_size,
                       n_layer=len(tiny.blocks), n_head=tiny.cfg.n_head, n_embd=tiny.cfg.n_embd,
                       positions=tiny.cfg.positions, tie_weights=False)  # tiny has its lm_head
    gpt = GPT(config).eval()  # its own initial weights, all replaced below
    renamed = {}
    for name, tensor in tiny.state_dict().items():
        if name != "lm_head.weight":  # wte.weight -> transformer.wte.weight, blocks.i -> h.i
            name = "transformer." + name.replace("blocks.", "h.", 1)
        renamed[name] = tensor
    gpt.load_state_dict(renamed)  # strict: the same tensors, every one of them
    return gpt


for tiny, plain in ((model, out_plain), (model_learned, plain_learned)):
    gpt = as_gpt(tiny)
    with torch.no_grad():
        logits_gpt, loss = gpt(plain)  # (B, 56, vocab), None: no targets
        same_full = torch.equal(logits_gpt, tiny(plain))  # a full pass, bit for bit
        ours, theirs = new_caches(tiny, prealloc(max_len=64)), gpt.new_caches(2, max_len=64)
        feeds = [prompt, *plain[:, 16:-1].split(1, dim=1)]  # the prefill, then 1 token a step
        same_cached = all(torch.equal(gpt(feed, caches=theirs)[0], tiny(feed, ours))
                          for feed in feeds)  # cached decoding, step by step
    same_tokens = torch.equal(gpt.generate(prompt, 40, temperature=0), plain)  # greedy
    assert same_full and same_cached and same_tokens
    print(f"{tiny.cfg.positions:>7}: GPT logits == TinyLM logits (torch.equal) on a full pass "
          f"{tuple(logits_gpt.shape)}: {same_full}, at every cached call (prefill + "
          f"{len(feeds) - 1} tokens): {same_cached}; greedy tokens equal: {same_tokens}")

# %% [markdown]
# The two compute the same function, bit for bit, and decode the same tokens with or without a
# cache. What `GPT` adds is what a model that is trained needs, none of which changes a forward
# pass here:
#
# - its own **initialisation**: every linear and embedding weight drawn from a normal
#   distribution with mean 0 and standard deviation $0.02$, $N(0, 0.02)$, as in
#   GPT-2, the projections that write into the residual stream smaller still, where `TinyLM`
#   keeps PyTorch's defaults (an `nn.Embedding` draws from $N(0, 1)$). A freshly built `GPT`
#   is therefore a *different* random model from a freshly built `TinyLM`; only after copying
#   the weights do they agree;
# - **weight tying** (`tie_weights=True`, its default), **dropout** (0 by default), a
#   cross-entropy `loss` when given `targets`, checks of its inputs with clear errors, and
#   sampling in `generate` (`temperature`, `top_k`, `top_p`);
# - no `attn_mask` argument: `TinyLM` passes one through for exercise 1's padding masks, a
#   case `GPT` leaves out.
#
# From here on the book's chapters use `GPT` as their small model, instead of assembling one of
# their own. [Chapter 17](17_training_a_gpt.ipynb) explains the rest of it — weight tying, the
# initialisation, dropout — and trains it.
#
# One consequence of the initialisation matters for the chapters that, like this one, test a
# cache on random weights. $N(0, 0.02)$ is meant for a model about to be trained; untrained,
# its attention scores are all small, each query spreads its attention almost evenly, and greedy
# decoding falls at once into repeating one token. A freshly built `GPT` (weights untouched) on
# section 1's prompts:

# %%
torch.manual_seed(0)
config = GPTConfig(vocab_size=256, block_size=512, n_layer=4, n_head=4, n_embd=128,
                   positions="rope")  # TinyLM's sizes; GPT's own N(0, 0.02) weights
fresh = GPT(config).eval()
for row in fresh.generate(prompt, 20, temperature=0)[:, 16:].tolist():  # greedy, 20 new tokens
    print(f"{len(set(row))} distinct token(s) in 20:", row)

# %% [markdown]
# `TinyLM`, with PyTorch's default initialisation, wrote varied tokens from the same prompts
# (section 1). A model that repeats one token whatever it attends to would hide a cache bug: a
# key at the wrong position would leave every generated token unchanged. So the chapters that
# test a cache on a random `GPT` ([chapter 9](09_sliding_window.ipynb),
# [chapter 10](10_sparse_attention.ipynb), [chapter 11](11_linear_attention.ipynb),
# [chapter 13](13_latent_attention.ipynb)) build it with `tie_weights=False` and give its linear
# layers and embeddings PyTorch's default initialisation (`module.reset_parameters()`), the one
# `TinyLM` has: sharper attention, varied tokens, and logits whose top two stay far apart
# compared with float rounding, so the tokens are the same on any CPU.

# %% [markdown]
# ## Check against the module
#
# The package's cache, `attnbook.kv_cache.KVCache` (section 8 measured its memory), is the
# design of our version 2: preallocated `(B, n_kv_head, max_len, head_dim)` keys and values,
# `append` returning views of everything so far, `length`, `reset()`, and a `ValueError` on
# overflow. Each attention layer makes one with `layer.new_cache(batch_size, max_len)`. We check
# three things:
#
# 1. fed the same key/value blocks, `KVCache` and `PreallocatedCache` store and return the same
#    tensors;
# 2. generating with the module's caches gives the same tokens as ours, and leaves the same keys
#    and values in every layer;
# 3. the module reports the same bytes per token, and overflows where ours does.

# %%
from attnbook.kv_cache import KVCache

torch.manual_seed(5)
mine = PreallocatedCache(2, 4, 32, max_len=20)
theirs = KVCache(2, 4, 32, max_len=20)
for T in (7, 1, 1, 5):  # a prefill, two single tokens, a chunk
    k_new, v_new = torch.randn(2, 4, T, 32), torch.randn(2, 4, T, 32)
    (k_a, v_a), (k_b, v_b) = mine.append(k_new, v_new), theirs.append(k_new, v_new)
    assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)
assert mine.length == theirs.length == 14

ours = new_caches(model, prealloc(max_len=64))
module_caches = [block.attn.new_cache(batch_size=2, max_len=64) for block in model.blocks]
out_ours = generate(model, prompt, n_new=40, caches=ours)
out_module = generate(model, prompt, n_new=40, caches=module_caches)
assert torch.equal(out_ours, out_module) and torch.equal(out_module, out_plain)
L = module_caches[0].length
for a, b in zip(ours, module_caches, strict=True):
    assert torch.allclose(a.k[:, :, :L], b.k[:, :, :L], atol=1e-5)
    assert torch.allclose(a.v[:, :, :L], b.v[:, :, :L], atol=1e-5)

per_layer = module_caches[0].bytes_per_token  # one sequence, one layer
assert per_layer * len(model.blocks) == tiny_bytes["mha"]
small = model.blocks[0].attn.new_cache(batch_size=1, max_len=4)
small.append(torch.zeros(1, 4, 3, 32), torch.zeros(1, 4, 3, 32))
try:
    small.append(torch.zeros(1, 4, 2, 32), torch.zeros(1, 4, 2, 32))
except ValueError as err:
    print("module overflow -> ValueError:", err)
print(f"KVCache == PreallocatedCache (same tensors, exact); module caches: same {L} cached "
      f"positions (atol=1e-5) and same tokens; {per_layer} bytes/token/layer: OK")

# %% [markdown]
# ## Summary
#
# - Without a cache, each generation step recomputes every earlier position in every layer,
#   although causality guarantees those results never change. The cache stores each layer's keys
#   and values so that each step processes only the new token; the whole generation then costs
#   one forward pass over the final sequence.
# - A cache is fed from the prefill (the whole prompt, or the prompt in chunks), then one token
#   per step. `cache.length` is the position of the next token: RoPE rotates from there, and
#   learned positions must be looked up from there.
# - New queries are the *last* `T` of `T_k` positions: the causal mask must be aligned
#   bottom-right (`causal_mask(T, T_k)`); `is_causal=True` would let a single query see only key 0.
# - A preallocated cache has a fixed `max_len`, an explicit overflow error and `reset()`.
# - The chapter's hand-written `TinyLM` computes, bit for bit, what the package's
#   `attnbook.model.GPT` computes, cached or not, once the weights are copied across; the later chapters use `GPT`.
# - Each cached step is cheap in arithmetic, but pays a fixed cost that the cache does not remove,
#   so for a small model the measured speed-up is far below the work saved.
# - The cache costs `2 · n_layer · n_kv_head · head_dim · bytes` per token of each sequence
#   ([chapter 4](04_mqa_gqa.ipynb)), as the bytes its tensors hold confirm. It quickly rivals the
#   weights; MQA and GQA shrink it by `n_head / n_kv_head`.

# %% [markdown]
# ## Further reading
#
# - Pope et al., *Efficiently Scaling Transformer Inference* (MLSys 2023): the KV cache's memory and
#   bandwidth at scale.
# - Kwon et al., *Efficient Memory Management for Large Language Model Serving with PagedAttention*
#   (SOSP 2023): vLLM's cache in pages.
# - Shazeer (2019), multi-query attention: shrinking the cache by sharing keys and values.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/07_kv_cache_solutions.ipynb`](solutions/07_kv_cache_solutions.ipynb). Predict first,
# then check with code.
#
# 1. **Prompts of different lengths in one batch.** Generate for two prompts of lengths 5 and 11
#    in one batch. (a) Pad the short one on the *right* and generate as usual: what goes wrong,
#    and where does the new token land? (b) Pad it on the *left* instead, and pass a key padding
#    mask (`attn_mask` of shape `(B, 1, 1, T_k)`, `True` at real tokens, growing with the cache)
#    through `TinyLM.forward`. Show that with RoPE each row then generates exactly the tokens it
#    generates alone. Why does RoPE make left padding harmless, and would learned positions?
# 2. **A sliding cache.** Write a cache that keeps only the last `W` positions (drop the oldest
#    when full) but whose `length` keeps counting, so RoPE still rotates at the true position.
#    With `W = 32` and a 16-token prompt, find the first step at which its logits differ from
#    full-cache decoding, and predict it before you run. Why is a rolling cache *not* exact for a
#    model built with full attention — and for what kind of model would it be exact? What does
#    your cache give the queries of a chunk of several tokens appended at once?
# 3. **A bf16 cache.** A cache may store a lower precision than the model computes in:
#    `layer.new_cache(batch_size, max_len, dtype=torch.bfloat16)` on this fp32 model rounds every
#    appended key and value to bfloat16, and the layer casts them back to fp32 when it reads them.
#    How much memory does that save? Predict the largest relative rounding error of a stored
#    number, then measure it, the largest logit error over 64 decoding steps against the fp32
#    cache (on the same inputs), and whether any greedy token changes. Up to which step can you
#    be sure, from the fp32 run and the size of the error alone, that none does?
# 4. **Count the FLOPs saved.** Write the number of matrix-multiply FLOPs of generating `N`
#    tokens after a `P`-token prompt, with and without the cache, as a formula in `P`, `N`,
#    `n_embd`, `n_layer` and the vocabulary size. Check it exactly with
#    `torch.utils.flop_counter.FlopCounterMode` on a model built with `impl="reference"`. What is
#    the ratio for `P = 16, N = 256`, and which term dominates without the cache?
