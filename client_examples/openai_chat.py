#!/usr/bin/env python3
"""Chat with the model through the OpenAI-compatible API (`make serve`, port 9000), streaming.

    python client_examples/openai_chat.py "What is the capital of France?"
    python client_examples/openai_chat.py --base-url http://localhost:9000/v1 --temperature 0.7 "Tell me a joke"

Prints the answer as it arrives, then the finish reason and the token counts.
"""

from __future__ import annotations

import argparse
import sys

from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--base-url", default="http://localhost:9000/v1")
    p.add_argument("--model", default="minisgl")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--system", default=None, help="an optional system message")
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")  # the server checks no key
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    stream = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=args.temperature, stream=True,
                                            stream_options={"include_usage": True})
    reason, usage = None, None
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
            reason = chunk.choices[0].finish_reason or reason
        usage = chunk.usage or usage
    print(f"\n[finish_reason={reason} prompt_tokens={usage.prompt_tokens} "
          f"completion_tokens={usage.completion_tokens}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
