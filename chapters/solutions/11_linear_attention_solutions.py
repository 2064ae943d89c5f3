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
# # Chapter 11 — Linear attention: solutions
#
# Worked solutions to the exercises of `chapters/11_linear_attention.ipynb`. Each one states the
# reasoning first, then checks the claim with code and an `assert`. As in the chapter, everything
# runs on one thread (small tensors, steadier timings on a shared machine).

# %%
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from attnbook.attention import AttentionConfig, build_attention, causal_mask
from attnbook.attention.linear import (
    LinearAttentionCache,
    elu_feature_map,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
)
from attnbook.kv_cache import KVCache
from attnbook.positions import RotaryEmbedding

torch.set_num_threads(1)
_ = torch.manual_seed(0)  # (manual_seed returns the generator; `_ =` keeps it out of the output)

# %% [markdown]
# ## Exercise 1 — Another feature map
#
# **(a) Do the three forms still agree with $\phi = \mathrm{relu}$?** Yes. Nothing in the
# derivation of the recurrent and chunked forms used the shape of $\phi$: they only reorder the
# sums $\sum_s (\phi(q_t)\cdot\phi(k_s))\,v_s$ and $\sum_s \phi(q_t)\cdot\phi(k_s)$, which is
# valid for *any* feature vectors. The module's three functions take features, so we simply
# hand them relu features.

# %%
torch.manual_seed(1)
B, H, T, d, dv = 2, 3, 50, 16, 8
q, k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, dv)
qf, kf = F.relu(q), F.relu(k)  # non-negative, about half the coordinates exactly zero

y_quad = linear_attention_quadratic(qf, kf, v)
y_rec, _ = linear_attention_recurrent(qf, kf, v)
y_chk, _ = linear_attention_chunked(qf, kf, v, chunk=16)
agree = torch.allclose(y_rec, y_quad, atol=1e-4) and torch.allclose(y_chk, y_quad, atol=1e-4)
assert agree
print("relu features: recurrent == chunked == quadratic (atol=1e-4):", agree)

# %% [markdown]
# **What can go wrong with the normaliser.** With $\mathrm{elu}+1$ every feature is strictly
# positive, so every $\phi(q)\cdot\phi(k) > 0$ and the normaliser is at least the largest of its
# terms. With relu, features are only non-negative: $\phi(q)\cdot\phi(k) = 0$ whenever no
# coordinate is positive in *both* vectors. A query whose visible keys all miss it that way has
# a normaliser of exactly $0$, and the output is $0/0$. The module adds `EPS = 1e-6` to the
# normaliser, so such a row silently comes out as the zero vector ("attends to nothing");
# without the `EPS` it would be `NaN`.
#
# How often? At the first position the query sees one key. Each of the $d$ coordinates is
# positive in both vectors with probability $1/4$, so the dot product is zero with probability
# $(3/4)^d$: about 1% for $d = 16$. We check this on 200,000 random draws, and show one such row.

# %%
torch.manual_seed(2)
q0, k0 = F.relu(torch.randn(200_000, 16)), F.relu(torch.randn(200_000, 16))
zero_norm = ((q0 * k0).sum(-1) == 0).float().mean().item()
print(f"first-position normaliser exactly 0: {zero_norm:.4f} of draws, (3/4)^16 = {0.75**16:.4f}")
assert abs(zero_norm - 0.75**16) < 0.002

bad = int(((q0 * k0).sum(-1) == 0).nonzero()[0])
qb, kb = q0[bad].view(1, 1, 1, 16), k0[bad].view(1, 1, 1, 16)
vb = torch.ones(1, 1, 1, 4)  # the only visible value is all ones
y_bad = linear_attention_quadratic(qb, kb, vb)
print("output of that query (the value it should average is all ones):", y_bad.flatten().tolist())
assert torch.equal(y_bad, torch.zeros_like(y_bad))

# %% [markdown]
# **(b) The recall probe with relu features.** Prediction: better than $\mathrm{elu}+1$ at small
# $N$, because relu features are sparse (about half the coordinates are exactly zero), so two
# random keys overlap less and the read blurs less. But the features are still non-negative, so
# every pair of keys still overlaps somewhat, and the read is still a normalised *sum* over all
# stored pairs: nowhere near the ceiling, and worse as $N$ grows. We repeat the chapter's probe
# (same sizes, same error measure) for the feature maps and the least-squares ceiling.

# %%
d_mem = dv_mem = 64


def rel_error(y, vals):
    return float(((y - vals) ** 2).sum() / (vals**2).sum())


