"""Streaming extraction: a HF checkpoint → a vindex directory (algorithms §1–§2, format §1–§10).

One layer at a time: read its tensors from the (mmap'd) weight source, write its gate rows to
`gate_vectors.bin`, compute its down_meta records in f32 batches, and — at the attention and
inference levels — append its HF tensors to the safetensors shards. Peak memory is one layer's
tensors plus the f32 embedding matrix (and one `[batch, V]` logits block).

Everything is written into a staging directory next to the target (`fsutil.staging_directory`)
and renamed into place at the end, so a failure (or Ctrl-C) leaves nothing half-written.

Relation clusters (algorithms §6.2) are built by `modelql.vindex.clusters.build_relation_clusters
(vindex, out_dir)` when that module exists: it is called on the finished browse files in the
staging directory, before checksums are taken.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import struct
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ModelFormatError, ModelqlError, VindexError
from ..fsutil import atomic_write_json, replace_directory, staging_directory
from ..models.families import spec_from_config
from ..models.source import WeightSource, canonical_tensor, resolve_prefix
from ..models.spec import ModelSpec
from . import format as fmt
from .bands import resolve_bands
from .blocks import WEIGHT_MANIFEST, BlockWriter, is_low_bit, layer_order, quant_name
from .checksums import compute_checksums, files_to_hash, record
from .vindex import decode_vocab, load_tokenizer, topk_exact

EXTRACT_LEVELS = ("browse", "attention", "inference")
HF_METADATA_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                     "chat_template.jinja")
DEFAULT_SHARD_BYTES = 4 << 30
DOWN_META_BATCH = 1024
LOGITS_BLOCK_BYTES = 512 << 20  # cap on one [batch, V] f32 logits block

# HF text-CausalLM class per model_type, for configs flattened from multimodal sources
CAUSAL_LM_CLASS = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"modelql {version('modelql')}"
    except Exception:
        return "modelql"


@dataclass
class ExtractResult:
    path: Path
    level: str
    dtype: str
    num_layers: int
    bytes_read: int  # weight bytes read from the source
    bytes_written: int
    seconds: float
    seconds_down_meta: float = 0.0  # of which: the E·W_down logits and their top-K
    quant: str = "none"  # index.json's quant: the weights' block type ("none": float safetensors)
    storage_types: dict[str, int] | None = None  # block vindex: matrix parameters per stored type

    @property
    def storage(self) -> str:
        """What the weights are stored as, for messages."""
        if not self.storage_types:
            return f"gate/embeddings {self.dtype}" + (", weights float safetensors" if self.level != "browse" else "")
        total = sum(self.storage_types.values())
        parts = ", ".join(f"{t} {n / total:.0%}" for t, n in sorted(self.storage_types.items(), key=lambda x: -x[1]))
        return f"weights quant {self.quant} (the source's blocks: {parts})"

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------
# down_meta computation (algorithms §1)
# ---------------------------------------------------------------------------------------------


def empty_token_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """`mask[id]` is True when `decode([id], skip_special_tokens=True).strip()` is empty."""
    return np.array([t == "" for t in decode_vocab(tokenizer, vocab_size)], dtype=bool)


def down_meta_batch_size(vocab_size: int) -> int:
    b = DOWN_META_BATCH
    while b > 1 and b * vocab_size * 4 > LOGITS_BLOCK_BYTES:
        b //= 2
    return b


def down_meta_records(embed: torch.Tensor, down: torch.Tensor, top_k: int, empty: np.ndarray,
                      batch: int | None = None):
    """Yield down_meta record arrays for the columns of `down` ([H, F], f32), `batch` columns at a time.

    `logits = E · down[:, f]` in f32; the K largest (signed; ties → lower id) in descending order;
    ids decoding to "" dropped without replacement; survivors written from slot 0, zero-padded.
    """
    V = embed.shape[0]
    F = down.shape[1]
    batch = batch or down_meta_batch_size(V)
    kk = min(top_k, V)
    for start in range(0, F, batch):
        cols = down[:, start : start + batch]  # [H, B]
        logits = torch.mm(cols.t(), embed.t())  # [B, V]
        idx = topk_exact(logits, kk)  # [B, kk] descending, ties → lower id
        vals = logits.gather(1, idx).numpy()
        ids = idx.numpy().astype(np.int64)
        keep = ~empty[ids]
        order = np.argsort(~keep, axis=1, kind="stable")  # kept first, original order
        ids = np.take_along_axis(ids, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        keep = np.take_along_axis(keep, order, axis=1)
        ids[~keep] = 0
        vals[~keep] = 0.0
        if kk < top_k:
            pad = top_k - kk
            ids = np.pad(ids, ((0, 0), (0, pad)))
            vals = np.pad(vals, ((0, 0), (0, pad)))
        yield fmt.make_records(ids[:, 0], vals[:, 0], ids, vals, top_k)


# ---------------------------------------------------------------------------------------------
# streaming safetensors shards (format §8)
# ---------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class StreamingSafetensors:
    """Writes a safetensors file tensor by tensor without holding it in memory.

    Data is appended after a reserved header area; `close()` writes the JSON header padded with
    spaces to exactly the reserved size (the safetensors format allows trailing whitespace).
    """

    def __init__(self, path: Path, reserve: int, metadata: dict[str, str] | None = None):
        self.path = path
        self.reserve = (reserve + 7) // 8 * 8
        self.metadata = metadata or {"format": "pt"}
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0
        self._fh = path.open("wb")
        self._fh.seek(8 + self.reserve)

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in _ST_DTYPES:
            raise ModelFormatError(f"tensor {name} has unsupported dtype {t.dtype}")
        data = _tensor_bytes(t)
        self._fh.write(data)
        n = data.nbytes
        self.entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + n]}
        self.size += n

    def close(self) -> None:
        header = {"__metadata__": self.metadata, **self.entries}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(blob) > self.reserve:
            raise VindexError(f"internal error: safetensors header of {self.path.name} exceeds its reserve")
        blob += b" " * (self.reserve - len(blob))
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._fh.close()

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _header_reserve(names: list[str]) -> int:
    return 64 + sum(len(n.encode("utf-8")) + 200 for n in names)


class ShardSet:
    """One weight component (`embed`, `attn`, `ffn`) split into contiguous layer-range shards."""

    def __init__(self, directory: Path, component: str, names_by_layer: dict[int, list[str]], limit: int):
        self.dir = directory
        self.component = component
        self.names_by_layer = names_by_layer
        self.limit = limit
        self.files: dict[str, str] = {}  # tensor → final file name
        self.total = 0
        self._cur: StreamingSafetensors | None = None
        self._first = self._last = -1
        self._n = 0

    def _open(self, layer: int) -> None:
        remaining = [n for l, ns in self.names_by_layer.items() if l >= layer for n in ns]
        tmp = self.dir / f".{self.component}.part{self._n}.safetensors.tmp"
        self._n += 1
        self._cur = StreamingSafetensors(tmp, _header_reserve(remaining))
        self._first = layer

    def _close(self) -> None:
        if self._cur is None:
            return
        self._cur.close()
        if self.component == "embed":
            final = "model-embed.safetensors"
        else:
            final = f"model-{self.component}-L{self._first:03d}-L{self._last:03d}.safetensors"
        os.replace(self._cur.path, self.dir / final)
        for name in self._cur.entries:
            self.files[name] = final
        self.total += self._cur.size
        self._cur = None

    def add_layer(self, layer: int, tensors: list[tuple[str, torch.Tensor]]) -> None:
        if not tensors:
            return
        size = sum(t.numel() * t.element_size() for _, t in tensors)
        if self._cur is not None and self._cur.size > 0 and self._cur.size + size > self.limit:
            self._close()
        if self._cur is None:
            self._open(layer)
        for name, t in tensors:
            self._cur.add(name, t)
        self._last = layer

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        if self._cur is not None:
            self._cur.abort()


_LAYER_RE = re.compile(r"^(model\.layers|transformer\.h)\.(\d+)\.(.+)$")
_FFN_PREFIXES = ("mlp.", "block_sparse_moe.", "feed_forward.", "experts.")  # Gemma 4's packed experts


def classify(hf_name: str) -> tuple[str, int]:
    """(component, layer) of a text-model HF tensor name; layer −1 for non-layer tensors."""
    m = _LAYER_RE.match(hf_name)
    if m is None:
        return "embed", -1
    layer = int(m.group(2))
    return ("ffn" if m.group(3).startswith(_FFN_PREFIXES) else "attn"), layer


def text_model_names(names: list[str], prefix: str) -> dict[str, str]:
    """{source key → normalised CausalLM HF name} for every tensor of the text model."""
    out: dict[str, str] = {}
    if "\0" in prefix:
        head, _, drop = prefix.partition("\0")
    else:
        head, drop = prefix, ""
    for key in names:
        if key.startswith(head):
            out[key] = drop + key[len(head) :]
        elif key == "lm_head.weight":
            out[key] = key
    return out


# ---------------------------------------------------------------------------------------------
# config and index metadata
# ---------------------------------------------------------------------------------------------


def text_config(config: dict) -> dict | None:
    """For a multimodal config, the text sub-config flattened to a CausalLM config; else None."""
    sub = config.get("text_config")
    if not isinstance(sub, dict):
        return None
    cfg = dict(sub)
    for key in ("tie_word_embeddings", "torch_dtype", "dtype", "eos_token_id", "bos_token_id", "pad_token_id"):
        if key in config and key not in cfg:
            cfg[key] = config[key]
    model_type = cfg.get("model_type") or f"{config.get('model_type', '')}_text"
    cfg["model_type"] = model_type
    cls = CAUSAL_LM_CLASS.get(model_type)
    if cls is None:
        raise VindexError(f"cannot flatten multimodal config: no CausalLM class known for {model_type!r}")
    cfg["architectures"] = [cls]
    return cfg


def model_config_block(spec: ModelSpec, cfg: dict) -> dict[str, Any]:
    mc: dict[str, Any] = {
        "model_type": spec.model_type,
        "head_dim": spec.head_dim,
        "num_q_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "rope_base": float(spec.rope.theta) if spec.rope is not None else 10000.0,
    }
    if spec.sliding_window:
        mc["sliding_window"] = int(spec.sliding_window)
    mc["moe"] = None
    if spec.moe is not None:  # LARQL's MoeConfig
        mc["moe"] = {"num_experts": spec.moe.num_experts, "top_k": spec.moe.top_k,
                     "shared_expert": bool(spec.moe.shared_size),
                     "router_type": "gemma4_top_k_softmax" if spec.moe.beside_dense else "top_k_softmax",
                     "moe_intermediate_size": spec.moe.expert_size, "norm_topk_prob": spec.moe.renormalize,
                     "hybrid": spec.moe.beside_dense}
    if spec.rope is not None and spec.rope.partial_rotary_factor != 1.0:
        mc["partial_rotary_factor"] = spec.rope.partial_rotary_factor
    pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern"))
    if spec.family.startswith("gemma") and pattern:
        mc["sliding_window_pattern"] = int(pattern)
    if spec.family.startswith("gemma") and isinstance(cfg.get("layer_types"), list):
        mc["layer_types"] = list(cfg["layer_types"])
    if spec.rope_local is not None:
        mc["rope_local_base"] = float(spec.rope_local.theta)
    if cfg.get("query_pre_attn_scalar") is not None:
        mc["query_pre_attn_scalar"] = float(cfg["query_pre_attn_scalar"])
    if spec.final_softcap is not None:
        mc["final_logit_softcapping"] = float(spec.final_softcap)
    return mc


def _model_id(source: WeightSource, cfg: dict, override: str | None) -> str:
    if override:
        return override
    name = cfg.get("_name_or_path")
    if isinstance(name, str) and name and not Path(name).is_absolute():
        return name
    return Path(source.path).name


# ---------------------------------------------------------------------------------------------
# the extraction
# ---------------------------------------------------------------------------------------------


class _LayerReader:
    """Wraps a weight source: memoises reads for the current layer and counts bytes read."""

    def __init__(self, source: WeightSource):
        self.source = source
        self.path = source.path
        self.config = source.config
        self._memo: dict[str, torch.Tensor] = {}
        self.bytes_read = 0

    def names(self) -> list[str]:
        return self.source.names()

    def get(self, name: str) -> torch.Tensor:
        t = self._memo.get(name)
        if t is None:
            t = self.source.get(name)
            self.bytes_read += t.numel() * t.element_size()
            self._memo[name] = t
        return t

    def release(self) -> None:
        self._memo.clear()


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=False)


def _open_source(model: str | Path) -> WeightSource:
    from ..runtime.loading import open_source

    p = Path(model)
    if p.is_dir() and (p / fmt.INDEX_FILE).exists() and not (p / "config.json").exists():
        raise VindexError(f"{p} is a browse-only vindex, not a model: extract from the original checkpoint")
    return open_source(p)


def extract(
    model: str | Path,
    out: str | Path,
    level: str = "browse",
    dtype: str = "f16",
    down_top_k: int = 10,
    *,
    quant: str = "auto",
    progress: bool = False,
    clusters: bool = True,
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    model_id: str | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    labeller: Callable[[Path], Any] | None = None,
) -> ExtractResult:
    """Extract `model` (HF directory) into the vindex directory `out`.

    Every vindex gets `feature_labels.json` (LARQL's probe-label file, `{"L<l>_F<f>": relation}`),
    checksummed with the rest: `labeller(staging_dir)` — the probe step, which runs the model and so
    needs level inference — writes it into the staging directory before the rename, so the labels
    are there from the vindex's first moment; without one it is `{}` until `modelql label` fills it.

    `quant` "auto" keeps a low-bit GGUF's (or block vindex's) matrices in their own blocks at level
    inference (`modelql.vindex.blocks`; no gate_vectors.bin / embeddings.bin, read from the blocks);
    "none" stores float safetensors as for any other source."""
    if level == "all":
        level = "inference"
    if level not in EXTRACT_LEVELS:
        raise VindexError(f"unknown extract level {level!r} (use browse, attention or inference)")
    if dtype not in fmt.BYTES_PER_FLOAT:
        raise VindexError(f"unsupported dtype {dtype!r} (use f16 or f32)")
    if down_top_k < 1:
        raise VindexError("--down-top-k must be at least 1")
    if quant not in ("auto", "none"):
        raise VindexError(f"unknown --quant {quant!r} (use auto or none)")
    if labeller is not None and level != "inference":
        raise VindexError("probe labels at extract need --level inference (the probe runs the model)")
    out = Path(out)
    if out.exists() and not force:
        raise VindexError(f"{out} already exists (pass --force to replace it)")
    t0 = time.perf_counter()
    source = _open_source(model)
    spec = spec_from_config(source.config)
    tmp = staging_directory(out)
    shards: list[ShardSet] = []
    try:
        src_dir = _metadata_dir(source, tmp)
        if not (src_dir / "tokenizer.json").exists():
            raise VindexError(f"{src_dir} has no tokenizer.json (needed for down_meta and the vindex)")
        tokenizer = load_tokenizer(src_dir)
        blockwise = quant == "auto" and level == "inference" and spec.moe is None and is_low_bit(source)
        result = _extract_into(tmp, source, spec, src_dir, tokenizer, level, dtype, down_top_k, progress,
                               clusters, shard_bytes, model_id, on_layer, shards, t0, blockwise)
        if src_dir.parent == tmp:
            shutil.rmtree(src_dir)
        if labeller is not None:
            labeller(tmp)
        if not (tmp / fmt.LABELS_FILE).exists():
            atomic_write_json(tmp / fmt.LABELS_FILE, {})
        listed = fmt.IndexJson.read(tmp).checksums or {}
        record(tmp, [n for n in files_to_hash(tmp) if n not in listed])  # the label files, hashed at write
        result.bytes_written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        replace_directory(tmp, out)
    except BaseException as exc:
        for s in shards:
            s.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (ModelqlError, KeyboardInterrupt)):
            raise
        if isinstance(exc, OSError):
            raise VindexError(f"extraction failed: {exc}") from exc
        raise
    result.path = out
    result.seconds = time.perf_counter() - t0
    return result


def _metadata_dir(source: WeightSource, tmp: Path) -> Path:
    """Where the source's HF metadata files live: its directory, or — for a single-file source such
    as GGUF that can synthesise them (`hf_files()`) — a scratch directory inside the staging dir."""
    path = Path(source.path)
    if path.is_dir():
        return path
    make = getattr(source, "hf_files", None)
    if not callable(make):
        return path.parent
    meta = tmp / ".source-metadata"
    meta.mkdir()
    for name, text in make().items():
        (meta / name).write_text(text, encoding="utf-8")
    return meta


def expert_features(source: WeightSource, spec: ModelSpec, layer: int, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A MoE layer's features as LARQL lays them out: every expert's gate rows in expert order
    (then the shared expert's), and the matching down columns — feature `e·F + j` is expert e's
    feature j (`Vindex.expert_of`)."""
    moe = spec.moe
    blocks = [f"experts.{e}." for e in range(moe.num_experts)] + (["shared."] if moe.shared_size else [])
    gates = [canonical_tensor(source, spec, f"layers.{layer}.{b}gate.weight", prefix) for b in blocks]
    downs = [canonical_tensor(source, spec, f"layers.{layer}.{b}down.weight", prefix) for b in blocks]
    return torch.cat(gates), torch.cat(downs, dim=1)


