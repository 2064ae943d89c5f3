import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbook.attention import (
    AttentionConfig,
    MultiHeadAttention,
    build_attention,
    causal_mask,
    sdpa_reference,
)
from attnbook.attention.config import POSITIONS
from attnbook.attention.sparse import (
    SparseAttention,
    bigbird_mask,
    bigbird_pattern,
    block_sparse_attention,
    draw_random_blocks,
)
from attnbook.kv_cache import KVCache
from attnbook.positions import alibi_bias, alibi_slopes

# b=4, g=1, w=2, r=1 over 24 positions: 6 blocks, a pattern far from full causal attention
PATTERN = dict(sparse_block=4, n_global_blocks=1, n_window_blocks=2, n_random_blocks=1)


def _pair(positions="none", n_kv_head=None, block_size=24, **kw):
    """The fast ("sdpa", block-sparse) and reference ("reference", dense) layers, same weights
    and the same random blocks."""
    cfg = dict(n_embd=32, n_head=4, block_size=block_size, positions=positions, **kw)
    options = dict(PATTERN, n_kv_head=n_kv_head)
    fast = SparseAttention(AttentionConfig(**cfg), **options).eval()
    ref = SparseAttention(AttentionConfig(**cfg, impl="reference"), **options).eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def test_block_pattern_codes_global_window_and_random_blocks():
    random_blocks = torch.tensor([[-1, -1], [-1, -1], [-1, -1], [1, -1], [1, 2], [2, 3]])
    expected = torch.tensor(
        [
            [2, 0, 0, 0, 0, 0],
            [2, 2, 0, 0, 0, 0],  # block 0 is global and in the window: "window"
            [1, 2, 2, 0, 0, 0],
            [1, 3, 2, 2, 0, 0],
            [1, 3, 3, 2, 2, 0],
            [1, 0, 3, 3, 2, 2],
        ]
    )
    assert torch.equal(bigbird_pattern(6, 1, 2, random_blocks), expected)
    assert torch.equal(bigbird_pattern(4, 1, 2, random_blocks), expected[:4, :4])
    assert torch.equal(bigbird_pattern(6, 0, 6, random_blocks), 2 * torch.ones(6, 6).tril().long())


def test_mask_is_the_block_pattern_at_positions_made_causal():
    random_blocks = draw_random_blocks(6, 1, 2, 1)
    visible = bigbird_pattern(6, 1, 2, random_blocks) > 0  # (6, 6)
    mask = bigbird_mask(23, 23, 4, 1, 2, random_blocks)
    blocks = visible.repeat_interleave(4, 0).repeat_interleave(4, 1)[:23, :23]
    assert torch.equal(mask, blocks & causal_mask(23))
    assert torch.equal(bigbird_mask(5, 23, 4, 1, 2, random_blocks), mask[-5:])  # bottom-right


@pytest.mark.parametrize("g, w, r", [(1, 2, 1), (0, 1, 3), (2, 3, 3), (3, 1, 0), (0, 2, 9)])
def test_each_row_draws_min_r_eligible_distinct_blocks_in_the_eligible_range(g, w, r):
    table = draw_random_blocks(20, g, w, r)
    assert table.shape == (20, r)
    for i, row in enumerate(table.tolist()):
        eligible = max(i - w + 1 - g, 0)  # blocks g .. i - w
        picks = [j for j in row if j != -1]
        assert len(picks) == min(r, eligible)
        assert row[len(picks) :] == [-1] * (r - len(picks))  # -1 only as padding
        assert picks == sorted(set(picks)) and all(g <= j <= i - w for j in picks)
    counts = (bigbird_pattern(20, g, w, table) == 3).sum(1)  # (20,)
    assert counts.tolist() == [min(r, max(i - w + 1 - g, 0)) for i in range(20)]


def test_random_blocks_are_seeded_per_layer_fixed_and_restored_from_a_checkpoint():
    cfg = AttentionConfig(n_embd=32, n_head=4, block_size=256)
    torch.manual_seed(1)
    a, b = SparseAttention(cfg, **PATTERN), SparseAttention(cfg, **PATTERN)
    torch.manual_seed(1)
    again = SparseAttention(cfg, **PATTERN)
    assert not torch.equal(a.random_blocks, b.random_blocks)  # layers differ
    assert torch.equal(a.random_blocks, again.random_blocks)  # the seed reproduces them
    assert a.random_blocks.shape == (256 // 4, 1)
    before = a.random_blocks.clone()
    a(torch.randn(1, 40, 32))
    a(torch.randn(1, 40, 32))
    assert torch.equal(a.random_blocks, before)  # fixed across forward calls
    assert torch.equal(a.state_dict()["random_blocks"], before)  # persistent
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.random_blocks, before) and torch.equal(b.pattern(64), a.pattern(64))


