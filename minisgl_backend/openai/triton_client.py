"""One OpenAI request -> one gRPC stream to tritonserver (grpc.aio, Triton's own generated
`GRPCInferenceService` stub and protobufs from tritonclient).

Only the vLLM-backend tensor contract is used (text_input / input_ids, stream,
sampling_parameters, exclude_input_in_output, return_* switches), so the same client fronts
the minisgl model and a Triton vLLM-backend model. A decoupled model answers unary infer with
UNIMPLEMENTED, so non-streaming requests stream too, with `stream=false` (one response).

Responses may carry several tokens each: `num_output_tokens` counts the tokens of a response,
`logprobs` is a JSON list with one entry per token of that response: a float, or, when the
sampling parameters ask `logprobs` as a count, vLLM's {token id: {logprob, rank, decoded_token}}
holding the sampled token first and the most likely ones after it. `prompt_logprobs` (the
minisgl model, with the sampling parameter of that name) comes with the first response, in the
same shape, `null` for the first prompt token.

The request protobuf is built here and the responses' `raw_output_contents` are decoded here
(Triton's wire format: BYTES elements as a 4-byte little-endian length + the bytes, numbers
little-endian) instead of through tritonclient's InferInput / InferResult / numpy wrappers: this
runs once per streamed response, and the wrappers cost several times what the frontend spends
on everything else per response. ModelStreamInfer is called as a unary-stream RPC: the one
request, its metadata and the half-close leave in one batch, the same bytes on the wire as a
bidirectional call that writes one request and closes (gRPC's call types differ only in the
client's API), at a third of the per-request cost of three separate writes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

# tritonclient's channel settings: no message size cap, its keep-alive defaults.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                    ("grpc.keepalive_time_ms", 2**31 - 1), ("grpc.keepalive_timeout_ms", 20000),
                    ("grpc.keepalive_permit_without_calls", False), ("grpc.http2.max_pings_without_data", 2)]
_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
_FLAGS = ("exclude_input_in_output", "return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")

Alternative = tuple[str, float, "int | None"]  # (token text, logprob, rank)
_TRUE, _FALSE = b"\x01", b"\x00"
_INT_FORMATS = {"UINT32": "<I", "INT32": "<i", "UINT64": "<Q", "INT64": "<q", "UINT16": "<H", "INT16": "<h",
                "UINT8": "<B", "INT8": "<b"}


@dataclass
class GenerateRequest:
    prompt: str | list[int]  # text, or token ids (the `input_ids` INT32 tensor)
    sampling: dict
    stream: bool
    logprobs: bool = False
    request_id: str = ""


@dataclass
class Piece:
    """One Triton response."""

    text: str
    num_output_tokens: int
    num_input_tokens: int | None = None
    finish_reason: str | None = None  # set on the last response
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] | None = None  # when the backend names the tokens (vLLM's logprobs format)
    alternatives: list[list[Alternative]] | None = None  # per token, every token named (the sampled first)
    prompt_logprobs: list[list[Alternative] | None] | None = None  # the first response, when asked
    final: bool = False


class TritonRequestError(Exception):
    """The model answered the request with an error (the message; gRPC streams carry no code)."""


class TritonUnreachable(Exception):
    """The gRPC call itself failed (server down, connection refused)."""


class TritonGenerateClient:
    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._stream_infer: grpc.aio.UnaryStreamMultiCallable | None = None

    @property
    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        self._connect()
        return self._stub

    def _connect(self) -> None:
        if self._channel is None:  # created inside the running event loop (grpc.aio needs one)
            self._channel = grpc.aio.insecure_channel(self.url, options=_CHANNEL_OPTIONS)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
            self._stream_infer = self._channel.unary_stream(
                _STREAM_INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = self._stream_infer = None

    async def model_ready(self, timeout: float = 2.0) -> bool:
        try:
            return (await self.stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout)).ready
        except grpc.RpcError:  # unreachable, unknown model: not ready either way
            return False

    async def model_parameters(self, timeout: float = 10.0) -> dict[str, str]:
        """The string parameters of the model's config (`model_path` among them)."""
        try:
            response = await self.stub.ModelConfig(service_pb2.ModelConfigRequest(name=self.model), timeout=timeout)
        except grpc.RpcError as exc:
            raise TritonUnreachable(_rpc_details(exc)) from None
        return {name: value.string_value for name, value in response.config.parameters.items()}

    async def lora_control(self, command: dict) -> dict:
        """The minisgl model's LoRA control request (`lora_request`: list, load, unload): its JSON
        answer; TritonRequestError with the model's message when it refuses."""
        self._connect()
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name="lora_request", datatype="BYTES", shape=[1])
        request = service_pb2.ModelInferRequest(model_name=self.model, inputs=[tensor],
                                                raw_input_contents=[_bytes_element(json.dumps(command).encode())])
        try:
            async for response in self._stream_infer(request):
                if response.error_message:
                    raise TritonRequestError(response.error_message)
                piece = decode_response(response.infer_response)
                if piece.text:
                    return json.loads(piece.text)
        except grpc.RpcError as exc:
            raise TritonUnreachable(f"tritonserver at {self.url} did not answer: {_rpc_details(exc)}") from None
        raise TritonRequestError("the model gave no answer to the LoRA request")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Piece]:
        """The responses of one request; cancels the gRPC call when left before the last one."""
        self._connect()
        call = self._stream_infer(infer_request(self.model, request))
        finished = False
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:  # ended without a final response: the caller decides
                    finished = True
                    return
                if response.error_message:
                    finished = True
                    raise TritonRequestError(response.error_message)
                piece = decode_response(response.infer_response)
                finished = piece.final
                yield piece
                if finished:
                    return
        except grpc.RpcError as exc:
            finished = True
            raise TritonUnreachable(f"tritonserver at {self.url} did not answer: {_rpc_details(exc)}") from None
        finally:
            if not finished:
                call.cancel()  # Triton sees the cancellation; the engine aborts the request


