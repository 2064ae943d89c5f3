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
# # Chapter 18 — Comparing attention variants
#
# Chapters 3 to 14 built the attention layers that the registry knows by name. This chapter
# compares them: the reduced run in the notebook trains seven (`mha`, `mqa`, `gqa`, `mla`,
# `local`, `sparse` and `linear`), and the committed results of the command's full preset cover
# every registered layer but NSA, the DeltaNets of chapter 12 and MoBA and DSA of chapter 14
# included. Each chapter measured its own variant against
# full multi-head attention on its own terms: a cache that is smaller, a kernel that is faster at
# 4,096 positions, a probe of how much a fixed-size state can recall.
# [Chapter 17](17_training_a_gpt.ipynb) put any of them into a GPT and trained it. What is missing
# is the question a researcher asks first: *trained the same way on the same data, how do they
# differ?*
#
# This chapter answers it with `attnbook.compare`, the code behind the `attnbook compare`
# command. It trains every variant with the same model shape, seed, batches, optimiser and
# schedule on synthetic tasks that are built to tell attention from its cheaper substitutes,
# and writes a table and figures. A chapter has about a minute of CPU, which is enough to see
# some differences and not others; we say which is which, and what the longer runs of the
# command are for. Then we look at the other way to get a cheap variant: not training it, but
# *converting* a trained multi-head model, by mean-pooling key/value heads into GQA and by a
# truncated SVD of the key/value projections into MLA.
#
# **Learning goals**
#
# - Say what "identical conditions" means for a comparison of attention variants, and what
#   cannot be identical (each variant's options, its parameter count).
# - Read the three synthetic diagnostics of `attnbook.tasks` — multi-query associative recall,
#   copying and induction — and explain why associative recall is the task that separates full
#   attention from its cheap substitutes.
# - Run `compare(CompareConfig(...))`, read its table and figures, and tell which differences a
#   short run can show (cache size, speed, what lies beyond a window's reach) and which it cannot.
# - Read the full preset's committed results: recall against the cache each variant keeps,
#   recall against distance, and when each variant leaves the plateau of its loss curve.
# - Predict from `layers × (window − 1)` which copies a sliding-window model can learn, and
#   check it.
# - Convert a trained MHA model into GQA (mean-pooled heads) and into MLA (truncated SVD), measure
#   the loss before conversion, right after it and after a short further training, and explain
#   why a RoPE model cannot be converted to MLA this way.

# %% [markdown]
# ## Setup
#
# The models here are tiny (about 100 thousand parameters), and for tensors this small one CPU
# thread is faster than several: the threads spend more time agreeing on the work than doing it.
# So we use one thread in this process, and `compare` uses the cores the other way: it trains
# several variants at once, each in a child process of its own with its share of the cores (one
# thread each on a machine with no more cores than variants).
#
# Losses, accuracies and timings still depend on the machine's arithmetic, so cells that print
# them are ignored by the book's tests, and assert their claims with a margin instead. Every
# run writes into a temporary folder that the notebook deletes at the end.

# %%
import dataclasses
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display
from tqdm import tqdm

from attnbook.attention import available

torch.set_num_threads(1)
torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="attnbook-ch18-")  # removed at the end
runs = Path(workdir.name)
print("registered variants:", available())

# %% [markdown]
# ## 1. What "identical conditions" means
#
# A comparison is only as good as what it holds fixed. `attnbook.compare` gives every variant:
#
# - the same GPT ([chapter 17](17_training_a_gpt.ipynb)'s `GPTConfig`): layers, heads, width,
#   context length, no dropout, and the same position scheme — RoPE unless `positions` says
#   otherwise, so position enters every variant the same way, inside attention, as a relative offset
#   — only the `attention` field and its options change;
# - the same seed, so the same stream of training batches (the data generator is seeded on its
#   own, apart from the weights) and the same fixed evaluation batches;
# - the same number of steps, batch size, AdamW settings and learning-rate schedule (5% warm-up,
#   cosine decay to a tenth of the peak), through the same training loop, `attnbook.train.train`.
#
# Two things cannot be the same. First, most variants need options, and "the same" option does
# not exist: a window or a block size only means something relative to the sequence length.
# `variant_options` asks each variant for its own choice at the configuration's sequence length
# (`options_for_length`, written in the variant's file), so that each variant's saving is real at
# that length: GQA keeps half of the key/value heads, a window of an eighth of the sequence,
# BigBird blocks of a sixteenth of it with each query block seeing at most 6 of the 16 (1 global,
# 3 window, 2 random), a linear-attention chunk of at most 64 positions; MLA keeps its
# defaults (a latent of `4 × head_dim` numbers, DeepSeek-V2's ratio). Second, the parameter
# counts differ a little, because sharing or compressing keys and values removes or adds weights;
# the table reports them.
#
# Here is the configuration we run in section 3: two layers of four heads, 64 dimensions, a
# context of 32 positions, 200 steps of 12 sequences — far smaller and shorter than the
# command's presets, so that every variant trains in a few seconds. (`data` and `encoding` only
# matter for the language-modelling workload.)

# %%
from attnbook.compare import (
    CompareConfig,
    SuiteData,
    cache_bytes_per_token,
    compare,
    model_config,
    recall_suite,
    variant_options,
)
from attnbook.model import GPT

cfg = CompareConfig(
    workload="recall", n_layer=2, n_head=4, n_embd=64, block_size=32, max_iters=200,
    batch_size=12, eval_batches=2, out_dir=str(runs / "compare"),
    variants=("mha", "mqa", "gqa", "mla", "local", "sparse", "linear"),  # chapters 3-11 and 13
)
suite = recall_suite(cfg)  # the three tasks at 32 positions (section 2)
suite_data = SuiteData(suite)
print("shared settings:", cfg.settings())
print(f"\n{'variant':>7} {'parameters':>10} {'cache B/token':>13}  options")
for name in cfg.variants:
    mcfg = model_config(name, cfg, vocab_size=suite_data.vocab_size)
    n_params = GPT(mcfg).num_params(non_embedding=False)
    print(f"{name:>7} {n_params:>10,} {cache_bytes_per_token(mcfg):>13,.1f}  "
          f"{variant_options(name, cfg)}")

# %% [markdown]
# Three groups appear already. `local`, `sparse` and `linear` have exactly MHA's weights: they
# change which positions a query may see or how the scores are computed, not the projections.
# `gqa` and `mqa` have fewer (2 and 1 key/value heads instead of 4). `mla` has more: at this tiny
# width its down- and up-projections, with a latent of 64 numbers, cost more than MHA's key and
# value projections they replace, and its queries carry extra rotary coordinates.
#
# The last number is the cache of a 1,024-token sequence, over both layers in float32, divided by
# 1,024. For the caches that grow with the sequence it is the cost of one more token:
# $2 \times n_\text{layer} \times n_\text{kv} \times d_\text{head} \times 4$ bytes $= 1{,}024$ for
# MHA (and `sparse`, which keeps MHA's full cache), half of it for GQA, a quarter for MQA, and
# $(64 + 8) \times 2 \times 4 = 576$ for MLA's latent and shared rotary key. `local` keeps only its
# window of 4 positions and `linear` a fixed-size state: their whole cache, spread over 1,024
# tokens, is a few bytes per token, and the longer the sequence the smaller that share.
# Exercise 4 derives every entry by hand.

