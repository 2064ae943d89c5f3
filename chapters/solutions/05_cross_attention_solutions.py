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
# # Chapter 5 — Cross-attention: solutions
#
# Worked solutions to the exercises of `chapters/05_cross_attention.ipynb`. Each one states
# the reasoning first, then checks the claim with code and an `assert`.
#
# The exercises need the chapter's data, model, training loop and greedy decoder. A solutions
# notebook runs on its own, so the next cell repeats them in compact form (the chapter
# explains each piece), and then trains the reversal model exactly as the chapter does: the
# same random draws in the same order (including the chapter's three demo strings), so the
# same training and held-out sets, the same seed and the same batch order.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from attnbook.attention import AttentionConfig, DecoderBlock, EncoderBlock, padding_mask
from attnbook.positions import PositionalEmbedding

torch.manual_seed(0)
torch.set_num_threads(1)  # as in the chapter: fast for a tiny model, and repeatable

PAD, BOS, EOS = 0, 1, 2
VOCAB, MIN_LEN, MAX_LEN = 13, 3, 8


def random_sources(n, generator, min_len=MIN_LEN, max_len=MAX_LEN):
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    digits = torch.randint(0, 10, (n, max_len), generator=generator) + 3
    return digits.masked_fill(~padding_mask(lengths, max_len), PAD), lengths


def reversed_targets(src, lengths):
    n, T = src.shape
    j = torch.arange(T)
    mirror = (lengths[:, None] - 1 - j).clamp(min=0)
    body = src.gather(1, mirror).masked_fill(j >= lengths[:, None], PAD)
    tgt = torch.cat([body, torch.full((n, 1), PAD)], dim=1)
    tgt[torch.arange(n), lengths] = EOS
    return tgt


def decoder_inputs(tgt):
    shifted = torch.cat([torch.full((tgt.shape[0], 1), BOS), tgt[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == EOS, PAD)


def to_text(tokens):
    chars = []
    for t in tokens.tolist():
        if t in (EOS, PAD):
            break
        chars.append(str(t - 3))
    return "".join(chars)


class TinySeq2Seq(nn.Module):
    def __init__(self, n_embd=64, n_head=4, n_enc=2, n_dec=1, max_len=16):
        super().__init__()
        cfg = AttentionConfig(n_embd=n_embd, n_head=n_head, block_size=max_len, positions="none")
        self.src_tok = nn.Embedding(VOCAB, n_embd)
        self.src_pos = PositionalEmbedding("learned", max_len, n_embd)
        self.encoder = nn.ModuleList([EncoderBlock(cfg) for _ in range(n_enc)])
        self.ln_enc = nn.LayerNorm(n_embd)
        self.tgt_tok = nn.Embedding(VOCAB, n_embd)
        self.tgt_pos = PositionalEmbedding("learned", max_len, n_embd)
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(n_dec)])
        self.ln_dec = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, VOCAB)

    def encode(self, src, src_mask):
        h = self.src_tok(src) + self.src_pos(src.shape[1])
        for block in self.encoder:
            h = block(h, src_mask)
        return self.ln_enc(h)

    def decode(self, tgt_in, memory, src_mask):
        h = self.tgt_tok(tgt_in) + self.tgt_pos(tgt_in.shape[1])
        for block in self.decoder:
            h = block(h, memory, src_mask)
        return self.lm_head(self.ln_dec(h))

    def forward(self, src, src_mask, tgt_in):
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)


