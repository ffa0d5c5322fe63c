"""A config.pbtxt with no tensors and no transaction policy: model.py's auto_complete_config
fills in the contract and the decoupled policy, and the model serves."""

from __future__ import annotations

import json
import urllib.request

import pytest

from minisgl_backend.triton.contract import INPUTS, OUTPUTS

pytestmark = [pytest.mark.triton, pytest.mark.timeout(300)]


def test_auto_complete_config(triton_server_factory, tiny_llama, tmp_path):
    from minisgl_backend.triton.repository import SOURCE

    model_dir = tmp_path / "repo" / "minisgl"
    model_dir.mkdir(parents=True)
    (model_dir / "1").symlink_to(SOURCE / "minisgl" / "1", target_is_directory=True)
    (model_dir / "config.pbtxt").write_text(
        'backend: "python"\n'
        f'parameters: {{ key: "model_path" value: {{ string_value: "{tiny_llama}" }} }}\n'
        'parameters: { key: "max_total_tokens" value: { string_value: "4096" } }\n')
    with triton_server_factory("triton-autocomplete", repository=tmp_path / "repo") as srv:
        with urllib.request.urlopen(f"http://{srv.http_url}/v2/models/minisgl/config", timeout=10) as resp:
            config = json.loads(resp.read())
        assert config["model_transaction_policy"]["decoupled"] is True
        assert config["max_batch_size"] == 0
        inputs = {i["name"]: i for i in config["input"]}
        assert set(inputs) == {s.name for s in INPUTS}
        assert inputs["text_input"]["data_type"] == "TYPE_STRING" and inputs["text_input"]["optional"]
        assert {o["name"] for o in config["output"]} == {s.name for s in OUTPUTS}
        status, events = srv.generate({"text_input": "hello", "stream": True,
                                       "parameters": {"max_tokens": 4, "ignore_eos": True}}, stream=True)
        assert status == 200 and len(events) >= 1, events
        status, body = srv.generate({"text_input": "hello", "parameters": {"max_tokens": 4}})
        assert status == 200 and body["text_output"].startswith("hello"), body
