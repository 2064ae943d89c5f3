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
# # Chapter 13 — Multi-head latent attention: solutions
#
# Worked solutions to the exercises of `chapters/13_latent_attention.ipynb`. Each one gives the
# reasoning first, then checks the claim with code and an `assert`. As in the chapter, we run on
# one thread (small matrices; steadier on a busy machine, and the training of Exercise 4 repeats
# more closely across machines).

# %%
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnbook.attention import AttentionConfig, build_attention, sdpa
from attnbook.attention.mla import LatentCache
from attnbook.kv_cache import KVCache

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# DeepSeek-V2's attention (the chapter's section 8), to be built on the meta device
DS = AttentionConfig(n_embd=5120, n_head=128, block_size=32 * 1024, positions="rope", bias=False)
DS_SIZES = dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                v_head_dim=128)  # MLA's options
N_LAYER = 60

# %% [markdown]
# ## Exercise 1 — Why one shared rotary key?
#
# **Prediction.** Per token and layer MLA caches the latent and the one shared rotary key,
# $r + d_R = 512 + 64 = 576$ numbers, 1152 bytes in bf16. With a rotary key per head the cache
# holds $r + H d_R = 512 + 128 \cdot 64 = 8704$ numbers, 17,408 bytes: 15.1 times MLA's, the
# rotary keys alone being 16 times the latent. MHA with the same heads caches
# $2 H d_h = 32{,}768$ numbers, 65,536 bytes: 56.9 times MLA's, and still 3.8 times the
# per-head variant.
#
# A 32k-token (32,768) sequence over 60 layers then needs $32768 \cdot 60 \cdot 1152 \approx 2.26$
# GB with MLA (35 sequences fit in 80 GB), $32768 \cdot 60 \cdot 17408 \approx 34.2$ GB with a
# rotary key per head (2 fit) and about 128.8 GB with MHA (not even one fits).
#
# **Would absorption still work?** Yes: only $W^{UK}$ is absorbed, and the rotary part never
# passes through it; each head would dot its rotary query with its own rotary key, as in plain
# RoPE attention. But absorbed attention would no longer be multi-query attention in latent space:
# head $h$'s key $[c_n, k^R_{h,n}]$ would differ from head to head, so a decoding step would read
# $r + H d_R$ numbers per cached position instead of $r + d_R$. Sharing the rotary key costs little
# in freedom, since every head keeps its own rotary *query* and can weigh positions its own way.

# %%
ctx = DS.block_size
with torch.device("meta"):
    ds_mla = build_attention("mla", DS, **DS_SIZES)
