"""The vindex on-disk format: one module owns every byte layout (vindex-format spec §2–§7).

* `IndexJson` / `LayerInfo`: `index.json`, read and written with unknown fields preserved.
* `gate_vectors.bin`: headerless per-layer `[F, H]` matrices at recorded offsets (§3).
* `embeddings.bin`: headerless `[V, H]`, dtype detected by size (§4).
* `down_meta.bin`: the `TEMD` per-feature output summary (§5), writer and mmap'd reader, plus the
  legacy `down_meta.jsonl` reader (§5.5).
* `knn_store.bin`: the `LKNN` retrieval-override store (§7).

Everything is little-endian. Every malformed input raises `VindexError` with a one-line message.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np

from ..errors import VindexError
from ..fsutil import atomic_open, atomic_write_json

INDEX_FILE = "index.json"
GATE_FILE = "gate_vectors.bin"
EMBED_FILE = "embeddings.bin"
DOWN_META_FILE = "down_meta.bin"
ROUTER_FILE = "router_weights.bin"  # MoE: each layer's router [E, H] f32, layer after layer (LARQL's name)
DOWN_META_JSONL = "down_meta.jsonl"
KNN_FILE = "knn_store.bin"
LABELS_FILE = "feature_labels.json"  # probe labels, {"L<layer>_F<feature>": relation} (§6)
WEIGHTS_INDEX = "model.safetensors.index.json"

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LEVELS = ("browse", "attention", "inference", "all")
BYTES_PER_FLOAT = {"f32": 4, "f16": 2}
NP_DTYPE = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}
#: `quant` of a vindex whose weights are blocks (`modelql.vindex.blocks`): LARQL's "q4k" (its Q4_K/Q6_K mix),
#: else the GGML type holding most parameters
QUANTS = ("q4k", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


# ---------------------------------------------------------------------------------------------
# index.json
# ---------------------------------------------------------------------------------------------

_LAYER_KEYS = ("layer", "num_features", "offset", "length", "num_experts", "num_features_per_expert")


@dataclass
class LayerInfo:
    """One `layers[]` entry: where layer `layer`'s gate matrix lives in gate_vectors.bin."""

    layer: int
    num_features: int
    offset: int
    length: int
    num_experts: int | None = None
    num_features_per_expert: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Any) -> LayerInfo:
        if not isinstance(d, dict):
            raise VindexError("index.json: layers[] entries must be objects")
        try:
            info = cls(
                layer=int(d["layer"]), num_features=int(d["num_features"]),
                offset=int(d["offset"]), length=int(d["length"]),
                num_experts=int(d["num_experts"]) if d.get("num_experts") is not None else None,
                num_features_per_expert=(
                    int(d["num_features_per_expert"]) if d.get("num_features_per_expert") is not None else None
                ),
                extra={k: v for k, v in d.items() if k not in _LAYER_KEYS},
            )
        except KeyError as exc:
            raise VindexError(f"index.json: a layers[] entry is missing {exc.args[0]!r}") from None
        except (TypeError, ValueError):
            raise VindexError(f"index.json: layers[] entry {d!r} has a non-integer field") from None
        if min(info.layer, info.num_features, info.offset, info.length) < 0:
            raise VindexError(f"index.json: layers[] entry for layer {info.layer} has a negative field")
        return info

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer, "num_features": self.num_features,
                             "offset": self.offset, "length": self.length}
        if self.num_experts is not None:
            d["num_experts"] = self.num_experts
            d["num_features_per_expert"] = self.num_features_per_expert
        d.update(self.extra)
        return d


_INDEX_KEYS = (
    "version", "model", "family", "source", "checksums", "num_layers", "hidden_size",
    "intermediate_size", "vocab_size", "embed_scale", "extract_level", "dtype", "quant", "layer_bands",
    "layers", "down_top_k", "has_model_weights", "model_config", "modelql",
)
_REQUIRED = ("version", "model", "family", "num_layers", "hidden_size", "intermediate_size",
             "vocab_size", "embed_scale", "layers", "down_top_k")


