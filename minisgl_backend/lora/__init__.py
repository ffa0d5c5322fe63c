"""Serving LoRA adapters: reading PEFT folders, the registry of names, device slots, the batched delta."""

# beside a Triton model's config.pbtxt: {adapter name: folder}, as Triton's vLLM backend reads it
MULTI_LORA_FILE = "multi_lora.json"
