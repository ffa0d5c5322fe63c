"""Engine metrics exported on Triton's metrics port through `pb_utils.MetricFamily`.

All calls into the stub go through the adapter's IPC lock (`triton/sender.py`): the Python-backend
stub crashes the server when metric updates race with responses sent from other threads.

Counters:   minisgl_prompt_tokens_total, minisgl_generation_tokens_total,
            minisgl_requests_total{finish_reason}, minisgl_cache_hit_tokens_total,
            minisgl_spec_verify_steps_total, minisgl_spec_draft_tokens_total,
            minisgl_spec_accepted_tokens_total (speculative decoding),
            minisgl_lora_loads_total, minisgl_lora_evictions_total (adapters into / out of device slots)
Histograms: minisgl_time_to_first_token_seconds, minisgl_time_per_output_token_seconds,
            minisgl_e2e_request_latency_seconds, minisgl_request_queue_time_seconds
Gauges:     minisgl_num_requests_running, minisgl_num_requests_pending,
            minisgl_kv_cache_usage_ratio, minisgl_kv_pages{state=total|free|cached|locked},
            minisgl_spec_acceptance_ratio, minisgl_spec_tokens_per_verify_step (since the last
            gauge update that saw speculation), minisgl_lora_adapters_resident,
            minisgl_lora_requests{adapter, state=running|waiting} (as vLLM's lora_requests_info)
Every metric carries the labels model and version. Stubs without HISTOGRAM support get
`<name>_sum` and `<name>_count` counters instead.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from minisgl_backend.messages import FinishReason, StatsEvent

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0]
TPOT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
E2E_BUCKETS = [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0]
FINISH_REASONS = (*(r.value for r in FinishReason), "invalid")  # "invalid": rejected before it was queued
KV_STATES = ("total", "free", "cached", "locked")


class _Histogram:
    def __init__(self, pb_utils: Any, name: str, description: str, labels: dict, buckets: list[float]) -> None:
        family_cls = pb_utils.MetricFamily
        self.native = hasattr(family_cls, "HISTOGRAM")
        if self.native:
            self.family = family_cls(name=name, description=description, kind=family_cls.HISTOGRAM)
            self.metric = self.family.Metric(labels=labels, buckets=buckets)
        else:
            self.sum_family = family_cls(name=f"{name}_sum", description=description, kind=family_cls.COUNTER)
            self.count_family = family_cls(name=f"{name}_count", description=description, kind=family_cls.COUNTER)
            self.sum = self.sum_family.Metric(labels=labels)
            self.count = self.count_family.Metric(labels=labels)

    def close(self) -> None:
        # Metric objects must be deleted before their families (the stub insists)
        for name in ("metric", "sum", "count", "family", "sum_family", "count_family"):
            if hasattr(self, name):
                delattr(self, name)

    def observe(self, value: float) -> None:
        value = max(float(value), 0.0)
        if self.native:
            self.metric.observe(value)
        else:
            self.sum.increment(value)
            self.count.increment(1)


class EngineMetrics:
    """`adapter_names()`: {adapter folder: name} of the LoRA adapters served (the label of their gauges)."""

    def __init__(self, pb_utils: Any, model_name: str, model_version: str,
                 adapter_names: Callable[[], dict[str, str]] = dict) -> None:
        fam = pb_utils.MetricFamily
        labels = {"model": model_name, "version": str(model_version)}
        self._labels = labels
        self._adapter_names = adapter_names
        self._families: list[Any] = []
        self._last_gauges: dict[str, float] = {}
        # what requests recorded and Triton has not been sent yet (see `flush`): every
        # update is a round trip to tritonserver, so none is made on a request's own path
        self._pending_lock = threading.Lock()
        self._pending_counts: dict[Any, int] = {}  # counter -> amount
        self._pending_observations: list[tuple[_Histogram, float]] = []

        def family(name: str, description: str, kind: Any) -> Any:
            f = fam(name=name, description=description, kind=kind)
            self._families.append(f)
            return f

        self.prompt_tokens = family("minisgl_prompt_tokens_total", "Prompt tokens processed",
                                    fam.COUNTER).Metric(labels=labels)
        self.generation_tokens = family("minisgl_generation_tokens_total", "Tokens generated",
                                        fam.COUNTER).Metric(labels=labels)
        self.cache_hit_tokens = family("minisgl_cache_hit_tokens_total",
                                       "Prompt tokens served from the radix (prefix) cache",
                                       fam.COUNTER).Metric(labels=labels)
        requests = family("minisgl_requests_total", "Finished requests by finish reason", fam.COUNTER)
        self.requests = {r: requests.Metric(labels={**labels, "finish_reason": r}) for r in FINISH_REASONS}
        self.ttft = _Histogram(pb_utils, "minisgl_time_to_first_token_seconds",
                               "Time from arrival to the first output token", labels, TTFT_BUCKETS)
        self.tpot = _Histogram(pb_utils, "minisgl_time_per_output_token_seconds",
                               "Mean time per output token after the first, per request", labels, TPOT_BUCKETS)
        self.e2e = _Histogram(pb_utils, "minisgl_e2e_request_latency_seconds",
                              "Time from arrival to the last output", labels, E2E_BUCKETS)
        self.queue = _Histogram(pb_utils, "minisgl_request_queue_time_seconds",
                                "Time from arrival to first scheduled", labels, TTFT_BUCKETS)
        self.running = family("minisgl_num_requests_running", "Requests in the running (decode) set",
                              fam.GAUGE).Metric(labels=labels)
        self.pending = family("minisgl_num_requests_pending", "Requests waiting for prefill",
                              fam.GAUGE).Metric(labels=labels)
        self.kv_usage = family("minisgl_kv_cache_usage_ratio",
                               "Share of KV pages held by live requests (neither free nor reclaimable cache)",
                               fam.GAUGE).Metric(labels=labels)
        kv_pages = family("minisgl_kv_pages", "KV cache pages by state", fam.GAUGE)
        self.kv_pages = {s: kv_pages.Metric(labels={**labels, "state": s}) for s in KV_STATES}
        self.spec_verify_steps = family("minisgl_spec_verify_steps_total",
                                        "Speculative decoding: request-steps that verified drafts",
                                        fam.COUNTER).Metric(labels=labels)
        self.spec_draft_tokens = family("minisgl_spec_draft_tokens_total", "Speculative decoding: drafted tokens",
                                        fam.COUNTER).Metric(labels=labels)
        self.spec_accepted_tokens = family("minisgl_spec_accepted_tokens_total",
                                           "Speculative decoding: drafted tokens the model accepted",
                                           fam.COUNTER).Metric(labels=labels)
        self.spec_acceptance = family("minisgl_spec_acceptance_ratio",
                                      "Speculative decoding: accepted / drafted tokens, recent",
                                      fam.GAUGE).Metric(labels=labels)
        self.spec_tokens_per_step = family("minisgl_spec_tokens_per_verify_step",
                                           "Speculative decoding: tokens a verifying request gets per step, recent",
                                           fam.GAUGE).Metric(labels=labels)
        self._last_spec = (0, 0, 0)  # the StatsEvent's cumulative (verify rows, drafted, accepted)
        self.lora_resident = family("minisgl_lora_adapters_resident", "LoRA adapters in device slots",
                                    fam.GAUGE).Metric(labels=labels)
        self.lora_loads = family("minisgl_lora_loads_total", "LoRA adapters loaded into a device slot",
                                 fam.COUNTER).Metric(labels=labels)
        self.lora_evictions = family("minisgl_lora_evictions_total", "LoRA adapters evicted from a device slot "
                                     "for another", fam.COUNTER).Metric(labels=labels)
        self._last_lora = (0, 0)  # the StatsEvent's cumulative (loads, evictions)
        self._lora_requests_family = family("minisgl_lora_requests", "Requests per LoRA adapter: running "
                                            "(admitted) or waiting", fam.GAUGE)
        self.lora_requests: dict[tuple[str, str], Any] = {}  # (adapter, state) -> gauge, made on first use

    # ------------------------------------------------------------ per request

    def on_first_token(self, ttft_s: float, queue_s: float) -> None:
        """Recorded here, sent to Triton by `flush` (no stub call)."""
        with self._pending_lock:
            self._pending_observations += ((self.ttft, ttft_s), (self.queue, queue_s))

    def on_finish(self, reason: FinishReason, num_input_tokens: int, num_output_tokens: int, cached_tokens: int,
                  e2e_s: float, ttft_s: float | None) -> None:
        """Counters summed and histogram values recorded until `flush` (no stub call)."""
        with self._pending_lock:
            pending = self._pending_counts
            for metric, amount in ((self.requests[reason.value], 1), (self.prompt_tokens, num_input_tokens),
                                   (self.generation_tokens, num_output_tokens),
                                   (self.cache_hit_tokens, cached_tokens)):
                if amount:
                    pending[metric] = pending.get(metric, 0) + amount
            if reason in (FinishReason.STOP, FinishReason.LENGTH):
                self._pending_observations.append((self.e2e, e2e_s))
                if ttft_s is not None and num_output_tokens > 1:
                    self._pending_observations.append((self.tpot, (e2e_s - ttft_s) / (num_output_tokens - 1)))

    def on_invalid(self) -> None:
        self.requests["invalid"].increment(1)

    def flush(self, max_observations: int | None = None) -> bool:
        """Send the summed counters and up to `max_observations` recorded histogram values (all by
        default) to Triton; True when something is left for the next call."""
        with self._pending_lock:
            counts, self._pending_counts = self._pending_counts, {}
            observations = self._pending_observations
            if max_observations is not None and len(observations) > max_observations:
                self._pending_observations = observations[max_observations:]
                observations = observations[:max_observations]
            else:
                self._pending_observations = []
            more = bool(self._pending_observations)
        for metric, amount in counts.items():
            metric.increment(amount)
        for histogram, value in observations:
            histogram.observe(value)
        return more

    # ------------------------------------------------------------ gauges

    def update_stats(self, stats: StatsEvent) -> None:
        """Set the gauges that changed since the last call (an idle server makes no stub calls:
        a metric update that reaches the backend while the model unloads deadlocks the unload)."""
        total, free, cached = stats.total_pages, stats.free_pages, stats.cached_pages
        values = {"running": stats.running, "pending": stats.pending, "lora_resident": stats.lora_resident,
                  "kv_usage": max(total - free - cached, 0) / total if total else 0.0,
                  **{f"kv_{state}": getattr(stats, f"{state}_pages") for state in KV_STATES}}
        for key, value in values.items():
            if self._last_gauges.get(key) == value:
                continue
            gauge = self.kv_pages[key[3:]] if key.startswith("kv_") and key != "kv_usage" else getattr(self, key)
            gauge.set(value)
            self._last_gauges[key] = value
        self._update_speculation(stats)
        self._update_lora(stats)

    def _update_lora(self, stats: StatsEvent) -> None:
        names = self._adapter_names() if stats.lora_requests or self.lora_requests else {}
        counts = {}
        for path, pair in stats.lora_requests.items():
            for state, value in zip(("running", "waiting"), pair):
                counts[(names.get(path, path), state)] = value
        for key in set(counts) | set(self.lora_requests):
            self._set_gauge(f"lora_requests{key}", self._lora_gauge(key), counts.get(key, 0))
        now = (stats.lora_loads, stats.lora_evictions)
        delta = [b - a for a, b in zip(self._last_lora, now)] if now[0] >= self._last_lora[0] else list(now)
        self._last_lora = now
        for metric, amount in zip((self.lora_loads, self.lora_evictions), delta):
            if amount > 0:
                metric.increment(amount)

    def _update_speculation(self, stats: StatsEvent) -> None:
        """The speculation counters grow by what the scheduler's cumulative counts grew by since
        the last update; the two gauges describe that interval (left as they are when it saw no
        speculation, so an idle server makes no stub call)."""
        now = (stats.spec_verify_rows, stats.spec_draft_tokens, stats.spec_accepted_tokens)
        # counts below the last ones: the engine restarted, count from zero
        delta = [b - a for a, b in zip(self._last_spec, now)] if now[0] >= self._last_spec[0] else list(now)
        self._last_spec = now
        rows, drafted, accepted = delta
        if rows <= 0:
            return
        for metric, amount in ((self.spec_verify_steps, rows), (self.spec_draft_tokens, drafted),
                               (self.spec_accepted_tokens, accepted)):
            if amount:
                metric.increment(amount)
        self.spec_acceptance.set(accepted / drafted if drafted else 0.0)
        self.spec_tokens_per_step.set(1.0 + accepted / rows)

    def _lora_gauge(self, key: tuple[str, str]) -> Any:
        gauge = self.lora_requests.get(key)
        if gauge is None:
            labels = {**self._labels, "adapter": key[0], "state": key[1]}
            gauge = self.lora_requests[key] = self._lora_requests_family.Metric(labels=labels)
        return gauge

    def _set_gauge(self, key: str, gauge: Any, value: float) -> None:
        if self._last_gauges.get(key) != value:
            gauge.set(value)
            self._last_gauges[key] = value

    def close(self) -> None:
        # Metric objects must go before their families (the stub insists)
        for hist in (self.ttft, self.tpot, self.e2e, self.queue):
            hist.close()
        self.requests.clear()
        self.kv_pages.clear()
        self.lora_requests.clear()
        for name in ("prompt_tokens", "generation_tokens", "cache_hit_tokens", "running", "pending", "kv_usage",
                     "spec_verify_steps", "spec_draft_tokens", "spec_accepted_tokens", "spec_acceptance",
                     "spec_tokens_per_step", "lora_resident", "lora_loads", "lora_evictions"):
            setattr(self, name, None)
        self._families.clear()
