"""GPT2Tokenizer: OpenAI's GPT-2 tokenizer, rebuilt from its two published files.

    tok = GPT2Tokenizer()               # finds vocab.bpe and encoder.json via attnbook's cache
    tok.encode("Hello world")           # [15496, 995], the ids tiktoken.get_encoding("gpt2") gives

GPT-2 is a ``RegexTokenizer`` with the "gpt2" split pattern, 50,000 merges and one special
token, ``<|endoftext|>`` = 50256. Its files store tokens as text: every byte is shown as one
printable character (bytes that print badly, such as the space 0x20, are shifted to code
points from U+0100 up, so a space reads "Ġ"). ``encoder.json`` maps each token's text to its
id; ``vocab.bpe`` lists the merges in order, one "left right" pair per line. Merge number r
creates id 256 + r, exactly as in a tokenizer we train; only the 256 byte tokens are numbered
in another order than the byte values, which ``byte_ids`` records.

The files are located with ``attnbook.download.fetch`` (downloaded once and sha256-checked,
or found in a local mirror / tiktoken's cache). GPT-2's merges are fixed: ``train`` and ``load``
refuse (``minbpe.load`` reads a saved GPT-2 model back as a ``RegexTokenizer``).
Chapter 16 rebuilds it from the two files.
"""

import json
from pathlib import Path

from .regex import RegexTokenizer

VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
ENDOFTEXT = "<|endoftext|>"


def gpt2_files():
    """Local paths of GPT-2's ``vocab.bpe`` and ``encoder.json`` (fetched once, sha256-checked)."""
    from attnbook.download import fetch

    return (
        fetch(VOCAB_BPE_URL, VOCAB_BPE_SHA256),
        fetch(ENCODER_JSON_URL, ENCODER_JSON_SHA256),
    )


def byte_to_char():
    """GPT-2's printable stand-in for each byte: itself if it prints well, else U+0100 onwards."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


class GPT2Tokenizer(RegexTokenizer):
    """GPT-2's byte-level BPE: the same ids as ``tiktoken.get_encoding("gpt2")``."""

    def __init__(self, vocab_bpe=None, encoder_json=None):
        """Build from the two files (default: located through attnbook's download cache)."""
        super().__init__("gpt2")
        if vocab_bpe is None or encoder_json is None:
            vocab_bpe, encoder_json = gpt2_files()
        byte_ids, merges, special = read_gpt2_files(vocab_bpe, encoder_json)
        self._set_model(byte_ids, merges, self.pattern, special)

    def train(self, text, vocab_size, verbose=False):
        raise NotImplementedError(
            "GPT-2's merges are fixed; to train on your own text use RegexTokenizer('gpt2')"
        )

    def load(self, model_file):
        """Refused: a GPT2Tokenizer always holds GPT-2's model, as read from GPT-2's files."""
        raise NotImplementedError(
            f"a GPT2Tokenizer holds GPT-2's model and cannot load another; use "
            f"minbpe.load({str(model_file)!r}), which returns a RegexTokenizer (a GPT-2 model "
            "saved with save() loads that way too, giving the same ids)"
        )


def read_gpt2_files(vocab_bpe, encoder_json):
    """``(byte_ids, merges, special_tokens)`` from GPT-2's files; ``ValueError`` if they disagree."""
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
    if not lines[0].startswith("#version"):
        raise ValueError(f"{vocab_bpe}: expected a '#version' first line, found {lines[0][:40]!r}")
    chars = byte_to_char()
    missing = [c for c in chars if c not in encoder]
    if missing:
        raise ValueError(f"{encoder_json} has no token for the byte characters {missing[:5]}")
    byte_ids = [encoder[c] for c in chars]
    merges = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        left, sep, right = line.partition(" ")
        if not sep or left not in encoder or right not in encoder:
            raise ValueError(f"{vocab_bpe}, line {line_no}: {line!r} is not a pair of known tokens")
        if encoder.get(left + right) != 256 + len(merges):
            raise ValueError(
                f"{vocab_bpe}, line {line_no}: merge {len(merges)} ({line!r}) should create id "
                f"{256 + len(merges)}, but encoder.json gives {encoder.get(left + right)}"
            )
        merges.append((encoder[left], encoder[right]))
    special = {ENDOFTEXT: encoder[ENDOFTEXT]} if ENDOFTEXT in encoder else {}
    if len(encoder) != 256 + len(merges) + len(special):
        raise ValueError(
            f"{encoder_json} has {len(encoder)} tokens, but 256 bytes + {len(merges)} merges "
            f"+ {len(special)} special tokens make {256 + len(merges) + len(special)}"
        )
    return byte_ids, merges, special
