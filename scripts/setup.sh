#!/usr/bin/env bash
# Create .venv and install latprune with its test dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import latprune, onnxruntime, highspy, typer, pytest" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    touch .venv/.installed
fi
# PyTorch is optional for the tool (gradient-based importance, Fisher distortion); the tests
# of those paths need it. 2.13.0 is the CPU build that lies on this kind of machine's disk;
# an already installed torch (e.g. the benches' 2.14.1) is kept.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0" || echo "setup: torch not installed; its tests will skip" >&2
fi
# MindtPy's NLP subsolver (cyipopt against Debian's Ipopt) for the MINLP's Outer Approximation;
# exits 0 with a message where it cannot install, and the MindtPy tests then skip.
scripts/install_ipopt.sh
# The service tests need PostgreSQL and Redis (throw-away servers that tests/servers.py starts);
# exits 0 with a message where it cannot install, and those tests then skip.
scripts/servers.sh install || true
