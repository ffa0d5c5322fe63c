#!/usr/bin/env python3
"""Stream tokens from the minisgl Triton model over gRPC (bidirectional streaming).

    python client_examples/grpc_stream.py "What is the capital of France?" --max-tokens 64
    python client_examples/grpc_stream.py --url localhost:8001 --temperature 0.7 --chat "Tell me a joke"
    python client_examples/grpc_stream.py --chat --tokenizer /path/to/hf/model "Hi"

text_input is a raw prompt; --chat renders it as a user turn with the model's own chat template
(`apply_chat_template` of the tokenizer in --tokenizer, default build/models/smollm2).

Prints each piece of text as it arrives, then the finish reason and token counts.
Ctrl-C cancels the request on the server (stop_stream(cancel_requests=True)).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient


DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "build" / "models" / "smollm2"


def chat_prompt(tokenizer_dir: str, user_text: str) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--url", default="localhost:8001")
    p.add_argument("--model", default="minisgl")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as a user turn with the model's chat template")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer folder whose chat template --chat uses (default: %(default)s)")
    args = p.parse_args()

    prompt = chat_prompt(args.tokenizer, args.prompt) if args.chat else args.prompt
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        sampling["seed"] = args.seed

    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else np.bool_))
        return t

    inputs = [
        tensor("text_input", prompt.encode(), "BYTES"),
        tensor("stream", True, "BOOL"),
        tensor("sampling_parameters", json.dumps(sampling).encode(), "BYTES"),
        tensor("return_finish_reason", True, "BOOL"),
        tensor("return_num_input_tokens", True, "BOOL"),
        tensor("return_num_output_tokens", True, "BOOL"),
    ]
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    start = time.monotonic()
    first = None
    n_out = 0
    try:
        client.async_stream_infer(args.model, inputs, request_id="1", enable_empty_final_response=True)
        while True:
            result, error = results.get()
            if error is not None:
                print(f"\nerror: {error}", file=sys.stderr)
                return 1
            response = result.get_response()
            if response.outputs:
                text = result.as_numpy("text_output")[0].decode("utf-8", errors="replace")
                if text and first is None:
                    first = time.monotonic() - start
                print(text, end="", flush=True)
                n_out += int(result.as_numpy("num_output_tokens")[0])
                reason = result.as_numpy("finish_reason")[0].decode()
                n_in = int(result.as_numpy("num_input_tokens")[0])
            if response.parameters["triton_final_response"].bool_param:
                break
    except KeyboardInterrupt:
        client.stop_stream(cancel_requests=True)
        print("\n[cancelled]", file=sys.stderr)
        return 130
    client.stop_stream()
    total = time.monotonic() - start
    print(f"\n[finish_reason={reason} input_tokens={n_in} output_tokens={n_out} "
          f"ttft={first or 0:.3f}s total={total:.3f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
