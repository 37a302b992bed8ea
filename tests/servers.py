"""Session fixtures for real PostgreSQL and Redis servers (scripts/servers.sh).

`postgres_url` yields a SQLAlchemy URL (``postgresql+psycopg://USER@127.0.0.1:PORT/latprune``)
and `redis_url` a Redis URL (``redis://127.0.0.1:PORT/0``); each server is private to the test
session (free port, fresh directory, 127.0.0.1 only) and stopped when the session ends. When the
binaries are missing (and `servers.sh install` could not add them) or a server does not start,
the tests using the fixture skip with the script's stderr in the reason.

tests/conftest.py imports the fixtures, so every test can request them.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "servers.sh"

# What the session's fixtures started: name -> (directory, port); for tests of the script itself.
STARTED: dict[str, tuple[Path, int]] = {}

_install_note: str | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run scripts/servers.sh with `args`; never raises on a non-zero exit status."""
    try:
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return subprocess.CompletedProcess(e.cmd, 124, text(e.stdout),
                                           text(e.stderr) + f"\n(timed out after {timeout} s)")


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _ensure_installed() -> str:
    """`servers.sh install` once per session (a fast no-op when installed); its stderr."""
    global _install_note
    if _install_note is None:
        r = run_script("install", timeout=900)
        _install_note = _tail(r.stderr + (f"\n(install exited {r.returncode})" if r.returncode else ""))
    return _install_note


def _start(kind: str, directory: Path, port: int) -> str:
    note = _ensure_installed()
    r = run_script(f"start-{kind}", str(directory), str(port))
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        reason = f"{kind} test server unavailable (servers.sh start-{kind} exited {r.returncode})"
        detail = "\n".join(t for t in (note, _tail(r.stderr)) if t)
        pytest.skip(f"{reason}: {detail}" if detail else reason)
    return lines[-1]


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of a throw-away PostgreSQL server with an empty database `latprune`."""
    # As root, PostgreSQL runs as another user, who cannot enter pytest's private
    # /tmp/pytest-of-root: its directory lies directly in the system temp directory instead.
    directory = Path(tempfile.mkdtemp(prefix="latprune-pg-"))
    port = free_port()
    try:
        url = _start("postgres", directory, port)
    except BaseException:
        run_script("stop-postgres", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
        raise
    STARTED["postgres"] = (directory, port)
    try:
        yield url
    finally:
        STARTED.pop("postgres", None)
        r = run_script("stop-postgres", str(directory))
        if r.returncode == 0:
            shutil.rmtree(directory, ignore_errors=True)
        else:  # keep the logs of a server that would not stop
            print(f"servers.sh stop-postgres {directory} failed:\n{_tail(r.stderr)}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a throw-away Redis server (database 0, no persistence)."""
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    try:
        url = _start("redis", directory, port)
    except BaseException:
        run_script("stop-redis", str(port))
        raise
    STARTED["redis"] = (directory, port)
    try:
        yield url
    finally:
        STARTED.pop("redis", None)
        r = run_script("stop-redis", str(port))
        if r.returncode != 0:
            print(f"servers.sh stop-redis {port} failed:\n{_tail(r.stderr)}")


__all__ = ["free_port", "postgres_url", "redis_url", "run_script", "STARTED", "SCRIPT"]
