"""Tasks: answers and gaps against a slow scan, determinism, accuracy, errors, learning."""

import math
from collections import Counter
from dataclasses import FrozenInstanceError

import pytest
import torch

from attnbook.model import GPT, GPTConfig
from attnbook.tasks import (
    FILLER,
    SEPARATOR,
    TASKS,
    Copy,
    Induction,
    MultiQueryRecall,
    TaskBatch,
    _distinct,
    accuracy,
    accuracy_by_gap,
    build_task,
)

EXAMPLES = {
    "recall": dict(vocab_size=20, seq_len=30, n_pairs=5),
    "copy": dict(vocab_size=9, seq_len=20, segment_len=7),
    "induction": dict(vocab_size=6, seq_len=25),
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _check_layout(task, batch):
    B, T = batch.idx.shape
    assert (B, T) == (batch.idx.shape[0], task.seq_len)
    for x in (batch.idx, batch.targets, batch.gaps):
        assert x.shape == (B, T) and x.dtype == torch.long
    assert 0 <= int(batch.idx.min()) and int(batch.idx.max()) < task.vocab_size
    answered = batch.targets != -1
    assert torch.equal(answered, batch.gaps != -1)
    assert int(batch.targets[answered].min()) >= 0
    assert int(batch.targets.max()) < task.vocab_size


# ---- answers and gaps by brute force ------------------------------------------------------


def _scan_recall(task, idx, targets, gaps):
    """Recompute one recall sequence's targets and gaps from its inputs, position by position."""
    n, half, T = task.n_pairs, task.vocab_size // 2, task.seq_len
    max_gap = T if task.max_gap is None else task.max_gap
    pairs = {}  # key -> (value, position of the key)
    for i in range(n):
        key, value = idx[2 * i], idx[2 * i + 1]
        assert 1 <= key < half <= value < task.vocab_size  # keys and values from disjoint halves
        assert key not in pairs  # distinct keys
        pairs[key] = (value, 2 * i)
    assert len({v for v, _ in pairs.values()}) == n  # distinct values
    want_t, want_g = [-1] * T, [-1] * T
    for p in range(2 * n, T):
        if idx[p] == FILLER:
            assert p - (2 * n - 2) > max_gap  # only where no pair is close enough
            continue
        value, where = pairs[idx[p]]  # a query is always a key of this sequence
        want_t[p], want_g[p] = value, p - where
        assert 2 <= p - where <= max_gap
    assert targets == want_t and gaps == want_g


def _scan_copy(task, idx, targets, gaps):
    S, T = task.segment_len, task.seq_len
    assert all(2 <= t < task.vocab_size for t in idx[:S]) and idx[S] == SEPARATOR
    assert idx[S + 1 : 2 * S + 1] == idx[:S] and all(t == FILLER for t in idx[2 * S + 1 :])
    want_t = [idx[p + 1] if S <= p < 2 * S else -1 for p in range(T)]
    want_g = [S + 1 if S <= p < 2 * S else -1 for p in range(T)]
    assert targets == want_t and gaps == want_g


def _scan_induction(task, idx, targets, gaps):
    T = task.seq_len
    answers = [p for p in range(T) if targets[p] != -1]
    assert len(answers) == 1
    j = answers[0]
    a = idx[j]
    earlier = [p for p in range(T) if idx[p] == a and p != j]
    assert len(earlier) == 1 and earlier[0] < j  # A exactly twice, the answer at the second
    i = earlier[0]
    want_t, want_g = [-1] * T, [-1] * T
    want_t[j], want_g[j] = idx[i + 1], j - i
    assert targets == want_t and gaps == want_g and idx[i + 1] != a


SCANS = {"recall": _scan_recall, "copy": _scan_copy, "induction": _scan_induction}


@pytest.mark.parametrize(
    "name, options",
    [
        ("recall", EXAMPLES["recall"]),
        ("recall", dict(vocab_size=12, seq_len=20, n_pairs=5, max_gap=6)),
        ("recall", dict(vocab_size=64, seq_len=11, n_pairs=5, max_gap=2)),
        ("recall", dict(vocab_size=6, seq_len=3, n_pairs=1)),
        ("copy", EXAMPLES["copy"]),
        ("copy", dict(vocab_size=3, seq_len=3, segment_len=1)),
        ("induction", EXAMPLES["induction"]),
        ("induction", dict(vocab_size=2, seq_len=3)),
    ],
)
def test_answers_and_gaps_match_a_slow_scan(name, options):
    task = build_task(name, **options)
    batch = task.batch(64, _gen())
    _check_layout(task, batch)
    for b in range(64):
        SCANS[name](task, *(x[b].tolist() for x in (batch.idx, batch.targets, batch.gaps)))


@pytest.mark.parametrize("name", list(TASKS))
def test_the_answer_lies_gap_minus_one_back(name):
    """The shared meaning of a gap: the answer token sits gap - 1 positions back."""
    batch = build_task(name, **EXAMPLES[name]).batch(32, _gen())
    b, p = torch.nonzero(batch.targets != -1, as_tuple=True)
    source = p - batch.gaps[b, p] + 1
    assert bool((source >= 0).all())
    assert torch.equal(batch.idx[b, source], batch.targets[b, p])


def test_recall_gaps_cover_the_allowed_range():
    for max_gap, top in ((None, 29), (7, 7), (12, 12)):
        task = MultiQueryRecall(vocab_size=20, seq_len=30, n_pairs=5, max_gap=max_gap)
        gaps = task.batch(512, _gen()).gaps
        seen = set(gaps[gaps != -1].tolist())
        assert seen == set(range(2, top + 1))


def test_recall_keys_and_values_use_every_id_in_every_slot():
    task = MultiQueryRecall(vocab_size=16, seq_len=8, n_pairs=3)
    idx = task.batch(2000, _gen()).idx
    for i in range(3):
        assert set(idx[:, 2 * i].tolist()) == set(range(1, 8))
        assert set(idx[:, 2 * i + 1].tolist()) == set(range(8, 16))


def test_induction_gaps_and_positions_cover_the_sequence():
    task = Induction(vocab_size=6, seq_len=12)
    batch = task.batch(2000, _gen())
    b, j = torch.nonzero(batch.targets != -1, as_tuple=True)
    gap = batch.gaps[b, j]
    assert set(gap.tolist()) == set(range(2, 12))
    assert set((j - gap).tolist()) == set(range(0, 10))
    assert set(j.tolist()) == set(range(2, 12))


# ---- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_batches_are_determined_by_the_generator(name):
    task = build_task(name, **EXAMPLES[name])
    one, two = task.batch(16, _gen(3)), task.batch(16, _gen(3))
    other = task.batch(16, _gen(4))
    for field in ("idx", "targets", "gaps"):
        assert torch.equal(getattr(one, field), getattr(two, field))
    assert not torch.equal(one.idx, other.idx)
    g = _gen(3)
    first, second = task.batch(16, g), task.batch(16, g)  # the generator moves on
    assert torch.equal(first.idx, one.idx) and not torch.equal(second.idx, one.idx)
    torch.manual_seed(123)  # the global seed plays no part
    assert torch.equal(task.batch(16, _gen(3)).idx, one.idx)


def test_tasks_and_batches_are_frozen():
    task = MultiQueryRecall(**EXAMPLES["recall"])
    batch = task.batch(2, _gen())
    with pytest.raises(FrozenInstanceError):
        task.n_pairs = 3
    with pytest.raises(FrozenInstanceError):
        batch.idx = batch.targets
    assert isinstance(batch, TaskBatch)
    for name, cls in TASKS.items():
        assert cls.name == name and build_task(name, **EXAMPLES[name]).name == name


# ---- accuracy ------------------------------------------------------------------------------


def _one_hot_logits(targets, vocab_size):
    return torch.nn.functional.one_hot(targets.clamp(min=0), vocab_size).float()  # (B, T, V)


@pytest.mark.parametrize("name", list(TASKS))
def test_accuracy_of_perfect_and_wrong_logits(name):
    task = build_task(name, **EXAMPLES[name])
    batch = task.batch(32, _gen())
    V = task.vocab_size
    assert accuracy(_one_hot_logits(batch.targets, V), batch) == 1.0
    wrong = _one_hot_logits((batch.targets + 1) % V, V)
    assert accuracy(wrong, batch) == 0.0
    rows = accuracy_by_gap(_one_hot_logits(batch.targets, V), batch, [0, 3, 5, 8, 100])
    assert sum(count for _, _, _, count in rows) == int((batch.targets != -1).sum())
    assert all(acc == 1.0 for _, _, acc, count in rows if count)


def test_accuracy_by_gap_against_an_explicit_count():
    task = MultiQueryRecall(vocab_size=20, seq_len=30, n_pairs=5)
    batch = task.batch(64, _gen())
    logits = torch.randn(64, 30, 20, generator=_gen(1))
    logits += 2 * _one_hot_logits(batch.targets, 20)  # right about half of the time
    edges = [2, 5, 9, 20, 30, 40]  # gaps reach 29: the last bin is empty
    rows = accuracy_by_gap(logits, batch, edges)
    pred = logits.argmax(-1).tolist()
    for lo, hi, acc, count in rows:
        hits = [
            pred[b][p] == batch.targets[b, p].item()
            for b in range(64)
            for p in range(30)
            if lo <= batch.gaps[b, p].item() < hi
        ]
        assert count == len(hits)
        if count:
            assert acc == pytest.approx(sum(hits) / count)
        else:
            assert math.isnan(acc)
    assert rows[-1][3] == 0 and 0.2 < accuracy(logits, batch) < 0.8
    assert sum(row[3] for row in rows) == int((batch.targets != -1).sum())
    inner = accuracy_by_gap(logits, batch, [5, 9])  # gaps outside the edges are left out
    assert inner == [rows[1]]


def test_accuracy_without_answers_is_nan():
    batch = Copy(vocab_size=5, seq_len=5, segment_len=2).batch(2, _gen())
    empty = TaskBatch(
        batch.idx, torch.full_like(batch.targets, -1), torch.full_like(batch.gaps, -1)
    )
    assert math.isnan(accuracy(torch.zeros(2, 5, 5), empty))


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("sorting", {}, "unknown task 'sorting'; tasks: recall, copy, induction"),
        ("recall", dict(vocab_size=20, seq_len=30, n_pair=5), "no options \\['n_pair'\\]"),
        ("recall", dict(vocab_size=20, seq_len=30), "needs the options \\['n_pairs'\\]"),
        ("recall", dict(vocab_size=11, seq_len=30, n_pairs=5), "vocab_size >= 12"),
        ("recall", dict(vocab_size=20, seq_len=10, n_pairs=5), "seq_len > 10"),
        ("recall", dict(vocab_size=20, seq_len=30, n_pairs=0), "n_pairs must be a positive"),
        ("recall", dict(vocab_size=20, seq_len=30, n_pairs=5, max_gap=1), "max_gap must be"),
        ("recall", dict(vocab_size=20, seq_len=30, n_pairs=5, max_gap=True), "max_gap must be"),
        ("recall", dict(vocab_size=20.0, seq_len=30, n_pairs=5), "vocab_size must be a positive"),
        ("copy", dict(vocab_size=2, seq_len=30, segment_len=5), "vocab_size must be >= 3"),
        ("copy", dict(vocab_size=9, seq_len=10, segment_len=5), "seq_len >= 11"),
        ("induction", dict(vocab_size=1, seq_len=30), "vocab_size must be >= 2"),
        ("induction", dict(vocab_size=5, seq_len=2), "seq_len must be >= 3"),
    ],
)
def test_bad_tasks_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_task(name, **options)


