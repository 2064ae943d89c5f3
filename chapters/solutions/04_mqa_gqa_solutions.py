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
# # Chapter 4 — Multi-query and grouped-query attention: solutions
#
# Worked solutions to the exercises of `chapters/04_mqa_gqa.ipynb`. Each one states the
# reasoning first, then checks the claim with code and an `assert`. We use the package's
# modules (`GroupedQueryAttention`, `MultiHeadAttention`, ...) rather than the chapter's
# notebook class; the chapter showed that the two agree.

# %%
import torch
import torch.nn.functional as F

from attnbook.attention import (
    AttentionConfig,
    GroupedQueryAttention,
    MultiHeadAttention,
    sdpa_reference,
)

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)


def kv_bytes_per_token(n_layer, n_kv_head, head_dim, bytes_per_elem):
    """KV-cache bytes for one token of one sequence (the chapter's formula)."""
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_elem


# %% [markdown]
# ## Exercise 1 — the cache of a model you choose
#
# LLaMA-2-70B's shape: 80 layers, 64 query heads of size 128 (`n_embd = 8192`), 8 key/value
# heads, bf16 (2 bytes). Per token:
#
# $$2 \cdot 80 \cdot 8 \cdot 128 \cdot 2 = 327{,}680 \text{ bytes} = 320 \text{ KiB}.$$
#
# A batch of 16 sequences of 4096 tokens holds $16 \cdot 4096 = 65{,}536$ tokens:
# $65{,}536 \cdot 320$ KiB $= 20$ GiB. With MHA (64 key/value heads, 8 times as many) it would be
# 2.5 MiB per token and 160 GiB for the batch: more than two 80 GB accelerators could hold,
# for the cache alone.
#
# In 40 GB (decimal gigabytes, $4 \cdot 10^{10}$ bytes) of cache memory, one 4096-token sequence
# takes $4096 \cdot 327{,}680 \approx 1.34$ GB with GQA, so 29 sequences fit; with MHA a
# sequence takes 10.7 GB and only 3 fit. GQA turns "a handful of users" into "a few dozen".
#
# To check the formula we build one attention layer on the meta device, which records shapes and
# dtypes but allocates nothing (its weights would take over 300 MB), cast it to bf16, and run one
# token through its projection. The keys and values it returns, `(1, n_kv_head, 1, head_dim)`
# each, are what a cache stores for that token in that layer; `nbytes` is computed from their
# shape and element size, so it works on the meta device too. Every layer is alike, so the
# model's figure is 80 times one layer's.

