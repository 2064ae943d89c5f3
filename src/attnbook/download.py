"""Download a file once, check its sha256, and keep it in the book's cache.

``fetch(url, sha256)`` returns the path of a verified local copy. It looks, in order, in:

1. the cache folder: ``$ATTNBOOK_CACHE_DIR``, else ``data/cache/`` of the repository checkout,
   else ``~/.cache/attnbook``;
2. a local mirror, for machines without a network: ``$ATTNBOOK_DATA_MIRROR``, a folder (or a
   ``file://`` URL of a folder) holding the file under its name;
3. tiktoken's cache, ``$TIKTOKEN_CACHE_DIR``, where tiktoken stores a download under the sha1
   of its URL (so GPT-2's tokenizer files that tiktoken already fetched are found);
4. the network.

Whatever the source, the bytes must have the expected sha256, or ``ValueError`` is raised and
nothing is cached. It does not retry, resume partial downloads or fetch anything it was not given
the hash of. Chapters 16 and 17 read their files through it.
"""

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

_CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root in an editable install


def cache_dir() -> Path:
    """The folder downloads are kept in (created on first use)."""
    if os.environ.get("ATTNBOOK_CACHE_DIR"):
        return Path(os.environ["ATTNBOOK_CACHE_DIR"])
    if (_CHECKOUT / "pyproject.toml").exists() and (_CHECKOUT / "data").is_dir():
        return _CHECKOUT / "data" / "cache"
    return Path.home() / ".cache" / "attnbook"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _candidates(url: str, filename: str):
    """Local places the file may already be, before trying the network."""
    yield cache_dir() / filename
    mirror = os.environ.get("ATTNBOOK_DATA_MIRROR")
    if mirror:
        folder = Path(urlparse(mirror).path) if mirror.startswith("file://") else Path(mirror)
        yield folder / filename
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        yield Path(os.environ["TIKTOKEN_CACHE_DIR"]) / hashlib.sha1(url.encode()).hexdigest()


def fetch(url: str, sha256: str, filename: str | None = None) -> Path:
    """Return the path of a cached copy of ``url`` whose sha256 is ``sha256``.

    Args:
        url: where the file lives on the network (also names it in tiktoken's cache).
        sha256: the expected hex digest; a file with any other content is refused.
        filename: the name in the cache and mirror folders (default: the URL's last part).
    """
    filename = filename or Path(urlparse(url).path).name
    target = cache_dir() / filename
    for path in _candidates(url, filename):
        if path.is_file():
            found = sha256_of(path)
            if found != sha256:
                raise ValueError(
                    f"{path} has sha256 {found}, expected {sha256}: delete it (or fix the "
                    f"mirror) so that a good copy of {url} is fetched"
                )
            if path != target:
                _store(path, target)
            return target
    with tempfile.TemporaryDirectory() as tmp:
        download = Path(tmp) / filename
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(download, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as err:
            raise OSError(
                f"could not download {url} ({err}); without a network, set ATTNBOOK_DATA_MIRROR "
                f"to a folder holding {filename}"
            ) from err
        found = sha256_of(download)
        if found != sha256:
            raise ValueError(f"downloaded {url} has sha256 {found}, expected {sha256}")
        _store(download, target)
    return target


def _store(source: Path, target: Path) -> None:
    """Copy into the cache atomically: a reader never sees a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
