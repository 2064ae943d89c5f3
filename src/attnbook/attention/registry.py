"""The registry of attention variants: a name -> module class table.

A variant registers itself with ``@register_attention("name")`` on a module class whose
constructor takes a single ``AttentionConfig``; ``build_attention(name, config)`` builds it.
Chapter 3 introduces it.
"""

from collections.abc import Callable

from torch import nn

from .config import AttentionConfig

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers an attention module class under ``name``."""

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(
                f"attention name {name!r} is already registered to {_REGISTRY[name].__name__}: "
                f"pick another name"
            )
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Sorted names of every registered attention variant."""
    return sorted(_REGISTRY)


def build_attention(name: str, config: AttentionConfig) -> nn.Module:
    """Build the attention variant registered as ``name`` from ``config``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; registered names: {', '.join(available())}")
    if not isinstance(config, AttentionConfig):
        raise ValueError(f"config must be an AttentionConfig, got {type(config).__name__}")
    return _REGISTRY[name](config)