# %% [markdown]
# ## 2. The synthetic tasks
#
# A language-modelling loss mixes thousands of skills, and two variants can reach the same loss
# by different means. Synthetic tasks ask for one skill at a time, are generated in code (no
# download, a fresh batch every step, the same batches for the same seed) and have answers that
# are right or wrong. `attnbook.tasks` has three. Each batch holds the inputs `idx`, the
# `targets` — the id to predict at each position, `-1` where nothing is asked, so the loss and
# the accuracy count only the answers — and the `gaps`: at each answer, how many positions back
# lies the earlier token the answer depends on.
#
# We show one small example of each, with a helper that prints a sequence as a table (a dot
# where the value is `-1`).

# %%
from attnbook.tasks import FILLER, SEPARATOR, accuracy, build_task


def show(batch, row=0):
    """Print one sequence of a TaskBatch: positions, inputs, targets and gaps."""
    def line(label, values):
        cells = ["." if v == -1 else str(v) for v in values]
        print(f"{label:>8} " + " ".join(f"{c:>3}" for c in cells))

    line("position", range(batch.idx.shape[1]))
    line("input", batch.idx[row].tolist())
    line("target", batch.targets[row].tolist())
    line("gap", batch.gaps[row].tolist())


gen = torch.Generator().manual_seed(3)
recall_demo = build_task("recall", vocab_size=16, seq_len=14, n_pairs=3)
print(f"recall: keys from [1, 8), values from [8, 16); FILLER = {FILLER}")
show(recall_demo.batch(1, gen))

# %% [markdown]
# **Multi-query associative recall** (MQAR, from the Zoology benchmark of Arora et al., 2023).
# The sequence opens with key–value pairs: a key at each even position, its value right after
# it. Keys come from the lower half of the ids and values from the upper half, so a value is
# never mistaken for a key. Every later position holds one of the keys again, a *query*, and
# its target is that key's value. The gap is the distance back to the queried key; the value to
# answer sits one position after it. The model has to find an earlier position by its *content*
# (the key matching the current token, anywhere before), then read the token next to it.
#
# Why this task? Zoology trained attention next to its cheap substitutes — gated convolutions,
# state-space models, linear attention — and found that attention beat them in perplexity, and
# that most of that gap came from tokens that could only be predicted by recalling an earlier
# pair: this skill. Full attention keeps every key and value in its cache and looks them up by
# content, whatever the distance. A sliding window forgets every pair beyond its reach. A
# recurrent state (linear attention) keeps everything, but folded into a fixed number of
# numbers: with many pairs they interfere ([chapter 11](11_linear_attention.ipynb), section 7).
# Recall is where each saving shows its price.

# %%
copy_demo = build_task("copy", vocab_size=16, seq_len=12, segment_len=4)
print(f"copy: segment, SEPARATOR = {SEPARATOR}, the segment again, then FILLER")
show(copy_demo.batch(1, gen))
print()
induction_demo = build_task("induction", vocab_size=16, seq_len=12)
print("induction: A B ... A -> B")
show(induction_demo.batch(1, gen))

# %% [markdown]
# **Copying**: a random segment of `S` tokens, a separator, and the segment again. From the
# separator on, each position predicts the next token of the segment, which lies `S` positions
# back; the gap recorded for every answer is `S + 1`, the distance from the current token to its
# earlier copy (the separator has none; it gets the same gap). **Induction**: a token `A`
# occurs twice, and after its second occurrence the model must predict `B`, the token that
# followed the first one — the pattern an "induction head" completes (Olsson et al., 2022), one
# answer per sequence, at a random gap.
#
# `compare`'s recall workload trains every variant on an equal mix of the three, at the model's
# context length (`recall_suite`): recall with `T // 16` pairs (at least 2), copies of `T // 4`
# tokens, induction. Here is what a batch of our configuration holds, task by task:

# %%
x, y = suite_data.get_batch("train", cfg.batch_size, cfg.block_size,
                            torch.Generator().manual_seed(cfg.seed))
print("batch:", tuple(x.shape), "| vocabulary:", suite_data.vocab_size)
for task, rows in zip(suite, y.chunk(len(suite)), strict=True):
    options = {k: v for k, v in dataclasses.asdict(task).items() if k not in ("vocab_size",)}
    print(f"  {task.name:>9} {options}: {rows.shape[0]} sequences, "
          f"{int((rows != -1).sum())} answer positions")

# %% [markdown]
# Recall with 2 pairs fills the first 4 positions with pairs and asks 28 queries per sequence;
# a copy has 8 answers, an induction sequence one. The loss is the mean over all answers, so
# three quarters of the training signal is recall. Two reference levels for recall accuracy: a
# model that knows which 2 values the sequence holds but not which key each belongs to scores
# $1/2$ by guessing between them; a model that cannot see the pairs at all guesses among the 32
# value ids, $1/32 \approx 0.03$.
#
# One more number to keep in mind. The sliding-window variant sees a window of $w = T/8 = 4$
# positions (itself and 3 before), and two layers of it move information at most
# $R = L(w - 1) = 6$ positions forward ([chapter 9](09_sliding_window.ipynb), section 4). Its copies
# of 8 tokens and nearly all of its recall queries (the pairs sit at positions 0 to 3) are beyond
# that reach.

# %% [markdown]
# ## 3. A reduced comparison run
#
# `compare(cfg)` trains each variant in a child process of its own (so that the peak memory it
# reports is that variant's), as many at once as the machine has cores (`jobs` sets another
# number), in `out_dir/recall/<variant>/`, then writes `results.csv`,
# `results.md` and four figures into `out_dir/recall/`. Run again with the same settings, it
# reuses the finished variants. The table has the parameter count, the final losses on the
# training and validation batches (answer positions only), the accuracy of each task on a fixed
# evaluation set, the training speed, the speed of greedy generation with the cache, the cache
# per token, the peak memory and the wall time.
#
# Speeds and times change from machine to machine and run to run, so the tests ignore this
# cell's output; the cells after it check what we read from it.

# %% tags=["nbval-ignore-output"]
rows = compare(cfg)
results = {row["variant"]: row for row in rows}
root = Path(cfg.out_dir) / cfg.workload
print("\nfiles written:", sorted(p.name for p in root.iterdir() if p.is_file()))

# %% [markdown]
# The same from the command line, with the larger presets that the chapter has no time for:
#
# ```
# attnbook compare --quick      # the quick preset (make compare)
# attnbook compare --full       # the same models, 8000 steps instead of 1500: read recall here
# attnbook compare --workload lm --data tinyshakespeare   # language modelling instead
# attnbook compare --help       # every setting
# ```
#
# Each writes `results/compare/<workload>/`. The figures of our run:

# %% tags=["nbval-ignore-output"]
display(Image(filename=str(root / "loss_curves.png"), width=640))
display(Image(filename=str(root / "recall_by_gap.png"), width=640))

# %% [markdown]
# **What 200 steps show, and what they do not.** The accuracies and losses of our run:

