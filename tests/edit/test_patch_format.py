""".vlp read/write (format §12): round trips, strict validation, one-line errors."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from modelql.errors import PatchError
from modelql.vindex import patch as vlp

H = 8
SHAPE = vlp.PatchShape(hidden_size=H, num_layers=3, features={0: 16, 1: 16, 2: 16})


def vec(seed: int, n: int = H) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def all_ops() -> list:
    return [
        vlp.InsertOp(1, 3, entity="France", target="Lyon", relation="capital", confidence=0.9,
                     gate=vec(1), up=vec(2), down=vec(3), down_meta=vlp.DownMeta("Lyon", 42, 0.9)),
        vlp.InsertOp(2, 0, entity="", target="x", relation=None, confidence=None),
        vlp.UpdateOp(1, 4, down=vec(4)),
        vlp.UpdateOp(0, 5, down_meta=vlp.DownMeta("é", 7, -1.5)),
        vlp.DeleteOp(2, 15, reason="test"),
        vlp.InsertKnnOp(1, "Spain", "capital", "Rome", 99, vec(5) * 30, confidence=None),
        vlp.DeleteKnnOp("spain"),
        vlp.DownDeltaOp(2, vec(6, H * 2).reshape(H, 2), vec(7, 16 * 2).reshape(16, 2), entity=("A", "B"),
                        relation=("capital", "capital"), target=("X", "Y"), edit_id="e1", method="memit"),
        vlp.DeleteEditOp("e1", reason="retracted"),
    ]


def write(tmp_path, ops=None, **kw):
    p = vlp.Patch(base_model="tiny", operations=all_ops() if ops is None else ops, created_at=vlp.now_rfc3339(),
                  description="t", tags=["a"], **kw)
    path = tmp_path / "p.vlp"
    vlp.write_patch(path, p)
    return path, p


def test_round_trip_is_bit_exact(tmp_path):
    path, p = write(tmp_path)
    got = vlp.read_patch(path, SHAPE, base_model="tiny")
    assert got.to_json() == p.to_json()
    assert [type(o) for o in got.operations] == [type(o) for o in p.operations]
    assert np.array_equal(got.operations[0].gate, all_ops()[0].gate)
    d = got.operations[-2]
    assert d.u.shape == (H, 2) and d.v.shape == (16, 2) and d.rank == 2
    assert np.array_equal(d.v, all_ops()[-2].v)
    assert (got.operations[-1].edit_id, got.operations[-1].reason) == ("e1", "retracted")
    # writing again gives the same bytes; no temp file is left behind
    text = path.read_text()
    vlp.write_patch(path, got)
    assert path.read_text() == text
    assert [x.name for x in tmp_path.iterdir()] == ["p.vlp"]


def test_document_is_pretty_json_with_spec_fields(tmp_path):
    path, _ = write(tmp_path)
    text = path.read_text()
    assert text.startswith("{\n  ")
    d = json.loads(text)
    assert {"version", "base_model", "base_checksum", "created_at", "description", "author", "tags",
            "operations"} <= set(d)
    ins = d["operations"][0]
    assert ins["op"] == "insert" and ins["down_meta"] == {"t": "Lyon", "i": 42, "c": 0.9}
    assert len(base64.b64decode(ins["gate_vector_b64"])) == 4 * H
    assert d["operations"][-2]["op"] == "down_delta" and d["operations"][-2]["entity"] == ["A", "B"]
    assert d["operations"][-1] == {"op": "delete_edit", "edit_id": "e1", "reason": "retracted"}


def test_counts():
    c = vlp.count_ops(all_ops())
    # inserts: 2 insert + 1 insert_knn + 2 facts of the delta; updates 2; deletes: delete + delete_knn + delete_edit
    assert (c.inserts, c.updates, c.deletes) == (5, 2, 3)


def _doc(ops, **top):
    d = {"version": 1, "base_model": "tiny", "created_at": "", "operations": ops}
    d.update(top)
    return d


@pytest.mark.parametrize("bad", [
    base64.b64encode(np.zeros(H - 1, np.float32).tobytes()).decode(),  # too short
    base64.b64encode(np.zeros(H + 1, np.float32).tobytes()).decode(),  # too long
    base64.b64encode(b"\x00" * (4 * H - 2)).decode(),  # not a multiple of 4
    "not base64!!",
    base64.b64encode(np.full(H, np.nan, np.float32).tobytes()).decode(),  # non-finite
    17,
])
def test_invalid_vector_rejects_the_whole_patch(bad):
    ok = {"op": "update", "layer": 0, "feature": 1, "down_vector_b64": vlp.encode_vector(vec(1))}
    with pytest.raises(PatchError, match=r"^invalid vector in operation #2$"):
        vlp.patch_from_json(_doc([ok, {"op": "update", "layer": 0, "feature": 1, "gate_vector_b64": bad}]), SHAPE)


@pytest.mark.parametrize("ops,message", [
    ([{"op": "rename"}], "unknown op 'rename' in operation #1"),
    ([{"layer": 0}], "operation #1 has no 'op' tag"),
    ([{"op": "delete", "layer": 3, "feature": 0}], "operation #1: layer 3 is out of range"),
    ([{"op": "delete", "layer": 0, "feature": 16}], "operation #1: feature 16 is out of range"),
    ([{"op": "delete", "layer": 0}], "operation #1: 'feature' must be an integer"),
    ([{"op": "insert_knn", "layer": 0, "entity": "a", "relation": "r", "target": "t", "target_id": 1}],
     "invalid vector in operation #1"),
    ([{"op": "update", "layer": 0, "feature": 0, "down_meta": {"t": "x"}}], "'down_meta' must be"),
    (["nope"], "operation #1 is not an object"),
    ([{"op": "delete_edit"}], "operation #1: 'edit_id' must be a string"),
])
def test_bad_operations(ops, message):
    with pytest.raises(PatchError, match=message):
        vlp.patch_from_json(_doc(ops), SHAPE)


@pytest.mark.parametrize("doc,message", [
    ([], "is not a JSON object"),
    ({"version": 2, "base_model": "tiny", "created_at": "", "operations": []}, "version 2"),
    ({"version": 1, "created_at": "", "operations": []}, "missing required field 'base_model'"),
    ({"version": 1, "base_model": "tiny", "created_at": "", "operations": {}}, "'operations' must be an array"),
    ({"version": 1, "base_model": "tiny", "created_at": "", "operations": [], "tags": "x"}, "'tags'"),
])
def test_bad_documents(doc, message):
    with pytest.raises(PatchError, match=message):
        vlp.patch_from_json(doc, SHAPE)


def test_wrong_base_model_is_refused(tmp_path):
    path, _ = write(tmp_path)
    with pytest.raises(PatchError) as e:
        vlp.read_patch(path, SHAPE, base_model="other-model")
    assert "made for base model 'tiny', not 'other-model'" in str(e.value)
    assert "\n" not in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(PatchError, match=r"^patch not found: .*missing.vlp$"):
        vlp.read_patch(tmp_path / "missing.vlp", SHAPE)
    path, _ = write(tmp_path)
    path.write_text(path.read_text()[:-40])  # truncated JSON
    with pytest.raises(PatchError, match=r"^failed to load patch: p.vlp is not valid JSON"):
        vlp.read_patch(path, SHAPE)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PatchError, match="failed to load patch"):
        vlp.read_patch(path, SHAPE)


def test_delta_shapes_are_checked():
    op = vlp.op_to_json(all_ops()[-2])
    op["rank"] = 3  # u/v no longer hold H·3 / F·3 values
    with pytest.raises(PatchError, match="invalid vector in operation #1"):
        vlp.patch_from_json(_doc([op]), SHAPE)
    op = vlp.op_to_json(all_ops()[-2])
    op["target"] = ["X"]
    with pytest.raises(PatchError, match="differ in length"):
        vlp.patch_from_json(_doc([op]), SHAPE)


def test_larql_style_patch_reads(tmp_path):
    """A patch as LARQL writes it (base_checksum null, nullable fields null, unnormalised key)."""
    doc = _doc([
        {"op": "insert", "layer": 1, "feature": 2, "relation": None, "entity": "e", "target": "t",
         "confidence": None, "gate_vector_b64": vlp.encode_vector(vec(1)), "up_vector_b64": None,
         "down_vector_b64": None, "down_meta": None},
        {"op": "insert_knn", "layer": 2, "entity": "e", "relation": "r", "target": "t", "target_id": 5,
         "confidence": None, "key_vector_b64": vlp.encode_vector(vec(2) * 100)},
        {"op": "delete", "layer": 0, "feature": 0, "reason": None},
        {"op": "delete_knn", "entity": "E"},
    ], base_checksum=None, description=None, author=None, extra_field={"kept": True})
    p = vlp.patch_from_json(doc, SHAPE, base_model="tiny")
    assert p.extra == {"extra_field": {"kept": True}}
    assert p.counts.total == 4
    assert p.to_json()["extra_field"] == {"kept": True}
