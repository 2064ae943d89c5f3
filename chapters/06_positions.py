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
# # Chapter 6 — Positions
#
# Every attention layer so far has compared queries with keys by their *content* only. Nothing
# in $\operatorname{softmax}(QK^\top/\sqrt{d})\,V$ says which token came first. Shuffle the
# tokens of a sentence and attention shuffles its outputs in exactly the same way, so without
# help a transformer reads *dog bites man* and *man bites dog* as the same bag of words. This
# chapter shows that with numbers, then builds the four ways models put order back in:
#
# - **learned** absolute positions (GPT-2): a trainable vector per position, added to the
#   token embeddings;
# - **sinusoidal** absolute positions (the original transformer): a fixed table of sines and
#   cosines, added the same way;
# - **RoPE**, rotary position embedding (GPT-J, GPT-NeoX, LLaMA and most models since):
#   queries and keys are *rotated* by an angle proportional to their position, so that a score
#   depends on the two tokens' contents and on how far apart they are, not on where they sit;
# - **ALiBi** (BLOOM, MPT): no vectors at all, just a penalty on each score that grows with the
#   distance between query and key, a different slope per head.
#
# We end with a small experiment: train the same tiny model with each scheme on sequences of
# length 32, then ask it to handle sequences of length 64.
#
# **Learning goals**
#
# - Show numerically that attention without positions is permutation-equivariant, and what the
#   causal mask does and does not change about that.
# - Build the sinusoidal table, read it as a set of clocks, and see that its dot products
#   depend only on the distance between positions.
# - Build RoPE step by step, in both pairings found in real checkpoints (interleaved, as in
#   GPT-J/RoFormer, and half-split with `rotate_half`, as in GPT-NeoX and Hugging Face's
#   LLaMA), show numerically that, for given query and key vectors, its scores depend on their
#   positions only through the offset $m - n$, and convert weights from one pairing to the other.
# - Continue positions at an offset, as cached decoding needs (`start`).
# - Compute ALiBi slopes for any number of heads, including the paper's rule for counts that
#   are not powers of two, and draw the per-head biases.
# - Run a length-extrapolation experiment and read its result honestly: what breaks, and why.

# %% [markdown]
# ## Setup
#
# We fix the random seed before anything random happens and print shapes, booleans and
# rounded numbers, so the outputs you see are the outputs you will get.

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from attnbook.attention import AttentionConfig, build_attention, causal_mask, sdpa_reference

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. Attention cannot see order
#
# Take a multi-head attention layer from [chapter 3](03_multi_head_attention.ipynb) with no position
# information at all (`positions="none"`) and, for now, without the causal mask (`causal=False`, as
# in an encoder). Feed it six token vectors, then the same six vectors in a shuffled order.

# %%
n_embd, n_head, T = 16, 2, 6
encoder_attn = build_attention(
    "mha", AttentionConfig(n_embd=n_embd, n_head=n_head, causal=False, positions="none")
)
x = torch.randn(1, T, n_embd)  # (B, T, n_embd)
perm = torch.randperm(T)
print("permutation:", perm.tolist())

y = encoder_attn(x)  # (1, T, n_embd)
y_shuffled_input = encoder_attn(x[:, perm])  # shuffle the tokens first
print("attn(x[perm]) == attn(x)[perm]:", torch.allclose(y_shuffled_input, y[:, perm], atol=1e-5))
print("attn(x[perm]) == attn(x):      ", torch.allclose(y_shuffled_input, y, atol=1e-5))

# %% [markdown]
# Shuffling the input shuffles the output the same way (*equivariance*), and nothing else
# changes. The reason is visible in the formula. Permuting the tokens permutes the rows of
# $Q$, $K$ and $V$ alike. The score matrix $QK^\top$ then has its rows *and* its columns
# permuted; the softmax works row by row, so each row's weights are the same numbers in a
# different order; and the weighted sum over the (equally permuted) values gives each token
# the output it had before. Every step treats the tokens as a set.
#
# A decoder uses the causal mask, and the mask *is* tied to positions: token $t$ may only look
# at tokens $0..t$. So shuffling no longer just permutes the outputs. But look at what the
# last token sees: all the earlier tokens, in whatever order. Shuffle those and its output
# does not move.

# %%
decoder_attn = build_attention(
    "mha", AttentionConfig(n_embd=n_embd, n_head=n_head, causal=True, positions="none")
)
earlier = torch.randperm(T - 1)  # shuffle tokens 0..T-2, keep the last one in place
order = torch.cat([earlier, torch.tensor([T - 1])])
y_causal = decoder_attn(x)
y_causal_shuffled = decoder_attn(x[:, order])
print("order:", order.tolist())
# position i of the shuffled run holds token order[i]: compare it with that token's old output
same = torch.isclose(y_causal_shuffled, y_causal[:, order], atol=1e-5).all(dim=-1)[0]  # (T,)
print("last token's output unchanged:  ", same[-1].item())
print("other tokens' outputs unchanged:", same[:-1].tolist())

# %% [markdown]
# Each token is compared with its own output before the shuffle. The last token reads its past
# as a bag. Every other token changes, but only because shuffling changed *which* tokens it may
# see: token 1, moved to the front, now sees only itself instead of tokens 0 and 1. (A token
# whose set of visible tokens happened to stay the same would keep its output, whatever their
# order.) Even one causal layer can squeeze some order out of this — the one-layer model of
# section 5 does — but it is a weak, indirect signal. For language, order carries meaning, so
# we put it in explicitly. There are two places to do it: in the token vectors, before any
# attention (section 2), or inside attention, in the scores (sections 3 and 4).

# %% [markdown]
# ## 2. Absolute positions added to the embeddings
#
# The simplest idea: give every position $p$ a vector $P_p$ of width `n_embd` and add it to
# the token embedding, $x_p = E[\text{token}_p] + P_p$. Now two copies of the same word at
# different positions are different vectors, and shuffling the tokens changes the inputs
# themselves (exercise 3 checks that this breaks the equivariance).
#
# **Learned positions** (GPT-2, BERT) make $P$ an `nn.Embedding(block_size, n_embd)`, trained
# with the rest of the model. It is as flexible as a table can be, and it has a hard limit: a
# model with `block_size` rows has no vector for position `block_size`. GPT-2 has 1,024 rows,
# so GPT-2 cannot read token 1,025. (When training sequences vary in length, rows near the end
# of the table are also trained less often, since only the long sequences reach them.)

# %%
block_size = 8
learned = nn.Embedding(block_size, n_embd)  # one trainable vector per position
tokens = torch.randn(1, 5, n_embd)  # (B, T, n_embd) token embeddings of 5 tokens
x_with_pos = tokens + learned.weight[:5]  # (1, 5, n_embd): rows 0..4, broadcast over B
print("table:", tuple(learned.weight.shape), " inputs with positions:", tuple(x_with_pos.shape))

# %% [markdown]
# **Sinusoidal positions** ("Attention Is All You Need") use a fixed table instead. Split the
# `n_embd` columns into `n_embd/2` pairs. Pair $i$ is a clock hand that turns at angular
# frequency $\omega_i = 10000^{-2i/d}$ radians per position: at position $p$ its angle is
# $p\,\omega_i$, and the table stores where the hand points,
#
# $$P_{p,\,2i} = \sin(p\,\omega_i), \qquad P_{p,\,2i+1} = \cos(p\,\omega_i).$$
#
# Pair 0 turns one radian per position (a full turn every $2\pi \approx 6.3$ positions); the
# last pair turns so slowly that it needs tens of thousands of positions for one turn. Like
# the digits of a number, the fast hands distinguish neighbours and the slow hands tell far
# regions apart. We compute the angles in float64 so that large positions do not lose precision.