def train(model, src, src_mask, tgt, steps=160, batch_size=128, lr=3e-3, seed=2):
    tgt_in = decoder_inputs(tgt)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batches = torch.randperm(src.shape[0], generator=torch.Generator().manual_seed(seed))
    batches = batches.split(batch_size)
    model.train()
    for step in tqdm(range(steps), desc="training"):  # a progress bar while it runs
        idx = batches[step % len(batches)]
        logits = model(src[idx], src_mask[idx], tgt_in[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[idx].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def greedy_decode(model, src, src_mask, steps=None):
    steps = src.shape[1] + 1 if steps is None else steps
    memory = model.encode(src, src_mask)
    out = torch.full((src.shape[0], 1), BOS)
    for _ in range(steps):
        next_tok = model.decode(out, memory, src_mask)[:, -1].argmax(dim=-1, keepdim=True)
        out = torch.cat([out, next_tok], dim=1)
    return out[:, 1:]


def exact_match(pred, tgt):
    upto_eos = torch.cumsum(tgt == EOS, dim=1) - (tgt == EOS).long() == 0
    return ((pred == tgt) | ~upto_eos).all(dim=1)


def keep_weights_hook(captured):
    """A forward hook (with_kwargs=True) that reruns the layer asking for its weights."""

    def hook(module, args, kwargs, output):
        captured.append(module.forward(*args, **{**kwargs, "need_weights": True})[1])

    return hook


def cross_weights(model, src, src_mask, tgt):
    """Teacher-forced pass; the first decoder layer's cross-attention weights (B, nh, T_t, T_s)."""
    captured = []
    hook = model.decoder[0].cross_attn.register_forward_hook(
        keep_weights_hook(captured), with_kwargs=True
    )
    with torch.no_grad():
        model(src, src_mask, decoder_inputs(tgt))
    hook.remove()
    return captured[0]


# the chapter's data and reversal model
gen = torch.Generator().manual_seed(1)
random_sources(3, gen)  # the chapter's demo draw
src_train, len_train = random_sources(20_000, gen)
seen = {to_text(s) for s in src_train}
src_pool, len_pool = random_sources(3_000, gen)
fresh = torch.tensor([to_text(s) not in seen for s in src_pool])
src_test, len_test = src_pool[fresh][:1_000], len_pool[fresh][:1_000]
mask_train, mask_test = padding_mask(len_train, MAX_LEN), padding_mask(len_test, MAX_LEN)
tgt_train, tgt_test = reversed_targets(src_train, len_train), reversed_targets(src_test, len_test)

torch.manual_seed(0)
model = TinySeq2Seq()
train(model, src_train, mask_train, tgt_train)
pred_test = greedy_decode(model, src_test, mask_test)
rev_acc = exact_match(pred_test, tgt_test).float().mean().item()
print("reversal model, held-out exact match >= 95%:", rev_acc >= 0.95)

# %% [markdown]
# ## Exercise 1 — sorting instead of reversing
#
# **Prediction.** For reversal the source position to read depends only on the output
# position and the length, so the map is a fixed anti-diagonal. For sorting, output `i`
# should read the source position that holds the `i`-th smallest digit, which depends on the
# digits themselves. So each string gets its own map: still one bright cell per row (a
# permutation of the source positions, if the digits are all different), but scattered, not
# on a line. A digit that occurs twice can be copied from either position, so the weight of
# that row can split between the copies, and the rows for both copies can look alike.
#
# There is also more for the decoder to work out. At step `i` its query must ask for "the
# smallest digit I have not emitted yet", and the only record of what it has emitted is its
# own input, read through its causal self-attention. With repeated digits it also has to
# count how many copies it has already written.
#
# **Targets.** Sorting right-padded rows: give the padding a value larger than any digit,
# sort, and turn it back into `PAD`. The padding then sorts to the end, where it belongs.

# %%
def sorted_targets(src, lengths):
    """The digits in increasing order, then EOS, padded: (n, T + 1)."""
    n, T = src.shape
    big = VOCAB  # a value larger than every digit token
    body = src.masked_fill(src == PAD, big).sort(dim=1).values  # padding sorts to the end
    body = body.masked_fill(body == big, PAD)  # (n, T)
    tgt = torch.cat([body, torch.full((n, 1), PAD)], dim=1)  # (n, T + 1)
    tgt[torch.arange(n), lengths] = EOS
    return tgt


sort_train, sort_test = sorted_targets(src_train, len_train), sorted_targets(src_test, len_test)
for s_, t_ in zip(src_test[:3], sort_test[:3], strict=True):
    print(f"{to_text(s_):>8} -> {to_text(t_)}")

torch.manual_seed(0)
sorter = TinySeq2Seq()
train(sorter, src_train, mask_train, sort_train)
sort_acc = exact_match(greedy_decode(sorter, src_test, mask_test), sort_test).float().mean().item()
print("sorting model, held-out exact match >= 90%:", sort_acc >= 0.90)

# %% [markdown]
# The same model and the same 160 steps learn sorting too, a little less perfectly than
# reversal. The next cell gives the exact figure, separately for the strings whose digits are
# all different and for those with a repeated digit: that is where the errors are.

# %% tags=["nbval-ignore-output"]
ok_sort = exact_match(greedy_decode(sorter, src_test, mask_test), sort_test)
n_distinct = torch.tensor([len(set(to_text(s_))) for s_ in src_test])  # different digits
repeats = n_distinct < len_test  # (B,) True where some digit occurs twice or more
acc_distinct = ok_sort[~repeats].float().mean().item()
acc_repeats = ok_sort[repeats].float().mean().item()
print(f"sorting, held-out exact match: {sort_acc:.2%}")
print(f"  all digits different: {acc_distinct:.2%} of {(~repeats).sum().item()}")
print(f"  a repeated digit:     {acc_repeats:.2%} of {repeats.sum().item()}")
assert sort_acc >= 0.90 and acc_distinct >= acc_repeats

# %% [markdown]
# Now the map, for a held-out string with all-different digits and for one with repeated
# digits.

# %%
sort_w = cross_weights(sorter, src_test, mask_test, sort_test).mean(dim=1)  # (B, T_t, T_s)
n_distinct = [len(set(to_text(s_))) for s_ in src_test]  # different digits per string
i_distinct = next(i for i in range(1000) if len_test[i] == 7 and n_distinct[i] == 7)
i_repeat = next(i for i in range(1000) if len_test[i] == 7 and n_distinct[i] == 5)

fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
for ax, i in zip(axes, (i_distinct, i_repeat), strict=True):
    L = int(len_test[i])
    im = ax.imshow(sort_w[i, : L + 1, :L], vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(L), list(to_text(src_test[i])))
    ax.set_yticks(range(L + 1), list(to_text(sort_test[i])) + ["EOS"])
    ax.set_xlabel("source")
    ax.set_ylabel("predicting")
    ax.set_title(f"sorting {to_text(src_test[i])}")
fig.colorbar(im, ax=axes, shrink=0.8, label="weight (mean of heads)")
plt.show()

L = int(len_test[i_distinct])  # left panel: each digit row peaks on the digit it predicts
peaks = src_test[i_distinct].gather(0, sort_w[i_distinct, :L, :L].argmax(dim=-1))  # (L,)
assert torch.equal(peaks, sort_test[i_distinct, :L])
assert ok_sort[i_distinct] and ok_sort[i_repeat]  # both strings are decoded correctly

# %% [markdown]
# With all-different digits (left) it is as predicted: in output row `i` the brightest cell
# sits in the column of the `i`-th smallest digit (the cell asserts it), so the map is a
# scattered permutation, different for every string. The peaks are softer than for reversal:
# much of the rest of a row's weight goes to the digits just before and after the predicted
# one in sorted order.
#
# With repeated digits (right) the map is fuzzier, and the rows of a repeated digit are where
# it shows. Their weight is shared between the copies of the digit (reading either gives the
# right answer) and, often, the next larger digit, so such a row may have no clear peak at
# all, and its brightest cell may even be that next digit rather than a copy. (The details
# of these soft rows can change on another CPU type.) The model still decodes this string
# correctly, so the rest of the decision comes from the decoder itself: through its causal
# self-attention it can see how many copies it has already written.
#
# To measure it over the held-out set we cannot compare with a fixed position. Instead we
# check whether the most-attended source position *holds the digit being predicted*.

# %% tags=["nbval-ignore-output"]
hits = total = 0
for b in range(len(len_test)):
    L = int(len_test[b])
    looked_at = src_test[b].gather(0, sort_w[b, :L].argmax(dim=-1))  # (L,) digit at the argmax
    hits += (looked_at == sort_test[b, :L]).sum().item()
    total += L
print(f"most-attended source position holds the predicted digit: {hits / total:.1%}")
assert hits / total > 0.7

# %% [markdown]
# ## Exercise 2 — forget the mask
#
# **Prediction.** Without the mask, every padded position of `memory` becomes a key that
# competes for attention, in the encoder's self-attention and in the decoder's
# cross-attention. The model never saw that during training, so its inputs are off
# distribution. A natural guess: the more padding a string has, the larger the disturbance,
# so short strings suffer most. Strings of length 8 have no padding at all: for them
# `memory_mask=None` changes nothing, and they must decode exactly as before.

# %%
pred_nomask = greedy_decode(model, src_test, None)
ok_nomask = exact_match(pred_nomask, tgt_test)
acc_by_len = {L: ok_nomask[len_test == L].float().mean().item() for L in range(3, 9)}
full = len_test == MAX_LEN  # strings with no padding
same_full = torch.equal(pred_nomask[full], pred_test[full])
print("length 8 (no padding) decoded as with the mask:", same_full)
print("every padded length below 50%:", all(acc_by_len[L] < 0.5 for L in range(MIN_LEN, MAX_LEN)))

# %% tags=["nbval-ignore-output"]
print(f"held-out exact match without the mask: {ok_nomask.float().mean().item():.2%}")
for L, acc in acc_by_len.items():
    print(f"  length {L} ({MAX_LEN - L} padded positions): {acc:.2%}")
assert ok_nomask.float().mean().item() < 0.5

# %% [markdown]
# The part about length 8 holds: those strings decode exactly as before. The guess that the
# damage grows with the amount of padding does not: accuracy does not fall gradually.
# Nearly every padded string is wrong, even with a single padded position (exact figures
# above). Why so abrupt?
#
# Recall how the model must reverse: it needs the length of the string, and the only way it
# can know the length is by counting what its attention can see. Without the mask it sees 8
# tokens every time. So it should treat every string as 8 long: start by reading position 7
# (a `PAD`), write 8 tokens and then `EOS`, and the last `L` of those 8 tokens should be the
# reversal of the real digits. We check those three consequences on the held-out strings that
# have padding, token by token (not with `to_text`, which stops at the first `EOS` or `PAD`).

# %% tags=["nbval-ignore-output"]
padded = len_test < MAX_LEN
nomask_w = cross_weights(model, src_test, None, tgt_test)  # (B, nh, T_t, T_s), no mask
first_read = nomask_w.mean(dim=1)[:, 0].argmax(dim=-1)  # (B,) source position of output 0
ends_at_9 = (pred_nomask[:, 8] == EOS)[padded].float().mean().item()  # EOS after 8 tokens
pairs = zip(pred_nomask, tgt_test, len_test.tolist(), strict=True)
tail_ok = torch.tensor([torch.equal(p[8 - L : 8], t[:L]) for p, t, L in pairs])  # (B,)
made_up_eos = (pred_nomask[:, :8] == EOS).any(dim=1)  # an EOS among the first 8 tokens
reads_7 = (first_read[padded] == 7).float().mean().item()
print(f"first output read from position 7:           {reads_7:.1%}")
print(f"EOS as the 9th token, after 8 others:        {ends_at_9:.1%}")
print(f"last L of those 8 are the correct reversal:  {tail_ok[padded].float().mean().item():.1%}")
eos_early = made_up_eos[padded].float().mean().item()
print(f"an EOS among the 8 (the text stops early):   {eos_early:.1%}")
assert reads_7 > 0.9 and ends_at_9 > 0.9 and tail_ok[padded].float().mean().item() > 0.5

# %% [markdown]
# That is what happens: the model reverses the whole padded row, turning the `PAD`s into
# made-up tokens at the front of its answer, and ends it where a string of 8 would end. The
# made-up tokens are digits or, for some strings and some trained weights, an `EOS` (the
# printed answer then stops after a few made-up digits; the share is printed above). The `PAD` token's embedding was never trained (with the mask no one
# ever reads a padded position, so it gets no gradient), and the model decodes it as some
# token or other. Even the real part of the answer is right only in part of the cases (exact
# figure above): the unmasked `PAD`s also take some attention in the encoder, and so disturb
# the rows of `memory` that hold the real digits.
#
# **Padding width.** Now the same strings, padded once to width 8 and once to width 12 (four
# extra `PAD` columns). With the mask the extra columns are invisible, so the decoded strings
# must be identical. Without it the extra padded keys change the softmax, so some answers
# change. We decode 9 steps in both cases so the outputs line up.
#
# (The position embeddings of source positions 8–11 were never trained, since training
# sources are 8 wide. With the mask that does not matter: nothing ever attends to those
# positions.)

# %%
src_wide = torch.cat([src_test, torch.full((len(src_test), 4), PAD)], dim=1)  # (B, 12)
mask_wide = padding_mask(len_test, 12)
same_masked = torch.equal(
    greedy_decode(model, src_test, mask_test, steps=9),
    greedy_decode(model, src_wide, mask_wide, steps=9),
)
changed_unmasked = (
    greedy_decode(model, src_test, None, steps=9) != greedy_decode(model, src_wide, None, steps=9)
).any(dim=1)
print("with the mask, width 8 and width 12 decode identically:", same_masked)
print("without the mask, some answers change with the width:", changed_unmasked.any().item())
assert same_masked and changed_unmasked.any()

# %% tags=["nbval-ignore-output"]
print(f"without the mask, {changed_unmasked.float().mean().item():.1%} of the answers change")

# %% [markdown]
# This is the deeper danger of a missing padding mask: the answer for one input depends on the
# other inputs of its batch, which decide the padded width, so results change with the batch
# size and with the order of the data.

# %% [markdown]
# ## Exercise 3 — cache the encoder's keys and values
#
# **Reasoning.** In cross-attention, `k` and `v` are projections of `memory` only. `memory`
# is computed once per source and never changes during decoding, so the keys and values are
# the same at every step; only the queries (from the growing decoder input) are new. So we can
# compute them once per decoder layer, before the loop, and at each step only project the
# queries. Nothing else changes: the scores, the padding mask and the softmax are computed
# from the same `q`, `k`, `v` as before, so the result is the same up to rounding.
#
# `attnbook`'s layers are written for this. `CrossAttention.project_memory(memory,
# memory_mask)` returns a `CrossCache`: the keys and values, each `(B, n_kv_head, T_k,
# head_dim)`, and the mask. `DecoderBlock` accepts it as `memory_kv=` in place of `memory` and
# `memory_mask`, and passes it to its cross-attention as the layer's cache. The decoding loop
# below calls `project_memory` once per layer and then runs each block with `memory_kv`.

# %%
@torch.no_grad()
def greedy_decode_cached(model, src, src_mask, steps):
    memory = model.encode(src, src_mask)
    kvs = [block.cross_attn.project_memory(memory, src_mask) for block in model.decoder]
    out = torch.full((src.shape[0], 1), BOS)
    all_logits = []
    for _ in range(steps):
        h = model.tgt_tok(out) + model.tgt_pos(out.shape[1])
        for block, kv in zip(model.decoder, kvs, strict=True):
            h = block(h, memory_kv=kv)  # no memory: its keys, values and mask instead
        logits = model.lm_head(model.ln_dec(h))[:, -1]  # (B, VOCAB)
        all_logits.append(logits)
        out = torch.cat([out, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return out[:, 1:], torch.stack(all_logits, dim=1)


@torch.no_grad()
def greedy_decode_logits(model, src, src_mask, steps):
    """The chapter's greedy decoder, also returning each step's logits."""
    memory = model.encode(src, src_mask)
    out = torch.full((src.shape[0], 1), BOS)
    all_logits = []
    for _ in range(steps):
        logits = model.decode(out, memory, src_mask)[:, -1]
        all_logits.append(logits)
        out = torch.cat([out, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return out[:, 1:], torch.stack(all_logits, dim=1)


calls = {"c_kv": 0}


def count_call(module, args, output):
    calls["c_kv"] += 1


hook = model.decoder[0].cross_attn.c_kv.register_forward_hook(count_call)
tokens_plain, logits_plain = greedy_decode_logits(model, src_test, mask_test, steps=9)
calls_plain, calls["c_kv"] = calls["c_kv"], 0
tokens_cached, logits_cached = greedy_decode_cached(model, src_test, mask_test, steps=9)
calls_cached = calls["c_kv"]
hook.remove()

print("same tokens:", torch.equal(tokens_plain, tokens_cached))
print("same logits (atol=1e-5):", torch.allclose(logits_plain, logits_cached, atol=1e-5))
print("c_kv calls: plain", calls_plain, "| cached", calls_cached)
assert torch.equal(tokens_plain, tokens_cached)
assert torch.allclose(logits_plain, logits_cached, atol=1e-5)
assert (calls_plain, calls_cached) == (9, 1)

# %% [markdown]
# Nine projections of the whole memory become one. In a real translation model the source
# can be hundreds of tokens long and the decoder has a dozen layers, each with its own `c_kv`,
# so this cache saves `n_layer × (steps - 1)` projections of the full source. (The decoder's
# *self*-attention still recomputes every earlier target position at every step here;
# caching those keys and values, which do grow by one each step, is
# [chapter 7](../07_kv_cache.ipynb)'s KV cache.)

# %% [markdown]
# ## Exercise 4 — longer strings than in training
#
# **Prediction.** Nothing in the attention layers depends on the length, but the position
# embeddings do: source positions 8 and 9, and decoder positions 9 and 10, never appeared in
# training, so their embedding rows are still the random vectors they were initialised with
# (the optimiser never moved them: their gradient was always zero). The first output digit of
# a length-9 string must be read from source position 8, a token whose representation is
# half noise, and the decoder's query for it has never had to point there. We predict that
# exact match collapses to near 0% for lengths 9 and 10.

# %%
gen_long = torch.Generator().manual_seed(3)
src_long, len_long = random_sources(400, gen_long, min_len=9, max_len=10)  # padded to width 10
mask_long = padding_mask(len_long, 10)
tgt_long = reversed_targets(src_long, len_long)
ok_long = exact_match(greedy_decode(model, src_long, mask_long), tgt_long)
torch.manual_seed(0)
fresh_model = TinySeq2Seq()  # the same initialisation as `model`, before training
untouched = torch.equal(model.src_pos.table.weight[8:], fresh_model.src_pos.table.weight[8:])
print("source position rows 8+ unchanged since initialisation:", untouched)
print("exact match on lengths 9-10 below 20%:", ok_long.float().mean().item() < 0.2)
assert untouched and ok_long.float().mean().item() < 0.2

# %% tags=["nbval-ignore-output"]
for L in (9, 10):
    print(f"length {L}: exact match {ok_long[len_long == L].float().mean().item():.1%}")
long_w = cross_weights(model, src_long, mask_long, tgt_long).mean(dim=1)  # (B, T_t, T_s)
first_row_argmax = long_w[:, 0].argmax(dim=-1)  # where the first output digit is read from
reads_last = (first_row_argmax == len_long - 1).float().mean().item()
print(f"first output digit read from position L - 1: {reads_last:.1%}")
reads_7 = (first_row_argmax == 7).float().mean().item()
print(f"first output digit read from position 7:     {reads_7:.1%}")
pred_long = greedy_decode(model, src_long, mask_long)
first8 = [to_text(p) == to_text(s_)[:8][::-1] for p, s_ in zip(pred_long, src_long, strict=True)]
print(f"answers equal to the reverse of the first 8 digits: {sum(first8) / len(first8):.1%}")
assert reads_7 > 0.9 and sum(first8) / len(first8) > 0.8

# %%
i_long = next(  # a length-10 string whose first 8 digits are all different
    i for i in range(len(len_long)) if len_long[i] == 10 and len(set(to_text(src_long[i])[:8])) == 8
)
fig, ax = plt.subplots(figsize=(5, 4.5))
im = ax.imshow(long_w[i_long, :11], vmin=0, vmax=1, cmap="Blues")
ax.set_xticks(range(10), list(to_text(src_long[i_long])))
ax.set_yticks(range(11), list(to_text(tgt_long[i_long])) + ["EOS"])
ax.set_xlabel("source (positions 8, 9 never seen in training)")
ax.set_ylabel("predicting (teacher-forced)")
ax.set_title(f"reversing {to_text(src_long[i_long])}: out of range")
fig.colorbar(im, ax=ax, shrink=0.8)
plt.show()
assert long_w[i_long, 0].argmax().item() == 7  # the first output digit: read from position 7

# %% [markdown]
# The map is still roughly an anti-diagonal, but in the wrong place. The first output digit
# is read from position 7 (for almost every string, as the cell before the plot measured),
# and the rows after it step back from there about one position per row, some of them
# splitting their weight between two neighbouring positions: as if the string ended at
# position 7, the last source position the model has ever seen. (We picked a string whose
# positions 0–7 hold eight different digits, so that a bright cell can be read as "this
# position" without a repeated digit blurring the picture.) Positions 8 and 9 get little
# weight, so the answer is (in almost every case, as measured above) the reverse of the
# first 8 digits, and every answer for length 9 or 10 is wrong.
#
# Learned absolute positions do not extrapolate: the model has learned a table of 8 source
# positions, not a rule. [Chapter 6](../06_positions.ipynb) compares position schemes; relative
# ones, ALiBi in particular, were designed with longer test inputs in mind. Even with those, a model
# only generalises if what it learned on lengths 3–8 happens to be a rule that also holds at 9 and
# 10, which nothing in this training forces.
