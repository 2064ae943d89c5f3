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
# # Chapter 12 — Gated linear attention and DeltaNet: solutions
#
# Worked solutions to the exercises of `chapters/12_gated_deltanet.ipynb`. Each one states a
# prediction first, then checks it with code and an `assert`. As in the chapter, everything runs
# on one thread, and the exact checks run in float64.

# %%
import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnbook.attention.deltanet import (
    delta_rule_chunked,
    delta_rule_recurrent,
    delta_rule_weights,
)
from attnbook.bench import fwd_bwd_seconds, gated_delta_rule

torch.set_num_threads(1)
_ = torch.manual_seed(0)  # (manual_seed returns the generator; `_ =` keeps it out of the output)
f64 = dict(dtype=torch.float64)

# %% [markdown]
# ## Exercise 1 — How long does a decay remember?
#
# **(a) The half-life.** With a constant decay the state after the last write is
# $S = \sum_s \gamma^{a_s} k_s v_s^\top$, where $a_s$ is the pair's *age* (the number of writes
# after it). With orthonormal keys there is no crosstalk, so reading with $k_s$ returns exactly
# $\gamma^{a} v_s$: the read shrinks geometrically with the age. It is half the value when
# $\gamma^a = 1/2$, that is after
#
# $$a_{1/2} = \frac{\ln 2}{-\ln\gamma} \approx \frac{0.69}{1-\gamma} \text{ writes}$$
#
# (the approximation for $\gamma$ near 1): about $\ln 2 \approx 0.69$ times the "memory length" $1/(1-\gamma)$
# of the chapter. For $\gamma = 0.95$, 13.5 writes; the first whole age at which the read is
# below one half is the next integer up.
#
# **Check** with 64 orthonormal keys in 64 dimensions (the rows of a random orthogonal matrix),
# written with `delta_rule_chunked` (`delta=False`: the plain decayed write) and read back from
# the final state.

# %%
d = 64
torch.manual_seed(1)
Q_orth, _ = torch.linalg.qr(torch.randn(d, d))  # (d, d): orthonormal columns
keys_o = Q_orth.T[None, None]  # (1, 1, N = 64, d): orthonormal rows as keys
vals_o = torch.randn(1, 1, d, d)  # (1, 1, N, d_v)
age_o = torch.arange(d - 1, -1, -1)  # the last pair written has age 0
print(f"{'gamma':>6} {'ln 2 / -ln gamma':>17} {'first age read < 1/2':>21} "
      f"{'read there':>11} {'one earlier':>12}")
for gamma in (0.8, 0.9, 0.95, 0.98):
    g = torch.full((1, 1, d), math.log(gamma))
    _, S = delta_rule_chunked(keys_o, keys_o, vals_o, torch.ones(1, 1, d), 64, g, delta=False)
    reads = keys_o @ S  # (1, 1, N, d_v): S^T k for every stored key
    scale = ((reads * vals_o).sum(-1) / (vals_o**2).sum(-1))[0, 0]  # (N,): read = scale * v
    assert torch.allclose(reads, scale[:, None] * vals_o, atol=1e-5)  # no crosstalk
    assert torch.allclose(scale, gamma ** age_o.float(), atol=1e-5)  # gamma^age
    half_life = math.log(2) / -math.log(gamma)
    first = int(age_o[scale < 0.5].min())  # the youngest pair read at less than half
    i_first = d - 1 - first  # its position in the sequence
    print(f"{gamma:>6} {half_life:>17.2f} {first:>21} {scale[i_first].item():>11.3f} "
          f"{scale[i_first + 1].item():>12.3f}")
    assert first == math.ceil(half_life)

# %% [markdown]
# Every read is the stored value times $\gamma^{a}$ (the asserts check it to `1e-5`), and the
# first age below one half is always $\lceil \ln 2 / (-\ln \gamma) \rceil$: 4, 7, 14 and 35
# writes for $\gamma = 0.8, 0.9, 0.95, 0.98$. For $\gamma = 0.95$ the read is still 0.513 of the
# value at age 13 and 0.488 at age 14.
#
# **(b) The best $\gamma$ for the 32 newest pairs.** Now the keys are random, not orthogonal.
# The relative error of the read of the pair of age $a$ has two parts:
#
# - **fading**: the pair itself comes back as $\gamma^a v$, an error of $(1-\gamma^a)^2$;
# - **crosstalk**: every other pair $j$ adds $\gamma^{a_j}(k_j\cdot k)\,v_j$. For random unit
#   keys $(k_j\cdot k)^2$ is $1/d$ on average, and the values are independent, so the crosstalk
#   adds $\frac1d\sum_{j\ne a}\gamma^{2 a_j}$, about $\frac1d\,\frac{1}{1-\gamma^2}$: the number
#   of pairs still "in" the memory, over $d$.
#
# Prediction: a large $\gamma$ keeps all 32 pairs but also a long tail of older ones
# (crosstalk); a small $\gamma$ has little crosstalk but fades the pairs we want. The best
# $\gamma$ should keep a memory of about the 32 pairs we ask for, $1/(1-\gamma) \approx 32$,
# that is $\gamma$ near 0.97. We measure on section 2.1's pairs (same seed, same shapes: 8
# trials of 256 unit keys in 64 dimensions) and print the two predicted terms beside the
# measurement.

