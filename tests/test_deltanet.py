"""The delta rule and Gated DeltaNet: three forms agree, reductions, the layer, its cache."""

import pytest
import torch
import torch.nn.functional as F

from attnbook.attention import AttentionConfig, available, build_attention
from attnbook.attention.deltanet import (
    DeltaNet,
    DeltaNetCache,
    GatedDeltaNet,
    delta_rule_chunked,
    delta_rule_recurrent,
    delta_rule_weights,
)

B, H, DK, DV = 2, 3, 8, 5
F64 = dict(dtype=torch.float64)


def _inputs(T, seed=0, gated=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, DK, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, DK, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, DV, generator=g, dtype=dtype)
    beta = torch.rand(B, H, T, generator=g, dtype=dtype)
    logdecay = -torch.rand(B, H, T, generator=g, dtype=dtype) if gated else None
    return q, k, v, beta, logdecay


def _explicit(q, k, v, beta, g, state, delta=True):
    """The rule written as the papers do, one token at a time in float64 with the decay as a
    factor and the write as ``S (I - β k kᵀ)``-style matrices: ``S_t = α_t (I - β_t k_t k_tᵀ)
    S_{t-1} + β_t k_t v_tᵀ`` (``d_k x d_v`` state), read ``o_t = S_tᵀ q_t``."""
    outs = torch.zeros(*v.shape, **F64)
    S = state.clone()
    eye = torch.eye(k.shape[-1], **F64)
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(k.shape[2]):
                kt, vt, bt = k[b, h, t], v[b, h, t], beta[b, h, t]
                alpha = 1.0 if g is None else g[b, h, t].exp()
                write = eye - bt * torch.outer(kt, kt) if delta else eye
                s = alpha * write @ s + bt * torch.outer(kt, vt)
                outs[b, h, t] = s.T @ q[b, h, t]
            S[b, h] = s
    return outs, S


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("delta", [True, False])
@pytest.mark.parametrize("T", [1, 7, 16, 37])
def test_recurrent_chunked_and_weights_equal_the_explicit_rule(gated, delta, T):
    q, k, v, beta, g = _inputs(T, gated=gated)
    state = torch.randn(B, H, DK, DV, generator=torch.Generator().manual_seed(1), **F64)
    ref, ref_state = _explicit(q, k, v, beta, g, state, delta)
    out, S = delta_rule_recurrent(q, k, v, beta, g, state, delta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, ref_state, rtol=0, atol=1e-12)
    for chunk in (1, 3, 8, 64):  # lengths not divisible by the chunk, and one longer chunk
        out, S = delta_rule_chunked(q, k, v, beta, chunk, g, state, delta)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(S, ref_state, rtol=0, atol=1e-12)
    W = delta_rule_weights(q, k, beta, g, delta)  # from a zero state
    assert W.shape == (B, H, T, T) and torch.all(W.triu(1) == 0)
    torch.testing.assert_close(
        W @ v, _explicit(q, k, v, beta, g, state * 0, delta)[0], atol=1e-12, rtol=0
    )


def test_gate_one_and_beta_one_is_the_plain_delta_rule_which_overwrites_a_key():
    """With α = β = 1 the write sets S's answer for k exactly: S_tᵀ k_t = v_t."""
    q, k, v, _, _ = _inputs(9)
    ones = torch.ones(B, H, 9, **F64)
    plain, _ = delta_rule_recurrent(k, k, v, ones)  # query each key right after its write
    gated, _ = delta_rule_chunked(k, k, v, ones, 4, g=torch.zeros_like(ones))
    torch.testing.assert_close(plain, v, rtol=0, atol=1e-12)
    torch.testing.assert_close(gated, v, rtol=0, atol=1e-12)


def test_without_the_delta_term_it_is_linear_attention_and_with_orthogonal_keys_it_changes_nothing():
    q, k, v, beta, _ = _inputs(6)
    ones = torch.ones_like(beta)
    lin, _ = delta_rule_chunked(q, k, v, ones, 4, delta=False)
    weights = (q @ k.transpose(-2, -1)).tril()  # unnormalised causal linear attention
    torch.testing.assert_close(lin, weights @ v, rtol=0, atol=1e-12)
    basis = torch.eye(DK, **F64)[torch.randperm(DK, generator=torch.Generator().manual_seed(0))]
    ortho = basis[:6].expand(B, H, 6, DK)  # six orthogonal unit keys: nothing to correct
    torch.testing.assert_close(
        delta_rule_recurrent(q, ortho, v, beta)[0],
        delta_rule_recurrent(q, ortho, v, beta, delta=False)[0],
        rtol=0,
        atol=1e-12,
    )


def test_long_strongly_decaying_sequences_keep_finite_outputs_and_gradients_in_float32():
    T = 2048
    q, k, v, beta = (t.float() for t in _inputs(T)[:4])
    g = torch.full((B, H, T), -30.0)  # exp(-30 * 64) underflows inside a chunk
    g[..., T // 2 :] = -1e-4  # and a long stretch that barely forgets
    tensors = [t.requires_grad_() for t in (q, k, v, beta, g)]
    out, S = delta_rule_chunked(*tensors[:4], 64, g=tensors[4])
    (out.square().sum() + S.sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(t.grad).all() for t in tensors)


def test_float32_chunked_matches_float64_recurrent_on_a_long_sequence():
    q, k, v, beta, g = _inputs(1000, seed=3)
    ref, _ = delta_rule_recurrent(q, k, v, beta, g)
    out, _ = delta_rule_chunked(*(t.float() for t in (q, k, v, beta)), 64, g=g.float())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)


