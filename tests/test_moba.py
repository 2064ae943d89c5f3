import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbook.attention import (
    AttentionConfig,
    MoBAAttention,
    MultiHeadAttention,
    build_attention,
    causal_mask,
    sdpa_reference,
)
from attnbook.attention.moba import PartialAttention, moba_attention, moba_gate, moba_mask
from attnbook.kv_cache import KVCache
from attnbook.positions import alibi_bias, alibi_slopes

# 24 positions in 6 chunks of 4, each query keeping its own chunk and 1 past chunk: far from
# full causal attention
CHUNKS = dict(moba_chunk_size=4, moba_topk=2)


def _pair(positions="none", n_kv_head=None, block_size=24, options=CHUNKS, **kw):
    """The fast ("sdpa": moba_attention) and reference ("reference": dense mask) layers, same
    weights."""
    cfg = dict(n_embd=32, n_head=4, block_size=block_size, positions=positions, **kw)
    fast = MoBAAttention(AttentionConfig(**cfg), n_kv_head=n_kv_head, **options).eval()
    ref = MoBAAttention(AttentionConfig(**cfg, impl="reference"), n_kv_head=n_kv_head, **options)
    ref.load_state_dict(fast.state_dict())
    return fast, ref.eval()


def slow_moba(q, k, v, chunk_size, topk, slopes=None):
    """MoBA by hand, one query at a time: chunk means, the gate, the top-k chunks chosen by
    sorting, a softmax over the chosen keys. q ``(B, H, T, D)``, k, v ``(B, H_kv, T_k, D)``,
    queries at the last ``T`` positions."""
    B, H, T, D = q.shape
    t_k, group = k.shape[2], H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            keys, values = k[b, h // group], v[b, h // group]  # (T_k, D)
            for i in range(T):
                p = t_k - T + i
                own = p // chunk_size
                gate = {
                    j: float(q[b, h, i] @ keys[j * chunk_size : (j + 1) * chunk_size].mean(0))
                    for j in range(own)  # every chunk before the own one is complete
                }
                chosen = sorted(gate, key=gate.get, reverse=True)[: topk - 1] + [own]
                seen = [s for s in range(p + 1) if s // chunk_size in chosen]
                scores = keys[seen] @ q[b, h, i] / math.sqrt(D)
                if slopes is not None:
                    scores = scores - slopes[h] * (p - torch.tensor(seen, dtype=q.dtype))
                out[b, h, i] = torch.softmax(scores, 0) @ values[seen]
    return out


def _qkv(layer, x):
    """The layer's rotated queries, keys and values for ``x``."""
    q, k, v = layer.project(x)
    return (*layer.position(q, k, 0), v)


def test_registered_with_the_paper_settings():
    layer = build_attention("moba", AttentionConfig(n_embd=32, n_head=4))
    assert isinstance(layer, MoBAAttention)
    assert (layer.options.moba_chunk_size, layer.options.moba_topk) == (64, 3)
    assert MoBAAttention.options_for_length(8192, 8) == dict(moba_chunk_size=512, moba_topk=3)


def test_gate_by_hand():
    """One head, chunks of 2 over 8 keys: the own chunk, then the best past chunks by q . mean."""
    k = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [-1, 0], [-1, 0], [0, 0], [0, 0]])
    q = torch.tensor([[1.0, 0.5]] * 8)  # scores of chunks 0, 1, 2: 1, 0.5, -1
    selected = moba_gate(q[None, None], k[None, None], 2, 2)[0, 0].int()  # (8, 4)
    expected = [[1, 0, 0, 0]] * 2 + [[1, 1, 0, 0]] * 2 + [[1, 0, 1, 0]] * 2 + [[1, 0, 0, 1]] * 2
    assert selected.tolist() == expected
    three = moba_gate(q[None, None], k[None, None], 2, 3)[0, 0].int()
    assert three[6:].tolist() == [[1, 1, 0, 1]] * 2  # chunk 2 (score -1) left out
    mask = moba_mask(q[None, None], k[None, None], 2, 2)[0, 0]  # (8, 8)
    assert mask[5].tolist() == [True, True, False, False, True, True, False, False]
    assert mask[2].tolist() == [True, True, True] + [False] * 5  # own chunk causal