def infer_request(model: str, request: GenerateRequest) -> service_pb2.ModelInferRequest:
    """The ModelInferRequest of the vLLM-backend contract, tensors in `raw_input_contents`."""
    tensor = service_pb2.ModelInferRequest.InferInputTensor
    if isinstance(request.prompt, str):
        inputs = [tensor(name="text_input", datatype="BYTES", shape=[1])]
        raw = [_bytes_element(request.prompt.encode("utf-8"))]
    else:
        inputs = [tensor(name="input_ids", datatype="INT32", shape=[len(request.prompt)])]
        raw = [struct.pack(f"<{len(request.prompt)}i", *request.prompt)]
    inputs.append(tensor(name="sampling_parameters", datatype="BYTES", shape=[1]))
    raw.append(_bytes_element(json.dumps(request.sampling).encode()))
    flags = [("stream", request.stream), *((name, True) for name in _FLAGS)]
    if request.logprobs:
        flags.append(("return_logprobs", True))
    for name, value in flags:
        inputs.append(tensor(name=name, datatype="BOOL", shape=[1]))
        raw.append(_TRUE if value else _FALSE)
    return service_pb2.ModelInferRequest(model_name=model, id=request.request_id, inputs=inputs,
                                         raw_input_contents=raw)


def decode_response(response: service_pb2.ModelInferResponse) -> Piece:
    """One Triton response as a Piece (outputs absent from the response keep their defaults)."""
    final_param = response.parameters.get("triton_final_response")
    final = final_param is not None and final_param.bool_param
    if not response.outputs:  # an empty final response
        return Piece("", 0, final=final)
    raw = response.raw_output_contents
    values: dict[str, str | int] = {}
    for i, output in enumerate(response.outputs):
        data = raw[i] if i < len(raw) else None  # as tritonclient reads it: typed contents only for BYTES
        if output.datatype == "BYTES":
            values[output.name] = _text(data) if data is not None else _text_contents(output)
        else:
            values[output.name] = _first_int(output.datatype, data)
    reason = values.get("finish_reason") or None
    logprobs, token_texts, alternatives = _logprobs(values["logprobs"]) if "logprobs" in values else ([], None, None)
    prompt = _prompt_logprobs(values["prompt_logprobs"]) if values.get("prompt_logprobs") else None
    return Piece(text=values.get("text_output", ""), num_output_tokens=values.get("num_output_tokens", 0),
                 num_input_tokens=values.get("num_input_tokens"), finish_reason=reason, logprobs=logprobs,
                 token_texts=token_texts, alternatives=alternatives, prompt_logprobs=prompt,
                 final=final or bool(reason))


def _bytes_element(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def _text(raw: bytes) -> str:
    """The BYTES elements of a tensor, joined and decoded (one element in practice)."""
    size = len(raw)
    if size >= 4 and int.from_bytes(raw[:4], "little") == size - 4:
        return raw[4:].decode("utf-8", errors="replace")
    parts, offset = [], 0
    while offset + 4 <= size:
        length = int.from_bytes(raw[offset:offset + 4], "little")
        parts.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return b"".join(parts).decode("utf-8", errors="replace")


def _text_contents(output: service_pb2.ModelInferResponse.InferOutputTensor) -> str:
    return b"".join(output.contents.bytes_contents).decode("utf-8", errors="replace")


def _first_int(datatype: str, raw: bytes | None) -> int:
    fmt = _INT_FORMATS.get(datatype)
    if raw is None or fmt is None or len(raw) < struct.calcsize(fmt):
        return 0
    return struct.unpack_from(fmt, raw)[0]


def _logprobs(text: str) -> tuple[list[float], list[str] | None, list[list[Alternative]] | None]:
    """minisgl: `[-0.1, -2.3]`; vLLM's shape: `[{"id": {"logprob": .., "rank": .., "decoded_token": ..}}]`
    -> (logprobs, token texts, every token named per position)."""
    if not text:
        return [], None, None
    values = json.loads(text)
    if not values or not isinstance(values[0], dict):
        return [float(v) for v in values], None, None
    named = [_alternatives(entry) for entry in values]
    return [n[0][1] for n in named], [n[0][0] for n in named], named


def _prompt_logprobs(text: str) -> list[list[Alternative] | None]:
    return [None if entry is None else _alternatives(entry) for entry in json.loads(text)]


def _alternatives(entry: dict) -> list[Alternative]:
    """The tokens one position names, in the order given (the sampled or prompt token first)."""
    return [(str(info.get("decoded_token") or ""), float(info["logprob"]), info.get("rank"))
            for info in entry.values()]


def _rpc_details(exc: grpc.RpcError) -> str:
    details = getattr(exc, "details", None)
    return details() if callable(details) else str(exc)
