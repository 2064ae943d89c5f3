"""attnbook.data: text, encodings, prepared token files and batches.

Small texts in tmp_path; GPT-2's files and TinyShakespeare come from the local caches (CI points
ATTNBOOK_DATA_MIRROR and TIKTOKEN_CACHE_DIR at them) and the tests that need them are skipped
without them. Nothing touches the network.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

import minbpe
from attnbook import data
from attnbook.data import (
    Encoding,
    SlidingWindowDataset,
    TokenData,
    create_dataloader,
    get_encoding,
    load_text,
    prepare,
    write_tokens,
)
from attnbook.download import cache_dir

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak. Ünïcödé, 日本語 and an emoji 😀 too.\n"
) * 20
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    return path


def _concat(folder):
    """The whole token stream of a prepared folder, train then val."""
    d = TokenData(folder)
    return np.concatenate([d.tokens["train"], d.tokens["val"]])


def _decoded(folder):
    """The text of a prepared folder's whole token stream."""
    return TokenData(folder).encoding.decode(_concat(folder))


# ---------------------------------------------------------------------------------------------
# Text


def test_load_text_of_a_file_and_its_errors(tmp_path, text_file):
    assert load_text(str(text_file)) == TEXT
    with pytest.raises(ValueError, match="registered corpus.*tinyshakespeare.*nor an existing"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="tinyshakespeare"):
        load_text("war-and-peace")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("line one\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text: byte 0xe9 at offset 12 \(line 2\)"):
        load_text(str(bad))


# ---------------------------------------------------------------------------------------------
# Encodings


def test_char_encoding_round_trip_and_description():
    enc = get_encoding("char", TEXT)
    chars = sorted(set(TEXT))
    assert enc.vocab_size == len(chars)
    ids = enc.encode(TEXT)
    assert ids == [chars.index(c) for c in TEXT]  # the id is the rank in the sorted characters
    assert enc.decode(ids) == TEXT
    assert enc.decode(np.array(ids)) == enc.decode(torch.tensor(ids)) == TEXT
    again = Encoding.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert again.encode(TEXT) == ids and again.vocab_size == enc.vocab_size
    with pytest.raises(ValueError, match="character 'Z' at position 3"):
        enc.encode("FirZ")
    with pytest.raises(ValueError, match=f"id {enc.vocab_size} is outside"):
        enc.decode([0, enc.vocab_size])
    with pytest.raises(ValueError, match="id -1 is outside"):
        enc.decode([-1])


def test_minbpe_trained_and_model_file_encodings(tmp_path):
    enc = get_encoding("minbpe:300", TEXT)
    expected = minbpe.RegexTokenizer("gpt4").train(TEXT, 300).encode(TEXT)
    ids = enc.encode(TEXT)
    assert enc.vocab_size == 300 and ids == expected and enc.decode(ids) == TEXT
    again = Encoding.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert again.name == "minbpe:300" and again.encode(TEXT) == ids
    minbpe.RegexTokenizer("gpt4").train(TEXT, 300).save(tmp_path / "tok")
    from_file = get_encoding(str(tmp_path / "tok.model"))
    assert from_file.encode(TEXT) == ids and from_file.to_dict()["name"] == str(
        tmp_path / "tok.model"
    )
    # special tokens in the text are ordinary text
    assert enc.encode("<|endoftext|>") == minbpe.RegexTokenizer("gpt4").train(TEXT, 300).encode(
        "<|endoftext|>"
    )


def test_gpt2_and_minbpe_gpt2_give_the_same_ids():
    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache"
    )
    if not all((Path(folder) / hashlib.sha1(u.encode()).hexdigest()).is_file() for u in GPT2_URLS):
        pytest.skip("GPT-2's files are not in tiktoken's cache: set TIKTOKEN_CACHE_DIR (CI does)")
    sample = TEXT[:400] + " Hello world<|endoftext|>  \n\n\tdon't 1234567"
    gpt2, ours = get_encoding("gpt2"), get_encoding("minbpe-gpt2")
    assert gpt2.vocab_size == ours.vocab_size == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(sample) == ours.encode(sample)
    assert ours.decode(gpt2.encode(sample)) == sample
    assert Encoding.from_dict(gpt2.to_dict()).encode(sample) == gpt2.encode(sample)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("bpe", TEXT, "unknown encoding 'bpe'.*'char'.*'gpt2'.*'minbpe:<vocab_size>'"),
        ("char", None, "built from a text"),
        ("minbpe:100", TEXT, "integer >= 256"),
        ("minbpe:lots", TEXT, "integer >= 256"),
        ("nowhere/tok.model", None, "no minbpe model file"),
    ],
)
def test_bad_encodings_are_refused(name, text, match):
    with pytest.raises(ValueError, match=match):
        get_encoding(name, text)