# %%
n_store = 256


def decayed_reads(keys, vals, gamma):
    """Write the pairs (R, N, d) into one decaying memory (plain write); read every key back."""
    R, N, _ = keys.shape
    k4, v4 = keys[:, None], vals[:, None]  # (R, 1 head, N, d)
    g = torch.full((R, 1, N), math.log(gamma))
    _, S = delta_rule_chunked(k4, k4, v4, torch.ones(R, 1, N), 64, g, delta=False)  # (R, 1, d, d)
    return (k4 @ S)[:, 0]  # (R, N, d)


def predicted_terms(gamma, n_new=32, N=n_store, d=d):
    """Mean fading and crosstalk of the n_new newest of N pairs, from the two formulas above."""
    fading = sum((1 - gamma**a) ** 2 for a in range(n_new)) / n_new
    in_memory = sum(gamma ** (2 * j) for j in range(N))  # sum over every age of gamma^(2 age)
    crosstalk = sum(in_memory - gamma ** (2 * a) for a in range(n_new)) / (n_new * d)
    return fading, crosstalk


torch.manual_seed(3)  # as in the chapter's section 2.1
keys = F.normalize(torch.randn(8, n_store, d), dim=-1)  # 8 trials of 256 unit keys
vals = torch.randn(8, n_store, d)
gammas = [0.8, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0]
measured = {}
print(f"{'gamma':>6} {'error, newest 32':>17} {'predicted':>10} {'= fading':>9} "
      f"{'+ crosstalk':>12} {'1/(1-gamma)':>12}")
for gamma in gammas:
    reads = decayed_reads(keys, vals, gamma)
    err = ((reads - vals) ** 2).sum(-1).mean(0) / (vals**2).sum(-1).mean(0)  # (N,) by position
    measured[gamma] = err[-32:].mean().item()  # the 32 newest pairs
    fading, crosstalk = predicted_terms(gamma)
    memory = "inf" if gamma == 1 else f"{1 / (1 - gamma):.0f}"
    print(f"{gamma:>6} {measured[gamma]:>17.2f} {fading + crosstalk:>10.2f} {fading:>9.2f} "
          f"{crosstalk:>12.2f} {memory:>12}")
best = min(measured, key=measured.get)
fine = [0.85 + 0.001 * i for i in range(150)]  # the formula on a finer grid, 0.850 to 0.999
best_formula = {n: min(fine, key=lambda gm, n=n: sum(predicted_terms(gm, n_new=n)))
                for n in (8, 32, 64)}
print(f"best gamma measured: {best} | minimum of the formula (0.001 grid) for the newest "
      "8, 32, 64 pairs: " + ", ".join(f"{gm:.3f}" for gm in best_formula.values()))
assert best == 0.97 and abs(best_formula[32] - 0.97) < 0.006
assert best_formula[8] < best_formula[32] < best_formula[64]
assert measured[0.97] < 0.6 * min(measured[0.8], measured[0.99]) and measured[1.0] > 3.5

# %% [markdown]
# The best decay is $\gamma = 0.97$, with an error of 0.40 on the 32 newest pairs — against 4.02
# without decay, 0.79 with $\gamma = 0.99$ and 0.81 with $\gamma = 0.8$. The two-term formula
# follows the measurement to about 0.01 everywhere except at $\gamma = 1$ (4.02 measured against
# 3.98), and has its minimum at 0.968. Its columns say why the optimum is neither end:
#
# - **$\gamma = 1$** keeps all 256 pairs: no fading, but the crosstalk of 255 others, $255/64
#   \approx 4$. Remembering everything is what buries the recent pairs.
# - **Small $\gamma$** ($0.8$, a memory of 5 writes) has almost no crosstalk (0.04) but fades
#   the pairs we want: a pair of age 20 comes back at $0.8^{20} \approx 1\%$ of its value, so
#   the fading term alone is 0.77.
# - **In between** the two terms balance. At $\gamma = 0.97$ the memory is about 33 writes
#   long — about the 32 pairs asked for — and the crosstalk (0.26) comes from about
#   $1/(1-\gamma^2) \approx 17$ effective pairs in a 64-dimensional memory.
#
# The best $\gamma$ depends on how far back the pairs that matter lie: for the newest 8 pairs the
# formula's best is 0.930, for the newest 64 it is 0.976. A constant cannot be right for every
# token, which is the case for the data-dependent gate of section 2.2.
#
# ## Exercise 2 — Several passes are least squares
#
# **Prediction.** A delta-rule write with $\beta = 1$ and a unit key is the orthogonal
# projection of $S$ onto the solutions of the single equation $S^\top k_i = v_i$: it changes $S$
# only along $k_i$, by exactly what that equation needs. Sweeping through the $N$ equations of
# $K S = V$ over and over is **Kaczmarz's method** (1937). Started from $S = 0$ every update
# lies in the span of the keys, so when the system has solutions (below capacity,
# $N \le d$, with independent keys) the sweeps converge — geometrically — to the one of least
# norm, $S^\star = K^{+} V$, and the error goes to 0. Each pass contracts the remaining error
# by a fixed factor that depends on how far the keys are from orthogonal, so the number of
# passes is a handful to a dozen.
#
# **Check** with the module: one pass is one call of `delta_rule_chunked` on the $N$ pairs, the
# next pass starts from the state the previous one left (`state=`). 8 trials, float64.

