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
# # Chapter 10 — Sparse attention, BigBird style
#
# [Chapter 9](09_sliding_window.ipynb) made attention cheaper by letting each query look back only
# $w$ positions. The price was reach: information travels at most $w - 1$ positions per layer, so
# two tokens far apart can only meet after many layers, and a model with a short window and few
# layers never connects them at all.
#
# **BigBird** (Zaheer et al., 2020, "Big Bird: Transformers for Longer Sequences") keeps the
# window and adds two other kinds of connection, still a fixed number per query:
#
# - **global** tokens, which every token sees (and, in the paper's encoder, which see every
#   token);
# - **random** connections: each query also sees a few positions drawn at random, far away.
#
# The paper built these into a bidirectional, BERT-like encoder for long documents (question
# answering, summarization, genomics), in two variants: BigBird-ITC makes some existing tokens
# global, BigBird-ETC adds extra global tokens. To run fast it does not pick single tokens but
# **blocks** of consecutive tokens: the released models use blocks of 64 tokens and 3 random
# blocks per query block. Its theory leans on graphs: read the pattern as a graph whose nodes are
# positions and whose edges say "may attend", and the question "can information get from here
# to there, and in how many layers?" becomes a question about paths.
#
# This chapter builds a *causal* BigBird, the variant a decoder (a GPT) can use, one ingredient
# at a time, and then the block-sparse computation that makes it cheaper. One change of unit:
# in [chapter 9](09_sliding_window.ipynb), and in the first paragraph above, $w$ counts
# positions; from section 1 on it counts *blocks*, like every size of the pattern ($g$, $w$ and
# $r$ are numbers of blocks of $b$ tokens).
# [Chapter 9](09_sliding_window.ipynb)'s band and its blocked computation are the starting point; we
# refer back to them rather than repeat them.
#
# **Learning goals**
#
# - Build BigBird's three ingredients (global, window, random blocks) as block patterns, draw
#   them separately and together, and turn the block pattern into the token-level mask of
#   `attnbook.attention.sparse.bigbird_mask`.
# - Explain why each ingredient is there by counting *hops* (layers needed for one position to
#   reach another) over the pattern, and why "global" means something weaker in a decoder than
#   in the paper's encoder.
# - Build the block-sparse computation in small steps (gather each query block's visible key
#   blocks, mask, one batched attention call), and check it against dense masked attention and
#   `block_sparse_attention`.
# - Count what fraction of the causal score matrix the pattern and the block-sparse path compute
#   at lengths 512 to 16384, time forward plus backward against full causal attention, and say
#   why the layer runs plain causal attention on sequences of at most $g + w + r$ blocks.
# - Generate with the ordinary KV cache, explain why BigBird (unlike
#   [chapter 9](09_sliding_window.ipynb)'s window) must keep every position, and why the random
#   blocks are saved with the weights.

# %% [markdown]
# ## Setup
#
# As before, every random draw is seeded and only shapes, integers, booleans and rounded numbers
# are printed; timings appear only in cells whose output the book's tests ignore. As in chapter
# 8 the whole notebook runs on one thread: its tensors are small, and one thread also keeps the
# timings of section 6 steadier when other programs compete for the cores.

# %%
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from torch import nn

from attnbook.attention import build_attention, causal_mask, sdpa, sdpa_reference
from attnbook.attention.sparse import (
    bigbird_mask,
    bigbird_pattern,
    block_sparse_attention,
    draw_random_blocks,
)
from attnbook.model import GPT, GPTConfig

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. Three ingredients, in blocks
#
# Cut the positions into **blocks** of $b$ consecutive tokens: block $i$ holds positions
# $ib \ldots ib + b - 1$. BigBird decides *per pair of blocks* whether query block $i$ may see
# key block $j$, and every query of block $i$ then sees every key of block $j$ (except, on the
# diagonal block, keys in its own future). So the whole pattern is a small $n \times n$ boolean
# matrix for $n = T / b$ blocks, and it is cheap to draw and to reason about.
#
# In a decoder only $j \le i$ is allowed. With $g$ global blocks, a window of $w$ blocks and $r$
# random blocks per row (`n_global_blocks`, `n_window_blocks`, `n_random_blocks` in
# `AttentionConfig`), query block $i$ sees key block $j \le i$ if
#
# - **global**: $j < g$ — the first $g$ blocks of the sequence;
# - **window**: $i - w < j$ — its own block and the $w - 1$ before it
#   ([chapter 9](09_sliding_window.ipynb)'s band, in blocks);
# - **random**: $j$ is one of $r$ blocks drawn for row $i$ among those that are neither global
#   nor in the window, $g \le j \le i - w$ (all of them, if there are no more than $r$).
#
# The random blocks are drawn once, when the layer is built, and then fixed: they are part of
# the model, like its weights (section 7 comes back to that). We draw them as a table with one
# row per query block and $r$ columns, `-1` marking "none" in rows that have fewer than $r$
# eligible blocks:

# %%
def draw_random(n_rows, g, w, r):
    """(n_rows, r) table: row i holds min(r, eligible) distinct blocks from g .. i - w, sorted."""
    table = torch.full((n_rows, r), -1)
    for i in range(n_rows):
        eligible = torch.arange(g, max(g, i - w + 1))  # neither global nor in the window
        picks = eligible[torch.randperm(len(eligible))[:r]]  # at most r of them, at random
        table[i, : len(picks)] = picks.sort().values
    return table


n_demo, g_demo, w_demo, r_demo = 16, 2, 3, 2
torch.manual_seed(1)
table_demo = draw_random(n_demo, g_demo, w_demo, r_demo)
print("random blocks of rows 0..7:", table_demo[:8].tolist())
print("rows 12..15:               ", table_demo[12:].tolist())

# %% [markdown]
# Rows 0 to 4 draw nothing: for them every earlier block is already global or in the window.
# Row 5 has exactly one eligible block (block 2), row 6 two, and from row 7 on there are more
# eligible blocks than draws, so two are picked at random. The module's `draw_random_blocks`
# does the same, with the same calls to the random generator, so after the same seed it draws
# the same table:

# %%
torch.manual_seed(1)
print("equals draw_random_blocks:",
      torch.equal(table_demo, draw_random_blocks(n_demo, g_demo, w_demo, r_demo)))

# %% [markdown]
# Now the pattern. For drawing we keep *which* ingredient allows each pair, as integer codes: 0
# none, 1 global, 2 window, 3 random. A block can be both global and in the window (block 1 of
# row 2, say); it is then called "window", and global wins over random (which cannot happen
# here anyway, since random blocks are drawn outside the global ones). Writing the codes in the
# order random, global, window lets each later one overwrite the earlier:

# %%
def block_pattern(n, g, w, table):
    """(n, n) codes for query block i (row) and key block j (column): 0/1/2/3 = none/global/
    window/random. table: (>= n, r) random blocks per row, -1 = none."""
    i = torch.arange(n)[:, None]  # (n, 1): query block
    j = torch.arange(n)[None, :]  # (1, n): key block
    codes = torch.zeros(n, n, dtype=torch.long)
    for col in table[:n].T:  # (n,): one random block per row (or -1)
        codes[j == col[:, None]] = 3
    codes[(j < g).expand(n, n)] = 1
    codes[(i - w < j).expand(n, n)] = 2
    return codes * (j <= i)  # nothing from the future


