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
# # Chapter 8 — FlashAttention: attention without the T×T matrix
#
# Since [chapter 3](03_multi_head_attention.ipynb) the book's fast path has been
# `F.scaled_dot_product_attention`, and we have said that on a CPU it picks a "flash" kernel that
# "works through the keys in tiles and never stores the full weights". This chapter opens that box.
# The explicit math of [chapter 2](02_scaled_dot_product_attention.ipynb) forms the scores
# $S = QK^\top$, a $T \times T$ matrix per head, turns them into weights $P = \mathrm{softmax}(S)$,
# another $T \times T$ matrix, and multiplies $PV$. For training, autograd keeps $P$ for the
# backward pass. At $T = 16\,384$ one head's $P$ in float32 is 1 GiB; a layer of 16 heads and a
# batch of 8 would need 128 GiB for this one tensor. The output itself is only $T \times d$.
#
# FlashAttention (Dao, Fu, Ermon, Rudra and Ré, 2022) computes exactly the same output without
# ever holding $S$ or $P$: it walks over tiles of keys, keeps for each query a running maximum
# and a running sum (the **online softmax**), and rescales what it has accumulated whenever the
# maximum grows. For the backward pass it saves only the output and one number per query, the
# log-sum-exp of its scores, and recomputes each tile's probabilities from them. Computing the
# scores twice (forward and backward) is more arithmetic than the explicit math does, and it is
# still faster on a GPU, because it reads and writes far less memory; on any hardware it is what
# makes long contexts fit.
#
# **Learning goals**
#
# - Measure what the explicit math keeps for the backward pass, and how it grows with $T$.
# - Derive the online softmax, and check it against `softmax` on rows that begin with $-\infty$
#   and rows that are masked entirely.
# - Build the tiled forward pass, with causal tiles *skipped* rather than masked, a sliding
#   window that skips tiles outside its band, grouped key/value heads, and queries at the end
#   of a longer key sequence (decoding against a cache).
# - Derive the backward pass, write it as a `torch.autograd.Function` that saves O(T·d), check it
#   with `gradcheck`, and see why `Δ = rowsum(dO ∘ O)` replaces a sum over the whole row.
# - Split the keys of a decoding step into chunks and merge the partial results exactly
#   (flash-decoding), time the tiles honestly against SDPA, and write the book's masks for
#   PyTorch's FlexAttention.

# %% [markdown]
# ## Setup
#
# Seeds everywhere; shapes, booleans and rounded figures in the outputs the book's tests
# compare, timings only in cells whose output they ignore. The whole notebook runs on one
# thread: its tensors are small, and the timings of section 7 are steadier that way.

# %%
import math
import time
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Patch, Rectangle

from attnbook.attention import AttentionConfig, build_attention, sdpa_reference
from attnbook.attention.flash import flash_attention, merge_partial
from attnbook.attention.sparse import bigbird_mask, draw_random_blocks

torch.manual_seed(0)
torch.set_num_threads(1)
torch.set_printoptions(precision=4, sci_mode=False)

# %% [markdown]
# ## 1. What the explicit math keeps
#
# Training needs the backward pass, so autograd keeps, for every operation, the tensors its
# backward will need. PyTorch lets us watch: inside `torch.autograd.graph.saved_tensors_hooks`,
# every tensor saved for the backward passes through a function of ours. We run the explicit
# math (`sdpa_reference`, [chapter 2](02_scaled_dot_product_attention.ipynb)) on one head of 64
# dimensions and list what it saves, counting each storage once (views of one tensor share their
# storage).

# %%
def saved_for_backward(fn, *inputs):
    """Shapes and total bytes of the distinct tensors autograd keeps for fn's backward pass."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    total = sum(t.untyped_storage().nbytes() for t in seen.values())
    return sorted(tuple(t.shape) for t in seen.values()), total


def qkv(T, D=64, H=1, H_kv=None, T_k=None, dtype=torch.float32, seed=0):
    """Random q (1, H, T, D) and k, v (1, H_kv, T_k, D), all requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, H, T, D), (1, H_kv or H, T_k or T, D), (1, H_kv or H, T_k or T, D)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def explicit_causal(q, k, v):
    return sdpa_reference(q, k, v, is_causal=True)


shapes, total = saved_for_backward(explicit_causal, *qkv(512))
print("T=512, saved by the explicit math:", shapes)
print(f"total {total / 2**20:.2f} MiB")

# %% [markdown]
# Next to views of the inputs (`(1, 512, 64)`, and `(1, 64, 512)` for $K^\top$) sit three
# tensors of $T \times T$ entries: the weights $P$, kept by the softmax (its backward needs its
# output, not the scores, which nobody keeps); a copy of them with the rows that see no key set
# to zero ([chapter 2](02_scaled_dot_product_attention.ipynb)'s guard), kept by the product $PV$;
# and the causal mask, one byte per entry. (The `(1, 1, 512, 1)` tensor records which rows the guard
# found empty.) Each doubling of $T$ quadruples them. The same count for the tiled version we are
# about to build (the module's `flash_attention`) shows the goal: q, k, v, the output and one number
# per query. Both at growing $T$, below.

# %% [markdown]
# What is kept is not all that is held. During the backward pass the gradients of the scores
# and weights are $T \times T$ too, and the **peak** is what decides whether a run fits. To
# measure it we let every operation report what it creates: `attnbook.bench.PeakTensorMemory`
# is a `TorchDispatchMode`, through which PyTorch passes every operation (the backward pass's
# too); it counts each new tensor storage when an operation returns it and drops it when it is
# freed, and records the largest total. `attnbook.bench.peak_bytes(fn, q, k, v)` runs
# `fn(q, k, v).sum().backward()` inside it. It sees what Python-visible operations create, not
# scratch memory a fused kernel uses inside itself. The two columns therefore count different
# things: the inputs q, k and v exist before the call, so the peak leaves them out, while "kept"
# includes them, since the backward pass needs them.

# %%
from attnbook.bench import peak_bytes  # noqa: E402

lengths = [256, 512, 1024, 2048, 4096]
kept = {"explicit math": [], "flash_attention": []}
peak = {"explicit math": [], "flash_attention": []}
for T in lengths:
    for name, fn in (("explicit math", explicit_causal), ("flash_attention", flash_attention)):
        kept[name].append(saved_for_backward(fn, *qkv(T))[1] / 2**20)
        peak[name].append(peak_bytes(fn, *qkv(T)) / 2**20)
print(f"{'T':>5} {'explicit: kept':>15} {'peak':>7} {'flash: kept':>12} {'peak':>6}   (MiB)")
for i, T in enumerate(lengths):
    print(f"{T:>5} {kept['explicit math'][i]:>15.2f} {peak['explicit math'][i]:>7.1f} "
          f"{kept['flash_attention'][i]:>12.2f} {peak['flash_attention'][i]:>6.1f}")
