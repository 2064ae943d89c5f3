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
# # Chapter 1 — solutions to the exercises
#
# Worked solutions for the exercises of `chapters/01_buggy_sketch.ipynb`. Each one states the
# prediction first, then checks it with code and an `assert`. The notebook stands on its own:
# it imports `Head` from `attnbook.attention` and redefines the few helpers it needs.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from attnbook.attention import Head, causal_mask

B, T, n_embd, head_size, block_size = 2, 6, 8, 4, 8
torch.manual_seed(0)
x = torch.randn(B, T, n_embd)  # (B, T, n_embd)


def past_change(layer, x):
    """Largest change of outputs 0..T-2 when only the last token is changed."""
    x_new = x.clone()
    x_new[:, -1] = x_new[:, -1] + 3.0
    with torch.no_grad():
        return (layer(x_new)[:, :-1] - layer(x)[:, :-1]).abs().max().item()


def value_ratio(layer, x, value_proj):
    """max|y| / max|V|: at most 1 for a weighted average of the values."""
    with torch.no_grad():
        return (layer(x).abs().max() / value_proj(x).abs().max()).item()


# %% [markdown]
# ## Exercise 1: softmax over the wrong axis
#
# **Prediction.** The scores have shape `(B, T, T)`, indexed `[batch, query, key]`. `dim=1` is
# the *query* axis, so the softmax normalises each **column** (one key, all queries) instead of
# each row. Columns will sum to 1 and rows will not. And causality breaks, even though the mask
# is still applied: the weight of query $t$ on key $j$ is $e^{s_{tj}} / \sum_{t' \ge j}
# e^{s_{t'j}}$, and that denominator contains the scores of *later* queries $t' > t$. A change
# to the last token changes its query, hence every column's denominator, hence every earlier
# output. The mask only stops the future from being a key; this bug lets it in through the
# normalisation. With rows that no longer sum to 1, the output is no longer a weighted average
# either, so `value_ratio` may exceed 1.

# %%
class WrongDimHead(Head):
    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, head_size) each
        scores = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, T, T)
        scores = scores.masked_fill(~self.tril[:T, :T], float("-inf"))
        weights = torch.softmax(scores, dim=1)  # the bug: dim=1 is the query axis
        self.attn = weights.detach()
        return weights @ v


torch.manual_seed(0)
wrong = WrongDimHead(n_embd, head_size, block_size).eval()
wrong(x)
ones = torch.ones(B, T)
print("rows sum to 1:   ", torch.allclose(wrong.attn.sum(dim=-1), ones))
print("columns sum to 1:", torch.allclose(wrong.attn.sum(dim=-2), ones))
print("row sums of the first sequence:", wrong.attn[0].sum(dim=-1).numpy().round(2))
print(f"change in past outputs: {past_change(wrong, x):.2f}")
ratios = [value_ratio(wrong, c * x, wrong.value) for c in (1, 10)]
print(f"max|y| / max|V| at input x1: {ratios[0]:.2f}, at input x10: {ratios[1]:.2f}")
assert not torch.allclose(wrong.attn.sum(dim=-1), ones)
assert torch.allclose(wrong.attn.sum(dim=-2), ones)
assert past_change(wrong, x) > 1e-3
assert ratios[0] <= 1 < ratios[1]

# %% [markdown]
# Both predictions hold. The row sums also show a telltale pattern: row 0 has a single weight
# below 1, while the last row collects weights from every column and its sum grows with $T$.
# The weighted-average test is subtler: at the toy input the ratio happens to stay below 1, and
# only at ten times the input, where the weights are more peaked, does an output exceed every
# value. One passing input proves little; that is why the chapter tries two scales.
# With the same weights, the correct `Head` passes the causality test:

# %%
right = Head(n_embd, head_size, block_size).eval()
right.load_state_dict(wrong.state_dict())
print(f"change in past outputs, correct Head: {past_change(right, x):.4f}")
assert past_change(right, x) < 1e-6

# %% [markdown]
# ## Exercise 2: a sequence longer than `block_size`
#
# **Prediction.** The notebook's `Head` slices the mask as `self.tril[:T, :T]`. Slicing past the
# end of a tensor is not an error in Python or PyTorch: it silently returns what there is, an
# `8 × 8` mask. The error comes one step later, when `masked_fill` tries to broadcast that mask
# against `(B, 9, 9)` scores, as a `RuntimeError` about tensor sizes that says nothing about
# `block_size`. The module's `Head` checks the length first and raises a `ValueError` that
# names the problem.
#
# Here is the notebook's version again (the module's, minus its argument checks):

