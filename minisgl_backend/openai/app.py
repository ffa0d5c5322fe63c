"""The FastAPI application: routes, server-sent events, errors, cancellation on disconnect."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from minisgl_backend.openai.auth import ApiKeyMiddleware
from minisgl_backend.openai.chat import ChatRenderer
from minisgl_backend.openai.choices import ChoiceRequest, choice_requests, run_choices
from minisgl_backend.openai.errors import OpenAIError, invalid, not_ready, server_error
from minisgl_backend.openai.gateway import GatewayRoutes, TritonMetrics, default_metrics_url
from minisgl_backend.openai.lora import LoraModels
from minisgl_backend.openai.protocol import ChatCompletionRequest, CompletionRequest
from minisgl_backend.openai.responses import ChatShape, ChoiceBuilder, CompletionShape, Echo, StreamEvents
from minisgl_backend.openai.streaming import SSEResponse, sse_body, sse_choices
from minisgl_backend.openai.tokenizer_source import TokenizerSource
from minisgl_backend.openai.tool_grammar import ToolRequest, tool_constraint, validate_tools
from minisgl_backend.openai.tool_parsers import TOOL_PARSERS, make_tool_parser, parser_for_template
from minisgl_backend.openai.triton_client import (GenerateRequest, Piece, TritonGenerateClient, TritonRequestError,
                                                  TritonUnreachable)

logger = logging.getLogger("minisgl.openai")

# The engine caps max_tokens at the end of the context (finish_reason "length"), so "until the
# context ends" (OpenAI's default) is the largest value the contract's INT32 takes.
UNTIL_CONTEXT_ENDS = 2**31 - 1

# Triton's gRPC stream errors carry a message but no status code: messages of failures that
# are the server's, not the request's (the rest of what fails before any token is a 400).
_UNAVAILABLE = re.compile(r"overloaded|engine failure|engine is not running|being unloaded|unknown model|"
                          r"not ready|not found|unavailable", re.IGNORECASE)
_INTERNAL = re.compile(r"^(\[request id: [^\]]*\] )?\w+(Error|Exception): ")
_NAMED_FIELD = re.compile(r"(?:sampling )?parameter '(\w+)'")
_PROMPT_WORDS = re.compile(r"input_ids|text_input|prompt|token id", re.IGNORECASE)

T = TypeVar("T")


@dataclass
class ServerSettings:
    triton_url: str = "127.0.0.1:8001"
    model: str = "minisgl"  # the Triton model name, also the name /v1/models lists
    tokenizer: str | None = None  # folder; None: the served model's folder (model_path)
    chat_template: str | None = None  # a Jinja file overriding the tokenizer's template
    host: str = "0.0.0.0"
    port: int = 9000
    default_max_tokens: int | None = None  # None: until the context ends
    api_key: str | None = None  # set: /v1/... requests need "Authorization: Bearer <api_key>"
    metrics_url: str | None = None  # tritonserver's metrics endpoint; None: the Triton host, port 8002
    tool_call_parser: str | None = None  # one of TOOL_PARSERS; None: picked from the chat template

    def __repr__(self) -> str:  # never the key in logs or tracebacks
        fields = {k: ("***" if k == "api_key" and v else v) for k, v in self.__dict__.items()}
        return f"ServerSettings({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


def create_app(settings: ServerSettings, client: TritonGenerateClient | None = None,
               tokenizers: TokenizerSource | None = None) -> FastAPI:
    client = client or TritonGenerateClient(settings.triton_url, settings.model)
    tokenizers = tokenizers or TokenizerSource(client, settings.tokenizer, settings.chat_template)
    routes = Routes(settings, client, tokenizers)
    metrics = TritonMetrics(settings.metrics_url or default_metrics_url(settings.triton_url))
    gateway = GatewayRoutes(settings.model, settings.triton_url, client, tokenizers, metrics,
                            api_key_required=bool(settings.api_key))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await tokenizers.try_load()  # a Triton that is not up yet is fine: loaded on first use
        yield
        await client.close()

    app = FastAPI(title="minisgl OpenAI-compatible API", lifespan=lifespan)
    _install_error_handlers(app)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/completions")(routes.completions)
    app.get("/v1/models")(routes.list_models)
    app.get("/v1/models/{name:path}")(routes.get_model)
    app.post("/v1/load_lora_adapter")(routes.loras.load)
    app.post("/v1/unload_lora_adapter")(routes.loras.unload)
    app.get("/health")(routes.health)
    # for routers and gateways (open, like /health): SGLang's worker probes and the metrics
    app.get("/metrics")(gateway.prometheus)
    app.get("/get_load")(gateway.get_load)
    for path in ("/server_info", "/get_server_info"):
        app.get(path)(gateway.server_info)
    for path in ("/model_info", "/get_model_info"):
        app.get(path)(gateway.model_info)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    return app


class Routes:
    def __init__(self, settings: ServerSettings, client: TritonGenerateClient, tokenizers: TokenizerSource) -> None:
        self.settings = settings
        self.client = client
        self.tokenizers = tokenizers
        self.started = int(time.time())
        self.loras = LoraModels(client, settings.model)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        adapter = await self._check(body, request)
        renderer = await self.tokenizers.renderer()
        tools = validate_tools(body.tools, body.tool_choice)
        parser = self._tool_parser(tools, renderer)
        sampling = body.sampling_parameters(self._max_tokens(body), adapter)
        constraint = tool_constraint(tools, body.parallel_tool_calls, parser) if parser else None
        if constraint is not None:
            if body.has_own_constraint():
                raise invalid("a forced or strict tool call cannot be combined with response_format / "
                              "structured_outputs", "tool_choice")
            sampling["structured_outputs"] = constraint
        prompt = renderer.render(body.messages, tools=body.tools if tools.tools else None, **body.template_switches())
        gen = GenerateRequest(prompt, sampling, stream=body.stream or body.logprobs, logprobs=body.logprobs)
        choices = choice_requests([gen], body.num_choices)
        builders = [ChoiceBuilder(renderer.token_strings, body.logprobs, c.index, c.prompt_index,
                                  top_k=body.top_logprobs or 0,
                                  tool_parser=make_tool_parser(parser) if parser and tools.parses_calls else None)
                    for c in choices]
        return await self._run(request, body, ChatShape(adapter or self.settings.model), choices, builders, "messages")

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        adapter = await self._check(body, request)
        want_logprobs = body.logprobs is not None
        renderer = await self.tokenizers.renderer() if want_logprobs or body.echo else None
        prompts = body.prompts()
        sampling = body.sampling_parameters(max(self._max_tokens(body), 1), adapter)  # max_tokens 0: echo only
        if body.echo and want_logprobs:
            sampling["prompt_logprobs"] = body.logprobs
        gens = [GenerateRequest(p, sampling, stream=body.stream or want_logprobs, logprobs=want_logprobs)
                for p in prompts]
        choices = choice_requests(gens, body.num_choices)
        builders = [ChoiceBuilder(renderer.token_strings if renderer else _no_token_strings, want_logprobs, c.index,
                                  c.prompt_index, top_k=body.logprobs or 0,
                                  echo=_echo(renderer, prompts[c.prompt_index]) if body.echo else None,
                                  drop_generated=body.max_tokens == 0)
                    for c in choices]
        return await self._run(request, body, CompletionShape(adapter or self.settings.model), choices, builders, "prompt")

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card(), *await self.loras.cards()]}

    async def get_model(self, name: str) -> dict:
        if await self.loras.adapter_for(name) is None:
            return self._model_card()
        return next(card for card in await self.loras.cards() if card["id"] == name)

    async def health(self) -> Response:
        if await self.client.model_ready():
            return JSONResponse({"status": "ok", "model": self.settings.model})
        raise not_ready(f"the Triton model '{self.settings.model}' at {self.settings.triton_url} is not ready")

    # ------------------------------------------------------------ internals

    def _model_card(self) -> dict:
        return {"id": self.settings.model, "object": "model", "created": self.started, "owned_by": "minisgl"}

    async def _check(self, body: ChatCompletionRequest | CompletionRequest, request: Request) -> str | None:
        """The request checked; the LoRA adapter its `model` names (None: the base model)."""
        adapter = await self.loras.adapter_for(body.model)
        if (error := body.unsupported()) is not None:
            raise error
        if ignored := body.ignored_fields():  # as vLLM's server: not refused, but said
            logger.warning("%s: the following fields were present in the request but ignored: %s",
                           request.url.path, ", ".join(ignored))
        return adapter

    def _tool_parser(self, tools: ToolRequest, renderer: ChatRenderer) -> str | None:
        """The tool-call format of this model: --tool-call-parser, else its chat template's."""
        if not tools.tools or tools.choice == "none":
            return None
        parser = self.settings.tool_call_parser or parser_for_template(renderer.template)
        if parser is None:
            raise invalid("this model's chat template names no tool-call format this server can parse; start the "
                          f"server with --tool-call-parser (one of {', '.join(sorted(TOOL_PARSERS))})", "tools")
        return parser

    def _max_tokens(self, body: ChatCompletionRequest | CompletionRequest) -> int:
        requested = body.requested_max_tokens()
        if requested is not None:
            return requested
        return self.settings.default_max_tokens or UNTIL_CONTEXT_ENDS

    async def _run(self, request: Request, body: ChatCompletionRequest | CompletionRequest,
                   shape: ChatShape | CompletionShape, choices: list[ChoiceRequest], builders: list[ChoiceBuilder],
                   prompt_param: str) -> Response:
        for choice in choices:  # the OpenAI id in Triton's logs and traces
            choice.request.request_id = shape.id if len(choices) == 1 else f"{shape.id}-{choice.index}"
        pieces = self._pieces(choices)
        try:
            if not body.stream:
                await _until_disconnect(request, _collect(pieces, {b.index: b for b in builders}))
                return JSONResponse(shape.response(builders))
            first = await _until_disconnect(request, anext(pieces, None))
            if first is None:
                raise TritonUnreachable("tritonserver ended the stream without a response")
        except (TritonRequestError, TritonUnreachable) as exc:
            await pieces.aclose()
            raise await self._failure(exc, prompt_param) from None
        except ClientGone:
            await pieces.aclose()
            return Response(status_code=499)
        events = StreamEvents(shape, body.include_usage_in_stream, body.continuous_usage_in_stream)
        if len(builders) == 1:
            return SSEResponse(sse_body(events, builders[0], first[1], _pieces_only(pieces)))
        return SSEResponse(sse_choices(events, builders, first, pieces))

    def _pieces(self, choices: list[ChoiceRequest]) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) of every choice; one choice streams straight from its gRPC call."""
        if len(choices) > 1:
            return run_choices(self.client, choices)
        return _indexed(choices[0].index, self.client.generate(choices[0].request))

    async def _failure(self, exc: Exception, prompt_param: str) -> OpenAIError:
        """What a request that failed before its first token tells the client."""
        if isinstance(exc, TritonUnreachable) or not await self.client.model_ready():
            return not_ready(f"the model '{self.settings.model}' is not ready: {exc}")
        message = str(exc)
        if _INTERNAL.search(message):
            return server_error(message)
        if _UNAVAILABLE.search(message):
            return OpenAIError(503, message, "service_unavailable", None, None)
        named = _NAMED_FIELD.search(message)  # the engine's INVALID_ARG message names the field
        if named:
            return invalid(message, named.group(1))
        return invalid(message, prompt_param if _PROMPT_WORDS.search(message) else None)


# ---------------------------------------------------------------- helpers


def _no_token_strings(text: str, count: int) -> list[str]:
    raise AssertionError("token strings are only needed for logprobs")


def _echo(renderer: ChatRenderer, prompt: str | list[int]) -> Echo:
    """A completion's echoed prompt: its text and its first token's (as the model tokenizes it)."""
    tokenizer = renderer.tokenizer
    ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=True)
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    return Echo(text, tokenizer.decode(ids[:1]) if ids else "")


async def _indexed(index: int, pieces: AsyncIterator[Piece]) -> AsyncIterator[tuple[int, Piece]]:
    try:
        async for piece in pieces:
            yield index, piece
            if piece.final:
                return
    finally:
        await pieces.aclose()


async def _pieces_only(pieces: AsyncIterator[tuple[int, Piece]]) -> AsyncIterator[Piece]:
    try:
        async for _, piece in pieces:
            yield piece
    finally:
        await pieces.aclose()


async def _collect(pieces: AsyncIterator[tuple[int, Piece]], builders: dict[int, ChoiceBuilder]) -> None:
    async for index, piece in pieces:
        builders[index].add(piece)


async def _until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it (and so its Triton request) if the client goes away."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_to_openai(exc.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


def _validation_to_openai(errors: list[dict]) -> OpenAIError:
    """The first pydantic error, with the field it is about (`messages.0.content`)."""
    if not errors:
        return invalid("invalid request body")
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # a union's most specific complaint
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(p for p in loc if not _is_union_tag(p)) or None
    if first.get("type") == "json_invalid":
        return invalid(f"the request body is not valid JSON: {first.get('msg')}")
    if first.get("type") == "missing" and param is None:
        return invalid("the request body is empty: send a JSON object")
    if first.get("type") == "missing":
        message = f"missing required field '{param}'"
    else:
        message = f"invalid value for '{param}': {first.get('msg')}"
    return invalid(message, param)


def _is_union_tag(part: str) -> bool:
    """pydantic puts the union member tried into `loc` (`str`, `list[TextPart]`, `function-after[...]`)."""
    return part in ("str", "int", "float", "bool", "dict") or "[" in part