# %%
def sinusoidal_table(n_positions, d):
    """(n_positions, d) table: column 2i is sin(p * w_i), column 2i+1 is cos(p * w_i)."""
    assert d % 2 == 0, "this version pairs the columns, so d must be even"
    p = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angle = p * omega  # (P, d/2): angle of hand i at position p
    table = torch.empty(n_positions, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.float()


P = sinusoidal_table(128, 64)  # (128, 64)
print("table:", tuple(P.shape), " position 0:", P[0, :6].tolist())

# %% [markdown]
# Position 0 is $(\sin 0, \cos 0, \sin 0, \dots) = (0, 1, 0, 1, \dots)$. The left panel below
# shows the whole table: the first columns flicker from row to row, the last ones hardly
# change. The right panel shows why this table is more than a barcode. The dot product of two
# rows is
#
# $$P_m \cdot P_n = \sum_i \big(\sin m\omega_i \sin n\omega_i + \cos m\omega_i \cos n\omega_i\big)
#   = \sum_i \cos\big((m-n)\,\omega_i\big),$$
#
# a function of the distance $m - n$ alone. We plot it against the distance, starting from
# two different positions: the curves lie on top of each other. (The figure's axis reads
# $n - m$; the sign does not matter here: the curve is symmetric, since the cosine is even.)

# %%
gram = P @ P.T  # (128, 128): dot product of every pair of positions
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
im = ax1.imshow(P, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
ax1.set_xlabel("column (pairs: sin, cos)")
ax1.set_ylabel("position p")
ax1.set_title("sinusoidal table, 128 positions, d = 64")
fig.colorbar(im, ax=ax1)
for start in (0, 40):
    ax2.plot(range(-start, 128 - start), gram[start], label=f"P_{start} · P_n")
ax2.set_xlabel("distance n - m")
ax2.set_ylabel("dot product")
ax2.set_title("similarity depends on the distance only")
ax2.legend()
plt.show()

# %%
toeplitz_gap = (gram[1:, 1:] - gram[:-1, :-1]).abs().max().item()  # P_{m+1}.P_{n+1} - P_m.P_n
print("P_m · P_n depends only on m - n (max gap < 1e-4):", toeplitz_gap < 1e-4)
print("P_m · P_m =", round(gram[5, 5].item(), 4), "= d/2 =", 64 // 2)

# %% [markdown]
# There is a second property the paper points out. Moving every hand forward by $k$ positions
# is a rotation of each pair by the angle $k\,\omega_i$, whatever the starting position. So
# $P_{p+k} = R_k P_p$ for one fixed matrix $R_k$ (block-diagonal, one 2×2 rotation per pair),
# and "the position $k$ steps further" is a linear map a layer could learn. We build $R_k$ and
# check it. Mind the order inside a pair: it is (sin, cos), so the rotation matrix looks
# transposed compared to the usual (cos, sin) convention.

# %%
def shift_matrix(k, d):
    """Block-diagonal R_k with P[p + k] = R_k @ P[p] for every p."""
    omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    R = torch.zeros(d, d, dtype=torch.float64)
    c, s = torch.cos(k * omega), torch.sin(k * omega)
    # sin(a+b) = sin a cos b + cos a sin b ; cos(a+b) = cos a cos b - sin a sin b
    R[0::2, 0::2] = torch.diag(c)
    R[0::2, 1::2] = torch.diag(s)
    R[1::2, 0::2] = torch.diag(-s)
    R[1::2, 1::2] = torch.diag(c)
    return R.float()


R5 = shift_matrix(5, 64)
print("P[p+5] == R_5 @ P[p] for p = 0..122:", torch.allclose(P[5:], P[:-5] @ R5.T, atol=1e-5))

# %% [markdown]
# The table itself knows about relative distances. The model, however, does not see the
# table: it sees $x_p = E_p + P_p$ after a query and a key projection, so a score is
# $(E_m + P_m) W_q^\top\, W_k (E_n + P_n)^\top$. That is four terms: content with content,
# content with position, position with content, and position with position. Only the last one
# has the neat distance-only structure, and only if the learned $W_q^\top W_k$ happens to
# respect the pairs. Relative position is available, but the model has to untangle it. RoPE
# puts the rotation where it is needed, on the queries and keys themselves.

# %% [markdown]
# ## 3. RoPE: rotary position embedding
#
# ### 3.1 The idea in two dimensions
#
# Take a query $q$ and a key $k$ in the plane. Before the dot product, rotate the query by
# $m\theta$ if it sits at position $m$, and the key by $n\theta$ if it sits at position $n$.
# Rotations preserve lengths and shift angles, so
#
# $$ (R_{m\theta}\, q) \cdot (R_{n\theta}\, k) = q^\top R_{m\theta}^\top R_{n\theta}\, k
#    = q^\top R_{(n-m)\theta}\, k ,$$
#
# because $R_a^\top = R_{-a}$ and $R_{-a} R_b = R_{b-a}$ (equivalently, the angle from $k$ to
# $q$ grows by $(m-n)\theta$, the form the figure of section 3.2 uses). The positions survive
# only as their difference. Try it: several (m, n) pairs with the same offset give the same score.

# %%
def rotate2d(v, angle):
    """Rotate the 2-vector v counter-clockwise by `angle` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([c * v[0] - s * v[1], s * v[0] + c * v[1]])


q2, k2 = torch.tensor([1.0, 0.5]), torch.tensor([0.3, -1.2])
theta = 0.4
for m, n in [(3, 1), (10, 8), (52, 50), (1, 3), (8, 10)]:
    score = rotate2d(q2, m * theta) @ rotate2d(k2, n * theta)
    print(f"m={m:>2}, n={n:>2}, m-n={m - n:>2}: score = {score.item():.4f}")

# %% [markdown]
# The three pairs with offset 2 agree, and so do the two with offset −2 (the sign matters:
# a key two steps back and a key two steps ahead are different things).
#
# ### 3.2 From two to `head_dim` dimensions
#
# A head's queries and keys have `head_dim` coordinates, not two. RoPE splits them into
# `head_dim/2` pairs and rotates each pair in its own plane, pair $i$ at its own frequency
# $\theta_i = \text{base}^{-2i/\text{head\_dim}}$ with base 10,000: the same ladder of clock
# speeds as the sinusoidal table, now turning $q$ and $k$ instead of being added to $x$. A dot
# product is a sum over pairs, each pair's term depends only on $m - n$, so the whole score
# does.
#
# The picture below draws this for a head of 8 coordinates (4 pairs), with a query at position
# $m = 5$ and a key at position $n = 2$. It is drawn by code: arrows, arcs and boxes, no data.
# Each disc is the plane of one pair. The query's two coordinates of pair $i$ are a point in
# it, drawn as the blue arrow $q_m$, and the key's as the red arrow $k_n$. We chose them
# pointing the same way at position 0 (the dotted line), with different lengths. RoPE turns the
# query's arrow by $m\theta_i$ and the key's by $n\theta_i$, so the black arc between them is
# $(m - n)\theta_i$. What to look at:
#
# - **The speed drops from panel to panel.** With `head_dim = 8`, $\theta_i = 10000^{-2i/8}$
#   is 1, 0.1, 0.01 and 0.001 radians per position. Three positions apart, pair 0's arrows
#   point almost opposite ways (3 rad, about 172°), pair 1's are 17° apart, and the two slow
#   pairs have hardly moved: they need offsets in the hundreds or thousands to turn as far.
#   This is the sinusoidal table's ladder of clocks again: fast pairs tell neighbours apart,
#   slow pairs distant regions.
# - **Only the arc reaches the score.** Pair $i$ adds the dot product of its two arrows, their
#   lengths times the cosine of the angle between them, $|q^{(i)}|\,|k^{(i)}|\cos(\varphi_i +
#   (m-n)\theta_i)$, where $\varphi_i$ is the angle the two pairs already make at position 0
#   (0 in the drawing). Move both tokens on by the same number of positions and both arrows
#   turn by the same extra angle: the arc, and the score, stay as they are. What is left is the
#   content (the lengths and $\varphi_i$) and the offset $m - n$.
# - **The boxes at the bottom: which coordinates form a pair.** The same 8 coordinates,
#   coloured by the pair, and so the panel, they belong to. The RoFormer paper, and GPT-J,
#   pair neighbours: $(0, 1), (2, 3), \dots$, pair $i = (2i, 2i+1)$. GPT-NeoX and Hugging
#   Face's LLaMA pair coordinate $i$ with $i + \text{head\_dim}/2$, here $i + 4$. Either way
#   every pair turns by its own $\theta_i$; only the choice of coordinates differs, and
#   section 3.4 shows that this makes them different functions of the same vector.

# %%
from matplotlib.patches import Arc, Circle, FancyArrowPatch, FancyBboxPatch

Q_COL, K_COL = "tab:blue", "tab:red"  # the query's and the key's arrows
PAIR_COLS = ["#8dd3c7", "#fdb462", "#bebada", "#fccde5"]  # one fill colour per pair i = 0..3


def box(ax, x, y, text, color, w=0.62, h=0.5):
    """A rounded box of size (w, h) centred at (x, y), with centred text."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.03",
                                facecolor=color, edgecolor="black", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=10)


def arrow(ax, start, end, color, lw=2):
    """An arrow from start to end."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=lw,
                                 color=color, shrinkA=0, shrinkB=0))


def rotation_panel(ax, cx, i, theta_i, m, n, y=0.0, r=1.0):
    """Pair i as a plane: the query's pair at position m turned by m*theta_i, the key's pair at
    position n turned by n*theta_i, and the angle between them, (m - n)*theta_i. Both pairs
    start (position 0) along the dotted line; their lengths stand for their content."""
    ax.add_patch(Circle((cx, y), r, facecolor=PAIR_COLS[i], alpha=0.35, edgecolor="grey"))
    ax.plot([cx, cx + r], [y, y], color="grey", ls=":", lw=1)  # where position 0 points
    a_q, a_k = m * theta_i, n * theta_i  # radians, counter-clockwise from position 0
    q_tip = (cx + r * math.cos(a_q), y + r * math.sin(a_q))
    k_tip = (cx + 0.7 * r * math.cos(a_k), y + 0.7 * r * math.sin(a_k))
    arrow(ax, (cx, y), q_tip, Q_COL)
    arrow(ax, (cx, y), k_tip, K_COL)
    # labels: q's beyond its tip, k's beside its tip on the side away from q (clockwise)
    ax.text(cx + 1.2 * r * math.cos(a_q), y + 1.2 * r * math.sin(a_q), r"$q_m$", color=Q_COL,
            ha="center", va="center", fontsize=12)
    ax.text(k_tip[0] + 0.22 * math.sin(a_k), k_tip[1] - 0.22 * math.cos(a_k), r"$k_n$",
            color=K_COL, ha="center", va="center", fontsize=12)
    ax.add_patch(Arc((cx, y), 0.5 * r, 0.5 * r, theta1=math.degrees(a_k),
                     theta2=math.degrees(a_q), lw=2, color="black"))
    if a_q - a_k > 0.5:  # room for a label beside the arc
        mid = (a_q + a_k) / 2
        ax.text(cx + 0.45 * r * math.cos(mid), y + 0.45 * r * math.sin(mid),
                rf"$(m-n)\theta_{i}$", ha="right" if math.cos(mid) < 0 else "left",
                va="center", fontsize=11)
    ax.text(cx, y + r + 0.3, rf"pair {i}:  $\theta_{i} = {theta_i:g}$", ha="center",
            fontsize=12)
    ax.text(cx, y - r - 0.3, rf"$m\theta_{i} = {a_q:.3g}$,  $n\theta_{i} = {a_k:.3g}$",
            ha="center", va="top", fontsize=10)
    ax.text(cx, y - r - 0.7, rf"$(m-n)\theta_{i} = {a_q - a_k:.3g}$ rad "
            rf"$\approx {math.degrees(a_q - a_k):.3g}°$", ha="center", va="top", fontsize=10)


def pairing_row(ax, y, pair_of, title, code, x0=3.4, step=0.85):
    """The 8 coordinates of one head as boxes, coloured by the pair they belong to
    (pair_of[j] is coordinate j's pair), the two coordinates of each pair joined by an arc."""
    for j, i in enumerate(pair_of):
        box(ax, x0 + j * step, y, str(j), PAIR_COLS[i])
    for i in range(len(pair_of) // 2):
        a, b = [x0 + j * step for j, p in enumerate(pair_of) if p == i]  # the pair's two boxes
        ax.add_patch(FancyArrowPatch((a, y + 0.3), (b, y + 0.3), arrowstyle="-",
                                     connectionstyle="arc3,rad=-0.4", color="black", lw=1.2))
    ax.text(x0 - 0.6, y, title, ha="right", va="center", fontsize=11)
    ax.text(x0 + 3.5 * step, y - 0.4, code, ha="center", va="top", fontsize=10,
            family="monospace")


m_fig, n_fig, hd_fig = 5, 2, 8  # query position, key position, head_dim
theta_fig = 10000.0 ** (-torch.arange(0, hd_fig, 2, dtype=torch.float64) / hd_fig)  # (hd/2,)

fig, ax = plt.subplots(figsize=(12, 8.3))
fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
ax.set(xlim=(-1.4, 10.6), ylim=(-7.7, 2.5), aspect="equal")
ax.axis("off")
ax.text(4.6, 2.1, rf"a query at position $m = {m_fig}$, a key at position $n = {n_fig}$, "
        rf"head_dim = {hd_fig}: {hd_fig // 2} pairs, pair $i$ turning by $\theta_i$ "
        "rad per position", ha="center", fontsize=12)
for i, theta_i in enumerate(theta_fig.tolist()):  # pair i turns by theta_i per position
    rotation_panel(ax, 3.1 * i, i, theta_i, m_fig, n_fig)
arrow(ax, (0.4, -2.35), (8.9, -2.35), "grey", lw=1.2)
ax.text(0.2, -2.35, "fast", ha="right", va="center", fontsize=10, color="dimgrey")
ax.text(9.1, -2.35, "slow", ha="left", va="center", fontsize=10, color="dimgrey")
ax.text(4.6, -2.6, r"each pair adds $|q^{(i)}|\,|k^{(i)}|\,\cos(\varphi_i + (m-n)\theta_i)$ "
        r"to the score: content (lengths, and the angle $\varphi_i$ between the pairs "
        r"before turning, 0 here)" "\nand the offset $m - n$, never $m$ or $n$ alone",
        ha="center", va="top", fontsize=10.5)

ax.text(4.6, -3.75, r"which coordinates form pair $i$ (colours as above), in a head of 8 "
        "coordinates x[..., 0] … x[..., 7]", ha="center", va="center", fontsize=11)
pairing_row(ax, -4.75, [0, 0, 1, 1, 2, 2, 3, 3],
            "interleaved (RoFormer, GPT-J)\n" r"pair $i$ = $(2i,\ 2i+1)$",
            "rope_interleaved: a, b = x[..., 0::2], x[..., 1::2]")
pairing_row(ax, -6.75, [0, 1, 2, 3, 0, 1, 2, 3],
            "half-split (GPT-NeoX, HF LLaMA)\n" r"pair $i$ = $(i,\ i + 4)$",
            "rotate_half (in rope_half): x1, x2 = x.chunk(2, dim=-1)")
plt.show()

# %% [markdown]
# In code, a panel is a column and a row of boxes is an indexing pattern. The angle tables
# computed next have one row per position and one column per pair: column $i$ holds
# $\cos(p\theta_i)$ and $\sin(p\theta_i)$, the turn of panel $i$ at position $p$ (the arrows
# above use rows 5 and 2 of such tables for `head_dim = 8`). `rope_interleaved` below takes the
# pairs of the top row of boxes with `x[..., 0::2]` and `x[..., 1::2]`. Section 3.4's
# `rope_half` takes those of the bottom row: `rotate_half` splits the vector into its two
# halves with `x.chunk(2, dim=-1)`, and the angles are repeated, `torch.cat([cos, cos],
# dim=-1)`, so that coordinates $i$ and $i + \text{head\_dim}/2$ turn by the same angle. The
# code uses `head_dim = 16`: eight pairs in the same two patterns, with speeds that fall by
# $\sqrt{10} \approx 3.16$ from one pair to the next instead of 10.
#
# First the angles. For positions $p$ and pairs $i$, we need $\cos(p\theta_i)$ and
# $\sin(p\theta_i)$, two `(T, head_dim/2)` tables.

# %%
def rope_angles(positions, head_dim, base=10000.0):
    """cos and sin of the rotation angles, each (T, head_dim/2): pair i at position p turns
    by p * base^(-2i / head_dim)."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angle = positions.to(torch.float64)[:, None] * theta  # (T, hd/2)
    return angle.cos().float(), angle.sin().float()


cos, sin = rope_angles(torch.arange(10), head_dim=16)
print("cos, sin:", tuple(cos.shape), tuple(sin.shape))
angle_1 = torch.atan2(sin[1], cos[1])  # (hd/2,): the angle of each pair at position 1
print("position 1, angle of each pair:", [round(a, 4) for a in angle_1.tolist()])

# %% [markdown]
# Next, which coordinates form a pair? The RoFormer paper, and GPT-J after it, pair
# neighbours: (0, 1), (2, 3), (4, 5), … We call that the **interleaved** pairing. Rotating pair
# $(a, b)$ by angle $\phi$ gives $(a\cos\phi - b\sin\phi,\ a\sin\phi + b\cos\phi)$, for all
# pairs and positions at once:

# %%
def rope_interleaved(x, cos, sin):
    """Rotate pairs (0,1), (2,3), ... of x (..., T, head_dim) by the angles in cos/sin (T, hd/2)."""
    a, b = x[..., 0::2], x[..., 1::2]  # (..., T, hd/2) each: first and second of every pair
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


x16 = torch.randn(10, 16)  # 10 positions, head_dim 16
x16_rot = rope_interleaved(x16, cos, sin)
print("rotated:", tuple(x16_rot.shape))
print("position 0 unchanged (angle 0):", torch.allclose(x16_rot[0], x16[0]))
print("norms preserved:", torch.allclose(x16_rot.norm(dim=-1), x16.norm(dim=-1), atol=1e-5))

# %% [markdown]
# A pair $(a, b)$ is also a complex number $a + ib$, and rotating it by $\phi$ is multiplying
# by $e^{i\phi}$. That is how Meta's LLaMA reference code writes RoPE: view the interleaved
# pairs as complex numbers and multiply. (Hugging Face's port of LLaMA uses the other pairing of
# section 3.4; its conversion script reorders the query and key weights to match, exactly as
# section 3.4 does with `perm`.) Same result:

# %%
as_complex = torch.view_as_complex(x16.reshape(10, 8, 2))  # (10, 8): a + ib per pair
turn = torch.polar(torch.ones(10, 8), torch.atan2(sin, cos))  # e^{i * angle}, (10, 8)
x16_rot_complex = torch.view_as_real(as_complex * turn).reshape(10, 16)
print("complex multiplication == rotation:", torch.allclose(x16_rot_complex, x16_rot, atol=1e-5))

# %% [markdown]
# ### 3.3 Scores depend only on the offset
#
# Now the claim, numerically, in 16 dimensions. We place one fixed query vector at every
# position $m = 0..11$ and one fixed key vector at every position $n = 0..11$ and compute all
# 144 scores. If the score depends only on $m - n$, every diagonal of this matrix is constant.
# For contrast, we do the same with the sinusoidal table *added* to the vectors before the dot
# product.

# %%
n_pos, hd = 12, 16
q_vec, k_vec = torch.randn(hd), torch.randn(hd)
cos12, sin12 = rope_angles(torch.arange(n_pos), hd)
Q = rope_interleaved(q_vec.expand(n_pos, hd), cos12, sin12)  # (12, 16): q at positions 0..11
K = rope_interleaved(k_vec.expand(n_pos, hd), cos12, sin12)  # (12, 16): k at positions 0..11
S_rope = Q @ K.T  # (12, 12): S[m, n] = score of q at m with k at n

P12 = sinusoidal_table(n_pos, hd)
S_added = (q_vec + P12) @ (k_vec + P12).T  # (12, 12): positions added, not rotated


def diagonal_gap(S):
    """Largest change along any diagonal: |S[m+1, n+1] - S[m, n]|."""
    return (S[1:, 1:] - S[:-1, :-1]).abs().max().item()


print("RoPE:  largest change along a diagonal:", round(diagonal_gap(S_rope), 4))
print("added: largest change along a diagonal:", round(diagonal_gap(S_added), 4))
print("RoPE scores depend only on m - n (gap < 1e-5):", diagonal_gap(S_rope) < 1e-5)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
panels = [(S_rope, "RoPE: q_m · k_n"), (S_added, "added: (q + P_m) · (k + P_n)")]
for ax, (S, title) in zip(axes, panels, strict=True):
    im = ax.imshow(S, cmap="RdBu", vmin=-S.abs().max(), vmax=S.abs().max())
    ax.set_title(title)
    ax.set_xlabel("key position n")
    ax.set_ylabel("query position m")
    fig.colorbar(im, ax=ax, shrink=0.85, label="score")
plt.show()

# %% [markdown]
# The left matrix is striped along its diagonals: each stripe is one offset $m - n$, and
# moving both tokens by the same amount slides along a stripe without changing the score. The
# right matrix has no such structure: the sinusoidal position vectors got mixed with the
# content, exactly the cross terms section 2 warned about.
#
# How does the score vary with the offset? The RoFormer paper notes a "long-term decay": if
# the query and the key carry the same content ($q = k$), the score is largest at offset 0 and
# tends to shrink, with wiggles, as the tokens move apart. With $q = k$ all ones, pair $i$
# contributes $2\cos((m-n)\theta_i)$: at short offsets all the cosines are near 1 and add up;
# at long offsets the fast pairs have lost their alignment and their terms largely cancel. The
# curve levels off instead of reaching 0 because the slowest pairs hardly turn: the 7 slowest of
# the 32 pairs turn by less than one radian in 1,024 positions, and they keep contributing about
# $7/32 \approx 0.2$ of the score at offset 0.

# %%
hd64 = 64
offsets = torch.arange(0, 1025)
cos_o, sin_o = rope_angles(offsets, hd64)
ones = torch.ones(hd64)
k_at = rope_interleaved(ones.expand(len(offsets), hd64), cos_o, sin_o)  # key at position n
decay = k_at @ ones / hd64  # query at position 0, normalised so that offset 0 gives 1
print("relative score at offsets 0, 8, 64, 512:", [round(decay[i].item(), 2) for i in (0, 8, 64, 512)])

fig, ax = plt.subplots(figsize=(8, 3.2))
ax.plot(offsets, decay)
ax.set_xlabel("offset |m - n|")
ax.set_ylabel("score / score at offset 0")
ax.set_title("RoPE, head_dim = 64, q = k = all ones: the score fades with distance")
ax.axhline(0, color="gray", lw=0.5)
plt.show()

# %% [markdown]
# This is a tendency, not a rule: for unrelated $q$ and $k$ the score at any offset is whatever
# their content makes it. What RoPE guarantees is the structure — the score is a fixed function
# of content and offset — and a trained model chooses its $W_q$ and $W_k$ to make use of it.

# %% [markdown]
# ### 3.4 The other pairing: half-split and `rotate_half`
#
# GPT-NeoX, and LLaMA as implemented in Hugging Face `transformers`, pair coordinate $i$ with
# coordinate $i + \text{head\_dim}/2$: the first half of the vector holds the first elements
# of all pairs, the second half the second elements. The code for it is usually written with a
# helper `rotate_half`, which maps $(x_1, x_2)$ (the two halves) to $(-x_2, x_1)$, and the
# cosines and sines repeated to full width:
#
# $$\text{rope}(x) = x \odot [\cos, \cos] + \text{rotate\_half}(x) \odot [\sin, \sin].$$
#
# Written out per pair $(a, b) = (x_1[i], x_2[i])$ this is again $(a\cos - b\sin,\ a\sin +
# b\cos)$: the same rotation, applied to a different choice of pairs.

# %%
def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # two halves, (..., hd/2) each
    return torch.cat([-x2, x1], dim=-1)


def rope_half(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2) of x (..., T, head_dim); cos/sin are (T, hd/2)."""
    cos_full, sin_full = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (T, hd)
    return x * cos_full + rotate_half(x) * sin_full


x16_half = rope_half(x16, cos, sin)
print("half-split == interleaved on the same vector:", torch.allclose(x16_half, x16_rot, atol=1e-5))
Q_half = rope_half(q_vec.expand(n_pos, hd), cos12, sin12)  # (12, 16)
K_half = rope_half(k_vec.expand(n_pos, hd), cos12, sin12)  # (12, 16)
S_half = Q_half @ K_half.T  # (12, 12)
print("half-split scores depend only on m - n (gap < 1e-5):", diagonal_gap(S_half) < 1e-5)

# %% [markdown]
# Both pairings have every property we care about, but they are different functions: the same
# vector comes out differently. That matters when you load a checkpoint. A model trained with
# one pairing has learned query and key weights whose coordinates are laid out for it; run it
# with the other pairing and the rotations act on the wrong coordinate pairs (exercise 4
# measures the damage).
#
# The fix is a relabelling. If we reorder the coordinates so that the interleaved pairs'
# first elements $0, 2, 4, \dots$ come first and their second elements $1, 3, 5, \dots$ come
# second, the interleaved pair $(2i, 2i+1)$ lands at $(i, i + \text{head\_dim}/2)$, which is a
# half-split pair. With `perm = [0, 2, 4, ..., 1, 3, 5, ...]`:
#
# $$\text{rope\_half}(x[\text{perm}]) = \text{rope\_interleaved}(x)[\text{perm}] .$$

# %%
perm16 = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
print("perm:", perm16.tolist())
print(
    "rope_half(x[perm]) == rope_interleaved(x)[perm]:",
    torch.allclose(rope_half(x16[:, perm16], cos, sin), x16_rot[:, perm16], atol=1e-5),
)

# %% [markdown]
# A dot product does not care how coordinates are ordered, as long as query and key use the
# same order. So the scores of an interleaved model equal the scores of a half-split model
# whose query and key vectors are permuted by `perm`. We never need to permute activations: a
# query is $q = W_q x$, and permuting the entries of $q$ is permuting the *rows* of $W_q$.
# Converting a checkpoint therefore means: within each head's block of rows of $W_q$ and
# $W_k$ (and their biases), reorder the rows by `perm`. The values and the output projection
# are untouched.

# %%
n_head_c, head_dim_c, d_c, T_c = 2, 8, 16, 7
W_q, W_k = torch.randn(n_head_c * head_dim_c, d_c), torch.randn(n_head_c * head_dim_c, d_c)
x_c = torch.randn(T_c, d_c)
cos_c, sin_c = rope_angles(torch.arange(T_c), head_dim_c)
perm8 = torch.cat([torch.arange(0, head_dim_c, 2), torch.arange(1, head_dim_c, 2)])


def per_head_scores(W_q, W_k, rope_fn):
    q = (x_c @ W_q.T).view(T_c, n_head_c, head_dim_c).transpose(0, 1)  # (n_head, T, hd)
    k = (x_c @ W_k.T).view(T_c, n_head_c, head_dim_c).transpose(0, 1)  # (n_head, T, hd)
    return rope_fn(q, cos_c, sin_c) @ rope_fn(k, cos_c, sin_c).transpose(-2, -1)  # (n_head, T, T)


def convert_rows(W):
    """Reorder each head's rows of a q/k weight by perm8: interleaved -> half-split."""
    return W.view(n_head_c, head_dim_c, -1)[:, perm8].reshape(W.shape)


scores_interleaved = per_head_scores(W_q, W_k, rope_interleaved)
scores_half_converted = per_head_scores(convert_rows(W_q), convert_rows(W_k), rope_half)
scores_half_unconverted = per_head_scores(W_q, W_k, rope_half)
print(
    "converted weights, half-split == interleaved:",
    torch.allclose(scores_half_converted, scores_interleaved, atol=2e-3),
)
print(
    "unconverted weights, half-split == interleaved:",
    torch.allclose(scores_half_unconverted, scores_interleaved, atol=2e-3),
)

# %% [markdown]
# In `attnbook.positions`, `rope_permutation(head_dim)` returns `perm`, and the weights are
# converted by `interleaved_to_half(weight, n_head)` and, the other way, by
# `half_to_interleaved`; for the keys of grouped-query attention pass the number of key heads.
# The last section checks them against `convert_rows`.

# %% [markdown]
# ### 3.5 Continuing at an offset: cached decoding
#
# During generation with a KV cache ([chapter 7](07_kv_cache.ipynb)), the model feeds one new token
# at a time; the keys of the earlier tokens were rotated when they were computed and are stored
# already rotated. The new token is not at position 0: if 10 tokens are cached, it sits at position
# 10 and must be rotated by $10\,\theta_i$. So every RoPE function needs a `start` offset, and
# rotating a block of tokens "starting at $s$" must give exactly the rows $s..s+T-1$ of rotating the
# whole sequence.

# %%
x_seq = torch.randn(12, 16)  # 12 positions
cos_all, sin_all = rope_angles(torch.arange(12), 16)
full = rope_interleaved(x_seq, cos_all, sin_all)  # (12, 16): positions 0..11
s = 9
cos_s, sin_s = rope_angles(torch.arange(s, 12), 16)  # positions 9, 10, 11 only
late = rope_interleaved(x_seq[s:], cos_s, sin_s)  # (3, 16)
print(f"positions {s}..11 rotated alone == rows {s}..11:", torch.allclose(late, full[s:], atol=1e-5))
wrong = rope_interleaved(x_seq[s:], cos_all[:3], sin_all[:3])  # forgot the offset: positions 0..2
print("rotated as positions 0..2 instead, equal:", torch.allclose(wrong, full[s:], atol=1e-3))

# %% [markdown]
# ## 4. ALiBi: a distance penalty on the scores
#
# ALiBi (*Attention with Linear Biases*, Press et al., 2022) adds no vectors and rotates
# nothing. It adds to each score a penalty proportional to the distance between query $i$ and
# key $j$:
#
# $$\text{score}_{ij} = \frac{q_i \cdot k_j}{\sqrt{d}} - m_h\,(i - j), \qquad j \le i ,$$
#
# with a fixed slope $m_h$ per head $h$ (in this section $m$ is a slope, no longer a position, as
# in the papers' notation). After the softmax, a penalty of $m\Delta$ multiplies a
# key's weight by $e^{-m\Delta}$: every head prefers recent tokens, steep heads strongly, shallow
# heads hardly. Like RoPE it depends only on the distance, never on absolute positions.
#
# The slopes are not learned. For $n$ heads, $n$ a power of two, they form the geometric
# sequence starting at $2^{-8/n}$ with ratio $2^{-8/n}$: $2^{-8/n}, 2^{-16/n}, \dots, 2^{-8}$.
# For 8 heads that is $1/2, 1/4, \dots, 1/256$. For other head counts the paper gives a rule:
# take the slopes of the largest power of two $p < n$, then fill the remaining $n - p$ heads with
# every other slope of the sequence for $2p$ heads (its odd-numbered terms: the 1st, 3rd, 5th,
# …), starting with the first. The first of them, $2^{-4/p}$, is steeper than all $p$ slopes
# already used; each of the others falls between two of them.

# %%
def geometric_slopes(n):
    """2^(-8/n), 2^(-16/n), ..., 2^(-8): the ALiBi slopes for n heads, n a power of two."""
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]


def slopes_by_rule(n_head):
    p = 1
    while 2 * p <= n_head:  # the largest power of two <= n_head
        p *= 2
    if p == n_head:
        return torch.tensor(geometric_slopes(n_head))
    extra = geometric_slopes(2 * p)[0::2][: n_head - p]  # in-between slopes, steepest first
    return torch.tensor(geometric_slopes(p) + extra)


for n in (8, 12):
    exponents = torch.log2(slopes_by_rule(n))
    print(f"{n:>2} heads, slopes = 2^x with x =", [round(e, 2) for e in exponents.tolist()])

# %% [markdown]
# For 12 heads: the eight slopes of the 8-head model, then $2^{-0.5}, 2^{-1.5}, 2^{-2.5},
# 2^{-3.5}$ from the 16-head sequence: one steeper than any of the eight, three between them at
# the steep end. A useful way to read a slope is its *half-distance* $\ln 2 / m$: how many tokens
# back a key's weight has been halved relative to an otherwise equal key at the query itself.

# %%
slopes8 = slopes_by_rule(8)
print("8 heads, half-distance in tokens:", [round(math.log(2) / m, 1) for m in slopes8.tolist()])

# %% [markdown]
# The first head forgets within a couple of tokens, the last one still gives a token 177
# positions back half the weight. We build the bias matrices, with $-\infty$ above the
# diagonal for the causal mask, and draw one per head.

# %%
def alibi_causal_bias(slopes, T):
    """(n_head, T, T): -slope * (i - j) where key j <= query i, -inf above the diagonal."""
    i = torch.arange(T)[:, None]  # query positions, (T, 1)
    j = torch.arange(T)[None, :]  # key positions, (1, T)
    bias = slopes[:, None, None] * (j - i)  # (n_head, T, T): -slope * distance
    return bias.masked_fill(j > i, float("-inf"))


bias8 = alibi_causal_bias(slopes8, 16)  # (8, 16, 16)
print("bias:", tuple(bias8.shape), " head 0, query 4:", bias8[0, 4, :6].tolist())

# %%
fig, axes = plt.subplots(2, 4, figsize=(12, 5.6), sharex=True, sharey=True, layout="constrained")
for h, ax in enumerate(axes.flat):
    shown = bias8[h].masked_fill(bias8[h].isinf(), float("nan"))  # masked cells left blank
    im = ax.imshow(shown, cmap="viridis", vmin=-8, vmax=0)
    ax.set_title(f"head {h}: m = 2^-{h + 1}")
    ax.set_xticks([0, 5, 10, 15])
    ax.set_yticks([0, 5, 10, 15])
    if h % 4 == 0:
        ax.set_ylabel("query i")
    if h >= 4:
        ax.set_xlabel("key j")
fig.colorbar(im, ax=axes, shrink=0.8, label="bias = -m (i - j)")
fig.suptitle("ALiBi biases, 8 heads, 16 positions (blank: masked by causality)")
plt.show()

# %% [markdown]
# Head 0's bias reaches −7.5 fifteen tokens back, a factor $e^{-7.5} \approx 0.0006$ on
# the weight. On one shared colour scale, heads 3 to 7 look nearly flat, but they are not idle:
# they work on a longer range than 16 tokens. Plotting each head's factor $e^{-m\Delta}$ against
# the distance $\Delta$, out to 256 tokens, shows all eight at once. Each curve crosses one
# half at that head's half-distance.

# %%
distance = torch.arange(257)  # 0..256 tokens back
fig, ax = plt.subplots(figsize=(8, 3.6))
for h, m in enumerate(slopes8.tolist()):
    ax.plot(distance, torch.exp(-m * distance), label=f"head {h}: m = 2^-{h + 1}")
ax.axhline(0.5, color="gray", ls=":", lw=1)
ax.set_xlabel("distance Δ = i - j (tokens back)")
ax.set_ylabel("weight factor exp(-m Δ)")
ax.set_title("ALiBi, 8 heads: how fast each head forgets")
ax.legend(fontsize=8, ncol=2, loc="upper right")
plt.show()

# %% [markdown]
# Heads 0 and 1 have all but forgotten a token 16 positions back (factors $e^{-8}$ and
# $e^{-4}$, below 0.02), while head 7 still gives a token 256 positions back more than a third
# of the weight ($e^{-1} \approx 0.37$). Since ALiBi adds nothing to $x$, a model that uses it
# has no position information outside these biases (apart from what the causal mask leaks),
# and the biases cost nothing to extend: a longer sequence just has a bigger matrix, built by
# the same rule. That is the property the next section tests.

# %% [markdown]
# ## 5. Experiment: train at length 32, test at length 64
#
# Does a model trained on short sequences work on longer ones? Only if the rule it has to
# learn is itself independent of length; otherwise longer inputs are a new task. So we pick a
# rule that is **local and the same at every position**: a Fibonacci sequence modulo 16. The
# first two tokens are random; every later token is the sum of the two before it, mod 16:
# $x_t = (x_{t-1} + x_{t-2}) \bmod 16$. To predict token $t + 1$ at position $t$, the model
# needs its own token and the token *exactly one position back*. Picking out "the previous
# token" is a question of position, not of content.

# %%
V, L = 16, 32  # vocabulary (numbers mod 16) and training length


def fibonacci_batch(batch, T, generator):
    """Inputs (batch, T) and next-token targets (batch, T) of Fibonacci sequences mod V."""
    seq = torch.empty(batch, T + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, V, (batch, 2), generator=generator)  # random start
    for t in range(2, T + 1):
        seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % V
    return seq[:, :-1], seq[:, 1:]


x_demo, y_demo = fibonacci_batch(1, 12, torch.Generator().manual_seed(0))
print("inputs: ", x_demo[0].tolist())
print("targets:", y_demo[0].tolist())

# %% [markdown]
# The target at position 0 depends on the random second token, so it cannot be predicted; we
# leave it out of the loss and of the accuracy. Every other target is determined.
#
# The model is the smallest that can solve this: a token embedding, one pre-norm transformer
# block (attnbook's multi-head attention and MLP, each with a LayerNorm in front and a residual
# connection around it), a final LayerNorm and a linear head. It is **a minimal model for this
# experiment only**; [chapter 17](17_training_a_gpt.ipynb) builds the real GPT. One attention layer
# is enough: a head can fetch the previous token, and the MLP can add it to the current one. The
# scheme is one argument: `"learned"` and `"sinusoidal"` add a `PositionalEmbedding` to the token
# embeddings; `"rope"` and `"alibi"` are applied inside the attention layer by
# `AttentionConfig(positions=...)` (RoPE in the half-split pairing unless `rope_pairing` says
# otherwise); `"none"` uses nothing.

# %%
from attnbook.mlp import MLP
from attnbook.positions import PositionalEmbedding


class TinyLM(nn.Module):
    """Minimal causal LM for this chapter's experiment: embeddings (+ positions), one pre-norm
    block of attnbook attention + MLP, final LayerNorm, linear head."""

    def __init__(self, positions, block_size, n_embd=32, n_head=4, rope_pairing="half"):
        super().__init__()
        cfg = AttentionConfig(
            n_embd=n_embd,
            n_head=n_head,
            block_size=block_size,
            positions=positions,
            rope_pairing=rope_pairing,  # used only by positions="rope"
        )
        self.tok = nn.Embedding(V, n_embd)
        self.pos = None
        if positions in ("learned", "sinusoidal"):
            self.pos = PositionalEmbedding(positions, block_size, n_embd)
        self.ln1, self.attn = nn.LayerNorm(n_embd), build_attention("mha", cfg)
        self.ln2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd, 4 * n_embd)
        self.ln_f, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, V)

    def forward(self, idx, attn_mask=None):  # idx: (B, T) token ids
        x = self.tok(idx)  # (B, T, n_embd)
        if self.pos is not None:
            x = x + self.pos(idx.shape[1])  # (T, n_embd), broadcast over the batch
        x = x + self.attn(self.ln1(x), attn_mask=attn_mask)
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln_f(x))  # (B, T, V) logits


