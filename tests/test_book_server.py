"""Saving a chapter from JupyterLab, as ``make book`` starts it, updates the chapter's ``.py`` pair.

``make book`` roots the server at ``chapters/``: jupytext only reads a configuration file found
between the notebook's folder and that root, so the pairing must live inside ``chapters/``.
The test copies the chapters folder, starts JupyterLab on the copy, saves two notebooks (one in
a subfolder) through the server's contents API, and reads their ``.py`` files.
"""

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
from pathlib import Path

import pytest

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
SAVED = ["01_buggy_sketch.ipynb", "solutions/02_scaled_dot_product_attention_solutions.ipynb"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """JupyterLab on a copy of chapters/, started the way `make book` starts it."""
    root = tmp_path / "chapters"
    shutil.copytree(CHAPTERS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
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

    def call(method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/contents/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                call("GET", "")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"JupyterLab did not start:\n{(tmp_path / 'server.log').read_text()}"
                    )
                time.sleep(0.25)
        yield root, call
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("name", SAVED)
def test_saving_a_notebook_in_jupyterlab_updates_its_py(server, name):
    root, call = server
    py = (root / name).with_suffix(".py")
    before = py.read_text()
    model = call("GET", f"{name}?content=1&type=notebook")
    marker = f"Edited in JupyterLab {secrets.token_hex(4)}"
    markdown = next(c for c in model["content"]["cells"] if c["cell_type"] == "markdown")
    markdown["source"] += f"\n\n{marker}"
    call("PUT", name, {"type": "notebook", "format": "json", "content": model["content"]})
    after = py.read_text()
    assert marker in after, f"{py.name} was not updated when {name} was saved"
    assert after.replace(f"#\n# {marker}\n", "") == before  # only the edit, in py:percent form
