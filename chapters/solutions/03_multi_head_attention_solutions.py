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
# # Chapter 3 — Multi-head attention: solutions
#
# Worked solutions to the exercises of `chapters/03_multi_head_attention.ipynb`. Each one
# states the reasoning first, then checks the claim with code and an `assert`.

# %%
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnbook.attention import (
    AttentionConfig,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    sdpa_reference,
)

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## Exercise 1 — where does the time go?
#
# Count multiply-adds and double them. With `N = B·T` tokens:
#
# - `c_attn` maps `d → 3d` for every token: $2 \cdot N \cdot d \cdot 3d = 6BTd^2$.
# - `c_proj` maps `d → d`: $2BTd^2$. Projections together: $8BTd^2$.
# - Scores $QK^\top$: per batch element and head, a `(T, hd) @ (hd, T)` product,
#   $2T^2 \cdot hd$ FLOPs; over `n_head` heads that is $2BT^2d$, because
#   `n_head · hd = d`. The weighted sum of values, `(T, T) @ (T, hd)`, costs the same.
#   Attention step together: $4BT^2d$.
#
# They are equal when $4BT^2d = 8BTd^2$, that is at $T = 2d$. Neither `B` nor `n_head`
# appears: splitting `d` into more, narrower heads leaves every count unchanged. For GPT-2
# small ($d = 768$) the crossover is $T = 1536$, longer than its 1024-token context, so in
# GPT-2 small the projections (and the MLP, which is bigger still) dominate the arithmetic.
# A causal kernel that skips the masked half moves the crossover to about $4d$.
#
# We check the formula with PyTorch's `FlopCounterMode`, which counts the FLOPs of every
# matrix product it sees, and reports them by operation with `get_flop_counts()`. In our
# module the two `Linear` layers run as `addmm` (a matrix product plus the bias) and the
# attention's two products as `bmm` (batched matrix products), so the split by operation is
# exactly the split between projections and attention. We use `impl="reference"`, where the
# attention products are plain matrix products. With the default `impl="sdpa"` the counter
# sees only the projections (in torch 2.13, the version the book pins, it does not see inside
# the fused CPU SDPA kernel): the first line below shows it.

# %%
def flops_formula(B, T, d):
    return {"projections": 8 * B * T * d**2, "attention": 4 * B * T**2 * d}


def flops_counted(module, B, T):
    """FLOPs of one forward pass, split by operation: addmm = projections, bmm = attention."""
    x = torch.randn(B, T, module.config.n_embd)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    parts = {"projections": by_op.pop("aten.addmm", 0), "attention": by_op.pop("aten.bmm", 0)}
    assert not by_op, f"operations we did not expect: {by_op}"
    return parts


d = 64
Ts = [16, 32, 64, 128, 256, 512]
sdpa_module = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=4))  # impl="sdpa"
print("impl='sdpa', B=2, T=128, counted:", flops_counted(sdpa_module, 2, 128))
print("                         formula:", flops_formula(2, 128, d))
assert flops_counted(sdpa_module, 2, 128)["attention"] == 0  # the fused kernel is invisible

for n_head in (1, 4, 16):
    module = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=n_head, impl="reference"))
    for T in Ts:
        assert flops_counted(module, 2, T) == flops_formula(2, T, d), (n_head, T)
print(f"impl='reference': formula == FlopCounterMode for d={d}, n_head in (1, 4, 16), T in {Ts}")

# %% [markdown]
# Now the crossover, read off the counter (not the formula): for each `T`, the counted
# attention FLOPs against the counted projection FLOPs, for one sequence.

# %%
module = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=4, impl="reference"))
parts = {T: flops_counted(module, 1, T) for T in Ts}
crossover = next(T for T in Ts if parts[T]["attention"] >= parts[T]["projections"])
print("first T where counted attention >= counted projections:", crossover)
print("predicted: T = 2d =", 2 * d)
assert crossover == 2 * d

fig, ax = plt.subplots(figsize=(6, 3.5))
for name in ("projections", "attention"):
    ax.loglog(Ts, [parts[T][name] for T in Ts], "o-", label=name)
