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
# # Chapter 15 — The modern attention block: QK-norm, output gates, sinks, soft-capping, hybrid stacks, streaming
#
# A 2025–2026 model card names its attention in a word — "GQA", "sliding window", "MLA" — and
# the previous chapters built each of those. Open the model's code and the layer does a few more
# small things, each a line or two, each added because something went wrong without it:
#
# - **QK-norm** (OLMo 2, Gemma 3, Qwen3, nanochat): queries and keys are RMS-normalised before
#   their dot product (per head and before RoPE in Qwen3 and Gemma 3), because the dot products
#   grew until training diverged;
# - an **output gate** (Qwen3-Next; Qiu et al., 2025): each head's output is multiplied by a
#   sigmoid of the layer's input, so a head can say "nothing" without bending its softmax;
# - **sink logits** (gpt-oss): one learned extra logit per head in every softmax denominator, for
#   the same reason;
# - **soft-capping** (Gemma 2): scores squashed into $(-c, c)$ by $c \tanh(s / c)$;
# - **hybrid stacks**: not every layer attends globally — Gemma 3 runs five sliding-window layers
#   per global one, gpt-oss alternates them, Qwen3-Next puts three Gated DeltaNet layers
#   ([chapter 12](12_gated_deltanet.ipynb)) before each full-attention layer — which cuts the KV
#   cache;
# - **streaming**: with every cache bounded, generation runs past the context length with flat
#   memory, if the first few tokens stay in the cache (StreamingLLM's *attention sinks*).
#
# **Learning goals**
#
# - Build QK-norm, see the attention logits it bounds, and measure what it changes in a
#   learning-rate sweep on a small model (several seeds, reported as measured).
# - Build soft-capping and the two ways to let a head attend to nothing (a sink logit, an output
#   gate); find out when a model grows an attention sink, and when ours do not.
# - Stream a model 10× past its `block_size` with a rolling cache, with and without sink tokens,
#   and measure the loss and the cache's bytes.
# - Build hybrid stacks with `GPTConfig(layer_attention=[...])`, count their cache bytes per
#   token (formula = measured), and train three of them side by side.

# %% [markdown]
# ## Setup
#
# Seeds everywhere; the outputs the book's tests compare are shapes, booleans and rounded
# numbers. Training cells are ignored by the tests (their last digits differ from one machine to
# the next) and assert their claims with a margin instead. The chapter runs on one thread, as
# chapters 8–14 do.

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from attnbook.attention import AttentionConfig, attention_class, available, build_attention
from attnbook.data import TokenData, prepare
from attnbook.model import GPT, GPTConfig, layer_pattern

torch.set_num_threads(1)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. Where each piece goes
#
# [Chapter 3](03_multi_head_attention.ipynb)'s skeleton — project, position, attend, merge the heads
# — gains two stages and two changes inside the softmax. The diagram marks them: QK-norm between the
# projection and RoPE, soft-capping and the sink logit inside the softmax, the gate between the
# attention and the output projection. `attnbook.attention.base.Attention.forward` reads in the same
# order:
#
# ```python
# q, k, v = self.project(x)
# q, k = self.normalize(q, k)        # QK-norm
# q, k = self.position(q, k, start)  # RoPE
# y, weights = self.attend(q, k, v, attn_mask, need_weights, cache)  # softcap, sinks inside
# y = self.gate(y, x)                # output gate
# y = self.out(y)
# ```
#
# Each piece is a field of `AttentionConfig` — `qk_norm`, `output_gate`, `sinks`, `softcap` — so
# every variant of the book inherits it from the skeleton or refuses it when built, saying why.
# The cell below builds every registered variant with each option (and the settings `compare`
# would choose for 32 positions) and records which refuse:

# %%
option_kwargs = {"qk_norm": dict(qk_norm=True), "output_gate": dict(output_gate=True),
                 "sinks": dict(sinks=True), "softcap": dict(softcap=20.0)}
takes = {}  # (variant, option) -> True if it builds
with torch.random.fork_rng(devices=[]):  # the layers' random weights leave the seed's stream alone
    for name in available():
        for option, kwargs in option_kwargs.items():
            cfg_opt = AttentionConfig(n_embd=64, n_head=4, block_size=32, positions="rope",
                                      **kwargs)
            try:
                build_attention(name, cfg_opt, **attention_class(name).options_for_length(32, 4))
                takes[name, option] = True
            except ValueError:
                takes[name, option] = False
print(f"{'':>15}" + "".join(f"{option:>12}" for option in option_kwargs))
for name in available():
    print(f"{name:>15}" + "".join(f"{'takes' if takes[name, o] else 'refuses':>12}"
                                  for o in option_kwargs))

# %% [markdown]
# Why each refusal:
#
# | variant | refuses | why |
# | --- | --- | --- |
# | `mla`, `dsa` (built on MLA) | `qk_norm` | its keys are a shared latent, not per-head vectors of `head_dim`; it normalises the latent instead (option `kv_norm`) |
# | `nsa` | `sinks`, `softcap` | three softmaxes and a block ranking read from one of them; its gates already let a head shrink a branch to nothing |
# | `linear` | `qk_norm`, `sinks`, `softcap` | its queries and keys are positive features ($\mathrm{elu} + 1$), which a learned RMSNorm weight could make negative; no softmax for a sink to join, no scores to cap |
# | `deltanet` | `qk_norm`, `sinks`, `softcap` | it L2-normalises its queries and keys itself (the delta rule needs unit keys), a QK-norm of its own; no softmax, no scores |
# | `gated_deltanet` | the same, and `output_gate` | the same; and it gates its output by default (`use_gate=True`, $\mathrm{RMSNorm}(o) \cdot \mathrm{silu}(x W_g)$), so the sigmoid gate needs `use_gate=False` |
#
# Every other variant (`mha`, `mqa`, `gqa`, `local`, `sparse`, `moba`) takes all four.

# %%
stages = ["x", "project\nq, k, v", "QK-norm\n(RMSNorm)", "RoPE", "scores\nq·k/√d",
          "soft-cap\nc·tanh(s/c)", "softmax\n+ sink logit", "weights·v", "output gate\n⊙σ(x W_g)",
          "c_proj"]
new = {2, 5, 6, 8}  # the stages this chapter adds
fig, ax = plt.subplots(figsize=(12, 2.2))
for i, name in enumerate(stages):
    ax.add_patch(plt.Rectangle((i * 1.2, 0), 1.0, 1.0, color="tab:orange" if i in new else
                               "lightgray", alpha=0.9))
    ax.text(i * 1.2 + 0.5, 0.5, name, ha="center", va="center", fontsize=8)
    if i:
        ax.annotate("", xy=(i * 1.2, 0.5), xytext=(i * 1.2 - 0.2, 0.5),
                    arrowprops=dict(arrowstyle="->"))
ax.annotate("", xy=(8 * 1.2 + 0.5, 1.0), xytext=(0.5, 1.0),
            arrowprops=dict(arrowstyle="->", connectionstyle="arc3,rad=-0.12", color="tab:orange"))
ax.text(4.6, 1.55, "the gate reads the layer's input x", ha="center", fontsize=8, color="tab:orange")
ax.set(xlim=(-0.2, 12), ylim=(-0.2, 1.9))
ax.axis("off")
ax.set_title("one attention layer; orange: the modern block's additions", fontsize=10)
plt.show()

# %% [markdown]
# Sink tokens and hybrid stacks are not in the diagram: they act on the cache and on the stack of
# layers, not inside one layer (sections 5 and 6).