# %%
def kaczmarz(keys, vals, beta, n_pass):
    """Write the pairs (R, 1, N, d) n_pass times with the delta rule; after each pass, the
    relative error of reading every key, and the relative distance of S to pinv(K) V."""
    R, _, N, _ = keys.shape
    b = torch.full((R, 1, N), beta, **f64)
    S_star = torch.linalg.pinv(keys) @ vals  # (R, 1, d, d_v): least squares, least norm
    S, errs, dists = None, [], []
    for _ in range(n_pass):
        _, S = delta_rule_chunked(keys, keys, vals, b, 64, state=S)  # one pass, from S
        errs.append((((keys @ S - vals) ** 2).sum() / (vals**2).sum()).item())
        dists.append(((S - S_star).norm() / S_star.norm()).item())
    ceiling = (((keys @ S_star - vals) ** 2).sum() / (vals**2).sum()).item()
    return errs, dists, ceiling


torch.manual_seed(20)
keys32 = F.normalize(torch.randn(8, 1, 32, d, **f64), dim=-1)  # N = 32 pairs, d = 64
vals32 = torch.randn(8, 1, 32, d, **f64)
errs, dists, ceiling = kaczmarz(keys32, vals32, 1.0, 13)
print(f"N = 32, d = 64, beta = 1; least-squares error {ceiling:.0e} (the system is consistent)")
print(f"{'pass':>5} {'error':>9} {'|S - pinv(K) V| / |pinv(K) V|':>31}")
for p in (1, 2, 4, 6, 9, 10, 11, 13):
    print(f"{p:>5} {errs[p - 1]:>9.1e} {dists[p - 1]:>31.2f}")
passes = 1 + next(p for p, e in enumerate(errs) if e < 1e-3)
print("passes until the error is below 1e-3:", passes,
      f"| error shrinks per pass by about {errs[-1] / errs[-2]:.2f}")
assert passes == 11 and errs[passes - 1] < 0.8e-3 < 1.1e-3 < errs[passes - 2]
assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:], strict=False)) and dists[-1] < 0.05

# %% [markdown]
# One pass (the chapter's probe) leaves an error of 0.28; then every pass removes about a third
# of what is left (the error shrinks by a factor of about 0.65 per pass: geometric convergence),
# and **11 passes** bring it below $10^{-3}$ (1.1e-03 after 10, 7.2e-04 after 11). The state
# moves towards the least-norm solution $K^{+}V$ at the same time: its relative distance falls
# from 0.63 after one pass to 0.03 after 13. Repeating the writes turns the one-pass delta rule
# into the least-squares memory, exactly as Kaczmarz's method solves a consistent linear
# system.
#
# **At $N = 128$** there are 128 equations $S^\top k_i = v_i$ per value coordinate and only
# 64 unknowns: no $S$ satisfies them all, the system is *inconsistent*. The best any $S$ can do
# is the least-squares error, about $1 - d/N = 0.5$ (chapter, section 3.3). Prediction: with
# $\beta = 1$ the error does *not* converge to that. Each write makes its own equation exact
# — so the state can never stop moving — and the pass ends in a *cycle*: the state after each
# pass settles, but at a point set mostly by the last writes, not at the least-squares
# solution. A smaller $\beta$ (relaxation) moves each write only part of the way; the cycle
# shrinks, and as $\beta \to 0$ it closes in on the least-squares solution, at the price of
# more passes.

# %%
torch.manual_seed(21)
keys128 = F.normalize(torch.randn(8, 1, 128, d, **f64), dim=-1)  # N = 128 > d = 64
vals128 = torch.randn(8, 1, 128, d, **f64)
shown = (1, 2, 5, 10, 20, 40)
print(f"N = 128, d = 64; least-squares ceiling 1 - d/N = {1 - d / 128:.2f}")
print(f"{'beta':>5} " + " ".join(f"{'pass ' + str(p):>8}" for p in shown)
      + f" {'dist. to LS':>12}")
final = {}
for beta in (1.0, 0.5, 0.1):
    errs, dists, ceiling = kaczmarz(keys128, vals128, beta, 40)
    final[beta] = errs[-1]
    print(f"{beta:>5} " + " ".join(f"{errs[p - 1]:>8.3f}" for p in shown) + f" {dists[-1]:>12.2f}")
    assert abs(errs[-1] - errs[-2]) < 0.01 * errs[-1] or beta == 0.1  # settled (0.1: still moving)
