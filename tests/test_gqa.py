import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbook.attention import (
    AttentionConfig,
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    build_attention,
    sdpa,
    sdpa_reference,
)


def test_gqa_with_as_many_kv_heads_as_query_heads_is_mha():
    cfg = AttentionConfig(n_embd=32, n_head=4)
    mha = MultiHeadAttention(cfg)
    gqa = GroupedQueryAttention(AttentionConfig(n_embd=32, n_head=4), n_kv_head=4)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(gqa(x), mha(x))


def test_gqa_with_one_kv_head_is_mqa():
    mqa = MultiQueryAttention(AttentionConfig(n_embd=32, n_head=4))
    gqa = GroupedQueryAttention(AttentionConfig(n_embd=32, n_head=4), n_kv_head=1)
    gqa.load_state_dict(mqa.state_dict())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(gqa(x), mqa(x))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_is_mha_with_kv_heads_repeated_per_group(n_kv_head):
    """Query head h reads K/V head h // (n_head // n_kv_head): build that MHA explicitly."""
    n_head, hd = 8, 4
    d = n_head * hd
    gqa = GroupedQueryAttention(AttentionConfig(n_embd=d, n_head=n_head), n_kv_head=n_kv_head)
    mha = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=n_head))
    wq, wk, wv = gqa.c_attn.weight.split([d, n_kv_head * hd, n_kv_head * hd])
    bq, bk, bv = gqa.c_attn.bias.split([d, n_kv_head * hd, n_kv_head * hd])
    group = n_head // n_kv_head

    def repeat(t):  # (n_kv_head * hd, ...) -> (n_head * hd, ...), kv head h // group for head h
        return t.reshape(n_kv_head, hd, *t.shape[1:]).repeat_interleave(group, 0).flatten(0, 1)

    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.c_attn.bias.copy_(torch.cat([bq, repeat(bk), repeat(bv)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
    x = torch.randn(3, 9, d)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    n_kv_head=st.sampled_from([1, 2, 3, 6]),
    t=st.integers(1, 10),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_enable_gqa_equals_explicit_repeat(n_kv_head, t, masked, seed):
    torch.manual_seed(seed)
    q = torch.randn(2, 6, t, 4)
    k, v = torch.randn(2, n_kv_head, t, 4), torch.randn(2, n_kv_head, t, 4)
    mask = torch.rand(2, 1, t, t) > 0.3 if masked else None
    group = 6 // n_kv_head
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    expected = sdpa_reference(q, k_rep, v_rep, mask, is_causal=True)
    torch.testing.assert_close(sdpa(q, k, v, mask, is_causal=True, enable_gqa=True), expected)
    torch.testing.assert_close(
        sdpa_reference(q, k, v, mask, is_causal=True, enable_gqa=True), expected
    )


@pytest.mark.parametrize("name", ["gqa", "mqa"])
def test_fast_and_reference_paths_agree(name):
    options = {"n_kv_head": 2} if name == "gqa" else {}
    fast = build_attention(name, AttentionConfig(n_embd=48, n_head=6), **options)
    ref = build_attention(name, AttentionConfig(n_embd=48, n_head=6, impl="reference"), **options)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 11, 48)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)


def test_fewer_kv_heads_fewer_parameters():
    def count(name, **kw):
        attn = build_attention(name, AttentionConfig(n_embd=64, n_head=8, bias=False), **kw)
        return sum(p.numel() for p in attn.parameters())

    d, hd = 64, 8
    assert count("mha") == 4 * d * d
    assert count("gqa", n_kv_head=2) == 2 * d * d + 2 * d * 2 * hd
    assert count("mqa") == 2 * d * d + 2 * d * hd


def test_gradients_reach_every_parameter():
    attn = build_attention("gqa", AttentionConfig(n_embd=16, n_head=4), n_kv_head=2)
    attn(torch.randn(2, 5, 16)).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "name, n_kv_head, match",
    [
        ("gqa", 3, "n_kv_head=3 does not divide n_head=8"),
        ("gqa", 0, "n_kv_head must be a positive integer"),
        ("mha", 2, "has no option n_kv_head .* gqa, local, moba, mqa, nsa, sparse"),
        ("mqa", 2, "mqa has a single key/value head, got n_kv_head=2: use 'gqa'"),
    ],
)
def test_bad_kv_head_counts(name, n_kv_head, match):
    with pytest.raises(ValueError, match=match):
        build_attention(name, AttentionConfig(n_embd=64, n_head=8), n_kv_head=n_kv_head)


def test_core_rejects_kv_heads_that_do_not_divide():
    q, k = torch.randn(1, 6, 3, 4), torch.randn(1, 4, 3, 4)
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="leading"):
        sdpa(q, k[:, :3], k[:, :3])  # fewer kv heads without enable_gqa
