import hashlib

import pytest

from attnbook import download

URL = "https://example.invalid/files/corpus.txt"
DATA = b"to be or not to be\n"
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNBOOK_DATA_MIRROR", raising=False)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    return tmp_path


@pytest.mark.parametrize("as_url", [False, True])
def test_mirror_folder_is_used_and_cached(env, monkeypatch, as_url):
    mirror = env / "mirror"
    mirror.mkdir()
    (mirror / "corpus.txt").write_bytes(DATA)
    monkeypatch.setenv("ATTNBOOK_DATA_MIRROR", f"file://{mirror}" if as_url else str(mirror))
    path = download.fetch(URL, SHA)
    assert path == env / "cache" / "corpus.txt" and path.read_bytes() == DATA
    (mirror / "corpus.txt").unlink()  # the cached copy is enough from now on
    assert download.fetch(URL, SHA).read_bytes() == DATA


def test_tiktoken_cache_layout_is_found(env, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(env))
    (env / hashlib.sha1(URL.encode()).hexdigest()).write_bytes(DATA)
    assert download.fetch(URL, SHA, filename="c.txt").read_bytes() == DATA


def test_wrong_hash_is_refused_and_not_cached(env, monkeypatch):
    mirror = env / "mirror"
    mirror.mkdir()
    (mirror / "corpus.txt").write_bytes(DATA + b"tampered")
    monkeypatch.setenv("ATTNBOOK_DATA_MIRROR", str(mirror))
    with pytest.raises(ValueError, match="expected " + SHA):
        download.fetch(URL, SHA)
    assert not (env / "cache" / "corpus.txt").exists()


def test_no_network_and_no_copy_says_what_to_set(env, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match="ATTNBOOK_DATA_MIRROR"):
        download.fetch(URL, SHA)


def test_shared_gpt2_vocab_is_found_offline(monkeypatch, tmp_path):
    """With the project's offline data (as .ci/run sets it up) GPT-2's files resolve."""
    import os

    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("TIKTOKEN_CACHE_DIR is not set (CI sets it)")
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path))
    path = download.fetch(
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    )
    assert path.read_text(encoding="utf-8").startswith("#version: 0.2")


def test_unknown_corpus_lists_the_known_ones():
    from attnbook.data import corpus_path

    with pytest.raises(ValueError, match="registered corpora: tinyshakespeare"):
        corpus_path("war-and-peace")


def test_tinyshakespeare_from_the_offline_mirror(monkeypatch, tmp_path):
    import os

    from attnbook.data import corpus_path

    if not os.environ.get("ATTNBOOK_DATA_MIRROR"):
        pytest.skip("ATTNBOOK_DATA_MIRROR is not set (CI sets it)")
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path))
    text = corpus_path("tinyshakespeare").read_text(encoding="utf-8")
    assert len(text) == 1115394 and text.startswith("First Citizen:")