@dataclass
class IndexJson:
    """`index.json` (spec §2). `extra` keeps unknown top-level fields so rewrites preserve them."""

    model: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    embed_scale: float
    layers: list[LayerInfo]
    down_top_k: int = 10
    version: int = FORMAT_VERSION
    source: dict[str, Any] | None = None
    checksums: dict[str, str] | None = None
    extract_level: str = "browse"
    dtype: str = "f32"
    quant: str = "none"
    layer_bands: dict[str, list[int]] | None = None
    has_model_weights: bool = False
    model_config: dict[str, Any] | None = None
    modelql: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, d: Any, where: str = INDEX_FILE) -> IndexJson:
        if not isinstance(d, dict):
            raise VindexError(f"{where} is not a JSON object")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise VindexError(f"{where} has no integer 'version'")
        if version not in READABLE_VERSIONS:
            raise VindexError(
                f"{where} has format version {version}; this modelql reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise VindexError(f"{where} is missing required field(s): {', '.join(missing)}")
        if not isinstance(d["layers"], list):
            raise VindexError(f"{where}: 'layers' must be an array")
        try:
            idx = cls(
                version=version,
                model=str(d["model"]),
                family=str(d["family"]),
                num_layers=int(d["num_layers"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                vocab_size=int(d["vocab_size"]),
                embed_scale=float(d["embed_scale"]),
                layers=[LayerInfo.from_json(x) for x in d["layers"]],
                down_top_k=int(d["down_top_k"]),
                source=d.get("source"),
                checksums=d.get("checksums"),
                extract_level=str(d.get("extract_level") or "browse"),
                dtype=str(d.get("dtype") or "f32"),
                quant=str(d.get("quant") or "none"),
                layer_bands=d.get("layer_bands"),
                has_model_weights=bool(d.get("has_model_weights", False)),
                model_config=d.get("model_config"),
                modelql=d.get("modelql"),
                extra={k: v for k, v in d.items() if k not in _INDEX_KEYS},
            )
        except (TypeError, ValueError) as exc:
            raise VindexError(f"{where} has a field of the wrong type ({exc})") from None
        if idx.dtype not in BYTES_PER_FLOAT:
            raise VindexError(f"{where}: unsupported dtype {idx.dtype!r} (expected f32 or f16)")
        if idx.quant != "none" and idx.quant not in QUANTS:
            raise VindexError(f"{where}: unsupported quant {idx.quant!r} (expected none, {', '.join(QUANTS)})")
        if idx.extract_level not in LEVELS:
            raise VindexError(f"{where}: unknown extract_level {idx.extract_level!r}")
        if idx.hidden_size <= 0 or idx.num_layers <= 0:
            raise VindexError(f"{where}: hidden_size and num_layers must be positive")
        if idx.checksums is not None and not isinstance(idx.checksums, dict):
            raise VindexError(f"{where}: 'checksums' must be an object")
        return idx

    @classmethod
    def read(cls, directory: str | Path) -> IndexJson:
        path = Path(directory) / INDEX_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VindexError(f"{Path(directory)} is not a vindex (no {INDEX_FILE})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise VindexError(f"cannot read {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VindexError(f"{path} is not valid JSON ({exc})") from None
        return cls.from_json(data, where=str(path))

    # -- writing ---------------------------------------------------------------------------------

    @property
    def bytes_per_float(self) -> int:
        return BYTES_PER_FLOAT[self.dtype]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "model": self.model,
            "family": self.family,
            "source": self.source,
            "checksums": self.checksums,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "embed_scale": self.embed_scale,
            "extract_level": self.extract_level,
            "dtype": self.dtype,
            "quant": self.quant,
            "layer_bands": self.layer_bands,
            "layers": [x.to_json() for x in self.layers],
            "down_top_k": self.down_top_k,
            "has_model_weights": self.has_model_weights,
            "model_config": self.model_config,
        }
        if self.modelql is not None:
            d["modelql"] = self.modelql
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    def write(self, directory: str | Path) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a half-written index."""
        return atomic_write_json(Path(directory) / INDEX_FILE, self.to_json(), indent=2)

    def layer_info(self, layer: int) -> LayerInfo | None:
        for info in self.layers:
            if info.layer == layer:
                return info
        return None


# ---------------------------------------------------------------------------------------------
# gate_vectors.bin and embeddings.bin
# ---------------------------------------------------------------------------------------------


def open_mmap(path: Path) -> mmap.mmap | None:
    """A copy-on-write map of a whole file (writable views, the file is never modified); None if empty."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return None
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)


def check_gate_file(idx: IndexJson, size: int, where: str = GATE_FILE) -> None:
    """Every recorded layer must be consistent with H, dtype and the file size."""
    bpf = idx.bytes_per_float
    for info in idx.layers:
        expect = info.num_features * idx.hidden_size * bpf
        if info.length != expect:
            raise VindexError(
                f"{where}: layer {info.layer} length {info.length} != num_features·hidden_size·{bpf} = {expect}"
            )
        if info.offset + info.length > size:
            raise VindexError(
                f"{where} is truncated: layer {info.layer} needs bytes [{info.offset}, "
                f"{info.offset + info.length}) but the file has {size}"
            )


def gate_array(buf: mmap.mmap, idx: IndexJson, info: LayerInfo) -> np.ndarray:
    """Layer `info.layer`'s `[F, H]` gate matrix as a zero-copy numpy view in the stored dtype."""
    return np.frombuffer(
        buf, dtype=NP_DTYPE[idx.dtype], count=info.num_features * idx.hidden_size, offset=info.offset
    ).reshape(info.num_features, idx.hidden_size)


def embeddings_dtype(size: int, vocab_size: int, hidden_size: int) -> str:
    """The storage dtype of embeddings.bin, detected from its size (spec §4)."""
    n = vocab_size * hidden_size
    if size == 4 * n:
        return "f32"
    if size == 2 * n:
        return "f16"
    raise VindexError(
        f"embeddings.bin size mismatch: {size} bytes, expected {4 * n} (f32) or {2 * n} (f16) "
        f"for {vocab_size}×{hidden_size}"
    )


# ---------------------------------------------------------------------------------------------
# down_meta.bin
# ---------------------------------------------------------------------------------------------

DOWN_META_MAGIC = 0x444D4554  # bytes on disk: 54 45 4D 44 "TEMD"
DOWN_META_MAGIC_LEGACY = 0x54454D44  # ASCII "DMET" stored as bytes
DOWN_META_VERSION = 1


def record_dtype(top_k: int) -> np.dtype:
    """The numpy structured dtype of one down_meta record (8 + 8·K bytes, little-endian)."""
    return np.dtype([("top", "<u4"), ("c", "<f4"), ("ids_logits", [("id", "<u4"), ("logit", "<f4")], (top_k,))])


def make_records(top_ids: np.ndarray, c_scores: np.ndarray, ids: np.ndarray, logits: np.ndarray,
                 top_k: int) -> np.ndarray:
    """Pack [N] / [N] / [N, K] / [N, K] arrays into records (unused slots must already be zero)."""
    rec = np.zeros(len(top_ids), dtype=record_dtype(top_k))
    rec["top"] = top_ids
    rec["c"] = c_scores
    rec["ids_logits"]["id"] = ids
    rec["ids_logits"]["logit"] = logits
    return rec


class DownMetaWriter:
    """Streams down_meta.bin: header, then one block per layer in ascending order (spec §5.2).

    `write_layer(L, records)` for stored layers; layers never written get `num_features 0`.
    An optional `sink(bytes)` sees every byte written (e.g. a running SHA-256).
    """

    def __init__(self, path: str | Path, num_layers: int, top_k: int):
        self.path = Path(path)
        self.num_layers = num_layers
        self.top_k = top_k
        self._fh: BinaryIO = self.path.open("wb")
        self._next = 0
        self._fh.write(struct.pack("<IIII", DOWN_META_MAGIC, DOWN_META_VERSION, num_layers, top_k))

    def _empty_until(self, layer: int) -> None:
        while self._next < layer:
            self._fh.write(struct.pack("<I", 0))
            self._next += 1

    def write_layer(self, layer: int, records: np.ndarray) -> None:
        if layer < self._next or layer >= self.num_layers:
            raise ValueError(f"down_meta layers must be written in ascending order (got {layer})")
        if records.dtype != record_dtype(self.top_k):
            raise ValueError("records have the wrong dtype")
        self._empty_until(layer)
        self._fh.write(struct.pack("<I", len(records)))
        self._fh.write(records.tobytes())
        self._next = layer + 1

    def begin_layer(self, layer: int, num_features: int) -> None:
        """Start a layer whose records follow via `write_records` (streamed in batches)."""
        if layer < self._next or layer >= self.num_layers:
            raise ValueError(f"down_meta layers must be written in ascending order (got {layer})")
        self._empty_until(layer)
        self._fh.write(struct.pack("<I", num_features))
        self._next = layer + 1

    def write_records(self, records: np.ndarray) -> None:
        self._fh.write(records.tobytes())

    def close(self) -> None:
        if not self._fh.closed:
            self._empty_until(self.num_layers)
            self._fh.close()

    def __enter__(self) -> DownMetaWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class RawMeta:
    """One decoded down_meta record before token strings are attached (ids and logits only)."""

    top_token_id: int
    c_score: float
    top_k: tuple[tuple[int, float], ...]


class DownMetaFile:
    """A memory-mapped down_meta.bin with a lazily usable per-layer offset table (spec §5.3)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._buf = open_mmap(self.path)
        except OSError as exc:
            raise VindexError(f"cannot read {self.path}: {exc}") from None
        size = len(self._buf) if self._buf is not None else 0
        if size < 16:
            raise VindexError(f"{self.path.name} is truncated: header needs 16 bytes, file has {size}")
        magic, version, n_layers, top_k = struct.unpack_from("<IIII", self._buf, 0)
        if magic not in (DOWN_META_MAGIC, DOWN_META_MAGIC_LEGACY):
            raise VindexError(f"{self.path.name} has bad magic 0x{magic:08X} (expected 'TEMD')")
        if version != DOWN_META_VERSION:
            raise VindexError(f"{self.path.name} has version {version}; only version 1 is readable")
        self.num_layers = n_layers
        self.top_k = top_k
        self.dtype = record_dtype(top_k)
        self._layers: dict[int, np.ndarray] = {}
        pos = 16
        for layer in range(n_layers):
            if pos + 4 > size:
                raise VindexError(f"{self.path.name} is truncated at layer {layer} (no feature count)")
            (n,) = struct.unpack_from("<I", self._buf, pos)
            pos += 4
            need = n * self.dtype.itemsize
            if pos + need > size:
                raise VindexError(
                    f"{self.path.name} is truncated in layer {layer}: {n} records need {need} bytes, "
                    f"{size - pos} remain"
                )
            if n:
                self._layers[layer] = np.frombuffer(self._buf, dtype=self.dtype, count=n, offset=pos)
            pos += need

    def layers(self) -> list[int]:
        return sorted(self._layers)

    def num_features(self, layer: int) -> int:
        arr = self._layers.get(layer)
        return 0 if arr is None else len(arr)

    def records(self, layer: int) -> np.ndarray | None:
        """The layer's structured record array (zero-copy), or None when the layer is absent."""
        return self._layers.get(layer)

    def get(self, layer: int, feature: int) -> RawMeta | None:
        """Record (layer, feature) with empty slots dropped; None for an empty record or absent slot."""
        arr = self._layers.get(layer)
        if arr is None or not 0 <= feature < len(arr):
            return None
        return decode_record(arr[feature])


def decode_record(rec: np.void) -> RawMeta | None:
    top = int(rec["top"])
    c = float(rec["c"])
    pairs = tuple(
        (int(i), float(v)) for i, v in zip(rec["ids_logits"]["id"], rec["ids_logits"]["logit"])
        if not (i == 0 and v == 0.0)
    )
    if top == 0 and c == 0.0 and not pairs:
        return None
    return RawMeta(top, c, pairs)


@dataclass(frozen=True)
class JsonlMeta:
    """One legacy down_meta.jsonl record (tokens are stored as text in this format)."""

    top_token: str
    top_token_id: int
    c_score: float
    top_k: tuple[tuple[str, int, float], ...]


def read_down_meta_jsonl(path: str | Path) -> dict[tuple[int, int], JsonlMeta]:
    """The legacy LARQL v1 metadata file (spec §5.5): `{(layer, feature): JsonlMeta}`."""
    path = Path(path)
    out: dict[tuple[int, int], JsonlMeta] = {}
    try:
        fh = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise VindexError(f"cannot read {path}: {exc}") from None
    with fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                top_k = tuple((str(x.get("t", "")), int(x.get("i", 0)), float(x.get("s", 0.0)))
                              for x in d.get("k", []) or [])
                out[(int(d["l"]), int(d["f"]))] = JsonlMeta(
                    str(d.get("t", "")), int(d.get("i", 0)), float(d.get("c", 0.0)), top_k
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise VindexError(f"{path.name}: line {n} is not a valid metadata record") from None
    return out


# ---------------------------------------------------------------------------------------------
# knn_store.bin
# ---------------------------------------------------------------------------------------------

KNN_MAGIC = b"LKNN"
KNN_VERSION = 1


@dataclass
class KnnEntry:
    """One retrieval-override fact. `key` is stored L2-normalised in f16 (spec §7)."""

    layer: int
    key: np.ndarray  # [H] float32 (normalised on write)
    target_id: int
    target_token: str
    entity: str
    relation: str
    confidence: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n >= 1e-8 else v


def write_knn_store(path: str | Path, entries: Iterable[KnnEntry], dim: int) -> Path | None:
    """Write the store (layers ascending, entries in the given order); nothing is written if empty."""
    entries = list(entries)
    path = Path(path)
    if not entries:
        return None
    by_layer: dict[int, list[KnnEntry]] = {}
    for e in entries:
        by_layer.setdefault(int(e.layer), []).append(e)
    with atomic_open(path, "wb") as fh:
        fh.write(KNN_MAGIC + struct.pack("<III", KNN_VERSION, dim, len(by_layer)))
        for layer in sorted(by_layer):
            group = by_layer[layer]
            fh.write(struct.pack("<II", layer, len(group)))
            keys = np.zeros((len(group), dim), dtype="<f2")
            for i, e in enumerate(group):
                k = np.asarray(e.key, dtype=np.float32).reshape(-1)
                if k.shape[0] != dim:
                    raise VindexError(f"knn key for {e.entity!r} has length {k.shape[0]}, expected {dim}")
                keys[i] = _unit(k).astype("<f2")
            fh.write(keys.tobytes())
            fh.write(np.asarray([e.target_id for e in group], dtype="<u4").tobytes())
            for e in group:
                meta = {**e.extra, "target_token": e.target_token, "entity": e.entity,
                        "relation": e.relation, "confidence": float(e.confidence)}
                blob = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                fh.write(struct.pack("<I", len(blob)) + blob)
    return path


def read_knn_store(path: str | Path) -> tuple[int, list[KnnEntry]]:
    """`(dim, entries)`; keys come back as float32 arrays decoded from the stored f16."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VindexError(f"cannot read {path}: {exc}") from None
    name = path.name
    if len(data) < 16:
        raise VindexError(f"{name} is truncated (header)")
    if data[:4] != KNN_MAGIC:
        raise VindexError(f"{name} has bad magic {data[:4]!r} (expected b'LKNN')")
    version, dim, n_layers = struct.unpack_from("<III", data, 4)
    if version != KNN_VERSION:
        raise VindexError(f"{name} has version {version}; only version 1 is readable")
    pos = 16
    entries: list[KnnEntry] = []

    def need(n: int, what: str) -> None:
        if pos + n > len(data):
            raise VindexError(f"{name} is truncated ({what})")

    for _ in range(n_layers):
        need(8, "layer header")
        layer, n = struct.unpack_from("<II", data, pos)
        pos += 8
        need(n * dim * 2, f"keys of layer {layer}")
        keys = np.frombuffer(data, dtype="<f2", count=n * dim, offset=pos).reshape(n, dim).astype(np.float32)
        pos += n * dim * 2
        need(n * 4, f"target ids of layer {layer}")
        targets = np.frombuffer(data, dtype="<u4", count=n, offset=pos)
        pos += n * 4
        for i in range(n):
            need(4, f"metadata of layer {layer}")
            (m,) = struct.unpack_from("<I", data, pos)
            pos += 4
            need(m, f"metadata of layer {layer}")
            try:
                meta = json.loads(data[pos : pos + m].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError
            except (UnicodeDecodeError, ValueError):
                raise VindexError(f"{name}: entry {i} of layer {layer} has invalid JSON metadata") from None
            pos += m
            conf = meta.get("confidence")
            entries.append(KnnEntry(
                layer=int(layer), key=keys[i], target_id=int(targets[i]),
                target_token=str(meta.get("target_token", "")), entity=str(meta.get("entity", "")),
                relation=str(meta.get("relation", "")),
                confidence=1.0 if conf is None else float(conf),
                extra={k: v for k, v in meta.items()
                       if k not in ("target_token", "entity", "relation", "confidence")},
            ))
    return dim, entries
