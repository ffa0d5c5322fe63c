"""benchmarks/gpu_report.py: a gpu-check results folder against the GPU issue's targets."""

from __future__ import annotations

import json

from benchmarks.gpu_drive import kv_tokens_read
from benchmarks.gpu_report import report


def _step(bs, step, host, kernels, fraction):
    return {"batch_size": bs, "step_ms": step, "loop_step_ms": step * 0.8, "host_ms": host,
            "kernels_per_layer": kernels, "kernels_per_step": 300, "fraction_of_floor": fraction,
            "loop_fraction_of_floor": fraction / 0.8}


def test_targets_are_read_from_the_stage_outputs(tmp_path):
    decode = {"results": [_step(1, 1.1, 0.5, 10, 0.3), _step(64, 2.0, 0.25, 10, 0.35), _step(256, 3.0, 0.9, 11, 0.45)]}
    (tmp_path / "decode_step.json").write_text(json.dumps(decode, indent=2))
    triton = {"results": [_step(64, 1.6, 0.15, 10, 0.4)]}
    (tmp_path / "decode_step_triton.json").write_text(json.dumps(triton))
    (tmp_path / "decode_step_fp8kv.json").write_text(json.dumps({"results": [_step(256, 2.2, 0.9, 11, 0.5)]}))
    launch = {"results": [{"kind": "elementwise", "us_per_node": 0.01, "replay_us_by_nodes": {"16": 3.0},
                           "census": {"straight_line": True, "node_types": {"kernel": 320}}}]}
    (tmp_path / "graph_launch.json").write_text(json.dumps(launch))
    (tmp_path / "engine.json").write_text(json.dumps({"stage": "engine", "output_tok_per_s": 30000.0}) + "\n")
    (tmp_path / "hf.json").write_text(json.dumps({"stage": "hf", "output_tok_per_s": 1000.0}))
    (tmp_path / "serving.json").write_text("{\"results\": [")  # the stage was killed mid-write
    (tmp_path / "summary.json").write_text('{"stage": "gpu_tests", "rc": 0, "seconds": 80}\n')
    out = report(tmp_path)
    targets = {t["name"]: (t["measured"], t["met"]) for t in out["targets"]}
    assert targets["decode_step_ms_bs1"] == (1.1, True)
    assert targets["decode_step_ms_bs256"] == (3.0, False)
    assert targets["fraction_of_floor_bs256"] == (0.45, True)
    assert targets["host_ms_bs64"] == (0.25, True)
    assert targets["kernels_per_layer"] == (11, True)  # the worst batch size counts
    assert targets["offline_output_tok_per_s"] == (30000.0, False)
    assert targets["offline_vs_transformers"] == (30.0, False)
    rows = {r["batch_size"]: r for r in out["decode_steps"]}
    assert rows[64]["triton_decode_step_ms"] == 1.6 and rows[64]["triton_decode_host_ms"] == 0.15
    assert targets["loop_step_ms_bs1"] == (1.1 * 0.8, True)
    assert "triton_decode_step_ms" not in rows[1]
    assert rows[256]["fp8_kv_step_ms"] == 2.2 and "fp8_kv_step_ms" not in rows[64]
    assert out["graph_launch"] == [{"kind": "elementwise", "us_per_node": 0.01, "replay_us_by_nodes": {"16": 3.0},
                                    "straight_line": True, "node_types": {"kernel": 320}}]
    assert out["serving"] == [] and out["stages"][0]["stage"] == "gpu_tests"
    assert out["offline_output_tok_per_s"] == {"engine": 30000.0, "engine_triton": None, "engine_fp8kv": None,
                                               "engine_normal": None, "hf": 1000.0}


def test_targets_scale_with_the_device_copy_bandwidth(tmp_path):
    """The issue's targets are an H200's (copy bandwidth 4.29 TB/s), "H100: same ratios": on a device
    with half the bandwidth a step may take twice as long and the offline rate be half."""
    decode = {"copy_bandwidth_gb_s": 2145.0, "results": [_step(1, 2.0, 0.5, 10, 0.3), _step(256, 5.5, 1, 9, 0.4)]}
    (tmp_path / "decode_step.json").write_text(json.dumps(decode))
    (tmp_path / "engine.json").write_text(json.dumps({"output_tok_per_s": 21000.0,
                                                      "kv_read_bound_output_tok_per_s": 28000.0}))
    out = report(tmp_path)
    targets = {t["name"]: t for t in out["targets"]}
    assert targets["decode_step_ms_bs1"]["target"] == "<= 2.4" and targets["decode_step_ms_bs1"]["met"]
    assert targets["decode_step_ms_bs256"]["target_h200"] == "<= 2.5" and not targets["decode_step_ms_bs256"]["met"]
    assert targets["offline_output_tok_per_s"]["target"] == ">= 20000.0" and targets["offline_output_tok_per_s"]["met"]
    assert targets["host_ms_bs64"]["target"] == "<= 0.3", "host time does not scale"
    assert out["offline_fraction_of_kv_read_bound"] == 0.75


def test_kv_tokens_read_counts_every_decode_steps_context():
    # 2-token prompt, 3 outputs: the decode steps of outputs 1 and 2 read 3 + 4 positions; a
    # 1-token prompt with 1 output has no decode step
    assert kv_tokens_read([[7, 8], [9]], [3, 1]) == 7


def test_an_empty_results_folder_reports_nothing_measured(tmp_path):
    out = report(tmp_path)
    assert all(t["measured"] is None and t["met"] is None for t in out["targets"])
    assert out["decode_steps"] == [] and out["serving"] == []
