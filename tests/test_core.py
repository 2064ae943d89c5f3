"""The reference attention against PyTorch's, the fast path against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbook.attention import additive_mask, causal_mask, padding_mask, sdpa, sdpa_reference


def _qkv(batch, heads, t_q, t_k, d, dv=None, dtype=torch.float64):
    q = torch.randn(batch, heads, t_q, d, dtype=dtype)
    k = torch.randn(batch, heads, t_k, d, dtype=dtype)
    v = torch.randn(batch, heads, t_k, dv or d, dtype=dtype)
    return q, k, v


def _explicit(q, k, v, allowed, scale):
    """Attention one query at a time with Python loops: the slowest, plainest statement."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in q.shape[:-1]]).tolist():
        *lead, i = idx
        keys = [j for j in range(k.shape[-2]) if allowed[tuple(lead) + (i, j)]]
        if not keys:
            continue  # a query with no key attends to nothing
        s = torch.stack([q[(*lead, i)] @ k[(*lead, j)] * scale for j in keys])
        w = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
        out[(*lead, i)] = sum(w_j * v[(*lead, j)] for w_j, j in zip(w, keys, strict=True))
    return out


def test_reference_equals_a_loop_over_queries():
    q, k, v = _qkv(2, 2, 4, 5, 3, dv=6)
    allowed = torch.rand(2, 2, 4, 5) > 0.4
    expected = _explicit(q, k, v, allowed, 1 / math.sqrt(3))
    torch.testing.assert_close(sdpa_reference(q, k, v, attn_mask=allowed), expected)


mask_kinds = st.sampled_from(["none", "causal", "bool", "float", "bool+causal", "float+causal"])


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    t_q=st.integers(1, 9),
    extra_keys=st.integers(0, 6),
    d=st.integers(1, 16),
    dv=st.integers(1, 16),
    kind=mask_kinds,
    mask_rank=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_fast_path_and_torch_agree_with_reference(
    batch, heads, t_q, extra_keys, d, dv, kind, mask_rank, seed
):
    torch.manual_seed(seed)
    causal = "causal" in kind
    t_k = t_q if causal else t_q + extra_keys
    q, k, v = _qkv(batch, heads, t_q, t_k, d, dv, dtype=torch.float32)  # dv: values' width
    mask_shape = (batch, heads, t_q, t_k)[4 - mask_rank :]
    mask = None
    if kind.startswith("bool"):
        mask = torch.rand(mask_shape) > 0.3
    elif kind.startswith("float"):
        mask = torch.randn(mask_shape).masked_fill(torch.rand(mask_shape) < 0.3, float("-inf"))
    ref, weights = sdpa_reference(q, k, v, mask, is_causal=causal, return_weights=True)
    fast = sdpa(q, k, v, mask, is_causal=causal)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert not ref.isnan().any() and not weights.isnan().any()
    rows = weights.sum(-1)
    assert torch.all(((rows - 1).abs() < 1e-5) | (rows == 0))
    if not (causal and mask is not None):  # torch itself takes a mask or is_causal, not both
        torch.testing.assert_close(
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
            ref,
            atol=1e-5,
            rtol=1e-5,
        )


