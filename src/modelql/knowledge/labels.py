"""Relation labels of features (algorithms §6): probe labels, cluster labels, and their lookup.

* **Probe labels** (`feature_labels.json`, "probe-confirmed"): every (subject, object) pair of a
  triples file is run through its relation's template; a feature that fires on the template's
  FFN input and whose output tokens contain the object scores a hit for that relation; a feature
  whose hits agree (≥ 2, majority) gets the relation as label. `probe_label()`.
* **Cluster labels** (`relation_clusters.json` + `feature_clusters.jsonl`, §6.2): the fallback,
  computed at extraction by `modelql.vindex.clusters`; `relabel_clusters()` re-labels them from a
  triples file.
* `FeatureLabels` / `labels_for(vindex)`: label of a feature = probe label, else its cluster
  label, else none — cached per vindex and reloaded when the files change.
* `label_vindex` (`modelql label`) first calibrates DESCRIBE on the model (`knowledge.calibrate`:
  the template of each relation by measured accuracy, plain or two-shot, and the confidence
  floors), probes with the chosen templates only, and checks every new label causally
  (`knowledge.label_check`), dropping those that fail. Why: with the reference's templates and
  all 244 subjects, labelling SmolLM2-135M took 16 minutes and produced labels whose promoted
  tokens did not match them.

modelql's differences from the reference (§15.1, §15.7): the probe captures the FFN input `x_L`
(not the block output), and "fires" is decided per layer by a scale-free z-score of the
feature's FFN *activation* `act(g·x)·(u·x)` among all features of the layer (instead of
`|g·x| ≥ 5.0`), so labelling works on models with any embedding/gate scale, and features that a
negative gate switches off are not credited (§15.3). See `DEFAULT_MIN_Z`.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import LabelError, VindexError
from ..fsutil import atomic_write_json
from ..vindex.clusters import CLUSTERS_FILE, FEATURE_CLUSTERS_FILE, forms, read_clusters

LABELS_FILE = "feature_labels.json"
PROBE_META_FILE = "probe_meta.json"

#: The reference's 13 default templates (algorithms §6.1).
REFERENCE_TEMPLATES: dict[str, str] = {
    "capital": "The capital of {X} is",
    "language": "The official language of {X} is",
    "continent": "{X} is a country in",
    "borders": "{X} shares a border with",
    "occupation": "{X} was a",
    "birthplace": "{X} was born in",
    "currency": "The currency of {X} is",
    "located_in": "{X} is located in",
    "author": "{X} was written by",
    "director": "{X} was directed by",
    "genre": "The genre of {X} is",
    "founder": "{X} was founded by",
    "nationality": "{X} has the nationality of",
}

TOP_K_PER_LAYER = 50
#: A probed feature "fires" when its activation's z-score within its layer reaches this (the
#: reference's |g·x| ≥ 5.0 labels nothing on models with small gate scores, like the embedded
#: one, where |g·x_L| stays below 5).
DEFAULT_MIN_Z = 3.0
MIN_HITS = 2
PRED_TOP = 20
PRED_SCAN = 10
PRED_MIN_PROB = 0.01
PRED_LAST_LAYERS = 4
#: Subjects per relation probed by `label_vindex` (None: all).
MAX_PROBE_SUBJECTS = 64

_KEY_RE = None


# ---------------------------------------------------------------------------------------------
# reading labels
# ---------------------------------------------------------------------------------------------


def _parse_key(key: str) -> tuple[int, int] | None:
    global _KEY_RE
    if _KEY_RE is None:
        import re

        _KEY_RE = re.compile(r"^L(\d+)_F(\d+)$")
    m = _KEY_RE.match(key)
    return (int(m.group(1)), int(m.group(2))) if m else None


def read_probe_labels(directory: str | Path) -> dict[tuple[int, int], str]:
    """`feature_labels.json` as {(layer, feature): relation}; bad keys and non-string values ignored."""
    p = Path(directory) / LABELS_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise VindexError(f"{p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        return {}
    out = {}
    for k, v in data.items():
        key = _parse_key(str(k))
        if key is not None and isinstance(v, str) and v:
            out[key] = v
    return out


@dataclass
class FeatureLabels:
    """All labels of a vindex: probe labels first, then cluster labels."""

    probe: dict[tuple[int, int], str] = field(default_factory=dict)
    cluster_of: dict[tuple[int, int], int] = field(default_factory=dict)
    cluster_labels: list[str] = field(default_factory=list)
    cluster_counts: list[int] = field(default_factory=list)
    cluster_top_tokens: list[list[str]] = field(default_factory=list)
    stamp: tuple = ()

    def get(self, layer: int, feature: int) -> tuple[str, str] | None:
        """(relation, source) with source "probe" or "cluster", or None."""
        rel = self.probe.get((layer, feature))
        if rel:
            return rel, "probe"
        c = self.cluster_of.get((layer, feature))
        if c is not None and 0 <= c < len(self.cluster_labels):
            lab = self.cluster_labels[c]
            if lab:
                return lab, "cluster"
        return None

    def label(self, layer: int, feature: int) -> str | None:
        got = self.get(layer, feature)
        return got[0] if got else None

    @property
    def has_probe(self) -> bool:
        return bool(self.probe)

    def probe_relations(self) -> Counter:
        return Counter(self.probe.values())


def _stamp(directory: Path) -> tuple:
    out = []
    for name in (LABELS_FILE, CLUSTERS_FILE, FEATURE_CLUSTERS_FILE):
        try:
            st = (directory / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def read_labels(directory: str | Path) -> FeatureLabels:
    d = Path(directory)
    stamp = _stamp(d)
    probe = read_probe_labels(d)
    cl = read_clusters(d)
    if cl is None:
        return FeatureLabels(probe=probe, stamp=stamp)
    return FeatureLabels(
        probe=probe, cluster_of={(l, f): c for l, f, c in cl.assignments}, cluster_labels=cl.labels,
        cluster_counts=cl.counts, cluster_top_tokens=cl.top_tokens, stamp=stamp,
    )


_cache: "weakref.WeakKeyDictionary[object, FeatureLabels]" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def labels_for(vindex) -> FeatureLabels:
    """The labels of an opened vindex (cached; reread when a label file changes)."""
    d = Path(vindex.path)
    stamp = _stamp(d)
    with _cache_lock:
        got = _cache.get(vindex)
        if got is not None and got.stamp == stamp:
            return got
    labels = read_labels(d)
    with _cache_lock:
        _cache[vindex] = labels
    return labels


def calibration_for(vindex):
    """The vindex's per-model DESCRIBE calibration (`knowledge.calibrate.Calibration`, from
    probe_meta.json), or None for a vindex labelled without one."""
    from .calibrate import Calibration

    return Calibration.from_json(_probe_meta(vindex).get("calibration"))


def probe_templates(vindex) -> dict[str, list[str]]:
    """{relation: templates} DESCRIBE probes: the calibrated template of each relation the model
    answers with confident claims that are mostly right (probe_meta.json "calibration",
    `Calibration.probed`), else the templates the vindex was probe-labelled
    with, for the relations that actually got labels; {} when it was never labelled."""
    meta = _probe_meta(vindex)
    cal = calibration_for(vindex)
    if cal is not None:
        return {r: [t] for r, t in cal.probed().items()}
    tm = meta.get("templates")
    labelled = set(labels_for(vindex).probe.values())
    got: dict[str, list[str]] = {}
    if isinstance(tm, dict):
        for r, ts in tm.items():
            ts = [ts] if isinstance(ts, str) else ts
            if r in labelled and isinstance(ts, list):
                got[str(r)] = [str(t) for t in ts if isinstance(t, str) and "{X}" in t]
    return got


def _probe_meta(vindex) -> dict:
    """probe_meta.json of the vindex ({} when absent or unreadable), cached by (path, mtime, size)."""
    p = Path(vindex.path) / PROBE_META_FILE
    try:
        st = p.stat()
    except OSError:
        return {}
    key = (str(p), st.st_mtime_ns, st.st_size)
    meta = _probe_meta_cache.get(key)
    if meta is None:
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        _probe_meta_cache[key] = meta
    return meta


_probe_meta_cache: dict[tuple, dict] = {}


def relation_cardinality(vindex) -> dict[str, float]:
    """{relation: mean objects per subject} of the triples the vindex was probe-labelled with
    (probe_meta.json); {} for a vindex labelled before this was recorded (every relation is then
    treated as single-valued)."""
    raw = _probe_meta(vindex).get("objects_per_subject")
    got: dict[str, float] = {}
    if isinstance(raw, dict):
        for r, v in raw.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                got[str(r)] = float(v)
    return got




# ---------------------------------------------------------------------------------------------
# triples and templates
# ---------------------------------------------------------------------------------------------


def load_triples(path: str | Path) -> dict[str, dict[str, list[list[str]]]]:
    """Read a triples file: JSON `{relation: {"pairs": [[s, o], ...]}}` (or `{relation: [[s, o]]}`),
    or a TSV with columns entity/relation/target (header optional)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelError(f"triples file {p} does not exist") from None
    except OSError as exc:
        raise LabelError(f"cannot read {p}: {exc.strerror or exc}") from None
    is_json = p.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "[")
    if not is_json:
        sep = "," if p.suffix.lower() == ".csv" else "\t"
        out: dict[str, dict[str, list[list[str]]]] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = [x.strip() for x in line.split(sep)]
            if len(parts) != 3:
                raise LabelError(f"{p}:{n}: expected 3 columns (entity, relation, target)")
            if n == 1 and [x.lower() for x in parts] in (["entity", "relation", "target"],
                                                          ["subject", "relation", "object"]):
                continue
            e, r, t = parts
            out.setdefault(r, {"pairs": []})["pairs"].append([e, t])
        return out
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LabelError(f"{p} is not valid JSON ({exc})") from None
    return normalise_triples(data, where=str(p))


