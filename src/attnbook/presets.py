"""Named GPT shapes: GPT-2's published sizes and a LLaMA-style model, as ``GPTConfig``.

    cfg = preset("llama_style", n_layer=4)   # any field can be overridden
    attnbook train --preset llama_style --n_layer 4

- ``"gpt2"`` (also ``"gpt2_small"``, 124M), ``"gpt2-medium"``, ``"gpt2-large"``, ``"gpt2-xl"``:
  GPT-2 as published (``gpt2.gpt2_config``: learned positions, LayerNorm, GELU's tanh form,
  biases, tied embeddings);
- ``"llama_style"``: GPT-2 small's depth and width with LLaMA's choices: RMSNorm, SwiGLU, RoPE,
  no biases, untied embeddings, and grouped-query attention (12 query heads on 4 key/value heads).
"""

from dataclasses import replace

from .gpt2 import gpt2_config
from .model import GPTConfig


def _llama_style() -> GPTConfig:
    return replace(
        gpt2_config("gpt2"), vocab_size=50304, bias=False, attention="gqa",
        attention_options={"n_kv_head": 4}, positions="rope", mlp="swiglu", norm="rmsnorm",
        tie_weights=False,
    )  # fmt: skip


PRESETS = {
    "gpt2": lambda: gpt2_config("gpt2"),
    "gpt2_small": lambda: gpt2_config("gpt2"),
    "gpt2-medium": lambda: gpt2_config("gpt2-medium"),
    "gpt2-large": lambda: gpt2_config("gpt2-large"),
    "gpt2-xl": lambda: gpt2_config("gpt2-xl"),
    "llama_style": _llama_style,
}


def preset(name: str, **overrides) -> GPTConfig:
    """The ``GPTConfig`` of the preset ``name``, with ``overrides`` (GPTConfig fields) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name](), **overrides)
