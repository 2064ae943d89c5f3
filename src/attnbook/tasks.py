"""Synthetic diagnostics: associative recall, copying and induction, generated in code.

    task = build_task("recall", vocab_size=64, seq_len=64, n_pairs=8)
    batch = task.batch(32, torch.Generator().manual_seed(0))   # idx, targets, gaps: (32, 64) each
    logits, loss = model(batch.idx, batch.targets)             # GPT's loss skips targets == -1
    accuracy(logits, batch), accuracy_by_gap(logits, batch, edges=[0, 8, 16, 64])

Each task (``MultiQueryRecall`` "recall", Zoology's MQAR; ``Copy`` "copy"; ``Induction``
"induction") is a validated frozen dataclass whose ``batch`` draws fresh sequences from a
generator with batched tensor operations. ``targets`` is ``-1`` where nothing is asked, and
``gaps`` says how far back the evidence for each answer lies, so accuracy by gap separates a
model that cannot see far enough back. Every batch is new (draw a fixed validation batch from
its own generator) and made on the CPU. Chapter 18 trains every variant on them.
"""

import math
from dataclasses import MISSING, dataclass, fields
from typing import ClassVar, Protocol

import torch

from .checks import check_positive_int

FILLER = 0  # the input at positions that ask nothing (recall, copy)
SEPARATOR = 1  # the copy task's separator between the segment and its repetition


@dataclass(frozen=True)
class TaskBatch:
    """One batch of a task: inputs, answers and the distance of each answer's evidence.

    Attributes:
        idx: ``(B, T)`` int64 input ids.
        targets: ``(B, T)`` int64, the id to predict at each position, ``-1`` where none.
        gaps: ``(B, T)`` int64, at answer positions how many positions back the evidence lies
            (recall: the queried key in its pair; copy: the token's first occurrence, always
            ``segment_len + 1``; induction: the first ``A``); ``-1`` elsewhere.
    """

    idx: torch.Tensor
    targets: torch.Tensor
    gaps: torch.Tensor


class Task(Protocol):
    """What every task provides: a name, the ids it uses, the length of its sequences, batches."""

    name: str
    vocab_size: int
    seq_len: int

    def batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch: ...


def _check_batch_args(batch_size, generator) -> None:
    check_positive_int("batch_size", batch_size)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {generator!r}"
        )


def _distinct(batch_size: int, n: int, low: int, high: int, generator) -> torch.Tensor:
    """``(batch_size, n)`` ids from ``[low, high)``, distinct within a row, uniformly drawn.

    Floyd's algorithm (Bentley and Floyd, 1987), one step per id for the whole batch: step
    ``k`` draws ``t`` uniform in ``[0, top_k]``, ``top_k = N - n + k`` (``N = high - low``), and
    keeps ``t``, or ``top_k`` if ``t`` is already taken; this gives a uniform subset, then put in
    a random order. Its cost grows with ``n``, not with the size of the range.
    """
    tops = torch.arange(high - low - n, high - low)  # (n,)
    u = torch.rand(batch_size, n, generator=generator)  # (B, n)
    draws = (u * (tops + 1)).long().clamp(max=tops)  # (B, n): step k's t in [0, top_k]
    chosen = torch.empty(batch_size, n, dtype=torch.long)  # (B, n)
    for k in range(n):
        t = draws[:, k : k + 1]  # (B, 1)
        taken = (chosen[:, :k] == t).any(dim=1, keepdim=True)  # (B, 1)
        chosen[:, k : k + 1] = torch.where(taken, tops[k], t)  # (B, 1)
    order = torch.rand(batch_size, n, generator=generator).argsort(dim=1)  # (B, n)
    return chosen.gather(1, order) + low  # (B, n)