flash_exact = [abs(mib * 2**20 - (4 * T * 64 + T) * 4) < 1 for mib, T in
               zip(kept["flash_attention"], lengths, strict=True)]
print("flash keeps exactly q, k, v, the output (4 x T x 64 floats) and T log-sum-exps:",
      all(flash_exact))
assert all(flash_exact) and peak["explicit math"][-1] > 20 * peak["flash_attention"][-1]

fig, ax = plt.subplots(figsize=(6.4, 3.6))
for name, color in (("explicit math", "C0"), ("flash_attention", "C1")):
    ax.loglog(lengths, peak[name], "o-", color=color, base=2, label=f"{name}: peak")
    ax.loglog(lengths, kept[name], "o--", color=color, base=2, label=f"{name}: kept for backward")
ax.set_xlabel("sequence length T (one head, head_dim 64)")
ax.set_ylabel("MiB")
ax.set_title("Forward + backward: quadratic against linear in T")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The explicit math's peak grows fourfold with every doubling of $T$: at $T = 4096$ it is 228
# MiB, three and a half times one float32 $T \times T$ matrix (64 MiB), since scores, weights,
# their gradients and the masks overlap in time. The tiles' peak grows linearly: about eight
# arrays of $T \times 64$ (the three input gradients, the output, the incoming gradient and the
# copies the backward pass makes of it) and one tile's temporaries, 8.2 MiB at $T = 4096$.
# `attnbook bench flash` continues the table to $T = 16\,384$, where the explicit math needs
# gigabytes, and adds SDPA's fused kernel.
#
# ## 2. The online softmax
#
# Softmax over a row of scores $s_1 \ldots s_n$ is $p_j = e^{s_j - m} / \ell$ with
# $m = \max_j s_j$ (subtracted so that no exponential overflows) and $\ell = \sum_j e^{s_j - m}$.
# Both $m$ and $\ell$ seem to need the whole row before anything can be computed. They do not.
# Read the row in chunks and keep the maximum $m$ and the sum $\ell$ *of what has been read*,
# relative to that maximum. When a new chunk $c$ arrives with maximum $m_c$:
#
# $$m' = \max(m, m_c), \qquad \ell' = \ell \, e^{m - m'} + \sum_{j \in c} e^{s_j - m'} .$$
#
# The factor $e^{m - m'}$ re-expresses the old sum relative to the new maximum: every term
# $e^{s_j - m}$ becomes $e^{s_j - m'}$. At the end, $m + \log \ell$ is the row's
# **log-sum-exp** ($\log \sum_j e^{s_j}$), and $p_j = e^{s_j - \mathrm{lse}}$.
#
# Two cases need care. A row whose first chunk is entirely $-\infty$ (masked keys) has
# $m' = -\infty$, and both $e^{m - m'}$ and $e^{s_j - m'}$ would be $e^{-\infty + \infty}$:
# NaN. So while the maximum is still $-\infty$ we subtract 0 instead, which makes both zero.
# And a row that is masked *everywhere* ends with $\ell = 0$: its log-sum-exp is $-\infty$, and
# (the book's convention since [chapter 2](02_scaled_dot_product_attention.ipynb)) its output is
# zero.

# %%
def online_lse(row, chunk):
    """log-sum-exp of a 1-D row, reading `chunk` entries at a time."""
    m, ell = torch.tensor(-math.inf, dtype=row.dtype), torch.tensor(0.0, dtype=row.dtype)
    for start in range(0, len(row), chunk):
        s = row[start : start + chunk]
        m_new = torch.maximum(m, s.max())
        m_safe = m_new if m_new > -math.inf else torch.zeros_like(m_new)  # all masked so far
        ell = ell * torch.exp(m - m_safe) + torch.exp(s - m_safe).sum()
        m = m_new
    return m + torch.log(ell) if ell > 0 else torch.tensor(-math.inf, dtype=row.dtype)


g = torch.Generator().manual_seed(1)
rows = [torch.randn(40, generator=g, dtype=torch.float64) * 5 for _ in range(3)]
rows.append(torch.cat([torch.full((12,), -math.inf, dtype=torch.float64), rows[0][12:]]))
rows.append(torch.full((40,), -math.inf, dtype=torch.float64))  # a fully masked row
for chunk in (1, 7, 40):
    ok = all(torch.allclose(online_lse(r, chunk), torch.logsumexp(r, 0), atol=1e-12)
             or (r == -math.inf).all() and online_lse(r, chunk) == -math.inf for r in rows)
    print(f"chunks of {chunk:>2}: online log-sum-exp == torch.logsumexp on all 5 rows: {ok}")

# %% [markdown]
# The picture below follows one row of 64 scores read in chunks of 8 (scores that drift upwards,
# so that the maximum moves often): the running maximum steps up when a chunk holds a new
# largest score, and each step shrinks what was summed before by $e^{m - m'}$.

# %%
g = torch.Generator().manual_seed(5)
row_demo = torch.randn(64, generator=g, dtype=torch.float64) + torch.linspace(-3, 3, 64,
                                                                            dtype=torch.float64)
m_run, ell_run, factors = -math.inf, 0.0, []
for start in range(0, 64, 8):
    chunk = row_demo[start : start + 8]
    m_new = max(m_run, chunk.max().item())
    factors.append(math.exp(m_run - m_new) if m_run > -math.inf else 0.0)
    ell_run = ell_run * factors[-1] + torch.exp(chunk - m_new).sum().item()
    m_run = m_new
steps = row_demo.view(8, 8).amax(dim=1).cummax(dim=0).values  # m after each chunk
fig, axes = plt.subplots(1, 2, figsize=(11, 3.3), layout="constrained")
axes[0].plot(range(64), row_demo, ".", color="0.5", label="scores $s_j$")
axes[0].step([8 * c for c in range(8)] + [64], [*steps, steps[-1]], where="post", color="C3",
             label="running maximum $m$ after each chunk")
for c in range(1, 8):
    axes[0].axvline(8 * c, color="0.85", lw=0.8)
axes[0].set_xlabel("position j in the row (chunks of 8)")
axes[0].legend(fontsize=8, loc="lower right")
axes[0].set_title("reading a row chunk by chunk")
axes[1].bar(range(1, 8), factors[1:], color="C3")
axes[1].set_xlabel("chunk")
axes[1].set_ylabel("$e^{m - m'}$ applied to the old sum")
axes[1].set_title("rescaling: 1 where the maximum did not move")
plt.show()
print(f"online log-sum-exp {m_run + math.log(ell_run):.6f}, torch.logsumexp "
      f"{torch.logsumexp(row_demo, 0).item():.6f}")

