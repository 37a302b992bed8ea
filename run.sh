#!/usr/bin/env bash
# One command: set up, then prune a model to a latency budget on this CPU.
#   ./run.sh                                  # demo: build a small CNN, prune it to 1.5x faster
#   ./run.sh MODEL.onnx --speedup 2 --out DIR # any `latprune optimize` arguments
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
if [ $# -eq 0 ]; then
    .venv/bin/latprune demo-model runs/demo.onnx >/dev/null
    set -- runs/demo.onnx --speedup 1.5 --out runs/demo --lut runs/lut.sqlite
fi
exec .venv/bin/latprune optimize "$@"