# %% [markdown]
# What `block_size` should each model get? For RoPE it does not matter: it caches its angles
# for `block_size` positions and computes those beyond from the same formula, so it gets 64 for
# uniformity; ALiBi and "none" have no table; the
# sinusoidal table is fixed, so making it longer changes nothing about the first 32 rows. All
# of these get `block_size = 2L = 64`. The learned table is different: training at length 32
# only ever updates rows 0..31. Rows 32..63 would keep their random initial values, so we give
# the learned model exactly the 32 rows it can learn.
#
# Training: 300 steps of AdamW on batches of 32 fresh sequences of length 32, the same seed and
# the same batches for every scheme. We train on one CPU thread: for a model this small it is
# hardly slower, and it makes training independent of the number of cores. (This cell takes
# up to about 10 s per scheme.)

# %%
SCHEMES = ["learned", "sinusoidal", "rope", "alibi", "none"]


def train(positions, steps=300, batch=32, lr=1e-2):
    torch.manual_seed(0)
    model = TinyLM(positions, block_size=L if positions == "learned" else 2 * L)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = fibonacci_batch(batch, L, data)
        logits = model(x)  # (batch, L, V)
        loss = F.cross_entropy(logits[:, 1:].reshape(-1, V), y[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


threads = torch.get_num_threads()
torch.set_num_threads(1)
try:
    trained = {scheme: train(scheme) for scheme in SCHEMES}
finally:
    torch.set_num_threads(threads)
models = {scheme: model for scheme, (model, _) in trained.items()}
print("trained:", list(models))

# %% [markdown]
# The final training losses (cross-entropy over 16 possible next tokens; guessing uniformly
# gives $\ln 16 \approx 2.77$). Exact values can differ in the last digits between machines, so
# this cell's output is not compared when the notebook is tested; it asserts what should hold
# anywhere.

# %% tags=["nbval-ignore-output"]
for scheme, (_, loss) in trained.items():
    print(f"{scheme:>10}: final training loss {loss:.2f}")
assert all(trained[s][1] < 0.5 for s in ["learned", "sinusoidal", "rope", "alibi"])

# %% [markdown]
# Now the test set: 512 new sequences of length 64. Because the model is causal, its output at
# position $t$ depends only on tokens $0..t$, so the first 32 outputs on a 64-token sequence
# are exactly what the model would output on the 32-token prefix. One forward pass therefore
# measures both lengths: positions 1..31 are what the model was trained on, positions 32..63
# are new. We check the causality claim once, then compute the accuracy at every position.

# %%
x_test, y_test = fibonacci_batch(512, 2 * L, torch.Generator().manual_seed(1234))

with torch.no_grad():
    rope_model = models["rope"]
    print(
        "first 32 outputs on 64 tokens == outputs on the 32-token prefix:",
        torch.allclose(rope_model(x_test)[:, :L], rope_model(x_test[:, :L]), atol=1e-5),
    )


def accuracy_per_position(model, x, y, attn_mask=None):
    with torch.no_grad():
        logits = model(x, attn_mask=attn_mask)  # (B, T, V)
    return (logits.argmax(-1) == y).float().mean(0)  # (T,): fraction correct at each position


# %% [markdown]
# The learned model has nothing to offer for positions beyond its table. Asking it anyway:

# %%
try:
    models["learned"](x_test)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# So it is evaluated at length 32 only. For the others we evaluate the full 64 tokens.

# %%
acc = {"learned": accuracy_per_position(models["learned"], x_test[:, :L], y_test[:, :L])}
for scheme in SCHEMES[1:]:
    acc[scheme] = accuracy_per_position(models[scheme], x_test, y_test)
seen = {s: a[1:L].mean().item() for s, a in acc.items()}  # positions 1..31: as in training
new = {s: a[L:].mean().item() for s, a in acc.items() if s != "learned"}  # positions 32..63

# %% [markdown]
# The results. As with the losses, the exact numbers depend on the machine in the last digits,
# so the printout is not compared; the asserts check the conclusions we draw below.

# %% tags=["nbval-ignore-output"]
print(f"{'scheme':>10}  {'positions 1..31':>15}  {'positions 32..63':>16}")
for s in SCHEMES:
    print(f"{s:>10}  {seen[s]:>15.2f}  {new[s] if s in new else float('nan'):>16.2f}")
assert all(seen[s] > 0.9 for s in ["learned", "sinusoidal", "rope", "alibi"])
assert seen["none"] < min(seen[s] for s in ["learned", "sinusoidal", "rope", "alibi"])
assert new["alibi"] > 0.95  # ALiBi holds up at twice the length
assert new["sinusoidal"] < seen["sinusoidal"] - 0.15  # sinusoidal loses much of its accuracy
assert new["rope"] < seen["rope"] - 0.05  # RoPE too
assert new["none"] > max(new["sinusoidal"], new["rope"])  # "none" beats both beyond 32
assert new["rope"] > new["sinusoidal"]  # on the mean over 32..63 ...
assert acc["rope"][-8:].mean() < acc["sinusoidal"][-8:].mean()  # ... but not at the end

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 1]})
for s in SCHEMES:
    positions = torch.arange(1, len(acc[s]))
    ax1.plot(positions, acc[s][1:], label=s, lw=1.5)
