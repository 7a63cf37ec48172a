"""`KnowledgeClient`: typed access to a knowledge server (modelql's or LARQL's, server-api.md §4).

Every route of the knowledge group has one method; each returns a typed result built from the
wire shape — the `modelql.knowledge` row dataclasses where they match it (DESCRIBE → `DescribeResult`,
WALK → `WalkResult`, SELECT → `SelectResult`, relations → `RelationsResult`, infer and
explain-infer → `InferResult`, insert → `InsertResult`), small dataclasses below otherwise.
Fields the wire does not carry take neutral values (ids −1, unknown floats NaN, empty tuples):
modelql's optional extension keys are used when present and never required, and unknown keys
are ignored, so the same client reads a LARQL server.

Transport: one persistent `httpx.Client`; connection failures (refused, reset, DNS, connect
timeout) are retried `retries` times with exponential backoff, then raise `KnowledgeConnectionError`
("failed to connect to <url>: <cause>", the LQL remote message); an HTTP error status is never
retried and raises `KnowledgeHTTPError` with the status, a code and the server's message (both
envelopes: `{"error": "msg"}` and OpenAI's `{"error": {"message", "code", ...}}`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import httpx

from ..errors import KnowledgeConnectionError, KnowledgeHTTPError, RemoteError

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 2
NAN = float("nan")

#: error codes by status, for envelopes without one (a bare `{"error": "message"}`, or OpenAI's with `code: null`)
STATUS_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "request_too_large", 429: "rate_limit_exceeded",
                500: "server_error", 502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}


# -- result types the knowledge rows do not cover ------------------------------------------------------


@dataclass(frozen=True)
class ServerStats:
    """`GET /v1/stats`."""

    model: str
    family: str | None
    mode: str
    layers: int
    features: int
    features_per_layer: int
    hidden_size: int
    vocab_size: int
    extract_level: str | None
    dtype: str | None
    layer_bands: dict[str, tuple[int, int]] | None
    loaded: dict[str, bool]
    owned_layers: tuple[int, int] | None = None
    knn_entries: int = 0
    patches_active: int = 0


@dataclass(frozen=True)
class Health:
    status: str
    uptime_seconds: float | None = None
    requests_served: int | None = None


@dataclass(frozen=True)
class PatchInfo:
    name: str
    operations: int
    base_model: str | None = None


@dataclass(frozen=True)
class PatchList:
    patches: tuple[PatchInfo, ...]
    session: str | None = None


@dataclass(frozen=True)
class PatchApplied:
    applied: str
    operations: int
    active_patches: int
    session: str | None = None


@dataclass(frozen=True)
class PatchRemoved:
    removed: str
    active_patches: int
    session: str | None = None


@dataclass(frozen=True)
class Embedded:
    """`POST /v1/embed`: the scaled embedding rows `s·E[id]`."""

    residual: tuple[tuple[float, ...], ...]
    seq_len: int
    hidden_size: int
    latency_ms: float = NAN


@dataclass(frozen=True)
class LogitRow:
    token_id: int
    token: str
    prob: float


@dataclass(frozen=True)
class Decoded:
    text: str
    token_ids: tuple[int, ...]


# -- wire → rows ---------------------------------------------------------------------------------------


def _f(v: Any, default: float = NAN) -> float:
    return default if v is None else float(v)


def _band_of(bands: dict[str, tuple[int, int]], layer: int) -> str:
    for name in ("knowledge", "syntax", "output"):
        r = bands.get(name)
        if r is not None and r[0] <= layer <= r[1]:
            return name
    return "knowledge"


def describe_from_json(d: dict, bands: dict[str, tuple[int, int]] | None = None):
    from ..knowledge.describe import signal_label
    from ..knowledge.rows import DescribeResult, Edge

    wire_bands = d.get("bands")
    bands = {k: (int(v[0]), int(v[1])) for k, v in (wire_bands or bands or {}).items()}
    unit = d.get("unit") or "score"
    edges = []
    for e in d.get("edges", []):
        gate = _f(e.get("gate_score"))
        layer = int(e.get("layer", -1))
        lo, hi = int(e.get("layer_min", layer)), int(e.get("layer_max", layer))
        edges.append(Edge(
            target=str(e.get("target", "")), target_id=-1, gate=gate, score=gate if unit == "score" else NAN,
            z=gate if unit == "z" else NAN, layer=layer, feature=int(e.get("feature", -1)),
            layers=tuple(sorted({lo, hi, layer})), count=int(e.get("count", 1)), c_score=NAN,
            also=tuple(e.get("also") or ()), relation=e.get("relation"), source=e.get("source"),
            band=e.get("band") or _band_of(bands, layer),
            confidence=None if e.get("confidence") is None else float(e["confidence"]),
            confident=e.get("confident"), patch=e.get("patch"), decoded=bool(e.get("decoded", False))))
    max_gate = _f(d.get("max_gate"), max((e.gate for e in edges), default=0.0))
    found = bool(d.get("found", True))
    return DescribeResult(
        entity=str(d.get("entity", "")), model=str(d.get("model", "")), mode=d.get("mode") or "embedding",
        found=found, edges=tuple(edges), layers=(), bands=bands, unit=unit,
        threshold=_f(d.get("threshold")), max_gate=max_gate,
        signal=d.get("signal") or signal_label(max_gate, unit if unit in ("z", "score") else "score"),
        latency_ms=_f(d.get("latency_ms"), 0.0), known=d.get("known"), note=d.get("note"),
        suggestion=d.get("suggestion"))


def walk_from_json(d: dict, top: int):
    from ..knowledge.rows import WalkResult, WalkRow

    rows = tuple(WalkRow(layer=int(h["layer"]), feature=int(h["feature"]), gate_score=_f(h.get("gate_score")),
                         target=str(h.get("target", "")), target_id=-1, c_score=_f(h.get("c_score")),
                         top_tokens=tuple(h.get("top_tokens") or ((h["target"],) if h.get("target") else ())),
                         relation=h.get("relation"), source=h.get("source"))
                 for h in d.get("hits", []))
    layers = tuple(sorted({r.layer for r in rows}))
    return WalkResult(prompt=str(d.get("prompt", "")), token=str(d.get("token", "")), token_id=-1, layers=layers,
                      top=top, rows=rows, latency_ms=_f(d.get("latency_ms"), 0.0))


def select_from_json(d: dict, limit: int):
    from ..knowledge.rows import FeatureRow, SelectResult

    rows = []
    for e in d.get("edges", []):
        c = _f(e.get("c_score"))
        tops = tuple(e.get("top_tokens") or ())
        rows.append(FeatureRow(layer=int(e["layer"]), feature=int(e["feature"]), token=str(e.get("target", "")),
                               token_id=-1, c_score=c, score=c, score_kind="c_score",
                               also=tuple(t for t in tops if t != e.get("target"))[:3], top_tokens=tops,
                               relation=e.get("relation"), source=e.get("source")))
    return SelectResult(source="edges", rows=tuple(rows), total=int(d.get("total", len(rows))), limit=limit,
                        latency_ms=_f(d.get("latency_ms"), 0.0))


def relations_from_json(d: dict):
    from ..knowledge.rows import ProbeRelationRow, RelationRow, RelationsResult

    toks = tuple(RelationRow(name=str(r["name"]), count=int(r.get("count", 0)), max_score=_f(r.get("max_score")),
                             min_layer=int(r.get("min_layer", -1)), max_layer=int(r.get("max_layer", -1)),
                             layers=(), examples=tuple(r.get("examples") or ()), relation=r.get("relation"))
                 for r in d.get("relations", []))
    probe = tuple(ProbeRelationRow(name=str(r["name"]), count=int(r.get("count", 0)),
                                   min_layer=int(r.get("min_layer", -1)), max_layer=int(r.get("max_layer", -1)))
                  for r in d.get("probe_relations", []))
    lo = min((t.min_layer for t in toks), default=0)
    hi = max((t.max_layer for t in toks), default=0)
    return RelationsResult(probe_relations=probe, probe_count=int(d.get("probe_count", 0)), tokens=toks,
                           total=int(d.get("total", len(toks))), layer_range=(lo, hi),
                           latency_ms=_f(d.get("latency_ms"), 0.0))


def _preds(items) -> tuple:
    from ..knowledge.infer import Prediction

    return tuple(Prediction(str(p.get("token", "")), int(p.get("token_id", -1)), _f(p.get("probability")))
                 for p in items or ())


def _override(d: dict | None, fallback):
    from ..knowledge.infer import Override, Prediction

    if not d:
        return None
    m = d.get("model_top1") or {}
    top1 = Prediction(str(m.get("token", "")), -1, _f(m.get("probability"))) if m else fallback
    return Override(target=str(d.get("token", "")), target_id=-1, cosine=_f(d.get("cosine")),
                    layer=int(d.get("layer", -1)), entity=str(d.get("entity", "")),
                    relation=str(d.get("relation", "")), model_top1=top1)


def infer_from_json(d: dict):
    from ..knowledge.infer import InferResult

    if "walk" in d and "predictions" not in d:  # compare
        preds = _preds(d["walk"])
        return InferResult(prompt=str(d.get("prompt", "")), mode="walk", predictions=preds,
                           override=_override(d.get("knn_override"), preds[0] if preds else None), trace=(),
                           elapsed_ms=_f(d.get("walk_ms"), 0.0), dense=_preds(d.get("dense")),
                           dense_ms=_f(d.get("dense_ms"), 0.0))
    preds = _preds(d.get("predictions"))
    return InferResult(prompt=str(d.get("prompt", "")), mode=d.get("mode") or "walk", predictions=preds,
                       override=_override(d.get("knn_override"), preds[0] if preds else None), trace=(),
                       elapsed_ms=_f(d.get("latency_ms"), 0.0))


def explain_infer_from_json(d: dict):
    from ..knowledge.infer import AttentionRow, FiredFeature, InferResult

    preds = _preds(d.get("predictions"))
    fired, attention = [], []
    for entry in d.get("trace", []):
        layer = int(entry["layer"])
        feats = [FiredFeature(layer, int(f["feature"]), _f(f.get("gate_score")), str(f.get("top_token", "")),
                              tuple(f.get("top_tokens") or ()), f.get("relation"),
                              f.get("source")) for f in entry.get("features", [])]
        fired += feats
        att, lens = entry.get("attention"), entry.get("lens")
        if att or lens:
            a = (att or [{}])[0]
            attention.append(AttentionRow(layer, feats[0] if feats else None, str(a.get("token", "")), -1,
                                          _f(a.get("weight")), str((lens or {}).get("token", "")),
                                          _f((lens or {}).get("probability"))))
    return InferResult(prompt=str(d.get("prompt", "")), mode="walk", predictions=preds,
                       override=_override(d.get("knn_override"), preds[0] if preds else None), trace=tuple(fired),
                       elapsed_ms=_f(d.get("latency_ms"), 0.0), attention=tuple(attention))


def insert_from_json(d: dict):
    from ..knowledge.edit import InsertResult

    layer = d.get("layer")
    return InsertResult(entity=str(d.get("entity", "")), relation=str(d.get("relation", "")),
                        target=str(d.get("target", "")), mode=str(d.get("mode", "")),
                        layer=None if layer is None else int(layer), target_id=-1, confidence=_f(d.get("confidence")),
                        alpha=d.get("alpha"), feature=d.get("feature"), layers=tuple(d.get("layers") or ()),
                        knn_total=d.get("knn_total"), latency_ms=_f(d.get("latency_ms"), 0.0),
                        inserted=int(d.get("inserted", 1)))


def stats_from_json(d: dict) -> ServerStats:
    bands = d.get("layer_bands")
    owned = d.get("owned_layers")
    return ServerStats(
        model=str(d.get("model", "")), family=d.get("family"), mode=str(d.get("mode", "full")),
        layers=int(d.get("layers", 0)), features=int(d.get("features", 0)),
        features_per_layer=int(d.get("features_per_layer", 0)), hidden_size=int(d.get("hidden_size", 0)),
        vocab_size=int(d.get("vocab_size", 0)), extract_level=d.get("extract_level"), dtype=d.get("dtype"),
        layer_bands={k: (int(v[0]), int(v[1])) for k, v in bands.items()} if bands else None,
        loaded={k: bool(v) for k, v in (d.get("loaded") or {}).items()},
        owned_layers=(int(owned[0]), int(owned[1])) if owned else None,
        knn_entries=int(d.get("knn_entries") or 0), patches_active=int(d.get("patches_active") or 0))


# -- the client ----------------------------------------------------------------------------------------


class KnowledgeClient:
    """A knowledge server at `base_url` (e.g. `http://127.0.0.1:8080`; a trailing `/v1` is accepted).

    `model_id` targets one model of a multi-model server (routes under `/v1/{model_id}/…`);
    `session_id` sends `X-Session-Id` so edits touch only that session's overlay.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, backoff: float = 0.2, model_id: str | None = None,
                 session_id: str | None = None, transport: httpx.BaseTransport | None = None):
        url = base_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise RemoteError(f"knowledge server URL must start with http:// or https://, got {base_url!r}")
        if url.endswith("/v1"):
            url = url[:-3]
        if retries < 0 or timeout <= 0:
            raise RemoteError("retries must be ≥ 0 and timeout > 0")
        self.base_url = url
        self.retries = retries
        self.backoff = backoff
        self.model_id = model_id
        self.session_id = session_id
        headers = {"Accept": "application/json", "User-Agent": "modelql-knowledge-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=headers, transport=transport)
        self._stats: ServerStats | None = None

    # -- transport ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def set_timeout(self, seconds: float) -> None:
        self._http.timeout = httpx.Timeout(seconds)

    def __enter__(self) -> KnowledgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _path(self, route: str) -> str:
        """`/v1/<route>`, or `/v1/{model_id}/<route>` for model-scoped routes of a multi-model server."""
        if self.model_id and route not in ("health", "stats"):
            return f"/v1/{self.model_id}/{route}"
        return f"/v1/{route}"

    def request(self, method: str, route: str, *, params: dict | None = None, json: Any = None,
                headers: dict | None = None) -> httpx.Response:
        """One call with retries on connection errors; an error status raises `KnowledgeHTTPError`."""
        path = self._path(route)
        hdrs = dict(headers or {})
        if self.session_id:
            hdrs["X-Session-Id"] = self.session_id
        if params:
            params = {k: v for k, v in params.items() if v is not None}
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._http.request(method, path, params=params, json=json, headers=hdrs)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError) as exc:
                if attempt > self.retries:
                    raise KnowledgeConnectionError(self.base_url, exc, attempt) from None
                time.sleep(self.backoff * 2 ** (attempt - 1))
            except httpx.TimeoutException:
                raise RemoteError(f"{method} {path}: no answer from {self.base_url} within "
                                  f"{self._http.timeout.read} s (raise the client's timeout)") from None
        if resp.status_code >= 400:
            raise _http_error(resp, f"{method} {path}")
        return resp

    def _get(self, route: str, **params) -> dict:
        return _json(self.request("GET", route, params=params), route)

    def _post(self, route: str, body: dict) -> dict:
        return _json(self.request("POST", route, json={k: v for k, v in body.items() if v is not None}), route)

    # -- the routes --------------------------------------------------------------------------------

    def health(self) -> Health:
        d = self._get("health")
        return Health(str(d.get("status", "")), d.get("uptime_seconds"), d.get("requests_served"))

    def stats(self) -> ServerStats:
        self._stats = stats_from_json(self._get("stats"))
        return self._stats

    def describe(self, entity: str, *, band: str = "knowledge", verbose: bool = False, limit: int = 20,
                 min_score: float | None = None, mode: str | None = None, relations_only: bool = False,
                 layer: int | None = None, variant: str | None = None):
        """`GET /v1/describe` → `DescribeResult` (edges capped at `limit`; `verbose` adds layer spans
        and counts). `mode`, `relations_only`, `layer` and `variant="lql"` are modelql extensions."""
        d = self._get("describe", entity=entity, band=band, verbose=str(verbose).lower(), limit=limit,
                      min_score=min_score, mode=mode, relations_only=str(relations_only).lower() if relations_only
                      else None, layer=layer, variant=variant)
        bands = None
        if "bands" not in d:
            st = self._stats or self._try_stats()
            bands = st.layer_bands if st is not None else None
        return describe_from_json(d, bands)

    def _try_stats(self) -> ServerStats | None:
        try:
            return self.stats()
        except RemoteError:
            return None

    def walk(self, prompt: str, *, top: int = 5, layers: str | Sequence[int] | None = None):
        """`GET /v1/walk` → `WalkResult`. `layers`: `"a-b"`, `"l1,l2"` or a list of layers."""
        if layers is not None and not isinstance(layers, str):
            layers = ",".join(str(int(x)) for x in layers)
        return walk_from_json(self._get("walk", prompt=prompt, top=top, layers=layers), top)

    def select(self, *, entity: str | None = None, relation: str | None = None, layer: int | None = None,
               limit: int = 20, min_confidence: float | None = None, order_by: str | None = None,
               order: str = "desc", features: Sequence[int] | None = None):
        """`POST /v1/select` → `SelectResult` of `FeatureRow`s (c_score as the score).
        `features` (modelql extension; other servers ignore it) restricts to those feature ids."""
        d = self._post("select", {"entity": entity, "relation": relation, "layer": layer, "limit": limit,
                                  "min_confidence": min_confidence, "order_by": order_by, "order": order,
                                  "features": list(features) if features is not None else None})
        res = select_from_json(d, limit)
        if features is not None:  # a server that ignored the filter answered the whole layer
            want = set(int(f) for f in features)
            rows = tuple(r for r in res.rows if r.feature in want)
            if len(rows) != len(res.rows):
                from dataclasses import replace

                res = replace(res, rows=rows, total=len(rows))
        return res

    def feature_info(self, layer: int, features: Iterable[int]) -> dict:
        """What each feature of `layer` promotes and its label (`knowledge.explain.FeatureInfo`), via
        SELECT; features without metadata are absent."""
        from ..knowledge.explain import FeatureInfo

        feats = sorted(set(int(f) for f in features))
        if not feats:
            return {}
        st = self._stats or self._try_stats()
        limit = max(len(feats), st.features_per_layer if st is not None else 0)
        res = self.select(layer=layer, features=feats, limit=limit)
        return {r.feature: FeatureInfo(r.token, r.top_tokens or (r.token,), r.relation, r.source,
                                       None if math.isnan(r.c_score) else r.c_score)
                for r in res.rows if r.layer == layer}

    def relations(self):
        """`GET /v1/relations` → `RelationsResult`."""
        return relations_from_json(self._get("relations"))

    def infer(self, prompt: str, *, top: int = 5, mode: str = "walk"):
        """`POST /v1/infer` → `InferResult` (mode walk | dense | compare; compare fills `dense`)."""
        return infer_from_json(self._post("infer", {"prompt": prompt, "top": top, "mode": mode}))

    def explain_infer(self, prompt: str, *, top: int = 5, per_layer: int = 3, band: str = "all",
                      relations_only: bool = False, with_attention: bool = False):
        """`POST /v1/explain-infer` → `InferResult` with `trace` (and `attention` when asked)."""
        return explain_infer_from_json(self._post("explain-infer", {
            "prompt": prompt, "top": top, "per_layer": per_layer, "band": band, "relations_only": relations_only,
            "with_attention": with_attention}))

    def insert(self, entity: str, relation: str, target: str, *, layer: int | None = None,
               confidence: float | None = None, alpha: float | None = None, mode: str | None = None):
        """`POST /v1/insert` → `InsertResult`."""
        return insert_from_json(self._post("insert", {
            "entity": entity, "relation": relation, "target": target, "layer": layer, "confidence": confidence,
            "alpha": alpha, "mode": mode}))

    def insert_many(self, facts: Sequence[tuple[str, str, str]], *, layer: int | None = None,
                    confidence: float | None = None, alpha: float | None = None,
                    mode: str | None = None) -> list:
        """`POST /v1/insert` with modelql's `facts` (one batch: MEMIT solves them together) →
        an `InsertResult` per fact. LARQL servers accept one fact per request only."""
        d = self._post("insert", {
            "facts": [{"entity": e, "relation": r, "target": t} for e, r, t in facts], "layer": layer,
            "confidence": confidence, "alpha": alpha, "mode": mode})
        if "facts" not in d:
            raise RemoteError("this server does not take a batch of facts (modelql's 'facts' extension); "
                              "insert them one at a time")
        out = []
        for f in d["facts"]:
            r = insert_from_json(f)
            out.append(replace(r, knn_total=d.get("knn_total")))
        return out

    def patches(self) -> PatchList:
        d = self._get("patches")
        return PatchList(tuple(PatchInfo(str(p["name"]), int(p.get("operations", 0)), p.get("base_model"))
                               for p in d.get("patches", [])), d.get("session"))

    def apply_patch(self, *, url: str | None = None, patch: dict | None = None, name: str | None = None) -> PatchApplied:
        if (url is None) == (patch is None):
            raise RemoteError("apply_patch needs exactly one of url= or patch=")
        d = self._post("patches/apply", {"url": url, "patch": patch, "name": name})
        return PatchApplied(str(d.get("applied", "")), int(d.get("operations", 0)), int(d.get("active_patches", 0)),
                            d.get("session"))

    def match_edges(self, where: Sequence[tuple[str, str, Any]]):
        """`POST /v1/edges/match` (modelql): the slots and KNN facts a DELETE / UPDATE WHERE selects
        in this session's overlay, as `knowledge.edit.Matches`."""
        from modelql.knowledge.edit import Matches

        d = self._post("edges/match", {"where": [{"field": f, "op": o, "value": list(v) if isinstance(v, tuple)
                                                  else v} for f, o, v in where]})
        return Matches.from_json(d)

    def remove_patch(self, name: str) -> PatchRemoved:
        from urllib.parse import quote

        d = _json(self.request("DELETE", f"patches/{quote(name, safe='')}"), "patches")
        return PatchRemoved(str(d.get("removed", name)), int(d.get("active_patches", 0)), d.get("session"))

    def embed(self, token_ids: Sequence[int]) -> Embedded:
        d = self._post("embed", {"token_ids": [int(t) for t in token_ids]})
        return Embedded(tuple(tuple(float(x) for x in row) for row in d.get("residual", [])),
                        int(d.get("seq_len", 0)), int(d.get("hidden_size", 0)), _f(d.get("latency_ms")))

    def embed_token(self, token_id: int) -> tuple[float, ...]:
        """`GET /v1/embed/{id}` (JSON form)."""
        d = _json(self.request("GET", f"embed/{int(token_id)}"), "embed")
        return tuple(float(x) for x in d.get("embedding", []))

    def logits(self, residual: Sequence[float], *, top_k: int = 5, temperature: float = 1.0) -> tuple[LogitRow, ...]:
        d = self._post("logits", {"residual": [float(x) for x in residual], "top_k": top_k,
                                  "temperature": temperature})
        return tuple(LogitRow(int(r["token_id"]), str(r.get("token", "")), _f(r.get("prob")))
                     for r in d.get("top_k", []))

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(int(t) for t in self._get("token/encode", text=text).get("token_ids", []))

    def decode(self, token_ids: Sequence[int]) -> Decoded:
        d = self._get("token/decode", ids=",".join(str(int(t)) for t in token_ids))
        return Decoded(str(d.get("text", "")), tuple(int(t) for t in d.get("token_ids", [])))

    def warmup(self, editing: bool = False) -> float:
        """`POST /v1/warmup`; returns the server's latency in ms. `editing`: also compute the
        statistics weight-level inserts need (once per model; tens of seconds the first time)."""
        return _f(self._post("warmup", {"editing": True} if editing else {}).get("latency_ms"))


