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
# # Chapter 7 — The KV cache: solutions
#
# Worked solutions to the exercises of `chapters/07_kv_cache.ipynb`. Each one states the
# reasoning first, then checks the claim with code and an `assert`.
#
# We need the chapter's tiny language model and its greedy loop again. They are repeated here
# unchanged (a notebook cannot import another notebook), slightly condensed.

# %%
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnbook.attention import AttentionConfig, build_attention
from attnbook.mlp import MLP
from attnbook.positions import PositionalEmbedding

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then MLP, each added to the residual stream."""

    def __init__(self, attention, cfg, options):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = build_attention(attention, cfg, **options)  # the variant's own options
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd)

    def forward(self, x, cache=None, attn_mask=None):  # x: (B, T, n_embd)
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, cache=cache)
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """The chapter's minimal causal LM: embeddings, n_layer blocks, LM head. Random weights."""

    def __init__(self, attention="mha", positions="rope", vocab_size=256, n_embd=128, n_head=4,
                 n_layer=4, block_size=512, impl="sdpa", **options):
        super().__init__()
        self.cfg = AttentionConfig(n_embd=n_embd, n_head=n_head, block_size=block_size,
                                   positions=positions, impl=impl)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = None
        if positions == "learned":
            self.wpe = PositionalEmbedding("learned", block_size, n_embd)
        self.blocks = nn.ModuleList(Block(attention, self.cfg, options) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def embed(self, idx, start=0):
        x = self.wte(idx)  # (B, T, n_embd)
        if self.wpe is not None:
            x = x + self.wpe(idx.shape[1], start)
        return x

    def forward(self, idx, caches=None, attn_mask=None):
        start = 0 if caches is None else caches[0].length
        x = self.embed(idx, start)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i], attn_mask=attn_mask)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)


def module_caches(model, batch_size, max_len=128, dtype=None):
    return [block.attn.new_cache(batch_size, max_len, dtype=dtype) for block in model.blocks]


@torch.no_grad()
def generate(model, prompt, n_new, caches=None):
    """Greedy decoding; with caches the first step prefills the prompt, later ones feed 1 token."""
    idx, feed = prompt, prompt
    for _ in range(n_new):
        logits = model(idx) if caches is None else model(feed, caches)
        feed = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, feed], dim=1)
    return idx


torch.manual_seed(0)
model = TinyLM(positions="rope").eval()

# %% [markdown]
# ## Exercise 1 — prompts of different lengths in one batch
#
# A batch is one rectangular tensor, so two prompts of lengths 5 and 11 must be padded to 11.
# We pad with token 0 (any id would do; what matters is that the pads are masked).
#
# **(a) Right padding.** Row 0 becomes `a0 .. a4, pad × 6`. The greedy loop reads the logits at the
# *last* column — for row 0 that is a pad, not `a4` — and appends the new token at position 11,
# after six pads. Every later token of row 0 also attends to the pads. So row 0 generates
# something else than it would alone, while row 1 (no padding) is unaffected: rows of a batch do
# not interact in a transformer. Right padding is fine for a *forward pass* over known sequences
# (each row's real positions come first, and causality keeps them from seeing the pads), but not
# for generation, where every row must continue from its own last real token.

# %%
torch.manual_seed(1)
short, long = torch.randint(1, 256, (1, 5)), torch.randint(1, 256, (1, 11))
n_new = 12
alone = [generate(model, p, n_new, module_caches(model, 1))[:, p.shape[1]:] for p in (short, long)]

PAD = 0
right = torch.cat([torch.cat([short, torch.full((1, 6), PAD)], dim=1), long])  # (2, 11)
out_right = generate(model, right, n_new, module_caches(model, 2))[:, 11:]
print("right padding: row 0 == alone:", torch.equal(out_right[0], alone[0][0]))
print("right padding: row 1 == alone:", torch.equal(out_right[1], alone[1][0]))
assert not torch.equal(out_right[0], alone[0][0]) and torch.equal(out_right[1], alone[1][0])

