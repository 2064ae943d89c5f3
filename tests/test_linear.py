import pytest
import torch

from attnbook.attention import AttentionConfig, available, build_attention
from attnbook.attention.linear import (
    LinearAttention,
    LinearAttentionCache,
    elu_feature_map,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
)
from attnbook.positions import RotaryEmbedding


def _features(B=2, H=3, T=37, d=8, dv=6, rope=False, start=0, seed=0):
    """Positive features φ(q), φ(k), values, and (with ``rope``) the rotated features."""
    g = torch.Generator().manual_seed(seed)
    q, k = (elu_feature_map(torch.randn(B, H, T, d, generator=g)) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g)
    if not rope:
        return q, k, v, None, None
    r = RotaryEmbedding(d, 512)
    return q, k, v, r(q, start), r(k, start)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("T, chunk", [(37, 5), (37, 8), (37, 64), (1, 4), (300, 64)])
def test_three_forms_agree(rope, T, chunk):
    q, k, v, q_rot, k_rot = _features(T=T, rope=rope)
    quadratic = linear_attention_quadratic(q, k, v, q_rot, k_rot)
    recurrent, (S_r, z_r) = linear_attention_recurrent(q, k, v, q_rot, k_rot)
    chunked, (S_c, z_c) = linear_attention_chunked(q, k, v, chunk, q_rot, k_rot)
    assert chunked.shape == (2, 3, T, 6) and S_c.shape == (2, 3, 8, 6) and z_c.shape == (2, 3, 8)
    torch.testing.assert_close(recurrent, quadratic, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, quadratic, atol=1e-4, rtol=1e-4)
    # the states sum T outer products (entries up to ~100): tolerances scaled to their size
    torch.testing.assert_close(S_c, S_r, atol=1e-5 * S_r.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(z_c, z_r, atol=1e-5 * z_r.abs().max().item(), rtol=1e-4)


def test_quadratic_form_is_the_definition():
    """y_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / Σ_{s≤t} φ(q_t)·φ(k_s), written as a double loop."""
    q, k, v, _, _ = _features(B=1, H=1, T=6)
    y, w = linear_attention_quadratic(q, k, v, return_weights=True)
    for t in range(6):
        dots = torch.stack([q[0, 0, t] @ k[0, 0, s] for s in range(t + 1)])  # (t + 1,)
        torch.testing.assert_close(w[0, 0, t, : t + 1], dots / dots.sum())
        torch.testing.assert_close(y[0, 0, t], (dots / dots.sum()) @ v[0, 0, : t + 1])
    assert torch.all(w[0, 0].triu(1) == 0)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_a_state_carries_the_prefix(form):
    """Running the first 17 tokens, then the rest from their state, equals one run."""
    q, k, v, q_rot, k_rot = _features(rope=True)

    def run(sl, state=None):
        args = (q[:, :, sl], k[:, :, sl], v[:, :, sl])
        rot = dict(q_rot=q_rot[:, :, sl], k_rot=k_rot[:, :, sl], state=state)
        if form == "recurrent":
            return linear_attention_recurrent(*args, **rot)
        return linear_attention_chunked(*args, 5, **rot)

    full, _ = run(slice(None))
    first, state = run(slice(0, 17))
    rest, _ = run(slice(17, None), state)
    torch.testing.assert_close(torch.cat([first, rest], dim=2), full, atol=1e-5, rtol=1e-5)


def test_rope_numerator_depends_on_offsets_only():
    """Rotating every feature as positions start..start+T-1 instead of 0..T-1 changes nothing."""
    q, k, v, q0, k0 = _features(rope=True, start=0)
    _, _, _, q9, k9 = _features(rope=True, start=9)
    torch.testing.assert_close(
        linear_attention_quadratic(q, k, v, q9, k9),
        linear_attention_quadratic(q, k, v, q0, k0),
        atol=1e-5,
        rtol=1e-5,
    )
    assert not torch.allclose(
        linear_attention_quadratic(q, k, v, q0, k0), linear_attention_quadratic(q, k, v)
    )


def _layer(positions="rope", linear_chunk=4, **kw):
    cfg = AttentionConfig(**dict(n_embd=32, n_head=4, block_size=20, positions=positions) | kw)
    return build_attention("linear", cfg, linear_chunk=linear_chunk).eval()


def test_registered():
    assert "linear" in available()
    assert isinstance(_layer(), LinearAttention)


@pytest.mark.parametrize("positions", ["rope", "none"])
def test_chunked_module_equals_reference_module(positions):
    fast = _layer(positions)
    ref = _layer(positions, impl="reference")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 19, 32)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "none"])