ax.axvline(2 * d, color="gray", linestyle="--", label="T = 2d")
ax.set_xticks(Ts, [str(T) for T in Ts])
ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
ax.set_xlabel("sequence length T")
ax.set_ylabel("FLOPs per sequence")
ax.set_title(f"multi-head attention FLOPs (counted), d={d}, 4 heads")
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise 2 — heads have no order
#
# **Prediction.** Each head computes its output from its own q, k and v blocks only, and the
# concatenation just places the outputs side by side. If we reorder the heads, head `h`'s
# output lands in a different slice of the concatenation; `c_proj` then reads it with
# different columns. Reordering the columns of `c_proj.weight` (its inputs) in the same way
# puts every head back with the weights that used to read it, so the output is unchanged.
# Reordering `c_attn` alone feeds each head's output into columns meant for another head: the
# output changes.
#
# The rows of `c_attn.weight` are `(3, n_head, head_dim)` stacked (part, head, feature), and
# the columns of `c_proj.weight` are `(n_head, head_dim)` stacked, so a reshape exposes the
# head axis and we index it with the permutation.

# %%
def permute_heads(module, perm, permute_proj=True):
    nh, hd = module.n_head, module.head_dim
    d = nh * hd
    out = MultiHeadAttention(module.config)
    out.load_state_dict(module.state_dict())
    with torch.no_grad():
        W = module.c_attn.weight.view(3, nh, hd, d)[:, perm]  # (3, nh, hd, d), heads reordered
        out.c_attn.weight.copy_(W.reshape(3 * d, d))
        b = module.c_attn.bias.view(3, nh, hd)[:, perm]  # (3, nh, hd)
        out.c_attn.bias.copy_(b.reshape(3 * d))
        if permute_proj:
            P = module.c_proj.weight.view(d, nh, hd)[:, perm]  # (d_out, nh, hd): input columns
            out.c_proj.weight.copy_(P.reshape(d, d))
    return out


torch.manual_seed(0)
mha = MultiHeadAttention(AttentionConfig(n_embd=32, n_head=4))
x = torch.randn(2, 10, 32)
perm = torch.tensor([2, 0, 3, 1])
y = mha(x)
y_both = permute_heads(mha, perm)(x)
y_attn_only = permute_heads(mha, perm, permute_proj=False)(x)
print("permute c_attn and c_proj: unchanged =", torch.allclose(y, y_both, atol=1e-5))
print("permute c_attn only:       unchanged =", torch.allclose(y, y_attn_only, atol=1e-5))
assert torch.allclose(y, y_both, atol=1e-5)
assert not torch.allclose(y, y_attn_only, atol=1e-3)

# %% [markdown]
# So a trained model has `n_head!` equivalent ways of writing the same layer. "Head 3" is a
# label, not a property: two models trained from different seeds cannot be compared head by
# head without first matching the heads up.

# %% [markdown]
# ## Exercise 3 — padding
#
# Without a mask, the short sequence's real positions would attend to the pad positions too
# (their embeddings are whatever sits in the padding), and their outputs would change. The key
# padding mask from `padding_mask(lengths, T)` has shape `(B, T)` and says which *keys* are
# real (`True` = may attend, attnbook's orientation). The scores have shape
# `(B, n_head, T_q, T_k)`, so we index it `[:, None, None, :]`: the same key mask for every
# head and every query.

# %%
torch.manual_seed(0)
T, d = 10, 32
lengths = torch.tensor([6, 10])
cfg = AttentionConfig(n_embd=d, n_head=4, causal=False)  # an encoder-style layer
enc = MultiHeadAttention(cfg)
x = torch.randn(2, T, d)
x[0, 6:] = 100.0  # garbage in the padding, to make any leak obvious
keys_ok = padding_mask(lengths, T)  # (B, T), True at real tokens
print(keys_ok.int())

y_masked = enc(x, attn_mask=keys_ok[:, None, None, :])  # (B, T, d)
y_alone = enc(x[:1, :6])  # the short sequence by itself, unpadded
y_nomask = enc(x)
print("masked, real positions == alone:  ", torch.allclose(y_masked[0, :6], y_alone[0], atol=1e-5))
print("unmasked, real positions == alone:", torch.allclose(y_nomask[0, :6], y_alone[0], atol=1e-5))
assert torch.allclose(y_masked[0, :6], y_alone[0], atol=1e-5)
assert not torch.allclose(y_nomask[0, :6], y_alone[0], atol=1e-3)

