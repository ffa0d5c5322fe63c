"""Token sampling on the device, vectorised over the batch.

Pipeline per row (each step optional, skipped for the whole batch when no row needs it):

    logit bias -> suppress ids -> penalties -> [greedy rows: argmax]
                                 [other rows: temperature -> top-k -> top-p -> min-p -> Gumbel-max]

Randomness is counter based: the noise of row b at vocabulary index v is a pure function of
(seed_b, step_b, v) (an integer avalanche hash computed with int64 tensor ops), so a request's
token depends only on its own logits, seed and output position, never on its batch-mates, its
position in the batch, or how many random numbers other code drew. Seeds are always supplied
by the caller (the scheduler draws one for each unseeded request).

Log-probs (when asked) are `log_softmax` of the RAW logits (before logit bias / penalties /
temperature / filtering) at the chosen token; `logprob_details` adds its rank and the most likely
tokens of the same distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.engine.transfer import to_device
from minisgl_backend.kvcache.staging import HostStaging

__all__ = [
    "SamplingTensors",
    "PenaltyInputs",
    "Sampler",
    "apply_penalties",
    "apply_temperature_and_filters",
    "hash_uniform",
    "hash32",
]

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF


# ---------------------------------------------------------------- counter-based noise


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """In place: x = (x * c) mod 2^32 for int64 0 <= x < 2^32, without any signed overflow.

    c is split into 16-bit halves, so every intermediate stays below 2^49: CPU and CUDA agree
    and no (undefined) wrap-around is relied upon.
    """
    lo = c & _M16
    hi = c >> 16
    t = x * hi
    t.bitwise_and_(_M16).bitwise_left_shift_(16)
    return x.mul_(lo).add_(t).bitwise_and_(_M32)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """In-place lowbias32 (Chris Wellons), a 32-bit avalanche hash on int64 values in [0, 2^32)."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    x.bitwise_xor_(x >> 16)
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 values in [0, 2^32) -> int64 in [0, 2^32) (a bijection)."""
    return _hash32_(x.to(torch.int64, copy=True))


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from a 63-bit seed and a 63-bit step ([B] int64 -> [B] int64)."""
    k = hash32((seeds & _M32) ^ 0x68E31DA4)
    k = hash32(k ^ ((seeds >> 32) & _M32))
    k = hash32(k ^ (steps & _M32))
    k = hash32(k ^ ((steps >> 32) & _M32) ^ 0x1B56C4E9)
    return k


def _index_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    v = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return hash32(hash32(v ^ 0x2545F491) ^ 0x9E3779B9)


