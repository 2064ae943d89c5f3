"""What every byte-level BPE tokenizer here shares: the model, decoding, applying merges, save/load.

A model is four things:

- ``byte_ids``: the id of each of the 256 byte values (0..255 in byte order for a tokenizer
  we train; GPT-2 numbers its byte tokens in another order);
- ``merges``: an ordered dict ``{(left_id, right_id): new_id}``, where merge number ``r`` (from
  0) always creates id ``256 + r`` and may only use ids that exist before it;
- ``pattern``: the regex that splits text into chunks before BPE ("" = no splitting);
- ``special_tokens``: ``{"<|endoftext|>": id, ...}``, strings that map to one id each.

This module also holds the two textbook helpers ``get_stats`` and ``merge`` (the slow, obvious
way; tests and the chapter use them as the reference), and ``apply_merges``, the fast way the
tokenizers encode one chunk. Training lives in ``trainer.py``; splitting and special tokens in
``regex.py``. Saving writes ``prefix.model`` (the versioned file ``load`` reads) and
``prefix.vocab`` (for people only; never read back).
"""

import hashlib
import heapq
import json
import operator
import unicodedata
from itertools import pairwise
from pathlib import Path

import regex

FORMAT_LINE = "minbpe model v1"
KINDS = ("basic", "regex")
IDENTITY_BYTES = tuple(range(256))
ALLOWED_SPECIAL_CHOICES = ("none_raise", "all", "none")
# Text every split pattern must cut into chunks that add up to it (see ``_set_model``): letters,
# a contraction, digits, punctuation, several kinds of whitespace, accents, CJK, an emoji.
PROBE_TEXT = "Hello, world! I'm 42 ok.\n\n\tnaïve e\u0301 日本 😀 \u00a0x  "


# ---------------------------------------------------------------------------------------------
# Checking what callers pass in.


def check_text(text):
    """``text``, checked to be a ``str`` and made encodable as UTF-8, as tiktoken does it.

    UTF-8 cannot encode surrogate code points (U+D800..U+DFFF), which a Python ``str`` may
    hold. Like tiktoken's ``encode``, we then round-trip the text through UTF-16: a surrogate
    pair spelled as two code points becomes the character it stands for, and a lone surrogate
    becomes U+FFFD. Any other text is returned unchanged.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def check_allowed_special(allowed_special):
    """``allowed_special`` if it is one of ``ALLOWED_SPECIAL_CHOICES`` or a collection of names.

    A collection (set, frozenset, list or tuple) comes back as a frozenset. ``ValueError``
    for anything else.
    """
    if isinstance(allowed_special, str):
        if allowed_special not in ALLOWED_SPECIAL_CHOICES:
            raise ValueError(
                f"allowed_special must be one of {ALLOWED_SPECIAL_CHOICES} or a set of "
                f"special tokens, got {allowed_special!r}"
            )
        return allowed_special
    if not isinstance(allowed_special, set | frozenset | list | tuple):
        raise ValueError(
            f"allowed_special must be one of {ALLOWED_SPECIAL_CHOICES} or a set of special "
            f"tokens, got {allowed_special!r}"
        )
    return frozenset(allowed_special)


def flat_ids(ids):
    """``ids`` as a list of Python ints, for ``decode``; ``ValueError`` says what is wrong.

    Takes any flat sequence of integers: a list or tuple of ints or numpy integers, a 1-D numpy
    array or tensor. Each id goes through ``operator.index``, so a float such as ``1.0`` is
    refused rather than silently taken as the id 1.
    """
    if isinstance(ids, str | bytes | bytearray):
        raise ValueError(f"decode takes a sequence of token ids, not a {type(ids).__name__}")
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors become (nested) lists
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise ValueError(
            f"decode takes a sequence of token ids, got {ids!r} ({type(ids).__name__})"
        ) from None
    try:
        return list(map(operator.index, ids))
    except TypeError:
        pass
    for pos, i in enumerate(ids):  # find the first element that is not an integer
        try:
            operator.index(i)
        except TypeError:
            if hasattr(i, "__len__") and not isinstance(i, str | bytes | bytearray):
                raise ValueError(
                    f"decode takes a flat sequence of token ids, but position {pos} is {i!r}, "
                    "itself a sequence (decode a batch one row at a time)"
                ) from None
            raise ValueError(
                f"token ids must be integers, but position {pos} is {i!r} ({type(i).__name__})"
            ) from None
    raise AssertionError("unreachable: some id failed operator.index")


# ---------------------------------------------------------------------------------------------
# The reference helpers: count adjacent pairs, replace one pair everywhere.


def get_stats(ids, counts=None):
    """Count each adjacent pair in ``ids`` (overlapping pairs count: "aaa" has two (a, a))."""
    counts = {} if counts is None else counts
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, new_id):
    """Replace every occurrence of ``pair`` in ``ids``, scanning left to right, by ``new_id``."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


