"""The Triton requests behind one OpenAI request: n choices of each prompt, run as one stream of
(choice index, piece).

A prompt's first choice starts at once; its other choices start when it has answered (its prompt
is computed then, and the engine's prefix cache gives it to them), so the prompt is computed
once. The pieces of all choices come out in the order they arrive; leaving the stream early
(a client that disconnects, a failed choice) cancels every Triton request still running.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import AsyncIterator

from minisgl_backend.openai.triton_client import GenerateRequest, Piece, TritonGenerateClient

_END = object()


@dataclass
class ChoiceRequest:
    index: int  # the choice's index in the response
    prompt_index: int
    request: GenerateRequest


def choice_requests(prompts: list[GenerateRequest], n: int) -> list[ChoiceRequest]:
    """n choices per prompt, indexed prompt by prompt (OpenAI's and vLLM's order); a seeded request
    gives choice j the seed + j, so the choices are reproducible and differ."""
    out = []
    for p, base in enumerate(prompts):
        for j in range(n):
            request = base
            if j and base.sampling.get("seed") is not None:
                request = replace(base, sampling={**base.sampling, "seed": base.sampling["seed"] + j})
            out.append(ChoiceRequest(p * n + j, p, replace(request, request_id=f"{base.request_id}-{p * n + j}")))
    return out


async def run_choices(client: TritonGenerateClient, choices: list[ChoiceRequest]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) of every choice as they arrive; a choice's error is raised here."""
    queue: asyncio.Queue = asyncio.Queue()
    answered = {c.prompt_index: asyncio.Event() for c in choices}
    leaders = {min(c.index for c in choices if c.prompt_index == p) for p in answered}

    async def pump(choice: ChoiceRequest) -> None:
        gate = answered[choice.prompt_index]
        try:
            if choice.index not in leaders:
                await gate.wait()
            async for piece in client.generate(choice.request):
                gate.set()
                await queue.put((choice.index, piece))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((choice.index, exc))
        finally:
            gate.set()
        await queue.put((choice.index, _END))

    tasks = [asyncio.ensure_future(pump(choice)) for choice in choices]
    running = len(tasks)
    try:
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