def _uniform_from_bits_(x: torch.Tensor) -> torch.Tensor:
    # top 23 bits + 0.5, exact in float32 (24 significant bits), times 2^-23: strictly inside
    # (0, 1). With 24 bits, 2^24 - 1 + 0.5 rounds to 2^24, i.e. u = 1.0 and an infinite Gumbel
    # sample for one index in 2^24: ~1 % of the rows of a 150k vocabulary.
    return x.bitwise_right_shift_(9).to(torch.float32).add_(0.5).mul_(1.0 / 8388608.0)


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int,
                 index_hash: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform noise in the open interval (0, 1), shape [B, vocab_size], float32.

    Element (b, v) depends only on (seeds[b], steps[b], v): a row's noise never depends on the
    rest of the batch.
    """
    if index_hash is None:
        index_hash = _index_hash(vocab_size, seeds.device)
    keys = _row_keys(seeds.to(torch.int64), steps.to(torch.int64))
    bits = index_hash.unsqueeze(0) ^ keys.unsqueeze(1)  # fresh [B, V] tensor, hashed in place
    return _uniform_from_bits_(_hash32_(bits))


def _gumbel(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int,
            index_hash: torch.Tensor | None) -> torch.Tensor:
    u = hash_uniform(seeds, steps, vocab_size, index_hash)
    return u.log_().neg_().log_().neg_()  # -log(-log(u)), a standard Gumbel sample


# ---------------------------------------------------------------- per-batch tensors


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device, plus batch-level flags for the fast paths.

    The per-row tensors are None when the batch is all greedy without penalties (nothing reads them).
    Conventions: `top_k` 0 = off (top_k -1/0 from the user, or greedy rows); `top_p` 1.0 = off;
    `log_min_p` -inf = off; `temperatures` is 1.0 on greedy rows (never divided by 0).
    """

    temperatures: torch.Tensor | None  # [B] float32
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    log_min_p: torch.Tensor | None  # [B] float32, log(min_p) or -inf
    seeds: torch.Tensor | None  # [B] int64
    steps: torch.Tensor | None  # [B] int64 (output position of the token being sampled)
    greedy: torch.Tensor | None  # [B] bool
    repetition_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    sample_rows: torch.Tensor | None  # [S] int64 rows to sample when the batch is mixed, else None
    batch_size: int
    all_greedy: bool
    any_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    need_penalties: bool
    need_repetition: bool
    need_presence_frequency: bool
    need_logprobs: bool
    max_top_k: int  # largest top_k among sampled rows (0 if none uses top-k)
    all_sampled_have_top_k: bool  # every sampled row restricts to its top-k

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
              device: torch.device | str = "cpu", staging: HostStaging | None = None) -> "SamplingTensors":
        """Flags on the host; the per-row tensors (one host->device copy per dtype, none at all for
        a greedy batch without penalties, whose tensors are then None) through `staging`."""
        n = len(params)
        if len(seeds) != n or len(steps) != n:
            raise ValueError(f"got {n} params, {len(seeds)} seeds, {len(steps)} steps")
        if all(plain_greedy(p) for p in params):  # the common serving case: no tensor, no list
            return cls.plain_greedy(n)
        greedy = [p.is_greedy for p in params]
        temps = [1.0 if g else float(p.temperature) for p, g in zip(params, greedy)]
        top_k = [0 if (g or p.top_k <= 0) else int(p.top_k) for p, g in zip(params, greedy)]
        top_p = [1.0 if g else float(p.top_p) for p, g in zip(params, greedy)]
        min_p = [0.0 if g else float(p.min_p) for p, g in zip(params, greedy)]
        log_min_p = [math.log(m) if m > 0 else -math.inf for m in min_p]
        rep = [float(p.repetition_penalty) for p in params]
        pres = [float(p.presence_penalty) for p in params]
        freq = [float(p.frequency_penalty) for p in params]

        sampled = [i for i, g in enumerate(greedy) if not g]
        all_greedy = not sampled
        any_greedy = len(sampled) < n
        need_rep = any(r != 1.0 for r in rep)
        need_pf = any(x != 0.0 for x in pres) or any(x != 0.0 for x in freq)
        floats = ints = sample_rows = None
        if not all_greedy or need_rep or need_pf:  # greedy without penalties reads none of them
            stage = staging.to_device if staging is not None else (lambda a: to_device(torch.from_numpy(a), device))
            floats = stage(np.array([temps, top_p, min_p, log_min_p, rep, pres, freq], dtype=np.float32).ravel())
            floats = floats.view(7, n)
            ints = stage(np.array([top_k, [int(s) for s in seeds], [int(s) for s in steps], greedy],
                                  dtype=np.int64).ravel()).view(4, n)
            if sampled and any_greedy:
                sample_rows = stage(np.array(sampled, dtype=np.int64))
        row = lambda t, i: None if t is None else t[i]  # noqa: E731
        sampled_k = [top_k[i] for i in sampled]
        return cls(
            temperatures=row(floats, 0), top_p=row(floats, 1), min_p=row(floats, 2), log_min_p=row(floats, 3),
            repetition_penalty=row(floats, 4), presence_penalty=row(floats, 5), frequency_penalty=row(floats, 6),
            top_k=row(ints, 0), seeds=row(ints, 1), steps=row(ints, 2),
            greedy=None if ints is None else ints[3].bool(),
            sample_rows=sample_rows,
            batch_size=n,
            all_greedy=all_greedy,
            any_greedy=any_greedy,
            need_top_k=any(k > 0 for k in sampled_k),
            need_top_p=any(top_p[i] < 1.0 for i in sampled),
            need_min_p=any(min_p[i] > 0.0 for i in sampled),
            need_penalties=need_rep or need_pf,
            need_repetition=need_rep,
            need_presence_frequency=need_pf,
            need_logprobs=any(p.logprobs for p in params),
            max_top_k=max(sampled_k, default=0),
            all_sampled_have_top_k=bool(sampled_k) and all(k > 0 for k in sampled_k),
        )

    @classmethod
    def plain_greedy(cls, n: int) -> "SamplingTensors":
        """What `build` makes of n greedy rows without penalties or logprobs."""
        return cls(temperatures=None, top_k=None, top_p=None, min_p=None, log_min_p=None, seeds=None,
                   steps=None, greedy=None, repetition_penalty=None, presence_penalty=None,
                   frequency_penalty=None, sample_rows=None, batch_size=n, all_greedy=True, any_greedy=n > 0,
                   need_top_k=False, need_top_p=False, need_min_p=False, need_penalties=False,
                   need_repetition=False, need_presence_frequency=False, need_logprobs=False, max_top_k=0,
                   all_sampled_have_top_k=False)

    def select(self, rows: torch.Tensor) -> "SamplingTensors":
        """The per-row tensors restricted to `rows` (flags kept: they stay valid supersets)."""
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        return SamplingTensors(
            temperatures=pick(self.temperatures), top_k=pick(self.top_k), top_p=pick(self.top_p),
            min_p=pick(self.min_p), log_min_p=pick(self.log_min_p), seeds=pick(self.seeds),
            steps=pick(self.steps), greedy=pick(self.greedy),
            repetition_penalty=pick(self.repetition_penalty),
            presence_penalty=pick(self.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty),
            sample_rows=None, batch_size=int(rows.numel()),
            all_greedy=self.all_greedy, any_greedy=self.any_greedy, need_top_k=self.need_top_k,
            need_top_p=self.need_top_p, need_min_p=self.need_min_p,
            need_penalties=self.need_penalties, need_repetition=self.need_repetition,
            need_presence_frequency=self.need_presence_frequency, need_logprobs=self.need_logprobs,
            max_top_k=self.max_top_k, all_sampled_have_top_k=self.all_sampled_have_top_k,
        )


