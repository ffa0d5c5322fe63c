#!/usr/bin/env bash
# genai-perf against the minisgl model, through its vLLM-compatible tensor contract.
#   client_examples/genai_perf.sh [GRPC_HOST:PORT] [TOKENIZER_DIR] [CONCURRENCY]
#
# Install genai-perf in its own environment (it pulls ~1 GB of dependencies, no torch):
#   python3 -m venv build/genai-perf && build/genai-perf/bin/pip install genai-perf==0.0.16
# It runs perf_analyzer underneath and needs 2.60 (2.41's profile export lacks service_kind and
# the response outputs): `make perf-analyzer-260` installs one in build/perf_analyzer260
# (scripts/setup_perf_analyzer_260.sh: the 2.60 wheel patched onto Debian trixie's libc).
# Without network access genai-perf needs a local tokenizer folder: the served model's folder
# (build/models/smollm2 for `make serve`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL="${1:-localhost:8001}"
TOKENIZER="${2:-$ROOT/build/models/smollm2}"
CONCURRENCY="${3:-4}"
GENAI_PERF="${GENAI_PERF:-$ROOT/build/genai-perf/bin/genai-perf}"
command -v "$GENAI_PERF" >/dev/null 2>&1 || GENAI_PERF=genai-perf
export PATH="$ROOT/build/perf_analyzer260:$PATH"  # perf_analyzer 2.60: make perf-analyzer-260
exec "$GENAI_PERF" profile -m minisgl --endpoint-type kserve --backend vllm -u "$URL" --streaming \
  --tokenizer "$TOKENIZER" --synthetic-input-tokens-mean 128 --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean 64 --extra-inputs max_tokens:64 --extra-inputs ignore_eos:true \
  --concurrency "$CONCURRENCY" --measurement-interval "${MEASUREMENT_MS:-10000}" --artifact-dir "$ROOT/build/genai-perf-artifacts"
