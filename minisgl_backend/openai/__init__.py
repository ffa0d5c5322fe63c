"""OpenAI-compatible HTTP server in front of tritonserver (`python -m minisgl_backend.openai`).

It speaks only the vLLM-backend tensor contract over gRPC streaming, so it fronts the minisgl
model and a Triton vLLM-backend model alike. Modules, bottom first:

* `errors`: `OpenAIError` and the `{"error": {...}}` body.
* `protocol`: the request models (pydantic); unknown fields are ignored (and logged), declared
  ones asking for what this server does not do are refused by name.
* `chat`: the tokenizer's chat template and the logprob token strings.
* `tokenizer_source`: `--tokenizer`, else the served model's folder (its `model_path`).
* `triton_client`: one OpenAI request -> one gRPC stream (`tritonclient.grpc.aio`).
* `responses`: OpenAI response bodies and stream chunks.
* `gateway`: the endpoints routers and gateways probe (`/get_load`, `/server_info`, `/model_info`)
  and `/metrics` (tritonserver's, with vLLM-named aliases).
* `auth`: `--api-key` on `/v1/...`.
* `app`: the FastAPI routes, server-sent events, cancellation on disconnect.
* `__main__`: command line, uvicorn.
"""
