"""Learn BPE merges from weighted chunks of bytes, updating pair counts incrementally.

``learn_merges(chunks, num_merges)`` returns the same merges as the textbook loop

    repeat num_merges times:
        counts = pair counts over all chunks (each chunk's pairs times the chunk's weight)
        pair = the pair with the highest count; ties go to the smallest pair (a, b)
        merge that pair everywhere (left to right), as id 256, 257, ...

but without recounting everything after each merge. Why that matters: a recount costs time
proportional to the whole text, and there is one per merge.

How it works:

- **Weighted chunks.** A regex tokenizer never merges across chunks, and identical chunks are
  merged identically, so each distinct chunk is stored once with its frequency as a weight
  (TinyShakespeare's 1.1 MB has about 300k chunks but only about 15k distinct ones). The basic
  tokenizer passes its whole text as one chunk of weight 1.
- **Linked symbols.** All chunks' symbols sit in one array with next/previous links that stop
  at chunk boundaries, so a merge rewrites two cells and relinks, instead of copying a list.
- **An index from each pair to the positions where it starts**, so a merge visits only the
  positions that hold its pair. Entries are never removed; a position whose symbols have
  changed since is recognised and skipped when visited.
- **Exact counts, updated locally.** Merging (a, b) at one position removes the pairs
  (prev, a) and (b, next) and creates (prev, ab) and (ab, next); besides (a, b) itself, only
  those counts change.
- **A heap with lazy deletion** finds the most frequent pair: a pair is pushed whenever its
  count goes up; an entry popped with an out-of-date count is pushed back with the right one.

"Incremental" here means incremental pair counting within one training run: there is no way
to continue training an existing model with more merges (``train`` always starts from bytes).
It does not handle special tokens or regex splitting (the callers do), and it stops with a
``ValueError`` if the chunks run out of pairs before ``num_merges`` merges.
"""

import heapq


def learn_merges(chunks, num_merges):
    """Merges learned from ``chunks``, an iterable of ``(bytes, weight)``.

    Returns a list of ``((a, b), count)``: merge number ``r`` joins ids ``a`` and ``b`` into id
    ``256 + r``, and ``count`` is the weighted number of times the pair occurred when chosen.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    sym, nxt, prv, weight = [], [], [], []
    for data, w in chunks:
        start = len(sym)
        sym.extend(data)
        n = len(data)
        nxt.extend(range(start + 1, start + n + 1))
        prv.extend(range(start - 1, start + n - 1))
        if n:
            nxt[-1], prv[start] = -1, -1
        weight.extend([w] * n)

    counts, where = {}, {}  # pair -> weighted count; pair -> positions where it may start
    for i in range(len(sym) - 1):
        if nxt[i] >= 0:
            pair = (sym[i], sym[i + 1])
            counts[pair] = counts.get(pair, 0) + weight[i]
            where.setdefault(pair, []).append(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    def add(pair, w, i, grown):
        counts[pair] = counts.get(pair, 0) + w
        where.setdefault(pair, []).append(i)
        grown.add(pair)

    def remove(pair, w):
        left = counts[pair] - w
        if left:
            counts[pair] = left
        else:
            del counts[pair]

    merges = []
    while len(merges) < num_merges:
        pair, count = _pop_most_frequent(heap, counts)
        if pair is None:
            raise ValueError(
                f"the text has no pairs left to merge after {len(merges)} merges, so "
                f"{num_merges} merges are impossible: use more text or a smaller vocab_size"
            )
        a, b = pair
        new_id = 256 + len(merges)
        grown = set()
        for i in sorted(where.pop(pair)):  # left to right, like ``merge`` in base.py
            j = nxt[i]
            if sym[i] != a or j < 0 or sym[j] != b:
                continue  # stale entry (or the second half of "aaa" already taken)
            w = weight[i]
            h, k = prv[i], nxt[j]
            remove(pair, w)
            if h >= 0:
                remove((sym[h], a), w)
            if k >= 0:
                remove((b, sym[k]), w)
                prv[k] = i
            sym[i], sym[j], nxt[i] = new_id, -1, k
            if h >= 0:
                add((sym[h], new_id), w, h, grown)
            if k >= 0:
                add((new_id, sym[k]), w, i, grown)
        assert pair not in counts, f"bookkeeping error: {pair} survived its own merge"
        for p in grown:
            if p in counts:
                heapq.heappush(heap, (-counts[p], p))
        merges.append((pair, count))
    return merges


def _pop_most_frequent(heap, counts):
    """The pair with the highest current count (smallest pair on ties), or (None, 0)."""
    while heap:
        neg, pair = heapq.heappop(heap)
        current = counts.get(pair, 0)
        if current == -neg:
            return pair, current
        if current > -neg or current == 0:
            continue  # a fresher, larger entry was pushed when it grew; or the pair is gone
        heapq.heappush(heap, (-current, pair))  # it shrank: re-file it under its real count
    return None, 0
