#!/usr/bin/env bash
# REPLICAS copies of the server (tritonserver + the OpenAI frontend each) behind sglang-router
# (the SGLang Model Gateway), in the foreground; see minisgl_backend/cluster.py, which this
# script becomes (exec). Usable without make:
#
#   REPLICAS=3 POLICY=cache_aware MODEL=/path/to/hf/folder scripts/serve_cluster.sh
#
# Environment (the Makefile passes its variables): REPLICAS (default 3), POLICY (cache_aware,
# round_robin, power_of_two, random, manual), ROUTER_PORT (default 30000), ROUTER_METRICS_PORT
# (the router's Prometheus port, default 29000), HEALTH_INTERVAL (seconds between the router's
# health checks, default 3), ROUTER_ARGS (more sglang-router flags), API_KEY (the key every
# /v1/... request must carry: every replica checks it, the router forwards it; default $MINISGL_API_KEY),
# CLUSTER_LOG_DIR (default build/cluster), MAX_RESTARTS (per replica, default 3); and as for
# scripts/serve.sh: MODEL, TP, SETTINGS, TRITON_ARGS, READY_TIMEOUT, EXIT_TIMEOUT, and the ports of
# replica 0 (HTTP_PORT, GRPC_PORT, METRICS_PORT: replica i adds 10 i; OPENAI_PORT: replica i adds i).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
MODEL="${MODEL:-}"; TP="${TP:-1}"; SETTINGS="${SETTINGS:-}"
HTTP_PORT="${HTTP_PORT:-8000}"; GRPC_PORT="${GRPC_PORT:-8001}"; METRICS_PORT="${METRICS_PORT:-8002}"
OPENAI_PORT="${OPENAI_PORT:-9000}"; READY_TIMEOUT="${READY_TIMEOUT:-900}"; EXIT_TIMEOUT="${EXIT_TIMEOUT:-15}"
REPLICAS="${REPLICAS:-3}"; POLICY="${POLICY:-cache_aware}"; ROUTER_PORT="${ROUTER_PORT:-30000}"
ROUTER_METRICS_PORT="${ROUTER_METRICS_PORT:-29000}"; HEALTH_INTERVAL="${HEALTH_INTERVAL:-3}"
CLUSTER_LOG_DIR="${CLUSTER_LOG_DIR:-$ROOT/build/cluster}"; MAX_RESTARTS="${MAX_RESTARTS:-3}"

NAME=serve-cluster
# shellcheck source=scripts/model_repository.sh
. "$ROOT/scripts/model_repository.sh"
# API_KEY (make serve-cluster API_KEY=...): the frontends' key, through the environment
if [ -n "${API_KEY:-}" ]; then export MINISGL_API_KEY="$API_KEY"; fi

# shellcheck disable=SC2086
exec "$PY" -m minisgl_backend.cluster --model-repository "$REPO" --replicas "$REPLICAS" --policy "$POLICY" \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --openai-port "$OPENAI_PORT" \
  --router-port "$ROUTER_PORT" --router-metrics-port "$ROUTER_METRICS_PORT" --health-check-interval "$HEALTH_INTERVAL" \
  --router-args "${ROUTER_ARGS:-}" --log-dir "$CLUSTER_LOG_DIR" --max-restarts "$MAX_RESTARTS" \
  --exit-timeout "$EXIT_TIMEOUT" --ready-timeout "$READY_TIMEOUT" -- ${TRITON_ARGS:-}