# %% tags=["nbval-ignore-output"]
print(f"{'variant':>7} {'val loss':>8} {'recall':>6} {'copy':>5} {'induction':>9}   "
      f"recall by gap: " + ", ".join(f"{lo}-{hi - 1}" for lo, hi, _, n
                                     in results["mha"]["recall_by_gap"] if n))
for name, r in results.items():
    by_gap = ", ".join(f"{acc:.2f}" for _, _, acc, n in r["recall_by_gap"] if n)
    print(f"{name:>7} {r['val_loss']:>8.3f} {r['recall_acc']:>6.3f} {r['copy_acc']:>5.3f} "
          f"{r['induction_acc']:>9.3f}   {by_gap}")
others = [r for name, r in results.items() if name != "local"]
assert results["local"]["recall_acc"] < 0.08  # a blind guess among 32 values: 0.03
assert all(r["recall_acc"] > results["local"]["recall_acc"] for r in others)
assert sum(r["recall_acc"] for r in others) / len(others) > 0.15  # ... and far from 1/2
assert all(r["recall_acc"] < 0.4 for r in others)
assert results["local"]["val_loss"] > max(r["val_loss"] for r in others)
assert all(r["copy_acc"] < 0.3 for r in results.values())  # nobody has learned to copy yet

# %% [markdown]
# - **Recall**: every variant but `local` scores between the two reference levels, well above a
#   blind guess ($1/32$) and well below a guess between the sequence's two values ($1/2$), and
#   about equally at every gap: they have started to use the pairs, and none has learned the
#   lookup. Associative recall is the slowest of the three tasks to learn; as `compare`'s
#   documentation warns, small models stay near chance for thousands of steps before the
#   two-layer lookup forms, at a step that differs from variant to variant and from seed to
#   seed. So this run says nothing about which variant recalls best. Which ones learn it at all,
#   and how their accuracy falls with the gap, is what the command's full preset measures
#   (`attnbook compare --full`, `recall_by_gap.png` in its results folder).
# - **`local`** is the one clear separation, and it is the one the window predicts: its accuracy
#   is that of a blind guess, at every gap, and its loss is the highest. With a reach of 6
#   positions, a query at position 10 or later cannot even see which values the sequence holds,
#   let alone which key they belong to.
# - **Copy and induction**: no variant has learned them in 200 steps (three quarters of the
#   signal went to recall). Section 4 trains copying alone, which a few hundred steps do learn.
#
# The other two figures are the costs, which need no training to be meaningful:

# %% tags=["nbval-ignore-output"]
display(Image(filename=str(root / "cache_bytes.png"), width=640))
display(Image(filename=str(root / "throughput.png"), width=760))

# %%
cache = {name: r["cache_bytes_per_token"] for name, r in results.items()}
print("cache bytes per token at T=1024:", {name: round(b, 1) for name, b in cache.items()})
print("relative to mha:", {name: round(b / cache["mha"], 3) for name, b in cache.items()})

# %% [markdown]
# **Memory.** GQA and MQA cut the cache in proportion to their key/value heads (1/2, 1/4), MLA to
# its latent plus rotary key over MHA's keys and values ($72/128 \approx 0.56$ here; with
# DeepSeek-V2's sizes, [chapter 13](13_latent_attention.ipynb), the ratio is 1/57). `sparse` saves
# work, not memory: it keeps MHA's cache. `local` and `linear` stop growing altogether, and that is
# the one saving that changes the *order* of the cost: at any length their cache is the same few
# kilobytes.
#
# **Speed.** Read the throughput figure with suspicion: at 32 positions and 64 dimensions a
# training step takes 10 to 20 milliseconds, mostly Python and the overhead of launching small
# operations, and the variants' savings in arithmetic are far too small to show. On a machine
# shared with other work, two runs of this notebook ranked the variants differently; what
# stays is that no variant is much faster than `mha`, and that the ones with more machinery —
# `sparse` builds and gathers a pattern of 16 blocks of 2 positions, `mla` runs more, smaller
# projections — tend to be at the slow end. Where the variants do win on speed needs
# long sequences — at a few thousand positions the blocked window, the block-sparse kernel and
# the chunked linear form beat full causal attention (chapters 9 to 11, `attnbook bench
# attention`) —
# or memory-bound decoding of long contexts, where reading a smaller cache is a shorter step
# ([chapter 13](13_latent_attention.ipynb)'s absorbed MLA). The timing-free columns (parameters,
# cache) are the ones to trust from a laptop run.

# %% tags=["nbval-ignore-output"]
speed = {name: round(r["train_tokens_per_s"]) for name, r in results.items()}
print("training tokens/s:", speed)
print("relative to mha:", {name: round(v / speed["mha"], 2) for name, v in speed.items()})
assert max(speed.values()) < 3 * speed["mha"]  # no saving pays off at 32 positions

# %% [markdown]
# ### The full preset, from its committed results
#
# A run of 200 steps is too short for recall; the command's presets are longer. Both train
# models of 2 layers, 4 heads and 64 dimensions on sequences of 64 positions (4 key-value
# pairs, so a guess between the sequence's values scores $1/4$; copies of 16 tokens; a window of
# 8, so $R = 2 \times 7 = 14$), with batches of 48: `--quick` for 1500 steps, `--full` for 8000.
# The repository keeps the results of one full run of every variant but NSA (seed 1337), as the
# command wrote them: `chapters/data/compare_full.csv` is its `results.csv` and
# `compare_full_curves.csv` its `curves.csv` (every evaluation's losses);
# `chapters/data/README.md` says how, when and on which machine they were made.
# NSA is missing because at 64 positions its training step is the slowest of all, about twice
# MoBA's, and 8000 steps would take more than an hour on one core;
# `attnbook compare --full --variants nsa` runs it. `make compare COMPARE_ARGS=--full` makes
# the whole file again on your machine (7 to 25 minutes per variant on one core of ours). The
# next cells read the files; nothing below is trained by this notebook.
# %%
import csv

from attnbook.compare import COLUMNS, PRESETS

DATA = Path("data")  # beside this notebook, in chapters/data/
with open(DATA / "compare_full.csv") as f:
    full = {row["variant"]: row for row in csv.DictReader(f)}
with open(DATA / "compare_full_curves.csv") as f:
    curves = list(csv.DictReader(f))
gap_cols = [k for k in next(iter(full.values())) if k.startswith("recall_gap_")]
assert set(next(iter(full.values()))) == set(COLUMNS) | set(gap_cols)  # compare's own columns
print("full preset:", PRESETS["full"])
bins = " / ".join(c.removeprefix("recall_gap_").replace("_", "-") for c in gap_cols)
print(f"{'variant':>14} {'recall':>6}   by gap {bins:<19} {'copy':>5} {'induction':>9} "
      f"{'cache B/token':>13}")
for name, r in full.items():
    by_gap = " / ".join(f"{float(r[c]):.2f}" for c in gap_cols)
    print(f"{name:>14} {float(r['recall_acc']):>6.3f}   {by_gap:<26} {float(r['copy_acc']):>5.3f} "
          f"{float(r['induction_acc']):>9.3f} {float(r['cache_bytes_per_token']):>13,.1f}")


