"""flash_attention against the explicit math in float64: outputs, log-sum-exp and gradients for
every masking it offers, grouped heads, ragged tiles and queries after a cache; the recomputing
backward saves O(T·d); impl="flash" equals impl="reference" in every variant that takes it."""

import pytest
import torch

from attnbook.attention import AttentionConfig, available, build_attention, sdpa_reference
from attnbook.attention.flash import flash_attention, merge_partial
from attnbook.model import GPT, GPTConfig


def _qkv(B=2, H=4, H_kv=2, t_q=37, t_k=50, D=8, D_v=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(B, H, t_q, D), make(B, H_kv, t_k, D), make(B, H_kv, t_k, D_v)


def _allowed(t_q, t_k, causal, window):
    """Which keys each query sees, queries being the last t_q of t_k positions."""
    pos = torch.arange(t_q)[:, None] + t_k - t_q  # (t_q, 1)
    key = torch.arange(t_k)[None, :]  # (1, t_k)
    allowed = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        allowed &= key <= pos
    if window is not None:
        allowed &= key > pos - window
    return allowed


def _reference(q, k, v, causal, window):
    """Output and log-sum-exp of the explicit math (float64), with ``_allowed``'s mask."""
    mask = _allowed(q.shape[2], k.shape[2], causal, window)
    out = sdpa_reference(q, k, v, attn_mask=mask, enable_gqa=True)
    k_rep = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k_rep.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 7), (False, 7)])
@pytest.mark.parametrize(
    "t_q, t_k, blocks", [(37, 50, (8, 16)), (50, 50, (64, 64)), (1, 50, (4, 3))]
)
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2), (4, 1)])
def test_outputs_lse_and_gradients_equal_the_reference(causal, window, t_q, t_k, blocks, H, H_kv):
    q, k, v = _qkv(H=H, H_kv=H_kv, t_q=t_q, t_k=t_k)
    out, lse = flash_attention(
        q, k, v, causal=causal, window=window, block_q=blocks[0], block_k=blocks[1], return_lse=True
    )
    ref, ref_lse = _reference(q, k, v, causal, window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    seen = torch.isfinite(ref_lse)  # the log-sum-exp of a query that sees no key is -inf
    grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse)[seen].sum(), (q, k, v))
    ref_loss = (ref * d_out).sum() + (ref_lse * d_lse)[seen].sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_gradcheck_in_float64():
    q, k, v = _qkv(B=1, H=2, H_kv=1, t_q=7, t_k=9, D=3, D_v=2)
    fn = lambda q, k, v: flash_attention(q, k, v, window=4, block_q=3, block_k=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_a_query_that_sees_no_key_outputs_zeros_and_passes_no_gradient():
    q, k, v = _qkv(H=2, H_kv=2, t_q=10, t_k=6)  # causal: the first 4 queries precede every key
    out, lse = flash_attention(q, k, v, block_q=3, block_k=2, return_lse=True)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert torch.isinf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[:, :, :4], torch.zeros_like(dq[:, :, :4])) and not dq.isnan().any()


