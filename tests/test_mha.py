import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnbook.attention import (
    AttentionConfig,
    Head,
    MultiHeadAttention,
    build_attention,
    causal_mask,
    padding_mask,
)


def _pair(**kwargs):
    """The module on the fast path and a copy on the reference path, with the same weights."""
    fast = MultiHeadAttention(AttentionConfig(**kwargs, impl="sdpa"))
    ref = MultiHeadAttention(AttentionConfig(**kwargs, impl="reference"))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@settings(max_examples=40, deadline=None)
@given(
    n_head=st.integers(1, 6),
    head_dim=st.integers(1, 8),
    batch=st.integers(1, 3),
    t=st.integers(1, 12),
    causal=st.booleans(),
    bias=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_and_reference_paths_agree(n_head, head_dim, batch, t, causal, bias, padded, seed):
    torch.manual_seed(seed)
    fast, ref = _pair(n_embd=n_head * head_dim, n_head=n_head, causal=causal, bias=bias)
    x = torch.randn(batch, t, n_head * head_dim)
    mask = None
    if padded:
        lengths = torch.randint(1, t + 1, (batch,))
        mask = padding_mask(lengths, t)[:, None, None, :]
    torch.testing.assert_close(fast(x, mask), ref(x, mask), atol=1e-5, rtol=1e-5)


def test_agrees_with_torch_multihead_attention():
    d, n_head, T = 48, 6, 10
    ours = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=n_head))
    theirs = nn.MultiheadAttention(d, n_head, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.c_attn.weight)  # q|k|v stacked the same way
        theirs.in_proj_bias.copy_(ours.c_attn.bias)
        theirs.out_proj.weight.copy_(ours.c_proj.weight)
        theirs.out_proj.bias.copy_(ours.c_proj.bias)
    x = torch.randn(3, T, d)
    # nn.MultiheadAttention's boolean masks mean "True = may NOT attend": the opposite of ours
    expected, _ = theirs(x, x, x, attn_mask=~causal_mask(T), need_weights=False)
    assert (ours(x) - expected).abs().max() < 1e-5
    lengths = torch.tensor([10, 4, 7])
    keep = padding_mask(lengths, T)
    expected, _ = theirs(x, x, x, attn_mask=~causal_mask(T), key_padding_mask=~keep)
    assert (ours(x, keep[:, None, None, :]) - expected).abs().max() < 1e-5


def test_agrees_with_concatenated_single_heads():
    d, n_head, T = 32, 4, 9
    cfg = AttentionConfig(n_embd=d, n_head=n_head, bias=False)
    mha = MultiHeadAttention(cfg)
    heads = [Head(d, cfg.head_dim, block_size=T) for _ in range(n_head)]
    wq, wk, wv = mha.c_attn.weight.split(d, dim=0)  # each (d, d): rows grouped head by head
    with torch.no_grad():
        for h, head in enumerate(heads):
            rows = slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)
            head.query.weight.copy_(wq[rows])
            head.key.weight.copy_(wk[rows])
            head.value.weight.copy_(wv[rows])
    x = torch.randn(2, T, d)
    expected = mha.c_proj(torch.cat([head(x) for head in heads], dim=-1))
    torch.testing.assert_close(mha(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_causality(impl):
    attn = build_attention("mha", AttentionConfig(n_embd=16, n_head=2, impl=impl))
    x = torch.randn(2, 8, 16)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 3, 16)
    torch.testing.assert_close(attn(x)[:, :5], attn(x2)[:, :5])
    assert not torch.allclose(attn(x)[:, 5:], attn(x2)[:, 5:])


def test_non_causal_sees_the_future():
    attn = build_attention("mha", AttentionConfig(n_embd=16, n_head=2, causal=False))
    x = torch.randn(1, 6, 16)
    x2 = x.clone()
    x2[:, -1] += 1
    assert not torch.allclose(attn(x)[:, 0], attn(x2)[:, 0])


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_gradients_reach_every_parameter(impl):
    attn = build_attention("mha", AttentionConfig(n_embd=16, n_head=4, impl=impl))
    attn(torch.randn(2, 5, 16)).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_count():
    d = 64
    with_bias = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=8))
    without = MultiHeadAttention(AttentionConfig(n_embd=d, n_head=8, bias=False))
    assert sum(p.numel() for p in with_bias.parameters()) == 4 * d * d + 4 * d
    assert sum(p.numel() for p in without.parameters()) == 4 * d * d


def test_need_weights_returns_per_head_causal_maps():
    attn = MultiHeadAttention(AttentionConfig(n_embd=16, n_head=4))
    x = torch.randn(2, 6, 16)
    y, w = attn(x, need_weights=True)
    assert w.shape == (2, 4, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 6))
    assert w.masked_select(~causal_mask(6)).eq(0).all()
    torch.testing.assert_close(y, attn(x), atol=1e-6, rtol=1e-5)


def test_dropout_only_in_training():
    attn = MultiHeadAttention(AttentionConfig(n_embd=16, n_head=2, dropout=0.3))
    x = torch.randn(2, 6, 16)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.equal(attn(x), attn(x))


@pytest.mark.parametrize(
    "x, mask, match",
    [
        (torch.randn(2, 5, 15), None, r"x must have shape \(B, T, n_embd=16\)"),
        (torch.randn(5, 16), None, r"x must have shape"),
        (torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool), "attn_mask of shape"),
    ],
)
def test_bad_inputs_raise_value_error(x, mask, match):
    attn = MultiHeadAttention(AttentionConfig(n_embd=16, n_head=2))
    with pytest.raises(ValueError, match=match):
        attn(x, mask)
