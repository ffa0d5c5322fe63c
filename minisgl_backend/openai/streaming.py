"""The body of a streamed completion: server-sent events written straight to the ASGI `send`,
and the Triton request cancelled when the client goes away.

Each Triton response is one write (one HTTP chunk); the events that are ready together go out
together: the role chunk with the first text, and the last text with the finish chunk, the
usage chunk, `[DONE]` and the end of the chunked body.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from minisgl_backend.openai.errors import server_error
from minisgl_backend.openai.responses import DONE, ChoiceBuilder, StreamEvents, sse_event
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
    """(bytes to write, more to come) per Triton response, starting with the one already received."""
    out = events.opening()
    offset = 0
    piece: Piece | None = first
    try:
        while piece is not None:
            lp = choice.add(piece)
            if piece.text or (lp is not None and lp.tokens):
                out += events.text(piece.text, lp, offset)
                offset += len(piece.text)
            if piece.final:
                break
            if out:
                yield out, True
                out = b""
            piece = await anext(pieces, None)
        out += events.closing(choice.finish_reason or "stop", choice.usage)
    except (TritonRequestError, TritonUnreachable) as exc:  # after the first token: the status is sent
        out += sse_event(server_error(f"the request failed while streaming: {exc}").body()) + DONE
    finally:
        await pieces.aclose()
    yield out, False
