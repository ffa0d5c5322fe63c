#!/usr/bin/env bash
# perf_analyzer streaming profile of the minisgl model (gRPC, decoupled).
#   client_examples/perf_analyzer.sh [GRPC_HOST:PORT] [CONCURRENCY_RANGE] [MAX_TOKENS]
#
# perf_analyzer: `make perf-analyzer` installs a working one in build/perf_analyzer (the
# tritonclient 2.41.0 wheel's binary; tritonclient[all] 2.73 ships none). In the NGC
# "tritonserver:<yy.mm>-py3-sdk" image it is on the PATH.
#
# Input data: one JSON object per request; every STRING value is a plain JSON string inside a
# list (["..."]) and perf_analyzer adds the 4-byte length prefix itself. Do not pass text as
# {"b64": ...}: b64 content is taken as the raw serialized tensor, which for STRING must already
# hold the length prefixes (Triton refuses it otherwise). Optional inputs that are not listed are
# not sent; "--shared-memory system" does not work with optional inputs (perf_analyzer's limit).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL="${1:-localhost:8001}"
CONCURRENCY="${2:-1:8:3}"
MAX_TOKENS="${3:-64}"
PA="${PERF_ANALYZER:-$ROOT/build/perf_analyzer/perf_analyzer}"
command -v "$PA" >/dev/null 2>&1 || PA=perf_analyzer
DATA="$(mktemp -t minisgl-pa-XXXX.json)"
trap 'rm -f "$DATA"' EXIT
python3 - "$DATA" "$MAX_TOKENS" <<'PYEOF'
import json, sys
params = json.dumps({"max_tokens": int(sys.argv[2]), "ignore_eos": True})
prompts = ["What is the capital of France?", "Write a haiku about autumn.", "Explain recursion briefly.",
           "Name three colours of the rainbow."]
json.dump({"data": [{"text_input": [p], "stream": [True], "sampling_parameters": [params]} for p in prompts]},
          open(sys.argv[1], "w"))
PYEOF
exec "$PA" -m minisgl -u "$URL" -i grpc --streaming --input-data "$DATA" \
  --concurrency-range "$CONCURRENCY" --measurement-interval 5000 --stability-percentage 999 --max-trials 3
