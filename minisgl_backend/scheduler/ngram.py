"""The n-gram (prompt-lookup) drafter: drafts from the request's own tokens.

A request's draft is what followed the most recent earlier occurrence of its longest suffix of
`ngram_min`..`ngram_max` tokens, anywhere in its prompt or output: code edits, quoting, lists and
loops repeat their input, and then the draft is often right. `NgramIndex` keeps, per request,
n-gram -> the position after its latest occurrence, updated only with the tokens appended since
the last draft, so a draft costs a few dict lookups, not a scan of the request. Everything runs
on the host, on the ids the scheduler already has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minisgl_backend.batch import Req


@dataclass
class NgramIndex:
    """n-gram (a tuple of n ids, ngram_min <= n <= ngram_max) -> the position that followed its
    latest occurrence in `tokens`, a copy of the request's ids so far."""

    ngram_min: int
    ngram_max: int
    tokens: list[int] = field(default_factory=list)
    following: dict[tuple[int, ...], int] = field(default_factory=dict)

    def catch_up(self, req: Req) -> None:
        """Index the ids the request appended since the last call (its ids only ever grow)."""
        n_in, done = len(req.input_ids), len(self.tokens)
        if done < n_in:
            self.extend(req.input_ids[done:])
            done = n_in
        if done - n_in < len(req.output_ids):
            self.extend(req.output_ids[done - n_in:])

    def extend(self, new_ids: list[int]) -> None:
        tokens, following = self.tokens, self.following
        for token in new_ids:
            end = len(tokens)
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                following[tuple(tokens[end - n:end])] = end
            tokens.append(token)

    def lookup(self) -> int | None:
        """Where the continuation of the longest indexed suffix starts (None: no suffix recurs).
        The suffix's own occurrence is not indexed yet (it is when the next id arrives)."""
        tokens = self.tokens
        for n in range(min(self.ngram_max, len(tokens)), self.ngram_min - 1, -1):
            pos = self.following.get(tuple(tokens[len(tokens) - n:]))
            if pos is not None:
                return pos
        return None

    def draft(self, k: int) -> list[int]:
        """Up to `k` ids that followed the suffix last time; a continuation that reaches the end
        of the request goes on with the draft itself (a loop repeats)."""
        pos = self.lookup()
        if pos is None:
            return []
        tokens, length, out = self.tokens, len(self.tokens), []
        for j in range(k):
            i = pos + j
            out.append(tokens[i] if i < length else out[i - length])
        return out


class NgramDrafter:
    """Prompt lookup: `NgramIndex.draft` over the request's own prompt and output."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def draft(self, req: Req, k: int) -> list[int]:
        return self._index(req).draft(k)

    def would_draft(self, req: Req) -> bool:
        # a suffix that recurs predicts the id in flight: if right, the suffix with it recurs too
        return self._index(req).lookup() is not None

    def _index(self, req: Req) -> NgramIndex:
        if req.ngram is None:
            req.ngram = NgramIndex(self.ngram_min, self.ngram_max)
        req.ngram.catch_up(req)
        return req.ngram