# %% [markdown]
# ## 2. QK-norm
#
# A score is $q \cdot k / \sqrt{d}$, and nothing bounds it: if training makes the query and key
# weights larger, every score grows with the product of their norms, the softmax turns into a
# one-hot choice, its gradients vanish for every other key, and updates that follow can spike
# the loss. Dehghani et al. (2023) saw training diverge this way at 8B parameters while scaling
# vision transformers, and normalised queries and keys (with LayerNorm) to train their 22B one;
# Wortsman et al. (2023) reproduced the failure in *small* models trained with large learning
# rates, and showed that the same normalisation removes it. That is **QK-norm**. Qwen3 and
# Gemma 3 apply an RMSNorm to each head's query and key vectors (a learned scale per dimension,
# shared by the heads) after the projection and *before* RoPE, and so does our layer; OLMo 2
# normalises the whole projected $q$ and $k$ (all heads together), nanochat uses an RMSNorm
# without weights after RoPE (without weights the place does not matter: a rotation keeps the
# norm). With learned scales $g^q$, $g^k$ a score is at most
# $\sqrt{d}\,\max_i |g_i^q|\,\max_i |g_i^k|$ (exercise 1), whatever the projection weights do.
#
# By hand, for a batch of 2 sequences of 10 positions and 4 heads whose queries have $d = 16$
# numbers each:

# %%
d = 16
q = 5 * torch.randn(2, 4, 10, d)  # (B, n_head, T, d): large queries
g = 1 + 0.1 * torch.randn(d)  # the learned scale, shared by the heads
q_normed = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * g  # RMSNorm per head
print("RMS of each query before:", q.pow(2).mean(-1).sqrt()[0, 0, :4],
      "after:", q_normed.pow(2).mean(-1).sqrt()[0, 0, :4])

# %% [markdown]
# The norm gives each query an RMS of 1 before the learned scale $g$ multiplies each dimension;
# $g$ is near 1, so the printed values sit near 1 rather than at it.

# %% [markdown]
# The layer's `normalize` stage does the same with `q_norm` and `k_norm` (`nn.RMSNorm`); we check
# it against our formula on a layer's own projections:

# %%
cfg = AttentionConfig(n_embd=64, n_head=4, block_size=32, positions="rope", qk_norm=True)
layer = build_attention("mha", cfg)
with torch.no_grad():
    layer.q_norm.weight.copy_(1 + 0.1 * torch.randn(16))
    x = torch.randn(2, 32, 64)
    q, k, v = layer.project(x)  # (2, 4, 32, 16) each
    qn, kn = layer.normalize(q, k)


def rms_norm(t, weight, eps=1e-6):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


print("normalize == RMSNorm by hand:",
      torch.allclose(qn, rms_norm(q, layer.q_norm.weight), atol=1e-6),
      torch.allclose(kn, rms_norm(k, layer.k_norm.weight), atol=1e-6))
assert torch.allclose(qn, rms_norm(q, layer.q_norm.weight), atol=1e-6)

# %% [markdown]
# ### 2.1 A learning-rate sweep
#
# Does it matter in a model small enough for this notebook? We train a 2-layer GPT (64 wide, 4
# heads, RoPE, RMSNorm, 32 positions) on character-level TinyShakespeare for 150 steps of AdamW
# at three learning rates, with and without QK-norm, three seeds each, and record the validation
# loss, the largest attention score $|q \cdot k| / \sqrt{d}$ of the last layer on a fixed batch
# (over every query–key pair of the 32 positions, the future ones the mask hides included: the
# size of the scores, not only of those that reach the softmax), and how one-hot its softmax is (the mean over query rows of the largest weight). The scores are
# read from the layer's own stages (`project`, `normalize`, `position`), on the input a forward
# pre-hook records. 150 steps leave every model far from converged: the sweep asks how
# training *starts* at each rate. A third arm bounds the scores the other way, with
# soft-capping (section 3, $c = 20$) at the largest rate. For that arm the printed scores are the
# raw ones, before the cap: the softmax sees them squashed into $(-20, 20)$, and section 3
# explains why they grow so large anyway.

# %%
data = TokenData(prepare("tinyshakespeare", "char"))
block = 32
val_batches = [data.get_batch("val", 16, block, torch.Generator().manual_seed(0)) for _ in range(4)]


def char_model(seed, attention="mha", layer_attention=None, n_layer=2, **options):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=data.vocab_size, block_size=block, n_layer=n_layer, n_head=4,
                       n_embd=64, positions="rope", bias=False, norm="rmsnorm",
                       attention=attention, layer_attention=layer_attention,
                       attention_options=options)
    return GPT(config)


def train(model, steps, lr, seed=0):
    """steps of AdamW (20 steps of linear warm-up) on random training batches; the
    validation loss on the fixed batches after."""
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
    return val_loss(model)


@torch.no_grad()
def val_loss(model):
    model.eval()
    return sum(model(x_, y_)[1].item() for x_, y_ in val_batches) / len(val_batches)


@torch.no_grad()
def layer_inputs(model, x_):
    """What each attention layer receives for the tokens x_ (recorded by forward pre-hooks)."""
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for b in model.transformer.h]
    model(x_)
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def score_stats(model, x_):
    """The last layer's largest |q·k|/sqrt(d), through its own stages, and the mean over its
    query rows of the largest attention weight (1: one-hot)."""
    attn = model.transformer.h[-1].attn
    h = layer_inputs(model, x_)[-1]
    q, k, _ = attn.project(h)
    q, k = attn.position(*attn.normalize(q, k), 0)
    top_weight = attn(h, need_weights=True)[1].amax(-1).mean().item()
    return ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).abs().max().item(), top_weight


# %% tags=["nbval-ignore-output"]
lrs, seeds = [3e-3, 3e-2, 1e-1], [0, 1, 2]
arms = {"plain": ({}, lrs), "QK-norm": (dict(qk_norm=True), lrs),
        "soft-cap 20": (dict(softcap=20.0), [1e-1])}
sweep = {}  # (arm, lr) -> [(val loss, max score, mean top weight) per seed]
models = {}
for arm, (options, arm_lrs) in arms.items():
    for lr in arm_lrs:
        for seed in seeds:
            model = char_model(seed, **options)
            loss = train(model, 150, lr, seed)
            sweep.setdefault((arm, lr), []).append((loss, *score_stats(model, val_batches[0][0])))
            models[arm, lr, seed] = model
print(f"{'':>11} {'lr':>6} {'val loss (3 seeds)':>20} {'max raw score (before any cap)':>31} "
      f"{'mean top weight':>17}")
for (arm, lr), runs in sweep.items():
    print(f"{arm:>11} {lr:>6} {' '.join(f'{r[0]:.2f}' for r in runs):>20} "
          f"{' '.join(f'{r[1]:6.0f}' for r in runs):>31} "
          f"{' '.join(f'{r[2]:.2f}' for r in runs):>17}")
mean = {key: sum(r[0] for r in runs) / len(runs) for key, runs in sweep.items()}
assert mean["QK-norm", 1e-1] < mean["plain", 1e-1]  # at the largest rate QK-norm trains better
assert max(r[1] for r in sweep["QK-norm", 1e-1]) < min(r[1] for r in sweep["plain", 1e-1])

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for (arm, (_, arm_lrs)), color in zip(arms.items(), ("C0", "C1", "C2"), strict=True):
    ax.plot(arm_lrs, [mean[arm, lr] for lr in arm_lrs], "o-", color=color, label=arm)
    for lr in arm_lrs:  # each seed as a dot
        ax.scatter([lr] * len(seeds), [r[0] for r in sweep[arm, lr]], color=color, s=10,
                   alpha=0.5)
ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation loss after 150 steps",
       title="learning-rate sensitivity (line: mean of 3 seeds)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# What the sweep shows, with the caveats of 150-step runs on three seeds: at 3e-3 the two train
