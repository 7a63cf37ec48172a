"""Rendering of typed results (spec §4 content, §4.7 number formats) from hand-built rows, and
the rich renderables of the REPL carrying the same content."""

from __future__ import annotations

import re

import pytest

from modelql.knowledge.rows import (
    BandStats, DescribeResult, Edge, EntityRow, FeatureRow, ProbeRelationRow, RelationRow, RelationsResult,
    SelectResult, Stats, WalkResult, WalkRow,
)
from modelql.lql import parse, render
from modelql.lql.results import Executed, LayerRow, LayersResult, UsedVindex


def lines(stmt_text: str, value) -> list[str]:
    return render.lines(Executed(parse(stmt_text), value))


@pytest.mark.parametrize("n,text", [
    (0, "0"), (999, "999"), (1000, "1.0K"), (10_240, "10.2K"), (999_999, "1000.0K"), (1_000_000, "1.00M"),
    (348_160, "348.2K"), (2_500_000, "2.50M"),
])
def test_format_count(n, text):
    assert render.format_count(n) == text


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KB"), (1536, "1.5 KB"), (1 << 20, "1.0 MB"),
    (5 * (1 << 20) + (1 << 19), "5.5 MB"), (1 << 30, "1.00 GB"), (3 * (1 << 30), "3.00 GB"),
])
def test_format_bytes(n, text):
    assert render.format_bytes(n) == text


def edge(target, gate, layer, relation=None, layers=None, count=1, also=(), band="knowledge"):
    return Edge(target=target, target_id=1, gate=gate, score=gate, z=gate, layer=layer, feature=7,
                layers=tuple(layers or (layer,)), count=count, c_score=0.5, also=tuple(also),
                relation=relation, band=band)


def describe_result(edges, found=True):
    return DescribeResult(entity="France", model="m", mode="embedding", found=found, edges=tuple(edges),
                          layers=(0, 1, 2, 3), bands={"syntax": (0, 1), "knowledge": (2, 2), "output": (3, 3)},
                          unit="score", threshold=5.0, max_gate=max((e.gate for e in edges), default=0.0),
                          signal="clean")


def test_describe_brief():
    edges = [edge("Paris", 34.52, 2, "capital"), edge("French", 12.0, 2, None),
             edge("the", 8.0, 0, None, band="syntax")]
    got = lines('DESCRIBE "France"', describe_result(edges))
    assert got[0] == "France"
    assert got[1] == "  signal: clean (3 edges, max gate 34.5)"
    assert got[2] == "  Syntax (L0-1):"
    assert re.fullmatch(r"    \s*→ the\s+8\.0\s+L0", got[3])
    assert got[4] == "  Edges (L2):"
    assert re.fullmatch(r"    capital\s+→ Paris\s+34\.5\s+L2", got[5])
    assert re.fullmatch(r"    \s+→ French\s+12\.0\s+L2", got[6])
    assert len(got) == 7


def test_describe_verbose_and_raw():
    edges = [edge("Paris", 34.5, 2, "capital", layers=(1, 2), count=3, also=("Lyon", "Marseille")),
             edge("Euro", 9.0, 2, None)]
    verbose = lines('DESCRIBE "France" VERBOSE', describe_result(edges))
    assert re.fullmatch(r"    \[capital\]\s+→ Paris\s+34\.5\s+L1-2\s+3x\s+\[also: Lyon, Marseille\]", verbose[3])
    assert re.fullmatch(r"    \[—\]\s+→ Euro\s+9\.0\s+L2\s+1x", verbose[4])
    raw = lines('DESCRIBE "France" RAW', describe_result(edges))
    assert re.fullmatch(r"    → Paris\s+34\.5\s+L1-2\s+3x\s+\[also: Lyon, Marseille\]", raw[3])
    assert "capital" not in "\n".join(raw)


