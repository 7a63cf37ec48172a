"""The shared half of the knowledge routes: the served vindex (`VindexSource`), the overlay a
request sees (`Scope`, from `X-Session-Id`), and the small helpers every knowledge router uses
(mode checks, layer and text validation, rounding, running work on the engine thread).

The routers, by concern: `knowledge_routes` (stats, warmup, walk, select, relations, infer,
explain-infer; it includes the others), `describe_routes`, `edit_routes` (insert, patches,
edges/match), `embed_routes` (embed, logits, tokens).
"""

from __future__ import annotations

import collections
import math
import re
import threading
import time
from pathlib import Path

from fastapi import Request

from .errors import HttpError, ServiceUnavailable

FFN_MEDIA = "application/x-larql-ffn"
MAX_TOP = 1000
MAX_LIMIT = 10_000
MAX_TOKEN_IDS = 65_536
DESCRIBE_CACHE = "public, max-age=86400"
EMBED_CACHE = "public, max-age=31536000, immutable"

_ERR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}},
                                                    "required": ["error"]}}}}
ERRORS = {400: {"description": "bad parameter", **_ERR}, 503: {"description": "not served in this mode", **_ERR}}


def editing():
    """(`knowledge.edit`, `PatchSession`), imported on the first edit: they pull in the solvers."""
    from ..knowledge import edit
    from ..vindex.overlay import PatchSession

    return edit, PatchSession


# -- the vindex behind the browse routes -------------------------------------------------------------

class VindexSource:
    """The served vindex, or why there is none yet (loading) or at all (unavailable)."""

    def __init__(self, vindex=None, *, loading: str | None = None, reason: str | None = None):
        self.vindex = vindex
        self.loading = loading
        self.reason = reason
        self.error: str | None = None
        self.patches = None  # the global PatchSession (base ⊕ applied patches ⊕ inserts), once edited
        self.sessions: collections.OrderedDict[str, list] = collections.OrderedDict()  # id → [PatchSession, t]
        self.session_ttl = 3600.0
        self.max_sessions = 1024
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int:
        """Overlay epoch (describe ETags): 0 until the first edit."""
        return self.patches.epoch if self.patches is not None else 0

    @property
    def patched(self) -> bool:
        return self.patches is not None and not self.patches.empty

    def view(self):
        """What browse queries read: the overlay view once edits exist, else the base vindex."""
        vx = self.require()
        return self.patches.view if self.patched else vx

    def knn(self):
        """The overlay's KNN-store facts (None when there are none)."""
        if self.patches is None:
            return None
        return self.patches.knn_entries() or None

    def session(self, model):
        """The global patch session (created on the first edit, on the served model's weights)."""
        if self.patches is None:
            _, PatchSession = editing()
            self.patches = PatchSession(self.require(), model=model)
        return self.patches

    def client_session(self, sid: str, model=None):
        """The `X-Session-Id` overlay `sid` (base ⊕ the global patches when it started ⊕ its own
        edits); None if unknown and no `model` to create it with. Idle sessions expire after
        `session_ttl`; beyond `max_sessions` the least recently used is dropped."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (_ps, t) in self.sessions.items() if now - t > self.session_ttl]:
                del self.sessions[key]
            entry = self.sessions.get(sid)
            if entry is not None:
                entry[1] = now
                self.sessions.move_to_end(sid)
                return entry[0]
        if model is None:
            return None
        ps = self.session(model).fork()
        with self._lock:
            self.sessions[sid] = [ps, now]
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        return ps

    @classmethod
    def ready(cls, vindex) -> "VindexSource":
        return cls(vindex)

    @classmethod
    def unavailable(cls, reason: str) -> "VindexSource":
        return cls(reason=reason)

    @classmethod
    def open_path(cls, path: str | Path) -> "VindexSource":
        from ..vindex import Vindex

        vx = Vindex.load(path)
        vx.check_integrity()
        return cls(vx)

    @classmethod
    def extract(cls, model_dir: str | Path, *, default: bool = False, start: bool = True) -> "VindexSource":
        """The cached vindex of an HF model directory, extracted on a background thread if needed."""
        from ..lql import default_vindex as dv

        model_dir = Path(model_dir)
        label = default
        try:
            target = dv.cached_path(model_dir, dv.DEFAULT_NAME if default else None, label=label)
        except OSError as exc:
            return cls.unavailable(f"cannot fingerprint {model_dir}: {exc}")
        src = cls(loading=f"the vindex of {model_dir.name} is being extracted into {target} (first use); "
                          f"retry shortly")

        def build() -> None:
            try:
                if default:
                    path = dv.default_vindex_path(progress=False) if model_dir == dv.default_model_dir() else \
                        dv.ensure_vindex(model_dir, name=dv.DEFAULT_NAME, model_id=dv.DEFAULT_NAME,
                                         progress=False, label=True)
                else:
                    path = dv.ensure_vindex(model_dir, progress=False)
                from ..vindex import Vindex

                src.vindex = Vindex.load(path)
            except Exception as exc:  # reported by every browse route
                src.error = f"vindex extraction of {model_dir.name} failed: {exc}"
            finally:
                src.loading = None

        src._thread = threading.Thread(target=build, name="modelql-vindex-extract", daemon=True)
        if start:
            src._thread.start()
        return src

    @classmethod
    def for_model_ref(cls, model_ref: str | Path | None) -> "VindexSource":
        """What `modelql serve MODEL_OR_VINDEX` browses: a vindex as given; a model directory's
        cached vindex (extracted once); the embedded model's labelled cached vindex."""
        from ..lql import default_vindex as dv

        if model_ref is None:
            if not dv.default_model_installed():
                return cls.unavailable("the embedded default model is not installed")
            return cls.extract(dv.default_model_dir(), default=True)
        p = Path(str(model_ref)).expanduser()
        if (p / "index.json").is_file():
            return cls.open_path(p)
        if (p / "config.json").is_file():
            default = p.resolve() == dv.default_model_dir().resolve()
            return cls.extract(p, default=default)
        return cls.unavailable(f"browse routes need a vindex and {model_ref} is not an HF model directory: run "
                               f"`modelql extract {model_ref} -o model.vindex` and serve the vindex")

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.vindex is not None

    def require(self):
        if self.vindex is not None:
            return self.vindex
        if self.loading:
            raise ServiceUnavailable(self.loading, headers={"Retry-After": "5"})
        raise ServiceUnavailable(self.error or self.reason or "no vindex loaded")