# alike (2.30–2.37 plain, 2.31–2.35 with QK-norm); at 3e-2 and 1e-1 the plain model ends at
# 2.66–3.02 and the QK-normalised one at 2.44–2.57, every seed on the same side. That is Wortsman
# et al.'s finding in miniature: their loss-against-learning-rate curves are flatter with QK-norm,
# at every model size. The other two columns are consistent with their explanation. Without the
# norm the largest scores reach hundreds and thousands at the larger rates (590 to 2,373), and the
# softmax is one-hot in practice: a query row's largest weight is 0.97–1.00 on average, and a
# one-hot row passes almost no gradient to any of its scores (each gets $p(1 - p) \approx 0$;
# section 3 measures it). With it the scores stay between 5 and 27, bounded by the norms' learned
# scales (exercise 1 prints the bound). With scales of 1 that bound would be $\sqrt{16} = 4$ (the
# heads have 16 numbers), so a score of 27 means the learned scales grew: the largest
# $|g_i^q|$ and $|g_i^k|$ multiply to at least $27/4$. The largest weight averages 0.55–0.84 at
# the larger rates. The third arm, soft-capping, is read in section 3, which explains it. A model
# this small, trained for 150 steps, cannot show the real failure, a loss that diverges after
# thousands of steps (Wortsman et al.'s "small" models have millions of parameters and train for
# many thousands of steps); what it shows is the sensitivity.

# %% [markdown]
# ## 3. Soft-capping
#
# Gemma 2 bounded the scores differently: each scaled score $s$ becomes $c \tanh(s / c)$, which
# is $s$ for $|s| \ll c$ and never passes $\pm c$ ($c = 50$ in Gemma 2's attention, 30 on its
# final logits). Unlike QK-norm it needs no parameters, but it is a function *of the scores*,
# applied between the two matrix products that a fused kernel keeps together:
# `F.scaled_dot_product_attention` takes no such function, so our layer computes the explicit
# scores when `softcap` is set, and our chapter-8 `impl="flash"` refuses it (the FlashAttention-2
# library itself added a soft-capping option for Gemma 2 in 2024). Gemma 3 replaced it with QK-norm.

# %%
s = torch.linspace(-120, 120, 241)
fig, ax = plt.subplots(figsize=(5, 3))
for c in (20, 50):
    ax.plot(s, c * torch.tanh(s / c), label=f"c = {c}")
ax.plot(s, s, "k:", label="no cap")
ax.set(xlabel="score s", ylabel="capped score", ylim=(-70, 70), title="c·tanh(s/c)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The layer with `softcap=5.0`, checked against the formula on section 2's input `x`; its query
# and key weights are scaled up so that the raw scores pass the cap (head_dim 16, so the
# softmax scale is $1/\sqrt{16} = 1/4$):

# %%
cfg_cap = AttentionConfig(n_embd=64, n_head=4, block_size=32, positions="rope", softcap=5.0)
capped = build_attention("mha", cfg_cap).eval()
with torch.no_grad():
    capped.c_attn.weight.mul_(8)  # large scores, so that the cap bites
    _, w = capped(x, need_weights=True)
    q, k, v = capped.project(x)
    q, k = capped.position(q, k, 0)
    raw = q @ k.transpose(-2, -1) / 4  # (2, 4, 32, 32): the scaled scores
    scores = 5.0 * torch.tanh(raw / 5.0)
    w_by_hand = torch.softmax(scores.masked_fill(~torch.ones(32, 32).tril().bool(), -math.inf), -1)
print(f"largest |raw score| {raw.abs().max():.0f}, after the cap {scores.abs().max():.2f} (c = 5)")
print("weights == softmax(c·tanh(s/c)) by hand:", torch.allclose(w, w_by_hand, atol=1e-6))
assert torch.allclose(w, w_by_hand, atol=1e-6)

# %% [markdown]
# Back to section 2.1's sweep, whose third arm capped the scores at $c = 20$ at the largest
# learning rate. Its softmax is not one-hot (the largest weight averages 0.23–0.30), yet its
# loss, 2.85–2.92, is barely better than the plain model's 2.91–3.02; its *raw* scores, printed
# before the cap, grew to 3,383–4,058. How much gradient reaches a score? Through the softmax, the
# top score of a row gets $p(1 - p)$ times the gradient of its weight; through the cap, every
# score gets $\tanh'(s/c) = 1 - \tanh^2(s/c)$ of the gradient of its capped value. Measured on
# the last layer of each model at learning rate 0.1, over the causal scores of one batch:

# %% tags=["nbval-ignore-output"]
@torch.no_grad()
def gradient_factors(model):
    """Last layer: the mean p(1 - p) of each row's top weight, and the mean tanh'(s / c) over
    the causal scores (1 without a cap)."""
    attn = model.transformer.h[-1].attn
    h = layer_inputs(model, val_batches[0][0])[-1]
    top = attn(h, need_weights=True)[1].amax(-1)  # (B, n_head, T)
    q, k, _ = attn.project(h)
    q, k = attn.position(*attn.normalize(q, k), 0)
    raw = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, n_head, T, T)
    c = attn.config.softcap
    slope = 1 - torch.tanh(raw / c) ** 2 if c else torch.ones_like(raw)
    causal = torch.ones(block, block).tril().bool()
    return (top * (1 - top)).mean().item(), slope[..., causal].mean().item()


factors = {arm: [gradient_factors(models[arm, 1e-1, seed]) for seed in seeds] for arm in arms}
for arm, per_seed in factors.items():
    print(f"{arm:>11} at lr 0.1: top weight's p(1 - p) "
          f"{' '.join(f'{f[0]:.3f}' for f in per_seed)}; tanh' of the scores "
          f"{' '.join(f'{f[1]:.3f}' for f in per_seed)}")
assert max(f[1] for f in factors["soft-cap 20"]) < 0.5  # most raw scores sit on tanh's flat part

# %% [markdown]
# The plain model's top weights pass almost nothing back ($p(1-p)$ of 0.003–0.015: one-hot
# rows). The capped model's rows are not one-hot (0.10–0.13, as with QK-norm's 0.10–0.17), but
# the cap's own slope averages 0.015–0.037 over its raw scores, so their gradient is cut there
# instead, by about 27 to 67 times (1/0.037 to 1/0.015). Bounding the softmax's input is not
# enough; QK-norm bounds the queries and keys themselves, and both factors stay large with it.

# %% [markdown]
# ## 4. Attention sinks, sink logits and the output gate
#
# A softmax row sums to one: a head *must* put its weight somewhere, even where nothing in the
# context is relevant to it. Xiao et al. (2024) found that trained language models (Llama-2,
# MPT, Falcon, Pythia) put that surplus on the first token: in most layers, a large share of
# every query's attention goes to position 0 whatever it holds — an **attention sink**. The
# first token is the one every query can see; Gu et al. (2025) found that the sink acts like a
# bias on the scores, its value contributing little to the output, and traced when it appears:
# with enough training data and steps, in models of every size they trained, and not when the
# softmax is replaced by a normalisation-free one such as a sigmoid.
#
# ### 4.1 Our small models have none
#
# Measure before claiming: the share of attention that queries at positions 8 and later put on
# position 0, in each layer of the nine plain models of section 2. A uniform row over $n$ keys
# would put $1/n$ there; averaged over positions 8–31 that is the first figure printed. Our
# training batches are random crops of the text, so position 0 holds a different character
# every time; the last line trains one more model (learning rate 3e-3) whose every sequence
# starts with the same extra token, as a language model's sequences start with a
# beginning-of-sequence token.