@settings(max_examples=40, deadline=None)
@given(
    block=st.integers(1, 5),
    n_blocks=st.integers(1, 9),
    g=st.integers(0, 3),
    w=st.integers(1, 3),
    r=st.integers(0, 3),
    n_kv_head=st.sampled_from([1, 2, 4]),
    alibi=st.booleans(),
    thinned=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_sparse_path_equals_dense_masked_attention(
    block, n_blocks, g, w, r, n_kv_head, alibi, thinned, seed
):
    """Also for a table with fewer random blocks than it could have: rows then see fewer than
    g + w + r blocks while some past blocks stay hidden, and the filler slots must be masked."""
    torch.manual_seed(seed)
    t = block * n_blocks
    random_blocks = draw_random_blocks(n_blocks, g, w, r)
    if thinned:
        random_blocks[torch.rand(random_blocks.shape) < 0.5] = -1
    q = torch.randn(2, 4, t, 8)
    k, v = torch.randn(2, n_kv_head, t, 8), torch.randn(2, n_kv_head, t, 8)
    slopes = alibi_slopes(4) if alibi else None
    mask = bigbird_mask(t, t, block, g, w, random_blocks)  # (t, t)
    if alibi:
        mask = alibi_bias(slopes, t, t).masked_fill(~mask, float("-inf"))  # (4, t, t)
    expected = sdpa_reference(q, k, v, mask, enable_gqa=n_kv_head != 4)
    got = block_sparse_attention(q, k, v, block, g, w, random_blocks, slopes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("t, n_kv_head", [(24, None), (21, 2), (13, 1), (3, 2)])
def test_fast_block_sparse_and_reference_dense_paths_agree(positions, t, n_kv_head):
    fast, ref = _pair(positions, n_kv_head)
    x = torch.randn(2, t, 32)  # 21 and 13 are padded to whole blocks, 3 is one causal block
    y_ref, weights = ref(x, need_weights=True)
    torch.testing.assert_close(fast(x), y_ref, atol=1e-5, rtol=1e-5)
    outside = ~bigbird_mask(t, t, 4, 1, 2, fast.random_blocks)
    assert torch.all(weights[..., outside] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, t))


def test_block_sparse_gradients_equal_the_dense_ones_and_reach_every_parameter():
    fast, ref = _pair("rope", n_kv_head=2)
    x = torch.randn(2, 22, 32, requires_grad=True)
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
@pytest.mark.parametrize("g, w, r", [(0, 6, 0), (5, 1, 0), (0, 1, 5), (1, 2, 3)])
def test_blocks_covering_the_whole_past_are_full_causal_attention(positions, g, w, r):
    blocks = dict(sparse_block=4, n_global_blocks=g, n_window_blocks=w, n_random_blocks=r)
    cfg = dict(n_embd=32, n_head=4, block_size=24, positions=positions)
    sparse = SparseAttention(AttentionConfig(**cfg), **blocks).eval()
    full = MultiHeadAttention(AttentionConfig(**cfg)).eval()
    weights = {k: v for k, v in sparse.state_dict().items() if k != "random_blocks"}
    full.load_state_dict(weights)  # same projections, same layout as "mha"
    assert torch.all(sparse.pattern(6)[causal_mask(6)] > 0)
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(sparse(x), full(x), atol=1e-5, rtol=1e-5)


def test_the_default_pattern_differs_from_full_causal_attention():
    fast, _ = _pair()
    visible = fast.pattern(6) > 0
    assert not torch.equal(visible, causal_mask(6))
    x = torch.randn(1, 24, 32)
    i, j = torch.nonzero(~visible & causal_mask(6))[0].tolist()  # a past block query block i skips
    changed = x.clone()
    changed[:, 4 * j : 4 * j + 4] = torch.randn(1, 4, 32)
    y, y_changed = fast(x), fast(changed)
    torch.testing.assert_close(y_changed[:, 4 * i : 4 * i + 4], y[:, 4 * i : 4 * i + 4])
    assert not torch.allclose(y_changed[:, 4 * j : 4 * j + 4], y[:, 4 * j : 4 * j + 4])


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_future_tokens_do_not_change_past_outputs(impl):
    fast, ref = _pair("rope")
    layer = fast if impl == "sdpa" else ref
    x = torch.randn(1, 24, 32)
    changed = x.clone()
    changed[:, 10:] = torch.randn(1, 14, 32)  # mid-block: the diagonal block must be causal
    torch.testing.assert_close(layer(changed)[:, :10], layer(x)[:, :10], atol=0, rtol=0)


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])  # the rest add to x, as "none"
@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 24,  # token by token from the start
        [2, 1, 1, 13, 7],  # prompt shorter than a block, then chunks longer than one
        [9, 1, 1, 1, 12],  # prompt longer than a block (block-sparse prefill), then tokens
        [4, 8, 12],  # whole blocks
    ],
)
def test_cached_decoding_follows_the_pattern_and_equals_the_full_pass(
    positions, chunks, decode_in_chunks
):
    fast, ref = _pair(positions, n_kv_head=2)
    x = torch.randn(2, 24, 32)
    full = fast(x)  # the block-sparse path: it does not use the dense mask that decoding uses
    torch.testing.assert_close(ref(x), full, atol=1e-5, rtol=1e-5)
    cache = fast.new_cache(batch_size=2)
    assert isinstance(cache, KVCache)
    decoded = decode_in_chunks(fast, x, chunks, cache)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head, max_len", [(None, 24), (2, 10), (1, 7)])