def test_describe_caps_and_empty():
    many = [edge(f"T{i}", 50.0 - i, 2) for i in range(14)]
    got = lines('DESCRIBE "France"', describe_result(many))
    assert sum(1 for line in got if "→" in line) == 10
    assert got[-1] == "    … 4 more (VERBOSE shows up to 30)"
    assert lines('DESCRIBE "France"', describe_result([])) == ["France", "  (no edges found)"]
    assert lines('DESCRIBE "France"', describe_result([], found=False)) == ["France", "  (not found)"]


def walk_result(rows):
    return WalkResult(prompt="The capital", token="capital", token_id=5, layers=(0, 1), top=10, rows=tuple(rows),
                      latency_ms=1.234)


def wrow(layer, feature, gate, target="Paris", tops=("Paris", "Lyon", "Nice", "Metz")):
    return WalkRow(layer=layer, feature=feature, gate_score=gate, target=target, target_id=3, c_score=0.4,
                   top_tokens=tuple(tops))


def test_walk_lines():
    rows = [wrow(0, f, 5.0 - f) for f in range(5)] + [wrow(1, 9, -2.25)]
    got = lines('WALK "The capital"', walk_result(rows))
    assert got[0] == 'Feature scan for "The capital" (token "capital", 2 layers, mode=hybrid (default))'
    body = got[1:-2]
    assert len(body) == 4  # 3 of layer 0, 1 of layer 1
    assert re.fullmatch(r'  L0:\s+F0\s+gate=\+5\.0\s+top="Paris"\s+down=\[Paris, Lyon, Nice\]', body[0])
    assert re.fullmatch(r'  L1:\s+F9\s+gate=-2\.2\s+top="Paris"\s+down=\[Paris, Lyon, Nice\]', body[3])
    assert got[-2] == "1.2ms"
    compare = lines('WALK "The capital" COMPARE MODE DENSE', walk_result(rows))
    assert "mode=dense (full matmul)" in compare[0]
    assert len(compare) - 3 == 6  # 5 of layer 0, 1 of layer 1


def test_explain_walk_lines():
    rows = [wrow(0, 1, 3.0), wrow(0, 2, -1.0)]
    got = lines('EXPLAIN WALK "The capital" VERBOSE', walk_result(rows))
    assert got[1] == "  L0: F1 → Paris (gate=+3.0, down=[Paris, Lyon, Nice, Metz])"
    got = lines('EXPLAIN WALK "The capital"', walk_result(rows))
    assert got[2] == "  L0: F2 → Paris (gate=-1.0, down=[Paris, Lyon, Nice])"


def frow(layer, feature, token, score, kind="c_score", also=(), relation=None):
    return FeatureRow(layer=layer, feature=feature, token=token, token_id=1, c_score=score, score=score,
                      score_kind=kind, also=tuple(also), top_tokens=(token,) + tuple(also), relation=relation)


def test_select_edges_columns():
    rows = (frow(2, 11, "Paris", 0.91234, relation="capital"), frow(3, 4, "Rome", 0.5, relation="capital"))
    s = SelectResult(source="edges", rows=rows, total=7, limit=2)
    got = lines('SELECT * FROM EDGES WHERE relation = "capital" LIMIT 2', s)
    assert got[0].split() == ["Layer", "Feature", "Token", "Relation", "Score"]
    assert got[2].split() == ["L2", "F11", "Paris", "capital", "0.9123"]
    assert got[-1] == "2 of 7 rows (LIMIT 2)"
    plain = SelectResult(source="edges", rows=(frow(1, 2, "x", 0.25),), total=1)
    assert lines("SELECT * FROM EDGES", plain)[0].split() == ["Layer", "Feature", "Token", "Score"]
    walked = SelectResult(source="edges", rows=(frow(1, 2, "x", -3.5, kind="gate", also=("y",)),), total=1,
                          walked=True)
    got = lines('SELECT * FROM EDGES WHERE entity = "x" AND relation = "r"', walked)
    assert got[0].split() == ["Layer", "Feature", "Token", "Also", "Relation", "Score"]
    assert got[2].split()[-1] == "-3.50"
    assert lines("SELECT * FROM EDGES", SelectResult(source="edges", rows=(), total=0)) == ["  (no rows)"]


