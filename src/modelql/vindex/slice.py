"""`modelql slice`: carve a deployment piece out of a vindex (vindex-format.md §11).

A slice copies the files of a preset's parts into a new vindex and rewrites what describes them:
`index.json` (`extract_level`, `has_model_weights`, `checksums` restricted to the copied files)
and `model.safetensors.index.json` (restricted to the copied shards). The copy is staged in
`.<name>.tmp.<pid>` beside the target, every copied file is re-hashed against the source's
checksum, and only then is the directory renamed into place: never a half-written slice.

Presets: `client` (embeddings, attention, norms, tokenizer — the FFN runs remotely), `server`
(FFN weights, gates, down_meta, embeddings — what an `--ffn-only` shard and its browse routes
read), `browse` (gates, down_meta, embeddings, labels — DESCRIBE/WALK only), plus `attn`,
`embed` and `all` from the spec's table.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import VindexError
from ..fsutil import atomic_directory
from . import format as fmt
from .checksums import files_to_hash, sha256_file

PARTS: dict[str, tuple[str, ...]] = {
    "embed": ("embeddings.bin", "model-embed.safetensors", "embed_tokens.bin"),
    "norms": ("norms.bin",),
    "attn": ("attn_weights*", "model-attn-*.safetensors"),
    "gate": ("gate_vectors.bin", "gate_vectors_*"),
    "down_meta": ("down_meta.bin", "down_meta.jsonl"),
    "ffn": ("interleaved*", "up_weights.bin", "down_weights.bin", "up_features.bin", "down_features.bin",
            "model-ffn-*.safetensors", "ffn_edits_f32.bin"),
    "expert_layers": ("layers",),
    "lm_head": ("lm_head*", "model-embed.safetensors"),
    "router": ("router_weights.bin",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                  "chat_template.jinja"),
    "manifest": ("weight_manifest.json", "config.json", fmt.WEIGHTS_INDEX),
    "labels": ("feature_labels.json", "feature_clusters.jsonl", "relation_clusters.json"),
    "readme": ("README.md",),
}
ALWAYS = (fmt.INDEX_FILE, fmt.KNN_FILE)

PRESETS: dict[str, tuple[str, ...]] = {
    "client": ("embed", "norms", "attn", "tokenizer", "manifest", "labels"),
    "attn": ("norms", "attn", "manifest", "labels"),
    "embed": ("embed", "tokenizer", "labels"),
    "server": ("embed", "norms", "gate", "down_meta", "ffn", "tokenizer", "manifest", "labels"),
    "browse": ("embed", "gate", "down_meta", "tokenizer", "labels", "readme"),
    "all": tuple(PARTS),
}
# what a preset is for, and the part it cannot do without
NEEDS: dict[str, tuple[str, str]] = {
    "client": ("attn", "attention weights (model-attn-*.safetensors): extract with --level attention or inference"),
    "attn": ("attn", "attention weights (model-attn-*.safetensors): extract with --level attention or inference"),
    "server": ("ffn", "FFN weights (model-ffn-*.safetensors): extract with --level inference"),
    "browse": ("gate", "gate vectors (gate_vectors.bin)"),
    "embed": ("embed", "embeddings (embeddings.bin)"),
}
_SKIP_SUFFIXES = (".bak", ".tmp", ".orig")
_LEVEL_ORDER = {"browse": 0, "attention": 1, "inference": 2, "all": 3}


@dataclass
class SliceResult:
    path: Path
    preset: str
    level: str
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    verified: int = 0


def part_files(source: Path, part: str) -> list[str]:
    """Names (top level of `source`) that belong to `part`."""
    names = sorted(p.name for p in source.iterdir() if not p.name.startswith("."))
    out = []
    for pattern in PARTS[part]:
        for n in names:
            if fnmatch.fnmatchcase(n, pattern) and not n.endswith(_SKIP_SUFFIXES) and n not in out:
                out.append(n)
    return out


def _safetensors_data_bytes(path: Path) -> int:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)


def _derived_level(copied: dict[str, list[str]]) -> str:
    attn = bool(copied.get("attn"))
    norms = attn or bool(copied.get("norms"))
    ffn = bool(copied.get("ffn"))
    lm_head = bool(copied.get("lm_head"))
    if attn and norms and ffn and lm_head:
        return "all"
    if attn and norms and ffn:
        return "inference"
    if attn and norms:
        return "attention"
    return "browse"


def slice_vindex(source: str | Path, out: str | Path, preset: str, *, force: bool = False,
                 progress: Callable[[str, int], None] | None = None) -> SliceResult:
    """Copy `preset`'s parts of the vindex `source` into a new vindex `out` (atomically)."""
    src = Path(source)
    out = Path(out)
    if preset not in PRESETS:
        moe = " (router and expert-server are MoE presets; modelql vindexes are dense)" \
            if preset in ("router", "expert-server") else ""
        raise VindexError(f"unknown preset {preset!r}: use {', '.join(PRESETS)}{moe}")
    idx = fmt.IndexJson.read(src)  # also: "not a vindex (no index.json)"
    if out.exists() and not force:
        raise VindexError(f"{out} already exists (pass --force to replace it)")
    if out.resolve() == src.resolve():
        raise VindexError("the slice must go to a new directory, not the source vindex")
    parts = PRESETS[preset]
    copied: dict[str, list[str]] = {p: part_files(src, p) for p in parts}
    if preset in NEEDS:
        need, what = NEEDS[preset]
        if not copied.get(need):
            raise VindexError(f"{src.name} has no {what}: cannot carve a {preset} slice")
    if preset in ("client", "server", "attn") and (src / "model.safetensors").exists():
        raise VindexError(f"{src.name} keeps its weights in one model.safetensors: a {preset} slice needs them "
                          "split by component (re-extract it with modelql extract)")
    names: list[str] = []
    for files in copied.values():
        names += [n for n in files if n not in names]
    names += [n for n in ALWAYS if (src / n).exists() and n not in names]

    with atomic_directory(out) as tmp:
        result = SliceResult(out, preset, "browse")
        for name in names:
            if name in (fmt.INDEX_FILE, fmt.WEIGHTS_INDEX):
                continue
            s, d = src / name, tmp / name
            if s.is_dir():
                shutil.copytree(s, d)
            else:
                shutil.copyfile(s, d)
                result.bytes += d.stat().st_size
            result.files.append(name)
            if progress:
                progress(name, result.bytes)
        shards = sorted(n for n in result.files if n.endswith(".safetensors"))
        if (src / fmt.WEIGHTS_INDEX).exists() and fmt.WEIGHTS_INDEX in names:
            wi = json.loads((src / fmt.WEIGHTS_INDEX).read_text(encoding="utf-8"))
            wmap = {k: v for k, v in wi.get("weight_map", {}).items() if v in shards}
            if wmap:
                meta = dict(wi.get("metadata") or {})
                meta["total_size"] = sum(_safetensors_data_bytes(tmp / n) for n in shards)
                (tmp / fmt.WEIGHTS_INDEX).write_text(json.dumps({"metadata": meta, "weight_map": wmap}, indent=2)
                                                     + "\n", encoding="utf-8")
                result.files.append(fmt.WEIGHTS_INDEX)
        # verify every copied file against the source's checksum; list them in the new index
        old = idx.checksums or {}
        sums: dict[str, str] = {}
        for name in files_to_hash(tmp):
            digest = sha256_file(tmp / name)
            if name in old and name != fmt.WEIGHTS_INDEX and old[name] != digest:  # that one is rewritten
                raise VindexError(f"{name} does not match the source vindex's checksum: the source is corrupt "
                                  f"(run modelql verify {src})")
            result.verified += name in old and name != fmt.WEIGHTS_INDEX
            sums[name] = digest
        level = _derived_level(copied)
        if _LEVEL_ORDER.get(idx.extract_level, 0) < _LEVEL_ORDER[level]:
            level = idx.extract_level
        idx.extract_level = level
        idx.has_model_weights = bool(copied.get("ffn") or copied.get("attn"))
        idx.checksums = sums
        if idx.modelql is not None:
            idx.modelql = {**idx.modelql, "slice": preset}
        else:
            idx.modelql = {"slice": preset}
        idx.write(tmp)
        result.files.append(fmt.INDEX_FILE)
        result.level = level
    return result


def slice_command(
    vindex: Path,
    output: Path,
    preset: str,
    force: bool = False,
) -> None:
    """CLI body: carve and print a summary (what was copied, the level, the command that loads it)."""
    result = slice_vindex(vindex, output, preset, force=force)
    use = {
        "client": f"modelql generate {output} PROMPT --ffn URL   (or: modelql serve {output} --ffn URL)",
        "server": f"modelql serve {output} --ffn-only [--layers a-b]",
        "browse": f"modelql lql 'USE \"{output}\"; DESCRIBE \"France\";'",
    }.get(preset)
    width = max(len(n) for n in result.files)
    for name in sorted(result.files):
        p = output / name
        size = p.stat().st_size if p.is_file() else sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
        print(f"  {name:<{width}}  {size / 2**20:>9.2f} MiB")
    print(f"wrote {output} ({preset} slice, level {result.level}): {len(result.files)} files, "
          f"{result.bytes / 2**20:.1f} MiB, {result.verified} checksums verified")
    if use:
        print(f"use: {use}")