# %% [markdown]
# **(b) Left padding plus a key padding mask.** Row 0 becomes `pad × 6, a0 .. a4`: every row now
# ends at its last real token, and new tokens are appended right after it. Two things remain:
#
# - The pads must be invisible as keys. A boolean `real` of shape `(B, T_k)`, `True` at real
#   tokens, passed as `attn_mask = real[:, None, None, :]`, broadcasts over heads and queries;
#   the attention layer combines it with its own causal mask. It grows by one `True` column per
#   step, because each new token is real and the cache grows by one position. (The pads' own
#   queries see no real key at all; `attnbook` gives such fully masked rows a zero output
#   rather than NaN, and nothing ever reads them.)
# - The real tokens of row 0 now sit at positions 6..10 instead of 0..4. **With RoPE this does not
#   matter**: a score depends only on the *difference* of the query's and the key's positions, and
#   shifting both by 6 leaves every difference unchanged. So each row should generate exactly what
#   it generates alone (up to float rounding).

# %%
@torch.no_grad()
def generate_padded(model, prompt, real, n_new, forward=None):
    """Greedy decoding of a left-padded batch; real: (B, T0) bool, True at real tokens."""
    forward = forward or (lambda idx, caches, mask, real: model(idx, caches, attn_mask=mask))
    caches = module_caches(model, prompt.shape[0])
    idx, feed = prompt, prompt
    for _ in range(n_new):
        logits = forward(feed, caches, real[:, None, None, :], real)  # mask: (B, 1, 1, T_k)
        feed = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, feed], dim=1)
        real = torch.cat([real, torch.ones_like(feed, dtype=torch.bool)], dim=1)  # new key is real
    return idx


left = torch.cat([torch.cat([torch.full((1, 6), PAD), short], dim=1), long])  # (2, 11)
real = left != PAD  # (2, 11): here no real token is 0, so this marks the pads
out_left = generate_padded(model, left, real, n_new)[:, 11:]
print("left padding + mask, RoPE: row 0 == alone:", torch.equal(out_left[0], alone[0][0]))
print("left padding + mask, RoPE: row 1 == alone:", torch.equal(out_left[1], alone[1][0]))
assert torch.equal(out_left[0], alone[0][0]) and torch.equal(out_left[1], alone[1][0])

# %% [markdown]
# **Learned positions are not shift-invariant.** With learned position vectors, row 0's tokens
# would receive the vectors of positions 6..10 instead of 0..4, which the model has never paired
# with a 5-token context's first tokens — a different input, so different outputs. The fix is
# per-row positions: a token's position is the number of real tokens before it in its row,
# `real.cumsum(1) - 1`, looked up in the learned table row by row (padded entries get any valid
# index, say 0; they are masked anyway). Our `TinyLM.embed` takes one `start` for the whole
# batch, so we write that forward pass out once, for the learned-position model.

# %%
torch.manual_seed(0)
learned = TinyLM(positions="learned").eval()
alone_l = generate(learned, short, n_new, module_caches(learned, 1))[:, 5:]


def forward_per_row(idx, caches, mask, real):
    """TinyLM.forward, with each row's positions counted over its real tokens only."""
    pos = (real.cumsum(dim=1) - 1).clamp(min=0)[:, -idx.shape[1]:]  # (B, T): positions of idx
    x = learned.wte(idx) + learned.wpe.table.weight[pos]  # (B, T, n_embd)
    for block, cache in zip(learned.blocks, caches, strict=True):
        x = block(x, cache=cache, attn_mask=mask)
    return learned.lm_head(learned.ln_f(x))


shared_start = generate_padded(learned, left, real, n_new)[:, 11:]
per_row = generate_padded(learned, left, real, n_new, forward=forward_per_row)[:, 11:]
print("learned positions, shared start: row 0 == alone:", torch.equal(shared_start[0], alone_l[0]))
print("learned positions, per-row ids:  row 0 == alone:", torch.equal(per_row[0], alone_l[0]))
assert not torch.equal(shared_start[0], alone_l[0]) and torch.equal(per_row[0], alone_l[0])