SHORT_CHUNK = 10  # up to this many ids the plain loop is faster than the heap (measured)


def apply_merges(ids, merges):
    """Encode one chunk: repeatedly merge its adjacent pair with the smallest ``new_id``.

    Short chunks (most chunks after regex splitting) take that loop literally; long ones (a
    BasicTokenizer encodes the whole text as one chunk) go through ``_merge_with_heap``, which
    gives the same ids in time n log n instead of n per merge applied.
    """
    if len(ids) > SHORT_CHUNK:
        return _merge_with_heap(ids, merges)
    get = merges.get
    while len(ids) >= 2:
        best = None  # the smallest new_id among adjacent pairs that are merges
        for p in pairwise(ids):
            new_id = get(p)
            if new_id is not None and (best is None or new_id < best):
                best, pair = new_id, p
        if best is None:
            break
        ids = merge(ids, pair, best)
    return list(ids)


def _merge_with_heap(ids, merges):
    """``apply_merges`` for long chunks.

    The loop rescans the whole chunk once per merge it applies. Here each adjacent pair that is
    a merge goes into a heap keyed by ``(new_id, position)``, and the symbols form a linked
    list, so applying a merge only looks at its two neighbours. A merge's result can only take
    part in *later* merges (the model guarantees it), so the heap hands out merges in the same
    order as the loop, and equal merges left to right, as ``merge`` does.
    """
    n = len(ids)
    if n < 2:
        return list(ids)
    sym = list(ids)  # sym[i] = -1 once position i has been absorbed by its left neighbour
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = [(merges[p], i) for i, p in enumerate(pairwise(sym)) if p in merges]
    heapq.heapify(heap)
    while heap:
        new_id, i = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] < 0 or j < 0 or merges.get((sym[i], sym[j])) != new_id:
            continue  # stale: this position changed since the pair was pushed
        k = nxt[j]
        sym[i], sym[j], nxt[i] = new_id, -1, k
        if k >= 0:
            prv[k] = i
            if (new_id, sym[k]) in merges:
                heapq.heappush(heap, (merges[new_id, sym[k]], i))
        h = prv[i]
        if h >= 0 and (sym[h], new_id) in merges:
            heapq.heappush(heap, (merges[sym[h], new_id], h))
    return [s for s in sym if s >= 0]


