"""Build a model for this TP rank and fill it from a local HF folder of safetensors files.

The module is built directly on the target device (parameters are allocated once, empty) and
each checkpoint tensor is read through `safe_open(...).get_slice(name)`, so a rank reads only
its own shard of a TP-split matrix.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import torch
from safetensors import safe_open
from torch import nn

from minisgl_backend.distributed.layers import default_weight_loader
from minisgl_backend.models.hf_config import read_arch_config
from minisgl_backend.models.llama import LlamaForCausalLM
from minisgl_backend.models.torch_ops import LayerOps

logger = logging.getLogger(__name__)

_MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM, "qwen3": LlamaForCausalLM}


class SafetensorsSource:
    """A `WeightSource` reading one tensor of an open safetensors file lazily."""

    def __init__(self, handle, name: str, path: str) -> None:
        self.name, self.path = name, path
        self._slice = handle.get_slice(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def load(self) -> torch.Tensor:
        return self._slice[:]


def load_model(model_path: str, dtype: torch.dtype | str, device: str | torch.device,
               ops: LayerOps | None = None) -> LlamaForCausalLM:
    """The model of `model_path` for the current TP rank (see `parallel_state`), in eval mode; every
    layer computes its elementwise ops with `ops` (`KernelChoice.layer_ops`; None: the torch reference)."""
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    arch = read_arch_config(model_path)
    files = safetensors_files(model_path)
    with torch.device(device):
        model = _MODEL_CLASSES[arch.family](arch, dtype, ops)
    load_weights(model, model_path, files)
    return model.eval()


def safetensors_files(model_path: str) -> list[str]:
    """The weight files: those named by `model.safetensors.index.json`, else every `*.safetensors`."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_path, n) for n in names]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index} names {os.path.basename(path)!r}, which is not in the folder")
        return files
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files in model folder {model_path!r}")
    return files


def load_weights(model: LlamaForCausalLM, model_path: str, files: list[str]) -> None:
    params = dict(model.named_parameters())
    expected = {hf for name in params for hf in _hf_names(name, model)}
    found: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                target, shard_id = _our_name(name, model)
                if target not in params or name in found:
                    if name not in expected:
                        logger.debug("ignoring checkpoint tensor %s", name)
                    continue
                _load_one(params[target], SafetensorsSource(handle, name, path), shard_id)
                found.add(name)
    missing = sorted(expected - found)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"tensor {missing[0]!r}{more} is missing from the safetensors files in {model_path!r}")


def _load_one(param: nn.Parameter, source: SafetensorsSource, shard_id: object) -> None:
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        with torch.no_grad():
            loader(param, source, shard_id)
    except ValueError as e:
        raise ValueError(f"{e} (in {source.path})") from None


def _our_name(hf_name: str, model: LlamaForCausalLM) -> tuple[str, object]:
    """HF checkpoint name -> (our parameter name, shard id within a merged parameter)."""
    for hf_part, (merged, shard_id) in model.stacked_params.items():
        if f".{hf_part}." in hf_name:
            return hf_name.replace(f".{hf_part}.", f".{merged}."), shard_id
    return hf_name, None


def _hf_names(name: str, model: LlamaForCausalLM) -> list[str]:
    """Our parameter name -> the HF checkpoint names that fill it."""
    names = [
        name.replace(f".{merged}.", f".{hf_part}.")
        for hf_part, (merged, _) in model.stacked_params.items()
        if f".{merged}." in name
    ]
    return names or [name]
