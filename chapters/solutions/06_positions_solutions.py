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
# # Chapter 6 — Positions: solutions
#
# Worked solutions to the exercises of `chapters/06_positions.ipynb`. Each one gives the
# reasoning first, then checks the claim with code and an `assert`.

# %%
import math

import torch
import torch.nn.functional as F
from torch import nn

from attnbook.attention import AttentionConfig, MultiHeadAttention, build_attention
from attnbook.mlp import MLP
from attnbook.positions import (
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    interleaved_to_half,
    rope_cos_sin,
    sinusoidal_embedding,
)

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)

# %% [markdown]
# ## Exercise 1 — RoPE's base and its wavelengths
#
# Pair $i$ (of `head_dim/2`) turns by $\theta_i = \text{base}^{-2i/\text{head\_dim}}$ radians
# per position, so it needs
#
# $$\lambda_i = \frac{2\pi}{\theta_i} = 2\pi \cdot \text{base}^{2i/\text{head\_dim}}$$
#
# positions for a full turn. The fastest pair ($i = 0$) has $\theta_0 = 1$ whatever the base:
# $\lambda_0 = 2\pi \approx 6.28$ positions. The slowest ($i = 31$ for `head_dim = 64`) has
# $\lambda_{31} = 2\pi \cdot \text{base}^{62/64}$: about $2\pi \cdot 7{,}499 \approx 47{,}100$
# positions for base 10,000, and about $2\pi \cdot 332{,}000 \approx 2.1$ million for base
# 500,000.
#
# A pair completes a turn within 4,096 tokens when $\lambda_i \le 4096$, that is
# $i \le \frac{\text{head\_dim}}{2} \cdot \log(4096 / 2\pi) / \log(\text{base})$:
# $32 \cdot 0.7035 = 22.5$, so pairs 0..22 (23 pairs) for base 10,000, and
# $32 \cdot 0.4938 = 15.8$, so pairs 0..15 (16 pairs) for base 500,000.
#
# To check, we read each pair's angle at position 1 from `rope_cos_sin` (that angle *is*
# $\theta_i$), and we confirm that at position $\approx \lambda_{31}$ the slowest pair is back
# where it started ($\cos \approx 1$).