def render_token(token: bytes) -> str:
    """A printable form of a token, in which different tokens always look different.

    A byte that is not part of valid UTF-8 is shown as ``\\xNN`` (its hex value), a control or
    other invisible character as ``\\uXXXX``, and a backslash doubled (``\\\\``), so that the
    one byte 0x80 (``\\x80``) and the four characters ``\\x80`` (``\\\\x80``) stay apart.
    """
    out = []
    for ch in token.decode("utf-8", errors="surrogateescape"):  # bad byte b -> U+DC00 + b
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch).startswith("C"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# The tokenizer base class.


class Tokenizer:
    """Holds a model, decodes ids, saves and loads. Subclasses add ``train`` and ``encode``."""

    kind = "basic"  # what the model file calls this tokenizer ("basic" or "regex")

    def __init__(self):
        self._set_model(IDENTITY_BYTES, [], "", {})

    # -- the model -----------------------------------------------------------------------------

    def _set_model(self, byte_ids, merge_pairs, pattern, special_tokens):
        """Check a whole model, then install it; on any error nothing changes."""
        byte_ids, merge_pairs = tuple(byte_ids), [tuple(p) for p in merge_pairs]
        if sorted(byte_ids) != list(IDENTITY_BYTES):
            raise ValueError("byte_ids must be a permutation of the ids 0..255")
        merges = {}
        for rank, pair in enumerate(merge_pairs):
            new_id = 256 + rank
            if len(pair) != 2 or not all(isinstance(t, int) and 0 <= t < new_id for t in pair):
                raise ValueError(
                    f"merge {rank} is {pair}: both ids must already exist, i.e. lie in 0..{new_id - 1}"
                )
            if pair in merges:
                raise ValueError(
                    f"merge {rank} repeats the pair {pair} (merge {merges[pair] - 256})"
                )
            merges[pair] = new_id
        n_ids = 256 + len(merges)
        names, ids = list(special_tokens), list(special_tokens.values())
        for name, idx in special_tokens.items():
            if not isinstance(name, str) or not name or check_text(name) != name:
                raise ValueError(
                    f"a special token must be a non-empty string without surrogates, got {name!r}"
                )
            if not isinstance(idx, int) or idx < n_ids:
                raise ValueError(
                    f"special token {name!r} has id {idx!r}; ids 0..{n_ids - 1} are taken by the "
                    f"byte and merge tokens, so use an integer >= {n_ids}"
                )
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"two special tokens share the id {dup}: {names}")
        try:
            compiled = regex.compile(pattern) if pattern else None
        except regex.error as err:
            raise ValueError(f"the split pattern {pattern!r} is not a valid regex: {err}") from err
        if compiled is not None and "".join(map(str, compiled.findall(PROBE_TEXT))) != PROBE_TEXT:
            raise ValueError(
                f"the split pattern {pattern!r} does not cover the probe text {PROBE_TEXT!r} (it "
                f"finds {compiled.findall(PROBE_TEXT)[:8]!r}...): every character must fall in "
                "some chunk, so end the pattern with an alternative that matches anything left, "
                "and write groups as (?:...)"
            )
        vocab = {byte_ids[b]: bytes([b]) for b in range(256)}
        for (a, b), new_id in merges.items():
            vocab[new_id] = vocab[a] + vocab[b]
        for name, idx in special_tokens.items():
            vocab[idx] = name.encode("utf-8")
        # Everything checked: install (plain assignments, nothing below can fail).
        self.byte_ids = byte_ids
        self.merges = merges
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self.vocab = vocab
        self._n_vocab = max(vocab) + 1
        self._compiled = compiled
        self._chunk_cache = {}

    @property
    def vocab_size(self) -> int:
        """How many ids there are: 256 bytes + one per merge + the special tokens.

        This counts tokens; it is not always the size of an embedding table, because a special
        token may have an id far above the others (``n_vocab`` is).
        """
        return len(self.vocab)

    @property
    def n_vocab(self) -> int:
        """The largest id + 1, like tiktoken's ``n_vocab``: the size of an embedding table.

        ``nn.Embedding(tok.n_vocab, d)`` (and an output layer with ``n_vocab`` logits) has a row
        for every id this tokenizer can produce. It equals ``vocab_size`` when the ids have no
        gaps; a special token registered at 100000 makes it 100001 whatever ``vocab_size`` is.
        """
        return self._n_vocab

    def _encode_bytes(self, data: bytes):
        """BPE-encode one chunk of bytes (no splitting, no special tokens)."""
        byte_ids = self.byte_ids
        return apply_merges([byte_ids[b] for b in data], self.merges)

    def encode(self, text: str):
        raise NotImplementedError

    def decode(self, ids) -> str:
        """The text of a flat sequence of ids; bytes that are not valid UTF-8 become U+FFFD.

        ``ids`` may be a list or tuple of integers (numpy integers too), or a 1-D numpy array or
        tensor; anything else, or an id this tokenizer does not have, raises ``ValueError``.
        """
        ids = flat_ids(ids)
        try:
            data = b"".join([self.vocab[i] for i in ids])
        except KeyError:
            bad = next(i for i in ids if i not in self.vocab)
            raise ValueError(
                f"unknown token id {bad!r}: this tokenizer's ids are 0..{256 + len(self.merges) - 1}"
                + (
                    f" and the special tokens {sorted(self.special_tokens.values())}"
                    if self.special_tokens
                    else ""
                )
            ) from None
        return data.decode("utf-8", errors="replace")

    # -- save and load ---------------------------------------------------------------------------

    def save(self, file_prefix):
        """Write ``file_prefix.model`` (read back by ``load``) and ``file_prefix.vocab`` (for people)."""
        prefix = str(file_prefix)
        lines = [
            FORMAT_LINE,
            f"type {self.kind}",
            f"pattern {json.dumps(self.pattern)}",
            "bytes " + " ".join(map(str, self.byte_ids)),
            f"special {len(self.special_tokens)}",
            *(f"{json.dumps(name)} {idx}" for name, idx in self.special_tokens.items()),
            f"merges {len(self.merges)}",
            *(f"{a} {b}" for a, b in self.merges),
        ]
        body = "\n".join(lines) + "\n"
        digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
        # bytes, not text: no newline translation, so the checksum holds on every platform
        Path(prefix + ".model").write_bytes((body + f"sha256 {digest}\n").encode("utf-8"))
        Path(prefix + ".vocab").write_text(self._vocab_listing(), encoding="utf-8")

    def _vocab_listing(self):
        made_from = {new_id: pair for pair, new_id in self.merges.items()}
        out = [f"# {type(self).__name__}: {self.vocab_size} ids. Not read by load(); see .model."]
        for idx in sorted(self.vocab):
            token = f"[{render_token(self.vocab[idx])}]"
            if idx in made_from:
                a, b = made_from[idx]
                out.append(
                    f"{idx:>6} {token}  <- [{render_token(self.vocab[a])}][{render_token(self.vocab[b])}]"
                )
            elif idx in self.special_tokens.values():
                out.append(f"{idx:>6} {token}  (special)")
            else:
                out.append(f"{idx:>6} {token}")
        return "\n".join(out) + "\n"

    def load(self, model_file):
        """Replace this tokenizer's model by the one in ``model_file``; returns ``self``.

        Raises ``ValueError`` saying what is wrong if the file is truncated, corrupted or of
        another kind of tokenizer; the tokenizer is then left exactly as it was.
        """
        return self._install(read_model(model_file), model_file)

    def _install(self, model, model_file):
        """Install a model dict from ``read_model``, after the checks ``_set_model`` makes."""
        if model["kind"] != self.kind:
            raise ValueError(
                f"{model_file} holds a {model['kind']!r} tokenizer, but {type(self).__name__} "
                f"loads {self.kind!r} models: use minbpe.load({str(model_file)!r})"
            )
        try:
            self._set_model(model["byte_ids"], model["merges"], model["pattern"], model["special"])
        except ValueError as err:
            raise ValueError(f"{model_file}: {err}") from None
        return self