# %% [markdown]
# `nn.MultiheadAttention` takes the same information as `key_padding_mask` of shape `(B, T)`,
# but again with `True` = *ignore this key*: we pass `~keys_ok`. With weights copied, it
# agrees with our module at every position, pads included (a pad query may still attend to
# the real keys, so it gets a finite, meaningless output that later layers must ignore).

# %%
mha_torch = nn.MultiheadAttention(d, 4, batch_first=True)
with torch.no_grad():
    mha_torch.in_proj_weight.copy_(enc.c_attn.weight)
    mha_torch.in_proj_bias.copy_(enc.c_attn.bias)
    mha_torch.out_proj.weight.copy_(enc.c_proj.weight)
    mha_torch.out_proj.bias.copy_(enc.c_proj.bias)
y_torch, _ = mha_torch(x, x, x, key_padding_mask=~keys_ok, need_weights=False)
print("attnbook == nn.MultiheadAttention (key_padding_mask=~mask):", torch.allclose(y_masked, y_torch, atol=1e-5))
assert torch.allclose(y_masked, y_torch, atol=1e-5)

# %% [markdown]
# **Does a causal module need the mask for right padding?** No, not for the real positions.
# With right padding every pad comes *after* the last real token, and the causal mask already
# hides every later key from every query. The pads can only be seen by other pads, whose
# outputs nobody should use (the loss must ignore them). Left padding is different: there the
# pads come first and the causal mask does not hide them.

# %%
dec = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=4, causal=True))
dec.load_state_dict(enc.state_dict())
y_causal = dec(x)
y_causal_masked = dec(x, attn_mask=keys_ok[:, None, None, :])
same = torch.allclose(y_causal[0, :6], y_causal_masked[0, :6], atol=1e-5)
print("causal, right padding: real positions same with or without the mask:", same)
assert same and torch.allclose(y_causal[0, :6], dec(x[:1, :6])[0], atol=1e-5)

# %% [markdown]
# ## Exercise 4 — per-head maps
#
# With `need_weights=True` the module runs the reference path and returns the weights of
# every head. Right after initialisation the heads attend almost uniformly, so to get maps
# with some contrast we scale up the query and key weights (the first 2d rows of `c_attn`).

# %%
torch.manual_seed(0)
T, d, n_head = 8, 32, 4
m = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=n_head))
with torch.no_grad():
    m.c_attn.weight[: 2 * d] *= 4.0  # sharper q·k scores, for visible maps
x = torch.randn(1, T, d)
y, w = m(x, need_weights=True)
print("output:", tuple(y.shape), " weights:", tuple(w.shape))

