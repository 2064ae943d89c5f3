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
# # Chapter 19 — Loading GPT-2
#
# [Chapter 17](17_training_a_gpt.ipynb) built a GPT with GPT-2's layout and gave its parts GPT-2's
# names; [chapter 16](16_tokenization.ipynb) rebuilt GPT-2's tokenizer from its two files. One step
# is left before our code can run the model OpenAI trained: putting GPT-2's published weights into
# our `GPT`.
#
# The weights take half a gigabyte for the smallest GPT-2, and this book never assumes a network
# (the tokenizer files of section 3 come from the caches that [chapter 16](16_tokenization.ipynb)
# filled). So the chapter verifies everything on a model that needs no download: a GPT-2 with random
# weights, built and saved by Hugging Face `transformers`, the library everyone uses to run GPT-2.
# If our model, given the same tensors, computes the same logits and generates the same tokens as
# `transformers` does, the code is right, whatever numbers the tensors hold; real weights then only
# change the numbers. Section 5 uses the real weights when they are on the machine, and says how to
# get them.
#
# **Learning goals**
#
# - Read a Hugging Face GPT-2 checkpoint tensor by tensor and map each one onto our `GPT`: which
#   tensors are copied, which are transposed (GPT-2's `Conv1D` layers), which renamed (`wpe`),
#   which are absent (the tied `lm_head`) and which are not weights at all (old `attn.bias` masks).
# - Count the parameters of GPT-2's four sizes from their configurations, and see where they sit.
# - Load a checkpoint with `attnbook.gpt2.load_gpt2`, check the logits against `transformers` to
#   1e-5 and greedy generation with our KV cache against theirs, and export back with `save_gpt2`.
# - Go from text to ids to the model and back, with `tiktoken`'s GPT-2 encoding and with our own
#   `minbpe` tokenizer (the same ids).
# - Convert GPT-2 to grouped-query attention with `to_gqa`, and measure what pooling key/value
#   heads saves in cache memory and costs in predictions (and, with real weights, in perplexity)
#   before any fine-tuning.
# - Measure *perplexity*, the exponential of the mean loss per token (roughly: among how many
#   tokens the model hesitates, on average), on TinyShakespeare: for a freshly initialised
#   model here, and with GPT-2's real weights when they are on the machine, which also
#   generate text.

# %% [markdown]
# ## Setup
#
# `transformers` is an optional dependency of the book (`pip install "attnbook[hf]"`; the
# development install has it). We switch off its progress bars and its informational messages,
# which would otherwise clutter the outputs. Checkpoints are written to a temporary folder that
# the notebook deletes at the end.
#
# Random weights come from seeded generators, so every printed number is reproducible; the few
# that depend on the machine's float arithmetic are in cells the book's tests do not compare,
# and those cells assert their claims instead.

# %%
import copy
import json
import math
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file

with warnings.catch_warnings():  # transformers imports tqdm.auto, which warns in a notebook
    warnings.simplefilter("ignore")  # without ipywidgets: harmless, and not worth an output
    import transformers

from attnbook.gpt2 import (
    EOT,
    SIZES,
    config_from_hf,
    find_gpt2,
    gpt2_config,
    load_gpt2,
    load_state,
    save_gpt2,
    to_gqa,
)
from attnbook.model import GPT

transformers.utils.logging.disable_progress_bar()  # no progress bars in the outputs
transformers.utils.logging.set_verbosity_error()  # only errors, no notices
torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="attnbook-ch19-")  # removed at the end
tmp = Path(workdir.name)

# %% [markdown]
# ## 1. GPT-2's tensors, and ours
#
# ### A GPT-2 with random weights
#
# `transformers.GPT2LMHeadModel` is Hugging Face's GPT-2 with its language-model head. We build
# one from a `GPT2Config` with GPT-2's vocabulary and GPT-2's code, but only 2 blocks of width
# 64 with 4 heads and a context of 128 positions (GPT-2 small: 12 blocks of width 768, 12 heads,
# 1,024 positions): the same tensors, names and code paths, at a size that
# builds and runs in a fraction of a second.
#
# `transformers` initialises the model as GPT-2 was: matrices at 0.02 (the residual projections
# `c_proj` at $0.02/\sqrt{2 n_\text{layer}}$, as in [chapter 17](17_training_a_gpt.ipynb)), biases
# at zero, norm scales at one. We then overwrite *every* parameter from our own seeded generator,
# for three reasons:
#
# - A bias of zero or a norm scale of one looks the same wherever it is loaded: if a loader put
#   `ln_1`'s scale into `ln_2`, a freshly initialised model could not tell. Random biases and
#   scales make every tensor distinct.
# - A test is only as sharp as the model it runs. At GPT-2's starting scale, a two-block model
#   barely reads its input: the blocks add little to the residual stream, every position
#   predicts nearly the same token, and greedy generation soon repeats one token. Such a
#   model would pass a generation test even with broken positions. So the matrices inside the
#   blocks are drawn at 0.1, five times GPT-2's 0.02, which makes each block's output depend
#   strongly on its input (the embeddings stay at 0.02).
# - Our draws do not depend on the version of `transformers` or on the order in which it
#   initialises its layers.
#
# GPT-2's configuration names `<|endoftext|>` (id 50256) as the token that ends a generation;
# we set it to `None`, so that `transformers` always generates the number of tokens we ask for.

# %%
def random_gpt2(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, seed=0):
    """A transformers GPT2LMHeadModel in eval mode whose every parameter is a seeded random draw."""
    config = transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
        vocab_size=vocab_size, bos_token_id=None, eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied wte/lm_head matrix comes once
            noise = torch.randn(p.shape, generator=gen)
            if ".wte." in name or ".wpe." in name:
                p.copy_(0.02 * noise)  # token and position embeddings: GPT-2's scale
            elif p.ndim == 2:
                p.copy_(0.1 * noise)  # the blocks' matrices: five times GPT-2's scale
            elif ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)  # norm scales: around one
            else:
                p.copy_(0.02 * noise)  # biases and norm shifts: small, but not zero
    return model


hf = random_gpt2()
print(type(hf).__name__, "| blocks:", hf.config.n_layer, "| heads:", hf.config.n_head,
      "| width:", hf.config.n_embd, "| vocabulary:", hf.config.vocab_size)
print(f"parameters: {sum(p.numel() for p in hf.parameters()):,}")

# %% [markdown]
# Most of the 3.3 million parameters are the token embeddings, $50{,}257 \times 64$: with a
# width this small, the vocabulary dominates.
#
# ### The checkpoint on disk
#
# `save_pretrained` writes the files of a GPT-2 repository on the Hugging Face hub, three of them:
# `config.json` (the sizes and switches), `model.safetensors` (the tensors) and
# `generation_config.json` (default settings for `generate`, which we do not need). A safetensors
# file is a small JSON header of names, dtypes and shapes followed by the raw numbers; `load_file`
# reads it into a dict of tensors, without running any code from the file, unlike a pickled `.bin`,
# which can run code when loaded; `load_gpt2` reads those with `torch.load(..., weights_only=True)`.

