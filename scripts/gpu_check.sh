#!/usr/bin/env bash
# GPU acceptance of the TensorRT backend (issue 13), under 10 minutes on one GPU:
# the GPU backends' status, ResNet-50 pruned to 0.5x of its TensorRT FP16 latency, the engine
# artifact re-measured side by side, and a 5-configuration table-fidelity check.
# Needs an NVIDIA GPU with its driver, and tensorrt + pycuda importable (pip install tensorrt
# pycuda, or the wheels carried to the machine); torch + torchvision only to export ResNet-50
# (or pass --model FILE.onnx). Prints a table; writes bench/out/gpu/gpu_check.json.
#   scripts/gpu_check.sh [--model resnet50.onnx]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
"$PY" -c "import latprune" 2>/dev/null || "$PY" -m pip install -q -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "gpu_check: no NVIDIA GPU here" >&2; exit 2; }
exec timeout 590 "$PY" bench/gpu_check.py "$@"
