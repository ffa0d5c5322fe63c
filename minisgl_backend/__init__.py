"""minisgl_backend: a mini-sglang-style LLM serving engine, hosted as a Triton Python-backend model."""

from minisgl_backend.config import EngineConfig
from minisgl_backend.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the package must stay cheap (the Triton stub imports it)
        from minisgl_backend.llm import LLM

        return LLM
    raise AttributeError(name)