pattern_demo = block_pattern(n_demo, g_demo, w_demo, table_demo)
print(pattern_demo)
print("equals bigbird_pattern:",
      torch.equal(pattern_demo, bigbird_pattern(n_demo, g_demo, w_demo, table_demo)))
print("key blocks seen per query block:", (pattern_demo > 0).sum(dim=1).tolist())

# %% [markdown]
# The first rows see everything before them (for them BigBird *is* causal attention), and from
# row 6 on every row sees exactly $g + w + r = 7$ blocks, however long the sequence grows. That
# is the whole point: a fixed number of key blocks per query block, so the work grows like $T$,
# not $T^2$. The three ingredients separately and together, with the same colours throughout:

# %%
names = ["none", "global", "window", "random"]
colours = ["white", "C1", "C0", "C2"]
cmap = ListedColormap(colours)
parts = {
    f"global (g={g_demo})": torch.where(pattern_demo == 1, 1, 0),
    f"window (w={w_demo})": torch.where(pattern_demo == 2, 2, 0),
    f"random (r={r_demo})": torch.where(pattern_demo == 3, 3, 0),
    "BigBird: all three": pattern_demo,
}
fig, axes = plt.subplots(1, 4, figsize=(14, 4.8))
for ax, (title, codes) in zip(axes, parts.items(), strict=True):
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=3.5)
    ax.set_title(title)
    ax.set_xlabel("key block j")
    ax.set_xticks(range(0, n_demo, 3))
    ax.set_yticks(range(0, n_demo, 3))
axes[0].set_ylabel("query block i")
fig.legend(handles=[Patch(facecolor=c, edgecolor="0.5", label=f"{k}: {name}")
                    for k, (c, name) in enumerate(zip(colours, names, strict=True))],
           loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, 0.0))
fig.suptitle(f"Causal BigBird block pattern, {n_demo} blocks (codes of bigbird_pattern)")
fig.tight_layout(rect=(0, 0.08, 1, 0.97))
plt.show()

# %% [markdown]
# Global blocks are columns on the left (block 0's column starts at row 3 and block 1's at row
# 4: before that they are also in the window, which wins), the window is
# [chapter 9](09_sliding_window.ipynb)'s band in blocks, and the random blocks are scattered between
# the two, a different set in every row.
#
# **From blocks to tokens.** The token-level mask repeats each block's entry over its $b \times b$
# tokens and then applies the ordinary causal rule, which only bites inside the diagonal blocks.
# With the same pattern and blocks of $b = 4$ tokens ($T = 64$):

