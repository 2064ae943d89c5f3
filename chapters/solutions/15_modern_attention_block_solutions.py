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
# # Chapter 15 — The modern attention block: solutions
#
# Worked solutions to the exercises of `chapters/15_modern_attention_block.ipynb`. Each one
# states a prediction first, then checks it with code and an `assert`. The notebook cannot import
# the chapter, so it rebuilds the small set-ups it needs: section 2.1's seed-0 QK-norm models
# (Exercise 1) and the plain marker toy of section 4.2 (Exercise 3); Exercise 4 needs no training,
# only randomly initialised stacks. Everything runs on one thread with fixed seeds; the cells
# that print numbers from training are ignored by the tests and assert their claims with margins.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from attnbook.attention import AttentionConfig, build_attention
from attnbook.bench import cache_bytes_formula
from attnbook.data import TokenData, prepare
from attnbook.model import GPT, GPTConfig, layer_pattern

torch.set_num_threads(1)
_ = torch.manual_seed(0)  # (manual_seed returns the generator; `_ =` keeps it out of the output)
torch.set_printoptions(precision=4, sci_mode=False)
t_start = time.perf_counter()

# %% [markdown]
# ## Exercise 1 — The bound QK-norm gives
#
# *With RMS-normalised $q$ and $k$ of $d$ numbers and norm weights $g^q$, $g^k$, derive the
# largest possible score $q \cdot k / \sqrt{d}$, and check it against the largest score of the
# QK-normalised models of section 2. What would a learning rate have to do to the norm weights
# to reach a one-hot softmax over 32 keys?*
#
# **Prediction.** RMSNorm maps a head's query to $\hat q = g^q \odot u$ with
# $u = q / \sqrt{\overline{q^2} + \epsilon}$, so $|u|^2 = d\,\overline{q^2} / (\overline{q^2} +
# \epsilon) \le d$ whatever $q$ was. Then $|\hat q|^2 = \sum_i (g^q_i)^2 u_i^2 \le \max_i
# (g^q_i)^2 \, d$, and the same for $\hat k$. RoPE rotates pairs of coordinates, which keeps
# norms, so by Cauchy–Schwarz
# $$\Big|\frac{\hat q \cdot \hat k}{\sqrt d}\Big| \le \frac{|\hat q|\,|\hat k|}{\sqrt d}
#   \le \sqrt d \,\max_i |g^q_i| \,\max_i |g^k_i| =: B .$$
# The bound is reached (up to $\epsilon$) by a query and a key that put all their mass on the
# coordinates of the largest weights, aligned by the rotation. At initialisation every weight
# is 1, so with $d = 16$ no score can exceed $B = 4$. The bound does not depend on the
# projection weights at all: only the $2d$ norm weights (here, shared by the heads) move it.
#
# **One-hot over 32 keys.** Call a row one-hot when its largest weight is at least 0.99. With
# the top key at score $B$ and the other 31 at score $s_0$, that weight is
# $1/(1 + 31 e^{-(B - s_0)})$, so we need $B - s_0 \ge \ln(31 \cdot 99) = 8.03$.
#
# - If the other keys are unrelated to the query ($s_0 \approx 0$), $B \ge 8.03$: the product
#   $\max|g^q| \max|g^k|$ must reach $8.03 / 4 = 2.0$, each weight about $\sqrt 2$ times its
#   initial value.
# - In the most favourable case, all other keys at $-B$, $2B \ge 8.03$ and the product need only
#   be 1.0: a one-hot row is just possible at initialisation, but only for a query aligned with
#   one key and opposite to all the others.
#
# So QK-norm does not forbid sharp attention; it makes the sharpness a matter of a few weights
# that must *grow*. AdamW moves each weight by at most about the learning rate per step, so the
# $0.42$ of growth per weight takes at least $0.42/\text{lr}$ steps: about 140 at 3e-3, 14 at
# 3e-2 and 4 at 0.1. Without QK-norm the score is a product of two whole projection matrices,
# of size $d \times n_\text{embd}$ each, all of which Adam moves at once — hence section 2.1's
# scores in the thousands. We expect the 150-step models to respect $B$ everywhere, $B$ to grow
# with the learning rate, and the rate 0.1 to have grown it well past 8.

# %%
d_head = 16
needed_gap = math.log(31 * 99)
print(f"gap for a weight of 0.99 over 32 keys: {needed_gap:.2f}; product of the largest norm "
      f"weights needed: {needed_gap / math.sqrt(d_head):.2f} (others at 0), "
      f"{needed_gap / 2 / math.sqrt(d_head):.2f} (others at -B)")
growth = math.sqrt(needed_gap / math.sqrt(d_head)) - 1
print(f"growth per weight {growth:.2f}: at least",
      {lr: round(growth / lr) for lr in (3e-3, 3e-2, 1e-1)}, "AdamW steps")