def read_model(model_file):
    """Parse a ``.model`` file into a dict, checking its format and checksum.

    ``ValueError`` names the problem: not a model file, truncated, corrupted, malformed line.
    Whether the merges and ids make a valid model is checked when it is installed (``load``).
    """
    name = str(model_file)
    try:
        text = Path(model_file).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{name} is not UTF-8 text ({err}): not a minbpe model, or corrupted"
        ) from None
    lines = text.split("\n")
    if not text or lines[0] != FORMAT_LINE:
        first = lines[0][:60] if text else "(empty file)"
        raise ValueError(
            f"{name} does not start with {FORMAT_LINE!r} (found {first!r}): not a minbpe model file"
        )
    # Only the checksum line starts with "sha256 " (other lines start with a keyword, a quote
    # or a digit), so the last such line tells truncation apart from data appended after it.
    last = next((i for i in reversed(range(len(lines))) if lines[i].startswith("sha256 ")), None)
    if last is None or last == len(lines) - 1:
        raise ValueError(f"{name} does not end with its 'sha256 ...' line: the file is truncated")
    if last < len(lines) - 2 or lines[-1] != "":
        extra = "\n".join(lines[last + 1 :]).encode()
        raise ValueError(
            f"{name} has trailing data after its 'sha256 ...' line ({len(extra)} byte"
            f"{'s' * (len(extra) != 1)}: {extra[:20]!r}): something was appended to the file"
        )
    body = text[: text.rindex("sha256 ")]
    expected = lines[-2][len("sha256 ") :]
    found = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if found != expected:
        raise ValueError(
            f"{name} is corrupted: its content has sha256 {found}, but its last line says "
            f"{expected} (was it edited or damaged?)"
        )
    return _parse_body(name, lines[:-2])


