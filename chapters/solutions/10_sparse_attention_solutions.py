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
# # Chapter 10 — Sparse attention, BigBird style: solutions
#
# Worked solutions to the exercises of `chapters/10_sparse_attention.ipynb`. Each one states the
# reasoning first, then checks the claim with code and an `assert`. The hop counter of section 2
# is repeated here, condensed, since a notebook cannot import another notebook. As in the
# chapter, everything runs on one thread.

# %%
import torch

from attnbook.attention import AttentionConfig, build_attention, sdpa_reference
from attnbook.attention.sparse import (
    bigbird_mask,
    bigbird_pattern,
    block_sparse_attention,
    draw_random_blocks,
)
from attnbook.kv_cache import KVCache

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)


def hop_counts(visible):
    """(n, n) layers for key block j to reach query block i along the pattern; -1 = never."""
    A = visible.long() | torch.eye(len(visible), dtype=torch.long)
    reach = torch.eye(len(visible), dtype=torch.long)
    hops = torch.where(reach > 0, 0, -1)
    for layers in range(1, len(visible) + 1):
        reach = ((A @ reach) > 0).long()
        new = (reach > 0) & (hops < 0)
        if not new.any():
            break
        hops[new] = layers
    return hops


def largest_and_mean(hops):
    """Largest and mean hop count from an earlier block to a later one (j < i)."""
    below = torch.ones_like(hops, dtype=torch.bool).tril(-1)
    return int(hops[below].max()), hops[below].float().mean().item()


# %% [markdown]
# ## Exercise 1 — where BigBird stops being causal attention
#
# **(a)** Query block $i$ sees all of its past exactly when no eligible block is left out. The
# eligible blocks of row $i$ are $g \ldots i - w$, that is $i - w + 1 - g$ of them (when that is
# positive), and the row draws $\min(r, \text{eligible})$ of them. So row $i$ is complete when
# $i - w + 1 - g \le r$, i.e. $i \le g + w + r - 1$. A sequence of at most $g + w + r$ blocks
# has only such rows: for $T \le (g + w + r)\,b$ the pattern is the causal triangle **whatever
# the random draw**. This is the test of `SparseAttention.covers_all`, which lets the layer run
# SDPA's causal kernel on such sequences.
#
# With one block more, the last row $i = g + w + r$ has $r + 1$ eligible blocks and draws $r$:
# it misses **exactly one** block, whichever the draw. With $g = 1$, $w = 2$, $r = 2$: 5 blocks
# are always complete, 6 never, and the last row of 6 misses one block. We check over 200 draws:

# %%
g1, w1, r1 = 1, 2, 2
K1 = g1 + w1 + r1  # 5 blocks
triangle = torch.ones(K1, K1, dtype=torch.bool).tril()  # causal attention over K1 blocks
complete, missed = [], []
for seed in range(200):
    torch.manual_seed(seed)
    table = draw_random_blocks(K1 + 1, g1, w1, r1)
    complete.append(torch.equal(bigbird_pattern(K1, g1, w1, table) > 0, triangle))
    last_row = bigbird_pattern(K1 + 1, g1, w1, table)[K1]  # row 5: codes of blocks 0..5
    missed.append(int((last_row == 0).sum()))
print(f"{K1} blocks: the causal triangle in {sum(complete)} of 200 draws")
print(f"{K1 + 1} blocks: blocks missed by the last row, over 200 draws: {sorted(set(missed))}")
assert all(complete) and set(missed) == {1}

# %% [markdown]
# **(b)** With $b = 4$ the longest causal length is $T = 20$; take 21 tokens. The new token,
# position 20, starts block 5, whose row misses one block (part a), so its output differs from
# causal attention. Positions 0 to 19 are unaffected: their rows are complete, and causality
# keeps the new token out of their outputs. So only position 20 should differ.
#
# `SparseAttention` has the projections of `"gqa"` (with `n_kv_head=None`, MHA's layout), so a
# `"gqa"` layer can load its state dict once the `random_blocks` entry is left out.

