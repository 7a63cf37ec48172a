"""Relation clusters (algorithms §6.2): k-means of feature offset directions, with labels.

For every knowledge-band feature, the *input token* is the whole-word token whose raw embedding
best matches the gate row, and the *offset* is `unit(E[top_token] − E[input token])`: the
direction from what the feature reads to what it writes. Offsets of one relation point the
same way ("France→Paris" ≈ "Germany→Berlin"), so spherical k-means on them groups features by
relation. Each cluster is labelled, first available wins: (a) reference triples (when given),
(b) the nearest category word in embedding space, (c) TF-IDF of member output tokens.

Called by extraction (`modelql.vindex.extract._relation_clusters`) on the finished browse files,
and by `modelql label` (`modelql.knowledge.labels`) to relabel clusters with a triples file.
Lives in `vindex/` (not `knowledge/`) because extraction calls it and imports only flow upward.
Writes `relation_clusters.json` and `feature_clusters.jsonl` atomically.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..fsutil import atomic_write_json, atomic_write_text

CLUSTERS_FILE = "relation_clusters.json"
FEATURE_CLUSTERS_FILE = "feature_clusters.jsonl"
MAX_K = 512
MAX_ITERATIONS = 50
FEATURE_BATCH = 256
#: (b) a cluster takes a category word as label when the cosine of its members' mean output
#: embedding with the word's embedding reaches this.
CATEGORY_MIN_COSINE = 0.35
#: (a) a cluster takes a relation from the triples when ≥ 2 members vote for it and it has
#: more than half of the votes (the probe labeller's rule).
TRIPLE_MIN_VOTES = 2

CATEGORY_WORDS: tuple[str, ...] = (
    "country", "nation", "city", "capital", "place", "location", "region", "continent", "language",
    "currency", "money", "people", "person", "name", "number", "time", "year", "month", "day",
    "color", "animal", "food", "sport", "music", "science", "company", "organization", "university",
    "river", "mountain", "island", "ocean", "religion", "occupation", "profession", "book", "film",
)

# lowercase stop words for TF-IDF tokens (the DESCRIBE stop list, algorithms §5)
_TFIDF_STOP = frozenset(
    """the and for but not you all can her was one our out are has his how its may new now old see way
    who did get let say she too use from have been will with this that they were some them than when
    what your each make like just over such take also into only very more does most about which their
    would there could other after being where these those first should because through before par aux
    che del""".split()
)


@dataclass
class Clusters:
    """The content of `relation_clusters.json` plus the per-feature assignment."""

    k: int
    centres: np.ndarray  # [k, H] unit rows
    labels: list[str]
    counts: list[int]
    top_tokens: list[list[str]]
    assignments: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, feature, cluster)
    sources: list[str] = field(default_factory=list)  # per cluster: triples | category | tfidf | fallback

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "centres": [[float(x) for x in row] for row in self.centres],
                "labels": list(self.labels), "counts": [int(c) for c in self.counts],
                "top_tokens": [list(t) for t in self.top_tokens]}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(n >= 1e-8, x / np.maximum(n, 1e-30), x)


def whole_word_ids(texts: Sequence[str]) -> np.ndarray:
    """W: ids whose decoded text has ≥ 3 bytes, all ASCII alphanumeric or `-` or `'`."""
    out = []
    for i, t in enumerate(texts):
        if len(t.encode("utf-8")) >= 3 and all((c.isascii() and c.isalnum()) or c in "-'" for c in t):
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def spherical_kmeans(x: np.ndarray, k: int, max_iter: int = MAX_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of unit rows `x` ([n, H]) → (centres [k, H], assignment [n]).

    Deterministic farthest-point init: first centre = the row of largest norm (lowest index on
    ties), then repeatedly the row maximising its minimum `1 − cos` to the chosen centres.
    Assignment = argmax cosine (lowest centre on ties); centres = renormalised member means (an
    empty cluster keeps its centre); stops early when no assignment changes.
    """
    n = x.shape[0]
    k = max(1, min(int(k), n))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    norms = torch.linalg.vector_norm(xt.double(), dim=1)
    first = int(torch.argmax(norms))  # torch.argmax returns the first maximal index
    chosen = [first]
    min_dist = 1.0 - (xt @ xt[first])
    min_dist[first] = -math.inf
    for _ in range(1, k):
        nxt = int(torch.argmax(min_dist))
        chosen.append(nxt)
        min_dist = torch.minimum(min_dist, 1.0 - (xt @ xt[nxt]))
        min_dist[chosen] = -math.inf
    centres = xt[chosen].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(max_iter):
        new = torch.argmax(xt @ centres.t(), dim=1)
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=k)
        nz = counts > 0
        s = sums[nz]
        norm = torch.linalg.vector_norm(s, dim=1, keepdim=True)
        centres[nz] = torch.where(norm >= 1e-8, s / norm.clamp_min(1e-30), s)
    return centres.numpy(), assign.numpy()


