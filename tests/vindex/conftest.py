from __future__ import annotations

import pytest

from tests.tiny_models import FAMILIES
from tests.vindex.helpers import make_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{family: (model_dir, hf_model)} for every tiny family, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for name in FAMILIES:
        d = root / name
        out[name] = (d, make_model(name, d))
    return out


@pytest.fixture(scope="session")
def extracted(tiny, tmp_path_factory):
    """{(family, level, dtype): vindex_dir}, extracted lazily and cached for the session."""
    from modelql.vindex import extract

    root = tmp_path_factory.mktemp("vindexes")
    cache = {}

    def get(name: str, level: str = "browse", dtype: str = "f32"):
        key = (name, level, dtype)
        if key not in cache:
            out = root / f"{name}-{level}-{dtype}.vindex"
            extract(tiny[name][0], out, level=level, dtype=dtype)
            cache[key] = out
        return cache[key]

    return get
