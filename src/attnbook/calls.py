"""Which operations a piece of code runs, and on what shapes: ``CallLog``.

    with CallLog() as log:
        layer(x)
    log.calls  # [("addmm", (64,)), ..., ("_scaled_dot_product_flash_attention_for_cpu", ...)]

A ``TorchDispatchMode`` (PyTorch's hook for every operation that reaches the kernels, in its
private ``torch.utils._python_dispatch``): it records each call's name without the overload and
the shape of its first tensor argument, then runs the call unchanged. Chapters 3 and 4 read it
to see which computations copy keys and values and which run the fused attention kernel. It is
not a profiler: no times, and unlike ``torch.profiler`` it prints nothing into a notebook.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CallLog(TorchDispatchMode):
    """Records ``(operation, shape of its first tensor argument)`` for every call in its scope,
    in ``calls``, in the order they ran."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), ())
        self.calls.append((func.__name__.split(".")[0], first))
        return func(*args, **(kwargs or {}))