print(f"least-squares error of these pairs: {ceiling:.3f}")
assert final[1.0] > 1.8 * ceiling and final[1.0] > final[0.5] > final[0.1] > ceiling
assert final[0.1] - ceiling < 0.02

# %% [markdown]
# With $\beta = 1$ the error settles within a few passes at **0.992**, about twice the
# least-squares error of these pairs (0.498) and barely better than one pass (1.054): the passes
# repeat the same cycle, and the state stays far from the least-squares solution (relative
# distance 0.71). With $\beta = 0.5$ the cycle is smaller (0.567, distance 0.26), and with
# $\beta = 0.1$ the error is still falling after 40 passes, at 0.506, within 0.01 of the
# ceiling. This is the classic behaviour of Kaczmarz's method on an inconsistent system: with a
# fixed relaxation it converges to a limit cycle around the least-squares solution, whose size
# shrinks with the relaxation. Past capacity a delta-rule memory can at best approach the
# ceiling, and the rule with $\beta = 1$ — "the latest write is exact" — is far from it.
#
# ## Exercise 3 — Negative eigenvalues
#
# **What a $\beta = 2$ write does.** The transition $I - \beta k k^\top$ with a unit key has
# eigenvalue $1 - \beta$ along $k$ and 1 in every direction orthogonal to $k$. For $\beta = 2$
# that is $-1$: $I - 2kk^\top$ is a **Householder reflection**. The write
# $S \leftarrow (I - 2kk^\top)S + 2kv^\top$ leaves the memory unchanged orthogonally to $k$ and,
# along $k$, turns the read $r = S^\top k$ into $2v - r$: it *reflects* what the memory returns
# for $k$ through $v$ (with $v = 0$, it flips its sign). A write with $\beta \in (1, 2)$
# overshoots $v$ by a factor $\beta - 1$ instead of stopping at it.
#
# Note that the chapter's functions do not constrain $\beta$ at all: `delta_rule_recurrent`
# and `delta_rule_chunked` take any `beta` (their docstring says $[0, 1]$), and only the layer
# restricts it, through a sigmoid, to $(0, 1)$. Grazzi et al. take $\beta = 2\sigma(\cdot) \in
# (0, 2)$ instead, which needs no change to the rule.

# %%
torch.manual_seed(30)
d8 = 8
k1 = F.normalize(torch.randn(d8, **f64), dim=0)  # a unit key
print(f"{'beta':>5} {'eigenvalue along k':>19} {'other eigenvalues':>18} {'spectral norm':>14}")
for beta in (0.5, 1.0, 1.5, 2.0, 2.5):
    M = torch.eye(d8, **f64) - beta * torch.outer(k1, k1)  # the transition of one write
    others = torch.linalg.eigvalsh(M)
    others = others[(others - (1 - beta)).abs() > 1e-9]  # drop the one along k
    along = (k1 @ M @ k1).item()  # M k = (1 - beta) k, so k^T M k is the eigenvalue
    print(f"{beta:>5} {along:>19.2f} {'all ' + format(others.mean().item(), '.2f'):>18} "
          f"{torch.linalg.matrix_norm(M, 2).item():>14.2f}")
    assert torch.allclose(M @ k1, (1 - beta) * k1)
    assert torch.allclose(others, torch.ones(d8 - 1, **f64))

S0 = torch.randn(d8, d8, **f64)  # what the memory holds before
v1 = torch.randn(d8, **f64)
S1 = S0 + 2.0 * torch.outer(k1, v1 - S0.T @ k1)  # one delta-rule write with beta = 2
off_k = torch.eye(d8, **f64) - torch.outer(k1, k1)  # projection orthogonal to k
print("beta = 2 write: read of k becomes 2 v - old read:",
      torch.allclose(S1.T @ k1, 2 * v1 - S0.T @ k1, atol=1e-12),
      "| the memory orthogonal to k is unchanged:", torch.allclose(off_k @ S1, off_k @ S0,
                                                                    atol=1e-12))

# %% [markdown]
# For every $\beta \in [0, 2]$ the spectral norm of the transition is 1: a write can never
# *amplify* what the memory holds, only keep it, shrink it, or (for $\beta > 1$) shrink and
# flip it along $k$. At $\beta = 2.5$ the eigenvalue along $k$ is $-1.5$, and repeated writes
# along similar keys blow up, as the keys of norm $\sqrt 8$ did in the chapter's section 3.2.
#
# **Bounded for unit keys.** Since $\|(I - \beta kk^\top) S\|_F \le \|S\|_F$ for
# $\beta \in [0, 2]$, each write grows the state by at most $\beta\|v\|$, never by a factor.
# More precisely, with random unit keys (so that $\mathbb E\|S^\top k\|^2 = \|S\|_F^2/d$) and
# independent values, one write changes the squared norm on average by
# $-\beta(2-\beta)\|S\|_F^2/d + \beta^2 d_v$. For $\beta < 2$ the first term wins once the state
# is large enough, and the norm settles where the two balance:
# $\|S\|_F \approx \sqrt{d\,d_v\,\beta/(2-\beta)}$. At $\beta = 2$ the shrinking term vanishes
# and the state performs a random walk, growing like $2\sqrt{t\,d_v}$ — like linear attention
# without decay, never faster. Beyond 2 it grows exponentially.

