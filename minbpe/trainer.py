"""Learn BPE merges from weighted chunks of bytes, updating pair counts incrementally.

``learn_merges(chunks, num_merges)`` returns the same merges as the textbook loop (count every
pair, merge the most frequent, ties to the smallest pair, repeat) without recounting after each
merge: identical chunks are stored once with a weight, all symbols sit in one linked array, an
index maps each pair to the positions where it starts, a merge updates only the counts it
changes, and a heap with lazy deletion finds the most frequent pair.

    learn_merges([(b"hello", 3), (b" world", 1)], num_merges=2)  # [((a, b), count), ...]

It always starts from bytes (no continued training), knows no special tokens or regex
splitting (the callers do that), and raises ``ValueError`` if the chunks run out of pairs.
Chapter 16 builds the slow loop and explains this one.
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
