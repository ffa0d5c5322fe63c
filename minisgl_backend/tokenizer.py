"""Loading a tokenizer from a local HF folder (never the network), chat templates, EOS ids."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

__all__ = ["load_tokenizer", "apply_chat_template", "eos_token_ids", "ChatTemplateError"]


class ChatTemplateError(ValueError):
    """The tokenizer cannot format chat messages (no chat template, or bad messages)."""


def load_tokenizer(model_path: str, **kwargs: Any):
    """`AutoTokenizer.from_pretrained(model_path, local_files_only=True)`; the folder must exist."""
    from transformers import AutoTokenizer

    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"tokenizer folder not found: {model_path!r} (only local folders are supported)")
    kwargs.setdefault("local_files_only", True)
    kwargs.setdefault("trust_remote_code", False)
    return AutoTokenizer.from_pretrained(model_path, **kwargs)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with the tokenizer's chat template.

    Raises ChatTemplateError if the tokenizer has no chat template or the messages are malformed.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat template; send plain text (text_input) instead of "
            "chat messages, or use a model folder whose tokenizer_config.json / chat_template.jinja "
            "defines one")
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a string 'role' and a 'content': {m!r}")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors (raise_exception in templates, bad roles, ...)
        raise ChatTemplateError(f"chat template failed: {e}") from e
    if not isinstance(text, str):  # some versions may return a list for batched input
        raise ChatTemplateError(f"chat template returned {type(text).__name__}, expected str")
    return text


def _ids(value: Any) -> Iterable[int]:
    if value is None:
        return ()
    if isinstance(value, bool):
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def eos_token_ids(tokenizer, model_path: str | None = None) -> set[int]:
    """Every id that ends generation: the tokenizer's eos plus `eos_token_id` (int or list) from
    generation_config.json and config.json (also its `text_config`) in `model_path`."""
    ids: set[int] = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.update(_ids(tokenizer.eos_token_id))
    if model_path:
        for name in ("generation_config.json", "config.json"):
            data = _read_json(os.path.join(model_path, name))
            ids.update(_ids(data.get("eos_token_id")))
            text_cfg = data.get("text_config")
            if isinstance(text_cfg, dict):
                ids.update(_ids(text_cfg.get("eos_token_id")))
    return {i for i in ids if i >= 0}