# %% [markdown]
# The output needs one more running quantity. Attention's output for a query is
# $\sum_j p_j v_j = \frac{1}{\ell}\sum_j e^{s_j - m} v_j$, so we also keep the *unnormalised*
# accumulator of what has been read, updated like $\ell$:
#
# $$a' = a\, e^{m - m'} + \sum_{j \in c} e^{s_j - m'}\, v_j ,$$
#
# and divide by $\ell$ once, at the end. Three running quantities per query ($m$, $\ell$ and the
# vector $a$: $2 + d_v$ numbers), whatever the length of the row.
#
# ## 3. The tiled forward pass
#
# Now for a whole matrix of queries. FlashAttention-2's loop order: an outer loop over tiles of
# `block_q` queries, an inner loop over tiles of `block_k` keys. Queries outside means each query
# tile's running state stays in fast memory for the whole inner loop and is written out once,
# and different query tiles never share anything, so a GPU runs them in parallel. *Fast memory*
# is the point of the whole design. The FlashAttention paper's A100 has 40 to 80 GB of main memory
# (HBM), read at 1.5 to 2 TB/s, and 192 KB of on-chip memory (SRAM) on each of its 108
# streaming multiprocessors, read at about 19 TB/s in total. The explicit math writes $S$ and
# $P$ to HBM and reads them back; the tiles keep one tile of scores and the running
# $m$, $\ell$, $a$ in SRAM and send only $O$ and the log-sum-exps to HBM. On a CPU the roles
# are played by the L1 and L2 caches and the main memory.
#
# The picture shows one step of the inner loop. Query tile 2 is read into fast memory once,
# with its running state (a maximum $m$ and a sum $\ell$ per query, and the accumulator $a$).
# Key and value tiles 0, 1, 2, ... stream past it: each is read, turned into one tile of
# scores, folded into the state with section 2's rescaling, and dropped. Only when the inner
# loop ends is $a / \ell$ written out, with $m + \log \ell$, the log-sum-exp the backward pass
# needs. The grey tiles of the score matrix are never formed at all, and the hatched ones, cut
# by the diagonal, are masked (section 3.1).

# %%
from matplotlib.patches import FancyArrowPatch


def tile_row(ax, x, y, n, w, h, label, shade=None, text=None):
    """n tiles of size w x h side by side from (x, y); tile `shade` filled."""
    for t in range(n):
        fill = "C1" if t == shade else "white"
        ax.add_patch(Rectangle((x + t * w, y), w, h, facecolor=fill, edgecolor="k", lw=0.8))
    ax.text(x - 0.15, y + h / 2, label, ha="right", va="center", fontsize=9)
    if text:
        ax.text(x + n * w / 2, y + h + 0.12, text, ha="center", fontsize=8)


fig, ax = plt.subplots(figsize=(11, 4.6))
ax.set(xlim=(0.3, 12.8), ylim=(-0.1, 5.3), aspect="equal")
ax.axis("off")
n, w = 6, 0.6  # tiles per side, tile size in the drawing
x0, y0 = 1.6, 0.4  # bottom-left corner of the score matrix (query tiles run downwards)
for i in range(n):  # the score matrix: tile (i, j), causal
    for j in range(n):
        seen = j <= i
        colour = "C0" if (i, j) == (2, 1) else ("0.9" if not seen else "white")
        ax.add_patch(Rectangle((x0 + j * w, y0 + (n - 1 - i) * w), w, w, facecolor=colour,
                               edgecolor="0.6", lw=0.6, hatch="///" if i == j else None))
ax.text(x0 + n * w / 2, y0 - 0.3, "score tiles $S_{ij}$: grey skipped, hatched masked",
        ha="center", fontsize=8)
tile_row(ax, x0, y0 + n * w + 0.35, n, w, 0.35, "K, V tiles", shade=1,
         text="stream past, one at a time")
for i in range(n):  # the query tiles, a column to the left
    colour = "C1" if i == 2 else "white"
    ax.add_patch(Rectangle((x0 - 0.85, y0 + (n - 1 - i) * w), 0.5, w, facecolor=colour,
                           edgecolor="k", lw=0.8))
ax.text(x0 - 0.6, y0 - 0.3, "Q tiles", ha="center", fontsize=8)
row_y = y0 + (n - 1 - 2) * w + w / 2  # the middle of query tile 2's row
ax.add_patch(FancyArrowPatch((x0 + 2 * w + 0.05, row_y), (x0 + 3 * w - 0.05, row_y),
                             arrowstyle="-|>", mutation_scale=12, color="C3"))
# fast memory: what one query tile holds during its inner loop
fx, fy = 7.0, 1.2
ax.add_patch(Rectangle((fx, fy), 5.6, 3.6, facecolor="none", edgecolor="C2", lw=1.5, ls="--"))
ax.text(fx + 2.8, fy + 3.75, "fast memory (A100: 192 KB of SRAM per SM; a CPU: its L1/L2 caches)",
        ha="center", fontsize=9, color="C2")
lines = ["Q tile 2: $b_q \\times d$  (read once)",
         "K, V tile 1: $b_k \\times d$  (read, used, dropped)",
         "scores $S_{21}$: $b_q \\times b_k$  (never written out)",
         "state per query: $m$, $\\ell$, $a$ ($2 + d_v$ numbers)",
         "end of the loop: write $a / \\ell$ and $m + \\log \\ell$"]
for k, line in enumerate(lines):
    ax.text(fx + 0.2, fy + 3.2 - 0.65 * k, line, fontsize=9, va="center")
ax.add_patch(FancyArrowPatch((x0 + 3 * w + 0.3, row_y), (fx - 0.1, fy + 1.9),
                             arrowstyle="-|>", mutation_scale=14, color="0.4",
                             connectionstyle="arc3,rad=-0.15"))
ax.set_title("The inner loop for query tile 2: key tiles stream through fast memory", fontsize=11)
plt.show()

# %% [markdown]
# In code, a tile of scores is a small matrix product, `(block_q, D) @ (D, block_k)`; for every
# query of the tile we update $m$, $\ell$ and $a$ as in section 2. We first write it without
# masks, for one head.