ax1.axvline(L - 0.5, color="black", ls="--", lw=1)
ax1.text(L + 0.5, 0.05, "beyond the training length", fontsize=9)
ax1.set_xlabel("position t")
ax1.set_ylabel("accuracy of the next-token prediction")
ax1.set_ylim(0, 1.02)
ax1.set_title("trained at length 32, tested at length 64")
ax1.legend(loc="lower left", bbox_to_anchor=(0.08, 0.02), ncol=2)  # clear of the curves' start
width = 0.38
idx = torch.arange(len(SCHEMES)).float()
ax2.bar(idx - width / 2, [seen[s] for s in SCHEMES], width, label="positions 1..31")
ax2.bar(idx + width / 2, [new.get(s, 0.0) for s in SCHEMES], width, label="positions 32..63")
ax2.text(idx[0] + width / 2, 0.03, "n/a", ha="center", rotation=90, fontsize=9)
ax2.set_xticks(idx, SCHEMES, rotation=20)
ax2.set_ylim(0, 1.25)
ax2.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
ax2.set_title("mean accuracy")
ax2.legend(loc="upper center", ncol=2, fontsize=9)
plt.show()

# %% [markdown]
# What the experiment shows (one small task, one seed, one tiny model — a demonstration, not
# a benchmark):
#
# - **Learned** positions solve the task at the training length (every scheme is less sure at
#   the first few positions, where a sequence has just begun) and cannot even be asked
#   about longer sequences: the table ends at 32.
# - **Sinusoidal** positions also solve the task at length 32, and the accuracy falls away
#   right after position 32 (a mean of about 0.44 on positions 32..63). The table has rows for
#   those positions, but the model never saw them during training; whatever it learned about
#   "the previous position" was learned for the first 32 rows of the table. Nothing forces the
#   model to use the $R_k$ structure of section 2; it learns what rows 0..31 look like, and rows
#   32..63 bring values of the slow pairs it never saw.
# - **RoPE** solves the task at length 32, holds for a few positions beyond it, then degrades
#   steadily. Its mean on positions 32..63 (about 0.56) is above the sinusoidal model's because
#   it stays above it over the first part of the new range, more than half of it in the plot; by
#   the end of the sequence it has fallen below it.
#   That may be surprising: its scores depend only on offsets, so a head that looks one token
#   back should work at any position. The next cell finds the culprit.
# - **ALiBi** keeps its accuracy at 64 tokens. Its bias is the same rule at every position and
#   every distance, and beyond 32 tokens it simply keeps pushing attention toward recent tokens,
#   which is exactly what this local task needs. At an offset it never saw, ALiBi only adds a
#   larger penalty; the content scores $q \cdot k$ are the ones it was trained with, since no
#   position enters $q$ or $k$. RoPE, at an unseen offset, rotates $q$ and $k$ by angles never
#   seen in training, so it produces values of $q \cdot k$ the model has never met.
# - **No positions** learns the task partly. As section 1 showed, the causal mask leaks some
#   order information (a token can, for example, tell how many tokens came before it from how
#   spread out its attention is), and a bag of the tokens so far says a lot about sequences as
#   regular as these (every Fibonacci sequence mod 16 repeats with a period dividing 24). It is
#   clearly worse than every position scheme at length 32.
# - Beyond the training length, however, **no positions beat both sinusoidal and RoPE** (a mean
#   of about 0.69 on positions 32..63, against 0.44 and 0.56). Not because it found a better
#   solution, but because it has nothing position-specific to break: no table rows it never
#   trained, no rotation angles it never saw. It still loses some accuracy (from about 0.80),
#   probably because the one weak order signal it has, how spread out the attention is,
#   changes as the sequences grow.
#
# Why does RoPE degrade? At position 50, the query also sees keys 32 to 50 tokens back.
# During training no offset larger than 31 ever occurred. The model's heads have
# `head_dim` $= 32 / 4 = 8$, the four pairs of section 3.2's figure; pair 1 turns by 0.1 radian
# per position, so training offsets took it from 0 to 3.1 radians, and offsets 32 to 63 take it
# to 6.3, angles it never saw. Pairs 2 and 3 reach unseen angles too (up to $0.63$ and
# $0.063$ radians instead of $0.31$ and $0.031$), while pair 0, at one radian per position,
# wraps around several times within 31 positions and has seen every angle. The scores at those
# offsets are whatever the pairs happen to produce there, and some of them can be large enough
# to steal attention from the previous token. If that is the explanation, hiding every key more
# than 31 tokens away should repair RoPE. It should not help the sinusoidal model, whose
# problem is the unseen *absolute* positions. We test it with an attention mask (`True` = may
# attend) that lets each query see only the last 32 positions.