# %%
head_dim = 64
i = torch.arange(head_dim // 2, dtype=torch.float64)
for base in (10_000.0, 500_000.0):
    cos1, sin1 = rope_cos_sin(torch.tensor([1]), head_dim, base)  # (1, 32) each
    theta = torch.atan2(sin1[0], cos1[0]).double()  # (32,): radians per position
    wavelength = 2 * math.pi / theta
    predicted = 2 * math.pi * base ** (2 * i / head_dim)
    assert torch.allclose(wavelength, predicted, rtol=1e-4)
    full_turn = round(wavelength[-1].item())
    cos_back, _ = rope_cos_sin(torch.tensor([full_turn]), head_dim, base)
    assert cos_back[0, -1] > 0.9999  # the slowest pair has completed one turn
    n_turning = int((wavelength <= 4096).sum())
    print(
        f"base {base:>9,.0f}: fastest pair {wavelength[0].item():.2f} positions, "
        f"slowest {wavelength[-1].item():,.0f}; pairs turning within 4096 tokens: {n_turning}"
    )
    assert n_turning == {10_000.0: 23, 500_000.0: 16}[base]

# %% [markdown]
# Why raise the base for long contexts? A pair that turns many times within the context maps
# far-apart offsets onto the same angle, so on its own it cannot tell them apart; only the
# slow pairs give an unambiguous sense of long distance. With base 10,000 and `head_dim` 64
# even the slowest pair wraps after about 47,000 tokens, so in a 128k context no pair is
# unambiguous across the whole range. Raising the base slows every pair except the first,
# keeping a larger share of them below one turn over the context, and makes the angle of a
# long offset change more slowly, so a model trained on shorter sequences has seen angles
# close to the ones that long offsets produce. (LLaMA 3 uses base 500,000; other recipes
# rescale the angles instead, as the chapter mentions.)

# %% [markdown]
# ## Exercise 2 — ALiBi slopes for 6 heads, by hand
#
# 6 is not a power of two. The largest power of two below it is $p = 4$, whose slopes are
# $2^{-8/4 \cdot h}$ for $h = 1..4$: $2^{-2}, 2^{-4}, 2^{-6}, 2^{-8}$. The sequence for
# $2p = 8$ heads is $2^{-1}, 2^{-2}, \dots, 2^{-8}$; every other one, starting with the first,
# is $2^{-1}, 2^{-3}, 2^{-5}, 2^{-7}$ (exactly the slopes the 4-head list lacks), and we need
# $6 - 4 = 2$ of them: $2^{-1}, 2^{-3}$. So the six slopes, in head order, are
#
# $$2^{-2},\ 2^{-4},\ 2^{-6},\ 2^{-8},\ 2^{-1},\ 2^{-3}.$$
#
# Every one of them is in the 8-head list; 6 heads simply lack $2^{-5}$ and $2^{-7}$. Note the
# order: the steepest head is head 4, not head 0. A model does not care, but code that assumes
# the slopes are sorted would.

# %%
by_hand = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
print("alibi_slopes(6) as powers of two:", torch.log2(alibi_slopes(6)).tolist())
assert torch.equal(alibi_slopes(6), by_hand)
assert set(alibi_slopes(6).tolist()) <= set(alibi_slopes(8).tolist())
missing = sorted(set(alibi_slopes(8).tolist()) - set(by_hand.tolist()))
print("8-head slopes that 6 heads lack, as powers of two:", [math.log2(m) for m in missing])

# %% [markdown]
# ## Exercise 3 — positions break equivariance
#
# Once position vectors are added, permuting the *tokens* while the position table stays in
# place gives the layer different inputs: token $t$ now carries position $\text{perm}^{-1}(t)$'s
# vector. So the outputs are no longer a permutation of the old ones. The same holds for a RoPE
# layer: the layer rotates the row at index $p$ by $p\,\theta$, whatever token sits there.
#
# If instead each token keeps its own position vector — we permute $x + P$ as a whole — the
# layer sees the same set of (token, position) pairs in a different order, and the
# position-free layer is equivariant to that, as in section 1. Order is carried only by the
# position labels, never by where a row sits in the tensor.

# %%
T, d = 6, 16
x = torch.randn(1, T, d)
perm = torch.randperm(T)
P = sinusoidal_embedding(T, d)  # (T, d)

plain = build_attention(
    "mha", AttentionConfig(n_embd=d, n_head=2, causal=False, positions="none")
)
y = plain(x + P)


def equivariant(out, reference):
    return torch.allclose(out, reference, atol=1e-5)


tokens_moved = plain(x[:, perm] + P)  # tokens permuted, positions stay put
pairs_moved = plain((x + P)[:, perm])  # tokens permuted together with their positions
print("sinusoidal, tokens permuted:          equivariant =", equivariant(tokens_moved, y[:, perm]))
print("sinusoidal, tokens + positions moved: equivariant =", equivariant(pairs_moved, y[:, perm]))
assert not torch.allclose(tokens_moved, y[:, perm], atol=1e-3)
assert torch.allclose(pairs_moved, y[:, perm], atol=1e-5)

rope_layer = build_attention(
    "mha", AttentionConfig(n_embd=d, n_head=2, causal=False, positions="rope", block_size=T)
)
y_rope = rope_layer(x)
rope_moved = rope_layer(x[:, perm])
print("RoPE, tokens permuted:                equivariant =", equivariant(rope_moved, y_rope[:, perm]))
assert not torch.allclose(rope_moved, y_rope[:, perm], atol=1e-3)

# %% [markdown]
# The RoPE analogue of "move the positions with the tokens" is to rotate each permuted row by
# its token's *original* position. The layer cannot be told that (it always uses positions
# 0..T−1), so we do the layer's computation by hand with positions `perm`, using its own
# weights:

# %%
def rope_layer_at(layer, x, positions):
    """The non-causal RoPE layer's computation with explicit positions for the rows of x."""
    B, T, d = x.shape
    nh, hd = layer.n_head, layer.head_dim
    q, k, v = layer.c_attn(x).split(d, dim=2)
    q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
    cos, sin = rope_cos_sin(positions, hd, layer.config.rope_base)
    q = apply_rope(q, cos, sin, layer.config.rope_pairing)
    k = apply_rope(k, cos, sin, layer.config.rope_pairing)
    y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
    return layer.c_proj(y.transpose(1, 2).reshape(B, T, d))


assert torch.allclose(rope_layer_at(rope_layer, x, torch.arange(T)), y_rope, atol=1e-5)
moved = rope_layer_at(rope_layer, x[:, perm], perm)  # every token keeps its own position
print("RoPE, tokens + positions moved:       equivariant =", equivariant(moved, y_rope[:, perm]))
assert torch.allclose(moved, y_rope[:, perm], atol=1e-5)

# %% [markdown]
# ## Exercise 4 — the pairing bug
#
# **Prediction.** At position 0 every rotation angle is 0, so both pairings leave the vector
# unchanged, and position 0 attends only to itself (causal): its logits cannot change.
#
# At position $m$, pair $i$ is rotated by $m\theta_i$, and the wrong pairing applies that
# rotation to the wrong coordinates. A tempting guess is that the damage starts small and grows
# with $m$, since small angles are nearly the identity. That is true for the *slow* pairs, but
# pair 0 turns by a full radian per position ($\theta_0 = 1$ whatever the base), and the fast
# pairs are exactly what a head uses to find nearby tokens, which is what this task needs. Here
# `head_dim = 8`, so there are only four pairs, with $\theta = 1, 0.1, 0.01, 0.001$: the
# fastest one is a quarter of every head. So the damage should be large from position 1 on,
# and the accuracy should drop far below the trained model's.
#
# We rebuild the chapter's Fibonacci task and its `TinyLM` restricted to RoPE (a minimal model
# for this exercise, not the book's GPT), with the RoPE pairing as an argument, and train it
# with the interleaved pairing the way the chapter's `train` does (one thread, same seeds).

# %%
V, L = 16, 32


def fibonacci_batch(batch, T, generator):
    seq = torch.empty(batch, T + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, V, (batch, 2), generator=generator)
    for t in range(2, T + 1):
        seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % V
    return seq[:, :-1], seq[:, 1:]  # inputs, next-token targets


class TinyRopeLM(nn.Module):
    """Token embedding, one pre-norm block (RoPE attention + MLP), LayerNorm, linear head."""

    def __init__(self, pairing, n_embd=32, n_head=4):
        super().__init__()
        cfg = AttentionConfig(
            n_embd=n_embd, n_head=n_head, block_size=L, positions="rope", rope_pairing=pairing
        )
        self.tok = nn.Embedding(V, n_embd)
        self.ln1, self.attn = nn.LayerNorm(n_embd), build_attention("mha", cfg)
        self.ln2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd, 4 * n_embd)
        self.ln_f, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, V)

    def forward(self, idx):
        x = self.tok(idx)  # (B, T, n_embd)
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln_f(x))  # (B, T, V)