def test_select_entities_and_show_entities():
    rows = (EntityRow("France", 12, 0.8), EntityRow("Paris", 3, 0.25))
    s = SelectResult(source="entities", rows=rows, total=40, limit=2)
    got = lines("SELECT * FROM ENTITIES LIMIT 2", s)
    assert got[0].split() == ["Entity", "Features", "MaxScore"]
    assert got[2].split() == ["France", "12", "0.8000"]
    shown = lines("SHOW ENTITIES 3 LIMIT 2", s)
    assert shown[0] == "Distinct entities at layer 3 (40 total, showing top 2):"
    assert lines("SHOW ENTITIES", s)[0].startswith("Distinct entities across all layers (40 total")


def test_show_features_columns():
    s = SelectResult(source="features", rows=(frow(2, 5, "Paris", 0.5, also=("a", "b", "c", "d", "e", "f")),),
                     total=1)
    got = lines("SHOW FEATURES 2", s)
    assert got[0].split() == ["Feature", "TopToken", "Score", "DownOutputs"]
    assert got[2].split(None, 3) == ["F5", "Paris", "0.5000", "Paris, a, b, c, d"]


def relations_result(probe=True):
    pr = (ProbeRelationRow("capital", 27, 1, 3), ProbeRelationRow("currency", 5, 2, 2)) if probe else ()
    toks = (RelationRow("Paris", 9, 0.81, 1, 3, (1, 2, 3), examples=("Lyon", "Rome")),
            RelationRow("Euro", 4, 0.5, 2, 2, (2,)))
    return RelationsResult(probe_relations=pr, probe_count=32 if probe else 0, tokens=toks, total=2,
                           layer_range=(1, 3))


def test_show_relations_modes():
    brief = lines("SHOW RELATIONS", relations_result())
    assert brief[0] == "Probe-confirmed relations (32 labels):"
    assert brief[1].split() == ["Relation", "Features", "Layers"]
    assert brief[3].split() == ["capital", "27", "L1-3"]
    assert not any("Top output tokens" in line for line in brief)
    verbose = lines("SHOW RELATIONS VERBOSE WITH EXAMPLES", relations_result())
    i = verbose.index("Top output tokens (L1-3):")
    assert verbose[i + 1].split() == ["Token", "Count", "Score", "Layers", "Examples"]
    assert verbose[i + 3].split(None, 4) == ["Paris", "9", "0.8100", "L1-3", "e.g. Lyon, Rome"]
    raw = lines("SHOW RELATIONS RAW", relations_result())
    assert raw[0] == "Top output tokens (L1-3):"
    unlabeled = lines("SHOW RELATIONS", relations_result(probe=False))
    assert unlabeled[0] == "Top output tokens (L1-3):"
    empty = RelationsResult(probe_relations=(), probe_count=0, tokens=(), total=0, layer_range=(0, 0))
    assert lines("SHOW RELATIONS", empty) == ["  (no relations found)"]


def test_stats_lines():
    s = Stats(path="/x/m.vindex", model="m", family="llama", layers=4, loaded_layers=(0, 1, 2, 3),
              features=4096, features_per_layer=1024, hidden_size=256, intermediate_size=1024, vocab_size=3000,
              extract_level="inference", dtype="f16", embed_scale=1.0,
              layer_bands={"syntax": (0, 0), "knowledge": (1, 2), "output": (3, 3)}, bands_source="index",
              band_stats=(BandStats("syntax", 0, 0, 1024, 1024), BandStats("knowledge", 1, 2, 2048, 1024),
                          BandStats("output", 3, 3, 1024, 0)),
              has_weights=True, clusters=0, cluster_labels=0, unmapped_clusters=0, probe_labels=0,
              probe_relations=0, index_bytes=3 << 20)
    got = lines("STATS", s)
    assert got[1] == "Features: 4.1K (1.0K x 4 layers)"
    assert "  (no relation clusters found)" in got
    assert "  Knowledge (L1-2): 2.0K features (50.0% with metadata)" in got
    assert "Index size: 3.0 MB" in got and got[-1] == "Path: /x/m.vindex"