# %%
torch.manual_seed(1)
base = dict(n_embd=32, n_head=4, block_size=64, positions="rope")
pattern = dict(sparse_block=4, n_global_blocks=g1, n_window_blocks=w1, n_random_blocks=r1)
sparse = build_attention("sparse", AttentionConfig(**base), **pattern).eval()
full = build_attention("gqa", AttentionConfig(**base)).eval()
full.load_state_dict({name: t for name, t in sparse.state_dict().items()
                      if name != "random_blocks"})

T_max = 4 * K1  # (g + w + r) * b = 20
x = torch.randn(2, T_max + 1, 32)
with torch.no_grad():
    diff = (sparse(x) - full(x)).abs().amax(dim=(0, 2))  # (T + 1,)
row_5 = sparse.pattern(K1 + 1)[K1]
print("row 5 codes:", row_5.tolist(), "| missing block:",
      [j for j in range(K1) if row_5[j] == 0])
print("positions that differ:", (diff > 1e-5).nonzero().flatten().tolist())
assert (diff > 1e-5).nonzero().flatten().tolist() == [T_max]

# %% [markdown]
# The difference sits exactly at position 20, the first query whose row of the pattern leaves a
# block out. BigBird only becomes "sparse" beyond $(g + w + r)\,b$ tokens; below that, the
# block-sparse path would only add work (section 5 of the chapter), which is why the layer runs
# plain causal attention there.
#
# ## Exercise 2 — hops against random blocks
#
# **Prediction.** With $r = 0$ only the window relays information (global blocks help only pairs
# that start at the front), so the largest hop count is about $(n - 1)/(w - 1) \approx 31$.
# The first random block per row should help most: it gives every row one long jump back, and
# a chain of long jumps covers the sequence quickly. Later blocks help less and less
# (diminishing returns), as in random graphs, where adding edges beyond a few per node only
# shaves the path lengths slightly. We average over 5 draws.

# %%
n, g, w = 64, 2, 3
print(f"{n} causal blocks, g={g}, w={w}: largest and mean hops (mean of 5 draws)")
summary = {}
for r in (0, 1, 2, 3, 6):
    results = []
    for seed in range(5):
        torch.manual_seed(seed)
        table = draw_random_blocks(n, g, w, r)
        results.append(largest_and_mean(hop_counts(bigbird_pattern(n, g, w, table) > 0)))
    largest = sum(res[0] for res in results) / 5
    mean = sum(res[1] for res in results) / 5
    summary[r] = (largest, mean)
    print(f"  r={r}: largest {largest:5.1f}   mean {mean:5.2f}")
largest_by_r = [summary[r][0] for r in (0, 1, 2, 3, 6)]
assert largest_by_r == sorted(largest_by_r, reverse=True)  # more random blocks, shorter paths
assert summary[1][0] < summary[0][0] / 2  # the first random block helps most

# %% [markdown]
# One random block per row already cuts the worst case by a factor of several; going from 3 to 6
# blocks per row doubles the cost of the random part but gains only a hop or so.
#
# **Growth with $n$.** With the window alone the largest hop count grows linearly,
# $\lceil (n - 1)/(w - 1) \rceil$. A first guess for BigBird is the random-graph answer,
# $\log n$: doubling $n$ should add a constant number of hops. We measure the largest and the
# mean over all pairs, up to 512 blocks (32k tokens with $b = 64$). For speed, `hop_counts`
# multiplies 0/1 matrices in float32 here, which is exact for sums this small.

# %%
def hop_counts_fast(visible):
    """hop_counts with float32 products (exact for 0/1 entries and n < 2**24)."""
    A = visible.float() + torch.eye(len(visible))
    reach = torch.eye(len(visible))
    hops = torch.where(reach > 0, 0, -1)
    for layers in range(1, len(visible) + 1):
        reach = ((A @ reach) > 0).float()
        new = (reach > 0) & (hops < 0)
        if not new.any():
            break
        hops[new] = layers
    return hops


print(f"r=3, g={g}, w={w} (one draw each)")
print(f"{'n':>5} {'largest':>8} {'mean':>6} {'window alone':>13}")
largest_n, mean_n = [], []
for n_blocks in (16, 32, 64, 128, 256, 512):
    torch.manual_seed(0)
    table = draw_random_blocks(n_blocks, g, w, 3)
    largest, mean = largest_and_mean(hop_counts_fast(bigbird_pattern(n_blocks, g, w, table) > 0))
    largest_n.append(largest)
    mean_n.append(mean)
    print(f"{n_blocks:>5} {largest:>8} {mean:>6.2f} {-(-(n_blocks - 1) // (w - 1)):>13}")
