#!/usr/bin/env bash
# One command: set up, then run the default (fast) test suite. Slow tests: ./test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
# pytest exits 5 when it collects no test: that fails this script (set -e), never passes.
exec .venv/bin/python -m pytest -q "$@"
