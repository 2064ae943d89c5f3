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
# # Chapter 2 — Solutions to the exercises
#
# Worked solutions for the exercises of `chapters/02_scaled_dot_product_attention.ipynb`. Each
# one states the reasoning first, then runs the code and checks the claim with an `assert`.
#
# ## Setup: the chapter's toy sentence
#
# We rebuild the chapter's six-word sentence with the same seed and the same order of random
# draws, so the numbers match the chapter. For the attention itself we use the module the
# chapter ends in, `attnbook.attention.sdpa_reference`, which can return the weights.

# %%
import math

import matplotlib.pyplot as plt
import torch

from attnbook.attention import causal_mask, sdpa_reference

torch.manual_seed(0)
torch.set_printoptions(precision=2, sci_mode=False)

vocab = ["the", "cat", "ate", "and", "it", "slept", "dog", "barked", "<pad>"]
features = torch.tensor(
    [
        # thing action glue pronoun
        [0.0, 0.0, 1.0, 0.0],  # the
        [1.0, 0.0, 0.0, 0.0],  # cat
        [0.0, 1.0, 0.0, 0.0],  # ate
        [0.0, 0.0, 1.0, 0.0],  # and
        [0.3, 0.0, 0.0, 1.0],  # it
        [0.0, 1.0, 0.0, 0.0],  # slept
        [1.0, 0.0, 0.0, 0.0],  # dog
        [0.0, 1.0, 0.0, 0.0],  # barked
        [0.0, 0.0, 0.0, 0.0],  # <pad>
    ]
)
embedding = features + 0.1 * torch.randn(features.shape)  # (vocab, n_embd)
n_embd, d = 4, 4
W_q = 0.3 * torch.randn(n_embd, d)
W_k = 0.3 * torch.randn(n_embd, d)
W_v = torch.randn(n_embd, d)
W_q[3, 0] += 3.0  # pronoun -> "looking for a thing"
W_k[0, 0] += 3.0  # thing   -> "I am a thing"


def qkv(words):
    """Queries, keys and values, each (T, d), of a list of words."""
    x = embedding[torch.tensor([vocab.index(w) for w in words])]  # (T, n_embd)
    return x @ W_q, x @ W_k, x @ W_v


sentence = "the cat ate and it slept".split()
Q, K, V = qkv(sentence)
T = len(sentence)
_, weights = sdpa_reference(Q, K, V, return_weights=True)
print("weight of it -> cat, as in the chapter:", round(weights[4, 1].item(), 3))

# %% [markdown]
# ## Exercise 1 — scale as a temperature
#
# **Prediction.** The weights are $\operatorname{softmax}(\text{scale} \cdot s)$ for the raw
# scores $s = q \cdot k$.
#
# - As `scale → 0`, every scaled score goes to 0, whatever $s$ was, and $\operatorname{softmax}$
#   of a row of equal numbers is uniform: every weight is $1/T$, and each output is the plain
#   **average of all values**, the same for every query. Attention stops depending on the query.
# - As `scale → ∞`, the gap between the largest score in a row and any other becomes infinite,
#   so the largest gets weight 1 and the rest 0: a **hard lookup** that copies the value of the
#   best-matching key (an argmax). That is the saturated regime of the chapter's $\sqrt{d}$
#   section, where gradients vanish.
#
# `scale` plays the role of an inverse temperature; $1/\sqrt{d}$ is the choice that keeps the
# softmax between those extremes whatever $d$ is.

# %%
out_cold, w_cold = sdpa_reference(Q, K, V, scale=1e-6, return_weights=True)
out_hot, w_hot = sdpa_reference(Q, K, V, scale=1e6, return_weights=True)
print("scale=1e-6, weights:")
print(w_cold)
print("scale=1e6, weights:")
print(w_hot)

best = (Q @ K.T).argmax(dim=-1)  # (T,) the key with the highest raw score, per query
print("argmax key per query:", [sentence[j] for j in best.tolist()])

assert torch.allclose(w_cold, torch.full((T, T), 1 / T), atol=1e-5)
assert torch.allclose(out_cold, V.mean(dim=0).expand(T, d), atol=1e-5)
assert torch.equal(w_hot, torch.nn.functional.one_hot(best, T).float())
assert torch.allclose(out_hot, V[best], atol=1e-5)
print("scale -> 0: uniform weights, output = mean of V:", True)
print("scale -> inf: one-hot weights, output = V[argmax of q.k]:", True)