def test_used_vindex_line():
    u = UsedVindex(path="a.vindex", model="m", num_layers=34, features=348_160, extract_level="browse",
                   relation_types=12, probe_confirmed=7)
    assert lines('USE "a.vindex"', u) == [
        "Using: a.vindex (34 layers, 348.2K features, model: m, relations: 12 types, 7 probe-confirmed)"]
    bare = UsedVindex(path="a.vindex", model="m", num_layers=2, features=10, extract_level="browse")
    assert lines('USE "a.vindex"', bare) == ["Using: a.vindex (2 layers, 10 features, model: m)"]


def test_rich_renderables_carry_the_same_content():
    from rich.console import Console

    value = LayersResult((LayerRow(0, 1024, 1000, "Paris", 9), LayerRow(1, 1024, 1024, "", 0)), 2)
    ex = Executed(parse("SHOW LAYERS"), value)
    console = Console(width=100, record=True, file=open("/dev/null", "w"))
    for r in render.renderables(ex):
        console.print(r)
    text = console.export_text()
    for word in ("Layer", "Features", "WithMeta", "TopToken", "L0", "1.0K", "Paris (9)", "L1"):
        assert word in text


def test_unknown_values_render_as_text():
    assert render.lines(Executed(parse("STATS"), "hello")) == ["hello"]


def infer_result(**kw):
    from modelql.knowledge.infer import FiredFeature, InferResult, Prediction

    preds = (Prediction(" Paris", 5, 0.8723), Prediction(" Lyon", 6, 0.05), Prediction("\n", 7, 0.01))
    fired = (FiredFeature(2, 17, 11.04, "Paris", ("Paris", "Lyon", "Nice", "Metz"), relation="capital"),
             FiredFeature(3, 4, -2.5, "the", ("the", "a", "an")))
    base = dict(prompt="The capital of France is", mode="walk", predictions=preds, override=None, trace=fired,
                elapsed_ms=12.34)
    base.update(kw)
    return InferResult(**base)


def test_infer_lines():
    got = lines('INFER "The capital of France is"', infer_result())
    assert got[:4] == ["Predictions (walk FFN):", " 1.  Paris (87.23%)", " 2.  Lyon (5.00%)", " 3. '\\n' (1.00%)"]
    assert got[4] == "12.3ms" and got[5] == ""
    assert got[6] == "Inference trace (features that fired with attention):"
    assert got[7] == "  L2: [capital] F17 gate=+11.0 → Paris [Paris, Lyon, Nice]"
    assert got[8] == "  L3: F4 gate=-2.5 → the [the, a, an]"


def test_infer_override_and_dense_lines():
    from modelql.knowledge.infer import Override, Prediction

    top1 = Prediction(" Paris", 5, 0.8723)
    r = infer_result(override=Override("Poseidonia", 9, 0.91, 3, "Atlantis", "capital", top1),
                     predictions=(Prediction("Poseidonia", 9, 1.0), top1))
    got = lines('INFER "The capital of Atlantis is"', r)
    assert got[1] == (" 1. Poseidonia (100.00%, source=knn_override/post_logits, cos=0.91, L3, "
                      "model_top1= Paris (87.23%))")
    assert got[3].startswith("  note: the KNN override is a post-logits sidecar")
    dense = infer_result(mode="dense", trace=())
    got = lines('INFER "x"', dense)
    assert got[0] == "Predictions (dense — no vindex):" and got[-1].startswith("Tip: ")