def linear_read(features, keys, vals):
    """Store the pairs through the chunked form, keep the final state, read it with the keys."""
    kf = features(keys)
    _, (S, z) = linear_attention_chunked(kf, kf, vals, chunk=64)
    return (kf @ S) / (kf @ z[..., None] + 1e-6)


def probe(N, reps=4):
    keys, vals = torch.randn(reps, 1, N, d_mem), torch.randn(reps, 1, N, dv_mem)
    return {
        "elu + 1": rel_error(linear_read(elu_feature_map, keys, vals), vals),
        "relu": rel_error(linear_read(F.relu, keys, vals), vals),
        "ceiling (least squares)": rel_error(keys @ (torch.linalg.pinv(keys) @ vals), vals),
    }


torch.manual_seed(3)
n_pairs = [4, 16, 64, 256]
results = {N: probe(N) for N in n_pairs}
print(f"{'N':>4} " + " ".join(f"{name:>24}" for name in results[4]))
for N, res in results.items():
    print(f"{N:>4} " + " ".join(f"{e:>24.2f}" for e in res.values()))
assert all(res["relu"] < res["elu + 1"] for res in results.values())
assert results[64]["relu"] > 0.5 and results[64]["ceiling (least squares)"] < 1e-3

# %% [markdown]
# Relu roughly halves the error at $N = 4$ and stays ahead of $\mathrm{elu}+1$ everywhere, but
# by $N = 64$ it returns mostly an average too, while the ceiling is still exact there. The
# feature map decides how close to the ceiling a plain sum gets; it does not move the ceiling.
#
# **(c) More features than $d$.** The ceiling is set by the size of the state: reading is linear
# in $\phi(q)$, so with features of size $m$ the state $S$ is $m\times d_v$ and at most $m$ random
# associations can be read back exactly. Take $\phi(x) = [\mathrm{relu}(x), \mathrm{relu}(-x)]$,
# $m = 2d = 128$ (positive and negative parts kept apart, so nothing of $x$ is thrown away). The
# state doubles, $S$ becomes $128 \times 64$, and the least-squares ceiling on these features
# should stay exact up to $N = 128$ and then follow $1 - 128/N$.

# %%
def split_relu(x):
    return torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # (..., 2d)


torch.manual_seed(4)
print(f"{'N':>4} {'ceiling, d features':>20} {'ceiling, 2d features':>21} {'1 - 2d/N':>9}")
ceil_2d = {}
for N in (64, 128, 256, 512):
    keys, vals = torch.randn(4, 1, N, d_mem), torch.randn(4, 1, N, dv_mem)
    feats = split_relu(keys)  # (4, 1, N, 128)
    e_d = rel_error(keys @ (torch.linalg.pinv(keys) @ vals), vals)
    ceil_2d[N] = rel_error(feats @ (torch.linalg.pinv(feats) @ vals), vals)
    print(f"{N:>4} {e_d:>20.2f} {ceil_2d[N]:>21.2f} {max(0.0, 1 - 128 / N):>9.2f}")
S_shape = linear_attention_chunked(feats, feats, vals, chunk=64)[1][0].shape
print("state S with split-relu features:", tuple(S_shape), "(was (..., 64, 64))")
assert ceil_2d[128] < 1e-3 and abs(ceil_2d[256] - 0.5) < 0.05 and S_shape[-2:] == (128, 64)

# %% [markdown]
# The ceiling moved from 64 to 128 associations, exactly as the state's rows did. This is the
# general trade: more (or more expressive) features buy recall with state size, and with it the
# $d\,d_v$ part of the cost per token. Random-feature methods such as Performer, and the larger
# feature maps of later linear-attention models, sit on this curve.
#
# ## Exercise 2 — Choose the chunk size
#
# **Prediction.** The FLOP count $2TC(d + d_v) + 4Td\,d_v$ only grows with $C$: the $(C, C)$
# blocks get bigger, the state work stays. By FLOPs alone, the smallest chunk would win. But
# FLOPs are not all: the module keeps the state entering *every* chunk, a $d\times d_v$ matrix
# for each of the $T/C$ chunks (and the cumulative sum that builds them, and their gradients).
# That is $T d\,d_v / C$ numbers per head — with $C = 4$ and $d = d_v = 64$, 1024 numbers per
# token, 8 times the 128 numbers of its key and value. Small chunks also mean many small matrix
# products. So we expect a U: slow at tiny chunks (state memory traffic), slow at huge chunks
# (quadratic blocks), fastest in between, around $C \approx d$, where the block work
# $2TC(d + d_v)$ and the state work $4Td\,d_v$ are about equal. With `chunk = T` there is a
# single chunk and the form *is* the quadratic form (plus a zero state).
#
# **Measurement** (timings vary from machine to machine, so the output is not compared; the
# cell asserts the U loosely):

