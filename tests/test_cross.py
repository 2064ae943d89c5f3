import pytest
import torch
from torch import nn

from attnbook.attention import (
    Attention,
    AttentionConfig,
    CrossAttention,
    DecoderBlock,
    EncoderBlock,
    padding_mask,
)

CFG = AttentionConfig(n_embd=32, n_head=4)


def attend(layer, x, memory, memory_mask=None, **kwargs):
    """Cross-attention from ``x`` to ``memory``: the source projected, then read as the cache."""
    return layer(x, cache=layer.project_memory(memory, memory_mask), **kwargs)


@pytest.mark.parametrize("t_q, t_k", [(1, 9), (7, 3), (5, 5)])
def test_any_lengths(t_q, t_k):
    layer = CrossAttention(CFG)
    out, w = attend(layer, torch.randn(2, t_q, 32), torch.randn(2, t_k, 32), need_weights=True)
    assert out.shape == (2, t_q, 32) and w.shape == (2, 4, t_q, t_k)


def test_padded_source_positions_never_change_the_output():
    layer = CrossAttention(CFG)
    x, memory = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    keep = padding_mask(torch.tensor([6, 3]), 6)
    out = attend(layer, x, memory, keep)
    garbage = memory.clone()
    garbage[1, 3:] = 1e3 * torch.randn(3, 32)
    torch.testing.assert_close(attend(layer, x, garbage, keep), out)
    torch.testing.assert_close(out[1:], attend(layer, x[1:], memory[1:, :3]))  # as if unpadded


def test_agrees_with_torch_multihead_attention():
    ours = CrossAttention(CFG)
    theirs = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.c_q.weight, ours.c_kv.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.c_q.bias, ours.c_kv.bias]))
        theirs.out_proj.load_state_dict(ours.c_proj.state_dict())
    x, memory = torch.randn(3, 5, 32), torch.randn(3, 8, 32)
    keep = padding_mask(torch.tensor([8, 2, 5]), 8)
    expected, _ = theirs(x, memory, memory, key_padding_mask=~keep)  # torch: True = padded
    assert (attend(ours, x, memory, keep) - expected).abs().max() < 1e-5


def test_fast_and_reference_paths_agree():
    fast = CrossAttention(CFG)
    ref = CrossAttention(AttentionConfig(n_embd=32, n_head=4, impl="reference"))
    ref.load_state_dict(fast.state_dict())
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    keep = padding_mask(torch.tensor([7, 4]), 7)
    torch.testing.assert_close(
        attend(fast, x, memory, keep), attend(ref, x, memory, keep), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_key_value_heads_are_mha_with_the_heads_repeated(n_kv_head):
    gqa = CrossAttention(CFG, n_kv_head=n_kv_head)
    mha = CrossAttention(CFG)
    group, kv = 4 // n_kv_head, n_kv_head * 8
    state = gqa.state_dict()
    for key in ("c_kv.weight", "c_kv.bias"):  # each key/value head repeated for its group
        heads = [t.unflatten(0, (n_kv_head, 8)) for t in state[key].split(kv)]  # k, v
        state[key] = torch.cat([h.repeat_interleave(group, 0).flatten(0, 1) for h in heads])
    mha.load_state_dict(state)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    keep = padding_mask(torch.tensor([7, 4]), 7)
    assert gqa.project_memory(memory).k.shape == (2, n_kv_head, 7, 8)
    torch.testing.assert_close(
        attend(gqa, x, memory, keep), attend(mha, x, memory, keep), atol=1e-5, rtol=1e-5
    )


def test_encoder_ignores_padding_and_decoder_is_causal_in_its_input():
    enc, dec = EncoderBlock(CFG).eval(), DecoderBlock(CFG).eval()
    src = torch.randn(2, 6, 32)
    keep = padding_mask(torch.tensor([6, 4]), 6)
    memory = enc(src, keep)
    src2 = src.clone()
    src2[1, 4:] += 5.0
    torch.testing.assert_close(enc(src2, keep)[1, :4], memory[1, :4])
    tgt = torch.randn(2, 5, 32)
    out = dec(tgt, memory, keep)
    tgt2 = tgt.clone()
    tgt2[:, 3:] += 1.0
    torch.testing.assert_close(dec(tgt2, memory, keep)[:, :3], out[:, :3])
    memory2 = memory.clone()
    memory2[1, 4:] += 5.0  # padded source positions: no effect
    torch.testing.assert_close(dec(tgt, memory2, keep), out)


def test_gradients_reach_every_parameter():
    dec = DecoderBlock(CFG)
    dec(torch.randn(2, 3, 32), torch.randn(2, 4, 32)).square().sum().backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "x, memory, mask, match",
    [
        (torch.randn(2, 3, 31), torch.randn(2, 4, 32), None, "x must have shape"),
        (torch.randn(2, 3, 32), torch.randn(4, 32), None, "memory must have shape"),
        (torch.randn(2, 3, 32), torch.randn(3, 4, 32), None, "same batch size"),
        (
            torch.randn(2, 3, 32),
            torch.randn(2, 4, 32),
            torch.ones(2, 3, dtype=torch.bool),
            "memory_mask",
        ),
        (torch.randn(2, 3, 32), torch.randn(2, 4, 32), torch.ones(2, 4), "memory_mask"),
    ],
)
def test_bad_inputs(x, memory, mask, match):
    with pytest.raises(ValueError, match=match):
        attend(CrossAttention(CFG), x, memory, mask)


def test_projected_memory_is_reused():
    dec = DecoderBlock(CFG).eval()
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    keep = padding_mask(torch.tensor([7, 3]), 7)
    kv = dec.cross_attn.project_memory(memory, keep)
    torch.testing.assert_close(dec(tgt, memory_kv=kv), dec(tgt, memory, keep))
    with pytest.raises(ValueError, match="either memory or memory_kv"):
        dec(tgt, memory, memory_kv=kv)
    with pytest.raises(ValueError, match="either memory or memory_kv"):
        dec(tgt)
    with pytest.raises(ValueError, match="memory_kv carries its mask"):
        dec(tgt, memory_mask=keep, memory_kv=kv)
    with pytest.raises(ValueError, match="cache=layer.project_memory"):
        dec.cross_attn(tgt)


def test_cross_attention_runs_the_skeleton():
    assert CrossAttention.forward is Attention.forward


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EncoderBlock(AttentionConfig(n_embd=32, n_head=4, positions="rope")), "rope"),
        (lambda: DecoderBlock(AttentionConfig(n_embd=32, n_head=4, positions="alibi")), "alibi"),
        (lambda: CrossAttention(AttentionConfig(n_embd=32, n_head=4, positions="rope")), "rope"),
        (lambda: CrossAttention(CFG, n_kv_head=3), "n_kv_head=3 does not divide n_head=4"),
    ],
)
def test_settings_the_blocks_cannot_honour_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_encoder_mask_must_be_boolean():
    enc = EncoderBlock(CFG)
    with pytest.raises(ValueError, match="mask must be a boolean"):
        enc(torch.randn(2, 4, 32), padding_mask(torch.tensor([4, 2]), 4).float())
