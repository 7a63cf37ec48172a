"""LQL session state (spec §0): the backend, its vindex or model, and the patch slots.

A ``Session`` holds

* ``backend``: ``"none"`` | ``"vindex"`` | ``"model"`` | ``"remote"``;
* ``vindex``: the open ``modelql.vindex.Vindex`` (vindex backend); ``vindex_is_default`` when it
  is the embedded model's vindex, opened implicitly because no USE ran;
* the model of a ``USE MODEL`` backend (``used_model`` describes it; the weights are loaded on
  first use by ``model()``); a vindex backend's model comes from the vindex's own weights,
  loaded once and shared with ``modelql.knowledge`` (``knowledge.queries.model_for``);
* ``remote_url`` and ``remote`` (remote backend: the ``modelql.client.KnowledgeClient`` that
  ``lql.remote`` forwards statements through);
* ``overlay`` and ``recording``: the patch overlay and the active patch recording, owned by the
  editing issue (USE discards both, spec §5.3); ``caches``: per-session caches (dropped on USE).

With no USE, any statement that needs a backend runs against the embedded default model's
vindex (``default_vindex``): pass ``default_vindex=False`` to get ``NoBackendError`` instead, or
a callable returning a vindex path to use another default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from modelql.errors import CapabilityError, LqlExecutionError, ModelNotFoundError, NoBackendError
from modelql.lql.results import UsedModel, UsedVindex

__all__ = ["Session", "NoBackendError", "LqlExecutionError", "BACKENDS"]

BACKENDS = ("none", "vindex", "model", "remote")


class Session:
    """The state LQL statements run against (see the module docstring)."""

    def __init__(
        self,
        *,
        default_vindex: bool | Callable[[], str | Path] = True,
        progress: bool | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.backend: str = "none"
        self.vindex = None
        self.vindex_is_default = False
        self.used_model: UsedModel | None = None
        self.remote_url: str | None = None
        self.remote: Any = None  # KnowledgeClient of a remote backend
        self.overlay: Any = None  # patch overlay (editing issue)
        self.recording: Any = None  # active patch recording (editing issue)
        self.caches: dict[str, Any] = {}
        self.cwd = Path(cwd) if cwd is not None else None
        self.progress = progress
        self._model = None
        if default_vindex is True:
            self._default: Callable[[], str | Path] | None = self._embedded_default
        elif default_vindex is False or default_vindex is None:
            self._default = None
        else:
            self._default = default_vindex

    # -- paths ---------------------------------------------------------------------------------

    def resolve(self, path: str | Path) -> Path:
        """A user path, relative to the session's working directory (if one was given)."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.cwd is not None:
            p = self.cwd / p
        return p

    # -- backends ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Discard the backend, overlay, recording and caches (what every USE does first)."""
        self.backend = "none"
        self.vindex = None
        self.vindex_is_default = False
        self.used_model = None
        self.remote_url = None
        if self.remote is not None:
            self.remote.close()
        self.remote = None
        self.overlay = None
        self.recording = None
        self.caches = {}
        self._model = None

    def use_vindex(self, path: str | Path, *, default: bool = False) -> UsedVindex:
        """Open the vindex at ``path`` and make it the backend."""
        text = str(path)
        if text.startswith("hf://"):
            raise CapabilityError("USE \"hf://...\" (downloading a vindex) is not available yet")
        p = self.resolve(path)
        if not p.exists():
            raise LqlExecutionError(f"vindex not found: {text}")
        from modelql.vindex import Vindex

        vx = Vindex.load(p)
        vx.check_integrity()  # corrupted files are an error here, not wrong answers later
        self.reset()
        self.backend = "vindex"
        self.vindex = vx
        self.vindex_is_default = default
        return self.describe_vindex(default=default)

    def describe_vindex(self, *, default: bool | None = None) -> UsedVindex:
        vx = self.vindex
        probe, types = relation_counts(vx.path)
        return UsedVindex(
            path=str(vx.path), model=vx.model, num_layers=vx.num_layers,
            features=sum(vx.num_features(layer) for layer in vx.layers()),
            extract_level=vx.extract_level, relation_types=types, probe_confirmed=probe,
            default=self.vindex_is_default if default is None else default,
        )

    def use_model(self, ref: str) -> UsedModel:
        """Make the HF model ``ref`` (a directory, or ``modelql-default``) the backend.

        The weights load on first use (INFER, TRACE); the config is read now.
        """
        path = self.model_path(ref)
        info = model_description(ref, path)
        self.reset()
        self.backend = "model"
        self.used_model = info
        return info

    def model_path(self, ref: str) -> Path:
        from modelql.lql import default_vindex as dv

        if ref in (dv.DEFAULT_NAME, "default"):
            if not dv.default_model_installed():
                raise ModelNotFoundError("the embedded default model is not installed")
            return dv.default_model_dir()
        p = self.resolve(ref)
        if p.is_dir() and (p / "config.json").is_file():
            return p
        if p.is_file() and p.suffix.lower() == ".gguf":
            return p
        if p.exists():
            raise ModelNotFoundError(f"{ref} is not a model directory (no config.json)")
        raise ModelNotFoundError(
            f"model not found: {ref} (give a local model directory; downloading models is not available yet)")

    def use_default(self) -> UsedVindex:
        """Open the default vindex (extracting it on first use)."""
        if self._default is None:
            raise NoBackendError()
        path = self._default()
        return self.use_vindex(path, default=True)

    def _embedded_default(self) -> Path:
        from modelql.lql import default_vindex as dv

        if not dv.default_model_installed():
            raise NoBackendError(
                'No backend loaded and the embedded default model is not installed. Run USE "path.vindex" first.')
        return dv.default_vindex_path(progress=self.progress)

    def ensure_backend(self) -> str:
        """The backend, after opening the default vindex if none is loaded."""
        if self.backend == "none":
            self.use_default()
        return self.backend

    def require_vindex(self, keyword: str = "this operation", *, mutation: bool = False):
        """The active ``Vindex`` for a browse statement (spec §4.1), or the spec's error."""
        backend = self.ensure_backend()
        if backend == "vindex":
            return self.vindex
        if backend == "model":
            what = "mutation" if mutation else "this operation"
            ref = self.used_model.model if self.used_model else "<model>"
            name = Path(ref).name or "model"
            raise LqlExecutionError(
                f'{what} requires a vindex. Extract first: EXTRACT MODEL "{ref}" INTO "{name}.vindex"')
        raise CapabilityError(f"{keyword} is not supported on a remote backend")

    def model(self, keyword: str):
        """The runtime model for INFER / TRACE: a vindex's own weights or the USE MODEL weights."""
        backend = self.ensure_backend()
        if backend == "model":
            if self._model is None:
                from modelql.runtime import load_model

                self._model = load_model(self.used_model.path)
            return self._model
        if backend == "vindex":
            vx = self.vindex
            if not vx.has_weights:
                raise LqlExecutionError(
                    f"{keyword} requires model weights. This vindex was built without them "
                    f'(extract level {vx.extract_level}). Rebuild: EXTRACT MODEL "{vx.model}" INTO '
                    f'"{vx.path}" WITH INFERENCE')
            from modelql.knowledge.queries import model_for

            return model_for(vx)
        raise CapabilityError(f"{keyword} is not supported on a remote backend")

    def knn_entries(self):
        """The KNN-store entries INFER consults, None if there are none: the patch overlay's
        effective store (base ``knn_store.bin`` + patches) once an overlay exists, else the
        vindex's own ``knn_store.bin`` (read once per USE)."""
        if self.overlay is not None:
            return self.overlay.knn_entries() or None
        if self.backend != "vindex" or self.vindex is None:
            return None
        store = self.caches.get("knn_entries")
        if store is None:
            from modelql.vindex.format import KNN_FILE, read_knn_store

            p = Path(self.vindex.path) / KNN_FILE
            store = self.caches["knn_entries"] = read_knn_store(p)[1] if p.is_file() else []
        return store or None

    def patches(self, keyword: str = "this statement"):
        """The vindex backend's patch overlay (``modelql.vindex.overlay.PatchSession``), created on
        first use. From then on ``self.vindex`` is its overlay view, so every statement (browse,
        INFER, TRACE) sees the edits; USE discards both (spec §5.3)."""
        vx = self.require_vindex(keyword, mutation=True)
        if self.overlay is None:
            from modelql.vindex.overlay import PatchSession

            model = None
            if vx.has_weights:  # share the base model INFER/DESCRIBE already use (loaded once)
                from modelql.knowledge.queries import model_for

                model = model_for(vx)
            self.overlay = PatchSession(vx, model=model)
            self.vindex = self.overlay.view
        return self.overlay

    def summary(self) -> str:
        """One line naming the backend (the REPL banner)."""
        if self.backend == "vindex":
            vx = self.vindex
            tag = " (embedded default model)" if self.vindex_is_default else ""
            return f"vindex {vx.path}{tag}: {vx.model}, {vx.num_layers} layers, level {vx.extract_level}"
        if self.backend == "model":
            return f"model {self.used_model.model} (dense inference only)"
        if self.backend == "remote":
            return f"remote {self.remote_url}"
        return "no backend yet (the embedded default model's vindex opens on first use)" if self._default \
            else 'no backend (USE "path.vindex")'


