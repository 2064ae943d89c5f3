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
# # Chapter 9 — Sliding-window attention
#
# Every attention layer so far lets each position look at *every* earlier position. For a
# sequence of $T$ tokens that is $T(T+1)/2$ query-key scores per head and per layer, a cost that
# grows with the square of the length; and during generation the KV cache of
# [chapter 7](07_kv_cache.ipynb) keeps one key and one value per position, forever, so it grows
# without bound as well.
#
# **Sliding-window attention** (also called *local* attention) makes one change: a query may
# look back only a fixed number of positions, the **window** $w$. Each query then sees at most
# $w$ keys, whatever the length of the sequence, so the work grows like $T \cdot w$ and a cache
# of $w$ positions is enough to generate. Longformer (Beltagy, Peters and Cohan, 2020) used
# sliding windows, combined with a few "global" positions that see everything, to read long
# documents; Mistral 7B (Jiang et al., 2023) used a window of 4096 tokens in every layer, with a
# "rolling buffer" cache of 4096 positions; later models such as Gemma 2 alternate local and
# global layers.
#
# A window looks like a severe restriction — can a model with a window of 4096 not see token 5000
# back? — but layers stack: what one layer's window cannot reach directly, the next layer can
# reach through a neighbour that has already gathered it. We measure that, and then build the two
# pieces that make the window actually *cheaper*: a blocked computation that never forms the
# $T \times T$ score matrix, and a rolling cache.
#
# **Learning goals**
#
# - Build the band mask by hand, draw it next to the causal triangle, and use it in dense
#   attention; check it against `attnbook.attention.sliding_window_mask`.
# - Predict how far back information travels through $L$ layers of window $w$, namely
#   $L(w-1)$ positions, and check it twice: by composing masks, and with gradients through a
#   random stack of `LocalAttention` layers.
# - Build the blocked computation step by step (chunks of $w$ queries against a $(w, 2w)$ band of
#   keys), check that it equals the dense path, count the scores it computes ($\approx 2Tw$
#   against $T^2/2$), and time it against full causal attention.
# - Build a rolling KV cache that keeps only the last $w$ positions, explain why keys rotated by
#   RoPE at their true positions need no fixing when old keys drop out, and show that generation
#   with it gives exactly the tokens of full recomputation while its memory stays flat.

# %% [markdown]
# ## Setup
#
# As in earlier chapters we seed every random draw and print only shapes, integers, booleans and
# rounded numbers; timings vary by machine and are not checked. Every
# tensor in this chapter is small, and small tensors gain nothing from a second CPU thread (the
# threads spend more time waiting for each other than computing), so, as in
# [chapter 4](04_mqa_gqa.ipynb), the whole notebook runs on one thread. That also keeps the timings
# of section 6 steadier when other programs compete for the cores.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle
from torch import nn
from tqdm import tqdm

from attnbook.attention import (
    AttentionConfig,
    build_attention,
    causal_mask,
    sdpa,
    sdpa_reference,
    sliding_window_mask,
)
from attnbook.kv_cache import KVCache
from attnbook.model import GPT, GPTConfig

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. What a window saves
#
# Count the query-key pairs one head of one layer scores. With full causal attention, query $i$
# sees keys $0 \ldots i$: $i + 1$ of them, $T(T+1)/2$ in all. With a window of $w$, query $i$
# sees keys $i - w + 1 \ldots i$ — itself and the $w - 1$ before it — so $\min(i + 1, w)$ keys.
# (Papers differ by one in what "window" counts; in this book the window includes the query's
# own position, as in `attnbook`.) The first $w$ queries see as much as with full attention;
# every later query sees exactly $w$. For generation, what matters is how many positions must
# stay cached: all $T$, or the last $w$.
#
# With Mistral's window of 4096:

# %%
def causal_pairs(T):
    return T * (T + 1) // 2


def band_pairs(T, w):
    """Query-key pairs a causal window of w allows in T positions: the sum of min(i + 1, w)."""
    if T <= w:
        return causal_pairs(T)
    return causal_pairs(w) + (T - w) * w


w_mistral = 4096
print(f"{'T':>7} {'full causal pairs':>17} {'window pairs':>13} {'ratio':>6} "
      f"{'cached positions':>17}")
for T in (4096, 8192, 32768, 131072):
    full, band = causal_pairs(T), band_pairs(T, w_mistral)
    print(f"{T:>7,} {full:>17,} {band:>13,} {full / band:>6.1f} {T:>8,} -> {min(T, w_mistral):>5,}")

# %% [markdown]
# Up to the window, nothing changes. Beyond it the saving grows in proportion to $T$: at 32k
# tokens a quarter of the scores, at 128k about a sixteenth, and the cache is capped at 4096
# positions. The rest of the chapter makes these numbers real: a computation whose work really
# follows the window, and a cache that really stops growing.
#
# ## 2. The band mask
#
# [Chapter 2](02_scaled_dot_product_attention.ipynb) built the causal mask with `tril`: query $i$
# may see key $j$ when $j \le i$. Written with positions, let `distance = i - j` be how far key $j$
# lies behind query $i$; the causal mask allows `distance >= 0`. The band adds one more condition,
# `distance < w`, so the allowed keys of each query are a stripe of width $w$ ending on the
# diagonal:

# %%
T, w = 12, 4
i = torch.arange(T)[:, None]  # (T, 1): query positions
j = torch.arange(T)[None, :]  # (1, T): key positions
distance = i - j  # (T, T): how far key j lies behind query i
band = (distance >= 0) & (distance < w)  # (T, T), True = may attend
print(band.int())
print("keys per query:", band.sum(dim=1).tolist())
print("equals sliding_window_mask(T, T, w):", torch.equal(band, sliding_window_mask(T, T, w)))

# %% [markdown]
# Query 0 sees one key, query 1 two, query 2 three, and from query 3 on every query sees exactly
# $w = 4$: itself and three predecessors. `attnbook.attention.sliding_window_mask(t_q, t_k, w)`
# builds the same boolean matrix (`True` = may attend, the book's convention since
# [chapter 2](02_scaled_dot_product_attention.ipynb)). Like `causal_mask` it is *bottom-right
# aligned*: with fewer queries than keys, as during cached decoding, the queries are the last `t_q`
# positions. The last 3 rows of our band are what 3 new queries at the end of 12 keys see:

# %%
print("sliding_window_mask(3, 12, 4) == last 3 rows of the band:",
      torch.equal(sliding_window_mask(3, 12, 4), band[-3:]))

# %% [markdown]
# Side by side with the causal triangle, for 16 positions and a window of 4:

