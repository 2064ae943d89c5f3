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
# # Chapter 9 — Sliding-window attention: solutions
#
# Worked solutions to the exercises of `chapters/09_sliding_window.ipynb`. Each one states the
# reasoning first, then checks the claim with code and an `assert`. The few helpers we need from
# the chapter (the gradient probe of section 4, the decoding loop of section 7) are repeated here,
# condensed, since a notebook cannot import another notebook. As in the chapter, everything runs
# on one thread (small tensors gain nothing from a second one).

# %%
import time

import torch
from torch import nn
from tqdm import tqdm

from attnbook.attention import (
    AttentionConfig,
    build_attention,
    sdpa,
    sdpa_reference,
)
from attnbook.attention.local import RollingKVCache, blocked_local_attention
from attnbook.model import GPT, GPTConfig

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)


def influence_on_last(layers, x, masks=None):
    """|d (last output . probe) / d input| per input position, through a residual stack.

    layers: attention layers applied as h = h + layer(h [, attn_mask]); masks: one per layer or None.
    """
    x = x.clone().requires_grad_(True)  # (1, T, d)
    h = x
    for i, layer in enumerate(layers):
        h = h + (layer(h) if masks is None else layer(h, attn_mask=masks[i]))
    probe = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(h[0, -1] @ probe, x)
    return grad[0].norm(dim=-1)  # (T,)


def reached(influence):
    """The input positions with a nonzero gradient, as a list."""
    return (influence > 0).nonzero().flatten().tolist()


# %% [markdown]
# ## Exercise 1 — the extreme windows
#
# **(a) A window at least as long as the sequence.** Query $i$ sees keys $j$ with
# $0 \le i - j < w$. When $T \le w$, every $i - j$ is below $T \le w$, so the second condition
# never bites and the band is the causal triangle: `LocalAttention` is plain causal attention.
# Its projections are those of `"gqa"` (it subclasses `GroupedQueryAttention`), so a `"gqa"`
# layer loaded with the same state dict must give the same outputs. Once the sequence is longer
# than the window, the two differ from position $w$ on, and only there.

# %%
torch.manual_seed(1)
cfg = dict(n_embd=32, n_head=4, block_size=64, positions="rope")
local = build_attention("local", AttentionConfig(**cfg), window=16).eval()
full = build_attention("gqa", AttentionConfig(**cfg)).eval()
full.load_state_dict(local.state_dict())  # same c_attn / c_proj layout
with torch.no_grad():
    for T in (10, 16, 24):
        x = torch.randn(2, T, 32)
        diff = (local(x) - full(x)).abs().amax(dim=(0, 2))  # (T,): largest difference per position
        differs = (diff > 1e-5).nonzero().flatten().tolist()
        print(f"T={T:>2}, window 16: equal to causal gqa: {not differs}"
              + (f"; first position that differs: {differs[0]}" if differs else ""))
        assert (not differs) == (T <= 16) and (not differs or differs[0] == 16)

# %% [markdown]
# **(b) A window of 1.** Each query sees only its own key. A softmax over a single score is
# exactly 1, whatever the score, so the output at position $i$ is that position's value, passed
# through the output projection:
#
# $$y_i = W_O (W_V x_i + b_V) + b_O.$$
#
# The queries and keys (and so RoPE) have no effect at all; the layer is a fixed linear map
# applied to each position separately, like an MLP without nonlinearity. In `c_attn` the value
# rows are the last third (`q | k | v`).

# %%
torch.manual_seed(2)
one = build_attention("local", AttentionConfig(**cfg), window=1).eval()
d = 32
W_v, b_v = one.c_attn.weight[2 * d :], one.c_attn.bias[2 * d :]  # (d, d), (d,): the value rows
x = torch.randn(2, 20, d)
with torch.no_grad():
    formula = one.c_proj(x @ W_v.T + b_v)  # (2, 20, d): no softmax, no q, no k
    assert torch.allclose(one(x), formula, atol=1e-5)
print("window 1: layer(x) == c_proj(W_v x + b_v) at every position (atol=1e-5)")

# %% [markdown]
# A stack of window-1 layers therefore never mixes positions: the reach is $L(w - 1) = 0$ for
# any depth. The gradient probe confirms it: through 5 such layers the last output depends on the
# last input only.