# ---- the layers ---------------------------------------------------------------------------


def _layer(name, impl="sdpa", positions="none", **options):
    torch.manual_seed(0)
    cfg = AttentionConfig(32, 4, block_size=48, positions=positions, impl=impl)
    return build_attention(name, cfg, **options).eval()


def test_both_are_registered_and_share_the_code():
    assert {"deltanet", "gated_deltanet"} <= set(available())
    assert issubclass(GatedDeltaNet, DeltaNet)
    assert _layer("deltanet").options.use_gate is False
    assert _layer("gated_deltanet").options.use_gate is True


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("positions", ["none", "rope"])
@pytest.mark.parametrize("use_short_conv", [True, False])
def test_chunked_recurrent_weights_and_cached_by_chunks_agree(name, positions, use_short_conv):
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    opts = dict(chunk_size=8, use_short_conv=use_short_conv)
    chunked = _layer(name, "sdpa", positions, **opts).double()
    recurrent = _layer(name, "reference", positions, **opts).double()
    full = chunked(x)
    torch.testing.assert_close(recurrent(x), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked(x, need_weights=True)[0], full, rtol=0, atol=1e-12)
    token_by_token = [(t, t + 1) for t in range(45)]
    for layer in (chunked, recurrent):
        for bounds in ([(0, 19), (19, 20), (20, 21), (21, 45)], token_by_token):
            cache = layer.new_cache(2)
            parts = [layer(x[:, a:b], cache=cache) for a, b in bounds]
            torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)


def test_use_delta_false_writes_the_plain_sum_in_every_form():
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    plain = _layer("gated_deltanet", "sdpa", "rope", chunk_size=8, use_delta=False).double()
    recurrent = _layer("gated_deltanet", "reference", "rope", chunk_size=8, use_delta=False)
    delta = _layer("gated_deltanet", "sdpa", "rope", chunk_size=8).double()  # the same weights
    full = plain(x)
    torch.testing.assert_close(recurrent.double()(x), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain(x, need_weights=True)[0], full, rtol=0, atol=1e-12)
    cache = plain.new_cache(2)
    parts = [plain(x[:, a:b], cache=cache) for a, b in [(0, 19), (19, 20), (20, 45)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)
    assert (delta(x) - full).abs().max() > 1e-3  # the correction changes the output


def test_the_short_convolution_is_causal_and_reaches_conv_size_tokens_back():
    layer = _layer("deltanet", conv_size=3).double()
    x = torch.randn(1, 20, 32, dtype=torch.float64, requires_grad=True)
    layer(x)[0, 10].sum().backward()
    moved = x.grad[0].abs().sum(-1) > 0  # (T,): which inputs position 10 depends on
    assert not moved[11:].any() and moved[:11].all()  # causal, and the state reaches everything
    assert layer.new_cache(1).conv.shape == (1, 96, 2)  # the last 2 inputs of q, k and v
    assert _layer("deltanet", use_short_conv=False).new_cache(1).conv.shape == (1, 96, 0)


def test_gated_deltanet_decays_in_zero_one_and_forgets():
    layer = _layer("gated_deltanet")
    x = torch.randn(3, 10, 32)
    g = layer.log_decay(x)
    assert g.shape == (3, 4, 10) and (g <= 0).all() and (g > -20).all()
    rates = layer.A_log.exp() * F.softplus(layer.dt_bias)  # -g at a zero input, per head
    assert rates.min() > 0 and rates.max() / rates.min() > 3  # spread over heads


def test_cache_holds_a_constant_size_state():
    layer = _layer("gated_deltanet")
    cache = layer.new_cache(2)
    assert isinstance(cache, DeltaNetCache)
    before = cache.nbytes
    layer(torch.randn(2, 30, 32), cache=cache)
    assert cache.nbytes == before and cache.length == 30
    assert cache.bytes_per_token == (4 * 8 * 8 + 96 * 3) * 4  # S per head and the conv inputs


@pytest.mark.parametrize(
    "options, cfg, match",
    [
        (dict(chunk_size=0), {}, "chunk_size must be a positive integer"),
        (dict(conv_size=0), {}, "conv_size must be a positive integer"),
        (dict(use_gate="yes"), {}, "use_gate must be True or False, got 'yes'"),
        (dict(use_delta=1), {}, "use_delta must be True or False, got 1"),
        ({}, dict(positions="alibi"), "choose positions 'none'"),
        ({}, dict(causal=False), "set causal=True"),
        ({}, dict(impl="flash"), "impl='flash'"),
        (dict(window=4), {}, "no option window"),
    ],
)
def test_bad_options_raise(options, cfg, match):
    for name in ("deltanet", "gated_deltanet"):
        with pytest.raises(ValueError, match=match):
            build_attention(name, AttentionConfig(32, 4, **cfg), **options)


def test_layer_refuses_masks_and_weights_with_a_cache():
    layer = _layer("deltanet")
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="attn_mask must be None"):
        layer(x, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="need_weights needs the whole sequence"):
        layer(x, need_weights=True, cache=layer.new_cache(1))
    cache = layer.new_cache(1)
    with pytest.raises(ValueError, match=r"expected inputs of shape \(1, 96, T\)"):
        cache.append(torch.zeros(2, 96, 3))
