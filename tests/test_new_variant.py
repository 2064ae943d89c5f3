"""A new attention variant is one class, its options and one decorator: the skeleton, a GPT and
cached generation take it as it is, and the registry-wide checks pass on it.

The variant is Reformer's shared-QK attention (keys are the queries, by default scaled to unit
length), defined here and nowhere in the package. It is registered inside a fixture and removed afterwards, so the registry-wide
tests of the other files never see it.
"""

from dataclasses import dataclass

import pytest
import test_kv_cache as cache_checks
import test_model as model_checks
import torch
import torch.nn.functional as F

from attnbook.attention import MultiHeadAttention, available, register_attention
from attnbook.attention.config import POSITIONS
from attnbook.attention.registry import _REGISTRY
from attnbook.model import GPT, GPTConfig


@dataclass(frozen=True)
class SharedQKOptions:
    """unit_keys: the keys are the queries scaled to unit length (Reformer), else the queries."""

    unit_keys: bool = True


@pytest.fixture(scope="module")
def name():
    @register_attention("shared-qk")
    class SharedQKAttention(MultiHeadAttention):
        """Compared with mha.py, one thing changes: the keys are the queries."""

        Options = SharedQKOptions

        def project(self, x):
            q, _, v = super().project(x)  # (B, n_head, T, head_dim) each
            return q, F.normalize(q, dim=-1) if self.options.unit_keys else q, v

    yield "shared-qk"
    del _REGISTRY["shared-qk"]


def test_the_registry_builds_it(name):
    assert name in available()
    layer = cache_checks._layer(name, "rope")
    assert type(layer).forward is MultiHeadAttention.forward  # the skeleton's, unchanged


@pytest.mark.parametrize("positions", POSITIONS)
def test_cached_decoding_equals_the_full_pass(name, positions, decode_in_chunks):
    cache_checks.test_cached_chunks_equal_the_full_pass(
        name, positions, [5, 1, 3, 3], decode_in_chunks
    )
    cache_checks.test_greedy_decoding_with_cache_equals_without(name, positions, 5)
    model_checks.test_cached_greedy_generation_equals_uncached(name, positions)


def test_its_cache_follows_the_protocol(name):
    cache_checks.test_every_cache_follows_the_protocol(name)


def test_a_gpt_with_it_has_the_right_shapes_and_learns(name):
    model_checks.test_shapes_and_initial_loss_is_log_vocab(name)
    model_checks.test_cached_chunks_give_the_full_forward_logits(name)
    model_checks.test_a_few_adamw_steps_on_a_repeated_sequence_lower_the_loss(name)


def test_its_option_goes_through_gptconfig_and_unknown_ones_are_refused(name):
    cfg = model_checks._config(name)
    torch.manual_seed(0)
    unit = GPT(cfg).eval()
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**{**cfg.to_dict(), "attention_options": {"unit_keys": False}})).eval()
    assert plain.transformer.h[0].attn.options.unit_keys is False
    idx = model_checks._ids(2, 9)
    assert not torch.allclose(unit(idx)[0], plain(idx)[0])  # same weights, other keys
    with pytest.raises(ValueError, match=r"SharedQKAttention has no option window \(its options"):
        GPTConfig(**{**cfg.to_dict(), "attention_options": {"window": 4}})