# %% [markdown]
# With a causal mask the same limits hold, restricted to the allowed keys: at `scale → 0` query
# $i$ outputs the mean of $v_0 \ldots v_i$ (a running average), which is a handy sanity check.

# %%
out_cold_c = sdpa_reference(Q, K, V, is_causal=True, scale=1e-6)
running_mean = V.cumsum(dim=0) / torch.arange(1, T + 1)[:, None]  # (T, d)
assert torch.allclose(out_cold_c, running_mean, atol=1e-5)
print("causal, scale -> 0: output = running mean of the values:", True)

# %% [markdown]
# ## Exercise 2 — softmax is shift-invariant, and why implementations subtract the max
#
# **Proof.** For any constant $c$,
#
# $$\operatorname{softmax}(s + c)_i = \frac{e^{s_i + c}}{\sum_j e^{s_j + c}}
#   = \frac{e^{c}\, e^{s_i}}{e^{c} \sum_j e^{s_j}} = \operatorname{softmax}(s)_i ,$$
#
# because the common factor $e^c$ cancels. So we are free to pick $c$. The formula itself is
# fragile in floating point: `exp` of a float32 number above about 88.7 overflows to `inf`, and
# `inf / inf` is NaN. Scores like 1000 are unusual but not impossible (large logits, unscaled
# dot products, big additive biases). Choosing $c = -\max_j s_j$ makes the largest exponent
# $e^0 = 1$ and all others at most 1: nothing overflows, and the denominator is at least 1.

# %%
s = torch.tensor([1.0, 2.0, 3.0])
print("softmax(s)      :", torch.softmax(s, dim=-1))
print("softmax(s + 100):", torch.softmax(s + 100, dim=-1))
assert torch.allclose(torch.softmax(s, dim=-1), torch.softmax(s + 100, dim=-1))

big = torch.tensor([1000.0, 999.0, 998.0])
naive = big.exp() / big.exp().sum()
print("exp(big):", big.exp())
print("naive softmax of [1000, 999, 998]:", naive)
shifted = (big - big.max()).exp()
print("after subtracting the max:", shifted / shifted.sum())
assert naive.isnan().all()

# %% [markdown]
# A stable softmax that also handles a row of all `-inf` the way the chapter's `attention`
# does (zero weights). Two details: if the row maximum is `-inf`, subtracting it would compute
# `-inf - (-inf) = NaN`, so we subtract 0 instead; then every exponential is 0, and dividing by
# the sum clamped away from zero gives 0 rather than 0/0.


# %%
def stable_softmax(s, dim=-1):
    """softmax along dim, overflow-free; a row of all -inf gives all zeros."""
    m = s.amax(dim=dim, keepdim=True)
    m = torch.where(m.isneginf(), torch.zeros_like(m), m)  # an all -inf row: subtract nothing
    e = (s - m).exp()  # every entry in [0, 1]
    return e / e.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


rows = torch.tensor(
    [
        [1000.0, 999.0, 998.0],
        [1.0, 2.0, float("-inf")],
        [float("-inf")] * 3,
    ]
)
print(stable_softmax(rows))
torch.manual_seed(1)
r = 5 * torch.randn(4, 7)
assert torch.allclose(stable_softmax(r), torch.softmax(r, dim=-1), atol=1e-7)
assert torch.allclose(stable_softmax(rows[:2]), torch.softmax(rows[:2], dim=-1))
assert torch.equal(stable_softmax(rows[2:]), torch.zeros(1, 3))
print("matches torch.softmax on ordinary rows, no overflow, zeros for an all -inf row:", True)

# %% [markdown]
# ## Exercise 3 — a local window of three tokens
#
# Query $i$ may attend to key $j$ when $i - 2 \le j \le i$. Both halves are triangles:
#
# - $j \le i$ is the causal lower triangle, `ones.tril()`;
# - $j \ge i - 2$ is the *complement* of $j \le i - 3$, which is `ones.tril(diagonal=-3)`.
#
# So the window is `tril() & ~tril(-3)`: the causal triangle with everything three or more
# steps back cut away, leaving a band of width 3 on and below the diagonal.

