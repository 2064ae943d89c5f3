"""Cached decoding must give what a full forward pass gives, for every variant and position scheme."""

import pytest
import torch
from torch import nn

from attnbook.attention import AttentionConfig, available, build_attention
from attnbook.attention.config import POSITIONS
from attnbook.kv_cache import Cache, KVCache
from attnbook.positions import PositionalEmbedding

BLOCK = 12


def _layer(name, positions):
    """The variant with this position scheme (gqa with 2 key/value heads, local with a window and
    sinks that decoding BLOCK tokens passes, the others with their default options); skipped where
    the variant refuses the scheme."""
    options = {"gqa": {"n_kv_head": 2}, "local": {"window": 4, "sink_tokens": 2}}.get(name, {})
    try:
        return build_attention(
            name, AttentionConfig(32, 4, block_size=BLOCK, positions=positions), **options
        ).eval()
    except ValueError as err:
        if "positions" not in str(err):
            raise
        pytest.skip(f"{name} does not support positions={positions!r}: {err}")


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("chunks", [[1] * BLOCK, [5, 1, 3, 3], [1, BLOCK - 1], [BLOCK - 1, 1]])
def test_cached_chunks_equal_the_full_pass(name, positions, chunks, decode_in_chunks):
    layer = _layer(name, positions)
    x = torch.randn(2, BLOCK, 32)
    full = layer(x)
    cache = layer.new_cache(batch_size=2)
    decoded = decode_in_chunks(layer, x, chunks, cache)
    assert cache.length == BLOCK
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


class TinyLM(nn.Module):
    """Embeddings, (positions), two residual attention layers, LM head: enough to decode greedily."""

    def __init__(self, name, positions, vocab=17):
        super().__init__()
        self.tok = nn.Embedding(vocab, 32)
        self.pos = (
            PositionalEmbedding(positions, BLOCK, 32)
            if positions in ("learned", "sinusoidal")
            else None
        )
        self.layers = nn.ModuleList(_layer(name, positions) for _ in range(2))
        self.head = nn.Linear(32, vocab)

    def forward(self, idx, caches=None):
        start = caches[0].length if caches else 0
        x = self.tok(idx)  # (B, T, 32)
        if self.pos is not None:
            x = x + self.pos(idx.shape[1], start)
        for i, layer in enumerate(self.layers):
            x = x + layer(x, cache=caches[i] if caches else None)
        return self.head(x)  # (B, T, vocab)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("prompt_len", [1, 5, BLOCK - 1])
def test_greedy_decoding_with_cache_equals_without(name, positions, prompt_len):
    torch.manual_seed(0)
    model = TinyLM(name, positions).eval()
    prompt = torch.randint(0, 17, (2, prompt_len))
    with torch.no_grad():
        plain = prompt
        while plain.shape[1] < BLOCK:  # recompute everything each step
            nxt = model(plain)[:, -1].argmax(-1, keepdim=True)
            plain = torch.cat([plain, nxt], dim=1)
        caches = [layer.new_cache(2) for layer in model.layers]
        logits = model(prompt, caches)  # prefill
        cached = prompt
        while cached.shape[1] < BLOCK:  # one token at a time
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cached = torch.cat([cached, nxt], dim=1)
            if cached.shape[1] < BLOCK:
                logits = model(nxt, caches)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("name", available())
def test_every_cache_follows_the_protocol(name):
    """length, append through the layer, the one overflow message, reset, nbytes, bytes_per_token."""
    layer = _layer(name, "rope")
    cache = layer.new_cache(batch_size=2, max_len=8)
    assert isinstance(cache, Cache) and cache.length == 0 and cache.max_len == 8
    allocated = sum(t.nbytes for t in vars(cache).values() if isinstance(t, torch.Tensor))
    assert cache.nbytes == allocated > 0 and 0 < cache.bytes_per_token <= cache.nbytes
    x = torch.randn(2, 8, 32)
    first = layer(x[:, :5], cache=cache)
    assert cache.length == 5
    layer(x[:, 5:], cache=cache)
    assert cache.length == 8
    stored = [t.clone() for t in cache.tensors()]
    with pytest.raises(ValueError, match=r"overflow: built for max_len=8 positions, 8 already"):
        layer(x[:, :1], cache=cache)
    assert cache.length == 8  # a refused append stores nothing
    assert all(torch.equal(a, b) for a, b in zip(stored, cache.tensors(), strict=True))
    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(layer(x[:, :5], cache=cache), first, rtol=0, atol=0)  # forgotten


