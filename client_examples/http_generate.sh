#!/usr/bin/env bash
# curl recipes for Triton's generate extension on the minisgl model.
#   client_examples/http_generate.sh [HOST:PORT] [PROMPT]
set -euo pipefail
URL="${1:-localhost:8000}"
PROMPT="${2:-What is the capital of France?}"
MODEL="${MODEL_NAME:-minisgl}"
BODY_PROMPT=$(printf '%s' "$PROMPT" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')

echo "== /generate: one response with the whole text (prompt included unless excluded)"
curl -sS -X POST "http://$URL/v2/models/$MODEL/generate" \
  -d "{\"text_input\": $BODY_PROMPT, \"exclude_input_in_output\": true,
       \"return_finish_reason\": true, \"return_num_output_tokens\": true,
       \"parameters\": {\"max_tokens\": 32, \"temperature\": 0}}"
echo

echo "== /generate with sampling_parameters JSON (vLLM-backend style)"
curl -sS -X POST "http://$URL/v2/models/$MODEL/generate" \
  -d "{\"text_input\": $BODY_PROMPT, \"sampling_parameters\": \"{\\\"max_tokens\\\": 32, \\\"temperature\\\": 0.7, \\\"top_p\\\": 0.9, \\\"seed\\\": 1}\"}"
echo

echo "== /generate_stream: server-sent events, one per piece of text"
curl -sS -N -X POST "http://$URL/v2/models/$MODEL/generate_stream" \
  -d "{\"text_input\": $BODY_PROMPT, \"stream\": true, \"parameters\": {\"max_tokens\": 32, \"temperature\": 0}}"

echo "== a bad request: HTTP 400 (INVALID_ARG) with an actionable message"
curl -sS -X POST "http://$URL/v2/models/$MODEL/generate" \
  -d "{\"text_input\": $BODY_PROMPT, \"sampling_parameters\": \"{\\\"temperature\\\": -1}\"}"
echo
