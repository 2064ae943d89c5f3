import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbook.attention import (
    AttentionConfig,
    build_attention,
    sdpa_reference,
    sliding_window_mask,
)
from attnbook.attention.nsa import (
    NativeSparseAttention,
    NSAOptions,
    compress,
    compression_mask,
    nsa_attention,
    select_blocks,
    selected_attention,
    selection_mask,
    selection_scores,
)
from attnbook.kv_cache import KVCache

# l=4, d=2, l'=4, n=4, w=4 over 32 positions: 15 compressed blocks, 8 selection blocks of which a
# query chooses one besides the three always selected, a window of 4: every branch is sparse
SIZES = dict(compress_block=4, compress_stride=2, select_block=4, select_count=4, window=4)
T = 32


def _pair(positions="rope", n_kv_head=2, dtype=torch.float32, **sizes):
    """The fast ("sdpa") and dense ("reference") layers, same weights, in eval mode."""
    cfg = dict(n_embd=32, n_head=4, block_size=T, positions=positions)
    options = dict(SIZES, n_kv_head=n_kv_head, **sizes)
    torch.manual_seed(0)
    fast = NativeSparseAttention(AttentionConfig(**cfg), **options).to(dtype).eval()
    ref = NativeSparseAttention(AttentionConfig(**cfg, impl="reference"), **options)
    ref.to(dtype).eval().load_state_dict(fast.state_dict())
    return fast, ref


def _softmax_attention(q, keys, values):
    """One query ``(D,)`` over the rows of ``keys``, ``values``: ``(D,)``."""
    weights = torch.softmax(keys @ q / math.sqrt(q.shape[-1]), dim=0)
    return weights @ values


def _overlap(i, j, o):
    """Positions compressed block ``i`` and selection block ``j`` share, in steps of ``d``."""
    lo = max(i * o.compress_stride, j * o.select_block)
    hi = min(i * o.compress_stride + o.compress_block, (j + 1) * o.select_block)
    return max(hi - lo, 0) / o.compress_stride


@torch.no_grad()
def explicit_nsa(layer, x):
    """NSA written out, one query at a time: ``(output (B, T, n_embd), chosen)`` where
    ``chosen[b][kv_head][t]`` is the set of selection blocks query ``t`` attends to."""
    o = layer.options
    lc, d, ls = o.compress_block, o.compress_stride, o.select_block
    q, k, (v, g) = layer.project(x)
    q, k = layer.position(q, k, 0)
    B, H, T, D = q.shape
    h = k.shape[1]
    G = H // h
    n_cmp = (T - lc) // d + 1 if T >= lc else 0

    def phi(linear, block):  # (l, D) -> (D,)
        return linear.weight @ block.reshape(-1) + (0 if linear.bias is None else linear.bias)

    y = torch.zeros_like(q)
    chosen = [[[None] * T for _ in range(h)] for _ in range(B)]
    for b in range(B):
        for j in range(h):
            k_cmp = [phi(layer.phi_k, k[b, j, i * d : i * d + lc]) for i in range(n_cmp)]
            v_cmp = [phi(layer.phi_v, v[b, j, i * d : i * d + lc]) for i in range(n_cmp)]
            for t in range(T):
                seen = [i for i in range(n_cmp) if i * d + lc - 1 <= t]  # ended by t
                latest = t // ls
                importance = [0.0] * (latest + 1)
                heads = range(j * G, (j + 1) * G)
                probs = {}
                for hq in heads:
                    scores = torch.stack([q[b, hq, t] @ k_cmp[i] for i in seen]) if seen else None
                    probs[hq] = [] if not seen else torch.softmax(scores / math.sqrt(D), 0)
                    for blk in range(latest + 1):
                        importance[blk] += sum(
                            float(p) * _overlap(i, blk, o)
                            for i, p in zip(seen, probs[hq], strict=True)
                        )
                forced = {0, latest, latest - 1}
                ranked = sorted(
                    range(latest + 1), key=lambda c: (c not in forced, -importance[c], c)
                )
                picks = set(ranked[: o.select_count])
                chosen[b][j][t] = picks
                slc = [s for c in sorted(picks) for s in range(c * ls, min(c * ls + ls, t + 1))]
                win = list(range(max(0, t - o.window + 1), t + 1))
                for hq in heads:
                    y_cmp = sum(
                        p * vc for p, vc in zip(probs[hq], [v_cmp[i] for i in seen], strict=True)
                    )
                    y_slc = _softmax_attention(q[b, hq, t], k[b, j, slc], v[b, j, slc])
                    y_win = _softmax_attention(q[b, hq, t], k[b, j, win], v[b, j, win])
                    gates = g[b, hq, t]
                    y[b, hq, t] = gates[0] * y_cmp + gates[1] * y_slc + gates[2] * y_win
    return layer.out(y), chosen


