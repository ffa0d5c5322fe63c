"""Endpoints for routers and gateways, on the frontend's own port.

* SGLang's worker probes, which the SGLang Model Gateway (`sglang-router`) calls: `/server_info`
  and `/model_info` (the served model's name and folder: without them the router lists the
  model as `unknown`), `/get_load` (`power_of_two` picks the less loaded of two workers by it),
  plus the `/get_server_info` and `/get_model_info` aliases.
* `/metrics`: tritonserver's metrics text (`--metrics-url`) as it is, followed by vLLM-named
  aliases of the served model's queue and KV gauges (`vllm:num_requests_waiting`,
  `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `vllm:cache_config_info{block_size}`),
  so that an endpoint picker or prometheus-adapter written for vLLM reads them unchanged.

The load and the aliases come from the model's own gauges (`minisgl_num_requests_running`,
`minisgl_num_requests_pending`, `minisgl_kv_cache_usage_ratio`, `minisgl_kv_pages{state}`),
read from tritonserver's metrics endpoint at each call.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.responses import Response

from minisgl_backend.config import CacheConfig, ParallelConfig
from minisgl_backend.openai.errors import OpenAIError
from minisgl_backend.openai.tokenizer_source import TokenizerSource
from minisgl_backend.openai.triton_client import TritonGenerateClient

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_GAUGES = ("minisgl_num_requests_running", "minisgl_num_requests_pending", "minisgl_kv_cache_usage_ratio",
           "minisgl_kv_pages")


def default_metrics_url(triton_url: str, port: int = 8002) -> str:
    """tritonserver's metrics endpoint on the gRPC address's host (`127.0.0.1:8001` ->
    `http://127.0.0.1:8002/metrics`; IPv6 hosts keep their brackets)."""
    host = triton_url.split("://", 1)[-1].lstrip("/")
    if host.startswith("["):
        host = host[:host.index("]") + 1]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return f"http://{host or '127.0.0.1'}:{port}/metrics"


@dataclass
class ModelGauges:
    """The served model's load, from its gauges (summed over model versions)."""

    running: int = 0
    pending: int = 0
    kv_usage: float = 0.0  # share of the KV pages held by live requests
    total_pages: int = 0
    used_pages: int = 0  # neither free nor reclaimable cache

    @classmethod
    def from_text(cls, text: str, model: str) -> "ModelGauges":
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith("minisgl_") or (m := _SAMPLE.match(line)) is None or m.group(1) not in _GAUGES:
                continue
            labels = dict(_LABEL.findall(m.group(2) or ""))
            if labels.get("model") != model:
                continue
            key = m.group(1) + (f":{labels['state']}" if "state" in labels else "")
            values[key] = values.get(key, 0.0) + float(m.group(3))
        total = int(values.get("minisgl_kv_pages:total", 0))
        free, cached = values.get("minisgl_kv_pages:free", 0), values.get("minisgl_kv_pages:cached", 0)
        return cls(running=int(values.get("minisgl_num_requests_running", 0)),
                   pending=int(values.get("minisgl_num_requests_pending", 0)),
                   kv_usage=values.get("minisgl_kv_cache_usage_ratio", 0.0), total_pages=total,
                   used_pages=max(int(total - free - cached), 0))