@dataclass(frozen=True)
class MultiQueryRecall:
    """Multi-query associative recall: ``n_pairs`` key-value pairs, then queries of the keys.

    A sequence of ``T = seq_len`` positions is ``k_0 v_0 k_1 v_1 ... k_{n-1} v_{n-1}`` (pair
    ``i``'s key at position ``2i``, its value at ``2i + 1``) followed by ``T - 2 n_pairs``
    query positions. Keys are distinct within a sequence, drawn from ``[1, vocab_size // 2)``;
    values are distinct within a sequence, drawn from ``[vocab_size // 2, vocab_size)``, so a
    key is never a value. Every query position holds a key of one of the pairs, chosen uniformly
    among the pairs at most ``max_gap`` positions back, and its target is that key's value
    (keys may be asked several times; values never appear after the pairs, so an answer can only
    come from the pairs). A query position with no pair close enough holds ``FILLER`` (0) and
    asks nothing. The gap of a query is its position minus its key's position: at least 2 (the
    first query and the last key) and at most ``max_gap``.

    As in Zoology the loss is on the answers only. Unlike Zoology, which asks each key once at
    random even positions (filler between) with power-law distributed gaps, every position after
    the pairs is a query here, which gives more answers per sequence and gaps spread over the
    whole range, so that ``accuracy_by_gap`` has answers in every bin.

    Reach of sliding-window attention: a layer with window ``w`` (each position sees itself and
    the ``w - 1`` before it) moves information at most ``w - 1`` positions forward, so ``L`` such
    layers reach ``R = L (w - 1)`` positions back; MLPs and norms act per position and add no
    reach. A query with gap ``g`` needs its key (``g`` back) and its value (``g - 1`` back):

    - ``g <= R``: both are in reach, the answer can be learned;
    - ``g = R + 1``: the value is in reach but not the key that identifies it;
    - ``g >= R + 2``: neither is in reach, so the best the model can do is guess among the values
      it has not seen paired with another key.

    So ``max_gap <= R`` makes a task a sliding-window model can solve, and
    ``accuracy_by_gap(..., edges=[2, R + 1, R + 2, seq_len])`` shows it fail beyond ``R``
    (full attention has no such limit; linear attention sees everything but through a
    fixed-size state, so, as Zoology found, it loses recall as ``n_pairs`` grows instead).

    Args:
        vocab_size: ids used, ``[0, vocab_size)``; needs ``vocab_size // 2 - 1 >= n_pairs``
            distinct keys.
        seq_len: ``T``; needs at least one query position after the pairs (``T > 2 n_pairs``).
        n_pairs: key-value pairs per sequence.
        max_gap: the longest gap asked, an int >= 2, or None for any (up to ``T - 1``).
    """

    name: ClassVar[str] = "recall"
    vocab_size: int
    seq_len: int
    n_pairs: int
    max_gap: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_pairs"):
            check_positive_int(name, getattr(self, name))
        n_keys = self.vocab_size // 2 - 1
        if self.n_pairs > n_keys:
            raise ValueError(
                f"n_pairs={self.n_pairs} distinct keys do not fit in the {n_keys} key ids "
                f"[1, {self.vocab_size // 2}) of vocab_size={self.vocab_size}: use vocab_size >= "
                f"{2 * (self.n_pairs + 1)} or fewer pairs"
            )
        if self.seq_len <= 2 * self.n_pairs:
            raise ValueError(
                f"seq_len={self.seq_len} leaves no room for queries after {self.n_pairs} pairs "
                f"({2 * self.n_pairs} positions): use seq_len > {2 * self.n_pairs} or fewer pairs"
            )
        if self.max_gap is not None:
            if isinstance(self.max_gap, bool) or not isinstance(self.max_gap, int):
                raise ValueError(f"max_gap must be None or an integer >= 2, got {self.max_gap!r}")
            if self.max_gap < 2:
                raise ValueError(
                    f"max_gap must be None or >= 2 (the first query is 2 positions after the "
                    f"last key), got {self.max_gap!r}"
                )

    def batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A fresh batch of ``batch_size`` sequences, drawn from ``generator`` alone."""
        _check_batch_args(batch_size, generator)
        B, T, n, half = batch_size, self.seq_len, self.n_pairs, self.vocab_size // 2
        max_gap = T if self.max_gap is None else self.max_gap
        keys = _distinct(B, n, 1, half, generator)  # (B, n)
        values = _distinct(B, n, half, self.vocab_size, generator)  # (B, n)
        idx = torch.full((B, T), FILLER, dtype=torch.long)  # (B, T)
        idx[:, 0 : 2 * n : 2] = keys
        idx[:, 1 : 2 * n : 2] = values
        # Query position p may ask pair i if its key is close enough: 2i >= p - max_gap.
        p = torch.arange(2 * n, T)  # (Q,) query positions
        first = (p - max_gap + 1).div(2, rounding_mode="floor").clamp(min=0)  # (Q,) ceil, >= 0
        count = n - first  # (Q,) pairs within reach of each position, <= 0 for none
        u = torch.rand(B, T - 2 * n, generator=generator)  # (B, Q)
        pair = first + (u * count).long().clamp(max=count - 1)  # (B, Q) uniform in [first, n)
        pair = pair.clamp(0, n - 1)  # (B, Q): a valid index where nothing is asked
        asked = count > 0  # (Q,)
        idx[:, 2 * n :] = torch.where(asked, keys.gather(1, pair), FILLER)  # (B, Q)
        targets = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        targets[:, 2 * n :] = torch.where(asked, values.gather(1, pair), -1)  # (B, Q)
        gaps = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        gaps[:, 2 * n :] = torch.where(asked, p - 2 * pair, -1)  # (B, Q)
        return TaskBatch(idx, targets, gaps)


@dataclass(frozen=True)
class Copy:
    """Copying: a random segment, a separator, then the segment again.

    Positions ``0 .. S - 1`` (``S = segment_len``) hold random ids from ``[2, vocab_size)``,
    position ``S`` holds ``SEPARATOR`` (1), positions ``S + 1 .. 2S`` repeat the segment and the
    rest, if ``seq_len > 2S + 1``, is ``FILLER`` (0). The targets are the repetition: from the
    separator on, each position predicts the next segment token (``S`` answers per sequence);
    the token to copy lies ``S`` positions back and the earlier copy of the current input
    ``S + 1`` back (the gap).

    Args:
        vocab_size: ids used; at least 3 (filler, separator, one segment id).
        seq_len: ``T >= 2 * segment_len + 1``.
        segment_len: tokens to copy.
    """

    name: ClassVar[str] = "copy"
    vocab_size: int
    seq_len: int
    segment_len: int

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "segment_len"):
            check_positive_int(name, getattr(self, name))
        if self.vocab_size < 3:
            raise ValueError(
                f"vocab_size must be >= 3 (filler 0, separator 1, segment ids from 2), "
                f"got {self.vocab_size}"
            )
        if self.seq_len < 2 * self.segment_len + 1:
            raise ValueError(
                f"seq_len={self.seq_len} cannot hold a segment of segment_len={self.segment_len}, "
                f"a separator and the copy: use seq_len >= {2 * self.segment_len + 1}"
            )

    def batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A fresh batch of ``batch_size`` sequences, drawn from ``generator`` alone."""
        _check_batch_args(batch_size, generator)
        B, T, S = batch_size, self.seq_len, self.segment_len
        segment = torch.randint(2, self.vocab_size, (B, S), generator=generator)  # (B, S)
        idx = torch.full((B, T), FILLER, dtype=torch.long)  # (B, T)
        idx[:, :S] = segment
        idx[:, S] = SEPARATOR
        idx[:, S + 1 : 2 * S + 1] = segment
        targets = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        targets[:, S : 2 * S] = segment
        gaps = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        gaps[:, S : 2 * S] = S + 1
        return TaskBatch(idx, targets, gaps)


