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
def default_model_dir():
    """The embedded model's directory (or `MODELQL_TEST_DEFAULT_MODEL`); skips when absent."""
    from tests.default_model import default_model_dir as find

    d = find()
    if d is None:
        pytest.skip("the embedded default model is not installed (src/modelql/data/default-model)")
    return d


@pytest.fixture(scope="session")
def default_vindex_path(default_model_dir):
    """The embedded model's vindex (named like the one `modelql lql` uses): extracted into the
    default-vindex cache on first use, reused by every later test session. Skips when the model
    is not installed; `MODELQL_TEST_DEFAULT_MODEL=DIR` stands another model directory in."""
    from modelql.lql import default_vindex as dv

    return dv.ensure_vindex(default_model_dir, name=dv.DEFAULT_NAME, model_id=dv.DEFAULT_NAME, progress=False,
                            label=True)
