#!/usr/bin/env bash
# One command: set up (.venv), then run the main job, the HTTP service with its embedded
# defaults (SQLite and artifacts under ~/.cache/latprune, an in-process worker, ONNX Runtime on
# this CPU) on http://127.0.0.1:8000. Quickstart (curl): README, or scripts/quickstart.sh.
#   ./run.sh                          # the service (latprune serve)
#   ./run.sh serve --port 9000        # any latprune command instead, e.g.
#   ./run.sh optimize MODEL.onnx --speedup 2 --out DIR
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
if [ $# -eq 0 ]; then
    set -- serve
fi
exec .venv/bin/latprune "$@"