# %%
def tiled_attention(q, k, v, block_q=16, block_k=16):
    """softmax(q kᵀ / sqrt(D)) v for q (T_q, D), k (T_k, D), v (T_k, D_v), tile by tile."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty(q.shape[0], v.shape[-1], dtype=q.dtype)
    for q0 in range(0, q.shape[0], block_q):
        qi = q[q0 : q0 + block_q]  # (bq, D)
        m = torch.full((qi.shape[0],), -math.inf, dtype=q.dtype)  # running maximum per query
        ell = torch.zeros(qi.shape[0], dtype=q.dtype)  # running sum of exp(s - m)
        acc = torch.zeros(qi.shape[0], v.shape[-1], dtype=q.dtype)  # running sum of exp(s - m) v
        for k0 in range(0, k.shape[0], block_k):
            s = qi @ k[k0 : k0 + block_k].T * scale  # (bq, bk): one tile of scores
            m_new = torch.maximum(m, s.amax(dim=1))
            rescale = torch.exp(m - m_new)  # re-expresses the old sums under the new maximum
            p = torch.exp(s - m_new[:, None])  # (bq, bk)
            ell = ell * rescale + p.sum(dim=1)
            acc = acc * rescale[:, None] + p @ v[k0 : k0 + block_k]
            m = m_new
        out[q0 : q0 + block_q] = acc / ell[:, None]
    return out


q1, k1, v1 = (t.detach()[0, 0].double() for t in qkv(100, D=16))
explicit = torch.softmax(q1 @ k1.T / 4, dim=-1) @ v1
for bq, bk in [(16, 16), (7, 33), (100, 1), (1, 100)]:
    same = torch.allclose(tiled_attention(q1, k1, v1, bq, bk), explicit, atol=1e-12)
    print(f"tiles of {bq:>3} queries x {bk:>3} keys: equals softmax(q kᵀ/√d) v: {same}")

# %% [markdown]
# (No $-\infty$ guard is needed yet: without masks every score is finite.) The largest
# temporary is one `(block_q, block_k)` tile, whatever $T$ is.
#
# ### 3.1 Causal tiles: skip, do not mask
#
# With a causal mask, query $i$ sees keys $j \le i$. Most tiles fall entirely on one side of the
# diagonal: a tile whose first key comes after its last query is invisible to every query in
# it, and the loop **skips** it, which is where FlashAttention saves about half the work of
# causal attention; a tile whose last key is at or before its first query is seen whole and
# needs no mask; only the tiles the diagonal cuts through are masked. The same holds for a
# sliding window of $w$ positions ([chapter 9](09_sliding_window.ipynb)): a key tile that ends more
# than $w - 1$ positions before the tile's *first* query is invisible to all of its queries and is
# skipped too, so only a band of tiles remains.
#
# The function below classifies the tiles; the queries are the *last* `T_q` of `T_k` positions
# (query $i$ sits at position $i + T_k - T_q$), which is what decoding against a cache needs
# ([chapter 7](07_kv_cache.ipynb)'s bottom-right alignment). The picture shows the three kinds.

# %%
def classify_tiles(t_q, t_k, block_q, block_k, causal=True, window=None):
    """Per (query tile, key tile): 0 skipped, 1 masked (the edge), 2 seen whole."""
    offset = t_k - t_q
    kinds = torch.zeros(-(-t_q // block_q), -(-t_k // block_k), dtype=torch.long)
    for i, q0 in enumerate(range(0, t_q, block_q)):
        first, last = q0 + offset, min(q0 + block_q, t_q) - 1 + offset  # query positions
        for j, k0 in enumerate(range(0, t_k, block_k)):
            k1 = min(k0 + block_k, t_k)
            hidden = (causal and k0 > last) or (window is not None and k1 - 1 <= first - window)
            edge = (causal and k1 - 1 > first) or (window is not None and k0 <= last - window)
            kinds[i, j] = 0 if hidden else 1 if edge else 2
    return kinds


def draw_tiles(ax, kinds, title):
    colors = {0: "white", 1: "#f4a582", 2: "#4393c3"}
    for (i, j), kind in zip(torch.cartesian_prod(*(torch.arange(n) for n in kinds.shape)),
                            kinds.flatten(), strict=True):
        ax.add_patch(Rectangle((j, i), 1, 1, facecolor=colors[int(kind)], edgecolor="0.6"))
    ax.set_xlim(0, kinds.shape[1])
    ax.set_ylim(kinds.shape[0], 0)
    ax.set_aspect("equal")
    ax.set_xlabel("key tile")
    ax.set_title(title, fontsize=10)


fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), layout="constrained")
draw_tiles(axes[0], classify_tiles(512, 512, 64, 64), "causal, T=512, tiles of 64")
draw_tiles(axes[1], classify_tiles(512, 512, 64, 64, window=128), "causal + window 128")
draw_tiles(axes[2], classify_tiles(128, 512, 64, 64), "128 queries after 384 cached keys")
axes[0].set_ylabel("query tile")
fig.legend(handles=[Patch(facecolor="white", edgecolor="0.6", label="skipped"),
                    Patch(facecolor="#f4a582", edgecolor="0.6", label="masked (the edge)"),
                    Patch(facecolor="#4393c3", edgecolor="0.6", label="seen whole, no mask")],
           loc="outside lower center", ncol=3)
plt.show()

# %% [markdown]
# How many tiles does causal attention skip? With $n$ tiles per side, the diagonal's $n$ tiles
# are masked and $n(n-1)/2$ are skipped: a fraction $(n-1)/2n$, close to a half for long
# sequences.

# %%
for T in (512, 2048, 8192):
    kinds = classify_tiles(T, T, 64, 64)
    n = kinds.shape[0]
    skipped, masked = int((kinds == 0).sum()), int((kinds == 1).sum())
    assert skipped == n * (n - 1) // 2 and masked == n
    print(f"T={T:>5}: {n * n:>5} tiles, {skipped:>5} skipped ({skipped / n**2:.1%}), "
          f"{masked:>3} masked, {n * n - skipped - masked:>5} seen whole")
kinds = classify_tiles(8192, 8192, 64, 64, window=256)
print(f"window 256 at T=8192: {int((kinds > 0).sum())} of {kinds.numel()} tiles visited "
      f"({(kinds > 0).float().mean().item():.1%})")

# %% [markdown]
# ### 3.2 The full forward pass
#
# Now the real thing, batched over heads, with masks on the edge tiles, the $-\infty$ guard of
# section 2, and the log-sum-exp saved per query. Two more details:
#
# - **Grouped key/value heads** ([chapter 4](04_mqa_gqa.ipynb)) by *indexing*: the `n_head` queries
#   are viewed as `(n_kv_head, group)` and each key/value head is broadcast over its group, so K and
#   V are never copied (`q.view(B, H_kv, g, T, D)` against `k[:, :, None]`).
# - **Queries after a cache**: positions are counted from the end, so with `T_q < T_k` the
#   queries are the last `T_q` positions.

# %%
def tile_mask(q0, q1, k0, k1, offset, causal, window):
    pos = torch.arange(q0, q1)[:, None] + offset  # (bq, 1): the queries' positions
    key = torch.arange(k0, k1)[None, :]  # (1, bk)
    allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
    if causal:
        allowed &= key <= pos
    if window is not None:
        allowed &= key > pos - window
    return allowed


def flash_forward(q, k, v, causal=True, window=None, block_q=32, block_k=32):
    """Output (B, H, T_q, D_v) and log-sum-exp (B, H, T_q) of q (B, H, T_q, D) and k, v
    (B, H_kv, T_k, ·)."""
    B, H, t_q, D = q.shape
    H_kv, t_k = k.shape[1], k.shape[2]
    g, scale = H // H_kv, D**-0.5
    qg, kg, vg = q.view(B, H_kv, g, t_q, D), k[:, :, None], v[:, :, None]  # no copy of K, V
    kinds = classify_tiles(t_q, t_k, block_q, block_k, causal, window)
    out = q.new_zeros(B, H_kv, g, t_q, v.shape[-1])
    lse = q.new_full((B, H_kv, g, t_q), -math.inf)
    for i, q0 in enumerate(range(0, t_q, block_q)):
        q1 = min(q0 + block_q, t_q)
        qi = qg[..., q0:q1, :]  # (B, H_kv, g, bq, D)
        m = q.new_full(qi.shape[:-1], -math.inf)
        ell = q.new_zeros(qi.shape[:-1])
        acc = q.new_zeros(*qi.shape[:-1], v.shape[-1])
        for j, k0 in enumerate(range(0, t_k, block_k)):
            if kinds[i, j] == 0:
                continue  # skipped: no query of this tile sees these keys
            k1 = min(k0 + block_k, t_k)
            s = qi @ kg[..., k0:k1, :].transpose(-2, -1) * scale  # (B, H_kv, g, bq, bk)
            if kinds[i, j] == 1:  # the edge: mask what the rule forbids
                s = s.masked_fill(~tile_mask(q0, q1, k0, k1, t_k - t_q, causal, window), -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # rows with no key yet
            p = torch.exp(s - m_safe[..., None])
            rescale = torch.exp(m - m_safe)
            ell = ell * rescale + p.sum(dim=-1)
            acc = acc * rescale[..., None] + p @ vg[..., k0:k1, :]
            m = m_new
        seen = ell > 0
        out[..., q0:q1, :] = acc / torch.where(seen, ell, 1.0)[..., None]
        lse[..., q0:q1] = torch.where(seen, m + torch.log(torch.where(seen, ell, 1.0)), -math.inf)
    return out.view(B, H, t_q, -1), lse.view(B, H, t_q)


def reference(q, k, v, causal=True, window=None):
    """The explicit math (chapter 2) with the same masks, and its log-sum-exp."""
    t_q, t_k = q.shape[2], k.shape[2]
    allowed = tile_mask(0, t_q, 0, t_k, t_k - t_q, causal, window)
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    s = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(~allowed, -math.inf)
    return sdpa_reference(q, k, v, attn_mask=allowed), torch.logsumexp(s, dim=-1)


cases = [dict(causal=True), dict(causal=False), dict(causal=True, window=9),
         dict(causal=True, T_q=5), dict(causal=True, T_q=70)]
for case in cases:
    t_q = case.pop("T_q", 50)
    q, k, v = (t.detach() for t in qkv(t_q, D=16, H=4, H_kv=2, T_k=50, dtype=torch.float64))
    (out, lse), (ref, ref_lse) = flash_forward(q, k, v, **case), reference(q, k, v, **case)
    same = torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
    print(f"T_q={t_q:>2}, T_k=50, 4 query heads on 2 kv heads, {case}: output, LSE equal: {same}")
    assert same
print("T_q=70: the first 20 queries output zeros:", bool((out[:, :, :20] == 0).all()),
      "| their log-sum-exp is -inf:", bool((lse[:, :, :20] == -math.inf).all()),
      "| any NaN:", bool(out.isnan().any() or lse.isnan().any()))

# %% [markdown]
# With 70 queries against 50 keys the first 20 queries precede every key: their output is zero
# and their log-sum-exp $-\infty$, by the guard, with no NaN anywhere. (`flash_attention` in the
# module is this function with argument checks, and the tiles listed once instead of by a
# classification table.)
#
# ## 4. The backward pass, recomputed
#
# Write $S = QK^\top \cdot c$ (the scale $c = 1/\sqrt{d}$), $P = \mathrm{softmax}(S)$ row by
# row, $O = PV$. Given the gradient $dO$ of the loss with respect to the output, the chain rule
# gives (the $dS$ formula row by row, for query $i$ and key $j$):
#
# $$dV = P^\top dO, \qquad dP = dO\, V^\top, \qquad
#   dS_{ij} = P_{ij}\Big(dP_{ij} - \sum_{l} P_{il}\, dP_{il}\Big), \qquad
#   dQ = c\, dS\, K, \qquad dK = c\, dS^\top Q .$$
#
# The $dS$ formula is softmax's backward. With $\partial P_{il} / \partial S_{ij} =
# P_{il}(\delta_{lj} - P_{ij})$, the chain rule over the row gives
# $dS_{ij} = \sum_l dP_{il}\, P_{il}(\delta_{lj} - P_{ij}) = P_{ij}\, dP_{ij} - P_{ij} \sum_l
# P_{il}\, dP_{il}$.
# Everything is tile by tile except two things: $P$ itself, and the row sum
# $\Delta_i = \sum_l P_{il}\, dP_{il}$, which seems to need a whole row of $P$. Both are cheap to get
# back:
#
# - $P_{ij} = e^{S_{ij} - \mathrm{lse}_i}$: with the log-sum-exp saved by the forward pass, a
#   tile of $P$ is one tile of scores and one exponential, no running maximum needed.
# - $\Delta_i = \sum_l P_{il}\, (dO_i \cdot v_l) = dO_i \cdot \sum_l P_{il} v_l = dO_i \cdot O_i$:
#   the row sum is a dot product of two vectors we already have (FlashAttention-2's trick).
#
# So the backward pass keeps $Q, K, V, O$ and the log-sum-exp ($O(T d)$ numbers), recomputes
# each tile's scores, and never holds more than one tile of $P$. It does the score product twice
# (forward and backward), which is the price of the memory. In the code, $\Delta_i$ is `delta`, and
# `D` is the head size. With grouped heads, a key/value head served the `g` query heads of
# its group in the forward pass, so its gradients are the sums over the group (`.sum(dim=2)`).

# %%
class NotebookFlash(torch.autograd.Function):
    """flash_forward, with a backward pass that recomputes each tile of P from the saved LSE."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, block):
        out, lse = flash_forward(q, k, v, causal, window, block, block)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (causal, window, block)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        causal, window, block = ctx.settings
        B, H, t_q, D = q.shape
        H_kv, t_k = k.shape[1], k.shape[2]
        g, scale = H // H_kv, D**-0.5
        qg, dog = q.view(B, H_kv, g, t_q, D), d_out.contiguous().view(B, H_kv, g, t_q, -1)
        kg, vg = k[:, :, None], v[:, :, None]
        lse = lse.view(B, H_kv, g, t_q, 1)
        lse = lse.masked_fill(lse == -math.inf, 0.0)  # rows that saw no key: every p is masked
        delta = (d_out * out).sum(dim=-1).view(B, H_kv, g, t_q, 1)  # rowsum(dO * O)
        dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(k), torch.zeros_like(v)
        kinds = classify_tiles(t_q, t_k, block, block, causal, window)
        for i, q0 in enumerate(range(0, t_q, block)):
            q1 = min(q0 + block, t_q)
            for j, k0 in enumerate(range(0, t_k, block)):
                if kinds[i, j] == 0:
                    continue
                k1 = min(k0 + block, t_k)
                s = qg[..., q0:q1, :] @ kg[..., k0:k1, :].transpose(-2, -1) * scale
                p = torch.exp(s - lse[..., q0:q1, :])  # this tile of P, recomputed
                if kinds[i, j] == 1:
                    p = p.masked_fill(~tile_mask(q0, q1, k0, k1, t_k - t_q, causal, window), 0.0)
                dv[:, :, k0:k1] += (p.transpose(-2, -1) @ dog[..., q0:q1, :]).sum(dim=2)
                dp = dog[..., q0:q1, :] @ vg[..., k0:k1, :].transpose(-2, -1)
                ds = p * (dp - delta[..., q0:q1, :])
                dq[..., q0:q1, :] += ds @ kg[..., k0:k1, :] * scale
                dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ qg[..., q0:q1, :]).sum(dim=2) * scale
        return dq.view_as(q), dk, dv, None, None, None


