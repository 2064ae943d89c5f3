"""The registry of attention variants, and the settings each variant owns.

A variant is a module class registered with ``@register_attention("name")``. Its constructor
takes the shared ``AttentionConfig`` and, as keywords, the fields of its own ``Options``
dataclass (a variant with none has ``NoOptions``)::

    layer = build_attention("local", AttentionConfig(n_embd=64, n_head=4), window=16)

``options_for_length(T, n_head)`` is the variant's choice of options for sequences of ``T``
tokens, which ``compare`` and ``bench`` use. Chapter 3 introduces the registry.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import nn

from .config import AttentionConfig

_REGISTRY: dict[str, type[nn.Module]] = {}


@dataclass(frozen=True)
class NoOptions:
    """The options of a variant that has no settings of its own."""


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


def attention_class(name: str) -> type[nn.Module]:
    """The module class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; registered names: {', '.join(available())}")
    return _REGISTRY[name]


def option_names(cls: type[nn.Module]) -> list[str]:
    """The names of the options ``cls`` takes (the fields of ``cls.Options``)."""
    return [f.name for f in fields(cls.Options)]


def make_options(cls: type[nn.Module], options: dict):
    """``cls.Options(**options)``, refusing keys that are not its fields with a ValueError that
    lists the known ones and the registered variants that take the unknown ones."""
    unknown = [key for key in options if key not in option_names(cls)]
    if unknown:
        takers = [n for n in available() if set(unknown) <= set(option_names(_REGISTRY[n]))]
        hint = f"; {', '.join(takers)} take {'it' if len(unknown) == 1 else 'them'}" * bool(takers)
        raise ValueError(
            f"{cls.__name__} has no option {', '.join(unknown)} (its options: "
            f"{', '.join(option_names(cls)) or 'none'}){hint}"
        )
    return cls.Options(**options)


def build_attention(name: str, config: AttentionConfig, **options) -> nn.Module:
    """Build the attention variant registered as ``name`` from ``config`` and its ``options``."""
    cls = attention_class(name)
    if not isinstance(config, AttentionConfig):
        raise ValueError(f"config must be an AttentionConfig, got {type(config).__name__}")
    return cls(config, **options)
