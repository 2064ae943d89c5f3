"""minbpe: a byte-level BPE tokenizer written for the book (chapter 16).

    from minbpe import BasicTokenizer, RegexTokenizer, GPT2Tokenizer, load

- ``BasicTokenizer``: BPE on the raw bytes of the whole text (``basic.py``).
- ``RegexTokenizer``: BPE within the chunks of a split pattern ("gpt2", "gpt4" or your own),
  with special tokens (``regex.py``).
- ``GPT2Tokenizer``: GPT-2's tokenizer from its ``vocab.bpe`` and ``encoder.json``; the same ids
  as tiktoken's "gpt2" encoding (``gpt2.py``).
- ``tok.save(prefix)`` writes ``prefix.model`` and ``prefix.vocab``; ``load(path)`` reads a
  ``.model`` back into the right class (``base.py``).

Training is in ``trainer.py``; ``python -m minbpe.bench`` times it all on TinyShakespeare.
"""

from .base import Tokenizer, get_stats, merge, read_model
from .basic import BasicTokenizer
from .gpt2 import GPT2Tokenizer
from .regex import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, SPLIT_PATTERNS, RegexTokenizer

__all__ = [
    "BasicTokenizer",
    "GPT2Tokenizer",
    "GPT2_SPLIT_PATTERN",
    "GPT4_SPLIT_PATTERN",
    "RegexTokenizer",
    "SPLIT_PATTERNS",
    "Tokenizer",
    "get_stats",
    "load",
    "merge",
]


def load(model_file):
    """A new tokenizer of the right class (basic or regex) from a ``.model`` file."""
    model = read_model(model_file)
    tokenizer = BasicTokenizer() if model["kind"] == "basic" else RegexTokenizer()
    return tokenizer._install(model, model_file)
