"""`RemoteFfn`: an `FfnBackend` whose layers run on FFN shards over `/v1/walk-ffn`.

Embeddings, attention and the KV cache stay local; each layer's normalised FFN input is sent to
a shard owning that layer (binary wire, f32 request, f32/f16/i8 response; or with `q8k` the rows
quantised to Q8_K on LARQL's `/v1/walk-ffn-q8k`) and its raw FFN output comes back; the runtime then applies the post-FFN norm and the residual add, as for a local FFN.
All rows of a call (prefill: every prompt position; batched decode: one per sequence) travel in
one request, since the FFN is position-wise.

Shard map: `--ffn` entries `URL` (its layers read from the shard's `/v1/stats` `owned_layers`;
null means all) or `a-b=URL`. Several shards owning a layer are replicas: requests go to the
first healthy one; a connection failure, timeout or 5xx marks it down for `retry_after` seconds
and the same request goes to the next replica. With none left the error names every shard tried
and the layer. Each shard has one persistent `httpx.Client` (keep-alive).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import CapabilityError, RemoteError
from . import q8k_wire, wire

#: What `--wire` may name: a response dtype of `/v1/walk-ffn`, or `q8k` (requests to LARQL's
#: `/v1/walk-ffn-q8k`, rows quantised to Q8_K, f32 answers; a shard without it gets f32 frames).
CLIENT_WIRES = (*wire.WIRE_DTYPES, "q8k")
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRY_AFTER = 30.0
_ENTRY = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*=\s*(\S+)\s*$")


@dataclass
class ShardEntry:
    """One `--ffn` entry: a URL and the layers it owns (None: ask the shard)."""

    url: str
    layers: tuple[int, int] | None = None


def parse_shards(spec: str | Sequence[str]) -> list[ShardEntry]:
    """`URL[,URL...]` or `a-b=URL[,...]` (entries may also be given as a list)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[ShardEntry] = []
    for item in items:
        for raw in str(item).split(","):
            entry = raw.strip()
            if not entry:
                continue
            m = _ENTRY.match(entry)
            if m:
                a, b, url = int(m.group(1)), int(m.group(2)), m.group(3)
                if b < a:
                    raise RemoteError(f"--ffn {entry!r}: end ({b}) must be >= start ({a})")
                out.append(ShardEntry(_url(url, entry), (a, b)))
            elif "=" in entry.split("://")[0]:
                raise RemoteError(f"--ffn: expected 'URL' or 'START-END=URL', got {entry!r}")
            else:
                out.append(ShardEntry(_url(entry, entry)))
    if not out:
        raise RemoteError("--ffn needs at least one shard URL")
    return out