def normalise_triples(data: Any, where: str = "triples") -> dict[str, dict[str, list[list[str]]]]:
    if not isinstance(data, dict):
        raise LabelError(f"{where}: expected an object {{relation: {{\"pairs\": [[subject, object], ...]}}}}")
    out = {}
    for rel, body in data.items():
        pairs = body.get("pairs") if isinstance(body, dict) else body
        if not isinstance(pairs, list):
            raise LabelError(f"{where}: relation {rel!r} has no pairs list")
        clean = []
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) < 2:
                raise LabelError(f"{where}: relation {rel!r}: each pair must be [subject, object]")
            clean.append([str(pair[0]), str(pair[1])])
        out[str(rel)] = {"pairs": clean}
    return out


def default_triples() -> dict[str, dict[str, list[list[str]]]]:
    """The embedded default model's facts (the default probe set)."""
    from .. import defaults

    return defaults.triples_json()


def default_templates(relations: Iterable[str]) -> dict[str, list[str]]:
    """One template per relation: the reference's default, else the embedded model's canonical
    training template, else the canonical INSERT phrasing "The <relation> of {X} is"."""
    from .. import defaults

    out = {}
    for r in relations:
        if r in REFERENCE_TEMPLATES:
            out[r] = [REFERENCE_TEMPLATES[r]]
        elif r in defaults.TRAIN_TEMPLATES:
            out[r] = [defaults.TRAIN_TEMPLATES[r][0]]
        else:
            out[r] = ["The " + r.replace("-", " ").replace("_", " ") + " of {X} is"]
    return out


