"""LoRA adapters of the Triton model: `multi_lora.json` beside config.pbtxt (read at load, as Triton's
vLLM backend reads it), and the `lora_request` input, through which the OpenAI frontend lists,
loads and unloads adapters at run time: `{"action": "list" | "load" | "unload", "lora_name",
"lora_path"}`, answered with one response whose `text_output` is `{"adapters": {name: folder}}`,
or an INVALID_ARG error saying why not."""

from __future__ import annotations

import json
import os
from typing import Any

from minisgl_backend.lora.adapter import AdapterError
from minisgl_backend.lora import MULTI_LORA_FILE
from minisgl_backend.triton.parameters import RequestError
from minisgl_backend.triton.responses import Reply, error_reply, string_tensor


def lora_modules_of(args: dict) -> dict[str, str]:
    """{name: folder} of the model's multi_lora.json (folders relative to it), {} without one."""
    path = os.path.join(args.get("model_repository", ""), MULTI_LORA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        modules = json.load(f)
    if not isinstance(modules, dict) or not all(isinstance(v, str) for v in modules.values()):
        raise ValueError(f"{path} must hold an object of adapter name -> folder")
    return {name: os.path.join(os.path.dirname(path), folder) for name, folder in modules.items()}


def lora_command(raw: Any) -> dict | None:
    """The `lora_request` input as a command, None when the request has none."""
    if raw is None:
        return None
    value = raw.reshape(-1)[0] if hasattr(raw, "reshape") else raw
    text = value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
    try:
        command = json.loads(text)
    except ValueError as exc:
        raise RequestError(f"lora_request is not valid JSON ({exc})") from None
    if not isinstance(command, dict) or command.get("action") not in ("list", "load", "unload"):
        raise RequestError('lora_request must be {"action": "list" | "load" | "unload", "lora_name": ..., '
                           '"lora_path": ...}')
    return command


def answer_lora_command(fe: Any, command: dict) -> Reply:
    """Carry out a command on the frontend's adapters; the reply lists them afterwards."""
    registry = fe.lora
    try:
        if command["action"] == "load":
            if registry is None:
                raise AdapterError("LoRA feature is not enabled.")
            registry.add(_field(command, "lora_name"), _field(command, "lora_path"), run_time=True)
        elif command["action"] == "unload":
            fe.unload_lora(_field(command, "lora_name"))
    except (AdapterError, RequestError) as exc:
        return error_reply("INVALID_ARG", str(exc))
    adapters = registry.listing() if registry is not None else {}
    return Reply({"text_output": string_tensor(json.dumps({"adapters": adapters}))}, True)


def _field(command: dict, name: str) -> str:
    value = command.get(name)
    if not isinstance(value, str) or not value:
        raise RequestError(f"lora_request needs {name!r} (a string)")
    return value