# %% [markdown]
# ## Exercise 2 — a sliding cache
#
# The cache below keeps only the last `W` positions — it cuts to the window on every append, the
# prefill included — but `length` counts every position ever appended, so the attention layer
# still rotates each new query and key at its true position. For a single new token the layer
# builds no mask at all: one query may see every key it is given, here the last `W` positions.
#
# **Prediction.** With a 16-token prompt and `W = 32`, decoding is exact as long as nothing has
# been dropped. The step that feeds position $p$ needs keys $0 \ldots p$, that is $p + 1$ of them;
# the window holds them all while $p + 1 \le 32$. The first step that loses a key feeds
# position 32 — the 17th decoding step after the prefill (positions 16, 17, ..., 32). Its logits,
# and every later step's, differ from full-cache decoding. To compare step by step on identical
# inputs we feed both caches the same tokens (those generated with the full cache) instead of
# letting each generate its own.

# %%
class SlidingCache:
    """Keeps the keys and values of the last `window` positions; length counts all positions."""

    def __init__(self, window):
        self.window, self.length, self.k, self.v = window, 0, None, None

    def append(self, k, v):  # k, v: (B, n_kv_head, T_new, head_dim)
        self.length += k.shape[2]  # every position ever appended
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k[:, :, -self.window :], v[:, :, -self.window :]  # drop the oldest
        return self.k, self.v  # at most `window` positions, the new ones included


@torch.no_grad()
def step_logits(model, tokens, prompt_len, caches):
    """Prefill tokens[:, :prompt_len], then feed the rest one at a time; last logits per step."""
    out = [model(tokens[:, :prompt_len], caches)[:, -1]]
    for p in range(prompt_len, tokens.shape[1]):
        out.append(model(tokens[:, p : p + 1], caches)[:, -1])
    return torch.stack(out, dim=1)  # (B, steps, vocab)


torch.manual_seed(2)
prompt = torch.randint(0, 256, (1, 16))
W = 32
tokens = generate(model, prompt, 40, module_caches(model, 1))  # (1, 56), full cache
full = step_logits(model, tokens, 16, module_caches(model, 1))
slid = step_logits(model, tokens, 16, [SlidingCache(W) for _ in model.blocks])
diff = (full - slid).abs().amax(dim=(0, 2))  # (steps,): step 0 is the prefill
first = int((diff > 1e-4).nonzero()[0])
print("first decoding step whose logits differ:", first, "-> it feeds position", 16 + first - 1)
print("logits equal before it (atol=1e-4):", bool(diff[:first].max() < 1e-4),
      "| max |difference| at it:", round(diff[first].item(), 2))
assert first == 17 and diff[:first].max() < 1e-4

# %% [markdown]
# As predicted: identical up to the step that feeds position 31 (32 keys, all still in the
# window), different from the step that feeds position 32 on.
#
# **Why it is not exact.** This model was built with full causal attention: the query at
# position $p$ is meant to spread its softmax over all $p+1$ keys. Dropping the oldest ones
# removes their terms from the weighted sum *and* from the softmax's normalisation, so every
# remaining weight changes too. The result is an approximation whose error depends on how much
# weight the dropped keys would have had. (Dropping the very first tokens tends to hurt trained
# models most, because they often park a lot of attention there; "attention sink" methods keep
# those few tokens plus the window.)
#
# **When it is exact.** For a model *built* with sliding-window attention
# ([chapter 9](../09_sliding_window.ipynb)), where the query at $p$ attends to keys
# $p - W + 1 \ldots p$ by definition, during training as well. Then the rolling cache holds exactly
# the keys each query may see, and the cache never grows beyond `W` positions. Information from
# further back still arrives, through the hidden states of lower layers, which the cached keys and
# values of higher layers already include.