# the form rule lives here (not in knowledge/) because cluster labelling (a) needs it too
_FORM_STOP = frozenset("the of and in to for is on at by an or de la le el du des von van al bin ibn di da do das den "
                       "der het".split())


def forms(obj: str) -> set[str]:
    """Lowercase text plus, for multi-word objects, each word (trailing 's / ’s removed) of ≥ 4
    characters not in the particle list (the, of, de, von, ...)."""
    low = obj.strip().lower()
    out = {low} if low else set()
    words = low.split()
    if len(words) > 1:
        for w in words:
            for suffix in ("'s", "’s"):
                if w.endswith(suffix):
                    w = w[: -len(suffix)]
            if len(w) >= 4 and w not in _FORM_STOP:
                out.add(w)
    return out



def triples_object_index(triples: Mapping[str, Any]) -> dict[str, Counter]:
    """`form → Counter(relation)` over every object of `{relation: {"pairs": [[s, o], ...]}}`."""
    idx: dict[str, Counter] = {}
    for rel, body in triples.items():
        pairs = body.get("pairs", []) if isinstance(body, Mapping) else body
        for pair in pairs:
            if len(pair) < 2:
                continue
            for f in forms(str(pair[1])):
                idx.setdefault(f, Counter())[rel] += 1
    return idx


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------


def compute_offsets(vindex, layers: Iterable[int] | None = None):
    """(keys [(layer, feature)], offsets [n, H], input-token texts) for the clustered features."""
    E = vindex.embeddings()
    V = vindex.vocab_size
    texts = vindex.vocab_texts()
    W = whole_word_ids(texts)
    if layers is None:
        lo, hi = vindex.bands.knowledge
        layers = [l for l in vindex.layers() if lo <= l <= hi]
    tok = vindex.tokenizer
    EW = E[torch.from_numpy(W)] if len(W) else None
    enc_cache: dict[str, np.ndarray | None] = {}
    keys: list[tuple[int, int]] = []
    rows: list[np.ndarray] = []
    inputs: list[str] = []
    for layer in layers:
        info = vindex.layer_info(layer)
        if getattr(info, "num_experts", None):
            continue  # dense models only
        top, _c, present = vindex.meta_arrays(layer)
        if EW is None or not len(present):
            continue
        G = vindex.gate(layer)
        for start in range(0, G.shape[0], FEATURE_BATCH):
            g = G[start:start + FEATURE_BATCH]
            best = torch.argmax(EW @ g.t(), dim=0).numpy()  # signed, raw E; lowest on ties
            for j, wi in enumerate(best):
                f = start + j
                if f >= len(present) or not present[f]:
                    continue
                tid = int(top[f])
                if tid < 3 or tid >= V:
                    continue
                inp = texts[int(W[wi])]
                ids = enc_cache.get(inp, False)
                if ids is False:
                    enc = [i for i in tok.encode(inp, add_special_tokens=False) if 3 <= i < V]
                    ids = np.asarray(enc, dtype=np.int64) if enc else None
                    enc_cache[inp] = ids
                if ids is None:
                    continue
                diff = (E[tid] - E[torch.from_numpy(ids)].mean(dim=0)).numpy()
                nrm = float(np.linalg.norm(diff))
                if nrm < 1e-6:
                    continue
                keys.append((layer, f))
                rows.append(diff / nrm)
                inputs.append(inp)
    H = vindex.hidden_size
    return keys, (np.stack(rows).astype(np.float32) if rows else np.zeros((0, H), np.float32)), inputs