# %%
stack_1 = [build_attention("local", AttentionConfig(**cfg), window=1) for _ in range(5)]
inputs = reached(influence_on_last(stack_1, torch.randn(1, 20, d)))
print("inputs that influence the last output through 5 window-1 layers:", inputs)
assert inputs == [19]

# %% [markdown]
# ## Exercise 2 — predict the receptive field
#
# **(a)** Each layer adds $w - 1 = 5$ positions of reach, so 4 layers reach $20$ back: the output
# at position 50 can be influenced by inputs 30 to 50, and by nothing after 50 (causality) or
# before 30. We run the probe on the first 51 positions, so that position 50 is the last output;
# positions after it could not matter anyway.

# %%
torch.manual_seed(3)
stack_a = [build_attention("local", AttentionConfig(**cfg), window=6) for _ in range(4)]
inputs = reached(influence_on_last(stack_a, torch.randn(1, 51, d)))
print(f"4 layers of window 6: inputs {inputs[0]}..{inputs[-1]} reach output 50, "
      f"{len(inputs)} positions")
assert inputs == list(range(30, 51))

# %% [markdown]
# **(b)** The argument of the chapter did not need equal windows: layer $\ell$ adds $w_\ell - 1$
# positions, so the reach is $\sum_\ell (w_\ell - 1)$. For windows 2, 3, 5, 9 that is
# $1 + 2 + 4 + 8 = 15$. The order of the layers does not matter (a sum), which we check by
# reversing the stack.

# %%
torch.manual_seed(4)
windows = [2, 3, 5, 9]
stack_b = [build_attention("local", AttentionConfig(**cfg), window=w) for w in windows]
x_b = torch.randn(1, 40, d)
predicted_reach = sum(w - 1 for w in windows)
for name, layers in (("2, 3, 5, 9", stack_b), ("9, 5, 3, 2", stack_b[::-1])):
    inputs = reached(influence_on_last(layers, x_b))
    print(f"windows {name}: reach {39 - inputs[0]} (predicted {predicted_reach}), "
          f"contiguous: {inputs == list(range(inputs[0], 40))}")
    assert inputs == list(range(39 - predicted_reach, 40))

# %% [markdown]
# **(c)** $L$ layers of window 4096 reach $4095 L$ positions back. One million positions needs
# $L \ge 10^6 / 4095 \approx 244.2$, so **245 layers** — far more than any 7B model has
# (Mistral 7B has 32, reaching 131,040). Receptive field alone does not make a model use long
# context; it only bounds what it could use.

# %%
layers_needed = -(-1_000_000 // 4095)  # ceiling division
assert 4095 * layers_needed >= 1_000_000 > 4095 * (layers_needed - 1)
print("layers of window 4096 to reach 1,000,000 positions back:", layers_needed)

# %% [markdown]
# ## Exercise 3 — a dilated window
#
# **(a)** With `distance = i - j`, a dilated window of $w$ with dilation $d$ allows
# `distance >= 0`, `distance % d == 0` and `distance // d < w`: the same $w$ keys per query as an
# ordinary window, spread over $(w - 1)d + 1$ positions. A `"gqa"` layer accepts any extra
# boolean mask through `attn_mask` and combines it with its causal mask, so dilated attention is
# one argument away. We check with the returned weights that each row attends only inside the
# mask and sums to one.

# %%
def dilated_window_mask(T, w, dilation):
    """(T, T) bool: query i sees keys i, i - d, ..., i - (w - 1) d (True = may attend)."""
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # (T, T)
    return (distance >= 0) & (distance % dilation == 0) & (distance // dilation < w)


print(dilated_window_mask(10, w=3, dilation=2).int())

torch.manual_seed(5)
gqa = build_attention("gqa", AttentionConfig(**cfg)).eval()
mask = dilated_window_mask(30, w=4, dilation=3)
with torch.no_grad():
    _, weights = gqa(torch.randn(2, 30, d), attn_mask=mask, need_weights=True)  # (2, 4, 30, 30)
assert bool((weights[..., ~mask] == 0).all())
assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 4, 30))
print("dilated attention: weights zero outside the mask, rows sum to 1; keys per query:",
      mask.sum(dim=1)[-5:].tolist(), "(last 5 queries)")

