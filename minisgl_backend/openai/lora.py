"""LoRA adapters as models of the OpenAI API, as vLLM serves them: each adapter the Triton model
knows is a model in `/v1/models` (its base as `parent`), a request naming it as `model` runs on
it (`lora_name` in the sampling parameters), and `POST /v1/load_lora_adapter` /
`/v1/unload_lora_adapter` add and remove adapters at run time (the model allows it when its
`lora_root` setting is set).

The names are asked of the Triton model (its `lora_request` input) and remembered; a request for
a name not known yet asks again once, so adapters another frontend loaded are found too.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from minisgl_backend.openai.errors import OpenAIError, invalid
from minisgl_backend.openai.triton_client import TritonGenerateClient, TritonRequestError, TritonUnreachable


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str | None = None


class LoraModels:
    def __init__(self, client: TritonGenerateClient, base_model: str) -> None:
        self.client = client
        self.base_model = base_model
        self._adapters: dict[str, str] = {}  # name -> folder
        self._lock = asyncio.Lock()
        self.created = int(time.time())

    async def refresh(self) -> dict[str, str]:
        """The adapters the model knows now ({} when it serves none, or is not a minisgl model)."""
        async with self._lock:
            try:
                answer = await self.client.lora_control({"action": "list"})
            except (TritonRequestError, TritonUnreachable):
                return dict(self._adapters)
            self._adapters = dict(answer.get("adapters", {}))
            return dict(self._adapters)

    async def adapter_for(self, model: str) -> str | None:
        """None for the base model, the adapter's name for one of them; 404 for anything else."""
        if model == self.base_model:
            return None
        if model not in self._adapters:
            await self.refresh()
        if model not in self._adapters:
            names = [self.base_model, *self._adapters]
            raise OpenAIError(404, f"the model '{model}' does not exist; this server serves {names}",
                              "invalid_request_error", "model", "model_not_found")
        return model

    async def cards(self) -> list[dict]:
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "minisgl", "root": path,
                 "parent": self.base_model} for name, path in (await self.refresh()).items()]

    async def load(self, body: LoadLoraRequest) -> PlainTextResponse:
        await self._control({"action": "load", "lora_name": body.lora_name, "lora_path": body.lora_path})
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(self, body: UnloadLoraRequest) -> PlainTextResponse:
        await self._control({"action": "unload", "lora_name": body.lora_name})
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _control(self, command: dict) -> None:
        try:
            answer = await self.client.lora_control(command)
        except TritonRequestError as exc:
            raise invalid(str(exc), "lora_name") from None
        except TritonUnreachable as exc:
            raise OpenAIError(503, str(exc), "service_unavailable") from None
        async with self._lock:
            self._adapters = dict(answer.get("adapters", {}))
