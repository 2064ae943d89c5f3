"""BasicTokenizer: byte-level BPE on the raw bytes of the text, no splitting, no special tokens.

    tok = BasicTokenizer()
    tok.train("aaabdaaabac", vocab_size=259)   # three merges: "aa", "ab", "aaab"
    tok.encode("aaabdaaabac")                  # [258, 100, 258, 97, 99]

Merges may cross word and punctuation boundaries ("e t", ".\\n"), which is why GPT-2 splits
the text first (``RegexTokenizer``). The whole text is one chunk, so encoding a long text
takes time n log n in its length (see ``base.apply_merges``), without a cache. Chapter 16 builds it.
"""

from .base import IDENTITY_BYTES, Tokenizer, check_allowed_special, check_text, render_token
from .trainer import learn_merges


def check_vocab_size(vocab_size):
    """``ValueError`` unless ``vocab_size`` is an integer >= 256 (the byte tokens)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(
            f"vocab_size must be an integer >= 256 (the 256 byte tokens come first), got {vocab_size!r}"
        )


class BasicTokenizer(Tokenizer):
    """Byte-level BPE over the whole text."""

    kind = "basic"

    def train(self, text, vocab_size, verbose=False):
        """Learn ``vocab_size - 256`` merges from ``text`` (replacing any previous model)."""
        text = check_text(text)
        check_vocab_size(vocab_size)
        learned = learn_merges([(text.encode("utf-8"), 1)], vocab_size - 256)
        self._set_model(IDENTITY_BYTES, [pair for pair, _ in learned], "", {})
        if verbose:
            report_merges(self, learned)
        return self

    def encode(self, text, allowed_special="none_raise"):
        """The ids of ``text``.

        ``allowed_special`` takes the choices of ``RegexTokenizer.encode`` so that every
        tokenizer here has the same signature; a BasicTokenizer has no special tokens, so every
        choice gives the same ids (``<|endoftext|>`` is ordinary text to it). Surrogates are
        handled as ``base.check_text`` says.
        """
        check_allowed_special(allowed_special)
        text = check_text(text)
        return self._encode_bytes(text.encode("utf-8"))


def report_merges(tokenizer, learned):
    """Print one line per learned merge: its rank, pair, new token and count."""
    for rank, ((a, b), count) in enumerate(learned):
        new_id = 256 + rank
        print(
            f"merge {rank + 1}/{len(learned)}: ({a}, {b}) -> {new_id} "
            f"[{render_token(tokenizer.vocab[new_id])}] had {count} occurrences"
        )
