"""Typed result rows of the knowledge queries (DESCRIBE, WALK, SELECT, SHOW RELATIONS, STATS).

Frozen dataclasses, one per result shape. They carry everything LQL's text rendering
(lql.md §4.3) and the HTTP JSON bodies (server-api.md §4) need; neither renderer recomputes
anything. Nothing here formats text; `to_json()` helpers return plain JSON-able dicts of the
raw values (the server decides rounding and which optional keys to emit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: DESCRIBE sections in display order.
SECTIONS: tuple[str, ...] = ("syntax", "knowledge", "output")


def _json(obj: Any) -> dict[str, Any]:
    return asdict(obj)


# ---------------------------------------------------------------------------------------------
# DESCRIBE
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """One aggregated DESCRIBE edge: the entity → `target` (a feature's top output token).

    `gate` is the ranking value in the result's `unit` (the raw signed gate score `g_f·q` when
    the threshold is the reference's absolute one, else the per-layer z-score); `score` and `z`
    are both always given for the best hit. `layer`/`feature` are the arg-max hit;
    `layers` the distinct layers of all hits, `count` their number.

    A `decoded` edge is a relation's claim (residual mode, `knowledge.decode`): `target` is the
    answer phrase the entity's probe template decodes to, `gate`/`score`/`z` the z-score / raw
    value of its logit among the vocabulary, `c_score` its probability, `layer`/`feature` the
    feature contributing most to its logit, `layers`/`count` the group of top contributors
    writing half of the features' contribution.
    """

    target: str
    target_id: int
    gate: float
    score: float
    z: float
    layer: int
    feature: int
    layers: tuple[int, ...]
    count: int
    c_score: float
    also: tuple[str, ...] = ()  # ≤ 3 content tokens of the feature's top-k
    also_readable: tuple[str, ...] = ()  # ≤ 5 readable tokens
    relation: str | None = None
    source: str | None = None  # "probe" | "cluster" | "knn" | None
    band: str = "knowledge"  # section: syntax | knowledge | output
    decoded: bool = False  # a relation probe's decoded answer (knowledge.decode), source "probe"
    #: calibrated claims (`knowledge.calibrate`): the answer's probability, and whether it clears the
    #: model's measured floors (None: not calibrated / not a claim)
    confidence: float | None = None
    confident: bool | None = None
    patch: str | None = None  # source "patch": the overlay patch that inserted the fact

    @property
    def layer_min(self) -> int:
        return min(self.layers) if self.layers else self.layer

    @property
    def layer_max(self) -> int:
        return max(self.layers) if self.layers else self.layer

    def to_json(self) -> dict[str, Any]:
        d = _json(self)
        d["layers"] = list(self.layers)
        d["also"] = list(self.also)
        d["also_readable"] = list(self.also_readable)
        d["layer_min"], d["layer_max"] = self.layer_min, self.layer_max
        return d


@dataclass(frozen=True)
class Section:
    """The edges of one band, capped for display."""

    band: str
    lo: int
    hi: int
    edges: tuple[Edge, ...]
    total: int  # edges in the band before the cap


@dataclass(frozen=True)
class DescribeResult:
    """DESCRIBE of one entity. `edges` holds every edge (sorted by `gate` descending, uncapped);
    `sections()` buckets and caps them as LQL shows them.

    `found` is False when the entity tokenises to nothing (LQL prints "(not found)"); an empty
    `edges` with `found` True is "(no edges found)".
    """

    entity: str
    model: str
    mode: str  # "embedding" | "residual"
    found: bool
    edges: tuple[Edge, ...]
    layers: tuple[int, ...]  # the scanned layers
    bands: dict[str, tuple[int, int]]  # resolved band ranges
    unit: str  # "score" (absolute reference threshold) | "z" (adaptive)
    threshold: float  # in `unit`
    max_gate: float
    signal: str  # "clean" | "moderate" | "diffuse"
    relations_only: bool = False
    contexts: tuple[str, ...] = ()  # residual mode: the contexts the entity was run through
    latency_ms: float = 0.0
    #: calibrated DESCRIBE: does the model know the entity (familiarity over the measured floor),
    #: a one-line note when it does not (or a claim is low-confidence), a known entity it may mean
    known: bool | None = None
    note: str | None = None
    suggestion: str | None = None
    familiarity: float | None = None

    def sections(self, verbosity: str = "brief") -> tuple[Section, ...]:
        """Non-empty sections in display order, capped: BRIEF 10 per band (output 5), VERBOSE/RAW 30."""
        out = []
        brief = verbosity.lower() == "brief"
        for name in SECTIONS:
            es = tuple(e for e in self.edges if e.band == name)
            if not es:
                continue
            cap = (5 if name == "output" else 10) if brief else 30
            lo, hi = self.bands[name]
            out.append(Section(name, lo, hi, es[:cap], len(es)))
        return tuple(out)

    def labelled(self) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.relation)

    def confident_claims(self) -> tuple[Edge, ...]:
        """Labelled edges not marked low-confidence."""
        return tuple(e for e in self.edges if e.relation and e.confident is not False)

    def to_json(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "model": self.model, "mode": self.mode, "found": self.found,
            "edges": [e.to_json() for e in self.edges], "layers": list(self.layers),
            "bands": {k: list(v) for k, v in self.bands.items()}, "unit": self.unit,
            "threshold": self.threshold, "max_gate": self.max_gate, "signal": self.signal,
            "relations_only": self.relations_only, "contexts": list(self.contexts),
            "latency_ms": self.latency_ms, "known": self.known, "note": self.note,
            "suggestion": self.suggestion, "familiarity": self.familiarity,
        }


# ---------------------------------------------------------------------------------------------
# WALK
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WalkRow:
    """One gate-KNN hit of WALK / EXPLAIN WALK: feature (layer, feature) and what it promotes."""

    layer: int
    feature: int
    gate_score: float  # signed g_f · q
    target: str  # the feature's top token
    target_id: int
    c_score: float
    top_tokens: tuple[str, ...]  # the feature's down top-k tokens (empty strings dropped)
    relation: str | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = _json(self)
        d["top_tokens"] = list(self.top_tokens)
        return d


@dataclass(frozen=True)
class WalkResult:
    prompt: str
    token: str  # the decoded query token (the prompt's last)
    token_id: int
    layers: tuple[int, ...]
    top: int  # K per layer
    rows: tuple[WalkRow, ...]  # layer ascending, then |gate| descending
    latency_ms: float = 0.0

    def by_layer(self) -> dict[int, tuple[WalkRow, ...]]:
        out: dict[int, list[WalkRow]] = {}
        for r in self.rows:
            out.setdefault(r.layer, []).append(r)
        return {k: tuple(v) for k, v in out.items()}

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "token": self.token, "token_id": self.token_id,
                "layers": list(self.layers), "top": self.top, "hits": [r.to_json() for r in self.rows],
                "latency_ms": self.latency_ms}


# ---------------------------------------------------------------------------------------------
# SELECT
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A WHERE condition: `field op value`. `op` ∈ = != > < >= <= LIKE IN (LQL's spellings)."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class FeatureRow:
    """SELECT FROM EDGES / FEATURES / NEAREST TO: one feature slot.

    `score` is what the Score column shows: the signed gate score for walked queries (entity +
    relation, NEAREST TO; `score_kind == "gate"`), else the feature's c_score (`"c_score"`).
    """

    layer: int
    feature: int
    token: str
    token_id: int
    c_score: float
    score: float
    score_kind: str  # "gate" | "c_score"
    also: tuple[str, ...] = ()  # up to 3 other top-k tokens
    top_tokens: tuple[str, ...] = ()  # the full decoded top-k list
    relation: str | None = None
    source: str | None = None  # "probe" | "cluster" | "patch" | None
    gate_score: float | None = None  # set when walked
    entity: str | None = None  # source "patch": the fact's entity
    patch: str | None = None  # source "patch": the patch (and edit mode) that inserted the fact
    expert: int | None = None  # a MoE layer's feature: its expert (`feature` stays the layer-wide index)

    def to_json(self) -> dict[str, Any]:
        d = _json(self)
        d["also"], d["top_tokens"] = list(self.also), list(self.top_tokens)
        return d


@dataclass(frozen=True)
class EntityRow:
    """SELECT FROM ENTITIES / SHOW ENTITIES: a distinct entity-like top token."""

    entity: str
    features: int
    max_score: float  # max c_score
    layers: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = _json(self)
        d["layers"] = list(self.layers)
        return d


@dataclass(frozen=True)
class SelectResult:
    """Rows of a SELECT; `total` counts matches before LIMIT. `rows` are `FeatureRow`s
    (EDGES, FEATURES, NEAREST TO) or `EntityRow`s (ENTITIES)."""

    source: str  # "edges" | "features" | "entities"
    rows: tuple[Any, ...]
    total: int
    walked: bool = False  # True: scores are gate scores of a walked query
    mode: str | None = None  # query vector of a walked query: "embedding" | "residual"
    limit: int = 20
    latency_ms: float = 0.0

    @property
    def has_also(self) -> bool:
        return any(getattr(r, "also", ()) for r in self.rows)

    @property
    def has_relation(self) -> bool:
        return any(getattr(r, "relation", None) for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "rows": [r.to_json() for r in self.rows], "total": self.total,
                "walked": self.walked, "mode": self.mode, "limit": self.limit, "latency_ms": self.latency_ms}


# ---------------------------------------------------------------------------------------------
# SHOW RELATIONS
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRelationRow:
    """A probe-confirmed relation and how many features carry its label."""

    name: str
    count: int
    min_layer: int
    max_layer: int

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True)
class RelationRow:
    """A knowledge-band output token (content, c_score ≥ 0.2) aggregated over features."""

    name: str  # the token
    count: int  # features whose top token it is
    max_score: float  # max c_score
    min_layer: int
    max_layer: int
    layers: tuple[int, ...]
    examples: tuple[str, ...] = ()  # ≤ 3 co-output tokens
    relation: str | None = None  # the most common label of its features, if any

    def to_json(self) -> dict[str, Any]:
        d = _json(self)
        d["layers"], d["examples"] = list(self.layers), list(self.examples)
        return d


@dataclass(frozen=True)
class ClusterRow:
    """A relation cluster (relation_clusters.json)."""

    cluster: int
    label: str
    count: int
    top_tokens: tuple[str, ...]


@dataclass(frozen=True)
class RelationsResult:
    probe_relations: tuple[ProbeRelationRow, ...]  # sorted by count descending
    probe_count: int  # probe-labelled features
    tokens: tuple[RelationRow, ...]  # sorted by count descending, capped
    total: int  # distinct tokens before the cap
    layer_range: tuple[int, int]  # the scanned range (knowledge band or AT LAYER n)
    clusters: tuple[ClusterRow, ...] = ()
    latency_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"probe_relations": [r.to_json() for r in self.probe_relations], "probe_count": self.probe_count,
                "relations": [r.to_json() for r in self.tokens], "total": self.total,
                "layer_range": list(self.layer_range),
                "clusters": [_json(c) for c in self.clusters], "latency_ms": self.latency_ms}


# ---------------------------------------------------------------------------------------------
# STATS
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandStats:
    name: str
    lo: int
    hi: int
    features: int  # feature slots in the band's loaded layers
    with_meta: int  # of which have down metadata (coverage = with_meta / features)


@dataclass(frozen=True)
class Stats:
    """STATS / `GET /v1/stats` of a vindex."""

    path: str
    model: str
    family: str
    layers: int  # num_layers
    loaded_layers: tuple[int, ...]
    features: int  # total feature slots over loaded layers
    features_per_layer: int  # the most common per-layer count
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    extract_level: str
    dtype: str
    embed_scale: float
    layer_bands: dict[str, tuple[int, int]]
    bands_source: str  # index | family | proportional | whole
    band_stats: tuple[BandStats, ...]
    has_weights: bool
    clusters: int  # relation clusters (k), 0 if none
    cluster_labels: int  # distinct cluster labels
    unmapped_clusters: int  # clusters whose label is the `cluster-<c>` fallback
    probe_labels: int  # probe-labelled features
    probe_relations: int  # distinct probe relation types
    index_bytes: int  # total size of the directory's files
    knn_entries: int = 0

    def to_json(self) -> dict[str, Any]:
        d = _json(self)
        d["loaded_layers"] = list(self.loaded_layers)
        d["layer_bands"] = {k: list(v) for k, v in self.layer_bands.items()}
        return d


__all__ = [
    "SECTIONS", "Edge", "Section", "DescribeResult", "WalkRow", "WalkResult", "Condition", "FeatureRow",
    "EntityRow", "SelectResult", "ProbeRelationRow", "RelationRow", "ClusterRow", "RelationsResult",
    "BandStats", "Stats", "field",
]