# %%
folder = tmp / "random-gpt2"
hf.save_pretrained(folder)
print("files:", sorted(p.name for p in folder.iterdir()))
hf_config = json.loads((folder / "config.json").read_text())
print({key: hf_config[key] for key in ("n_layer", "n_head", "n_embd", "n_positions",
                                        "activation_function", "tie_word_embeddings")})
tensors = load_file(folder / "model.safetensors")  # name -> tensor, as stored
print(len(tensors), "tensors in model.safetensors")

# %% [markdown]
# ### The mapping, tensor by tensor
#
# The file holds 28 tensors: `wte`, `wpe`, 12 for each of the 2 blocks (two LayerNorms and four
# projections, each with a weight and a bias) and `ln_f`'s 2, so $2 + 2 \times 12 + 2 = 28$. Our
# `GPT` was written with GPT-2's names, so most tensors go straight across. There are three
# differences:
#
# 1. **Transposed.** The four projections of each block (`attn.c_attn`, `attn.c_proj`,
#    `mlp.c_fc`, `mlp.c_proj`) are `Conv1D` layers in GPT-2, which store their weight as
#    `(in, out)`. Our `nn.Linear` stores `(out, in)`. Same numbers, transposed (explained
#    below).
# 2. **Renamed.** Our learned positions live in [chapter 6](06_positions.ipynb)'s
#    `PositionalEmbedding`, which keeps its table one level down: `transformer.wpe.table.weight` for
#    GPT-2's `transformer.wpe.weight`.
# 3. **Not stored.** `lm_head.weight` is tied to the token embeddings `transformer.wte.weight`
#    ([chapter 17](17_training_a_gpt.ipynb)): one matrix with two names, so the file stores it once,
#    under `wte`.
#
# The diagram below draws the whole mapping for GPT-2 small (the `"gpt2"` of section 5): width
# 768, 12 blocks, 1,024 positions, 50,257 token ids, in the layout `save_pretrained` writes
# today (GPT-2's own files on the hub are in an older one, with shorter names and 12 extra
# tensors; `load_gpt2` reads both, as shown further down). The code that draws it is long and
# teaches nothing about GPT-2: skip to the figure. Its middle column names `to_ours`, the
# function in the code cell after the figure that does the mapping for one tensor. On the left, the
# tensors of `model.safetensors` under Hugging Face's names, with the shapes the file stores; on
# the right, the tensors of our `GPT` under our names, with the shapes it expects; between them,
# an arrow coloured by what happens on the way.

# %%
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

HF_COLOR, OURS_COLOR = "#dbe8f6", "#fde6cc"  # fill: the checkpoint's tensors, ours
ACTION_COLOR = {"copy": "dimgrey", "rename": "C0", "transpose": "C3", "tied": "C2"}
LEFT, RIGHT, BOX_W, BOX_H = 2.4, 9.7, 4.5, 0.5  # column centres, size of a box


def box(ax, x, y, name, shape, color, dashed=False):
    """A box centred at (x, y): a tensor's name (monospace) above its shape."""
    ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                boxstyle="round,pad=0.03", facecolor=color,
                                edgecolor="grey" if dashed else "black", lw=0.8,
                                linestyle="--" if dashed else "-"))
    ax.text(x, y + 0.1, name, ha="center", va="center", fontsize=9, family="monospace")
    ax.text(x, y - 0.12, shape, ha="center", va="center", fontsize=8.5)


def arrow(ax, y, action, label, note=""):
    """A horizontal arrow from the checkpoint's box to ours at height y, coloured by action,
    with its label above and an optional note below."""
    start, end = (LEFT + BOX_W / 2 + 0.08, y), (RIGHT - BOX_W / 2 - 0.08, y)
    color = ACTION_COLOR[action]
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.4,
                                 color=color))
    mid = (start[0] + end[0]) / 2
    ax.text(mid, y + 0.06, label, ha="center", va="bottom", fontsize=9, color=color,
            fontweight="bold" if action != "copy" else "normal")
    if note:
        ax.text(mid, y - 0.06, note, ha="center", va="top", fontsize=8, color=color,
                style="italic")


def row(ax, y, hf_name, hf_shape, our_name, our_shape, action, label, note=""):
    """One tensor of the checkpoint (left), its place in our GPT (right), the arrow between."""
    box(ax, LEFT, y, hf_name, hf_shape, HF_COLOR)
    box(ax, RIGHT, y, our_name, our_shape, OURS_COLOR)
    arrow(ax, y, action, label, note)


fig, ax = plt.subplots(figsize=(12.8, 8.9))
fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
ax.set(xlim=(0, 12.8), ylim=(0, 8.9))
ax.axis("off")
MID = (LEFT + RIGHT) / 2
ax.text(MID, 8.6, "GPT-2 small as save_pretrained writes it, tensor by tensor, into our GPT",
        ha="center", fontsize=12, fontweight="bold")
ax.text(LEFT, 8.0, "model.safetensors (Hugging Face's names)\nshape as stored", ha="center",
        fontsize=9.5, fontweight="bold")
ax.text(MID, 8.0, "to_ours(name, tensor)\nreturns the action", ha="center", fontsize=9.5,
        family="monospace")
ax.text(RIGHT, 8.0, "GPT(config).state_dict() (our names)\nshape after to_ours", ha="center",
        fontsize=9.5, fontweight="bold")

# Embeddings: 50257 token ids and 1024 positions, each a vector of width 768.
row(ax, 7.45, "transformer.wte.weight", "(50257, 768)",  # (vocab_size, n_embd)
    "transformer.wte.weight", "(50257, 768)", "copy", "copy")
row(ax, 6.79, "transformer.wpe.weight", "(1024, 768)",  # (n_positions, n_embd)
    "transformer.wpe.table.weight", "(1024, 768)", "rename", "rename",
    "PositionalEmbedding's table, one level down")

# One block, transformer.h.<i>, repeated 12 times: the four Conv1D weights are transposed.
ys = [5.7 - 0.66 * k for k in range(6)]  # its six rows, top to bottom
ax.add_patch(Rectangle((0.05, ys[-1] - 0.65), 12.0, ys[0] - ys[-1] + 1.2, fill=False,
                       linestyle="--", edgecolor="grey"))
ax.text(MID, ys[0] + 0.4, "block <i>, for i = 0 … 11 (n_layer = 12)", ha="center",
        va="center", fontsize=9, color="dimgrey", style="italic")
