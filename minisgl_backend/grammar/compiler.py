"""Compiling constraints into xgrammar grammars on a worker thread, with a bounded LRU cache.

The scheduler submits a constraint and polls the returned future: compilation never runs on
the scheduler's step loop, so a slow schema does not stall other requests. Equal constraints
(same normalised key) share one compilation; the cache keeps the `capacity` most recently
used ones. A compile error resolves the future with `GrammarError`, whose text is the
compiler's own message.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from minisgl_backend.structured_outputs import StructuredOutputs

# xgrammar prefixes its errors with "[hh:mm:ss] /path/file.cc:line: "; the rest is the message.
_LOG_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class GrammarError(ValueError):
    """The constraint does not compile; str(error) is the compiler's message."""


class GrammarCompiler:
    def __init__(self, tokenizer_factory: Callable[[], Any], vocab_size: int, stop_token_ids: Sequence[int],
                 capacity: int = 64) -> None:
        self._tokenizer_factory = tokenizer_factory  # loaded lazily, on the worker thread
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.capacity = capacity
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self.num_compiled = 0

    def submit(self, constraint: StructuredOutputs) -> Future:
        """A future of the compiled grammar (resolved at once when cached)."""
        key = constraint.key
        with self._lock:
            future = self._cache.get(key)  # a failure is cached too: the compiler is deterministic
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[key] = future
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return future

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ worker thread

    def _compile(self, constraint: StructuredOutputs) -> Any:
        compiler = self._xgrammar_compiler()
        kind = constraint.kind
        try:
            if kind == "json":
                grammar = compiler.compile_grammar(json_schema_ebnf(constraint.json))
            elif kind == "json_object":
                grammar = compiler.compile_grammar(json_schema_ebnf(_ANY_OBJECT))
            elif kind == "regex":
                grammar = compiler.compile_regex(constraint.regex)
            elif kind == "choice":
                grammar = compiler.compile_grammar(choice_ebnf(constraint.choice))
            else:
                grammar = compiler.compile_grammar(constraint.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            message = compiler_message(exc)
            raise GrammarError(f"structured_outputs.{kind} does not compile: {message}") from None
        self.num_compiled += 1
        return grammar

    def _xgrammar_compiler(self):
        if self._compiler is None:
            import xgrammar

            tokenizer = self._tokenizer_factory()
            # the model's own EOS ids; a model whose config names none ends a grammar at the
            # tokenizer's EOS (None: xgrammar reads it from the tokenizer)
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.stop_token_ids or None)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler


# xgrammar 0.2.8 writes the characters of a string with minLength / maxLength as [^"\\\r\n]:
# raw control characters (a tab) pass, which is not JSON, and escapes do not. One JSON character:
_LENGTH_STRING_CHAR = '([^\\"\\\\\\r\\n])'
_JSON_STRING_CHAR = ('([^\\0-\\x1f\\"\\\\] | "\\\\" ([\\"\\\\/bfnrt] | '
                     '"u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]))')


_ANY_OBJECT = '{"type":"object","additionalProperties":true}'  # json_object: an object, not any value


def json_schema_ebnf(schema: str) -> str:
    """The EBNF of a JSON schema (compact separators, no free whitespace), with valid JSON strings."""
    import xgrammar

    return valid_json_strings(str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False)))


def valid_json_strings(ebnf: str) -> str:
    """xgrammar's EBNF with its length-bounded string characters replaced by JSON's (see above)."""
    return ebnf.replace(_LENGTH_STRING_CHAR, _JSON_STRING_CHAR)


def compiler_message(exc: Exception) -> str:
    """xgrammar's error message without its log prefix."""
    return _LOG_PREFIX.sub("", str(exc).strip())


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (JSON string escapes are valid EBNF ones)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)
