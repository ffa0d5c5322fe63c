#!/usr/bin/env bash
# Streaming profile of the minisgl model through a real tritonserver with perf_analyzer.
#
# Environment: MODEL (default build/models/smollm2), TP, SETTINGS ("key=value ..."),
# CONCURRENCY (perf_analyzer --concurrency-range, default 1:8:*... see below),
# OUTPUT_LEN (tokens per request, default 64), MEASUREMENT_MS (default 5000).
# Results: build/bench/perf_analyzer.csv and the perf_analyzer report on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
PA="$ROOT/build/perf_analyzer/perf_analyzer"
MODEL="${MODEL:-$ROOT/build/models/smollm2}"
TP="${TP:-1}"; SETTINGS="${SETTINGS:-}"
CONCURRENCY="${CONCURRENCY:-1:8:3}"   # 1, 4, 7
OUTPUT_LEN="${OUTPUT_LEN:-64}"
MEASUREMENT_MS="${MEASUREMENT_MS:-5000}"
OUT="$ROOT/build/bench"
mkdir -p "$OUT"
[ -x "$PA" ] || { echo "bench-triton: $PA missing: run 'make perf-analyzer'" >&2; exit 1; }
[ -d "$MODEL" ] || { echo "bench-triton: MODEL=$MODEL is not a folder ('make model' prepares the default)" >&2; exit 1; }

args=(--set "model_path=$(cd "$MODEL" && pwd)" --set "tp_size=$TP")
for kv in $SETTINGS; do args+=(--set "$kv"); done
REPO="$("$PY" -m minisgl_backend.triton.repository "$OUT/model_repository" "${args[@]}")"
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" -m minisgl_backend.ports 3)

# perf_analyzer input data: every STRING element as a JSON string (perf_analyzer adds the
# 4-byte length prefix itself); optional inputs that are not listed are not sent.
"$PY" - "$OUT/input_data.json" "$OUTPUT_LEN" <<'PYEOF'
import json, sys
prompts = ["Write a short poem about the sea.", "What is the capital of France?",
           "Explain what a KV cache is in one paragraph.", "List three prime numbers.",
           "Tell me a story about a robot who learns to paint.", "How do airplanes fly?",
           "Give me a recipe for pancakes.", "Why is the sky blue?"]
params = json.dumps({"max_tokens": int(sys.argv[2]), "ignore_eos": True, "temperature": 0.0})
data = [{"text_input": [p], "stream": [True], "sampling_parameters": [params]} for p in prompts]
json.dump({"data": data}, open(sys.argv[1], "w"), indent=1)
PYEOF

setsid "$ROOT/scripts/tritonserver" --model-repository "$REPO" --http-port "$HTTP_PORT" \
  --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" > "$OUT/server.log" 2>&1 &
SERVER=$!
stop() {
  trap - INT TERM EXIT
  kill -TERM "$SERVER" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$SERVER" 2>/dev/null || true
}
trap stop INT TERM EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/v2/models/minisgl/ready" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { tail -40 "$OUT/server.log"; echo "bench-triton: server died" >&2; exit 1; }
  sleep 1
done

timeout "${PA_TIMEOUT:-900}" "$PA" -m minisgl -u "127.0.0.1:$GRPC_PORT" -i grpc --streaming \
  --input-data "$OUT/input_data.json" --concurrency-range "$CONCURRENCY" \
  --measurement-interval "$MEASUREMENT_MS" --stability-percentage 999 --max-trials 3 \
  -f "$OUT/perf_analyzer.csv"
echo "bench-triton: report in $OUT/perf_analyzer.csv, server log in $OUT/server.log"
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^minisgl_(generation_tokens_total|requests_total|time_to_first_token_seconds_(sum|count)|time_per_output_token_seconds_(sum|count))' || true