q, k, v = qkv(11, D=4, H=2, H_kv=1, T_k=13, dtype=torch.float64)
for causal, window in [(True, None), (False, None), (True, 4)]:
    fn = lambda q, k, v, c=causal, w=window: NotebookFlash.apply(q, k, v, c, w, 4)  # noqa: E731
    ok = torch.autograd.gradcheck(fn, (q, k, v))
    print(f"gradcheck (float64), causal={causal}, window={window}: {ok}")

q, k, v = qkv(60, D=16, H=4, H_kv=2, T_k=75, dtype=torch.float64)
d_out = torch.randn(1, 4, 60, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
ours = torch.autograd.grad(NotebookFlash.apply(q, k, v, True, None, 16), (q, k, v), d_out)
theirs = torch.autograd.grad(reference(q, k, v)[0], (q, k, v), d_out)
print("dQ, dK, dV equal autograd through the explicit math:",
      all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ours, theirs, strict=True)))
saved = saved_for_backward(lambda q, k, v: NotebookFlash.apply(q, k, v, True, None, 16), q, k, v)[0]
print("saved for backward:", saved)

# %% [markdown]
# `gradcheck` compares our gradients with finite differences of the forward pass; the second
# check compares them with autograd through the explicit math, on grouped heads and 60 queries
# after 15 cached keys. What is saved is exactly q, k, v, the output and the log-sum-exp.
#
# ## 5. Split-KV decoding: merging partial attentions
#
# When a model decodes, each step has one query and a cache of perhaps 100 000 keys. A GPU
# runs the (batch, head, query tile) triples in parallel, and with one query there is one tile
# per head: not enough work to keep it busy. So **flash-decoding** (Dao, Haziza, Massa and Sizov,
# 2023) splits the *keys* into chunks, attends to each chunk separately (in parallel), and
# merges. The log-sum-exp makes the merge exact. If chunk $c$ returned output $O_c$ and
# log-sum-exp $L_c$ (its softmax's denominator is $e^{L_c}$), the whole row's denominator is
# $\sum_c e^{L_c} = e^{L}$ with $L = \mathrm{logsumexp}_c L_c$, and
#
# $$O = \sum_c e^{L_c - L}\, O_c :$$
#
# each chunk's output weighted by the share of the denominator its keys hold. In one line: chunk
# $c$'s output is $O_c = \sum_{j \in c} e^{s_j - L_c} v_j$, so $e^{L_c} O_c = \sum_{j \in c}
# e^{s_j} v_j$; summed over the chunks this is $\sum_j e^{s_j} v_j$, and dividing by the whole
# row's denominator $e^L$ gives the attention output. A chunk with no
# visible key has $L_c = -\infty$ and weight zero. (The chunks here use `causal=False`: a single
# query at the end of the sequence sees every key, whichever chunk holds it.)

