"""A vindex's weights kept in the source's quantization (index.json `quant` other than "none").

Extracting a GGUF file whose matrices are low-bit used to dequantize them into float32 safetensors
(SmolLM2's 98 MB Q4_1 file became a 631 MB vindex). Here the file's blocks are copied byte for byte,
so the vindex is about the size of the file and its model computes exactly what the file does.

The layout is LARQL's Q4_K vindex (format spec §3, §5.9), with the block type recorded per entry:

* `attn_weights_q4k.bin` + `attn_weights_q4k_manifest.json`: each layer's attention matrices (q, k, v, o);
* `interleaved_q4k.bin` + `interleaved_q4k_manifest.json`: each layer's FFN matrices (gate, up, down);
* `weight_manifest.json`: everything else, each entry naming its file: the token embedding
  (`embed_tokens.bin`), an untied output head (`lm_head_q4.bin`), norms and biases (`norms.bin`, f32),
  and matrices a COMPILE rewrote (`ffn_edits_f32.bin`, f32: edits stay in full precision; such an
  entry replaces the block entry of the same key).

Entries are LARQL's `{key, shape, format, offset, length}` (+ `kind`, `file`). `format` is the GGML
type name: LARQL writes Q4_K and Q6_K; a GGUF source's own type is kept whatever it is (Q4_0, Q4_1,
Q8_0, Q5_K, F16, ...). Keys are HF tensor names and rows are in HF order (llama.cpp's rotary
permutation of Q/K rows is undone by moving whole rows of blocks: exact).

`gate_vectors.bin` and `embeddings.bin` are not written (LARQL's `--drop-gate-vectors`): gate rows and
embeddings are dequantized from these blocks when used.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import VindexError

ATTN_FILE = "attn_weights_q4k.bin"
ATTN_MANIFEST = "attn_weights_q4k_manifest.json"
FFN_FILE = "interleaved_q4k.bin"
FFN_MANIFEST = "interleaved_q4k_manifest.json"
WEIGHT_MANIFEST = "weight_manifest.json"
EMBED_FILE = "embed_tokens.bin"
LM_HEAD_FILE = "lm_head_q4.bin"
NORMS_FILE = "norms.bin"
EDITS_FILE = "ffn_edits_f32.bin"
FILES = (ATTN_FILE, FFN_FILE, EMBED_FILE, LM_HEAD_FILE, NORMS_FILE, EDITS_FILE)
MANIFESTS = (ATTN_MANIFEST, FFN_MANIFEST, WEIGHT_MANIFEST)
FLOAT_TYPES = ("F32", "F16", "BF16")
#: where each part goes: file, manifest
_PLACES = {"attn": (ATTN_FILE, ATTN_MANIFEST), "ffn": (FFN_FILE, FFN_MANIFEST), "embed": (EMBED_FILE, WEIGHT_MANIFEST),
           "lm_head": (LM_HEAD_FILE, WEIGHT_MANIFEST), "norms": (NORMS_FILE, WEIGHT_MANIFEST),
           "edits": (EDITS_FILE, WEIGHT_MANIFEST)}
#: LARQL's order of a layer's matrices
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_order(name: str) -> int:
    return next((i for i, leaf in enumerate(_ORDER) if f".{leaf}." in name), len(_ORDER))


def row_bytes(qtype: str, width: int) -> int:
    """Bytes of one row of `width` values stored as `qtype`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    except KeyError:
        raise VindexError(f"unknown block type {qtype!r}") from None
    if width % block:
        raise VindexError(f"a row of {width} values is not a whole number of {qtype} blocks ({block})")
    return width // block * size


def quant_name(types: dict[str, int]) -> str:
    """index.json's `quant` for matrices of these types (type → parameters): LARQL's "q4k" for its own
    Q4_K/Q6_K mix, else the low-bit type holding the most parameters ("q4_1"); "none" if all are float."""
    low = {t: n for t, n in types.items() if t not in FLOAT_TYPES}
    if not low:
        return "none"
    if set(low) <= {"Q4_K", "Q6_K"}:
        return "q4k"
    return max(low, key=lambda t: (low[t], t)).lower()


def is_low_bit(source) -> bool:
    """Whether a source can hand over low-bit blocks (a quantized GGUF file or block vindex)."""
    types = getattr(source, "storage_types", None)
    return callable(getattr(source, "blocks", None)) and callable(types) and quant_name(types(matrices=True)) != "none"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _kind(qtype: str, ndim: int) -> str:
    if ndim == 1:
        return "vector"
    return {"Q4_K": "tensor_q4k", "F32": "tensor", "F16": "tensor_f16"}.get(qtype, "tensor_blocks")


