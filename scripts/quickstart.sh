#!/usr/bin/env bash
# The README's curl quickstart, runnable: upload a model, submit a 0.6x latency budget job
# (speedup 1/0.6), wait for it, download the pruned model and its report.
#   scripts/quickstart.sh [MODEL.onnx] [OUT_DIR]
# Needs a running service (./run.sh) and a token: TOKEN=$(.venv/bin/latprune token create me)
# Env: API (default http://127.0.0.1:8000), TOKEN (required).
set -euo pipefail
API=${API:-http://127.0.0.1:8000}
: "${TOKEN:?set TOKEN: TOKEN=\$(.venv/bin/latprune token create me)}"
MODEL=${1:-}
OUT=${2:-quickstart-out}
if [ -z "$MODEL" ]; then
    MODEL=$OUT/demo.onnx
    mkdir -p "$OUT"
    "$(dirname "$0")/../.venv/bin/latprune" demo-model "$MODEL" >/dev/null
fi
mkdir -p "$OUT"
AUTH="Authorization: Bearer $TOKEN"
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

# 1. upload the model (the body is the file; streamed to disk, checked and summarised)
MODEL_ID=$(curl -sf -H "$AUTH" -H 'Content-Type: application/octet-stream' \
    --data-binary @"$MODEL" "$API/v1/models?name=$(basename "$MODEL")" | field '["id"]')
echo "model $MODEL_ID"

# 2. a job: prune to 0.6x of the dense latency measured on the service's CPU
JOB_ID=$(curl -sf -H "$AUTH" -H 'Content-Type: application/json' \
    -d "{\"model_id\": \"$MODEL_ID\", \"speedup\": 1.6667}" "$API/v1/jobs" | field '["id"]')
echo "job $JOB_ID"

# 3. poll its state, stage and progress
while :; do
    STATUS=$(curl -sf -H "$AUTH" "$API/v1/jobs/$JOB_ID")
    STATE=$(echo "$STATUS" | field '["state"]')
    echo "  $STATE: $(echo "$STATUS" | field '["stage"]')"
    case $STATE in succeeded) break ;; failed|cancelled) echo "$STATUS" >&2; exit 1 ;; esac
    sleep 2
done

# 4. download the artifacts
for name in pruned.onnx plan.json report.json report.html; do
    curl -sf -H "$AUTH" -o "$OUT/$name" "$API/v1/jobs/$JOB_ID/artifacts/$name"
done
python3 - "$OUT/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"dense {r['dense_ms']:.3f} ms, budget {r['budget_ms']:.3f} ms, predicted {r['predicted_ms']:.3f} ms, "
      f"measured {r['measured_ms']:.3f} ms: {'meets' if r['meets_budget'] else 'MISSES'} the budget")
PY