@dataclass(frozen=True)
class Induction:
    """Induction: random ids containing ``A B ... A``; after the second ``A``, predict ``B``.

    Each sequence has its own ``A``, drawn from ``[0, vocab_size)``, at exactly two positions
    ``i < j``; every other position holds a random id other than ``A`` (``B``, at ``i + 1``,
    among them). The gap ``j - i`` is uniform in ``[2, seq_len - 1]`` and ``i`` uniform among the
    positions that fit it. The only target of a sequence is ``B`` at position ``j``.

    Args:
        vocab_size: ids used; at least 2 (``A`` and one other).
        seq_len: ``T >= 3`` (``A B A``).
    """

    name: ClassVar[str] = "induction"
    vocab_size: int
    seq_len: int

    def __post_init__(self):
        for name in ("vocab_size", "seq_len"):
            check_positive_int(name, getattr(self, name))
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (A and B differ), got {self.vocab_size}")
        if self.seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 (A B A), got {self.seq_len}")

    def batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A fresh batch of ``batch_size`` sequences, drawn from ``generator`` alone."""
        _check_batch_args(batch_size, generator)
        B, T = batch_size, self.seq_len
        a = torch.randint(0, self.vocab_size, (B, 1), generator=generator)  # (B, 1)
        idx = torch.randint(0, self.vocab_size - 1, (B, T), generator=generator)  # (B, T)
        idx = idx + (idx >= a).long()  # (B, T): every id but A
        gap = torch.randint(2, T, (B, 1), generator=generator)  # (B, 1)
        u = torch.rand(B, 1, generator=generator)  # (B, 1)
        first = (u * (T - gap)).long().clamp(max=T - 1 - gap)  # (B, 1) uniform in [0, T - gap)
        second = first + gap  # (B, 1)
        idx.scatter_(1, first, a)
        idx.scatter_(1, second, a)
        targets = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        targets.scatter_(1, second, idx.gather(1, first + 1))  # B after the second A
        gaps = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
        gaps.scatter_(1, second, gap)
        return TaskBatch(idx, targets, gaps)


TASKS: dict[str, type] = {
    MultiQueryRecall.name: MultiQueryRecall,
    Copy.name: Copy,
    Induction.name: Induction,
}


def build_task(name: str, **options) -> Task:
    """The task registered as ``name`` in ``TASKS``, built from its fields ``options``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    allowed = [f.name for f in fields(cls)]
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(
            f"task {name!r} has no options {unknown}; its options: {', '.join(allowed)}"
        )
    missing = [f.name for f in fields(cls) if f.name not in options and f.default is MISSING]
    if missing:
        raise ValueError(f"task {name!r} needs the options {missing}")
    return cls(**options)


