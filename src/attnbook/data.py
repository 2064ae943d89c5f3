"""The book's corpora, token encodings, prepared token files and random training batches.

    text = load_text("tinyshakespeare")         # a registered corpus, or any UTF-8 text file
    enc = get_encoding("char", text)            # or "gpt2", "minbpe-gpt2", "minbpe:512", a .model
    folder = prepare("tinyshakespeare", "char") # encode once: train.bin, val.bin, meta.json
    data = TokenData(folder)                    # memory-maps the .bin files, checks every id
    x, y = data.get_batch("train", batch_size=32, block_size=256, generator=g)  # (32, 256) each
    loader = create_dataloader(text, batch_size=8, block_size=256, stride=128)  # by epochs

Corpora are downloaded once and sha256-checked (``download.fetch``, which reads a local mirror).
``prepare`` (optionally cleaning the text first, ``clean.py``) writes the token stream once
(uint16 when every id fits, else uint32) with a ``meta.json`` that rebuilds the encoding, and
finds the files again on a second call. It holds
the text in memory and knows no document boundaries (special tokens are plain text).
``get_batch`` draws windows with replacement; ``SlidingWindowDataset`` and ``create_dataloader``
walk the stream by epochs, in windows ``stride`` apart. Chapters 16 and 17 use it.
"""

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import tiktoken
import torch

import minbpe

from .checks import check_positive_ints
from .clean import clean_text
from .download import cache_dir, fetch

# ---------------------------------------------------------------------------------------------
# Corpora and text.


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


def _source_file(source: str) -> tuple[str, Path]:
    """``(label, path)``: the corpus name or the file's absolute path, and the local file."""
    if source in CORPORA:
        return source, corpus_path(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(
            f"source {source!r} is neither a registered corpus ({', '.join(sorted(CORPORA))}) "
            "nor an existing file: pass a corpus name or the path of a UTF-8 text file"
        )
    return str(path.resolve()), path


def _decode_utf8(data: bytes, path: Path) -> str:
    """``data`` as text; ``ValueError`` saying where the first byte that is not UTF-8 sits."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path} is not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start} "
            f"(line {line}): {err.reason}; convert the file to UTF-8 first"
        ) from None


def load_text(source: str) -> str:
    """The text of a registered corpus ("tinyshakespeare") or of a UTF-8 text file's path.

    ``ValueError`` for an unknown name or a missing file (listing the registered corpora) and
    for bytes that are not UTF-8 (giving their offset and line).
    """
    _, path = _source_file(source)
    return _decode_utf8(path.read_bytes(), path)


# ---------------------------------------------------------------------------------------------
# Encodings: text <-> ids.

ENCODING_FORMS = (
    "'char' (the characters of the text)",
    "'gpt2' (tiktoken)",
    "'minbpe-gpt2' (minbpe's GPT-2, same ids)",
    "'minbpe:<vocab_size>' such as 'minbpe:512' (trained on the text)",
    "the path of a saved minbpe '.model' file",
)


class Encoding:
    """Text <-> token ids, with a name, a vocabulary size and a JSON-safe description.

    Made by ``get_encoding`` or, from a saved description, by ``Encoding.from_dict``. Every id
    lies in ``0..vocab_size - 1``, so ``vocab_size`` is the size of an embedding table.
    """

    def __init__(self, name: str, vocab_size: int, encode, decode, spec: dict):
        """``encode``: str -> list[int]; ``decode``: list[int] -> str; ``spec``: ``to_dict()``."""
        self.name = name
        self.vocab_size = vocab_size
        self._encode, self._decode, self._spec = encode, decode, spec

    def __repr__(self):
        return f"Encoding({self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (special tokens such as "<|endoftext|>" count as plain text)."""
        return self._encode(text)

    def decode(self, ids) -> str:
        """The text of ``ids``: a flat list, a 1-D numpy array or a 1-D tensor of integers."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"id {bad} is outside the {self.name!r} encoding's {self.vocab_size} ids "
                f"(0..{self.vocab_size - 1})"
            )
        return self._decode(ids)

    def to_dict(self) -> dict:
        """A JSON-safe description that ``from_dict`` rebuilds this encoding from.

        ``{"kind", "name", ...}``; "char" adds ``"chars"`` (the vocabulary, in id order), a
        minbpe model (trained or read from a file) adds ``"model"``, its ``.model`` file's text.
        ``name`` is the ``get_encoding`` argument it was made from.
        """
        return dict(self._spec)

    @classmethod
    def from_dict(cls, d: dict) -> "Encoding":
        """The encoding ``to_dict`` described (GPT-2's files come from the download caches)."""
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind == "char" and isinstance(d.get("chars"), str):
            return _char_encoding(d["chars"])
        if kind == "gpt2":
            return _tiktoken_gpt2()
        if kind == "minbpe-gpt2":
            return _minbpe_encoding({"kind": kind, "name": kind}, minbpe.GPT2Tokenizer())
        if kind == "minbpe" and isinstance(d.get("model"), str) and isinstance(d.get("name"), str):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "tokenizer.model"
                path.write_bytes(d["model"].encode("utf-8"))  # bytes: no newline translation
                tokenizer = minbpe.load(path)
            return _minbpe_encoding(
                {"kind": kind, "name": d["name"], "model": d["model"]}, tokenizer
            )
        raise ValueError(
            f"not an encoding description: {str(d)[:80]!r}; expected a dict from "
            "Encoding.to_dict() with kind 'char' (and chars), 'gpt2', 'minbpe-gpt2' or "
            "'minbpe' (and name, model)"
        )


def _char_encoding(chars: str) -> Encoding:
    """One id per character of ``chars`` (distinct, in id order)."""
    if not chars or len(set(chars)) != len(chars):
        raise ValueError(
            f"a 'char' encoding needs distinct characters, one per id, got {chars[:40]!r}"
        )
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text):
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in stoi)
            raise ValueError(
                f"character {text[pos]!r} at position {pos} is not among this 'char' "
                f"encoding's {len(chars)} characters: build the encoding from a text that has it"
            ) from None

    def decode(ids):
        return "".join([chars[i] for i in ids])

    return Encoding(
        "char", len(chars), encode, decode, {"kind": "char", "name": "char", "chars": chars}
    )


