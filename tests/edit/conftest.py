"""Fixtures of the editing tests: a tiny Llama with a BPE tokenizer (English prompts encode),
extracted once per session at inference level (f32 gates, f32 weights) and at browse level."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from tests.runtime.tiny_tokenizer import make_model_with_tokenizer

    d = tmp_path_factory.mktemp("edit-model")
    make_model_with_tokenizer(d, "chatml", max_position=128, seed=11)
    return d


@pytest.fixture(scope="session")
def vindex_dir(model_dir, tmp_path_factory):
    from modelql.vindex import extract

    out = tmp_path_factory.mktemp("edit-vindex") / "tiny.vindex"
    extract(model_dir, out, level="inference", dtype="f32", clusters=False)
    return out


@pytest.fixture(scope="session")
def browse_dir(model_dir, tmp_path_factory):
    from modelql.vindex import extract

    out = tmp_path_factory.mktemp("edit-browse") / "browse.vindex"
    extract(model_dir, out, level="browse", dtype="f32", clusters=False)
    return out


@pytest.fixture(scope="session")
def base_model(vindex_dir):
    from modelql.runtime import load_model

    return load_model(vindex_dir)


@pytest.fixture
def session(vindex_dir, base_model):
    """A fresh patch overlay over the tiny vindex (the base model is shared, never modified)."""
    from modelql.vindex import Vindex
    from modelql.vindex.overlay import PatchSession

    return PatchSession(Vindex.load(vindex_dir), model=base_model)


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.is_file()}