def attach(app, source: VindexSource) -> None:
    """Give an app (built with `knowledge=[router, ...]`) its vindex source."""
    app.state.knowledge = source


# -- helpers ------------------------------------------------------------------------------------------

def _st(request: Request):
    return request.app.state.modelql


def _source(request: Request) -> VindexSource:
    src = getattr(request.app.state, "knowledge", None)
    return src if src is not None else VindexSource.unavailable("this server has no vindex")


def _check(st, route: str, group: str) -> None:
    reason = st.config.unavailable_reason(route, group)
    if reason:
        raise ServiceUnavailable(reason)


SESSION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def session_id(headers) -> str | None:
    """The `X-Session-Id` header (§2.3), validated; None without it."""
    sid = headers.get("x-session-id")
    if sid is None:
        return None
    if not SESSION_RE.fullmatch(sid):
        raise HttpError(400, "invalid X-Session-Id")
    return sid


class Scope:
    """The overlay one request sees: its session's, else the global one."""

    def __init__(self, src: VindexSource, sid: str | None):
        self.src = src
        self.sid = sid
        self.ps = src.client_session(sid) if sid is not None else None
        if self.ps is None:
            self.ps = src.patches

    @property
    def patched(self) -> bool:
        return self.ps is not None and not self.ps.empty

    def view(self):
        vx = self.src.require()
        return self.ps.view if self.patched else vx

    def knn(self):
        return (self.ps.knn_entries() or None) if self.ps is not None else None

    @property
    def epoch(self) -> int:
        return self.ps.epoch if self.ps is not None else 0

    def model(self, engine_model):
        """The model generation-side queries run: a session's overlay-aware model, else the
        engine's (which already reads the global overlay)."""
        if self.sid is not None and self.ps is not None and self.ps is not self.src.patches and self.ps.has_weights:
            return self.ps.model()
        return engine_model


def _scope(request) -> Scope:
    return Scope(_source(request), session_id(request.headers))


def _vindex(request: Request, route: str):
    st = _st(request)
    _check(st, route, "browse")
    return _scope(request).view()


def _model(request: Request, route: str, group: str):
    st = _st(request)
    _check(st, route, group)
    model = st.require_model()
    if model.tokenizer is None:
        raise ServiceUnavailable("the served model has no tokenizer")
    return model


def _r(x: float | None, nd: int) -> float | None:
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 1)


def _text(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HttpError(400, f"'{name}' is not valid unicode") from None
    return value


def _parse_layers(text: str | None) -> list[int] | None:
    """`a-b` or `l1,l2,…` (None: all)."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo or hi - lo > 100_000:
                    raise ValueError
                out += range(lo, hi + 1)
            else:
                out.append(int(part))
    except ValueError:
        raise HttpError(400, f"invalid layers {text!r}: expected a-b or l1,l2,...") from None
    return out


def check_layer(layer: int | None, num_layers: int, name: str = "layer") -> None:
    """A layer index from a client must name a layer of the served model (never clamped)."""
    if layer is not None and not 0 <= layer < num_layers:
        raise HttpError(400, f"{name} {layer} out of range: the model has {num_layers} layers (0-{num_layers - 1})",
                        code="invalid_value", param=name)


def _can_run_model(st) -> bool:
    return st.config.inference and st.engine is not None


async def _on_model(st, fn):
    """Run `fn(model)` on the engine's worker thread (serialised with decode steps)."""
    return await st.engine.run(fn)