def _tiktoken_gpt2() -> Encoding:
    """tiktoken's GPT-2 (its files come from tiktoken's cache, ``$TIKTOKEN_CACHE_DIR``)."""
    enc = tiktoken.get_encoding("gpt2")
    return Encoding(
        "gpt2", enc.n_vocab, enc.encode_ordinary, enc.decode, {"kind": "gpt2", "name": "gpt2"}
    )


def _minbpe_encoding(spec: dict, tokenizer: minbpe.Tokenizer) -> Encoding:
    """A minbpe tokenizer as an Encoding; ``vocab_size`` is its ``n_vocab`` (largest id + 1)."""

    def encode(text):
        return tokenizer.encode(text, allowed_special="none")

    return Encoding(spec["name"], tokenizer.n_vocab, encode, tokenizer.decode, spec)


def _model_text(tokenizer: minbpe.Tokenizer) -> str:
    """The text of the ``.model`` file ``tokenizer.save`` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer")
        return (Path(tmp) / "tokenizer.model").read_bytes().decode("utf-8")


def get_encoding(name: str, text: str | None = None) -> Encoding:
    """The encoding called ``name``; "char" and "minbpe:<vocab_size>" are built from ``text``.

    Args:
        name: "char" (the sorted set of the characters of ``text``), "gpt2" (tiktoken's GPT-2),
            "minbpe-gpt2" (minbpe's GPT2Tokenizer: the same ids), "minbpe:<vocab_size>" such as
            "minbpe:512" (a minbpe RegexTokenizer with GPT-4's split pattern, trained on
            ``text``), or the path of a minbpe ``.model`` file.
        text: the text "char" and "minbpe:<vocab_size>" are built from; ignored otherwise.
    """
    forms = "; ".join(ENCODING_FORMS)
    if not isinstance(name, str):
        raise ValueError(f"encoding must be a string, got {name!r}; one of: {forms}")
    if (name == "char" or name.startswith("minbpe:")) and (not isinstance(text, str) or not text):
        raise ValueError(f"the {name!r} encoding is built from a text: pass a non-empty text=")
    if name == "char":
        return _char_encoding("".join(sorted(set(text))))
    if name == "gpt2":
        return _tiktoken_gpt2()
    if name == "minbpe-gpt2":
        return Encoding.from_dict({"kind": name})
    if name.startswith("minbpe:"):
        size = name[len("minbpe:") :]
        if not (size.isascii() and size.isdigit() and int(size) >= 256):
            raise ValueError(
                f"encoding {name!r}: the vocabulary size after 'minbpe:' must be an integer >= "
                "256 (the byte tokens come first), e.g. 'minbpe:512'"
            )
        tokenizer = minbpe.RegexTokenizer("gpt4").train(text, int(size))
        spec = {"kind": "minbpe", "name": name, "model": _model_text(tokenizer)}
        return _minbpe_encoding(spec, tokenizer)
    if name.endswith(".model"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"encoding {name!r}: there is no minbpe model file at {path}")
        tokenizer = minbpe.load(path)  # ValueError naming the file if it is not a good model
        spec = {"kind": "minbpe", "name": name, "model": path.read_bytes().decode("utf-8")}
        return _minbpe_encoding(spec, tokenizer)
    raise ValueError(f"unknown encoding {name!r}; use one of: {forms}")


# ---------------------------------------------------------------------------------------------
# Token files: .bin + meta.json.

FORMAT = 1  # the meta.json layout this module writes and reads
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on every machine


def token_dtype(vocab_size: int) -> str:
    """ "uint16" when every id fits in 16 bits (``vocab_size <= 65536``), else "uint32"."""
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be an integer in 1..2**32, got {vocab_size!r}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """``ValueError`` naming ``what``, the id and the vocabulary size if an id is out of range.

    One pass over ``ids`` (two for a signed dtype, which may hold negative ids).
    """
    if ids.size == 0:
        return
    high = int(ids.max())
    low = int(ids.min()) if ids.dtype.kind == "i" else 0
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"{what} holds the id {bad} (first at position {int(np.argmax(ids == bad))}), outside "
            f"the vocabulary of {vocab_size} ids (0..{vocab_size - 1})"
        )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: never a half-written ``path``."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_tokens(path, ids, vocab_size: int) -> None:
    """Write ``ids`` (a 1-D sequence of integers) to ``path`` in ``token_dtype(vocab_size)``.

    ``ValueError`` before anything is written if an id is negative or ``>= vocab_size``.
    """
    ids = np.asarray(ids)  # (N,)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(
            f"ids must be a 1-D sequence of integers, got shape {ids.shape} of {ids.dtype}"
        )
    _check_ids(ids, vocab_size, f"the ids for {path}")
    _write_atomically(Path(path), ids.astype(DTYPES[token_dtype(vocab_size)]).tobytes())


def _encoding_label(encoding: Encoding) -> str:
    """A folder-name part for a given ``Encoding``: its name and a digest of its description
    (two char vocabularies of one length must not share a folder)."""
    spec = json.dumps(encoding.to_dict(), sort_keys=True).encode("utf-8")
    return f"{encoding.name}-{hashlib.sha256(spec).hexdigest()[:12]}"


def _slug(text: str) -> str:
    """A folder-name-safe form of ``text`` (its last 80 characters)."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")[-80:]


def _already_prepared(
    folder: Path, source_sha256: str, encoding: "str | Encoding", val_fraction, clean: bool
) -> bool:
    """Whether ``folder`` holds complete token files made from the same inputs."""
    try:
        meta = TokenData(folder).meta
    except ValueError:
        return False  # missing, incomplete or damaged: prepare again
    spec = meta["encoding"]
    same = (
        meta.get("source_sha256") == source_sha256
        and meta.get("val_fraction") == val_fraction
        and bool(meta.get("cleaning")) == clean
    )
    if isinstance(encoding, Encoding):
        return same and spec == encoding.to_dict()
    same = same and spec.get("name") == encoding
    if same and spec.get("kind") == "minbpe" and Path(encoding).expanduser().is_file():
        same = spec.get("model") == Path(encoding).expanduser().read_bytes().decode(
            "utf-8", "replace"
        )
    return same


def prepare(
    source: str,
    encoding: "str | Encoding" = "char",
    out_dir=None,
    val_fraction: float = 0.1,
    clean: bool = False,
) -> Path:
    """Encode ``source`` once into ``out_dir/{train.bin, val.bin, meta.json}``; returns ``out_dir``.

    Args:
        source: a registered corpus name or the path of a UTF-8 text file (see ``load_text``).
        encoding: a name ``get_encoding`` takes ("char", "gpt2", "minbpe:512", ...), or an
            ``Encoding`` to reuse (a pretrained model's: the ids keep their meaning).
        out_dir: the folder to write (default ``cache_dir()/prepared/<source>-<encoding>``).
        val_fraction: the share of the token stream, taken from its end, that becomes "val".
        clean: clean the text first (``clean.clean_text``); meta.json keeps its report under
            "cleaning".

    If ``out_dir`` already holds files prepared from the same source bytes (sha256), encoding,
    ``val_fraction`` and cleaning, it returns at once. Each file is written atomically and
    ``meta.json`` last (after removing the old one), so an interrupted run leaves nothing
    ``TokenData`` accepts.
    """
    if not isinstance(val_fraction, float) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a float between 0 and 1, got {val_fraction!r}")
    if not isinstance(clean, bool):
        raise ValueError(f"clean must be True or False, got {clean!r}")
    label, path = _source_file(source)
    data = path.read_bytes()
    source_sha256 = hashlib.sha256(data).hexdigest()
    if out_dir is None:
        name = encoding if isinstance(encoding, str) else _encoding_label(encoding)
        suffix = "-clean" if clean else ""
        out_dir = cache_dir() / "prepared" / f"{_slug(label)}-{_slug(name)}{suffix}"
    out_dir = Path(out_dir)
    if _already_prepared(out_dir, source_sha256, encoding, val_fraction, clean):
        return out_dir

    text = _decode_utf8(data, path)
    report = None
    if clean:
        text, report = clean_text(text)
    enc = encoding if isinstance(encoding, Encoding) else get_encoding(encoding, text)
    try:
        ids = np.array(enc.encode(text), dtype=np.int64)  # (N,)
    except ValueError as err:  # a given char vocabulary that lacks one of the text's characters
        raise ValueError(f"{label} cannot be encoded with {enc!r}: {err}") from None
    _check_ids(ids, enc.vocab_size, f"the {encoding!r} encoding of {label}")
    n_train = int(len(ids) * (1 - val_fraction))
    if min(n_train, len(ids) - n_train) < 2:
        raise ValueError(
            f"val_fraction={val_fraction} splits the {len(ids)} tokens of {label} into "
            f"{n_train} train and {len(ids) - n_train} val tokens; each split needs at least 2: "
            "change val_fraction or use a longer text"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # the folder is invalid until meta.json is back
    write_tokens(out_dir / "train.bin", ids[:n_train], enc.vocab_size)
    write_tokens(out_dir / "val.bin", ids[n_train:], enc.vocab_size)
    meta = {
        "format": FORMAT,
        "source": label,
        "source_sha256": source_sha256,
        "encoding": enc.to_dict(),
        "vocab_size": enc.vocab_size,
        "dtype": token_dtype(enc.vocab_size),
        "n_train": n_train,
        "n_val": len(ids) - n_train,
        "val_fraction": val_fraction,
        **({"cleaning": report.to_dict()} if report else {}),
    }
    _write_atomically(out_dir / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading prepared tokens and drawing batches.


def _read_meta(folder: Path) -> dict:
    """``folder/meta.json``, checked to be one this module wrote; ``ValueError`` otherwise."""
    path = folder / "meta.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no meta.json: make the token files with prepare() first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): run prepare() again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a format-{FORMAT} meta.json: run prepare() again")
    for key in ("vocab_size", "n_train", "n_val"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise ValueError(f"{path}: {key} must be a positive integer, got {meta.get(key)!r}")
    if meta.get("dtype") != token_dtype(meta["vocab_size"]) or not isinstance(
        meta.get("encoding"), dict
    ):
        raise ValueError(
            f"{path}: dtype {meta.get('dtype')!r} or the encoding does not match vocab_size "
            f"{meta['vocab_size']} (expected {token_dtype(meta['vocab_size'])!r}): run prepare() again"
        )
    return meta


class TokenData:
    """The prepared token files of one folder, memory-mapped read-only, and random batches.

    Attributes: ``meta`` (the meta.json dict), ``vocab_size``, ``tokens`` (``{"train": memmap,
    "val": memmap}``, 1-D) and ``encoding`` (built from ``meta`` on first use).
    """

    def __init__(self, folder):
        """Read ``folder/meta.json``, memory-map ``train.bin`` and ``val.bin``, check every id.

        ``ValueError`` if meta.json is missing or damaged, a file's size disagrees with it, or
        an id is not below ``vocab_size``.
        """
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder)
        self.vocab_size = self.meta["vocab_size"]
        dtype = DTYPES[self.meta["dtype"]]
        self.tokens = {}
        for split in SPLITS:
            path = self.folder / f"{split}.bin"
            expected = self.meta[f"n_{split}"] * dtype.itemsize
            found = path.stat().st_size if path.is_file() else 0
            if found != expected:
                raise ValueError(
                    f"{path} holds {found} bytes, but meta.json says {self.meta[f'n_{split}']} "
                    f"{self.meta['dtype']} tokens ({expected} bytes): run prepare() again"
                )
            self.tokens[split] = np.memmap(path, dtype=dtype, mode="r")  # (n_split,)
        self.check_ids()

    @cached_property
    def encoding(self) -> Encoding:
        """The encoding the tokens were made with (to decode them)."""
        return Encoding.from_dict(self.meta["encoding"])

    def check_ids(self) -> None:
        """``ValueError`` naming the split, the id and the vocabulary size if an id is too big."""
        for split, tokens in self.tokens.items():
            _check_ids(tokens, self.vocab_size, f"the {split} split ({split}.bin in {self.folder})")

    def get_batch(
        self, split, batch_size, block_size, generator=None, rank=0, world_size=1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of ``split``: inputs ``x`` and targets ``y`` (``x`` shifted by one).

        Draws ``batch_size`` start offsets (the global batch) with ``generator`` (a CPU
        ``torch.Generator``; None uses torch's global one) and returns rows
        ``rank * b .. (rank + 1) * b - 1`` of it, where ``b = batch_size // world_size``: ranks
        whose generators are in the same state share one global batch and each takes its slice.

        Args:
            split: "train" or "val".
            batch_size: rows in the global batch, a multiple of ``world_size``.
            block_size: tokens per row; the split must hold at least ``block_size + 1``.
            rank, world_size: this process's slice of the global batch.

        Returns:
            ``x, y``: int64 tensors of shape ``(batch_size // world_size, block_size)`` on the CPU.
        """
        if split not in self.tokens:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        check_positive_ints(batch_size=batch_size, block_size=block_size, world_size=world_size)
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by world_size={world_size}: each rank "
                "takes an equal slice of the global batch, so make batch_size a multiple of it"
            )
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in 0..{world_size - 1}, got {rank!r}")
        data = self.tokens[split]
        if len(data) < block_size + 1:
            raise ValueError(
                f"the {split} split holds {len(data)} tokens, shorter than one block: "
                f"block_size={block_size} needs at least {block_size + 1} (inputs and the targets "
                "one token on); lower block_size or prepare a longer text (or a larger val_fraction)"
            )
        ix = torch.randint(
            len(data) - block_size, (batch_size,), generator=generator
        )  # (batch_size,)
        b = batch_size // world_size
        rows = np.stack(
            [data[i : i + block_size + 1] for i in ix[rank * b : (rank + 1) * b].tolist()]
        )
        rows = torch.from_numpy(rows.astype(np.int64))  # (b, block_size + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (b, block_size) each


# ---------------------------------------------------------------------------------------------
# Windows with a stride: the dataset-and-loader way to batch a token stream.


class SlidingWindowDataset(torch.utils.data.Dataset):
    """Overlapping windows of a token stream (seed 002's ``GPTDatasetV1``).

    Item ``i`` is ``(x, y)``: the ``block_size`` tokens from ``i * stride`` on, and the same
    shifted by one (the next-token targets), each ``(block_size,)`` int64. ``stride ==
    block_size`` gives disjoint windows; a smaller stride overlaps them (more items, each token
    seen in several contexts). ``tokens`` is any 1-D sequence of ids (a list, an array, a
    ``TokenData`` split's memmap, which stays on disk).
    """

    def __init__(self, tokens, block_size: int, stride: int):
        check_positive_ints(block_size=block_size, stride=stride)
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"{len(tokens)} tokens are shorter than one window: block_size={block_size} "
                f"needs at least {block_size + 1} (inputs and targets one token on)"
            )
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        start = i * self.stride
        chunk = np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64)
        chunk = torch.from_numpy(chunk)  # (block_size + 1,)
        return chunk[:-1], chunk[1:]  # (block_size,) each


class EpochOrder(torch.utils.data.Sampler):
    """The indices ``0 .. n - 1`` once per epoch, as a ``DataLoader``'s sampler: in a new order
    every epoch if ``shuffle`` (epoch ``e``'s permutation comes from ``seed + e``, so any epoch
    can be made again), else in order. It starts at ``epoch``, skipping its first ``skip``
    indices (where a resumed run stopped); every later epoch is whole."""

    def __init__(self, n: int, shuffle: bool, seed: int, epoch: int = 0, skip: int = 0):
        self.n, self.shuffle, self.seed, self.epoch, self.skip = n, shuffle, seed, epoch, skip

    def __len__(self) -> int:
        return self.n - self.skip

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=gen)  # (n,)
        else:
            order = torch.arange(self.n)
        skip, self.skip, self.epoch = self.skip, 0, self.epoch + 1
        return iter(order[skip:].tolist())


def create_dataloader(
    source,
    batch_size: int = 4,
    block_size: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int | None = None,
    encoding: str = "gpt2",
    start_batch: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches ``(x, y)``, each ``(batch_size, block_size)``, of a ``SlidingWindowDataset``
    (seed 002's ``create_dataloader_v1``). ``source``: text (encoded with ``encoding``) or token
    ids. ``shuffle`` reorders the windows every epoch (``EpochOrder``; from ``seed``, if given,
    reproducibly); ``drop_last`` drops a last, smaller batch; ``num_workers`` loads in
    subprocesses; ``start_batch`` starts that many batches in, counted over epochs (to resume)."""
    check_positive_ints(batch_size=batch_size)
    if isinstance(start_batch, bool) or not isinstance(start_batch, int) or start_batch < 0:
        raise ValueError(f"start_batch must be an integer >= 0, got {start_batch!r}")
    if isinstance(source, str):
        source = get_encoding(encoding, source).encode(source)
    windows = SlidingWindowDataset(source, block_size, stride)
    per_epoch = len(windows) // batch_size if drop_last else -(-len(windows) // batch_size)
    if per_epoch == 0:
        raise ValueError(
            f"{len(windows)} windows (block_size={block_size}, stride={stride}) make no whole "
            f"batch of batch_size={batch_size} with drop_last: lower batch_size or stride"
        )
    if seed is None:
        seed = int(torch.randint(2**62, ()))  # from torch's global generator
    epoch, batches_in = divmod(start_batch, per_epoch)
    order = EpochOrder(len(windows), shuffle, seed, epoch, skip=batches_in * batch_size)
    return torch.utils.data.DataLoader(
        windows, batch_size=batch_size, sampler=order, drop_last=drop_last,
        num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip  # its own generator: an epoch's start draws nothing from torch's global one