# %%
t_idx = torch.arange(2 * L)
# (64, 64): True where the key is at most 31 positions back. On its own this would also let
# every query see all *future* keys; it is correct only because the layer combines it with its
# causal mask (both must allow a key).
window = (t_idx[:, None] - t_idx[None, :]) < L
windowed = {
    s: accuracy_per_position(models[s], x_test, y_test, attn_mask=window)[L:].mean().item()
    for s in ["sinusoidal", "rope", "alibi"]
}

# %% tags=["nbval-ignore-output"]
for s, a in windowed.items():
    print(f"{s:>10}, positions 32..63: full attention {new[s]:.2f}, last 32 keys only {a:.2f}")
assert windowed["rope"] > 0.95 and windowed["rope"] > new["rope"] + 0.05  # RoPE repaired
assert windowed["sinusoidal"] < 0.8  # sinusoidal not repaired

# %% [markdown]
# With the window, RoPE is back at its training accuracy: inside the window it only ever sees
# offsets it was trained on, and offsets are all it uses. The sinusoidal model does not
# recover, because its positions 32..63 are unseen whatever the window.
#
# This is the length-extrapolation problem of RoPE in miniature, and the reason long-context
# RoPE models are not simply run on longer inputs. They are adapted so that long offsets map
# to angles like those seen in training: position interpolation rescales the positions (a
# context twice as long is squeezed into the trained range of angles); NTK-aware scaling and
# YaRN change the base, or the frequency of each pair separately (exercise 1 looks at what
# the base does). Usually some training at the new length follows. ALiBi extrapolates out of
# the box, but by construction it keeps favouring recent tokens, which is a bias a task
# needing distant information has to fight against.

