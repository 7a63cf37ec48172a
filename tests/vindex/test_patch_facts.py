"""The live facts of an overlay, replayed from its ops (`vindex.patch_facts`): brute-force cases."""

from __future__ import annotations

import numpy as np

from modelql.vindex import patch as vlp
from modelql.vindex.patch_facts import facts_of


def _delta(edit_id, facts, layer=1):
    e, r, t = zip(*facts)
    return vlp.DownDeltaOp(layer=layer, u=np.zeros((4, 1), np.float32), v=np.zeros((8, 1), np.float32),
                           entity=e, relation=r, target=t, edit_id=edit_id, method="memit")


def test_every_mode_appears_and_deletes_remove_it():
    key = np.zeros(4, np.float32)
    ops = [
        vlp.InsertOp(layer=2, feature=5, entity="France", target="Tokyo", relation="capital"),
        vlp.InsertKnnOp(layer=3, entity="Spain", relation="capital", target="Rome", target_id=7, key=key),
        _delta("e1", [("Kenya", "capital", "Lima"), ("Peru", "capital", "Nairobi")]),
        _delta("e1", [("Kenya", "capital", "Lima"), ("Peru", "capital", "Nairobi")], layer=2),  # multi-layer edit
    ]
    got = [(f.entity, f.target, f.mode, f.patch) for f in facts_of([("a.vlp", ops)])]
    assert got == [("France", "Tokyo", "feature", "a.vlp"), ("Spain", "Rome", "knn", "a.vlp"),
                   ("Kenya", "Lima", "memit", "a.vlp"), ("Peru", "Nairobi", "memit", "a.vlp")]
    later = [vlp.DeleteOp(layer=2, feature=5), vlp.DeleteKnnOp(entity="spain"), vlp.DeleteEditOp(edit_id="e1"),
             _delta("e2", [("Peru", "capital", "Nairobi")])]  # MEMIT re-solves the batch's other fact
    got = [(f.entity, f.target, f.patch, f.edit_id) for f in facts_of([("a.vlp", ops), ("(session)", later)])]
    assert got == [("Peru", "Nairobi", "(session)", "e2")]


def test_a_slot_rewritten_keeps_the_last_insert():
    ops = [vlp.InsertOp(layer=0, feature=1, entity="A", target="x", relation="r"),
           vlp.InsertOp(layer=0, feature=1, entity="B", target="y", relation="r")]
    assert [(f.entity, f.target) for f in facts_of([("p", ops)])] == [("B", "y")]
