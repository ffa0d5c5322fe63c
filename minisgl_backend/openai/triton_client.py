"""One OpenAI request -> one gRPC bidirectional stream to tritonserver (`tritonclient.grpc.aio`).

Only the vLLM-backend tensor contract is used (text_input / input_ids, stream,
sampling_parameters, exclude_input_in_output, return_* switches), so the same client fronts
the minisgl model and a Triton vLLM-backend model. A decoupled model answers unary infer with
UNIMPLEMENTED, so non-streaming requests stream too, with `stream=false` (one response).

Responses may carry several tokens each: `num_output_tokens` counts the tokens of a response,
`logprobs` is a JSON list with one entry per token of that response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_client


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
    final: bool = False


class TritonRequestError(Exception):
    """The model answered the request with an error (the message; gRPC streams carry no code)."""


class TritonUnreachable(Exception):
    """The gRPC call itself failed (server down, connection refused)."""


class TritonGenerateClient:
    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self._client: aio_client.InferenceServerClient | None = None

    @property
    def client(self) -> aio_client.InferenceServerClient:
        if self._client is None:  # created inside the running event loop (grpc.aio needs one)
            self._client = aio_client.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def model_ready(self, timeout: float = 2.0) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model, client_timeout=timeout))
        except Exception:  # unreachable, unknown model: not ready either way
            return False

    async def model_parameters(self) -> dict[str, str]:
        """The string parameters of the model's config (`model_path` among them)."""
        config = await self.client.get_model_config(self.model, as_json=True)
        params = config.get("config", {}).get("parameters", {}) or {}
        return {k: v.get("string_value", "") for k, v in params.items() if isinstance(v, dict)}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Piece]:
        """The responses of one request; cancels the gRPC call when left before the last one."""
        inputs = _inputs(request)

        async def one_request():
            yield {"model_name": self.model, "inputs": inputs, "request_id": request.request_id}

        call = self.client.stream_infer(one_request())
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    finished = True
                    raise TritonRequestError(error.message() or str(error))
                piece = _piece(result)
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


def _inputs(request: GenerateRequest) -> list[grpcclient.InferInput]:
    tensors: list[tuple[str, np.ndarray]] = []
    if isinstance(request.prompt, str):
        tensors.append(("text_input", np.array([request.prompt.encode("utf-8")], dtype=np.object_)))
    else:
        tensors.append(("input_ids", np.array(request.prompt, dtype=np.int32)))
    tensors.append(("sampling_parameters", np.array([json.dumps(request.sampling).encode()], dtype=np.object_)))
    flags = {"stream": request.stream, "exclude_input_in_output": True, "return_finish_reason": True,
             "return_num_input_tokens": True, "return_num_output_tokens": True}
    if request.logprobs:
        flags["return_logprobs"] = True
    tensors.extend((name, np.array([value], dtype=np.bool_)) for name, value in flags.items())
    out = []
    for name, array in tensors:
        dtype = {np.dtype(np.object_): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL"}[array.dtype]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _piece(result: grpcclient.InferResult) -> Piece:
    response = result.get_response()
    final_param = response.parameters.get("triton_final_response")
    final = bool(final_param.bool_param) if final_param is not None else False
    if not response.outputs:  # an empty final response
        return Piece("", 0, final=final)
    names = {o.name for o in response.outputs}
    text = _string(result, "text_output") if "text_output" in names else ""
    reason = _string(result, "finish_reason") if "finish_reason" in names else ""
    logprobs, token_texts = _logprobs(_string(result, "logprobs")) if "logprobs" in names else ([], None)
    return Piece(text=text,
                 num_output_tokens=_uint(result, "num_output_tokens") if "num_output_tokens" in names else 0,
                 num_input_tokens=_uint(result, "num_input_tokens") if "num_input_tokens" in names else None,
                 finish_reason=reason or None, logprobs=logprobs, token_texts=token_texts,
                 final=final or bool(reason))


def _string(result: grpcclient.InferResult, name: str) -> str:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return ""
    return b"".join(bytes(x) for x in array.reshape(-1)).decode("utf-8", errors="replace")


def _uint(result: grpcclient.InferResult, name: str) -> int:
    array = result.as_numpy(name)
    return int(array.reshape(-1)[0]) if array is not None and array.size else 0


def _logprobs(text: str) -> tuple[list[float], list[str] | None]:
    """minisgl: `[-0.1, -2.3]`; Triton's vLLM backend: `[{"id": {"logprob": .., "decoded_token": ..}}]`."""
    if not text:
        return [], None
    values = json.loads(text)
    if not values or not isinstance(values[0], dict):
        return [float(v) for v in values], None
    logprobs, tokens = [], []
    for entry in values:
        info = next(iter(entry.values()))  # the sampled token comes first
        logprobs.append(float(info["logprob"]))
        tokens.append(str(info.get("decoded_token") or ""))
    return logprobs, tokens


def _rpc_details(exc: grpc.RpcError) -> str:
    details = getattr(exc, "details", None)
    return details() if callable(details) else str(exc)
