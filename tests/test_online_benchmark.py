"""The online benchmark's bookkeeping: schedules from a trace or Poisson arrivals, per-token ITL
from coalesced responses, goodput under an SLO, and a short in-process run end to end."""

from __future__ import annotations

import json

import pytest

from benchmarks import online_serving as bench


def _args(*extra: str):
    return bench.parse_args(["--decode-streams", "2", "--decode-output-len", "5", "--num-requests", "6",
                             "--input-len", "10", "20", "--output-len", "3", "4", *extra])


def test_trace_file_sets_times_and_lengths(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 10.0, "input_length": 7, "output_length": 2},
        {"timestamp": 10.5, "input_length": 9, "output_length": 3}]) + "\n")
    plan = bench.build_schedule(_args("--trace", str(trace), "--arrival-delay", "0"), vocab=100)
    arrivals = [r for r in plan if r.group == "arrivals"]
    assert [(r.send_at, len(r.input_ids), r.output_len) for r in arrivals] == [(0.0, 7, 2), (0.5, 9, 3)]
    assert [r.group for r in plan[:2]] == ["decode_streams"] * 2


def test_poisson_schedule_is_seeded_and_shares_prefixes():
    args = _args("--request-rate", "4", "--shared-prefix-len", "8", "--num-prefixes", "1")
    plan, again = bench.build_schedule(args, vocab=100), bench.build_schedule(args, vocab=100)
    assert [(r.send_at, r.input_ids) for r in plan] == [(r.send_at, r.input_ids) for r in again]
    arrivals = [r for r in plan if r.group == "arrivals"]
    assert len(arrivals) == 6 and all(10 <= len(r.input_ids) <= 20 for r in arrivals)
    assert len({tuple(r.input_ids[:8]) for r in arrivals}) == 1
    gaps = [b.send_at - a.send_at for a, b in zip(arrivals, arrivals[1:])]
    assert all(g >= 0 for g in gaps) and len(set(gaps)) > 1


def _record(sent: float, times: list[float], counts: list[int]) -> bench.Record:
    rec = bench.Record(bench.PlannedRequest(0.0, [1, 2, 3], sum(counts), "arrivals"), sent=sent)
    rec.times, rec.counts = times, counts
    return rec


def test_coalesced_responses_give_one_itl_per_token():
    rec = _record(0.0, [0.1, 0.2, 0.5], [1, 1, 3])  # the last response carries 3 tokens
    assert bench.per_token_itls(rec) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    summary = bench.summarize([rec, _record(0.0, [2.0, 2.05], [1, 1])], span=2.05, slo_ttft_ms=1000, slo_itl_ms=120)
    assert summary["worst_gap_ms"] == pytest.approx(300)
    assert summary["ttft_ms"]["max"] == pytest.approx(2000)
    assert summary["output_tokens"] == 7 and summary["tokens_per_response"] == pytest.approx(7 / 5)
    assert summary["goodput_requests_per_s"] == pytest.approx(1 / 2.05), "the second misses the TTFT SLO"


def test_inprocess_run_reports_every_group(tiny_llama):
    args = _args("--mode", "inprocess", "--request-rate", "50", "--arrival-delay", "0.05")
    plan = bench.build_schedule(args, vocab=bench.model_vocab(tiny_llama))
    report = bench.run_variant(args, tiny_llama, {"dtype": "float32", "page_size": "4",
                                                  "max_total_tokens": "2048"}, plan, workdir=None)
    for group in ("all", "arrivals", "decode_streams"):
        assert report[group]["completed"] == report[group]["requests"] > 0
    assert report["decode_streams"]["output_tokens"] == 2 * 5
    assert report["cache_hit_rate"] is not None and report["all"]["itl_ms"]["p99"] > 0
