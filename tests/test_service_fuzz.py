"""Schemathesis fuzzes the whole OpenAPI schema of a real server (uvicorn, through HTTP) with
valid and invalid inputs, as a user and as an agent: no request may get a 5xx."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service_server import Server

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


# The user's run is in the default suite. The agent's run (the device farm's upload routes
# behind an agent token; a user token stops at their 403) is opt-in (-m slow): 80 s.
@pytest.mark.parametrize("role", ["user", pytest.param("agent", marks=pytest.mark.slow)])
def test_schemathesis_finds_no_server_error(tmp_path, role):
    if not SCHEMATHESIS.exists():
        pytest.skip("schemathesis is not installed (pip install 'latprune[test]')")
    srv = Server(tmp_path, LATPRUNE_JOBS_PER_MINUTE="1000").start()
    try:
        token = srv.token("fuzz", role=role)
        proc = subprocess.run(
            [str(SCHEMATHESIS), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
             "--header", f"Authorization: Bearer {token}", "--max-examples", "15", "--workers", "1",
             "--phases", "examples,coverage,fuzzing", "--seed", "1", "--generation-database", "none", "--no-color"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
        tail = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0, tail
        assert "Server error" not in proc.stdout, tail
        counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
        assert counts and int(counts[1]) > 100 and counts[1] == counts[2], tail
    finally:
        srv.stop()