def _is_count(text):
    return text.isascii() and text.isdigit()


def _parse_body(name, lines):
    """The fields of a model file whose checksum is fine (it may still have been hand-made)."""
    pos = 1  # lines[0] is the format line

    def take(keyword):
        nonlocal pos
        if pos >= len(lines) or not lines[pos].startswith(keyword + " "):
            found = lines[pos][:60] if pos < len(lines) else "end of file"
            raise ValueError(f"{name}, line {pos + 1}: expected '{keyword} ...', found {found!r}")
        pos += 1
        return lines[pos - 1][len(keyword) + 1 :]

    def count(keyword):
        value = take(keyword)
        if not _is_count(value):
            raise ValueError(f"{name}, line {pos}: '{keyword}' needs a count, found {value!r}")
        return int(value)

    def ints(text, how_many):
        parts = text.split(" ")
        if len(parts) != how_many or not all(map(_is_count, parts)):
            raise ValueError(
                f"{name}, line {pos}: expected {how_many} integers, found {text[:60]!r}"
            )
        return [int(p) for p in parts]

    kind = take("type")
    if kind not in KINDS:
        raise ValueError(f"{name}, line {pos}: unknown tokenizer type {kind!r} (known: {KINDS})")
    try:
        pattern = json.loads(take("pattern"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}, line {pos}: the pattern is not a JSON string ({err})") from None
    if not isinstance(pattern, str):
        raise ValueError(
            f"{name}, line {pos}: the pattern must be a JSON string, found {pattern!r}"
        )
    if kind == "regex" and not pattern:
        raise ValueError(
            f"{name}, line {pos}: a 'regex' tokenizer needs a split pattern, found an empty one"
        )
    byte_ids = ints(take("bytes"), 256)
    special = {}
    for _ in range(count("special")):
        if pos >= len(lines):
            raise ValueError(
                f"{name}: the special tokens stop at line {pos}: the file is truncated"
            )
        token, _, idx = lines[pos].rpartition(" ")
        pos += 1
        try:
            token = json.loads(token)
        except json.JSONDecodeError:
            token = None
        if not isinstance(token, str) or not _is_count(idx):
            raise ValueError(
                f"{name}, line {pos}: expected '\"<token>\" <id>', found {lines[pos - 1][:60]!r}"
            )
        if token in special:
            raise ValueError(f"{name}, line {pos}: the special token {token!r} is listed twice")
        special[token] = int(idx)
    n_merges = count("merges")
    if pos + n_merges != len(lines):
        raise ValueError(
            f"{name}: the header promises {n_merges} merges, but {len(lines) - pos} lines follow"
        )
    merges = []
    for _ in range(n_merges):
        pos += 1
        merges.append(tuple(ints(lines[pos - 1], 2)))
    if kind == "basic" and (pattern or special):
        raise ValueError(f"{name}: a 'basic' tokenizer has no split pattern and no special tokens")
    return {
        "kind": kind,
        "pattern": pattern,
        "byte_ids": byte_ids,
        "special": special,
        "merges": merges,
    }
