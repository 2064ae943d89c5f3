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
# # Chapter 14 — Learned sparse attention: MoBA, NSA and DeepSeek Sparse Attention
#
# Chapters 9 and 10 made attention sparse with *fixed* patterns: a query sees the last $w$
# tokens (a sliding window), or a few global, neighbouring and random blocks (BigBird). Which
# keys a query sees depends only on *positions*. That is cheap to compute and easy to reason
# about, and windows are everywhere in 2025–2026 models (Gemma 3's and gpt-oss's local layers,
# one of NSA's branches below). But the sparse attention designed since 2025 to reach *distant*
# tokens chooses those keys by **content**: each query scores the past cheaply, keeps the few
# places that look relevant, and runs exact softmax attention over those alone.
#
# This chapter builds the three designs that define the field:
#
# - **MoBA** (Moonshot AI, 2025, serving Kimi's long-context requests): cut the keys into blocks,
#   score each block by the query's dot product with the block's *mean key*, keep the top-$k$
#   blocks;
# - **NSA**, Native Sparse Attention (DeepSeek, 2025, a research design): three branches —
#   compressed blocks, blocks selected with the compressed scores, a sliding window — mixed by
#   learned gates;
# - **DSA**, DeepSeek Sparse Attention (DeepSeek-V3.2, 2025): a small **lightning indexer**
#   scores every past *token*, each query keeps its top-$k$ tokens, and MLA
#   ([chapter 13](13_latent_attention.ipynb)) attends over their latents; the indexer is trained to
#   imitate the dense attention it replaces.
#
# **Learning goals**
#
# - Show with a retrieval probe why a position-based pattern cannot find a key whose place is
#   decided by content, and why selecting by score can.
# - Measure that a decoding step at long context is bound by *reading* the KV cache, so that a
#   step which reads only the selected keys is several times faster
#   ([chapter 10](10_sparse_attention.ipynb) noted that BigBird's decoding step reads every cached
#   key; here we measure what that costs).
# - Build MoBA's block gate and its attention over the selected blocks, merged with
#   [chapter 8](08_flash_attention.ipynb)'s log-sum-exp rule, and check it against
#   `attnbook.attention.moba`.
# - Build NSA's three branches and its gates, and check them against `attnbook.attention.nsa`.
# - Build DSA's lightning indexer, its top-$k$ selection and its two-stage training (a dense
#   warm-up that matches the main attention's distribution, then sparse training), decode reading
#   only the selected latents, and measure bytes read and time against dense absorbed MLA over
#   the same cache (one SDPA call).

# %% [markdown]
# ## Setup
#
# Seeds everywhere; the outputs the book's tests compare are shapes, booleans and rounded
# numbers. Timing and training cells are ignored by the tests (their last digits differ from one
# machine to the next) and assert their claims with a margin instead.
# The chapter runs on one thread, as chapters 8–13 do: one thread keeps timings steady when
# other programs compete for the cores.

# %%

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from attnbook.attention import (
    AttentionConfig,
    build_attention,
    causal_mask,
    merge_partial,
    sliding_window_mask,
)
from attnbook.attention.sparse import bigbird_mask, draw_random_blocks

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. Where the answer sits is decided by content
#
# A language model constantly needs a key whose position nobody could have predicted: the
# variable defined 3,000 tokens earlier, the name a pronoun refers to, the value stored under a
# key in a recall task ([chapter 12](12_gated_deltanet.ipynb), section 9). Let us make the simplest
# such probe. Draw $T = 1024$ random keys of $d = 64$ numbers; pick a position $p$ at random; the
# query is a noisy copy of key $p$. Full attention has no difficulty:
# $q \cdot k_p \approx \|k_p\|^2 \approx 64$, far above every other score (their standard deviation
# is $\|q\|$, about 8; printed below). The question for a sparse pattern is only: *is position $p$
# among the keys the query may see?*
#
# We ask it of two position-based patterns for the last query — a window of 128, and chapter
# 10's BigBird with blocks of 64 (one global block, a window of two blocks, two random blocks) —
# and of two content-based rules: the 64 tokens with the highest scores, and MoBA's rule
# (keep 3 of the 16 blocks of 64, the own block and the two past blocks whose *mean key* scores
# highest).