row(ax, ys[0], "transformer.h.<i>.ln_1.weight, .bias", "(768,) each",  # (n_embd,)
    "transformer.h.<i>.ln_1.weight, .bias", "(768,) each", "copy", "copy")
row(ax, ys[1], "transformer.h.<i>.attn.c_attn.weight",  # (in, out) = (768, 3 * 768)
    r"Conv1D, stored (in, out): $(768,\ 3 \times 768)$",
    "transformer.h.<i>.attn.c_attn.weight", r"nn.Linear, (out, in): $(3 \times 768,\ 768)$",
    "transpose", "transpose (Conv1D → Linear)", "q, k and v side by side")
row(ax, ys[2], "transformer.h.<i>.attn.c_proj.weight", "Conv1D: (768, 768)",  # square
    "transformer.h.<i>.attn.c_proj.weight", "nn.Linear: (768, 768)",
    "transpose", "transpose (Conv1D → Linear)", "square: the same shape either way")
row(ax, ys[3], "transformer.h.<i>.ln_2.weight, .bias", "(768,) each",  # (n_embd,)
    "transformer.h.<i>.ln_2.weight, .bias", "(768,) each", "copy", "copy")
row(ax, ys[4], "transformer.h.<i>.mlp.c_fc.weight",  # (in, out) = (768, 4 * 768)
    r"Conv1D: $(768,\ 4 \times 768)$",
    "transformer.h.<i>.mlp.c_fc.weight", r"nn.Linear: $(4 \times 768,\ 768)$",
    "transpose", "transpose (Conv1D → Linear)")
row(ax, ys[5], "transformer.h.<i>.mlp.c_proj.weight",  # (in, out) = (4 * 768, 768)
    r"Conv1D: $(4 \times 768,\ 768)$",
    "transformer.h.<i>.mlp.c_proj.weight", r"nn.Linear: $(768,\ 4 \times 768)$",
    "transpose", "transpose (Conv1D → Linear)")
ax.text(MID, ys[5] - 0.47, "and each projection's .bias, as long as its output "
        r"($3 \times 768$, $768$, $4 \times 768$, $768$): copy", ha="center", va="center",
        fontsize=8.5, color="dimgrey")

# After the blocks: the final LayerNorm, and the head, which the file does not store.
row(ax, 1.3, "transformer.ln_f.weight, .bias", "(768,) each",  # (n_embd,)
    "transformer.ln_f.weight, .bias", "(768,) each", "copy", "copy")
box(ax, LEFT, 0.6, "(not in the file)", "lm_head is tied to wte", "white", dashed=True)
box(ax, RIGHT, 0.6, "lm_head.weight", "(50257, 768)", OURS_COLOR)  # (vocab_size, n_embd)
edge = RIGHT + BOX_W / 2 + 0.05  # the right edge of our column
ax.add_patch(FancyArrowPatch((edge, 7.45), (edge, 0.6), connectionstyle="arc3,rad=-0.12",
                             arrowstyle="-|>",
                             mutation_scale=14, lw=1.4, color=ACTION_COLOR["tied"]))
ax.text(12.6, 4.0, "tied to wte: one matrix, two names", rotation=-90, ha="center",
        va="center", fontsize=9, color=ACTION_COLOR["tied"], fontweight="bold")
plt.show()

# %% [markdown]
# Look at the red arrows first: the four `Conv1D`
# weights of every block arrive as `(in, out)` and leave as `(out, in)`, so `attn.c_attn.weight`,
# $768 \times (3 \times 768)$ with the queries, keys and values side by side, becomes
# $(3 \times 768) \times 768$, and the MLP's two matrices swap their 768 and $4 \times 768$
# likewise. `attn.c_proj.weight` is square, $768 \times 768$ before and after: remember it when
# we check shapes below. The blue arrow changes a name and nothing else. On the right edge, the
# green arc: `lm_head.weight` has no tensor on the left to come from, because it *is* our `wte`
# matrix under a second name. Everything grey (the LayerNorms' scales and shifts, and all the
# biases) is copied as it is. The dashed frame is one block: the same rows for `h.0` to `h.11`.
#
# In code, every arrow is one line of the function below. The red ones are its `CONV1D`
# branch, which returns `tensor.T` and `"transpose"`; the blue one is the `transformer.wpe.`
# branch, `"rename"`; every grey one falls through to `"copy"`. The green arc is not in
# `to_ours` at all, because the file has no tensor to map: the table that the next cell prints
# adds it by hand in its last line, `tied to wte`. Our random checkpoint has the same rows with
# smaller numbers: 64 for 768 (so `c_attn` is $64 \times 192$ and `c_fc` $64 \times 256$) and
# 128 positions.
#
# The function below is the whole plan, one tensor at a time; the printed table applies it to every
# tensor of the file, listing the first block only (the second is the same with `h.1`).
# `config_from_hf` turns `config.json` into our `GPTConfig`, which builds a model with the
# shapes to compare against.

# %%
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_ours(name, tensor):
    """(our name, our tensor, what was done) for one tensor of a GPT-2 checkpoint."""
    if name.endswith(CONV1D):  # str.endswith accepts a tuple: any of the four
        return name, tensor.T, "transpose"  # Conv1D (in, out) -> Linear (out, in)
    if name.startswith("transformer.wpe."):
        return name.replace("transformer.wpe.", "transformer.wpe.table."), tensor, "rename"
    return name, tensor, "copy"


config = config_from_hf(hf_config)
ours_shapes = {name: t.shape for name, t in GPT(config).state_dict().items()}
print(f"{'checkpoint tensor':<35} {'stored':>11}   {'our tensor':<35} {'ours':>11}  action")
for name in [n for n in hf.state_dict() if n in tensors]:  # the model's order
    new_name, new, action = to_ours(name, tensors[name])
    assert new.shape == ours_shapes[new_name], name
    if ".h.1." not in name:
        print(f"{name:<35} {str(tuple(tensors[name].shape)):>11}   {new_name:<35} "
              f"{str(tuple(new.shape)):>11}  {action}")
print(f"{'(not in the file)':<35} {'':>11}   {'lm_head.weight':<35} "
      f"{str(tuple(ours_shapes['lm_head.weight'])):>11}  tied to wte")
mapped = {to_ours(n, t)[0] for n, t in tensors.items()} | {"lm_head.weight"}
print("every one of our tensors is covered, and nothing else:", mapped == set(ours_shapes))

