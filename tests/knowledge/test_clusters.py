"""Relation clusters (algorithms §6.2): k-means, forms, files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modelql.vindex.clusters import (Clusters, forms, read_clusters, spherical_kmeans, triples_object_index,
                                     whole_word_ids, write_clusters)


def _blobs(seed=0, n=60, k=3, h=16, noise=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, h))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    x = centres[labels] + noise * rng.standard_normal((n, h))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def test_kmeans_recovers_separated_clusters():
    x, truth = _blobs()
    centres, assign = spherical_kmeans(x, 3)
    assert centres.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, rtol=1e-5)
    # same partition up to renaming
    pairs = {(int(a), int(t)) for a, t in zip(assign, truth)}
    assert len(pairs) == 3


def test_kmeans_is_deterministic_and_k_capped():
    x, _ = _blobs(seed=1, n=10)
    a1 = spherical_kmeans(x, 4)
    a2 = spherical_kmeans(x.copy(), 4)
    np.testing.assert_array_equal(a1[1], a2[1])
    np.testing.assert_array_equal(a1[0], a2[0])
    c, a = spherical_kmeans(x, 50)  # k = min(k, n)
    assert c.shape[0] == 10 and sorted(set(a.tolist())) == list(range(10))


def test_kmeans_farthest_point_init_picks_largest_norm_first():
    x = np.array([[1, 0], [0, 2.0], [-1, 0]], dtype=np.float32)
    c, a = spherical_kmeans(x, 2, max_iter=0)
    np.testing.assert_allclose(c[0], [0, 2.0])  # the largest row first (no iteration)
    np.testing.assert_allclose(c[1], [1, 0])  # then the farthest from it (ties → lower index)


@pytest.mark.parametrize("obj, expected", [
    ("Paris", {"paris"}),
    ("Buenos Aires", {"buenos aires", "buenos", "aires"}),
    ("Southern Asia", {"southern asia", "southern", "asia"}),
    ("Isle of Man", {"isle of man", "isle"}),
    ("Bosnia and Herzegovina", {"bosnia and herzegovina", "bosnia", "herzegovina"}),
    ("St. John's", {"st. john's", "john"}),
    ("  ", set()),
])
def test_forms(obj, expected):
    assert forms(obj) == expected


def test_whole_word_ids():
    texts = ["", "ab", "abc", "Paris", "l'Île", "co-op", "a b c", "日本語", "don't"]
    assert whole_word_ids(texts).tolist() == [2, 3, 5, 8]


def test_triples_object_index_counts_relations():
    idx = triples_object_index({"language": {"pairs": [["France", "French"]]},
                                "demonym": {"pairs": [["France", "French"], ["Chad", "Chadian"]]}})
    assert idx["french"] == {"language": 1, "demonym": 1}
    assert idx["chadian"] == {"demonym": 1}


def test_cluster_files_round_trip(tmp_path):
    cl = Clusters(2, np.eye(2, 4, dtype=np.float32), ["capital", "tfidf/a/b"], [3, 1], [["paris"], ["a", "b"]],
                  [(0, 1, 0), (0, 2, 0), (1, 5, 1), (1, 7, 0)])
    write_clusters(tmp_path, cl)
    data = json.loads((tmp_path / "relation_clusters.json").read_text())
    assert set(data) == {"k", "centres", "labels", "counts", "top_tokens"}
    lines = (tmp_path / "feature_clusters.jsonl").read_text().splitlines()
    assert json.loads(lines[2]) == {"l": 1, "f": 5, "c": 1}
    back = read_clusters(tmp_path)
    assert back.k == 2 and back.labels == cl.labels and back.assignments == cl.assignments
    np.testing.assert_array_equal(back.centres, cl.centres)
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    assert read_clusters(tmp_path / "missing") is None