# %%
class NotebookHead(nn.Module):
    def __init__(self, n_embd, head_size, block_size, dropout=0.0):
        super().__init__()
        self.head_size = head_size
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", causal_mask(block_size), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, head_size) each
        scores = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, T, T)
        scores = scores.masked_fill(~self.tril[:T, :T], float("-inf"))
        return self.dropout(torch.softmax(scores, dim=-1)) @ v  # (B, T, head_size)


long_x = torch.randn(1, block_size + 1, n_embd)  # T = 9 > block_size = 8
print("mask slice for T = 9:", tuple(NotebookHead(n_embd, head_size, block_size).tril[:9, :9].shape))
errors = {}
for name, cls in [("notebook Head", NotebookHead), ("attnbook Head", Head)]:
    try:
        cls(n_embd, head_size, block_size)(long_x)
    except (RuntimeError, ValueError) as err:
        errors[name] = err
        print(f"{name}: {type(err).__name__}: {err}")
assert isinstance(errors["notebook Head"], RuntimeError)
assert isinstance(errors["attnbook Head"], ValueError)
assert "block_size" in str(errors["attnbook Head"])

# %% [markdown]
# At 2 a.m. the second message wins: it says which argument is involved and what its value is,
# while the first one leaves you to work out which tensor was 8 wide and why. Why not just build
# a bigger mask on the fly? For this head alone that would work, but in a GPT the sequence
# length is also bounded by the learned position embeddings ([chapter 6](../06_positions.ipynb)),
# which do not exist beyond `block_size`. Failing loudly at the first layer that knows the limit is
# the honest choice.
#
# ## Exercise 3: fixing dropout, right and wrong
#
# **Prediction.**
# (a) Re-seeding inside `forward` makes every call draw the same dropout mask, so two eval
# calls agree, but dropout is still applied, so the eval output is wrong. Worse, in training every
# step draws the *same* mask (dropout stops being random), and every call resets the global
# random number generator, which changes the randomness of the whole program.
# (b) and (c) both switch dropout off in eval mode, so eval output is repeatable *and* equal to
# the output without dropout, while training keeps a fresh random mask per call.
#
# The three candidates differ only in how they apply dropout, so we put that in one method.
# All three get the same weights (same seed) and are compared with the same layer without
# dropout.

# %%
class BuggyDropoutHead(nn.Module):
    """The chapter's version 8: everything fixed except the functional dropout."""

    def __init__(self, n_embd, head_size, block_size, dropout=0.5):
        super().__init__()
        self.head_size, self.p = head_size, dropout
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", causal_mask(block_size), persistent=False)

    def drop(self, weights):
        return F.dropout(weights, self.p)  # the bug: training=True by default

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, head_size) each
        scores = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, T, T)
        scores = scores.masked_fill(~self.tril[:T, :T], float("-inf"))
        return self.drop(torch.softmax(scores, dim=-1)) @ v  # (B, T, head_size)


class FixA(BuggyDropoutHead):  # (a) re-seed on every call
    def forward(self, x):
        torch.manual_seed(0)
        return super().forward(x)


class FixB(BuggyDropoutHead):  # (b) pass the module's training flag
    def drop(self, weights):
        return F.dropout(weights, self.p, training=self.training)


class FixC(BuggyDropoutHead):  # (c) a dropout sub-module
    def __init__(self, n_embd, head_size, block_size, dropout=0.5):
        super().__init__(n_embd, head_size, block_size, dropout)
        self.dropout = nn.Dropout(dropout)

    def drop(self, weights):
        return self.dropout(weights)


def build(cls, dropout=0.5):
    torch.manual_seed(0)
    return cls(n_embd, head_size, block_size, dropout)


with torch.no_grad():
    target = build(BuggyDropoutHead, dropout=0.0)(x)  # what eval mode should return
    results = {}
    for cls in (BuggyDropoutHead, FixA, FixB, FixC):
        layer = build(cls).eval()
        y1, y2 = layer(x), layer(x)
        layer.train()
        results[cls.__name__] = (torch.equal(y1, y2), torch.allclose(y1, target),
                                 not torch.equal(layer(x), layer(x)))
print(f"{'':17}{'eval repeatable':>17}{'eval correct':>14}{'train random':>14}")
for name, (repeatable, correct, random) in results.items():
    print(f"{name:17}{repeatable!s:>17}{correct!s:>14}{random!s:>14}")
assert results["BuggyDropoutHead"] == (False, False, True)
assert results["FixA"] == (True, False, False)
assert results["FixB"] == results["FixC"] == (True, True, True)