# %% [markdown]
# Every tensor has a place and the right shape once transposed, and together they cover our
# model exactly. Note what the shape check *cannot* see: `attn.c_proj.weight` is square,
# `(64, 64)`, so it has the same shape transposed or not. A loader that forgot to transpose it
# would raise no error and compute something else (Exercise 1). That is why we do not stop at
# shapes, and compare the logits with `transformers` in section 2.
#
# ### Why "Conv1D", and why transposed
#
# OpenAI wrote GPT-2 in TensorFlow, and its projections were 1-D convolutions with a kernel of
# width 1: at every position of the sequence, the same `(in, out)` matrix multiplies that
# position's vector. A convolution of width 1 is a linear layer applied at every position, so
# the name is historical; what matters is the layout, `x @ W + b` with `W` of shape `(in, out)`.
# PyTorch's `nn.Linear` stores one row per *output* and computes `x @ W.T + b`. Copying GPT-2's
# `W` into a `Linear` therefore means storing `W.T`. One layer, both ways:

# %%
conv = hf.transformer.h[0].attn.c_attn  # q, k and v of block 0: 64 -> 192
linear = torch.nn.Linear(64, 192)
with torch.no_grad():
    linear.weight.copy_(conv.weight.T)  # (192, 64): one row per output
    linear.bias.copy_(conv.bias)
x = torch.randn(3, 64)
print(f"{type(conv).__name__}: weight {tuple(conv.weight.shape)}, computes x @ W + b")
print(f"nn.Linear: weight {tuple(linear.weight.shape)}, computes x @ W.T + b")
with torch.no_grad():
    print("same outputs:", torch.allclose(conv(x), linear(x), atol=1e-5))

# %% [markdown]
# ### The tied head, and the masks that older checkpoints store
#
# `transformers` ties `lm_head` to `wte` when it builds the model, exactly as our `GPT` does; the
# file has no `lm_head.weight`, and neither model needs one.
#
# Older checkpoints hold more than weights, and GPT-2's own files on the hub are older
# checkpoints: its `pytorch_model.bin`, and the `model.safetensors` converted from it, store
# their names without the `transformer.` prefix (`wte.weight`, `h.0.attn.c_attn.weight`), and,
# for every block, tensors that are not parameters: `h.<i>.attn.bias`, the lower-triangular
# causal mask of `n_positions × n_positions` ones and zeros, and, in files saved by later
# versions of `transformers`, `h.<i>.attn.masked_bias`, the large negative number that was
# written into masked scores. Old versions of `transformers` registered them as *persistent
# buffers*: tensors of the module that are not parameters (no gradient, not trained) but that
# `state_dict` saves with the weights. For GPT-2 small the 12 masks of $1024 \times 1024$ float32
# numbers are 50 MB of its 548 MB `model.safetensors`. Current versions
# build the mask on the fly and skip these entries when loading, and so does `load_state`, the
# function inside `load_gpt2` that takes a dict of tensors: it drops the two mask buffers and
# adds the missing prefix. We rewrite our checkpoint in that old layout, load it, and check that
# every weight landed where `to_ours` puts it, bit for bit.

# %%
print("lm_head.weight in the file:", "lm_head.weight" in tensors,
      "| tied in transformers:", hf.lm_head.weight is hf.transformer.wte.weight)