# %% tags=["nbval-ignore-output"]
@torch.no_grad()
def first_token_share(model, x_, from_pos=8):
    """Per layer: the mean attention weight on position 0 of queries at from_pos and later."""
    shares = []
    for b, h in zip(model.transformer.h, layer_inputs(model, x_), strict=True):
        _, w = b.attn(h, need_weights=True)  # (B, n_head, T, T)
        shares.append(w[:, :, from_pos:, 0].mean().item())
    return shares


uniform = sum(1 / (t + 1) for t in range(8, block)) / (block - 8)
print(f"uniform rows would give {uniform:.3f}")
all_shares = []
for (arm, lr, seed), model in models.items():
    if arm == "plain":
        shares = first_token_share(model, val_batches[0][0])
        all_shares += shares
        print(f"plain, lr {lr:<6} seed {seed}: share on position 0 by layer "
              f"{[round(s_, 3) for s_ in shares]}")

bos = data.vocab_size  # one id more than the characters: the start token


def with_bos(x_, y_):
    """The start token, then the first block - 1 characters; targets shifted alike."""
    start = torch.full((x_.shape[0], 1), bos)
    return torch.cat([start, x_[:, :-1]], 1), torch.cat([x_[:, :1], y_[:, :-1]], 1)


torch.manual_seed(0)
bos_model = GPT(GPTConfig(**{**models["plain", 3e-3, 0].config.to_dict(),
                             "vocab_size": data.vocab_size + 1}))
opt = torch.optim.AdamW(bos_model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
gen = torch.Generator().manual_seed(0)
for step in range(150):
    for group in opt.param_groups:
        group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
    loss = bos_model(*with_bos(*data.get_batch("train", 16, block, gen)))[1]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
bos_model.eval()
shares = first_token_share(bos_model, with_bos(*val_batches[0])[0])
all_shares += shares
with torch.no_grad():
    bos_val = sum(bos_model(*with_bos(*b))[1].item() for b in val_batches) / len(val_batches)
print(f"a start token at position 0: share by layer {[round(s_, 3) for s_ in shares]}; "
      f"validation loss {bos_val:.2f}")
assert max(all_shares) < 0.25  # no sink: nowhere near the majority of the attention

# %% [markdown]
# No sink: position 0 gets between 2% and 10% of the attention, nowhere near the majority that a
# sink takes: 17 of the 18 shares are below the uniform 5.6%, one is 10%. A fixed start token
# changes nothing (4% and 5%, with a validation loss of 2.37, as the others at this rate). A
# 2-layer model trained for 150 steps on characters has not reached the regime Gu et al. describe,
# and every head of ours still has something useful to read in every context (the previous
# characters). A sink needs a head that often has *nothing* to do. So we build one.
#
# ### 4.2 A head that must sometimes attend to nothing
#
# A toy task for one attention layer: sequences of 32 random vectors and now and then a
# **marker** (a flag in coordinate 0). The target at every position is the mean content of the
# markers seen so far — or zero if there has been none. Attending equally to the markers solves
# it; but a query that has seen no marker must output zero, and its softmax still sums to one.
# Three versions of the layer — plain, with a sink logit per head (`sinks=True`), with an output
# gate (`output_gate=True`) — train on it in three settings:
#
# 1. position 0 holds a fixed **start** vector (a flag in coordinate 1): a token a query could
#    use as a sink;
# 2. no start vector: nothing to park weight on;
# 3. no start vector, but each input carries a flag (coordinate 2) saying whether a marker has
#    been seen so far — what the residual stream of a deeper model would carry, and what the
#    gate, which reads only the query's own input, needs in order to know when to close.
#
# (The sink logit is left out of the third setting: it needs no context, the second setting
# shows it.) The table measures, over the queries that have seen no marker yet: the error of
# their output, the weight they put on position 0, the weight on all keys together (less than
# 100% only with a sink logit), and with a gate its mean value $\sigma(x_t W_g)$. Where there is
# no start vector, position 0 is a random vector, and the weight it gets is about what a
# uniform row gives to one key among the few an early query sees.

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


settings = {"start vector": dict(start=True), "no start": dict(start=False),
            "no start, context flag": dict(start=False, context=True)}
versions = {"plain": {}, "sink logit": dict(sinks=True), "output gate": dict(output_gate=True)}
toys = {(setting, version): train_toy(**kw, **options)
        for setting, kw in settings.items() for version, options in versions.items()
        if (setting, version) != ("no start, context flag", "sink logit")}

# %% tags=["nbval-ignore-output"]
toy_rows = {}
print(f"{'setting':>23} {'version':>12} {'MSE, no marker yet':>19} {'on position 0':>14} "
      f"{'on all keys':>12} {'gate':>5}")
for (setting, version), (toy, readout) in toys.items():
    x_, target, no_marker = toy_batch(256, torch.Generator().manual_seed(1), **settings[setting])
    no_marker[:, 0] = False  # position 0 is the start, or nothing to predict from
    with torch.no_grad():
        out, w = toy(x_, need_weights=True)  # w: (256, 1, 32, 32)
        mse = F.mse_loss(readout(out)[no_marker], target[no_marker]).item()
        gate = "" if toy.gate_proj is None else (
            f"{torch.sigmoid(toy.gate_proj(x_))[no_marker].mean().item():.2f}")
    on_start = w[:, 0, :, 0][no_marker].mean().item()
    row_sum = w[:, 0].sum(-1)[no_marker].mean().item()
    toy_rows[setting, version] = (mse, on_start, row_sum)
    print(f"{setting:>23} {version:>12} {mse:>19.1e} {on_start:>14.1%} {row_sum:>12.1%} {gate:>5}")
assert toy_rows["start vector", "plain"][1] > 0.5  # a sink on the start vector
assert toy_rows["no start", "plain"][0] > 100 * toy_rows["no start", "sink logit"][0]
assert toy_rows["no start", "sink logit"][2] < 0.2  # the sink logit takes the mass
assert toy_rows["no start", "output gate"][0] > 100 * toy_rows["no start, context flag",
                                                                 "output gate"][0]

# %% [markdown]
# **With a start vector**, every version solves the task, and the plain layer grew a sink: a
# query that has seen no marker puts 98% of its weight on the start. What the start contributes
# is (almost) nothing — the cell below measures it. It is the mechanism Xiao et al.
# describe, in miniature, with a null token we supplied: the sink is the layer's way of
# attending to nothing. Even the layer that has a sink logit parks most of that weight on the
# start (86%): both serve, and training chose the token.
#
# **Without one**, the plain layer fails on exactly those queries: their weight lands on random
# vectors, whose mean is not zero.
#
# Could it not learn values of zero for the ordinary tokens instead? Not with a value
# projection. A marker carries its content in the same coordinates 3 onwards as every other
# token and differs only by the flag in coordinate 0, so a marker's input is
# $x_\text{content} + 3 e_0$ and its value is
# $W_v(x_\text{content} + 3 e_0) = W_v x_\text{content} + 3 W_v e_0$ (plus a bias): the same map
# of the content as for any other token, plus a fixed vector. A linear map that passes a
# marker's content passes everyone's; switching the content off for unflagged tokens would take
# a product of flag and content. Only the weights, through the keys that see the flag, can
# select the markers. (The start vector is another matter: its content coordinates are zero, so
# its value is one fixed vector, which the layer can learn to make small, as measured below.)
#
# The **sink logit** solves it: the row sums to a few percent, and no token is needed. The
# **output gate** fails too, and the reason is instructive: it is $\sigma(x_t W_g)$ of the
# *query's own input*, and here $x_t$ is a random vector that knows
# nothing of earlier markers, so the gate cannot tell when to close (it stays at 0.64). Give the
# input the context flag and the gate solves it, closing to 0.08 on the queries that have seen
# nothing (MSE 9e-4 against 0.11 for the plain layer). In a deep model the residual stream at
# position $t$ carries its context, and Qiu et al. (2025) measured the effect at scale: the share
# of attention on the first token fell from 46.7% to 4.8% with the gate. A gate also adds what the
# sink logit does not: a nonlinearity between the values and the output projection, and a scale
# per query and per element. With a start vector present, our gated layer still parks its weight
# on the start (99%, the third row): a gate makes a sink unnecessary, it does not forbid one.
#
# The start's own contribution, in the plain layer with a start vector: what the layer would
# output if a query attended only to that position, against the other positions' (through
# `project`, `out` and the readout):

# %% tags=["nbval-ignore-output"]
toy, readout = toys["start vector", "plain"]
x_, _, _ = toy_batch(256, torch.Generator().manual_seed(1))
with torch.no_grad():
    _, _, v = toy.project(x_)  # (256, 1, 32, d_toy): every position's value
    alone = readout(toy.out(v)).norm(dim=-1)  # (256, 32): output when attending to it alone
print(f"output from the start alone: {alone[:, 0].mean():.2f}; from another position, on "
      f"average: {alone[:, 1:].mean():.2f}")
assert alone[:, 0].mean() < 0.2 * alone[:, 1:].mean()

# %% [markdown]
# ### 4.3 The sink logit, written out
#
# With a sink logit $z_h$ for head $h$, a weight is $e^{s_j} / (e^{z_h} + \sum_i e^{s_i})$: an
# extra key whose score is $z_h$ and whose value vector is zero. The module keeps SDPA fused by
# adding exactly that key and value; the reference path writes the extra column of scores out;
# the flash path rescales by $\sigma(\mathrm{lse} - z_h)$. A row of weights then sums to
# $\sigma(\mathrm{lse} - z_h)$, less than one, and the larger $z_h$ the less (the four heads
# below have $z_h = -1, 0, 1, 2$). A sink of $-\infty$ is no sink:

# %%
cfg_sink = AttentionConfig(n_embd=64, n_head=4, block_size=32, positions="rope", sinks=True)
sinked = build_attention("mha", cfg_sink).eval()
plain_layer = build_attention("mha", AttentionConfig(n_embd=64, n_head=4, block_size=32,
                                                     positions="rope")).eval()
with torch.no_grad():
    sinked.sinks.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    plain_layer.load_state_dict(sinked.state_dict(), strict=False)  # all but the sinks
    _, w = sinked(x, need_weights=True)
    q, k, v = sinked.project(x)
    q, k = sinked.position(q, k, 0)
    scores = (q @ k.transpose(-2, -1) / 4).masked_fill(~torch.ones(32, 32).tril().bool(), -math.inf)
    with_sink = torch.cat([scores, sinked.sinks[None, :, None, None].expand(2, 4, 32, 1)], -1)
    w_by_hand = torch.softmax(with_sink, -1)[..., :-1]  # the sink column dropped
    print("weights == softmax with a sink column, by hand:", torch.allclose(w, w_by_hand, atol=1e-6))
    print("row sums of head 0..3 at position 31:", w[0, :, 31].sum(-1))
    sinked.sinks.fill_(-math.inf)
    print("sink = -inf is no sink:", torch.allclose(sinked(x), plain_layer(x), atol=1e-6))
    assert torch.allclose(w, w_by_hand, atol=1e-6) and torch.allclose(sinked(x), plain_layer(x),
                                                                      atol=1e-6)

# %% [markdown]
# ### 4.4 GPT-2's sink, when its weights are here (optional)
#
# A trained language model is where the sink shows up unprompted. This optional cell measures the
# share of attention on the first token in each layer of GPT-2 small if the Hugging Face weights
# are already on this machine (it never downloads them), and says so if not. Where it runs, it
# prints one share per layer for queries at positions 8 and later, to compare with the uniform
# share of section 4.1: Xiao et al. found that in Llama-2, beyond the bottom two layers, the
# model attends heavily to the first token in every layer and head, and the cell shows whether
# GPT-2's layers follow that pattern. Where it printed "skipped", as in the stored output, the
# claim rests on the papers above.

# %% tags=["nbval-ignore-output"]
import warnings

try:
    with warnings.catch_warnings():  # transformers' import warns about Jupyter widgets
        warnings.simplefilter("ignore")
        from transformers import GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True).eval()
