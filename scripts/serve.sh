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
# default 900), EXIT_TIMEOUT (seconds tritonserver may take to stop, default 15), API_KEY (the
# key every /v1/... request must carry; default $MINISGL_API_KEY, else none).
#
# The model repository: see scripts/model_repository.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
MODEL="${MODEL:-}"; TP="${TP:-1}"; SETTINGS="${SETTINGS:-}"
HTTP_PORT="${HTTP_PORT:-8000}"; GRPC_PORT="${GRPC_PORT:-8001}"; METRICS_PORT="${METRICS_PORT:-8002}"
OPENAI_PORT="${OPENAI_PORT:-9000}"; READY_TIMEOUT="${READY_TIMEOUT:-900}"; EXIT_TIMEOUT="${EXIT_TIMEOUT:-15}"

NAME=serve
# shellcheck source=scripts/model_repository.sh
. "$ROOT/scripts/model_repository.sh"
# API_KEY (make serve API_KEY=...): the OpenAI frontend's --api-key, through its environment
if [ -n "${API_KEY:-}" ]; then export MINISGL_API_KEY="$API_KEY"; fi

# The supervisor stops tritonserver, its stub, the scheduler processes and the OpenAI frontend
# on SIGINT/SIGTERM/SIGHUP (and, through death signals, when it is SIGKILLed itself).
# shellcheck disable=SC2086
exec "$PY" -m minisgl_backend.triton.supervise --model-repository "$REPO" --http-port "$HTTP_PORT" \
  --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --openai-port "$OPENAI_PORT" \
  --exit-timeout "$EXIT_TIMEOUT" --ready-timeout "$READY_TIMEOUT" -- ${TRITON_ARGS:-}
