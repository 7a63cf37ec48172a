"""`Vindex`: a memory-mapped vindex directory — gate KNN, walk, feature metadata.

Gate matrices are read through a copy-on-write mmap of `gate_vectors.bin` (never modified).
Scoring is exact f32, one matmul per layer plus a top-K on |score| (ties → lower feature index;
scores returned signed). f32 layers are scored zero-copy on the mapping. An f16 layer is scored
by a fused decoder (~32 MiB of rows at a time widened into a reused scratch buffer, then a matvec: no
large allocation, half the bytes read) until it is used a second time; then it is widened once
into an LRU cache bounded in bytes (`cache_bytes`, default 4 GiB or `$MODELQL_GATE_CACHE_MB`)
and scored by a single matmul. Layers are admitted only if every loaded layer fits the budget
(an LRU over sequential walks would only thrash). `warm()` decodes ahead of use (servers);
`gate(layer)` always returns (and caches) the whole f32 matrix.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import CapabilityError, ModelqlError, VindexError
from . import format as fmt
from .bands import Bands, resolve_bands
from .checksums import VerifyReport, check_once, verify_checksums

DEFAULT_CACHE_BYTES = 4 << 30


# ---------------------------------------------------------------------------------------------
# result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureMeta:
    """What feature (layer, f) promotes: its down vector's top tokens through the embedding."""

    top_token: str
    top_token_id: int
    c_score: float
    top_k: tuple[tuple[str, int, float], ...]  # (token, id, logit), logit descending


@dataclass(frozen=True)
class GateHit:
    layer: int
    feature: int
    score: float  # signed g_f · q


@dataclass(frozen=True)
class WalkHit:
    layer: int
    feature: int
    score: float
    meta: FeatureMeta


# ---------------------------------------------------------------------------------------------
# exact top-K by |score|
# ---------------------------------------------------------------------------------------------