# %% [markdown]
# ## Check against the module
#
# `attnbook.positions` holds the tested versions of everything in this chapter, and
# `Attention` (the base of `mha`, `gqa` and `mqa`) applies RoPE and ALiBi inside
# the layer. We check the functions against ours, then take a real `MultiHeadAttention` layer,
# run its weights through our own RoPE and ALiBi code by hand, and compare with the layer's
# output, to `atol=1e-5` (the values are of size 1 to 8, and the layer's fast path sums in a
# different order).

# %%
from attnbook.attention import MultiHeadAttention
from attnbook.positions import (
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    half_to_interleaved,
    interleaved_to_half,
    rope_cos_sin,
    rope_permutation,
    sinusoidal_embedding,
)

# sinusoidal
assert torch.allclose(sinusoidal_table(128, 64), sinusoidal_embedding(128, 64), atol=1e-5)
assert torch.allclose(PositionalEmbedding("sinusoidal", 128, 64)(10, start=5), P[5:15], atol=1e-5)

# RoPE: angles, both pairings, the permutation, the weight conversion, the start offset
pos = torch.arange(20)
for ours, theirs in zip(rope_angles(pos, 16), rope_cos_sin(pos, 16), strict=True):
    assert torch.allclose(ours, theirs, atol=1e-5)
