"""Structured output: constraints (JSON schema, regex, choice, EBNF) compiled with xgrammar into
per-request matchers whose token bitmask is applied to the logits before sampling."""

from minisgl_backend.structured_outputs import StructuredOutputs, from_legacy_keys, parse_structured_outputs

__all__ = ["StructuredOutputs", "parse_structured_outputs", "from_legacy_keys"]
