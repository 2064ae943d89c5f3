import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbook.attention import AttentionConfig, GroupedQueryAttention, sdpa_reference
from attnbook.attention.config import POSITIONS
from attnbook.attention.local import (
    LocalAttention,
    RollingKVCache,
    blocked_local_attention,
    sliding_window_mask,
)
from attnbook.kv_cache import KVCache
from attnbook.positions import alibi_bias, alibi_slopes


def _pair(window, positions="none", n_kv_head=None, block_size=32, sink_tokens=0, **kw):
    """The fast ("sdpa", blocked) and reference ("reference", dense) layers, same weights."""
    cfg = dict(n_embd=32, n_head=4, block_size=block_size, positions=positions, **kw)
    options = dict(window=window, n_kv_head=n_kv_head, sink_tokens=sink_tokens)
    fast = LocalAttention(AttentionConfig(**cfg), **options).eval()
    ref = LocalAttention(AttentionConfig(**cfg, impl="reference"), **options).eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def test_sliding_window_mask_is_a_band_of_window_positions():
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(sliding_window_mask(5, 5, window=3), expected)
    assert torch.equal(sliding_window_mask(2, 5, window=3), expected[3:])  # bottom-right aligned
    i, j = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    assert torch.equal(sliding_window_mask(9, 9, window=4), (i - 4 < j) & (j <= i))


def test_sink_mask_against_an_explicit_loop():
    for t_q, t_k, window, sinks in [(9, 9, 3, 2), (4, 11, 2, 3), (1, 12, 4, 1), (6, 6, 2, 9)]:
        expected = torch.zeros(t_q, t_k, dtype=torch.bool)
        for i in range(t_q):
            p = t_k - t_q + i  # the query's position
            for j in range(t_k):
                expected[i, j] = j <= p and (p - j < window or j < sinks)
        assert torch.equal(sliding_window_mask(t_q, t_k, window, sink_tokens=sinks), expected)
    assert torch.equal(sliding_window_mask(7, 7, 3, sink_tokens=0), sliding_window_mask(7, 7, 3))


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 6),
    t=st.integers(1, 20),
    start=st.integers(0, 30),
    sinks=st.integers(0, 6),
    n_kv_head=st.sampled_from([1, 2, 4]),
    alibi=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocked_path_equals_dense_band_attention(window, t, start, sinks, n_kv_head, alibi, seed):
    """Each chunk of queries against its own and the previous chunk of keys (and the sinks) is
    the band mask with sinks over every position, also with up to window - 1 keys from a cache
    before the first query, and sinks far before them (a rolling cache's gap)."""
    torch.manual_seed(seed)
    n = start + t  # positions 0 .. n - 1, the queries the last t
    first = start - min(start, window - 1)  # the first key the queries' windows hold
    q = torch.randn(2, 4, t, 8, dtype=torch.float64)
    k, v = (torch.randn(2, n_kv_head, n, 8, dtype=torch.float64) for _ in range(2))
    slopes = alibi_slopes(4).double() if alibi else None
    mask = sliding_window_mask(t, n, window, sink_tokens=sinks)  # (t, n)
    if alibi:
        mask = alibi_bias(slopes, t, n).masked_fill(~mask, float("-inf"))  # (4, t, n)
    expected = sdpa_reference(q, k, v, mask, enable_gqa=n_kv_head != 4)
    s = min(sinks, n)
    sink_k, sink_v = (k[:, :, :s], v[:, :, :s]) if s else (None, None)
    got = blocked_local_attention(
        q, k[:, :, first:], v[:, :, first:], window, slopes, 0.0, sink_k, sink_v, start
    )
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(
    "window, n_kv_head, sinks", [(1, None, 0), (4, 2, 0), (5, None, 0), (7, 1, 0), (4, 2, 3),
                                 (3, None, 9), (5, 1, 1)]
)  # fmt: skip
def test_fast_blocked_and_reference_dense_paths_agree(positions, window, n_kv_head, sinks):
    fast, ref = _pair(window, positions, n_kv_head, sink_tokens=sinks)
    x = torch.randn(2, 23, 32)  # longer than the window: the fast path is the blocked one
    y_ref, weights = ref(x, need_weights=True)
    torch.testing.assert_close(fast(x), y_ref, atol=1e-5, rtol=1e-5)
    outside = ~sliding_window_mask(23, 23, window, sink_tokens=sinks)
    assert torch.all(weights[..., outside] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 23))


