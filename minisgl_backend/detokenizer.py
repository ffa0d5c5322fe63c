"""Incremental detokenization with UTF-8-safe streaming and stop strings.

Text is produced with the prefix/read-offset method: keep a small window of recent ids,
`prefix_text = decode(window[:read])`, `new_text = decode(window)`, and emit the difference once
the decoded tail is no longer an incomplete character (U+FFFD). Each step decodes only the
window (a few tokens), not the whole output, so a step costs O(window), not O(n).

Stop strings are matched on the text stream: the earliest occurrence ends the request (only the
text before it is emitted), and any suffix that could still become a stop string is held back
until it either completes one or stops matching (or `flush()` releases it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

__all__ = ["DetokStep", "IncrementalDetokenizer", "StopStringMatcher"]

_REPLACEMENT = "\ufffd"
# Tokens of prompt context used to decode the first output tokens (spaces, merges)
_PROMPT_CONTEXT = 5
# Pending (held back) tokens after which we look for a clean split point to cut the window:
# only pathological streams (e.g. a model repeating a lone UTF-8 lead byte) get there.
_MAX_PENDING = 32


@dataclass
class DetokStep:
    text: str  # newly released text (may be "")
    stopped: bool  # a stop string matched: `text` ends right before it; nothing more follows
    stop_str: str | None = None  # the stop string that matched


class StopStringMatcher:
    """Streams text through, cutting before the first stop string to complete, and holding back
    any suffix that is a proper prefix of a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in dict.fromkeys(stop) if s]
        self._max_len = max((len(s) for s in self.stop), default=0)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Feed text; return what can be released now (check `stopped` afterwards)."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        buf = self.pending + text
        if not buf:
            return ""
        # The stop string that completes first (smallest end) wins, as if the text had arrived
        # one character at a time; among those ending there, the longest. Independent of how
        # the text was chunked.
        cut, end, hit = -1, -1, None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (hit is None or i + len(s) < end or (i + len(s) == end and i < cut)):
                cut, end, hit = i, i + len(s), s
        if hit is not None:
            self.stopped, self.matched, self.pending = True, hit, ""
            return buf[:cut]
        hold = self._held_suffix(buf)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def _held_suffix(self, buf: str) -> int:
        for k in range(min(len(buf), self._max_len - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


# tokenizer -> {(id, skip_special_tokens): decode([id])}: a streamed request decodes each new id
# alone once (it becomes the prefix of the next step), so this halves the decode calls per step
_SINGLE_TOKEN_TEXT: "weakref.WeakKeyDictionary[object, dict[tuple[int, bool], str]]" = weakref.WeakKeyDictionary()


def _single_token_texts(tokenizer) -> dict[tuple[int, bool], str]:
    try:
        return _SINGLE_TOKEN_TEXT.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no shared cache
        return {}


def fast_decoder(tokenizer):
    """`tokenizer.decode`, or the Rust tokenizer's own decode where that gives the same text (a
    fast tokenizer that does not clean up spaces): a third of the cost, paid on every step."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids, skip_special_tokens: backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return tokenizer.decode


class IncrementalDetokenizer:
    """Turns a request's output ids, fed a few at a time, into text pieces.

    Concatenating every `feed(...).text` and the final `flush()` equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)` when no stop string hits (exact for
    byte-level BPE tokenizers; with `prompt_ids`, the first output tokens are decoded in the
    context of the prompt's last tokens, so SentencePiece-style leading spaces are kept).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] | None = None,
                 stop: Sequence[str] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_fn = fast_decoder(tokenizer)
        self._one_token_text = _single_token_texts(tokenizer)
        self._stop = StopStringMatcher(stop or [])
        ctx = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        if ctx and self._decode(ctx).endswith(_REPLACEMENT):
            ctx = []  # the prompt ends inside a character: decoding after it would not be clean
        self._window: list[int] = ctx  # ids from prefix_offset on
        self._read = len(ctx)  # read_offset relative to the window
        self._prefix_text = self._decode(ctx) if ctx else ""
        self.num_tokens = 0  # output ids fed so far
        self._finished = False

    # -------------------------------------------------------------- public API

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def stop_str(self) -> str | None:
        return self._stop.matched

    def feed(self, token_ids: Sequence[int]) -> DetokStep:
        """Add output ids; return the text that became final, and whether a stop string hit."""
        if self._stop.stopped or self._finished:
            return DetokStep("", self._stop.stopped, self._stop.matched)
        if token_ids:
            self._window.extend(int(t) for t in token_ids)
            self.num_tokens += len(token_ids)
        text = self._step()
        out = self._stop.push(text) if text else ""
        return DetokStep(out, self._stop.stopped, self._stop.matched)

    def flush(self) -> str:
        """The request ends: release everything held back (incomplete characters decode to
        U+FFFD exactly as a full decode would). Returns "" after a stop string."""
        if self._stop.stopped or self._finished:
            return ""
        self._finished = True
        tail = ""
        if len(self._window) > self._read:
            tail = self._diff(self._decode(self._window))
        out = self._stop.push(tail) if tail else ""
        if self._stop.stopped:
            return out
        return out + self._stop.flush()

    # -------------------------------------------------------------- internals

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=self.skip_special_tokens)

    def _diff(self, new_text: str) -> str:
        return new_text[len(self._prefix_text):]

    def _advance(self, new_read: int, text_at_read: str) -> str:
        """Emit decode(window[:new_read]) beyond the prefix; move prefix to read, read to new_read."""
        out = text_at_read[len(self._prefix_text):]
        self._window = self._window[self._read:]
        new_read -= self._read
        self._read = new_read
        self._prefix_text = self._decode(self._window[:new_read]) if new_read > 1 else (
            self._decode_one(self._window[0]) if new_read else "")
        return out

    def _decode_one(self, token: int) -> str:
        key = (token, self.skip_special_tokens)
        text = self._one_token_text.get(key)
        if text is None:
            text = self._one_token_text[key] = self._decode([token])
        return text

    def _step(self) -> str:
        if len(self._window) == self._read:
            return ""
        new_text = self._decode(self._window)
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT):
            return self._advance(len(self._window), new_text)
        if len(self._window) - self._read > _MAX_PENDING:
            return self._force_advance(new_text)
        return ""

    def _force_advance(self, new_text: str) -> str:
        """The tail has ended in U+FFFD for many tokens: cut the window at the latest clean
        token boundary, so the window (and the work per step) stays bounded."""
        win = self._window
        for j in range(len(win) - 1, self._read, -1):
            head = self._decode(win[:j])
            if len(head) < len(self._prefix_text):
                continue
            if not head.endswith(_REPLACEMENT) or head + self._decode(win[j:]) == new_text:
                return self._advance(j, head)
        return ""
