import pytest
import torch

from attnbook.attention import AttentionConfig, available, build_attention
from attnbook.attention.config import POSITIONS
from attnbook.attention.mla import LatentCache, MultiHeadLatentAttention

SIZES = dict(kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)


def _layer(positions="rope", q_lora_rank=0, absorb=False, impl="sdpa"):
    cfg = AttentionConfig(n_embd=32, n_head=4, block_size=16, positions=positions, impl=impl)
    return MultiHeadLatentAttention(cfg, q_lora_rank=q_lora_rank, absorb=absorb, **SIZES).eval()


def _both_modes(layer, x, **kw):
    layer.absorb = False
    naive = layer(x, **kw)
    layer.absorb = True
    return naive, layer(x, **kw)


def test_registered_and_defaults_derived_from_head_dim():
    assert "mla" in available()
    layer = build_attention("mla", AttentionConfig(n_embd=64, n_head=4))  # head_dim 16
    sizes = (layer.kv_lora_rank, layer.qk_nope_head_dim, layer.qk_rope_head_dim, layer.v_head_dim)
    assert sizes == (64, 16, 8, 16)
    assert layer.options.kv_lora_rank is None and layer.absorb is False
    assert build_attention("mla", AttentionConfig(), absorb=True).absorb is True


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_naive_and_absorbed_agree(positions, q_lora_rank):
    torch.manual_seed(0)
    layer = _layer(positions, q_lora_rank)
    x = torch.randn(2, 16, 32)
    naive, absorbed = _both_modes(layer, x)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_naive_and_absorbed_agree_in_float64_to_rounding():
    torch.manual_seed(0)
    layer = _layer(q_lora_rank=10).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    naive, absorbed = _both_modes(layer, x)
    torch.testing.assert_close(absorbed, naive, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_weights_agree_between_modes_and_paths(impl):
    torch.manual_seed(0)
    layer = _layer("alibi", impl=impl)
    x = torch.randn(2, 9, 32)
    (y_n, w_n), (y_a, w_a) = _both_modes(layer, x, need_weights=True)
    torch.testing.assert_close(w_a, w_n, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w_n.sum(-1), torch.ones(2, 4, 9))
    assert torch.all(w_n.triu(1) == 0)  # causal
    torch.testing.assert_close(y_a, y_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), y_a, atol=1e-5, rtol=1e-5)  # fast path == weights path


def test_naive_is_attention_over_expanded_keys_and_values():
    """Build q, k, v by hand from the weights and attend with the scale 1/sqrt(nope + rope)."""
    torch.manual_seed(0)
    layer = _layer("none")
    x = torch.randn(1, 7, 32)
    H = 4
    q = layer.wq(x).view(1, 7, H, 10).transpose(1, 2)  # (1, H, 7, nope + rope)
    c, k_rope = layer.wkv_a(x).split([12, 4], dim=-1)
    kv = layer.wkv_b(layer.kv_norm(c)).view(1, 7, H, 11).transpose(1, 2)  # (1, H, 7, nope + v)
    k = torch.cat([kv[..., :6], k_rope[:, None].expand(1, H, 7, 4)], dim=-1)
    v = kv[..., 6:]
    scores = (q @ k.transpose(-2, -1)) / 10**0.5
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 7, H * 5)
    for absorb in (False, True):
        layer.absorb = absorb
        torch.testing.assert_close(layer(x), layer.c_proj(y), atol=1e-5, rtol=1e-5)