@settings(max_examples=30, deadline=None)
@given(
    t_k=st.integers(1, 30),
    new=st.integers(1, 30),
    chunk=st.integers(1, 6),
    topk=st.integers(1, 5),
    n_kv_head=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_gate_picks_the_own_chunk_and_at_most_topk_minus_one_past_never_a_future(
    t_k, new, chunk, topk, n_kv_head, seed
):
    torch.manual_seed(seed)
    T = min(new, t_k)
    q, k = torch.randn(2, 4, T, 8), torch.randn(2, n_kv_head, t_k, 8)
    selected = moba_gate(q, k, chunk, topk)  # (2, 4, T, n)
    n = -(-t_k // chunk)
    assert selected.shape == (2, 4, T, n)
    own = torch.arange(t_k - T, t_k) // chunk  # (T,)
    chunks = torch.arange(n)
    assert selected[..., chunks == own[:, None]].all()  # the own chunk, always
    assert not selected[..., chunks > own[:, None]].any()  # never a future one
    counts = selected.sum(-1)  # (2, 4, T)
    assert torch.equal(counts, torch.minimum(own + 1, torch.tensor(topk)).expand_as(counts))
    # a query's choice depends on the keys only: the last queries alone choose the same
    torch.testing.assert_close(moba_gate(q[:, :, -1:], k, chunk, topk), selected[:, :, -1:])


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
@pytest.mark.parametrize("t, n_kv_head", [(24, None), (22, 2), (13, 1)])
def test_fast_dense_and_cached_paths_equal_the_slow_reference(positions, t, n_kv_head):
    fast, ref = _pair(positions, n_kv_head)
    fast, ref = fast.double(), ref.double()
    x = torch.randn(2, t, 32, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = _qkv(fast, x)
        slopes = fast.alibi_slopes.double() if positions == "alibi" else None
        expected = fast.out(slow_moba(q, k, v, 4, 2, slopes))  # (2, t, 32)
        torch.testing.assert_close(fast(x), expected, atol=1e-12, rtol=1e-10)
        y_ref, weights = ref(x, need_weights=True)
        torch.testing.assert_close(y_ref, expected, atol=1e-12, rtol=1e-10)
        allowed = moba_mask(q, k, 4, 2)  # (2, 4, t, t)
        assert torch.all(weights[~allowed] == 0) and allowed.sum(-1).max() <= 8
        cache = fast.new_cache(2)
        steps = [fast(x[:, :5], cache=cache)] + [
            fast(x[:, s : s + 1], cache=cache) for s in range(5, t)
        ]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-12, rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 40),
    chunk=st.integers(1, 7),
    topk=st.integers(1, 5),
    n_kv_head=st.sampled_from([1, 2, 4]),
    alibi=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_moba_attention_equals_dense_masked_attention_forward_and_backward(
    t, chunk, topk, n_kv_head, alibi, seed
):
    torch.manual_seed(seed)
    q = torch.randn(2, 4, t, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, n_kv_head, t, 8, dtype=torch.float64, requires_grad=True) for _ in "kv")
    slopes = alibi_slopes(4).double() if alibi else None
    mask = moba_mask(q, k, chunk, topk)  # (2, 4, t, t)
    if alibi:
        mask = alibi_bias(slopes, t, t).masked_fill(~mask, float("-inf"))
    expected = sdpa_reference(q, k, v, mask, enable_gqa=n_kv_head != 4)
    got = moba_attention(q, k, v, chunk, topk, slopes)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    weight = torch.randn_like(got)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    wanted = torch.autograd.grad((expected * weight).sum(), (q, k, v))
    for grad, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("bias", [None, "causal"])
def test_partial_attention_backward_passes_gradcheck(dropout_p, bias):
    """Gradients of the output and of the log-sum-exp, with a group of 2 query heads sharing
    key/value heads; dropout drawn from the same seed at every call."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 1, 5, 3, dtype=torch.float64, requires_grad=True) for _ in "kv")
    mask = None if bias is None else torch.zeros(5, 5, dtype=torch.float64)
    if bias is not None:
        mask = mask.masked_fill(~causal_mask(5), float("-inf"))

    def fn(q, k, v):
        torch.manual_seed(1)
        return PartialAttention.apply(q, k, v, mask, dropout_p)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    out, lse = fn(q, k, v)
    scores = q @ k.transpose(-2, -1) + (0 if mask is None else mask)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    if not dropout_p:
        torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
@pytest.mark.parametrize("options", [dict(moba_chunk_size=4, moba_topk=6), {}])
def test_topk_covering_every_chunk_is_multi_head_attention(positions, options):
    """The contract: ``moba_topk`` >= the number of chunks (6 of 4, or 1 of 64) is "mha" with
    the same weights, without and with a cache."""
    cfg = AttentionConfig(n_embd=32, n_head=4, block_size=24, positions=positions)
    moba = MoBAAttention(cfg, **options).eval()
    mha = MultiHeadAttention(cfg).eval()
    mha.load_state_dict(moba.state_dict())  # same projections, same layout
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(moba(x), mha(x), atol=1e-5, rtol=1e-5)
    cache = moba.new_cache(2)
    steps = [moba(x[:, :7], cache=cache)] + [
        moba(x[:, s : s + 1], cache=cache) for s in range(7, 24)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), mha(x), atol=1e-5, rtol=1e-5)
    q, k, v = _qkv(moba, x)
    assert torch.equal(moba_mask(q, k, 4, 6), causal_mask(24).expand(2, 4, 24, 24))
    slopes, mask = moba.alibi_slopes, causal_mask(24)  # (4,) or None, (24, 24)
    if slopes is not None:
        mask = alibi_bias(slopes, 24, 24).masked_fill(~mask, -math.inf)
    full = sdpa_reference(q, k, v, mask)
    torch.testing.assert_close(moba_attention(q, k, v, 4, 6, slopes), full, atol=1e-5, rtol=1e-5)


def test_a_small_topk_changes_the_output_and_skips_unchosen_chunks():
    fast, _ = _pair("rope")
    mha = MultiHeadAttention(fast.config).eval()
    mha.load_state_dict(fast.state_dict())
    x = torch.randn(1, 24, 32)
    assert (fast(x) - mha(x)).abs().max() > 1e-2
    q, k, v = _qkv(fast, x)
    selected = moba_gate(q, k, 4, 2)[0]  # (4, 24, 6)
    h, i, j = torch.nonzero(~selected[:, 20:, :5])[0].tolist()  # query 20 + i skips chunk j
    v_changed = v.clone()
    v_changed[:, h, 4 * j : 4 * j + 4] = torch.randn(4, 8)
    y, y_changed = moba_attention(q, k, v, 4, 2), moba_attention(q, k, v_changed, 4, 2)
    torch.testing.assert_close(y_changed[0, h, 20 + i], y[0, h, 20 + i], atol=0, rtol=0)
    assert not torch.allclose(y_changed[0, h, 4 * j], y[0, h, 4 * j])  # its own chunk


def test_query_heads_of_a_group_choose_their_own_chunks():
    fast, _ = _pair(n_kv_head=2)
    q, k, _ = _qkv(fast, torch.randn(1, 24, 32))
    assert k.shape[1] == 2
    selected = moba_gate(q, k, 4, 2)  # (1, 4, 24, 6): heads 0, 1 share key head 0
    assert not torch.equal(selected[:, 0], selected[:, 1])


def test_gradients_equal_the_dense_ones_and_reach_every_parameter():
    fast, ref = _pair("rope", n_kv_head=2)
    x = torch.randn(2, 22, 32, requires_grad=True)
    fast(x).square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, atol=1e-5, rtol=1e-5)
    for (name, p), r in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5 * r.grad.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_future_tokens_do_not_change_past_outputs(impl):
    fast, ref = _pair("rope")
    layer = fast if impl == "sdpa" else ref
    x = torch.randn(1, 24, 32)
    changed = x.clone()
    changed[:, 10:] = torch.randn(1, 14, 32)  # mid-chunk: the own chunk must be causal
    torch.testing.assert_close(layer(changed)[:, :10], layer(x)[:, :10], atol=0, rtol=0)


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 24,  # token by token from the start
        [2, 1, 1, 13, 7],  # a prompt shorter than a chunk, then uneven chunks
        [9, 1, 1, 1, 12],  # a prompt ending mid-chunk, then tokens
        [4, 8, 12],  # whole chunks
    ],
)
def test_cached_decoding_equals_the_full_pass(positions, chunks, decode_in_chunks):
    fast, _ = _pair(positions, n_kv_head=2)
    x = torch.randn(2, 24, 32)
    full = fast(x)  # moba_attention: not the dense mask that decoding uses
    cache = fast.new_cache(batch_size=2)
    assert isinstance(cache, KVCache)
    decoded = decode_in_chunks(fast, x, chunks, cache)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


def test_training_with_dropout_runs_the_fast_path_and_backpropagates():
    fast, _ = _pair(dropout=0.5)
    fast.train()
    x = torch.randn(2, 17, 32)
    y = fast(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and fast.c_attn.weight.grad.abs().sum() > 0
    fast.eval()
    torch.testing.assert_close(fast(x), fast(x))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(moba_chunk_size=0), "moba_chunk_size must be a positive integer, got 0"),
        (dict(moba_chunk_size=2.0), "moba_chunk_size must be a positive integer, got 2.0"),
        (dict(moba_topk=-1), "moba_topk must be a positive integer, got -1"),
        (dict(moba_topk=True), "moba_topk must be a positive integer, got True"),
        (dict(n_kv_head=3), "n_kv_head=3 does not divide n_head=4"),
    ],
)
def test_bad_options_raise_naming_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        MoBAAttention(AttentionConfig(n_embd=32, n_head=4), **options)


def test_what_it_cannot_honour_is_refused():
    with pytest.raises(ValueError, match="causal must be True"):
        MoBAAttention(AttentionConfig(n_embd=32, n_head=4, causal=False))
    with pytest.raises(ValueError, match="impl='flash' .* use impl='sdpa' or 'reference'"):
        MoBAAttention(AttentionConfig(n_embd=32, n_head=4, impl="flash"))
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="got T=6 queries and T_k=8 keys: use moba_mask"):
        moba_attention(q, k, k, 4, 2)
    with pytest.raises(ValueError, match="needs T_k >= T keys, got T=8 queries and T_k=6"):
        moba_gate(k, q, 4, 2)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        moba_gate(q, k, 0, 2)


def test_bfloat16_autocast_runs_the_fast_path_like_the_dense_one():
    fast, ref = _pair("rope")
    x = torch.randn(2, 24, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = fast(x), ref(x)  # the same rounded q and k: the same chunks chosen
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)