# %% [markdown]
# Fix (a) passes the "two eval calls agree" test that exposed the bug in the chapter, and is
# still wrong on every other count: a reminder to test the *property* (eval output equals the
# no-dropout output), not just the symptom. Its side effect on the global generator is easy to
# see: after a call to the layer, the next random number is always the same one.

# %%
layer_a = build(FixA).train()
draws = []
for _ in range(2):
    layer_a(x)
    draws.append(torch.rand(1).item())
print("random number after each call is the same:", draws[0] == draws[1])
assert draws[0] == draws[1]

# %% [markdown]
# ## Exercise 4: the scale and the entropy of the weights
#
# **Prediction.** A dot product of two vectors with $d$ independent standard normal entries
# has standard deviation $\sqrt{d}$. Unscaled, the scores therefore spread out more and more as
# $d$ grows, and the softmax concentrates on the largest score: the entropy of a row falls
# towards 0 (all weight on one key). Divided by $\sqrt{d}$, the scores have standard deviation
# 1 whatever $d$ is, so the entropy should stay about the same, somewhat below the maximum
# $\log T$ of uniform weights.
#
# We measure the mean entropy $H = -\sum_j a_{tj} \log a_{tj}$ over 64 random sets of
# $T = 32$ queries and keys, without a mask. `torch.special.entr` computes $-a \log a$ and
# returns 0 at $a = 0$.

# %%
torch.manual_seed(0)
n_keys = 32
sizes = [4, 16, 64, 256]
entropy = {"scaled by 1/sqrt(d)": [], "unscaled": []}
for d in sizes:
    q, k = torch.randn(2, 64, n_keys, d).unbind(0)  # (64, T, d) each
    scores = q @ k.transpose(-2, -1)  # (64, T, T)
    for name, factor in [("scaled by 1/sqrt(d)", d**-0.5), ("unscaled", 1.0)]:
        weights = torch.softmax(scores * factor, dim=-1)
        entropy[name].append(torch.special.entr(weights).sum(-1).mean().item())
print(f"maximum (uniform weights): log T = {torch.log(torch.tensor(n_keys)).item():.2f}")
for name, values in entropy.items():
    print(f"{name:20}", "  ".join(f"d={d}: {h:.2f}" for d, h in zip(sizes, values, strict=True)))

scaled, unscaled = entropy["scaled by 1/sqrt(d)"], entropy["unscaled"]
assert max(scaled) - min(scaled) < 0.1  # flat in d
assert all(a > b for a, b in zip(unscaled, unscaled[1:], strict=False))  # falls with d
assert unscaled[-1] < 0.5 < 2.5 < scaled[-1]

# %%
fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
for name, values in entropy.items():
    ax.plot(sizes, values, marker="o", label=name)
ax.axhline(torch.log(torch.tensor(n_keys)).item(), color="gray", linestyle="--",
           label="log T (uniform weights)")
ax.set_xscale("log", base=2)
ax.set_xlabel("head size d")
ax.set_ylabel("mean entropy of a weight row (nats)")
ax.set_title("Attention entropy with and without the 1/sqrt(d) scale")
ax.legend()
plt.show()

# %% [markdown]
# With standard normal queries and keys the unscaled rows end up close to one-hot at $d = 256$.
# A real head does not start from standard normal queries, though: it makes them with
# `nn.Linear`, whose default initialisation draws weights uniformly from
# $\pm 1/\sqrt{d_{in}}$, a variance of $1/(3 d_{in})$. From standard normal inputs, each query
# and key entry then has a variance of about $1/3$, and an unscaled score has a standard deviation
# of about $\sqrt{d}/3$ rather than $\sqrt{d}$. Let us measure that case too.

# %%
torch.manual_seed(0)
linear_entropy = []
for d in sizes:
    W_q, W_k = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
    inputs = torch.randn(64, n_keys, d)  # (64, T, d)
    with torch.no_grad():
        scores = W_q(inputs) @ W_k(inputs).transpose(-2, -1)  # (64, T, T), unscaled
    weights = torch.softmax(scores, dim=-1)
    linear_entropy.append(torch.special.entr(weights).sum(-1).mean().item())
    print(f"d={d:3}: std of the unscaled scores {scores.std():5.2f} (sqrt(d)/3 = {d**0.5 / 3:.2f}),"
          f" mean entropy {linear_entropy[-1]:.2f}")
assert all(a > b for a, b in zip(linear_entropy, linear_entropy[1:], strict=False))
assert 0.5 < linear_entropy[-1] < 1.2  # peaked, but well above one-hot (0)