per_layer = {  # bytes per token, one layer, bf16
    "MLA": ds_mla.new_cache(1, ctx, dtype=torch.bfloat16).bytes_per_token,
    "MLA, rotary key per head": LatentCache(1, 512, 128 * 64, ctx, device="meta",
                                            dtype=torch.bfloat16).bytes_per_token,
    "MHA": KVCache(1, 128, 128, ctx, device="meta", dtype=torch.bfloat16).bytes_per_token,
}
per_sequence = {name: ctx * N_LAYER * b for name, b in per_layer.items()}  # 32k tokens, 60 layers
fit = {name: int(80e9 // b) for name, b in per_sequence.items()}
assert per_layer == {"MLA": 1152, "MLA, rotary key per head": 17_408, "MHA": 65_536}
assert fit == {"MLA": 35, "MLA, rotary key per head": 2, "MHA": 0}
for name, b in per_layer.items():
    print(f"{name:>24}: {b:>6,} bytes per token and layer ({b / per_layer['MLA']:>4.1f} x MLA), "
          f"{per_sequence[name] / 1e9:>6.2f} GB per 32k sequence, {fit[name]:>2} fit in 80 GB")

# %% [markdown]
# ## Exercise 2 — Fold $W^{UV}$ into the output projection
#
# **Reasoning.** In absorbed mode head $h$ ends with a latent output $o_h \in \mathbb{R}^r$,
# then computes $W^{UV}_h o_h$ (size $d_v$); the output projection sums
# $W^O_h (W^{UV}_h o_h)$ over heads, where $W^O_h$ is the block of `c_proj.weight` (columns
# $h d_v \ldots (h+1) d_v - 1$) that reads head $h$. Matrix products are associative, so
# $W^O_h W^{UV}_h$, a `(d, r)` matrix, can be computed once; side by side for all heads they make
# a folded projection of shape `(d, H r)` that reads the latent outputs directly.
#
# We reproduce the module's absorbed attention up to the latent outputs (its `project`, its
# RoPE, the latent queries, attention over latents with the scale $1/\sqrt{d_h + d_R}$) and feed
# them to the folded projection. For clarity the values here are the latents alone; the module
# passes $[c, k^R]$ and keeps the first $r$ output numbers, which are the same.

# %%
cfg = AttentionConfig(n_embd=64, n_head=4, positions="rope", block_size=64)
torch.manual_seed(1)
layer = build_attention("mla", cfg, kv_lora_rank=32, qk_rope_head_dim=8).eval()
layer.absorb = True
H, r, nope, v_dim, d = layer.n_head, layer.kv_lora_rank, layer.qk_nope_head_dim, layer.v_head_dim, 64
x = torch.randn(2, 12, d)

with torch.no_grad():
    q, k_rope, latent = layer.project(x)  # (B, H, T, nope + dR), (B, 1, T, dR), (B, 1, T, r)
    q, k_rope = layer.position(q, k_rope, 0)  # the rotary parts rotated: positions 0 .. 11
    q_nope, q_rope = q.split([nope, q.shape[-1] - nope], dim=-1)  # (B,H,T,nope), (B,H,T,dR)
    w_uk, w_uv = layer.wkv_b.weight.view(H, -1, r).split([nope, v_dim], dim=1)  # (H,nope,r), (H,v,r)
    q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
    q_all = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, T, r + dR)
    k_all = torch.cat([latent, k_rope], dim=-1)  # (B, 1, T, r + dR)
    o_lat = sdpa(q_all, k_all, latent, is_causal=True, scale=layer.scale,
                 enable_gqa=True)  # (B, H, T, r): a latent output per head

    W_O = layer.c_proj.weight.view(d, H, v_dim)  # W_O[:, h] is head h's block, (d, v)
    W_fold = torch.einsum("dhv,hvr->dhr", W_O, w_uv).reshape(d, H * r)  # (d, H * r)
    y_fold = o_lat.transpose(1, 2).reshape(2, 12, H * r) @ W_fold.T + layer.c_proj.bias
    y_module = layer(x)
assert torch.allclose(y_fold, y_module, atol=1e-5)
print("folded output projection", tuple(W_fold.shape), "== module output (atol=1e-5):",
      torch.allclose(y_fold, y_module, atol=1e-5))

# %% [markdown]
# **Does it pay?** Each weight is used once per token (one multiply-add), so parameters and
# multiply-adds per token are the same count. Unfolded: $W^{UV}$ has $H d_v r$ and `c_proj`
# $d \cdot H d_v$; folded: $d \cdot H r$. Folding is cheaper only if $d r < d_v (r + d)$, that
# is $r < d_v d / (d - d_v)$, barely more than $d_v$. With DeepSeek-V2's sizes ($r = 512$,
# $d_v = 128$, $d = 5120$) the folded matrix is 3.6 times larger: the latent is wider than a
# value head, so going through the head's $d_v$ numbers is the cheaper path. The same count
# applies to folding $W^{UK}$ into the query projection. Absorption is worth doing as an *order
# of operations* (apply the small per-head matrices to queries and outputs, never to the cache),
# not necessarily as a pre-multiplied weight.

# %%
H_ds, r_ds, v_ds, d_ds = 128, 512, 128, 5120
unfolded = H_ds * v_ds * r_ds + d_ds * H_ds * v_ds  # W_UV + c_proj
folded = d_ds * H_ds * r_ds
assert folded > 3 * unfolded
print(f"per layer: unfolded {unfolded / 1e6:.1f} M weights, folded {folded / 1e6:.1f} M "
      f"({folded / unfolded:.1f}x)")

# %% [markdown]
# ## Exercise 3 — What `q_lora_rank` saves, and what it does not
#
# **Prediction.** Without compression the query path is one matrix from $d$ to
# $H (d_h + d_R) = 128 \cdot 192 = 24{,}576$ numbers: $5120 \cdot 24576 \approx 125.8$ M
# parameters per layer. With `q_lora_rank=1536` it is a down-projection ($5120 \cdot 1536$), an
# RMSNorm (1536 weights) and an up-projection ($1536 \cdot 24576$): about 45.6 M, so 80 M fewer
# per layer, 4.8 billion over 60 layers (DeepSeek-V2 has no biases in attention).
#
# The cache cannot change: a token's query is used only at the step that token is processed,
# to attend over the earlier keys; later tokens never need it. The cache holds what later tokens
# read, keys and values (here the latent and the rotary key), and `q_lora_rank` does not touch
# those. (During training, the narrower query latent also saves activation memory.)

# %%
query_params, cache_bytes = {}, {}
for q_rank in (1536, 0):
    with torch.device("meta"):
        m = build_attention("mla", DS, **{**DS_SIZES, "q_lora_rank": q_rank})
    query = [p for name, p in m.named_parameters() if name.startswith(("wq", "q_norm"))]
    query_params[q_rank] = sum(p.numel() for p in query)  # wq, or wq_a, q_norm and wq_b
    cache_bytes[q_rank] = m.new_cache(1, 1024, dtype=torch.bfloat16).bytes_per_token
saved = query_params[0] - query_params[1536]
assert query_params == {1536: 5120 * 1536 + 1536 + 1536 * 24576, 0: 5120 * 24576}
assert cache_bytes[1536] == cache_bytes[0] == 1152
print(f"query path per layer: {query_params[0]:,} (q_lora_rank=0) vs {query_params[1536]:,} "
      f"(1536): {saved / 1e6:.1f} M fewer, {N_LAYER * saved / 1e9:.2f} B over {N_LAYER} layers")
print("cache bytes per token and layer:", cache_bytes)

# %% [markdown]
# ## Exercise 4 — How low-rank are a trained layer's keys and values?
#
# **Setup.** A one-layer model with a 4-head MHA layer ($d = 64$, RoPE, no biases) learns to copy:
# each sequence is 12 random tokens (of 64) followed by the same 12 again, and the model is
# scored on predicting the repeated half. Attention must learn to look back exactly 11
# positions, so the layer's keys and queries must learn something specific. We train 120 steps
# (a few seconds).

# %%
V, P, D = 64, 12, 64


def copy_batch(B):
    first = torch.randint(0, V, (B, P))
    return torch.cat([first, first], dim=1)  # (B, 2P): the second half repeats the first


class CopyModel(nn.Module):
    """Embedding, one pre-norm MHA layer (RoPE), LM head: a minimal model for this exercise."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.attn = build_attention("mha", AttentionConfig(n_embd=D, n_head=4, block_size=2 * P,
                                                           positions="rope", bias=False))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.wte(idx)
        x = x + self.attn(self.ln(x))
        return self.head(self.ln_f(x))


def copy_loss(model, idx):
    logits = model(idx[:, :-1])  # predict token t+1 from tokens 0..t
    return F.cross_entropy(logits[:, P - 1 :].reshape(-1, V), idx[:, P:].reshape(-1))


torch.manual_seed(2)
model = CopyModel()
init = copy.deepcopy(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for _ in range(120):
    loss = copy_loss(model, copy_batch(32))
    opt.zero_grad()
    loss.backward()
    opt.step()
torch.manual_seed(3)
test = copy_batch(64)
with torch.no_grad():
    full_loss = copy_loss(model, test).item()
assert full_loss < 0.05
print(f"trained: loss on the repeated half < 0.05: {full_loss < 0.05}")

# %% [markdown]
# **Keys and values as a matrix.** For every token of the test batch, the layer's keys and values
# (all heads side by side, before RoPE) are $[W^K; W^V]\,\mathrm{LN}(x)$: a row of $2d = 128$
# numbers, and $64 \cdot 24$ rows. By the Eckart–Young theorem, the best rank-$r$ approximation
# of this matrix comes from its top $r$ singular directions, and its relative error is
# $\sqrt{\sum_{i > r} \sigma_i^2 / \sum_i \sigma_i^2}$. This is exactly the best an MLA-style
# latent of $r$ numbers, fitted to these tokens, could do: the latent is the token's coordinates
# on the top $r$ directions, and the up-projection maps them back.

# %% tags=["nbval-ignore-output"]
def kv_matrix(m):
    with torch.no_grad():
        h = m.ln(m.wte(test))  # (64, 24, D): the layer's normalised input
        return (h @ m.attn.c_attn.weight[D:].T).reshape(-1, 2 * D)  # (1536, 128): k | v


ranks = [2, 4, 8, 16, 24, 32, 48, 64]
errors = {}
for name, m in (("initialisation", init), ("trained", model)):
    s = torch.linalg.svdvals(kv_matrix(m))
    errors[name] = [((s[r_:] ** 2).sum() / (s**2).sum()).sqrt().item() for r_ in ranks]

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, color in (("initialisation", "C7"), ("trained", "C0")):
    ax.plot(ranks, errors[name], "o-", color=color, label=name)
ax.set_xlabel("rank r (numbers per token)")
ax.set_ylabel("relative error of the best rank-r K|V")
ax.set_title("Keys and values of a 4-head MHA layer, d = 64 (128 numbers per token)")
ax.legend()
plt.show()
i16 = ranks.index(16)
assert errors["trained"][i16] < 0.8 * errors["initialisation"][i16]
print(f"relative error at r = 16: initialisation {errors['initialisation'][i16]:.2f}, "
      f"trained {errors['trained'][i16]:.2f}")

# %% [markdown]
# The trained layer's keys and values are markedly closer to low-rank than at initialisation:
# training concentrated them on fewer directions. (They have rank at most 64 anyway, $d$, as the
# chapter's section 2 showed.)
#
# (The exact numbers of this cell and the next depend on a short training run, which can
# differ in the last bits between processors; the cells assert their claims instead.)
#
# **Does the model still work with a latent?** Replace the key and value rows of the layer's
# weight by their projection on the top $r$ directions $U_r$ (orthonormal columns, from the SVD):
# $[W^K; W^V] \to U_r U_r^\top [W^K; W^V]$. Now every token's keys and values are rebuilt from the
# $r$ numbers $U_r^\top [W^K; W^V] \mathrm{LN}(x)$, an MLA layer with $W^{DKV} = U_r^\top [W^K;
# W^V]$ and up-projection $U_r$ (RoPE is applied to the rebuilt keys, so it could not be
# absorbed; converting a trained model into absorbable MLA also needs the decoupled part).

# %% tags=["nbval-ignore-output"]
_, _, Vh = torch.linalg.svd(kv_matrix(model), full_matrices=False)  # rows: directions in K|V
W = model.attn.c_attn.weight.detach()
latent_loss = {}
for r_ in (4, 8, 16, 32, 64):
    projector = Vh[:r_].T @ Vh[:r_]  # (128, 128): onto the top r directions
    compressed = copy.deepcopy(model)
    with torch.no_grad():
        compressed.attn.c_attn.weight[D:] = projector @ W[D:]
        latent_loss[r_] = copy_loss(compressed, test).item()
    print(f"latent of {r_:>2} numbers per token: loss {latent_loss[r_]:.3f}")
assert latent_loss[4] > 1.0 and latent_loss[32] < 0.05
print(f"(full keys and values: loss {full_loss:.3f})")

# %% [markdown]
# With 32 numbers per token (a quarter of the 128 MHA caches) the copy still works; at 16 the
# loss is already clearly higher, and at 4 or 8 the copy fails. For a layer trained without the
# constraint, compressing afterwards costs accuracy quickly; MLA instead trains with the latent
# from the start, so the model learns to put what matters into those $r$ numbers.
#
# ## Exercise 5 — Chunks: where does absorbing stop paying?
#
# **Reasoning.** With the chapter's count, $T$ new tokens on $T_k$ positions (the new ones
# included), the two modes share the projections; the rest is
#
# - naive: $2 T_k r H (d_h + d_v) + 2 H T T_k (d_h + d_R + d_v)$;
# - absorbed: $2 H T r (d_h + d_v) + 2 H T T_k (2r + 2d_R)$ (the weighted sum runs over the
#   concatenated latent and rotary key, see the chapter).
#
# Divide both by $2 H T_k$: naive is cheaper when
# $r(d_h + d_v)(1 - T/T_k) < T\,(2r + d_R - d_h - d_v)$. For a long cache ($T_k \gg T$),
#
# $$ T^* \approx \frac{r (d_h + d_v)}{2r + d_R - d_h - d_v} = \frac{512 \cdot 256}{1024 + 64 - 256}
#    \approx 158 $$
#
# at the sizes of section 7. Below a chunk of about 160 tokens absorbed is cheaper (the cost of
# rebuilding the cache, paid once per chunk, is shared by too few queries); above, naive.

# %%
def mla_flops(d, H, nope, rope, v, r, T, T_k, absorb):
    """Matrix-multiply FLOPs of one MLA layer (batch 1, q_lora_rank=0), T new tokens, T_k keys."""
    flops = 2 * T * d * H * (nope + rope) + 2 * T * d * (r + rope) + 2 * T * H * v * d
    if absorb:
        flops += 2 * H * T * r * (nope + v)  # W_UK into the queries, W_UV on the outputs
        flops += 2 * 2 * H * T * T_k * (r + rope)  # scores, sum of latents (and rotary keys)
    else:
        flops += 2 * T_k * r * H * (nope + v)  # rebuild every position's keys and values
        flops += 2 * H * T * T_k * (nope + rope) + 2 * H * T * T_k * v  # scores, sum of values
    return flops


big = dict(d=512, H=4, nope=128, rope=64, v=128, r=512)
T_k = 8192
crossover = next(T for T in range(1, T_k) if mla_flops(**big, T=T, T_k=T_k, absorb=False)
                 < mla_flops(**big, T=T, T_k=T_k, absorb=True))
approx = 512 * 256 / (2 * 512 + 64 - 256)
exact = 512 * 256 / (2 * 512 + 64 - 256 + 512 * 256 / T_k)  # the finite-T_k version of the inequality
assert crossover == int(exact) + 1 and abs(crossover - approx) < 5
print(f"T_k = {T_k}: naive is cheaper from chunks of {crossover} tokens "
      f"(approximation T* = {approx:.1f}, with the finite cache {exact:.1f})")

# %% [markdown]
# A check of the count itself with PyTorch's counter, at the sizes of section 7: a chunk of 32
# tokens on a cache of 224 positions (so $T_k = 256$), reference path.

# %%
torch.manual_seed(4)
ref = build_attention("mla", AttentionConfig(n_embd=512, n_head=4, positions="rope",
                                             block_size=256, impl="reference")).eval()
xs = torch.randn(1, 256, 512)
for absorb in (False, True):
    ref.absorb = absorb
    cache = ref.new_cache(batch_size=1, max_len=256)
    with torch.no_grad():
        ref(xs[:, :224], cache=cache)
        with FlopCounterMode(display=False) as counter:
            ref(xs[:, 224:], cache=cache)  # the chunk: T = 32, T_k = 256
    assert counter.get_total_flops() == mla_flops(**big, T=32, T_k=256, absorb=absorb)
    print(f"{'absorbed' if absorb else 'naive':>8}: {counter.get_total_flops():,} FLOPs "
          f"= formula")
