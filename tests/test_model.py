"""GPT and GPTConfig: every attention variant builds, predicts, trains and decodes the same with a cache."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from attnbook.attention import available
from attnbook.attention.config import POSITIONS
from attnbook.mlp import ACTIVATIONS, MLP, SwiGLU, register_activation, swiglu_hidden
from attnbook.model import GPT, GPTConfig, _sample, sampling_probs

VOCAB, BLOCK = 61, 16
# Options that make each variant's idea matter at BLOCK positions (others use the defaults).
OPTIONS = {
    "gqa": {"n_kv_head": 2},
    "local": {"window": 4, "sink_tokens": 2},
    "linear": {"linear_chunk": 4},
    "sparse": {"sparse_block": 4, "n_global_blocks": 1, "n_window_blocks": 1, "n_random_blocks": 1},
    "mla": {"kv_lora_rank": 8, "q_lora_rank": 8},
}


def _config(attention="mha", **kw):
    base = dict(
        vocab_size=VOCAB,
        block_size=BLOCK,
        n_layer=2,
        n_head=4,
        n_embd=32,
        attention=attention,
        attention_options=OPTIONS.get(attention, {}),
    )
    return GPTConfig(**{**base, **kw})


def _model(attention="mha", **kw):
    """A tiny GPT in eval mode; skipped where the variant refuses the position scheme."""
    try:
        return GPT(_config(attention, **kw)).eval()
    except ValueError as err:
        if "positions" not in str(err):
            raise
        pytest.skip(f"{attention} does not support positions={kw.get('positions')!r}: {err}")


def _ids(*shape):
    return torch.randint(0, VOCAB, shape)


# ---- shapes, loss, caches for every variant -------------------------------------------------


@pytest.mark.parametrize("name", available())
def test_shapes_and_initial_loss_is_log_vocab(name):
    model = _model(name)
    idx, targets = _ids(4, BLOCK), _ids(4, BLOCK)
    logits, loss = model(idx, targets)
    assert logits.shape == (4, BLOCK, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(loss) and abs(loss.item() - math.log(VOCAB)) < 0.1 * math.log(VOCAB)
    assert model(idx)[1] is None


@pytest.mark.parametrize("name", available())
def test_cached_chunks_give_the_full_forward_logits(name):
    model = _model(name)
    idx = _ids(2, BLOCK)
    full, _ = model(idx)
    caches = model.new_caches(2)
    assert len(caches) == 2
    parts = [model(idx[:, a:b], caches=caches)[0] for a, b in [(0, 7), (7, 8), (8, BLOCK)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", available())
def test_cached_greedy_generation_equals_uncached(name, positions):
    model = _model(name, positions=positions)
    prompt = _ids(2, 5)
    cached = model.generate(prompt, BLOCK - 5, temperature=0)
    plain = model.generate(prompt, BLOCK - 5, temperature=0, use_cache=False)
    assert cached.shape == (2, BLOCK) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("name", available())
def test_generation_through_given_caches_equals_its_own_and_fills_them(name):
    model = _model(name)
    prompt = _ids(2, 5)
    caches = model.new_caches(2)
    out = model.generate(prompt, 6, temperature=0, caches=caches)
    assert torch.equal(out, model.generate(prompt, 6, temperature=0))
    assert caches[0].length == 5 + 6 - 1  # the prompt and every new token but the last
    with pytest.raises(ValueError, match="caches were given with use_cache=False"):
        model.generate(prompt, 2, use_cache=False, caches=model.new_caches(2))


@pytest.mark.parametrize("name", available())
def test_a_few_adamw_steps_on_a_repeated_sequence_lower_the_loss(name):
    torch.manual_seed(0)
    model = GPT(_config(name)).train()
    idx = _ids(1, BLOCK + 1).repeat(4, 1)  # the same sequence four times
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


# ---- the parts: tying, MLPs, norms, init ------------------------------------------------------


def test_weight_tying_shares_one_tensor():
    tied, untied = GPT(_config()), GPT(_config(tie_weights=False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    _, loss = tied(_ids(2, 8), _ids(2, 8))
    loss.backward()  # both uses add to the one gradient
    assert tied.lm_head.weight.grad is tied.transformer.wte.weight.grad


def test_swiglu_hidden_size_follows_llama():
    assert swiglu_hidden(768) == 2048
    assert swiglu_hidden(32) == 128  # int(85.3) = 85 -> 128
    assert swiglu_hidden(100) == 320  # 266 -> 320
    assert swiglu_hidden(4096, multiple_of=256) == 11008  # LLaMA-7B
    with pytest.raises(ValueError, match="n_embd and multiple_of must be positive"):
        swiglu_hidden(0)


def test_gelu_tanh_is_gpt2s_approximation_and_a_config_choice():
    """GPT-2's gelu_new, written out, against MLP(activation="gelu_tanh") and GPTConfig's
    mlp="gelu_tanh"; exact GELU differs from it."""
    mlp = MLP(8, 32, activation="gelu_tanh")
    x = 3 * torch.randn(2, 5, 8)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias  # (2, 5, 32)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(mlp(x), h @ mlp.c_proj.weight.T + mlp.c_proj.bias)
    exact = MLP(8, 32)
    exact.load_state_dict(mlp.state_dict())
    assert not torch.allclose(exact(x), mlp(x), atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation 'fast'; registered: gelu, gelu_tanh"):
        MLP(8, 32, activation="fast")
    model = _model(mlp="gelu_tanh")
    assert all(block.mlp.act.name == "gelu_tanh" for block in model.transformer.h)
    prompt = _ids(2, 3)
    cached = model.generate(prompt, 6, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 6, temperature=0, use_cache=False))


def test_a_registered_activation_is_an_mlp_choice_and_d_ff_its_width():
    @register_activation("squared_relu")  # Primer (So et al., 2021)
    def squared_relu(x):
        return F.relu(x) ** 2

    try:
        model = _model(mlp="squared_relu", d_ff=48)
        mlp = model.transformer.h[0].mlp
        assert isinstance(mlp, MLP) and mlp.c_fc.out_features == 48 and mlp.act.fn is squared_relu
        x = torch.randn(2, 3, 32)
        h = F.relu(mlp.c_fc(x)) ** 2
        torch.testing.assert_close(mlp(x), mlp.c_proj(h))
        gated = _model(mlp="geglu", d_ff=40).transformer.h[0].mlp
        assert (
            isinstance(gated, SwiGLU)
            and gated.act.name == "gelu"
            and gated.c_proj.in_features == 40
        )
        with pytest.raises(ValueError, match="already registered"):
            register_activation("relu")(squared_relu)
        with pytest.raises(ValueError, match="d_ff must be a positive integer"):
            _config(d_ff=0)
    finally:
        del ACTIVATIONS["squared_relu"]
    with pytest.raises(ValueError, match=r"mlp must be one of \('gelu', 'gelu_tanh', 'relu'"):
        _config(mlp="squared_relu")


def test_swiglu_is_silu_gate_times_up_then_down():
    mlp = SwiGLU(8, 12)
    x = torch.randn(2, 3, 8)
    w_gate, w_up = mlp.c_fc.weight[:12], mlp.c_fc.weight[12:]
    b_gate, b_up = mlp.c_fc.bias[:12], mlp.c_fc.bias[12:]
    h = F.silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)
    torch.testing.assert_close(mlp(x), h @ mlp.c_proj.weight.T + mlp.c_proj.bias)
    with pytest.raises(ValueError, match="dropout must be in"):
        SwiGLU(8, 12, dropout=1.0)


def test_a_window_longer_than_block_size_is_refused_in_plain_and_hybrid_stacks():
    """A window past block_size would make the local layer full causal attention in training."""
    base = dict(vocab_size=8, block_size=16, n_layer=2, n_head=2, n_embd=8)
    assert GPT(GPTConfig(**base, attention="local", attention_options={"window": 16}))
    for stack in (dict(attention="local"), dict(layer_attention=["local", "mha"])):
        with pytest.raises(ValueError, match="'local' has window=17 > block_size=16: every"):
            GPTConfig(**base, **stack, attention_options={"window": 17})


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_norm_and_norm_position_choices_build_run_and_decode(mlp, norm, norm_position, bias):
    model = _model(mlp=mlp, norm=norm, norm_position=norm_position, bias=bias)
    block = model.transformer.h[0]
    assert isinstance(block.mlp, SwiGLU if mlp == "swiglu" else MLP)
    hidden = swiglu_hidden(32) if mlp == "swiglu" else 4 * 32
    assert block.mlp.c_proj.in_features == hidden
    norm_type = torch.nn.RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm
    assert isinstance(block.ln_1, norm_type)
    assert isinstance(
        model.transformer.ln_f, norm_type if norm_position == "pre" else torch.nn.Identity
    )
    assert any(n.endswith(".bias") for n, _ in model.named_parameters()) == bias
    logits, loss = model(_ids(2, 8), _ids(2, 8))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    prompt = _ids(2, 3)
    cached = model.generate(prompt, 6, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 6, temperature=0, use_cache=False))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_is_the_documented_residual_formula(norm_position):
    block = _model(norm_position=norm_position).transformer.h[0]
    x = torch.randn(2, 8, 32)
    if norm_position == "pre":
        h = x + block.attn(block.ln_1(x))
        expected = h + block.mlp(block.ln_2(h))
    else:
        h = block.ln_1(x + block.attn(x))
        expected = block.ln_2(h + block.mlp(h))
    torch.testing.assert_close(block(x), expected)


def test_init_std_of_residual_projections_and_other_weights():
    cfg = _config(n_layer=4, n_embd=256, n_head=4, vocab_size=512, bias=True)
    model = GPT(cfg)
    small = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - small) < 0.05 * small, name
        elif name.endswith("weight") and p.ndim == 2:
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name
        elif "ln_" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # biases
            assert torch.equal(p, torch.zeros_like(p)), name


def test_position_embeddings_only_for_learned_and_sinusoidal():
    assert "wpe" in _model(positions="learned").transformer
    assert "wpe" in _model(positions="sinusoidal").transformer
    for positions in ("rope", "alibi", "none"):
        assert "wpe" not in _model(positions=positions).transformer


# ---- counts ---------------------------------------------------------------------------------


def test_num_params_and_flops_against_a_hand_count():
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8))
    # per block: ln_1 2*8, c_attn 8*24+24, attn c_proj 8*8+8, ln_2 2*8, c_fc 8*32+32, c_proj 32*8+8
    block = 16 + 216 + 72 + 16 + 288 + 264
    n = 10 * 8 + 2 * block + 16  # wte (tied to lm_head), blocks, ln_f
    assert model.num_params() == n == 1840
    assert model.num_params(non_embedding=False) == n + 8 * 8  # + wpe
    assert model.flops_per_token() == 6 * n + 12 * 2 * 8 * 8
    assert model.flops_per_token(seq_len=4) == 6 * n + 12 * 2 * 8 * 4
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        model.flops_per_token(0)


# ---- forward ---------------------------------------------------------------------------------


def test_targets_minus_one_are_left_out_of_the_loss():
    model = _model()
    idx, targets = _ids(2, 8), _ids(2, 8)
    targets[0, :5] = -1
    targets[1, 7] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_forward_rejects_bad_input():
    model = _model()
    with pytest.raises(ValueError, match=f"T={BLOCK + 1} tokens.*block_size={BLOCK}"):
        model(_ids(1, BLOCK + 1))
    with pytest.raises(ValueError, match="idx must be a \\(B, T\\) tensor of integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(_ids(2, 4), _ids(2, 5))
    with pytest.raises(ValueError, match="one cache per block"):
        model(_ids(2, 4), caches=model.new_caches(2)[:1])


# ---- generate --------------------------------------------------------------------------------


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = _model()
    prompt = _ids(3, 4)
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=0.7, top_k=1, top_p=0.5), greedy)


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    model = _model()
    prompt = _ids(4, 2)
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(1))
    c = model.generate(prompt, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k=3 draws among the three likeliest tokens after the prompt
    top3 = model(prompt)[0][:, -1].topk(3).indices  # (4, 3)
    for seed in range(5):
        first = model.generate(prompt, 1, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert (first[:, -1:] == top3).any(dim=1).all()


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.cat(
        [_sample(logits, 1.0, None, 0.8, torch.Generator().manual_seed(s)) for s in range(200)]
    )
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    draws = torch.cat(
        [_sample(logits, 1.0, None, 0.81, torch.Generator().manual_seed(s)) for s in range(200)]
    )
    assert set(draws.flatten().tolist()) == {0, 1, 2}


def test_sampling_probs_against_the_explicit_distributions():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = torch.log(p)
    torch.testing.assert_close(sampling_probs(logits), p)
    torch.testing.assert_close(
        sampling_probs(logits, top_p=0.8), torch.tensor([[0.625, 0.375, 0, 0]])
    )
    torch.testing.assert_close(
        sampling_probs(logits, top_k=3), torch.cat([p[:, :3] / 0.95, p[:, 3:] * 0], 1)
    )
    hot = p**2 / (p**2).sum()  # temperature 0.5 squares the probabilities, renormalised
    torch.testing.assert_close(sampling_probs(logits, temperature=0.5), hot)
    assert torch.equal(sampling_probs(logits, temperature=0), torch.tensor([[1.0, 0, 0, 0]]))


def test_stop_token_pads_finished_rows_and_ends_early():
    model = _model()
    prompt = _ids(3, 3)
    free = model.generate(prompt, BLOCK - 3, temperature=0)
    stop = free[0, 5].item()  # row 0 produces it at its third new token
    out = model.generate(prompt, BLOCK - 3, temperature=0, stop_token=stop)
    first_stops = []
    for row in range(3):
        new = free[row, 3:].tolist()
        first = new.index(stop) if stop in new else None
        first_stops.append(first)
        n = len(new) if first is None else first + 1
        assert out[row, 3 : 3 + n].tolist() == new[:n]  # the same tokens up to the stop
        assert (out[row, 3 + n :] == stop).all()  # then padding
    done = all(f is not None for f in first_stops)
    expected_new = max(first_stops) + 1 if done else BLOCK - 3
    assert out.shape == (3, 3 + expected_new)
    single = model.generate(prompt[:1], BLOCK - 3, temperature=0, stop_token=stop)
    assert single.shape == (1, 3 + first_stops[0] + 1) and single[0, -1] == stop  # ends early


def test_a_prompt_too_long_for_the_cache_raises_and_is_cropped_without():
    model = _model()
    with pytest.raises(ValueError, match="'learned' has no embedding past block_size.*use_cache"):
        model.generate(_ids(1, 10), BLOCK - 9, temperature=0)
    long_prompt = _ids(2, BLOCK + 5)
    out = model.generate(long_prompt, 4, temperature=0, use_cache=False)
    assert out.shape == (2, BLOCK + 9) and torch.equal(out[:, : BLOCK + 5], long_prompt)
    cropped = model.generate(long_prompt[:, -BLOCK:], 4, temperature=0, use_cache=False)
    assert torch.equal(out[:, -4:], cropped[:, -4:])
    assert torch.equal(model.generate(long_prompt, 0), long_prompt)


def test_generate_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=f"ids 0..{VOCAB}, outside \\[0, vocab_size={VOCAB}\\)"):
        _model().generate(torch.tensor([[0, VOCAB]]), 1)


@pytest.mark.parametrize("name", available())
def test_forward_reads_no_token_value(name):
    """On the meta device no tensor holds values: a forward pass that decided anything on the
    token ids (a range check, a branch) would fail there."""
    with torch.device("meta"):
        model = _model(name)
        idx = torch.zeros(2, BLOCK, dtype=torch.long)
        logits, loss = model(idx, idx)
    assert logits.shape == (2, BLOCK, VOCAB) and logits.is_meta and loss.is_meta


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an integer >= 0"),
        (dict(temperature=-0.5), "temperature must be 0 \\(greedy\\) or a finite number"),
        (dict(top_k=0), "top_k must be None or an integer >= 1"),
        (dict(top_p=0.0), "top_p must be None or in \\(0, 1\\]"),
        (dict(top_p=1.5), "top_p must be None or in \\(0, 1\\]"),
        (dict(stop_token=VOCAB), "stop_token must be None or an id"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    args = dict(max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        _model().generate(_ids(1, 3), **args)


# ---- GPTConfig --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(n_layer=2.0), "n_layer must be a positive integer"),
        (dict(n_embd=30), "n_embd=30 is not divisible by n_head=4"),
        (dict(dropout=1.0), "dropout must be in \\[0, 1\\)"),
        (dict(bias="yes"), "bias must be True or False"),
        (dict(tie_weights=1), "tie_weights must be True or False"),
        (dict(attention="nope"), "unknown attention 'nope'; registered names: .*mha"),
        (dict(positions="xyz"), "positions must be one of"),
        (
            dict(mlp="tanh"),
            "mlp must be one of \\('gelu', 'gelu_tanh', 'relu', 'silu', 'swiglu', 'geglu'\\)",
        ),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(norm_position="middle"), "norm_position must be one of \\('pre', 'post'\\)"),
        (dict(attention_options={"foo": 1}), "MultiHeadAttention has no option foo"),
        (dict(attention="local", attention_options={"windw": 1}), "options: n_kv_head, window"),
        (dict(attention_options={"n_embd": 8}), "\\['n_embd'\\] that GPTConfig sets itself"),
        (dict(attention_options={"causal": False}), "\\['causal'\\] that GPTConfig sets"),
        (dict(attention="linear", positions="alibi"), "never forms the scores that ALiBi"),
        (dict(attention_options=[("window", 4)]), "attention_options must be a dict"),
        (dict(attention="gqa", attention_options={"n_kv_head": 3}), "n_kv_head=3 does not divide"),
        (dict(attention_options={"rope_pairing": "odd"}), "rope_pairing must be one of"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **kwargs})


def test_config_round_trips_through_json():
    cfg = _config("gqa", positions="rope", mlp="swiglu", norm="rmsnorm", tie_weights=False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert GPTConfig.from_dict(d) == cfg
    assert cfg.build_attention(0).n_kv_head == 2 and cfg.attention_config().n_embd == 32
    with pytest.raises(ValueError, match="unknown GPTConfig keys \\['n_ctx'\\]"):
        GPTConfig.from_dict({**d, "n_ctx": 16})
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        GPTConfig.from_dict({**d, "vocab_size": -3})