def test_bad_description_is_refused():
    with pytest.raises(ValueError, match="not an encoding description"):
        Encoding.from_dict({"kind": "morse"})


# ---------------------------------------------------------------------------------------------
# Token files


@pytest.mark.parametrize("encoding", ["char", "minbpe:300"])
def test_prepare_writes_files_that_decode_back(tmp_path, text_file, encoding):
    folder = prepare(str(text_file), encoding, out_dir=tmp_path / "out", val_fraction=0.25)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    enc = get_encoding(encoding, TEXT)
    ids, n = enc.encode(TEXT), len(enc.encode(TEXT))
    assert meta["n_train"] == int(n * 0.75) and meta["n_train"] + meta["n_val"] == n
    assert meta["source"] == str(text_file.resolve()) and meta["dtype"] == "uint16"
    assert meta["source_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert meta["vocab_size"] == enc.vocab_size and meta["encoding"] == enc.to_dict()
    assert (folder / "train.bin").stat().st_size == 2 * meta["n_train"]
    d = TokenData(folder)
    assert d.tokens["train"].tolist() == ids[: meta["n_train"]]  # the first 75% is train
    assert d.encoding.decode(_concat(folder)) == TEXT
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_write_tokens_picks_uint16_or_uint32(tmp_path):
    ids = [0, 1, 65535, 7, 2]
    write_tokens(tmp_path / "a.bin", ids, 65536)
    assert np.fromfile(tmp_path / "a.bin", dtype="<u2").tolist() == ids
    big = [0, 65536, 69999, 3]
    write_tokens(tmp_path / "b.bin", np.array(big), 70000)
    assert (tmp_path / "b.bin").stat().st_size == 4 * len(big)
    assert np.fromfile(tmp_path / "b.bin", dtype="<u4").tolist() == big
    assert data.token_dtype(65536) == "uint16" and data.token_dtype(65537) == "uint32"
    for bad in (70000, -1):
        with pytest.raises(ValueError, match=f"id {bad} .*70000 ids"):
            write_tokens(tmp_path / "c.bin", [1, bad], 70000)
    assert not (tmp_path / "c.bin").exists()


def test_uint32_files_are_read_back(tmp_path):
    """A hand-made folder with a 70000-id vocabulary: TokenData maps uint32 and batches work."""
    ids = np.arange(0, 70000, 7)  # (10000,)
    write_tokens(tmp_path / "train.bin", ids[:9000], 70000)
    write_tokens(tmp_path / "val.bin", ids[9000:], 70000)
    meta = {"format": 1, "vocab_size": 70000, "dtype": "uint32", "n_train": 9000, "n_val": 1000}
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "encoding": {}}))
    d = TokenData(tmp_path)
    assert d.tokens["train"].dtype == np.dtype("<u4") and d.tokens["val"][-1] == 69993
    x, y = d.get_batch("val", 4, 16, torch.Generator().manual_seed(0))
    assert (y - x == 7).all()


def test_prepare_twice_encodes_once_and_again_when_inputs_change(tmp_path, text_file, monkeypatch):
    calls = []
    real = data.get_encoding
    monkeypatch.setattr(data, "get_encoding", lambda *a: calls.append(a[0]) or real(*a))
    out = tmp_path / "out"
    prepare(str(text_file), "char", out_dir=out)
    prepare(str(text_file), "char", out_dir=out)
    assert len(calls) == 1
    prepare(str(text_file), "char", out_dir=out, val_fraction=0.2)
    assert len(calls) == 2 and json.loads((out / "meta.json").read_text())["val_fraction"] == 0.2
    text_file.write_text(TEXT + "more", encoding="utf-8")
    prepare(str(text_file), "char", out_dir=out, val_fraction=0.2)
    assert len(calls) == 3 and _decoded(out) == TEXT + "more"
    (out / "val.bin").write_bytes(b"")  # damaged folder: prepared again
    prepare(str(text_file), "char", out_dir=out, val_fraction=0.2)
    assert len(calls) == 4 and _decoded(out) == TEXT + "more"