def test_cache_size_is_every_position_of_keys_and_values(n_kv_head, max_len):
    fast, _ = _pair(n_kv_head=n_kv_head)
    cache = fast.new_cache(batch_size=3, max_len=max_len)
    assert cache.bytes_per_token == 2 * fast.n_kv_head * 8 * 4  # k and v, head_dim 8, float32
    assert cache.nbytes == 3 * max_len * cache.bytes_per_token
    half = fast.new_cache(batch_size=3, max_len=max_len, dtype=torch.bfloat16)
    assert half.bytes_per_token == cache.bytes_per_token // 2


def test_training_with_dropout_runs_the_block_sparse_path_and_backpropagates():
    fast, _ = _pair(dropout=0.5)
    fast.train()
    x = torch.randn(2, 17, 32)
    fast(x).sum().backward()
    assert fast.c_attn.weight.grad.abs().sum() > 0
    fast.eval()
    torch.testing.assert_close(fast(x), fast(x))


def test_registered_as_sparse():
    layer = build_attention("sparse", AttentionConfig(n_embd=32, n_head=4, block_size=64))
    assert isinstance(layer, SparseAttention)
    assert layer.random_blocks.shape == (1, 3)  # one block of the default 64 positions


def test_invalid_arguments():
    with pytest.raises(ValueError, match="sparse_block must be a positive integer, got 0"):
        SparseAttention(AttentionConfig(n_embd=32, n_head=4), sparse_block=0)
    with pytest.raises(ValueError, match="n_window_blocks must be a positive integer, got 0"):
        SparseAttention(AttentionConfig(n_embd=32, n_head=4), n_window_blocks=0)
    with pytest.raises(ValueError, match="n_random_blocks must be an integer >= 0, got -1"):
        SparseAttention(AttentionConfig(n_embd=32, n_head=4), n_random_blocks=-1)
    with pytest.raises(ValueError, match="causal must be True"):
        SparseAttention(AttentionConfig(n_embd=32, n_head=4, causal=False))
    q, k, v = torch.randn(3, 1, 2, 10, 4)
    with pytest.raises(ValueError, match="multiple of sparse_block=4, got T=10"):
        block_sparse_attention(q, k, v, 4, 1, 2, draw_random_blocks(3, 1, 2, 1))
    with pytest.raises(ValueError, match="got T=8 queries and T_k=10 keys"):
        block_sparse_attention(q[:, :, :8], k, v, 4, 1, 2, draw_random_blocks(3, 1, 2, 1))
    with pytest.raises(ValueError, match="drawn for 2 query blocks, got n_blocks=3"):
        bigbird_pattern(3, 1, 2, draw_random_blocks(2, 1, 2, 1))
    with pytest.raises(ValueError, match="needs 0 < t_q <= t_k, got t_q=5, t_k=4"):
        bigbird_mask(5, 4, 2, 1, 2, draw_random_blocks(2, 1, 2, 1))
    fast, _ = _pair(block_size=8)
    with pytest.raises(ValueError, match="the sequence is longer than the layer's block_size"):
        fast(torch.randn(1, 9, 32))
    with pytest.raises(ValueError, match="max_len must be in 1..block_size=8, got 9"):
        fast.new_cache(1, max_len=9)
    cache = fast.new_cache(1, max_len=6)
    fast(torch.randn(1, 5, 32), cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow"):
        fast(torch.randn(1, 2, 32), cache=cache)
