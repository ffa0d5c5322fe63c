"""A short soak through tritonserver (benchmarks/soak.py; `make soak` runs it for 10 minutes)."""

from __future__ import annotations

import pytest

from benchmarks.soak import KINDS, run_soak

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.timeout(600)]


def test_short_soak_mixed_traffic(require_triton, tiny_llama, tmp_path):
    result = run_soak(tiny_llama, seconds=20, concurrency=24, max_total_tokens=2048, work_dir=str(tmp_path))
    assert result["failures"] == 0, result["first_failures"]
    assert set(result["by_kind"]) == set(KINDS), result["by_kind"]
    assert result["greedy_checked"] > 0
    assert result["idle_gauges"]["locked"] == 0 and result["idle_gauges"]["running"] == 0
    assert result["leak_log_lines"] == [], result["leak_log_lines"]
    assert result["rss_over_limit"] == {}, result["rss"]
    assert {"tritonserver", "stub", "scheduler0"} <= set(result["rss"])
    assert result["clean_shutdown"]
    assert result["ok"]