xr = torch.randn(3, 20, 16)  # (B, T, head_dim)
c20, s20 = rope_angles(pos, 16)
xr_inter = rope_interleaved(xr, c20, s20)
assert torch.allclose(xr_inter, apply_rope(xr, c20, s20, "interleaved"), atol=1e-5)
assert torch.allclose(rope_half(xr, c20, s20), apply_rope(xr, c20, s20, "half"), atol=1e-5)
assert torch.equal(rope_permutation(16), perm16)
assert torch.equal(interleaved_to_half(W_q, n_head_c), convert_rows(W_q))
assert torch.equal(half_to_interleaved(convert_rows(W_q), n_head_c), W_q)  # and back
rotary = RotaryEmbedding(head_dim=16, max_len=20, pairing="interleaved")
assert torch.allclose(rotary(xr[:, 12:], start=12), xr_inter[:, 12:], atol=1e-5)

# ALiBi: slopes for 1..64 heads, and the causal part of the bias
for n in range(1, 65):
    assert torch.allclose(slopes_by_rule(n), alibi_slopes(n), atol=1e-5), n
causal16 = causal_mask(16)
assert torch.allclose(alibi_bias(slopes8, 16, 16)[:, causal16], bias8[:, causal16], atol=1e-5)
print("sinusoidal, RoPE (pairings, permutation, start), ALiBi == attnbook.positions (atol=1e-5)")