def test_blocked_path_gradients_equal_the_dense_ones_and_reach_every_parameter():
    fast, ref = _pair(window=4, positions="rope", n_kv_head=2)
    x = torch.randn(2, 19, 32, requires_grad=True)
    fast(x).square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        # gradients up to size ~30: an atol of 1e-5 of each tensor's largest entry
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * q.grad.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
@pytest.mark.parametrize("window", [9, 40])
def test_a_window_at_least_the_sequence_length_is_full_causal_attention(positions, window):
    cfg = AttentionConfig(n_embd=32, n_head=4, block_size=40, positions=positions)
    local = LocalAttention(cfg, n_kv_head=2, window=window).eval()
    full = GroupedQueryAttention(cfg, n_kv_head=2).eval()
    full.load_state_dict(local.state_dict())  # same projections, same layout as "gqa"
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(local(x), full(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_future_tokens_do_not_change_past_outputs(impl):
    fast, ref = _pair(window=3, positions="rope")
    layer = fast if impl == "sdpa" else ref
    x = torch.randn(1, 14, 32)
    changed = x.clone()
    changed[:, 8:] = torch.randn(1, 6, 32)
    torch.testing.assert_close(layer(changed)[:, :8], layer(x)[:, :8], atol=0, rtol=0)


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
def test_tokens_older_than_the_window_do_not_matter(positions):
    fast, _ = _pair(window=4, positions=positions)
    x = torch.randn(1, 14, 32)
    changed = x.clone()
    changed[:, :3] = torch.randn(1, 3, 32)  # positions 0..2: seen by queries 0..5 only
    y, y_changed = fast(x), fast(changed)
    torch.testing.assert_close(y_changed[:, 6:], y[:, 6:], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(y_changed[:, 5], y[:, 5])


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 17,  # token by token from the start
        [2, 1, 1, 13],  # prompt shorter than the window, then a chunk longer than it
        [9, 1, 1, 1, 5],  # prompt longer than the window, then tokens and a chunk
        [5, 5, 7],  # chunks exactly the window, and longer
    ],
)
@pytest.mark.parametrize("sinks", [0, 2])
def test_cached_decoding_equals_the_full_pass_and_keeps_at_most_window_positions(
    positions, chunks, sinks, decode_in_chunks
):
    """Token by token and in chunks, with sinks too: past position sinks + window - 1 the
    rolling cache hands the queries the sinks and then a window far after them."""
    fast, ref = _pair(window=5, positions=positions, n_kv_head=2, sink_tokens=sinks)
    x = torch.randn(2, 17, 32)
    full = ref(x)
    for cache in (fast.new_cache(batch_size=2), KVCache(2, 2, 8, max_len=17)):
        decoded = decode_in_chunks(fast, x, chunks, cache)
        torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape[2] == 17  # the full KVCache
    rolling = fast.new_cache(batch_size=2)
    assert rolling.max_len is None and rolling.k.shape[2] == rolling.v.shape[2] == sinks + 5


def test_rolling_cache_keeps_the_newest_window_positions_in_order():
    cache = RollingKVCache(1, 1, 1, window=3, max_len=10)
    pos = torch.arange(10.0).view(1, 1, 10, 1)  # key = its position
    k, _ = cache.append(pos[:, :, :2], pos[:, :, :2])
    assert k.flatten().tolist() == [0, 1]
    k, _ = cache.append(pos[:, :, 2:6], pos[:, :, 2:6])
    assert k.flatten().tolist() == [0, 1, 2, 3, 4, 5]  # what queries 2..5 may need
    assert cache.k.flatten().tolist() == [3, 4, 5]
    k, _ = cache.append(pos[:, :, 6:7], pos[:, :, 6:7])
    assert k.flatten().tolist() == [4, 5, 6]  # the window of query 6
    cache.reset()
    k, _ = cache.append(pos[:, :, 7:8], pos[:, :, 7:8])
    assert cache.length == 1 and k.flatten().tolist() == [7]


def test_rolling_cache_with_sinks_keeps_the_first_positions_and_the_newest_window():
    cache = RollingKVCache(1, 1, 1, window=3, sink_tokens=2)
    pos = torch.arange(20.0).view(1, 1, 20, 1)  # key = its position
    k, _ = cache.append(pos[:, :, :1], pos[:, :, :1])
    assert k.flatten().tolist() == [0]
    k, _ = cache.append(pos[:, :, 1:4], pos[:, :, 1:4])
    assert k.flatten().tolist() == [0, 1, 2, 3]  # nothing dropped yet: every position
    k, _ = cache.append(pos[:, :, 4:5], pos[:, :, 4:5])
    assert k.flatten().tolist() == [0, 1, 2, 3, 4]  # the sinks, then the window of query 4
    k, _ = cache.append(pos[:, :, 5:6], pos[:, :, 5:6])
    assert k.flatten().tolist() == [0, 1, 3, 4, 5]  # position 2 dropped: a gap after the sinks
    k, _ = cache.append(pos[:, :, 6:13], pos[:, :, 6:13])
    assert k.flatten().tolist() == [0, 1, 4, 5] + list(range(6, 13))  # windows of queries 6..12
    assert cache.k.flatten().tolist() == [0, 1, 10, 11, 12] and cache.length == 13
    k, _ = cache.append(pos[:, :, 13:14], pos[:, :, 13:14])
    assert k.flatten().tolist() == [0, 1, 11, 12, 13]
    capped = RollingKVCache(1, 1, 1, window=3, max_len=4, sink_tokens=2)
    k, _ = capped.append(pos[:, :, :4], pos[:, :, :4])
    assert capped.k.flatten().tolist() == [0, 1, 2, 3] and k.flatten().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("window, max_len", [(4, 32), (8, 6)])
def test_cache_size_is_window_positions_of_keys_and_values(window, max_len):
    fast, _ = _pair(window=window, n_kv_head=2)
    cache = fast.new_cache(batch_size=3, max_len=max_len)
    assert cache.bytes_per_token == 2 * 2 * 8 * 4  # k and v, 2 kv heads, head_dim 8, float32
    assert cache.nbytes == 3 * min(window, max_len) * cache.bytes_per_token
    half = fast.new_cache(batch_size=3, max_len=max_len, dtype=torch.bfloat16)
    assert half.bytes_per_token == cache.bytes_per_token // 2


def test_training_with_dropout_runs_the_blocked_path_and_backpropagates():
    fast, _ = _pair(window=4, dropout=0.5)
    fast.train()
    x = torch.randn(2, 13, 32)
    fast(x).sum().backward()
    assert fast.c_attn.weight.grad.abs().sum() > 0
    fast.eval()
    torch.testing.assert_close(fast(x), fast(x))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        LocalAttention(AttentionConfig(n_embd=32, n_head=4), window=0)
    with pytest.raises(ValueError, match="window must be a positive integer, got -3"):
        LocalAttention(AttentionConfig(n_embd=32, n_head=4), window=-3)
    with pytest.raises(ValueError, match="causal must be True"):
        LocalAttention(AttentionConfig(n_embd=32, n_head=4, causal=False))
    fast, _ = _pair(window=4, block_size=8)
    with pytest.raises(ValueError, match="max_len must be a positive integer, got 0"):
        fast.new_cache(1, max_len=0)  # any number past block_size: the cache is bounded
    cache = fast.new_cache(1, max_len=6)
    fast(torch.randn(1, 5, 32), cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow: built for max_len=6"):
        fast(torch.randn(1, 2, 32), cache=cache)
    with pytest.raises(
        ValueError, match=r"expected k of shape \(1, 4, 1, 8\) and v of shape \(1, 4, 1, 8\)"
    ):
        cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        fast(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="window must be positive, got 0"):
        sliding_window_mask(3, 3, window=0)
    with pytest.raises(ValueError, match="sink_tokens must be an integer >= 0, got -1"):
        LocalAttention(AttentionConfig(n_embd=32, n_head=4), window=4, sink_tokens=-1)
    with pytest.raises(ValueError, match="sink_tokens must be an integer >= 0, got True"):
        LocalAttention(AttentionConfig(n_embd=32, n_head=4), window=4, sink_tokens=True)
    with pytest.raises(ValueError, match="impl='flash' masks by the window only.*impl='sdpa'"):
        LocalAttention(AttentionConfig(n_embd=32, n_head=4, impl="flash"), sink_tokens=2)
    with pytest.raises(ValueError, match="keeps window=4, sink_tokens=0, less than"):
        _pair(window=4, sink_tokens=1)[0](torch.randn(1, 2, 32), cache=fast.new_cache(1))
    with pytest.raises(ValueError, match="needs 0 <= T_k - T < window=2, got T_k=5 keys for T=3"):
        blocked_local_attention(torch.randn(1, 1, 3, 4), *torch.randn(2, 1, 1, 5, 4), window=2)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_a_full_kv_cache_holding_more_than_the_window_still_gives_the_full_pass(positions):
    """With an ordinary KVCache the keys before the window are cached too; chunks longer than
    the window (blocked path) after them must ignore them."""
    fast, _ = _pair(window=4, positions=positions)
    x = torch.randn(2, 24, 32)
    cache = KVCache(2, fast.n_kv_head, fast.head_dim, max_len=32)
    out = torch.cat([fast(x[:, a:b], cache=cache) for a, b in [(0, 9), (9, 10), (10, 24)]], 1)
    torch.testing.assert_close(out, fast(x), atol=1e-5, rtol=1e-5)