# %% [markdown]
# The unscaled scores are three times narrower than with standard normal entries, so the
# entropy falls more slowly: at $d = 256$ a row has about 0.8 nats out of a possible 3.47. That
# is not one-hot, but it is much more peaked than with the scale, and it keeps falling as the
# head widens. A peaked softmax has small gradients, so the head finds it harder to learn to
# spread its attention. With the scale, the starting point does not depend on the head size.
#
# ## Exercise 5: a reusable checker
#
# Each test of the chapter becomes one entry, and the order matters. The causality test and the
# weighted-average test compare outputs, or look at one output, and assume that the layer
# computes the same thing every time it is called. If two eval calls differ (dropout left on, as
# in version 8), a difference between two calls means nothing, and whether one output exceeds
# the values depends on which weights the dropout happened to keep. So the checker runs the
# eval-determinism test first and, if it fails, reports those two tests as *inconclusive*
# instead of pretending to have found more bugs. The shape test does not depend on the random
# draws, so it runs either way.
#
# Two more details keep the checker free of side effects. It draws its test input from its own
# `torch.Generator`, so it neither reads nor resets the global random number generator, and it
# wraps the layer's calls in `torch.random.fork_rng`, which puts the global generator's state
# back afterwards (a buggy dropout draws from it). And it switches the layer to eval mode only
# for the duration of the check, restoring `layer.training` at the end. The weighted-average
# test uses the layer's `value` projection; the small tolerance allows for rounding when the
# weights are nearly one-hot and the largest output equals the largest value.

# %%
def check_attention(layer, n_embd, T=6, seed=0):
    """Run the chapter's property tests on a causal attention layer.

    Returns {test: "pass" | "FAIL" | "inconclusive"}; leaves the layer's mode and the global
    random number generator as it found them.
    """
    x = torch.randn(2, T, n_embd, generator=torch.Generator().manual_seed(seed))  # (B, T, n_embd)
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            y = layer(x)
            report = {
                "eval deterministic": torch.equal(y, layer(x)),
                "shape": tuple(y.shape) == (2, T, layer.value.out_features),
            }
            if report["eval deterministic"]:
                ratio = max(value_ratio(layer, c * x, layer.value) for c in (1, 10))
                report["weighted average"] = ratio <= 1 + 1e-6
                report["causal"] = past_change(layer, x) < 1e-6
            else:  # two calls differ anyway: these tests cannot tell a bug from noise
                report["weighted average"] = report["causal"] = None
    finally:
        layer.train(was_training)
    return {test: {True: "pass", False: "FAIL", None: "inconclusive"}[ok]
            for test, ok in report.items()}


torch.manual_seed(0)
layers = {
    "attnbook Head": Head(n_embd, head_size, block_size),
    "WrongDimHead (ex. 1)": WrongDimHead(n_embd, head_size, block_size),
    "BuggyDropoutHead (ex. 3)": BuggyDropoutHead(n_embd, head_size, block_size),
}
rng_before = torch.get_rng_state()
reports = {name: check_attention(layer, n_embd) for name, layer in layers.items()}
tests = list(reports["attnbook Head"])
print(f"{'':25}" + "".join(f"{test:>20}" for test in tests))
for name, report in reports.items():
    print(f"{name:25}" + "".join(f"{report[test]:>20}" for test in tests))
print("layers back in training mode:", all(layer.training for layer in layers.values()))
print("global generator untouched:  ", torch.equal(torch.get_rng_state(), rng_before))

assert set(reports["attnbook Head"].values()) == {"pass"}
assert reports["WrongDimHead (ex. 1)"] == {
    "eval deterministic": "pass", "shape": "pass", "weighted average": "FAIL", "causal": "FAIL"}
assert reports["BuggyDropoutHead (ex. 3)"] == {
    "eval deterministic": "FAIL", "shape": "pass",
    "weighted average": "inconclusive", "causal": "inconclusive"}
assert all(layer.training for layer in layers.values())
assert torch.equal(torch.get_rng_state(), rng_before)

# %% [markdown]
# The module's `Head` passes everything. The wrong-axis head is deterministic, so its verdicts
# count: it fails causality, as predicted in exercise 1, and the weighted-average test, because
# its last row sums to more than 1 and at ten times the input an output exceeds every value.
# The version-8 dropout head fails eval determinism and nothing else can be said about it until
# that is fixed: its attention is in fact causal (the mask is right), which a naive checker
# comparing two noisy calls would have reported as a causality failure. The lesson for the
# order of testing: make the layer deterministic first (eval mode, dropout off), otherwise the
# other tests cannot tell a real bug from noise.