# %%
T, d, trials = 1024, 64, 500
last_row = bigbird_mask(1, T, 64, 1, 2, draw_random_blocks(T // 64, 1, 2, 2))[0]  # (T,) bools


def found(k, q, p):
    """Which rules let the query see position p: {rule: bool}."""
    scores = k @ q  # (T,)
    block_scores = k.view(16, 64, d).mean(dim=1) @ q  # (16,): q . mean key of each block
    moba_blocks = block_scores[:15].topk(2).indices.tolist() + [15]  # 2 past + the own block
    return {
        "window 128": p >= T - 128,
        "BigBird (1 global, 2 window, 2 random blocks)": bool(last_row[p]),
        "top 64 tokens by score": p in scores.topk(64).indices.tolist(),
        "MoBA: 3 of 16 blocks by mean key": p // 64 in moba_blocks,
    }


hits = {}
for _ in range(trials):
    k = torch.randn(T, d)  # (T, d) keys
    p = int(torch.randint(0, T - 1, ()))  # the position to find
    q = k[p] + 0.5 * torch.randn(d)  # (d,) a noisy copy of its key
    for rule, ok in found(k, q, p).items():
        hits[rule] = hits.get(rule, 0) + ok
for rule, n in hits.items():
    print(f"{rule:<46} sees position p in {n / trials:5.1%} of {trials} trials")
print(f"fraction of the keys the BigBird row sees: {last_row.float().mean():.1%}")
scores = k @ q  # the last trial's scores
others = torch.cat([scores[:p], scores[p + 1 :]])
print(f"last trial: q . k_p = {scores[p]:.0f}, the other scores' standard deviation "
      f"{others.std():.0f}, largest {others.max():.0f}")

# %% [markdown]
# The position-based patterns see $p$ about as often as they see any key: the window in
# about 127 / 1023 of the trials (it covers positions 896–1022 of the 1023 that $p$ can take),
# BigBird in about the fraction of the row it covers (34.4% of the trials against 31.2% of the
# row: with 500 trials the standard error is about 2 points, so the two agree). No choice of pattern can do better on this
# probe, because $p$ is uniformly random and a pattern that covers a fraction $f$ of the
# positions finds it with probability $f$. Selecting by score finds it every time, with a budget
# of 64 keys, smaller than the window's. (Exact scores read every key, though, which is what
# selection is meant to avoid; each design below therefore scores with something cheaper than
# the keys themselves: block means, compressed blocks, a small separate index key.)
#
# MoBA's block rule sits in between, and the reason is worth seeing now. The score of a block
# is the query's dot product with the *mean* of its 64 keys: key $p$ contributes
# $q \cdot k_p / 64 \approx 1$, and the 63 other keys add a random sum whose standard deviation
# is $\sqrt{63}\,\|q\| / 64$, about 1 as well. Each of the 14 other past blocks scores just as
# noisily around 0 (a mean of 64 random keys: standard deviation $\sqrt{64}\,\|q\|/64 = \|q\|/8$,
# about 1), and $p$'s block must rank among the 2 best of the 15 past blocks, that is, beat all
# but one of the other 14. With i.i.d. random keys the signal drowns. At an equal budget (3/16 of
# the keys), smaller blocks dilute less. The probe below always puts $p$ in a *past* block and
# varies the block size:

# %%
def moba_hit_rate(size, keep, trials=300):
    """How often the own block plus the keep - 1 past blocks (of `size` keys) with the best
    mean-key score hold position p (random keys, as above)."""
    n, hit = T // size, 0
    for _ in range(trials):
        k = torch.randn(T, d)
        p = int(torch.randint(0, T - size, ()))  # p in a past block
        q = k[p] + 0.5 * torch.randn(d)
        block_scores = k.view(n, size, d).mean(dim=1)[: n - 1] @ q  # (n - 1,) past blocks
        hit += p // size in block_scores.topk(keep - 1).indices.tolist()
    return hit / trials


for size, keep in [(64, 3), (16, 12), (4, 48), (1, 192)]:
    print(f"blocks of {size:>3}, keep {keep:>2} of {T // size:>3}: p found in "
          f"{moba_hit_rate(size, keep):.0%}")

# %% [markdown]
# Blocks of 64 find $p$ in 38% of these trials, against 44% in the first probe. The difference is
# the query's own block, which is always kept: the first probe drew $p$ among the 1023 positions
# before the query, and the own block (positions 960–1023) holds 63 of them, so in about
# $63/1023 \approx 6\%$ of its trials $p$ was seen for free. That accounts for most of the gap
# ($0.06 + 0.94 \times 0.38 \approx 0.42$); the rest is the noise of a few hundred trials.
#
# Blocks of 4 with 48 kept find $p$ every time, as tokens do. Two lessons follow for the rest of
# the chapter. A block gate needs blocks whose keys are *alike*, which random keys are not and
# trained keys partly are (neighbouring tokens share topic and syntax; MoBA relies on training to
# make block means informative). And a design can score cheaply at a finer grain than it
# attends: NSA scores blocks through *learned* compressed keys, DSA scores every token with a
# small separate indexer.
#
# ## 2. A decoding step reads the whole cache
#
# [Chapter 10](10_sparse_attention.ipynb) noted that BigBird's decoding step scores one query
# against every cached key and then masks, so that it reads the whole cache. In FLOPs that step is
# cheap: one query against $T$ keys of $H$ heads of $d$ is $4THd$ floating-point operations. But the
# step must also *read* the keys and values, $2THd$ numbers, 4 bytes each in float32: half a FLOP
# per byte read. A CPU core does several to dozens of FLOPs in the time it reads one byte from
# memory, a GPU hundreds, so the step waits on memory, and its time grows with the bytes it reads. A
# step that reads only the selected keys should then be faster in proportion. We time one decoding
# step with 8 heads of 64 over caches of 2k to 32k tokens: dense attention over the whole cache, and
# attention over $T/16$ selected positions, gathered first into buffers allocated once
# (`index_select`, the gather included in the time); the two take turns, so that a busy spell of the
# machine slows both alike.

# %% tags=["nbval-ignore-output"]
from functools import partial

from attnbook.bench import best_of_alternating


def attend_selected(q, k, v, keep, k_sel, v_sel):
    """Attention over the positions keep only: gathered into k_sel, v_sel first, then SDPA."""
    torch.index_select(k, 2, keep, out=k_sel)  # (1, H, len(keep), hd): the chosen rows
    torch.index_select(v, 2, keep, out=v_sel)
    return F.scaled_dot_product_attention(q, k_sel, v_sel)


H, hd = 8, 64
lengths = [2048, 8192, 32768]
dense_ms, selected_ms = [], []
for T_ in lengths:
    k, v = torch.randn(2, 1, H, T_, hd).unbind(0)  # (1, H, T_, hd) each: the cache
    q = torch.randn(1, H, 1, hd)  # one new query
    keep = torch.randperm(T_)[: T_ // 16].sort().values  # (T_ / 16,) selected positions
    k_sel, v_sel = torch.empty(2, 1, H, T_ // 16, hd).unbind(0)  # buffers, allocated once
    runs = {"dense": partial(F.scaled_dot_product_attention, q, k, v),
            "selected": partial(attend_selected, q, k, v, keep, k_sel, v_sel)}
    # each run called in turn, 20 rounds: name -> (its fastest time in seconds, its output)
    best = best_of_alternating(runs, repeats=20)
    dense_ms.append(1e3 * best["dense"][0])
    selected_ms.append(1e3 * best["selected"][0])
    gb = (k.nbytes + v.nbytes) / 1e9
    print(f"T={T_:>6}: dense {dense_ms[-1]:6.2f} ms ({gb / dense_ms[-1] * 1e3:5.1f} GB/s read), "
          f"T/16 selected {selected_ms[-1]:5.2f} ms, ratio {selected_ms[-1] / dense_ms[-1]:.2f}")
assert dense_ms[-1] > 8 * dense_ms[0]  # dense grows with the cache
assert selected_ms[-1] < 0.75 * dense_ms[-1]  # reading 1/16 of it is faster

# %% [markdown]
# The dense step's time grows in proportion to the cache once the cache no longer fits in the
# processor's caches (past a few MB): it reads the keys and values at a steady rate of some GB/s,
# the memory bandwidth one core gets. The shortest cache, 8 MB of keys and values at 2k tokens,
# can show a higher rate than memory delivers: on a processor whose last-level cache is of that
# size, much of it stays there between the repeated runs; the longer caches cannot. The step
# over a sixteenth of the positions takes a fraction
# of the time, though not a sixteenth: the gather reads rows scattered through memory and writes
# a copy before attention reads it again. On a GPU the picture is the same with larger numbers
# (a decoding step of a long-context model spends its time streaming the cache from memory),
# and the papers' GPU kernels (MoBA's variable-length FlashAttention calls, NSA's Triton kernel,
# DeepSeek's sparse FlashMLA) read the chosen keys inside the attention instead of copying them.

# %% [markdown]
# ## 3. MoBA: a gate over blocks of keys
#
# MoBA (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs") borrows its
# idea from mixture-of-experts models: the past is cut into **chunks** of `moba_chunk_size`
# positions (the "experts"), a gate with no parameters routes each query to a few of them, and
# the query attends, with one ordinary softmax, to the keys of the chunks it was routed to. The
# gate is the probe of section 1:
#
# - the score of chunk $i$ for query $q$ is $s_i = q \cdot \bar k_i$, with $\bar k_i$ the mean of
#   the chunk's keys (after RoPE, per head);
# - the query's **own chunk**, the one holding its position, is always chosen, and attended
#   causally (its later keys are in the future);
# - of the chunks wholly in its past, the `moba_topk - 1` with the highest scores are chosen
#   (so `moba_topk` counts the own chunk, as in Moonshot's code); later chunks never are.
#
# (In Moonshot's models MoBA does not replace every layer: the paper keeps some layers as full
# attention, the last few during supervised fine-tuning, and can switch layers between the two.)
#
# ### 3.1 The gate, by hand
#
# One head, 32 positions, chunks of 8 (four chunks), `moba_topk = 2`: each query keeps its own
# chunk and the best one before it.

# %%
torch.manual_seed(1)
T, hd, C, topk = 32, 16, 8, 2
q, k, v = torch.randn(3, 1, 1, T, hd).unbind(0)  # (B=1, H=1, T, hd) each
n = T // C
means = k.view(1, 1, n, C, hd).mean(dim=3)  # (1, 1, n, hd): one mean key per chunk
scores = q @ means.transpose(-2, -1)  # (1, 1, T, n): s_i for every query and chunk
own = torch.arange(T)[:, None] // C  # (T, 1): each query's own chunk
chunk = torch.arange(n)  # (n,)
past_scores = scores.masked_fill(chunk >= own, float("-inf"))  # only chunks wholly in the past
best = past_scores.topk(topk - 1, dim=-1).indices  # (1, 1, T, 1): the best past chunk
gate = torch.zeros(1, 1, T, n, dtype=torch.bool).scatter(-1, best, True) & (chunk < own)
gate |= chunk == own  # the own chunk, always
for t in (3, 9, 17, 30):
    print(f"query {t:>2}: scores {scores[0, 0, t].numpy().round(2)}, chunks chosen "
          f"{chunk[gate[0, 0, t]].tolist()}")
print("past chunk chosen by queries 24-31 (chunk 3):", best[0, 0, 24:, 0].tolist())

# %% [markdown]
# Each line prints the query's score for all four chunks, but only the chunks wholly in its past
# compete: query 3's highest score, 2.15, is for chunk 3, which lies in its future, and chunk 0
# is its own. Queries 0–7 have no past chunk, so they keep their own only (the `& (chunk < own)` removes a
# "best" drawn among $-\infty$ scores). From chunk 1 on, each query keeps its own chunk plus the
# past chunk it scored highest, and neighbouring queries may choose differently (the last line: the
# eight queries of chunk 3 do not agree): the choice is per query, not per block of queries.
# `attnbook.attention.moba.moba_gate` computes the same thing for any batch, heads and cache:

# %%
from attnbook.attention.moba import moba_attention, moba_gate, moba_mask

assert torch.equal(moba_gate(q, k, chunk_size=C, topk=topk), gate)
print("moba_gate == our gate:", torch.equal(moba_gate(q, k, chunk_size=C, topk=topk), gate))

# %% [markdown]
# ### 3.2 Attention over the chosen chunks, the dense way
#
# Spread each query's chosen chunks over the key positions and intersect with the causal mask:
# that is a boolean $T \times T$ mask, and attention with it is MoBA. (`moba_mask` returns it.)
# The figure shows it next to [chapter 9](09_sliding_window.ipynb)'s window and
# [chapter 10](10_sparse_attention.ipynb)'s BigBird pattern (which sees about 40% more keys per
# query here; the counts are printed under the figure): the fixed patterns are the same for every
# input, MoBA's choice moves with the content. (MoBA's gate has no weights: "another input" is
# simply other queries and keys.)

# %%
mask = gate[..., torch.arange(T) // C] & causal_mask(T, T)  # (1, 1, T, T): True = may attend
assert torch.equal(mask, moba_mask(q, k, C, topk))
y_dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, 1, T, hd)

fixed = {
    "window of 12 (chapter 9)": sliding_window_mask(T, T, 12),
    "BigBird, blocks of 8 (chapter 10)": bigbird_mask(T, T, 8, 1, 1, draw_random_blocks(n, 1, 1, 1)),
    "MoBA, chunks of 8, top-2 (input 1)": mask[0, 0],
    "MoBA, other queries and keys": moba_mask(*torch.randn(2, 1, 1, T, hd).unbind(0), C, topk)[0, 0],
}
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
for ax, (title, m) in zip(axes, fixed.items(), strict=True):
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1.3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position")
    for edge in range(C, T, C):
        ax.axvline(edge - 0.5, color="grey", lw=0.5)
axes[0].set_ylabel("query position")
fig.suptitle("Which keys each query may attend (blue): fixed patterns, and MoBA's choice by content")
plt.tight_layout()
plt.show()
print("keys seen per query, averaged:", {t: round(float(m.float().sum(-1).mean()), 1)
                                        for t, m in fixed.items()})

# %% [markdown]
# ### 3.3 Without the $T \times T$ scores: parts merged by their log-sum-exp
#
# The dense mask costs as much as full attention: every score is computed and most are thrown
# away. The saving comes from computing only the chosen parts. A query's keys fall in
# disjoint sets: its own chunk, and each chosen past chunk. [Chapter 8](08_flash_attention.ipynb)
# showed how to join attentions over disjoint key sets exactly: each part returns its output and the
# log of its softmax denominator (the log-sum-exp, LSE), and `merge_partial` weights each output by
# its share $e^{\text{lse}_i - \text{lse}}$ of the total. So we need attention that also returns the
# LSE, the own chunk as a batch of $C \times C$ causal blocks, and a gather of each query's past
# chunks:

# %%
def attend_lse(q, k, v, allowed=None):
    """Softmax attention of q (..., M, hd) over k, v (..., N, hd), and its log-sum-exp (..., M)."""
    s = q @ k.transpose(-2, -1) / hd**0.5  # (..., M, N)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


# part 1: the own chunk, chunks as a batch of (C, C) causal blocks
qc, kc, vc = (x.view(1, 1, n, C, hd) for x in (q, k, v))  # (1, 1, n, C, hd) each
y_own, lse_own = attend_lse(qc, kc, vc, causal_mask(C, C))  # (1, 1, n, C, hd), (1, 1, n, C)
parts = [y_own.view(1, 1, T, hd)]
lses = [lse_own.view(1, 1, T)]
# part 2: each query's chosen past chunk (topk - 1 = 1 slot here), gathered
slot = best[..., 0]  # (1, 1, T): the chosen past chunk's index
has_past = own[:, 0] > 0  # (T,): queries of chunk 0 have none
k_past = kc[0, 0][slot[0, 0]]  # (T, C, hd): the chosen chunk's keys, per query
v_past = vc[0, 0][slot[0, 0]]
y_past, lse_past = attend_lse(q[0, 0, :, None], k_past, v_past)  # (T, 1, hd), (T, 1)
parts.append(y_past[None, None, :, 0])
lses.append(lse_past[None, None, :, 0].masked_fill(~has_past, float("-inf")))  # empty part
y_parts, _ = merge_partial(parts, lses)
print("own chunk + chosen past chunk, merged == dense MoBA:",
      torch.allclose(y_parts, y_dense, atol=1e-6))
assert torch.allclose(y_parts, y_dense, atol=1e-6)

# %% [markdown]
# The work is now $T \times$ `moba_topk` $\times C$ scores instead of $T^2/2$. Gathering a copy
# of the chosen keys *per query*, as we just did, would cost memory in the same proportion;
# `moba_attention` turns the loop around, as Moonshot's implementation does: for each past chunk
# it collects the queries that chose it and attends them to that chunk in one call (a
# variable-length batch), then scatters the outputs and LSEs back to their queries and merges.
# Its backward pass is [chapter 8](08_flash_attention.ipynb)'s with one more term. A part's output
# $o = \sum_j p_j v_j$ and its LSE both depend on the scores $s_j$, and
# $\partial\,\text{lse} / \partial s_j = p_j$, so the gradient of a score is
# $p_j\,(dO \cdot v_j - \delta)$ with $\delta = dO \cdot o - d\text{lse}$:
# [chapter 8](08_flash_attention.ipynb)'s $\delta$ minus the gradient that reaches the LSE through
# the merge. The two forms agree, outputs and gradients, with several heads and grouped
# key/value heads too:

# %%
torch.manual_seed(2)
qh = torch.randn(2, 4, 64, hd).requires_grad_()  # (B=2, 4 query heads, T=64, hd)
kh, vh = (t.clone().requires_grad_() for t in torch.randn(2, 2, 2, 64, hd).unbind(0))  # 2 kv heads
fast = moba_attention(qh, kh, vh, chunk_size=8, topk=3)
slow = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=moba_mask(qh, kh, 8, 3), enable_gqa=True)
d_out = torch.randn_like(fast)  # any upstream gradient dO
grads_fast = torch.autograd.grad(fast, (qh, kh, vh), d_out)  # through the merge's backward
grads_slow = torch.autograd.grad(slow, (qh, kh, vh), d_out)  # through the dense mask
same_grads = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_fast, grads_slow, strict=True))
print("moba_attention == sdpa with moba_mask, 4 heads on 2 key/value heads:",
      torch.allclose(fast, slow, atol=1e-5), "| gradients of q, k, v agree:", same_grads)
assert torch.allclose(fast, slow, atol=1e-5) and same_grads

# %% [markdown]
# ## 4. NSA: compress, select, slide — three branches and a gate
#
# MoBA's gate scores blocks with a fixed summary, the mean key, which section 1 showed can drown the
# one key that matters. Native Sparse Attention (Yuan et al., DeepSeek, 2025, "Native Sparse
# Attention: Hardware-Aligned and Natively Trainable Sparse Attention") makes the summary *learned*,
# so that training can shape it, and uses it twice. Each query attends three times over the same
# past and adds the outputs with gates it computes itself:
#
# 1. **compression**: the keys (and values) are cut into blocks of $l$ positions, a new block
#    every $d$ positions (the compression stride; in this section $d$ is the paper's stride, not
#    a head size), overlapping when $d < l$; a learned map $\varphi$ turns each block into
#    one key (one value). The query attends over these compressed keys: a coarse view of the
#    whole past, $T/d$ keys instead of $T$.
# 2. **selection**: the compression branch's attention probabilities say which regions matter.
#    They are added up per block of $l'$ positions, the query keeps the $n$ best blocks (always
#    including the first block, the block holding the query and the one before it), and attends
#    over their *raw* keys.
# 3. **sliding window**: the last $w$ positions, as in [chapter 9](09_sliding_window.ipynb), so that
#    local patterns need not compete with the distant ones for the selection.
#
# $$o_t = g^{\text{cmp}}_t\, \text{Attn}(q_t, \tilde K, \tilde V) + g^{\text{slc}}_t\,
# \text{Attn}(q_t, K_{\text{sel}}, V_{\text{sel}}) + g^{\text{win}}_t\,
# \text{Attn}(q_t, K_{\text{win}}, V_{\text{win}}),$$
#
# with $g = \sigma(x_t W_g)$ per head. (The paper gives each branch keys and values of its own, so
# that the branches cannot lean on one another's; the module, like fla's implementation, shares one
# $k, v$ between them, so that its cache is an ordinary KV cache.) The paper's sizes are
# $l = 32$, $d = 16$, $l' = 64$, $n = 16$, $w = 512$; we use a small layer with $l = 4$, $d = 2$,
# $l' = 4$, $n = 4$, $w = 6$ over 32 positions, so that each branch is visibly sparse.

# %%
from attnbook.attention.nsa import compress, compression_mask, selection_scores

torch.manual_seed(3)
l, stride, l_sel, n_sel, w = 4, 2, 4, 4, 6  # the paper's l, d, l', n and w
sizes = dict(compress_block=l, compress_stride=stride, select_block=l_sel, select_count=n_sel,
             window=w)
nsa = build_attention("nsa", AttentionConfig(n_embd=32, n_head=2, block_size=T), **sizes).eval()
x = torch.randn(1, T, 32)  # (B, T, n_embd)
with torch.no_grad():
    # the values come with the gates (NSAValues): q, k, v (1, 2, T, 16) each, gates (1, 2, T, 3)
    q, k, (v, nsa_gates) = nsa.project(x)
    q, k = nsa.position(q, k, 0)  # RoPE, the first token at position 0 (a cache passes its length)

# %% [markdown]
# ### 4.1 Compression
#
# Block $i$ holds positions $i \cdot d$ to $i \cdot d + l - 1$. `unfold` cuts them out; $\varphi$
# here is one linear map of the $l \cdot d_h$ numbers of a block (position-major; $d_h$ = `hd` = 16
# in the code) to $d_h$ numbers:
# its weights differ per position in the block, which is all the paper's "intra-block position
# encoding" needs to be (the paper uses a small MLP). A query may see a compressed block only when
# the whole block is in its past: a block that ends after $t$ would leak the future.

# %%
with torch.no_grad():
    blocks = k.unfold(2, l, stride)  # (1, 2, n_cmp, hd, l): block i = positions 2i .. 2i + 3
    k_cmp = nsa.phi_k(blocks.transpose(-1, -2).flatten(-2))  # (1, 2, n_cmp, hd)
    assert torch.equal(k_cmp, compress(k, nsa.phi_k, l, stride))
    v_cmp = compress(v, nsa.phi_v, l, stride)
ends = torch.arange(k_cmp.shape[2]) * stride + l - 1  # last position of each block
seen = ends <= torch.arange(T)[:, None]  # (T, n_cmp): whole block in the past
assert torch.equal(seen, compression_mask(T, T, l, stride))
print(f"{k_cmp.shape[2]} compressed keys for {T} positions; query 3 sees "
      f"{int(seen[3].sum())}, query 20 sees {int(seen[20].sum())}, query 31 sees "
      f"{int(seen[31].sum())}")

# %% [markdown]
# ### 4.2 From compressed scores to selected blocks
#
# The compression branch's softmax $p^{\text{cmp}}_t$ has one probability per compressed block. To
# rank the selection blocks of $l'$ positions, each compressed block spreads its probability over
# the $l$ positions it covers, $1/d$ per position, and each selection block collects what lands on
# its $l'$ positions. With our sizes: compressed block 13 covers positions 26–29 and puts $p/2$ on
# each; selection block 6 (positions 24–27) collects two of those shares, selection block 7
# (positions 28–31) the other two, so each collects $p$, the whole of block 13's probability (which
# is why a query's importances add up to 2, as noted below). (The paper's eq. 9 says the same with
# the overlap counted in steps of $d$.) The code names the sizes as the paper does: `l`, `stride`
# for $d$, `l_sel` for $l'$, `n_sel` for $n$, and `w`. With grouped key/value heads, the module lets
# the query heads that share one key/value head add their rankings, so that the group reads the same
# blocks from memory once; the layer built here has one key/value head per query head, so each of
# its heads selects on its own. (A query's importances add up to $l/d = 2$, not 1: every position is
# covered by two compressed blocks.)

# %%
with torch.no_grad():
    scores = (q @ k_cmp.transpose(-2, -1)) / 16**0.5  # (1, 2, T, n_cmp)
    p_cmp = scores.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0)
