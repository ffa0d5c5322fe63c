# Sourced by scripts/serve.sh and scripts/serve_cluster.sh: checks MODEL and sets REPO to the
# model repository to serve. With no MODEL/TP/SETTINGS the checked-in model_repository/ is served
# as is (its empty model_path falls back to build/models/smollm2). Otherwise a copy with those
# parameters overridden is written to build/serve/model_repository; config.pbtxt is never edited.
# Needs ROOT, PY, MODEL, TP, SETTINGS and NAME (the caller's name, for messages); LORA_MODULES optional.
if [ -z "$MODEL" ] && [ ! -f "$ROOT/build/models/smollm2/config.json" ]; then
  echo "$NAME: no MODEL given and build/models/smollm2 is missing: run 'make model' first" >&2
  exit 1
fi
if [ -n "$MODEL" ] && [ ! -d "$MODEL" ]; then
  echo "$NAME: MODEL=$MODEL is not a folder" >&2
  exit 1
fi

REPO="$ROOT/model_repository"
LORA_MODULES="${LORA_MODULES:-}"
if [ -n "$MODEL" ] || [ "$TP" != "1" ] || [ -n "$SETTINGS" ] || [ -n "$LORA_MODULES" ]; then
  args=()
  [ -n "$MODEL" ] && args+=(--set "model_path=$(cd "$MODEL" && pwd)")
  args+=(--set "tp_size=$TP")
  for kv in $SETTINGS; do args+=(--set "$kv"); done
  # LORA_MODULES="name=/folder other=/folder": multi_lora.json in the copy, LoRA on
  for kv in $LORA_MODULES; do args+=(--lora "$kv"); done
  REPO="$("$PY" -m minisgl_backend.triton.repository "$ROOT/build/serve/model_repository" "${args[@]}")"
fi

# TOOL_CALL_PARSER: the OpenAI frontends' --tool-call-parser, through their environment; the
# default model's chat template names no tool-call format, so it gets hermes (Qwen's format)
TOOL_CALL_PARSER="${TOOL_CALL_PARSER:-}"
if [ -z "$TOOL_CALL_PARSER" ] && [ -z "$MODEL" ]; then TOOL_CALL_PARSER=hermes; fi
if [ -n "$TOOL_CALL_PARSER" ]; then export MINISGL_TOOL_CALL_PARSER="$TOOL_CALL_PARSER"; fi
