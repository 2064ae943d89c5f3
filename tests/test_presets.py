"""Presets: GPT-2's published sizes and a LLaMA-style shape, from Python and the command line."""

import pytest
import torch

from attnbook.gpt2 import gpt2_config
from attnbook.model import GPT
from attnbook.presets import PRESETS, preset
from attnbook.train import parse_config


@pytest.mark.parametrize(
    "name, millions", [("gpt2", 124), ("gpt2_small", 124), ("gpt2-medium", 355), ("gpt2-xl", 1558)]
)
def test_gpt2_presets_are_the_published_models(name, millions):
    cfg = preset(name)
    assert cfg == gpt2_config(name.replace("_small", ""))
    with torch.device("meta"):
        assert round(GPT(cfg).num_params(non_embedding=False) / 1e6) == millions


def test_llama_style_is_rmsnorm_swiglu_rope_gqa_without_biases():
    cfg = preset("llama_style", n_layer=2)
    assert (cfg.norm, cfg.mlp, cfg.positions, cfg.attention) == ("rmsnorm", "swiglu", "rope", "gqa")
    assert cfg.attention_options == {"n_kv_head": 4} and not cfg.bias and not cfg.tie_weights
    with torch.device("meta"):
        model = GPT(cfg)
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    assert model.transformer.h[0].attn.n_kv_head == 4 and cfg.n_layer == 2


def test_presets_from_the_command_line_with_flags_on_top():
    cfg = parse_config(["--preset", "llama_style", "--n_layer", "2", "--n_kv_head", "2"])
    assert cfg.model.mlp == "swiglu" and cfg.model.n_layer == 2 and cfg.model.n_embd == 768
    assert cfg.model.attention_options == {"n_kv_head": 2}  # the flag wins over the preset
    assert parse_config(["--n_layer", "3"]).model.mlp == "gelu"  # no preset: the defaults
    with pytest.raises(SystemExit):
        parse_config(["--preset", "gpt5"])
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; presets: gpt2, gpt2_small"):
        preset("gpt5")
    assert set(PRESETS) >= {"gpt2", "gpt2-large", "llama_style"}