# %% tags=["nbval-ignore-output"]
def fwd_bwd(q, k, v, chunk):
    y, _ = linear_attention_chunked(elu_feature_map(q), elu_feature_map(k), v, chunk)
    y.sum().backward()


def best_ms(fn, reps=2):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


torch.manual_seed(5)
T2 = 1024
qkv = [torch.randn(1, 4, T2, 64, requires_grad=True) for _ in range(3)]
chunks = [4, 16, 64, 256, 1024]
ms = {C: best_ms(lambda C=C: fwd_bwd(*qkv, C)) for C in chunks}
for C, t in ms.items():
    flops = 2 * T2 * C * 128 + 4 * T2 * 64 * 64
    print(f"chunk {C:>5}: {t:8.1f} ms   FLOPs per head {flops / 1e6:7.1f} M   "
          f"chunk states per head {T2 // C * 64 * 64:>9,} numbers")
best_chunk = min(ms, key=ms.get)
print("fastest chunk on this machine:", best_chunk)
assert min(ms[16], ms[64], ms[256]) < 0.5 * min(ms[4], ms[1024])

# %% [markdown]
# The curve is a U, with its bottom at a chunk of a few dozen tokens (64 on the machine this was
# written on), close to the head size, as predicted. The module's default `linear_chunk = 64`
# suits heads of 64. The two ends are slow for opposite reasons: `chunk = 4` does the fewest
# FLOPs but moves 256 states per head through memory; `chunk = T` is the quadratic form.
#
# ## Exercise 3 — A proper distribution?
#
# **Proof (no RoPE).** For query $t$ the weights are
# $w_{ts} = \phi(q_t)\cdot\phi(k_s) / \sum_{s'\le t}\phi(q_t)\cdot\phi(k_{s'})$ for $s \le t$,
# and $0$ for $s > t$. Every feature is positive, so every dot product is positive: numerator
# and denominator are positive, hence $w_{ts} \ge 0$. The denominator is the sum of the
# numerators over the visible $s$, hence $\sum_s w_{ts} = 1$. (The module adds a tiny `EPS` to
# the denominator, which moves the sum away from 1 by about `EPS / denominator`, far below
# $10^{-5}$.) Then $y_t = \sum_s w_{ts} v_s$ is a convex combination of the visible values, and
# coordinate by coordinate a weighted average with non-negative weights summing to one lies
# between the smallest and the largest of the averaged numbers:
# $\min_{s\le t} v_{s,j} \le y_{t,j} \le \max_{s\le t} v_{s,j}$.
#
# **Check** on the module's quadratic form. The running minimum and maximum of the values over
# the visible prefix come from `torch.cummin` and `torch.cummax` along the time axis.

# %%
torch.manual_seed(6)
B, H, T, d = 2, 4, 64, 16
qf, kf = elu_feature_map(torch.randn(B, H, T, d)), elu_feature_map(torch.randn(B, H, T, d))
v = torch.randn(B, H, T, d)
y, w = linear_attention_quadratic(qf, kf, v, return_weights=True)
lo, hi = v.cummin(dim=2).values, v.cummax(dim=2).values  # (B, H, T, d): over s <= t
print("no RoPE: weights >= 0:", bool((w >= 0).all()),
      "| rows sum to 1:", torch.allclose(w.sum(-1), torch.ones(B, H, T), atol=1e-5),
      "| zero above the diagonal:", bool((w[..., ~causal_mask(T)] == 0).all()),
      "| output within [min, max] of visible values:",
      bool(((y >= lo - 1e-5) & (y <= hi + 1e-5)).all()))
assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(B, H, T), atol=1e-5)
assert ((y >= lo - 1e-5) & (y <= hi + 1e-5)).all()

# %% [markdown]
# **With RoPE** the numerator uses the rotated features $R_t\phi(q_t)\cdot R_s\phi(k_s)$ while
# the denominator keeps the unrotated sum (chapter, section 5). A rotation mixes the coordinates
# of each pair with cosines and sines, so the rotated features have negative coordinates and a
# rotated dot product can be negative: a negative weight. And the numerators no longer add up to
# the denominator, so the rows need not sum to one. The output is then no longer an average: it
# can leave the range of the values.

# %%
rope = RotaryEmbedding(d, max_len=T)
y_r, w_r = linear_attention_quadratic(qf, kf, v, q_rot=rope(qf), k_rot=rope(kf),
                                      return_weights=True)
