"""Model definitions (Llama, Qwen2, Qwen3) and loading from a local HF safetensors folder."""

from minisgl_backend.models.hf_config import SUPPORTED_ARCHITECTURES, ModelArchConfig, read_arch_config
from minisgl_backend.models.llama import LlamaForCausalLM
from minisgl_backend.models.loader import load_model

__all__ = ["load_model", "ModelArchConfig", "read_arch_config", "LlamaForCausalLM", "SUPPORTED_ARCHITECTURES"]