threads = torch.get_num_threads()
torch.set_num_threads(1)
try:
    torch.manual_seed(0)
    trained = TinyRopeLM("interleaved")
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(0)
    for _ in range(300):
        xb, yb = fibonacci_batch(32, L, data)
        loss = F.cross_entropy(trained(xb)[:, 1:].reshape(-1, V), yb[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
finally:
    torch.set_num_threads(threads)
trained.eval()
print("trained with interleaved RoPE")

# %% [markdown]
# Now the same weights in a half-split model, first unchanged, then converted. The conversion
# reorders, per head, the query rows and the key rows of the fused `c_attn` (weight and bias)
# with `interleaved_to_half`; the value rows stay.

# %%
def convert_state(state, n_head, n_embd):
    state = dict(state)
    for name in ("attn.c_attn.weight", "attn.c_attn.bias"):
        w_q, w_k, w_v = state[name].split(n_embd)  # rows q | k | v
        state[name] = torch.cat(
            [interleaved_to_half(w_q, n_head), interleaved_to_half(w_k, n_head), w_v]
        )
    return state


unconverted = TinyRopeLM("half").eval()
unconverted.load_state_dict(trained.state_dict())
converted = TinyRopeLM("half").eval()
converted.load_state_dict(convert_state(trained.state_dict(), n_head=4, n_embd=32))

x_test, y_test = fibonacci_batch(512, L, torch.Generator().manual_seed(1234))
with torch.no_grad():
    logits = {
        "interleaved (trained)": trained(x_test),
        "half, unconverted": unconverted(x_test),
        "half, converted": converted(x_test),
    }
reference = logits["interleaved (trained)"]
gap_per_position = (logits["half, unconverted"] - reference).abs().amax(dim=(0, 2))  # (L,)
print("unconverted: position 0 unchanged:", gap_per_position[0].item() < 1e-5)
print("unconverted: every later position changed by > 1:", (gap_per_position[1:] > 1).all().item())
assert gap_per_position[0] < 1e-5 and (gap_per_position[1:] > 1).all()
# logits of size ~20, summed in another order by the permuted weights: atol 2e-4 is 1e-5 of them
same = torch.allclose(logits["half, converted"], reference, atol=2e-4)
print("converted: logits == trained (atol=2e-4):", same)
assert same

# %% [markdown]
# Position 0 is untouched, and already at position 1 the logits move by more than one unit.
# The size of the change and the accuracy on positions 1..31 (exact numbers depend on the
# machine in the last digits, so this output is not compared):

# %% tags=["nbval-ignore-output"]
accuracy = {
    name: (out[:, 1:].argmax(-1) == y_test[:, 1:]).float().mean().item()
    for name, out in logits.items()
}
print("largest logit change, positions 0..5:", [round(g, 2) for g in gap_per_position[:6].tolist()])
for name, a in accuracy.items():
    print(f"{name:>22}: accuracy {a:.2f}")
assert accuracy["interleaved (trained)"] > 0.9
assert accuracy["half, unconverted"] < accuracy["interleaved (trained)"] - 0.2
assert abs(accuracy["half, converted"] - accuracy["interleaved (trained)"]) < 0.01

# %% [markdown]
# Loading a checkpoint into the wrong pairing raises no error — the shapes are identical — and
# the first token's output is exactly right, so a smoke test on a one-token prompt passes.
# The cheapest guard is a test that compares logits with the original implementation on a
# sequence of several tokens.

# %% [markdown]
# ## Exercise 5 — forgetting the offset
#
# A cached decoding step feeds one token and rotates its query and key by `start =
# cache.length`, its true position. First the correct layer:

# %%
cfg = AttentionConfig(n_embd=32, n_head=4, block_size=16, positions="rope")
layer = MultiHeadAttention(cfg).eval()
x = torch.randn(1, 12, 32)


def decode_one_by_one(layer, x):
    cache = layer.new_cache(batch_size=x.shape[0])
    return torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(x.shape[1])], dim=1)


