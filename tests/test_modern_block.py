"""The modern block's options (qk_norm, output_gate, sinks, softcap): every variant takes each one
on every path it uses, or refuses it when built; each equals its explicit float64 formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from attnbook.attention import AttentionConfig, available, build_attention, sdpa, sdpa_reference
from attnbook.attention.flash import add_sink, flash_attention
from attnbook.attention.masks import causal_mask
from attnbook.model import GPT, GPTConfig

T = 24
# Each option with a value that changes the output, and the variants that refuse it.
OPTIONS = {"qk_norm": True, "output_gate": True, "sinks": True, "softcap": 1.5}
STATE = {"linear", "deltanet", "gated_deltanet"}  # no softmax
REFUSED = {
    "qk_norm": STATE | {"mla", "dsa"},
    "output_gate": {"gated_deltanet"},  # its own silu gate (use_gate=True by default)
    "sinks": STATE | {"nsa"},
    "softcap": STATE | {"nsa"},
}
# Options under which each variant's own paths are taken at T positions (sparse, blocked, absorbed).
SPARSE = {
    "gqa": dict(n_kv_head=2),
    "local": dict(window=5, sink_tokens=2),  # StreamingLLM's sink tokens beside the window
    "sparse": dict(sparse_block=4, n_global_blocks=1, n_window_blocks=1, n_random_blocks=1),
    "moba": dict(moba_chunk_size=4, moba_topk=2),
    "nsa": dict(compress_block=4, compress_stride=2, select_block=4, select_count=3, window=4),
    "mla": dict(absorb=True),  # its one-token decoding step, and dsa's gathered one
    "dsa": dict(index_topk=4, absorb=True),
    "linear": dict(linear_chunk=8),
    "deltanet": dict(chunk_size=8),
    "gated_deltanet": dict(chunk_size=8),
}
NEW_PARAMS = {
    "qk_norm": ("q_norm.weight", "k_norm.weight"),
    "output_gate": ("gate_proj.weight",),
    "sinks": ("sinks",),
    "softcap": (),
}


def _build(name, impl="sdpa", dtype=torch.float32, positions="rope", **modern):
    """The variant with these modern options, seeded, in eval mode, its new parameters made
    non-trivial (norm weights around 1, sinks around 0)."""
    torch.manual_seed(0)
    config = AttentionConfig(32, 4, block_size=T, positions=positions, impl=impl, **modern)
    layer = build_attention(name, config, **SPARSE.get(name, {})).to(dtype).eval()
    with torch.no_grad():
        for norm in (layer.q_norm, layer.k_norm):
            if norm is not None:
                norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
        if layer.sinks is not None:
            layer.sinks.copy_(torch.randn_like(layer.sinks))
    return layer


def _takers(option):
    return [name for name in available() if name not in REFUSED[option]]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", available())
def test_each_variant_takes_the_option_or_refuses_it_naming_it(name, option):
    if name in REFUSED[option]:
        with pytest.raises(ValueError, match=option):
            _build(name, **{option: OPTIONS[option]})
    else:
        assert _build(name, **{option: OPTIONS[option]})(torch.randn(1, 5, 32)).shape == (1, 5, 32)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_deltanet_takes_one_output_gate_not_two(name):
    config = AttentionConfig(32, 4, output_gate=True)
    with pytest.raises(ValueError, match="use_gate=True already gates its output.*use_gate=False"):
        build_attention(name, config, use_gate=True)
    layer = build_attention(name, config, use_gate=False)
    assert layer.g_proj is None and layer(torch.randn(1, 5, 32)).shape == (1, 5, 32)


@pytest.mark.parametrize(
    "option, name", [(option, name) for option in OPTIONS for name in _takers(option)]
)
def test_the_option_is_causal_decodes_with_a_cache_changes_the_output_and_learns(option, name):
    layer = _build(name, **{option: OPTIONS[option]})
    plain = _build(name)
    plain.load_state_dict(layer.state_dict(), strict=False)  # the same weights, option off
    x = torch.randn(2, T, 32)
    y = layer(x)
    assert not torch.allclose(y, plain(x), atol=1e-3)  # the option does something
    changed = torch.cat([x[:, :15], torch.randn(2, T - 15, 32)], dim=1)
    torch.testing.assert_close(layer(changed)[:, :15], y[:, :15], atol=1e-5, rtol=1e-5)
    cache = layer.new_cache(2)
    steps = [layer(x[:, :9], cache=cache)] + [
        layer(x[:, t : t + 1], cache=cache) for t in range(9, T)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), y, atol=1e-5, rtol=1e-5)
    layer.train()  # dropout is 0: the same function
    layer(x).square().sum().backward()
    params = dict(layer.named_parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params.values())
    for new in NEW_PARAMS[option]:
        assert params[new].grad is not None and params[new].grad.abs().sum() > 0, new


@pytest.mark.parametrize("positions", ["rope", "alibi"])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", available())
def test_sdpa_reference_and_flash_agree_in_output_and_gradients(name, option, positions):
    """Same weights on each path the config takes; the fast paths of local, sparse and moba run
    at T positions with their SPARSE options (ALiBi: a bias beside the sink and after the cap)."""
    if name in REFUSED[option]:
        pytest.skip(f"{name} refuses {option}")
    modern = {option: OPTIONS[option]}
    layers = []
    for impl in ("reference", "sdpa", "flash"):
        try:  # train: dsa's indexer loss too
            layers.append(_build(name, impl, positions=positions, **modern).train())
        except ValueError as err:
            if "impl='flash'" not in str(err) and "'alibi'" not in str(err):
                raise
    if len(layers) < 2:
        pytest.skip(f"{name} refuses positions={positions!r}")
    x = torch.randn(2, T, 32)
    outputs, grads = [], []
    for layer in layers:
        y = layer(x)
        y.square().sum().backward()
        outputs.append(y)
        grads.append({n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
    for y, g in zip(outputs[1:], grads[1:], strict=True):
        torch.testing.assert_close(y, outputs[0], atol=1e-5, rtol=1e-5)
        assert g.keys() == grads[0].keys()
        for n in g:
            torch.testing.assert_close(g[n], grads[0][n], atol=1e-4, rtol=1e-4, msg=n)


# ---- each option against its formula, in float64 ----------------------------------------------


def _explicit_mha(layer, x, need_weights=False):
    """Multi-head attention with every option of ``layer.config`` written out: RMSNorm of each
    head's q and k, RoPE, scores, soft-cap, causal mask, sink column, softmax, gate, c_proj."""
    c = layer.config
    B, n, _ = x.shape
    H, D = c.n_head, c.head_dim
    q, k, v = (t.view(B, n, H, D).transpose(1, 2) for t in layer.c_attn(x).split(c.n_embd, 2))
    if c.qk_norm:
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6) * layer.q_norm.weight
        k = k * torch.rsqrt(k.square().mean(-1, keepdim=True) + 1e-6) * layer.k_norm.weight
    q, k = layer.rope(q, 0), layer.rope(k, 0)
    s = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, n, n)
    if c.softcap is not None:
        s = c.softcap * torch.tanh(s / c.softcap)
    e = torch.exp(s).masked_fill(~causal_mask(n), 0.0)
    total = e.sum(-1, keepdim=True)
    if c.sinks:
        total = total + torch.exp(layer.sinks)[:, None, None]
    w = e / total  # (B, H, n, n)
    y = w @ v  # (B, H, n, D)
    if c.output_gate:
        y = y * torch.sigmoid(layer.gate_proj(x)).view(B, n, H, D).transpose(1, 2)
    y = layer.c_proj(y.transpose(1, 2).reshape(B, n, c.n_embd))
    return (y, w) if need_weights else y


