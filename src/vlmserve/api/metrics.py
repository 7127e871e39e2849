"""Prometheus metrics under vLLM's names, so that existing vLLM dashboards and alerts work unchanged.

Owns one `CollectorRegistry` per app (several apps and tests in one process never collide), the per-request
latency histograms and counters the HTTP layer observes (`RequestTracker`), and a collector that reads the
engine's own counters and gauges (running / waiting requests, KV usage, prefix cache, preemptions, generated
tokens) at scrape time, so they are never stale and cost nothing between scrapes. Every series carries a
`model_name` label.

Does not know: HTTP routes, OpenAI shapes, how the engine computes its stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vlmserve.engine.outputs import CompletionDelta

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's bucket boundaries, so that histogram_quantile() over our series and vLLM's compare directly.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

StatsSource = Callable[[], Mapping[str, float]]


class _EngineStatsCollector(Collector):
    """Reads each model's `engine.stats()` when Prometheus scrapes."""

    def __init__(self) -> None:
        self.sources: dict[str, StatsSource] = {}

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "running": GaugeMetricFamily(
                "vllm:num_requests_running", "Requests in the running batch.", labels=["model_name"]
            ),
            "waiting": GaugeMetricFamily(
                "vllm:num_requests_waiting", "Requests waiting to be scheduled.", labels=["model_name"]
            ),
            "kv": GaugeMetricFamily(
                "vllm:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0..1).",
                labels=["model_name"],
            ),
            "encoder": GaugeMetricFamily(
                "vlmserve:encoder_cache_usage_perc",
                "Fraction of the vision-encoder output cache in use (0..1).",
                labels=["model_name"],
            ),
            "stall": GaugeMetricFamily(
                "vlmserve:engine_seconds_since_progress",
                "Seconds since the engine last completed a step, while requests are in flight (0 when idle).",
                labels=["model_name"],
            ),
            # The older name, still read by many dashboards.
            "gpu_kv": GaugeMetricFamily(
                "vllm:gpu_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0..1).",
                labels=["model_name"],
            ),
        }
        counters = {
            "num_preemptions": CounterMetricFamily(
                "vllm:num_preemptions",
                "Requests preempted (KV dropped, recomputed later).",
                labels=["model_name"],
            ),
            "prefix_cache_queries": CounterMetricFamily(
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                labels=["model_name"],
            ),
            "prefix_cache_hits": CounterMetricFamily(
                "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=["model_name"]
            ),
            "images_encoded_total": CounterMetricFamily(
                "vlmserve:images_encoded",
                "Images run through the vision encoder (encoder-cache misses).",
                labels=["model_name"],
            ),
            "encoder_cache_hits_total": CounterMetricFamily(
                "vlmserve:encoder_cache_hits",
                "Images whose encoder output a request found in the encoder cache (not encoded again).",
                labels=["model_name"],
            ),
            "generation_tokens_total": CounterMetricFamily(
                "vllm:generation_tokens", "Tokens generated (sampled).", labels=["model_name"]
            ),
        }
        # Where a Ray ingress's router sent requests (deploy/router.py); only models routed by one report them.
        routed = {
            f"router_affinity_{outcome}_total": CounterMetricFamily(
                f"vlmserve:router_affinity_{outcome}", help_text, labels=["model_name"]
            )
            for outcome, help_text in (
                ("hit", "Requests sent to the replica that holds their image (affinity hits)."),
                ("miss", "Requests with an image new to the router, sent to the least loaded replica."),
                ("spill", "Requests whose image's replica was much busier than another, sent elsewhere."),
                (
                    "unkeyed",
                    "Requests without an image (completions, text-only chats), sent to the least loaded replica.",
                ),
            )
        }
        any_routed = False
        for model_name, source in self.sources.items():
            try:
                stats = source()
            except Exception:
                # A dead engine must not break the scrape of the other models (or of /metrics itself).
                logger.warning("could not read engine stats of %s", model_name, exc_info=True)
                continue
            labels = [model_name]
            gauges["running"].add_metric(labels, float(stats.get("num_requests_running", 0)))
            gauges["waiting"].add_metric(labels, float(stats.get("num_requests_waiting", 0)))
            usage = float(stats.get("kv_cache_usage", 0.0))
            gauges["kv"].add_metric(labels, usage)
            gauges["gpu_kv"].add_metric(labels, usage)
            gauges["encoder"].add_metric(labels, float(stats.get("encoder_cache_usage", 0.0)))
            gauges["stall"].add_metric(labels, float(stats.get("seconds_since_progress", 0.0)))
            for key, family in counters.items():
                family.add_metric(labels, float(stats.get(key, 0)))
            for key, family in routed.items():
                if key in stats:
                    any_routed = True
                    family.add_metric(labels, float(stats[key]))
        yield from gauges.values()
        yield from counters.values()
        if any_routed:
            yield from routed.values()