# %% [markdown]
# **A limitation: chunks.** The cache returns only what it keeps. One token at a time that is
# right: the new query sees itself and the `W - 1` positions before it. But a chunk of `T > 1`
# tokens appended at once gets back only the last `W` positions too, so the chunk's query `i`
# (counting from 0) sees `W - T + 1 + i` keys, fewer than `W`: its earliest queries lose keys
# that token-by-token decoding would have kept. And a prompt longer than `W` cannot be
# prefilled at all, since it would have more queries than keys:

# %%
try:
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 40)), [SlidingCache(W) for _ in model.blocks])
except ValueError as err:
    print("40-token prefill into a 32-position window -> ValueError:", err)

# %% [markdown]
# A sliding cache that serves chunks must hand back the old window *and* the whole chunk (up to
# `W + T - 1` positions) with a sliding-window mask, and drop the oldest positions only after
# attending. [Chapter 9](../09_sliding_window.ipynb) builds such a cache for a model trained with
# sliding-window attention.

# %% [markdown]
# ## Exercise 3 — a bf16 cache
#
# `layer.new_cache(..., dtype=torch.bfloat16)` builds a `KVCache` whose keys and values are
# stored in bfloat16: `append` rounds the fp32 keys and values it receives, and the attention
# layer casts what it reads back to the queries' dtype, fp32, before attending. The model and
# everything else stay fp32.
#
# **What to expect.**
#
# - *Memory*: 2 bytes per number instead of 4, so exactly half.
# - *Rounding*: bf16 keeps fp32's 8 exponent bits but only 8 significant bits (7 stored, one
#   implicit). Rounding to the nearest such number has a relative error of at most half a unit
#   in the last place, $2^{-8} \approx 0.4\%$ (`torch.finfo(torch.bfloat16).eps` is $2^{-7}$, the
#   gap between 1 and the next number).
# - *Logits*: errors of 0.4% at most in every cached number partly cancel in the dot products
#   and weighted sums, so the logits should move by far less than their spread.
# - *Tokens*: a greedy token can only change at a step where the two best logits are closer than
#   the error can move them apart, twice the largest logit error. Before the first such step the
#   bf16 run computes on exactly the same tokens as the fp32 run, so it must pick the same ones.
#
# We measure on the prompt of Exercise 2: the fp32 run generates 64 tokens, then both caches are
# fed those same tokens, so that every step compares like with like.

# %%
n_steps = 64
ref_tokens = generate(model, prompt, n_steps, module_caches(model, 1))  # (1, 16 + 64), fp32 cache
caches_32 = module_caches(model, 1)
caches_16 = module_caches(model, 1, dtype=torch.bfloat16)
logits_32 = step_logits(model, ref_tokens, 16, caches_32)  # (1, 65, vocab): step 0 = prefill
logits_16 = step_logits(model, ref_tokens, 16, caches_16)  # same inputs, bf16 cache

bytes_32, bytes_16 = sum(c.nbytes for c in caches_32), sum(c.nbytes for c in caches_16)
print(f"cache memory: fp32 {bytes_32 // 1024} KiB, bf16 {bytes_16 // 1024} KiB "
      f"(stored as {caches_16[0].k.dtype})")

# Layer 0's keys come straight from the embeddings, identical in both runs: the bf16 cache holds
# exactly the fp32 keys, rounded. (Deeper layers' keys also differ by the errors of the layers
# below them.)
n = caches_32[0].length
k_32, k_16 = caches_32[0].k[:, :, :n], caches_16[0].k[:, :, :n]
assert torch.equal(k_16, k_32.to(torch.bfloat16))
rel = ((k_16.float() - k_32).abs() / k_32.abs()).max().item()
print(f"largest relative rounding error of a stored key: {rel:.2%} (bound 2^-8 = {2**-8:.2%})")

err = (logits_32 - logits_16).abs().amax(dim=-1)[0]  # (65,): largest logit error per step
spread = logits_32.std().item()
print(f"largest logit error over {n_steps} steps: {err.max().item() / spread:.1%} "
      f"of the logits' spread")
assert bytes_16 * 2 == bytes_32 and rel <= 2**-8 and err.max() < 0.01 * spread

