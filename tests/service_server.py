"""A real `latprune serve` (uvicorn) in a subprocess, for end-to-end and fuzz tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
LATPRUNE = str(Path(sys.executable).parent / "latprune")


class Server:
    """`latprune serve` on a free port with its own LATPRUNE_HOME."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LATPRUNE_")}
        self.env.update(LATPRUNE_HOME=str(home), LATPRUNE_HEARTBEAT_S="0.5", **env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        log = open(self.home / f"serve-{time.time():.0f}.log", "ab")
        self.proc = subprocess.Popen([LATPRUNE, "serve", "--port", str(self.port), "--log-level", "warning"],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: see {log.name}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("the service did not become ready in 60 s")

    def token(self, user: str, role: str = "user") -> str:
        out = subprocess.run([LATPRUNE, "token", "create", user, "--role", role], env=self.env, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