except (ImportError, OSError) as error:
    print(f"GPT-2's weights are not on this machine ({type(error).__name__}): skipped")
else:
    import tiktoken

    ids = torch.tensor([tiktoken.get_encoding("gpt2").encode(
        "The quick brown fox jumps over the lazy dog, and then it runs into the forest where "
        "the trees are tall and the light is dim.")])
    with torch.no_grad():
        att = gpt2(ids, output_attentions=True).attentions  # per layer (1, 12, T, T)
    print("GPT-2 small, share of attention on token 0 (queries 8+), by layer:",
          [round(a[0, :, 8:, 0].mean().item(), 2) for a in att])

# %% [markdown]
# ### 4.5 The output gate, written out
#
# Without a gate, a head's output is $\sum_j p_j\, v_j = \sum_j p_j W_v x_j$, and `c_proj` mixes
# the heads: for fixed weights $p_j$, the path from the tokens to the layer's output is two
# linear maps in a row, $W_v$ then `c_proj` (one low-rank linear map), and a head can shrink its
# output only by moving its weights. The gate multiplies each element of each head's output by
# $\sigma(g)$, with $g = x_t W_g$ computed from the query's own input $x_t$ (`gate_proj`, split
# into heads like the queries): a nonlinearity between the two maps, which lets each query scale
# each element of each head on its own, down to zero if it likes. Written out, on section 2's
# input `x`, against the layer's `gate` stage and its whole forward pass:

# %%
cfg_gate = AttentionConfig(n_embd=64, n_head=4, block_size=32, positions="rope", output_gate=True)
gated = build_attention("mha", cfg_gate).eval()
with torch.no_grad():
    q, k, v = gated.project(x)
    q, k = gated.position(q, k, 0)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (2, 4, 32, 16): before the gate
    g = gated.gate_proj(x).view(2, 32, 4, 16).transpose(1, 2)  # (2, 4, 32, 16): one per element
    y_gated = y * torch.sigmoid(g)  # each query, head and element scaled by its own gate
    by_hand = gated.c_proj(y_gated.transpose(1, 2).reshape(2, 32, 64))  # (2, 32, 64)
    print("gate logits g:", tuple(g.shape), "(B, n_head, T, head_dim): one per element")
    print("gate(y, x) == y * sigmoid(g):", torch.allclose(gated.gate(y, x), y_gated, atol=1e-6))
    print("layer(x) == c_proj of the gated heads:", torch.allclose(gated(x), by_hand, atol=1e-5))
    assert torch.allclose(gated.gate(y, x), y_gated, atol=1e-6)
    assert torch.allclose(gated(x), by_hand, atol=1e-5)

