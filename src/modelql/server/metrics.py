"""Prometheus metrics with a per-app registry (two apps in one process never share counters)."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the spec asks for text exposition 0.0.4

# `*_created` gauges double every family's series and no dashboard uses them (process-wide switch)
prometheus_client.disable_created_metrics()


class Metrics:
    def __init__(self, model_id: str, version: str):
        self.model = model_id
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build_info = Gauge("modelql_build_info", "modelql version and served model (value 1)",
                                ["version", "model"], registry=r)
        self.build_info.labels(version, model_id).set(1)
        self.requests = Counter("modelql_http_requests_total", "HTTP requests by route template, method, status",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram("modelql_http_request_duration_seconds", "HTTP request duration (to last byte)",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("modelql_http_requests_in_flight", "HTTP requests being answered", registry=r)
        self.prompt_tokens = Counter("modelql_prompt_tokens_total", "prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("modelql_generation_tokens_total", "tokens generated", ["model"],
                                         registry=r)
        self.ttft = Histogram("modelql_time_to_first_token_seconds", "time from admission request to first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("modelql_time_per_output_token_seconds", "time between output tokens of a sequence",
                              ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.queue_depth = Gauge("modelql_queue_depth", "sequences waiting for a batch slot", registry=r)
        self.active_sequences = Gauge("modelql_active_sequences", "sequences in the decode batch", registry=r)
        self.batch_size = Histogram("modelql_decode_batch_size", "sequences advanced per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.rejected = Counter("modelql_queue_rejected_total", "requests rejected because the queue was full",
                                registry=r)
        self.rate_limited = Counter("modelql_rate_limited_total", "requests refused by the rate limiter", registry=r)
        self.auth_failures = Counter("modelql_auth_failures_total", "requests with a missing or wrong API key",
                                     registry=r)

        # the served model's series, looked up once (the engine touches them for every token)
        self.model_prompt_tokens = self.prompt_tokens.labels(model_id)
        self.model_generation_tokens = self.generation_tokens.labels(model_id)
        self.model_ttft = self.ttft.labels(model_id)
        self.model_tpot = self.tpot.labels(model_id)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