# %%
def merge(outputs, lses):
    lse = torch.logsumexp(torch.stack(lses), dim=0)  # (..., T_q): -inf if no chunk has a key
    lse_safe = lse.masked_fill(lse == -math.inf, 0.0)  # then every weight below is 0, not NaN
    weighted = [torch.exp(l_c - lse_safe)[..., None] * o_c
                for o_c, l_c in zip(outputs, lses, strict=True)]
    return sum(weighted), lse


q, k, v = (t.detach() for t in qkv(1, D=16, H=4, T_k=1000, dtype=torch.float64))  # one step
whole, whole_lse = flash_forward(q, k, v, causal=False)
cuts = [(0, 250), (250, 500), (500, 750), (750, 1000)]
parts = [flash_forward(q, k[:, :, a:b], v[:, :, a:b], causal=False) for a, b in cuts]
merged, merged_lse = merge([o for o, _ in parts], [lse for _, lse in parts])
same = (torch.allclose(merged, whole, atol=1e-12)
        and torch.allclose(merged_lse, whole_lse, atol=1e-12))
print("4 chunks of 250 keys, merged == one pass over 1000:", same)
assert same

# %% [markdown]
# The same merge joins attention over any disjoint sets of keys. **Ring attention** (Liu,
# Zaharia and Abbeel, 2023) spreads a long sequence over several devices and passes key/value
# blocks around a ring, each device merging the partial results for its queries;
# [chapter 14](14_learned_sparse_attention.ipynb)'s MoBA and NSA attend to a few selected blocks and
# (NSA) a window and merge the branches the same way. In the module this is `merge_partial`; since
# `flash_attention`'s log-sum-exp is differentiable too, a merged result trains like one pass.
#
# ## 6. Where the tiles meet the rest of the book
#
# `attnbook.attention.flash.flash_attention` is this chapter's forward and backward, and
# `AttentionConfig(impl="flash")` makes the layers that go through the skeleton's softmax use it
# (mha, mqa, gqa, local with its window, mla). It masks by position only, causal and window: it
# takes no ALiBi bias, no attention dropout and no padding mask, and says so with a
# `ValueError`. A GQA layer with `impl="flash"` and with `impl="reference"`, same weights:

