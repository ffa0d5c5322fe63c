"""The config tree and sampling parameters: conversion from strings, clear errors."""

from __future__ import annotations

import pytest

from minisgl_backend.checkout import ROOT
from minisgl_backend.config import AdapterConfig, ConfigError, EngineConfig, adapter_setting_names, documented_settings
from minisgl_backend.tools.settings_table import settings_table, table_in
from minisgl_backend.sampling_params import SamplingParams


def test_flat_settings_reach_their_sections(tiny_llama):
    cfg = EngineConfig.from_flat({"model_path": tiny_llama, "page_size": "8", "tp_size": "2",
                                  "enable_overlap": "false", "mem_fraction": "0.5", "dtype": "float32"})
    assert cfg.cache.page_size == 8 and cfg.parallel.tp_size == 2
    assert cfg.scheduler.enable_overlap is False and cfg.cache.mem_fraction == 0.5
    assert cfg.dtype_name == "float32"
    assert EngineConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize("name", ["sender_pacing", "fuse_attention_prologue", "lpm_window", "disable_overlap"])
def test_removed_settings_say_so(tiny_llama, name):
    with pytest.raises(ConfigError, match=f"setting '{name}' was removed: "):
        EngineConfig.from_flat({"model_path": tiny_llama, name: "1"})


def test_adapter_settings_convert_and_refuse_engine_names():
    adapter = AdapterConfig.from_flat({"cancel_poll_interval_ms": "20", "cancel_grace_s": "2.5"})
    assert (adapter.cancel_poll_interval_ms, adapter.cancel_grace_s, adapter.stats_interval_ms) == (20, 2.5, 500)
    with pytest.raises(ConfigError, match="unknown adapter setting 'page_size'"):
        AdapterConfig.from_flat({"page_size": 16})
    with pytest.raises(ConfigError, match="cancel_poll_interval_ms must be >= 1"):
        AdapterConfig.from_flat({"cancel_poll_interval_ms": 0})


def test_every_setting_is_documented_and_the_docs_table_is_current():
    names = [name for _, name, _, doc in documented_settings() if doc.strip()]
    assert set(names) == set(EngineConfig().to_flat()) | adapter_setting_names()
    assert len(names) == len(set(names)), "a setting name appears in two sections"
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert table_in(page) == settings_table(), \
        "docs/configuration.md is stale: run python -m minisgl_backend.tools.settings_table --write"


@pytest.mark.parametrize("settings,message", [
    ({"page_sise": 4}, "unknown engine setting 'page_sise'"),
    ({"page_size": "four"}, "'page_size' expects int"),
    ({"page_size": 0}, "page_size must be >= 1"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"mem_fraction": 1.5}, "mem_fraction must be in"),
    ({"model_path": "/does/not/exist"}, "is not a folder"),
])
def test_bad_settings_raise_clear_errors(tiny_llama, settings, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_flat({"model_path": tiny_llama, **settings})


def test_sampling_params_from_strings():
    p = SamplingParams.from_dict({"max_tokens": "16", "temperature": "0.5", "top_k": "40", "seed": "7",
                                  "stop": "END", "stop_token_ids": ["3", 4], "ignore_eos": "true"})
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == \
        (16, 0.5, 40, 7, ["END"], [3, 4], True)


@pytest.mark.parametrize("values,message", [
    ({"max_tokens": 0}, "'max_tokens' must be in \\[1, "),
    ({"temperature": -1}, "'temperature' must be >= 0"),
    ({"top_p": 0}, "'top_p' must be in"),
    ({"top_k": -5}, "'top_k'"),
    ({"min_p": 2}, "'min_p' must be in"),
    ({"max_tokens": "ten"}, "'max_tokens' must be an integer"),
    ({"max_tokens": 1.5}, "'max_tokens' must be an integer"),
    ({"temperature": "hot"}, "'temperature' must be a number"),
    ({"max_tokenz": 3}, "unknown sampling parameter 'max_tokenz'"),
    ({"stop": [1, 2]}, "'stop' must be a string or a list of strings"),
    ({"min_tokens": 9, "max_tokens": 4}, "'min_tokens' must be <= max_tokens"),
    ({"temperature": float("nan")}, "'temperature'"),
    ({"top_k": 2**63}, "'top_k' must be -1"),
    ({"max_tokens": 2**64}, "'max_tokens' must be in"),
    ({"stop_token_ids": [2**63]}, "'stop_token_ids' must be token ids"),
])
def test_bad_sampling_params_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(values)