def test_default_folder_is_in_the_cache(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    folder = prepare(str(text_file), "minbpe:260")
    assert folder.parent == cache_dir() / "prepared"
    assert folder.name.endswith("corpus.txt-minbpe-260")


def test_prepare_refuses_a_tiny_val_split_and_a_bad_fraction(tmp_path, text_file):
    with pytest.raises(ValueError, match=r"val_fraction=0.0001 .* 1 val tokens"):
        prepare(str(text_file), "char", out_dir=tmp_path / "out", val_fraction=0.0001)
    with pytest.raises(ValueError, match="val_fraction must be a float between 0 and 1"):
        prepare(str(text_file), "char", out_dir=tmp_path / "out", val_fraction=1.0)
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_ids_beyond_the_vocabulary(tmp_path, text_file, monkeypatch):
    """A faulty encoding (ids up to vocab_size) is caught before any file is written."""
    char = data._char_encoding

    def off_by_one(chars):
        enc = char(chars)
        enc.vocab_size -= 1
        return enc

    monkeypatch.setattr(data, "_char_encoding", off_by_one)
    with pytest.raises(ValueError, match=r"'char' encoding of .* holds the id (\d+) .* \1 ids"):
        prepare(str(text_file), "char", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# TokenData and batches


@pytest.fixture
def prepared(tmp_path, text_file):
    return prepare(str(text_file), "char", out_dir=tmp_path / "out")


def test_get_batch_shapes_shift_and_windows(prepared):
    d = TokenData(prepared)
    x, y = d.get_batch("train", 8, 32, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # the slow, explicit version: the same offsets, one window of the split each
    ix = torch.randint(
        len(d.tokens["train"]) - 32, (8,), generator=torch.Generator().manual_seed(1)
    )
    train = torch.tensor(np.array(d.tokens["train"]), dtype=torch.int64)  # (n_train,)
    assert torch.equal(x, torch.stack([train[i : i + 32] for i in ix]))
    assert torch.equal(y, torch.stack([train[i + 1 : i + 33] for i in ix]))


def test_get_batch_is_deterministic_and_ranks_split_the_global_batch(prepared):
    d = TokenData(prepared)

    def batch(seed, **kw):
        return d.get_batch("val", 6, 16, torch.Generator().manual_seed(seed), **kw)

    x1, y1 = batch(3)
    assert torch.equal(x1, batch(3)[0]) and not torch.equal(x1, batch(4)[0])
    parts = [batch(3, rank=r, world_size=3) for r in range(3)]
    assert all(p[0].shape == (2, 16) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    g1, g3 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d.get_batch("val", 6, 16, g1)
    d.get_batch("val", 6, 16, g3, rank=1, world_size=3)
    assert torch.equal(g1.get_state(), g3.get_state())  # every rank's generator stays in step


def test_get_batch_errors(prepared):
    d = TokenData(prepared)
    n_val = len(d.tokens["val"])
    with pytest.raises(
        ValueError,
        match=f"val split holds {n_val} tokens, shorter than one block: block_size={n_val}",
    ):
        d.get_batch("val", 2, n_val)
    d.get_batch("val", 2, n_val - 1)  # exactly block_size + 1 tokens is enough
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by world_size=4"):
        d.get_batch("train", 6, 8, world_size=4)
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        d.get_batch("test", 2, 8)
    with pytest.raises(ValueError, match="rank must be an integer in 0..1"):
        d.get_batch("train", 4, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        d.get_batch("train", 4, 0)


def test_a_corrupt_bin_is_refused(prepared):
    vocab_size = TokenData(prepared).vocab_size
    tokens = np.memmap(prepared / "val.bin", dtype="<u2", mode="r+")
    tokens[3] = vocab_size + 4
    tokens.flush()
    del tokens
    with pytest.raises(
        ValueError, match=f"val split .* holds the id {vocab_size + 4} .*{vocab_size} ids"
    ):
        TokenData(prepared)


def test_files_that_disagree_with_meta_are_refused(prepared):
    with open(prepared / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="train.bin holds .* bytes, but meta.json says"):
        TokenData(prepared)
    (prepared / "meta.json").unlink()
    with pytest.raises(ValueError, match="has no meta.json"):
        TokenData(prepared)


# ---------------------------------------------------------------------------------------------
# TinyShakespeare, from the offline mirror


def test_tinyshakespeare_char_matches_nanogpt(tmp_path, monkeypatch):
    if not os.environ.get("ATTNBOOK_DATA_MIRROR"):
        pytest.skip("ATTNBOOK_DATA_MIRROR is not set (CI sets it)")
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    d = TokenData(prepare("tinyshakespeare", "char", out_dir=tmp_path / "shakespeare"))
    # nanoGPT's data/shakespeare_char/prepare.py reports the same three numbers
    assert d.vocab_size == 65 and d.meta["n_train"] == 1_003_854 and d.meta["n_val"] == 111_540
    assert d.meta["source"] == "tinyshakespeare" and d.meta["dtype"] == "uint16"
    assert d.encoding.decode(d.tokens["train"][:14]) == "First Citizen:"
    assert _decoded(d.folder) == load_text("tinyshakespeare")


def test_sliding_windows_are_the_stream_cut_every_stride_tokens():
    tokens = list(range(100, 130))  # 30 ids
    ds = SlidingWindowDataset(tokens, block_size=8, stride=5)
    assert len(ds) == (30 - 8 - 1) // 5 + 1 == 5
    for i in range(len(ds)):
        x, y = ds[i]
        assert (
            x.tolist() == tokens[5 * i : 5 * i + 8] and y.tolist() == tokens[5 * i + 1 : 5 * i + 9]
        )
        assert x.dtype == torch.int64
    disjoint = SlidingWindowDataset(tokens, block_size=8, stride=8)
    assert [disjoint[i][0][0].item() for i in range(len(disjoint))] == [100, 108, 116]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="30 tokens are shorter than one window: block_size=30"):
        SlidingWindowDataset(tokens, block_size=30, stride=1)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        SlidingWindowDataset(tokens, block_size=8, stride=0)


def test_create_dataloader_encodes_text_with_gpt2_and_shuffles_reproducibly():
    text = "In the beginning the Universe was created. This has made a lot of people angry. " * 9
    ids = tiktoken.get_encoding("gpt2").encode(text)
    in_order = next(iter(create_dataloader(text, batch_size=2, block_size=16, stride=8,
                                           shuffle=False)))  # fmt: skip
    assert in_order[0].tolist() == [ids[:16], ids[8:24]] and in_order[1].tolist()[0] == ids[1:17]
    stream = list(range(1000, 1200))  # distinct ids: a window is known by its first one
    loader = create_dataloader(stream, batch_size=4, block_size=16, stride=8, seed=3)
    batches = list(loader)
    n_windows = len(SlidingWindowDataset(stream, 16, 8))
    assert len(batches) == n_windows // 4  # drop_last
    firsts = [row[0].item() - 1000 for x, _ in batches for row in x]
    assert all(f % 8 == 0 for f in firsts) and len(set(firsts)) == len(firsts)  # no repeats
    assert firsts != sorted(firsts)  # shuffled
    again = [row[0].item() - 1000 for x, _ in create_dataloader(stream, 4, 16, 8, seed=3)
             for row in x]  # fmt: skip
    assert again == firsts  # the same seed, the same order


def test_create_dataloader_resumes_at_any_batch_and_reshuffles_every_epoch():
    """``start_batch=k`` gives the batches of an uninterrupted loader from the k-th on, across
    epochs; each epoch is every window once (drop_last: the same whole batches), in a new order."""
    stream = list(range(1000, 1200))
    firsts = lambda batch: [row[0].item() for row in batch[0]]  # noqa: E731
    loader = create_dataloader(stream, batch_size=4, block_size=16, stride=8, seed=5)
    epochs = [[firsts(b) for b in loader] for _ in range(3)]  # 23 windows: 5 batches an epoch
    assert all(len(e) == 5 for e in epochs)
    assert len({w for b in epochs[0] for w in b}) == 20 and epochs[0] != epochs[1] != epochs[2]
    flat = [b for e in epochs for b in e]
    for k in (0, 3, 5, 7, 12):
        resumed = create_dataloader(stream, 4, 16, 8, seed=5, start_batch=k)
        again = [firsts(b) for _ in range(3) for b in resumed]
        assert again[: 15 - k] == flat[k:]
    in_order = create_dataloader(stream, 4, 16, 8, shuffle=False, start_batch=6)
    assert firsts(next(iter(in_order))) == [1032, 1040, 1048, 1056]  # epoch 1, batch 1
    with pytest.raises(ValueError, match="start_batch must be an integer >= 0, got -1"):
        create_dataloader(stream, 4, 16, 8, start_batch=-1)
    with pytest.raises(ValueError, match="23 windows .* make no whole batch of batch_size=32"):
        create_dataloader(stream, 32, 16, 8)