# %% [markdown]
# What 8000 steps show, variant by variant (the numbers are the table's):
#
# - **`mha`, `mla`, `dsa`, `sparse` and both DeltaNets** answer every query at every gap. `moba`
#   comes close (0.988), losing a few queries at the longest gaps, where a query has the most
#   past chunks to choose among.
# - **`local`** rose only where its reach allows: 0.23 and 0.34 for gaps up to 15, near the
#   $1/4$ of a guess among a sequence's 4 values (a little above it where it sees the pair), and
#   a blind guess (0.03) beyond; the boundary,
#   $R = 14$, falls inside the 8–15 bin. Even for pairs within its reach it has not learned the
#   lookup in 8000 steps: seeing the values is not yet recalling the right one.
#   It copies almost nothing (0.016): the token to copy lies 16 positions back.
# - **`linear`** recalls 0.851, the same at every gap (0.85 in every bin): distance costs it
#   nothing, since every pair is folded into the same state; what limits it is how well that
#   state keeps the pairs apart ([chapter 11](11_linear_attention.ipynb)). It copies worst after
#   `local` (0.580): copying needs the token at one exact distance, which a state that adds up
#   every past position blurs.
# - **`gqa` and `mqa`** see every position, as `mha` does, and copy well (0.995 and 0.924), but
#   recall less: `gqa` 0.890, `mqa` 0.249, a guess among the values. Nothing in their structure
#   stops them; the curves below show where each one is in learning it.
# - **Induction** is learned by `dsa` alone (0.992); `deltanet` gets about half (0.539) and the
#   others much less. Of the three tasks it is the one 8000 steps leave furthest from done.
#
# The picture puts recall against the cost that grows with the context, the cache per token
# (blue: a recall of 0.95 or more), and recall against the distance between a pair and its query.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
points = {}  # (cache, rounded recall) -> names: variants on one spot share a label
for name, r in full.items():
    x, y = float(r["cache_bytes_per_token"]), float(r["recall_acc"])
    points.setdefault((x, round(y, 1)), []).append((name, y))
for i, ((x, _), group) in enumerate(sorted(points.items())):
    y = max(acc for _, acc in group)
    ax1.plot([x] * len(group), [acc for _, acc in group], "o",
             color="tab:blue" if y >= 0.95 else "tab:red")
    ax1.annotate("\n".join(name for name, _ in group), (x, y), textcoords="offset points",
                 xytext=(10, -6 - 16 * (i % 2)), fontsize=8, va="top",  # neighbours alternate
                 arrowprops=dict(arrowstyle="-", color="grey", lw=0.6))
ax1.axhline(1 / 4, ls=":", color="grey")
ax1.text(9, 0.27, "a guess among the sequence's 4 values", fontsize=8, color="grey")
ax1.set(xscale="log", xlabel="cache per token at 1,024 tokens (bytes, 2 layers, float32)",
        ylabel="recall accuracy after 8000 steps", ylim=(-0.02, 1.08),
        title="What each variant keeps, and what it recalls")
labels = [c.removeprefix("recall_gap_").replace("_", "-") for c in gap_cols]
# 11 variants: 10 colours, and a marker each, so that no two lines look alike
style = {name: dict(color=plt.cm.tab10(i % 10), marker="osD^v<>ph*X"[i])
         for i, name in enumerate(full)}
for name, r in full.items():
    ax2.plot(labels, [float(r[c]) for c in gap_cols], "-", lw=1, ms=5, label=name, **style[name])
perfect = [name for name, r in full.items() if min(float(r[c]) for c in gap_cols) > 0.995]
ax2.text(0.02, 0.9, f"at 1.00 in every bin, on top of each other:\n{', '.join(perfect)}",
         transform=ax2.transAxes, fontsize=7, va="top")
ax2.set(xlabel="gap between a pair and its query (positions)", ylabel="recall accuracy",
        ylim=(-0.02, 1.02), title="Recall against distance")
ax2.legend(fontsize=7, ncol=2)
plt.show()


# %% [markdown]
# On the left, what a variant keeps does not decide whether it recalls: `mqa` keeps a quarter of
# `mha`'s cache and recalls at a guess, the DeltaNets keep about 1% of it (12.5 bytes per token
# against 1,024) and recall everything, and `linear`, with a state of about the same size (8.5
# bytes; the DeltaNets also keep their short convolution's last inputs), recalls 0.851. With 4 pairs
# per sequence, far fewer than a DeltaNet's state can hold, what decides is whether a variant
# *learned* the lookup in 8000 steps, and for `local` whether it can see the pair at all. On the
# right, distance costs nothing to the variants that learned recall (six of them lie on top of each
# other at 1.00); only `local` falls off a cliff, at its reach.
#
# The validation loss over training shows how recall is learned: a long plateau, then a drop
# when the two layers start to work together, at a step that differs from variant to variant.
# Where the plateau lies follows from what the batches ask. Each holds the three tasks in equal
# parts, but not with equally many answers:

# %%
import math

full_cfg = CompareConfig(preset="full")
asked = {task.name: int((task.batch(1, torch.Generator().manual_seed(0)).targets != -1).sum())
         for task in recall_suite(full_cfg)}  # answers in one sequence of each task
share = {name: n / sum(asked.values()) for name, n in asked.items()}
print(f"answers per sequence at {full_cfg.block_size} positions: {asked}")
print("share of the loss:", {name: round(x, 3) for name, x in share.items()})
plateau = share["recall"] * math.log(4)  # recall guessed among 4 values, copying learned
print(f"copying learned, recall a guess among 4 values (ln 4 = {math.log(4):.2f} per answer): "
      f"a loss of about {plateau:.2f}")

# %% [markdown]
# Recall asks 56 questions per sequence, copying 16 and induction 1, so recall is 0.767 of the
# loss. A model that copies and guesses every recall answer among the 4 values sits near
# 1.06: that is the plateau, and a loss below 1 means recall has begun, the threshold printed
# under the figure. `mqa`'s curve falls a long way during training by learning to copy (0.924),
# not to recall. Induction, one answer in 73 (0.014 of the loss), is the smallest part of the
# training signal, which is why 8000 steps leave it furthest from done even for `mha`, which
# recalls everything.

# %%
fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
for name in full:
    points = [(int(c["step"]), float(c["val_loss"])) for c in curves if c["variant"] == name]
    ax.plot(*zip(*points, strict=True), "-", ms=3, lw=1, label=name, **style[name])
ax.set(yscale="log", xlabel="step", ylabel="validation loss (answer positions)",
       title="The full preset's validation loss: plateaus, and when each variant leaves its own")
ax.legend(fontsize=7, ncol=2)
plt.show()
def first_below_1(rows, name):
    """The step of the first evaluation of `name` in `rows` with a validation loss below 1, or
    None."""
    return next((int(c["step"]) for c in rows if c["variant"] == name
                 and float(c["val_loss"]) < 1), None)


below_1 = {name: first_below_1(curves, name) for name in full}
print("first evaluation with a validation loss below 1 (None: never):", below_1)