def _correct(logits: torch.Tensor, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(answered, correct)``, ``(B, T)`` bool on the logits' device: where a target is, where
    the argmax of ``logits`` ``(B, T, vocab_size)`` is that target."""
    if logits.dim() != 3 or logits.shape[:2] != batch.targets.shape:
        raise ValueError(
            f"logits must have shape (B, T, vocab_size) with (B, T) = "
            f"{tuple(batch.targets.shape)} of the batch's targets, got {tuple(logits.shape)}"
        )
    targets = batch.targets.to(logits.device)  # (B, T)
    answered = targets != -1  # (B, T)
    return answered, answered & (logits.argmax(dim=-1) == targets)  # (B, T) each


def accuracy(logits: torch.Tensor, batch: TaskBatch) -> float:
    """Fraction of the answer positions where the most likely id is the target.

    ``logits``: ``(B, T, vocab_size)``, e.g. the model's output on ``batch.idx``. NaN when the
    batch asks nothing.
    """
    answered, correct = _correct(logits, batch)
    n = int(answered.sum())
    return int(correct.sum()) / n if n else math.nan


def accuracy_by_gap(
    logits: torch.Tensor, batch: TaskBatch, edges
) -> list[tuple[int, int, float, int]]:
    """Accuracy of the answers whose gap falls in each bin ``[edges[k], edges[k + 1])``.

    Args:
        logits: ``(B, T, vocab_size)``.
        batch: the ``TaskBatch`` the logits answer.
        edges: increasing integers, at least two; answers with gaps outside
            ``[edges[0], edges[-1])`` are left out.
    Returns:
        One ``(lo, hi, accuracy, count)`` per bin; an empty bin has accuracy NaN and count 0.
    """
    edges = list(edges)
    if (
        len(edges) < 2
        or any(isinstance(e, bool) or not isinstance(e, int) for e in edges)
        or any(lo >= hi for lo, hi in zip(edges, edges[1:], strict=False))
    ):
        raise ValueError(f"edges must be at least two increasing integers, got {edges!r}")
    answered, correct = _correct(logits, batch)
    gaps = batch.gaps.to(logits.device)  # (B, T)
    rows = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        in_bin = answered & (gaps >= lo) & (gaps < hi)  # (B, T)
        n = int(in_bin.sum())
        rows.append((lo, hi, int((correct & in_bin).sum()) / n if n else math.nan, n))
    return rows
