"""Streaming generation past block_size (StreamingLLM): models whose every cache is bounded
decode any number of tokens, equal to a full pass of the same weights at a longer block_size;
the others refuse with a ValueError saying why."""

import pytest
import torch

from attnbook.model import GPT, GPTConfig

VOCAB, BLOCK = 37, 16
LOCAL = dict(attention="local", attention_options={"window": 4, "sink_tokens": 2})


def _model(block_size=BLOCK, n_layer=2, positions="rope", seed=0, **kw):
    """A tiny GPT, local attention with window 4 and 2 sinks unless ``kw`` names another."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, block_size=block_size, n_layer=n_layer, n_head=4, n_embd=32)
    attention = kw.pop("attention", "local")
    options = kw.pop(
        "attention_options", LOCAL["attention_options"] if attention == "local" else {}
    )
    config = GPTConfig(**cfg, positions=positions, attention=attention, attention_options=options)
    return GPT(config).eval()


def _longer(model, block_size):
    """The same weights in a model of a longer block_size (RoPE and the caches do not store
    positions: nothing else changes)."""
    cfg = GPTConfig.from_dict({**model.config.to_dict(), "block_size": block_size})
    longer = GPT(cfg).eval()
    longer.load_state_dict(model.state_dict())
    return longer


def _streamed_logits(model, ids, chunks):
    """Logits of ``ids`` ``(B, L)`` fed through bounded caches in pieces of ``chunks`` tokens."""
    caches = model.new_caches(ids.shape[0])  # max_len=None: no limit
    nbytes = [cache.nbytes for cache in caches]
    out, start = [], 0
    with torch.no_grad():
        for size in chunks:
            out.append(model(ids[:, start : start + size], caches=caches)[0])
            start += size
            assert [cache.nbytes for cache in caches] == nbytes  # constant storage
    assert start == ids.shape[1] and caches[0].length == start
    return torch.cat(out, dim=1)  # (B, L, VOCAB)


@pytest.mark.parametrize(
    "kw",
    [
        LOCAL,
        dict(
            attention="local", attention_options={"window": 4, "sink_tokens": 2}, positions="alibi"
        ),
        dict(attention="linear", attention_options={"linear_chunk": 4}),
        dict(attention="gated_deltanet", attention_options={"chunk_size": 4}),
    ],
    ids=["local-rope", "local-alibi", "linear", "gated_deltanet"],
)
def test_decoding_past_block_size_equals_a_full_pass_at_a_longer_block_size(kw):
    """Token by token and in chunks of up to block_size, 4 x block_size positions through the
    caches give the logits of one forward pass of the same weights with block_size 4 x longer."""
    model = _model(**kw)
    L = 4 * BLOCK
    ids = torch.randint(0, VOCAB, (2, L))
    with torch.no_grad():
        full = _longer(model, L)(ids)[0]  # (2, L, VOCAB)
    for chunks in ([1] * L, [5, BLOCK, 1, 3, BLOCK, BLOCK, 7]):
        got = _streamed_logits(model, ids, chunks)
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_streaming_ten_block_sizes_keeps_the_caches_and_starts_as_without_streaming():
    model = _model()
    prompt = torch.randint(0, VOCAB, (1, 3))
    out = model.generate(prompt, 10 * BLOCK - 3, temperature=0)
    assert out.shape == (1, 10 * BLOCK)
    within = model.generate(prompt, BLOCK - 3, temperature=0)  # no streaming: T <= block_size
    assert torch.equal(out[:, :BLOCK], within)
    longer = _longer(model, 10 * BLOCK).generate(prompt, 10 * BLOCK - 3, temperature=0)
    assert torch.equal(out, longer)  # the same tokens all the way
    caches = model.new_caches(1)
    sizes = {sum(cache.nbytes for cache in caches)}
    with torch.no_grad():
        for t in range(10 * BLOCK):
            model(out[:, t : t + 1], caches=caches)
            sizes.add(sum(cache.nbytes for cache in caches))
    per_position = sum(cache.bytes_per_token for cache in caches)
    assert sizes == {(2 + 4) * per_position}  # sinks + window positions, at every length


def test_a_step_past_block_size_equals_a_forward_over_the_sinks_and_the_last_window():
    """One layer: the step at position p > block_size reads the sink tokens and the last window
    of tokens only. Recomputed from those tokens alone at their true positions (the sinks
    prefilled, the cache then moved to p - window + 1 with nothing in between), it is the same."""
    model = _model(n_layer=1)
    p, window = 3 * BLOCK + 5, 4
    ids = torch.randint(0, VOCAB, (1, p + 1))
    streamed = _streamed_logits(model, ids, [1] * (p + 1))[:, -1]  # (1, VOCAB)
    caches = model.new_caches(1)
    with torch.no_grad():
        model(ids[:, :2], caches=caches)  # the sink tokens, positions 0 and 1
        caches[0].length = p - window + 1  # skip to the last window, unread by position p
        fresh = model(ids[:, p - window + 1 :], caches=caches)[0][:, -1]
    torch.testing.assert_close(fresh, streamed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(attention="mha"), r"layer 0's attention \(MultiHeadAttention\) keeps a KV cache"),
        (dict(attention="mla"), r"layer 0's attention \(MultiHeadLatentAttention\) keeps a"),
        (dict(positions="learned"), "positions='learned' has no embedding past block_size"),
        (dict(positions="sinusoidal"), "positions='sinusoidal' has no embedding past"),
    ],
)
def test_models_that_cannot_stream_refuse_past_block_size(kw, match):
    model = _model(**kw)
    prompt = torch.randint(0, VOCAB, (1, 3))
    with pytest.raises(ValueError, match=match + ".*use_cache=False"):
        model.generate(prompt, BLOCK, temperature=0)
    assert model.generate(prompt, BLOCK, temperature=0, use_cache=False).shape == (1, BLOCK + 3)
    assert model.generate(prompt, BLOCK - 3, temperature=0).shape == (1, BLOCK)  # within: fine


def test_a_prompt_longer_than_block_size_is_prefilled_in_pieces():
    model = _model()
    prompt = torch.randint(0, VOCAB, (2, 2 * BLOCK + 3))
    out = model.generate(prompt, 5, temperature=0)
    longer = _longer(model, 4 * BLOCK).generate(prompt, 5, temperature=0)
    assert torch.equal(out, longer)
