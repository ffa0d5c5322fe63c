"""OpenAI-compatible HTTP server in front of tritonserver (`python -m minisgl_backend.openai`).

It speaks only the vLLM-backend tensor contract over gRPC streaming, so it fronts the minisgl
model and a Triton vLLM-backend model alike. Modules, bottom first:

* `errors`: `OpenAIError` and the `{"error": {...}}` body.
* `protocol`: the request models (pydantic); unsupported fields are refused by name.
* `chat`: the tokenizer's chat template and the logprob token strings.
* `tokenizer_source`: `--tokenizer`, else the served model's folder (its `model_path`).
* `triton_client`: one OpenAI request -> one gRPC stream (`tritonclient.grpc.aio`).
* `responses`: OpenAI response bodies and stream chunks.
* `app`: the FastAPI routes, server-sent events, cancellation on disconnect.
* `__main__`: command line, uvicorn.
"""