def test_bad_batch_and_accuracy_arguments_raise():
    task = Copy(**EXAMPLES["copy"])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            task.batch(bad, _gen())
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        task.batch(2, 0)
    batch = task.batch(2, _gen())
    with pytest.raises(ValueError, match="logits must have shape"):
        accuracy(torch.zeros(2, 19, 9), batch)
    for edges in ([3], [3, 3], [5, 2], [0, 2.5], [0, True]):
        with pytest.raises(ValueError, match="edges must be"):
            accuracy_by_gap(torch.zeros(2, 20, 9), batch, edges)


# ---- learning ------------------------------------------------------------------------------


def _train_copy(attention, options, steps=80):
    """A 2-layer GPT trained on copying; its accuracy on a held-out batch."""
    task = Copy(vocab_size=16, seq_len=17, segment_len=8)  # the answer lies 8 positions back
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=task.vocab_size,
        block_size=task.seq_len,
        n_layer=2,
        n_head=4,
        n_embd=64,
        bias=False,
        attention=attention,
        attention_options=options,
    )
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = _gen(0)
    for _ in range(steps):
        batch = task.batch(32, g)
        _, loss = model(batch.idx, batch.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = task.batch(256, _gen(1))
    with torch.no_grad():
        logits, _ = model.eval()(held_out.idx)
    return accuracy(logits, held_out)


def test_full_attention_learns_to_copy_and_a_short_window_cannot():
    """Chance is 1/14; full attention is right by step 40 at four seeds. Two layers of window 4
    see 2 * 3 = 6 positions back, the answer lies 8 back: they stay at chance."""
    assert _train_copy("mha", {}) > 0.9
    assert _train_copy("local", {"window": 4}) < 0.2


def test_distinct_ids_are_uniform_over_ordered_draws():
    ids = _distinct(24000, 2, 3, 7, _gen())  # 4 * 3 = 12 ordered pairs of distinct ids in [3, 7)
    pairs = Counter(map(tuple, ids.tolist()))
    assert set(pairs) == {(a, b) for a in range(3, 7) for b in range(3, 7) if a != b}
    assert all(1800 < count < 2200 for count in pairs.values())  # 2000 each, sd 43