@pytest.mark.parametrize(
    "positions, n_kv_head, t", [("rope", 2, 32), ("none", 1, 27), ("rope", 4, 9)]
)
def test_fast_dense_and_cached_paths_equal_the_explicit_float64_reference(positions, n_kv_head, t):
    fast, ref = _pair(positions, n_kv_head, torch.float64)
    x = torch.randn(2, t, 32, dtype=torch.float64)
    expected, chosen = explicit_nsa(fast, x)
    if t == T:  # a query chooses among its past blocks: not always the same ones
        assert len({frozenset(c) for c in chosen[0][0][16:]}) > 3
    torch.testing.assert_close(fast(x), expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ref(x), expected, atol=1e-12, rtol=1e-10)
    cache = fast.new_cache(2)
    steps = [fast(x[:, :5], cache=cache)] + [
        fast(x[:, s : s + 1], cache=cache) for s in range(5, t)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("positions", ["rope", "none", "learned"])
@pytest.mark.parametrize("chunks", [[1] * T, [3, 1, 1, 9, 2, 16], [5, 27], [T - 1, 1], [T]])
def test_cached_decoding_in_any_chunks_equals_the_full_pass(positions, chunks, decode_in_chunks):
    fast, _ = _pair(positions)
    x = torch.randn(2, T, 32)
    full = fast(x)  # the fast path: selected_attention and blocked_local_attention
    cache = fast.new_cache(batch_size=2)
    assert type(cache) is KVCache
    decoded = decode_in_chunks(fast, x, chunks, cache)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("s", [5, 14, 29])
def test_a_change_at_s_changes_no_output_before_s(impl, s):
    """Also through the compressed blocks that hold s: they end after every query before s."""
    fast, ref = _pair("rope")
    layer = fast if impl == "sdpa" else ref
    x = torch.randn(1, T, 32)
    changed = x.clone()
    changed[:, s] = torch.randn(32)
    y, y_changed = layer(x), layer(changed)
    torch.testing.assert_close(y_changed[:, :s], y[:, :s], atol=0, rtol=0)
    assert not torch.allclose(y_changed[:, s], y[:, s])


def test_the_first_block_and_the_two_latest_are_always_selected():
    t_k, ls, n = 40, 4, 5
    scores = torch.rand(2, 3, 15, 10)  # the last 15 of 40 positions, 10 blocks
    scores[..., 0] = -1.0  # the forced blocks score lowest
    latest = torch.arange(25, 40) // ls  # (15,)
    scores.scatter_(-1, latest.view(1, 1, 15, 1).expand(2, 3, 15, 1), -1.0)
    indices, valid = select_blocks(scores, t_k, ls, n)
    assert indices.shape == valid.shape == (2, 3, 15, n) and valid.all()
    for t, blk in enumerate(latest.tolist()):
        picks = indices[..., t, :]  # (2, 3, n)
        for forced in (0, blk, blk - 1):
            assert (picks == forced).any(-1).all()
        assert (picks <= blk).all()
        best = scores[..., t, 1 : blk - 1].topk(n - 3).indices + 1  # the other picks: the best
        assert torch.equal(picks[..., 3:].sort(-1).values, best.sort(-1).values)
    early, valid = select_blocks(torch.rand(1, 1, 6, 2), 6, 4, 5)
    assert early.shape == (1, 1, 6, 2)  # 2 blocks exist: both, or the first while in it
    assert valid.sum(-1).flatten().tolist() == [1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("t", [32, 30])
def test_every_block_and_a_window_of_t_give_full_causal_attention(n_kv_head, t):
    """With n >= number of blocks and w >= T, each of the two branches is causal attention: the
    tiles of ``selected_attention``, the gated fast path, and the dense path's weights."""
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, t, 8),
        torch.randn(2, n_kv_head, t, 8),
        torch.randn(2, n_kv_head, t, 8),
    )
    full = sdpa_reference(q, k, v, is_causal=True, enable_gqa=n_kv_head != 4)
    everything = select_blocks(torch.rand(2, n_kv_head, t, 8), t, 4, 8)  # 8 of 8 blocks
    torch.testing.assert_close(selected_attention(q, k, v, *everything, 4), full)
    k_cmp, v_cmp = (compress(x, torch.nn.Linear(4 * 8, 8), 4, 2) for x in (k, v))
    sizes = NSAOptions(**dict(SIZES, select_count=8, window=t))
    for branch in (1, 2):  # the gates let one branch through
        g = torch.nn.functional.one_hot(torch.tensor(branch), 3).float().expand(2, 4, t, 3)
        y = nsa_attention(q, k, v, k_cmp, v_cmp, g, sizes)
        torch.testing.assert_close(y, full, atol=1e-5, rtol=1e-5)
    layer, _ = _pair("rope", n_kv_head, select_count=8, window=t)
    x = torch.randn(2, t, 32)
    _, weights = layer(x, need_weights=True)
    q, k, (v, _) = layer.project(x)
    q, k = layer.position(q, k, 0)
    _, causal = sdpa_reference(q, k, v, is_causal=True, return_weights=True, enable_gqa=True)
    torch.testing.assert_close(weights.slc, causal)
    torch.testing.assert_close(weights.win, causal)


