"""Shared fixtures: tiny random-weight models built once per session (never downloaded)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch="llama", **kwargs) -> path of a cached tiny model folder."""
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    cache: dict[str, str] = {}

    def build(arch: str = "llama", **kwargs) -> str:
        key = arch + repr(sorted(kwargs.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(str(out), arch=arch, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama", num_kv_heads=2)