# %% [markdown]
# Half the memory; every stored key within $2^{-8}$ of its fp32 value; logits off by about a
# thousandth of their spread. Now the tokens. For each step of the fp32 run we take the gap
# between its two best logits and compare it with twice that step's largest error:

# %% tags=["nbval-ignore-output"]
top2 = logits_32[0].topk(2, dim=-1).values  # (65, 2)
assert torch.equal(logits_32[0, :-1].argmax(dim=-1), ref_tokens[0, 16:])  # the fp32 run's choices
gap = top2[:, 0] - top2[:, 1]  # (65,): how far the winner leads at each step
at_risk = (gap < 2 * err).nonzero().flatten().tolist()  # steps where a token could flip
first_risk = at_risk[0]
print("steps where the lead is below twice the error:", at_risk)
print(f"at step {first_risk}: lead below 1e-4: {gap[first_risk].item() < 1e-4}, "
      f"error there above 1e-4: {err[first_risk].item() > 1e-4}")

free_16 = generate(model, prompt, n_steps, module_caches(model, 1, dtype=torch.bfloat16))
# Steps 0 .. first_risk - 1 generate the same tokens for sure: the new tokens 0 .. first_risk - 1.
same_before = torch.equal(free_16[:, : 16 + first_risk], ref_tokens[:, : 16 + first_risk])
assert same_before
print(f"bf16 and fp32 caches generate the same first {first_risk} tokens: {same_before}")

# %% [markdown]
# Up to step 48 the winner always leads by more than the bf16 error could close, so the first 49
# generated tokens are certain to agree, on any machine. At step 49 the fp32 run faces a near
# tie: its two best logits differ in the sixth decimal, far less than the cache's rounding moves
# them. Which of the two wins with the bf16 cache is decided by rounding details, so it may
# differ between machines; the next cell reports what happened on the one that ran it (its
# output is not checked).

# %% tags=["nbval-ignore-output"]
same = free_16[0, 16:] == ref_tokens[0, 16:]  # (64,)
print(f"step {first_risk}: the bf16 cache {'kept' if same[first_risk] else 'changed'} the token; "
      f"{int(same.sum())} of {n_steps} generated tokens agree with the fp32 cache")
assert same[:first_risk].all()

# %% [markdown]
# So a bf16 cache halves the memory for an error of about a thousandth of the logits' spread, and
# greedy decoding follows the fp32 run until it meets a near tie; there either choice is as
# justified as the other, but once a token differs, the rest of the generation follows another
# path. (A model with random weights that cycles through the same few tokens meets near ties
# more often than a trained one.) One cost remains in this simple design: each step the layer
# casts the whole cache back to fp32, a temporary copy; inference kernels read the bf16 cache
# directly. Caches are usually kept in the model's own half-precision dtype, and compressed
# further (8-bit or 4-bit caches) by schemes that store a scale per block of numbers.

# %% [markdown]
# ## Exercise 4 — count the FLOPs saved
#
# Count matrix-multiply FLOPs, 2 per multiply-add, with $d$ = `n_embd`, $L$ = `n_layer`, $V$ the
# vocabulary size, for one sequence.
#
# - **Per position**, every layer runs `c_attn` ($2 \cdot d \cdot 3d$), `c_proj` ($2d^2$) and the
#   MLP ($2 \cdot d \cdot 4d$ twice), $24d^2$ in all, and the LM head adds $2dV$. So a forward
#   pass over $T$ positions costs $T\,(24Ld^2 + 2dV)$ outside attention.
# - **Attention**, on the reference path, multiplies a $(T_q, \text{hd})$ query block by the keys
#   and the weights by the values for each of the `n_head` heads: $4\,T_q T_k\,d$ per layer
#   ($\text{n\_head} \cdot \text{hd} = d$). It computes the full $T_q \times T_k$ matrix, masked
#   entries included.
#
# Without the cache, step $i$ runs on $T = P + i$ positions:
# $F_\text{plain} = \sum_{i=0}^{N-1} \left[(P+i)(24Ld^2 + 2dV) + 4L(P+i)^2 d\right]$.
#
# With the cache, the prefill costs $P(24Ld^2 + 2dV) + 4LP^2d$ and step $i \ge 1$ one position
# attending over $P+i$ keys, $(24Ld^2 + 2dV) + 4L(P+i)d$:
# $F_\text{cached} = (P+N-1)(24Ld^2 + 2dV) + 4Ld\left[P^2 + \sum_{i=1}^{N-1}(P+i)\right]$.
#
# `FlopCounterMode` counts every matrix product it sees, so on a model built with
# `impl="reference"` (whose attention is plain matrix products; the fused kernel is invisible to
# the counter) the two formulas must match it exactly. LayerNorm, GELU, softmax and the
# embedding lookups are not matrix products and are not counted.