def _member_tokens(vindex, keys: Sequence[tuple[int, int]]) -> list[tuple[str, list[str]]]:
    out = []
    for layer, f in keys:
        m = vindex.feature_meta(layer, f)
        if m is None:
            out.append(("", []))
        else:
            out.append((m.top_token, [t for t, _i, _v in m.top_k]))
    return out


def _tfidf_token_ok(t: str) -> bool:
    t = t.strip().lower()
    if len(t) < 3 or t in _TFIDF_STOP:
        return False
    ascii_n = sum(1 for c in t if c.isascii())
    return 2 * ascii_n > len(t)


def label_clusters(vindex, assign: np.ndarray, k: int, members: list[tuple[str, list[str]]],
                   triples: Mapping[str, Any] | None = None,
                   categories: Sequence[str] | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """(labels, top_tokens, sources) of `k` clusters — first available of triples / category / TF-IDF."""
    by_cluster: list[list[int]] = [[] for _ in range(k)]
    for i, c in enumerate(assign.tolist()):
        by_cluster[c].append(i)
    # TF-IDF over members' top-k lists
    tfs: list[Counter] = []
    df: Counter = Counter()
    for idx in by_cluster:
        tf: Counter = Counter()
        for i in idx:
            for t in members[i][1]:
                if _tfidf_token_ok(t):
                    tf[t.strip().lower()] += 1
        tfs.append(tf)
        df.update(tf.keys())
    N = max(1, k)
    top_tokens: list[list[str]] = []
    tfidf_labels: list[str | None] = []
    for tf in tfs:
        scored = sorted(((cnt * math.log(N / df[t]), t) for t, cnt in tf.items()), key=lambda x: (-x[0], x[1]))
        top_tokens.append([t for _s, t in scored[:5]])
        pos = [t for s, t in scored if s > 0][:3]
        if pos:
            tfidf_labels.append("/".join(pos))
        elif tf:
            tfidf_labels.append("/".join(t for t, _ in sorted(tf.items(), key=lambda x: (-x[1], x[0]))[:3]))
        else:
            tfidf_labels.append(None)
    # (a) triples
    obj_index = triples_object_index(triples) if triples else None
    # (b) category words
    cat_vecs = None
    cats = list(categories if categories is not None else CATEGORY_WORDS)
    E = vindex.embeddings()
    V = vindex.vocab_size
    tok = vindex.tokenizer
    if cats:
        vecs, names = [], []
        for w in cats:
            ids = [i for i in tok.encode(" " + w, add_special_tokens=False) if i < V]
            if len(ids) == 1:  # only words the vocabulary has as one token carry a usable direction
                vecs.append(E[ids[0]].numpy())
                names.append(w)
        if vecs:
            cat_vecs = (_unit_rows(np.stack(vecs).astype(np.float32)), names)
    texts_to_id: dict[str, int] = {}
    labels, sources = [], []
    for c, idx in enumerate(by_cluster):
        label, source = None, None
        if obj_index is not None and idx:
            votes: Counter = Counter()
            for i in idx:
                for rel in obj_index.get(members[i][0].strip().lower(), Counter()):
                    votes[rel] += 1
            if votes:
                rel, n = sorted(votes.items(), key=lambda x: (-x[1], x[0]))[0]
                if n >= TRIPLE_MIN_VOTES and n / sum(votes.values()) > 0.5:
                    label, source = rel, "triples"
        if label is None and cat_vecs is not None and idx:
            freq = Counter(members[i][0] for i in idx if members[i][0])
            ids = []
            for t, _n in freq.most_common(5):
                if t not in texts_to_id:
                    enc = tok.encode(" " + t, add_special_tokens=False)
                    texts_to_id[t] = enc[0] if enc and enc[0] < V else -1
                if texts_to_id[t] >= 0:
                    ids.append(texts_to_id[t])
            if ids:
                mean = E[torch.tensor(ids)].mean(dim=0).numpy()
                nrm = float(np.linalg.norm(mean))
                if nrm >= 1e-8:
                    cos = cat_vecs[0] @ (mean / nrm)
                    j = int(np.argmax(cos))
                    if float(cos[j]) >= CATEGORY_MIN_COSINE:
                        label, source = cat_vecs[1][j], "category"
        if label is None and tfidf_labels[c]:
            label, source = tfidf_labels[c], "tfidf"
        if label is None:
            label, source = f"cluster-{c}", "fallback"
        labels.append(label)
        sources.append(source)
    return labels, top_tokens, sources


def compute_clusters(vindex, triples: Mapping[str, Any] | None = None, categories: Sequence[str] | None = None,
                     layers: Iterable[int] | None = None, max_k: int = MAX_K) -> Clusters:
    """Offsets → spherical k-means → labels, for the knowledge band (or `layers`)."""
    keys, x, _inputs = compute_offsets(vindex, layers)
    H = vindex.hidden_size
    if not keys:
        return Clusters(0, np.zeros((0, H), np.float32), [], [], [], [], [])
    k = min(max_k, len(keys))
    centres, assign = spherical_kmeans(x, k)
    members = _member_tokens(vindex, keys)
    labels, top_tokens, sources = label_clusters(vindex, assign, k, members, triples, categories)
    counts = np.bincount(assign, minlength=k).tolist()
    assignments = [(l, f, int(c)) for (l, f), c in zip(keys, assign.tolist())]
    return Clusters(k, centres, labels, counts, top_tokens, assignments, sources)


def write_clusters(directory: str | Path, clusters: Clusters) -> None:
    """Write `relation_clusters.json` and `feature_clusters.jsonl` (each atomically)."""
    d = Path(directory)
    atomic_write_json(d / CLUSTERS_FILE, clusters.to_json())
    lines = "".join(json.dumps({"l": l, "f": f, "c": c}) + "\n" for l, f, c in clusters.assignments)
    atomic_write_text(d / FEATURE_CLUSTERS_FILE, lines)
    from .checksums import record

    record(d, [CLUSTERS_FILE, FEATURE_CLUSTERS_FILE])


def read_clusters(directory: str | Path) -> Clusters | None:
    """Read the two cluster files (None when `relation_clusters.json` is absent or unusable)."""
    d = Path(directory)
    try:
        data = json.loads((d / CLUSTERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    k = int(data.get("k", 0) or 0)
    labels = [str(x) for x in data.get("labels", [])]
    counts = [int(x) for x in data.get("counts", [])]
    top = [[str(t) for t in ts] for ts in data.get("top_tokens", [])]
    centres = np.asarray(data.get("centres", []), dtype=np.float32)
    assignments = []
    p = d / FEATURE_CLUSTERS_FILE
    if p.exists():
        with p.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    o = json.loads(line)
                    assignments.append((int(o["l"]), int(o["f"]), int(o["c"])))
                except (ValueError, KeyError, TypeError):
                    continue
    return Clusters(k, centres, labels, counts, top, assignments, [])


def build_relation_clusters(vindex, out_dir: str | Path | None = None, triples: Mapping[str, Any] | None = None,
                            categories: Sequence[str] | None = None) -> Clusters:
    """Extraction's entry point: compute the clusters of `vindex` and write them into `out_dir`
    (default: the vindex directory)."""
    clusters = compute_clusters(vindex, triples=triples, categories=categories)
    write_clusters(out_dir if out_dir is not None else vindex.path, clusters)
    return clusters
