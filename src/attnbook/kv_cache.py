"""The KV cache: keys and values of the positions already seen, kept for generation.

Generating token ``t`` needs the keys and values of tokens ``0 .. t``. Without a cache, every
step recomputes them all; with one, each step computes them for the new token only and appends
them. ``KVCache`` is the full cache every variant so far uses: one per attention layer,
preallocated to ``max_len`` positions, so appending never reallocates.

Protocol (shared with the other cache kinds of later chapters): ``append`` returns everything
cached so far, ``length`` says how many positions are cached (the position of the next token),
``reset`` empties it, ``bytes_per_token`` says what one position costs.
"""

import torch


def check_cache_sizes(**sizes: int) -> None:
    """Raise ValueError naming the first size that is not positive (shared by every cache kind)."""
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


class KVCache:
    """Preallocated keys ``(B, n_kv_head, max_len, head_dim)`` and values for one layer.

    Args:
        batch_size, n_kv_head, head_dim: the shape of what is cached.
        max_len: the most positions it holds (prompt plus generated tokens).
        v_head_dim: size of a value vector, if it differs from ``head_dim``.
        device, dtype: where and how the tensors are stored. A cache may store a lower precision
            than the model computes in (e.g. bfloat16 halves its memory): appended keys and
            values are rounded to ``dtype``, and attention casts them back when it reads them.
    """

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
        check_cache_sizes(
            batch_size=batch_size, n_kv_head=n_kv_head, head_dim=head_dim, max_len=max_len
        )
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, n_kv_head, max_len, v_head_dim, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store ``T`` new positions, ``k``: ``(B, n_kv_head, T, head_dim)``, ``v`` likewise.

        Returns all cached keys and values, ``(B, n_kv_head, length, head_dim)`` each: views of
        the cache's storage, which later appends (after a ``reset``) overwrite.
        """
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
        if self.length + T > self.max_len:
            raise ValueError(
                f"KV cache overflow: it holds max_len={self.max_len} positions, {self.length} are "
                f"used and {T} more were appended; reset() it or build it with a larger max_len"
            )
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reset(self) -> None:
        """Forget every cached position (the memory stays allocated)."""
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence takes in this layer: its keys and values, all heads."""
        per_position = self.k[:, :, 0].numel() + self.v[:, :, 0].numel()
        return per_position * self.k.element_size() // self.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache."""
        return self.k.nbytes + self.v.nbytes