row_sums = w_r.sum(-1)  # (B, H, T)
outside = (y_r < lo - 1e-5) | (y_r > hi + 1e-5)
print(f"with RoPE: negative weights: {int((w_r < 0).sum())} of {int(causal_mask(T).sum()) * B * H}"
      f", smallest {w_r.min():.3f}")
print(f"row sums between {row_sums.min():.3f} and {row_sums.max():.3f}")
print(f"output coordinates outside [min, max] of the visible values: {int(outside.sum())} "
      f"of {outside.numel()}")
assert (w_r < 0).any() and not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3)
assert outside.any()

# %% [markdown]
# That is the price of the module's RoPE choice: the output is no longer a convex combination.
# The alternative — rotating the normaliser too — would make the row sums exactly one again,
# but the denominator could then approach zero and the output blow up; keeping the denominator
# positive is the safer of the two.
#
# ## Exercise 4 — A 7B-style layer
#
# **By hand.** 32 heads of $d_h = 128$, fp16 (2 bytes):
#
# - linear-attention state per layer and sequence: $32 \cdot (128\cdot 128 + 128) \cdot 2 =
#   1{,}056{,}768$ bytes, about 1.01 MiB; for 32 layers about 32.25 MiB, **whatever the length**;
# - KV cache per token and layer: $2 \cdot 32 \cdot 128 \cdot 2 = 16{,}384$ bytes (16 KiB), so
#   512 KiB per token for 32 layers ([chapter 7](../07_kv_cache.ipynb)'s number).
#
# The KV cache is larger once $16384\,T > 1056768$, i.e. $T > 64.5$: **from 65 tokens on**,
# $(d_h + 1)/2$ as in the chapter. At 4096 tokens the KV cache of one layer is 64 MiB, about 63.5
# times the state (in general $2T/(d_h + 1)$).
#
# **Check** with the module's caches on the `meta` device (shapes and dtype, no memory).

# %%
n_layer, n_head, head_dim, ctx = 32, 32, 128, 4096
state = LinearAttentionCache(1, n_head, head_dim, max_len=ctx, device="meta",
                             dtype=torch.float16)
kv = KVCache(1, n_head, head_dim, max_len=ctx, device="meta", dtype=torch.float16)
state_layer, kv_token = state.nbytes, kv.bytes_per_token
crossover = state_layer // kv_token + 1  # first T with T * kv_token > state_layer
print(f"state per layer: {state_layer:,} bytes ({state_layer / 2**20:.2f} MiB); "
      f"32 layers: {n_layer * state_layer / 2**20:.1f} MiB")
print(f"KV cache per token per layer: {kv_token:,} bytes; 32 layers: "
      f"{n_layer * kv_token // 1024} KiB")
print(f"KV cache larger from T = {crossover}; at {ctx} tokens: {kv.nbytes / 2**20:.0f} MiB per "
      f"layer, {kv.nbytes / state_layer:.1f} x the state")
assert state_layer == n_head * (head_dim**2 + head_dim) * 2 == state.bytes_per_token
assert kv_token == 2 * n_head * head_dim * 2 and crossover == 65
assert abs(kv.nbytes / state_layer - 2 * ctx / (head_dim + 1)) < 1e-9

# %% [markdown]
# (`LinearAttentionCache.bytes_per_token` is the whole state, the same at every length, as its
# docstring says: for a state, "what one more token costs" is nothing, and "what remembering
# costs" is the whole state.) For a 32-layer model the state is about 32 MiB per sequence, the
# KV cache of 65 tokens; at a 32k context the KV cache would be 16 GiB against those 32 MiB.
#
# ## Exercise 5 — Train it
#
# The chapter's recall probe stored random pairs without any training. Does a *trained* layer do
# better? A trained layer chooses its keys, queries and values (through its projections), so it
# can make the features of different keys overlap less — but it cannot enlarge its state.
#
# The task, kept tiny so it trains in seconds: a sequence of 32 key→value pairs, each pair given
# as **one** token (the embedding of the key plus the embedding of the value), followed by 16
# query tokens, each the embedding of one of the stored keys plus a "?" value embedding; the
# target at each query is the key's value. Keys and values are drawn from 64 symbols. The model
# is a single attention layer (`build_attention("mha" | "linear", cfg)`, 2 heads of 16, no
# positions: the task needs none), a LayerNorm and a linear read-out, trained with AdamW for 200
# steps. Each linear head has a $16\times 16$ state, so 32 pairs are twice what one head can hold
# exactly.
#
# Prediction: softmax attention solves it (each query matches its key and copies the value);
# linear attention learns something, but stays clearly behind.