# %%
torch.manual_seed(4)
layers = {}
for impl in ("flash", "reference"):
    torch.manual_seed(4)
    cfg = AttentionConfig(n_embd=64, n_head=4, block_size=128, positions="rope", impl=impl)
    layers[impl] = build_attention("gqa", cfg, n_kv_head=2)
x = torch.randn(2, 100, 64, requires_grad=True)
y_flash, y_ref = layers["flash"](x), layers["reference"](x)
print("gqa layer, impl='flash' == impl='reference' (atol=1e-5):",
      torch.allclose(y_flash, y_ref, atol=1e-5))
g_flash = torch.autograd.grad(y_flash.square().sum(), x)[0]
g_ref = torch.autograd.grad(y_ref.square().sum(), x)[0]
print("and the gradient with respect to x (atol=1e-4):", torch.allclose(g_flash, g_ref, atol=1e-4))
try:
    build_attention("mha", AttentionConfig(n_embd=64, n_head=4, impl="flash", positions="alibi"))
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 7. Is it fast?
#
# On a GPU, FlashAttention is faster than the explicit math because the explicit math is bound
# by memory traffic: writing and reading $S$ and $P$ costs more than computing them. Our tiles
# are Python loops of small PyTorch operations, each a separate call with its own overhead, and
# a CPU has large caches that hide part of the memory traffic. Against that, the tiles skip the
# half of the work above the diagonal that the explicit math computes and then masks. And
# SDPA's fused kernel runs the same algorithm as ours in compiled code, with no per-tile
# overhead. We time forward plus backward, causal, one head of 64 (best of 3 after a warm-up;
# output not checked by the book's tests, which assert only that the fused kernel beats the
# tiles at the longest length).

# %% tags=["nbval-ignore-output"]
def fwd_bwd_ms(fn, T, repeats=3):
    q, k, v = qkv(T)
    best = math.inf
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn(q, k, v).sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best * 1e3


kernels = {
    "explicit math": lambda q, k, v: sdpa_reference(q, k, v, is_causal=True),
    "flash_attention (tiles of 128)": lambda q, k, v: flash_attention(q, k, v, block_q=128,
                                                                      block_k=128),
    "SDPA's fused kernel": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}
times = {name: [fwd_bwd_ms(fn, T) for T in (512, 1024, 2048)] for name, fn in kernels.items()}
print(f"{'':>32} {'T=512':>8} {'T=1024':>8} {'T=2048':>8}   (ms, forward + backward)")
for name, ms in times.items():
    print(f"{name:>32} " + " ".join(f"{t:>8.1f}" for t in ms))
assert times["SDPA's fused kernel"][-1] < times["flash_attention (tiles of 128)"][-1]

# %% [markdown]
# Read the table for its shape, not its digits (they depend on the machine). In the run stored
# here the fused kernel won at every length, 2.2 to 2.8 times as fast as our tiles; the
# tiles were behind the explicit math at 512 and 1024 and ahead of it at 2048, where skipping
# half the tiles and keeping each tile in the CPU's cache outweigh the Python overhead. That
# overhead is a fixed cost per tile: at $T = 2048$ with tiles of 128 (16 tiles per side) the
# forward pass visits the $16 \times 17 / 2 = 136$ tiles on or below the diagonal and the backward
# as many, each a handful of PyTorch calls. Larger tiles mean fewer
# calls but more memory per tile (exercise 2 measures the trade-off). Fusing the loop into one
# compiled kernel removes the overhead: that is what SDPA, FlashAttention's CUDA code and
# compiled FlexAttention do.
#
# ## 8. FlexAttention: masks as functions
#
# PyTorch's FlexAttention (Dong, Feng, Guessous, Liang and He, 2024) generalises the same kernel:
# instead of a mask tensor you write a **`mask_mod`**, a function of
# `(batch, head, q_idx, kv_idx)` that says whether a query may see a key, and optionally a
# **`score_mod`** that changes a score. From the `mask_mod`, `create_block_mask` finds which
# tiles are empty (skipped), full or partial, exactly our classification of section 3.1, and the
# compiled kernel skips and masks accordingly. On CPU it runs the forward pass (fast only under
# `torch.compile`, which takes tens of seconds to compile, so we run it uncompiled, which
# computes every tile densely, on small inputs) and has **no backward pass**: training on CPU
# cannot use it. We write the book's masks for it, print the share of tiles each block mask
# lets the compiled kernel skip, and check the outputs against the book's own kernels.

# %%
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

T_f, window_f = 256, 32
doc_ids = torch.tensor([0] * 80 + [1] * 120 + [2] * 56)  # three documents packed in one row


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window_mod(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < window_f)


def document_mod(b, h, q_idx, kv_idx):  # causal, and only within one's own document
    return (q_idx >= kv_idx) & (doc_ids[q_idx] == doc_ids[kv_idx])