# %%
torch.manual_seed(36)
T_long, d32 = 4096, 32
k_l = F.normalize(torch.randn(1, 1, T_long, d32, **f64), dim=-1)
v_l = torch.randn(1, 1, T_long, d32, **f64)
lengths = (256, 1024, 4096)
print(f"{'beta':>5} " + " ".join(f"{'|S| at ' + str(t):>12}" for t in lengths)
      + f" {'settles at':>11}")
norms = {}
for beta in (0.5, 1.0, 1.5, 1.9, 2.0, 2.1):
    b = torch.full((1, 1, T_long), beta, **f64)
    norms[beta] = [delta_rule_chunked(k_l[:, :, :t], k_l[:, :, :t], v_l[:, :, :t], b[..., :t],
                                      64)[1].norm().item() for t in lengths]
    settle = f"{math.sqrt(d32 * d32 * beta / (2 - beta)):.0f}" if beta < 2 else "-"
    cells = [f"{n:.0f}" if n < 1e4 else f"{n:.1e}" for n in norms[beta]]
    print(f"{beta:>5} " + " ".join(f"{c:>12}" for c in cells) + f" {settle:>11}")
for beta in (0.5, 1.0, 1.5, 1.9):  # settled near the estimate, and no longer growing
    estimate = math.sqrt(d32 * d32 * beta / (2 - beta))
    assert all(0.85 * estimate < n < 1.15 * estimate for n in norms[beta])
assert 1.7 < norms[2.0][2] / norms[2.0][1] < 2.3  # beta = 2: about sqrt(t)
assert norms[2.1][2] > 1e6  # beyond 2: exponential

# %% [markdown]
# Up to $\beta = 1.9$ the state's norm no longer grows between 256 and 4096 writes, and stays
# within 15% of $\sqrt{d\,d_v\,\beta/(2-\beta)}$ (18, 32, 55 and 139 for
# $\beta = 0.5, 1, 1.5, 1.9$, with $d = d_v = 32$; it fluctuates more the closer $\beta$ is to 2:
# 125 to 138 for 1.9). At exactly $\beta = 2$ it doubles with every fourfold length (185, 369,
# 733, against $2\sqrt{t\,d_v}$ = 181, 362, 724), and at $\beta = 2.1$ it is $1.1\times10^{8}$
# after 4096 writes. So $\beta \in (0, 2)$ with unit keys is stable; the open interval matters
# only at its upper end.
#
# **The module's forms still agree.** Nothing in the chunked form's derivation assumed
# $\beta \le 1$: $I + A$ stays unit lower-triangular, hence invertible, for any $\beta$. Random
# $\beta \in (0, 2)$, with and without a data-like gate, in float64:

# %%
torch.manual_seed(32)
B, H, T, dk = 2, 3, 100, 16
q = torch.randn(B, H, T, dk, **f64) / math.sqrt(dk)
k = F.normalize(torch.randn(B, H, T, dk, **f64), dim=-1)
v = torch.randn(B, H, T, dk, **f64)
beta = 2 * torch.rand(B, H, T, **f64)  # write strengths in (0, 2)
gate = F.logsigmoid(2 + torch.randn(B, H, T, **f64))  # log decays, alpha mostly near 1
print(f"beta between {beta.min().item():.2f} and {beta.max().item():.2f}")
for name, g in (("no decay", None), ("with a gate", gate)):
    o_rec, S_rec = delta_rule_recurrent(q, k, v, beta, g)
    same = [torch.allclose(o_c, o_rec, atol=1e-12) and torch.allclose(S_c, S_rec, atol=1e-12)
            for o_c, S_c in (delta_rule_chunked(q, k, v, beta, C, g) for C in (1, 16, 64, 128))]
    weights_ok = torch.allclose(delta_rule_weights(q, k, beta, g) @ v, o_rec, atol=1e-12)
    print(f"{name:>11}: chunked (chunks of 1, 16, 64, 128) == recurrent: {all(same)}"
          f" | weights @ v == recurrent: {weights_ok}  (float64, atol 1e-12)")
    assert all(same) and weights_ok

# %% [markdown]
# **Two reflections give back the state.** With $\beta = 2$ and $v = 0$ a write is
# $S \leftarrow (I - 2kk^\top)S$, and a reflection is its own inverse:
# $(I - 2kk^\top)^2 = I - 4kk^\top + 4k(k^\top k)k^\top = I$ for a unit key. We write the same
# key twice into a random state, with both of the module's forms:

# %%
torch.manual_seed(33)
S_start = torch.randn(1, 1, dk, dk, **f64)  # a random state
k_twice = F.normalize(torch.randn(dk, **f64), dim=0).expand(1, 1, 2, dk)  # the same key twice
no_value = torch.zeros(1, 1, 2, dk, **f64)
two = torch.full((1, 1, 2), 2.0, **f64)
_, S_once = delta_rule_recurrent(k_twice[:, :, :1], k_twice[:, :, :1], no_value[:, :, :1],
                                 two[..., :1], state=S_start)
_, S_rec = delta_rule_recurrent(k_twice, k_twice, no_value, two, state=S_start)
_, S_chk = delta_rule_chunked(k_twice, k_twice, no_value, two, 64, state=S_start)
k_ = k_twice[0, 0, 0]
print("after one write, the read of k is negated:",
      torch.allclose(k_ @ S_once[0, 0], -(k_ @ S_start[0, 0]), atol=1e-12),
      f"| the state moved by {(S_once - S_start).norm().item():.2f}")
print("after two writes, the state is the original one: recurrent",
      torch.allclose(S_rec, S_start, atol=1e-12), "| chunked", torch.allclose(S_chk, S_start,
                                                                              atol=1e-12))
assert torch.allclose(S_rec, S_start, atol=1e-12) and torch.allclose(S_chk, S_start, atol=1e-12)

# %% [markdown]
# With $\beta \in (0, 1]$ no sequence of writes can do this: $1 - \beta \in [0, 1)$, so every
# write shrinks the memory along its key, and what it erased is gone. A reflection loses
# nothing — it is orthogonal — and undoes itself.
#
# **What it is good for** (Grazzi et al. 2025): a sign that flips is a counter modulo 2. Hold
# $+1$ along a key and write that key with $\beta_t = 2$ whenever the input bit is 1 and
# $\beta_t = 0$ when it is 0: the read is $(-1)^{\text{number of ones so far}}$, the parity of
# the sequence. With $\beta \in [0, 1]$ the factor along the key, $1 - \beta$, is never
# negative, so the sign can never flip; Grazzi et al. prove more generally that a linear RNN
# whose transitions have only non-negative eigenvalues (linear attention, Mamba, DeltaNet with
# $\beta \in (0, 1)$) cannot compute parity, and that allowing eigenvalues down to $-1$ fixes
# it.

# %%
torch.manual_seed(34)
n_bits = 50
bits = torch.randint(0, 2, (1, 1, n_bits)).to(torch.float64)  # (B, H, T): the input
k_par = F.normalize(torch.randn(dk, **f64), dim=0).expand(1, 1, n_bits, dk)  # one key
S_par = torch.outer(k_par[0, 0, 0], torch.eye(dk, **f64)[0])[None, None]  # holds +1 along k
reads, _ = delta_rule_recurrent(k_par, k_par, torch.zeros(1, 1, n_bits, dk, **f64), 2 * bits,
                                state=S_par)
parity = (-1.0) ** bits.cumsum(-1)[0, 0]  # (-1)^(number of ones so far)
print("bits :", bits[0, 0, :12].int().tolist())
print("reads:", reads[0, 0, :12, 0].round().int().tolist())
print("read == (-1)^(ones so far) at all 50 positions:",
      torch.allclose(reads[0, 0, :, 0], parity, atol=1e-12))
assert torch.allclose(reads[0, 0, :, 0], parity, atol=1e-12)

# %% [markdown]
# ## Exercise 4 — The WY representation
#
# **Proof.** Take one chunk without decay ($\gamma_i = 1$), entering state $S_0$, and write
# values $V = 0$.
#
# - *Recurrence.* Step 1 gives $S_i = S_{i-1} + k_i u_i^\top$ with
#   $u_i = \beta_i(0 - S_{i-1}^\top k_i)$, that is $S_i = (I - \beta_i k_i k_i^\top)\,S_{i-1}$.
#   So after the chunk $S_C = (I - \beta_C k_C k_C^\top)\cdots(I - \beta_1 k_1 k_1^\top)\,S_0
#   = P S_0$.
# - *Chunked form.* Step 3's system is $(I + A)U = \mathrm{diag}(\beta)\cdot 0 -
#   \mathrm{diag}(\beta) K S_0$, so with step 4's $U' = 0$ and
#   $W = (I + A)^{-1}\mathrm{diag}(\beta) K$, $U = -W S_0$. Step 5 (all $\gamma = 1$) gives
#   $S_C = S_0 + K^\top U = (I - K^\top W)\,S_0$.
#
# Steps 1–5 were shown equal to the recurrence for every $S_0$, so $P S_0 = (I - K^\top W) S_0$
# for every $S_0$; with $S_0 = I$ (and $d_v = d_k$), $P = I - K^\top W$. $\blacksquare$
#
# (This is the "WY representation" of a product of Householder-like matrices, Bischof and Van
# Loan 1987: $C$ rank-one factors collapse into one rank-$C$ correction $I - K^\top W$, with $W$
# found by forward substitution.)
#
# **Check**, for a chunk of $C = 64$ keys in $d = 128$ dimensions, float64: the product of the
# 64 factors, $I - K^\top W$ with $W$ from a triangular solve, and the module's chunked form run
# from the state $I$ with zero values (its final state is $P\,I = P$).