# %%
N_SYM, N_PAIRS, N_QUERIES = 64, 32, 16


def recall_batch(batch_size, gen, n_pairs=N_PAIRS):
    """Key ids (B, P + Q), value ids (B, P + Q) with N_SYM = '?' at the queries, targets (B, Q)."""
    keys = torch.stack([torch.randperm(N_SYM, generator=gen)[:n_pairs] for _ in range(batch_size)])
    vals = torch.randint(0, N_SYM, (batch_size, n_pairs), generator=gen)
    pick = torch.randint(0, n_pairs, (batch_size, N_QUERIES), generator=gen)
    key_ids = torch.cat([keys, keys.gather(1, pick)], dim=1)
    val_ids = torch.cat([vals, torch.full((batch_size, N_QUERIES), N_SYM)], dim=1)
    return key_ids, val_ids, vals.gather(1, pick)


class RecallModel(nn.Module):
    """One attention layer over (key + value) tokens, read out as a value id at each query."""

    def __init__(self, attention, n_embd=32, n_head=2):
        super().__init__()
        cfg = AttentionConfig(n_embd=n_embd, n_head=n_head, block_size=64, positions="none")
        options = {"linear_chunk": 16} if attention == "linear" else {}  # linear's own option
        self.key_emb = nn.Embedding(N_SYM, n_embd)
        self.val_emb = nn.Embedding(N_SYM + 1, n_embd)  # the last one is "?"
        self.attn = build_attention(attention, cfg, **options)
        self.ln = nn.LayerNorm(n_embd)
        self.out = nn.Linear(n_embd, N_SYM)

    def forward(self, key_ids, val_ids):  # (B, T) each
        h = self.attn(self.key_emb(key_ids) + self.val_emb(val_ids))  # (B, T, n_embd)
        return self.out(self.ln(h[:, -N_QUERIES:]))  # (B, Q, N_SYM): logits at the queries


def train_recall(attention, steps=200, n_pairs=N_PAIRS):
    """Train a RecallModel with `attention` for `steps` steps; its accuracy on 512 new sequences."""
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(8)
    model = RecallModel(attention)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in tqdm(range(steps), desc=attention):  # a progress bar while it runs
        key_ids, val_ids, target = recall_batch(32, gen, n_pairs)
        loss = F.cross_entropy(model(key_ids, val_ids).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    key_ids, val_ids, target = recall_batch(512, torch.Generator().manual_seed(9), n_pairs)
    with torch.no_grad():
        return (model(key_ids, val_ids).argmax(-1) == target).float().mean().item()


# %% [markdown]
# Training is seeded, but its last digits depend on the machine (thread count, CPU), so the
# accuracies are printed in a cell the book's tests do not compare; the cell asserts the gap
# loosely instead.

# %% tags=["nbval-ignore-output"]
acc = {name: train_recall(name) for name in ("mha", "linear")}
print(f"recall accuracy after 200 steps, 32 pairs, heads of 16: softmax {acc['mha']:.2f}, "
      f"linear {acc['linear']:.2f} (chance {1 / N_SYM:.2f})")
assert acc["mha"] > 0.9 and acc["linear"] < acc["mha"] - 0.1

# %% [markdown]
# Softmax attention recalls nearly every value. Linear attention learns far more than the
# untrained probe suggested — training shapes its features — but stays well behind.
#
# **Why not entirely?** Two things could be at fault: too little training, or too small a
# memory. We test both, again with the output ignored and the claims asserted loosely: train the
# linear layer four times longer on the same 32 pairs, and train it for 300 steps on only 8
# pairs, half of what a $16\times 16$ state can hold exactly.

# %% tags=["nbval-ignore-output"]
acc_long = train_recall("linear", steps=800)
acc_few = train_recall("linear", steps=300, n_pairs=8)
print(f"linear, 32 pairs, 800 steps: {acc_long:.2f}   (200 steps: {acc['linear']:.2f})")
print(f"linear,  8 pairs, 300 steps: {acc_few:.2f}")
assert acc_long < acc["mha"] - 0.05 and acc_few > acc["linear"] + 0.1

# %% [markdown]
# Four times more training narrows the gap only slowly (to about 84% on the machine this was
# written on), while with 8 pairs instead of 32 the same layer passes 90% within 300 steps. The
# limit is the memory, not the training: the state of a linear head has a fixed size, and with
# 32 pairs it is asked to hold more than it can.
