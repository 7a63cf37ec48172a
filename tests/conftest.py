"""Session fixtures shared by the client and server suites: the embedded model, its cached
probe-labelled vindex (built as `modelql serve` builds it), and a real server on a free loopback port."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.default_model import default_model_dir
from tests.real_model import real_model_path, skip_reason


@pytest.fixture(scope="session")
def kmodel_dir() -> Path:
    d = default_model_dir()
    if d is None:
        pytest.skip("the embedded default model is not installed (src/modelql/data/default-model)")
    return d


@pytest.fixture(scope="session")
def real_model_file() -> Path:
    """The real pretrained model (SmolLM2-135M-Instruct Q4_1 GGUF); skipped with the install hint when absent."""
    p = real_model_path()
    if p is None:
        pytest.skip(skip_reason())
    return p


@pytest.fixture(scope="session")
def real_model(real_model_file):
    """The real model loaded once per test run (float32)."""
    from modelql.runtime.loading import load_model

    return load_model(real_model_file)


@pytest.fixture(scope="session")
def kvindex(kmodel_dir):
    """The embedded model's vindex from the default-vindex cache (extracted and labelled once)."""
    import torch

    from modelql.lql import default_vindex as dv
    from modelql.vindex import Vindex

    torch.set_num_threads(1)
    path = dv.ensure_vindex(kmodel_dir, name=dv.DEFAULT_NAME, model_id=dv.DEFAULT_NAME, progress=False, label=True)
    return Vindex.load(path)


@pytest.fixture(scope="session")
def kmodel(kmodel_dir):
    from modelql.runtime.loading import load_model

    return load_model(kmodel_dir)


@pytest.fixture(scope="session")
def ksrv(kmodel, kvindex):
    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import background

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0)
    with background(None, cfg, model=kmodel, vindex_source=VindexSource.ready(kvindex)) as srv:
        yield srv


@pytest.fixture
def fast_memit(monkeypatch, tmp_path_factory):
    """The real MEMIT solver with small default hyper-parameters (seconds on the tiny model); its
    on-disk statistics cache goes to a temporary MODELQL_CACHE."""
    import functools

    from modelql.knowledge import memit

    monkeypatch.setenv("MODELQL_CACHE", str(tmp_path_factory.mktemp("memit-cache")))
    monkeypatch.setattr(memit, "MemitParams", functools.partial(memit.MemitParams, steps=12, cov_sentences=120))


@pytest.fixture(scope="session")
def real_vindex(real_model_file, tmp_path_factory):
    """The real model extracted at level inference (no clusters) and probe-labelled for the capital
    relation only (`modelql label` with a one-relation triples set: calibration, probes, causal
    check), once per session."""
    from modelql.knowledge.labels import default_triples, label_vindex
    from modelql.vindex import Vindex, extract

    out = tmp_path_factory.mktemp("real") / "smollm2.vindex"
    extract(real_model_file, out, level="inference", dtype="f16", clusters=False)
    label_vindex(out, {"capital": default_triples()["capital"]}, max_subjects=24, clusters=False)
    return Vindex.load(out)