@pytest.mark.parametrize("impl", ["reference", "sdpa", "flash"])
@pytest.mark.parametrize(
    "modern",
    [
        *({o: v} for o, v in OPTIONS.items()),
        OPTIONS,
        {o: OPTIONS[o] for o in OPTIONS if o != "softcap"},
    ],
)
def test_every_option_equals_its_explicit_float64_formula(modern, impl):
    if impl == "flash" and "softcap" in modern:
        with pytest.raises(ValueError, match="takes no softcap.*use impl='sdpa' or 'reference'"):
            _build("mha", impl, **modern)
        return
    layer = _build("mha", impl, dtype=torch.float64, **modern)
    with torch.no_grad():
        layer.c_attn.weight.mul_(4)  # large scores, so that the cap bites
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    expected, w = _explicit_mha(layer, x, need_weights=True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    y, weights = layer(x, need_weights=True)
    torch.testing.assert_close(weights, w, rtol=1e-10, atol=1e-10)
    sums = weights.sum(-1)
    assert (sums < 1).all() if "sinks" in modern else torch.allclose(sums, torch.ones_like(sums))


def _qkv(B=2, H=4, H_kv=2, n=7, t_k=None, D=8, dtype=torch.float64):
    t_k = n if t_k is None else t_k
    return torch.randn(B, H, n, D, dtype=dtype), *torch.randn(2, B, H_kv, t_k, D, dtype=dtype)


def test_sinks_add_a_valueless_term_to_every_denominator():
    q, k, v = _qkv(n=5, t_k=9)
    sinks = torch.randn(4, dtype=torch.float64)
    mask = causal_mask(5, 9) & (torch.rand(2, 1, 1, 9) > 0.3)  # and a random padding mask
    mask[..., -1] = True  # every query sees itself
    y, w = sdpa_reference(q, k, v, mask, enable_gqa=True, sinks=sinks[:, None], return_weights=True)
    s = q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) / math.sqrt(8)  # (B, H, 5, 9)
    e = torch.exp(s) * mask
    expected = e / (e.sum(-1, keepdim=True) + torch.exp(sinks)[:, None, None])
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    assert (w.sum(-1) < 1).all()
    torch.testing.assert_close(y, expected @ v.repeat_interleave(2, dim=1), rtol=1e-12, atol=1e-12)
    fused = sdpa(q, k, v, mask, enable_gqa=True, sinks=sinks[:, None])  # the zero key column
    torch.testing.assert_close(fused, y, rtol=1e-12, atol=1e-12)
    causal = sdpa(q[..., :5, :], k[..., :5, :], v[..., :5, :], is_causal=True, enable_gqa=True,
                  sinks=sinks[:, None])  # fmt: skip
    ref = sdpa_reference(q[..., :5, :], k[..., :5, :], v[..., :5, :], is_causal=True,
                         enable_gqa=True, sinks=sinks[:, None])  # fmt: skip
    torch.testing.assert_close(causal, ref, rtol=1e-12, atol=1e-12)


