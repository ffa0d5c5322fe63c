"""Verifying drafted tokens: which of a verify item's sampled ids a request keeps.

A verify item (`ScheduledReq` with drafts d_0..d_{k-1}) computes the request's last token and
its k drafts in one forward; each of those k + 1 positions is a sampling row of its own
(`ScheduledReq.rows`), with its own output position (the step of the counter-based noise), its
penalty history (the token pool up to it, drafts included), its min_tokens suppression and its
grammar mask (the request's matcher advanced over the drafts before it). So row j samples
exactly the id a plain decode step would sample at that position *if* the drafts before it are
the request's real ids: target t_j.

The request keeps t_0..t_a, where a is the first j with t_j != d_j (or k): every kept id is one a
plain decode would have produced, in order, so greedy and seeded sampled outputs are the same
token for token with speculation as without.

For temperature > 0 this exact-match rule *is* rejection sampling with a point-mass draft: the
sampler draws t_j by Gumbel-max over the filtered target distribution p_j, so d_j is accepted
with probability p_j(d_j) = min(1, p_j(d_j) / q(d_j)) with q the point mass on d_j, and, when
rejected, t_j is distributed as p_j without d_j, renormalised: the residual max(0, p_j - q).
The noise of an output position is fixed by (seed, position), so a position that is verified
again in a later step (after an earlier draft was rejected) draws the same sample as a plain
decode would, not a fresh one.
"""

from __future__ import annotations

from typing import Sequence


def accepted_length(drafts: Sequence[int], targets: Sequence[int]) -> int:
    """How many drafts lead `targets` (the sampled ids of the item's rows, len(drafts) + 1)."""
    a = 0
    for draft, target in zip(drafts, targets):
        if draft != target:
            break
        a += 1
    return a


def kept_ids(drafts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """The ids a verify item yields, in order: the accepted drafts and the id after them."""
    return list(targets[:accepted_length(drafts, targets) + 1])