@pytest.mark.parametrize("name", available())
def test_a_bounded_cache_takes_any_number_of_positions_and_a_growing_one_refuses(name):
    """A cache that stops growing (a rolling window, a recurrent state) is built with
    max_len=None and fed 4 x block_size positions (RoPE past its table) at constant bytes; a
    cache that grows keeps max_len <= block_size."""
    layer = _layer(name, "rope")
    cache = layer.new_cache(batch_size=1)
    if not cache.bounded:
        assert cache.max_len == BLOCK
        with pytest.raises(ValueError, match=f"max_len must be in 1..block_size={BLOCK}, got 13"):
            layer.new_cache(1, max_len=BLOCK + 1)
        return
    assert cache.max_len is None
    nbytes = cache.nbytes
    x = torch.randn(1, 4 * BLOCK, 32)
    for start in range(0, 4 * BLOCK, 5):
        y = layer(x[:, start : start + 5], cache=cache)
        assert torch.isfinite(y).all() and cache.nbytes == nbytes
    assert cache.length == 4 * BLOCK
    assert layer.new_cache(1, max_len=100 * BLOCK).max_len == 100 * BLOCK


def test_overflow_raises_a_clear_error():
    layer = _layer("mha", "rope")
    cache = layer.new_cache(batch_size=1, max_len=4)
    layer(torch.randn(1, 3, 32), cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow: built for max_len=4"):
        layer(torch.randn(1, 2, 32), cache=cache)
    cache.reset()
    assert cache.length == 0
    layer(torch.randn(1, 4, 32), cache=cache)  # usable again after reset


def test_cache_shape_mismatch_is_reported():
    cache = KVCache(batch_size=2, n_kv_head=2, head_dim=8, max_len=5)
    with pytest.raises(ValueError, match=r"expected k of shape \(2, 2, 1, 8\)"):
        cache.append(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8))
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        KVCache(batch_size=2, n_kv_head=2, head_dim=8, max_len=0)
    with pytest.raises(ValueError, match="max_len must be a positive integer, got None"):
        KVCache(batch_size=2, n_kv_head=2, head_dim=8, max_len=None)  # it grows: a limit


@pytest.mark.parametrize("name, kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_bytes_per_token_is_two_times_kv_heads_times_head_dim_times_itemsize(name, kv_heads):
    layer = _layer(name, "none")
    cache = layer.new_cache(batch_size=3, max_len=BLOCK)
    assert cache.bytes_per_token == 2 * kv_heads * 8 * 4
    assert cache.nbytes == 3 * BLOCK * cache.bytes_per_token
    assert cache.k.shape == (3, kv_heads, BLOCK, 8)


def test_a_bfloat16_cache_halves_memory_and_stays_close():
    layer = _layer("gqa", "rope")
    x = torch.randn(1, BLOCK, 32)
    full = layer(x)
    cache = layer.new_cache(batch_size=1, dtype=torch.bfloat16)
    assert cache.bytes_per_token == layer.new_cache(batch_size=1).bytes_per_token // 2
    steps = [layer(x[:, t : t + 1], cache=cache) for t in range(BLOCK)]
    out = torch.cat(steps, dim=1)
    assert out.dtype == torch.float32
    assert (out - full).abs().max() < 2e-2 and not torch.equal(out, full)


def test_cache_on_another_device_is_reported():
    cache = KVCache(batch_size=1, n_kv_head=1, head_dim=4, max_len=3, device="meta")
    with pytest.raises(ValueError, match="the cache lives on meta"):
        cache.append(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))


