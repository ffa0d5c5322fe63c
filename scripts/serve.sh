#!/usr/bin/env bash
# Start tritonserver on the minisgl model repository, wait until the model is READY, start the
# OpenAI-compatible frontend (minisgl_backend.openai, when present) on OPENAI_PORT, then keep
# serving in the foreground. SIGINT (Ctrl-C), SIGTERM or SIGHUP stop the server, every engine
# process and the frontend within EXIT_TIMEOUT (+5 s, then SIGKILL); see
# minisgl_backend/triton/supervise.py, which this script becomes (exec).
#
# Environment (the Makefile passes its variables): MODEL (HF folder; empty: build/models/smollm2),
# TP, HTTP_PORT, GRPC_PORT, METRICS_PORT, OPENAI_PORT (default 9000), SETTINGS ("key=value ..."
# config.pbtxt parameters), TRITON_ARGS (more tritonserver flags), READY_TIMEOUT (seconds,
# default 900), EXIT_TIMEOUT (seconds tritonserver may take to stop, default 15).
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
OPENAI_PORT="${OPENAI_PORT:-9000}"; READY_TIMEOUT="${READY_TIMEOUT:-900}"; EXIT_TIMEOUT="${EXIT_TIMEOUT:-15}"

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

# The supervisor stops tritonserver, its stub, the scheduler processes and the OpenAI frontend
# on SIGINT/SIGTERM/SIGHUP (and, through death signals, when it is SIGKILLed itself).
# shellcheck disable=SC2086
exec "$PY" -m minisgl_backend.triton.supervise --model-repository "$REPO" --http-port "$HTTP_PORT" \
  --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --openai-port "$OPENAI_PORT" \
  --exit-timeout "$EXIT_TIMEOUT" --ready-timeout "$READY_TIMEOUT" -- ${TRITON_ARGS:-}
