"""Where the chat template comes from: `--tokenizer DIR`, else the served model's own folder.

The folder is discovered from the Triton model's config parameters (`model_path`); an empty
`model_path` resolves as the model itself resolves it ($MINISGL_MODEL_PATH, else this checkout's
build/models/smollm2). A model without that parameter (Triton's vLLM backend keeps its model in
model.json) needs `--tokenizer`. Loading waits for Triton: until it answers, chat requests get 503.
"""

from __future__ import annotations

import asyncio
import logging

from minisgl_backend.checkout import resolve_model_path
from minisgl_backend.openai.chat import ChatRenderer
from minisgl_backend.openai.errors import OpenAIError, not_ready
from minisgl_backend.openai.triton_client import TritonGenerateClient
from minisgl_backend.processes import freeze_startup_objects

logger = logging.getLogger("minisgl.openai")


class TokenizerSource:
    def __init__(self, client: TritonGenerateClient, tokenizer_dir: str | None,
                 chat_template_file: str | None) -> None:
        self.client = client
        self.tokenizer_dir = tokenizer_dir
        self.chat_template_file = chat_template_file
        self._renderer: ChatRenderer | None = None
        self.folder: str | None = None  # where the tokenizer was loaded from, once it was
        self._lock = asyncio.Lock()

    async def try_load(self) -> None:
        try:
            await self.renderer()
        except OpenAIError as exc:
            logger.warning("tokenizer not loaded yet: %s", exc.message)

    async def renderer(self) -> ChatRenderer:
        if self._renderer is not None:
            return self._renderer
        async with self._lock:
            if self._renderer is None:
                folder = self.tokenizer_dir or await self._discover()
                try:
                    self._renderer = await asyncio.to_thread(ChatRenderer.from_folder, folder,
                                                             self.chat_template_file)
                except OSError as exc:
                    raise OpenAIError(500, f"cannot load the tokenizer from {folder!r}: {exc}; "
                                           "start the server with --tokenizer DIR", "server_error") from None
                self.folder = folder
                logger.info("tokenizer and chat template from %s", folder)
                freeze_startup_objects()  # transformers + torch: kept out of every full collection
        return self._renderer

    async def _discover(self) -> str:
        try:
            params = await self.client.model_parameters()
        except Exception as exc:
            raise not_ready(f"the tokenizer folder comes from the Triton model's config, and Triton at "
                            f"{self.client.url} did not give it ({exc}); start the server with --tokenizer DIR "
                            "or wait for the model") from None
        if "model_path" not in params:
            raise OpenAIError(500, f"the Triton model '{self.client.model}' has no model_path parameter: "
                                   "start the server with --tokenizer DIR", "server_error")
        try:
            return resolve_model_path(params["model_path"], __file__)
        except ValueError as exc:
            raise OpenAIError(500, f"{exc}; or start the server with --tokenizer DIR", "server_error") from None