# %%
def flops_formula(P, N, d, L, V, cached):
    per_pos = 24 * L * d**2 + 2 * d * V
    if not cached:
        return sum((P + i) * per_pos + 4 * L * (P + i) ** 2 * d for i in range(N))
    keys = P**2 + sum(P + i for i in range(1, N))
    return (P + N - 1) * per_pos + 4 * L * d * keys


def flops_counted(model, prompt, n_new, cached):
    caches = module_caches(model, 1) if cached else None
    with FlopCounterMode(display=False) as counter:
        generate(model, prompt, n_new, caches)
    return counter.get_total_flops()


torch.manual_seed(0)
ref_model = TinyLM(impl="reference").eval()
d, L, V = ref_model.cfg.n_embd, len(ref_model.blocks), ref_model.lm_head.out_features
P_small, N_small = 8, 12
for cached in (False, True):
    counted = flops_counted(ref_model, prompt[:, :P_small], N_small, cached)
    formula = flops_formula(P_small, N_small, d, L, V, cached)
    print(f"cached={cached!s:>5}: counted {counted:,} FLOPs, formula {formula:,}")
    assert counted == formula

# %% [markdown]
# The formulas are exact. Now the case of the chapter, $P = 16$, $N = 256$, split into the
# part outside attention (projections, MLPs, LM head) and attention:

# %%
P, N = 16, 256
per_pos = 24 * L * d**2 + 2 * d * V
parts = {
    "plain": (sum(P + i for i in range(N)) * per_pos,
              sum(4 * L * (P + i) ** 2 * d for i in range(N))),
    "cached": ((P + N - 1) * per_pos,
               4 * L * d * (P**2 + sum(P + i for i in range(1, N)))),
}
for name, (dense, attn) in parts.items():
    print(f"{name:>6}: {(dense + attn) / 1e9:6.2f} GFLOP = {dense / 1e9:6.2f} outside attention "
          f"+ {attn / 1e9:5.2f} attention ({attn / (dense + attn):.0%})")
ratio = sum(parts["plain"]) / sum(parts["cached"])
print(f"ratio without / with cache: {ratio:.0f}x")
assert sum(parts["plain"]) == flops_formula(P, N, d, L, V, cached=False)
assert sum(parts["cached"]) == flops_formula(P, N, d, L, V, cached=True)
assert parts["plain"][0] > parts["plain"][1]

# %% [markdown]
# The cache saves about 140 times the arithmetic here. Without it, the part outside attention
# dominates (over 80% of the FLOPs): at these lengths ($T \le 271$) a position's
# attention work, $4LTd$, is smaller than its $24Ld^2 + 2dV$ of projections, MLP and head as long
# as $T < 6d + V/(2L) = 800$. For longer generations the cubic attention term takes over — that
# is the "eventually cubic" of the chapter. The measured speed ratio in the chapter is far below
# 140: a cached step of this tiny model is dominated by fixed per-step overheads (Python, the
# dispatch of dozens of small PyTorch operators), not by arithmetic.
#
# One more saving hides in the formulas: the model computes logits for *every* position it is
# fed, but generation only needs the last one. Computing the LM head for the last position only
# saves $2dV$ per prompt position in the prefill and per position in each uncached step.
