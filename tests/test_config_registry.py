from dataclasses import fields

import pytest

from attnbook.attention import (
    AttentionConfig,
    MultiHeadAttention,
    attention_class,
    available,
    build_attention,
    register_attention,
)


def test_head_dim():
    assert AttentionConfig(n_embd=96, n_head=12).head_dim == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_embd": 10, "n_head": 3}, "n_embd=10 is not divisible by n_head=3"),
        ({"n_embd": 0}, "n_embd must be a positive integer"),
        ({"n_embd": -8}, "n_embd must be a positive integer"),
        ({"n_embd": 8.0}, "n_embd must be a positive integer"),
        ({"n_head": 0}, "n_head must be a positive integer"),
        ({"n_head": True}, "n_head must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"impl": "triton"}, "impl must be one of"),
        ({"qk_norm": 1}, "qk_norm must be True or False, got 1"),
        ({"output_gate": "yes"}, "output_gate must be True or False"),
        ({"sinks": None}, "sinks must be True or False"),
        ({"softcap": 0.0}, r"softcap must be None \(no cap\) or a finite number > 0"),
        ({"softcap": -30.0}, "softcap must be None .* got -30.0"),
        ({"softcap": float("inf")}, "softcap must be None .* got inf"),
        ({"softcap": float("nan")}, "softcap must be None .* got nan"),
        ({"softcap": True}, "softcap must be None .* got True"),
        ({"softcap": "50"}, "softcap must be None .* got '50'"),
        ({"impl": "flash", "softcap": 50.0}, "takes no softcap.* use impl='sdpa' or 'reference'"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**kwargs)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("gqa", {"n_kv_head": 0}, "n_kv_head must be a positive integer"),
        ("gqa", {"n_kv_head": 3}, "n_kv_head=3 does not divide n_head=4"),
        ("local", {"window": 0}, "window must be a positive integer"),
        ("linear", {"linear_chunk": -4}, "linear_chunk must be a positive integer"),
        ("mla", {"kv_lora_rank": 0}, "kv_lora_rank must be a positive integer"),
        ("mla", {"q_lora_rank": -1}, "q_lora_rank must be an integer >= 0"),
        ("mla", {"q_lora_rank": 2.0}, "q_lora_rank must be an integer >= 0"),
        ("mla", {"qk_nope_head_dim": 0}, "qk_nope_head_dim must be a positive integer"),
        ("mla", {"qk_rope_head_dim": 3}, "qk_rope_head_dim must be even"),
        ("mla", {"qk_rope_head_dim": 0}, "qk_rope_head_dim must be a positive integer"),
        ("mla", {"v_head_dim": -2}, "v_head_dim must be a positive integer"),
        ("mla", {"absorb": 1}, "absorb must be True or False"),
        ("mla", {"kv_norm": "yes"}, "kv_norm must be True or False"),
        ("dsa", {"index_topk": 0}, "index_topk must be a positive integer"),
        ("dsa", {"index_topk": 2.0}, "index_topk must be a positive integer"),
        ("dsa", {"index_n_heads": 0}, "index_n_heads must be a positive integer"),
        ("dsa", {"index_head_dim": -2}, "index_head_dim must be a positive integer"),
        ("dsa", {"index_head_dim": 6, "qk_rope_head_dim": 8}, "choose index_head_dim >= 8"),
        ("dsa", {"index_head_dim": 2}, "index_head_dim=2 is smaller than qk_rope_head_dim=4"),
        ("dsa", {"kv_lora_rank": 0}, "kv_lora_rank must be a positive integer"),
        ("moba", {"moba_chunk_size": 0}, "moba_chunk_size must be a positive integer"),
        ("moba", {"moba_chunk_size": 2.5}, "moba_chunk_size must be a positive integer"),
        ("moba", {"moba_topk": 0}, "moba_topk must be a positive integer"),
        ("moba", {"moba_topk": True}, "moba_topk must be a positive integer"),
        ("nsa", {"compress_block": 0}, "compress_block must be a positive integer"),
        ("nsa", {"compress_stride": 3}, "compress_stride=3 must divide compress_block=8"),
        ("nsa", {"select_block": 6}, "compress_stride=4 must divide select_block=6"),
        ("nsa", {"select_count": 2}, "select_count must be at least 3"),
        ("nsa", {"select_count": 2.0}, "select_count must be a positive integer"),
        ("nsa", {"window": 0}, "window must be a positive integer"),
        ("nsa", {"n_kv_head": 3}, "n_kv_head=3 does not divide n_head=4"),
        ("sparse", {"sparse_block": 0}, "sparse_block must be a positive integer"),
        ("sparse", {"n_window_blocks": 0}, "n_window_blocks must be a positive integer"),
        ("sparse", {"n_global_blocks": -1}, "n_global_blocks must be an integer >= 0"),
        ("sparse", {"n_random_blocks": 1.5}, "n_random_blocks must be an integer >= 0"),
    ],
)
def test_invalid_option_raises_value_error_naming_it(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_attention(name, AttentionConfig(n_embd=32, n_head=4), **options)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("mha", {"n_kv_head": 2}, r"has no option n_kv_head \(its options: none\); gqa, "),
        ("local", {"windw": 8}, r"no option windw \(its options: n_kv_head, window, sink_tokens\)"),
        ("gqa", {"window": 8, "absorb": True}, r"no option window, absorb .*\)$"),
    ],
)
def test_unknown_options_name_the_known_ones_and_who_takes_them(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_attention(name, AttentionConfig(n_embd=32, n_head=4), **options)


@pytest.mark.parametrize("name", available())
def test_options_for_length_build_and_are_the_variants_own(name):
    options = attention_class(name).options_for_length(64, 4)
    layer = build_attention(name, AttentionConfig(n_embd=32, n_head=4, block_size=64), **options)
    assert set(options) <= {f.name for f in fields(layer.options)}
    assert all(getattr(layer.options, key) == value for key, value in options.items())


def test_registry_builds_mha():
    assert "mha" in available()
    attn = build_attention("mha", AttentionConfig(n_embd=32, n_head=4))
    assert isinstance(attn, MultiHeadAttention)


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(ValueError, match="unknown attention 'nope'; registered names: .*mha"):
        build_attention("nope", AttentionConfig())


def test_build_needs_a_config():
    with pytest.raises(ValueError, match="AttentionConfig"):
        build_attention("mha", {"n_embd": 32})


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):

        @register_attention("mha")
        class Other:  # noqa: B903
            pass