# %% [markdown]
# **(b)** After three layers, the offsets that reach the last output are sums
# $a \cdot 1 + b \cdot 4 + c \cdot 16$ with $a, b, c \in \{0, 1, 2, 3\}$ — every offset from 0 to
# $3 + 12 + 48 = 63$ exactly once, like the digits of a number in base 4. So the three dilated
# layers cover **all 64 positions** back, without holes, where three ordinary layers of window 4
# cover 10 (offsets 0 to $3 \cdot 3 = 9$). With the same number of keys per query, dilation
# grows the reach exponentially with depth instead of linearly. The order of the layers does
# not matter (a sum does not care), but the dilations must fit the window: with dilations 1, 8
# and 64, the first two layers give offsets $a + 8b$ with $a \le 3$, which skip 4..7, 12..15 and
# so on, and the reach of $3 + 24 + 192 = 219$ positions is full of holes.
#
# We check with the mask algebra and with gradients through three `"gqa"` layers with the
# dilated masks.

# %%
T_d = 224  # long enough for the widest reach below (219)
torch.manual_seed(6)
cfg_d = AttentionConfig(n_embd=32, n_head=4, block_size=T_d, positions="rope")
layers_d = [build_attention("gqa", cfg_d) for _ in range(3)]
x_d = torch.randn(1, T_d, d)
for dilations in ((1, 4, 16), (1, 1, 1), (1, 8, 64)):
    masks = [dilated_window_mask(T_d, 4, dil) for dil in dilations]
    reach = torch.eye(T_d, dtype=torch.long)
    for m in masks:
        reach = ((m.long() @ reach) > 0).long()  # compose, as in the chapter's section 4
    by_masks = reach[-1].nonzero().flatten().tolist()
    by_grads = reached(influence_on_last(layers_d, x_d, masks))
    assert by_masks == by_grads
    offsets = sorted(T_d - 1 - j for j in by_grads)
    print(f"dilations {dilations}: {len(offsets)} offsets reach the last output, "
          f"max {offsets[-1]}, contiguous: {offsets == list(range(offsets[-1] + 1))}")
expected = sorted(a + 4 * b + 16 * c for a in range(4) for b in range(4) for c in range(4))
assert expected == list(range(64))

# %% [markdown]
# As predicted: 64 contiguous offsets with dilations 1, 4, 16; 10 without dilation; and with
# 1, 8, 64 a reach of 219 positions full of holes (64 offsets out of 220).
#
# **(c)** Positions $i$ and $j$ interact only if $d$ divides $i - j$, i.e. if $i \equiv j
# \pmod d$. So the sequence falls apart into $d$ interleaved subsequences (positions $r, r + d,
# r + 2d, \ldots$ for $r = 0 \ldots d - 1$) that never see each other, and inside one
# subsequence the keys at distances $0, d, \ldots, (w - 1)d$ are simply its last $w$ elements: an
# ordinary sliding window. So: reorder the positions by residue (a reshape when $d$ divides $T$),
# stack the $d$ subsequences as a batch, run `blocked_local_attention`, and put the positions
# back. The dilated window inherits the blocked path's $O(T w)$ cost.