def topk_abs(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest |scores| along the last axis, |score| descending, ties → lower index."""
    return topk_exact(scores.abs(), k)


def topk_exact(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest values along the last axis, descending, ties → lower index.

    Works on [F] and [N, F]; returns [k] / [N, k] int64. Exact: `torch.topk` alone does not
    define the order of equal values, so equal values are re-sorted by index, and a tie
    straddling the k-th place is resolved from the full candidate set.
    """
    a = values
    n = a.shape[-1]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros((*a.shape[:-1], 0), dtype=torch.long)
    squeeze = a.dim() == 1
    if squeeze:
        a = a.unsqueeze(0)
    # one extra place reveals a tie straddling the cut: the (k+1)-th value equals the k-th
    vals, idx = torch.topk(a, min(k + 1, n), dim=-1, sorted=True)
    straddle = vals[:, k] == vals[:, k - 1] if k < n else None
    vals, idx = vals[:, :k], idx[:, :k]
    # order equal values by index: sort by index, then stable sort by value (descending)
    idx_sorted, perm = idx.sort(dim=-1)
    v_sorted = vals.gather(-1, perm)
    order = v_sorted.sort(dim=-1, descending=True, stable=True).indices
    out = idx_sorted.gather(-1, order)
    if straddle is not None:
        for row in torch.nonzero(straddle).flatten().tolist():
            thr = vals[row, k - 1]
            cand = torch.nonzero(a[row] >= thr).flatten()  # ascending indices
            o = a[row, cand].sort(descending=True, stable=True).indices[:k]
            out[row] = cand[o]
    return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------------
# tokenizer adapter (until modelql.tokenizer lands everywhere)
# ---------------------------------------------------------------------------------------------


class _HfTokenizer:
    """Minimal adapter over `tokenizers.Tokenizer`: encode / decode / vocab_size."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises untyped errors
            raise VindexError(f"{path} is not a valid tokenizer.json ({exc})") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([list(s) for s in seqs], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def load_tokenizer(directory: Path):
    """The tokenizer of a vindex / model directory: `modelql.tokenizer.Tokenizer` (private fallback
    adapter over `tokenizers` if that module is unavailable). Needs `encode`/`decode`."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise VindexError(f"{directory} has no tokenizer.json")
    try:
        from ..tokenizer import Tokenizer
    except ModuleNotFoundError as exc:
        if exc.name != "modelql.tokenizer":
            raise
        return _HfTokenizer(path)
    try:
        return Tokenizer.load(directory)
    except ModelqlError as exc:
        raise VindexError(str(exc)) from None


def decode_vocab(tokenizer, vocab_size: int) -> list[str]:
    """`dec(id) = decode([id], skip_special_tokens=True).strip()` for every id < vocab_size."""
    seqs = [[i] for i in range(vocab_size)]
    batch = getattr(tokenizer, "decode_batch", None)
    if batch is None and hasattr(tokenizer, "backend"):
        batch = tokenizer.backend.decode_batch
    texts = (batch(seqs, skip_special_tokens=True) if batch is not None
             else [tokenizer.decode(s, skip_special_tokens=True) for s in seqs])
    return [t.strip() for t in texts]


# ---------------------------------------------------------------------------------------------
# the decoded-gate cache
# ---------------------------------------------------------------------------------------------

# Rows widened per step by the fused f16 scorer: ~32 MiB of f32 (3276 rows at H = 2560). Smaller
# chunks stay in cache on an idle machine, but each chunk costs two thread-pool barriers, which
# dominate when the cores are shared; a few large chunks are the robust middle.
_CHUNK_BYTES = 32 << 20
_CHUNK_ROWS: int | None = None  # override (tests)
_scratch = threading.local()


def _scratch_f32(rows: int, cols: int) -> torch.Tensor:
    """A per-thread reusable f32 buffer of at least rows × cols (no fresh memory per query)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=torch.float32)
        _scratch.buf = buf
    return buf[: rows * cols].view(rows, cols)


def fused_f16_scores(g16: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`g16.float() @ q` for an f16 [F, H] matrix without materialising it in f32.

    Decodes `_CHUNK_ROWS` rows at a time into a reused scratch buffer and scores them: the same
    f32 products as the decoded matrix (bit-identical per row), reading half the bytes.
    q: [H] → [F], or [N, H] → [N, F].
    """
    F, H = g16.shape
    rows = _CHUNK_ROWS or max(1, _CHUNK_BYTES // (4 * max(H, 1)))
    rows = min(rows, max(F, 1))
    scratch = _scratch_f32(rows, H)
    if q.dim() == 1:
        out = torch.empty(F, dtype=torch.float32)
        for i in range(0, F, rows):
            m = min(rows, F - i)
            c = scratch[:m]
            c.copy_(g16[i : i + m])
            torch.mv(c, q, out=out[i : i + m])
        return out
    out = torch.empty(q.shape[0], F, dtype=torch.float32)
    for i in range(0, F, rows):
        m = min(rows, F - i)
        c = scratch[:m]
        c.copy_(g16[i : i + m])
        out[:, i : i + m] = torch.mm(q, c.t())
    return out


# ---------------------------------------------------------------------------------------------
# LRU of decoded layers
# ---------------------------------------------------------------------------------------------


class _LayerCache:
    """LRU of decoded f32 gate matrices, bounded in bytes (a matrix larger than the bound is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, layer: int) -> torch.Tensor | None:
        with self._lock:
            t = self._items.get(layer)
            if t is not None:
                self._items.move_to_end(layer)
            return t

    def put(self, layer: int, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if layer in self._items:
                return
            while self._items and self.bytes + size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            self._items[layer] = t
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __contains__(self, layer: int) -> bool:
        return layer in self._items


# ---------------------------------------------------------------------------------------------
# Vindex
# ---------------------------------------------------------------------------------------------


def _cache_budget(cache_bytes: int | None) -> int:
    if cache_bytes is not None:
        return int(cache_bytes)
    env = os.environ.get("MODELQL_GATE_CACHE_MB")
    if env:
        try:
            return int(float(env) * (1 << 20))
        except ValueError:
            raise VindexError(f"MODELQL_GATE_CACHE_MB={env!r} is not a number") from None
    return DEFAULT_CACHE_BYTES


class Vindex:
    """An opened vindex directory. Create with `Vindex.load(path)`."""

    def __init__(self, path: Path, index: fmt.IndexJson, cache_bytes: int | None = None):
        self.path = path
        self.index = index
        self._infos: dict[int, fmt.LayerInfo] = {}
        for info in index.layers:
            if info.layer in self._infos:
                raise VindexError(f"{fmt.INDEX_FILE}: layer {info.layer} is listed twice")
            if not 0 <= info.layer < index.num_layers:
                raise VindexError(f"{fmt.INDEX_FILE}: layer {info.layer} is outside 0..{index.num_layers - 1}")
            self._infos[info.layer] = info
        self._cache = _LayerCache(_cache_budget(cache_bytes))
        self._lock = threading.Lock()
        self._gate_buf = None
        self._blocks = None  # a block vindex's weights (modelql.vindex.blocks): its gates and embedding
        self._block_keys: tuple[str, str] | None = None
        self._open_gates()
        self._embed_dtype: str | None = None
        self._embed: torch.Tensor | None = None
        self._check_embeddings()
        self._down: fmt.DownMetaFile | None = None
        self._jsonl: dict[tuple[int, int], fmt.JsonlMeta] | None = None
        self._open_down_meta()
        self._tokenizer = None
        self._token_cache: dict[int, str] = {}
        self._vocab_texts: list[str] | None = None
        self.bands: Bands = resolve_bands(index.family, index.num_layers, index.layer_bands)
        # Decode-and-cache f16 layers on first use only if every layer fits the budget; otherwise
        # an LRU walking all layers would evict each layer before its reuse, so score by fused decode.
        f32_total = sum(4 * i.num_features * index.hidden_size for i in index.layers)
        self._cache_fits_all = f32_total <= self._cache.max_bytes
        self._uses: dict[int, int] = {}  # scoring calls per uncached f16 layer (admission on the 2nd)

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, cache_bytes: int | None = None) -> Vindex:
        """Open a vindex directory (mmap; nothing large is read). Raises `VindexError` if malformed."""
        p = Path(path)
        if not p.exists():
            raise VindexError(f"vindex {p} does not exist")
        if not p.is_dir():
            raise VindexError(f"{p} is not a vindex directory")
        return cls(p, fmt.IndexJson.read(p), cache_bytes=cache_bytes)

    def _open_gates(self) -> None:
        gate_path = self.path / fmt.GATE_FILE
        self._gate_missing = not gate_path.exists()
        if self._gate_missing:
            if self.index.quant != "none":
                from .blocks import BlockStore

                self._blocks = BlockStore(self.path)
                self._gate_missing = False
            return
        size = gate_path.stat().st_size
        fmt.check_gate_file(self.index, size)
        if size:
            try:
                self._gate_buf = fmt.open_mmap(gate_path)
            except OSError as exc:
                raise VindexError(f"cannot map {gate_path}: {exc}") from None

    def _check_embeddings(self) -> None:
        p = self.path / fmt.EMBED_FILE
        if p.exists():
            self._embed_dtype = fmt.embeddings_dtype(p.stat().st_size, self.index.vocab_size, self.index.hidden_size)

    def _open_down_meta(self) -> None:
        p = self.path / fmt.DOWN_META_FILE
        if p.exists():
            self._down = fmt.DownMetaFile(p)
            if self._down.num_layers != self.index.num_layers:
                raise VindexError(
                    f"{fmt.DOWN_META_FILE} has {self._down.num_layers} layers, index.json says {self.index.num_layers}"
                )
        elif (self.path / fmt.DOWN_META_JSONL).exists():
            self._jsonl = fmt.read_down_meta_jsonl(self.path / fmt.DOWN_META_JSONL)

    # -- descriptors -----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.index.num_layers

    @property
    def hidden_size(self) -> int:
        return self.index.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.index.vocab_size

    @property
    def embed_scale(self) -> float:
        return self.index.embed_scale

    @property
    def family(self) -> str:
        return self.index.family

    @property
    def model(self) -> str:
        return self.index.model

    @property
    def dtype(self) -> str:
        return self.index.dtype

    @property
    def extract_level(self) -> str:
        return self.index.extract_level

    @property
    def down_top_k(self) -> int:
        return self.index.down_top_k

    def layers(self) -> list[int]:
        """The layers with gate data ("loaded" layers), ascending."""
        return sorted(self._infos)

    def num_features(self, layer: int) -> int:
        info = self._infos.get(layer)
        if info is not None:
            return info.num_features
        if self._down is not None:
            return self._down.num_features(layer)
        return 0

    def layer_info(self, layer: int) -> fmt.LayerInfo:
        info = self._infos.get(layer)
        if info is None:
            raise VindexError(f"layer {layer} is not loaded in {self.path.name} (loaded: {self._layers_text()})")
        return info

    def expert_of(self, layer: int, feature: int) -> tuple[int | None, int]:
        """(expert, feature within the expert) of a MoE layer's feature (LARQL's layout: experts'
        features in expert order, the shared expert's last as expert `num_experts`);
        (None, feature) on a dense layer."""
        info = self.layer_info(layer)
        per = info.num_features_per_expert
        if not info.num_experts or not per:
            return None, feature
        return feature // per, feature % per

    def expert_range(self, layer: int, expert: int) -> range:
        """The layer's features that belong to `expert` (empty on a dense layer)."""
        info = self.layer_info(layer)
        per = info.num_features_per_expert
        if not info.num_experts or not per:
            return range(0)
        return range(expert * per, min((expert + 1) * per, info.num_features))

    def router(self, layer: int) -> torch.Tensor:
        """A MoE layer's router [E, H] float32, from `router_weights.bin`."""
        info = self.layer_info(layer)
        if not info.num_experts:
            raise VindexError(f"layer {layer} of {self.path.name} is not a mixture of experts")
        path = self.path / fmt.ROUTER_FILE
        if not path.is_file():
            raise VindexError(f"{self.path.name} has no {fmt.ROUTER_FILE}")
        rows = info.num_experts * self.hidden_size
        flat = np.fromfile(path, dtype="<f4", count=rows, offset=4 * rows * layer)
        if flat.size != rows:
            raise VindexError(f"{fmt.ROUTER_FILE} of {self.path.name} is truncated at layer {layer}")
        return torch.from_numpy(flat.reshape(info.num_experts, self.hidden_size).copy())

    def _layers_text(self) -> str:
        ls = self.layers()
        if not ls:
            return "none"
        return f"{ls[0]}–{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else ", ".join(map(str, ls))

    # -- gates -----------------------------------------------------------------------------------

    # -- a block vindex: gates and embedding dequantized from the stored blocks --------------------

    @property
    def quantized(self) -> bool:
        """True when the weights are kept in the source's blocks (index.json `quant`; no gate_vectors.bin)."""
        return self._blocks is not None

    def _keys(self) -> tuple[str, str]:
        """(gate key template, embedding key) of the block weights, from the model's spec."""
        if self._block_keys is None:
            from ..models.families import spec_from_config
            from ..models.source import read_json

            spec = spec_from_config(read_json(self.path / "config.json", "the model config"))
            tm = spec.layer_map["gate.weight" if spec.gated_ffn else "up.weight"]
            if tm.transform != "id":
                raise VindexError(f"{self.path.name}: {spec.family} gates are not rows of a stored matrix")
            self._block_keys = (tm.hf_name, spec.global_map["embed.weight"].hf_name)
        return self._block_keys

    def _gate_key(self, layer: int) -> str:
        self.layer_info(layer)
        return self._keys()[0].format(i=layer)

    def _block_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """`G_L @ q` dequantizing ~32 MiB of rows at a time (no f32 copy of the layer is kept)."""
        from ..models.quant import dequantize_rows

        raw, qtype, (F, H) = self._blocks.blocks(self._gate_key(layer))
        rows = _CHUNK_ROWS or max(1, _CHUNK_BYTES // (4 * max(H, 1)))
        out = torch.empty(F, dtype=torch.float32) if q.dim() == 1 else torch.empty(q.shape[0], F, dtype=torch.float32)
        for i in range(0, F, rows):
            c = torch.from_numpy(dequantize_rows(raw[i:i + rows], qtype, H))
            if q.dim() == 1:
                torch.mv(c, q, out=out[i:i + c.shape[0]])
            else:
                out[:, i:i + c.shape[0]] = torch.mm(q, c.t())
        return out

    def gate_array(self, layer: int) -> np.ndarray:
        """Layer `layer`'s `[F, H]` gates as a zero-copy numpy view in the stored dtype (read-only use;
        a block vindex: the dequantized float32 rows)."""
        if self._blocks is not None:
            return self.gate(layer).numpy()
        info = self.layer_info(layer)
        if self._gate_missing:
            raise VindexError(f"{self.path.name} has no {fmt.GATE_FILE}")
        if info.num_features == 0 or self._gate_buf is None:
            return np.zeros((0, self.hidden_size), dtype=fmt.NP_DTYPE[self.dtype])
        return fmt.gate_array(self._gate_buf, self.index, info)

    def gate(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s `[F, H]` gate matrix in float32 (f32: the mmap itself; f16: decoded, cached).

        Treat the result as read-only: it may be shared with the cache or the file mapping.
        """
        cached = self._cache.get(layer)
        if cached is not None:
            return cached
        if self._blocks is not None:
            out = self._blocks.tensor(self._gate_key(layer))
            self._cache.put(layer, out)
            return out
        arr = self.gate_array(layer)
        t = torch.from_numpy(arr)
        if self.dtype == "f32":
            return t
        out = t.float()
        self._cache.put(layer, out)
        return out

    def gate_row(self, layer: int, feature: int) -> torch.Tensor:
        """One gate row `g_f` as a fresh float32 [H] tensor (no layer decode)."""
        if self._blocks is not None:
            n = self.layer_info(layer).num_features
            if not 0 <= feature < n:
                raise VindexError(f"feature {feature} is outside layer {layer} (0..{n - 1})")
            return torch.from_numpy(self._blocks.rows(self._gate_key(layer), [feature])[0])
        arr = self.gate_array(layer)
        if not 0 <= feature < arr.shape[0]:
            raise VindexError(f"feature {feature} is outside layer {layer} (0..{arr.shape[0] - 1})")
        return torch.from_numpy(np.array(arr[feature], dtype=np.float32))

    def cached_layers(self) -> list[int]:
        return list(self._cache._items)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _query(self, q, batched: bool) -> torch.Tensor:
        t = q if isinstance(q, torch.Tensor) else torch.as_tensor(np.asarray(q))
        t = t.detach().to(torch.float32)
        if t.shape[-1] != self.hidden_size or t.dim() != (2 if batched else 1):
            want = "[N, H]" if batched else "[H]"
            raise VindexError(f"query has shape {list(t.shape)}, expected {want} with H = {self.hidden_size}")
        return t.contiguous()

    def gate_scores(self, layer: int, q) -> torch.Tensor:
        """All signed scores `G_L · q` in f32 ([F]); `q` may also be [N, H] → [N, F].

        A decoded (cached) or f32 layer is one matmul; an f16 layer not in the cache is scored
        by the fused decoder (no f32 copy of the layer is made or cached).
        """
        t = q if isinstance(q, torch.Tensor) else torch.as_tensor(np.asarray(q))
        t = self._query(t, t.dim() == 2)
        g = self._cache.get(layer)
        if g is None and self._blocks is not None:
            uses = self._uses.get(layer, 0) + 1
            self._uses[layer] = uses
            if uses < 2 or not self._cache_fits_all:
                return self._block_scores(layer, t)
        elif g is None and self.dtype == "f16":
            uses = self._uses.get(layer, 0) + 1
            self._uses[layer] = uses
            if uses < 2 or not self._cache_fits_all:
                return fused_f16_scores(torch.from_numpy(self.gate_array(layer)), t)
        if g is None:
            g = self.gate(layer)  # f32: the mapping itself; f16: decoded into the cache
        return torch.mv(g, t) if t.dim() == 1 else torch.mm(t, g.t())

    def gate_scores_at(self, layer: int, q: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The signed scores `g_f · q` of `features` only ([k] for q [H]): what a caller that ranks
        features by something else (DESCRIBE's activations) reads for its top few, without a pass
        over the whole gate matrix."""
        t = self._query(q, False)
        idx = torch.as_tensor(features, dtype=torch.long)
        g = self._cache.get(layer)
        if g is None and self.dtype != "f32":
            rows = torch.from_numpy(np.ascontiguousarray(self.gate_array(layer)[idx.numpy()])).float()
        else:
            rows = (g if g is not None else self.gate(layer))[idx]
        return rows @ t

    def warm(self, layers: Iterable[int] | None = None) -> list[int]:
        """Decode f16 layers into the cache ahead of use (as many as the budget holds); returns them."""
        done = []
        for layer in (self.layers() if layers is None else layers):
            self.gate(layer)
            if (self.dtype == "f32" and self._blocks is None) or layer in self._cache:
                done.append(layer)
        return done

    def gate_knn(self, layer: int, q, k: int = 10) -> list[GateHit]:
        """Exact top-`k` features of `layer` by |g_f · q|; ties → lower index; scores signed."""
        scores = self.gate_scores(layer, self._query(q, False))
        idx = topk_abs(scores, k)
        vals = scores[idx].tolist()
        return [GateHit(layer, f, v) for f, v in zip(idx.tolist(), vals)]

    def gate_knn_batch(self, layer: int, queries, k: int = 10) -> list[list[GateHit]]:
        """`gate_knn` for many queries at once ([N, H] → N hit lists), one matmul."""
        scores = self.gate_scores(layer, self._query(queries, True))
        idx = topk_abs(scores, k)
        vals = scores.gather(1, idx).tolist()
        return [[GateHit(layer, f, v) for f, v in zip(row_i, row_v)] for row_i, row_v in zip(idx.tolist(), vals)]

    def walk(self, q, layers: Iterable[int] | None = None, k: int = 10) -> list[WalkHit]:
        """Gate KNN on each layer (default: every loaded layer) with metadata; metadata-less hits dropped."""
        qt = self._query(q, False)
        out: list[WalkHit] = []
        for layer in (self.layers() if layers is None else layers):
            for hit in self.gate_knn(layer, qt, k):
                meta = self.feature_meta(layer, hit.feature)
                if meta is not None:
                    out.append(WalkHit(layer, hit.feature, hit.score, meta))
        return out

    # -- embeddings ------------------------------------------------------------------------------

    @property
    def has_embeddings(self) -> bool:
        return self._embed_dtype is not None or (self._blocks is not None and self._keys()[1] in self._blocks)

    def embeddings(self) -> torch.Tensor:
        """The raw (unscaled) `[V, H]` embedding matrix in float32 (f16 decoded once, lazily)."""
        if self._embed is not None:
            return self._embed
        if self._embed_dtype is None and self.has_embeddings:  # a block vindex
            with self._lock:
                if self._embed is None:
                    self._embed = self._blocks.tensor(self._keys()[1])
            return self._embed
        if self._embed_dtype is None:
            raise VindexError(f"{self.path.name} has no {fmt.EMBED_FILE}")
        with self._lock:
            if self._embed is None:
                buf = fmt.open_mmap(self.path / fmt.EMBED_FILE)
                arr = np.frombuffer(buf, dtype=fmt.NP_DTYPE[self._embed_dtype]).reshape(
                    self.vocab_size, self.hidden_size
                )
                t = torch.from_numpy(arr)
                self._embed = t.float() if self._embed_dtype == "f16" else t
        return self._embed

    def embedding(self, token_id: int, scaled: bool = True) -> torch.Tensor:
        """One embedding row, times `embed_scale` unless `scaled=False`."""
        if not 0 <= token_id < self.vocab_size:
            raise VindexError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self._embed is None and self._embed_dtype is None and self.has_embeddings:  # one row of blocks
            row = torch.from_numpy(self._blocks.rows(self._keys()[1], [token_id])[0])
        else:
            row = self.embeddings()[token_id].clone()
        return row * self.embed_scale if scaled else row

    # -- tokens and metadata ---------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def token_text(self, token_id: int) -> str:
        """`decode([id], skip_special_tokens=True).strip()`, memoised."""
        if self._vocab_texts is not None and 0 <= token_id < len(self._vocab_texts):
            return self._vocab_texts[token_id]
        text = self._token_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True).strip()
            self._token_cache[token_id] = text
        return text

    def vocab_texts(self) -> list[str]:
        """`token_text` of every id < vocab_size, decoded in one batch and kept."""
        if self._vocab_texts is None:
            self._vocab_texts = decode_vocab(self.tokenizer, self.vocab_size)
        return self._vocab_texts

    @property
    def has_down_meta(self) -> bool:
        return self._down is not None or self._jsonl is not None

    def feature_meta(self, layer: int, feature: int) -> FeatureMeta | None:
        """Metadata of (layer, feature), or None for an empty record / absent layer or feature."""
        if self._down is not None:
            raw = self._down.get(layer, feature)
            if raw is None:
                return None
            tt = self.token_text
            return FeatureMeta(
                top_token=tt(raw.top_token_id), top_token_id=raw.top_token_id, c_score=raw.c_score,
                top_k=tuple((tt(i), i, v) for i, v in raw.top_k),
            )
        if self._jsonl is not None:
            m = self._jsonl.get((layer, feature))
            if m is None:
                return None
            return FeatureMeta(m.top_token.strip(), m.top_token_id, m.c_score,
                               tuple((t.strip(), i, v) for t, i, v in m.top_k))
        return None

    def meta_arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bulk view of a layer's metadata: (top_token_id u32 [F], c_score f32 [F], present bool [F])."""
        if self._down is not None:
            rec = self._down.records(layer)
            if rec is None:
                e = np.zeros(0)
                return e.astype(np.uint32), e.astype(np.float32), e.astype(bool)
            present = (rec["top"] != 0) | (rec["c"] != 0.0) | np.any(
                (rec["ids_logits"]["id"] != 0) | (rec["ids_logits"]["logit"] != 0.0), axis=1
            )
            return np.asarray(rec["top"]), np.asarray(rec["c"]), present
        n = self.num_features(layer)
        top = np.zeros(n, dtype=np.uint32)
        c = np.zeros(n, dtype=np.float32)
        present = np.zeros(n, dtype=bool)
        if self._jsonl is not None:
            for (l, f), m in self._jsonl.items():
                if l == layer and 0 <= f < n:
                    top[f], c[f], present[f] = m.top_token_id, m.c_score, True
        return top, c, present

    # -- weights ---------------------------------------------------------------------------------

    @property
    def has_weights(self) -> bool:
        """True when the directory is a complete HF checkpoint (extract level inference/all)."""
        if self.index.extract_level not in ("inference", "all"):
            return False
        if not (self.path / "config.json").exists():
            return False
        return (self._blocks is not None or (self.path / fmt.WEIGHTS_INDEX).exists()
                or (self.path / "model.safetensors").exists())

    def load_model(self, dtype: str | torch.dtype = "float32"):
        """The runtime `Model` from the vindex's own safetensors weights (inference level only)."""
        if not self.has_weights:
            raise CapabilityError(
                f"{self.path.name} is a {self.index.extract_level}-level vindex: this requires model weights: "
                "re-extract with --level inference"
            )
        from ..runtime import load_model

        return load_model(self.path, dtype)

    # -- integrity -------------------------------------------------------------------------------

    def verify(self, workers: int = 2) -> VerifyReport:
        """Re-hash every file listed in `checksums` (a missing or mismatching file is a failure)."""
        report = verify_checksums(self.path, self.index.checksums, workers=workers)
        if not self.index.checksums:
            report.problems.append("index.json lists no checksums")
        return report

    def check_integrity(self, workers: int = 2) -> None:
        """Raise `VindexError` if a file listed in `checksums` is missing or altered (each file is
        hashed once per size and mtime: `checksums.check_once`). For a vindex about to be used."""
        failures = check_once(self.path, self.index.checksums, workers=workers)
        if failures:
            name, reason = next(iter(failures.items()))
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise VindexError(f"{self.path.name}: {name}: {reason}{more}: the vindex is damaged; "
                              f"run `modelql verify {self.path}`")

    def __repr__(self) -> str:
        return (f"Vindex({str(self.path)!r}, model={self.model!r}, layers={len(self._infos)}/{self.num_layers}, "
                f"H={self.hidden_size}, dtype={self.dtype}, level={self.extract_level}"
                + (f", quant={self.index.quant}" if self.quantized else "") + ")")


def verify(path: str | Path, workers: int = 2) -> VerifyReport:
    """Open (structural checks) and re-hash a vindex; never raises for a malformed vindex."""
    p = Path(path)
    try:
        vx = Vindex.load(p)
    except VindexError as exc:
        report = VerifyReport(p)
        report.problems.append(str(exc))
        try:  # still check the hashes we can read
            idx = fmt.IndexJson.read(p)
            sums = verify_checksums(p, idx.checksums, workers=workers)
            report.checked, report.failures = sums.checked, sums.failures
        except VindexError:
            pass
        return report
    return vx.verify(workers=workers)