class TritonMetrics:
    """tritonserver's metrics text, read at each call (HTTP GET in a worker thread)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    async def text(self) -> str:
        try:
            return await asyncio.to_thread(self._fetch)
        except OSError as exc:  # refused, reset, timeout, HTTP error
            raise OpenAIError(503, f"cannot read tritonserver's metrics at {self.url}: {exc}",
                              "service_unavailable", None, "metrics_unavailable") from None

    def _fetch(self) -> str:
        with urllib.request.urlopen(self.url, timeout=self.timeout) as resp:
            return resp.read().decode("utf-8", errors="replace")


@dataclass
class ServedModel:
    """What the router probes ask about: names, folder, cache shape (from the Triton model's config)."""

    name: str
    folder: str | None
    parameters: dict[str, str]

    @property
    def page_size(self) -> int:
        return _int_param(self.parameters, "page_size", CacheConfig.page_size)

    @property
    def tp_size(self) -> int:
        return _int_param(self.parameters, "tp_size", ParallelConfig.tp_size)

    def hf_config(self) -> dict[str, Any]:
        if self.folder is None:
            return {}
        try:
            return json.loads((Path(self.folder) / "config.json").read_text())
        except (OSError, ValueError):
            return {}


def _int_param(parameters: dict[str, str], name: str, default: int) -> int:
    try:
        return int(parameters.get(name) or default)
    except ValueError:
        return default


class GatewayRoutes:
    def __init__(self, model: str, triton_url: str, client: TritonGenerateClient, tokenizers: TokenizerSource,
                 metrics: TritonMetrics, api_key_required: bool) -> None:
        self.model = model
        self.triton_url = triton_url
        self.client = client
        self.tokenizers = tokenizers
        self.metrics = metrics
        self.api_key_required = api_key_required
        self._parameters: dict[str, str] | None = None  # the Triton model's config, once read

    async def served_model(self) -> ServedModel:
        if self._parameters is None:
            try:
                self._parameters = await self.client.model_parameters(timeout=5.0)
            except Exception:  # Triton not up: answer with what is known, ask again next time
                return ServedModel(self.model, self.tokenizers.folder, {})
        if self.tokenizers.folder is None:
            await self.tokenizers.try_load()
        return ServedModel(self.model, self.tokenizers.folder, self._parameters)

    async def get_load(self) -> list[dict[str, int]]:
        """SGLang's load report, one entry per data-parallel rank (one here)."""
        gauges, served = ModelGauges.from_text(await self.metrics.text(), self.model), await self.served_model()
        return [{"dp_rank": 0, "num_reqs": gauges.running + gauges.pending, "num_waiting_reqs": gauges.pending,
                 "num_tokens": gauges.used_pages * served.page_size}]

    async def model_info(self) -> dict[str, Any]:
        served = await self.served_model()
        config = served.hf_config()
        return {"model_path": served.folder or served.name, "tokenizer_path": served.folder,
                "served_model_name": served.name, "is_generation": True, "preferred_sampling_params": None,
                "weight_version": "default", "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": config.get("model_type"), "architectures": config.get("architectures")}

    async def server_info(self) -> dict[str, Any]:
        served = await self.served_model()
        return {"served_model_name": served.name, "model_path": served.folder or served.name,
                "tokenizer_path": served.folder, "triton_url": self.triton_url, "metrics_url": self.metrics.url,
                "tp_size": served.tp_size, "dp_size": 1, "page_size": served.page_size,
                "api_key_required": self.api_key_required, "model_parameters": served.parameters}

    async def prometheus(self) -> Response:
        text = await self.metrics.text()
        served = await self.served_model()
        body = text if text.endswith("\n") or not text else text + "\n"
        body += vllm_aliases(ModelGauges.from_text(text, self.model), served)
        return Response(body, media_type=PROMETHEUS_TEXT)


def vllm_aliases(gauges: ModelGauges, served: ServedModel) -> str:
    """The model's gauges under vLLM's names and `model_name` label, in the text format."""
    label = f'model_name="{_escape(served.name)}"'
    prefix_cache = served.parameters.get("enable_prefix_cache") or "true"
    cache_dtype = served.parameters.get("kv_cache_dtype") or "auto"
    info = (f'block_size="{served.page_size}",cache_dtype="{_escape(cache_dtype)}",'
            f'enable_prefix_caching="{_escape(prefix_cache.capitalize())}",num_gpu_blocks="{gauges.total_pages}"')
    rows = [("vllm:num_requests_running", "Number of requests in model execution batches "
             "(minisgl_num_requests_running).", f"{{{label}}} {gauges.running}"),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed "
             "(minisgl_num_requests_pending).", f"{{{label}}} {gauges.pending}"),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage "
             "(minisgl_kv_cache_usage_ratio).", f"{{{label}}} {gauges.kv_usage!r}"),
            ("vllm:cache_config_info", "Information of the LLMEngine CacheConfig (block_size: the KV page size).",
             f"{{{info},{label}}} 1.0")]
    return "".join(f"# HELP {name} {help_}\n# TYPE {name} gauge\n{name}{sample}\n" for name, help_, sample in rows)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