n = hf_config["n_positions"]
old_layout = {name.removeprefix("transformer."): t for name, t in tensors.items()}
for i in range(hf_config["n_layer"]):
    old_layout[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    old_layout[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
print(len(old_layout), "tensors in the old layout, e.g.", sorted(old_layout)[:3])
from_old = load_state(GPT(config), old_layout).eval()
loaded_old = from_old.state_dict()
for name, t in tensors.items():  # each weight of the file, mapped as in to_ours
    new_name, new, _ = to_ours(name, t)
    assert torch.equal(loaded_old[new_name], new), name
MASKS = (".attn.bias", ".attn.masked_bias")  # not ".attn.c_attn.bias": that one is a weight
masks = [name for name in old_layout if name.endswith(MASKS)]
assert not any(name.endswith(MASKS) for name in loaded_old)  # our model has no such entries
print(f"{len(tensors)} weights loaded, each equal to the file's (transposed where Conv1D); "
      f"{len(masks)} mask entries ignored")
print("lm_head tied in our model:", from_old.lm_head.weight is from_old.transformer.wte.weight)

# %% [markdown]
# ### The four sizes of GPT-2
#
# GPT-2 was published in four sizes that differ only in depth, width and number of heads;
# `gpt2_config(name)` returns each one as a `GPTConfig` (vocabulary 50,257, context 1,024,
# GELU's tanh approximation, tied head). We build each model on PyTorch's `meta` device, which
# gives tensors their shapes but no memory and no values, so even the 1.5-billion-parameter one
# costs nothing, and count. (The GPT-2 paper's table says 117M, 345M, 762M and 1542M; OpenAI
# later corrected those counts to the ones below, the names the models go by today.)

# %%
PUBLISHED = {"gpt2": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558}  # millions


def part_of(name):
    """Which part of a GPT-2 a parameter belongs to."""
    for key, part in (("wte", "token embeddings"), ("wpe", "position embeddings"),
                      (".attn.", "attention"), (".mlp.", "MLP"), ("ln_", "LayerNorms")):
        if key in name:
            return part
    raise ValueError(name)


parts = {}
print(f"{'name':<12} {'n_layer':>7} {'n_head':>6} {'n_embd':>6} {'parameters':>14} {'published':>9}")
for name in SIZES:
    cfg = gpt2_config(name)
    with torch.device("meta"):
        sized = GPT(cfg)
    total = sized.num_params(non_embedding=False)  # wpe included, the tied matrix once
    parts[name] = {}
    for pname, p in sized.named_parameters():
        parts[name][part_of(pname)] = parts[name].get(part_of(pname), 0) + p.numel()
    print(f"{name:<12} {cfg.n_layer:>7} {cfg.n_head:>6} {cfg.n_embd:>6} {total:>14,} "
          f"{PUBLISHED[name]:>8}M")
    assert round(total / 1e6) == PUBLISHED[name]
    assert sum(parts[name].values()) == total

# %%
fig, ax = plt.subplots(figsize=(9, 3.2))
names = list(SIZES)
labels = [f"{n} ({PUBLISHED[n]}M)" for n in names]
left = [0.0] * len(names)
for i, part in enumerate(["token embeddings", "position embeddings", "attention", "MLP",
                          "LayerNorms"]):
    shares = [100 * parts[n].get(part, 0) / sum(parts[n].values()) for n in names]
    ax.barh(labels, shares, left=left, color=f"C{i}", label=part)
    left = [a + b for a, b in zip(left, shares, strict=True)]
ax.invert_yaxis()
ax.set_xlim(0, 100)
ax.set_xlabel("share of the parameters (%)")
ax.set_title("Where GPT-2's parameters are")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5, frameon=False)
fig.tight_layout()
plt.show()

# %%
for name in SIZES:
    share = {part: 100 * count / sum(parts[name].values()) for part, count in parts[name].items()}
    print(f"{name:<12} token embeddings {share['token embeddings']:4.1f}%, positions "
          f"{share['position embeddings']:.1f}%, attention + MLP "
          f"{share['attention'] + share['MLP']:4.1f}%, LayerNorms {share['LayerNorms']:.2f}%")
    assert share["LayerNorms"] < 0.1
mlp_share = {n: parts[n]["MLP"] / (parts[n]["MLP"] + parts[n]["attention"]) for n in SIZES}
assert {round(100 * share, 1) for share in mlp_share.values()} == {66.7}
print("in every size, the MLP holds 66.7% of the blocks' attention + MLP parameters")

# %% [markdown]
# A block holds $12 d^2 + 13 d$ parameters ([chapter 17](17_training_a_gpt.ipynb)), two thirds of
# them in the MLP, so the blocks grow with the square of the width and linearly with the depth,
# while the token embeddings, $50{,}257 \times d$, grow only linearly with the width. In GPT-2 small
# the embeddings are almost a third of the model; in GPT-2 XL, 5%. The LayerNorms, two vectors of
# width $d$ per norm, hold less than 0.1% in every size: too thin to see in the chart.
#
# ## 2. Loading, and checking against `transformers`
#
# `load_gpt2(source)` does everything above: it reads `config.json` into a `GPTConfig`
# (refusing a configuration our model does not compute, such as a different LayerNorm epsilon),
# reads `model.safetensors` (or an old `pytorch_model.bin`, with `weights_only=True`), maps the
# tensors, checks that none is missing, unexpected or misshapen, and returns the model in eval
# mode. `source` is a folder, or a name on the Hugging Face hub (`"gpt2"`), which it downloads
# once (section 5).

# %%
model = load_gpt2(folder)
print(type(model).__name__, "| eval mode:", not model.training, "| mlp:", model.config.mlp,
      "| attention:", model.config.attention, "| positions:", model.config.positions)
print("lm_head tied to wte:", model.lm_head.weight is model.transformer.wte.weight)

# %% [markdown]
# **Logits.** Both models read the same two sequences of 24 random token ids, and we compare
# the $2 \times 24 \times 50{,}257$ logits. They need not be *exactly* equal: the two codes make
# different calls (`nn.Linear` against `Conv1D`'s `addmm`, different attention code), which add
# the same numbers in different orders, and float32 rounds each sum differently, around the 7th
# significant digit. The cell also prints the logits' spread and their largest size, the
# yardstick for every change of a logit in this chapter. The exact difference depends on the
# machine, so this cell's output is not compared by the book's tests; it asserts the bound
# instead.

# %% tags=["nbval-ignore-output"]
idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(idx)[0]  # (2, 24, 50257)
    logits_hf = hf(idx).logits  # (2, 24, 50257)
diff = (logits - logits_hf).abs().max().item()
print("logits:", tuple(logits.shape), "| largest |ours - transformers|:", f"{diff:.1e}")
print(f"logits' std {logits.std().item():.2f}, largest |logit| {logits.abs().max().item():.2f}")
assert diff < 1e-5

# %% [markdown]
# The two models differ by a few $10^{-7}$ here, on logits whose largest is 0.81: a few parts in
# ten million, where float32, which keeps about 7 significant digits, rounds. A change that matters
# is of another order: section 4's conversions move logits by more than their std, 0.16.

# %% [markdown]
# **Generation.** One forward pass of a whole sequence does not exercise our KV cache: the
# prefill, then one token at a time, each new position reading the cached keys and values of
# the earlier ones and its own position embedding at the right offset. Greedy decoding (always
# the most likely token) is deterministic, so our `generate` and `transformers`' `generate`,
# each with its own cache, must produce the same 32 tokens from the same 8-token prompt.

# %%
prompt = idx[:1, :8]  # (1, 8)
# GPT-2 has no padding token and generate warns without one; nothing is padded, any id will do
theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                     do_sample=False, use_cache=True, pad_token_id=0)
ours = model.generate(prompt, 32, temperature=0)  # temperature 0: greedy, with the KV cache
print("ours:", tuple(ours.shape), "| transformers:", tuple(theirs.shape))
print("the same 32 new tokens:", torch.equal(ours, theirs))
print("first 10 new ids:", ours[0, 8:18].tolist())
assert torch.equal(ours, theirs)

# %% [markdown]
# The new ids fall into a loose cycle: 29762 comes back every third token. It is followed by 30654
# twice, but 30654 is followed once by 40755 and once by 25590, and the third 29762 by 22734: the
# same last token, different next choices. Each choice depends on where the token sits and on
# what came before, not on the last token alone. That is what the matrices at 0.1 of
# section 1 buy. A cache that gave each new token a wrong position would change these ids, so the
# comparison with `transformers` would catch it. We check it with a broken copy of our model whose
# position table ignores the cache's offset (every decoded token is embedded as if it stood at
# position 0), once as loaded and once with the blocks' matrices scaled by 0.2, down to GPT-2's
# 0.02:

# %%
class NoOffset(torch.nn.Module):
    """A position table with the bug: it ignores `start`, the number of tokens already cached."""

    def __init__(self, wpe):
        super().__init__()
        self.wpe = wpe

    def forward(self, T, start=0):
        return self.wpe(T, 0)  # (T, n_embd): positions 0..T-1 wherever the tokens are


for std in (0.1, 0.02):
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for p in sharp.transformer.h.parameters():
            if p.ndim == 2:
                p.mul_(std / 0.1)  # the blocks' matrices, drawn at 0.1, now at std
    good = sharp.generate(prompt, 32, temperature=0)[0, 8:]  # (32,)
    sharp.transformer.wpe = NoOffset(sharp.transformer.wpe)
    broken = sharp.generate(prompt, 32, temperature=0)[0, 8:]  # (32,)
    changed = int((good != broken).sum())
    print(f"blocks' matrices at {std}: distinct new ids {len(set(good.tolist()))}, "
          f"ids changed by the offset bug: {changed} of 32")
    assert changed > 16 if std == 0.1 else changed == 0

# %% [markdown]
# At 0.1 the bug changes almost every generated id; at GPT-2's initial 0.02 the model repeats a
# single token whatever its positions, and the same bug goes unnoticed. Exercise 2 asks the same
# question of another bug, a GELU of the wrong kind, at both scales.

# %% [markdown]
# **Exporting.** `save_gpt2` writes our model the other way round: `config.json` and
# `model.safetensors`, the four projections transposed back to `Conv1D`'s layout, `wpe`
# renamed, `lm_head` left out because it is tied. `transformers` loads the folder like any GPT-2
# and must compute what the original did. (A model GPT-2's code cannot represent, such as one
# with RoPE, RMSNorm or grouped-query attention, is refused with a `ValueError`: section 4
# shows one.)

