import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"

# The tests use tiny tensors: one thread is faster than two threads waiting on each other.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def decode_in_chunks():
    """``decode(layer, x, chunks, cache)``: ``x`` ``(B, T, n_embd)`` fed through ``cache`` in
    pieces of the sizes in ``chunks`` (checking ``cache.length`` after each), the outputs
    concatenated back to ``(B, T, n_embd)``, to compare with the full pass."""

    def decode(layer, x, chunks, cache):
        outs, start = [], 0
        for size in chunks:
            outs.append(layer(x[:, start : start + size], cache=cache))
            start += size
            assert cache.length == start
        return torch.cat(outs, dim=1)

    return decode


@pytest.fixture(scope="session")
def browser_missing():
    """``browser_missing(reason)`` skips a browser test whose prerequisite is missing, or fails
    it under ``ATTNBOOK_REQUIRE_BROWSER=1`` (``make browser-test``, CI), which never skips one."""

    def missing(reason: str):
        if os.environ.get("ATTNBOOK_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (ATTNBOOK_REQUIRE_BROWSER=1)")
        pytest.skip(reason)

    return missing


# Headless, and nothing that phones home: on a machine without a network Chromium's own
# background connections would otherwise be refused, noisily.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium(browser_missing):
    """The system's Chromium (Debian's ``chromium`` package) driven by playwright; playwright's
    own downloaded browsers are never used."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("the playwright package is not installed (pip install -e '.[dev]')")
    executable = shutil.which("chromium")
    if executable is None:
        browser_missing("no chromium on PATH (Debian and Ubuntu: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JupyterLab:
    """A running JupyterLab: ``root`` (its copy of chapters/), ``url``, ``token`` and ``config``
    (its ``JUPYTER_CONFIG_DIR``, which holds the user's settings)."""

    root: Path
    url: str
    token: str
    config: Path

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call of the server's contents API on ``path`` (relative to ``root``)."""
        request = urllib.request.Request(
            f"{self.url}/api/contents/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on a copy of chapters/, started the way ``make book-server`` starts it, so a
    test never changes the repository's notebooks."""
    root = tmp_path / "chapters"
    shutil.copytree(CHAPTERS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    port, token = _free_port(), secrets.token_hex(16)
    config = tmp_path / "config"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    args = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--notebook-dir={root}",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
    ]
    if os.getuid() == 0:
        args.append("--allow-root")
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    lab = JupyterLab(root, f"http://127.0.0.1:{port}", token, config)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                lab.api("GET", "")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"JupyterLab did not start:\n{(tmp_path / 'server.log').read_text()}"
                    )
                time.sleep(0.25)
        yield lab
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