def test_float32_agrees_with_sdpa():
    q, k, v = (t.detach().float() for t in _qkv(H=4, H_kv=4, t_q=70, t_k=70, D=16, D_v=16))
    out = flash_attention(q, k, v, block_q=16, block_k=32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_split_kv_parts_merge_into_one_pass():
    q, k, v = _qkv(t_q=3, t_k=50)
    whole, whole_lse = flash_attention(q, k, v, causal=False, return_lse=True)
    cuts = [(0, 13), (13, 30), (30, 50)]
    parts = [flash_attention(q, k[:, :, a:b], v[:, :, a:b], causal=False, return_lse=True)
             for a, b in cuts]  # fmt: skip
    out, lse = merge_partial([o for o, _ in parts], [s for _, s in parts])
    torch.testing.assert_close(out, whole, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, whole_lse, atol=1e-12, rtol=1e-12)
    empty = (torch.zeros_like(whole), torch.full_like(whole_lse, float("-inf")))  # no keys
    out_e, _ = merge_partial([whole, empty[0]], [whole_lse, empty[1]])
    torch.testing.assert_close(out_e, whole, atol=1e-12, rtol=1e-12)


def test_merged_parts_train_like_one_pass():
    """The log-sum-exp is differentiable, so causal attention computed in pieces and merged
    with merge_partial has one pass's gradients (ring attention merges during training)."""
    q, k, v = _qkv(t_q=50, t_k=50)
    head = flash_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], return_lse=True)
    old = flash_attention(q[:, :, 20:], k[:, :, :20], v[:, :, :20], causal=False, return_lse=True)
    new = flash_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], return_lse=True)
    tail = merge_partial([old[0], new[0]], [old[1], new[1]])  # queries 20..49: all their keys
    out, lse = (torch.cat([h, t], dim=2) for h, t in zip(head, tail, strict=True))
    whole, whole_lse = flash_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, whole, atol=1e-12, rtol=1e-12)
    d_out, d_lse = torch.randn_like(whole), torch.randn_like(whole_lse)
    grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), (q, k, v))
    ref = torch.autograd.grad((whole * d_out).sum() + (whole_lse * d_lse).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def _saved_numel(fn, *args):
    """The largest tensor autograd saves for the backward pass of ``fn(*args)``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return max(sizes)


def test_the_backward_saves_o_of_t_times_d_not_t_squared():
    B, H, T, D = 1, 2, 256, 8
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(B, H, H, T, T, D, D))
    flash = _saved_numel(lambda *a: flash_attention(*a), q, k, v)
    reference = _saved_numel(lambda *a: sdpa_reference(*a, is_causal=True), q, k, v)
    assert flash == B * H * T * D  # q, k, v or the output: nothing T x T
    assert reference >= B * H * T * T  # the weights


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.randn(2, 4, 8)), "must be 4-D"),
        (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), "divides q's 4"),
        (dict(k=torch.randn(2, 2, 5, 6)), "head_dim 8"),
        (dict(v=torch.randn(2, 2, 6, 8)), "as many positions as v"),
        (dict(block_q=0), "block_q must be a positive integer"),
        (dict(block_k=2.0), "block_k must be a positive integer"),
        (dict(window=0), "window must be a positive integer"),
        (dict(scale=-1.0), "scale must be a positive number"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    args = dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **args)
    with pytest.raises(ValueError, match="as many outputs as lses"):
        merge_partial([torch.zeros(1, 2)], [])


# --- impl="flash" in the skeleton ---------------------------------------------------------

TAKES_FLASH = ["gqa", "local", "mha", "mla", "mqa"]
OPTIONS = {"gqa": {"n_kv_head": 2}, "local": {"window": 5}, "mla": {"kv_lora_rank": 16}}


def test_the_variants_that_take_flash_are_the_softmax_ones_with_position_masks():
    for name in available():
        cfg = AttentionConfig(n_embd=32, n_head=4, block_size=24, impl="flash")
        if name in TAKES_FLASH:
            build_attention(name, cfg, **OPTIONS.get(name, {}))
        else:
            with pytest.raises(ValueError, match="impl='flash'"):
                build_attention(name, cfg)


@pytest.mark.parametrize("positions", ["rope", "none"])
@pytest.mark.parametrize("name", TAKES_FLASH)
def test_impl_flash_equals_impl_reference_with_and_without_a_cache(name, positions):
    layers = {}
    for impl in ("flash", "reference"):
        torch.manual_seed(0)
        cfg = AttentionConfig(n_embd=32, n_head=4, block_size=24, positions=positions, impl=impl)
        layers[impl] = build_attention(name, cfg, **OPTIONS.get(name, {})).eval()
    x = torch.randn(2, 23, 32)
    flash, ref = layers["flash"], layers["reference"]
    torch.testing.assert_close(flash(x), ref(x), atol=1e-5, rtol=1e-5)
    cache = flash.new_cache(2)
    steps = [flash(x[:, :9], cache=cache)] + [
        flash(x[:, t : t + 1], cache=cache) for t in range(9, 23)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref(x), atol=1e-5, rtol=1e-5)
    x.requires_grad_()
    flash(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(grad, x.grad, atol=1e-4, rtol=1e-4)


def test_a_gpt_trains_with_impl_flash_like_with_the_reference():
    losses = {}
    for impl in ("flash", "reference"):
        cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32,
                        attention="gqa", positions="rope",
                        attention_options={"n_kv_head": 2, "impl": impl})  # fmt: skip
        torch.manual_seed(0)
        model = GPT(cfg)
        idx = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(5):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[impl] = loss.item()
    assert losses["flash"] == pytest.approx(losses["reference"], rel=1e-4)


def test_impl_flash_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="neither positions='alibi' nor dropout > 0"):
        AttentionConfig(impl="flash", positions="alibi")
    with pytest.raises(ValueError, match="dropout=0.1"):
        AttentionConfig(impl="flash", dropout=0.1)
    layer = build_attention("mha", AttentionConfig(n_embd=32, n_head=4, impl="flash"))
    with pytest.raises(ValueError, match="it takes no attn_mask"):
        layer(torch.randn(1, 5, 32), attn_mask=torch.ones(1, 1, 1, 5, dtype=torch.bool))