def _url(url: str, entry: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        raise RemoteError(f"--ffn: {entry!r} is not an http(s) URL")
    return url.rstrip("/")


@dataclass
class ShardStats:
    """What a client counts: requests, bytes on the wire (bodies), failovers."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    failovers: int = 0
    seconds: float = 0.0


class Shard:
    """One FFN server: a persistent HTTP client and its health."""

    def __init__(self, url: str, layers: tuple[int, int], timeout: float, api_key: str | None, accept: str):
        import httpx

        self.url = url
        self.layers = layers
        headers = {"Content-Type": wire.MEDIA_F32, "Accept": accept}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.client = httpx.Client(base_url=url, timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=300))
        self.down_until = 0.0
        self.last_error: str | None = None
        self.q8k = True  # until the shard answers 404 to /v1/walk-ffn-q8k
        self.experts: tuple[int, int] | None = None  # of an MoE model: the expert ids it owns (inclusive)

    def owns(self, layer: int) -> bool:
        return self.layers[0] <= layer <= self.layers[1]

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"Shard({self.url!r}, layers={self.layers[0]}-{self.layers[1]})"


def _stats(url: str, timeout: float, api_key: str | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url + "/v1/stats", timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        raise RemoteError(f"FFN shard {url}: cannot read /v1/stats: {_describe(exc)}") from None
    if r.status_code != 200:
        raise RemoteError(f"FFN shard {url}: /v1/stats answered {r.status_code}: {_error_text(r)}")
    try:
        body = r.json()
    except ValueError:
        raise RemoteError(f"FFN shard {url}: /v1/stats is not JSON") from None
    if not isinstance(body, dict):
        raise RemoteError(f"FFN shard {url}: /v1/stats is not a JSON object")
    return body


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_text(r) -> str:
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            err = err.get("message")
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return r.text[:200] or r.reason_phrase


class RemoteFfn:
    """An `FfnBackend` over FFN shards (see the module docstring). Use `RemoteFfn.connect(...)`."""

    def __init__(self, shards: list[Shard], num_layers: int, hidden_size: int, wire_dtype: str = "f32",
                 retry_after: float = DEFAULT_RETRY_AFTER):
        self.shards = shards
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.wire_dtype = wire_dtype
        self.retry_after = retry_after
        self.stats = ShardStats()
        self._lock = threading.Lock()
        self.experts = None  # an MoE model's `RemoteExperts` (`attach_experts`)
        self.by_layer: list[list[Shard]] = [[s for s in shards if s.owns(i)] for i in range(num_layers)]
        missing = [i for i, owners in enumerate(self.by_layer) if not owners]
        if missing:
            raise RemoteError(f"no FFN shard owns layer{'s' if len(missing) > 1 else ''} {_ranges(missing)} "
                              f"(shards: {', '.join(f'{s.url} [{s.layers[0]}-{s.layers[1]}]' for s in shards)})")

    @classmethod
    def connect(cls, spec: str | Sequence[str] | Sequence[ShardEntry], num_layers: int, hidden_size: int,
                wire_dtype: str = "f32", timeout: float = DEFAULT_TIMEOUT, api_key: str | None = None,
                retry_after: float = DEFAULT_RETRY_AFTER) -> "RemoteFfn":
        """Build the shard map: explicit ranges as given, the rest from each shard's /v1/stats
        (whose hidden size and layer count must match the local model)."""
        entries = spec if spec and isinstance(spec, (list, tuple)) and isinstance(spec[0], ShardEntry) \
            else parse_shards(spec)  # type: ignore[arg-type]
        if wire_dtype not in CLIENT_WIRES:
            raise RemoteError(f"unknown --wire {wire_dtype!r} (use {', '.join(CLIENT_WIRES)})")
        if wire_dtype == "q8k" and hidden_size % q8k_wire.BLOCK:
            raise RemoteError(f"--wire q8k needs a hidden size that is a multiple of {q8k_wire.BLOCK}; this model's "
                              f"is {hidden_size} (use f32, f16 or i8)")
        accept = wire.accept_header("f32" if wire_dtype == "q8k" else wire_dtype)
        shards: list[Shard] = []
        try:
            for e in entries:
                layers = e.layers
                if layers is None:
                    st = _stats(e.url, min(timeout, 30.0), api_key)
                    h, n = st.get("hidden_size"), st.get("layers")
                    if h is not None and h != hidden_size:
                        raise RemoteError(f"FFN shard {e.url} serves hidden size {h}; this model's is {hidden_size}")
                    if n is not None and n != num_layers:
                        raise RemoteError(f"FFN shard {e.url} serves a {n}-layer model; this model has {num_layers}")
                    owned = st.get("owned_layers")
                    layers = (int(owned[0]), int(owned[1])) if owned else (0, num_layers - 1)
                if layers[1] >= num_layers:
                    raise RemoteError(f"FFN shard {e.url}: layers {layers[0]}-{layers[1]} are outside this "
                                      f"{num_layers}-layer model")
                shards.append(Shard(e.url, layers, timeout, api_key, accept))
            return cls(shards, num_layers, hidden_size, wire_dtype, retry_after)
        except BaseException:
            for s in shards:
                s.close()
            raise

    def attach_experts(self, router) -> None:
        """Route an MoE model's experts to the shards owning them (`expert_client`); `router` is the
        client's router-only `MoeFfn`. Each shard's expert range is read from its topology."""
        from .expert_client import RemoteExperts, expert_range

        moe = router.moe
        blocks = moe.num_experts + (1 if moe.shared_size else 0)
        for s in self.shards:
            s.experts = expert_range(s.url, s.client, blocks)
        self.experts = RemoteExperts(router, self, q8k=self.wire_dtype == "q8k")

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()
        for s in self.shards:
            s.close()

    def __enter__(self) -> "RemoteFfn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- FfnBackend ---------------------------------------------------------------------------

    def forward(self, layer: int, x: torch.Tensor, hooks=None) -> torch.Tensor:
        if hooks:
            inner = f"blocks.{layer}.mlp."
            if any(name.startswith(inner) for name in hooks):
                raise CapabilityError("FFN-internal hooks (mlp.hook_*) are not available with a remote FFN")
        if self.experts is not None and not self.experts.moe.beside_dense:
            return self.experts.forward(layer, x)  # a Mixtral-style layer: its experts are the FFN
        shape = x.shape
        rows = x.detach().reshape(-1, shape[-1]).float().numpy()
        out = self.request(layer, rows)
        return torch.from_numpy(out).reshape(shape).to(x.dtype)

    def request(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """FFN_layer of rows [S, H] (float32) on a shard owning `layer`, failing over between replicas."""
        frames: dict[bool, bytes] = {}

        def frame(q8k: bool) -> bytes:
            if q8k not in frames:
                frames[q8k] = (q8k_wire.encode_request([(layer, q8k_wire.quantize(r)) for r in rows]) if q8k
                               else wire.encode_request(layer, rows, seq_len=rows.shape[0]))
            return frames[q8k]

        owners = self.by_layer[layer]
        order = [s for s in owners if s.healthy] + [s for s in owners if not s.healthy]
        errors: list[str] = []
        for i, shard in enumerate(order):
            t0 = time.perf_counter()
            try:
                body = frame(self.wire_dtype == "q8k" and shard.q8k)
                out = self._post_q8k(shard, layer, body, rows.shape[0]) if self.wire_dtype == "q8k" and shard.q8k \
                    else None
                if out is None:
                    body = frame(False)
                    out = self._post(shard, layer, body, rows.shape[0])
            except _Retryable as exc:
                shard.down_until = time.monotonic() + self.retry_after
                shard.last_error = str(exc)
                errors.append(f"{shard.url}: {exc}")
                with self._lock:
                    self.stats.failovers += i + 1 < len(order)
                continue
            with self._lock:
                self.stats.requests += 1
                self.stats.bytes_sent += len(body)
                self.stats.bytes_received += out[1]
                self.stats.seconds += time.perf_counter() - t0
            shard.down_until = 0.0
            return out[0]
        raise RemoteError(f"FFN of layer {layer} failed on every shard that owns it: {'; '.join(errors)}")

    def _send(self, shard: Shard, path: str, body: bytes, headers: dict | None = None):
        import httpx

        try:
            r = shard.client.post(path, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out ({_describe(exc)})") from None
        except httpx.HTTPError as exc:
            raise _Retryable(_describe(exc)) from None
        if r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code}: {_error_text(r)}")
        return r

    def _post_q8k(self, shard: Shard, layer: int, body: bytes, seq_len: int) -> tuple[np.ndarray, int] | None:
        """`/v1/walk-ffn-q8k`; None when the shard does not have the route (404: it is marked so and
        the caller sends the f32 frame, as LARQL's client does)."""
        r = self._send(shard, "/v1/walk-ffn-q8k", body,
                       {"Content-Type": q8k_wire.MEDIA_Q8K, "Accept": q8k_wire.MEDIA_Q8K})
        if r.status_code == 404:
            shard.q8k = False
            return None
        if r.status_code != 200:
            raise RemoteError(f"FFN shard {shard.url} refused layer {layer}: HTTP {r.status_code}: {_error_text(r)}")
        try:
            entries = q8k_wire.decode_response(r.content)
        except wire.WireError as exc:
            raise _Retryable(f"malformed response: {exc}") from None
        if len(entries) != seq_len or any(l != layer or v.size != self.hidden_size for l, v in entries):
            raise _Retryable(f"q8k response has {len(entries)} entries for layer(s) "
                             f"{sorted({l for l, _ in entries})}, expected {seq_len} of layer {layer}")
        return np.stack([v for _, v in entries]), len(r.content)

    def _post(self, shard: Shard, layer: int, body: bytes, seq_len: int) -> tuple[np.ndarray, int]:
        r = self._send(shard, "/v1/walk-ffn", body)
        if r.status_code != 200:
            raise RemoteError(f"FFN shard {shard.url} refused layer {layer}: HTTP {r.status_code}: {_error_text(r)}")
        media = r.headers.get("content-type", "").split(";")[0].strip().lower()
        dtype = wire.DTYPE_OF_MEDIA.get(media)
        if dtype is None:
            raise _Retryable(f"unexpected Content-Type {media!r}")
        try:
            resp = wire.decode_response(r.content, dtype, self.hidden_size)
        except wire.WireError as exc:
            raise _Retryable(f"malformed response: {exc}") from None
        res = resp.results
        if len(res) != 1 or res[0].layer != layer or res[0].seq_len != seq_len:
            raise _Retryable(f"response is for layer(s) {[x.layer for x in res]}, expected layer {layer}")
        return res[0].output.reshape(seq_len, self.hidden_size), len(r.content)


class _Retryable(Exception):
    """A shard failure another replica may not have (connection, timeout, 5xx, garbled body)."""


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def load_remote_model(model_ref, ffn: str | Sequence[str], wire_dtype: str = "f32", dtype: str = "float32",
                      timeout: float = DEFAULT_TIMEOUT, api_key: str | None = None):
    """A runtime `Model` whose FFN runs on the shards `ffn` names (the `--ffn` option)."""
    from .loading import load_client_model

    if wire_dtype not in CLIENT_WIRES:
        raise RemoteError(f"unknown --wire {wire_dtype!r} (use {', '.join(CLIENT_WIRES)})")
    entries = parse_shards(ffn)

    def connect(spec, weights):
        remote = RemoteFfn.connect(entries, spec.num_layers, spec.hidden_size, wire_dtype, timeout, api_key)
        if spec.moe is not None:
            from ..ffn.moe import MoeFfn

            try:
                remote.attach_experts(MoeFfn(spec, weights, experts=()))
            except BaseException:
                remote.close()
                raise
        return remote

    return load_client_model(model_ref, connect, dtype)


__all__ = ["RemoteFfn", "Shard", "ShardEntry", "ShardStats", "load_remote_model", "parse_shards"]
