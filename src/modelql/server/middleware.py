"""The edge every HTTP request crosses before routing: metrics, rate limit, auth, body limit.

One pure-ASGI middleware (streaming responses pass through untouched, client disconnects still
reach the route) applied in the spec's order: rate limiting before authentication, both skipped
for the health routes. CORS, when enabled, is Starlette's `CORSMiddleware` placed outside this one,
so preflights are answered without auth.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import ServerConfig
from .errors import error_bytes
from .metrics import Metrics
from .web import PUBLIC_PATHS as PUBLIC  # the web UI's page and assets

EXEMPT = frozenset({"/health", "/v1/health"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
IDLE_BUCKET_SECONDS = 300.0


class TokenBucket:
    """Per-key token buckets: capacity N, refilled N per period; one token per request."""

    def __init__(self, capacity: float, period: float, clock=time.monotonic):
        self.capacity = capacity
        self.rate = capacity / period  # tokens per second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, last update)
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 if allowed, else seconds until a token is available."""
        now = self.clock()
        with self._lock:
            if now - self._last_sweep > IDLE_BUCKET_SECONDS:
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < IDLE_BUCKET_SECONDS}
                self._last_sweep = now
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, config: ServerConfig, metrics: Metrics):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.key_digest = _digest(config.api_key) if config.api_key else None
        rate = config.rate
        self.bucket = TokenBucket(*rate) if rate else None

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def route_template(scope: Scope) -> str:
        """The matched route's path template (set in the scope by the router), for metric labels."""
        route = scope.get("route")
        return getattr(route, "path", None) or "unmatched"

    def client_key(self, scope: Scope) -> str:
        if self.config.trust_forwarded_for:
            fwd = _header(scope, b"x-forwarded-for")
            if fwd:
                return fwd.split(",")[0].strip()
        client = scope.get("client")
        return client[0] if client else "unknown"

    def authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        return hmac.compare_digest(_digest(token.strip()), self.key_digest)

    @staticmethod
    async def _reply(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if self.key_digest is not None and not self.authorized(scope):
                self.metrics.auth_failures.inc()
                await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
                return
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path, method = scope["path"], scope["method"]
        status_box = [500]
        started = time.perf_counter()
        self.metrics.in_flight.inc()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_wrapper, path, method)
        finally:
            self.metrics.in_flight.dec()
            route = self.route_template(scope)
            self.metrics.requests.labels(route, method, str(status_box[0])).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        exempt = path in EXEMPT
        if self.bucket is not None and not exempt:
            wait = self.bucket.take(self.client_key(scope))
            if wait > 0:
                self.metrics.rate_limited.inc()
                await self._reply(send, 429, error_bytes(path, 429, "rate limit exceeded", "rate_limit_exceeded"),
                                  {"Retry-After": str(max(1, math.ceil(wait)))})
                return
        if self.key_digest is not None and not exempt and path not in PUBLIC and not self.authorized(scope):
            self.metrics.auth_failures.inc()
            msg = "Incorrect or missing API key: pass it as 'Authorization: Bearer <key>'"
            await self._reply(send, 401, error_bytes(path, 401, msg, "invalid_api_key"),
                              {"WWW-Authenticate": "Bearer"})
            return
        limit = self.config.max_body_bytes
        too_large = f"request body exceeds the limit of {limit} bytes (--max-body)"
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await self._reply(send, 400, error_bytes(path, 400, "invalid Content-Length header"))
                return
            if n > limit:
                await self._reply(send, 413, error_bytes(path, 413, too_large, "request_too_large"))
                return
        elif method in BODY_METHODS:
            # No declared length (chunked): buffer up to the limit, then replay to the app.
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # client went away
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await self._reply(send, 413, error_bytes(path, 413, too_large, "request_too_large"))
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body, replayed = b"".join(chunks), [False]

            async def replay() -> Message:
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)