# %% [markdown]
# And the layer: the module's `c_attn` weights give the queries, keys and values; our code adds
# the positions; [chapter 2](02_scaled_dot_product_attention.ipynb)'s `sdpa_reference` attends; the
# module's `c_proj` mixes the heads.

# %%
def layer_by_hand(layer, x, positions, pairing="half"):
    B, T, d = x.shape
    nh, hd = layer.n_head, layer.head_dim
    q, k, v = layer.c_attn(x).split(d, dim=2)  # 3 x (B, T, d)
    q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
    mask = causal_mask(T)
    if positions == "rope":
        cos_l, sin_l = rope_angles(torch.arange(T), hd)
        rope_fn = rope_half if pairing == "half" else rope_interleaved
        q, k = rope_fn(q, cos_l, sin_l), rope_fn(k, cos_l, sin_l)
    if positions == "alibi":
        mask = alibi_causal_bias(slopes_by_rule(nh), T)  # (nh, T, T) float bias, -inf above
    y = sdpa_reference(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
    return layer.c_proj(y.transpose(1, 2).reshape(B, T, d))


torch.manual_seed(1)
x_layer = torch.randn(2, 10, 48)
for positions, pairing in [("rope", "half"), ("rope", "interleaved"), ("alibi", "half")]:
    cfg = AttentionConfig(
        n_embd=48, n_head=6, block_size=16, positions=positions, rope_pairing=pairing
    )
    layer = MultiHeadAttention(cfg).eval()
    with torch.no_grad():
        by_hand = layer_by_hand(layer, x_layer, positions, pairing)
        assert torch.allclose(layer(x_layer), by_hand, atol=1e-5), (positions, pairing)
print("MultiHeadAttention, RoPE (half, interleaved) and ALiBi (6 heads) == our code (atol=1e-5)")

# %% [markdown]
# ## Summary
#
# - Attention is blind to order: without positions it is permutation-equivariant, and even a
#   causal layer reads each token's past as a bag.
# - Learned and sinusoidal positions are vectors added to the embeddings. The sinusoidal table
#   has a relative structure ($P_m \cdot P_n$ depends on $m - n$), but once mixed with content
#   the model has to dig it out. A learned table has no vectors beyond its length.
# - RoPE rotates queries and keys, pair by pair, by angles proportional to their positions, so
#   each score depends on the content and on the offset $m - n$ alone. Two pairings exist
#   (interleaved: GPT-J, RoFormer; half-split with `rotate_half`: GPT-NeoX, HF LLaMA); they are
#   the same up to a permutation of each head's query and key rows. Cached decoding rotates a
#   new token by its true position (`start`).
# - ALiBi adds $-m_h \cdot$ distance to the scores with fixed geometric slopes per head (the
#   paper's rule fills in non-powers of two).
# - Trained at 32 and tested at 64 on a local task, the mean accuracies on positions 32..63
#   were: ALiBi about 0.97 (it held up), no positions 0.69, RoPE 0.56 and sinusoidal 0.44;
#   learned positions could not run at all. RoPE's loss came from offsets it had never seen
#   (it recovered when they were hidden), the sinusoidal model's from positions it had never
#   seen.

# %% [markdown]
# ## Further reading
#
# - Vaswani et al. (2017), section 3.5: sinusoidal positions; Shaw, Uszkoreit and Vaswani,
#   *Self-Attention with Relative Position Representations* (NAACL 2018).
# - Su, Lu, Pan, Murtadha, Wen and Liu, *RoFormer: Enhanced Transformer with Rotary Position
#   Embedding* (2021).
# - Press, Smith and Lewis, *Train Short, Test Long: Attention with Linear Biases Enables Input
#   Length Extrapolation* (ICLR 2022): ALiBi.
# - Kazemnejad et al., *The Impact of Positional Encoding on Length Generalization in Transformers*
#   (NeurIPS 2023): causal models without positions.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/06_positions_solutions.ipynb`](solutions/06_positions_solutions.ipynb). Write down
# your prediction before you run anything.
#
# 1. **RoPE's base and its wavelengths.** For `head_dim = 64` and base 10,000, how many
#    positions does the fastest pair need for a full turn, and the slowest? Predict with a
#    formula, then check with `rope_cos_sin`. How many of the 32 pairs complete at least one
#    full turn within a 4,096-token context? Redo both for base 500,000 (LLaMA 3) and explain
#    why long-context models raise the base.
# 2. **ALiBi slopes for 6 heads, by hand.** Apply the paper's rule on paper: which power of two
#    do you start from, which slopes do you add? Write the six slopes as powers of two, then
#    compare with `alibi_slopes(6)`. Do 6 heads get any slope that 8 heads do not have?
# 3. **Positions break equivariance.** Add the sinusoidal table to `x` before the non-causal,
#    position-free layer of section 1, and show that permuting the tokens no longer permutes
#    the outputs. Do the same with a non-causal layer built with `positions="rope"`. Then
#    predict: what if the tokens are permuted *together with* their position vectors (the
#    permutation applied to $x + P$ instead of to $x$)?
# 4. **The pairing bug.** Train the chapter's `TinyLM("rope", ..., rope_pairing="interleaved")`
#    as `train` does, then load its weights, unchanged, into a model built with
#    `rope_pairing="half"`. Predict: at which positions are the logits still the same? What
#    happens to the accuracy? Then convert the weights with `interleaved_to_half` (the q and k
#    rows of `c_attn`, weight and bias) and show the logits match again.
# 5. **Forgetting the offset** (after [chapter 7](07_kv_cache.ipynb)). Decode a sequence token
#    by token through a RoPE `MultiHeadAttention` with a KV cache (`layer.new_cache(...)`, then
#    `layer(x_t, cache=cache)`) and check it matches the full forward pass. Then break it: give
#    the layer a `RotaryEmbedding` that ignores `start` (the layer holds its RoPE as
#    `layer.rope`). Predict which outputs still match, check, and explain. Why does ALiBi's
#    bias need no `start` argument? (Look at `alibi_bias(slopes, 1, t_k)`.)