# ---------------------------------------------------------------------------------------------
# small readers
# ---------------------------------------------------------------------------------------------

_MAX_CLUSTER_FILE = 16 << 20  # relation_clusters.json holds the centres: skip huge ones at USE


def relation_counts(path: Path) -> tuple[int, int]:
    """(distinct probe-confirmed relations, distinct relation types overall) of a vindex directory.

    Reads ``feature_labels.json`` and the labels of ``relation_clusters.json`` (cluster labels
    that are only the ``cluster-<c>`` fallback do not count). Unreadable files count as absent.
    """
    probe: set[str] = set()
    types: set[str] = set()
    try:
        data = json.loads((path / "feature_labels.json").read_text(encoding="utf-8"))
        if isinstance(data, dict):
            probe = {str(v) for v in data.values() if v}
    except (OSError, ValueError):
        pass
    clusters = path / "relation_clusters.json"
    try:
        if clusters.stat().st_size <= _MAX_CLUSTER_FILE:
            data = json.loads(clusters.read_text(encoding="utf-8"))
            labels = data.get("labels") if isinstance(data, dict) else None
            if isinstance(labels, list):
                types = {str(x) for x in labels if x and not str(x).startswith("cluster-")}
    except (OSError, ValueError):
        pass
    return len(probe), len(probe | types)


def model_description(ref: str, path: Path) -> UsedModel:
    """What USE MODEL reports, from the model's config and file sizes (no weights loaded)."""
    from modelql.models.families import spec_from_config
    from modelql.runtime.loading import open_source

    source = open_source(path)
    spec = spec_from_config(source.config)
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    size = sum(p.stat().st_size for p in files if p.is_file())
    return UsedModel(
        model=ref, path=str(path), num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size, weight_bytes=size,
        family=spec.family,
    )
