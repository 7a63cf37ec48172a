"""COMPILE and DIFF (algorithms §13–§14): bake a patch overlay into new directories, compare two.

* `compile_vindex(session, out, on_conflict)` — COMPILE CURRENT INTO VINDEX: a new vindex with
  every edit baked in (gate rows in `gate_vectors.bin` and the ffn shards, up rows, down
  columns, tombstones as zero down columns, weight-level `down_delta` edits added to
  `down_proj`, rewritten `down_meta.bin` records, COMPOSE relations in `feature_labels.json`,
  the effective KNN store in `knn_store.bin`), untouched files hard-linked, checksums
  recomputed for rewritten files. ON CONFLICT: LAST_WINS (the overlay as is), FAIL (error
  listing colliding slots), HIGHEST_CONFIDENCE (re-apply the most confident op per slot).
* `compile_model(session, out)` — COMPILE CURRENT INTO MODEL: a standard Hugging Face model
  directory (`model.safetensors` or `model-0000i-of-0000n.safetensors` + index, `config.json`,
  tokenizer and generation files) with the same bakes. KNN facts cannot live in weights as
  retrieval keys, so they are **materialised**: MEMIT is run for them at compile time and its
  deltas are baked too (no sidecar file). `transformers` loads the result and states the facts.

DIFF (per-feature comparison, DIFF … INTO PATCH) lives in `vindex.diff`.

Both compiles work in a staging directory next to the destination (`fsutil.atomic_directory`) and
rename it into place at the end; on any failure the staging directory is deleted and nothing is left
behind. An existing non-empty destination is refused (an empty directory is replaced).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import CapabilityError, CompileError
from ..fsutil import atomic_directory
from . import format as fmt
from .blocks import FILES as BLOCK_FILES, MANIFESTS as BLOCK_MANIFESTS, is_block_vindex
from .checksums import compute_checksums, files_to_hash
from .overlay import OverlayState, OverlayView, PatchSession

CONFLICT_POLICIES = ("last_wins", "highest_confidence", "fail")
DEFAULT_MODEL_SHARD_BYTES = 2 << 30
_LINKED_EXTRA = ("feature_labels.json",)


@dataclass(frozen=True)
class CompileResult:
    source: str
    output: str
    target: str  # "vindex" | "model"
    features: int
    conflicts: int
    strategy: str
    down_overrides: int
    layers_touched: int
    knn_entries: int
    size_bytes: int
    deltas_baked: int = 0
    knn_materialised: int = 0
    tombstones: int = 0
    gate_overrides: int = 0
    files_rewritten: tuple[str, ...] = ()
    format: str = ""  # model: safetensors | gguf
    dtype: str = ""  # model: the weights' dtype (float32 | float16 | bfloat16; GGUF: its tensor type)


# ---------------------------------------------------------------------------------------------
# staging
# ---------------------------------------------------------------------------------------------


def _check_destination(out: Path, source: Path | None) -> None:
    if source is not None:
        try:
            same = out.resolve() == Path(source).resolve()
        except OSError:
            same = False
        if same:
            raise CompileError(f"COMPILE output {out} resolves to the source vindex; refusing to clobber. "
                               "Pick a different destination.")
    if out.exists():
        if not out.is_dir():
            raise CompileError(f"COMPILE output {out} exists and is not a directory; nothing was written")
        if any(out.iterdir()):
            raise CompileError(f"COMPILE output {out} already exists and is not empty; nothing was written. "
                               "Pick a new directory or remove it first.")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


# ---------------------------------------------------------------------------------------------
# effective state per policy
# ---------------------------------------------------------------------------------------------


def _session_of(source) -> PatchSession:
    if isinstance(source, PatchSession):
        return source
    if isinstance(source, OverlayView):
        return source.session
    return PatchSession(source)  # a plain vindex: compiled with an empty overlay


def effective_state(ps: PatchSession, policy: str = "last_wins") -> tuple[OverlayState, dict]:
    """(state to bake, collisions) for an ON CONFLICT policy."""
    policy = (policy or "last_wins").lower()
    if policy not in CONFLICT_POLICIES:
        raise CompileError(f"unknown ON CONFLICT strategy {policy!r}")
    state = ps.state
    coll = state.collisions()
    if policy == "fail" and coll:
        listed = ", ".join(f"L{l}/F{f} ({n} writes)" for (l, f), n in sorted(coll.items())[:5])
        raise CompileError(f"COMPILE INTO VINDEX ON CONFLICT FAIL: {len(coll)} colliding slot(s): {listed}")
    if policy == "highest_confidence" and coll:
        st = ps.replay()
        st.resolve_highest_confidence()
        state = st
    return state, coll


# ---------------------------------------------------------------------------------------------
# canonical FFN tensors inside HF-named files
# ---------------------------------------------------------------------------------------------


_FFN_COMPONENTS = ("gate.weight", "up.weight", "down.weight")


def _expert_blocks(spec) -> list[str]:
    """A MoE layer's FFN blocks in the vindex's feature order (routed experts, then shared)."""
    return [f"experts.{e}." for e in range(spec.moe.num_experts)] + (["shared."] if spec.moe.shared_size else [])


def _ffn_maps(spec, layer: int) -> dict[str, Any]:
    """canonical component → TensorMap (HF name formatted) for gate / up / down of `layer`
    (a MoE layer: every expert's, under `experts.{e}.gate.weight` ...)."""
    out = {}
    blocks = _expert_blocks(spec) if spec.experts_are_features else [""]
    for block in blocks:
        for comp in _FFN_COMPONENTS:
            tm = spec.layer_map.get(block + comp)
            if tm is not None:
                out[block + comp] = type(tm)(tm.hf_name.format(i=layer), tm.transform, tm.optional)
    return out


def _canonical_view(t: torch.Tensor, transform: str) -> torch.Tensor:
    """The canonical view of an HF tensor (a *view*: in-place edits write through)."""
    from ..models.source import _apply

    return _apply(t, transform)


def _layer_edits_canonical(spec, state: OverlayState, layer: int, tensors: dict[str, torch.Tensor],
                           extra_deltas: Iterable = ()) -> dict[str, int]:
    """Apply the overlay's edits of `layer` to canonical f32 views in place; returns counts.

    Order = the overlay FFN's algebra: vector overrides, then `+ U Vᵀ` per delta, then tombstoned
    down columns zeroed."""
    counts = {"gate": 0, "up": 0, "down": 0, "tomb": 0, "delta": 0}
    gate_key = "gate.weight" if spec.gated_ffn else "up.weight"
    G = tensors.get(gate_key)
    U = tensors.get("up.weight") if spec.gated_ffn else None
    D = tensors["down.weight"]  # [H, F]
    tombs = []
    for (l, f), s in sorted(state.slots.items()):
        if l != layer or not 0 <= f < D.shape[1]:
            continue
        if s.tombstone:
            tombs.append(f)
            continue
        if s.gate is not None and G is not None:
            G[f] = torch.from_numpy(s.gate)
            counts["gate"] += 1
        if s.up is not None and U is not None:
            U[f] = torch.from_numpy(s.up)
            counts["up"] += 1
        if s.down is not None:
            D[:, f] = torch.from_numpy(s.down)
            counts["down"] += 1
    deltas = [d for d in list(state.deltas.get(layer, [])) + [d for d in extra_deltas if int(d.layer) == layer]
              if d.v is not None]  # neuron edits grow the FFN: `_add_neurons`
    for d in deltas:
        u = torch.as_tensor(np.asarray(d.u, dtype=np.float32)) if not isinstance(d.u, torch.Tensor) else d.u.float()
        v = torch.as_tensor(np.asarray(d.v, dtype=np.float32)) if not isinstance(d.v, torch.Tensor) else d.v.float()
        D.add_((u.double() @ v.double().t()).float())
        counts["delta"] += 1
    # tombstones last: a deleted feature contributes nothing at all (as in the overlay FFN,
    # which drops it from the sum, deltas included)
    for f in tombs:
        D[:, f] = 0.0
        counts["tomb"] += 1
    return counts


def _edit_layer(spec, state: OverlayState, layer: int, tensors: dict[str, torch.Tensor], prefix: str,
                counts: dict, extra_deltas: Iterable = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Apply `layer`'s edits to f32 copies of its FFN tensors among `tensors` (HF names) and add
    to `counts`; returns (HF key → edited f32 copy, canonical component → view of a copy)."""
    if spec.experts_are_features:
        return _edit_moe_layer(spec, state, layer, tensors, prefix, counts, extra_deltas)
    work: dict[str, torch.Tensor] = {}
    views: dict[str, torch.Tensor] = {}
    for comp, tm in _ffn_maps(spec, layer).items():
        key = _hf_key(prefix, tm.hf_name)
        if key not in tensors:
            continue
        if key not in work:
            work[key] = tensors[key].to(torch.float32).clone()
        views[comp] = _canonical_view(work[key], tm.transform)
    for k, v in _layer_edits_canonical(spec, state, layer, views, extra_deltas).items():
        counts[k] += v
    return work, views


def _edit_moe_layer(spec, state: OverlayState, layer: int, tensors: dict[str, torch.Tensor], prefix: str,
                    counts: dict, extra_deltas: Iterable = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`_edit_layer` of a MoE layer: the experts' gate/up rows and down columns concatenated in
    the vindex's feature order (feature e·F + j = expert e's j), edited as one dense layer,
    and copied back into each expert's tensors."""
    maps = _ffn_maps(spec, layer)
    work: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor]] = {c: [] for c in _FFN_COMPONENTS}
    for block in _expert_blocks(spec):
        for comp in _FFN_COMPONENTS:
            tm = maps[block + comp]
            key = _hf_key(prefix, tm.hf_name)
            if key not in work:
                work[key] = tensors[key].to(torch.float32).clone()
            parts[comp].append(_canonical_view(work[key], tm.transform))
    views = {"gate.weight": torch.cat(parts["gate.weight"]), "up.weight": torch.cat(parts["up.weight"]),
             "down.weight": torch.cat(parts["down.weight"], dim=1)}
    for k, v in _layer_edits_canonical(spec, state, layer, views, extra_deltas).items():
        counts[k] += v
    start = 0
    for i in range(len(parts["gate.weight"])):
        n = parts["gate.weight"][i].shape[0]
        parts["gate.weight"][i].copy_(views["gate.weight"][start:start + n])
        parts["up.weight"][i].copy_(views["up.weight"][start:start + n])
        parts["down.weight"][i].copy_(views["down.weight"][:, start:start + n])
        start += n
    return work, views


