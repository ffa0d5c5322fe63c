#!/usr/bin/env bash
# curl recipes for Triton's generate extension on the minisgl model.
#   client_examples/http_generate.sh [HOST:PORT] [PROMPT]
#
# text_input is a RAW prompt: the model continues exactly that text. An instruct/chat model
# (the default SmolLM2-135M-Instruct) answers a question only inside its chat template, so this
# script renders the prompt with the tokenizer's own template first (CHAT=1, the default;
# TOKENIZER=folder, default build/models/smollm2). CHAT=0 sends the prompt as is.
# For chat without templating by hand, use the OpenAI API (make serve, port 9000):
#   curl localhost:9000/v1/chat/completions -H 'Content-Type: application/json' \
#     -d '{"model": "minisgl", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL="${1:-localhost:8000}"
PROMPT="${2:-What is the capital of France?}"
MODEL="${MODEL_NAME:-minisgl}"
CHAT="${CHAT:-1}"
TOKENIZER="${TOKENIZER:-$ROOT/build/models/smollm2}"
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3

if [ "$CHAT" = "1" ]; then
  echo "== the prompt rendered with the chat template of $TOKENIZER (CHAT=0 sends it raw)"
  BODY_PROMPT=$(printf '%s' "$PROMPT" | "$PY" -c '
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
text = tok.apply_chat_template([{"role": "user", "content": sys.stdin.read()}], tokenize=False,
                               add_generation_prompt=True)
print(json.dumps(text))' "$TOKENIZER")
else
  echo "== raw prompt (CHAT=0): the model continues the text; an instruct model may stop at once"
  BODY_PROMPT=$(printf '%s' "$PROMPT" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')
fi
echo "text_input: $BODY_PROMPT"
echo

echo "== /generate: one response with the whole text (prompt included unless excluded)"
curl -sS -X POST "http://$URL/v2/models/$MODEL/generate" \
  -d "{\"text_input\": $BODY_PROMPT, \"exclude_input_in_output\": true,
       \"return_finish_reason\": true, \"return_num_output_tokens\": true,
       \"parameters\": {\"max_tokens\": 32, \"temperature\": 0}}"
echo

echo "== /generate with sampling_parameters JSON (vLLM-backend style)"
curl -sS -X POST "http://$URL/v2/models/$MODEL/generate" \
  -d "{\"text_input\": $BODY_PROMPT, \"exclude_input_in_output\": true,
       \"sampling_parameters\": \"{\\\"max_tokens\\\": 32, \\\"temperature\\\": 0.7, \\\"top_p\\\": 0.9, \\\"seed\\\": 1}\"}"
echo

echo "== /generate_stream: server-sent events, one per piece of text"
curl -sS -N -X POST "http://$URL/v2/models/$MODEL/generate_stream" \
  -d "{\"text_input\": $BODY_PROMPT, \"stream\": true, \"parameters\": {\"max_tokens\": 32, \"temperature\": 0}}"

echo "== a bad request: HTTP 400 (INVALID_ARG) with an actionable message"
curl -sS -X POST "http://$URL/v2/models/$MODEL/generate" \
  -d "{\"text_input\": $BODY_PROMPT, \"sampling_parameters\": \"{\\\"temperature\\\": -1}\"}"
echo