# %%
ones = torch.ones(T, T, dtype=torch.bool)
window = ones.tril() & ~ones.tril(diagonal=-3)  # (T, T)
print(window.int())

i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
assert torch.equal(window, (j <= i) & (j >= i - 2))
print("equals the index rule i-2 <= j <= i:", True)

# %%
out_w, w_w = sdpa_reference(Q, K, V, attn_mask=window, return_weights=True)
print(w_w)
nonzero_per_row = (w_w > 0).sum(dim=-1)
print("non-zero weights per row:", nonzero_per_row.tolist())
assert (nonzero_per_row <= 3).all() and torch.equal(nonzero_per_row, window.sum(-1))
assert torch.allclose(w_w.sum(-1), torch.ones(T))

# %%
fig, ax = plt.subplots(figsize=(4.2, 3.8), layout="constrained")
ax.imshow(window.float(), cmap="Blues", vmin=0, vmax=1)
ax.set_xticks(range(T), sentence, rotation=45, ha="right")
ax.set_yticks(range(T), sentence)
ax.set_xticks([c - 0.5 for c in range(1, T)], minor=True)  # light lines between the cells
ax.set_yticks([r - 0.5 for r in range(1, T)], minor=True)
ax.grid(which="minor", color="lightgray", linewidth=0.6)
ax.tick_params(which="minor", length=0)
ax.set_xlabel("key (attended to)")
ax.set_ylabel("query (attending)")
ax.set_title("window of 3: itself and 2 before\n(dark = may attend, white = masked)", fontsize=10)
plt.show()

# %% [markdown]
# *It* (row 4) can no longer reach *cat* (three steps back), so its strong "pronoun → thing"
# match is gone and its weights are spread over *ate*, *and*, *it*. A window trades reach for
# cost; stacking windowed layers widens the reach again, which is part of
# [chapter 9](../09_sliding_window.ipynb).

# %%
print(
    "it -> cat weight, full causal:",
    round(sdpa_reference(Q, K, V, is_causal=True, return_weights=True)[1][4, 1].item(), 2),
)
print("it -> cat weight, window of 3:", round(w_w[4, 1].item(), 2))
assert w_w[4, 1] == 0

# %% [markdown]
# ## Exercise 4 — without a causal mask, the future leaks
#
# **Prediction.** Without a mask, every query attends to every key, including the last one, so
# changing the last word changes the key and value at position 5 and with them *every* output.
# With the causal mask, only query 5 may see position 5, so only output 5 changes.

# %%
changed = "the cat ate and it barked".split()
Q2, K2, V2 = qkv(changed)


def positions_that_change(**kwargs):
    before = sdpa_reference(Q, K, V, **kwargs)
    after = sdpa_reference(Q2, K2, V2, **kwargs)
    return ((before - after).abs().amax(dim=-1) > 1e-6).nonzero().flatten().tolist()


no_mask = positions_that_change()
with_mask = positions_that_change(is_causal=True)
print("outputs that change, no mask:    ", no_mask)
print("outputs that change, causal mask:", with_mask)
assert no_mask == list(range(T))
assert with_mask == [T - 1]

# %% [markdown]
# **Why that lets a model cheat.** In training, the output at position $t$ is used to predict
# token $t+1$, for all $t$ at once. Without the mask, position $t$ can attend to position $t+1$
# and read that token's value vector, which is the answer. Gradient descent finds this shortcut
# quickly (one head that looks one step ahead solves the task), so the training loss becomes
# very low while the model has learnt nothing about predicting. At generation time position
# $t+1$ does not exist yet, the shortcut reads nothing, and the model's predictions collapse.
# The causal mask makes the training task the same as the generation task.
#
# ## Exercise 5 — minus a billion is not minus infinity
#
# **Prediction.** (a) For a row with at least one allowed key, the softmax subtracts the row
# maximum, an allowed score of ordinary size; the masked entries become about $e^{-10^9}$,
# which underflows to exactly 0. So ordinary rows are **the same** as in the `-inf` version. (We
# compare with a tolerance: bit-for-bit equality would also need both versions to compute the
# scores and the softmax with exactly the same operations in the same order, which is not
# something to rely on across machines and versions.)
# (b) In a fully masked row every score is exactly $-10^9$; they are all equal, and the softmax
# of equal numbers is uniform. So the row attends **equally to every key, masked ones included**
# (for the left-padded example, the pad queries read the future tokens *the dog barked*). No NaN
# appears, but the output is an arbitrary average rather than a defined "nothing".