# %% [markdown]
# ## 5. Streaming past the context length
#
# A rolling cache ([chapter 9](09_sliding_window.ipynb)) keeps the last `window` positions, so its
# memory stays flat however long generation runs — but a model that grew a sink on position 0 loses
# it the moment the window slides past it. Xiao et al. (2024) measured the damage: perplexity
# explodes once the first tokens are evicted, and keeping just four of them (**sink tokens**) beside
# the window brings it back, with no retraining. `LocalOptions.sink_tokens` keeps the first
# `sink_tokens` positions visible to every query, and `RollingKVCache` keeps them.
#
# ### 5.1 Evicting the sink breaks the toy
#
# The plain toy layer of section 4.2 that grew a sink on the start vector was trained with full
# attention. Move its weights into a sliding-window layer of 8 positions (`"local"` has MHA's
# parameters) and ask the queries that matter here — those with no marker in the whole sequence,
# whose answer is zero — with and without the start kept as a sink token:

# %% tags=["nbval-ignore-output"]
plain_toy, plain_readout = toys["start vector", "plain"]
x_, target, no_marker = toy_batch(256, torch.Generator().manual_seed(1))
quiet = no_marker[:, -1]  # (256,): sequences with no marker at all: every answer is zero
evicted, windowed_layers = {}, {}
for sink_tokens in (0, 1):
    config = AttentionConfig(n_embd=d_toy, n_head=1, block_size=T_toy, positions="none")
    windowed = build_attention("local", config, window=8, sink_tokens=sink_tokens).eval()
    windowed.load_state_dict(plain_toy.state_dict())
    windowed_layers[sink_tokens] = windowed
    with torch.no_grad():
        y_ = plain_readout(windowed(x_[quiet]))  # (n, 32, d - 3)
    evicted[sink_tokens] = F.mse_loss(y_[:, 8:], target[quiet][:, 8:]).item()
    print(f"window 8, sink_tokens={sink_tokens}: MSE on the {int(quiet.sum())} sequences with "
          f"no marker (positions 8+) {evicted[sink_tokens]:.1e}")
assert evicted[0] > 100 * evicted[1]  # evicting the start hurts; keeping it repairs

# %%
one = x_[quiet][:1]  # (1, 32, d_toy): one sequence without a marker
with torch.no_grad():
    maps = {"full attention (as trained)": plain_toy(one, need_weights=True)[1][0, 0],
            "window 8": windowed_layers[0](one, need_weights=True)[1][0, 0],
            "window 8 + 1 sink token": windowed_layers[1](one, need_weights=True)[1][0, 0]}
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
for ax, (title, weights) in zip(axes, maps.items(), strict=True):  # (32, 32) each
    ax.imshow(weights, cmap="Blues", vmin=0, vmax=1)
    ax.set(title=title, xlabel="key position", ylabel="query position")
plt.suptitle("the plain toy on a sequence with no marker: where each query's weight goes")
plt.tight_layout()
plt.show()

# %% [markdown]
# Without the start, a query with nothing to read spreads its weight over random vectors, and
# the output is their average instead of zero; with the start kept it has its sink back. The
# maps show it: trained with full attention, every query puts its weight in the first column;
# with a window of 8, queries past position 7 lose that column and spread over their window;
# with the start kept as a sink token, the column is back.
#
# ### 5.2 Streaming a language model 10× past `block_size`
#
# Now a real stream: one of section 2's character models (plain, learning rate 3e-3), trained on
# 32 positions, reads 320 characters of validation text — ten times its `block_size`. Three ways
# to predict every character:
#
# - **recompute**: a fresh 32-token forward pass for every prediction, over the last 32
#   characters (what the model was trained on; 32 times the work of a cached step);
# - **window only**: the same weights in a `"local"` model with a window of 32 and its rolling
#   cache, one token at a time;
# - **sinks + window**: a window of 28 plus 4 sink tokens, the same cache size.
#
# Past `block_size` the positions keep growing: RoPE's angles are computed for any position,
# and every cache is bounded, so `generate` and cached forward passes accept it (a model with a
# full cache or learned positions refuses, saying why). One difference from StreamingLLM: our
# keys are rotated *before* they are cached, so they keep their true positions, and the sinks
# sit at distances the model never trained on; StreamingLLM re-numbers positions inside the
# cache instead.

# %% tags=["nbval-ignore-output"]
lm = models["plain", 3e-3, 0]
stream_x = data.get_batch("val", 4, 10 * block + 1, torch.Generator().manual_seed(3))[0]
inputs, targets = stream_x[:, :-1], stream_x[:, 1:]  # (4, 320) each
n_stream = inputs.shape[1]


@torch.no_grad()
def recompute_logits(model):
    """A forward pass over the last block_size tokens for each position: (4, 320, vocab)."""
    model.eval()
    return torch.stack([model(inputs[:, max(0, p - block + 1) : p + 1])[0][:, -1]
                        for p in range(n_stream)], dim=1)


@torch.no_grad()
def streamed_logits(**options):
    """The weights of lm in a local model with these options, fed one token at a time through
    its rolling caches; the logits and the caches' bytes after every 32 tokens."""
    local_lm = GPT(GPTConfig(**{**lm.config.to_dict(), "attention": "local",
                                "attention_options": options})).eval()
    local_lm.load_state_dict(lm.state_dict())
    caches = local_lm.new_caches(inputs.shape[0], max_len=None)  # no limit: bounded caches
    logits, held = [], []
    for p in range(n_stream):
        logits.append(local_lm(inputs[:, p : p + 1], caches=caches)[0][:, -1])
        if (p + 1) % block == 0:
            held.append(sum(c.nbytes for c in caches))
    return torch.stack(logits, dim=1), held


def per_token_loss(logits):
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (4, 320)


def losses(logits):
    """Mean loss over the first block and over the rest of the stream."""
    per_token = per_token_loss(logits)
    return per_token[:, :block].mean().item(), per_token[:, block:].mean().item()


streams = {"recompute": (recompute_logits(lm), None),
           "window only (32)": streamed_logits(window=32),
           "sinks + window (4 + 28)": streamed_logits(window=28, sink_tokens=4)}
print(f"{'':>24} {'loss, first 32':>15} {'loss, 32-319':>13}   cache bytes after 32, 64, ... 320")
stream_loss = {}
for name, (logits, held) in streams.items():
    stream_loss[name] = losses(logits)
    first, rest = stream_loss[name]
    print(f"{name:>24} {first:>15.3f} {rest:>13.3f}   {held if held else 'recomputed'}")
for name in ("window only (32)", "sinks + window (4 + 28)"):
    held = streams[name][1]
    assert len(set(held)) == 1  # flat memory over 10 x block_size
    diff = (per_token_loss(streams[name][0]) - per_token_loss(streams["recompute"][0]))[:, block:]
    per_sequence = diff.mean(1)  # (4,): paired, the same tokens predicted two ways
    se = per_sequence.std() / len(per_sequence) ** 0.5
    print(f"{name}, past the first block: {diff.mean():+.4f} ± {se:.4f} nats against recompute "
          f"(mean ± standard error over the 4 sequences' means)")
    assert abs(diff.mean()) < 0.05

# %% [markdown]
# The caches hold the same 131,072 bytes after 32 tokens as after 320: 2 layers × (keys, values)
# × 4 sequences × 32 positions × 64 numbers (4 heads of 16) × 4 bytes, for the window of 32 and
# for the 4 sink tokens + 28. The three ways agree on the first 32 characters (the "loss, first
# 32" column), because there every one of them sees the whole prefix: recompute's last 32
# characters are all there is, and neither cache has evicted anything yet. The window alone
# matches the recomputed loss past the first block (2.281 against 2.282, a difference of
# −0.0005 ± 0.0008 nats per token, over the four sequences). The two are not identical
# computations: recomputing starts both layers' windows at the same character, while in the
# stream the second layer's window holds first-layer outputs that each saw 32 characters
# further back, so through its two layers the stream reaches 62 characters back. This model has no
# sink (section 4.1), so losing position 0 costs it nothing, and its window keys sit at the
# distances it trained on. The sink tokens make no measurable difference either (+0.005 ±
# 0.011): they are characters with no special role here, placed by true RoPE positions
# at distances of up to 319 that the model never saw. Which way the ordering goes for a model
# that *has* a sink, section 5.1 showed on the toy and Xiao et al. on Llama-2, MPT, Falcon and
# Pythia: the window alone breaks, the sinks repair it.