# %%
torch.manual_seed(40)
C, dk = 64, 128
K = F.normalize(torch.randn(C, dk, **f64), dim=-1)  # (C, d_k): the chunk's keys
beta = torch.rand(C, **f64)  # (C,)
eye = torch.eye(dk, **f64)
P = eye.clone()
for i in range(C):  # P = (I - b_C k_C k_C^T) ... (I - b_1 k_1 k_1^T): the latest factor on the left
    P = (eye - beta[i] * torch.outer(K[i], K[i])) @ P
A = (beta[:, None] * (K @ K.T)).tril(-1)  # (C, C): A_ij = b_i k_i . k_j for j < i
W = torch.linalg.solve_triangular(torch.eye(C, **f64) + A, beta[:, None] * K, upper=False)
_, P_module = delta_rule_chunked(K[None, None], K[None, None], torch.zeros(1, 1, C, dk, **f64),
                                 beta[None, None], C, state=eye[None, None])
print("P == I - K^T W:", torch.allclose(P, eye - K.T @ W, atol=1e-12),
      "| module's chunked form from S_0 = I, V = 0, gives P:",
      torch.allclose(P_module[0, 0], P, atol=1e-12))
assert torch.allclose(P, eye - K.T @ W, atol=1e-12)
assert torch.allclose(P_module[0, 0], P, atol=1e-12)

# %% [markdown]
# **FLOPs to apply each side to a state** $S$ ($d_k\times d_v$), counting a multiply-add as 2:
#
# - **the factors one at a time**, $S \leftarrow S - \beta_i k_i (k_i^\top S)$: $k_i^\top S$
#   costs $2 d_k d_v$, the rank-one update another $2 d_k d_v$; for $C$ factors,
#   $4\,C\,d_k d_v$.
# - **the WY form**, $S - K^\top (W S)$: $WS$ is $(C\times d_k)(d_k \times d_v)$, $2 C d_k d_v$;
#   $K^\top(WS)$ is $(d_k\times C)(C\times d_v)$, $2 C d_k d_v$; plus $d_k d_v$ for the
#   subtraction: $4\,C\,d_k d_v + d_k d_v$.
# - **$P$ multiplied out** to a $d_k \times d_k$ matrix: $2 d_k^2 d_v$ per application, after
#   $2 C d_k^2$ to form it as $I - K^\top W$.
#
# For $C = 64$, $d_k = d_v = 128$: $4\cdot 64\cdot 128^2 = 4{,}194{,}304$ for the factors and for
# WY (plus 16,384 for the subtraction), and $2\cdot 128^3 = 4{,}194{,}304$ for the dense $P$ —
# this size is exactly the break-even $C = d_k/2$. Forming $W$ costs $2C^2 d_k$ for $KK^\top$
# and $C^2 d_k$ for the triangular solve, about 1.6 M, once per chunk. PyTorch's
# `FlopCounterMode` counts the matrix products (not the elementwise subtractions):

# %%
S = torch.randn(dk, dk, **f64)  # a state, d_v = d_k = 128


def by_factors(S):
    for i in range(C):
        S = S - beta[i] * K[i][:, None] @ (K[i][None, :] @ S)  # rank-one update
    return S


def by_wy(S):
    return S - K.T @ (W @ S)


def by_dense(S):
    return P @ S


counts = {}
for name, apply in (("factors one at a time", by_factors), ("WY form", by_wy),
                    ("dense P", by_dense)):
    with FlopCounterMode(display=False) as counter:
        out = apply(S)
    counts[name] = counter.get_total_flops()
    print(f"{name:>22}: {counts[name]:>10,} FLOPs in matrix products,"
          f" result == P S: {torch.allclose(out, P @ S, atol=1e-10)}")
assert counts["factors one at a time"] == counts["WY form"] == 4 * C * dk * dk
assert counts["dense P"] == 2 * dk**3