# %%
def attention_finite(q, k, v, mask, fill=-1e9):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    weights = torch.softmax(scores.masked_fill(~mask, fill), dim=-1)
    return weights @ v, weights


left_words = "<pad> <pad> <pad> the dog barked".split()
Ql, Kl, Vl = qkv(left_words)
left_mask = causal_mask(T) & (torch.arange(T) >= 3)[None, :]  # (T, T), rows 0-2 fully masked
out_fin, w_fin = attention_finite(Ql, Kl, Vl, left_mask)
out_inf, w_inf = sdpa_reference(Ql, Kl, Vl, attn_mask=left_mask, return_weights=True)
print("weights with -1e9:")
print(w_fin)
assert torch.allclose(w_fin[3:], w_inf[3:], atol=1e-5)
assert torch.allclose(out_fin[3:], out_inf[3:], atol=1e-5)
assert torch.allclose(w_fin[:3], torch.full((3, T), 1 / T))
assert torch.allclose(out_fin[:3], Vl.mean(dim=0).expand(3, d), atol=1e-5)
assert (out_inf[:3] == 0).all()
print("(a) ordinary rows same as with -inf (atol 1e-5):", True)
print("(b) fully masked rows: uniform over all keys (output = mean of V), not zero:", True)

# %% [markdown]
# **Which to prefer.** The `-inf` version with an explicit rule for empty rows: its ordinary
# rows are the same, and an empty row gives a clear, documented answer (zero weights, zero
# output) instead of silently attending to positions that the mask said were forbidden.
#
# **Bonus: float16.** $-10^9$ is far outside float16's range (largest finite magnitude 65504),
# and what happens depends on how the number meets the tensor. `masked_fill` with a Python number
# checks that the number fits the tensor's dtype, and refuses:

# %% tags=["raises-exception"]
scores16 = (Ql @ Kl.T / math.sqrt(d)).half()  # (T, T) float16 scores
scores16.masked_fill(~left_mask, -1e9)

# %% [markdown]
# Arithmetic does not check: adding or multiplying by $-10^9$ in float16 overflows silently to
# `-inf`. That is what happens to an additive mask built as `(~mask).half() * -1e9` (or an
# additive float32 mask of $-10^9$ cast to half). The masked entries are then exactly `-inf`,
# ordinary rows are fine, and the fully masked rows are $0/0$ = NaN again: the finite trick has
# quietly turned back into the naive `-inf` version.

# %%
bias16 = (~left_mask).half() * -1e9  # (T, T): -inf where masked, -0 where allowed
print("masked entries of the float16 bias are -inf:", bool(bias16[~left_mask].isneginf().all()))
w16 = torch.softmax(scores16 + bias16, dim=-1)  # (T, T) float16
nan_rows = w16.isnan().any(dim=-1)
print("rows with NaN weights:", nan_rows.nonzero().flatten().tolist())
assert nan_rows.tolist() == [True] * 3 + [False] * 3
# the ordinary rows are right, to float16 precision
assert torch.allclose(w16[3:].float(), w_inf[3:], atol=1e-3)

# %% [markdown]
# If you want a finite fill value, take it from the dtype: `torch.finfo(dtype).min` is the most
# negative finite number the dtype can hold (-65504 for float16, about $-3.4 \times 10^{38}$ for
# float32). `masked_fill` accepts it in any dtype, and the result behaves like $-10^9$ in float32:
# ordinary rows as with `-inf`, fully masked rows uniform rather than NaN. It is still not a
# defined "attends to nothing"; for that you need the explicit rule for empty rows.

# %%
fill16 = torch.finfo(torch.float16).min
print("float16 most negative finite:", fill16)
w16_fin = torch.softmax(scores16.masked_fill(~left_mask, fill16), dim=-1)  # (T, T) float16
print("no NaN:", not w16_fin.isnan().any().item())
assert not w16_fin.isnan().any()
assert torch.allclose(w16_fin[3:].float(), w_inf[3:], atol=1e-3)
assert torch.allclose(w16_fin[:3].float(), torch.full((3, T), 1 / T), atol=1e-3)
print("ordinary rows as with -inf, fully masked rows uniform:", True)