fig, axes = plt.subplots(1, n_head, figsize=(13, 3.4))
for h, ax in enumerate(axes):
    im = ax.imshow(w[0, h].detach(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"head {h}")
    ax.set_xticks(range(T))  # label every position, 0 .. T-1
    ax.set_yticks(range(T))
    ax.set_xlabel("key")
axes[0].set_ylabel("query")
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
plt.show()

# %% [markdown]
# Three checks: each row is a probability distribution; nothing above the diagonal (no query
# sees the future); and PyTorch's default `need_weights` output (`average_attn_weights=True`)
# is the mean of our per-head maps, while `average_attn_weights=False` gives them one by one.

# %%
rows_sum_to_one = torch.allclose(w.sum(dim=-1), torch.ones(1, n_head, T), atol=1e-5)
nothing_above = bool((w[..., ~causal_mask(T)] == 0).all())

mt = nn.MultiheadAttention(d, n_head, batch_first=True)
with torch.no_grad():
    mt.in_proj_weight.copy_(m.c_attn.weight)
    mt.in_proj_bias.copy_(m.c_attn.bias)
    mt.out_proj.weight.copy_(m.c_proj.weight)
    mt.out_proj.bias.copy_(m.c_proj.bias)
_, w_avg = mt(x, x, x, attn_mask=~causal_mask(T))  # (1, T, T), averaged over heads
_, w_heads = mt(x, x, x, attn_mask=~causal_mask(T), average_attn_weights=False)  # (1, nh, T, T)
print("rows sum to 1:", rows_sum_to_one, " nothing above the diagonal:", nothing_above)
print("torch's averaged weights == mean of ours:", torch.allclose(w_avg, w.mean(dim=1), atol=1e-5))
print("torch's per-head weights == ours:       ", torch.allclose(w_heads, w, atol=1e-5))
assert rows_sum_to_one and nothing_above
assert torch.allclose(w_avg, w.mean(dim=1), atol=1e-5) and torch.allclose(w_heads, w, atol=1e-5)

# %% [markdown]
# ## Exercise 5 — find the bug
#
# **What the bug does.** After `split`, q has shape `(B, T, d)` and is stored position by
# position. `reshape(B, n_head, T, head_dim)` cuts each batch element's `T·d` numbers into
# `T·n_head` chunks of `head_dim` numbers *in memory order* and deals them out: chunks 0 to
# T-1 become "head 0", rows 0 to T-1; the next T chunks become "head 1"; and so on. Chunk `c`
# holds position `c // n_head`. So "row t of head h" holds (part of) position
# `(h·T + t) // n_head`, not position t. The causal mask, which acts on rows, no longer
# matches positions; and the correct merge then puts row t of head h back at position t.
# Position 0's output, for instance, receives head `n_head-1`'s row 0, which comes from position
# `(n_head-1)·T // n_head` — the future.
#
# `view` would have refused: after `split` the three slices are not contiguous (each row of q
# is followed in memory by that row's k and v), and a view cannot regroup `(T, d)` into
# `(n_head, T, head_dim)` across those gaps. `reshape` quietly copies and carries on.
#
# **Tests that catch it.** (a) Agreement with a trusted implementation (the list of heads, or
# `nn.MultiheadAttention`); (b) causality: change the last token and watch earlier outputs.
# We write the faulty forward pass out, with a switch for the second variant (no transpose in
# the merge either).

# %%
def forward_with_bug(m, x, merge_bug=False):
    B, T, d = x.shape
    nh, hd = m.n_head, m.head_dim
    q, k, v = m.c_attn(x).split(d, dim=2)  # 3 x (B, T, d)
    q, k, v = (t.reshape(B, nh, T, hd) for t in (q, k, v))  # BUG: no transpose
    y = sdpa_reference(q, k, v, is_causal=True)  # (B, nh, T, hd)
    if merge_bug:
        y = y.reshape(B, T, d)  # BUG: no transpose here either
    else:
        y = y.transpose(1, 2).contiguous().view(B, T, d)  # the correct merge
    return m.c_proj(y)


def is_causal_layer(fn, x):
    x2 = x.clone()
    x2[:, -1] = torch.randn(x.shape[0], x.shape[-1])
    return torch.allclose(fn(x)[:, :-1], fn(x2)[:, :-1], atol=1e-5)


torch.manual_seed(0)
m = MultiHeadAttention(AttentionConfig(n_embd=32, n_head=4))
x = torch.randn(2, 12, 32)
right = m(x)
for merge_bug in (False, True):
    wrong = forward_with_bug(m, x, merge_bug=merge_bug)
    print(
        f"merge_bug={merge_bug!s:5}  agrees with the module: {torch.allclose(wrong, right, atol=1e-4)!s:5}",
        f" causal: {is_causal_layer(lambda z, mb=merge_bug: forward_with_bug(m, z, mb), x)}",
    )
assert is_causal_layer(m, x)
assert not torch.allclose(forward_with_bug(m, x), right, atol=1e-4)
assert not is_causal_layer(lambda z: forward_with_bug(m, z), x)
assert not torch.allclose(forward_with_bug(m, x, merge_bug=True), right, atol=1e-4)
assert is_causal_layer(lambda z: forward_with_bug(m, z, merge_bug=True), x)

# %% [markdown]
# The second variant is the sneakier one: it **is** causal. With both reshapes the same, the
# layer treats the `T·n_head` chunks of each sequence as one long sequence, cut into
# `n_head` segments of length `T`. A chunk attends to earlier chunks of its own segment, and
# chunk order follows position order, so nothing from the future leaks. It is still a
# different (and worse) layer: a query chunk is scored against key chunks from *other* feature
# blocks, and a position in a late segment can never see the early positions. A causality
# test passes; only the comparison with a trusted reference catches it. That is why
# [chapter 3](../03_multi_head_attention.ipynb) checks equality with the list of heads and with
# `nn.MultiheadAttention`, not just shapes and causality.