# %% [markdown]
# Section 2.1's set-up: a 2-layer GPT (64 wide, 4 heads of 16, RoPE, RMSNorm, 32 positions) on
# character-level TinyShakespeare, 150 steps of AdamW with 20 steps of warm-up, here with
# QK-norm at the three learning rates and seed 0. For the last layer we compare $B$, computed
# from its `q_norm` and `k_norm` weights, with the largest $|q \cdot k| / \sqrt d$ over the four
# validation batches, read through the layer's own stages, and count the one-hot rows
# (queries at positions 8–31, all heads). To tie the runs to the chapter we also print section
# 2.1's own three figures, which it reads on the first validation batch only: the validation
# loss, the largest score and the mean over rows of the largest weight (its seed-0 column).

# %%
data = TokenData(prepare("tinyshakespeare", "char"))
block = 32
val_batches = [data.get_batch("val", 16, block, torch.Generator().manual_seed(0)) for _ in range(4)]


def char_model(seed, **options):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=data.vocab_size, block_size=block, n_layer=2, n_head=4,
                       n_embd=64, positions="rope", bias=False, norm="rmsnorm",
                       attention_options=options)
    return GPT(config)


def train(model, steps, lr, seed=0):
    """steps of AdamW (20 steps of linear warm-up) on random training batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        x_, y_ = data.get_batch("train", 16, block, gen)
        loss = model(x_, y_)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def last_layer_input(model, x_):
    """What the last attention layer receives for the tokens x_ (a forward pre-hook)."""
    seen = []
    hook = model.transformer.h[-1].attn.register_forward_pre_hook(
        lambda m, args: seen.append(args[0]))
    model(x_)
    hook.remove()
    return seen[0]


def qk_bound(attn):
    """sqrt(d) * max|g^q| * max|g^k| of a QK-normalised layer."""
    g_q, g_k = attn.q_norm.weight.abs().max().item(), attn.k_norm.weight.abs().max().item()
    return math.sqrt(attn.q_norm.weight.numel()) * g_q * g_k, g_q, g_k


@torch.no_grad()
def scores_and_rows(model):
    """Largest |q.k|/sqrt(d) of the last layer over the validation batches, the share of rows
    (queries 8-31, every head) whose largest weight is at least 0.99, and section 2.1's figures:
    validation loss, largest score and mean top weight (the last two on the first batch)."""
    attn, tops, one_hot, top_weight = model.transformer.h[-1].attn, [], [], []
    for x_, _ in val_batches:
        h = last_layer_input(model, x_)
        q, k, _ = attn.project(h)
        q, k = attn.position(*attn.normalize(q, k), 0)
        tops.append(((q @ k.transpose(-2, -1)) / math.sqrt(d_head)).abs().max().item())
        _, w = attn(h, need_weights=True)  # (16, 4, 32, 32)
        one_hot.append((w[:, :, 8:].amax(-1) >= 0.99).float().mean().item())
        top_weight.append(w.amax(-1).mean().item())
    loss = sum(model(x_, y_)[1].item() for x_, y_ in val_batches) / len(val_batches)
    return max(tops), sum(one_hot) / len(one_hot), (loss, tops[0], top_weight[0])


print("bound at initialisation:", round(qk_bound(char_model(0, qk_norm=True)
                                                  .transformer.h[-1].attn)[0], 4))

# %% tags=["nbval-ignore-output"]
t0 = time.perf_counter()
ex1 = {}
for lr in (3e-3, 3e-2, 1e-1):
    model = train(char_model(0, qk_norm=True), 150, lr)
    bound, g_q, g_k = qk_bound(model.transformer.h[-1].attn)
    top, one_hot, chapter_figures = scores_and_rows(model)
    ex1[lr] = bound, top, one_hot, chapter_figures
    print(f"lr {lr:<6}: max|g^q| {g_q:.2f}, max|g^k| {g_k:.2f}, bound B {bound:5.1f}; largest "
          f"score {top:5.1f} ({top / bound:.0%} of B); one-hot rows {one_hot:.1%}")
print(f"({time.perf_counter() - t0:.0f} s)")
print("section 2.1's figures for these seed-0 runs (val loss, max score, mean top weight):",
      {lr: f"{f[0]:.2f} {f[1]:.1f} {f[2]:.2f}" for lr, (_, _, _, f) in ex1.items()})
assert all(top <= bound * (1 + 1e-5) for bound, top, _, _ in ex1.values())  # never above B
assert ex1[3e-3][0] < ex1[3e-2][0] < ex1[1e-1][0]  # B grows with the learning rate
assert ex1[1e-1][0] > 2 * needed_gap and ex1[1e-1][2] > ex1[3e-3][2]  # room for one-hot rows

# %% [markdown]
# **Conclusion.** The bound holds in every model, and it is what the learning rate moves. At
# 3e-3 the largest norm weights grew from 1 to 1.25 and 1.21 in 150 steps: $B = 6.0$, the
# largest score seen is 5.2 (87% of $B$), and no row is one-hot — the product $1.25 \times 1.21 \approx 1.51$ is short of
# the 2.0 that a one-hot row over unrelated keys needs, as the estimate of at least 139 steps at
# this rate (plus the warm-up) said. At 3e-2 they reached 2.08 and 1.84 ($B = 15.3$, a product
# of 3.8, largest score 10.4) and 0.3% of the rows are one-hot; at 0.1, 3.01 and 3.26
# ($B = 39.3$, a product of 9.8, largest score 22.2, 57% of $B$) and 13.8% of the rows are
# one-hot. These are section 2.1's seed-0 runs (the first of its three seeds): read as it reads
# them, on the first validation batch, they give validation losses of 2.31, 2.44 and 2.51,
# largest scores of 5.2, 10.4 and 22.2 (the same as over all four batches: the largest falls on
# the first) and mean top weights of 0.46, 0.55 and 0.84. The weights grew far more slowly
# than Adam's limit allows — 2.3 in 150 steps at 0.1, not 15 — since their gradients do not
# keep one sign. The largest scores stay below $B$ because a trained query does not put all its
# mass on the coordinates with the largest weights. So QK-norm does not forbid a sharp softmax:
# it turns "how sharp" into $2d$ weights that move at most about one learning rate per step,
# where section 2.1's plain models, whose scores are products of whole matrices, reached
# hundreds and thousands at the larger rates.
#
# ## Exercise 2 — Soft-capping's gradient
#
# *Differentiate $c \tanh(s/c)$ and compute by how much it shrinks the gradient of a score of
# 30, 50 and 100 with $c = 50$. Check with autograd through the layer (`softcap=50.0`). Why might
# a model whose scores sit near the cap learn slowly?*
#
# **Prediction.** $\frac{d}{ds}\, c \tanh(s/c) = 1 - \tanh^2(s/c) = \operatorname{sech}^2(s/c)$:
# 1 at $s = 0$, and for large $s$ about $4 e^{-2s/c}$. Whatever reaches the capped score from
# the softmax is multiplied by this on its way back to the raw score, and from there to $W_q$,
# $W_k$ and everything below. With $c = 50$:
#
# - $s = 30$: $1 - \tanh^2(0.6) = 1 - 0.537^2 = 0.712$;
# - $s = 50$: $1 - \tanh^2(1) = 1 - 0.762^2 = 0.420$;
# - $s = 100$: $1 - \tanh^2(2) = 1 - 0.964^2 = 0.071$, a fourteenth.
#
# **The check.** To read the gradient of a single score out of a whole layer, we build one
# whose scores we choose: three heads of $d = 2$, no positions, no bias, two positions. The
# input is $x_0 = (1, 0)$ and $x_1 = (0, 1)$ in every head; the key projection is the identity,
# so $k_0 = e_0$, $k_1 = e_1$, and the query projection maps $x_1$ to $s_h \sqrt 2\,(1, 1)$ in head
# $h$, so the last query scores $s_h$ against both keys ($s_h$ = 30, 50, 100). Its two weights are
# then $1/2$ each, far from saturation. Only $x_1$ is nonzero in head $h$'s second coordinate,
# so the gradient of the query weights' column for that coordinate is
# $\partial L / \partial q_1$, whose $j$-th number is $\partial L / \partial s_j / \sqrt 2$
# (the keys are the basis vectors). The loss is a fixed random projection of the
# last position's output. A twin layer without a cap, with the same value and output weights
# and queries that score exactly $50 \tanh(s_h / 50)$, has the same attention weights, so the same
# gradient reaches its scores from above: the ratio of the two layers' score gradients must be
# $\operatorname{sech}^2(s_h / 50)$. Float64, so that the ratio is exact to many digits.

# %%
c_cap, d2 = 50.0, 2
raw = torch.tensor([30.0, 50.0, 100.0], dtype=torch.float64)
predicted = 1 - torch.tanh(raw / c_cap) ** 2


def score_gradients(scores, softcap):
    """dL/ds for the last query's two raw scores in each head (3 heads, d = 2): autograd through
    a whole layer whose weights make the last query score scores[h] against both keys."""
    torch.manual_seed(0)  # the same value and output weights in every layer built here
    config = AttentionConfig(n_embd=3 * d2, n_head=3, block_size=2, positions="none", bias=False,
                             softcap=softcap)
    layer = build_attention("mha", config).double()
    with torch.no_grad():
        w = layer.c_attn.weight  # (18, 6): query rows, key rows, value rows
        w[:12] = 0.0
        for h in range(3):
            w[2 * h : 2 * h + 2, 2 * h + 1] = scores[h] * math.sqrt(d2)  # q_1 = s*sqrt(d)*(1, 1)
            w[6 + 2 * h, 2 * h] = w[6 + 2 * h + 1, 2 * h + 1] = 1.0  # k_t = x_t, head by head
    x = torch.zeros(1, 2, 3 * d2, dtype=torch.float64)
    x[0, 0, 0::2] = 1.0  # x_0 = (1, 0) in every head
    x[0, 1, 1::2] = 1.0  # x_1 = (0, 1)
    y, weights = layer(x, need_weights=True)
    r = torch.randn(3 * d2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y[0, 1] @ r).backward()
    grad = layer.c_attn.weight.grad  # row 2h + j, column 2h + 1: dL/dq_1[h, j]
    per_key = torch.stack([grad[2 * h : 2 * h + 2, 2 * h + 1] for h in range(3)])  # (3, 2)
    return per_key * math.sqrt(d2), weights[0, :, 1].detach()


g_capped, w_capped = score_gradients(raw, c_cap)
g_twin, w_twin = score_gradients(c_cap * torch.tanh(raw / c_cap), None)
ratio = g_capped / g_twin
print("last query's weights, capped layer:", w_capped[:, :].tolist())
print("same weights in the uncapped twin:", torch.allclose(w_capped, w_twin))
for s_, pred, rat in zip(raw.tolist(), predicted.tolist(), ratio.tolist(), strict=True):
    print(f"raw score {s_:5.0f} -> capped {c_cap * math.tanh(s_ / c_cap):5.2f}: predicted "
          f"factor {pred:.4f}, autograd {rat[0]:.4f} and {rat[1]:.4f}")
assert torch.allclose(ratio, predicted[:, None].expand(3, 2), rtol=1e-9)

s_axis = torch.linspace(0, 150, 301)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(s_axis, 1 - torch.tanh(s_axis / c_cap) ** 2, label="sech²(s/50)")
ax.plot(raw, predicted, "o", label="the three scores")
ax.set(xlabel="raw score s", ylabel="gradient factor", title="what the cap lets through, c = 50")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# **Conclusion.** Autograd through the layer gives exactly the predicted factors: 0.7116 for a
# score of 30, 0.4200 for 50, 0.0707 for 100 (equal to the closed form to nine significant
# digits, and the same for both keys of each row). A model whose scores sit near or beyond the
# cap learns slowly for two reasons that compound. The gradient that reaches $W_q$ and $W_k$
# through those scores is scaled by $\operatorname{sech}^2(s/c)$, which falls exponentially:
# past $s = 2c$ less than 7% gets through. And the cap compresses differences: near the cap two
# scores 10 apart become about $10\operatorname{sech}^2(s/c)$ apart, so the softmax cannot
# separate keys that the raw scores separate, and pushing harder on them changes almost nothing.
# The cap is meant as a guard rail that rarely bites ($c = 50$ is large for scaled scores); a
# model that lives against it has stopped being able to sharpen or re-rank its attention there.
#
# ## Exercise 3 — How many sink tokens?
#
# *Repeat section 5.1 with windows of 4, 8 and 16 and `sink_tokens` 0, 1 and 4. Which matters,
# and why does one suffice in the toy?*
#
# **Prediction.** The plain toy layer learned a sink on the start vector at position 0: a query
# that has seen no marker puts nearly all its weight there, on a value that reads out as zero.
#
# - **`sink_tokens` = 0**: once the window has slid past position 0, such a query has only random
#   vectors to attend to, and its output is a weighted average of their values instead of
#   zero. The window size changes only how many vectors are averaged: more vectors, smaller
#   average. If the weights were uniform the error would fall as $1/w$, from about $1/4$ at
#   $w = 4$ through section 5.1's 0.13 at $w = 8$ to about $1/16$ at $w = 16$; weights that are not
#   uniform average fewer vectors, so somewhat more than that. No window repairs it.
# - **`sink_tokens` = 1**: the start is back in every query's view, and the error should return
#   to the trained layer's (about $10^{-4}$) for every window.
# - **`sink_tokens` = 4** adds positions 1–3, which hold random vectors like any other: the query
#   scores them like the window's keys, far below the start, so the result should be that of
#   one sink token.
#
# So the sink token matters and the window does not. One suffices because the toy has exactly
# one sink, a fixed vector at a fixed position, and the layer learned it; StreamingLLM keeps four
# because a model pre-trained without a dedicated start token spreads its sink over the first
# few positions (Xiao et al. also showed that a model pre-trained with one learned sink token
# streams well with that token alone).
#
# We rebuild the plain layer of section 4.2 with a start vector (its `toy_batch` and
# `train_toy`, unchanged: coordinate 0 flags markers, 1 the start, 2 the context flag, unused
# here, and the content is in coordinates 3 onwards; the same seeds and 800 Adam steps at 1e-2),
# and measure it as section 5.1 does: on the sequences of its batch (256, seed 1) that have no
# marker at all, at the positions where the window has evicted the start, $t \ge w$ (positions
# 8+ for $w = 8$, section 5.1's). So the two window-8 rows are section 5.1's two figures. The
# layer's weights also tell where the mass goes.

# %%
d_toy, T_toy = 16, 32


def toy_batch(B, gen, start=True, context=False):
    """x (B, T, d): coordinate 0 flags markers, 1 the start vector, 2 (with context) that a
    marker was seen; the target (B, T, d - 3); whether each position has seen no marker yet."""
    x_ = torch.randn(B, T_toy, d_toy, generator=gen)
    marker = torch.rand(B, T_toy, generator=gen) < 0.08
    marker[:, 0] = False
    seen = marker.float().cumsum(1)  # (B, T): markers so far
    x_[:, :, 0], x_[:, :, 1], x_[:, :, 2] = 3.0 * marker, 0.0, 3.0 * context * (seen > 0)
    if start:
        x_[:, 0] = 0.0
        x_[:, 0, 1] = 3.0  # the start vector
    total = (marker[..., None] * x_[..., 3:]).cumsum(1)  # (B, T, d - 3)
    return x_, total / seen.clamp(min=1)[..., None], seen == 0


def toy_config():
    return AttentionConfig(n_embd=d_toy, n_head=1, block_size=T_toy, positions="none")


def train_toy(start=True, context=False, **options):
    torch.manual_seed(0)
    config = AttentionConfig(n_embd=d_toy, n_head=1, block_size=T_toy, positions="none",
                             **options)
    toy = build_attention("mha", config)
    readout = torch.nn.Linear(d_toy, d_toy - 3, bias=False)
    opt = torch.optim.Adam([*toy.parameters(), *readout.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(800):
        x_, target, _ = toy_batch(64, gen, start, context)
        loss = F.mse_loss(readout(toy(x_)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return toy.eval(), readout


toy, readout = train_toy()  # section 4.2's ("start vector", "plain") layer
toy_x, toy_target, no_marker = toy_batch(256, torch.Generator().manual_seed(1))
quiet = no_marker[:, -1]  # sequences with no marker at all: every answer is zero
print("sequences with no marker:", int(quiet.sum()), "of 256")

# %% tags=["nbval-ignore-output"]
ex3 = {}
with torch.no_grad():
    _, w_full = toy(toy_x[quiet], need_weights=True)
    full_err = F.mse_loss(readout(toy(toy_x[quiet]))[:, 8:], toy_target[quiet][:, 8:]).item()
print(f"trained layer, full attention: MSE (positions 8+) {full_err:.1e}, weight on the start "
      f"{w_full[:, 0, 8:, 0].mean():.1%}")
print(f"{'window':>6} {'sink_tokens':>11} {'MSE (t >= w)':>12} {'on position 0':>13} "
      f"{'on 1-3':>7}")
for window in (4, 8, 16):
    for sink_tokens in (0, 1, 4):
        windowed = build_attention("local", toy_config(), window=window,
                                   sink_tokens=sink_tokens).eval()
        windowed.load_state_dict(toy.state_dict())
        with torch.no_grad():
            out, w = windowed(toy_x[quiet], need_weights=True)  # w: (n, 1, 32, 32)
            err = F.mse_loss(readout(out)[:, window:], toy_target[quiet][:, window:]).item()
        on_0 = w[:, 0, window:, 0].mean().item()
        on_123 = w[:, 0, window:, 1:4].sum(-1).mean().item()
        ex3[window, sink_tokens] = err, on_0, on_123
        print(f"{window:>6} {sink_tokens:>11} {err:>12.1e} {on_0:>13.1%} {on_123:>7.1%}")
assert all(ex3[w_, 0][0] > 100 * max(ex3[w_, 1][0], ex3[w_, 4][0]) for w_ in (4, 8, 16))
assert ex3[4, 0][0] > 1.5 * ex3[8, 0][0] > 2.25 * ex3[16, 0][0]  # about 1/w: halves, twice
assert all(ex3[w_, s_][1] > 0.9 and ex3[w_, s_][2] < 0.05 for w_ in (4, 8, 16) for s_ in (1, 4))

# %% [markdown]
# **Conclusion.** The sink token is what matters. Without it the error on the 17 marker-free
# sequences of section 5.1's batch is 0.26 with a window of 4, 0.13 with 8 and 0.065 with 16:
# it halves each time the window doubles, the $1/w$ of a uniform average ($1/4$, $1/8$, $1/16$)
# — the queries have nothing to prefer among random keys, so their weights are close to
# uniform, rather than the "somewhat more" we allowed for. No window comes near the trained
# layer's $7.4 \times 10^{-5}$ with full attention. With one sink token the error is
# $2.2$–$6.6 \times 10^{-5}$ for every window (below the full layer's, since fewer random
# keys compete with the sink), and with four, $3.3$–$7.7 \times 10^{-5}$: the queries put
# 96.6–99.2% of their weight on position 0 and 0.6% on positions 1–3 together. The window-8 rows,
# $1.3 \times 10^{-1}$ without the start and $3.7 \times 10^{-5}$ with it, are section 5.1's two
# figures, measured the same way on the same layer. One sink token suffices because the toy's
# sink is a single fixed start vector that the layer learned to recognise; the other early
# positions are ordinary random vectors with no special role, so keeping them only spends cache
# slots (and takes a little weight: the error with four is slightly above that with one). Four
# is StreamingLLM's choice for models whose sink is spread over the first few tokens, not a
# property of sinks.
#
# ## Exercise 4 — Reaching back
#
# *Without training: for a stack of four local blocks with a window of 8, for the 3 local : 1
# global stack with the global block last, and for the same with the global block first, find
# which input positions can change the prediction at the last of 64 positions (change one token
# at a time and compare the logits). Predict first from [chapter 9](../09_sliding_window.ipynb)'s
# rule for how the receptive field grows with depth. Does the place of the global block matter? What
# about three Gated DeltaNet blocks and no global one?*
#
# **Prediction.** A local layer of window $w$ lets position $i$ read positions $i - w + 1$ to
# $i$; the MLPs, norms and RoPE act within a position and add no reach. So each layer adds
# $w - 1$ positions, and after $L$ layers position $i$ depends on inputs back to
# $i - L(w - 1)$ ([chapter 9](../09_sliding_window.ipynb)'s rule).
#
# - **Four local layers, $w = 8$**: $4 \cdot 7 = 28$ positions back, so the inputs at
#   positions **35 to 63** (29 of them) can change the prediction at position 63, and positions
#   0 to 34 cannot change it at all: no path connects them, so their change is exactly zero,
#   not just small.
# - **3 local : 1 global, global last**: the global layer at position 63 reads every position's
#   residual stream, and each of those already carries its own input: all **64** positions.
# - **Global first**: the global layer writes into every position $i$ a mixture of all the
#   inputs $0 \ldots i$; the three local layers then carry positions $63 - 21 = 42$ to 63 to the
#   last one, and position 42 already holds something of every input from 0 to 42. So again all
#   **64**. The place of the global block does not change *which* positions can matter, only
#   the paths (fetch then relay, or relay then fetch) and so, in a trained model, what can be
#   computed before and after the long-range step.
# - **Three Gated DeltaNet layers**: a recurrence whose state at $t$ is written by every input up
#   to $t$, so all **64** positions, in exact arithmetic. Input $j$ enters the state and is then
#   multiplied by the decays $\alpha_{j+1} \cdots \alpha_{63}$, so its influence should shrink
#   with the distance — but slowly: a new layer's decay rates are spread over several orders of
#   magnitude (`A_log`, `dt_bias` initialised as Mamba-2's), so some heads barely forget.
#
# **The check.** Randomly initialised GPTs (4 heads, 64 wide, vocabulary 64, RoPE, RMSNorm,
# seed 0), in float64 so that float noise is about $10^{-16}$; one random sequence of 64 tokens,
# and 64 copies of it, the $j$-th with token $j$ replaced by the next id. Input $j$ "can change
# the prediction" when the largest $|\Delta\text{logit}|$ at position 63 exceeds $10^{-9}$
# times the largest logit, far above float noise.

# %%
T_reach, vocab_reach = 64, 64
reach_stacks = {"4 local": ["local"] * 4,
                "3 local, then global": ["local"] * 3 + ["mha"],
                "global, then 3 local": ["mha"] + ["local"] * 3,
                "3 gated_deltanet": ["gated_deltanet"] * 3}


def reach_model(pattern):
    torch.manual_seed(0)
    options = {"window": 8} if "local" in pattern else {}
    config = GPTConfig(vocab_size=vocab_reach, block_size=T_reach, n_layer=len(pattern),
                       n_head=4, n_embd=64, positions="rope", bias=False, norm="rmsnorm",
                       layer_attention=pattern, attention_options=options)
    return GPT(config).double().eval()


@torch.no_grad()
def last_logit_changes(model, idx):
    """max |change| of the logits at the last position when token j alone is replaced, for each
    j (T,), and the largest |logit| of the unchanged sequence."""
    changed = idx.repeat(T_reach, 1)  # (T, T): row j has token j replaced
    rows = torch.arange(T_reach)
    changed[rows, rows] = (idx[0] + 1) % vocab_reach
    base = model(idx)[0][0, -1]  # (vocab,)
    return (model(changed)[0][:, -1] - base).abs().amax(-1), base.abs().max().item()


idx = torch.randint(0, vocab_reach, (1, T_reach), generator=torch.Generator().manual_seed(0))
bands = [(0, 0), (1, 7), (8, 21), (22, 28), (29, 42), (43, 63)]  # distances 63 - j
ex4 = {}
print(f"{'stack':>21} {'positions that change it':>25}   max |delta logit| at distance "
      + "  ".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in bands))
for name, pattern in reach_stacks.items():
    delta, scale = last_logit_changes(reach_model(pattern), idx)
    reached = (delta > 1e-9 * scale).nonzero().flatten().tolist()
    by_band = [delta[T_reach - 1 - hi : T_reach - lo].max().item() for lo, hi in bands]
    ex4[name] = reached, by_band, delta / scale
    print(f"{name:>21} {f'{len(reached)}: {reached[0]} to {reached[-1]}':>25}   "
          + "  ".join(f"{v:.1e}" for v in by_band))

edge = ex4["4 local"][2]
print(f"4 local, relative change at distance 28 (position 35): {edge[35]:.1e}; at 29: {edge[34]}")
with torch.no_grad():  # each head's decay per step, exp(-A dt), taking a_proj(x) = 0
    for i, block_ in enumerate(reach_model(reach_stacks["3 gated_deltanet"]).transformer.h):
        alpha = torch.exp(-block_.attn.A_log.exp() * F.softplus(block_.attn.dt_bias))
        print(f"gated_deltanet layer {i}: decay per step by head",
              " ".join(f"{a:.4f}" for a in alpha.tolist()),
              f"-> after 63 steps {' '.join(f'{a:.1e}' for a in (alpha ** 63).tolist())}")
assert ex4["4 local"][0] == list(range(35, 64))  # 4 * (8 - 1) = 28 back: 35..63 exactly
assert (ex4["4 local"][2][:35] == 0).all()  # nothing at all from further back
assert ex4["4 local"][2][35] > 1e3 * 1e-9  # its edge (relative change) is far above 1e-9
for name in ("3 local, then global", "global, then 3 local", "3 gated_deltanet"):
    assert ex4[name][0] == list(range(64)), name  # every position
far, near = ex4["3 gated_deltanet"][1][-1], ex4["3 gated_deltanet"][1][1]
assert 1e-6 < far < near / 3  # decays with distance, but far from zero

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.2))
for name, (_, _, delta) in ex4.items():
    distance = torch.arange(T_reach - 1, -1, -1)
    shown = delta.clamp(min=1e-12)  # exact zeros drawn at the bottom
    ax.plot(distance, shown, marker=".", label=name)
ax.axvline(28, color="grey", ls=":", label="4 (w - 1) = 28")
ax.set(yscale="log", xlabel="distance 63 - j of the changed token", ylim=(5e-13, 5),
       ylabel="max |Δ logit| / max |logit|",
       title="what reaches position 63, untrained (zeros drawn at 1e-12)")
ax.legend(fontsize=7, loc="lower left")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Conclusion.** Every prediction holds. The four local layers are changed by exactly the 29
# inputs at positions 35 to 63: at distance 28 (position 35) the change is small,
# $3.3 \times 10^{-6}$ of the largest logit, since a single chain of window edges leads there,
# and at distance 29 it is exactly 0.0 — no path, not a faded one. Both 3 local : 1 global
# stacks are changed by all 64 inputs, and by about as much: beyond the local layers' reach
# (distances 29–63) the largest change is $5.4 \times 10^{-3}$ with the global block last and
# $6.6 \times 10^{-3}$ with it first. So the place of the global block does not decide *which*
# positions reach the prediction — first, it spreads every input into every position, which the
# local layers then relay; last, it reads every position directly. What the place changes is
# what the model can compute around the long-range step (with the global block first, nothing
# local has been computed before it fetches), which only training would show. The three Gated
# DeltaNet layers, with no global block at all, are changed by all 64 inputs too, and decaying
# with distance only mildly: the largest change falls from $1.8 \times 10^{-1}$ at distances
# 1–7 to $4.0 \times 10^{-2}$ at 22–28 and $2.3 \times 10^{-2}$ at 43–63. The printed decays
# say why: a new layer's heads forget at very different rates (0.68 to 0.998 per step), and
# each layer has a head that keeps 59% to 90% of an input after 63 steps, while its fast heads
# keep as little as $3 \times 10^{-11}$. In exact arithmetic nothing is ever cut off; only a trained
# decay that forgets fast in every head could make far inputs negligible.
#
# ## Exercise 5 — Gemma 3 with grouped queries
#
# *Recount section 6.1's table for Gemma 3 27B's attention (62 layers, 32 query heads, 16
# key/value heads, head_dim 128, window 1024, bfloat16) at 128k tokens, for the 5:1 stack and
# for all-global. 62 is not a multiple of 6: with every sixth layer global, how many are
# global? How many GB per sequence does each stack need?*
#
# **Prediction.** With every sixth layer global (layers 6, 12, …, 60), $\lfloor 62/6 \rfloor =
# 10$ layers are global and **52 are local**: the pattern (local × 5, global) repeated over 62
# layers ends with two local layers, after the tenth global one. A layer caches a key and a
# value per key/value head per position: $2 \cdot 16 \cdot 128 = 4096$ numbers, 8192 bytes in
# bfloat16 (the 32 query heads cost nothing in the cache). At $L = 131{,}072$:
#
# - **all global**: $62 \cdot 8192 \cdot 131{,}072 = 66{,}571{,}993{,}088$ bytes, **66.6 GB**
#   (62 GiB), 507,904 bytes per token;
# - **5:1**: 10 global layers and 52 local ones. Global: $10 \cdot 8192 \cdot 131{,}072 =
#   10{,}737{,}418{,}240$ bytes; local: $52 \cdot 8192 \cdot 1024 = 436{,}207{,}616$ bytes;
#   together $11{,}173{,}625{,}856$ bytes, **11.2 GB**, 85,248 bytes per token — 16.8% of
#   all-global, 6 times less.
#
# The windows are 4% of the 5:1 stack's cache: at 128k it is the 10 global layers that cost.
# Section 6.1's GPT-2-shaped table (12 MHA heads of 64, float32) gave 0.173 of all-global for
# the pattern over 12 layers (2 global of 12); with 10 of 62 global the share is lower, and
# grouped queries divide both stacks by 2 relative to 32 key/value heads. We check the formula
# with `bench.cache_bytes_formula` (2 bytes per number) on the full configurations, and against
# the caches a model really builds (`GPT.cache_bytes_per_token`, a bfloat16 model on the meta
# device, which allocates nothing) on one period of six layers of the same shape.

# %%
L_ctx = 131072
gemma_shape = dict(vocab_size=256, block_size=L_ctx, n_head=32, n_embd=32 * 128,
                   positions="rope")


def gemma_config(n_layer, period):
    pattern = layer_pattern(period, n_layer)
    options = {"n_kv_head": 16, **({"window": 1024} if "local" in pattern else {})}
    return GPTConfig(**gemma_shape, n_layer=n_layer, layer_attention=pattern,
                     attention_options=options)


by_hand = {"5:1": (10 * 8192 * L_ctx + 52 * 8192 * 1024), "all global": 62 * 8192 * L_ctx}
periods = {"5:1": ["local"] * 5 + ["gqa"], "all global": ["gqa"]}
for name, period in periods.items():
    config = gemma_config(62, period)
    per_token = cache_bytes_formula(config, L_ctx, bytes_per_number=2)
    total = per_token * L_ctx
    variants = config.layer_variants()
    n_global, n_local = variants.count("gqa"), variants.count("local")
    assert (n_global, n_local) == ((10, 52) if name == "5:1" else (62, 0))
    print(f"{name:>10}: {n_global} global and {n_local} local layers, "
          f"{per_token:,.0f} bytes per token, {total:,.0f} bytes = {total / 1e9:.1f} GB "
          f"({total / 2**30:.1f} GiB) per sequence of {L_ctx:,} tokens")
    assert total == by_hand[name]
print(f"5:1 / all global: {by_hand['5:1'] / by_hand['all global']:.3f}; windows' share of the "
      f"5:1 cache: {52 * 8192 * 1024 / by_hand['5:1']:.1%}")

for name, period in periods.items():  # one period, measured from the caches
    config = gemma_config(6, period)
    with torch.device("meta"):
        model = GPT(config).to(torch.bfloat16)
    measured = model.cache_bytes_per_token(L_ctx)
    formula = cache_bytes_formula(config, L_ctx, bytes_per_number=2)
    print(f"6 layers, {name:>10}: formula {formula:,.0f}, measured {measured:,.0f} bytes/token")
    assert measured == formula

# %% [markdown]
# **Conclusion.** At 128k tokens Gemma 3 27B's all-global attention would cache 66.6 GB per
# sequence (507,904 bytes per token); its 5:1 stack caches 11.2 GB (85,248 bytes per token),
# 0.168 of it, of which the 52 windows are only 3.9%. `cache_bytes_formula` counts the same
# bytes from the configs, and one six-layer period of the same shape builds caches of exactly
# what it counts (8,512 bytes per token for five windows and one global layer, 49,152 for six
# global layers). Grouped queries already halve both figures, yet the 5:1 stack's 11.2 GB for
# *one* sequence is still a fifth of the 54 GB that the 27B weights take in bfloat16: its 10
# global layers grow with the context, so at 128k they, not the windows, set the memory bill.

# %% tags=["nbval-ignore-output"]
print(f"notebook executed in {time.perf_counter() - t_start:.0f} s")