def plain_greedy(p: SamplingParams) -> bool:
    """Greedy without penalties or logprobs: the row's argmax is its next id."""
    return p.argmax_only


# ---------------------------------------------------------------- penalties


def _counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] int64 with -1 padding -> [B, V] float32 occurrence counts (ids >= V are ignored)."""
    ids = ids.to(torch.int64)
    valid = (ids >= 0) & (ids < vocab_size)
    idx = torch.where(valid, ids, torch.full_like(ids, vocab_size))
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, idx, valid.to(torch.float32))
    return counts[:, :vocab_size]


@dataclass
class PenaltyInputs:
    """What the penalties need to know about each row's history, as dense [B, V] tensors.

    `output_counts`: how often each token occurs in the row's OUTPUT so far (presence/frequency).
    `seen`: the token occurs in the prompt or the output (repetition penalty, HF semantics).
    """

    output_counts: torch.Tensor  # [B, V] float32
    seen: torch.Tensor | None  # [B, V] bool, None when no prompt ids were given

    @classmethod
    def build(cls, output_ids: torch.Tensor, vocab_size: int,
              prompt_ids: torch.Tensor | None = None) -> "PenaltyInputs":
        """From padded id tensors on the device: output_ids [B, L], prompt_ids [B, P] (-1 = pad)."""
        counts = _counts(output_ids, vocab_size)
        seen = counts > 0
        if prompt_ids is not None:
            seen = seen | (_counts(prompt_ids, vocab_size) > 0)
        return cls(output_counts=counts, seen=seen)


def apply_penalties(logits: torch.Tensor, st: SamplingTensors, pen: PenaltyInputs) -> torch.Tensor:
    """Penalised copy of `logits` [B, V].

    repetition (HF): for tokens seen in prompt or output, logit / r if logit > 0 else logit * r.
    presence / frequency (OpenAI): logit - frequency * count - presence * (count > 0), counting
    OUTPUT tokens only. Rows with neutral values are left bit-identical.
    """
    if st.need_repetition:
        seen = pen.seen if pen.seen is not None else pen.output_counts > 0
        r = st.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    if st.need_presence_frequency:
        counts = pen.output_counts
        logits = (logits - st.frequency_penalty.unsqueeze(1) * counts
                  - st.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype))
    return logits


# ---------------------------------------------------------------- filters


def apply_temperature_and_filters(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits / T, then top-k, top-p, min-p; filtered entries become -inf. Rows of `st` must
    match the rows of `logits` (use `st.select(rows)` for a subset). The top token always stays.
    """
    neg_inf = float("-inf")
    logits = logits / st.temperatures.unsqueeze(1)
    vocab = logits.shape[1]
    if st.need_top_k or st.need_top_p:
        k = st.top_k.clamp(max=vocab)
        if st.all_sampled_have_top_k and st.max_top_k < vocab:
            vals, idx = torch.topk(logits, st.max_top_k, dim=1, largest=True, sorted=True)
        else:
            vals, idx = torch.sort(logits, dim=1, descending=True, stable=True)
        width = vals.shape[1]
        pos = torch.arange(width, device=logits.device).unsqueeze(0)
        keep = torch.ones_like(vals, dtype=torch.bool)
        if st.need_top_k:
            keep = keep & ((k.unsqueeze(1) <= 0) | (pos < k.unsqueeze(1)))
        if st.need_top_p:
            masked = vals.masked_fill(~keep, neg_inf)
            probs = torch.softmax(masked, dim=1)
            before = torch.cumsum(probs, dim=1) - probs  # mass strictly before this token
            top_p = st.top_p.unsqueeze(1)
            keep = keep & ((before < top_p) | (top_p >= 1.0))
        keep[:, 0] = True
        logits = torch.full_like(logits, neg_inf).scatter_(1, idx, vals.masked_fill(~keep, neg_inf))
    if st.need_min_p:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
        row_max = logits.max(dim=1, keepdim=True).values
        logits = logits.masked_fill(logits < row_max + st.log_min_p.unsqueeze(1), neg_inf)
    return logits


