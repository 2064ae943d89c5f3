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
# # Chapter 19 — Loading GPT-2: solutions
#
# Worked solutions to the exercises of `chapters/19_loading_gpt2.ipynb`. Each one reasons first,
# then checks the claim with code and an `assert`.
#
# None of them needs GPT-2's real weights. Exercises 1, 2 and 4 use our own `GPT` with random
# weights drawn the way the chapter drew them (embeddings at 0.02, the blocks' matrices at 0.1,
# norm scales around one, small nonzero biases), at the chapter's size: 2 blocks of width 64 and
# GPT-2's vocabulary; exercise 3 needs only shapes. Exercise 4 uses `transformers` as the
# independent reference.

# %%
import dataclasses
import math
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from attnbook.gpt2 import gpt2_config, load_gpt2, save_gpt2, to_gqa
from attnbook.model import GPT

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="attnbook-ch19-solutions-")  # removed at the end
tmp = Path(workdir.name)

SMALL = dataclasses.replace(gpt2_config("gpt2"), n_layer=2, n_head=4, n_embd=64, block_size=128)


def random_gpt(config=SMALL, matrix_std=0.1, seed=0):
    """Our GPT (eval mode) with every parameter a seeded random draw, as in the chapter."""
    model = GPT(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied wte/lm_head matrix comes once
            noise = torch.randn(p.shape, generator=gen)
            if ".wte." in name or ".wpe." in name:
                p.copy_(0.02 * noise)
            elif p.ndim == 2:
                p.copy_(matrix_std * noise)
            elif ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


model = random_gpt()
idx = torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
print(f"{type(model).__name__}: {model.num_params(non_embedding=False):,} parameters, "
      f"mlp={model.config.mlp}")

# %% [markdown]
# ## Exercise 1 — The transpose that no shape check catches
#
# **Predictions.** `load_gpt2` checks three things before it copies anything: every tensor it
# expects is in the file, nothing else is, and each one has the shape it expects, *as stored*,
# that is `(in, out)` for the four `Conv1D` weights.
#
# - (a) Block 1's `mlp.c_fc.weight` maps 64 inputs to 256 outputs. GPT-2 stores it `(64, 256)`;
#   in `nn.Linear`'s layout it is `(256, 64)`. The shapes differ, so the loader refuses and
#   names the tensor with both shapes.
# - (b) `transformer.wpe.table.weight` is our name, not GPT-2's. The loader maps GPT-2's
#   `transformer.wpe.weight` onto our table; that name is now missing, and the one in the file
#   is unexpected. It names both.
# - (c) Block 0's `attn.c_proj.weight` maps 64 to 64: the matrix is square, so transposed or not
#   it has the shape `(64, 64)`. Nothing is missing, nothing unexpected, no shape is wrong: it
#   loads, and the model computes something else.
#
# We write each doctored checkpoint next to the good one, which `save_gpt2` produced.

# %%
good_folder = save_gpt2(model, tmp / "good")
good = load_file(good_folder / "model.safetensors")


def doctored(label, tensors):
    """A checkpoint folder with the good config.json and ``tensors``."""
    folder = tmp / label
    folder.mkdir()
    (folder / "config.json").write_text((good_folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


a = dict(good)
a["transformer.h.1.mlp.c_fc.weight"] = good["transformer.h.1.mlp.c_fc.weight"].T  # Linear layout
b = dict(good)
b["transformer.wpe.table.weight"] = b.pop("transformer.wpe.weight")  # our name
c = dict(good)
c["transformer.h.0.attn.c_proj.weight"] = good["transformer.h.0.attn.c_proj.weight"].T

outcomes = {}
for label, tensors in (("a", a), ("b", b), ("c", c)):
    try:
        loaded = load_gpt2(doctored(label, tensors))
        outcomes[label] = loaded
        print(f"({label}) loads without complaint")
    except ValueError as err:
        outcomes[label] = str(err)
        print(f"({label}) ValueError: {err}")
assert "wrong shapes ['transformer.h.1.mlp.c_fc.weight (256, 64) (expected (64, 256))']" \
    in outcomes["a"]
assert "missing ['transformer.wpe.weight'], unexpected ['transformer.wpe.table.weight']" \
    in outcomes["b"]
assert isinstance(outcomes["c"], GPT)

# %% [markdown]
# All three as predicted. How far does (c) move the model? Loading a file whose square matrix
# is stored the wrong way round is exactly what a loader that *forgot* to transpose that
# matrix would do with the right file, so the question is also: how visible is that bug?

# %%
change = (logits_of(outcomes["c"], idx) - logits_of(model, idx)).abs().max().item()
same_top = (logits_of(outcomes["c"], idx).argmax(-1) == logits_of(model, idx).argmax(-1))
print(f"largest change of a logit: {change:.2f}; same most likely token at "
      f"{same_top.float().mean().item():.0%} of the positions")
assert change > 0.1

# %% [markdown]
# A logit moves by more than one, far beyond any rounding error, and the most likely next token
# changes at every position. Only a comparison of *outputs* with an independent reference
# sees it: the chapter's section 2, which runs `transformers` on the same file and asserts the
# logits agree to 1e-5. Two checks that look reasonable would not:
#
# - Shapes, as we just saw.
# - A round trip through our own code, `save_gpt2` then `load_gpt2`. If both forgot to
#   transpose the square matrix, the two mistakes cancel, the round trip returns every tensor
#   unchanged, and the test passes while both files and models are wrong for everyone else.
#   A round trip checks that two functions are inverse to each other, not that either is right.
#
# ## Exercise 2 — GELU, exact or tanh
#
# $\text{GELU}(x) = x\,\Phi(x)$, with $\Phi$ the standard normal distribution function. GPT-2
# replaces $\Phi(x)$ by $\tfrac12\left(1 + \tanh\left(\sqrt{2/\pi}\,(x + 0.044715\,x^3)\right)\right)$,
# which was cheaper to compute. Both are exact at 0 and for large $|x|$ (where both $\Phi$ and
# the approximation reach 0 or 1), so the difference lives in between. It is even in $x$: the
# approximation, like $\Phi$, satisfies $f(-x) = 1 - f(x)$.

# %%
x = torch.linspace(-8, 8, 160_001, dtype=torch.float64)
gap = (F.gelu(x) - F.gelu(x, approximate="tanh")).abs()
worst = x[gap.argmax()].abs().item()
print(f"largest |GELU - tanh GELU| = {gap.max().item():.2e}, at |x| = {worst:.2f}")
for value in (0.05, 0.1, 0.2, 0.4, 1.36, 1.88, 2.7, 5.0):
    t = torch.tensor([value], dtype=torch.float64)
    diff = (F.gelu(t) - F.gelu(t, approximate="tanh")).abs().item()
    print(f"  |x| = {value:>4}: {diff:.1e}")
assert 4e-4 < gap.max().item() < 5e-4 and 2.5 < worst < 3.0

# %% [markdown]
# At most $4.7 \times 10^{-4}$, near $|x| = 2.7$. In between there is a smaller bump near
# $|x| = 1.36$ and a zero near $1.88$, where the two curves cross (the picture below shows the
# whole shape). Close to zero the difference is tiny and grows like $3.3 \times 10^{-4}\, x^4$:
# each doubling of a small $x$ multiplies it by 16, because the approximation matches $\Phi$'s
# first two terms exactly and its cubic term almost.
#
# **Prediction for the model.** An MLP's 256 hidden values each move by at most $5 \times
# 10^{-4}$, usually much less; `c_proj` sums 256 such small changes into the residual stream,
# and the final LayerNorm and the head turn them into logit changes: something like $10^{-4}$,
# depending on how large the pre-activations (the inputs of GELU) are. With the chapter's
# matrices at 0.1, a normalised input of 64 numbers gives pre-activations with a standard
# deviation of about $0.1 \sqrt{64} = 0.8$: well into the range where the two differ. At GPT-2's
# initial 0.02 they are five times smaller, around 0.16, where a typical difference is below
# $10^{-6}$, so the logits should move far less.
#
# We run each model twice: as loaded (`mlp="gelu_tanh"`) and with the same weights in a model
# built with `mlp="gelu"`, the model a loader would build if it mapped `gelu_new` to the exact
# GELU. We also record the standard deviation of the first block's pre-activations, and compare
# the greedy tokens. The logit changes are differences of nearly equal float32 numbers, so their
# last digits depend on the machine: the book's tests do not compare this cell's output, and the
# cell asserts the claims instead.

# %% tags=["nbval-ignore-output"]
def exact_gelu_twin(model):
    """The same weights in a GPT whose MLPs use the exact GELU."""
    twin = GPT(dataclasses.replace(model.config, mlp="gelu")).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def preactivation_std(model, idx):
    seen = []
    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o))
    logits_of(model, idx)
    hook.remove()
    return seen[0].std().item()


gelu_change = {}
for std in (0.1, 0.02):
    tanh_model = random_gpt(matrix_std=std)
    exact_model = exact_gelu_twin(tanh_model)
    gelu_change[std] = (logits_of(exact_model, idx) - logits_of(tanh_model, idx)).abs().max().item()
    prompt = idx[:1, :8]
    same_tokens = torch.equal(tanh_model.generate(prompt, 32, temperature=0),
                              exact_model.generate(prompt, 32, temperature=0))
    print(f"matrices at {std}: pre-activation std {preactivation_std(tanh_model, idx):.2f}, "
          f"largest logit change {gelu_change[std]:.1e}, "
          f"detected at 1e-5: {gelu_change[std] > 1e-5}, same 32 greedy tokens: {same_tokens}")
    assert same_tokens
assert gelu_change[0.1] > 1e-4  # ten times the tolerance
assert 1e-5 < gelu_change[0.02] < gelu_change[0.1] / 5  # barely above it

# %% [markdown]
# **Answers.** With a model drawn like the chapter's, the wrong GELU moves the logits by
# $1.6 \times 10^{-4}$, sixteen times the tolerance: the logit comparison of section 2 would catch it. Greedy
# generation would not: a change of $10^{-4}$ rarely reorders the two most likely tokens, and
# here it never does in 32 steps. At GPT-2's initial scale the change shrinks more than tenfold,
# to just above $10^{-5}$ (it shrinks less than the prediction suggested: the residual stream of
# that model is small, and the final LayerNorm scales every change in it up). The check of section 2 would
# still catch the wrong GELU, by a margin of less than two; a tolerance of $10^{-4}$, which
# sounds strict, would let it through. A test can only see what its inputs exercise, which is
# one of the reasons the chapter draws the blocks' matrices larger than GPT-2's initialisation
# does. The picture shows where each model's pre-activations fall on the difference curve.

# %%
fig, ax = plt.subplots(figsize=(8, 4.2))
ax.semilogy(x[::100], gap[::100].clamp_min(1e-12), color="C3",
            label="|GELU(x) - tanh GELU(x)|")
for std, color in ((0.1, "C0"), (0.02, "C2")):
    spread = 2 * preactivation_std(random_gpt(matrix_std=std), idx)
    ax.axvspan(-spread, spread, color=color, alpha=0.2,
               label=f"pre-activations, ±2 std (matrices at {std})")
ax.set_xlim(-6, 6)
ax.set_ylim(1e-9, 1e-3)
ax.set_xlabel("x")
ax.set_ylabel("difference")
ax.set_title("Exact GELU against GPT-2's tanh approximation")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Exercise 3 — The KV cache of GPT-2 small
#
# **By hand.** Each layer caches, for every token, a key and a value vector per key/value head,
# each of `head_dim = 768 / 12 = 64` numbers, 4 bytes each in float32:
#
# $$\text{bytes per token} = n_\text{layer} \times 2 \times n_\text{kv} \times 64 \times 4
# = 6{,}144 \, n_\text{kv}.$$
#
# - MHA, $n_\text{kv} = 12$: 73,728 bytes per token, 75,497,472 bytes (72 MiB) for 1,024 tokens.
# - GQA with 4 key/value heads: a third of that, 25,165,824 bytes (24 MiB).
# - MQA, one key/value head: a twelfth, 6,291,456 bytes (6 MiB).
#
# The weights: 124,439,808 parameters × 4 bytes = 497,759,232 bytes (475 MiB). A cache of
# 1,024 tokens outweighs them from $\lceil 497.8 / 75.5 \rceil = 7$ sequences with MHA, 20 with
# GQA-4 and 80 with MQA.
#
# **Check.** `to_gqa(model, k)` gives a model whose configuration says `attention="gqa"` with
# `n_kv_head=k`. We build GPT-2 small in each configuration on the `meta` device (shapes, no
# memory, no weights to load) and ask its `new_caches` for one sequence of 1,024 positions: on
# `meta` the cache tensors have sizes but take no memory either.

# %%
expected = {12: 75_497_472, 4: 25_165_824, 1: 6_291_456}
with torch.device("meta"):
    gpt2_small = GPT(gpt2_config("gpt2"))
weight_bytes = gpt2_small.num_params(non_embedding=False) * 4
print(f"weights: {weight_bytes:,} bytes")
for k, hand in expected.items():
    cfg = dataclasses.replace(gpt2_config("gpt2"), attention="gqa", attention_options={"n_kv_head": k})
    with torch.device("meta"):
        sized = GPT(cfg)
    cache = sum(c.nbytes for c in sized.new_caches(batch_size=1, max_len=1024))
    sequences = math.ceil(weight_bytes / cache)
    print(f"{k:>2} K/V heads: {cache:>11,} bytes for 1,024 tokens (by hand {hand:,}); "
          f"outweighs the weights from {sequences} sequences")
    assert cache == hand
assert gpt2_config("gpt2").n_head == 12 and weight_bytes == 497_759_232

# %% [markdown]
# Exactly as computed. The multi-head cache of seven full-length sequences is as large as the
# model; a server that batches many long requests spends more memory on caches than on weights,
# and that memory, not the arithmetic, limits how many requests it serves at once. This is the
# saving that GQA buys, and why section 4 of the chapter asks what it costs.
#
# ## Exercise 4 — Exporting a GQA model
#
# **Idea.** In a GQA model with groups of `g = n_head / n_kv_head` query heads, query head `h`
# reads key/value head `h // g`. A multi-head model in which heads `h` of the same group have
# *identical* key and value projections computes exactly the same thing: its heads' keys and
# values are copies. So we copy each shared key head's rows of `c_attn` (and its bias) `g`
# times, in order, and the same for the values; the query rows and every other weight stay.
# The result is an ordinary multi-head GPT, which `save_gpt2` accepts and `transformers` reads.
#
# The fused `c_attn` of the GQA model holds the query rows (`n_embd`), then the key rows, then
# the value rows (`n_kv_head × head_dim` each), each block head by head.

# %%
def gqa_to_mha(model):
    """A multi-head GPT computing what the GQA ``model`` computes: shared K/V heads copied."""
    cfg = model.config
    H, d = cfg.n_head, cfg.n_embd
    n_kv, hd = cfg.attention_options["n_kv_head"], d // cfg.n_head
    group = H // n_kv

    def expand(t):  # (d + 2 * n_kv * hd, ...) -> (3 * d, ...)
        q, k, v = t.split([d, n_kv * hd, n_kv * hd])
        k, v = (x.view(n_kv, hd, *x.shape[1:]).repeat_interleave(group, dim=0).reshape(d, *x.shape[1:])
                for x in (k, v))  # head j's rows, once for each query head of its group
        return torch.cat([q, k, v])

    state = {name: expand(t) if ".attn.c_attn." in name else t
             for name, t in model.state_dict().items()}
    mha = GPT(dataclasses.replace(cfg, attention="mha", attention_options={})).eval()
    mha.load_state_dict(state)
    return mha


gqa = to_gqa(model, 2)
mha = gqa_to_mha(gqa)
same = torch.allclose(logits_of(mha, idx), logits_of(gqa, idx), atol=1e-5)
print("GQA (2 K/V heads) -> MHA (4 heads): logits within 1e-5:", same)
assert same

# %% [markdown]
# Now the export. `transformers` is imported here only, as the independent reader of the file.

# %%
with warnings.catch_warnings():  # transformers imports tqdm.auto, which warns in a notebook
    warnings.simplefilter("ignore")  # without ipywidgets
    import transformers
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

folder = save_gpt2(mha, tmp / "gqa-as-gpt2")
hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
with torch.no_grad():
    same = torch.allclose(hf(idx).logits, logits_of(gqa, idx), atol=1e-5)
print("transformers' GPT-2 from the exported folder == our GQA model (atol=1e-5):", same)
assert same

extra = mha.num_params() - gqa.num_params()
cache_gqa = sum(c.bytes_per_token for c in gqa.new_caches(1))
cache_mha = sum(c.bytes_per_token for c in mha.new_caches(1))
print(f"parameters: GQA {gqa.num_params():,}, exported {mha.num_params():,} (+{extra:,})")
print(f"KV cache per token: GQA {cache_gqa:,} bytes, exported model {cache_mha:,} bytes")
per_layer = 2 * (64 - 2 * 16) * (64 + 1)  # the copied key and value rows, weights and biases
assert extra == SMALL.n_layer * per_layer and cache_mha == 2 * cache_gqa

# %% [markdown]
# **The cost.** The export is exact but gives back what GQA saved. Each layer stores its key and
# value rows again for every head of a group: $2 \times (64 - 32) \times (64 + 1) = 4{,}160$
# parameters per layer here (weights and biases), 8,320 in all. And the model `transformers`
# runs is multi-head: it caches a key and a value per *query* head, twice the GQA cache, even
# though the copies are identical. The export is a way to share the model with tools that only
# know GPT-2, not a way to run it cheaply: that needs an architecture with a key/value head
# count of its own (in `transformers`, models such as Llama have `num_key_value_heads`). One
# more consequence: fine-tuning the exported model would let the copied heads drift apart, and
# the result would no longer be a GQA model at all.

# %%
workdir.cleanup()
print("temporary checkpoints deleted:", not tmp.exists())
