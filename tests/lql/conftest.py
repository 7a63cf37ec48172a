"""Fixtures of the LQL execution tests: one tiny model + inference-level vindex per test session,
and the embedded default model's vindex (from the shared default-vindex cache) when installed."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, H=32, F=64) with a byte-level BPE tokenizer."""
    from tests.runtime.tiny_tokenizer import make_model_with_tokenizer

    d = tmp_path_factory.mktemp("lql-model")
    make_model_with_tokenizer(d, "chatml", max_position=256, seed=3)
    return d


@pytest.fixture(scope="session")
def tiny_vindex(tiny_model_dir, tmp_path_factory):
    """The tiny model extracted at inference level (gates f32), shared by the whole session."""
    from modelql.vindex import extract

    out = tmp_path_factory.mktemp("lql-vindex") / "tiny.vindex"
    extract(tiny_model_dir, out, level="inference", dtype="f32")
    return out


@pytest.fixture(scope="session")
def tiny_browse_vindex(tiny_model_dir, tmp_path_factory):
    """The tiny model extracted at browse level (no weights)."""
    from modelql.vindex import extract

    out = tmp_path_factory.mktemp("lql-browse") / "browse.vindex"
    extract(tiny_model_dir, out, level="browse", dtype="f32", clusters=False)
    return out


@pytest.fixture(scope="session")
def default_vindex_path(kvindex):
    """The embedded model's vindex (tests/conftest.py: the default-vindex cache `modelql lql` uses,
    extracted once); skips when the model is not installed."""
    return kvindex.path
