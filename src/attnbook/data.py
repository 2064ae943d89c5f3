"""The book's corpora: where each one lives and its sha256, fetched through ``download.fetch``.

    from attnbook.data import corpus_path
    text = corpus_path("tinyshakespeare").read_text(encoding="utf-8")

Token encodings, memory-mapped token files and batches come with the GPT chapter.
"""

from dataclasses import dataclass
from pathlib import Path

from .download import fetch


@dataclass(frozen=True)
class Corpus:
    """A downloadable text corpus: its address, its sha256 and its file name in the cache."""

    url: str
    sha256: str
    filename: str


CORPORA = {
    "tinyshakespeare": Corpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
    ),
}


def corpus_path(name: str) -> Path:
    """Local, sha256-checked path of the registered corpus ``name`` (downloaded once)."""
    if name not in CORPORA:
        raise ValueError(
            f"unknown corpus {name!r}; registered corpora: {', '.join(sorted(CORPORA))}"
        )
    corpus = CORPORA[name]
    return fetch(corpus.url, corpus.sha256, corpus.filename)