# %%
b_demo = 4
T_demo = n_demo * b_demo
blocks_at_tokens = (pattern_demo > 0).repeat_interleave(b_demo, 0).repeat_interleave(b_demo, 1)
mask_demo = blocks_at_tokens & causal_mask(T_demo)  # (T, T): True = may attend
print("token mask:", tuple(mask_demo.shape), "| allowed pairs:", int(mask_demo.sum()),
      "of", T_demo * (T_demo + 1) // 2, "causal")
module_mask = bigbird_mask(T_demo, T_demo, b_demo, g_demo, w_demo, table_demo)
print("equals bigbird_mask:", torch.equal(mask_demo, module_mask))

# %%
token_codes = pattern_demo.repeat_interleave(b_demo, 0).repeat_interleave(b_demo, 1)
token_codes = token_codes * causal_mask(T_demo)  # the diagonal blocks made causal
fig, ax = plt.subplots(figsize=(6.5, 6.5))
ax.imshow(token_codes, cmap=cmap, vmin=-0.5, vmax=3.5)
for edge in range(0, T_demo + 1, b_demo):  # block boundaries
    ax.axhline(edge - 0.5, color="0.85", lw=0.6)
    ax.axvline(edge - 0.5, color="0.85", lw=0.6)
ax.set_xlabel("key position")
ax.set_ylabel("query position")
ax.set_title(f"bigbird_mask at token level: T={T_demo}, b={b_demo}, g={g_demo}, "
             f"w={w_demo}, r={r_demo}")
ax.legend(handles=[Patch(facecolor=c, edgecolor="0.5", label=name)
                   for c, name in zip(colours[1:], names[1:], strict=True)], loc="upper right")
plt.show()

# %% [markdown]
# Every allowed pair lies in a full $4 \times 4$ tile, except for the small triangles on the
# diagonal. Section 4 computes those tiles whole and skips every empty one.
#
# `bigbird_mask(t_q, t_k, ...)` is bottom-right aligned, like `causal_mask` and
# [chapter 9](09_sliding_window.ipynb)'s `sliding_window_mask`: with fewer queries than keys (cached
# decoding), the queries are the last `t_q` positions and use their own rows of the pattern.

# %%
print("bigbird_mask(5, 64, ...) == last 5 rows:",
      torch.equal(bigbird_mask(5, T_demo, b_demo, g_demo, w_demo, table_demo), mask_demo[-5:]))

# %% [markdown]
# ## 2. Why these three? Counting hops
#
# [Chapter 9](09_sliding_window.ipynb) showed that a stack of windows relays information: one layer
# moves it at most $w - 1$ positions. In general, let `A[i, j]` say that query block $i$ may read
# key block $j$ (the diagonal is always allowed, and the residual stream keeps a position's own
# information anyway). Information in block $j$ reaches block $i$ after $L$ layers if there is a
# path $j \to m_1 \to \cdots \to i$ of $L$ steps along allowed pairs. As in
# [chapter 9](09_sliding_window.ipynb), "reachable in $L$ layers" is a boolean matrix, and one more
# layer is a boolean matrix product with `A`. The **hop count** from $j$ to $i$ is the first $L$ at
# which $j$ reaches $i$. (Within a block the pattern is the same for every token, and off the
# diagonal every token of a visible block is visible, so hops between blocks are hops between their
# tokens.)

# %%
def hop_counts(visible):
    """(n, n) number of layers for key block j to reach query block i; -1 = never."""
    A = visible.long() | torch.eye(len(visible), dtype=torch.long)  # a block keeps its own
    reach = torch.eye(len(visible), dtype=torch.long)  # 0 layers: each block itself
    hops = torch.where(reach > 0, 0, -1)
    for layers in range(1, len(visible) + 1):
        reach = ((A @ reach) > 0).long()  # reach[i, j]: block j can affect block i
        new = (reach > 0) & (hops < 0)
        if not new.any():
            break
        hops[new] = layers
    return hops


print(hop_counts(pattern_demo > 0))

# %% [markdown]
# Read row 15: block 15 hears from blocks 0 and 1 (global), 13 and 14 (window) and its random
# blocks 5 and 11 after one layer, and from every other earlier block after two or three: each
# hop can take a different kind of edge.
#
# ### 2.1 The paper's setting: a bidirectional encoder
#
# In BigBird's encoder a global block works both ways: its queries see *every* block, and every
# query sees it. So a global block is a **hub**: any block $j$ sends to the hub in one layer,
# and the hub sends to any block $i$ in the next. Any two positions are at most two hops apart,
# however long the sequence. Without global blocks, random edges do a similar job: a graph in
# which every node has a few random neighbours has short paths, growing only like the logarithm
# of its size (the paper's motivation comes from such random graphs). We build the bidirectional
# pattern by hand — a symmetric window of 3 blocks (the block itself and one neighbour on each
# side), 2 global blocks as rows *and* columns, 3 random blocks per row anywhere (possibly
# overlapping the window, a global block or the block itself: the draw does not exclude them)
# — and count hops for 64 blocks (4096 tokens with $b = 64$):

# %%
def hop_summary(visible):
    """Largest and mean hop count over all ordered pairs of distinct blocks that can reach."""
    hops = hop_counts(visible)
    off = ~torch.eye(len(visible), dtype=torch.bool) & (hops >= 0)
    return int(hops[off].max()), round(hops[off].float().mean().item(), 2)


n_hop, g_hop, w_hop, r_hop = 64, 2, 3, 3
i_b, j_b = torch.arange(n_hop)[:, None], torch.arange(n_hop)[None, :]
torch.manual_seed(2)
bi_window = (i_b - j_b).abs() <= 1  # (n, n): the block and its two neighbours
bi_global = (i_b < g_hop) | (j_b < g_hop)  # global rows and columns
bi_random = torch.zeros(n_hop, n_hop, dtype=torch.bool)
for row in range(n_hop):
    bi_random[row, torch.randperm(n_hop)[:r_hop]] = True
print(f"bidirectional, {n_hop} blocks: (largest, mean) hops between two blocks")
for name, visible in [("window", bi_window), ("window + global", bi_window | bi_global),
                      ("window + random", bi_window | bi_random),
                      ("window + global + random", bi_window | bi_global | bi_random)]:
    print(f"  {name:<25}", hop_summary(visible))

# %% [markdown]
# The window alone needs up to 63 hops (one block per layer). Global blocks bring every pair
# within two hops; random blocks alone bring the worst pair within a handful. Either is enough
# in an encoder, and a model with a dozen layers can then connect any two tokens.
#
# ### 2.2 The causal reading of "global"
#
# A decoder cannot have a true hub. A global block's *queries* would have to see every block,
# including the future, which is forbidden; only the *column* half of "global" survives: the
# first $g$ blocks are seen by every later query. (Their own queries see all their past anyway,
# since everything before them is global too: the module docstring calls them "causal global"
# tokens.) A hub at the start of the sequence can *send* to everyone, but it can only *hear* the
# start. So causal global blocks do not shorten the path from block 10 to block 50; only random
# blocks do.
#
# The same count for the causal patterns, with the module's pattern function and a fresh draw:

# %%
torch.manual_seed(3)
table_hop = draw_random_blocks(n_hop, g_hop, w_hop, r_hop)
no_random = torch.full((n_hop, 0), -1)  # a table with no random blocks
causal_patterns = {
    "window": bigbird_pattern(n_hop, 0, w_hop, no_random) > 0,
    "window + global": bigbird_pattern(n_hop, g_hop, w_hop, no_random) > 0,
    "window + global + random": bigbird_pattern(n_hop, g_hop, w_hop, table_hop) > 0,
}
causal_hops = {name: hop_counts(visible) for name, visible in causal_patterns.items()}
print(f"causal, {n_hop} blocks, w={w_hop}: (largest, mean) hops from an earlier block to a later")
for name, visible in causal_patterns.items():
    print(f"  {name:<25}", hop_summary(visible))

# %% [markdown]
# The causal window moves information $w - 1 = 2$ blocks per layer, so the last block hears from
# block 0 only after 32 layers. Global blocks shave off very little: they help only pairs that
# start in the first two blocks. Random blocks bring the worst pair down to a few hops.
#
# Do not read "32 hops against 63" as "causal is better": the two windows differ. The causal
# window of $w = 3$ blocks looks 2 blocks back (`i - w < j <= i`), the bidirectional one of
# section 2.1 only 1 block each way (`abs(i - j) <= 1`), so per layer the causal one carries
# information twice as far in the one direction that counts. Compare the ingredients within a
# table, not the tables with each other.
#
# The picture shows, for each source block, how many layers it takes to reach the *last* block:

# %%
fig, ax = plt.subplots(figsize=(8, 4))
styles = [dict(lw=5, alpha=0.35), dict(marker="o", ms=3, ls="--"), dict(marker="^", ms=3.5)]
for (name, hops), style in zip(causal_hops.items(), styles, strict=True):
    ax.plot(range(n_hop), hops[-1].tolist(), label=name, **style)  # window: the wide pale line
ax.set_xlabel("source block j")
ax.set_ylabel(f"layers to reach block {n_hop - 1}")
ax.set_title(f"Causal patterns, {n_hop} blocks: g={g_hop}, w={w_hop}, r={r_hop}")
ax.legend()
plt.show()
assert causal_hops["window"][-1, 0] == -(-(n_hop - 1) // (w_hop - 1))  # ceil(63 / 2) = 32
assert causal_hops["window + global"][-1, :g_hop].tolist() == [1] * g_hop
print("largest hops to the last block:",
      {name: int(hops[-1].max()) for name, hops in causal_hops.items()})
assert causal_hops["window + global + random"][-1].max() <= 8
drawn = torch.bincount(table_hop[table_hop >= 0], minlength=n_hop)  # (n,): rows that drew block j
print("times drawn as a random block, mean per block: blocks 2-21",
      f"{drawn[2:22].float().mean():.1f}, 22-42 {drawn[22:43].float().mean():.1f},",
      f"43-63 {drawn[43:].float().mean():.1f}")

# %% [markdown]
# With the window alone (the wide pale line) the curve is a staircase falling 1 layer per 2
# blocks; global blocks (dashed) follow it exactly except for its first two points, which they
# pull down to 1 (the start of the sequence is now one hop from everywhere); random blocks
# flatten the whole curve to a few layers. Its highest point, 5, is the worst pair that *ends*
# at block 63; the table's 6 is the worst pair over all ordered pairs, which ends elsewhere.
#
# The random curve (triangles) is lowest at both ends and highest, 4 to 5 layers, for source
# blocks from about 30 to 52, and the draw says why. A block sends shortcuts only to the later
# rows that drew it, and each row draws among *all* its eligible past blocks, so an early block
# is eligible in many rows and drawn often, a late one in few rows and rarely, as the last line
# printed shows. Early blocks spread their information fast through their many shortcuts; blocks
# near the end reach block 63 through the window; the blocks in between have few shortcuts and
# are too far for the window alone.
#
# So in a causal BigBird the roles shift. The random blocks carry the long-range shortcuts. The
# global blocks give every query a direct view of the beginning of the sequence, where a
# prompt's instructions often sit; and pretrained models are known to lean heavily on the first
# few tokens as a place to park attention weight (the "attention sinks" of Xiao et al., 2023,
# who found that keeping the first tokens visible stabilises windowed attention). Hop counts
# are a ceiling on what a model *can* relate, not a promise that it learns to.

# %% [markdown]
# ## 3. Attention with the pattern, the dense way
#
# The simplest correct implementation is [chapter 2](02_scaled_dot_product_attention.ipynb)'s masked
# attention with `bigbird_mask` as the mask. It scores all $T^2$ pairs and throws most away, so it
# saves nothing, but it is the reference everything below is checked against. Random queries, keys
# and values, one sequence, two heads of 8, with the demo pattern ($T = 64$, $b = 4$):

# %%
torch.manual_seed(4)
B, H, hd = 1, 2, 8
q, k, v = torch.randn(3, B, H, T_demo, hd).unbind(0)  # each (B, H, T, hd)
y_dense, weights = sdpa_reference(q, k, v, attn_mask=mask_demo, return_weights=True)
print("output", tuple(y_dense.shape), "| weights", tuple(weights.shape))
print("zero weight outside the pattern:", bool((weights[..., ~mask_demo] == 0).all()))
print("fast path (SDPA with the boolean mask) agrees (atol=1e-5):",
      torch.allclose(sdpa(q, k, v, attn_mask=mask_demo), y_dense, atol=1e-5))

# %% [markdown]
# ## 4. Block sparsity: computing only the visible tiles
#
# **Why blocks?** The same number of allowed pairs could be spread over single tokens, each
# query picking its own scattered keys. That computes no more scores, but it computes them
# badly. Every query would need its own list of keys, gathered from memory into a private copy
# and multiplied by a single query vector: a matrix-*vector* product, whose speed is set by
# how fast memory delivers the keys, not by arithmetic. With blocks, the $b$ queries of a block
# share one list of key blocks: one gather serves $b$ queries, and the scores are a
# matrix-*matrix* product of a $(b, d)$ block of queries with a $(d, Kb)$ block of keys, the
# operation CPUs and GPUs are built to do fast ([chapter 9](09_sliding_window.ipynb)'s tiles had the
# same shape). For $T = 4096$, $b = 64$ and $K = g + w + r = 8$ key blocks per row, count the keys
# each way would copy for one head of dimension 64:

# %%
T_c, b_c, K_c, hd_c = 4096, 64, 8, 64
per_query = T_c * K_c * b_c * hd_c * 4  # each query gathers its own K*b keys, fp32
per_block = (T_c // b_c) * K_c * b_c * hd_c * 4  # each query block gathers them once
print(f"keys gathered per head: per query {per_query / 2**20:.0f} MiB, per block "
      f"{per_block / 2**20:.0f} MiB ({per_query // per_block}x less)")

# %% [markdown]
# A factor $b$ less memory traffic, and dense tiles in place of single vectors. The computation
# in three steps.
#
# **Step 1: a loop over query blocks.** For query block $i$, take the list of key blocks its
# row of the pattern shows, gather those keys and values (their positions, in order), and
# attend with a mask that only applies the causal rule (key position $\le$ query position),
# which matters on the diagonal block alone:

# %%
def block_sparse_loop(q, k, v, b, visible):
    """BigBird attention one query block at a time. visible: (n, n) bool block pattern."""
    T = q.shape[2]
    outputs = []
    for i in range(T // b):
        key_blocks = visible[i].nonzero().flatten()  # (K_i,): the blocks row i sees
        key_pos = (key_blocks[:, None] * b + torch.arange(b)).flatten()  # (K_i * b,)
        query_pos = torch.arange(i * b, (i + 1) * b)  # (b,)
        mask = key_pos[None, :] <= query_pos[:, None]  # (b, K_i * b): causal inside
        outputs.append(sdpa(q[:, :, query_pos], k[:, :, key_pos], v[:, :, key_pos],
                            attn_mask=mask))  # (B, H, b, hd)
    return torch.cat(outputs, dim=2)  # (B, H, T, hd)


visible_demo = pattern_demo > 0
y_loop = block_sparse_loop(q, k, v, b_demo, visible_demo)
print("loop over query blocks == dense masked attention (atol=1e-5):",
      torch.allclose(y_loop, y_dense, atol=1e-5))

# %% [markdown]
# **Step 2: all query blocks in one call.** The loop body differs between rows only in *which*
# key blocks it gathers, and in how many: the first rows see fewer than $K = g + w + r$ blocks.
# To make every row the same shape we give each row exactly $K$ slots: its visible blocks, in
# increasing order, then *filler* slots (any block; we reuse block 0) that the mask switches
# off. A stable sort of each row by "not visible" puts the visible blocks first and keeps their
# order:

# %%
n_blk = T_demo // b_demo
K = min(n_blk, g_demo + w_demo + r_demo)  # the most key blocks a row sees
order = torch.sort((~visible_demo).long(), dim=1, stable=True).indices  # visible ones first
slots = order[:, :K]  # (n, K): key block in each slot
real = visible_demo.gather(1, slots)  # (n, K): False for filler slots
slots = torch.where(real, slots, 0)  # fillers point at block 0
print("K =", K, "| slots of rows 1, 5, 15:", slots[[1, 5, 15]].tolist())
print("real slots of rows 1, 5, 15:        ", real[[1, 5, 15]].int().tolist())

# %% [markdown]
# Row 1 has two real slots (blocks 0 and 1) and five fillers; row 15 uses all seven. Now the
# gather. The keys, reshaped to `(B, H, n, b, hd)`, are indexed along the block axis by the
# `(n, K)` table, which gives `(B, H, n, K, b, hd)`: for every query block its $K$ key blocks,
# which we flatten to $Kb$ keys. The mask compares true positions (the causal rule) and switches
# the filler slots off; it has shape `(n, b, Kb)`, the same for every batch element and head. If
# it is right, it allows exactly the pairs of `bigbird_mask`, no more (fillers) and no fewer:

# %%
k_blocks = k.view(B, H, n_blk, b_demo, hd)[:, :, slots]  # (B, H, n, K, b, hd)
k_gathered = k_blocks.reshape(B, H, n_blk, K * b_demo, hd)  # (B, H, n, K * b, hd)
key_pos = (slots[:, :, None] * b_demo + torch.arange(b_demo)).view(n_blk, 1, K * b_demo)
query_pos = torch.arange(T_demo).view(n_blk, b_demo, 1)  # (n, b, 1)
key_real = real.repeat_interleave(b_demo, dim=1)[:, None, :]  # (n, 1, K * b): not a filler
slot_mask = (key_pos <= query_pos) & key_real  # (n, b, K * b)
print("key blocks", tuple(k_blocks.shape), "-> gathered keys", tuple(k_gathered.shape),
      "| mask", tuple(slot_mask.shape))
print("pairs allowed by the slot mask:", int(slot_mask.sum()), "| by bigbird_mask:",
      int(mask_demo.sum()))

# %% [markdown]
# The queries, viewed as `(B, H, n, b, hd)`, line up with these keys block by block, so one SDPA
# call attends every query block to its own $Kb$ keys, the block axis acting as an extra batch
# dimension, as in [chapter 9](09_sliding_window.ipynb).
#
# **Step 3: any length.** As in [chapter 9](09_sliding_window.ipynb), a sequence that is not a
# multiple of $b$ is padded at the end and the extra outputs dropped: the padded keys come after
# every real query, so the causal rule already hides them. The function below is steps 2 and 3
# together, with the padding first and the pattern cut to the padded number of blocks.

# %%
def block_sparse(q, k, v, b, visible):
    """Causal attention over the (n, n) block pattern `visible`: one batched SDPA call."""
    B, H, T, hd = q.shape
    n = -(-T // b)  # number of blocks, rounding up
    pad = n * b - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # (B, H, n * b, hd) each
    visible = visible[:n, :n]
    # slots per row: the most blocks a row sees. This works for any pattern; for BigBird's it
    # is min(n, g + w + r), the K of step 2, without having to know g, w and r
    K = int(visible.sum(dim=1).max())
    slots = torch.sort((~visible).long(), dim=1, stable=True).indices[:, :K]  # (n, K)
    real = visible.gather(1, slots)  # (n, K)
    slots = torch.where(real, slots, 0)

    def gather(x):  # (B, H, n * b, hd) -> (B, H, n, K * b, hd): each query block's keys
        return x.view(B, H, n, b, hd)[:, :, slots].reshape(B, H, n, K * b, hd)

    key_pos = (slots[:, :, None] * b + torch.arange(b)).view(n, 1, K * b)  # (n, 1, K * b)
    query_pos = torch.arange(n * b).view(n, b, 1)  # (n, b, 1)
    key_real = real.repeat_interleave(b, dim=1)[:, None, :]  # (n, 1, K * b)
    mask = (key_pos <= query_pos) & key_real  # (n, b, K * b)
    y = sdpa(q.view(B, H, n, b, hd), gather(k), gather(v), attn_mask=mask)  # (B, H, n, b, hd)
    return y.reshape(B, H, n * b, hd)[:, :, :T]  # (B, H, T, hd)


print("batched == dense masked attention (atol=1e-5):",
      torch.allclose(block_sparse(q, k, v, b_demo, visible_demo), y_dense, atol=1e-5))

# %% [markdown]
# More sizes, including lengths that are not a multiple of $b$ and patterns of other shapes,
# each against the dense reference and against the module's `block_sparse_attention` (which
# takes the pattern as $g$, $w$ and the random table, builds the slots the same way, and also
# supports grouped-query heads, ALiBi and dropout; it wants $T$ to be a multiple of $b$, the
# layer pads before calling it):

# %%
torch.manual_seed(5)
for T_t, b_t, g_t, w_t, r_t in [(64, 4, 2, 3, 2), (61, 4, 2, 3, 2), (96, 8, 1, 2, 3),
                                (40, 8, 0, 1, 1), (100, 16, 3, 2, 0), (7, 4, 1, 1, 1)]:
    n_t = -(-T_t // b_t)
    tab = draw_random_blocks(n_t, g_t, w_t, r_t)
    vis = bigbird_pattern(n_t, g_t, w_t, tab) > 0
    q_t, k_t, v_t = torch.randn(3, 2, 3, T_t, 16).unbind(0)  # (B=2, H=3, T, 16) each
    dense = sdpa_reference(q_t, k_t, v_t, attn_mask=bigbird_mask(T_t, T_t, b_t, g_t, w_t, tab))
    ours = block_sparse(q_t, k_t, v_t, b_t, vis)
    assert torch.allclose(ours, dense, atol=1e-5), (T_t, b_t)
    if T_t % b_t == 0:
        module = block_sparse_attention(q_t, k_t, v_t, b_t, g_t, w_t, tab)
        assert torch.allclose(module, ours, atol=1e-5), (T_t, b_t)
print("block_sparse == dense masked attention for 6 patterns, == block_sparse_attention "
      "where T is a multiple of b (atol=1e-5)")

# %% [markdown]
# ## 5. What fraction of the score matrix is computed?
#
# Count score entries per head and per layer, for the defaults of `AttentionConfig` ($b = 64$,
# $g = 2$, $w = 3$, $r = 3$), at lengths from 512 to 16384:
#
# - the full matrix, $T^2$ (dense attention with a mask computes all of it);
# - the causal triangle, $T(T+1)/2$ (what a fused causal kernel roughly computes);
# - the pairs the BigBird pattern allows: $b^2$ per visible off-diagonal block and $b(b+1)/2$
#   per diagonal block;
# - what the block-sparse path computes: $n$ query blocks times $K$ slots times $b^2$, fillers
#   and the upper halves of the diagonal tiles included.
#
# All of it comes from the block pattern, so we never build a $T \times T$ mask.

# %%
b_f, g_f, w_f, r_f = 64, 2, 3, 3
lengths_f = [512, 1024, 2048, 4096, 8192, 16384]
torch.manual_seed(6)
table_f = draw_random_blocks(lengths_f[-1] // b_f, g_f, w_f, r_f)  # rows for the longest T
counts = {"full T^2": [], "causal": [], "pattern": [], "block-sparse path": []}
print(f"{'T':>6} {'full T^2':>12} {'causal':>12} {'pattern':>11} {'path':>11} "
      f"{'pattern/causal':>14} {'path/causal':>11}")
for T_f in lengths_f:
    n_f = T_f // b_f
    visible = bigbird_pattern(n_f, g_f, w_f, table_f) > 0  # (n, n)
    off_diagonal = int(visible.sum()) - n_f
    pattern_pairs = off_diagonal * b_f**2 + n_f * b_f * (b_f + 1) // 2
    path = n_f * min(n_f, g_f + w_f + r_f) * b_f**2
    row = [T_f * T_f, T_f * (T_f + 1) // 2, pattern_pairs, path]
    for name, value in zip(counts, row, strict=True):
        counts[name].append(value)
    print(f"{T_f:>6} {row[0]:>12,} {row[1]:>12,} {row[2]:>11,} {row[3]:>11,} "
          f"{row[2] / row[1]:>14.3f} {row[3] / row[1]:>11.3f}")

# %% [markdown]
# Up to $T = (g + w + r)\,b = 512$ the pattern *is* the causal triangle (every row sees all its
# past), and the block-sparse path computes twice as much as a causal kernel: it fills whole
# tiles, upper halves of the diagonal blocks included, and at this length every row but the last
# has filler slots. So `SparseAttention` does not take the path at such lengths: while a
# sequence has at most $g + w + r$ blocks, the layer computes plain causal attention with SDPA's
# causal kernel, which gives the same result for half the work. From there on the pattern's
# pairs grow linearly, about
# $T\,(g + w + r - \tfrac12)\,b$ for long sequences (each of the $T/b$ query blocks sees
# $K - 1 = g + w + r - 1$ full off-diagonal tiles of $b^2$ pairs and about half its diagonal
# tile, so $\tfrac{T}{b}\,(K - \tfrac12)\,b^2$). That is an approximation: the first $K - 1$
# query blocks see fewer blocks, and the exact count for $T \ge Kb$, with $n = T/b$, is
# $n(K - 1)\,b^2 - \tfrac12 K(K - 1)\,b^2 + n \cdot b(b + 1)/2$, which gives the table's
# pattern column (377,344 at $T = 1024$, where the approximation says 491,520). The path's
# entries grow exactly linearly, $T\,(g + w + r)\,b$; relative to the causal triangle both
# halve with every doubling of $T$. At 4096 tokens the path computes a quarter of the causal
# scores, at 16384 a sixteenth. On log-log axes:

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (name, values), style in zip(counts.items(), ["k:", "C3-", "C0o-", "C2^--"], strict=True):
    ax.plot(lengths_f, values, style, label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length T")
ax.set_ylabel("score entries per head")
ax.set_title(f"Scores computed: b={b_f}, g={g_f}, w={w_f}, r={r_f}")
ax.legend()
plt.show()
ratios = [p / c for p, c in zip(counts["block-sparse path"], counts["causal"], strict=True)]
assert ratios[0] > 1.9 and ratios[-1] < 0.07

# %% [markdown]
# The quadratic lines have slope 2, the BigBird lines slope 1 once $T$ passes 512. Whether the
# saving in entries becomes a saving in time is the next question.
#
# ## 6. Is it faster?
#
# We time forward plus backward of the attention core (what training pays) on one sequence with
# 2 heads of 64, blocks of 64 and the default pattern, at $T$ = 512 to 4096: full causal
# attention with SDPA's fused causal kernel against the module's `block_sparse_attention`. The
# output depends on the machine and on what else runs on it, so the book's tests ignore it; the
# cell asserts a loose claim instead (block-sparse at the longest length takes less than 0.8 of
# causal attention's time), so that a lost speed-up still fails. One thread, one warm-up call,
# the fastest of three runs.

# %%
def fastest_ms(fn, *args, reps=3):
    """Best of `reps` timings of fn(*args) in milliseconds, after one warm-up call."""
    fn(*args)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, 1000 * (time.perf_counter() - t0))
    return best


def full_causal(q, k, v):
    sdpa(q, k, v, is_causal=True).sum().backward()


lengths_t = [512, 1024, 2048, 4096]
torch.manual_seed(7)
table_t = draw_random_blocks(lengths_t[-1] // b_f, g_f, w_f, r_f)  # rows for the longest T


def block_sparse_default(q, k, v):
    block_sparse_attention(q, k, v, b_f, g_f, w_f, table_t).sum().backward()


# %% tags=["nbval-ignore-output"]
ms = {"full causal (SDPA, is_causal)": [], "block-sparse (block_sparse_attention)": []}
for T_t in lengths_t:
    q_t, k_t, v_t = (torch.randn(1, 2, T_t, 64, requires_grad=True) for _ in range(3))
    for name, fn in zip(ms, [full_causal, block_sparse_default], strict=True):
        ms[name].append(fastest_ms(fn, q_t, k_t, v_t))

fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (name, times), style in zip(ms.items(), ["o-", "^-"], strict=True):
    ax.plot(lengths_t, times, style, label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length T")
ax.set_ylabel("forward + backward, ms (fastest of 3)")
ax.set_title(f"Attention core, B=1, 2 heads of 64, b={b_f}, g={g_f}, w={w_f}, r={r_f}, "
             "CPU, 1 thread")
ax.legend()
plt.show()
full_t, sparse_t = ms.values()
for T_t, f_ms, s_ms in zip(lengths_t, full_t, sparse_t, strict=True):
    print(f"T={T_t:>5}: full causal {f_ms:7.1f} ms   block-sparse {s_ms:7.1f} ms   "
          f"ratio {s_ms / f_ms:.2f}")
assert sparse_t[-1] / full_t[-1] < 0.8, "block-sparse should be clearly faster at the longest T"

# %% [markdown]
# What to expect (your numbers will differ, the shape should not): at 512 tokens the pattern is
# the causal triangle and the block-sparse path does twice the work plus a gather, so it is
# clearly slower. From there block-sparse time roughly doubles per doubling of $T$, while causal
# attention's time grows by more at each doubling, toward the fourfold of a quadratic cost as $T$
# grows (at short lengths the fixed costs of each call still weigh, so the first ratios are
# smaller). The two cross at or a little after $T = 1024$, the length at which section 5's count
# makes the path's entries equal the causal triangle's ($T = 2(g + w + r)\,b$): the gather, the
# padding and the bookkeeping cost time that counting entries ignores, so the block-sparse path
# does not win there by much, if at all. At 4096 it is clearly faster (the cell asserts less than
# 0.8 of causal attention's time). So BigBird is a tool for *long* sequences: with these
# settings the curves cross near 1024 tokens, and at 2048 the block-sparse path already takes
# about two thirds of causal attention's time (ratio 0.68 in the run stored here); below the
# crossover, plain causal attention is as fast or faster. The layer avoids the
# worst case (at 512 tokens it runs causal attention, section 5), but from 513 tokens up to the
# crossover it must take the block-sparse path and pay somewhat more than causal attention
# would: the pattern no longer covers the whole triangle there, so the causal kernel would
# compute a different function.
#
# ## 7. Generating with a full KV cache
#
# ### 7.1 Why every position must be kept
#
# [Chapter 9](09_sliding_window.ipynb)'s rolling cache kept only the last $w$ positions, because no
# later query could ever look further back. BigBird breaks that argument twice. The global blocks
# sit at the very start and are read by every query, forever. And the random blocks of a later row
# may be *any* non-global block outside its window: row 40 may draw block 3. So, in general, no
# cached position can be thrown away, and BigBird generates with the ordinary full `KVCache` of
# [chapter 7](07_kv_cache.ipynb). The layer handles the rest: a new query at position
# `cache.length + t` uses its row of the pattern through the bottom-right aligned `bigbird_mask`.
#
# The model is the package's `GPT`, as in [chapter 9](09_sliding_window.ipynb): token
# embedding, pre-norm blocks of attention plus MLP, a final LayerNorm and a linear head, random
# weights with PyTorch's default initialisation ([chapter 7](07_kv_cache.ipynb), section 9,
# says why). `GPTConfig(attention="sparse", attention_options=sparse_options)` builds every
# block's attention with `build_attention("sparse", cfg, **sparse_options)`, RoPE in `cfg` and
# the dict `sparse_options` as the variant's options: blocks of 4 tokens (`sparse_block`), 1 global
# block, a window of 2 blocks and 2 random blocks, so that a generation of 64 tokens (16 blocks) is
# far from causal attention. Each layer draws its random blocks when it is built, from the random
# generator, so a model built under another seed has other draws; section 7.2 comes back to that,
# and builds the model more than once, hence a function.

# %%
sparse_options = dict(sparse_block=4, n_global_blocks=1, n_window_blocks=2,
                      n_random_blocks=2)  # the options of "sparse"
config = GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=4, n_embd=64,
                   attention="sparse", attention_options=sparse_options, positions="rope",
                   tie_weights=False)
cfg = config.attention_config()  # the AttentionConfig every block's attention is built from


def tiny_gpt():
    """A GPT built from config, with PyTorch's default initialisation, not GPT's N(0, 0.02)."""
    model = GPT(config).eval()  # each block's SparseAttention draws its random blocks here
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            module.reset_parameters()
    return model


torch.manual_seed(8)
model = tiny_gpt()
blocks = model.transformer.h  # the 3 blocks; blocks[i].attn is a SparseAttention
print(f"GPT: {len(blocks)} layers of sparse attention, {model.num_params():,} parameters")
print("random blocks per layer:", tuple(blocks[0].attn.random_blocks.shape),
      "(query blocks of the longest sequence, r)")

# %% [markdown]
# Generate 52 tokens after a 12-token prompt, for a batch of two, once by recomputing the whole
# sequence at every step (`use_cache=False`) and once with one `KVCache` per layer (`GPT.generate`
# makes them with `model.new_caches`, each block's `layer.new_cache`). The two runs
# go through different code paths of the layer, and all of them must implement the same pattern:
#
# - without a cache, each step runs the whole sequence: plain causal attention while it has at
#   most $g + w + r = 5$ blocks (20 tokens), the block-sparse path after that;
# - with a cache, the prompt is prefilled at once (3 blocks: plain causal attention), and each new
#   token then attends over every cached key: plainly while the cache spans at most 5 blocks,
#   with its row of `bigbird_mask` after that.
#
# Both must give the same tokens.

# %%
torch.manual_seed(9)
prompt = torch.randint(0, 256, (2, 12))
out_plain = model.generate(prompt, 52, temperature=0, use_cache=False)  # recomputes each step
out_cached = model.generate(prompt, 52, temperature=0)  # prefills the prompt, then 1 token a step
assert torch.equal(out_cached, out_plain)
print("generated:", tuple(out_plain.shape), "| first new tokens of row 0:",
      out_plain[0, 12:22].tolist())
print("cached greedy decoding == full recomputation:", torch.equal(out_cached, out_plain))

# %% [markdown]
# Which cached positions does the *next* token (position 64, in block 16) need? Each layer has
# its own random draw, so each layer needs different blocks. Each layer can say:
# `SparseAttention.pattern(n)` returns this layer's block pattern for `n` blocks, the codes of
# `bigbird_pattern` (0 none, 1 global, 2 window, 3 random) built from its own `random_blocks`:

# %%
n_seen = out_plain.shape[1] // sparse_options["sparse_block"]  # 16 blocks generated so far
for layer_i, block in enumerate(blocks):
    row = block.attn.pattern(n_seen + 1)[-1]  # codes of query block 16
    print(f"layer {layer_i}: global {(row == 1).nonzero().flatten().tolist()}, "
          f"window {(row == 2).nonzero().flatten().tolist()}, "
          f"random {(row == 3).nonzero().flatten().tolist()}")

# %% [markdown]
# A rolling cache sized for the window, like [chapter 9](09_sliding_window.ipynb)'s ($w \cdot b = 8$
# positions), would lose the global block 0 and all the random ones. Nor can we predict a safe
# subset: the rows *after* 16 have their own draws. Over the rest of each layer's 32 rows, how many
# of the 16 blocks cached now are still needed by some later query, in any layer?

# %%
n_rows = blocks[0].attn.random_blocks.shape[0]  # 32 query blocks up to block_size=128
still_needed = torch.zeros(n_seen, dtype=torch.bool)
for block in blocks:
    later_rows = block.attn.pattern(n_rows)[n_seen:, :n_seen]  # rows 16..31, cached blocks
    still_needed |= (later_rows > 0).any(dim=0)
print(f"cached blocks 0..{n_seen - 1} still needed by a later query: "
      f"{int(still_needed.sum())} of {n_seen}")
print("not needed any more:", (~still_needed).nonzero().flatten().tolist())

# %% [markdown]
# All of them. (Since the draws are fixed in advance, one could in principle evict a block that
# no later row of any layer draws; with several layers and many rows such blocks are rare, and
# the global blocks are never among them.) So the cache grows by the same amount with every
# token, exactly like [chapter 7](07_kv_cache.ipynb)'s:

# %%
caches = model.new_caches(batch_size=1)  # what generate used, for one sequence
bytes_per_token = sum(c.bytes_per_token for c in caches)  # 3 layers
print(f"{type(caches[0]).__name__} per layer; per token: {bytes_per_token:,} bytes "
      f"(3 layers x K and V x 4 heads x 16 x 4 bytes)")
for length in (16, 32, 64, 128):
    window = sparse_options["n_window_blocks"] * sparse_options["sparse_block"]  # 8 positions
    print(f"  {length:>3} positions: {length * bytes_per_token:>7,} bytes in use "
          f"(a window of {window} would keep {min(length, window) * bytes_per_token:,})")

# %% [markdown]
# BigBird saves *compute* in training and prefill, where the block-sparse path applies; it does
# not save cache *memory* in generation. (And in this implementation a decoding step scores its
# single query against every cached key and then masks. That is few FLOPs, one row of scores,
# but the step still *reads* every cached key and value, and at long context reading the cache
# is what a decoding step's time is made of: [chapter 14](14_learned_sparse_attention.ipynb)
# measures it, and decodes by reading only the keys a query selects.) For generation, the tools that
# shrink memory are others: the rolling cache of a sliding window
# ([chapter 9](09_sliding_window.ipynb)) and smaller caches per token (chapters 4 and 13).
#
# ### 7.2 The random blocks belong to the model
#
# Every mask of the earlier chapters is a function of sizes: the package builds it when it is
# needed (or keeps it in a *non-persistent* buffer, like [chapter 1](01_buggy_sketch.ipynb)'s
# `tril`), so checkpoints hold weights only. The random blocks are different: they were drawn once
# from the random generator, the weights were (or will be) trained with exactly that pattern, and
# another draw would be a different model. So `SparseAttention` registers `random_blocks` as a
# **persistent** buffer, and a checkpoint (`state_dict`) carries it:

# %%
state = model.state_dict()
print("random-block entries in the state_dict:",
      [name for name in state if "random_blocks" in name])

torch.manual_seed(123)  # a new model, built under another seed: other weights, other draws
other = tiny_gpt()
same_draw = torch.equal(other.transformer.h[0].attn.random_blocks, blocks[0].attn.random_blocks)
print("same random blocks before loading:", same_draw)
other.load_state_dict(state)
print("same random blocks after loading: ",
      torch.equal(other.transformer.h[0].attn.random_blocks, blocks[0].attn.random_blocks))
print("same generation after loading:    ",
      torch.equal(other.generate(prompt, 52, temperature=0, use_cache=False), out_plain))

# %% [markdown]
# What if the pattern were not saved? Load only the parameters into a freshly built model (what
# a checkpoint would hold if the buffer were non-persistent) and compare the logits:

# %%
torch.manual_seed(123)
weights_only = tiny_gpt()
params = {name: p for name, p in state.items() if "random_blocks" not in name}
missing = weights_only.load_state_dict(params, strict=False).missing_keys
print("missing keys:", missing)
with torch.no_grad():
    seq = out_plain[:, :40]  # 40 tokens: 10 blocks, beyond g + w + r = 5
    gap = (weights_only(seq)[0] - model(seq)[0]).abs().amax(dim=(0, 2))  # (T,)
print("positions whose logits differ:", (gap > 1e-4).nonzero().flatten().tolist()[:8], "...")
print("first 20 positions identical:", bool((gap[:20] < 1e-5).all()))

# %% [markdown]
# The first 20 positions (5 blocks) agree: there $g + w + r = 5$ covers all the past, every
# draw gives the full causal triangle, and the weights alone decide. From block 5 on the rows
# differ by their random blocks, and so do the outputs. A checkpoint without the pattern would
# load without an error and silently compute something else.
#
# Drawing the pattern in advance has one more consequence: the table has rows for the
# `block_size` / $b$ = 128 / 4 = 32 query blocks of the longest sequence, and no more. Our
# model could not run longer sequences anyway (its RoPE tables stop at `block_size` too), but
# even with ALiBi, whose biases work at any length ([chapter 6](06_positions.ipynb)), a sparse layer
# refuses a sequence longer than `block_size`: it would need rows of the pattern that were never
# drawn.

# %%
layer_alibi = build_attention("sparse", replace(cfg, positions="alibi"), **sparse_options)
try:
    layer_alibi(torch.randn(1, cfg.block_size + 1, cfg.n_embd))  # 129 positions
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 8. Check against the module
#
# `attnbook.attention.sparse` holds this chapter's pieces: `draw_random_blocks` (our
# `draw_random`), `bigbird_pattern` (our `block_pattern`), `bigbird_mask`,
# `block_sparse_attention` (our `block_sparse`, plus grouped-query heads, ALiBi and dropout) and
# `SparseAttention`, registered as `"sparse"`, with the projections of
# [chapter 4](04_mqa_gqa.ipynb)'s grouped-query attention (MHA's state_dict layout for
# `n_kv_head=None`, plus the `random_blocks` buffer). The layer picks its path:
#
# - plain causal attention when the keys span at most $g + w + r$ blocks (the pattern is then
#   the whole triangle), whatever else is asked;
# - otherwise, dense attention with `bigbird_mask` for `impl="reference"`, `need_weights=True`,
#   an extra `attn_mask`, or queries after cached keys;
# - otherwise, the block-sparse path.
#
# We check, at `atol=1e-5`:
#
# 1. our random draw, block pattern and token mask equal the module's, for several patterns;
# 2. a `SparseAttention` layer, loaded with a block's weights (random blocks included), equals
#    the same computation done by hand with our `block_sparse`, with `impl="sdpa"` and
#    `"reference"`, at 20 tokens (plain causal) and at 45 (beyond $g + w + r$ blocks, and not a
#    multiple of $b$);
# 3. generating with the module's caches gave the tokens of full recomputation (section 7).

# %%
for n_c, g_c, w_c, r_c, b_c in [(16, 2, 3, 2, 4), (30, 1, 2, 3, 8), (12, 0, 1, 4, 2)]:
    torch.manual_seed(10)
    ours = draw_random(n_c, g_c, w_c, r_c)
    torch.manual_seed(10)
    assert torch.equal(ours, draw_random_blocks(n_c, g_c, w_c, r_c))
    codes = block_pattern(n_c, g_c, w_c, ours)
    assert torch.equal(codes, bigbird_pattern(n_c, g_c, w_c, ours))
    T_m = n_c * b_c - 1  # not a multiple of b
    token_mask = ((codes > 0).repeat_interleave(b_c, 0).repeat_interleave(b_c, 1)[:T_m, :T_m]
                  & causal_mask(T_m))
    assert torch.equal(token_mask, bigbird_mask(T_m, T_m, b_c, g_c, w_c, ours))

torch.manual_seed(11)
cfg_m, options_m = cfg, blocks[1].attn.options  # SparseOptions(sparse_block=4, ...)
for impl in ("sdpa", "reference"):
    layer = build_attention("sparse", replace(cfg_m, impl=impl), **sparse_options).eval()
    layer.load_state_dict(blocks[1].attn.state_dict())  # weights and random blocks
    assert torch.equal(layer.random_blocks, blocks[1].attn.random_blocks)
    for T_m in (20, 45):  # 5 blocks of 4: plain causal; 12 blocks, the last one partial
        x = torch.randn(2, T_m, cfg_m.n_embd)
        with torch.no_grad():
            q_h, k_h, v_h = layer.project(x)  # (2, 4, T, 16) each
            q_h, k_h = layer.rope(q_h), layer.rope(k_h)  # rotated at positions 0..T-1
            n_m = -(-T_m // options_m.sparse_block)
            visible = block_pattern(n_m, options_m.n_global_blocks, options_m.n_window_blocks,
                                    layer.random_blocks) > 0
            y_h = block_sparse(q_h, k_h, v_h, options_m.sparse_block, visible)  # (2, 4, T, 16)
            by_hand = layer.c_proj(y_h.transpose(1, 2).reshape(2, T_m, cfg_m.n_embd))
            assert torch.allclose(layer(x), by_hand, atol=1e-5), (impl, T_m)
assert torch.equal(out_cached, out_plain)
print("draw, pattern and mask == module's; SparseAttention (sdpa and reference, 20 and 45 "
      "tokens) == by hand with our block_sparse (atol=1e-5); cached generation == full "
      "recomputation: OK")

# %% [markdown]
# ## Summary
#
# - BigBird lets each query block see a fixed number of key blocks: $g$ global blocks, a window
#   of $w$ blocks and $r$ random blocks drawn once per layer. The pattern is an $n \times n$
#   block matrix; the token mask repeats it over $b \times b$ tiles and applies the causal rule on
#   the diagonal.
# - Counting hops explains the ingredients. In the paper's bidirectional encoder global blocks
#   are hubs (any two positions two hops apart) and random blocks alone also give short paths. In
#   a decoder "global" only means "seen by everyone later"; the long-range shortcuts come from
#   the random blocks (at 64 blocks: a few hops instead of 32).
# - Blocks make sparsity fast: each query block gathers its $K = g + w + r$ key blocks once and
#   attends with one dense tile, all blocks in one batched SDPA call. It computes $T K b$ score
#   entries, linear in $T$: twice the causal triangle at $T = Kb$, a sixteenth of it at 16384
#   tokens (with the defaults), and it is faster than causal SDPA only well beyond $Kb$. Up to
#   $Kb$ tokens the pattern is the causal triangle, and the layer simply runs causal attention.
# - Generation needs the full KV cache: global and random blocks can lie anywhere in the past.
#   The random draw is part of the model and is saved in the `state_dict` as a persistent
#   buffer.

# %% [markdown]
# ## Further reading
#
# - Zaheer et al., *Big Bird: Transformers for Longer Sequences* (NeurIPS 2020): global, window and
#   random blocks, and why they keep the model expressive.
# - Child, Gray, Radford and Sutskever (2019): fixed sparse patterns and their kernels.
# - Ainslie et al., *ETC: Encoding Long and Structured Inputs in Transformers* (EMNLP 2020):
#   global-local attention.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/10_sparse_attention_solutions.ipynb`](solutions/10_sparse_attention_solutions.ipynb).
# Predict first, then check with code.
#
# 1. **Where BigBird stops being causal attention.** (a) Sections 5 and 8 claimed that for
#    $T \le (g + w + r)\,b$ every random draw gives the whole causal triangle. Prove it from the
#    definition of the pattern, then show that at $g + w + r + 1$ blocks *no* draw does: how many
#    blocks does the last row miss? Check both over many draws. (b) Take a `SparseAttention`
#    layer and a `"gqa"` layer with the same weights (the `random_blocks` entry aside), and a
#    sequence one token longer than $(g + w + r)\,b$. Predict which output positions differ
#    between the two layers, and check.
# 2. **Hops against random blocks.** For 64 causal blocks with $g = 2$, $w = 3$, predict how the
#    largest and mean hop counts change for $r = 0, 1, 2, 3, 6$, then measure (several seeds).
#    Then fix $r = 3$ and double the number of blocks from 16 to 512: do the largest and the
#    mean hop count grow like $n$ (the window alone), like $\log n$, or in between? Why?
# 3. **The fraction at 64k tokens.** Predict, from the formulas of section 5, what fraction of
#    the causal triangle the block-sparse path computes at $T = 65536$ with the defaults, and how
#    large a full KV cache is for that sequence in one layer of 12 heads of 64 in fp16. Check the
#    first by counting from the block pattern.
# 4. **A strided pattern.** The Sparse Transformer (Child et al., 2019) combined a local window
#    with a *strided* pattern: position $i$ also sees positions $i - s, i - 2s, \ldots$. Build its
#    block version (query block $i$ sees the $s$ blocks $i - s + 1 \ldots i$ and every block $j$
#    with $i - j$ a multiple of $s$), pass it to `block_sparse_attention` as a table in place of
#    the random blocks, and check it against dense attention with the same mask. Predict its
#    largest hop count and its blocks per row for 64 blocks and $s = 8$, and compare with
#    BigBird's. How do the two costs grow with $n$?
