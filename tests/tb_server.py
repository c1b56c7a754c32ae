"""A real TensorBoard process on localhost for tests: start, wait until ready, always stop."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

NOT_READY = (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_command() -> list[str]:
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tensorboard")
    if found is None:
        pytest.skip("the tensorboard command is not installed")
    return [found]


def get(base: str, path: str, **params: Any) -> tuple[str, str]:
    """Content type and body of a GET."""
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


def get_json(base: str, path: str, **params: Any) -> Any:
    return json.loads(get(base, path, **params)[1])


@contextlib.contextmanager
def serve(
    logdir: Path, ready: Callable[[str], bool], *extra: str, timeout: float = 60
) -> Iterator[str]:
    """Serve ``logdir``; yield the base URL once ``ready(base)`` is true; stop it afterwards."""
    port = free_port()
    base = f"http://localhost:{port}"
    command = [
        *tensorboard_command(),
        "--logdir", str(logdir),
        "--host", "localhost",
        "--port", str(port),
        "--reload_interval", "1",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=logdir
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"tensorboard exited with {proc.returncode}:\n{out}")
            try:
                if ready(base):
                    break
            except NOT_READY:
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard did not serve the run in time")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