# %%
n_layer, n_head, head_dim, bf16 = 80, 64, 128, 2
batch, seq = 16, 4096
per_token = {}
for name, n_kv in (("GQA-8", 8), ("MHA", 64)):
    cfg = AttentionConfig(n_embd=n_head * head_dim, n_head=n_head, bias=False)
    with torch.device("meta"):
        layer = GroupedQueryAttention(cfg, n_kv_head=n_kv).to(torch.bfloat16)
        one_token = torch.empty(1, 1, n_head * head_dim, dtype=torch.bfloat16)  # (B=1, T=1, d)
        _, k, v = layer.project(one_token)  # 2 x (1, n_kv_head, 1, head_dim)
    assert k.shape == v.shape == (1, n_kv, 1, head_dim) and k.dtype == torch.bfloat16
    per_token[name] = n_layer * (k.nbytes + v.nbytes)
    assert per_token[name] == kv_bytes_per_token(n_layer, n_kv, head_dim, bf16)
    batch_gib = batch * seq * per_token[name] / 2**30
    fits = int(40e9 // (seq * per_token[name]))
    print(f"{name:>5}: {per_token[name] // 1024:>5} KiB per token, batch of {batch} x {seq}: "
          f"{batch_gib:g} GiB; 4096-token sequences in 40 GB: {fits}")
assert per_token["GQA-8"] == 320 * 1024 and per_token["MHA"] == 8 * per_token["GQA-8"]
assert int(40e9 // (seq * per_token["GQA-8"])) == 29 and int(40e9 // (seq * per_token["MHA"])) == 3

# %% [markdown]
# ## Exercise 2 — the grouping order matters
#
# **Prediction.** `k.repeat(1, group, 1, 1)` tiles the key/value heads, `kv0, kv1, kv0, kv1, …`,
# so query head `h` reads key/value head `h % n_kv_head` instead of `h // group`. With the same
# weights, most query heads are paired with a different key/value head than the one they were
# trained with, and the output changes. It is not a small numerical difference: it is a
# different model.
#
# We write the tiled version as a function that uses a module's weights and projection, so
# that only the sharing differs.

# %%
def forward_tiled(module, x):
    """GroupedQueryAttention's computation, but with kv heads tiled (h % n_kv) instead of
    repeated in place (h // group)."""
    B, T, d = x.shape
    q, k, v = module.project(x)  # (B, n_head, T, hd), 2 x (B, n_kv_head, T, hd)
    group = module.n_head // module.n_kv_head
    k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)  # (B, n_head, T, hd)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_head, T, hd)
    return module.c_proj(y.transpose(1, 2).reshape(B, T, d))


d, n_head, n_kv = 64, 8, 2
group = n_head // n_kv
torch.manual_seed(0)
gqa = GroupedQueryAttention(AttentionConfig(n_embd=d, n_head=n_head), n_kv_head=n_kv)
x = torch.randn(2, 10, d)
y_module = gqa(x)
y_tiled = forward_tiled(gqa, x)
print("tiled == module with the same weights:", torch.allclose(y_tiled, y_module, atol=1e-5))
assert not torch.allclose(y_tiled, y_module, atol=1e-3)

# %% [markdown]
# **The fix.** Heads have no order of their own ([chapter 3](../03_multi_head_attention.ipynb),
# exercise 2): permuting the query heads, together with the matching column blocks of `c_proj`,
# leaves a layer's output unchanged. So we can move each query head to a slot where the tiled layer
# pairs it with the right key/value head. Tiled slot `p` reads key/value head `p % n_kv`; it should
# hold an original head `h` with `h // group == p % n_kv`. Writing `p = i · n_kv + j`
# (`j = p % n_kv`, `i = p // n_kv`), the original head `h = j · group + i` fits. The keys and values
# stay where they are.

# %%
perm = [(p % n_kv) * group + p // n_kv for p in range(n_head)]  # tiled slot p <- head perm[p]
print("tiled slot p holds original query head:", perm)
assert [perm[p] // group for p in range(n_head)] == [p % n_kv for p in range(n_head)]

hd = d // n_head
rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in perm])  # query rows, head blocks
moved = GroupedQueryAttention(AttentionConfig(n_embd=d, n_head=n_head), n_kv_head=n_kv)
with torch.no_grad():
    moved.load_state_dict(gqa.state_dict())
    moved.c_attn.weight[:d] = gqa.c_attn.weight[:d][rows]  # query rows only
    moved.c_attn.bias[:d] = gqa.c_attn.bias[:d][rows]
    moved.c_proj.weight[:] = gqa.c_proj.weight[:, rows]  # columns read the heads' outputs
print("tiled, with permuted query heads == module:",
      torch.allclose(forward_tiled(moved, x), y_module, atol=1e-5))
assert torch.allclose(forward_tiled(moved, x), y_module, atol=1e-5)

# %% [markdown]
# **Why MHA and MQA do not care.** With `n_kv_head = n_head` the group size is 1 and
# `h // 1 = h % n_head = h`; with `n_kv_head = 1`, `h // n_head = h % 1 = 0`. Both conventions
# give the same pairing, so the bug only appears for true GQA, which is what makes it easy to
# miss: a test suite that checks only the MHA and MQA corner cases passes.

# %%
for n_kv_test in (n_head, 1):
    g = n_head // n_kv_test
    same = [h // g for h in range(n_head)] == [h % n_kv_test for h in range(n_head)]
    torch.manual_seed(1)
    layer = GroupedQueryAttention(AttentionConfig(n_embd=d, n_head=n_head), n_kv_head=n_kv_test)
    assert same and torch.allclose(forward_tiled(layer, x), layer(x), atol=1e-5)
    print(f"n_kv_head={n_kv_test}: the two conventions agree: {same}")

# %% [markdown]
# ## Exercise 3 — parameters saved vs cache saved
#
# Per layer, with `d = 4096`, `head_dim = 128` and no biases: the query and output projections
# are $d^2$ each whatever the variant, the key and value projections are
# $d \cdot n_\text{kv\_head} \cdot \text{head\_dim}$ each. The SwiGLU MLP has $3 \cdot d \cdot
# 11008$ and the embeddings $2 \cdot 32000 \cdot d$ (input and output). So the attention
# shrinks from $4d^2$ (67 M) to $2.5d^2$ with 8 key/value heads and to about $2.06d^2$ with 1,
# but the MLP (135 M per layer) and the embeddings do not change.
#
# **Prediction.** GQA-8 removes 75% of the cache but only about 12% of the parameters; MQA
# removes about 97% of the cache and about 15% of the parameters.

# %%
d_7b, n_head_7b, hd_7b, n_layer_7b, mlp_7b, vocab_7b = 4096, 32, 128, 32, 11008, 32000


def attention_params(n_kv_7b):
    return 2 * d_7b * d_7b + 2 * d_7b * n_kv_7b * hd_7b  # q and output, k and v


def model_params(n_kv_7b, mlp_hidden=mlp_7b):
    per_layer = attention_params(n_kv_7b) + 3 * d_7b * mlp_hidden
    return n_layer_7b * per_layer + 2 * vocab_7b * d_7b


for n_kv_7b in (32, 8, 1):  # the formula against the module, built on the meta device
    cfg = AttentionConfig(n_embd=d_7b, n_head=n_head_7b, bias=False)
    with torch.device("meta"):
        layer = GroupedQueryAttention(cfg, n_kv_head=n_kv_7b)
        counted = sum(p.numel() for p in layer.parameters())
    assert counted == attention_params(n_kv_7b), (n_kv_7b, counted)

print(f"{'variant':>7} {'attention/layer':>16} {'model':>8} {'params saved':>13} {'cache saved':>12}")
for name, n_kv_7b in (("MHA", 32), ("GQA-8", 8), ("MQA", 1)):
    params_saved = 1 - model_params(n_kv_7b) / model_params(32)
    cache_saved = 1 - n_kv_7b / 32
    print(f"{name:>7} {attention_params(n_kv_7b) / 1e6:>14.1f} M {model_params(n_kv_7b) / 1e9:>6.2f} B "
          f"{100 * params_saved:>12.1f}% {100 * cache_saved:>11.1f}%")
assert 0.11 < 1 - model_params(8) / model_params(32) < 0.13
assert 0.15 < 1 - model_params(1) / model_params(32) < 0.16
mistral_like = model_params(8, 14336)
print(f"GQA-8 with Mistral 7B's MLP width (14336): {mistral_like / 1e9:.2f} B parameters "
      f"(MHA with width 11008: {model_params(32) / 1e9:.2f} B)")
assert mistral_like - model_params(8) > model_params(32) - model_params(8)  # adds more than saved

# %% [markdown]
# The cache falls in proportion to the number of key/value heads; the parameters barely move,
# because most of them are in the MLP and the embeddings. So GQA hardly changes the size of the
# model: whatever quality it gives up comes from the sharing itself, and in exchange it removes
# most of the cache. Mistral 7B, with 8 key/value heads, does not just spend the saved
# parameters elsewhere: its MLP of width 14336 adds far more than GQA saved (about 1.3 billion
# against 0.8 billion), so the same shape has 7.24 billion parameters, half a billion more
# than the MHA model's 6.74 billion. It keeps the small cache and still grows.

# %% [markdown]
# ## Exercise 4 — when is conversion lossless?
#
# We need the chapter's conversion again: it averages (or keeps the first of) the key rows and
# the value rows of each group in the fused `c_attn` weight and bias, and copies everything
# else.

# %%
def pool_kv_rows(t, n_head, n_kv_head, how="mean"):
    """An MHA c_attn weight (3d, d) or bias (3d,) -> the GQA one (d + 2 * n_kv_head * hd, ...)."""
    n_embd = t.shape[0] // 3
    hd, group = n_embd // n_head, n_head // n_kv_head
    q, k, v = t.split(n_embd, dim=0)

    def pool(rows):
        rows = rows.reshape(n_kv_head, group, hd, *rows.shape[1:])  # head h at (h // g, h % g)
        rows = rows.mean(dim=1) if how == "mean" else rows[:, 0]
        return rows.reshape(n_kv_head * hd, *rows.shape[2:])

    return torch.cat([q, pool(k), pool(v)], dim=0)


def convert(mha, n_kv_head, how="mean"):
    cfg = AttentionConfig(n_embd=mha.config.n_embd, n_head=mha.n_head)
    gqa = GroupedQueryAttention(cfg, n_kv_head=n_kv_head)
    gqa.load_state_dict({name: pool_kv_rows(t, mha.n_head, n_kv_head, how) if "c_attn" in name
                         else t for name, t in mha.state_dict().items()})
    return gqa


# %% [markdown]
# **(a) Heads that are already shared.** If the key rows (and bias) of every head in a group
# are identical, and likewise the value rows, then the mean of the group is that same head,
# and so is its first head. The converted layer gives every query head exactly the keys and
# values it had before, so both conversions leave the output unchanged (up to rounding). An
# MHA layer like this *is* a GQA layer that stores its shared heads several times.

# %%
torch.manual_seed(0)
mha = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=n_head))
with torch.no_grad():
    for part in (1, 2):  # 1: key rows, 2: value rows, in c_attn's q | k | v layout
        for h in range(n_head):
            leader = (h // group) * group  # first head of h's group
            dst = slice(part * d + h * hd, part * d + (h + 1) * hd)
            src = slice(part * d + leader * hd, part * d + (leader + 1) * hd)
            mha.c_attn.weight[dst] = mha.c_attn.weight[src]
            mha.c_attn.bias[dst] = mha.c_attn.bias[src]
y_mha = mha(x)
for how in ("mean", "first"):
    same = torch.allclose(convert(mha, n_kv, how)(x), y_mha, atol=1e-5)
    print(f"shared K/V within groups, {how}-conversion leaves the output unchanged: {same}")
    assert same

# %% [markdown]
# **(b) What does a mean-pooled head compute in general?** For query head `h` in group `j`, the
# original layer computes $\mathrm{softmax}(q_h K_h^\top/\sqrt{d_h})\,V_h$ and the converted one
# $\mathrm{softmax}(q_h \bar K_j^\top/\sqrt{d_h})\,\bar V_j$, where $\bar K_j$ and $\bar V_j$ are
# the averages of the group's keys and values. The values enter linearly: *with the same
# attention weights*, $A\bar V_j$ is the average over the group of $A V_{h'}$. But the weights
# are not the same: a softmax of averaged scores is not an average of softmaxes, and query head
# `h` now scores against keys it was not trained with. So the converted head's output is
# **not** the average of the group's original outputs, nor head `h`'s original output.
#
# One case where it is exactly the average: if every head attends uniformly (zero queries, so
# all scores are 0 and every causal row averages the past), then the weights are the same for
# every head and key, and only the linear values matter. We check both statements on the
# per-head outputs (before `c_proj`), computed with the module's own projection.

# %%
def head_outputs(module, x):
    """Per-head attention outputs (B, n_head, T, hd), before the heads are merged."""
    q, k, v = module.project(x)
    return sdpa_reference(q, k, v, is_causal=True, enable_gqa=module.n_kv_head != module.n_head)


def group_average(y):
    """(B, n_head, T, hd) -> each head replaced by the mean of its group's heads."""
    B, H, T, hd = y.shape
    means = y.view(B, H // group, group, T, hd).mean(dim=2, keepdim=True)
    return means.expand(B, H // group, group, T, hd).reshape(B, H, T, hd)


torch.manual_seed(1)
mha = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=n_head))  # a generic random layer
y_orig, y_conv = head_outputs(mha, x), head_outputs(convert(mha, n_kv), x)
general = torch.allclose(y_conv, group_average(y_orig), atol=1e-4)
print("generic layer: converted head outputs == group averages of the originals:", general)
assert not general and not torch.allclose(y_conv, y_orig, atol=1e-4)

with torch.no_grad():
    mha.c_attn.weight[:d] = 0.0  # zero queries: every score is 0, attention is uniform
    mha.c_attn.bias[:d] = 0.0
y_orig, y_conv = head_outputs(mha, x), head_outputs(convert(mha, n_kv), x)
uniform = torch.allclose(y_conv, group_average(y_orig), atol=1e-5)
print("uniform attention: converted head outputs == group averages of the originals:", uniform)
assert uniform

# %% [markdown]
# So, with the attention pattern unchanged, mean-pooling the values gives exactly the average
# of the group's outputs. Even that loses something, since four heads' different values become
# one, and with trained queries the pattern changes too, because the queries now meet averaged
# keys. Both losses are what the further training of the chapter's experiment has to repair.