# %%
def dilated_blocked(q, k, v, w, dilation):
    """Dilated sliding-window attention via blocked_local_attention on each residue class."""
    B, H, T, hd = q.shape
    assert T % dilation == 0, "pad T to a multiple of the dilation first"

    def split(x):  # (B, H, T, hd) -> (B * dilation, H, T / dilation, hd): residue classes
        x = x.view(B, H, T // dilation, dilation, hd)  # position = t * dilation + r
        return x.permute(0, 3, 1, 2, 4).reshape(B * dilation, H, T // dilation, hd)

    y = blocked_local_attention(split(q), split(k), split(v), w)  # (B * dil, H, T / dil, hd)
    y = y.view(B, dilation, H, T // dilation, hd).permute(0, 2, 3, 1, 4)  # (B, H, T/dil, dil, hd)
    return y.reshape(B, H, T, hd)


torch.manual_seed(7)
q, k, v = torch.randn(3, 2, 4, 96, 16).unbind(0)  # (2, 4, 96, 16) each
for w, dilation in ((4, 3), (5, 8), (2, 1)):
    dense = sdpa_reference(q, k, v, attn_mask=dilated_window_mask(96, w, dilation))
    assert torch.allclose(dilated_blocked(q, k, v, w, dilation), dense, atol=1e-5)
print("dilated attention == blocked_local_attention on the residue classes, for "
      "(w, d) = (4, 3), (5, 8), (2, 1) (atol=1e-5)")

# %% [markdown]
# ## Exercise 4 — the window and the blocked path's cost
#
# The blocked path fills $n \cdot w \cdot 2w$ entries with $n = \lceil T / w \rceil$; when $w$
# divides $T$ that is exactly $2Tw$. Full causal attention has $T(T+1)/2$ allowed pairs (the fused
# kernel computes about that many). So the blocked path fills more once $2Tw > T(T+1)/2$, i.e.
# $w > (T + 1)/4 = 512.25$ for $T = 2048$. Among powers of two, 512 is still (just) below and
# 1024 is above. At $w = T$ the blocked path is one chunk against $2T$ keys, half of them
# padding: four times the causal work.

# %%
T = 2048
causal_entries = T * (T + 1) // 2
print(f"T={T}: full causal {causal_entries:,} entries")
for w in (16, 32, 64, 128, 256, 512, 1024, 2048):
    entries = -(-T // w) * w * 2 * w
    assert entries == 2 * T * w
    print(f"  window {w:>4}: blocked {entries:>10,}  = {entries / causal_entries:5.3f} x causal")
crossover = min(w for w in (2**e for e in range(4, 12)) if 2 * T * w > causal_entries)
print("smallest power-of-two window with more entries than causal:", crossover)
assert crossover == 1024

# %% [markdown]
# On the clock, the counts are only a rough guide. The blocked path has costs they miss:
# building the key tiles (a copy twice the size of the keys, in the forward and again in the
# backward pass), padding, and a mask the kernel must read, whereas the causal kernel generates
# its mask itself. The causal kernel, for its part, works in tiles too and computes a little more
# than the exact triangle. We time forward plus backward at $T = 2048$ (one sequence, 8 heads of
# 64, one thread, fastest of 3 after a warm-up, with the chapter's `fwd_bwd_ms`; output not
# checked, since timings vary) and assert only the robust part: a small window is much faster
# than full causal attention, and the time grows with the window.

# %% tags=["nbval-ignore-output"]
def fwd_bwd_ms(fn, inputs, repeats=3):
    """Fastest of `repeats` runs of fn(*inputs).sum().backward(), in ms, after one warm-up run."""
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn(*inputs).sum().backward()
        if i > 0:  # run 0 warms up
            best = min(best, 1000 * (time.perf_counter() - t0))
    return best


torch.manual_seed(8)
qkv = tuple(torch.randn(1, 8, T, 64, requires_grad=True) for _ in range(3))
causal_ms = fwd_bwd_ms(lambda q, k, v: sdpa(q, k, v, is_causal=True), qkv)
blocked_ms = {w: fwd_bwd_ms(lambda q, k, v, w=w: blocked_local_attention(q, k, v, w), qkv)
              for w in tqdm((32, 128, 512, 1024), desc="timing")}
print(f"full causal: {causal_ms:.0f} ms")
for w, t in blocked_ms.items():
    print(f"window {w:>4}: {t:6.0f} ms = {t / causal_ms:4.2f} x causal")
assert blocked_ms[32] < 0.5 * causal_ms
assert blocked_ms[32] < blocked_ms[1024]

# %% [markdown]
# On the machine this book was written on, the time of the blocked path grew roughly in
# proportion to the window, as counted, and the crossover lay near the counted one: at window
# 512, where the counts are equal, repeated runs took from about 0.7 to 1.3 times the causal time
# (the machine was shared, so single runs vary a lot), and at 1024 about 1.7 to 3 times. The lesson:
# the blocked path pays off when the window is a small fraction of the sequence, which is the
# regime sliding windows are meant for: a window of a few thousand positions in sequences many
# times longer. When $T \le w$, `LocalAttention` does not use the blocked path at all; it takes
# the dense band, which is then the causal triangle.
#
# ## Exercise 5 — what has to count true positions?
#
# The buggy cache stores and returns exactly the right keys and values; only its `length` stops
# at `window`. Who reads `length`?
#
# - **RoPE**: the layer rotates the new query and key at position `cache.length`. Once the bug
#   kicks in, every new token is rotated as if it sat at position `window`. The cached keys of
#   the last few tokens then all carry the *same* rotation, so the relative distances the scores
#   should encode collapse: a query sees its neighbours as if they were at distance 0.
#   Generation goes wrong as soon as the window is passed.
# - **Learned positions**: the model adds `wpe` at `start = caches[0].length`, so every new token
#   gets the embedding of position `window`. Also wrong.
# - **ALiBi**: the bias is computed from the distance *within the returned keys*
#   (`alibi_bias(slopes, t_q, t_k)`, bottom-right aligned), never from `length`. Still exact.
# - **No positions**: nothing reads `length` at all. Still exact (the causal order alone is all
#   the model knows about positions).
#
# To make the bug and nothing else, we take the module's `RollingKVCache` and only change what
# `length` reports: a property that never says more than `window` (`append` counts the new
# positions by assigning `self.length`, which goes through the setter). Fed the same keys and values, it returns
# exactly what the real cache returns; only `length` differs. We build the chapter's model
# (`GPT` with local attention, PyTorch's default initialisation) with each `positions` (learned
# positions are added at `start = caches[0].length`, as in [chapter 7](../07_kv_cache.ipynb)) and
# generate 40 tokens after a 12-token prompt, window 8.

# %%
class BuggyRollingCache(RollingKVCache):
    """The module's rolling cache, except that `length` stops at `window` (the bug)."""

    @property
    def length(self):
        return min(self._seen, self.window)  # BUG: slots in use, not positions seen

    @length.setter
    def length(self, value):
        self._seen = value


torch.manual_seed(11)  # fed the same keys and values, the two caches differ only in `length`
buggy_cache = BuggyRollingCache(1, 1, 2, window=4, max_len=20)
real_cache = RollingKVCache(1, 1, 2, window=4, max_len=20)
for T_new in (6, 1, 1, 3):
    kv = torch.randn(2, 1, 1, T_new, 2)  # k and v, (1, 1, T_new, 2) each
    returned = zip(buggy_cache.append(*kv), real_cache.append(*kv), strict=True)
    assert all(torch.equal(a, b) for a, b in returned)
print(f"window 4, 11 positions appended: same keys and values returned; length: buggy "
      f"{buggy_cache.length}, real {real_cache.length}")


def tiny_gpt(positions):
    """The chapter's model: 3 layers of local attention, window 8, with the given positions."""
    config = GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=4, n_embd=64,
                       attention="local", attention_options={"window": 8}, positions=positions,
                       tie_weights=False)
    model = GPT(config).eval()
    for module in model.modules():  # PyTorch's default initialisation, as in the chapter
        if isinstance(module, nn.Linear | nn.Embedding):
            module.reset_parameters()
    return model


torch.manual_seed(9)
prompt = torch.randint(0, 256, (2, 12))
exact = {}
for positions in ("rope", "learned", "alibi", "none"):
    torch.manual_seed(10)
    model = tiny_gpt(positions)
    reference = model.generate(prompt, 40, temperature=0, use_cache=False)
    good = model.generate(prompt, 40, temperature=0, caches=model.new_caches(2))  # RollingKVCache
    buggy_caches = [BuggyRollingCache(2, 4, 16, window=8, max_len=128) for _ in range(3)]
    buggy = model.generate(prompt, 40, temperature=0, caches=buggy_caches)
    assert buggy_caches[0].length == 8  # 12 + 39 positions were fed
    assert torch.equal(good, reference)  # the module's RollingKVCache is always exact
    exact[positions] = torch.equal(buggy, reference)
    print(f"{positions:>7}: buggy cache gives the tokens of full recomputation: "
          f"{exact[positions]}")
assert exact == {"rope": False, "learned": False, "alibi": True, "none": True}

# %% [markdown]
# As predicted. Note that the bug is invisible for the prompt: 12 tokens prefilled at once start
# at position 0 either way, and with a window of 8 the buggy `length` is wrong from the second
# step on. A test suite that only checks ALiBi or position-free models would miss it — which is
# why `attnbook`'s cached-decoding test runs every position scheme.