torch.manual_seed(6)  # chapter 10's BigBird pattern: blocks of 32, 1 global, 2 window, 2 random
bigbird = bigbird_mask(T_f, T_f, 32, 1, 2, draw_random_blocks(T_f // 32, 1, 2, 2))  # (T, T)


def bigbird_mod(b, h, q_idx, kv_idx):  # a table lookup
    return bigbird[q_idx, kv_idx]


slopes = torch.tensor([2.0 ** -(8 * (h + 1) / 4) for h in range(4)])  # ALiBi's slopes, 4 heads


def alibi_mod(score, b, h, q_idx, kv_idx):
    return score - slopes[h] * (q_idx - kv_idx)


q, k, v = (t.detach() for t in qkv(T_f, D=16, H=4))
same_doc = doc_ids[:, None] == doc_ids[None, :]
causal_f = torch.ones(T_f, T_f).tril().bool()  # (T, T)
distance = torch.arange(T_f)[:, None] - torch.arange(T_f)  # (T, T): q_idx - kv_idx
alibi_bias = (-slopes[:, None, None] * distance).masked_fill(~causal_f, -math.inf)  # (4, T, T)
checks = {
    "causal": (causal_mod, None, flash_attention(q, k, v)),
    f"window {window_f}": (window_mod, None, flash_attention(q, k, v, window=window_f)),
    "documents": (document_mod, None, sdpa_reference(q, k, v, attn_mask=same_doc & causal_f)),
    "BigBird": (bigbird_mod, None, sdpa_reference(q, k, v, attn_mask=bigbird)),
    "ALiBi": (causal_mod, alibi_mod, sdpa_reference(q, k, v, attn_mask=alibi_bias)),
}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "flex_attention called without torch.compile": fine here
    for name, (mask_mod, score_mod, expected) in checks.items():
        block_mask = create_block_mask(mask_mod, None, None, T_f, T_f, device="cpu", BLOCK_SIZE=32)
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        print(f"{name:>10}: {block_mask.sparsity():4.1f}% of the 8 x 8 tiles skippable; "
              f"flex_attention == the book's kernel (atol=1e-5):",
              torch.allclose(out, expected, atol=1e-5))
        assert torch.allclose(out, expected, atol=1e-5)

# %% [markdown]
# `create_block_mask` classified the tiles as section 3.1 did: the causal mask leaves 28 of the
# 64 tiles empty (43.8%), the window of 32 positions 49, the documents 42. BigBird's pattern
# ([chapter 10](10_sparse_attention.ipynb)), whose random blocks no formula describes, is a
# `mask_mod` that looks up a table, and its tiles are the pattern's blocks. The document mask is the
# new one here: packing several documents into one training row and keeping attention inside each is
# how long-context training avoids padding, and with a `mask_mod` it costs three lines (and its
# tiles between documents are skipped, like the causal ones).
#
# ## 9. Check against the module
#
# `flash_attention` in the module is `flash_forward` plus the backward of section 4 (same loop
# order, same guard), with argument checks; `merge_partial` is `merge`. We compare them on
# grouped heads, a window, and queries after a cache, in float64.

# %%
for case in [dict(causal=True), dict(causal=False), dict(causal=True, window=9)]:
    q, k, v = qkv(30, D=16, H=4, H_kv=2, T_k=47, dtype=torch.float64)
    ours, ours_lse = flash_forward(q, k, v, **case, block_q=8, block_k=8)
    module, module_lse = flash_attention(q, k, v, **case, block_q=8, block_k=8, return_lse=True)
    d_out = torch.randn_like(module)
    grads = torch.autograd.grad(module, (q, k, v), d_out)
    ours_grads = torch.autograd.grad(
        NotebookFlash.apply(q, k, v, case["causal"], case.get("window"), 8), (q, k, v), d_out)
    assert torch.allclose(ours, module, atol=1e-12)
    assert torch.allclose(ours_lse, module_lse, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ours_grads, strict=True))
module_merged, _ = merge_partial([o for o, _ in parts], [lse for _, lse in parts])
assert torch.allclose(module_merged, merged, atol=1e-12)
print("flash_attention == flash_forward (output, LSE) and NotebookFlash (gradients); "
      "merge_partial == merge: OK (float64, atol=1e-12)")

# %% [markdown]
# ## Summary
#
# - The explicit math keeps $T \times T$ tensors for the backward pass (the weights, twice, and
#   the mask) and peaks at several of them; FlashAttention keeps $Q, K, V$, the output and one
#   log-sum-exp per query.
# - The online softmax reads a row in chunks with a running maximum $m$ and sum $\ell$,
#   rescaling by $e^{m - m'}$ when the maximum grows; an unnormalised output accumulator is
#   rescaled the same way and divided by $\ell$ at the end. A row that has seen no key yet
#   needs a guard ($-\infty - (-\infty)$), a row that sees none outputs zero.
# - The tiled forward loops over query tiles, then key tiles. Causal attention skips the tiles
#   above the diagonal, $(n-1)/2n$ of them, and masks only the $n$ on it; a window skips the
#   tiles outside its band. Grouped heads broadcast K and V; queries after a cache count their
#   positions from the end.
# - The backward pass recomputes each tile of $P$ as $e^{S - \mathrm{lse}}$ and replaces the row
#   sum $\sum_l P_{il} dP_{il}$ by $\Delta_i = dO_i \cdot O_i$: one extra score product, no $T \times T$
#   memory. `gradcheck` confirms it.
# - Partial attentions over disjoint keys merge exactly with their log-sum-exps: flash-decoding,
#   ring attention, and the branches of [chapter 14](14_learned_sparse_attention.ipynb).
# - In pure PyTorch the tiles pay a Python overhead per tile; on this CPU they still overtook
#   the explicit math at $T = 2048$, and SDPA's fused kernel, the same algorithm compiled, was
#   2.2 to 2.8 times as fast again. The memory saving does not need fusion; the speed does.
#
# ## Further reading
#
# - Milakov and Gimelshein, *Online normalizer calculation for softmax* (2018): the running
#   maximum and sum.
# - Rabe and Staats, *Self-attention does not need O(n²) memory* (2021): chunked attention with a
#   recomputing backward, in JAX.
# - Dao, Fu, Ermon, Rudra and Ré, *FlashAttention: Fast and memory-efficient exact attention with
#   IO-awareness* (NeurIPS 2022).
# - Dao, *FlashAttention-2: Faster attention with better parallelism and work partitioning*
#   (2023): the loop order and the $\Delta = \mathrm{rowsum}(dO \circ O)$ backward used here.
# - Dao, Haziza, Massa and Sizov, *Flash-Decoding for long-context inference* (PyTorch blog,
#   2023); Liu, Zaharia and Abbeel, *Ring attention with blockwise transformers for
#   near-infinite context* (2023).
# - Shah et al., *FlashAttention-3* (2024), for what the kernel does on Hopper GPUs; Dong et al.,
#   *Flex Attention: a programming model for generating optimized attention kernels* (2024).
#
# ## Exercises
#
# Worked solutions are in
# [`solutions/08_flash_attention_solutions.ipynb`](solutions/08_flash_attention_solutions.ipynb).
# Predict first, then check with code.
#
# 1. **Any order.** Show, from the update rule of section 2, that the online softmax gives the
#    same $m$ and $\ell$ whatever order the chunks are read in. Then check it: run
#    `tiled_attention` with the key tiles visited back to front (and in a shuffled order), and
#    compare with the explicit math.
# 2. **The tile size.** At $T = 2048$, causal, one head of 64, time `flash_attention`'s forward
#    plus backward for square tiles of 16, 32, 64, 128, 256 and 512, and count the visited tiles
#    and the largest temporary (one tile of scores) for each. Where is the optimum on your
#    machine, and why is it not at either end?
# 3. **Three partial attentions.** A decoding step attends to a cache held in three pieces of
#    different lengths, one of them empty (a device that holds nothing yet). Merge the three
#    with `merge_partial` and show the result equals one pass; then show what goes wrong if you
#    average the three outputs instead, or weight them by the number of keys.
# 4. **ALiBi and a soft cap inside the tiles.** Add ALiBi's bias ([chapter 6](06_positions.ipynb))
#    and Gemma 2's soft-capping $c \tanh(s / c)$ to `flash_forward`'s scores, tile by tile, and
#    check both against the explicit math with the same changes. Which of the two can still skip
#    tiles with a causal mask, and would a window-like cut-off make sense for ALiBi?