def _touched(state: OverlayState, extra_deltas: Iterable = ()) -> list[int]:
    return sorted(set(state.touched_layers()) | {int(d.layer) for d in extra_deltas})


# ---------------------------------------------------------------------------------------------
# COMPILE INTO VINDEX
# ---------------------------------------------------------------------------------------------


def compile_vindex(source, out: str | Path, on_conflict: str = "last_wins") -> CompileResult:
    """COMPILE CURRENT INTO VINDEX "out" (see the module docstring)."""
    ps = _session_of(source)
    base = ps.base
    out = Path(out)
    src_dir = Path(base.path)
    _check_destination(out, src_dir)
    state, coll = effective_state(ps, on_conflict)
    try:
        with atomic_directory(out) as stage:  # `out` is absent or empty (checked above)
            return _compile_vindex_into(ps, state, stage, out, coll, on_conflict)
    except OSError as exc:
        raise CompileError(f"COMPILE failed: {exc}") from None


def _compile_vindex_into(ps: PatchSession, state: OverlayState, tmp: Path, out: Path, coll: dict,
                         policy: str) -> CompileResult:
    base = ps.base
    src = Path(base.path)
    if any(d.v is None for ds in state.deltas.values() for d in ds):
        return _compile_vindex_regrown(ps, state, tmp, out, coll, policy)
    idx = fmt.IndexJson.read(src)
    touched = _touched(state)
    meta_layers = sorted({l for (l, _f), s in state.slots.items() if s.meta is not None or s.tombstone}
                         | {l for l, d in state.deltas.items() if d})
    rewritten: set[str] = set()

    # gate_vectors.bin: gate overrides
    gate_rows = [(l, f, s.gate) for (l, f), s in state.slots.items() if s.gate is not None and not s.tombstone]
    if gate_rows and (src / fmt.GATE_FILE).exists():
        shutil.copyfile(src / fmt.GATE_FILE, tmp / fmt.GATE_FILE)
        bpf = idx.bytes_per_float
        with (tmp / fmt.GATE_FILE).open("r+b") as fh:
            for l, f, g in sorted(gate_rows, key=lambda x: (x[0], x[1])):
                info = idx.layer_info(l)
                if info is None:
                    continue
                fh.seek(info.offset + f * idx.hidden_size * bpf)
                fh.write(np.asarray(g, dtype=fmt.NP_DTYPE[idx.dtype]).tobytes())
        rewritten.add(fmt.GATE_FILE)

    # ffn shards: vectors, tombstones, deltas
    counts = {"gate": 0, "up": 0, "down": 0, "tomb": 0, "delta": 0}
    new_down: dict[int, torch.Tensor] = {}
    if touched and base.has_weights:
        rewrite = _rewrite_ffn_blocks if is_block_vindex(src) else _rewrite_ffn_shards
        rewritten.update(rewrite(ps, state, src, tmp, touched, counts, new_down))

    # down_meta.bin
    if meta_layers and (src / fmt.DOWN_META_FILE).exists():
        _rewrite_down_meta(ps, state, src, tmp, meta_layers, new_down)
        rewritten.add(fmt.DOWN_META_FILE)

    # labels: COMPOSE relations in, tombstoned slots out
    labels_changed = _write_labels(state, src, tmp)
    if labels_changed:
        rewritten.add("feature_labels.json")

    # knn_store.bin from the effective store
    knn = state.knn
    if knn:
        fmt.write_knn_store(tmp / fmt.KNN_FILE, knn, idx.hidden_size)
    rewritten.add(fmt.KNN_FILE)  # never link the base store: the effective one replaces it

    # everything else: hard links
    for p in sorted(src.iterdir()):
        if p.name in rewritten or p.name == fmt.INDEX_FILE or not p.is_file():
            continue
        if p.name.startswith("."):
            continue
        _link_or_copy(p, tmp / p.name)

    # index.json with recomputed checksums for rewritten files
    old = dict(idx.checksums or {})
    names = [n for n in rewritten if (tmp / n).is_file()]
    fresh = compute_checksums(tmp, names) if names else {}
    sums = {}
    for n in files_to_hash(tmp):
        if n in fresh:
            sums[n] = fresh[n]
        elif n in old:
            sums[n] = old[n]
        else:
            sums.update(compute_checksums(tmp, [n]))
    idx.checksums = sums
    if idx.quant != "none" and idx.modelql is not None:
        from .blocks import BlockStore

        idx.modelql["storage_types"] = dict(sorted(BlockStore(tmp).storage_types(matrices=True).items()))
    idx.write(tmp)

    n_features = sum(base.num_features(l) for l in base.layers())
    return CompileResult(
        source=str(src), output=str(out), target="vindex", features=n_features, conflicts=len(coll),
        strategy=policy.upper(), down_overrides=counts["down"], layers_touched=len(touched),
        knn_entries=len(knn), size_bytes=_size(tmp), deltas_baked=counts["delta"], tombstones=counts["tomb"],
        gate_overrides=len(gate_rows), files_rewritten=tuple(sorted(n for n in rewritten if (tmp / n).exists())))


