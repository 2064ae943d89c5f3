import pytest

from attnbook.attention import (
    AttentionConfig,
    MultiHeadAttention,
    available,
    build_attention,
    register_attention,
)


def test_head_dim():
    assert AttentionConfig(d_model=96, n_head=12).head_dim == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 10, "n_head": 3}, "d_model=10 is not divisible by n_head=3"),
        ({"d_model": 0}, "d_model must be a positive integer"),
        ({"d_model": -8}, "d_model must be a positive integer"),
        ({"d_model": 8.0}, "d_model must be a positive integer"),
        ({"n_head": 0}, "n_head must be a positive integer"),
        ({"n_head": True}, "n_head must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"impl": "flash"}, "impl must be one of"),
        ({"window": 0}, "window must be a positive integer"),
        ({"linear_chunk": -4}, "linear_chunk must be a positive integer"),
        ({"kv_lora_rank": 0}, "kv_lora_rank must be a positive integer"),
        ({"q_lora_rank": -1}, "q_lora_rank must be an integer >= 0"),
        ({"q_lora_rank": 2.0}, "q_lora_rank must be an integer >= 0"),
        ({"qk_nope_head_dim": 0}, "qk_nope_head_dim must be a positive integer"),
        ({"qk_rope_head_dim": 3}, "qk_rope_head_dim must be even"),
        ({"qk_rope_head_dim": 0}, "qk_rope_head_dim must be a positive integer"),
        ({"v_head_dim": -2}, "v_head_dim must be a positive integer"),
        ({"mla_absorb": 1}, "mla_absorb must be True or False"),
        ({"mla_kv_norm": "yes"}, "mla_kv_norm must be True or False"),
        ({"sparse_block": 0}, "sparse_block must be a positive integer"),
        ({"n_window_blocks": 0}, "n_window_blocks must be a positive integer"),
        ({"n_global_blocks": -1}, "n_global_blocks must be an integer >= 0"),
        ({"n_random_blocks": 1.5}, "n_random_blocks must be an integer >= 0"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**kwargs)


def test_registry_builds_mha():
    assert "mha" in available()
    attn = build_attention("mha", AttentionConfig(d_model=32, n_head=4))
    assert isinstance(attn, MultiHeadAttention)


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(ValueError, match="unknown attention 'nope'; registered names: .*mha"):
        build_attention("nope", AttentionConfig())


def test_build_needs_a_config():
    with pytest.raises(ValueError, match="AttentionConfig"):
        build_attention("mha", {"d_model": 32})


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):

        @register_attention("mha")
        class Other:  # noqa: B903
            pass