steps = torch.tensor(mean_n).diff()  # growth of the mean per doubling of n
assert bool(((steps > 0) & (steps < 1)).all())  # the mean: about the same step per doubling
assert 1.4 < largest_n[-1] / largest_n[-3] < 3  # 4x the blocks: about 2x, not 4x (linear)

# %% [markdown]
# The **mean** behaves as guessed: a roughly constant step per doubling, logarithmic growth.
# The **largest** grows faster than that, though far slower than the window: about $\sqrt 2$
# per doubling, i.e. like $\sqrt n$. The reason is in how causal BigBird draws: each row picks
# its random blocks uniformly from its *whole* past. Take two blocks $d$ apart near the end of
# a long sequence. A random edge shortens their path only if one of the $d$ rows between them
# drew a block less than $d$ behind it, a chance of about $r d / n$ per row, $r d^2 / n$ in
# all. For $d$ below about $\sqrt{n / r}$ that is unlikely, and such a pair must walk the
# window, $d/(w-1)$ hops: medium-range pairs, not far ones, are the slow ones, and their
# distance grows like $\sqrt n$. (This is a rough argument, not a proof; the table agrees with
# it.) Long jumps are cheap in BigBird, medium ones are not, which is one more reason for
# several layers, or for drawing random blocks nearer the query more often.
#
# ## Exercise 3 — the fraction at 64k tokens
#
# **Prediction.** With $K = g + w + r = 8$ slots per row and $n = T/b$ rows, the path computes
# $n K b^2 = T K b$ entries; the causal triangle has $T(T+1)/2$. The fraction is
# $2Kb/(T + 1) \approx 2 \cdot 8 \cdot 64 / 65536 = 1/64 \approx 0.0156$. The pattern's own
# pairs are a little fewer (the diagonal tiles are half used and the first rows see fewer
# blocks), about $(K - \tfrac12)/K$ of that.
#
# The full KV cache of one layer for one sequence holds keys and values for every position:
# $2 \times 65536 \times 12 \times 64 \times 2$ bytes $= 192$ MiB, whatever the attention
# pattern ([chapter 7](../07_kv_cache.ipynb)'s formula; section 7 of the chapter explains why
# BigBird cannot drop positions).

# %%
T, b, g, w, r = 65536, 64, 2, 3, 3
n = T // b
torch.manual_seed(3)
visible = bigbird_pattern(n, g, w, draw_random_blocks(n, g, w, r)) > 0  # (1024, 1024)
pattern_pairs = (int(visible.sum()) - n) * b**2 + n * b * (b + 1) // 2
path = n * (g + w + r) * b**2
causal = T * (T + 1) // 2
print(f"T={T}: path/causal {path / causal:.4f}, pattern/causal {pattern_pairs / causal:.4f}, "
      f"predicted {2 * (g + w + r) * b / (T + 1):.4f}")
cache = KVCache(1, 12, 64, T, device="meta", dtype=torch.float16)  # shapes only, no storage
print(f"full KV cache, one layer of 12 heads of 64, fp16: {cache.nbytes / 2**20:.0f} MiB")
assert abs(path / causal - 1 / 64) < 1e-3
assert cache.nbytes == 2 * T * 12 * 64 * 2

