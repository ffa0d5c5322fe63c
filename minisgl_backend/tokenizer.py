"""Loading a tokenizer from a local HF folder (never the network)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_tokenizer"]


def load_tokenizer(model_path: str, **kwargs: Any):
    """`AutoTokenizer.from_pretrained(model_path, local_files_only=True)`; the folder must exist."""
    from transformers import AutoTokenizer

    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"tokenizer folder not found: {model_path!r} (only local folders are supported)")
    kwargs.setdefault("local_files_only", True)
    kwargs.setdefault("trust_remote_code", False)
    return AutoTokenizer.from_pretrained(model_path, **kwargs)