# %%
exported = save_gpt2(model, tmp / "exported")
print("files:", sorted(p.name for p in exported.iterdir()))
back = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
with torch.no_grad():
    same = torch.allclose(back(idx).logits, logits_hf, atol=1e-5)
print("transformers reloads our export, logits within 1e-5 of the original:", same)
assert same

# %% [markdown]
# ## 3. Text in, text out
#
# The model reads ids. GPT-2's ids come from its byte-level BPE tokenizer: OpenAI's `tiktoken`
# ships it as the `"gpt2"` encoding, and [chapter 16](16_tokenization.ipynb) rebuilt it from GPT-2's
# two files (`vocab.bpe`, `encoder.json`) as `minbpe.GPT2Tokenizer`.
# (`attnbook.data.get_encoding("gpt2")` wraps the first one, for the book's data pipeline.) They
# must agree id for id, on anything: plain English, Shakespeare's punctuation and line breaks, runs
# of spaces, digits, accents, other scripts and emoji.

# %%
import tiktoken

from minbpe import GPT2Tokenizer

tk = tiktoken.get_encoding("gpt2")  # files from tiktoken's cache
mb = GPT2Tokenizer()  # the same files, through attnbook's download cache
texts = [
    "Hello world",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "    indented = 12345 + 678  # digits",
    "naïve café, Ελληνικά, 東京 🤖",
]
for text in texts:
    a, b = tk.encode_ordinary(text), mb.encode(text)
    assert a == b
    print(f"{len(a):>2} tokens, same ids: {a == b}  {a[:10]}{' ...' if len(a) > 10 else ''}")
pieces = [repr(tk.decode([i]))[1:-1] for i in tk.encode_ordinary(texts[1])]  # "\n" as \n
print("pieces:", "|".join(pieces))

# %% [markdown]
# Now the whole path: a prompt becomes ids, our model extends them greedily by 16 tokens, and
# both tokenizers turn the new ids back into text. The weights are random, so the model has no
# idea what English is: expect a string of unrelated word pieces. The point is that every stage
# fits the next: the model outputs one logit for each of the tokenizer's 50,257 ids.

# %%
assert tk.n_vocab == mb.n_vocab == model.config.vocab_size == 50257
prompt_text = "ROMEO:\nBut, soft! what light"
prompt_ids = torch.tensor([tk.encode_ordinary(prompt_text)])  # (1, T)
out = model.generate(prompt_ids, 16, temperature=0)  # (1, T + 16)
new_ids = out[0, prompt_ids.shape[1]:].tolist()
print("prompt:", prompt_ids.shape[1], "tokens; new ids:", new_ids)
print("decoded:", repr(tk.decode(new_ids)))
print("minbpe decodes the same text:", mb.decode(new_ids) == tk.decode(new_ids))
assert mb.decode(new_ids) == tk.decode(new_ids)

# %% [markdown]
# ## 4. From multi-head to grouped-query attention
#
# [Chapter 4](04_mqa_gqa.ipynb) introduced grouped-query attention: the query heads keep their own
# projections, but groups of them share one key head and one value head, so the KV cache shrinks by
# the size of the group. `to_gqa(model, n_kv_head)` is [chapter 18](18_comparing_variants.ipynb)'s
# `attnbook.convert.mha_to_gqa`: it converts a trained multi-head model by mean pooling, as in the
# GQA paper (Ainslie et al., 2023): the new key projection of a group is the average of the key
# projections of its heads, and likewise for the values; every other weight is copied. With
# `n_kv_head = n_head` nothing is averaged and the model must be unchanged. With fewer heads, the
# heads of a group now look at the same keys and read the same values, so the outputs change.
#
# We measure the change on our random model, on the 48 positions of section 2: the largest
# change of a logit, and how often the most likely next token stays the same. The cache is read
# from the model itself, `new_caches`, as bytes per cached token, summed over the layers.

# %%
with torch.no_grad():
    base = model(idx)[0]  # (2, 24, 50257)
mha_cache = sum(c.bytes_per_token for c in model.new_caches(1))
print(f"{'model':>10} {'cache bytes/token':>17} {'max |change of a logit|':>23} "
      f"{'same top token':>14}")
print(f"{'MHA':>10} {mha_cache:>17,}")
for k in (4, 2, 1):
    converted = to_gqa(model, k)
    with torch.no_grad():
        changed = converted(idx)[0]
    cache = sum(c.bytes_per_token for c in converted.new_caches(1))
    change = (changed - base).abs().max().item()
    top = (changed.argmax(-1) == base.argmax(-1)).float().mean().item()
    print(f"{f'to_gqa, {k}':>10} {cache:>17,} {change:>23.2f} {100 * top:>13.0f}%")
    assert cache == mha_cache * k // 4
    if k == 4:
        assert torch.allclose(changed, base, atol=1e-5)  # nothing pooled: the same model
    else:
        assert change > 0.1

# %% [markdown]
# Keeping all 4 key/value heads reproduces the model, and its cache is MHA's. Each halving of the
# key/value heads halves the cache: 1,024 bytes per token become 512, then 256 (2 layers × keys and
# values × heads × 16 numbers, the head size 64 / 4, × 4 bytes). And the predictions change
# completely: the largest change of a logit, 0.87 and 0.94, exceeds the largest logit of the
# original model (0.81, section 2) and is more than five times the logits' std (0.16), and the most
# likely next token is a different one at every one of the 48 positions (0% the same). That is what
# averaging does to *unrelated* heads: the random key projections of two heads have nothing in
# common, and their mean is a projection unlike either. How much a trained model loses depends on
# how alike the heads of a group have become in training; heads that learnt different jobs lose them
# when forced to share keys and values. That is why the GQA paper continues training ("uptraining")
# after pooling, and why a converted model is meant to be fine-tuned briefly ([chapter
# 18](18_comparing_variants.ipynb)). Section 5 measures the cost on GPT-2 itself, when its weights
# are available.
#
# A GQA model is no longer a GPT-2 that `transformers`' `GPT2LMHeadModel` can hold, and
# `save_gpt2` says so rather than writing a checkpoint that would load wrongly. (Exercise 4
# finds a way to export it anyway.)

# %%
try:
    save_gpt2(to_gqa(model, 2), tmp / "gqa")
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 5. Perplexity, and GPT-2's real weights
#
# **Perplexity.** A language model's loss is the mean negative log-probability it gives to each
# actual next token; its exponential, the *perplexity*, is the number of equally likely choices
# that would be as uncertain. A model that spreads its probability evenly over GPT-2's 50,257
# tokens has loss $\ln 50{,}257$ and perplexity exactly 50,257; a perfect model, perplexity 1.
# We take TinyShakespeare's last tenth (the validation text of
# [chapter 17](17_training_a_gpt.ipynb), from the book's data cache), encode it with GPT-2's
# tokenizer, and score 8 windows of 256 tokens in one batch, 2,048 predictions.
#
# First the yardstick, which needs no download: our `GPT` at GPT-2's initialisation
# ([chapter 17](17_training_a_gpt.ipynb): matrices drawn at 0.02, the residual projections
# smaller), with GPT-2's vocabulary, 2 blocks of width 64 like section 1's model and a context
# of 256. It has learnt nothing, and its logits are small, so it should score close to the
# uniform guess.

