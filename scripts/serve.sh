#!/usr/bin/env bash
# Start tritonserver on the minisgl model repository and wait until the model is READY, then
# keep serving in the foreground (Ctrl-C stops the server and every engine process).
#
# Environment (the Makefile passes its variables): MODEL (HF folder; empty: build/models/smollm2),
# TP, HTTP_PORT, GRPC_PORT, METRICS_PORT, SETTINGS ("key=value ..." config.pbtxt parameters),
# TRITON_ARGS (more tritonserver flags), READY_TIMEOUT (seconds, default 900).
#
# With no MODEL/TP/SETTINGS the checked-in model_repository/ is served as is (its empty
# model_path falls back to build/models/smollm2). Otherwise a copy with those parameters
# overridden is written to build/serve/model_repository; config.pbtxt is never edited.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
MODEL="${MODEL:-}"; TP="${TP:-1}"; SETTINGS="${SETTINGS:-}"
HTTP_PORT="${HTTP_PORT:-8000}"; GRPC_PORT="${GRPC_PORT:-8001}"; METRICS_PORT="${METRICS_PORT:-8002}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"

if [ -z "$MODEL" ] && [ ! -f build/models/smollm2/config.json ]; then
  echo "serve: no MODEL given and build/models/smollm2 is missing: run 'make model' first" >&2
  exit 1
fi
if [ -n "$MODEL" ] && [ ! -d "$MODEL" ]; then
  echo "serve: MODEL=$MODEL is not a folder" >&2
  exit 1
fi

REPO="$ROOT/model_repository"
if [ -n "$MODEL" ] || [ "$TP" != "1" ] || [ -n "$SETTINGS" ]; then
  args=()
  [ -n "$MODEL" ] && args+=(--set "model_path=$(cd "$MODEL" && pwd)")
  args+=(--set "tp_size=$TP")
  for kv in $SETTINGS; do args+=(--set "$kv"); done
  REPO="$("$PY" -m minisgl_backend.triton.repository "$ROOT/build/serve/model_repository" "${args[@]}")"
fi

echo "serve: tritonserver --model-repository $REPO (http $HTTP_PORT, grpc $GRPC_PORT, metrics $METRICS_PORT)"
# own process group: the stub and the scheduler processes go down with the server
# explicit model control: if an engine process dies, the model unloads itself and readiness says so
setsid "$ROOT/scripts/tritonserver" --model-repository "$REPO" --http-port "$HTTP_PORT" \
  --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
  --model-control-mode=explicit --load-model=minisgl ${TRITON_ARGS:-} &
SERVER=$!
stop() {
  trap - INT TERM EXIT
  if kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
  fi
  kill -KILL -- "-$SERVER" 2>/dev/null || true
}
trap stop INT TERM EXIT

deadline=$((SECONDS + READY_TIMEOUT))
until curl -sf "http://127.0.0.1:$HTTP_PORT/v2/models/minisgl/ready" >/dev/null 2>&1; do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "serve: tritonserver exited before the model was ready" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "serve: model not ready after ${READY_TIMEOUT}s" >&2
    exit 1
  fi
  sleep 1
done
echo "serve: READY  curl -X POST localhost:$HTTP_PORT/v2/models/minisgl/generate -d '{\"text_input\":\"Hi\",\"parameters\":{\"max_tokens\":16}}'"
wait "$SERVER"
