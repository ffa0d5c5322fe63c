"""python -m minisgl_backend.openai: an OpenAI-compatible HTTP server in front of tritonserver.

    python -m minisgl_backend.openai --triton-url 127.0.0.1:8001 --model minisgl --port 9000
    curl localhost:9000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "minisgl", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
"""

from __future__ import annotations

import argparse
import logging
import os

from minisgl_backend.openai.app import ServerSettings, create_app
from minisgl_backend.openai.tool_parsers import TOOL_PARSERS

TOOL_CALL_PARSER_ENV = "MINISGL_TOOL_CALL_PARSER"

API_KEY_ENV = "MINISGL_API_KEY"


def parse_args(argv: list[str] | None = None) -> ServerSettings:
    p = argparse.ArgumentParser(prog="python -m minisgl_backend.openai", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="tritonserver's gRPC address (host:port)")
    p.add_argument("--model", default="minisgl", help="the Triton model to serve; also the name /v1/models lists")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder holding the chat template (default: the served model's folder, "
                        "from the Triton model's model_path parameter)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template overriding the "
                                                                          "tokenizer's")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--default-max-tokens", type=int, default=None, metavar="N",
                   help="max_tokens of requests that set none (default: until the context ends, as OpenAI; "
                        "a Triton vLLM-backend model needs a number here)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1/... request (401 otherwise); /health, "
                        f"/metrics and the router probes stay open (default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--metrics-url", default=None, metavar="URL",
                   help="tritonserver's metrics endpoint, served on /metrics with vLLM-named aliases and read "
                        "for /get_load (default: http://<the --triton-url host>:8002/metrics)")
    p.add_argument("--tool-call-parser", default=os.environ.get(TOOL_CALL_PARSER_ENV) or None,
                   choices=sorted(TOOL_PARSERS),
                   help="the model's tool-call format (default: $MINISGL_TOOL_CALL_PARSER, else picked from its "
                        "chat template when that is unambiguous)")
    args = p.parse_args(argv)
    return ServerSettings(triton_url=args.triton_url, model=args.model, tokenizer=args.tokenizer,
                          chat_template=args.chat_template, host=args.host, port=args.port,
                          default_max_tokens=args.default_max_tokens, api_key=args.api_key,
                          metrics_url=args.metrics_url, tool_call_parser=args.tool_call_parser)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[minisgl-openai] %(levelname)s %(message)s")
    # uvloop (grpc.aio runs on it through add_reader) and httptools: the event loop and the HTTP
    # parser in C; uvicorn falls back to asyncio / h11 where they are not installed. Idle
    # keep-alive connections live longer than clients keep them, so a client never reuses a
    # connection the server is closing at that moment (a ReadError on the next request).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, loop="auto", http="auto",
                log_level="warning", timeout_keep_alive=30, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
