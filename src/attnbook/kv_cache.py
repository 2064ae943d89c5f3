"""The KV cache: keys and values of the positions already seen, kept for generation.

Generating token ``t`` needs the keys and values of tokens ``0 .. t``. Without a cache, every
step recomputes them all; with one, each step computes them for the new token only and appends
them. ``KVCache`` is the full cache every variant so far uses: one per attention layer,
preallocated to ``max_len`` positions, so appending never reallocates.

``Cache`` is the protocol every cache kind of later chapters follows: ``append`` stores new
positions and returns what attention reads, ``length`` is the position of the next token,
``reset`` empties it, ``nbytes`` and ``bytes_per_token`` say what it costs, and one overflow check
guards ``max_len``; ``StateCache`` is the kind that keeps a fixed-size state instead. A ``bounded``
kind (a state, a rolling window) stops growing, so it may be fed any number of positions
(``max_len=None``). Chapter 7 builds the KV cache.
"""

import torch

from .checks import check_positive_int, check_positive_ints


class Cache:
    """What every cache kind shares: ``max_len``, ``length``, ``reset``, ``nbytes`` and the one
    overflow check. A kind stores its tensors, lists them in ``tensors()``, says what one
    position costs in ``bytes_per_token`` and defines ``append`` (store new positions, return
    what attention reads), calling ``_reserve`` first.

    ``max_len`` is the most positions it will be fed; ``None`` means no limit, which only a
    ``bounded`` kind takes (its storage stops growing however long the sequence gets).
    """

    kind = "cache"  # how the overflow message names it
    bounded = False  # True: the storage stops growing, any number of positions may be fed

    def __init__(self, max_len: int | None):
        if max_len is not None:
            check_positive_int("max_len", max_len)
        elif not self.bounded:
            raise ValueError(
                f"max_len=None (no limit) needs a bounded cache; a {self.kind} grows with the "
                f"sequence: give max_len"
            )
        self.max_len = max_len
        self.length = 0  # positions seen so far: the position of the next token

    def _reserve(self, T: int) -> int:
        """Count ``T`` more positions, or raise if they would pass ``max_len``; returns where
        they start."""
        if self.max_len is not None and self.length + T > self.max_len:
            raise ValueError(
                f"{self.kind} overflow: built for max_len={self.max_len} positions, {self.length} "
                f"already seen and {T} more appended; reset() it or build it with a larger max_len"
            )
        start, self.length = self.length, self.length + T
        return start

    def reset(self) -> None:
        """Forget every cached position (the memory stays allocated)."""
        self.length = 0

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the cache allocated."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache."""
        return sum(t.nbytes for t in self.tensors())

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence costs in this layer."""
        raise NotImplementedError


class StateCache(Cache):
    """A cache that does not grow: a recurrent layer's state (linear attention, DeltaNet) in
    place of keys and values. ``reset`` zeroes every tensor it holds; ``bytes_per_token`` is the
    whole state of one sequence, the same at every length: the cost of remembering any number
    of tokens."""

    bounded = True

    def reset(self) -> None:
        """Back to no tokens: every tensor of the state zero (the memory stays allocated)."""
        super().reset()
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, torch.zeros_like(value))

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one sequence's whole state in this layer, at any length."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors())


class KVCache(Cache):
    """Preallocated keys ``(B, n_kv_head, max_len, head_dim)`` and values for one layer.

    Args:
        batch_size, n_kv_head, head_dim: the shape of what is cached.
        max_len: the most positions it holds (prompt plus generated tokens).
        v_head_dim: size of a value vector, if it differs from ``head_dim``.
        device, dtype: where and how the tensors are stored. A cache may store a lower precision
            than the model computes in (e.g. bfloat16 halves its memory): appended keys and
            values are rounded to ``dtype``, and attention casts them back when it reads them.
    """

    kind = "KV cache"

    def __init__(
        self,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        v_head_dim: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        check_positive_ints(
            batch_size=batch_size, n_kv_head=n_kv_head, head_dim=head_dim, max_len=max_len
        )
        super().__init__(max_len)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, n_kv_head, max_len, v_head_dim, device=device, dtype=dtype)

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """ValueError unless ``k``, ``v`` are ``(B, n_kv_head, T, ·)`` on the cache's device."""
        B, H, _, D = self.k.shape
        T = k.shape[-2]
        if k.shape != (B, H, T, D) or v.shape != (B, H, T, self.v.shape[-1]):
            raise ValueError(
                f"expected k of shape {(B, H, T, D)} and v of shape {(B, H, T, self.v.shape[-1])}, "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.device != self.k.device or v.device != self.v.device:
            raise ValueError(
                f"the cache lives on {self.k.device}, got k on {k.device} and v on {v.device}: "
                f"build it with device=..."
            )

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store ``T`` new positions, ``k``: ``(B, n_kv_head, T, head_dim)``, ``v`` likewise.

        Returns all cached keys and values, ``(B, n_kv_head, length, head_dim)`` each: views of
        the cache's storage, which later appends (after a ``reset``) overwrite.
        """
        self._check(k, v)
        start = self._reserve(k.shape[-2])
        self.k[:, :, start : self.length] = k
        self.v[:, :, start : self.length] = v
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence takes in this layer: its keys and values, all heads."""
        per_position = self.k[:, :, 0].numel() + self.v[:, :, 0].numel()
        return per_position * self.k.element_size() // self.k.shape[0]
