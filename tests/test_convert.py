"""MHA -> GQA and MHA -> MLA conversions: exact where the sizes allow, close to an explicit
version otherwise, clear errors for what cannot be converted."""

import pytest
import torch

from attnbook.convert import mha_to_gqa, mha_to_mla
from attnbook.model import GPT, GPTConfig

VOCAB = 53


def _trained_looking(positions="learned", bias=True, attention="mha", options=None):
    """A small GPT in eval mode with weights moved off their initialisation (biases included),
    so that a conversion that drops or misplaces a tensor shows."""
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=VOCAB, block_size=24, n_layer=2, n_head=4, n_embd=32, positions=positions,
        bias=bias, attention=attention, attention_options=options or {},
    )  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _logits(model, idx):
    return model(idx)[0]  # (B, T, V)


IDX = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "alibi", "none", "rope"])
@pytest.mark.parametrize("bias", [True, False])
def test_gqa_with_every_head_kept_is_the_same_model(positions, bias):
    model = _trained_looking(positions, bias)
    gqa = mha_to_gqa(model, n_kv_head=4)
    assert gqa.config.attention == "gqa" and not gqa.training
    torch.testing.assert_close(_logits(gqa, IDX), _logits(model, IDX), rtol=0, atol=1e-5)


def test_gqa_pools_consecutive_heads_by_their_mean():
    """Against an explicit per-group mean of the key and value rows of c_attn."""
    model = _trained_looking()
    gqa = mha_to_gqa(model, n_kv_head=2)
    d, hd = 32, 8
    for old, new in zip(model.transformer.h, gqa.transformer.h, strict=True):
        for name in ("weight", "bias"):
            w = getattr(old.attn.c_attn, name)  # (3d, ...)
            expected = [w[:d]]  # queries unchanged
            for part in (w[d : 2 * d], w[2 * d :]):  # keys, then values
                heads = [part[h * hd : (h + 1) * hd] for h in range(4)]
                expected += [(heads[0] + heads[1]) / 2, (heads[2] + heads[3]) / 2]
            torch.testing.assert_close(getattr(new.attn.c_attn, name), torch.cat(expected))
    # everything outside attention is copied
    torch.testing.assert_close(gqa.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(
        gqa.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight
    )
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 2 * 8, 32)


def test_gqa_from_gqa_with_full_heads_and_cached_generation():
    model = _trained_looking(attention="gqa", options={"n_kv_head": 4})
    mqa_like = mha_to_gqa(model, n_kv_head=1)
    prompt = IDX[:1, :5]
    with_cache = mqa_like.generate(prompt, 10, temperature=0)
    without = mqa_like.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "alibi", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_mla_at_full_rank_is_the_same_model(positions, bias):
    model = _trained_looking(positions, bias)
    mla = mha_to_mla(model, kv_lora_rank=32)
    assert mla.config.attention == "mla"
    # logits of size ~2 through a factorised projection: 5e-5 is ~2e-5 of their size
    torch.testing.assert_close(_logits(mla, IDX), _logits(model, IDX), rtol=0, atol=5e-5)
    absorbed = mha_to_mla(model, kv_lora_rank=32, qk_rope_head_dim=4)
    for block in absorbed.transformer.h:
        block.attn.absorb = True
    torch.testing.assert_close(_logits(absorbed, IDX), _logits(model, IDX), rtol=0, atol=5e-5)


def test_mla_low_rank_keys_and_values_are_the_truncated_svd():
    """At rank r the layer's keys and values are the best rank-r approximation of MHA's."""
    model = _trained_looking()
    r = 6
    mla = mha_to_mla(model, kv_lora_rank=r)
    old, new = model.transformer.h[0].attn, mla.transformer.h[0].attn
    w_kv = old.c_attn.weight[32:]  # (2d, d): keys then values, head by head
    U, S, Vh = torch.linalg.svd(w_kv.double())
    best = (U[:, :r] * S[:r]) @ Vh[:r]  # (2d, d) rank r
    w_k, w_v = best.float().split(32)  # (d, d) each
    rebuilt = (new.wkv_b.weight @ new.wkv_a.weight[:r]).view(4, 2, 8, 32)  # per head: k, v
    torch.testing.assert_close(rebuilt[:, 0].reshape(32, 32), w_k, atol=1e-5, rtol=0)
    torch.testing.assert_close(rebuilt[:, 1].reshape(32, 32), w_v, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(new.wkv_b.weight @ new.wkv_a.weight[:r]) == r
    # the cache holds r + rope numbers per token per layer
    cache = new.new_cache(1)
    assert cache.bytes_per_token == (r + 2) * 4


def test_mla_error_shrinks_with_rank():
    model = _trained_looking()
    ref = _logits(model, IDX)
    errors = [(_logits(mha_to_mla(model, r), IDX) - ref).abs().max().item() for r in (4, 16, 32)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_conversions_leave_the_original_alone_and_keep_device_dtype_mode():
    model = _trained_looking().double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for new in (mha_to_gqa(model, 2), mha_to_mla(model, 8)):
        assert new.training and new.lm_head.weight.dtype == torch.float64
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_errors_name_the_problem():
    model = _trained_looking()
    with pytest.raises(ValueError, match="n_kv_head must be a positive divisor of n_head=4, got 3"):
        mha_to_gqa(model, 3)
    with pytest.raises(
        ValueError, match=r"kv_lora_rank must be an integer in \[1, n_embd=32\], got 33"
    ):
        mha_to_mla(model, 33)
    with pytest.raises(ValueError, match="positions='rope' cannot be converted to MLA"):
        mha_to_mla(_trained_looking("rope"), 8)
    grouped = _trained_looking(attention="gqa", options={"n_kv_head": 2})
    with pytest.raises(ValueError, match="converts multi-head attention.*'gqa'"):
        mha_to_gqa(grouped, 1)
    with pytest.raises(ValueError, match="converts multi-head attention.*'local'"):
        mha_to_mla(_trained_looking(attention="local", options={"window": 4}), 8)