def _extract_into(tmp: Path, source: WeightSource, spec: ModelSpec, src_dir: Path, tokenizer, level: str,
                  dtype: str, top_k: int, progress: bool, clusters: bool, shard_bytes: int,
                  model_id: str | None, on_layer, shards: list, t0: float, blockwise: bool = False) -> ExtractResult:
    reader = _LayerReader(source)
    names = reader.names()
    prefix = resolve_prefix(names, spec.global_map["embed.weight"].hf_name)
    n = spec.num_layers
    np_dtype = fmt.NP_DTYPE[dtype]
    torch_dtype = torch.float32 if dtype == "f32" else torch.float16

    # embeddings, vocabulary
    embed = canonical_tensor(reader, spec, "embed.weight", prefix)
    embed = embed.to(torch.float32).contiguous()
    V, H = embed.shape
    if H != spec.hidden_size:
        raise ModelFormatError(f"embedding has width {H}, config hidden_size is {spec.hidden_size}")
    if not blockwise:  # a block vindex reads its embedding from the blocks
        with (tmp / fmt.EMBED_FILE).open("wb") as fh:
            fh.write(_tensor_bytes(embed.to(torch_dtype)))
    reader.release()
    empty = empty_token_mask(tokenizer, V)

    # weights: which source tensors go into which component
    weights = level in ("attention", "inference")
    comp_names: dict[str, dict[int, list[str]]] = {"embed": {}, "attn": {}, "ffn": {}}
    key_to_hf: dict[str, str] = {}
    if weights:
        key_to_hf = text_model_names(names, prefix)
        if spec.tie_embeddings:
            key_to_hf = {k: v for k, v in key_to_hf.items() if v != "lm_head.weight"}
        for key, hf in key_to_hf.items():
            comp, layer = classify(hf)
            if comp == "ffn" and level != "inference":
                continue
            comp_names[comp].setdefault(layer, []).append(key)
        for comp in ("embed", "attn", "ffn"):
            if comp_names[comp] and not blockwise:
                hf_by_layer = {l: [key_to_hf[k] for k in ks] for l, ks in comp_names[comp].items()}
                shards.append(ShardSet(tmp, comp, hf_by_layer, shard_bytes))
    shard = {s.component: s for s in shards}
    bw = None
    if blockwise:
        bw = BlockWriter(tmp)
        shards.append(bw)
        embed_hf = spec.global_map["embed.weight"].hf_name
        for k in comp_names["embed"].get(-1, []):
            hf = key_to_hf[k]
            _add_blocks(bw, reader, k, hf, "embed" if hf == embed_hf else "lm_head" if hf == "lm_head.weight" else "norms")
        reader.release()

    if "embed" in shard:
        keys = comp_names["embed"].get(-1, [])
        shard["embed"].add_layer(-1, [(key_to_hf[k], reader.get(k)) for k in keys])
        shard["embed"].close()
        reader.release()

    gate_name = "gate.weight" if spec.gated_ffn else "up.weight"
    layer_infos: list[fmt.LayerInfo] = []
    offset = 0
    dm_seconds = 0.0
    bar = _progress(progress)
    task = None
    if bar is not None:
        bar.start()
        task = bar.add_task(f"extract {spec.family} → {level}", total=n, rate="")
    try:
        experts = spec.experts_are_features  # Gemma 4: the dense FFN's features; its experts are weights only
        router_path = tmp / fmt.ROUTER_FILE if experts else os.devnull
        gate_path = os.devnull if blockwise else tmp / fmt.GATE_FILE  # a block vindex's gates are its FFN blocks
        with open(gate_path, "wb") as gate_fh, open(router_path, "wb") as router_fh, \
                fmt.DownMetaWriter(tmp / fmt.DOWN_META_FILE, n, top_k) as dm:
            for i in range(n):
                if experts:
                    gate, down = expert_features(reader, spec, i, prefix)
                    router = canonical_tensor(reader, spec, f"layers.{i}.router.weight", prefix)
                    router_fh.write(_tensor_bytes(router.to(torch.float32).contiguous()))
                else:
                    gate = canonical_tensor(reader, spec, f"layers.{i}.{gate_name}", prefix)
                    down = canonical_tensor(reader, spec, f"layers.{i}.down.weight", prefix)
                F = gate.shape[0]
                if gate.shape[1] != H or tuple(down.shape) != (H, F):
                    raise ModelFormatError(
                        f"layer {i}: gate {list(gate.shape)} / down {list(down.shape)} do not match H={H}"
                    )
                g = gate.to(torch.float32).to(torch_dtype).contiguous()
                gate_fh.write(_tensor_bytes(g))
                length = F * H * np_dtype.itemsize
                layer_infos.append(fmt.LayerInfo(
                    layer=i, num_features=F, offset=offset, length=length,
                    num_experts=spec.moe.num_experts if experts else None,
                    num_features_per_expert=spec.moe.expert_size if experts else None))
                offset += length
                del g, gate
                dm.begin_layer(i, F)
                d32 = down.to(torch.float32).contiguous()
                t_dm = time.perf_counter()
                for rec in down_meta_records(embed, d32, top_k, empty):
                    dm.write_records(rec)
                dm_seconds += time.perf_counter() - t_dm
                del d32, down
                for comp in ("attn", "ffn"):
                    if comp in shard:
                        keys = comp_names[comp].get(i, [])
                        shard[comp].add_layer(i, [(key_to_hf[k], reader.get(k)) for k in keys])
                    elif bw is not None:
                        for k in sorted(comp_names[comp].get(i, []), key=lambda k: (layer_order(key_to_hf[k]), k)):
                            _add_blocks(bw, reader, k, key_to_hf[k], comp)
                reader.release()
                if on_layer is not None:
                    on_layer(i, n)
                if bar is not None:
                    rate = reader.bytes_read / 1e9 / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, rate=f"{rate:.2f} GB/s")
        for s in shards:
            s.close()
    finally:
        if bar is not None:
            bar.stop()

    # metadata files
    shutil.copyfile(src_dir / "tokenizer.json", tmp / "tokenizer.json")
    for name in HF_METADATA_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, tmp / name)
    flat = text_config(source.config)
    cfg = flat if flat is not None else source.config
    if flat is not None or not (src_dir / "config.json").is_file():
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    else:
        shutil.copyfile(src_dir / "config.json", tmp / "config.json")

    weights_dtype = None
    if weights and bw is None:  # (a block vindex's manifests were written by bw.close())
        weight_map: dict[str, str] = {}
        total = 0
        for s in shards:
            weight_map.update(s.files)
            total += s.total
        (tmp / fmt.WEIGHTS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                       indent=2) + "\n", encoding="utf-8")
        embed_key = next((k for k, v in key_to_hf.items() if v.endswith(("embed_tokens.weight", "wte.weight"))),
                         None)
        if embed_key is not None:
            weights_dtype = _DTYPE_NAMES.get(source.get(embed_key).dtype)

    family = spec.family
    bands = resolve_bands(family, n)
    ext: dict[str, Any] = {"format": 1}
    if bw is not None:
        ext.update({"weights_format": "blocks", "weights_index": WEIGHT_MANIFEST,
                    "storage_types": dict(sorted(bw.types.items()))})
    elif weights:
        ext.update({"weights_format": "safetensors", "weights_dtype": weights_dtype or "f32",
                    "weights_index": fmt.WEIGHTS_INDEX})
    ext["created_by"] = _version()
    idx = fmt.IndexJson(
        model=_model_id(source, source.config, model_id),
        family=family,
        source={
            "huggingface_repo": _model_id(source, source.config, model_id),
            "huggingface_revision": None,
            "safetensors_sha256": None,
            "extracted_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "larql_version": _version(),
        },
        checksums=None,
        num_layers=n,
        hidden_size=H,
        intermediate_size=spec.intermediate_size,
        vocab_size=V,
        embed_scale=float(spec.embed_scale),
        extract_level=level,
        dtype=dtype,
        quant=quant_name(bw.types) if bw is not None else "none",
        layer_bands=bands.to_json(),
        layers=layer_infos,
        down_top_k=top_k,
        has_model_weights=weights,
        model_config=model_config_block(spec, cfg),
        modelql=ext,
    )
    idx.write(tmp)

    if clusters:
        _relation_clusters(tmp)

    idx.checksums = compute_checksums(tmp)
    idx.write(tmp)
    written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    return ExtractResult(path=tmp, level=level, dtype=dtype, num_layers=n, bytes_read=reader.bytes_read,
                         bytes_written=written, seconds=0.0, seconds_down_meta=dm_seconds, quant=idx.quant,
                         storage_types=dict(bw.types) if bw is not None else None)


def _add_blocks(bw: BlockWriter, reader: _LayerReader, key: str, hf: str, place: str) -> None:
    """One source tensor into the block files: its own blocks when it has them (rows in HF order), else
    float32 (vectors, and matrices whose HF layout is not the file's: they go with the norms)."""
    b = reader.source.blocks(key)
    if b is None:
        bw.add_float("norms", hf, reader.get(key))
        return
    raw, qtype, shape = b
    reader.bytes_read += raw.nbytes
    bw.add_blocks(place, hf, raw, qtype, shape)


def _relation_clusters(directory: Path) -> bool:
    """Call site for relation clusters (algorithms §6.2), owned by `modelql.vindex.clusters`."""
    import importlib

    try:
        _clusters = importlib.import_module(f"{__package__}.clusters")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.clusters":
            return False
        raise
    from .vindex import Vindex

    _clusters.build_relation_clusters(Vindex.load(directory), directory)
    return True


class _CallableModule(types.ModuleType):
    """`modelql.vindex.extract` names both this module and its main function. Importing the
    submodule rebinds the package attribute to the module, so make the module callable too."""

    def __call__(self, *args, **kwargs):
        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