# %%
from attnbook.data import load_text

shakespeare = load_text("tinyshakespeare")
val_ids = torch.tensor(tk.encode_ordinary(shakespeare[int(0.9 * len(shakespeare)):]))
windows = val_ids[: 8 * 256 + 1]
xs, ys = windows[:-1].view(8, 256), windows[1:].view(8, 256)  # (8, 256): inputs, next tokens
print(f"validation text: {len(val_ids):,} tokens; scored: {xs.numel():,} predictions")

torch.manual_seed(0)
fresh = GPT(replace(gpt2_config("gpt2"), n_layer=2, n_head=4, n_embd=64, block_size=256)).eval()
with torch.no_grad():
    fresh_loss = fresh(xs, ys)[1].item()  # mean cross-entropy over the 2,048 predictions
print(f"uniform guess:  loss {math.log(50257):.3f}, perplexity 50,257")
print(f"untrained GPT:  loss {fresh_loss:.3f}, perplexity about "
      f"{round(math.exp(fresh_loss), -2):,.0f}")
assert 40_000 < math.exp(fresh_loss) < 60_000

# %% [markdown]
# The untrained model scores about 50,600, slightly worse than the uniform guess: its logits are
# small but not all equal, and uneven guesses that know nothing cost a little more, on average,
# than even ones. The loss of one prediction is $\text{logsumexp}(z) - z_\text{target}$, and
# $\text{logsumexp}(z) \ge \ln V + \text{mean}(z)$ (the log of a mean of exponentials is at least
# the mean of the exponents), so logits unrelated to the target can only add to $\ln V$. Any
# model that has learnt something scores far below.
#
# **GPT-2's real weights.** With OpenAI's weights the same code writes English. The book never
# downloads them on its own: `find_gpt2()` looks for a copy already on this machine and returns
# its folder, or `None`. It looks, in order, at
#
# 1. the folder named by the environment variable `ATTNBOOK_GPT2_DIR`, which must hold
#    `config.json` and `model.safetensors` (or `pytorch_model.bin`);
# 2. the Hugging Face cache, where anything downloaded with `huggingface_hub` or `transformers`
#    lands (the repository `gpt2`, also known as `openai-community/gpt2`).
#
# To get the weights (about 550 MB for GPT-2 small), with a network, either
#
# - call `load_gpt2("gpt2")` once: it downloads `config.json` and `model.safetensors` into the
#   Hugging Face cache, where `find_gpt2()` finds them from then on. It downloads them at a
#   pinned commit of the hub repository (`attnbook.gpt2.REVISIONS`), so a later change there
#   cannot change the weights this chapter starts from; or
# - download the two files into a folder of your choice, with the command-line tool that comes
#   with `huggingface_hub`: `hf download gpt2 config.json model.safetensors --local-dir gpt2`
#   (older versions call it `huggingface-cli download`), and point the variable at it before
#   starting Jupyter: `export ATTNBOOK_GPT2_DIR=$PWD/gpt2`.
#
# What you will then see below: the prompt continued in something that reads like English (GPT-2
# small is no poet, and its Shakespeare drifts), and a perplexity on the same 2,048 predictions
# in the tens or low hundreds, against the untrained model's 50,600. The conversions to
# grouped-query attention (section 4) raise it; how much, as the key/value heads get fewer, is
# what the last cell measures. Without the weights, as on the book's test machines, each of the
# three cells below prints what it would have shown and which assert guards its claim, and does
# nothing else. With them, their outputs differ from machine to machine, so the book's tests do
# not compare them.

# %% tags=["nbval-ignore-output"]
gpt2_dir = find_gpt2()  # a local folder, or None; never downloads
if gpt2_dir is None:
    print("No GPT-2 weights on this machine: the cells of this section are skipped. With them,\n"
          "this cell prints the model's sizes: n_layer=12, n_head=12, n_embd=768, 124,439,808 "
          "parameters for GPT-2 small.")
else:
    gpt2 = load_gpt2(gpt2_dir)
    print(f"Found GPT-2 weights: n_layer={gpt2.config.n_layer}, n_head={gpt2.config.n_head}, "
          f"n_embd={gpt2.config.n_embd}, {gpt2.num_params(non_embedding=False):,} parameters")

# %% [markdown]
# Sampling rather than greedy decoding: greedy decoding makes GPT-2 loop on the same phrase after
# a few lines. We sample at temperature 0.8 among the 40 most likely tokens
# ([chapter 17](17_training_a_gpt.ipynb)), and stop early if the model ends its document with
# `<|endoftext|>` (`EOT`, id 50256).

# %% tags=["nbval-ignore-output"]
if gpt2_dir is None:
    print("Skipped: no GPT-2 weights. With them, this cell prints the prompt followed by up to 60\n"
          "sampled tokens of English-looking text (nothing is asserted: text is judged by eye).")
else:
    prompt_ids = torch.tensor([tk.encode_ordinary(prompt_text)])
    out = gpt2.generate(prompt_ids, 60, temperature=0.8, top_k=40, stop_token=EOT,
                        generator=torch.Generator().manual_seed(0))
    print(tk.decode(out[0].tolist()))

# %% [markdown]
# Then the perplexity of GPT-2 on the windows scored above, for the original model and for
# `to_gqa(gpt2, k)` with fewer key/value heads per layer: 6, 4 and 1 for GPT-2 small's 12 heads.
# None of them is fine-tuned.

# %% tags=["nbval-ignore-output"]
if gpt2_dir is None:
    print("Skipped: no GPT-2 weights. With them, this cell prints the perplexity and the KV cache\n"
          "per token of MHA (12 K/V heads), GQA (6 and 4) and MQA (1), draws them as bars, and\n"
          "asserts that MHA scores below 500 and that every pooled model scores above MHA.")
