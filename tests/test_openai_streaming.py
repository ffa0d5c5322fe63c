"""The OpenAI frontend's hot path without a server: the Triton request and response protobufs it
builds and decodes itself (checked against tritonclient's own InferInput / InferResult), the
pre-encoded SSE chunks (checked against json.dumps of the chunk dicts), the grouping of events
into writes, and cancellation when the client disconnects."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as hs
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

from minisgl_backend.openai.responses import (ChatShape, ChoiceBuilder, CompletionShape, StreamEvents, TokenLogprobs,
                                              sse_event)
from minisgl_backend.openai.streaming import SSEResponse, sse_body
from minisgl_backend.openai.triton_client import GenerateRequest, Piece, decode_response, infer_request

TRICKY = ["", "Paris", ' "quoted" ', "back\\slash", "line\nbreak\r\ttab", "\x00\x01\x1f\x7f", "é ü ß ñ 中文",
          "emoji 😀👍🏽", "\u2028\u2029", "</script>", "\ud7ff\ue000\uffff\U0010ffff"]


# ---------------------------------------------------------------- the Triton protobufs


def _tritonclient_request(request: GenerateRequest) -> service_pb2.ModelInferRequest:
    """The request the frontend sent through tritonclient's InferInput before (the reference)."""
    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    if isinstance(request.prompt, str):
        inputs = [tensor("text_input", np.array([request.prompt.encode()], dtype=np.object_), "BYTES")]
    else:
        inputs = [tensor("input_ids", np.array(request.prompt, dtype=np.int32), "INT32")]
    inputs.append(tensor("sampling_parameters", np.array([json.dumps(request.sampling).encode()], dtype=np.object_),
                         "BYTES"))
    flags = {"stream": request.stream, "exclude_input_in_output": True, "return_finish_reason": True,
             "return_num_input_tokens": True, "return_num_output_tokens": True}
    if request.logprobs:
        flags["return_logprobs"] = True
    inputs += [tensor(name, np.array([value], dtype=np.bool_), "BOOL") for name, value in flags.items()]
    return _get_inference_request(model_name="minisgl", inputs=inputs, model_version="",
                                  request_id=request.request_id, outputs=None, sequence_id=0, sequence_start=False,
                                  sequence_end=False, priority=0, timeout=None, parameters=None)


@pytest.mark.parametrize("request_", [
    GenerateRequest("Hello 😀 \"world\"", {"max_tokens": 5, "stop": ["\n"]}, stream=True, request_id="chatcmpl-1"),
    GenerateRequest([1, 2, 300000, 7], {"max_tokens": 2**31 - 1, "temperature": 0.0}, stream=False, logprobs=True),
])
def test_infer_request_equals_tritonclients(request_):
    assert infer_request("minisgl", request_) == _tritonclient_request(request_)


def _triton_response(outputs: dict[str, tuple[str, list]], final: bool, raw: bool = True):
    """A ModelInferResponse as tritonserver sends it (raw_output_contents), or with typed contents."""
    response = service_pb2.ModelInferResponse(model_name="minisgl", id="x")
    for name, (dtype, values) in outputs.items():
        tensor = response.outputs.add(name=name, datatype=dtype, shape=[len(values)])
        if dtype == "BYTES":
            if raw:
                response.raw_output_contents.append(b"".join(len(v).to_bytes(4, "little") + v for v in values))
            else:
                tensor.contents.bytes_contents.extend(values)
        else:  # tritonclient reads numbers from raw_output_contents only, as tritonserver sends them
            response.raw_output_contents.append(struct.pack(f"<{len(values)}I", *values))
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return response


@pytest.mark.parametrize("text", TRICKY)
def test_decode_response_equals_tritonclients_as_numpy(text):
    outputs = {"text_output": ("BYTES", [text.encode()]), "finish_reason": ("BYTES", [b"length"]),
               "num_input_tokens": ("UINT32", [17]), "num_output_tokens": ("UINT32", [3]),
               "logprobs": ("BYTES", [b"[-0.5, -1.25, -2.0]"])}
    response = _triton_response(outputs, final=True)
    piece = decode_response(response)
    reference = grpcclient.InferResult(response)
    assert piece.text == reference.as_numpy("text_output")[0].decode() == text
    assert piece.num_output_tokens == int(reference.as_numpy("num_output_tokens")[0]) == 3
    assert piece.num_input_tokens == 17
    assert piece.finish_reason == "length" and piece.final
    assert piece.logprobs == [-0.5, -1.25, -2.0] and piece.token_texts is None


def test_decode_response_of_typed_bytes_contents():
    response = _triton_response({"text_output": ("BYTES", ["é".encode(), b"!"])}, final=False, raw=False)
    assert decode_response(response).text == "é!" == b"".join(grpcclient.InferResult(response).as_numpy(
        "text_output")).decode()


