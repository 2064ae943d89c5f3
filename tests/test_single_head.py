import pytest
import torch

from attnbook.attention import Head, SelfAttention, sdpa_reference


def test_self_attention_matches_reference_attention():
    attn = SelfAttention(d_in=6, d_out=4, qkv_bias=True)
    x = torch.randn(2, 5, 6)
    q, k, v = attn.W_query(x), attn.W_key(x), attn.W_value(x)
    torch.testing.assert_close(attn(x), sdpa_reference(q, k, v))


def test_head_matches_causal_reference_attention():
    head = Head(n_embd=8, head_size=4, block_size=10)
    x = torch.randn(3, 7, 8)
    q, k, v = head.query(x), head.key(x), head.value(x)
    torch.testing.assert_close(head(x), sdpa_reference(q, k, v, is_causal=True))


def test_head_is_causal():
    head = Head(n_embd=8, head_size=4, block_size=10)
    x = torch.randn(1, 9, 8)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 4, 8)
    torch.testing.assert_close(head(x)[:, :5], head(x2)[:, :5])
    assert not torch.allclose(head(x)[:, 5:], head(x2)[:, 5:])


def test_mask_buffer_is_not_saved():
    head = Head(n_embd=8, head_size=4, block_size=10)
    assert "tril" not in head.state_dict()
    assert sorted(head.state_dict()) == ["key.weight", "query.weight", "value.weight"]


@pytest.mark.parametrize("module", [SelfAttention(8, 4, dropout=0.5), Head(8, 4, 16, dropout=0.5)])
def test_dropout_is_off_in_eval_mode(module):
    x = torch.randn(2, 6, 8)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))


@pytest.mark.parametrize("module", [SelfAttention(8, 4), Head(8, 4, 16)])
def test_gradients_reach_every_parameter(module):
    module(torch.randn(2, 6, 8)).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SelfAttention(0, 4), "d_in must be a positive integer"),
        (lambda: SelfAttention(4, -1), "d_out must be a positive integer"),
        (lambda: SelfAttention(4, 4, dropout=1.0), "dropout must be in"),
        (lambda: Head(8, 4, 0), "block_size must be a positive integer"),
        (lambda: Head(8, 0, 4), "head_size must be a positive integer"),
        (lambda: Head(8, 4, 4, dropout=-0.5), "dropout must be in"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    with pytest.raises(ValueError, match="exceeds block_size=4"):
        Head(8, 4, 4)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match=r"\(B, T, n_embd=8\)"):
        Head(8, 4, 4)(torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match=r"\(B, T, d_in=8\)"):
        SelfAttention(8, 4)(torch.randn(3, 8))