@settings(max_examples=30, deadline=None)
@given(
    ls=st.integers(1, 5),
    t=st.integers(1, 30),
    n=st.integers(3, 6),
    n_kv_head=st.sampled_from([1, 2, 4]),
    tile=st.sampled_from([1, 3, 64]),
    seed=st.integers(0, 2**16),
)
def test_selected_attention_equals_dense_attention_with_the_selection_mask(
    ls, t, n, n_kv_head, tile, seed
):
    torch.manual_seed(seed)
    q = torch.randn(2, 4, t, 8, requires_grad=True)
    k = torch.randn(2, n_kv_head, t, 8, requires_grad=True)
    v = torch.randn(2, n_kv_head, t, 8, requires_grad=True)
    indices, valid = select_blocks(torch.rand(2, n_kv_head, t, -(-t // ls)), t, ls, n)
    mask = selection_mask(indices, valid, t, ls).repeat_interleave(4 // n_kv_head, dim=1)
    expected = sdpa_reference(q, k, v, mask, enable_gqa=n_kv_head != 4)  # (2, 4, t, 8)
    got = selected_attention(q, k, v, indices, valid, ls, tile)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_parameter_and_equal_the_dense_ones():
    fast, ref = _pair("rope")
    x = torch.randn(2, 30, 32, requires_grad=True)
    fast(x).square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, atol=1e-5, rtol=1e-5)
    names = {name for name, _ in fast.named_parameters()}
    assert {"phi_k.weight", "phi_v.weight", "g_proj.weight", "c_attn.weight"} <= names
    for (name, p), r in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5 * r.grad.abs().max(), rtol=1e-5)


def test_the_query_heads_of_a_group_share_their_selection():
    fast, _ = _pair("rope", n_kv_head=2)
    x = torch.randn(2, T, 32)
    _, weights = fast(x, need_weights=True)
    seen = weights.slc > 0  # (2, 4, T, T): heads 0, 1 read key/value head 0; heads 2, 3 head 1
    assert torch.equal(seen[:, 0], seen[:, 1]) and torch.equal(seen[:, 2], seen[:, 3])
    assert not torch.equal(seen[:, 0], seen[:, 2])
    # each head alone would choose otherwise: the group's sum decides
    alone = select_blocks(selection_scores(weights.cmp, 4, 2, 4, T // 4), T, 4, 4)  # per query head
    picks = selection_mask(*alone, T, 4)  # (2, 4, T, T)
    assert not torch.equal(picks[:, 0], picks[:, 1]) or not torch.equal(picks[:, 2], picks[:, 3])


def test_weights_of_each_branch_follow_its_mask():
    fast, ref = _pair("rope")
    x = torch.randn(2, T, 32)
    y, weights = ref(x, need_weights=True)
    torch.testing.assert_close(fast(x), y, atol=1e-5, rtol=1e-5)
    cmp_seen = compression_mask(T, T, 4, 2)  # (T, 15)
    assert weights.cmp.shape == (2, 4, T, 15) and torch.all(weights.cmp[..., ~cmp_seen] == 0)
    torch.testing.assert_close(weights.cmp.sum(-1)[..., 3:], torch.ones(2, 4, T - 3))
    assert torch.all(weights.cmp[..., :3, :] == 0)  # the first block ends at position 3
    assert torch.all(weights.win[..., ~sliding_window_mask(T, T, 4)] == 0)
    assert torch.all((weights.win > 0).sum(-1) == torch.arange(1, T + 1).clamp(max=4))
    assert torch.all((weights.slc > 0).sum(-1) <= 4 * 4)  # n blocks of l' keys at most
    torch.testing.assert_close(weights.slc.sum(-1), torch.ones(2, 4, T))


def test_compress_maps_each_block_of_l_positions_every_d():
    x = torch.randn(2, 3, 11, 5)
    phi = torch.nn.Linear(4 * 5, 6)
    out = compress(x, phi, 4, 2)  # blocks at 0, 2, 4, 6: (11 - 4) // 2 + 1 = 4
    assert out.shape == (2, 3, 4, 6)
    for i in range(4):
        torch.testing.assert_close(out[:, :, i], phi(x[:, :, 2 * i : 2 * i + 4].flatten(-2)))
    assert compress(x[:, :, :3], phi, 4, 2).shape == (2, 3, 0, 6)
    ends = torch.tensor([3, 5, 7, 9])
    assert torch.equal(compression_mask(4, 11, 4, 2), ends <= torch.arange(7, 11)[:, None])


@pytest.mark.parametrize("lc, d, ls", [(4, 2, 4), (32, 16, 64), (4, 4, 8), (6, 2, 4), (2, 2, 2)])
def test_selection_scores_are_the_papers_eq_9(lc, d, ls):
    """p_slc[j] = sum_m sum_n p_cmp[(l'/d) j - m - n], both 1-indexed, m < l'/d, n < l/d."""
    t_k = 5 * ls + 3
    n_cmp, n_sel = (t_k - lc) // d + 1, -(-t_k // ls)
    p = torch.rand(2, n_cmp, dtype=torch.float64)
    expected = torch.zeros(2, n_sel, dtype=torch.float64)
    for j in range(1, n_sel + 1):
        for m in range(ls // d):
            for n in range(lc // d):
                i = ls // d * j - m - n  # 1-indexed compressed block
                if 1 <= i <= n_cmp:
                    expected[:, j - 1] += p[:, i - 1]
    torch.testing.assert_close(selection_scores(p, lc, d, ls, n_sel), expected)


def test_a_boolean_padding_mask_hides_keys_from_every_branch():
    """(Cached decoding with it: test_kv_cache.py, for every variant.)"""
    _, ref = _pair("rope")
    x = torch.randn(2, 24, 32)
    real = torch.ones(2, 24, dtype=torch.bool)
    real[1, :5] = False  # row 1 starts with 5 pad positions
    _, weights = ref(x, attn_mask=real[:, None, None, :], need_weights=True)
    assert torch.all(weights.slc[1, ..., :5] == 0) and torch.all(weights.win[1, ..., :5] == 0)
    assert torch.all(weights.cmp[1, ..., :3] == 0)  # blocks 0..2 hold a pad position (0..4)
    assert torch.all(weights.cmp[0, :, 7:, :3] > 0)  # row 0 has no pad; block 2 ends at 7


def test_training_with_dropout_takes_the_dense_path_and_backpropagates():
    cfg = AttentionConfig(n_embd=32, n_head=4, block_size=T, positions="rope", dropout=0.5)
    layer = NativeSparseAttention(cfg, **SIZES).train()
    x = torch.randn(2, T, 32)
    layer(x).sum().backward()
    assert layer.phi_k.weight.grad.abs().sum() > 0
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_options_for_length_make_every_branch_real():
    for t, n_head in [(64, 4), (256, 8), (8192, 8)]:
        options = NativeSparseAttention.options_for_length(t, n_head)
        sizes = NSAOptions(**options)
        assert sizes.compress_block <= t and sizes.window < t
        assert sizes.select_count < -(-t // sizes.select_block)
    paper = dict(
        compress_block=32, compress_stride=16, select_block=64, select_count=16, window=512
    )
    assert NativeSparseAttention.options_for_length(8192, 8) == dict(paper, n_kv_head=4)


def test_registered_as_nsa_with_its_parameters():
    layer = build_attention("nsa", AttentionConfig(n_embd=32, n_head=4, block_size=64))
    assert isinstance(layer, NativeSparseAttention)
    assert layer.phi_k.weight.shape == (8, 8 * 8)  # l * head_dim -> head_dim
    assert layer.g_proj.weight.shape == (3 * 4, 32)
    defaults = NSAOptions()
    sizes = [defaults.compress_block, defaults.compress_stride, defaults.select_block]
    assert sizes + [defaults.select_count, defaults.window] == [8, 4, 16, 4, 32]


def test_what_it_cannot_honour_is_refused_with_what_to_use():
    with pytest.raises(ValueError, match="use impl='sdpa' or 'reference'"):
        NativeSparseAttention(AttentionConfig(n_embd=32, n_head=4, impl="flash"))
    with pytest.raises(ValueError, match="causal must be True"):
        NativeSparseAttention(AttentionConfig(n_embd=32, n_head=4, causal=False))
    with pytest.raises(ValueError, match="positions 'rope'.*not 'alibi'"):
        NativeSparseAttention(AttentionConfig(n_embd=32, n_head=4, positions="alibi"))
    fast, _ = _pair()
    with pytest.raises(ValueError, match="NSA takes a boolean attn_mask"):
        fast(torch.randn(1, 5, 32), attn_mask=torch.zeros(1, 1, 5, 5))
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="got T=3 queries and T_k=5 keys"):
        selected_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                           *select_blocks(torch.rand(1, 2, 3, 2), 5, 4, 3), 4)  # fmt: skip
