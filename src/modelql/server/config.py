"""`ServerConfig`: every `modelql serve` flag as one record, validated once at startup."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ModelqlError


class ServerConfigError(ModelqlError):
    """A `modelql serve` flag has an invalid value or conflicts with another flag."""


_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0}


def parse_rate_limit(text: str) -> tuple[float, float]:
    """`N/sec|N/min|N/hour` → (capacity N, seconds per N tokens)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*", text.lower())
    if not m or m.group(2) not in _PERIODS or float(m.group(1)) <= 0:
        raise ServerConfigError(f"invalid --rate-limit {text!r}: expected N/sec, N/min or N/hour")
    return float(m.group(1)), _PERIODS[m.group(2)]


def parse_layers(text: str, flag: str = "--layers") -> tuple[int, int]:
    """`a-b` (inclusive) → (a, b); a single `n` is `n-n`."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise ServerConfigError(f"invalid {flag} {text!r}: expected a-b, e.g. 0-15")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise ServerConfigError(f"invalid {flag} {text!r}: end ({b}) must be >= start ({a})")
    return a, b


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_id: str | None = None
    api_key: str | None = None
    rate_limit: str | None = None
    trust_forwarded_for: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    cors: bool = False
    no_infer: bool = False
    embed_only: bool = False
    ffn_only: bool = False
    layers: str | None = None
    experts: str | None = None  # an MoE shard owns only these experts of its layers (--experts a-b)
    max_batch: int = 16          # sequences advanced together in one decode step
    max_queue: int = 64          # sequences waiting for a batch slot; beyond → queue_full_status
    queue_full_status: int = 503  # 503 service_unavailable (default) or 429 rate_limit_exceeded
    max_n: int = 1
    strict_model_name: bool = False
    keepalive_seconds: float = 15.0
    graceful_timeout: float = 10.0  # seconds in-flight requests get on shutdown
    log_level: str = "warning"
    i8_wire: bool = False         # walk-ffn may answer i8 (--enable-i8-wire)
    f16_wire: bool = True         # walk-ffn may answer f16 (--disable-f16-wire turns it off)
    patch_dir: str | None = None  # the only directory patches are read from by name (--patch-dir; /v1/patches/apply, the web UI)
    max_patch_bytes: int = 64 * 1024 * 1024  # largest .vlp file /v1/patches/apply reads from patch_dir

    def __post_init__(self) -> None:
        modes = [f for f, on in (("--no-infer", self.no_infer), ("--embed-only", self.embed_only),
                                 ("--ffn-only", self.ffn_only)) if on]
        if len(modes) > 1:
            raise ServerConfigError(f"{' and '.join(modes)} cannot be combined")
        if self.rate_limit:
            parse_rate_limit(self.rate_limit)
        if self.layers:
            parse_layers(self.layers)
        if self.experts:
            parse_layers(self.experts, "--experts")
            if not self.ffn_only:
                raise ServerConfigError("--experts needs --ffn-only (an expert shard; a full server runs every expert)")
        if self.max_body_bytes < 1:
            raise ServerConfigError("--max-body must be at least 1 byte")
        if self.max_batch < 1 or self.max_queue < 0:
            raise ServerConfigError("--max-batch must be >= 1 and --max-queue >= 0")
        if self.queue_full_status not in (429, 503):
            raise ServerConfigError("--queue-full-status must be 429 or 503")
        if self.patch_dir is not None:
            from pathlib import Path

            if not Path(self.patch_dir).expanduser().is_dir():
                raise ServerConfigError(f"--patch-dir {self.patch_dir}: not a directory")
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"invalid --port {self.port}")

    @property
    def mode(self) -> str:
        """`/v1/stats` mode: full, ffn-service or embed-service (--no-infer is full without inference)."""
        if self.ffn_only:
            return "ffn-service"
        if self.embed_only:
            return "embed-service"
        return "full"

    @property
    def inference(self) -> bool:
        """Whether generation routes (chat/completions, completions, infer) are served."""
        return not (self.no_infer or self.embed_only or self.ffn_only)

    @property
    def rate(self) -> tuple[float, float] | None:
        return parse_rate_limit(self.rate_limit) if self.rate_limit else None

    @property
    def owned_layers(self) -> tuple[int, int] | None:
        return parse_layers(self.layers) if self.layers else None

    @property
    def owned_experts(self) -> tuple[int, int] | None:
        return parse_layers(self.experts, "--experts") if self.experts else None

    def unavailable_reason(self, route: str, group: str) -> str | None:
        """Why `route` (of group `generate` | `embed` | `browse` | `walk_ffn`) is not served, or None."""
        if group == "generate":
            if self.no_infer:
                return "inference disabled (--no-infer)"
            if not self.inference:
                return f"{route} is not served in {self.mode} mode"
        if group == "embed" and self.ffn_only:
            return f"{route} is not served in {self.mode} mode"
        if group in ("browse", "walk_ffn") and self.embed_only:
            return f"{route} is not served in {self.mode} mode"
        return None
