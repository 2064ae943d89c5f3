"""Cleaning a corpus before it is tokenized, and a count of what the cleaning changed.

    text, report = clean_text(raw)
    print(report)  # each step's count, and the characters before and after

The steps, in order: Unicode NFC normalisation (an accented letter becomes one code point);
line endings to "\\n"; control and format characters other than "\\n" and "\\t" removed (zero-width
spaces, byte-order marks, ...); other Unicode spaces (no-break, thin, ...) to " "; trailing
whitespace cut from every line; runs of blank lines cut to one; and a paragraph (text between
blank lines) of at least ``min_duplicate_chars`` characters that repeats an earlier one
exactly is removed (boilerplate, pages copied twice). Shorter paragraphs may repeat: in a play,
"ROMEO:\\nAy." is not a copy. Not done: near-duplicates (MinHash), language or quality filters,
markup removal. ``data.prepare(..., clean=True)`` cleans before encoding and keeps the report.
"""

import re
import unicodedata
from dataclasses import asdict, dataclass, field

from .checks import check_positive_int


@dataclass
class CleanReport:
    """What ``clean_text`` changed: a count per step, the characters before and after, and the
    first few removed duplicates (cut to 60 characters)."""

    chars_before: int
    chars_after: int = 0
    normalized: int = 0  # code points merged by NFC
    line_endings: int = 0  # "\r\n" or "\r" made "\n"
    controls_removed: int = 0
    spaces_replaced: int = 0
    trailing_cut: int = 0  # lines that ended in whitespace
    blank_runs_cut: int = 0  # runs of two or more blank lines
    duplicates_removed: int = 0  # paragraphs
    duplicate_chars: int = 0
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        removed = self.chars_before - self.chars_after
        share = removed / self.chars_before if self.chars_before else 0.0
        lines = [f"{self.chars_before:,} -> {self.chars_after:,} characters "
                 f"({removed:,} removed, {share:.2%})"]  # fmt: skip
        for name, value in asdict(self).items():
            if name not in ("chars_before", "chars_after", "examples"):
                lines.append(f"  {name.replace('_', ' ')}: {value:,}")
        lines += [f"  removed: {example!r}" for example in self.examples]
        return "\n".join(lines)


def _is_removable(char: str) -> bool:
    """A control (Cc) or format (Cf) character other than newline and tab."""
    return char not in "\n\t" and unicodedata.category(char) in ("Cc", "Cf")


def clean_text(text: str, min_duplicate_chars: int = 100) -> tuple[str, CleanReport]:
    """``text`` cleaned by the module's steps, and the ``CleanReport`` of what changed.

    Args:
        text: the raw corpus.
        min_duplicate_chars: the shortest paragraph removed when it repeats an earlier one.
    """
    if not isinstance(text, str):
        raise ValueError(f"clean_text needs a str, got {type(text).__name__}")
    check_positive_int("min_duplicate_chars", min_duplicate_chars)
    report = CleanReport(chars_before=len(text))
    nfc = unicodedata.normalize("NFC", text)
    report.normalized = len(text) - len(nfc)
    text, report.line_endings = re.subn(r"\r\n?", "\n", nfc)
    kept = [c for c in text if not _is_removable(c)]
    report.controls_removed = len(text) - len(kept)
    text, report.spaces_replaced = re.subn(r"[^\S\n\t ]", " ", "".join(kept))  # other spaces
    text, report.trailing_cut = re.subn(r"[ \t]+$", "", text, flags=re.MULTILINE)
    text, report.blank_runs_cut = re.subn(r"\n{3,}", "\n\n", text)
    seen, paragraphs = set(), []
    for paragraph in text.split("\n\n"):
        if len(paragraph) >= min_duplicate_chars and paragraph in seen:
            report.duplicates_removed += 1
            report.duplicate_chars += len(paragraph) + 2  # with its blank line
            if len(report.examples) < 3:
                report.examples.append(paragraph[:60])
            continue
        seen.add(paragraph)
        paragraphs.append(paragraph)
    text = "\n\n".join(paragraphs)
    report.chars_after = len(text)
    return text, report