def test_decode_response_partial_and_empty_final():
    middle = decode_response(_triton_response({"text_output": ("BYTES", [b"ab", "ç".encode()]),
                                               "num_output_tokens": ("UINT32", [2])}, final=False))
    assert (middle.text, middle.num_output_tokens, middle.num_input_tokens, middle.finish_reason, middle.final) == \
        ("abç", 2, None, None, False)
    last = decode_response(_triton_response({}, final=True))
    assert (last.text, last.num_output_tokens, last.final) == ("", 0, True)
    # a UTF-8 sequence cut between responses is replaced, never an exception
    assert decode_response(_triton_response({"text_output": ("BYTES", [b"\xe2\x82"])}, final=False)).text == "\ufffd"


# ---------------------------------------------------------------- the SSE chunks


def _shapes():
    return [ChatShape("minisgl"), CompletionShape('model "with" quotes/ü')]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", TRICKY)
def test_text_event_equals_json_of_the_chunk(text, include_usage):
    for shape in _shapes():
        events = StreamEvents(shape, include_usage)
        assert events.text(text, None, 0) == sse_event(shape.text_chunk(text, None, 0, include_usage))
        payload = json.loads(events.text(text, None, 0)[len(b"data: "):])
        assert payload["id"] == shape.id and payload["model"] == shape.model
        assert ("usage" in payload) == include_usage


@settings(max_examples=300, deadline=None)
@given(hs.text())
def test_text_event_equals_json_of_the_chunk_for_any_text(text):
    for shape in _shapes():
        events = StreamEvents(shape, True)
        assert events.text(text, None, 0) == sse_event(shape.text_chunk(text, None, 0, True))


def test_text_event_with_logprobs_keeps_them():
    for shape in _shapes():
        lp = TokenLogprobs(["a", "\"b"], [-0.5, -1.0])
        events = StreamEvents(shape, False)
        assert events.text("a\"b", lp, 3) == sse_event(shape.text_chunk("a\"b", lp, 3, False))


# ---------------------------------------------------------------- writes of one stream


async def _aiter(items):
    for item in items:
        yield item


def _stream_writes(pieces: list[Piece], include_usage: bool, shape=None) -> list[tuple[bytes, bool]]:
    shape = shape or ChatShape("minisgl")
    choice = ChoiceBuilder(lambda text, count: [text] * count, want_logprobs=False)

    async def collect():
        return [w async for w in sse_body(StreamEvents(shape, include_usage), choice, pieces[0],
                                          _aiter(pieces[1:]))]

    return asyncio.run(collect())


def _events(writes: list[tuple[bytes, bool]]) -> list[str]:
    body = b"".join(body for body, _ in writes).decode()
    assert body.endswith("\n\n")
    return [e.removeprefix("data: ") for e in body[:-2].split("\n\n")]


def test_stream_writes_group_what_is_ready_together():
    pieces = [Piece("Hel", 1, num_input_tokens=9), Piece("lo", 2), Piece("", 0), Piece(" 😀", 1),
              Piece("!", 1, finish_reason="length", final=True)]
    writes = _stream_writes(pieces, include_usage=True)
    # role + first text, one write per later response that has text, last text + finish + usage + [DONE]
    assert [more for _, more in writes] == [True, True, True, False]
    events = _events(writes)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello 😀!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 5,
                                                                   "total_tokens": 14}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_of_one_response_is_one_write():
    writes = _stream_writes([Piece("x", 1, num_input_tokens=3, finish_reason="stop", final=True)], False,
                            CompletionShape("m"))
    assert len(writes) == 1 and writes[0][1] is False
    events = _events(writes)
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["x", ""]
    assert json.loads(events[1])["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


def test_stream_that_ends_without_a_final_response_still_finishes():
    writes = _stream_writes([Piece("a", 1, num_input_tokens=2), Piece("b", 1)], include_usage=True)
    chunks = [json.loads(e) for e in _events(writes)[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------- disconnect


def test_client_disconnect_cancels_the_stream_and_closes_the_body():
    closed = []

    async def body():
        try:
            yield b"data: 1\n\n", True
            await asyncio.sleep(3600)  # Triton has nothing more yet
            yield b"never", False
        finally:
            closed.append(True)  # the gRPC call is cancelled here in the real body

    async def main():
        sent: list[dict] = []
        disconnect = asyncio.Event()

        async def receive():
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message.get("body") == b"data: 1\n\n":
                disconnect.set()

        await asyncio.wait_for(SSEResponse(body())({"type": "http"}, receive, send), 10)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n"]
    assert closed == [True]


def test_finished_stream_is_not_cancelled_by_the_end_of_the_response():
    """uvicorn's receive() answers http.disconnect once the response is complete: not a cancellation."""
    async def main():
        sent: list[dict] = []
        done = asyncio.Event()

        async def receive():
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if not message.get("more_body", True):
                done.set()

        await SSEResponse(_aiter([(b"a", True), (b"b", False)]))({"type": "http"}, receive, send)
        await asyncio.sleep(0.01)
        return sent, asyncio.current_task().cancelling()

    sent, cancelling = asyncio.run(main())
    assert [(m.get("body"), m.get("more_body")) for m in sent[1:]] == [(b"a", True), (b"b", False)]
    assert cancelling == 0