CHUNKS = [[1] * 16, [5, 1, 3, 7], [1, 15], [15, 1], [16]]


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
@pytest.mark.parametrize("chunks", CHUNKS)
def test_cached_decoding_equals_the_full_pass(absorb, positions, chunks):
    torch.manual_seed(0)
    layer = _layer(positions, q_lora_rank=10)
    x = torch.randn(2, 16, 32)
    layer.absorb = False
    full = layer(x)  # the naive full pass is the reference for both modes
    layer.absorb = absorb
    cache = layer.new_cache(batch_size=2)
    outs, start = [], 0
    for size in chunks:
        outs.append(layer(x[:, start : start + size], cache=cache))
        start += size
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, itemsize", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_holds_only_the_latent_and_the_rotary_key(dtype, itemsize):
    layer = _layer()
    cache = layer.new_cache(batch_size=3, max_len=10, dtype=dtype)
    assert cache.bytes_per_token == (12 + 4) * itemsize
    assert cache.nbytes == 3 * 10 * cache.bytes_per_token
    assert cache.latent.shape == (3, 10, 12) and cache.k_rope.shape == (3, 10, 4)
    layer(torch.randn(3, 4, 32), cache=cache)
    assert cache.length == 4
    cache.reset()
    assert cache.length == 0


def test_mla_cache_is_smaller_than_mha_cache():
    cfg = AttentionConfig(n_embd=64, n_head=8, positions="rope")  # head_dim 8
    mla = build_attention("mla", cfg).new_cache(1)
    mha = build_attention("mha", cfg).new_cache(1)
    assert mla.bytes_per_token == (32 + 4) * 4 < mha.bytes_per_token == 2 * 64 * 4


@pytest.mark.parametrize("absorb", [False, True])
def test_changing_the_future_never_changes_the_past(absorb):
    torch.manual_seed(0)
    layer = _layer(q_lora_rank=10, absorb=absorb)
    x = torch.randn(1, 12, 32)
    y = x.clone()
    y[:, 7:] = torch.randn(1, 5, 32)
    torch.testing.assert_close(layer(y)[:, :7], layer(x)[:, :7])
    assert not torch.allclose(layer(y)[:, 7:], layer(x)[:, 7:])


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_gradients_reach_every_parameter(absorb, q_lora_rank):
    torch.manual_seed(0)
    layer = _layer(q_lora_rank=q_lora_rank, absorb=absorb).train()
    layer(torch.randn(2, 8, 32)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_agree_between_modes():
    torch.manual_seed(0)
    layer = _layer(q_lora_rank=10)
    x = torch.randn(2, 8, 32)
    grads = []
    for absorb in (False, True):
        layer.absorb = absorb
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for g_n, g_a in zip(*grads, strict=True):
        torch.testing.assert_close(g_a, g_n, atol=1e-5 * g_n.abs().max().item(), rtol=1e-4)


def test_padding_mask_with_cache_in_both_modes():
    torch.manual_seed(0)
    layer = _layer()
    x = torch.randn(2, 10, 32)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, :3] = False
    layer.absorb = False
    full = layer(x, attn_mask=real[:, None, None, :])
    layer.absorb = True
    cache = layer.new_cache(2)
    prefill = layer(x[:, :5], attn_mask=real[:, None, None, :5], cache=cache)
    steps = [
        layer(x[:, t : t + 1], attn_mask=real[:, None, None, : t + 1], cache=cache)
        for t in range(5, 10)
    ]
    out = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(out[:, 3:], full[:, 3:], atol=1e-5, rtol=1e-5)


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="has no option n_kv_head"):
        MultiHeadLatentAttention(AttentionConfig(n_embd=32, n_head=4), n_kv_head=2)
    layer = _layer()
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, n_embd=32\)"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="max_len must be in 1..block_size=16, got 17"):
        layer.new_cache(1, max_len=17)
    cache = layer.new_cache(1, max_len=4)
    layer(torch.randn(1, 3, 32), cache=cache)
    with pytest.raises(ValueError, match="latent cache overflow: built for max_len=4"):
        layer(torch.randn(1, 2, 32), cache=cache)
    with pytest.raises(ValueError, match=r"v of shape \(1, 1, 1, 12\), got .* and \(1, 1, 1, 8\)"):
        cache.append(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 8))  # rotary key, latent
    with pytest.raises(ValueError, match="rope_dim must be a positive integer"):
        LatentCache(1, 8, 0, 4)