def _json(resp: httpx.Response, route: str) -> dict:
    try:
        d = resp.json()
    except ValueError:
        raise RemoteError(f"/v1/{route}: the server's answer is not JSON ({resp.headers.get('content-type')})") \
            from None
    if not isinstance(d, dict):
        raise RemoteError(f"/v1/{route}: expected a JSON object, got {type(d).__name__}")
    return d


def _http_error(resp: httpx.Response, endpoint: str) -> KnowledgeHTTPError:
    status = resp.status_code
    code, message = STATUS_CODES.get(status, f"http_{status}"), resp.text.strip()[:500] or resp.reason_phrase
    try:
        d = resp.json()
    except ValueError:
        d = None
    if isinstance(d, dict):
        err = d.get("error")
        if isinstance(err, str):
            message = err
        elif isinstance(err, dict):
            message = str(err.get("message", message))
            code = str(err.get("code") or code)  # OpenAI leaves "code" null on most errors: keep the status code
        elif "detail" in d:
            message = str(d["detail"])
    return KnowledgeHTTPError(status, code, message, endpoint)


__all__ = ["KnowledgeClient", "KnowledgeHTTPError", "KnowledgeConnectionError", "ServerStats", "Health",
           "PatchInfo", "PatchList", "PatchApplied", "PatchRemoved", "Embedded", "LogitRow", "Decoded",
           "describe_from_json", "walk_from_json", "select_from_json", "relations_from_json", "infer_from_json",
           "explain_infer_from_json", "insert_from_json", "stats_from_json", "STATUS_CODES"]