per_position = torch.zeros(1, 2, T, T)  # probability landing on each key position
for i, end in enumerate(ends.tolist()):
    per_position[..., end - l + 1 : end + 1] += p_cmp[..., i : i + 1] / stride  # 1/d each
importance = per_position.view(1, 2, T, T // l_sel, l_sel).sum(-1)  # (1, 2, T, T / l')
assert torch.allclose(importance, selection_scores(p_cmp, l, stride, l_sel, T // l_sel), atol=1e-6)
t = 29
print(f"query {t}, head 0: importance of the 8 selection blocks "
      f"{importance[0, 0, t].numpy().round(2)}")

# %% [markdown]
# Query 29 lives in block 7 (positions 28–31), which gets little: only one complete compressed block
# (positions 26–29) covers part of it, and blocks ending after the query get nothing. That is why
# the paper always selects the block holding the query and the one before it, whose importance
# is only partly measured yet, and the first block (the "attention sink" where many heads park
# their weight). The rest of the $n$ go by importance. With $n = 4$, query 29 keeps blocks 0, 6
# and 7 by rule and one more by rank, the best of blocks 1–5 (checked after the figure below).
#
# ### 4.3 The three branches and the gates
#
# The figure shows, for query 29 of head 0, what each branch attends to, and the gates that mix them
# (printed below the figure; an untrained layer's gates stay near $\sigma(0) = 0.5$, here 0.54,
# 0.64 and 0.56). Then we rebuild the layer's output by hand: the selection from section 4.2's
# importances (the forced blocks, then the best by rank), three softmaxes, and the gates.

# %%
with torch.no_grad():
    y, nsa_w = nsa(x, need_weights=True)  # NSAWeights(cmp, slc, win), before the gates
fig, axes = plt.subplots(1, 3, figsize=(12, 2.6), sharey=True)
panels = [("compression: compressed blocks (block end)", nsa_w.cmp[0, 0, t], ends),
          ("selection: raw keys of selected blocks", nsa_w.slc[0, 0, t], torch.arange(T)),
          (f"window: the last {w} positions", nsa_w.win[0, 0, t], torch.arange(T))]
for ax, (title, weights, where), gate_value in zip(axes, panels, nsa_gates[0, 0, t], strict=True):
    ax.bar(where, weights, width=1.6 if title.startswith("comp") else 0.8, color="tab:blue")
    ax.set_title(f"{title}\ngate {gate_value:.2f}", fontsize=9)
    ax.set_xlim(-1, T)
    ax.set_xlabel("key position")
axes[0].set_ylabel(f"weight (query {t})")
plt.tight_layout()
plt.show()
print("gates of query 29, head 0 (compression, selection, window):",
      nsa_gates[0, 0, t].numpy().round(2))

# %%
def branch(scores, allowed, values):
    """Softmax over the allowed keys, then the weighted values."""
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values


with torch.no_grad():
    y_cmp = p_cmp @ v_cmp  # (1, 2, T, hd)
    raw = q @ k.transpose(-2, -1) / 16**0.5  # (1, 2, T, T)
    own_block = torch.arange(T)[:, None] // l_sel  # (T, 1): each query's latest block
    sel_block = torch.arange(T // l_sel)  # (T / l',): the selection blocks
    forced = (sel_block == 0) | (sel_block == own_block) | (sel_block == own_block - 1)  # (T, n_sel)
    ranked = importance.masked_fill(forced, float("inf")).masked_fill(sel_block > own_block,
                                                                      float("-inf"))
    top = ranked.topk(n_sel, dim=-1)  # the n best blocks, forced ones first
    nsa_chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, top.indices,
                                                                     top.values > float("-inf"))
    selected = nsa_chosen[..., torch.arange(T) // l_sel] & causal_mask(T, T)  # (1, 2, T, T)
    assert torch.equal(selected, nsa_w.slc > 0)  # the layer attended to the same keys
    y_slc = branch(raw, selected, v)
    y_win = branch(raw, sliding_window_mask(T, T, w), v)
    mixed = (nsa_gates[..., 0:1] * y_cmp + nsa_gates[..., 1:2] * y_slc
             + nsa_gates[..., 2:3] * y_win)  # (1, 2, T, hd)
    by_hand = nsa.out(mixed)
print("three softmaxes + gates, by hand == the nsa layer:", torch.allclose(by_hand, y, atol=1e-5))
assert torch.allclose(by_hand, y, atol=1e-5)
picked = sorted(set((torch.nonzero(selected[0, 0, t])[:, 0] // l_sel).tolist()))
print(f"query {t}, head 0 selected blocks {picked}; the best of 1-5 by importance: "
      f"{int(importance[0, 0, t, 1:6].argmax()) + 1}")

# %% [markdown]
# ## 5. DSA: a lightning indexer picks tokens for MLA
#
# DeepSeek-V3.2-Exp (DeepSeek-AI, 2025, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with
# DeepSeek Sparse Attention") took a trained DeepSeek-V3.1-Terminus and made its MLA layers (chapter
# 13) sparse without changing their architecture (the weights then kept training). Section 1's probe
# says how: score every past *token* (no block dilutes the signal) with a scorer small enough that
# scoring all of them costs little, keep the top $k$, and run the unchanged attention over those.
# The scorer, the **lightning indexer**, has heads $j$ of its own (64 in DeepSeek-V3.2-Exp,
# half as many as its MLA) with queries $q^I_{t,j}$,
# one key $k^I_s$ per token shared by its heads, and a weight $w_{t,j}$ per head made from the
# token:
#
# $$I_{t,s} = \sum_j w_{t,j}\, \mathrm{ReLU}\!\left(q^I_{t,j} \cdot k^I_s\right).$$
#
# No softmax: the scores only have to *rank* the past, and DeepSeek chose ReLU for throughput;
# keys of 128 numbers instead of MLA's 576, kept in FP8 in DeepSeek's cache, so that the indexer costs a few percent
# of the attention it serves per token. Query $t$ then
# attends with MLA over the `index_topk` tokens with the highest $I_{t,s}$ among $s \le t$
# (DeepSeek: 2048 of up to 128k).
#
# ### 5.1 The indexer, by hand
#
# `DeepSeekSparseAttention` ("dsa") is MLA plus an `Indexer` with DeepSeek's names: `wq` (or
# `wq_b` from MLA's query latent when queries are compressed) for the queries, `wk` and a
# LayerNorm `k_norm` for the keys, `weights_proj` for the head weights, and RoPE on the first
# `qk_rope_head_dim` numbers of the indexer's queries and keys. Its options are DeepSeek's
# config names: `index_n_heads`, `index_head_dim` (by default twice `qk_rope_head_dim`, as
# DeepSeek's 128 = 2 × 64; 16 numbers in this small layer, whose `qk_rope_head_dim` is 8) and
# `index_topk`. The layer's `project`
# returns MLA's queries and rotary keys and, in place of values, the latents and the indexer's
# (not yet rotated) projections; we compute the scores from those. (DeepSeek also rotates the
# indexer's queries and keys by a Hadamard transform before rounding them to FP8; it is
# orthogonal, so the scores do not change, and the module leaves it out.)

# %%
from attnbook.attention.dsa import index_scores, top_k_mask

torch.manual_seed(4)
dsa_cfg = AttentionConfig(n_embd=32, n_head=2, block_size=T, positions="rope")
dsa = build_attention("dsa", dsa_cfg, kv_lora_rank=16, index_n_heads=2, index_topk=6).eval()
x = torch.randn(1, T, 32)
with torch.no_grad():
    _, _, inputs = dsa.project(x)  # MLA's queries and latents, and the indexer's projections
    q_I, k_I = dsa.indexer.rotate(inputs.q, inputs.k, 0, dsa.rope)  # (1, 2, T, 16), (1, T, 16)
    w_I = inputs.weights  # (1, T, 2): one weight per indexer head and token
    relu_dots = torch.relu(q_I @ k_I[:, None].transpose(-2, -1))  # (1, 2, T, T) per head
    I = (w_I.transpose(1, 2)[..., None] * relu_dots).sum(dim=1)  # (1, T, T): sum over heads j
assert torch.allclose(I, index_scores(q_I, w_I, k_I), atol=1e-6)
I = I.masked_fill(~causal_mask(T, T), float("-inf"))  # only the past may be chosen
dsa_chosen = top_k_mask(I, 6)  # (1, T, T): the 6 best of each row (earliest first on ties)
print("indexer queries", tuple(q_I.shape), "and keys", tuple(k_I.shape),
      "| qk_rope_head_dim:", dsa.qk_rope_head_dim)
print("tokens chosen per query:", dsa_chosen.sum(-1)[0].tolist())
print("query 29 chooses positions", torch.nonzero(dsa_chosen[0, 29])[:, 0].tolist())

# %% [markdown]
# Queries 0–5 have at most 6 tokens in their past and take them all; from query 6 on each
# keeps 6, anywhere in its past: query 29 keeps neither itself nor its neighbours 27 and 28.
# Nothing forces a DSA query to keep itself or its neighbours, as NSA's forced blocks and window
# do; a trained indexer must learn locality. (`top_k_mask` breaks ties earliest first: ReLU
# makes many
# scores exactly 0, and the choice among them must not depend on how long the row is, or
# cached decoding would choose differently from the full pass.)
#
# ### 5.2 MLA over the chosen tokens
#
# The rest is [chapter 13](13_latent_attention.ipynb)'s layer with a mask: MLA loaded with the same
# weights and given the chosen tokens as `attn_mask` returns the dsa layer's output. And with
# `index_topk` at least the number of keys, the indexer chooses everything and dsa *is* MLA,
# exactly: that is how DeepSeek could start from a trained dense model.

# %%
mla = build_attention("mla", dsa_cfg, kv_lora_rank=16).eval()
left_over = mla.load_state_dict(dsa.state_dict(), strict=False).unexpected_keys
with torch.no_grad():
    same_as_masked_mla = torch.allclose(dsa(x), mla(x, attn_mask=dsa_chosen[:, None]), atol=1e-6)
    dsa.index_topk = T  # choose everything
    same_as_mla = torch.equal(dsa(x), mla(x))
    dsa.index_topk = 6
print("weights MLA does not have:", sorted({key.split(".")[1] for key in left_over}))
print("dsa == MLA masked to the chosen tokens:", same_as_masked_mla)
print("dsa with index_topk = T == MLA, bit for bit:", same_as_mla)
assert same_as_masked_mla and same_as_mla

# %% [markdown]
# What does the indexer cost? Per query and cached token it does `index_n_heads` ×
# `index_head_dim` multiply-adds; absorbed MLA ([chapter 13](13_latent_attention.ipynb)) does, per
# head, a score over the $r + d_R$ numbers of a latent and rotary key and a weighted sum of the $r$
# latent numbers. At DeepSeek-V3.2's sizes (64 indexer heads of 128; 128 MLA heads, $r = 512$,
# $d_R = 64$):

# %%
indexer_madds = 64 * 128
mla_madds = 128 * ((512 + 64) + 512)
print(f"per query and cached token: indexer {indexer_madds:,}, MLA {mla_madds:,} multiply-adds "
      f"({indexer_madds / mla_madds:.1%}); index key {128} numbers, latent + rotary key "
      f"{512 + 64}")
ctx, k_top = 131072, 2048
print(f"a decoding step at {ctx:,} cached tokens with index_topk={k_top}: indexer "
      f"{ctx * indexer_madds / 1e9:.2f} G, MLA over the chosen {k_top * mla_madds / 1e9:.2f} G, "
      f"dense MLA {ctx * mla_madds / 1e9:.1f} G multiply-adds")
sparse_step = ctx * indexer_madds + k_top * mla_madds  # indexer + MLA over the chosen
print(f"dense MLA / indexer alone = {mla_madds / indexer_madds:.1f}; dense MLA / whole sparse "
      f"step = {ctx * mla_madds / sparse_step:.1f}")

# %% [markdown]
# Per token the indexer is cheap, but it runs over *every* cached token while MLA runs over
# $k$ of them: at 128k tokens its 1.07 G multiply-adds are more than the 0.29 G of MLA over the
# chosen 2048, so the indexer has become the larger cost of a sparse step, and it still grows
# with the context. The indexer alone is about a seventeenth of dense MLA's 18.3 G; the whole
# sparse step, indexer plus MLA over the chosen tokens, about a thirteenth. And the indexer's
# reads are small, 128 numbers per token.
#
# ### 5.3 Training the indexer: a dense warm-up, then sparse training
#
# A freshly initialised indexer ranks at random, and top-$k$ passes no gradient that could teach
# it. DeepSeek trains it by **distillation** from the attention it is about to replace:
#
# 1. **dense warm-up**: attention stays dense; the main model is frozen; the target for query
#    $t$ is the main attention's distribution, summed over heads and normalised,
#    $p_{t,\cdot}$; the indexer minimises $\mathrm{KL}(p_{t,\cdot} \,\|\,
#    \mathrm{softmax}(I_{t,\cdot}))$ (DeepSeek: 1000 steps);
# 2. **sparse training**: attention runs over the top-$k$ tokens; the model learns from the
#    language-modelling loss, the indexer from the same KL restricted to the chosen tokens, with
#    its input detached, so that neither loss reaches the other's weights.
#
# In training mode the layer computes that KL itself and keeps it as `indexer_loss`; `dense_warmup =
# True` makes the attention dense. We replay DeepSeek's recipe at toy scale on character-level
# TinyShakespeare (the text the book's GPT trains on in [chapter 17](17_training_a_gpt.ipynb)):
# train a 2-layer MLA model (64 positions), move its weights into a dsa model keeping
# `index_topk = 8` of 64, and measure how much of the dense attention's mass the 8 chosen tokens
# capture, and the validation loss, before and after each stage.

# %%
from attnbook.data import TokenData, prepare
from attnbook.model import GPT, GPTConfig

data = TokenData(prepare("tinyshakespeare", "char"))
seq_len, topk_train = 64, 8
gen = torch.Generator().manual_seed(0)
val_batches = [data.get_batch("val", 16, seq_len, gen) for _ in range(4)]  # fixed


def make_model(attention, **options):
    config = GPTConfig(vocab_size=data.vocab_size, block_size=seq_len, n_layer=2, n_head=4,
                       n_embd=64, attention=attention,
                       attention_options=dict(kv_lora_rank=32, **options))
    return GPT(config)


def run_steps(model, steps, params, objective, lr=3e-3, seed=0):
    """steps of AdamW on params; objective(model, x, y) -> loss to minimise."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x_, y_ = data.get_batch("train", 16, seq_len, g)
        loss = objective(model, x_, y_)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def lm_loss(model, x_, y_):
    return model(x_, y_)[1]


torch.manual_seed(5)
dense_model = make_model("mla")
run_steps(dense_model, 400, dense_model.parameters(), lm_loss)

# %% [markdown]
# Three measurements, each written as a small function. The **mass on the chosen tokens** asks
# each dsa layer twice about the same input: once dense (`dense_warmup = True`; its attention
# weights, summed over heads, are the distribution $p$ the indexer should imitate), once sparse
# (its weights are zero off the chosen tokens); the mass is the share of $p$ that falls on the
# chosen tokens, for the queries with more than 8 tokens to choose from. A layer's input is what
# the block hands it (after its LayerNorm), which forward pre-hooks record. The **indexer KL**
# is the warm-up's loss on one fixed batch (computed by the layers in training mode), and the
# **validation loss** is the model's on the fixed batches.

# %%
def dsa_layers(model):
    return [block_.attn for block_ in model.transformer.h]


def layer_inputs(model, x_):
    """What each attention layer receives for the tokens x_ (recorded by forward pre-hooks)."""
    seen = []
    hooks = [a.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for a in dsa_layers(model)]
    model(x_)
    for h in hooks:
        h.remove()
    return seen


def mass_on_chosen(layer, h):
    """Share of the layer's dense attention (summed over heads) on the tokens its indexer picks."""
    layer.dense_warmup = True
    _, w = layer(h, need_weights=True)  # (B, H, T, T): dense MLA
    layer.dense_warmup = False
    _, w_sparse = layer(h, need_weights=True)  # zero off the chosen tokens
    p = w.sum(1) / w.shape[1]  # (B, T, T): summed over heads, normalised
    return (p * (w_sparse.sum(1) > 0)).sum(-1)[:, topk_train:].mean().item()


@torch.no_grad()
def measure(model):
    """(validation loss, mass on the chosen tokens, indexer KL) on the fixed batches."""
    model.eval()
    losses = [model(x_, y_)[1].item() for x_, y_ in val_batches]
    mass = [mass_on_chosen(layer, h) for x_, _ in val_batches
            for layer, h in zip(dsa_layers(model), layer_inputs(model, x_), strict=True)]
    model.train()  # the layers compute indexer_loss in training mode (no dropout here)
    for layer in dsa_layers(model):
        layer.dense_warmup = True  # the warm-up's KL: over every past token
    model(val_batches[0][0])
    kl = sum(layer.indexer_loss.item() for layer in dsa_layers(model))
    for layer in dsa_layers(model):
        layer.dense_warmup = False
    return sum(losses) / len(losses), sum(mass) / len(mass), kl


def from_dense():
    model = make_model("dsa", index_topk=topk_train)
    missing = model.load_state_dict(dense_model.state_dict(), strict=False).missing_keys
    assert all(".indexer." in key for key in missing)  # only the indexer is new
    return model


torch.manual_seed(6)
sparse_model = from_dense()
no_warmup = from_dense()
no_warmup.load_state_dict(sparse_model.state_dict())  # the same random indexer, for later
dense_val = sum(dense_model.eval()(x_, y_)[1].item() for x_, y_ in val_batches) / 4
# 8 of the t + 1 tokens of query t's past picked at random hold 8 / (t + 1) of any distribution
# on average; averaged over the queries measure() uses (t = 8 .. 63)
random_mass = sum(topk_train / (t + 1) for t in range(topk_train, seq_len)) / (seq_len - topk_train)
rows = {"dense MLA (trained 400 steps)": (dense_val, None, None),  # None: printed as a dash
        "8 of the past at random (expected)": (None, random_mass, None),
        "dsa, top-8, indexer untrained": measure(sparse_model)}

# %% [markdown]
# Stage 1, the warm-up: only the indexers' weights are given to the optimiser, the attention
# is dense, and the objective is the sum of the two layers' `indexer_loss`.

# %%
indexer_params = [p for name, p in sparse_model.named_parameters() if ".indexer." in name]
for layer in dsa_layers(sparse_model):
    layer.dense_warmup = True


def indexer_kl_loss(model, x_, y_):
    model(x_)
    return sum(layer.indexer_loss for layer in dsa_layers(model))


before = [p.clone() for name, p in sparse_model.named_parameters() if ".indexer." not in name]
run_steps(sparse_model, 150, indexer_params, indexer_kl_loss, lr=1e-2)
for layer in dsa_layers(sparse_model):
    layer.dense_warmup = False
after = [p for name, p in sparse_model.named_parameters() if ".indexer." not in name]
assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # main model frozen
rows["dsa, top-8, after the warm-up"] = measure(sparse_model)

# %% [markdown]
# Stage 2, sparse training: every weight learns, from the language-modelling loss plus the
# indexers' KL over the chosen tokens (each reaches only its own side). The same 150 steps from
# the untrained indexer ask whether a model without the warm-up catches up at this scale.

# %% tags=["nbval-ignore-output"]
def lm_and_kl(model, x_, y_):
    return model(x_, y_)[1] + sum(layer.indexer_loss for layer in dsa_layers(model))


run_steps(sparse_model, 150, sparse_model.parameters(), lm_and_kl, seed=1)
rows["dsa, top-8, warm-up + 150 sparse steps"] = measure(sparse_model)
run_steps(no_warmup, 150, no_warmup.parameters(), lm_and_kl, seed=1)
rows["dsa, top-8, 150 sparse steps, no warm-up"] = measure(no_warmup)
run_steps(dense_model, 150, dense_model.parameters(), lm_loss, seed=1)
rows["dense MLA, 150 more steps"] = (sum(dense_model.eval()(x_, y_)[1].item()
                                         for x_, y_ in val_batches) / 4, None, None)


def column(value, width):
    return f"{'—':>{width}}" if value is None else f"{value:>{width}.2f}"


print(f"{'':<42} {'val loss':>8} {'mass on top-8':>13} {'indexer KL':>10}")
for name, (loss, mass, kl) in rows.items():
    print(f"{name:<42} {column(loss, 8)} {column(mass, 13)} {column(kl, 10)}")
untrained, warmed = rows["dsa, top-8, indexer untrained"], rows["dsa, top-8, after the warm-up"]
assert warmed[1] > 2 * untrained[1] and warmed[2] < 0.3 * untrained[2]  # mass up, KL down
assert warmed[0] < dense_val + 0.15 < untrained[0]  # near the dense loss before sparse steps
assert all(r[0] < dense_val for name, r in rows.items() if "150" in name)  # all still learning
assert untrained[1] < random_mass + 0.03  # an untrained indexer: no better than chance

# %% [markdown]
# At this scale the warm-up does what it is for. (The figures quoted are those of the
# run stored here: the tests ignore the table's output, whose last digits differ from one machine
# to the next.) Before it, the 8 tokens an untrained indexer picks hold a quarter of the
# attention's mass (0.25), slightly less than the 0.29 that 8 tokens picked at random would hold on
# average: an untrained indexer ranks no better than chance. The sparse model's validation loss
# jumps from the dense model's 2.33 to 3.11. After 150 steps that trained the indexer alone, the
# chosen tokens hold 0.63 of the mass and the sparse model is at 2.35, within a few hundredths of
# the dense model *before any sparse training*. The next 150 sparse steps bring both sparse models
# to within a few hundredths of the dense model trained for as long: with 64 positions a model
# recovers from a bad start quickly, so the run without a warm-up catches up. The warm-up matters
# where recovering would cost more than distilling, as for a large model trained on long sequences;
# a toy run cannot show that, and we do not claim it. (The KL column is the sum over the two
# layers of the indexer's KL from the dense attention, always measured over every past token.
# It rises again in sparse training, where the indexer is trained on the KL over its chosen
# tokens only, while the main model it imitates keeps changing.)
#
# The trainer runs the same recipe: `attnbook train --attention dsa --dsa_warmup_iters N`
# (`TrainConfig.dsa_warmup_iters`) trains the indexers alone, with dense attention, for the
# first `N` steps, then adds their KL losses to the language-modelling loss.
#
# ### 5.4 Decoding reads only the chosen latents
#
# With a cache, a dsa decoding step in the absorbed mode reads every cached *index key*, picks
# the top $k$, gathers only their latents and rotary keys and attends over those (the tests
# check that the other latents are never read: set to NaN, they change nothing). Choosing fewer
# tokens cuts both what the step reads and what it computes. `attnbook bench dsa` times one
# decoding step at DeepSeek-V3.2's per-token sizes (latent 512, rotary key 64, index key 128;
# heads divided by 8 for a CPU) with `index_topk` $= L/16$, against dense absorbed attention
# over the same cache (one SDPA call, the heads as query rows). That call is the cheapest dense
# step we have, one fused kernel that reads each cached latent and rotary key once for all the
# heads; a dense baseline slower than it need be would flatter selection. (The bench checks that
# it gives MLA's own output; `attnbook bench dsa` also times MLA's `attend`.) We run its
# measurement at three cache lengths. Bytes read count the cache only: for dense, every latent
# and rotary key; for
# dsa, every index key plus the chosen latents and rotary keys.

# %% tags=["nbval-ignore-output"]
from attnbook.bench import DSA_ROWS, SDPA_ROW, best_of_alternating, dsa_step_runs

cache_lengths = [4096, 8192, 16384]
step_ms, step_bytes = {}, {}
for L in cache_lengths:
    runs, read = dsa_step_runs(L, n_head=16, index_n_heads=8, topk=L // 16)
    runs = {name: runs[name] for name in (SDPA_ROW, DSA_ROWS[torch.float32])}
    for name, (seconds, _) in best_of_alternating(runs, repeats=5).items():
        step_ms.setdefault(name, []).append(1e3 * seconds)
        step_bytes.setdefault(name, []).append(read[name])
for name in step_ms:
    print(f"{name:<26}" + "".join(f"  L={L}: {ms:6.2f} ms {b / 1e6:5.1f} MB ({b / ms / 1e6:.1f} GB/s)"
                                  for L, ms, b in zip(cache_lengths, step_ms[name],
                                                      step_bytes[name], strict=True)))
dsa_name = DSA_ROWS[torch.float32]
ratio = [s / d for s, d in zip(step_ms[dsa_name], step_ms[SDPA_ROW], strict=True)]
print("dsa / dense one-SDPA time:", [round(r, 2) for r in ratio])
assert ratio[-1] < 0.8  # fewer bytes, faster step
assert step_ms[SDPA_ROW][-1] > 2 * step_ms[SDPA_ROW][0]  # dense grows with the cache

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
for name in step_ms:
    ax1.plot(cache_lengths, [b / 1e6 for b in step_bytes[name]], marker="o", label=name)
    ax2.plot(cache_lengths, step_ms[name], marker="o", label=name)
ax1.set(xlabel="cached tokens L", ylabel="MB of cache read per step", title="bytes read")
ax2.set(xlabel="cached tokens L", ylabel="ms per step (this machine)", title="time")
ax1.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The bytes fall to under three tenths of dense at every length (2.7 of 9.4 MB at 4,096 cached
# tokens, 10.7 of 37.7 MB at 16,384): every index key (128 numbers, 22% of a latent and rotary
# key's 576) plus the chosen sixteenth. Unlike section 2's step, this one is
# not waiting on memory on this CPU: its dense rate is a few GB/s, not section 2's 11–12. The 16
# heads all read the same latents, so each number read feeds 16 heads' arithmetic (about 15
# FLOPs per byte), and the step is bound by arithmetic as much as by reading; selection cuts
# both. The time falls less than the bytes at 4k (about two thirds of dense here) and further as
# the cache grows (0.43 of it at 16k): a step also pays costs that do not
# grow with the cache (scoring the new query, the top-$k$ selection, launching the
# gather), and the longer the cache, the smaller their share. With FP8 index keys, as DeepSeek
# keeps them, the ratio of bytes falls further: an FP8 index key (128 bytes
# and a scale) is about a ninth of a bfloat16 latent and rotary key (1,152 bytes); exercise 4
# counts them.

# %% [markdown]
# ### The three designs side by side
#
# Each of the three layers built above, on its own 32 positions, drawn as the keys each query
# reads. MoBA reads whole chunks; NSA reads a coarse summary of the whole past (the compressed
# blocks), a few blocks of raw keys and its window, mixed by gates; DSA reads single tokens,
# wherever the indexer ranks them best.

# %%
from matplotlib.colors import ListedColormap

covered = torch.zeros(T, T, dtype=torch.long)  # NSA, head 0: 1 compressed, 2 selected, 3 window
for i, end in enumerate(ends.tolist()):  # the positions of every compressed block query t sees
    covered[:, end - l + 1 : end + 1] |= seen[:, i : i + 1].long()
covered[selected[0, 0]] = 2
covered[sliding_window_mask(T, T, w)] = 3
views = [("MoBA: the own chunk and the best past one", mask[0, 0].long() * 2),
         ("NSA, head 0: compressed (light), selected, window (dark)", covered),
         ("DSA: the indexer's 6 best tokens", dsa_chosen[0].long() * 2)]
colours = ListedColormap(["white", "#c6dbef", "#4292c6", "#08306b"])
fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), layout="constrained")
for ax, (title, view) in zip(axes, views, strict=True):
    ax.imshow(view, cmap=colours, vmin=0, vmax=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position")
axes[0].set_ylabel("query position")
plt.show()
print("keys read per query, mean over the 32 queries: MoBA "
      f"{mask[0, 0].sum(-1).float().mean():.1f}, NSA raw keys (selected or window) "
      f"{(covered >= 2).sum(-1).float().mean():.1f}, DSA {dsa_chosen[0].sum(-1).float().mean():.1f}")

# %% [markdown]
# ## 6. Check against the module
#
# Each section checked its construction against the module's function: `moba_gate` and
# `moba_mask`, `moba_attention` against the dense mask, the nsa layer against three softmaxes
# and its gates, the dsa layer against MLA masked to the indexer's choice. What remains are the
# promises every variant of the book makes, here with options small enough that every branch is
# really sparse: the contracts with the dense layers (MoBA keeping every chunk is MHA; dsa
# keeping every token is MLA, checked in section 5.2), causality, and cached decoding, token by
# token, equal to the full pass — which for these layers is a real test, since every step
# chooses its keys again from a longer past.

# %%
torch.manual_seed(7)
small = {
    "moba": dict(moba_chunk_size=4, moba_topk=2),
    "nsa": dict(compress_block=4, compress_stride=2, select_block=4, select_count=3, window=4),
    "dsa": dict(kv_lora_rank=16, index_topk=4),
}
cfg24 = AttentionConfig(n_embd=32, n_head=4, block_size=24, positions="rope")
x = torch.randn(2, 24, 32)
for name, options in small.items():
    layer = build_attention(name, cfg24, **options).eval()
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(batch_size=2)
        stepwise = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(24)], dim=1)
        x_future = x.clone()
        x_future[:, 12:] = torch.randn(2, 12, 32)  # change the future of position 11
        causal = torch.equal(layer(x_future)[:, :12], full[:, :12])
    cached_ok = torch.allclose(stepwise, full, atol=1e-5)
    print(f"{name:>5}: cached token by token == full pass: {cached_ok}; causal: {causal}")
    assert cached_ok and causal

mha = build_attention("mha", cfg24).eval()
moba_all = build_attention("moba", cfg24, moba_chunk_size=4, moba_topk=6).eval()  # 6 chunks
moba_all.load_state_dict(mha.state_dict())
moba_few = build_attention("moba", cfg24, moba_chunk_size=4, moba_topk=2).eval()
moba_few.load_state_dict(mha.state_dict())
with torch.no_grad():
    print("moba keeping all 6 chunks == mha with the same weights:",
          torch.allclose(moba_all(x), mha(x), atol=1e-6),
          "| keeping 2 differs:", not torch.allclose(moba_few(x), mha(x), atol=1e-3))
    assert torch.allclose(moba_all(x), mha(x), atol=1e-6)
    assert not torch.allclose(moba_few(x), mha(x), atol=1e-3)

# %% [markdown]
# ## Summary
#
# | | MoBA | NSA | DSA |
# |---|---|---|---|
# | what scores the past | the query against each chunk's mean key | the compression branch's attention | a lightning indexer (ReLU heads, own keys) |
# | what is kept | the own chunk and the `moba_topk - 1` best past chunks | the $n$ best blocks of $l'$ (first and latest always), plus compressed blocks and a window | the `index_topk` best tokens |
# | parameters added | none | $\varphi_k$, $\varphi_v$ and the gates | the indexer |
# | a decoding step reads | the chosen chunks' keys and values, and one mean key per chunk | compressed keys, chosen blocks and the window | every index key, and the chosen latents |
#
# - Position-based sparsity (a window, BigBird) finds a key whose place is decided by content
#   only as often as it happens to cover it. Selecting by score finds it, if the score can see
#   it: a block's mean key dilutes one key among many, a per-token score does not.
# - A decoding step at long context is bound by reading the cache (half a FLOP per byte). A step
#   that reads a sixteenth of it was several times faster here: what such a step costs is the
#   bytes it reads, not its FLOPs (unless many heads share what is read, as in MLA, which makes
#   it arithmetic-bound too; selection cuts both).
# - **MoBA** routes each query to its own chunk and the `moba_topk - 1` past chunks whose mean
#   key it scores highest; it attends over them with one softmax, computed as parts joined by
#   [chapter 8](08_flash_attention.ipynb)'s log-sum-exp merge. No parameters are added; with every
#   chunk kept it is MHA.
# - **NSA** adds three gated branches: attention over learned compressed blocks, over the raw
#   keys of the blocks those scores rank highest (first and latest blocks always), and over a
#   window. In the module the query heads of a GQA group share one selection, so that memory is
#   read once per group (section 4's small layer has one key/value head per query head).
# - **DSA** scores every past token with a lightning indexer (64 ReLU heads over index keys of
#   128 numbers, about 6% of MLA's work per token at DeepSeek's sizes) and runs MLA over the top $k$; with every token
#   kept it is MLA, bit for bit. The indexer is trained by distillation: a dense warm-up that
#   matches the head-summed attention (KL), then sparse training with the KL on the chosen
#   tokens; a decoding step reads every index key but only $k$ latents.

# %% [markdown]
# ## Further reading
#
# - Lu et al. (2025), *MoBA: Mixture of Block Attention for Long-Context LLMs* (Moonshot AI).
# - Yuan et al. (2025), *Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse
#   Attention* (DeepSeek), ACL 2025 best paper.
# - DeepSeek-AI (2025), *DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek Sparse
#   Attention*, and DeepSeek-V3.2's report: the lightning indexer and its two-stage training.
# - Tang et al. (2024), *Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference*:
#   choosing cache pages per query at decoding time, the idea's inference-only ancestor.
# - Zaheer et al. (2020), *Big Bird* ([chapter 10](10_sparse_attention.ipynb)) and Beltagy et al.
#   (2020), *Longformer* ([chapter 9](09_sliding_window.ipynb)): the fixed patterns this chapter
#   moves beyond.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/14_learned_sparse_attention_solutions.ipynb`](solutions/14_learned_sparse_attention_solutions.ipynb).
# Predict first, then check with code.
#
# 1. **How much does a block mean dilute?** For i.i.d. Gaussian keys of $d$ numbers and a query
#    that is a noisy copy of key $p$, derive the mean and standard deviation of the gate score of
#    $p$'s chunk and of another chunk, as functions of the chunk size $C$ and $d$, and from them
#    the probability that $p$'s chunk outscores one other chunk. Check against section 1's
#    probe for $C = 16$ and $C = 64$, and predict the hit rate for $d = 128$.
# 2. **Blocks whose keys agree.** Trained keys are not i.i.d.: neighbouring tokens share topic and
#    syntax. Give every chunk a "topic" vector added to all its keys, with strength $a$ (the query,
#    still a noisy copy of key $p$, then carries the topic of $p$'s chunk). Plot MoBA's hit rate
#    against $a$ for chunks of 64. How strong must the shared part be before mean-key routing works
#    as well as per-token scores?
# 3. **What NSA reads.** At the paper's sizes ($l = 32$, $d = 16$, $l' = 64$, $n = 16$,
#    $w = 512$), count the keys a query attends to at $T$ = 8k, 64k and 1M positions over the
#    three branches, and the fraction of full attention's. Which branch dominates at 1M, and what
#    does that say about the compression stride?
# 4. **DSA's bytes at DeepSeek's scale.** Suppose latents and rotary keys are cached in
#    bfloat16 and index keys in FP8 (one byte each, plus a 4-byte scale per token), as
#    DeepSeek's indexer does. Compute the bytes a
#    decoding step reads per layer at 128k cached tokens with `index_topk = 2048`, dense and
#    sparse, and the cache length above which reading the index keys costs more than reading the
#    chosen latents. Check the float32 case against `IndexedLatentCache`'s `bytes_per_token`.
# 5. **How many tokens does the toy model need?** After section 5.3's warm-up, measure the
#    validation loss and the attention mass captured for `index_topk` = 2, 4, 8, 16 and 32 (no
#    further training; `layer.index_topk` can be changed in place). Measure the mass on queries
#    with at least 32 positions of past (a query with fewer than $k$ keeps them all). Where does
#    the loss meet the dense model's?