def load_templates(path: str | Path) -> dict[str, list[str]]:
    """A templates JSON file: `{relation: "template"}` or `{relation: ["t1", "t2"]}`, `{X}` = subject."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelError(f"templates file {p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise LabelError(f"cannot read templates {p}: {exc}") from None
    if not isinstance(data, dict):
        raise LabelError(f"{p}: expected an object {{relation: template}}")
    out = {}
    for r, t in data.items():
        ts = [t] if isinstance(t, str) else list(t) if isinstance(t, list) else []
        ts = [str(x) for x in ts if isinstance(x, str) and "{X}" in x]
        if not ts:
            raise LabelError(f"{p}: relation {r!r} needs a template containing {{X}}")
        out[str(r)] = ts
    return out


def match_index(triples: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """Key `(lower(subject), form)` → relation, first relation wins (§6.1 step 1)."""
    idx: dict[tuple[str, str], str] = {}
    for rel, body in triples.items():
        for s, o in body["pairs"]:
            sl = s.strip().lower()
            for f in forms(o):
                idx.setdefault((sl, f), rel)
    return idx


# ---------------------------------------------------------------------------------------------
# probe labelling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    labels: dict[tuple[int, int], str]  # new labels of this run
    hits: dict[tuple[int, int], dict[str, int]]
    prompts: int
    layers: tuple[int, ...]
    seconds: float
    written: Path | None = None
    per_relation: dict[str, int] = field(default_factory=dict)
    objects_per_subject: dict[str, float] = field(default_factory=dict)
    #: relation → subjects whose probe the model answered right (its top first token)
    answered: dict[str, list[str]] = field(default_factory=dict, repr=False)
    #: feature → relation → the subjects whose probes scored its hits (where its label was earned)
    evidence: dict[tuple[int, int], dict[str, list[str]]] = field(default_factory=dict, repr=False)


def _subjects(pairs: Sequence[Sequence[str]]) -> list[str]:
    subs = sorted({s for s, _o in pairs if 2 <= len(s) <= 30}, key=lambda s: (len(s.split()), len(s), s))
    return subs


def probe_features(vindex, triples: Mapping[str, Any], templates: Mapping[str, Sequence[str]] | None = None,
                   model=None, layers: Sequence[int] | None = None, min_z: float = DEFAULT_MIN_Z,
                   top_k: int = TOP_K_PER_LAYER, max_subjects: int | None = None,
                   batch_size: int = 64) -> ProbeResult:
    """Probe labelling (§6.1) of `vindex` with `triples`; returns the new labels (writes nothing).

    Per (subject, template) prompt: forward pass capturing, per scanned layer, the FFN input
    and activations at the last position; the layer's top-`top_k` features by |activation| whose
    activation z-score is ≥ `min_z` and whose down top-k tokens contain a form of the subject's
    object for that relation score one hit; a correct prediction in the model's top 10 adds a
    hit to the feature of each of the last 4 scanned layers that writes the most of that answer's
    logit (direct contribution, `decode.attribute_many`). Labels need ≥ 2 hits and a majority.
    Why the writer and not the strongest activation: the strongest features of late layers fire
    on every prompt (SmolLM2-135M) and their labels failed the causal check.
    """
    from .decode import attribute_many
    from .queries import model_for

    t0 = time.perf_counter()
    triples = normalise_triples(triples)
    tmpl = dict(templates) if templates else default_templates(triples.keys())
    index = match_index(triples)
    m = model_for(vindex, model)
    tok = m.tokenizer if m.tokenizer is not None else vindex.tokenizer
    n_layers = m.spec.num_layers
    if layers is None:
        lo, hi = vindex.bands.knowledge
        layers = [l for l in vindex.layers() if lo <= l <= hi]
    layers = sorted(set(l for l in layers if 0 <= l < n_layers))
    if not layers:
        raise LabelError("no layers to probe")
    # feature token forms, per layer: [(lowercased tokens of length ≥ 2)]
    feat_tokens: dict[int, list[tuple[str, ...]]] = {}
    for L in layers:
        toks = []
        for f in range(vindex.num_features(L)):
            meta = vindex.feature_meta(L, f)
            toks.append(tuple(t.strip().lower() for t, _i, _v in meta.top_k if len(t.strip()) >= 2) if meta else ())
        feat_tokens[L] = toks
    prompts: list[tuple[str, str, list[int]]] = []  # (relation, subject, ids)
    heads: list[str] = []  # each prompt's template
    for rel, body in triples.items():
        subs = _subjects(body["pairs"])
        if max_subjects is not None:
            subs = subs[:max_subjects]
        for t in tmpl.get(rel, []):
            for s in subs:
                ids = tok.encode(t.replace("{X}", s), add_special_tokens=True)
                if ids:
                    prompts.append((rel, s, ids))
                    heads.append(t)
    hits: dict[tuple[int, int], Counter] = defaultdict(Counter)
    answered: dict[str, list[str]] = defaultdict(list)
    evidence: dict[tuple[int, int], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    names = [f"blocks.{L}.mlp.hook_post" for L in layers]
    vocab_cache: dict[int, str] = {}

    def tok_text(i: int) -> str:
        s = vocab_cache.get(i)
        if s is None:
            s = tok.decode([i], skip_special_tokens=True).strip().lower()
            vocab_cache[i] = s
        return s

    # batches of prompts (each forks its template's head, run once: `knowledge.prefixed`), each
    # row read at its own last token
    from .prefixed import head_of, last_states

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][2]))
    chunks = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    for chunk in chunks:
        h_last, cache = last_states(m, tok, [(head_of(heads[i]), prompts[i][2]) for i in chunk], capture=names,
                                    batch=len(chunk))
        logits = m.unembed(h_last)
        fired: dict[int, list[list[int]]] = {}
        for L in layers:
            a = cache[f"blocks.{L}.mlp.hook_post"]  # [B, F]
            z = (a - a.mean(dim=1, keepdim=True)) / a.std(dim=1, keepdim=True).clamp_min(1e-12)
            k = min(top_k, a.shape[1])
            top = torch.topk(a.abs(), k, dim=1).indices  # [B, k]
            ok = z.gather(1, top) >= min_z
            fired[L] = [row[m_].tolist() for row, m_ in zip(top, ok)]
        matched: list[tuple[int, int, str, str]] = []  # (row, right token, relation, subject)
        for row, i in enumerate(chunk):
            rel, subj, _ids = prompts[i]
            sl = subj.strip().lower()
            for L in layers:
                for f in fired[L][row]:
                    for t in feat_tokens[L][f]:
                        if index.get((sl, t)) == rel:
                            hits[(L, f)][rel] += 1
                            evidence[(L, f)][rel].append(subj)
                            break
            # prediction matching
            lg = logits[row].double()
            vals, pidx = torch.topk(lg, min(PRED_TOP, lg.numel()))
            probs = torch.softmax(vals, dim=0)
            for n_, (p, tid) in enumerate(zip(probs.tolist()[:PRED_SCAN], pidx.tolist()[:PRED_SCAN])):
                t = tok_text(tid)
                if p < PRED_MIN_PROB or len(t) < 2:
                    continue
                if index.get((sl, t)) == rel:
                    if n_ == 0:
                        answered[rel].append(subj)
                    matched.append((row, tid, rel, subj))
                    break
        if matched:  # the right answer's writers: the largest direct contributor of each late layer
            late = layers[-PRED_LAST_LAYERS:]
            contribs = attribute_many(m, {L: cache[f"blocks.{L}.mlp.hook_post"] for L in late}, h_last,
                                      [([row], tid) for row, tid, _r, _s in matched])
            for (row, tid, rel, subj), per_layer in zip(matched, contribs):
                for L, c in per_layer.items():
                    f = int(c.argmax())
                    if float(c[f]) > 0:
                        hits[(L, f)][rel] += 1
                        evidence[(L, f)][rel].append(subj)
    labels = {}
    for key, c in hits.items():
        rel, n = sorted(c.items(), key=lambda x: (-x[1], x[0]))[0]
        if n >= MIN_HITS and n / sum(c.values()) > 0.5:
            labels[key] = rel
    return ProbeResult(labels=labels, hits={k: dict(v) for k, v in hits.items()}, prompts=len(prompts),
                       layers=tuple(layers), seconds=time.perf_counter() - t0,
                       per_relation=dict(Counter(labels.values())),
                       objects_per_subject=objects_per_subject(triples), answered=dict(answered),
                       evidence={k: {r: v[r] for r in v} for k, v in evidence.items() if k in labels})


def objects_per_subject(triples: Mapping[str, Any]) -> dict[str, float]:
    """{relation: mean number of distinct objects per subject} of a triples set — how many answers
    DESCRIBE's relation decode may claim per entity (`knowledge.decode.MULTI_VALUED_MIN`)."""
    out = {}
    for rel, body in triples.items():
        per: dict[str, set] = defaultdict(set)
        for s, o in body["pairs"]:
            per[s.strip().lower()].add(o.strip().lower())
        if per:
            out[rel] = round(sum(len(v) for v in per.values()) / len(per), 4)
    return out