# %% [markdown]
# A sixty-fourth of the causal scores, but still the whole cache: BigBird saves compute, not
# generation memory.
#
# ## Exercise 4 — a strided pattern
#
# **The pattern.** Query block $i$ sees the window $i - s + 1 \ldots i$ and the strided blocks
# $i - s, i - 2s, \ldots \ge 0$. The strided ones all lie outside the window, so they fit the
# module's "random" slot exactly: `bigbird_pattern` and `block_sparse_attention` accept *any*
# table of extra blocks per row (padded with `-1`), not just random draws. With $g = 0$ and
# $w = s$ they compute the strided pattern.
#
# **Hops.** From block $j$ to a later block $i$: if $i - j < s$, one hop (window). Otherwise,
# among the $s$ blocks $j \ldots j + s - 1$ exactly one, $m$, has $i - m$ a multiple of $s$; $m$
# sees $j$ through its window, and $i$ sees $m$ through the stride. So **at most 2 hops**, for
# any length. **Cost.** Row $i$ sees $s$ window blocks and $\lfloor i/s \rfloor$ strided ones,
# up to $s + (n - 1)/s$ blocks: with 64 blocks and $s = 8$, at most $8 + 7 = 15$ against
# BigBird's 8. Choosing $s \approx \sqrt n$ keeps this near $2\sqrt n$, so the total grows like
# $n^{3/2}$ (the Sparse Transformer's $O(T\sqrt T)$); BigBird's stays at $g + w + r$ per row,
# linear in $n$, and pays with more hops.

# %%
def strided_table(n, s):
    """(n, n // s) table: row i holds the blocks i - s, i - 2s, ... >= 0, then -1 padding."""
    table = torch.full((n, max(1, (n - 1) // s)), -1)
    for i in range(n):
        strided = list(range(i - s, -1, -s))[::-1]  # increasing order
        table[i, : len(strided)] = torch.tensor(strided, dtype=torch.long)
    return table


n, s, b = 64, 8, 4
table_s = strided_table(n, s)
visible_s = bigbird_pattern(n, 0, s, table_s) > 0
hops_s = hop_counts(visible_s)
torch.manual_seed(4)
visible_bb = bigbird_pattern(n, 2, 3, draw_random_blocks(n, 2, 3, 3)) > 0
print(f"{n} blocks   {'largest hops':>12} {'most blocks per row':>20}")
print(f"strided s={s} {largest_and_mean(hops_s)[0]:>12} {int(visible_s.sum(1).max()):>20}")
print(f"BigBird      {largest_and_mean(hop_counts(visible_bb))[0]:>12} "
      f"{int(visible_bb.sum(1).max()):>20}")
assert largest_and_mean(hops_s)[0] == 2 and int(visible_s.sum(1).max()) == 15

torch.manual_seed(5)
T_s = n * b  # 256 tokens
q, k, v = torch.randn(3, 1, 2, T_s, 16).unbind(0)  # (B=1, H=2, T, 16) each
sparse_out = block_sparse_attention(q, k, v, b, 0, s, table_s)
dense_out = sdpa_reference(q, k, v, attn_mask=bigbird_mask(T_s, T_s, b, 0, s, table_s))
print("strided pattern: block_sparse_attention == dense masked attention (atol=1e-5):",
      torch.allclose(sparse_out, dense_out, atol=1e-5))
assert torch.allclose(sparse_out, dense_out, atol=1e-5)

# %% [markdown]
# How the two costs grow, in key blocks per row (the block-sparse path's $K$) with
# $s = \sqrt n$ for the strided pattern, and the largest hop count of each:

# %%
print(f"{'n':>5} {'strided K':>10} {'strided hops':>13} {'BigBird K':>10} {'BigBird hops':>13}")
for n_blocks in (16, 64, 256):
    s_n = int(n_blocks**0.5)
    vis_s = bigbird_pattern(n_blocks, 0, s_n, strided_table(n_blocks, s_n)) > 0
    torch.manual_seed(0)
    vis_b = bigbird_pattern(n_blocks, 2, 3, draw_random_blocks(n_blocks, 2, 3, 3)) > 0
    hops_strided = largest_and_mean(hop_counts(vis_s))[0]
    print(f"{n_blocks:>5} {int(vis_s.sum(1).max()):>10} {hops_strided:>13} "
          f"{int(vis_b.sum(1).max()):>10} {largest_and_mean(hop_counts(vis_b))[0]:>13}")
    assert hops_strided <= 2

# %% [markdown]
# The strided pattern buys a guaranteed two hops with a row cost that grows like $2\sqrt n$;
# BigBird keeps a constant row cost and accepts a slowly growing number of hops (and, in the
# paper's encoder, gets two hops anyway from its global hubs). Which is better depends on the
# length and on how many layers the model has to spend on relaying.