# %% [markdown]
# ## 6. Hybrid stacks
#
# The KV cache of global attention grows with the context in every layer. A hybrid stack gives
# most layers a bounded cache and keeps a few global ones to reach far back:
#
# | model | pattern | local layers see |
# | --- | --- | --- |
# | Gemma 3 | 5 sliding-window : 1 global | 1024 tokens |
# | gpt-oss | 1 sliding-window : 1 global, alternating | 128 tokens |
# | Qwen3-Next | 3 Gated DeltaNet : 1 global | a fixed state |
#
# `GPTConfig(layer_attention=[...])` names each block's variant (`layer_pattern` repeats a
# period); `attention_options` go where they belong (`window` to the local blocks only), and
# every block builds its own kind of cache:

# %%
config = GPTConfig(vocab_size=65, block_size=64, n_layer=6, n_head=4, n_embd=64,
                   positions="rope", layer_attention=layer_pattern(["local"] * 5 + ["mha"], 6),
                   attention_options={"window": 16})
hybrid = GPT(config)
print([type(b.attn).__name__ for b in hybrid.transformer.h])
print([type(c).__name__ for c in hybrid.new_caches(1)])

# %% [markdown]
# ### 6.1 Cache bytes per token, counted and measured
#
# Per token of a context of $L$, in float32: a global block caches $2 \cdot n_{kv} \cdot d_h$
# numbers per position, so $8 n_{kv} d_h$ bytes whatever $L$; a window of $w$ caches
# $\min(w, L)$ positions, $8 n_{kv} d_h \min(w, L)/L$ per token; a Gated DeltaNet block keeps
# a state of $n_h d_h^2$ numbers and its short convolution's last inputs, a fixed size, so its
# share per token falls as $1/L$. `bench.cache_bytes_formula` counts this from the config;
# `GPT.cache_bytes_per_token` sums the bytes of the caches the model really builds. At GPT-2
# small's shape (12 blocks of 12 heads of 64, all MHA for a plain comparison), with Gemma 3's
# and gpt-oss's windows:

# %%
from attnbook.bench import hybrid_table

lengths = [1024, 4096, 32768, 131072]
rows = hybrid_table(lengths)
full_row = rows[0][1]
print(f"{'stack':<44}" + "".join(f"{f'L={L}':>12}" for L in lengths))
for name, figures in rows:
    print(f"{name:<44}" + "".join(f"{measured / full_row[L][1]:>12.3f}"
                                  for L, (formula, measured) in figures.items()))
    assert all(formula == measured for formula, measured in figures.values())
print("formula == measured for every stack and length; all global:",
      f"{full_row[1024][1]:,.0f} bytes per token")

# %%
fig, ax = plt.subplots(figsize=(9, 3.4))
more = [2**i for i in range(10, 18)]
for name, figures in hybrid_table(more):
    ax.plot(more, [m / 1e3 for _, m in figures.values()], marker="o", label=name)
ax.set(xscale="log", xlabel="context length L", ylabel="KB of cache per token", ylim=(0, None),
       title="hybrid stacks: cache per token of context")
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
plt.tight_layout()
plt.show()

# %% [markdown]
# At 128k tokens Gemma 3's pattern needs about a sixth of all-global attention's cache (the
# two global blocks and the five-sixths that are windows of 1024), Qwen3-Next's about a quarter
# (its three global blocks; the states are a rounding error), gpt-oss's about a half (its
# windows of 128 are tiny, but half of its blocks are global). Below about 10k tokens Gemma 3 and
# Qwen3-Next swap places: Gemma 3's share is $1/6 + (5/6) \cdot 1024/L$, Qwen3-Next's about
# $1/4$, equal at $L = 10 \cdot 1024 \approx 10\text{k}$. Both keep global blocks, 2 of 12 for
# Gemma 3 and 3 of 12 for Qwen3-Next; what Gemma 3's windows compete with is Qwen3-Next's third
# global block, $1/12$ of all-global attention, and while the windows still hold a tenth of the
# context or more they cost more than it (the curves cross in the plot). With
# grouped-query attention, as all three models use, the bytes shrink by the group size; the
# window stacks' ratios stay, since the all-global baseline shrinks alike, while Qwen3-Next's
# Gated DeltaNet states do not shrink with the key/value groups (exercise 5 counts Gemma 3 27B).
#
# ### 6.2 Three stacks, trained side by side
#
# Four blocks each, same widths, seeds and data: all global; three local layers of window 8 and
# one global (a 3:1 sliding-window stack); three Gated DeltaNet layers and one global
# (Qwen3-Next's pattern). 150 steps at learning rate 3e-3, two seeds each. The Gated DeltaNet
# layers bring parameters of their own (the decay and write-strength projections, the short
# convolutions, their own output gate), printed beside each stack.

# %% tags=["nbval-ignore-output"]
stacks = {"all global (mha x 4)": None,
          "3 local : 1 global": layer_pattern(["local"] * 3 + ["mha"], 4),
          "3 gated_deltanet : 1 global": layer_pattern(["gated_deltanet"] * 3 + ["mha"], 4)}
stack_loss = {}
for name, pattern in stacks.items():
    options = {"window": 8} if pattern and "local" in pattern else {}
    runs = []
    for seed in (0, 1):
        model = char_model(seed, layer_attention=pattern, n_layer=4, **options)
        runs.append(train(model, 150, 3e-3, seed))
    stack_loss[name] = sum(runs) / len(runs)
    print(f"{name:>28}: validation loss {' '.join(f'{r:.3f}' for r in runs)}, "
          f"{model.num_params():,} parameters, cache {model.cache_bytes_per_token(block):,.0f} "
          f"bytes/token at L={block}")
assert max(stack_loss.values()) - min(stack_loss.values()) < 0.3  # all train comparably

# %% [markdown]
# On characters, where most of what predicts the next one is a few positions back, a window of 8
# loses nothing in 150 steps: the all-global stack ends at 2.358 and 2.357, the 3:1
# sliding-window stack at 2.351 and 2.337, with 896 cached bytes per token against 2,048 at 32
# positions. The Gated DeltaNet stack ends lower on both seeds, at 2.228 and 2.261, with 8% more
# parameters; a plausible reading, not tested here, is that its short convolutions and decays
# build in the bias towards the recent past that the attention layers must still learn.
# [Chapter 18](18_comparing_variants.ipynb)'s recall tasks are where reaching back matters; exercise
# 4 measures how far each stack can reach.

# %% [markdown]
# ## 7. Check against the module
#
# The promises every option makes, over every variant that takes it, are tested in
# `tests/test_modern_block.py`, `tests/test_streaming.py` and `tests/test_hybrid.py`. Here, the
# main ones once more: each option keeps cached decoding equal to the full pass and keeps the
# layer causal, a huge cap is no cap, and a hybrid stack decodes with its caches exactly as it
# computes without them.