# %% [markdown]
# The DeltaNets are below 1 at the first evaluation (step 800); `mla` and `dsa` leave the plateau by
# step 2400, `moba` by 3200, `sparse` by 4000, `mha` by 4800, `linear` by 5600 and `gqa` by 6400,
# the last two still falling at the end; `mqa` has not left it by step 8000, and `local` cannot. At
# step 1600, near the quick preset's 1500 steps, only the DeltaNets are below the plateau: that is
# why a quick run shows the costs but not recall.
#
# The order in which the softmax variants leave the plateau is not a ranking of the variants:
# one seed is one draw. The repository keeps two more full runs of the three variants that differ
# only in how many key/value heads they keep, `mha`, `gqa` and `mqa`, with seeds 1 and 2 and
# every other setting the same (`chapters/data/compare_full_seeds.csv` and
# `compare_full_seeds_curves.csv`; the README there says how they were made). The seed sets the
# weights, the order of the batches and the evaluation set.

# %%
import statistics

SHARED = ("mha", "gqa", "mqa")  # 4, 2 and 1 key/value heads
seed_runs = [dict(full[name], seed="1337") for name in SHARED]  # the run above
run_curves = [dict(c, seed="1337") for c in curves if c["variant"] in SHARED]
with open(DATA / "compare_full_seeds.csv") as f:
    seed_runs += list(csv.DictReader(f))
with open(DATA / "compare_full_seeds_curves.csv") as f:
    run_curves += list(csv.DictReader(f))
seeds = list(dict.fromkeys(r["seed"] for r in seed_runs))  # 1337, 1, 2


recall = {(r["variant"], r["seed"]): float(r["recall_acc"]) for r in seed_runs}
print(f"{'variant':>8} " + " ".join(f"{'seed ' + s:>10}" for s in seeds)
      + f" {'mean ± sd':>14}   first step below 1, per seed")
for name in SHARED:
    accs = [recall[name, s] for s in seeds]
    print(f"{name:>8} " + " ".join(f"{a:>10.3f}" for a in accs)
          + f" {statistics.mean(accs):>7.3f} ± {statistics.stdev(accs):.3f}   "
          + ", ".join(str(first_below_1([c for c in run_curves if c["seed"] == s], name))
                      for s in seeds))

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True, layout="constrained")
for ax, name in zip(axes, SHARED, strict=True):
    for seed in seeds:
        points = [(int(c["step"]), float(c["val_loss"])) for c in run_curves
                  if c["variant"] == name and c["seed"] == seed]
        ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1, label=f"seed {seed}")
    ax.axhline(1, color="grey", ls=":", lw=1)
    ax.set(yscale="log", xlabel="step", title=name)
axes[0].set_ylabel("validation loss")
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# Three seeds, three answers. `mha` recalls 0.917 to 1.000 and leaves the plateau at step 4800
# every time. `gqa`, with half the key/value heads, recalls as well on average (0.962 against
# `mha`'s 0.956), and left the plateau at step 3200 with seed 1 and at 6400 with the other two.
# `mqa`, one key/value head for all four query heads, learned recall with seed 2 alone (1.000,
# below 1 from step 3200) and stayed on the plateau with the other two (0.249 and 0.280). Sharing
# key/value heads does not prevent recall: each of the three variants reaches 1.000 with some
# seed. At this size it makes *whether* recall is learned within 8000 steps a matter of the seed,
# the more so the fewer key/value heads are kept. Three seeds are still few: each standard
# deviation above comes from three numbers, and the gap between the means of `mha` and `gqa` says
# nothing. A claim about learning speed needs more seeds; `attnbook compare --full --seed N`
# makes them.

# %% [markdown]
# ## 4. Reach, measured: copying beyond the window
#
# The comparison run showed `local` failing without showing *where* it fails. Copying makes the
# boundary visible, because the distance is set by the task: the token to predict lies exactly
# `S` positions back. (For a window the distance that counts is this `S`, not the gap `S + 1`
# that section 2's batches record, which measures back to the earlier copy of the current token:
# reading the answer by its offset needs only `S`.) Prediction: with the comparison's window
# ($w = 4$) and two layers, the
# reach is $R = 2 \times 3 = 6$, so `local` should copy segments of up to 6 tokens and fail on
# longer ones, whatever the training; `mha` sees every earlier position and should learn every
# length; `linear` has no window either, so it can learn them as well.
#
# We train each on copying alone, with segments of 3, 6, 9 and 12 tokens mixed in every batch
# (`SuiteData` accepts any list of tasks of one length), using `train` directly: 300 steps of 24
# sequences, the variants' options of the comparison. One thing differs from the comparison:
# these models use [chapter 17](17_training_a_gpt.ipynb)'s learned positions instead of RoPE,
# because section 6 converts the `mha` one into MLA, which a RoPE model cannot be (we will see why).
# The window's reach does not depend on the position scheme. Each run takes a few seconds.

# %%
from attnbook.model import GPTConfig
from attnbook.train import TrainConfig, load_trained, train

segment_lengths = (3, 6, 9, 12)
copy_tasks = [build_task("copy", vocab_size=64, seq_len=32, segment_len=s)
              for s in segment_lengths]
copy_data = SuiteData(copy_tasks)
eval_gen = torch.Generator().manual_seed(99)
copy_eval = [task.batch(64, eval_gen) for task in copy_tasks]  # fixed: 64 sequences per length


def train_copy(name, n_layer=2, max_iters=300):
    """Train variant `name` (with the comparison's options) on the copy tasks; return it."""
    model_cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=n_layer, n_head=4, n_embd=64,
                          attention=name, attention_options=variant_options(name, cfg))
    train_cfg = TrainConfig(
        model=model_cfg, out_dir=str(runs / f"copy-{name}-{n_layer}"), batch_size=24,
        max_iters=max_iters, lr=3e-3, min_lr=3e-4, warmup_iters=15, lr_decay_iters=max_iters,
        eval_interval=max_iters, eval_iters=4, log_interval=10, ckpt_interval=max_iters,
        seed=1337, device="cpu",
    )
    train(train_cfg, copy_data)
    return load_trained(train_cfg.out_dir)[0]  # the final weights, in eval mode


@torch.no_grad()
def copy_scores(model):
    """(mean loss over the lengths, [accuracy at each segment length]) on the fixed batches."""
    losses, accs = [], []
    for batch in copy_eval:
        logits, loss = model(batch.idx, batch.targets)
        losses.append(loss.item())
        accs.append(accuracy(logits, batch))
    return sum(losses) / len(losses), accs


copy_models = {name: train_copy(name) for name in ("mha", "local", "linear")}
print("trained:", list(copy_models))

# %% tags=["nbval-ignore-output"]
copy_acc = {name: copy_scores(m)[1] for name, m in copy_models.items()}
print("segment length:  " + " ".join(f"{s:>5}" for s in segment_lengths))
for name, accs in copy_acc.items():
    print(f"{name:>14}:  " + " ".join(f"{a:>5.2f}" for a in accs))
reach = 2 * (variant_options("local", cfg)["window"] - 1)
inside = [a for s, a in zip(segment_lengths, copy_acc["local"], strict=True) if s <= reach]
outside = [a for s, a in zip(segment_lengths, copy_acc["local"], strict=True) if s > reach]
assert min(inside) > 0.9 and max(outside) < 0.1  # local: perfect within reach, nothing beyond
assert min(copy_acc["mha"]) > 0.5 and min(copy_acc["linear"]) > 0.3  # no window: all lengths

# %%
fig, ax = plt.subplots(figsize=(7, 3.8))
for name, accs in copy_acc.items():
    ax.plot(segment_lengths, accs, "o-", label=name)