def test_a_sink_of_minus_infinity_is_no_sink_on_every_path():
    q, k, v = _qkv()
    never = torch.full((4, 1), float("-inf"), dtype=torch.float64)
    plain = sdpa_reference(q, k, v, is_causal=True, enable_gqa=True)
    for attention in (sdpa, sdpa_reference):
        y = attention(q, k, v, is_causal=True, enable_gqa=True, sinks=never)
        torch.testing.assert_close(y, plain, rtol=1e-12, atol=1e-12)
    y, lse = flash_attention(q, k, v, return_lse=True, block_q=3, block_k=3)
    torch.testing.assert_close(add_sink(y, lse, never), plain, rtol=1e-12, atol=1e-12)


def test_add_sink_on_flash_equals_the_reference_and_its_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv())
    sinks = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    y, lse = flash_attention(q, k, v, return_lse=True, block_q=3, block_k=3)
    flash = add_sink(y, lse, sinks)
    ref = sdpa_reference(q, k, v, is_causal=True, enable_gqa=True, sinks=sinks)
    torch.testing.assert_close(flash, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((flash * g).sum(), (q, k, v, sinks))
    expected = torch.autograd.grad((ref * g).sum(), (q, k, v, sinks))
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_softcap_is_c_tanh_of_the_scaled_scores_before_the_mask():
    q, k, v = _qkv(H_kv=4)
    q = 4 * q  # scores of size ~10: the cap bites
    bias = torch.randn(2, 1, 7, 7, dtype=torch.float64)  # an additive mask, added after the cap
    y, w = sdpa_reference(q, k, v, bias, is_causal=True, softcap=2.0, return_weights=True)
    s = 2.0 * torch.tanh(q @ k.transpose(-2, -1) / math.sqrt(8) / 2.0) + bias
    expected = torch.softmax(s.masked_fill(~causal_mask(7), float("-inf")), dim=-1)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sdpa(q, k, v, bias, is_causal=True, softcap=2.0), y)
    huge = sdpa_reference(q, k, v, bias, is_causal=True, softcap=1e12)
    torch.testing.assert_close(huge, sdpa_reference(q, k, v, bias, is_causal=True))
    assert not torch.allclose(y, huge)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"softcap": 0.0}, "softcap must be None or a number > 0"),
        ({"sinks": torch.zeros(3, 1)}, r"sinks of shape \(3, 1\) do not broadcast"),
        ({"sinks": torch.zeros(2, 4, 7, 1)}, r"sinks of shape \(2, 4, 7, 1\) do not broadcast"),
    ],
)
def test_bad_softcap_or_sinks_are_refused_by_both_functions(kwargs, match):
    q, k, v = _qkv(dtype=torch.float32)
    for attention in (sdpa, sdpa_reference):
        with pytest.raises(ValueError, match=match):
            attention(q, k, v, enable_gqa=True, **kwargs)