class BlockWriter:
    """Appends tensors to the block files of a directory; `close()` writes the manifests."""

    def __init__(self, directory: Path, manifests: dict[str, list[dict[str, Any]]] | None = None):
        self.dir = Path(directory)
        self._fh: dict[str, BinaryIO] = {}
        self._offset: dict[str, int] = {}
        self.manifests: dict[str, list[dict[str, Any]]] = manifests or {m: [] for m in MANIFESTS}
        self.types: dict[str, int] = {}

    def _write(self, place: str, key: str, data: bytes | memoryview, qtype: str, shape: tuple[int, ...]) -> None:
        file, manifest = _PLACES[place]
        if file not in self._fh:
            self._fh[file] = (self.dir / file).open("wb")
            self._offset[file] = 0
        n = len(data) if isinstance(data, bytes) else data.nbytes
        self._fh[file].write(data)
        entry: dict[str, Any] = {"key": key, "shape": list(shape), "format": qtype,
                                 "offset": self._offset[file], "length": n}
        if manifest == WEIGHT_MANIFEST:
            entry.update(kind=_kind(qtype, len(shape)), file=file)
        self.manifests[manifest].append(entry)
        self._offset[file] += n
        if len(shape) >= 2:
            self.types[qtype] = self.types.get(qtype, 0) + int(np.prod(shape))

    def add_blocks(self, place: str, key: str, raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> None:
        """A matrix as raw rows of blocks [N, bytes per row]."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if raw.shape != (shape[0], row_bytes(qtype, shape[1])):
            raise VindexError(f"{key}: {raw.shape} bytes do not hold a {qtype} matrix of shape {list(shape)}")
        self._write(place, key, memoryview(raw).cast("B"), qtype, tuple(shape))

    def add_float(self, place: str, key: str, t: torch.Tensor) -> None:
        """A tensor stored as float32 (vectors, matrices without a block form, edited matrices)."""
        a = np.ascontiguousarray(t.detach().to(torch.float32).numpy(), dtype="<f4")
        self._write(place, key, memoryview(a).cast("B"), "F32", tuple(a.shape))

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()
        for name, entries in self.manifests.items():
            if entries:
                (self.dir / name).write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        for fh in self._fh.values():
            if not fh.closed:
                fh.close()


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockEntry:
    key: str
    shape: tuple[int, ...]
    format: str
    file: str
    offset: int
    length: int

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))


def read_manifests(directory: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for name in MANIFESTS:
        p = Path(directory) / name
        if not p.exists():
            out[name] = []
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VindexError(f"{p} is not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise VindexError(f"{p} must be a JSON array of entries")
        out[name] = data
    return out


class BlockStore:
    """The block files of a vindex, memory-mapped: tensors by HF name, dequantized on demand."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.entries: dict[str, BlockEntry] = {}
        self._maps: dict[str, mmap.mmap] = {}
        manifests = read_manifests(self.dir)
        for name in MANIFESTS:  # weight_manifest.json last: its (edited) entries replace the others
            default = {ATTN_MANIFEST: ATTN_FILE, FFN_MANIFEST: FFN_FILE}.get(name)
            for d in manifests[name]:
                file = d.get("file") if isinstance(d, dict) else None
                if not (self.dir / str(file or default)).exists():  # a slice (`modelql slice`) left it out
                    continue
                e = self._entry(d, default, name)
                self.entries[e.key] = e
        if not self.entries:
            raise VindexError(f"{self.dir.name} has no block weights ({', '.join(MANIFESTS)})")

    def _entry(self, d: Any, default: str | None, where: str) -> BlockEntry:
        try:
            e = BlockEntry(str(d["key"]), tuple(int(x) for x in d["shape"]), str(d["format"]),
                           str(d.get("file") or default), int(d["offset"]), int(d["length"]))
        except (KeyError, TypeError, ValueError):
            raise VindexError(f"{where}: malformed entry {str(d)[:120]}") from None
        if e.file not in FILES:
            raise VindexError(f"{where}: entry {e.key} names an unknown file {e.file!r}")
        width = e.shape[-1] if e.shape else 1
        expect = (e.params // width) * (4 * width if e.format == "F32" else row_bytes(e.format, width))
        if e.length != expect:
            raise VindexError(f"{where}: {e.key} has {e.length} bytes, a {e.format} tensor of shape "
                              f"{list(e.shape)} has {expect}")
        buf = self._map(e.file)
        if e.offset < 0 or e.offset + e.length > len(buf):
            raise VindexError(f"{e.file} is truncated: {e.key} needs bytes [{e.offset}, {e.offset + e.length}) "
                              f"but the file has {len(buf)}")
        return e

    def _map(self, file: str) -> mmap.mmap:
        buf = self._maps.get(file)
        if buf is None:
            path = self.dir / file
            try:
                with path.open("rb") as fh:
                    buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise VindexError(f"cannot map {path}: {exc}") from None
            self._maps[file] = buf
        return buf

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def entry(self, key: str) -> BlockEntry:
        e = self.entries.get(key)
        if e is None:
            raise VindexError(f"{self.dir.name}: tensor {key} is not in the block weights")
        return e

    def raw(self, key: str) -> np.ndarray:
        e = self.entry(key)
        flat = np.frombuffer(self._map(e.file), dtype=np.uint8, count=e.length, offset=e.offset)
        return flat.reshape(e.shape[0], -1) if len(e.shape) >= 2 else flat

    def blocks(self, key: str) -> tuple[np.ndarray, str, tuple[int, int]] | None:
        """(raw rows [N, bytes per row] — a view of the mapping —, type, (N, K)) of a matrix; None for a vector."""
        e = self.entries.get(key)
        if e is None or len(e.shape) != 2:
            return None
        return self.raw(key), e.format, (e.shape[0], e.shape[1])

    def rows(self, key: str, ids) -> np.ndarray:
        """float32 [len(ids), K] rows of a matrix."""
        from ..models.quant import dequantize_rows

        e = self.entry(key)
        return dequantize_rows(self.raw(key)[np.asarray(ids, dtype=np.int64)], e.format, e.shape[-1])

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor as float32 (an owned copy)."""
        from ..models.quant import dequantize_rows

        e = self.entry(key)
        if len(e.shape) < 2:
            return torch.from_numpy(self.raw(key).copy().view("<f4").astype(np.float32)).reshape(e.shape)
        return torch.from_numpy(dequantize_rows(self.raw(key), e.format, e.shape[-1])).reshape(e.shape)

    def storage_types(self, matrices: bool = False) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries.values():
            if matrices and len(e.shape) < 2:
                continue
            out[e.format] = out.get(e.format, 0) + e.params
        return out

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self.entries.values())

    def release_pages(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            for buf in self._maps.values():
                try:
                    buf.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError):
                    pass


class BlockSource:
    """A block vindex as the runtime's `WeightSource`: its config.json and block weights under HF names,
    with `blocks()` / `packed()` so the low-bit kernels take the stored blocks as a GGUF file's are."""

    def __init__(self, path: str | Path):
        from ..models.source import read_json

        self.path = Path(path)
        self.config = read_json(self.path / "config.json", "the model config")
        self.store = BlockStore(self.path)

    def names(self) -> list[str]:
        return self.store.keys()

    def get(self, name: str) -> torch.Tensor:
        from ..errors import ModelFormatError

        if name not in self.store:
            raise ModelFormatError(f"{self.path.name}: tensor {name} not found")
        return self.store.tensor(name)

    def blocks(self, name: str):
        return self.store.blocks(name)

    def packed(self, name: str):
        from ..models.quant import pack_blocks

        return pack_blocks(self.store.blocks(name), f"{self.path.name}: tensor {name}")

    def storage_types(self, matrices: bool = False) -> dict[str, int]:
        return self.store.storage_types(matrices)

    def release_pages(self) -> None:
        self.store.release_pages()


def rewrite_edited(store: BlockStore, out: Path, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Write into `out` a weight manifest and edits file in which `tensors` (HF name → edited float matrix)
    replace their block entries in float32 (earlier edits of `store` are carried over); the other block
    files are unchanged. Returns the files written."""
    manifests = read_manifests(store.dir)
    keep = [e for e in manifests[WEIGHT_MANIFEST] if e.get("file") != EDITS_FILE]
    bw = BlockWriter(out, {WEIGHT_MANIFEST: keep})
    try:
        for key, e in store.entries.items():
            if e.file == EDITS_FILE and key not in tensors:
                bw.add_float("edits", key, store.tensor(key))
        for key, t in tensors.items():
            bw.add_float("edits", key, t)
    except BaseException:
        bw.abort()
        raise
    bw.close()
    return {EDITS_FILE, WEIGHT_MANIFEST}


def is_block_vindex(path: Path) -> bool:
    """A vindex directory whose weights are stored as blocks (and so read by `BlockSource`)."""
    p = Path(path) / "index.json"
    if not p.is_file():
        return False
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and d.get("quant", "none") not in (None, "none") and bool(d.get("has_model_weights"))
