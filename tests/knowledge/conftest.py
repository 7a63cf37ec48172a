"""Session fixtures: the embedded default model extracted (and probe-labelled) once per session.

`MODELQL_TEST_DEFAULT_MODEL` points the fixtures at another model directory (for development
before the embedded model is trained); without a model the tests that need one are skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest



@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_dir(kmodel_dir) -> Path:
    return kmodel_dir


@pytest.fixture(scope="session")
def vindex_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("knowledge")


@pytest.fixture(scope="session")
def unlabelled_path(model_dir, vindex_root) -> Path:
    """The default model at level inference (f32) with clusters but no probe labels."""
    from modelql.vindex import extract

    out = vindex_root / "unlabelled.vindex"
    extract(model_dir, out, level="inference", dtype="f32")
    return out


@pytest.fixture(scope="session")
def labelled_path(unlabelled_path, vindex_root) -> Path:
    """A copy of `unlabelled_path` probe-labelled with the embedded facts (`modelql label`)."""
    import shutil

    from modelql.knowledge.labels import label_vindex

    out = vindex_root / "labelled.vindex"
    shutil.copytree(unlabelled_path, out)
    label_vindex(out)
    return out


@pytest.fixture(scope="session")
def vx(labelled_path):
    from modelql.vindex import Vindex

    return Vindex.load(labelled_path)


@pytest.fixture(scope="session")
def browse_vx(labelled_path, vindex_root):
    """The labelled vindex cut down to level browse (index, gates, embeddings, down_meta,
    tokenizer, labels): no weights, so DESCRIBE defaults to embedding mode."""
    import shutil

    from modelql.vindex import Vindex
    from modelql.vindex.format import IndexJson

    out = vindex_root / "browse.vindex"
    out.mkdir()
    for name in ("gate_vectors.bin", "embeddings.bin", "down_meta.bin", "tokenizer.json", "feature_labels.json",
                 "relation_clusters.json", "feature_clusters.jsonl"):
        if (labelled_path / name).exists():
            shutil.copyfile(labelled_path / name, out / name)
    idx = IndexJson.read(labelled_path)
    idx.extract_level, idx.has_model_weights, idx.modelql = "browse", False, None
    idx.checksums = {k: v for k, v in (idx.checksums or {}).items() if (out / k).exists()}
    idx.write(out)
    return Vindex.load(out)