def write_probe_labels(directory: str | Path, result: ProbeResult, templates: Mapping[str, Sequence[str]],
                       model_id: str, min_z: float = DEFAULT_MIN_Z, replace: bool = False,
                       calibration: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Merge `result.labels` into `feature_labels.json` (new keys overwrite; `replace` drops the
    old ones) and write `probe_meta.json`; both atomically."""
    d = Path(directory)
    existing = {} if replace else read_probe_labels(d)
    existing.update(result.labels)
    ordered = {f"L{l}_F{f}": r for (l, f), r in sorted(existing.items())}
    atomic_write_json(d / LABELS_FILE, ordered, indent=2)
    meta = {
        "model": model_id,
        "capture": "ffn_input",
        "score": "activation_z",
        "probes": result.prompts,
        "labels": len(result.labels),
        "total_labels": len(ordered),
        "per_relation": dict(sorted(result.per_relation.items())),
        "layers": list(result.layers),
        "templates": {r: list(t) for r, t in templates.items()},
        "objects_per_subject": dict(sorted(result.objects_per_subject.items())),
        "top_k_per_layer": TOP_K_PER_LAYER,
        "min_gate_score": None,
        "min_z": min_z,
        "seconds": round(result.seconds, 2),
    }
    if calibration is not None:
        meta["calibration"] = dict(calibration)
    if extra:
        meta.update(extra)
    atomic_write_json(d / PROBE_META_FILE, meta, indent=2)
    from ..vindex.checksums import record

    record(d, [LABELS_FILE, PROBE_META_FILE])  # checksummed at write, like every vindex file
    return d / LABELS_FILE


def relabel_clusters(vindex, triples: Mapping[str, Any]) -> int:
    """Re-label the vindex's existing clusters with triples matching (§6.2 step 5a) and rewrite
    `relation_clusters.json`; returns how many clusters got a relation (0 if there are none)."""
    from ..vindex.clusters import label_clusters, write_clusters

    cl = read_clusters(vindex.path)
    if cl is None or cl.k == 0 or not cl.assignments:
        return 0
    import numpy as np

    keys = [(l, f) for l, f, _c in cl.assignments]
    assign = np.asarray([c for _l, _f, c in cl.assignments], dtype=np.int64)
    members = []
    for l, f in keys:
        meta = vindex.feature_meta(l, f)
        members.append((meta.top_token, [t for t, _i, _v in meta.top_k]) if meta else ("", []))
    labels, top_tokens, sources = label_clusters(vindex, assign, cl.k, members, triples=triples)
    cl.labels, cl.top_tokens, cl.sources = labels, top_tokens, sources
    write_clusters(vindex.path, cl)
    return sum(1 for s in sources if s == "triples")


def replace_labels(result: ProbeResult, labels: dict[tuple[int, int], str]) -> ProbeResult:
    """`result` with only `labels` kept (per-relation counts recomputed)."""
    from dataclasses import replace as _replace

    return _replace(result, labels=labels, per_relation=dict(Counter(labels.values())))


@dataclass(frozen=True)
class LabelReport:
    path: Path
    probes: int
    new_labels: int
    total_labels: int
    per_relation: dict[str, int]
    clusters_relabelled: int
    seconds: float


def label_vindex(path: str | Path, triples: str | Path | Mapping[str, Any] | None = None,
                 templates: str | Path | Mapping[str, Sequence[str]] | None = None, *,
                 min_z: float = DEFAULT_MIN_Z, replace: bool = False, clusters: bool = True,
                 layers: Sequence[int] | None = None, max_subjects: int | None = MAX_PROBE_SUBJECTS,
                 causal_check: bool = True, progress=None) -> LabelReport:
    """`modelql label VINDEX --triples FILE`: probe-label a vindex with weights and write
    `feature_labels.json` + `probe_meta.json`; also re-label its clusters from the triples.

    First the relation probes are calibrated on the model (`knowledge.calibrate`: each relation's
    most accurate template, the confidence floors DESCRIBE uses); features are then probed with the
    chosen templates only, over at most `max_subjects` subjects per relation, and every new label
    is checked causally (`knowledge.label_check`): labels whose ablation does not hurt their
    relation's right answers more than a random feature's are dropped (`causal_check=False` keeps
    them); the pass rate is recorded in probe_meta.json.
    `progress(message)` is called at each step."""
    from ..vindex import Vindex

    t0 = time.perf_counter()
    vx = Vindex.load(path)
    if triples is None:
        tri = default_triples()
    elif isinstance(triples, Mapping):
        tri = normalise_triples(triples)
    else:
        tri = load_triples(triples)
    if not tri:
        raise LabelError("the triples file holds no relations")
    if templates is None:
        tmpl = default_templates(tri.keys())
    elif isinstance(templates, Mapping):
        tmpl = {r: [t] if isinstance(t, str) else list(t) for r, t in templates.items()}
    else:
        tmpl = load_templates(templates)
        for r, ts in default_templates(tri.keys()).items():
            tmpl.setdefault(r, ts)
    from .calibrate import calibrate
    from .queries import model_for

    m = model_for(vx)
    tok = m.tokenizer if m.tokenizer is not None else vx.tokenizer
    say = progress or (lambda _msg: None)
    say("calibrating the relation probes (templates, confidence floors)")
    cal = calibrate(m, tok, tri, tmpl, progress=lambda i, n, r: say(f"  calibration {i}/{n}: {r}"))
    say(f"probing features ({', '.join(f'{r}: {t!r}' for r, t in cal.templates.items()) or 'no relation answered'})")
    probe_tmpl = {r: [t] for r, t in cal.templates.items()} or tmpl
    result = probe_features(vx, {r: tri[r] for r in probe_tmpl if r in tri} or tri, probe_tmpl, model=m,
                            min_z=min_z, layers=layers, max_subjects=max_subjects)
    say(f"probed {result.prompts} prompts in {result.seconds:.1f}s: {len(result.labels)} labels")
    check = None
    if causal_check and result.labels:
        from .label_check import check_labels

        say(f"causal check of {len(result.labels)} labels (ablation vs a random feature of the layer)")
        right = {r: list(v) for r, v in cal.right.items()}
        for r, subs in result.answered.items():  # the probes answered right, beyond the calibration's sample
            objs: dict[str, list[str]] = {}
            for s_, o in tri.get(r, {}).get("pairs", ()):
                objs.setdefault(s_, []).append(o)
            have = {s_ for s_, _o in right.get(r, ())}
            right.setdefault(r, []).extend((s_, objs[s_]) for s_ in dict.fromkeys(subs) if s_ not in have and s_ in objs)
        evidence = {k: result.evidence.get(k, {}).get(r, []) for k, r in result.labels.items()}
        chk = check_labels(m, tok, result.labels, cal.templates, right, evidence=evidence)
        failed = [k for k, ok in chk.passed.items() if not ok]
        check = {"checked": chk.checked, "passed": chk.checked - len(failed),
                 "pass_rate": None if chk.pass_rate is None else round(chk.pass_rate, 4),
                 "unchecked": len(chk.unchecked), "dropped": len(failed),
                 "measure": "log_odds", "subjects": "evidence first"}
        say(f"causal check: {check['passed']}/{chk.checked} pass; {len(failed)} failing labels dropped")
        result = replace_labels(result, {k: r for k, r in result.labels.items() if k not in set(failed)})
    written = write_probe_labels(vx.path, result, tmpl, vx.model, min_z=min_z, replace=replace,
                                 calibration=cal.to_json(), extra={"causal_check": check} if check else None)
    n_cl = relabel_clusters(vx, tri) if clusters else 0
    total = len(read_probe_labels(vx.path))
    return LabelReport(path=written, probes=result.prompts, new_labels=len(result.labels), total_labels=total,
                       per_relation=result.per_relation, clusters_relabelled=n_cl,
                       seconds=time.perf_counter() - t0)
