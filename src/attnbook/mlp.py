"""The position-wise feed-forward networks of a transformer block, applied to every position alone.

- ``MLP``: ``Linear(n_embd -> hidden) -> activation -> Linear(hidden -> n_embd) -> dropout``,
  the feed-forward network of GPT-2 (``hidden = 4 * n_embd``, GELU's tanh approximation).
- ``SwiGLU``: a gated network (Shazeer, 2020, "GLU Variants Improve Transformer"; used by
  PaLM and LLaMA): ``(act(x W_gate) * (x W_up)) W_down -> dropout`` with SiLU (GeGLU: GELU).
  It has three weight matrices instead of two, so at equal parameter count its hidden width is
  2/3 of the MLP's: ``swiglu_hidden(n_embd)`` gives LLaMA's rule.
- Activations by name (``ACTIVATIONS``: gelu, gelu_tanh, relu, silu); ``register_activation``
  adds one, and every ``MLP`` and ``GPTConfig.mlp`` can then use it.

Neither network mixes positions: that is attention's job. Chapter 17 compares them.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_activation(name: str):
    """Decorator registering an elementwise function ``Tensor -> Tensor`` under ``name``."""

    def decorator(fn):
        if ACTIVATIONS.get(name, fn) is not fn:
            raise ValueError(f"activation {name!r} is already registered: pick another name")
        ACTIVATIONS[name] = fn
        return fn

    return decorator


register_activation("gelu")(F.gelu)  # exact: x * Phi(x)
register_activation("relu")(F.relu)
register_activation("silu")(F.silu)  # x * sigmoid(x), also called swish


@register_activation("gelu_tanh")
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``: ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``."""
    return F.gelu(x, approximate="tanh")


class Activation(nn.Module):
    """The registered activation ``name`` as a module (no parameters)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {name!r}; registered: {', '.join(sorted(ACTIVATIONS))}"
            )
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _check_sizes(n_embd: int, hidden: int, dropout: float) -> None:
    if n_embd <= 0 or hidden <= 0:
        raise ValueError(f"n_embd and hidden must be positive, got {n_embd}, {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class MLP(nn.Module):
    """Feed-forward block: ``(B, T, n_embd) -> (B, T, n_embd)``.

    Args:
        n_embd: input and output width.
        hidden: inner width (4 * n_embd in GPT-2 and the original transformer).
        dropout: dropout on the output, in [0, 1).
        bias: whether the two linear layers have biases.
        activation: a name in ``ACTIVATIONS`` (``"gelu"``, exact; GPT-2's weights were trained
            with ``"gelu_tanh"``).
    """

    def __init__(
        self,
        n_embd: int,
        hidden: int,
        dropout: float = 0.0,
        bias: bool = True,
        activation: str = "gelu",
    ):
        super().__init__()
        _check_sizes(n_embd, hidden, dropout)
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = Activation(activation)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c_fc(x))  # (B, T, hidden)
        return self.dropout(self.c_proj(h))  # (B, T, n_embd)


def swiglu_hidden(n_embd: int, multiple_of: int = 64) -> int:
    """LLaMA's hidden width for SwiGLU: ``2/3 * 4 * n_embd``, rounded up to ``multiple_of``.

    Two thirds of the MLP's ``4 * n_embd`` keep the parameter count of the three matrices
    (``3 * n_embd * hidden``) close to the MLP's two (``2 * n_embd * 4 * n_embd``); the
    rounding makes the matrices friendly to hardware. Like LLaMA, ``int(8 * n_embd / 3)`` is
    rounded up: 768 -> 2048, 32 -> 128.
    """
    if n_embd <= 0 or multiple_of <= 0:
        raise ValueError(f"n_embd and multiple_of must be positive, got {n_embd}, {multiple_of}")
    hidden = 8 * n_embd // 3
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """Gated feed-forward block: ``(B, T, n_embd) -> (B, T, n_embd)``.

    ``c_fc`` is the gate and up projections fused into one ``Linear(n_embd -> 2 * hidden)``:
    its first ``hidden`` output rows are ``W_gate`` (LLaMA's ``gate_proj``), the last ``hidden``
    rows ``W_up`` (``up_proj``). ``c_proj`` is ``W_down`` (``down_proj``).

    Args:
        n_embd: input and output width.
        hidden: inner width (``swiglu_hidden(n_embd)`` in the GPT of this book).
        dropout: dropout on the output, in [0, 1).
        bias: whether the linear layers have biases (LLaMA has none).
        activation: the gate's activation, a name in ``ACTIVATIONS`` (SiLU; GeGLU uses GELU).
    """

    def __init__(
        self,
        n_embd: int,
        hidden: int,
        dropout: float = 0.0,
        bias: bool = True,
        activation: str = "silu",
    ):
        super().__init__()
        _check_sizes(n_embd, hidden, dropout)
        self.act = Activation(activation)
        self.c_fc = nn.Linear(n_embd, 2 * hidden, bias=bias)  # gate | up
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # 2 x (B, T, hidden)
        h = self.act(gate) * up  # (B, T, hidden): the gate scales each hidden unit
        return self.dropout(self.c_proj(h))  # (B, T, n_embd)