def _compile_vindex_regrown(ps: PatchSession, state: OverlayState, tmp: Path, out: Path, coll: dict,
                            policy: str) -> CompileResult:
    """A vindex with neuron edits baked in. They grow every layer's FFN, which the base's files
    cannot take in place, so the edited model is compiled (as COMPILE INTO MODEL does) and
    extracted again at the base's level and dtype (float weights, also from a block vindex). The neurons are appended, every base feature
    keeps its index, so the base's probe labels, clusters and any other file extraction does not
    make are carried over; the KNN store is the effective one."""
    from .extract import extract

    base = ps.base
    src = Path(base.path)
    if not ps.has_weights or not base.has_weights:
        raise CapabilityError(f"COMPILE INTO VINDEX of neuron edits re-extracts the edited model and needs its "
                              f"weights: {src.name} is a {base.extract_level}-level vindex.")
    idx = fmt.IndexJson.read(src)
    model_dir = tmp / ".model"
    model_dir.mkdir()
    m = _compile_model_into(ps, state, [], model_dir, out, None, DEFAULT_MODEL_SHARD_BYTES)
    fresh = tmp / ".vindex"
    extract(model_dir, fresh, level=base.extract_level, dtype=idx.dtype, down_top_k=idx.down_top_k or 10,
            clusters=False, model_id=idx.model)
    shutil.rmtree(model_dir)
    for p in fresh.iterdir():
        p.rename(tmp / p.name)
    fresh.rmdir()
    carried = []
    weights = set(BLOCK_FILES) | set(BLOCK_MANIFESTS)  # the base's low-bit weights: replaced by the float ones
    for p in sorted(src.iterdir()):
        if p.name in weights or p.suffix == ".safetensors" or p.name == fmt.KNN_FILE:
            continue
        if p.is_file() and not p.name.startswith(".") and (not (tmp / p.name).exists() or p.name == fmt.LABELS_FILE):
            (tmp / p.name).unlink(missing_ok=True)
            _link_or_copy(p, tmp / p.name)
            carried.append(p.name)
    if state.knn:
        fmt.write_knn_store(tmp / fmt.KNN_FILE, state.knn, idx.hidden_size)
        carried.append(fmt.KNN_FILE)
    new = fmt.IndexJson.read(tmp)
    sums = dict(new.checksums or {})
    sums.update(compute_checksums(tmp, [n for n in carried if n in set(files_to_hash(tmp))]))
    new.checksums = sums
    new.write(tmp)
    n_features = sum(new.layer_info(l).num_features for l in range(new.num_layers) if new.layer_info(l))
    return CompileResult(
        source=str(src), output=str(out), target="vindex", features=n_features, conflicts=len(coll),
        strategy=policy.upper(), down_overrides=m.down_overrides, layers_touched=m.layers_touched,
        knn_entries=len(state.knn), size_bytes=_size(tmp), deltas_baked=m.deltas_baked, tombstones=m.tombstones,
        gate_overrides=m.gate_overrides, files_rewritten=tuple(sorted(p.name for p in tmp.iterdir() if p.is_file())))