# %%
T_fig, w_fig = 16, 4
masks = {
    f"causal: {int(causal_mask(T_fig).sum())} pairs": causal_mask(T_fig),
    f"window w={w_fig}: {int(sliding_window_mask(T_fig, T_fig, w_fig).sum())} pairs":
        sliding_window_mask(T_fig, T_fig, w_fig),
}
fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
for ax, (title, mask) in zip(axes, masks.items(), strict=True):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4)
    ax.set_title(title)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_xticks(range(0, T_fig, 3))
    ax.set_yticks(range(0, T_fig, 3))
fig.suptitle("Which keys each query may attend to (blue = allowed)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The triangle grows with every row; the band keeps the same width once it has left the top-left
# corner. Sixteen positions hide the difference in cost; at 32k positions the triangle holds
# four times as many pairs, as the table above said.
#
# ## 3. Attention with the band
#
# The simplest sliding-window attention is ordinary attention with the band as its mask, exactly
# as [chapter 2](02_scaled_dot_product_attention.ipynb) used the causal mask. We take random
# queries, keys and values (one sequence, two heads of size 8) and run the reference path, which can
# return the weights:

# %%
torch.manual_seed(1)
B, H, hd = 1, 2, 8
q, k, v = torch.randn(3, B, H, T, hd).unbind(0)  # each (B, H, T, hd)
y_band, weights = sdpa_reference(q, k, v, attn_mask=band, return_weights=True)
print("output", tuple(y_band.shape), "| weights", tuple(weights.shape))
print("weights of head 0 on keys 2..9, queries 6..8:")
print(f"{'key':>9}:", " ".join(f"{j:>4}" for j in range(2, 10)))
for r in range(6, 9):
    row = weights[0, 0, r, 2:10].tolist()  # query r's weights on keys 2..9
    print(f"{'query ' + str(r):>9}:", " ".join(f"{p:4.2f}" for p in row))
print("all zero outside the band:", bool((weights[..., ~band] == 0).all()))
print("each row sums to 1:", torch.allclose(weights.sum(dim=-1), torch.ones(B, H, T)))
y_fast = sdpa(q, k, v, attn_mask=band)  # F.scaled_dot_product_attention with a boolean mask
print("fast path agrees (atol=1e-5):", torch.allclose(y_fast, y_band, atol=1e-5))

# %% [markdown]
# Each row spreads its weight over its 4 allowed keys and nothing else: query 6, for instance, sees
# keys 3 to 6 and gives key 3 the most, 0.76, while keys 2 and 7 get exactly 0. The practical
# meaning: a key older than the window cannot affect a query at all. Change the key and value at
# position 2 and see which outputs move — the prediction is queries 2, 3, 4 and 5, the four queries
# whose window contains position 2:

# %%
k2, v2 = k.clone(), v.clone()
k2[:, :, 2] += 1.0
v2[:, :, 2] += 1.0
diff = (sdpa(q, k2, v2, attn_mask=band) - y_band).abs().amax(dim=(0, 1, 3))  # (T,)
print("queries whose output changed:", (diff > 1e-6).nonzero().flatten().tolist())

# %% [markdown]
# This dense version is correct, and it is the reference everything later in the chapter is
# checked against, but it saves nothing: it still scores all $T^2$ pairs and only then throws
# most of them away. (Section 6 measures it: at short lengths SDPA with a dense window mask
# takes about as long as plain causal SDPA, sometimes a little less; as $T$ grows it falls
# behind, since causal SDPA can at least skip the upper triangle.)
# Section 5 fixes that. First, the question everybody asks about a window.
#
# ## 4. How far back can a stack of windows see?
#
# One layer with window $w$ mixes into position $i$ only positions $i - w + 1 \ldots i$. But the
# next layer's query at $i$ reads the *outputs* of the first layer at those positions, and the
# output at position $i - w + 1$ already carries information from as far back as
# $i - 2(w - 1)$. Every layer adds $w - 1$ positions of reach. After $L$ layers, position $i$
# can be influenced by inputs back to position $i - L(w - 1)$.
#
# We can compute this without any network: "after $L$ layers, input $j$ can influence output
# $i$" is a boolean matrix `reach`, and one more layer composes it with the band — output $i$
# reads positions $m$ in its band, each of which was reached from inputs `reach[m]`. That is a
# matrix product in which "and/or" replace "times/plus", which for 0/1 matrices we get from an
# integer product followed by `> 0`. The residual connection (`x + attn(x)`) lets position $i$
# keep its own information too, but the band already contains the diagonal, so it adds nothing
# to `reach`; MLPs act on each position separately and add nothing either.

# %%
T_rf, w_rf, L_max = 40, 5, 6
band_rf = sliding_window_mask(T_rf, T_rf, w_rf).long()  # (T, T) as 0/1 integers
reach = torch.eye(T_rf, dtype=torch.int64)  # 0 layers: each output is its own input
earliest = []
for _ in range(L_max):  # one more layer each time
    reach = ((band_rf @ reach) > 0).long()  # (T, T): reach[i, j] = input j can affect output i
    earliest.append(int(reach[-1].nonzero().min()))
predicted = [T_rf - 1 - depth * (w_rf - 1) for depth in range(1, L_max + 1)]
print(f"window {w_rf}: earliest input reaching output {T_rf - 1}, by depth:", earliest)
print("predicted  (T - 1) - L (w - 1):                   ", predicted)
assert earliest == predicted

# %% [markdown]
# The mask algebra agrees with the argument. A stronger check runs a real network: a stack of
# `attnbook` `LocalAttention` layers (built by name, `"local"`, with RoPE, random weights),
# each added to the residual stream. If input $j$ can influence the output at the last position,
# the gradient of that output with respect to input $j$ is (for random weights) not zero; if it
# cannot, the gradient is *exactly* zero, because masked scores get exactly zero weight and pass
# exactly zero gradient. So we measure the gradient of one random projection of the last output
# with respect to every input position, after 1 to 6 layers.

# %%
torch.manual_seed(2)
cfg_rf = AttentionConfig(n_embd=32, n_head=4, block_size=64, positions="rope")
stack = nn.ModuleList(build_attention("local", cfg_rf, window=w_rf) for _ in range(L_max))
print(type(stack[0]).__name__, "window", stack[0].options.window)

x_rf = torch.randn(1, T_rf, 32, requires_grad=True)
probe = torch.randn(32)  # a fixed random direction of the last output
influence = torch.zeros(L_max, T_rf)  # (depth, input position): |d output / d input|
for depth in range(1, L_max + 1):
    h = x_rf
    for layer in stack[:depth]:
        h = h + layer(h)  # (1, T, 32): residual stream
    (grad,) = torch.autograd.grad(h[0, -1] @ probe, x_rf)  # (1, T, 32)
    influence[depth - 1] = grad[0].norm(dim=-1)

measured = [int((row > 0).nonzero().min()) for row in influence]
print("earliest input with a nonzero gradient, by depth:", measured)
assert measured == predicted
assert all(bool((row[p:] > 0).all()) for row, p in zip(influence, predicted, strict=True))

# %% [markdown]
# The gradients find exactly the predicted boundary: nothing before it, and every position after
# it (the second `assert`: no holes). The picture shows more than the boundary, the *size* of the
# influence, on a log scale:

# %%
log_influence = torch.log10(influence).masked_fill(influence == 0, float("nan"))
fig, ax = plt.subplots(figsize=(9, 3.6))
im = ax.imshow(log_influence, aspect="auto", cmap="viridis",
               extent=(-0.5, T_rf - 0.5, L_max + 0.5, 0.5))
edge_x = [p - 0.5 for p in predicted for _ in range(2)]  # left edge of each row's region
edge_y = [depth + dy for depth in range(1, L_max + 1) for dy in (-0.5, 0.5)]
ax.plot(edge_x, edge_y, color="C3", lw=2, label=f"predicted limit: {T_rf - 1} - L·({w_rf} - 1)")
ax.set_xlabel("input position j")
ax.set_ylabel("number of layers L")
ax.set_title(f"Influence of each input on the output at position {T_rf - 1} "
             f"(window {w_rf}; white = exactly zero)")
fig.colorbar(im, ax=ax, label="log10 |d output / d input|")
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# Two things to read off. The reachable region grows by $w - 1 = 4$ positions per layer, as
# predicted. And the influence fades with distance: an input $L(w-1)$ positions back reaches the
# output only along one path, through $L$ attention steps of weight roughly $1/w$ each, while
# nearby inputs have many paths. The receptive field is a ceiling on what the model *can* use,
# not a promise that it does; a trained model must learn to relay information that far.
#
# For Mistral 7B, 32 layers with a window of 4096 give a reach of $32 \times 4095 = 131{,}040$
# positions in our convention — the "theoretical attention span of about 131K tokens" its paper
# quotes.
#
# ## 5. The blocked computation
#
# Now the part that makes the window pay. We want to compute only scores near the band, and do
# it with a few large matrix products instead of $T$ small ones (a Python loop over queries
# would be far slower than one dense product).
#
# The trick: cut the queries into **chunks of $w$** consecutive positions. Chunk $c$ holds
# queries $cw \ldots cw + w - 1$. Its first query reaches back to $cw - (w - 1)$, its last only
# to itself, so every key the chunk needs lies in **key chunk $c - 1$ or key chunk $c$**: a tile
# of $w$ queries by $2w$ keys. Chunk 0 has no previous chunk; we pretend it has one by putting
# $w$ padding keys in front of the sequence, and mask them out. Drawn on the band:

# %%
n_fig = T_fig // w_fig
picture = torch.zeros(T_fig, w_fig + T_fig)  # key columns -w .. T-1; 0 = masked
picture[:, :w_fig] = 1  # the padding keys in front
picture[:, w_fig:] = 2 * sliding_window_mask(T_fig, T_fig, w_fig)  # 2 = in the band
fig, ax = plt.subplots(figsize=(8, 5))
ax.imshow(picture, cmap=ListedColormap(["white", "0.85", "C0"]), vmin=0, vmax=2,
          extent=(-w_fig - 0.5, T_fig - 0.5, T_fig - 0.5, -0.5))
for c in range(n_fig):
    ax.add_patch(Rectangle(((c - 1) * w_fig - 0.5, c * w_fig - 0.5), 2 * w_fig, w_fig,
                           fill=False, edgecolor="C3", lw=2.5))
    ax.text((c + 1) * w_fig - 0.3, c * w_fig + w_fig / 2 - 0.5, f"chunk {c}", color="C3",
            va="center")
ax.set_xticks(range(-w_fig, T_fig, 2))
ax.set_xlabel("key position (negative = padding keys)")
ax.set_ylabel("query position")
ax.set_title(f"The band (blue) inside one ({w_fig}, {2 * w_fig}) tile per chunk of queries "
             f"(red); grey = padding")
plt.show()

# %% [markdown]
# The red tiles cover the blue band completely, and together they hold $n \cdot w \cdot 2w$
# entries for $n = T/w$ chunks: $2Tw$, linear in $T$.
#
# Inside a tile, number the queries $r = 0 \ldots w-1$ (query position $cw + r$) and the keys
# $l = 0 \ldots 2w-1$ (key position $(c-1)w + l$). The distance from query to key is
# $(cw + r) - ((c-1)w + l) = w + r - l$, which does **not depend on $c$**: every chunk uses the
# same $(w, 2w)$ band mask.

# %%
def tile_mask(w):
    """The (w, 2w) band of every chunk: query r of the chunk against key l of the tile."""
    r = torch.arange(w)[:, None]  # (w, 1)
    l = torch.arange(2 * w)[None, :]  # (1, 2w)
    distance = w + r - l  # (w, 2w): how far key l lies behind query r
    return (distance >= 0) & (distance < w)


print(tile_mask(4).int())

# %% [markdown]
# Query $r$ sees keys $r + 1 \ldots r + w$ of its tile: the last $w - r - 1$ keys of the previous
# chunk and the first $r + 1$ of its own. So each row uses $w$ of its $2w$ entries: half of every
# tile is computed and then masked, the price of doing every chunk with the same regular shape.
#
# **Step 1: a loop over chunks.** For the moment $T$ is a multiple of $w$. We pad $w$ zero keys
# and values in front, so that the tile of chunk $c$ is the slice $[cw, cw + 2w)$ of the padded
# keys, and switch off the padding columns for chunk 0. (`F.pad` lists the padding of the *last*
# dimension first: `(0, 0, w, 0)` leaves `head_dim` alone and adds $w$ positions in front.) We
# test it on the queries, keys and values of section 3 ($T = 12$, $w = 4$), whose dense band
# output `y_band` we already have:

# %%
def blocked_loop(q, k, v, w):
    """Sliding-window attention, one chunk of w queries at a time (T a multiple of w)."""
    B, H, T, hd = q.shape
    assert T % w == 0, "step 1 handles whole chunks only"
    k_pad = F.pad(k, (0, 0, w, 0))  # (B, H, w + T, hd): w padding keys in front
    v_pad = F.pad(v, (0, 0, w, 0))
    outputs = []
    for c in range(T // w):
        q_c = q[:, :, c * w : (c + 1) * w]  # (B, H, w, hd): this chunk's queries
        k_c = k_pad[:, :, c * w : (c + 2) * w]  # (B, H, 2w, hd): key chunks c - 1 and c
        v_c = v_pad[:, :, c * w : (c + 2) * w]
        mask = tile_mask(w)  # (w, 2w)
        if c == 0:
            mask[:, :w] = False  # the padding keys are not real
        outputs.append(sdpa(q_c, k_c, v_c, attn_mask=mask))  # (B, H, w, hd)
    return torch.cat(outputs, dim=2)  # (B, H, T, hd)


y_loop = blocked_loop(q, k, v, w)
print("blocked loop == dense band attention (atol=1e-5):",
      torch.allclose(y_loop, y_band, atol=1e-5))

# %% [markdown]
# **Step 2: all chunks in one call.** The loop body is the same for every chunk, so the chunks
# can become one more batch dimension. The queries reshape directly into `(B, H, n, w, hd)`.
# For the keys we want, for each chunk, the $2w$ keys of chunks $c - 1$ and $c$: cut the padded
# keys into $n + 1$ chunks, and concatenate "all but the last" with "all but the first" along the
# position axis. (That copies the keys and values into tiles twice their size, since every key
# chunk appears in two tiles: a memory cost linear in $T$.) One call to SDPA then handles every
# chunk: `F.scaled_dot_product_attention` works on the last two dimensions and treats every
# dimension before them as a batch dimension, so `(B, H, n)` are all batch dimensions to it, and
# a mask of shape `(n, w, 2w)` broadcasts over $B$ and $H$ — one mask for all chunks, with only
# chunk 0's padding columns switched off.
#
# **Step 3: any length.** When $T$ is not a multiple of $w$, pad the queries (and keys) at the
# end up to a whole number of chunks and drop the extra outputs. The padding keys at the end lie
# in the future of every real query, so the band already hides them.

# %%
def blocked(q, k, v, w):
    """Sliding-window attention in O(T * w): every chunk of w queries against 2w keys at once."""
    B, H, T, hd = q.shape
    n = -(-T // w)  # number of chunks, rounding up
    pad = n * w - T  # queries added at the end to make whole chunks
    q = F.pad(q, (0, 0, 0, pad)).view(B, H, n, w, hd)  # (B, H, n, w, hd)

    def tiles(x):  # (B, H, T, hd) -> (B, H, n, 2w, hd): key chunks c - 1 and c for every c
        x = F.pad(x, (0, 0, w, pad)).view(B, H, n + 1, w, hd)  # (B, H, n + 1, w, hd)
        return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)  # (B, H, n, 2w, hd)

    k, v = tiles(k), tiles(v)
    not_padding = torch.ones(n, 2 * w, dtype=torch.bool)  # (n, 2w)
    not_padding[0, :w] = False  # chunk 0's "previous chunk" is padding
    mask = tile_mask(w) & not_padding[:, None, :]  # (n, w, 2w), broadcast over B and H
    y = sdpa(q, k, v, attn_mask=mask)  # (B, H, n, w, hd)
    return y.view(B, H, n * w, hd)[:, :, :T]  # (B, H, T, hd)


n_chunks = -(-T // w)
print(f"T={T}, w={w}: {n_chunks} chunks; query chunks (B, H, n, w, hd) =", (B, H, n_chunks, w, hd),
      "| key tiles (B, H, n, 2w, hd) =", (B, H, n_chunks, 2 * w, hd))
print("blocked == dense band attention (atol=1e-5):", torch.allclose(blocked(q, k, v, w), y_band,
                                                                      atol=1e-5))

# %% [markdown]
# One check at one size is not much. We compare against the dense band at lengths that are and
# are not multiples of the window, including sequences shorter than one window and a window of 1:

# %%
torch.manual_seed(3)
for T_c, w_c in [(12, 4), (13, 4), (3, 4), (50, 7), (64, 16), (9, 1), (100, 33)]:
    q_c, k_c, v_c = torch.randn(3, 2, 3, T_c, 16).unbind(0)  # (B=2, H=3, T, 16) each
    dense = sdpa_reference(q_c, k_c, v_c, attn_mask=sliding_window_mask(T_c, T_c, w_c))
    assert torch.allclose(blocked(q_c, k_c, v_c, w_c), dense, atol=1e-5), (T_c, w_c)
print("blocked == dense band attention for 7 (T, w) pairs (atol=1e-5)")

# %% [markdown]
# **How much work?** Count the score entries each method fills, per head and per layer:
#
# - dense attention with a band mask: all $T^2$;
# - full causal attention with a fused kernel: about $T^2/2$ (it skips the tiles above the
#   diagonal; we count the exact triangle $T(T+1)/2$);
# - the blocked path: $n \cdot w \cdot 2w \approx 2Tw$, of which only the band is useful.

# %%
w_cost = 64
print(f"window {w_cost}")
print(f"{'T':>6} {'dense T^2':>11} {'causal':>11} {'blocked':>9} {'useful':>9} "
      f"{'blocked / causal':>16}")
for T_c in (256, 512, 1024, 2048, 4096, 8192):
    n = -(-T_c // w_cost)
    blocked_entries = n * w_cost * 2 * w_cost
    print(f"{T_c:>6} {T_c * T_c:>11,} {causal_pairs(T_c):>11,} {blocked_entries:>9,} "
          f"{band_pairs(T_c, w_cost):>9,} {blocked_entries / causal_pairs(T_c):>16.3f}")

# %% [markdown]
# The blocked path fills $2Tw$ entries, twice what the band needs, so at short lengths it does
# *more* work than causal attention: below $T = 4w$ (here 256) there is nothing to gain, and at
# $T = 4w$ the two are even. Beyond that the ratio halves with every doubling of $T$: at 2048
# positions the blocked path fills an eighth of the causal scores, at 8192 a thirty-second.
#
# **The module's version.** `attnbook.attention.local.blocked_local_attention(q, k, v, window)`
# is this function, with three additions the full layer needs: grouped-query attention (fewer
# key/value heads, as in [chapter 4](04_mqa_gqa.ipynb)), an optional ALiBi bias (which, like the
# band, depends only on the distance `w + r - l`), and up to $w - 1$ extra keys *before* the first
# query. Those come from the rolling cache of section 7: when a chunk of several new tokens arrives
# during generation, its first query still needs the $w - 1$ positions before it. With $P$ such
# keys, the function pads $w - P$ keys in front instead of $w$, and the same tiles line up. We check
# both uses against the dense band:

# %%
from attnbook.attention.local import blocked_local_attention

torch.manual_seed(4)
q_m, k_m, v_m = torch.randn(3, 2, 4, 50, 16).unbind(0)  # (B=2, H=4, T=50, 16) each
dense = sdpa_reference(q_m, k_m, v_m, attn_mask=sliding_window_mask(50, 50, 8))
mod = blocked_local_attention(q_m, k_m, v_m, window=8)
print("module == ours == dense (atol=1e-5):",
      torch.allclose(mod, blocked(q_m, k_m, v_m, 8), atol=1e-5)
      and torch.allclose(mod, dense, atol=1e-5))

P = 5  # keys before the first query, as a rolling cache provides
mod_p = blocked_local_attention(q_m[:, :, P:], k_m, v_m, window=8)  # 45 queries, 50 keys
dense_p = sdpa_reference(q_m[:, :, P:], k_m, v_m, attn_mask=sliding_window_mask(45, 50, 8))
print(f"{P} cached keys before 45 queries: module == dense band (atol=1e-5):",
      torch.allclose(mod_p, dense_p, atol=1e-5))

# %% [markdown]
# ## 6. Is it faster?
#
# Counting entries is the theory; now the clock. We time forward plus backward (what training
# pays) of three ways to compute one layer's attention core, on one sequence with 8 heads of 64
# and a window of 64, at lengths 256 to 2048:
#
# - full causal attention, `sdpa(q, k, v, is_causal=True)` — what the window should beat;
# - the band as a dense mask, `sdpa(q, k, v, attn_mask=band)`;
# - the blocked path, `blocked_local_attention`.
#
# The numbers depend on your machine and on what else runs on it, so the cell's output is not
# checked by the book's tests; the cell asserts a loose claim instead (the blocked path at the
# longest length takes less than 0.8 of full causal attention's time), so that a lost speed-up
# still fails. We time on one thread (set in Setup), run each method once to warm up, and keep
# the fastest of three runs, which filters out most interruptions by other programs.

# %%
def fwd_bwd_ms(fn, inputs, repeats=3):
    """Fastest of `repeats` runs of fn(*inputs).sum().backward(), in ms, after one warm-up run."""
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn(*inputs).sum().backward()
        if i > 0:  # run 0 warms up
            best = min(best, 1000 * (time.perf_counter() - t0))
    return best


# %% tags=["nbval-ignore-output"]
torch.manual_seed(5)
w_time, lengths = 64, [256, 512, 1024, 2048]
methods = {  # each takes (q, k, v, band); only the dense one reads the band
    "full causal (SDPA, is_causal)": lambda q, k, v, m: sdpa(q, k, v, is_causal=True),
    "band as a dense mask (SDPA)": lambda q, k, v, m: sdpa(q, k, v, attn_mask=m),
    "blocked (blocked_local_attention)": lambda q, k, v, m: blocked_local_attention(q, k, v, w_time),
}
ms = {name: [] for name in methods}
for T_t in tqdm(lengths, desc="timing"):  # a progress bar while it runs
    q_t, k_t, v_t = (torch.randn(1, 8, T_t, 64, requires_grad=True) for _ in range(3))
    band_t = sliding_window_mask(T_t, T_t, w_time)  # (T, T)
    for name, attend in methods.items():
        ms[name].append(fwd_bwd_ms(attend, (q_t, k_t, v_t, band_t)))

fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (name, times), style in zip(ms.items(), ["o-", "s--", "^-"], strict=True):
    ax.plot(lengths, times, style, label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length T")
ax.set_ylabel("forward + backward, ms (fastest of 3)")
ax.set_title(f"Attention core, B=1, 8 heads of 64, window {w_time}, CPU, 1 thread")
ax.legend()
plt.show()
for i_t, T_t in enumerate(lengths):
    print(f"T={T_t:>5}: " + "   ".join(f"{t[i_t]:7.1f} ms" for t in ms.values()))
ratio = ms["blocked (blocked_local_attention)"][-1] / ms["full causal (SDPA, is_causal)"][-1]
print(f"blocked / full causal at T={lengths[-1]}: {ratio:.2f}")
assert ratio < 0.8, "the blocked path should be clearly faster than full causal attention"

# %% [markdown]
# What to expect (your numbers will differ, and a busy machine makes single points jump, but the
# shape should not): on log-log axes, full causal attention rises more steeply, towards a slope of
# 2 at long lengths — doubling $T$ about quadruples its time — while the blocked path rises with
# a slope close to 1. At the shortest length they are within a small factor of each other (we
# counted that they fill about as many scores at $T = 4w$), and at 2048 the blocked path is
# several times faster. The blocked path can be faster already at $T = 4w$ (it was in some of
# our runs), because counting scores ignores everything else a kernel pays for; the break-even of section 5 is a count, not a timing. The dense mask gains
# nothing from the window: at the shortest length it takes about as long as causal attention
# (sometimes a little less, sometimes a little more), and as $T$ grows it falls behind, because
# it pays for all $T^2$ scores — the fused kernel cannot skip anything, since it does not know
# the mask is a band. A sliding window needs its own computation to be cheaper; a mask alone
# only makes it *different*.
#
# ## 7. Generating with a rolling cache
#
# ### 7.1 Why `w` positions are enough
#
# During generation the newest query sits at position $p$ and may see keys $p - w + 1 \ldots p$.
# Later queries sit further right, so they reach back even less far: the key at position
# $p - w + 1$ is read for the last time now. After each step, the oldest cached position can be
# thrown away, and a cache of $w$ positions suffices forever.
#
# Strictly, $w - 1$ cached positions would do: the new token brings its own key, so a query
# needs from the cache only the $w - 1$ positions before it. Mistral 7B's *rolling buffer* holds
# $w$ slots because it writes the new token's key and value into the buffer *before* the query
# attends, and then reads the whole buffer: position $i$ goes to slot $i \bmod w$, overwriting the
# position $w$ steps older. Our caches store $w$ positions too, so that their sizes are Mistral's
# (the memory table of section 7.4 counts $w$), but they keep the slots in order, oldest first,
# instead of at $i \bmod w$. That costs a copy of the kept positions at every append; in return
# the keys a cache returns are in position order, newest last, so the bottom-right band mask of
# section 2 applies to them as it is, without re-indexing the slots.
#
# A chunk of several new tokens (the prompt, or a chunk of it) needs a little more care: its
# first query still needs the $w - 1$ positions before it, and its later queries need the
# chunk's own earlier keys. So `append` returns the last $w - 1$ cached positions followed by all
# new ones, and the attention applies the bottom-right band mask (for more than $w$ queries, the
# blocked path with $P \le w - 1$ keys in front, as in section 5). Only then does the cache keep
# its last $w$ positions.
#
# **What about positions?** With RoPE ([chapter 6](06_positions.ipynb)) a layer rotates each key at
# its position *before* it is cached ([chapter 7](07_kv_cache.ipynb): `rope(k, start)` with
# `start = cache.length`), and a score depends only on the difference between the query's and the
# key's positions. A key that stays in the cache keeps its rotation; a key that drops out is never
# read again. Nothing needs to be re-rotated when the buffer rolls, on one condition: the cache's
# `length` must keep counting *every* position seen so far — it is the position of the next token,
# not the number of slots in use. The slots are just storage.
#
# ### 7.2 A rolling cache
#
# Our version keeps the storage in order, oldest first, and grows it with `torch.cat` like
# [chapter 7](07_kv_cache.ipynb)'s first cache, trimming it to the last `window` positions after
# each append. The attention layers only ever touch a cache through `length` and `append`
# ([chapter 7](07_kv_cache.ipynb)), so it plugs into `attnbook` layers as it is.

# %%
class RollingCache:
    """The keys and values of the last `window` positions of one layer, oldest first."""

    def __init__(self, window):
        self.window = window
        self.length = 0  # every position seen so far: the position of the next token
        self.k = self.v = None  # (B, n_kv_head, <= window, hd) once something is cached

    def append(self, k, v):  # k, v: (B, n_kv_head, T_new, hd), already rotated by RoPE
        if self.k is None:
            k_all, v_all = k, v
        else:
            n_old = min(self.k.shape[2], self.window - 1)  # what the first new query may see
            first = self.k.shape[2] - n_old
            k_all = torch.cat([self.k[:, :, first:], k], dim=2)  # (B, n_kv_head, n_old + T_new, hd)
            v_all = torch.cat([self.v[:, :, first:], v], dim=2)
        self.k, self.v = k_all[:, :, -self.window :], v_all[:, :, -self.window :]  # keep w
        self.length += k.shape[2]
        return k_all, v_all  # what the new queries may need

    @property
    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


# %% [markdown]
# First on one `LocalAttention` layer (window 4, RoPE): run 20 positions through it at once,
# without a cache; then feed the same inputs through a rolling cache in pieces of 3, 1, 1, 1, 7,
# then 1 at a time. The piece of 7 is longer than the window, so the layer takes its blocked path,
# with 3 cached keys in front of the 7 new queries. The outputs must agree, and the cache must
# never hold more than 4 positions.

# %%
torch.manual_seed(6)
cfg_one = AttentionConfig(n_embd=32, n_head=4, block_size=64, positions="rope")
layer = build_attention("local", cfg_one, window=4).eval()
x = torch.randn(1, 20, 32)
with torch.no_grad():
    y_full = layer(x)  # (1, 20, 32): no cache
    cache, pieces, sizes, start = RollingCache(window=4), [], [], 0
    for size in [3, 1, 1, 1, 7] + [1] * 7:
        pieces.append(layer(x[:, start : start + size], cache=cache))
        sizes.append(cache.k.shape[2])
        start += size
y_cached = torch.cat(pieces, dim=1)  # (1, 20, 32)
print("rolling cache == full pass (atol=1e-5):", torch.allclose(y_cached, y_full, atol=1e-5))
print("positions seen:", cache.length, "| positions stored after each call:", sizes)
print("stored keys:", tuple(cache.k.shape), "(B, n_kv_head, window, head_dim)")

# %% [markdown]
# ### 7.3 Generation with a tiny model
#
# The model is the package's `GPT`, which [chapter 7](07_kv_cache.ipynb) checked against a model
# written out by hand: a token embedding, pre-norm blocks of attention plus
# MLP, a final LayerNorm and a linear head. `GPTConfig(attention="local", attention_options=
# {"window": 8})` builds every block's attention with `build_attention("local", ..., window=8)`,
# with RoPE, and a window small enough that a short generation slides past it many times. Its
# weights stay random (a cache is correct when it reproduces the full computation, whatever the
# weights), with PyTorch's default initialisation rather than `GPT`'s $N(0, 0.02)$, so that
# attention is sharp enough for a wrong key to change the tokens (as [chapter 7](07_kv_cache.ipynb)
# explains).
#
# `model.generate(prompt, n, temperature=0, use_cache=False)` decodes greedily by recomputing
# the whole sequence at every step. `model.generate` with the cache makes its own caches, or
# decodes through caches of our choosing, `caches=[...]` with one per block: it feeds the prompt,
# then one token per step, `model(feed, caches=...)` reads `start = caches[0].length`, and each
# block passes its cache to its attention, as in [chapter 7](07_kv_cache.ipynb).

# %%
torch.manual_seed(7)
window = 8
config = GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=4, n_embd=64,
                   attention="local", attention_options={"window": window}, positions="rope",
                   tie_weights=False)
model = GPT(config).eval()
for module in model.modules():  # PyTorch's default initialisation, not GPT's N(0, 0.02)
    if isinstance(module, nn.Linear | nn.Embedding):
        module.reset_parameters()
blocks = model.transformer.h  # the 3 blocks; blocks[i].attn is a LocalAttention
print(f"GPT: {len(blocks)} layers of local attention, window {window}, "
      f"n_embd={config.n_embd}, {model.num_params():,} parameters")

# %% [markdown]
# Generate 48 tokens after a 12-token prompt (longer than the window), for a batch of two, once
# by recomputing the whole sequence at every step and once with one `RollingCache` per layer:

# %%
torch.manual_seed(8)
prompt = torch.randint(0, 256, (2, 12))
out_plain = model.generate(prompt, 48, temperature=0, use_cache=False)
rolling = [RollingCache(window) for _ in blocks]
out_rolling = model.generate(prompt, 48, temperature=0, caches=rolling)
assert torch.equal(out_rolling, out_plain)
print("generated:", tuple(out_plain.shape), "| first new tokens of row 0:",
      out_plain[0, 12:22].tolist())
print("rolling cache gives the same tokens as full recomputation:",
      torch.equal(out_rolling, out_plain))
print(f"positions seen: {rolling[0].length}, stored per layer: {tuple(rolling[0].k.shape)}")

# %% [markdown]
# Token for token the same. The caches have seen 59 positions, not 60: the 12 of the prompt and
# 47 generated tokens, because the last generated token is returned but never fed back through
# the model. Of those 59, each layer stores 8. This exactness is special to
# the sliding window: [chapter 7](07_kv_cache.ipynb)'s exercise 2 showed that a model built with
# *full* attention gives different logits with a rolling cache as soon as the first key drops out,
# because there the dropped keys still mattered. Here the model itself never looks further back than
# the window, so the cache drops only what would be masked anyway.
#
# ### 7.4 The cache's memory
#
# A full `KVCache` from [chapter 7](07_kv_cache.ipynb) also gives the same tokens for this model —
# the band mask hides the old keys — but it keeps them all:

# %%
n_kv, hd_m = blocks[0].attn.n_kv_head, blocks[0].attn.head_dim
full = [KVCache(2, n_kv, hd_m, max_len=64) for _ in blocks]
out_full = model.generate(prompt, 48, temperature=0, caches=full)
assert torch.equal(out_full, out_plain)
print("full KVCache gives the same tokens:", torch.equal(out_full, out_plain),
      f"| positions stored per layer: {full[0].length}")

# %% [markdown]
# To see the memory grow, we feed the generated sequence of row 0 through the model one token at
# a time, with rolling caches and with full caches, and record after each token how many bytes
# each kind holds over the three layers: for our rolling cache the size of its tensors; for
# `KVCache`, which allocates `max_len` positions up front, the part in use,
# `length × bytes_per_token`.

# %%
seq = out_plain[:1]  # (1, 60): one sequence
rolling = [RollingCache(window) for _ in blocks]
full = [KVCache(1, n_kv, hd_m, max_len=seq.shape[1]) for _ in blocks]
rolling_bytes, full_bytes = [], []
with torch.no_grad():
    for t in range(seq.shape[1] - 1):
        logits_r, _ = model(seq[:, t : t + 1], caches=rolling)
        logits_f, _ = model(seq[:, t : t + 1], caches=full)
        assert torch.allclose(logits_r, logits_f, atol=1e-5)
        rolling_bytes.append(sum(c.nbytes for c in rolling))
        full_bytes.append(sum(c.length * c.bytes_per_token for c in full))
seen = list(range(1, seq.shape[1]))
print("same logits with both caches at every step (atol=1e-5)")
print(f"bytes after {seen[-1]} positions: rolling {rolling_bytes[-1]:,}, full {full_bytes[-1]:,}")

fig, ax = plt.subplots(figsize=(7.5, 4))
ax.plot(seen, full_bytes, color="C3", label="full KVCache (positions in use)")
ax.plot(seen, rolling_bytes, color="C0", label=f"rolling cache, window {window}")
ax.axvline(window, color="0.5", ls=":", label="sequence length = window")
ax.set_xlabel("positions seen")
ax.set_ylabel("bytes (3 layers, 1 sequence, fp32)")
ax.set_title("Cache memory while generating, GPT with local attention")
ax.legend()
plt.show()
assert rolling_bytes[window - 1] == rolling_bytes[-1]  # flat from the window on
assert full_bytes[-1] == seen[-1] * full_bytes[0]  # linear in the positions seen

# %% [markdown]
# The full cache grows by the same amount with every token; the rolling one grows until it holds
# `window` positions and then stays flat, however long the generation runs (past `block_size`
# too: [chapter 15](15_modern_attention_block.ipynb) streams a model ten times its `block_size`,
# with a rolling cache in every layer and RoPE angles computed for any position).
#
# At the scale of a real model the module computes the sizes for us. A Mistral-7B-shaped cache
# (32 layers, 8 key/value heads of 128, fp16, window 4096) built on PyTorch's `meta` device has
# shapes but no storage ([chapter 7](07_kv_cache.ipynb) did the same), so we can ask a `KVCache` and
# the module's `RollingKVCache` (section 8) how many bytes one sequence needs at each length.
# Its `max_len` means what it means for `KVCache`, the most positions the sequence will have,
# but it only caps the slots at `min(window, max_len)`: however large `max_len` is, the storage
# never exceeds the window.

# %%
from attnbook.attention.local import RollingKVCache

n_layer_m, n_kv_m, hd_7b, window_m = 32, 8, 128, 4096
print(f"{'tokens':>7} {'full KVCache, GiB':>18} {'RollingKVCache, GiB':>20} {'ratio':>6}")
for L_tok in (4096, 8192, 16384, 32768):
    full_gib = n_layer_m * KVCache(1, n_kv_m, hd_7b, L_tok, device="meta",
                                   dtype=torch.float16).nbytes / 2**30
    roll_gib = n_layer_m * RollingKVCache(1, n_kv_m, hd_7b, window=window_m, max_len=L_tok,
                                          device="meta", dtype=torch.float16).nbytes / 2**30
    print(f"{L_tok:>7,} {full_gib:>18.2f} {roll_gib:>20.2f} {full_gib / roll_gib:>6.0f}")

# %% [markdown]
# Half a gibibyte per sequence, whatever its length: at 32k tokens, eight times less than the
# full cache, which is the saving Mistral's paper reports for that length.
#
# ## 8. Check against the module
#
# `attnbook.attention.local` holds the module versions of this chapter: `LocalAttention`
# (registered as `"local"`; the projections of [chapter 4](04_mqa_gqa.ipynb)'s grouped-query
# attention, so with `n_kv_head=None` it has MHA's weight layout), `blocked_local_attention` (our
# `blocked`), and `RollingKVCache` (our `RollingCache`, preallocated to `window` positions like
# [chapter 7](07_kv_cache.ipynb)'s second cache). `LocalAttention` picks its path itself: the dense
# band for sequences no longer than the window, for `need_weights=True`, `impl="reference"` or an
# extra `attn_mask`; the blocked path otherwise. We check, at `atol=1e-5`:
#
# 1. our band equals `sliding_window_mask` for square and bottom-right (cached) shapes;
# 2. a `LocalAttention` layer equals the same computation done by hand with its weights and our
#    `blocked` function, on both paths: at $T = 30$, longer than the window of 6, `impl="sdpa"`
#    takes the blocked path and `impl="reference"` the dense band;
# 3. fed the same blocks of keys and values, `RollingKVCache` returns what our `RollingCache`
#    returns and stores the same last `window` positions;
# 4. generating with the module's caches (`model.new_caches`: each block's `layer.new_cache`)
#    gives the tokens of full recomputation, and each cache stores `window` positions.

# %%
for t_q, t_k, w_c in [(12, 12, 4), (3, 12, 4), (1, 9, 5), (20, 20, 1), (6, 6, 10)]:
    q_pos = torch.arange(t_k - t_q, t_k)[:, None]  # (t_q, 1): the last t_q positions
    dist = q_pos - torch.arange(t_k)[None, :]  # (t_q, t_k)
    assert torch.equal((dist >= 0) & (dist < w_c), sliding_window_mask(t_q, t_k, w_c))

torch.manual_seed(9)
x = torch.randn(2, 30, 64)
for impl in ("sdpa", "reference"):
    cfg_chk = AttentionConfig(n_embd=64, n_head=4, block_size=128, positions="rope", impl=impl)
    mod_layer = build_attention("local", cfg_chk, window=6).eval()
    mod_layer.load_state_dict(blocks[0].attn.state_dict())  # the notebook model's weights
    with torch.no_grad():
        q_h, k_h, v_h = mod_layer.project(x)  # (2, 4, 30, 16) each
        q_h, k_h = mod_layer.rope(q_h), mod_layer.rope(k_h)  # rotated at positions 0..29
        by_hand = mod_layer.c_proj(blocked(q_h, k_h, v_h, 6).transpose(1, 2).reshape(2, 30, 64))
        assert torch.allclose(mod_layer(x), by_hand, atol=1e-5), impl

torch.manual_seed(10)
ours, theirs = RollingCache(window=5), RollingKVCache(2, 4, 16, window=5, max_len=40)
for T_new in (7, 1, 1, 3, 9, 1, 2):  # a long prefill, tokens, chunks shorter and longer than w
    k_new, v_new = torch.randn(2, 2, 4, T_new, 16).unbind(0)
    (k_a, v_a), (k_b, v_b) = ours.append(k_new, v_new), theirs.append(k_new, v_new)
    assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)
    assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)
assert ours.length == theirs.length == 24 and theirs.k.shape == (2, 4, 5, 16)

module_caches = model.new_caches(batch_size=2, max_len=64)  # block.attn.new_cache, per block
out_module = model.generate(prompt, 48, temperature=0, caches=module_caches)
assert torch.equal(out_module, out_plain)
assert torch.equal(model.generate(prompt, 48, temperature=0), out_plain)  # its own caches
assert all(type(c) is RollingKVCache and c.k.shape[2] == window for c in module_caches)
print("sliding_window_mask == our band; LocalAttention (sdpa and reference) == by hand with our "
      "blocked path (atol=1e-5); RollingKVCache == RollingCache (exact); module caches generate "
      "the same tokens: OK")

# %% [markdown]
# One more detail of the module. `LocalAttention` also accepts [chapter 7](07_kv_cache.ipynb)'s full
# `KVCache`, which returns *every* position cached so far rather than the last $w - 1$. On the dense
# path the band mask hides the old keys, as in section 7.4. The blocked path cannot take them (its
# padding assumes at most $w - 1$ keys before the first query), so `LocalAttention.softmax_attend`
# first keeps only the last $w - 1 + T$ keys, all that $T$ new queries can see. We run the window-4
# layer of section 7.2 in the same pieces as there, with the module's rolling cache and with a full
# `KVCache`: the piece of 7 arrives when 6 positions are cached, so the full cache hands the layer
# 13 keys, of which it keeps 10.

# %%
torch.manual_seed(11)
x_one = torch.randn(1, 20, 32)
with torch.no_grad():
    y_one = layer(x_one)  # (1, 20, 32): the window-4 layer of section 7.2, no cache
    for cache in (layer.new_cache(1, max_len=20), KVCache(1, 4, 8, max_len=20)):
        pieces, start = [], 0
        for size in [3, 1, 1, 1, 7] + [1] * 7:
            pieces.append(layer(x_one[:, start : start + size], cache=cache))
            start += size
        same = torch.allclose(torch.cat(pieces, dim=1), y_one, atol=1e-5)
        assert same, type(cache).__name__
        print(f"{type(cache).__name__:>14} fed pieces of 3, 1, 1, 1, 7, 1, ...: equals the full "
              f"pass (atol=1e-5): {same}; positions stored: {cache.k.shape[2]}")

# %% [markdown]
# ## Summary
#
# - Sliding-window attention lets query $i$ see keys $i - w + 1 \ldots i$: the causal mask with
#   one more condition, `distance < w`. Up to the window nothing changes; beyond it each query
#   sees a fixed number of keys.
# - A stack of $L$ such layers reaches $L(w - 1)$ positions back, because each layer relays what
#   its neighbours have already gathered. Gradients through random `LocalAttention` layers find
#   exactly that boundary, and show the influence fading with distance.
# - A dense band mask is correct but no cheaper than causal attention (on CPU, slower once $T$
#   grows). The
#   blocked path cuts the queries into chunks of $w$, each against a $(w, 2w)$ tile of keys with
#   the same band mask, all in one SDPA call: about $2Tw$ scores, linear in $T$, and measurably
#   faster than causal attention from about $T = 4w$ on.
# - Generation needs only the last $w$ positions: a rolling cache returns up to $w - 1$ cached
#   positions plus the new ones, stores the last $w$, and keeps counting `length` so that RoPE
#   rotates each new key at its true position. It gives exactly the tokens of full recomputation,
#   and its memory stops growing at $w$ positions. (`LocalAttention` works with
#   [chapter 7](07_kv_cache.ipynb)'s full `KVCache` too, with the same outputs; that cache just
#   keeps keys no query will read again.)

# %% [markdown]
# ## Further reading
#
# - Beltagy, Peters and Cohan, *Longformer: The Long-Document Transformer* (2020): sliding windows
#   with global tokens.
# - Child, Gray, Radford and Sutskever, *Generating Long Sequences with Sparse Transformers* (2019):
#   local and strided patterns.
# - Jiang et al., *Mistral 7B* (2023): a 4096-token window in every layer and its rolling buffer
#   cache.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/09_sliding_window_solutions.ipynb`](solutions/09_sliding_window_solutions.ipynb).
# Predict first, then check with code.
#
# 1. **The extreme windows.** (a) Predict what a `LocalAttention` layer computes when its window
#    is at least the sequence length, and check it against a `"gqa"` layer with the same weights
#    (same state_dict layout), for a sequence shorter than the window and one exactly as long.
#    (b) What does a
#    window of 1 compute? Write the output of the layer as a formula in its weights without any
#    softmax, and check it. Does a stack of window-1 layers ever mix positions?
# 2. **Predict the receptive field.** (a) A model has 4 layers of window 6. Which input positions
#    can influence the output at position 50? (b) The layers of a model may have different
#    windows: predict the reach of a stack with windows 2, 3, 5 and 9, then measure it with
#    gradients as in section 4. (c) How many layers of window 4096 does it take to reach one
#    million positions back?
# 3. **A dilated window.** Longformer also used *dilated* windows: query $i$ sees keys
#    $i, i - d, i - 2d, \ldots, i - (w - 1)d$. (a) Build the mask and use it in a `"gqa"` layer
#    through `attn_mask`. (b) Predict which inputs reach the last output through three layers of
#    window 4 with dilations 1, 4 and 16, compared with three undilated layers; check with
#    gradients. (c) Show that dilated attention is ordinary sliding-window attention on each of
#    the $d$ interleaved subsequences of positions $\equiv r \pmod d$, and compute it with
#    `blocked_local_attention`.
# 4. **The window and the blocked path's cost.** At $T = 2048$, count the score entries the
#    blocked path fills for windows 16, 32, ..., 2048, and find the window above which it fills
#    more than full causal attention's $T(T+1)/2$. Then time forward plus backward at a few of
#    those windows and see where the crossover lies in practice.
# 5. **What has to count true positions?** A buggy rolling cache stops its `length` at `window`
#    (it returns the number of slots in use, not the positions seen). Predict, for the model of
#    section 7.3 with RoPE, with learned positions, with ALiBi and with no positions at all
#    (`positions="none"`), whether greedy generation with that cache still matches full
#    recomputation, and explain why. Then check.