def test_causal(positions):
    layer = _layer(positions)
    x = torch.randn(2, 15, 32)
    y = layer(x)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 6, 32)
    y2 = layer(x2)
    torch.testing.assert_close(y2[:, :9], y[:, :9], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y2[:, 9:], y[:, 9:])


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("positions", ["rope", "learned", "none"])
@pytest.mark.parametrize("chunks", [[1] * 20, [3, 1, 9, 7], [10, 10], [19, 1], [2, 18]])
def test_cached_decoding_equals_the_full_pass(impl, positions, chunks):
    """Token by token and in pieces shorter and longer than linear_chunk=4."""
    layer = _layer(positions, impl=impl)
    x = torch.randn(2, 20, 32)
    full = layer(x)
    cache = layer.new_cache(batch_size=2)
    outs, start = [], 0
    for size in chunks:
        outs.append(layer(x[:, start : start + size], cache=cache))
        start += size
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.length == 0 and not cache.S.any() and not cache.z.any()
    torch.testing.assert_close(layer(x[:, :5], cache=cache), full[:, :5], atol=1e-5, rtol=1e-5)


def test_state_size_is_independent_of_length():
    layer = _layer()
    cache = layer.new_cache(batch_size=3)
    state_bytes = 4 * (8 * 8 + 8) * 4  # n_head * (d * d_v + d) float32
    assert cache.bytes_per_token == state_bytes and cache.nbytes == 3 * state_bytes
    assert cache.S.shape == (3, 4, 8, 8) and cache.z.shape == (3, 4, 8)
    for _ in range(5):
        layer(torch.randn(3, 4, 32), cache=cache)
        assert cache.bytes_per_token == state_bytes and cache.nbytes == 3 * state_bytes
    assert cache.length == 20


def test_need_weights_returns_the_normalised_quadratic_weights():
    layer = _layer("none")
    x = torch.randn(2, 9, 32)
    y, w = layer(x, need_weights=True)
    assert w.shape == (2, 4, 9, 9)
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
    assert torch.all(w.triu(1) == 0) and torch.all(w >= 0)


def test_gradients_reach_every_parameter():
    layer = _layer("rope").train()
    layer(torch.randn(2, 11, 32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"positions": "alibi"}, "positions"),
        ({"causal": False}, "causal=True"),
        ({"linear_chunk": 0}, "linear_chunk must be a positive integer"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _layer(**{"positions": "rope", **kwargs})


def test_bad_arguments():
    layer = _layer()
    x = torch.randn(1, 6, 32)
    with pytest.raises(ValueError, match="attn_mask must be None"):
        layer(x, attn_mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="need_weights"):
        layer(x, need_weights=True, cache=layer.new_cache(1))
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, n_embd=32\)"):
        layer(torch.randn(1, 6, 31))
    with pytest.raises(ValueError, match="max_len must be a positive integer, got 0"):
        layer.new_cache(1, max_len=0)  # any number past block_size: the state is bounded
    with pytest.raises(ValueError, match="chunk must be a positive integer, got 0"):
        linear_attention_chunked(*_features()[:3], 0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LinearAttentionCache(0, 4, 8, 20)


def test_overflow_raises_and_reset_recovers():
    layer = _layer("none")
    cache = layer.new_cache(1, max_len=5)
    layer(torch.randn(1, 4, 32), cache=cache)
    with pytest.raises(ValueError, match="linear attention cache overflow: built for max_len=5"):
        layer(torch.randn(1, 2, 32), cache=cache)
    assert cache.length == 4
    cache.reset()
    layer(torch.randn(1, 5, 32), cache=cache)
