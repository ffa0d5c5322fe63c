"""The body of a streamed completion: server-sent events written straight to the ASGI `send`,
and the Triton requests cancelled when the client goes away.

Each Triton response is one write (one HTTP chunk); the events that are ready together go out
together: a choice's role chunk with its first text, and the last text with the finish chunk,
the usage chunk, `[DONE]` and the end of the chunked body. The choices of one request (n, or
several prompts) interleave, each chunk naming its choice's index.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from minisgl_backend.openai.errors import server_error
from minisgl_backend.openai.responses import DONE, ChoiceBuilder, StreamEvents, Usage, sse_event
from minisgl_backend.openai.triton_client import Piece, TritonRequestError, TritonUnreachable


class SSEResponse(Response):
    """Streams `body` (bytes, more-to-come) as text/event-stream.

    A client that disconnects cancels the task writing the stream (as Starlette's
    StreamingResponse does), which closes `body` and so cancels the gRPC call: Triton aborts the
    request and the engine frees its pages.
    """

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[tuple[bytes, bool]]) -> None:
        self.status_code = 200
        self.background = None
        self.body_events = body
        self.init_headers({"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.current_task()
        state = {"streaming": True, "client_gone": False}

        def on_disconnect(watch: asyncio.Task) -> None:
            if state["streaming"] and not watch.cancelled() and watch.exception() is None:
                state["client_gone"] = True
                writer.cancel()

        watch = asyncio.ensure_future(_disconnected(receive))
        watch.add_done_callback(on_disconnect)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for body, more in self.body_events:
                await send({"type": "http.response.body", "body": body, "more_body": more})
        except asyncio.CancelledError:
            if not state["client_gone"]:
                raise
            writer.uncancel()
        finally:
            state["streaming"] = False
            watch.cancel()
            await self.body_events.aclose()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def sse_body(events: StreamEvents, choice: ChoiceBuilder, first: Piece,
                   pieces: AsyncIterator[Piece]) -> AsyncIterator[tuple[bytes, bool]]:
    """One choice's stream (see `sse_choices`)."""
    async def indexed() -> AsyncIterator[tuple[int, Piece]]:
        try:
            async for piece in pieces:
                yield choice.index, piece
        finally:
            await pieces.aclose()

    async for write in sse_choices(events, [choice], (choice.index, first), indexed()):
        yield write


class _ChoiceStream:
    """What one choice of a streamed response has sent so far."""

    def __init__(self, choice: ChoiceBuilder) -> None:
        self.choice = choice
        self.opened = False
        self.offset = 0
        self.done = False
        self.tools = choice.tool_parser.stream() if choice.tool_parser is not None else None
        self.tools_flushed = False

    def events(self, events: StreamEvents, piece: Piece, usage_of: Callable[[], Usage]) -> bytes:
        choice = self.choice
        first = not self.opened
        lp = choice.add(piece)
        usage = usage_of()  # with this piece's tokens
        text = choice.piece_text(piece, first)
        out = b""
        if first:  # the role chunk: after the first piece, which gives the prompt's length
            self.opened = True
            out += events.opening(usage, choice.index)
        if self.tools is not None:
            deltas = self.tools.feed(text) + (self._flush_tools() if piece.final else [])
            if not deltas and lp is not None and lp.tokens:
                deltas = [{}]
            for i, delta in enumerate(deltas):
                out += events.delta(delta, lp if i == 0 else None, usage, choice.index)
        elif text or (lp is not None and lp.tokens):
            out += events.text(text, lp, self.offset, usage, choice.index)
            self.offset += len(text)
        if piece.final:
            out += self.close(events, usage)
        return out

    def _flush_tools(self) -> list[dict]:
        """What the tool-call stream held back, once, at the choice's end."""
        if self.tools_flushed:
            return []
        self.tools_flushed = True
        return self.tools.finish()

    def close(self, events: StreamEvents, usage: Usage) -> bytes:
        self.done = True
        out = b""
        if self.tools is not None:
            for delta in self._flush_tools():
                out += events.delta(delta, None, usage, self.choice.index)
        reason = self.choice.final_reason(bool(self.tools is not None and self.tools.calls))
        return out + events.finish(reason, usage, self.choice.index)


async def sse_choices(events: StreamEvents, choices: list[ChoiceBuilder], first: tuple[int, Piece],
                      pieces: AsyncIterator[tuple[int, Piece]]) -> AsyncIterator[tuple[bytes, bool]]:
    """(bytes to write, more to come) per Triton response of any choice, starting with the one
    already received; `pieces` yields (choice index, piece) and ends when every choice has."""
    streams = {c.index: _ChoiceStream(c) for c in choices}
    usage_of = (lambda: choices[0].usage) if len(choices) == 1 else (lambda: Usage.total(choices))
    out = b""
    item: tuple[int, Piece] | None = first
    try:
        while item is not None:
            index, piece = item
            out += streams[index].events(events, piece, usage_of)
            if all(s.done for s in streams.values()):
                break
            if out:
                yield out, True
                out = b""
            item = await anext(pieces, None)
        for stream in streams.values():  # a stream that ended without a final response
            if not stream.done:
                out += stream.close(events, usage_of())
        out += events.ending(usage_of())
    except (TritonRequestError, TritonUnreachable) as exc:  # after the first token: the status is sent
        out += sse_event(server_error(f"the request failed while streaming: {exc}").body()) + DONE
    finally:
        await pieces.aclose()
    yield out, False