# %%
torch.manual_seed(7)
cfg24 = dict(n_embd=32, n_head=4, block_size=24, positions="rope")
x24 = torch.randn(2, 24, 32)
for options in (dict(qk_norm=True), dict(output_gate=True), dict(sinks=True), dict(softcap=2.0)):
    layer = build_attention("local", AttentionConfig(**cfg24, **options), window=6,
                            sink_tokens=2).eval()
    with torch.no_grad():
        if layer.sinks is not None:
            layer.sinks.normal_()
        full = layer(x24)
        cache = layer.new_cache(2)
        stepwise = torch.cat([layer(x24[:, t : t + 1], cache=cache) for t in range(24)], dim=1)
        x_future = x24.clone()
        x_future[:, 12:] = torch.randn(2, 12, 32)
        causal = torch.equal(layer(x_future)[:, :12], full[:, :12])
    ok = torch.allclose(stepwise, full, atol=1e-5)
    print(f"local + sink tokens + {options}: cached == full: {ok}; causal: {causal}")
    assert ok and causal

huge = build_attention("mha", AttentionConfig(**cfg24, softcap=1e9)).eval()
none = build_attention("mha", AttentionConfig(**cfg24)).eval()
none.load_state_dict(huge.state_dict())
with torch.no_grad():
    print("softcap 1e9 == no cap:", torch.allclose(huge(x24), none(x24), atol=1e-6))
    assert torch.allclose(huge(x24), none(x24), atol=1e-6)

hybrid.eval()
prompt = torch.randint(0, 65, (1, 8))
with torch.no_grad():
    cached = hybrid.generate(prompt, 40, temperature=0)
    uncached = hybrid.generate(prompt, 40, temperature=0, use_cache=False)
print("hybrid stack: cached generation == uncached:", torch.equal(cached, uncached))
assert torch.equal(cached, uncached)

# %% [markdown]
# ## Summary
#
# - **QK-norm** RMS-normalises each head's queries and keys before RoPE, so the scores stay
#   bounded whatever the weights do. In our sweep it kept the loss at 2.44–2.57 at learning
#   rates where the plain model reached 2.66–3.02 with one-hot softmaxes and scores up to 2,373
#   (at most 27 with the norm).
# - **Soft-capping** squashes the scores into $(-c, c)$ with $c \tanh(s/c)$: no parameters, but a
#   function between the two products of a fused kernel, so SDPA cannot run it. In our sweep a
#   cap of 20 kept the softmax from going one-hot but not the loss from rising (2.85–2.92): the
#   raw scores still grew, into the flat part of $\tanh$.
# - A softmax row must sum to one, so a head with nothing to read parks its weight somewhere:
#   trained models park it on the first token, an **attention sink**. Our small character models
#   grew none; a one-layer toy whose queries often have nothing to read grew one at once (98%
#   of those queries' attention on a start vector that contributes nothing). A learned **sink
#   logit** per head (gpt-oss) gives the weight a place to go without any token; an **output
#   gate** (Qwen3-Next) lets a head scale its output down, which needs an input that knows the
#   context.
# - **Streaming**: with bounded caches (windows, states) and positions that are not a table, a
#   model decodes past `block_size` with flat memory. Keeping the first tokens as **sink
#   tokens** matters for a model with a sink, which breaks without them (the toy: MSE 0.13
#   against 4e-5); for our language model, which has none, the window alone matched full
#   recomputation over 10× its `block_size`.
# - **Hybrid stacks** give most blocks a bounded cache: at 128k tokens Gemma 3's pattern caches
#   about a sixth of all-global attention's bytes per token, Qwen3-Next's a quarter, gpt-oss's a
#   half, counted from the config and measured from the caches alike.
#
# | option | what it fixes | parameters | fused kernels | used by |
# | --- | --- | --- | --- | --- |
# | `qk_norm` | scores that grow with the weights | 2 × head_dim | yes (before the kernel) | OLMo 2, Gemma 3, Qwen3, nanochat |
# | `softcap` | scores that grow without bound | none | no (a function of the scores) | Gemma 2 |
# | `sinks` | a head forced to attend to something | n_head | yes (an extra key, or the LSE) | gpt-oss |
# | `output_gate` | a head that cannot say "nothing"; a linear value path | n_embd × n_head·head_dim | yes (after the kernel) | Qwen3-Next |
# | `sink_tokens` | a rolling cache that evicts the sink | none | yes (a mask, or blocks) | StreamingLLM |
# | `layer_attention` | a KV cache that grows in every layer | none of its own | per variant | Gemma 3, gpt-oss, Qwen3-Next |

# %% [markdown]
# ## Further reading
#
# - Dehghani et al. (2023), *Scaling Vision Transformers to 22 Billion Parameters*: the logit
#   growth that QK-norm was introduced against; Wortsman et al. (2023), *Small-scale proxies for
#   large-scale Transformer training instabilities*: the same failure in small models.
# - Team OLMo (2024), *2 OLMo 2 Furious*; Qwen Team (2025), *Qwen3 Technical Report*; Gemma Team
#   (2025), *Gemma 3 Technical Report*: QK-norm in production, and Gemma 3's 5:1 local:global
#   pattern.
# - Gemma Team (2024), *Gemma 2: Improving Open Language Models at a Practical Size*: logit
#   soft-capping.
# - Xiao et al. (2024), *Efficient Streaming Language Models with Attention Sinks*
#   (StreamingLLM); Gu et al. (2025), *When Attention Sink Emerges in Language Models: An
#   Empirical View*.
# - Qiu et al. (2025), *Gated Attention for Large Language Models: Non-linearity, Sparsity, and
#   Attention-Sink-Free*; OpenAI (2025), *gpt-oss-120b & gpt-oss-20b Model Card*: learned sinks
#   and alternating banded attention; Qwen Team (2025), Qwen3-Next: the 3:1 Gated DeltaNet
#   stack with gated attention.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/15_modern_attention_block_solutions.ipynb`](solutions/15_modern_attention_block_solutions.ipynb).
# Predict first, then check with code.
#
# 1. **The bound QK-norm gives.** With RMS-normalised $q$ and $k$ of $d$ numbers and norm weights
#    $g^q$, $g^k$, derive the largest possible score $q \cdot k / \sqrt{d}$, and check it against
#    the largest score of the QK-normalised models of section 2. What would a learning rate have
#    to do to the norm weights to reach a one-hot softmax over 32 keys?
# 2. **Soft-capping's gradient.** Differentiate $c \tanh(s/c)$ and compute by how much it shrinks
#    the gradient of a score of 30, 50 and 100 with $c = 50$. Check with autograd through the
#    layer (`softcap=50.0`). Why might a model whose scores sit near the cap learn slowly?
# 3. **How many sink tokens?** Repeat section 5.1 with windows of 4, 8 and 16 and `sink_tokens`
#    0, 1 and 4. Which matters, and why does one suffice in the toy?
# 4. **Reaching back.** Without training: for a stack of four local blocks with a window of 8,
#    for the 3 local : 1 global stack with the global block last, and for the same with the
#    global block first, find which input positions can change the prediction at the last of 64
#    positions (change one token at a time and compare the logits). Predict first from chapter
#    9's rule for how the receptive field grows with depth. Does the place of the global block
#    matter? What about three Gated DeltaNet blocks and no global one?
# 5. **Gemma 3 with grouped queries.** Recount section 6.1's table for Gemma 3 27B's attention
#    (62 layers, 32 query heads, 16 key/value heads, head_dim 128, window 1024, bfloat16) at 128k
#    tokens, for the 5:1 stack and for all-global. 62 is not a multiple of 6: with every sixth
#    layer global, how many are global? How many GB per sequence does each stack need?