# ---- in a GPT ---------------------------------------------------------------------------------


def test_a_gpt_takes_the_options_initialises_them_and_checkpoints_them(tmp_path):
    modern = {"qk_norm": True, "output_gate": True, "sinks": True, "softcap": 30.0}
    config = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32,
                       attention="gqa", attention_options={"n_kv_head": 2, **modern})  # fmt: skip
    model = GPT(config).eval()
    attn = model.transformer.h[0].attn
    assert attn.config.softcap == 30.0 and attn.gate_proj.weight.shape == (32, 32)
    assert torch.equal(attn.q_norm.weight, torch.ones(8)) and torch.equal(
        attn.sinks, torch.zeros(4)
    )
    with torch.no_grad():  # trained values, to see them come back
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(model, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    other = GPT(GPTConfig.from_dict(config.to_dict())).eval()
    missing, unexpected = load_model(other, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    assert torch.equal(other.transformer.h[1].attn.sinks, model.transformer.h[1].attn.sinks)
    idx = torch.randint(0, 61, (2, 16))
    torch.testing.assert_close(other(idx)[0], model(idx)[0], rtol=0, atol=0)
    cached = model.generate(idx[:, :4], 12, temperature=0)
    assert torch.equal(cached, model.generate(idx[:, :4], 12, temperature=0, use_cache=False))


def test_a_gpt_refuses_an_option_its_variant_cannot_take():
    with pytest.raises(ValueError, match="qk_norm"):
        GPTConfig(
            n_layer=1, n_head=4, n_embd=32, attention="mla", attention_options={"qk_norm": True}
        )


def test_cross_attention_normalises_the_sources_keys_once():
    from attnbook.attention import CrossAttention

    torch.manual_seed(0)
    layer = CrossAttention(AttentionConfig(32, 4, qk_norm=True, sinks=True, output_gate=True))
    memory = torch.randn(2, 6, 32)
    cache = layer.project_memory(memory)
    keys = layer.c_kv(memory)[..., :32].view(2, 6, 4, 8).transpose(1, 2)
    torch.testing.assert_close(cache.k, F.rms_norm(keys, (8,), layer.k_norm.weight, eps=1e-6))
    assert layer(torch.randn(2, 3, 32), cache=cache).shape == (2, 3, 32)


def test_the_options_are_flags_of_attnbook_train():
    from attnbook.train import parse_config

    cfg = parse_config(["--attention", "gqa", "--qk_norm", "--sinks", "--softcap", "30"])
    assert cfg.model.attention_options == {"qk_norm": True, "sinks": True, "softcap": 30.0}
    with pytest.raises(ValueError, match="softcap must be None"):
        parse_config(["--softcap", "-1"])