def _weight_index(src: Path) -> dict[str, str]:
    """HF tensor name → the file holding it (safetensors shards, or a block vindex's block files)."""
    if is_block_vindex(src):
        from .blocks import BlockStore

        return {k: e.file for k, e in BlockStore(src).entries.items()}
    p = src / fmt.WEIGHTS_INDEX
    if p.exists():
        return dict(json.loads(p.read_text(encoding="utf-8")).get("weight_map", {}))
    single = src / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return {k: "model.safetensors" for k in fh.keys()}
    raise CompileError(f"{src.name} has no safetensors weights")


def _spec_and_prefix(src: Path):
    from ..models.families import spec_from_config
    from ..models.source import read_json, resolve_prefix

    spec = spec_from_config(read_json(src / "config.json", "the model config"))
    wmap = _weight_index(src)
    prefix = resolve_prefix(list(wmap), spec.global_map["embed.weight"].hf_name)
    return spec, wmap, prefix


def _hf_key(prefix: str, name: str) -> str:
    from ..models.source import _hf_key as k

    return k(prefix, name)


def _rewrite_ffn_shards(ps: PatchSession, state: OverlayState, src: Path, tmp: Path, touched: list[int],
                        counts: dict, new_down: dict) -> set[str]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    spec, wmap, prefix = _spec_and_prefix(src)
    files: dict[str, list[int]] = {}
    for l in touched:
        for comp, tm in _ffn_maps(spec, l).items():
            key = _hf_key(prefix, tm.hf_name)
            if key in wmap:
                files.setdefault(wmap[key], [])
                if l not in files[wmap[key]]:
                    files[wmap[key]].append(l)
    for fname, layers in files.items():
        with safe_open(str(src / fname), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            meta = fh.metadata() or {"format": "pt"}
        for l in layers:
            work, views = _edit_layer(spec, state, l, tensors, prefix, counts)
            new_down[l] = views["down.weight"].clone()
            for key, t in work.items():
                tensors[key] = t.to(tensors[key].dtype).contiguous()
        save_file(tensors, str(tmp / fname), metadata=meta)
    return set(files)


def _rewrite_ffn_blocks(ps: PatchSession, state: OverlayState, src: Path, tmp: Path, touched: list[int],
                        counts: dict, new_down: dict) -> set[str]:
    """`_rewrite_ffn_shards` of a block vindex: each touched layer's FFN matrices are dequantized, edited
    and stored in float32 (`blocks.rewrite_edited`); every other matrix keeps its blocks."""
    from .blocks import BlockStore, rewrite_edited

    store = BlockStore(src)
    spec, _, prefix = _spec_and_prefix(src)
    edited: dict[str, torch.Tensor] = {}
    for l in touched:
        tensors = {}
        for tm in _ffn_maps(spec, l).values():
            key = _hf_key(prefix, tm.hf_name)
            if key in store:
                tensors[key] = store.tensor(key)
        work, views = _edit_layer(spec, state, l, tensors, prefix, counts)
        new_down[l] = views["down.weight"].clone()
        edited.update(work)
    return rewrite_edited(store, tmp, edited)


def _read_tensors(src: Path, wmap: dict[str, str], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a vindex's weights (a block vindex's dequantized to float32)."""
    keys = list(keys)
    if is_block_vindex(src):
        from .blocks import BlockStore

        store = BlockStore(src)
        return {k: store.tensor(k) for k in keys}
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(wmap[k], []).append(k)
    for fname, names in by_file.items():
        with safe_open(str(src / fname), framework="pt") as fh:
            for k in names:
                out[k] = fh.get_tensor(k)
    return out


def _rewrite_down_meta(ps: PatchSession, state: OverlayState, src: Path, tmp: Path, layers: list[int],
                       new_down: dict[int, torch.Tensor]) -> None:
    """Copy down_meta.bin with the overlay's records; layers with weight-level deltas get every
    record recomputed from the new down matrix first (algorithms §1)."""
    dm = fmt.DownMetaFile(src / fmt.DOWN_META_FILE)
    K = dm.top_k
    base = ps.base
    empty_mask = None
    with fmt.DownMetaWriter(tmp / fmt.DOWN_META_FILE, dm.num_layers, K) as w:
        for l in range(dm.num_layers):
            rec = dm.records(l)
            if rec is None:
                continue
            rec = np.array(rec, copy=True)
            if l in layers:
                if state.deltas.get(l) and l in new_down and base.has_embeddings:
                    from .extract import down_meta_records, empty_token_mask

                    if empty_mask is None:
                        empty_mask = empty_token_mask(base.tokenizer, base.vocab_size)
                    E = base.embeddings()
                    rec = np.concatenate(list(down_meta_records(E, new_down[l].float().contiguous(), K, empty_mask)))
                for (sl, f), s in state.slots.items():
                    if sl != l or not 0 <= f < len(rec):
                        continue
                    if s.tombstone:
                        rec[f] = np.zeros((), dtype=rec.dtype)
                    elif s.meta is not None:
                        r = np.zeros((), dtype=rec.dtype)
                        r["top"] = s.meta.top_token_id
                        r["c"] = s.meta.c_score
                        r["ids_logits"]["id"][0] = s.meta.top_token_id
                        r["ids_logits"]["logit"][0] = s.meta.c_score
                        rec[f] = r
            w.write_layer(l, rec)


def _write_labels(state: OverlayState, src: Path, tmp: Path) -> bool:
    from_ops = {k: s.relation for k, s in state.slots.items() if s.relation and not s.tombstone and s.meta}
    tombs = [k for k, s in state.slots.items() if s.tombstone]
    if not from_ops and not tombs:
        return False
    p = src / "feature_labels.json"
    data: dict[str, Any] = {}
    if p.exists():
        try:
            loaded = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                data = loaded
        except (OSError, ValueError):
            data = {}
    before = dict(data)
    for (l, f) in tombs:
        data.pop(f"L{l}_F{f}", None)
    for (l, f), rel in from_ops.items():
        data[f"L{l}_F{f}"] = rel
    if data == before and not p.exists():
        return False
    if not data and not p.exists():
        return False
    (tmp / "feature_labels.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


# ---------------------------------------------------------------------------------------------
# COMPILE INTO MODEL
# ---------------------------------------------------------------------------------------------

_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
_DTYPES = {"float32": torch.float32, "f32": torch.float32, "float16": torch.float16, "f16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def compile_model(source, out: str | Path, format: str = "safetensors", dtype: str | None = None,
                  materialise_knn: bool = True, shard_bytes: int = DEFAULT_MODEL_SHARD_BYTES,
                  memit_params=None) -> CompileResult:
    """COMPILE CURRENT INTO MODEL "out" [FORMAT safetensors | gguf] (see the module docstring).

    `dtype` (float32 | float16 | bfloat16) defaults to the source weights' dtype. GGUF writes one
    file: the safetensors directory is compiled in a staging directory next to it, then
    converted (`models.gguf_convert`: F32 tensors for float32 weights, else F16).
    """
    kind = str(format).lower()
    if kind not in ("safetensors", "gguf"):
        raise CompileError(f"unknown model format {format!r} (use SAFETENSORS or GGUF)")
    ps = _session_of(source)
    base = ps.base
    src = Path(base.path)
    if not ps.has_weights or not base.has_weights:
        raise CapabilityError(
            f"COMPILE INTO MODEL requires model weights in the vindex. {src.name} is a "
            f"{base.extract_level}-level vindex: re-extract it WITH INFERENCE.")
    out = Path(out)
    if kind == "gguf":
        if out.exists():
            raise CompileError(f"COMPILE output {out} already exists; nothing was written. "
                               "Pick a new file name or remove it first.")
    else:
        _check_destination(out, src)
    out_dtype = None
    if dtype is not None:
        if dtype not in _DTYPES:
            raise CompileError(f"unsupported dtype {dtype!r} (use float32, float16 or bfloat16)")
        out_dtype = _DTYPES[dtype]
    state = ps.state
    extra = []
    if materialise_knn and state.knn:
        extra = materialise_knn_facts(ps, state.knn, memit_params)
    try:
        if kind == "gguf":
            return _compile_gguf(ps, state, extra, out, out_dtype, shard_bytes)
        with atomic_directory(out) as stage:
            return _compile_model_into(ps, state, extra, stage, out, out_dtype, shard_bytes)
    except OSError as exc:
        raise CompileError(f"COMPILE failed: {exc}") from None


def _compile_gguf(ps: PatchSession, state: OverlayState, extra: list, out: Path, out_dtype,
                  shard_bytes: int) -> CompileResult:
    from dataclasses import replace

    from ..errors import UnsupportedModelError
    from ..fsutil import staging_directory
    from ..models.gguf_convert import convert

    staging = staging_directory(out)
    try:
        r = _compile_model_into(ps, state, extra, staging, out, out_dtype, shard_bytes)
        out_type = "f32" if r.dtype == "float32" else "f16"
        try:
            conv = convert(staging, out, out_type)
        except UnsupportedModelError as exc:
            raise CompileError(f"COMPILE INTO MODEL FORMAT GGUF: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return replace(r, format="gguf", dtype=out_type.upper(), size_bytes=conv.bytes)


def materialise_knn_facts(ps: PatchSession, entries, params=None) -> list:
    """Weight-level deltas (MEMIT, one batch) stating every KNN fact, for baking into weights."""
    from ..knowledge.memit import EditRequest, memit_edit

    seen = set()
    reqs = []
    for e in entries:
        key = (e.entity.casefold(), e.relation.casefold())
        if key in seen:
            continue
        seen.add(key)
        reqs.append(EditRequest(e.entity, e.relation or "fact", e.target_token))
    return list(memit_edit(ps.model(), reqs, layers=None, params=params))


def _compile_model_into(ps: PatchSession, state: OverlayState, extra: list, tmp: Path, out: Path,
                        out_dtype, shard_bytes: int) -> CompileResult:
    from safetensors.torch import save_file

    src = Path(ps.base.path)
    spec, wmap, prefix = _spec_and_prefix(src)
    touched = _touched(state, extra)
    counts = {"gate": 0, "up": 0, "down": 0, "tomb": 0, "delta": 0}
    tensors = _read_tensors(src, wmap, wmap)
    src_dtype = next((t.dtype for k, t in tensors.items() if t.is_floating_point()), torch.float32)
    dtype = out_dtype or src_dtype
    for l in touched:
        work, _ = _edit_layer(spec, state, l, tensors, prefix, counts, extra)
        for key, t in work.items():
            tensors[key] = t
    grown = _add_neurons(spec, state, extra, tensors, prefix, counts)
    # standard HF names: drop a multimodal prefix (the vindex already normalised them)
    final = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in tensors.items()}
    shards = _plan_shards(final, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: final[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        for n in names:
            weight_map[n] = fname
            total += final[n].numel() * final[n].element_size()
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                       indent=2) + "\n", encoding="utf-8")
    for name in _MODEL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    dname = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = dname
    if "torch_dtype" not in cfg and "dtype" not in cfg:
        cfg["torch_dtype"] = dname
    if grown:
        size_key = "moe_intermediate_size" if spec.moe is not None and "moe_intermediate_size" in cfg else "intermediate_size"
        cfg[size_key] = int(cfg[size_key]) + grown
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    n_features = sum(ps.base.num_features(l) for l in ps.base.layers())
    return CompileResult(
        source=str(src), output=str(out), target="model", features=n_features, conflicts=0, strategy="LAST_WINS",
        down_overrides=counts["down"], layers_touched=len(touched), knn_entries=0, size_bytes=_size(tmp),
        deltas_baked=counts["delta"], knn_materialised=len({(e.entity.casefold(), e.relation.casefold())
                                                            for e in state.knn}) if extra else 0,
        tombstones=counts["tomb"], gate_overrides=counts["gate"], format="safetensors", dtype=dname)


def _neuron_deltas(state: OverlayState, extra: Iterable, layer: int) -> list:
    return [d for d in list(state.deltas.get(layer, [])) + [d for d in extra if int(d.layer) == layer]
            if d.v is None]


def _f32(a) -> torch.Tensor:
    return a.float() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a, dtype=np.float32))


def _add_neurons(spec, state: OverlayState, extra: Iterable, tensors: dict[str, torch.Tensor], prefix: str,
                 counts: dict) -> int:
    """Bake neuron edits into the checkpoint: every layer's FFN grows by the largest number of
    neurons any layer adds (HF configs have one intermediate size), the new rows of the layers
    without neurons zero, so they add nothing. In a mixture of experts every routed expert of
    every layer grows alike and carries the same neurons (as the overlay runs them: `ffn.moe`).
    Returns the growth (0: no neuron edits)."""
    extra = list(extra)
    per_layer = {l: ds for l in range(spec.num_layers) if (ds := _neuron_deltas(state, extra, l))}
    if not per_layer:
        return 0
    counts["delta"] += sum(len(ds) for ds in per_layer.values())
    if not spec.gated_ffn or (spec.moe is not None and spec.moe.beside_dense):
        raise CompileError("neuron edits compile into a gated FFN's or its routed experts' only (this model has neither)")
    grow = max(sum(int(d.u.shape[1]) for d in ds) for ds in per_layer.values())
    if spec.moe is not None:
        grow = -(-grow // 8) * 8  # zero neurons pad it: transformers' grouped expert matmul wants 16-byte strides
    blocks = [f"experts.{e}." for e in range(spec.moe.num_experts)] if spec.moe is not None else [""]
    for l in range(spec.num_layers):
        maps = _ffn_maps(spec, l)
        ds = per_layer.get(l, [])
        h = spec.hidden_size
        g_rows = torch.zeros(grow, h, dtype=torch.float32)
        u_rows = torch.zeros(grow, h, dtype=torch.float32)
        d_cols = torch.zeros(h, grow, dtype=torch.float32)
        k = 0
        for d in ds:
            r = int(d.u.shape[1])
            g_rows[k:k + r], u_rows[k:k + r], d_cols[:, k:k + r] = _f32(d.gate), _f32(d.up), _f32(d.u)
            k += r
        for block in blocks:
            own = {c: maps.get(block + c) for c in _FFN_COMPONENTS}
            if any(tm is None or tm.transform not in ("", "id") for tm in own.values()):
                raise CompileError(f"neuron edits cannot grow this checkpoint's FFN layout ({spec.family}: fused "
                                   "or transformed FFN tensors)")
            keys = {c: _hf_key(prefix, tm.hf_name) for c, tm in own.items()}
            gate, up, down = (tensors[keys[c]] for c in _FFN_COMPONENTS)
            tensors[keys["gate.weight"]] = torch.cat([gate.float(), g_rows])
            tensors[keys["up.weight"]] = torch.cat([up.float(), u_rows])
            tensors[keys["down.weight"]] = torch.cat([down.float(), d_cols], 1)
    return grow


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


# ---------------------------------------------------------------------------------------------
# DIFF
# ---------------------------------------------------------------------------------------------
