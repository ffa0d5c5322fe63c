"""The tensor contract of the `minisgl` Triton model (compatible with Triton's vLLM backend).

One table drives `auto_complete_config`, the request parser and the tests that check
`model_repository/minisgl/config.pbtxt` against it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config name, e.g. "TYPE_STRING"
    dims: tuple[int, ...]
    optional: bool = True

    def as_config(self) -> dict:
        spec = {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}
        if self.optional:
            spec["optional"] = True
        return spec


# Boolean switches of the vLLM-backend contract.
BOOL_INPUTS = (
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "return_logprobs",
)

# Flat sampling tensors (TensorRT-LLM style clients): tensor name -> (Triton type, SamplingParams key).
FLAT_SAMPLING_INPUTS: dict[str, tuple[str, str]] = {
    "max_tokens": ("TYPE_INT32", "max_tokens"),
    "temperature": ("TYPE_FP32", "temperature"),
    "top_p": ("TYPE_FP32", "top_p"),
    "top_k": ("TYPE_INT32", "top_k"),
    "min_p": ("TYPE_FP32", "min_p"),
    "seed": ("TYPE_INT64", "seed"),
    "min_tokens": ("TYPE_INT32", "min_tokens"),
    "repetition_penalty": ("TYPE_FP32", "repetition_penalty"),
    "presence_penalty": ("TYPE_FP32", "presence_penalty"),
    "frequency_penalty": ("TYPE_FP32", "frequency_penalty"),
    "ignore_eos": ("TYPE_BOOL", "ignore_eos"),
    "stop": ("TYPE_STRING", "stop"),
    "stop_token_ids": ("TYPE_INT32", "stop_token_ids"),
}
_LIST_INPUTS = ("stop", "stop_token_ids")

INPUTS: tuple[TensorSpec, ...] = (
    # text_input is optional only so that a request may carry input_ids instead; the parser
    # answers INVALID_ARG when neither is there.
    TensorSpec("text_input", "TYPE_STRING", (1,), optional=True),
    TensorSpec("input_ids", "TYPE_INT32", (-1,)),
    TensorSpec("sampling_parameters", "TYPE_STRING", (1,)),
    *(TensorSpec(name, "TYPE_BOOL", (1,)) for name in BOOL_INPUTS),
    *(TensorSpec(name, dtype, (-1,) if name in _LIST_INPUTS else (1,))
      for name, (dtype, _) in FLAT_SAMPLING_INPUTS.items()),
    # a LoRA control request instead of a prompt (triton/lora_control.py)
    TensorSpec("lora_request", "TYPE_STRING", (1,)),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), optional=False),
    TensorSpec("finish_reason", "TYPE_STRING", (-1,), optional=False),
    TensorSpec("num_input_tokens", "TYPE_UINT32", (-1,), optional=False),
    TensorSpec("num_output_tokens", "TYPE_UINT32", (-1,), optional=False),
    TensorSpec("logprobs", "TYPE_STRING", (-1,), optional=False),
    TensorSpec("prompt_logprobs", "TYPE_STRING", (-1,), optional=False),
)