@pytest.mark.parametrize("name, kv", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_layer_config_records_its_kv_heads(name, kv):
    layer = _layer(name, "none")
    assert layer.n_kv_head == kv
    rebuilt = build_attention(name, layer.config, **vars(layer.options))
    assert rebuilt.n_kv_head == kv


def test_new_cache_max_len_is_checked():
    layer = _layer("mha", "rope")
    with pytest.raises(ValueError, match="max_len must be in 1..block_size=12, got 0"):
        layer.new_cache(1, max_len=0)
    with pytest.raises(ValueError, match="got 13"):
        layer.new_cache(1, max_len=13)


# Options under which each variant's choice of keys is real at 24 positions (sparse paths taken).
SPARSE_AT_24 = {
    "gqa": dict(n_kv_head=2),
    "local": dict(window=5, sink_tokens=2),
    "sparse": dict(sparse_block=4, n_global_blocks=1, n_window_blocks=1, n_random_blocks=1),
    "moba": dict(moba_chunk_size=4, moba_topk=2),
    "nsa": dict(compress_block=4, compress_stride=2, select_block=4, select_count=3, window=4),
    "dsa": dict(index_topk=4),
}


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
@pytest.mark.parametrize("name", available())
def test_cached_decoding_with_a_left_padding_mask(name, positions):
    """Left-padded prompts of different lengths: masking the pads, a cached prefill and steps on
    the fast path equal the full pass on the reference path (same weights), for every variant
    that takes a mask, with options that make its sparsity real."""
    options = SPARSE_AT_24.get(name, {})
    layers = []
    for impl in ("sdpa", "reference"):
        config = AttentionConfig(32, 4, block_size=24, positions=positions, impl=impl)
        torch.manual_seed(0)  # the same weights (and random blocks) for both
        try:
            layers.append(build_attention(name, config, **options).eval())
        except ValueError as err:
            if "positions" not in str(err):
                raise
            pytest.skip(f"{name} does not support positions={positions!r}: {err}")
    fast, ref = layers
    x = torch.randn(2, 24, 32)
    real = torch.ones(2, 24, dtype=torch.bool)
    real[1, :5] = False  # row 1 starts with 5 pad positions
    try:
        full = ref(x, attn_mask=real[:, None, None, :])
    except ValueError as err:
        if "attn_mask" not in str(err):
            raise
        pytest.skip(f"{name} takes no attn_mask: {err}")
    cache = fast.new_cache(2)
    prefill = fast(x[:, :9], attn_mask=real[:, None, None, :9], cache=cache)
    steps = [
        fast(x[:, t : t + 1], attn_mask=real[:, None, None, : t + 1], cache=cache)
        for t in range(9, 24)
    ]
    out = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(out[:, 5:], full[:, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 1, 1, 7, dtype=torch.long), "attn_mask must be boolean .* or float"),
        (torch.ones(3, 1, 1, 7, dtype=torch.bool), r"attn_mask of shape \(3, 1, 1, 7\)"),
        (torch.ones(2, 1, 1, 9, dtype=torch.bool), r"with T_k in \(1, 7"),
        (torch.ones(2, 1, 5, 7, dtype=torch.bool), r"does not broadcast to \(B=2, n_head=4, T=7"),
    ],
)
@pytest.mark.parametrize("positions", ["alibi", "none"])
@pytest.mark.parametrize("name", available())
def test_a_bad_mask_is_refused_by_every_variant_before_torch_sees_it(name, positions, mask, match):
    layer = _layer(name, positions)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 7, 32), attn_mask=mask)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm, bf16
@pytest.mark.parametrize("name", available())
def test_an_input_of_another_dtype_is_refused_unless_under_autocast(name):
    layer = _layer(name, "rope")
    with pytest.raises(ValueError, match="x is torch.float16 but the layer's weights are"):
        layer(torch.randn(1, 5, 32, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 5, 32, dtype=torch.bfloat16)).shape == (1, 5, 32)