def test_fast_path_pads_narrow_values_with_the_same_gradients():
    """Values narrower than keys (MLA's) are padded for the fused kernel: output and gradients
    must still be those of the unpadded reference."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 6, 6, 12, dv=5))
    grads = []
    for fn in (sdpa, sdpa_reference):
        out = fn(q, k, v, is_causal=True)
        assert out.shape == (2, 3, 6, 5)
        grads.append(torch.autograd.grad((out * torch.arange(5.0)).sum(), (q, k, v)))
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref)


def test_reference_matches_torch_to_1e6_in_float64():
    q, k, v = _qkv(2, 3, 7, 7, 8)
    mask = torch.rand(2, 1, 7, 7) > 0.5
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}, {"scale": 0.3}):
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
        assert (sdpa_reference(q, k, v, **kwargs) - expected).abs().max() < 1e-6


def test_boolean_and_additive_masks_are_equivalent():
    q, k, v = _qkv(1, 2, 5, 5, 4)
    allowed = torch.rand(5, 5) > 0.5
    bias = torch.zeros(5, 5, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(sdpa_reference(q, k, v, allowed), sdpa_reference(q, k, v, bias))
    torch.testing.assert_close(sdpa(q, k, v, allowed), sdpa(q, k, v, bias))


def test_fully_masked_row_outputs_zeros_not_nan():
    q, k, v = _qkv(1, 1, 3, 3, 4)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[1] = False
    for mask in (allowed, torch.zeros(3, 3, dtype=q.dtype).masked_fill(~allowed, float("-inf"))):
        out, w = sdpa_reference(q, k, v, mask, return_weights=True)
        assert out[0, 0, 1].eq(0).all() and w[0, 0, 1].eq(0).all()
        assert not out.isnan().any()
        torch.testing.assert_close(sdpa(q, k, v, mask), out)
    # the rows that are not masked are untouched
    torch.testing.assert_close(out[0, 0, [0, 2]], sdpa_reference(q, k, v)[0, 0, [0, 2]])


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("fn", [sdpa, sdpa_reference])
def test_fully_masked_row_has_zero_gradient_not_nan(fn, kind):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 3, 3, 4))
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[0] = False
    mask = allowed if kind == "bool" else additive_mask(allowed, dtype=q.dtype)
    fn(q, k, v, mask).sum().backward()
    assert q.grad[0, 0, 0].eq(0).all()
    assert not any(t.grad.isnan().any() for t in (q, k, v))


def test_left_padding_with_causal_mask_gives_zero_rows_for_padded_queries():
    """Left padding + causal: a padded query sees only padded keys, so its row is empty."""
    q, k, v = _qkv(2, 1, 4, 4, 4)
    lengths = torch.tensor([4, 2])
    real = padding_mask(lengths, 4).flip(-1)  # left padding: real tokens at the end
    mask = real[:, None, None, :] & causal_mask(4)  # (B, 1, T, T)
    out = sdpa(q, k, v, mask)
    assert out[1, 0, :2].eq(0).all() and out[1, 0, 2:].ne(0).any()
    torch.testing.assert_close(out, sdpa_reference(q, k, v, mask))


def test_causality_of_is_causal():
    q, k, v = _qkv(1, 2, 6, 6, 4)
    out = sdpa_reference(q, k, v, is_causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[..., 4:, :] += 10
    v2[..., 4:, :] -= 10
    out2 = sdpa_reference(q, k2, v2, is_causal=True)
    torch.testing.assert_close(out[..., :4, :], out2[..., :4, :])
    assert not torch.allclose(out[..., 4:, :], out2[..., 4:, :])


def test_dropout_only_when_asked():
    q, k, v = _qkv(1, 1, 8, 8, 4)
    assert torch.equal(sdpa_reference(q, k, v), sdpa_reference(q, k, v, dropout_p=0.0))
    assert not torch.allclose(sdpa_reference(q, k, v), sdpa_reference(q, k, v, dropout_p=0.5))


@pytest.mark.parametrize("fn", [sdpa, sdpa_reference])
@pytest.mark.parametrize(
    "shapes, kwargs, match",
    [
        (
            ((2, 4, 8), (2, 4, 8), (2, 4, 8)),
            {"attn_mask": torch.ones(3, 3, dtype=torch.bool)},
            "attn_mask of shape",
        ),
        (
            ((2, 4, 8), (2, 4, 8), (2, 4, 8)),
            {"attn_mask": torch.ones(4, 4, dtype=torch.long)},
            "attn_mask must be boolean or float",
        ),
        (
            ((2, 4, 8), (2, 4, 8), (2, 4, 8)),
            {"attn_mask": torch.zeros(4, 4, dtype=torch.float64)},
            "must have the dtype of q",
        ),
        (((2, 4, 8), (2, 5, 8), (2, 5, 8)), {"is_causal": True}, "is_causal=True needs T_q == T_k"),
        (((2, 4, 8), (2, 4, 7), (2, 4, 8)), {}, "head_dim"),
        (((2, 4, 8), (2, 4, 8), (2, 5, 8)), {}, "same number of positions"),
        (((2, 4, 8), (3, 4, 8), (3, 4, 8)), {}, "leading"),
        (((4, 8), (2, 4, 8), (2, 4, 8)), {}, "same number of dimensions"),
        (((2, 4, 8), (2, 4, 8), (2, 4, 8)), {"dropout_p": 1.0}, "dropout_p"),
        (((2, 4, 8), (2, 4, 8), (2, 4, 8)), {"dropout_p": -0.1}, "dropout_p"),
    ],
)
def test_bad_arguments_raise_value_error(fn, shapes, kwargs, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, **kwargs)


def test_mask_that_would_enlarge_the_scores_is_rejected():
    q, k, v = (torch.randn(1, 4, 8) for _ in range(3))
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa(q, k, v, torch.ones(3, 1, 4, 4, dtype=torch.bool))