# %% [markdown]
# The three ways cost the same here: the WY form does not save arithmetic over the factors, in
# general. What it changes is the *shape* of the work: the factors are $2C = 128$ dependent
# matrix-vector products (each needs the previous state: memory-bound, sequential), the WY form
# is two matrix-matrix products with inner dimensions $d_k$ and $C$, the kind of operation a
# processor runs near its peak, and $W$ needs only the chunk's keys, so it is computed for all
# chunks at once before any state is known. Against the dense $P$, the WY form stores $2Cd_k$
# numbers instead of $d_k^2$ and skips the $2Cd_k^2$ of forming it; it is cheaper to apply as
# long as $C < d_k/2$. The chunked form never forms $P$ at all: it applies it implicitly, as
# $U = U' - WS$ followed by $S_C = S + K^\top U$, which folds the values into the same two
# products.
#
# ## Exercise 5 — The chunk size
#
# **Prediction.** Counting the forward pass of `delta_rule_chunked` per chunk and head
# (multiply-add = 2): $KK^\top$ and $QK^\top$ cost $2C^2 d_k$ each, the triangular solve for
# $[U', W]$ costs $C^2(d_v + d_k)$, the scores times $U$ $2C^2 d_v$; the three products with the
# state ($WS$, $QS$, $K^\top U$) cost $2Cd_kd_v$ each. Per token that is
#
# $$C\,(5d_k + 3d_v) + 6\,d_k d_v ,$$
#
# the $O(Cd + C^2 + d^2)$ of the chapter (the $C^2$ terms, divided by $C$ tokens, become $Cd$).
# With $d_k = d_v = 64$ it is $512\,C + 24{,}576$: the FLOPs only *grow* with $C$, almost five
# times from 16 to 256. But the loop over chunks has $T/C$ sequential steps, each a few small
# operations plus their backward, with a fixed cost of its own (Python, dispatch, autograd),
# and small matrix products run far below the processor's peak. So the time should be a U:
# small chunks pay for many small steps, large chunks for the $C^2$ FLOPs, with the bottom in
# between, where $512\,C$ is comparable with the $24{,}576$ of the state products, $C$ of a few
# dozen. First the FLOPs (the matrix products counted by `FlopCounterMode` check the formula
# without the solve's $C^2(d_k + d_v)$):

# %%
T5, H5, d5 = 2048, 4, 64
chunks = [16, 32, 64, 128, 256]
torch.manual_seed(50)
q5, k5, v5 = (torch.randn(1, H5, T5, d5) for _ in range(3))
b5, g5 = torch.rand(1, H5, T5), -torch.rand(1, H5, T5)
print(f"{'chunk':>6} {'sequential steps':>17} {'forward FLOPs per token and head':>33}")
for C5 in chunks:
    with FlopCounterMode(display=False) as counter:
        delta_rule_chunked(q5, F.normalize(k5, dim=-1), v5, b5, C5, g5)
    products = C5 * (4 * d5 + 2 * d5) + 6 * d5 * d5  # without the triangular solve
    assert counter.get_total_flops() == H5 * T5 * products
    print(f"{C5:>6} {T5 // C5:>17} {C5 * (5 * d5 + 3 * d5) + 6 * d5 * d5:>33,}")

# %% [markdown]
# **Measurement**: forward + backward at $T = 2048$, 4 heads of 64, $\beta$ and $g$ computed
# from the inputs (so gradients reach them) by the chapter's section 8 kernel `gated_delta_rule`,
# timed by `fwd_bwd_seconds`: best of 2 runs after a warm-up. Timings vary from machine to machine, so the output is not compared by the book's
# tests; the cell asserts only what held on every run while this was written: the largest chunk
# is not the fastest, and it is at least 25% slower than the best.

# %% tags=["nbval-ignore-output"]
torch.manual_seed(51)
qkv = [torch.randn(1, H5, T5, d5, requires_grad=True) for _ in range(3)]
ms = {C5: 1e3 * fwd_bwd_seconds(functools.partial(gated_delta_rule, chunk=C5), qkv, repeats=2)
      for C5 in chunks}  # the chapter's kernel and timer, from attnbook.bench
fastest = min(ms, key=ms.get)
for C5, t in ms.items():
    flops = C5 * (5 * d5 + 3 * d5) + 6 * d5 * d5
    print(f"chunk {C5:>3}: {t:6.1f} ms  ({t / ms[fastest]:.2f} x the fastest; forward FLOPs "
          f"{flops / (16 * 8 * d5 + 6 * d5 * d5):.2f} x chunk 16's)")
print("fastest chunk on this machine:", fastest)
assert fastest != 256 and ms[256] > 1.25 * ms[fastest]

# %% [markdown]
# The curve is the predicted U, shallow on the left and steep on the right. In the run stored
# above, chunks of 32 were the fastest and 64 was 1.04 times slower (over the runs made while
# this was written, 32 and 64 each won some, never by more than about 20%): the bottom of the U
# is at 32–64. Chunks of 16, with the fewest FLOPs, were 1.25 times slower than the best (1.1 to
# 1.3 over those runs) — 128 sequential steps of small operations and their backward — and
# chunks of 256 2.27 times slower (2 to 3 over those runs), with 4.75 times the forward FLOPs
# of chunk 16 and 2.7 times those of chunk 64. The bottom sits where the $C^2$ work and the
# state work are of the same size, $C \approx$ 32–64 for heads of 64, which is why the module's
# default `chunk_size = 64` suits this head size. On a GPU a fused kernel makes each step's
# fixed cost small, but the same trade-off between the $C^2$ work and the number of sequential
# steps sets the chunk there too: fla's kernels use chunks of 64.