# ---------------------------------------------------------------- sampler


class Sampler:
    """Stateless apart from a cache of the per-vocabulary-index hash (one per vocab size/device)."""

    def __init__(self) -> None:
        self._index_hash: dict[tuple[int, str], torch.Tensor] = {}

    def index_hash(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        key = (vocab_size, str(device))
        h = self._index_hash.get(key)
        if h is None:
            h = self._index_hash[key] = _index_hash(vocab_size, device)
        return h

    def process_logits(self, logits: torch.Tensor, st: SamplingTensors,
                       penalties: PenaltyInputs | None = None,
                       suppress_ids: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logit bias, suppression and penalties (applied to every row, greedy ones included)."""
        if bias is not None:
            logits = logits + bias
        if suppress_ids is not None:
            logits = _suppress(logits, suppress_ids)
        if st.need_penalties:
            if penalties is None:
                raise ValueError("a request in the batch uses penalties but no PenaltyInputs were given")
            logits = apply_penalties(logits, st, penalties)
        return logits

    def sample(self, logits: torch.Tensor, st: SamplingTensors,
               penalties: PenaltyInputs | None = None, *,
               suppress_ids: torch.Tensor | None = None,
               bias: torch.Tensor | None = None,
               return_logprobs: bool = False):
        """Next token per row: LongTensor [B]; with `return_logprobs`, (ids, logprobs [B] float32).

        logits: [B, V] (float32 recommended; other dtypes are upcast).
        penalties: needed when `st.need_penalties`.
        suppress_ids: optional [B, S] int64 (-1 = pad) ids forced to -inf (e.g. EOS before
            min_tokens); they are never chosen unless a row suppresses everything.
        bias: optional [B, V] float32 added to the logits first (`dense_logit_bias`).
        """
        raw = logits if logits.dtype == torch.float32 else logits.float()
        proc = self.process_logits(raw, st, penalties, suppress_ids, bias)
        if st.all_greedy:
            ids = argmax_rows(proc)
        else:
            if st.any_greedy:
                rows = st.sample_rows
                sub = self._sample_rows(proc.index_select(0, rows), st.select(rows))
                ids = argmax_rows(proc).index_copy_(0, rows, sub)
            else:
                ids = self._sample_rows(proc, st)
        if not return_logprobs:
            return ids
        logprobs = torch.log_softmax(raw, dim=1).gather(1, ids.unsqueeze(1)).squeeze(1)
        return ids, logprobs

    def _sample_rows(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        filtered = apply_temperature_and_filters(logits, st)
        vocab = filtered.shape[1]
        g = _gumbel(st.seeds, st.steps, vocab, self.index_hash(vocab, filtered.device))
        return argmax_rows(g.add_(filtered))


def logprob_details(logits: torch.Tensor, ids: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of each row's `ids` under log_softmax(logits [B, V]): (logprob [B], rank [B] int64, 1 for
    the most likely token, ids [B, k] and logprobs [B, k] of the k most likely tokens, best first)."""
    lp = torch.log_softmax(logits.float(), dim=1)
    chosen = lp.gather(1, ids.view(-1, 1).to(torch.int64))
    rank = (lp > chosen).sum(dim=1) + 1
    top_lp, top_ids = torch.topk(lp, min(k, lp.shape[1]), dim=1, largest=True, sorted=True)
    return chosen.squeeze(1), rank, top_ids, top_lp


def dense_logit_bias(biases: Sequence[dict[int, float] | None], vocab_size: int,
                     staging: HostStaging) -> torch.Tensor | None:
    """[B, V] float32 on the device: each row's `logit_bias` (ids past the vocabulary ignored);
    None when no row has one."""
    if not any(biases):
        return None
    entries = [(row, token, value) for row, bias in enumerate(biases) for token, value in (bias or {}).items()
               if token < vocab_size]
    cells = staging.to_device(np.array([row * vocab_size + token for row, token, _ in entries], dtype=np.int64))
    values = staging.to_device(np.array([value for _, _, value in entries], dtype=np.float32))
    dense = torch.zeros(len(biases) * vocab_size, dtype=torch.float32, device=cells.device)
    return dense.index_copy_(0, cells, values).view(len(biases), vocab_size)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=1) as int64; on the CPU through numpy, whose argmax is faster than torch's
    there. Same result: the first maximal index, a NaN counting as the maximum."""
    if x.is_cpu and x.dim() == 2 and x.dtype in (torch.float32, torch.float64) and x.shape[1] > 0:
        return torch.from_numpy(np.argmax(x.numpy(), axis=1).astype(np.int64, copy=False))
    return x.argmax(dim=1)


def _suppress(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[1]
    ids = ids.to(device=logits.device, dtype=torch.int64)
    valid = (ids >= 0) & (ids < vocab)
    idx = torch.where(valid, ids, torch.full_like(ids, vocab))  # padding goes to a spare column
    mask = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    mask.scatter_(1, idx, True)
    return logits.masked_fill(mask[:, :vocab], float("-inf"))