ax.axvline(reach + 0.5, color="gray", ls="--", lw=1)
ax.text(reach + 0.7, 0.5, f"reach of local:\nL (w - 1) = {reach}", color="gray", fontsize=9)
ax.set_xticks(segment_lengths)
ax.set_xlabel("segment length S (the token to copy lies S positions back)")
ax.set_ylabel("copy accuracy")
ax.set_ylim(-0.03, 1.03)
ax.set_title("Copying after 300 steps: 2 layers, window 4 for local")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The boundary is where the arithmetic put it. Within reach, `local` copies almost perfectly.
# Beyond it, the token to copy is not among anything the last layer can read, and no amount of
# training helps: `local` scores what a guess among the 62 segment ids scores (the 64 ids less
# the filler and the separator). (Exercise 1 moves
# the boundary by changing the depth.) `mha` and `linear` have no window and learn every length
# in part, `linear` least at the long ones, in 300 steps.
#
# The same measurement does *not* show where linear attention pays. Copying 12 tokens through a
# state of $16 \times 16$ numbers per head may well be within its capacity (300 steps cannot tell a
# capacity limit from slow learning); recall with many pairs is not
# ([chapter 11](11_linear_attention.ipynb) measured the interference directly). That is a question
# for the longer runs, with more pairs than the presets' 4 (this chapter's runs have 2).
#
# ## 5. What the comparison says, variant by variant
#
# Collecting what this chapter's outputs show, the short runs and the committed full preset:
#
# | variant | cache per token (section 3) | what the short runs show | full preset, recall |
# | --- | --- | --- | --- |
# | `mha` | 1,024 B | the reference; learns every copy length | 1.000 (three seeds: 0.956 on average) |
# | `gqa` | 512 B (1/2) | recall not yet learned, like MHA; section 6 converts a trained model | 0.890 (three seeds: 0.962 on average) |
# | `mqa` | 256 B (1/4) | the same; section 6 shows what one shared head costs a trained model | 0.249 (learned with one seed of three) |
# | `mla` | 576 B (0.56) | the same; more parameters than MHA at this width | 1.000 |
# | `local` | constant (window) | blind on every answer beyond $L(w-1)$: recall and long copies | 0.086, only within reach |
# | `sparse` | 1,024 B (as MHA) | recall not yet learned; no faster than MHA at this length | 1.000 |
# | `linear` | constant (state) | no reach limit: learns every copy length in part; its capacity needs longer runs | 0.851, at every gap |
#
# The cache column is exact; the speeds in section 3 are this machine's; the accuracy claims of
# the short runs are the asserted ones, and the last column is seed 1337 of the full preset, with
# the averages of section 3's three seeds for `mha`, `gqa` and `mqa`. For the other variants one
# seed is all the repository has.

# %% [markdown]
# ## 6. Converting a trained MHA model: GQA and MLA
#
# Training every variant from scratch is one way to get a cheaper model. If a good MHA model
# exists already, it can be *converted* and then trained a little further — the GQA paper's
# "uptraining" (Ainslie et al., 2023), and the idea behind converting pretrained models to MLA.
# `attnbook.convert` has both conversions; both keep every weight outside attention and rebuild
# the attention weights from the MHA model's:
#
# - `mha_to_gqa(model, n_kv_head)`: each group of `n_head / n_kv_head` consecutive key heads is
#   replaced by one head whose projection is the *mean* of theirs (likewise for the values).
#   Because a key is linear in the input, the pooled head's key is the average of the group's
#   keys, for every input. [Chapter 4](04_mqa_gqa.ipynb) did this for one layer.
# - `mha_to_mla(model, kv_lora_rank)`: stack the key and value projections of a layer into one
#   matrix $W_{KV} = [W_K; W_V]$ of shape $(2d, d)$ — it maps the layer's input to all heads' keys
#   and values — and keep its best rank-$r$ approximation, a truncated SVD
#   $W_{KV} \approx U_r S_r V_r^\top$. Then `wkv_a` $= S_r^{1/2} V_r^\top$ maps the input to a
#   latent of $r$ numbers, the only thing cached, and `wkv_b` $= U_r S_r^{1/2}$ rebuilds the keys
#   and values from it. The latent has no RMSNorm (`mla_kv_norm=False`: the keys must stay linear
#   in the input), and the decoupled rotary part is set to zero. Three more details make the
#   full-rank conversion exact. The key bias is dropped: it adds the same number to all of a
#   query's scores, which softmax ignores. The value bias moves into `c_proj`'s bias: a query's
#   weights sum to one, so it reaches the output unchanged. And the queries are scaled by
#   $\sqrt{(d_\text{head} + d_\text{rope}) / d_\text{head}}$, so that MLA's softmax scale
#   $1/\sqrt{d_\text{head} + d_\text{rope}}$ acts as MHA's $1/\sqrt{d_\text{head}}$. The rotary
#   part gets 2 coordinates per token (`qk_rope_head_dim=2`, not the 8 of section 1): its
#   weights start at zero, so until fine-tuning uses them they only cost cache.
#
# A model worth converting must use its attention. The `mha` model that just learned to copy
# does: every answer is read from another position. We convert it, measure its copy loss and
# accuracy right after the conversion, and again after 60 further steps of training on the same
# task. The fair reference is the MHA model itself, trained for the same 60 extra steps.
#
# **Exact cases first.** With as many key/value heads as query heads nothing is pooled, and with
# $r = d$ the SVD keeps everything: both conversions must then compute the original function.

# %%
from attnbook.convert import mha_to_gqa, mha_to_mla

base = copy_models["mha"]
probe = copy_eval[-1].idx[:8]  # 8 sequences with segments of 12
with torch.no_grad():
    reference = base(probe)[0]
    same_gqa = mha_to_gqa(base, n_kv_head=4)(probe)[0]
    same_mla = mha_to_mla(base, kv_lora_rank=64)(probe)[0]
print("gqa, n_kv_head = n_head = 4, same logits (atol=1e-5):",
      torch.allclose(same_gqa, reference, atol=1e-5))
print("mla, kv_lora_rank = n_embd = 64, same logits (atol=2e-4, logits of size ~10):",
      torch.allclose(same_mla, reference, atol=2e-4))

# %% [markdown]
# A rank of 64 is exact and already a saving: the latent has 64 numbers (plus the 2 of the zero
# rotary key) where MHA caches 128 keys and values per token and layer. The stacked projection
# maps $d = 64$ numbers to 128, so its rank is at most 64: half of an MHA cache is always
# redundant, which is the observation MLA starts from. How much further can we go? The singular
# values of $W_{KV}$ tell how much each extra latent dimension is worth. We compare the trained
# model's with those of a freshly initialised one.

# %%
def kv_singular_values(model, layer):
    """Singular values of the stacked key and value projections (2d, d) of one block."""
    d = model.config.n_embd
    _, w_k, w_v = model.transformer.h[layer].attn.c_attn.weight.detach().split(d)
    return torch.linalg.svdvals(torch.cat([w_k, w_v]))


def rank_for(s, share):
    """How many singular values hold `share` of the squared norm."""
    energy = (s**2).cumsum(0) / (s**2).sum()
    return int((energy < share).sum()) + 1