class ServerMetrics:
    """All metrics of one app, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._engines = _EngineStatsCollector()
        self.registry.register(self._engines)
        r = self.registry
        self.event_loop_lag = Histogram(
            "vlmserve:event_loop_lag_seconds",
            "How late the HTTP front's event-loop timers fire: time the loop spent on other work (or blocked).",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from request arrival to its first output token.",
            ["model_name"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time between consecutive output tokens of one choice.",
            ["model_name"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from request arrival to its last output token.",
            ["model_name"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of the requests served.", ["model_name"], registry=r
        )
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens",
            "Prompt tokens per request.",
            ["model_name"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Generated tokens per finished choice.",
            ["model_name"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Finished choices, by finish reason (stop, length, abort, error).",
            ["model_name", "finished_reason"],
            registry=r,
        )

    def add_model(self, model_name: str, stats: StatsSource) -> None:
        self._engines.sources[model_name] = stats

    def track(self, model_name: str) -> RequestTracker:
        return RequestTracker(self, model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Latency and token accounting of one request, fed with its deltas as they arrive."""

    def __init__(self, metrics: ServerMetrics, model_name: str) -> None:
        self._m = metrics
        self._model = model_name
        self._tpot = metrics.tpot.labels(model_name)  # per token: look the labelled child up once
        self._start = time.perf_counter()
        self._first_token: float | None = None
        self._last_token: dict[int, float] = {}  # choice index -> time of its latest tokens
        self._finished: set[int] = set()

    def on_delta(self, delta: CompletionDelta) -> None:
        now = time.perf_counter()
        model = self._model
        if self._first_token is None and (delta.token_ids or delta.finished):
            self._first_token = now
            self._m.ttft.labels(model).observe(now - self._start)
            self._m.prompt_tokens.labels(model).inc(delta.num_prompt_tokens)
            self._m.request_prompt_tokens.labels(model).observe(delta.num_prompt_tokens)
        if delta.token_ids:
            last = self._last_token.get(delta.index)
            if last is not None:
                # Tokens released together (held back until their text was complete) share the gap.
                per_token = (now - last) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self._tpot.observe(per_token)
            self._last_token[delta.index] = now
        if delta.finished:
            self._finish_choice(delta.index, delta.finish_reason or "stop", delta.num_output_tokens)

    def _finish_choice(self, index: int, reason: str, num_output_tokens: int) -> None:
        if index in self._finished:
            return
        self._finished.add(index)
        self._m.request_success.labels(self._model, reason).inc()
        self._m.request_generation_tokens.labels(self._model).observe(num_output_tokens)

    def close(self, num_choices: int) -> None:
        """The request is over: choices that never finished were aborted (the client went away)."""
        for index in range(num_choices):
            if index not in self._finished:
                self._finish_choice(index, "abort", 0)
        self._m.e2e.labels(self._model).observe(time.perf_counter() - self._start)