else:
    H = gpt2.config.n_head
    kv_heads = sorted({k for k in (H, H // 2, H // 3, 1) if H % k == 0}, reverse=True)
    ppl = {}
    for k in kv_heads:
        m = gpt2 if k == H else to_gqa(gpt2, k)
        with torch.no_grad():
            ppl[k] = math.exp(m(xs, ys)[1].item())
        cache = sum(c.bytes_per_token for c in m.new_caches(1))
        label = "MHA" if k == H else "MQA" if k == 1 else "GQA"
        print(f"{label} {k:>2} K/V heads: perplexity {ppl[k]:9.1f}, KV cache {cache:,} bytes/token")
    assert ppl[H] < 500  # real weights: an untrained model scores about 50,000
    assert all(ppl[k] > ppl[H] for k in kv_heads if k != H)  # pooling costs without fine-tuning

    fig, ax = plt.subplots(figsize=(6, 3))
    ticks = [f"{k}\n(MHA)" if k == H else f"{k}\n(MQA)" if k == 1 else str(k) for k in kv_heads]
    bars = ax.bar(ticks, [ppl[k] for k in kv_heads], color="C0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_yscale("log")
    ax.margins(y=0.2)  # room for the labels
    ax.set_xlabel("key/value heads per layer (no fine-tuning)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("GPT-2 on TinyShakespeare's validation text")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Check against the module
#
# Section 1 wrote the mapping as `to_ours`: transpose the four `Conv1D` weights, rename `wpe`,
# copy the rest, and let the tie supply `lm_head`. We apply it by hand to every tensor of the
# checkpoint, copying into a freshly built `GPT`, and compare with what `load_gpt2` produced:
# every tensor must be equal, bit for bit, and the logits too (same tensors, same code). Our
# model's state dict has 29 tensors: the file's 28 plus `lm_head.weight`, which is `wte` under a
# second name. Block 0 is also checked on its own, against `transformers`' block 0, on the same
# input.

# %%
by_hand = GPT(config).eval()  # random weights, about to be overwritten
state = by_hand.state_dict()  # tensors that share memory with the model's parameters
with torch.no_grad():
    for name, t in tensors.items():
        new_name, new, _ = to_ours(name, t)
        state[new_name].copy_(new)
loaded = model.state_dict()
assert all(torch.equal(state[k], loaded[k]) for k in loaded)
with torch.no_grad():
    assert torch.equal(by_hand(idx)[0], model(idx)[0])
    h = torch.randn(2, 24, 64)
    block_ours = by_hand.transformer.h[0](h)
    block_hf = hf.transformer.h[0](h)
    block_hf = block_hf[0] if isinstance(block_hf, tuple) else block_hf
    assert torch.allclose(block_ours, block_hf, atol=1e-5)
print(f"by hand == load_gpt2: all {len(loaded)} tensors equal, logits identical; "
      "block 0 == transformers' block 0 (atol=1e-5): OK")

# %%
workdir.cleanup()  # delete this chapter's checkpoints
print("temporary checkpoints deleted:", not tmp.exists())

# %% [markdown]
# ## Summary
#
# - A Hugging Face GPT-2 checkpoint is `config.json` plus `model.safetensors`. Its tensors have
#   our names, except that the four projections of each block are `Conv1D` weights stored
#   `(in, out)` and must be transposed for `nn.Linear`, the position table is one level deeper
#   in our model (`wpe.table`), `lm_head` is tied to `wte` and not stored, and old checkpoints
#   add the `transformer.`-less names and the causal masks `attn.bias`, which are not weights.
# - GPT-2's four sizes have 124M, 355M, 774M and 1558M parameters; the token embeddings are a
#   third of the smallest and a twentieth of the largest.
# - `load_gpt2` reads a folder (or the hub, once), `save_gpt2` writes one that `transformers`
#   loads; on a random GPT-2 built by `transformers` our logits agree to 1e-5 and greedy
#   generation with our KV cache gives the same tokens. Shape checks alone would not catch a
#   forgotten transpose of a square matrix: comparing outputs with a reference does.
# - `tiktoken`'s `"gpt2"` encoding and `minbpe.GPT2Tokenizer` give the same ids; text goes in
#   and comes out through either.
# - Perplexity is the exponential of the mean loss per token: 50,257 for a uniform guess over
#   GPT-2's tokens, about 50,600 for an untrained model on TinyShakespeare. `find_gpt2()` finds
#   real weights on the machine without downloading; with them, GPT-2 writes English, and its
#   perplexity on the same text can be measured.
# - `to_gqa` pools key/value heads: the cache shrinks in proportion, and without fine-tuning the
#   model's predictions change.

# %% [markdown]
# ## Further reading
#
# - Radford et al., *Language Models are Unsupervised Multitask Learners* (2019): GPT-2's
#   architecture and sizes.
# - Wolf et al., *Transformers: State-of-the-Art Natural Language Processing* (EMNLP 2020): the
#   library whose checkpoints this chapter reads and writes.
# - Ainslie et al. (2023), GQA: converting multi-head checkpoints by mean pooling.

# %% [markdown]
# ## Exercises
#
# Worked solutions are in
# [`solutions/19_loading_gpt2_solutions.ipynb`](solutions/19_loading_gpt2_solutions.ipynb). None of
# them needs GPT-2's real weights.
#
# 1. **The transpose that no shape check catches.** Take a checkpoint written by `save_gpt2` and
#    doctor it three ways, one at a time: (a) store block 1's `mlp.c_fc.weight` in `nn.Linear`'s
#    layout, without the transpose; (b) store the position table under our name,
#    `transformer.wpe.table.weight`; (c) store block 0's `attn.c_proj.weight` without the
#    transpose. Before running `load_gpt2` on each, predict what it does: which tensors does the
#    error name, or does it load? For the one that loads, how much do the logits move, and what
#    test would have caught it?
# 2. **GELU, exact or tanh.** GPT-2 computes GELU with its tanh approximation (`gelu_new` in
#    `config.json`, `mlp="gelu_tanh"` here); PyTorch's default GELU is exact. Where on the real
#    line do the two differ most, and by how much? Predict, then measure, how much the logits of
#    a random model drawn like this chapter's change when it is run with the exact GELU instead.
#    Would the 1e-5 comparison of section 2 notice a loader that picked the wrong GELU? Would the
#    greedy generation check? Would the logit comparison still notice if the blocks' matrices
#    were drawn at GPT-2's own initial scale, 0.02, instead of 0.1?
# 3. **The KV cache of GPT-2 small.** Compute by hand the bytes of the KV cache of GPT-2 124M
#    (float32) for one sequence of 1,024 tokens, with multi-head attention, with `to_gqa(..., 4)`
#    and with one key/value head (MQA). Check your numbers against `new_caches` without loading
#    any weights. At how many sequences of 1,024 tokens does each cache outweigh the model's
#    own weights?
# 4. **Exporting a GQA model.** `save_gpt2` refuses a GQA model, but a GQA model *is* a
#    multi-head model whose heads happen to share keys and values in groups. Write
#    `gqa_to_mha(model)`, which copies each shared key/value head back into every head of its
#    group, check that it computes exactly what the GQA model computes, export it with
#    `save_gpt2` and reload it in `transformers`. What does the exported model cost, in
#    parameters and in KV cache, compared with the GQA model?