with torch.no_grad():
    full = layer(x)
    stepwise = decode_one_by_one(layer, x)
print("cached, one token at a time == full pass:", torch.allclose(stepwise, full, atol=1e-5))
assert torch.allclose(stepwise, full, atol=1e-5)

# %% [markdown]
# **Prediction for the bug.** With a `RotaryEmbedding` that ignores `start`, every token is
# rotated as if it were at position 0, which is no rotation at all. The full pass is not
# affected (it starts at 0 anyway). In cached decoding, every query and every stored key is
# unrotated, so the scores carry no position information: the cached layer silently behaves
# like a layer with `positions="none"`. The first step still matches (position 0 really is 0),
# all later steps differ. Each key is rotated once, when appended, but with angle 0, like
# every query, so no offset survives.

# %%
class ForgetfulRotary(RotaryEmbedding):
    """The bug: always rotates as positions 0..T-1, whatever the cache holds."""

    def forward(self, x, start=0):
        return super().forward(x, start=0)


buggy = MultiHeadAttention(cfg).eval()
buggy.load_state_dict(layer.state_dict())
buggy.rope = ForgetfulRotary(cfg.head_dim, cfg.block_size, cfg.rope_base, cfg.rope_pairing)
no_positions = MultiHeadAttention(
    AttentionConfig(n_embd=32, n_head=4, block_size=16, positions="none")
).eval()
no_positions.load_state_dict(layer.state_dict())

with torch.no_grad():
    buggy_full = buggy(x)
    buggy_steps = decode_one_by_one(buggy, x)
    none_full = no_positions(x)
matches = torch.isclose(buggy_steps, full, atol=1e-5).all(dim=-1)[0]  # (12,) per step
print("buggy full pass == correct full pass:", torch.allclose(buggy_full, full, atol=1e-5))
print("buggy cached step t == correct, per t:", matches.tolist())
print("buggy cached == positions='none':", torch.allclose(buggy_steps, none_full, atol=1e-5))
assert torch.allclose(buggy_full, full, atol=1e-5)
assert matches[0] and not matches[1:].any()
assert torch.allclose(buggy_steps, none_full, atol=1e-5)

# %% [markdown]
# **ALiBi** needs no `start` because its bias is computed from the number of queries `t_q` and
# keys `t_k` alone: the queries are taken to be the last `t_q` of the `t_k` positions
# (bottom-right alignment, like the causal mask). With a cache, `t_k` is the cache length
# plus the new tokens, so the single new query is automatically placed at position `t_k − 1`
# and penalised by its true distance to every key: its bias row equals the last row of the
# full matrix.

# %%
slopes = alibi_slopes(4)
t_k = 10
one_query = alibi_bias(slopes, t_q=1, t_k=t_k)  # (4, 1, 10)
full_matrix = alibi_bias(slopes, t_q=t_k, t_k=t_k)  # (4, 10, 10)
last_row = full_matrix[:, -1:]  # (4, 1, 10)
print("alibi_bias(slopes, 1, 10) == last row of the 10 x 10 bias:", torch.equal(one_query, last_row))
assert torch.equal(one_query, last_row)
