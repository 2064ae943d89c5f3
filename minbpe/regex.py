"""RegexTokenizer: byte-level BPE inside the chunks of a split pattern, plus special tokens.

    tok = RegexTokenizer("gpt2")               # or "gpt4", or a regex of your own
    tok.train(text, vocab_size=1024)
    tok.register_special_tokens({"<|endoftext|>": 1024})
    tok.encode("hi<|endoftext|>", allowed_special="all")   # [..., 1024]

Merges never cross a chunk boundary, so " dog", " dog." and " dog!" share the token " dog"; a
cache from chunk to ids makes repeated chunks one lookup. ``allowed_special`` is tiktoken's
choice in one argument: ``"none_raise"`` (default, a special token in the text raises),
``"all"``, ``"none"`` (encoded as text) or a set of names. It does not normalise text and has
no beginning-of-text token. Chapter 16 builds it.
"""

import regex

from .base import IDENTITY_BYTES, Tokenizer, check_allowed_special, check_text
from .basic import check_vocab_size, report_merges
from .trainer import learn_merges

# GPT-2's split (from its encoder.py): contractions, optional space + letters, optional space +
# digits, optional space + other symbols, whitespace not followed by a non-space, whitespace.
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# GPT-4's split, the pattern of tiktoken's cl100k_base as tiktoken 0.14 ships it (the tests
# compare the two): contractions in any case; letters with at most one symbol (not a letter,
# digit or newline) in front; digits in groups of at most three; punctuation with the newlines
# after it; whitespace at the very end of the text as one chunk; a whitespace run cut after its
# last newline; other whitespace runs minus their last character (it goes with the next word).
# The possessive forms (?+, ++, {1,3}+) never give back what they matched, which is faster.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}
CACHE_LIMIT = 100_000  # chunks kept in the encode cache before it is emptied


class RegexTokenizer(Tokenizer):
    """Byte-level BPE with regex pre-splitting and special tokens."""

    kind = "regex"

    def __init__(self, pattern="gpt4"):
        """``pattern``: "gpt2", "gpt4", or a regex (``regex`` module syntax, \\p{L} allowed).

        ``ValueError`` if the pattern is not a valid regex or does not cover a probe text
        (``base.PROBE_TEXT``), which also catches a mistyped name such as "gpt3".
        """
        super().__init__()
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"pattern must be 'gpt2', 'gpt4' or a regex string, got {pattern!r}")
        if pattern not in SPLIT_PATTERNS and regex.fullmatch(r"[\w-]+", pattern):
            raise ValueError(
                f"pattern {pattern!r} is not a known pattern name (known: "
                f"{', '.join(map(repr, SPLIT_PATTERNS))}), and as a regex it would only match "
                "that literal text, so it cannot split arbitrary text"
            )
        self._set_model(IDENTITY_BYTES, [], SPLIT_PATTERNS.get(pattern, pattern), {})

    def split(self, text):
        """The chunks the pattern cuts ``text`` into (their concatenation is ``text``, after
        surrogates are replaced as ``encode`` replaces them)."""
        text = check_text(text)
        chunks = self._compiled.findall(text)
        if sum(map(len, chunks)) != len(text):  # cheap next to the regex itself
            raise ValueError(
                f"the split pattern {self.pattern!r} does not cover the text (some characters fall "
                "in no chunk, or a capturing group returns part of a match): end it with an "
                "alternative that matches anything left, and write groups as (?:...)"
            )
        return chunks

    def train(self, text, vocab_size, verbose=False):
        """Learn ``vocab_size - 256`` merges within the chunks of ``text``.

        Replaces the merges; registered special tokens are kept (their ids must be >=
        ``vocab_size``), and their occurrences are cut out of the training text.
        """
        text = check_text(text)
        check_vocab_size(vocab_size)
        clash = {name: i for name, i in self.special_tokens.items() if i < vocab_size}
        if clash:
            raise ValueError(
                f"special tokens {clash} have ids below vocab_size={vocab_size}, which the "
                "merges will use: register them with ids >= vocab_size (or after training)"
            )
        pieces = [text]
        if self.special_tokens:  # text, special, text, ...: keep the text between specials
            pieces = self._special_regex(self.special_tokens).split(text)[::2]
        weights = {}  # distinct chunk -> how often it occurs
        for piece in pieces:
            for chunk in self.split(piece):
                weights[chunk] = weights.get(chunk, 0) + 1
        learned = learn_merges(
            ((c.encode("utf-8"), w) for c, w in weights.items()), vocab_size - 256
        )
        self._set_model(
            IDENTITY_BYTES, [pair for pair, _ in learned], self.pattern, self.special_tokens
        )
        if verbose:
            report_merges(self, learned)
        return self

    def register_special_tokens(self, special_tokens):
        """Add special tokens, ``{"<|endoftext|>": 100257, ...}``; ids must be new."""
        if not isinstance(special_tokens, dict):
            raise ValueError(f"special_tokens must be a dict {{str: int}}, got {special_tokens!r}")
        for name, idx in special_tokens.items():
            if name in self.special_tokens and self.special_tokens[name] != idx:
                raise ValueError(
                    f"{name!r} is already registered with id {self.special_tokens[name]}"
                )
        self._set_model(
            self.byte_ids,
            list(self.merges),
            self.pattern,
            {**self.special_tokens, **special_tokens},
        )

    # -- encoding -----------------------------------------------------------------------------

    def clear_cache(self):
        """Forget the chunks encoded so far (the cache only saves time; ids never depend on it).

        For timing encoding as a fresh tokenizer would, without building a new one.
        """
        self._chunk_cache.clear()

    def encode_ordinary(self, text):
        """The ids of ``text`` with special tokens treated as ordinary text."""
        text = check_text(text)
        cache, ids = self._chunk_cache, []
        for chunk in self.split(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                if len(cache) >= CACHE_LIMIT:
                    cache.clear()
                chunk_ids = cache[chunk] = self._encode_bytes(chunk.encode("utf-8"))
            ids.extend(chunk_ids)
        return ids

    def encode(self, text, allowed_special="none_raise"):
        """The ids of ``text``; see the module docstring for ``allowed_special``."""
        given, text = text, check_text(text)  # special tokens never contain surrogates
        allowed = self._allowed(allowed_special)
        if allowed_special != "none":
            disallowed = {n: i for n, i in self.special_tokens.items() if n not in allowed}
            if disallowed and (found := self._special_regex(disallowed).search(given)):
                raise ValueError(
                    f"the text contains the special token {found.group()!r} at character "
                    f"{found.start()}, which is not allowed: pass allowed_special='all' (or a set "
                    "naming it) to encode it as its id, or allowed_special='none' to encode it "
                    "as ordinary text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        parts = self._special_regex(allowed).split(text)  # text, special, text, special, ...
        for n, part in enumerate(parts):
            if n % 2:
                ids.append(allowed[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def _allowed(self, allowed_special):
        """The special tokens ``allowed_special`` lets through, as {name: id}.

        Names in a set that are not registered special tokens are ignored, as in tiktoken.
        """
        allowed_special = check_allowed_special(allowed_special)
        if isinstance(allowed_special, str):
            return dict(self.special_tokens) if allowed_special == "all" else {}
        return {n: i for n, i in self.special_tokens.items() if n in allowed_special}

    @staticmethod
    def _special_regex(special_tokens):
        """A regex with one capturing group matching any of the names, longest first."""
        names = sorted(special_tokens, key=len, reverse=True)
        return regex.compile("(" + "|".join(regex.escape(name) for name in names) + ")")
