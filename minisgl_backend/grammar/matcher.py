"""Per-request grammar state: an xgrammar matcher that follows the request's accepted tokens."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class GrammarState:
    """The matcher of one request. `accepted` mirrors the output ids the matcher has consumed, so
    the state can be re-synchronised with the request (retraction) by rolling back the suffix
    that differs and re-feeding."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)
        self.accepted: list[int] = []

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False (state unchanged) when the grammar forbids it."""
        if not self._matcher.accept_token(token):
            return False
        self.accepted.append(token)
        return True

    @property
    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        return self._matcher.is_terminated()

    def can_end(self) -> bool:
        """Whether the output so far is a complete match (a stop token would be accepted)."""
        return self._matcher.is_completed()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens of this request into row `row` of `bitmask`."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens."""
        if num_tokens:
            self._matcher.rollback(num_tokens)
            del self.accepted[-num_tokens:]

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (drafts) the grammar accepts in a row from here, up to and with one
        that ends it; the state is left as it was."""
        n = 0
        for token in tokens:
            if self.is_terminated or not self.accept(token):
                break
            n += 1
        self.rollback(n)
        return n

    def fill_masks(self, bitmask: torch.Tensor, first_row: int, drafts: Sequence[int]) -> None:
        """Rows `first_row`, `first_row + 1`, ... of `bitmask`: the allowed next tokens here and
        after each of `drafts` in turn (a verify item's positions); the state is left as it was.
        Rows after a draft the grammar refuses, or after its end, stay as they were: such a
        position is never accepted."""
        self.fill_mask(bitmask, first_row)
        n = 0
        for token in drafts:
            if not self.accept(token):
                break
            n += 1
            if self.is_terminated:
                break
            self.fill_mask(bitmask, first_row + n)
        self.rollback(n)

    def sync(self, output_ids: Sequence[int]) -> int:
        """Make the matcher's consumed tokens equal `output_ids`; returns how many were rolled back."""
        common = 0
        for a, b in zip(self.accepted, output_ids):
            if a != b:
                break
            common += 1
        back = len(self.accepted) - common
        if back:
            self._matcher.rollback(back)
            del self.accepted[common:]
        for token in output_ids[common:]:
            if not self.accept(token):
                raise ValueError(f"token {token} of the output does not match the grammar")
        return back