torch.manual_seed(0)
fresh = GPT(base.config)
spectra = {(kind, layer): kv_singular_values(m, layer)
           for kind, m in (("trained", base), ("initialised", fresh)) for layer in (0, 1)}
print("singular values per layer:", len(spectra["trained", 0]))

# %% tags=["nbval-ignore-output"]
for (kind, layer), s in spectra.items():
    print(f"{kind:>11} layer {layer}: rank for 90% / 99% of the squared norm: "
          f"{rank_for(s, 0.9):>2} / {rank_for(s, 0.99):>2}")
for layer in (0, 1):  # training concentrates the projection in fewer directions
    assert rank_for(spectra["trained", layer], 0.9) < rank_for(spectra["initialised", layer], 0.9) - 10

# %% [markdown]
# Training concentrated the projections: the initialised matrices spread their norm over
# almost all 64 directions (90% of it needs more than 40), the trained layers hold 90% in about
# 20. That suggests the loss will survive a latent much smaller than 64, though not one of a
# handful of numbers. Now the conversions themselves, with the fine-tuning loop: plain
# AdamW at a constant learning rate of 1e-3, the same 60 batches for every model.

# %%
def fine_tune(model, steps=60, lr=1e-3):
    """Train a (converted) model further on the copy tasks; the same batches for every model."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = torch.Generator().manual_seed(7)
    for _ in range(steps):
        xb, yb = copy_data.get_batch("train", 24, 32, batches)
        _, loss = model(xb, yb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def cache_floats(model):
    """Numbers cached per token and layer."""
    layer_cache = model.new_caches(batch_size=1, max_len=32)[0]
    return layer_cache.nbytes // (4 * 32)


conversions = {"mha": lambda: load_trained(runs / "copy-mha-2")[0]}  # a fresh copy of base
conversions.update({f"gqa, n_kv_head={k}": (lambda k=k: mha_to_gqa(base, k)) for k in (2, 1)})
conversions.update({f"mla, rank {r}": (lambda r=r: mha_to_mla(base, r)) for r in (32, 16, 8, 4)})
table = {}
for label, make in tqdm(conversions.items(), desc="convert and fine-tune"):
    model = make()
    before = copy_scores(model)
    after = copy_scores(fine_tune(model))
    table[label] = dict(floats=cache_floats(model), converted=before, tuned=after)
print("converted and fine-tuned:", len(table), "models")

# %% tags=["nbval-ignore-output"]
base_loss, base_accs = copy_scores(base)
print(f"{'model':>16} {'cache/token/layer':>17} {'loss converted':>14} {'loss +60 steps':>14}   "
      f"accuracy by length 3/6/9/12: converted | +60 steps")
for label, row in table.items():
    (loss0, accs0), (loss1, accs1) = row["converted"], row["tuned"]
    accs = " | ".join(" ".join(f"{a:.2f}" for a in accs) for accs in (accs0, accs1))
    print(f"{label:>16} {row['floats']:>17} {loss0:>14.3f} {loss1:>14.3f}   {accs}")
print(f"trained MHA before any of it: loss {base_loss:.3f}")
t = {label: (row["converted"][0], row["tuned"][0]) for label, row in table.items()}
assert abs(t["mla, rank 32"][0] - base_loss) < 0.05  # rank 32: no visible loss
assert t["mla, rank 16"][0] < base_loss + 0.1  # rank 16: hardly any
assert t["mla, rank 4"][0] > base_loss + 1.0  # too small a latent breaks it
assert t["gqa, n_kv_head=2"][0] > base_loss + 0.3  # pooling pairs of heads hurts
assert t["gqa, n_kv_head=1"][0] > base_loss + 1.0  # one pooled head: copying breaks
assert t["mla, rank 16"][0] < t["gqa, n_kv_head=1"][0]  # 18 numbers by SVD beat 32 by pooling
for k in (2, 1):  # ... and 60 steps repair most of the damage pooling did
    assert t[f"gqa, n_kv_head={k}"][1] < t[f"gqa, n_kv_head={k}"][0] - 0.5

# %%
fig, ax = plt.subplots(figsize=(10, 4.2))
for kind, color in (("gqa", "C1"), ("mla", "C2")):
    labels = [label for label in table if label.startswith(kind)]
    xs = [table[label]["floats"] for label in labels]
    ax.plot(xs, [table[label]["converted"][0] for label in labels], "o--", color=color,
            mfc="white", label=f"{kind}: right after conversion")
    ax.plot(xs, [table[label]["tuned"][0] for label in labels], "o-", color=color,
            label=f"{kind}: after 60 more steps")
ax.axhline(base_loss, color="C0", ls=":", label="mha as trained")
ax.axhline(table["mha"]["tuned"][0], color="C0", label="mha after 60 more steps")
for label, row in table.items():
    if label != "mha":  # name each conversion next to its point
        ax.annotate(label.split(", ")[1], (row["floats"], row["converted"][0]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
ax.set_xscale("log", base=2)
ax.set_xticks([4, 8, 16, 32, 64, 128], ["4", "8", "16", "32", "64", "128"])
ax.set_yscale("log")
ax.set_yticks([0.25, 0.5, 1, 2, 4, 8], ["0.25", "0.5", "1", "2", "4", "8"])
ax.minorticks_off()
ax.set_xlabel("numbers cached per token and layer (MHA: 128)")
ax.set_ylabel("copy loss (answer positions)")
ax.set_title("Converting the trained copy model")
ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
fig.tight_layout()
plt.show()

# %% [markdown]
# What the conversion shows, at equal cache sizes:
#
# - **MLA by SVD** keeps the loss down to a latent of 16 (18 numbers per token with the rotary
#   pair, a seventh of MHA's cache): the dimensions it drops carry little of $W_{KV}$, as the
#   spectrum said. Below that the copy falls apart, and 60 steps cannot rebuild what a latent of
#   4 numbers cannot hold.
# - **GQA by pooling** is worse at the same size: one pooled key/value head (32 numbers) breaks
#   copying (right after the conversion most answers are wrong at every length), two (64 numbers)
#   damage it. Mean-pooling averages heads that learned different jobs, whereas the SVD chooses the
#   directions that matter, for all heads at once. (Exercise 3 asks whether a better choice of which
#   heads to pool helps.)
# - **A little training repairs a lot.** After 60 steps the pooled models have recovered most of
#   the way to the MHA model trained for the same 60 steps. That is the GQA paper's finding, at a
#   toy scale: a conversion is a good starting point, not a finished model.
#
# **Why not RoPE?** Our model has learned positions, added to the input, so every key is a fixed
# linear map (plus a bias) of the layer's input, and $W_{KV}$ is the whole story. With RoPE, each
# head's key is *rotated* by an angle that depends on its position: $k_n = R_n W_K x_n$. The cache
# would have to hold a latent $c_n$ from which all heads' rotated keys are a fixed linear map, $R_n
# W_K x_n = W_{UK} c_n$ for every position $n$, and since $R_n$ differs per position, no single
# $W_{UK}$ does that — one could only cache the rotated keys themselves, which is the MHA cache
# again. (It would also break MLA's absorption of $W_{UK}$ into the query,
# [chapter 13](13_latent_attention.ipynb), section 4.) DeepSeek-V2's answer is to keep positions out
# of the latent: keys get a few extra *decoupled* rotary coordinates, one rotated key shared by the
# heads, cached next to the latent ([chapter 13](13_latent_attention.ipynb)). A RoPE model's
# rotation cannot be moved into those coordinates without changing what the model computes, so
# published conversions keep part of it there and fine-tune. `mha_to_mla` refuses rather than return
# a model that quietly computes something else:

# %% tags=["raises-exception"]
rope_model = GPT(dataclasses.replace(base.config, positions="rope"))
mha_to_mla(rope_model, kv_lora_rank=16)

# %% [markdown]
# ## Check against the module
#
# Both conversions are a few lines of linear algebra; we redo them here and compare with the
# module's weights. GQA: the key rows of `c_attn` of each group of 2 heads averaged, likewise the
# values (weights and biases), the query rows unchanged. MLA: the SVD of each layer's stacked
# projection, with the rows in the module's order (per head, its 16 key rows then its 16 value
# rows); `wkv_b @ wkv_a` must be the rank-$r$ approximation $U_r S_r V_r^\top$ (a product does
# not depend on the SVD's arbitrary signs).

# %%
d, H, hd = base.config.n_embd, base.config.n_head, base.config.n_embd // base.config.n_head
gqa2, mla16 = mha_to_gqa(base, 2), mha_to_mla(base, 16)
checks = []
for i, block in enumerate(base.transformer.h):
    for kind in ("weight", "bias"):
        q, k, v = getattr(block.attn.c_attn, kind).detach().split(d)
        pooled = [t.reshape(2, 2, hd, -1).mean(1).reshape(2 * hd, -1).squeeze(-1) for t in (k, v)]
        mine = torch.cat([q, *pooled])  # (d + 2 * 2 * hd, ...) rows: q, pooled k, pooled v
        theirs = getattr(gqa2.transformer.h[i].attn.c_attn, kind).detach()
        checks.append(torch.allclose(mine, theirs, atol=1e-5))
    _, w_k, w_v = block.attn.c_attn.weight.detach().split(d)
    w_kv = torch.stack([w_k.view(H, hd, d), w_v.view(H, hd, d)], dim=1).reshape(2 * d, d)
    U, S, Vh = torch.linalg.svd(w_kv.double())
    best_rank16 = (U[:, :16] * S[:16]) @ Vh[:16]  # (2d, d)
    attn = mla16.transformer.h[i].attn
    product = attn.wkv_b.weight.double() @ attn.wkv_a.weight[:16].double()  # (2d, d)
    checks.append(torch.allclose(product, best_rank16, atol=1e-5))
    checks.append(bool(attn.wkv_a.weight[16:].eq(0).all()))  # the rotary rows start at zero
assert all(checks)
print(f"mha_to_gqa == pooled c_attn (atol=1e-5), mha_to_mla's wkv_b @ wkv_a == rank-16 SVD "
      f"(atol=1e-5), rotary part zero: {len(checks)} checks OK")

# %% [markdown]
# ## Summary
#
# - A fair comparison fixes the model shape, seed, batches, steps, optimiser and schedule, and
#   reports what cannot be fixed: each variant's options (chosen relative to the sequence length)
#   and its parameter count.
# - Multi-query associative recall asks a model to find an earlier token by content at any
#   distance: full attention does it from its cache, a window cannot see past
#   $L(w - 1)$ positions, and a fixed-size state must fold all pairs into a few numbers.
# - A short run shows the costs (cache per token, parameters) exactly, and the failures that
#   are structural — sliding-window attention answers nothing beyond its reach, as predicted. It
#   does not show which variant learns recall best: small models stay near chance on recall for
#   a long time first. The command's full preset (`attnbook compare --full`) is for that, and
#   its results are committed (`chapters/data/compare_full.csv`): after 8000 steps `mha`,
#   `mla`, `dsa`, `sparse` and both DeltaNets recalled every pair, `moba` 0.988, `gqa` 0.890 and
#   still learning, `linear` 0.851 at every gap, `mqa` a guess (0.249) and `local` only within
#   its reach. What a variant keeps per token did not decide it: the DeltaNets keep about 1% of
#   `mha`'s cache and recalled everything. When a variant leaves its loss plateau depends on the
#   seed: over three seeds `mha` averaged 0.956 and `gqa` 0.962, and `mqa` learned recall with one
#   seed of three, so learning speed needs several seeds per variant.
# - At 32 positions no variant is much faster than `mha`; their speed pays at thousands of
#   positions (chapters 9–11) and in memory-bound decoding.
# - A trained MHA model converts to MLA by a truncated SVD of its stacked key/value projection
#   (exact at rank $d$, nearly lossless at a quarter of it here) and to GQA by mean-pooling heads
#   (lossy at the same cache size); a short further training recovers most of the loss. RoPE models
#   cannot be converted to MLA exactly: a rotated key is not a fixed linear map of a latent.

# %% [markdown]
# ## Further reading
#
# - Arora et al., *Zoology: Measuring and Improving Recall in Efficient Language Models* (ICLR
#   2024): multi-query associative recall as a diagnostic.
# - Olsson et al., *In-context Learning and Induction Heads* (Transformer Circuits, 2022): the
#   induction task.
# - Tay et al., *Long Range Arena: A Benchmark for Efficient Transformers* (ICLR 2021): comparing
#   efficient attention under one protocol.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/18_comparing_variants_solutions.ipynb`](solutions/18_comparing_variants_solutions.ipynb).
#
# 1. **Move the boundary.** With the comparison's window of 4, how many layers does `local`
#    need to copy segments of 9 tokens? Predict from $L(w - 1)$ which of the lengths 3, 6, 9, 12
#    a 3-layer `local` model copies, then train it with `train_copy("local", n_layer=3)` and
#    check.
# 2. **Activation-aware SVD.** The SVD of `mha_to_mla` keeps the best rank-$r$ approximation of
#    the *weights*, as if every input direction mattered equally. But the inputs of a layer are
#    not isotropic: what matters is the error $\mathbb{E}\,\|(W_{KV} - \hat W) x\|^2$ over the
#    inputs $x$ the layer really sees. Show that with $C = \mathbb{E}[x x^\top]$ the best $\hat W$
#    is the rank-$r$ SVD of $W_{KV} C^{1/2}$, multiplied back by $C^{-1/2}$. Collect $C$ from a
#    batch, build the rank-8 conversion both ways, and compare the loss right after conversion.
# 3. **Which heads to pool.** `mha_to_gqa` pools consecutive heads (0 with 1, 2 with 3). With 4
#    heads and 2 groups there are 3 ways to pair them in each layer. Permuting heads does not
#    change an MHA model (check it), so you can try every pairing by permuting and then pooling.
#    Does the best pairing lose less than the default? Can you predict it without converting
#    and evaluating each pairing (for instance from how similar the heads' keys are)?
# 4. **The cache column by hand.** Derive every entry of the `cache B/token` column of
#    section 1 from the variants' options (for MLA, its default latent and rotary sizes; for
#    linear attention, [chapter 11](11_linear_attention.ipynb)'s state and normaliser). At what
#    sequence length does the linear state become smaller than MHA's cache? Check your formulas
#    against `cache_bytes_per_token` at several lengths.

# %%
workdir.cleanup()
