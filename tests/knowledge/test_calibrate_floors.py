"""The choice of DESCRIBE's confidence floors (`knowledge.calibrate.choose_floors`), on the numbers
that silenced the embedded model's currency relation: one made-up name ("rtyuio") as familiar as
the familiarity floor, answered "New…" with probability 0.991, set a probability floor of 1.011."""

from __future__ import annotations

import math

from modelql.knowledge.calibrate import choose_floors, made_up_names

POS = {"capital": [(f"C{i}", 0.95) for i in range(10)], "currency": [(f"C{i}", 0.9) for i in range(10)]}
FAM = {f"C{i}": -2.0 - 0.1 * i for i in range(10)}
NEG_FAM = [-4.1708, -5.6, -6.6, -9.8, -10.3]
NEG = {"capital": [0.30, 0.90, 0.40, 0.90, 0.2], "currency": [0.991, 0.98, 0.5, 0.99, 0.3]}


def _confident(tf, chosen, rel, p, f):
    t, floor, _r = chosen[rel]
    return f >= max(tf, t) and p >= floor


def test_an_outlier_negative_does_not_silence_its_relation():
    tf, chosen = choose_floors(POS, FAM, NEG, NEG_FAM)
    assert all(rec == 1.0 for _t, _f, rec in chosen.values()), chosen
    assert all(floor < 1 for _t, floor, _r in chosen.values())
    for rel, probs in NEG.items():  # and still no negative is confident
        assert not any(_confident(tf, chosen, rel, p, f) for p, f in zip(probs, NEG_FAM))
    assert tf > -4.1708  # "rtyuio" is below the familiarity floor: the model does not know it


def test_a_relation_keeps_the_probability_floor_its_negatives_ask_for():
    """Known names answered with a low probability stay unconfident when a negative as familiar
    was answered as surely: the floor is not dropped to zero just because familiarity could."""
    pos = {"language": [("A", 0.9), ("B", 0.2), ("C", 0.95)]}
    fam = {"A": -1.0, "B": -1.0, "C": -1.5}
    tf, chosen = choose_floors(pos, fam, {"language": [0.5, 0.3]}, [-0.5, -3.0])
    t, floor, rec = chosen["language"]
    assert floor > 0.5 and rec == 2 / 3
    assert math.isinf(t) and t < 0


def test_made_up_names_are_deterministic_and_any_number_can_be_drawn():
    assert made_up_names() == made_up_names()
    many = made_up_names(400, seed=7)  # more than there are keyboard runs: once hung
    assert len({n.lower() for n in many}) == 400


def test_a_relation_whose_confident_claims_are_mostly_wrong_is_not_probed(kmodel):
    """On the embedded model, continent with its objects shuffled among the subjects: the model
    answers each country's true continent, sure of it, so the template is chosen (its accuracy,
    the chance a shuffled continent is the true one, clears `MIN_ACCURACY`) but most of its
    confident claims are wrong: measured precision < `MIN_PRECISION`, not probed. The true
    continent relation keeps its probe; the stored calibration round-trips."""
    import random

    from modelql import defaults as D
    from modelql.knowledge.calibrate import MIN_ACCURACY, MIN_PRECISION, Calibration, calibrate

    pairs = [list(p) for p in D.triples_json()["continent"]["pairs"]]
    objs = [o for _s, o in pairs]
    random.Random(3).shuffle(objs)
    triples = {"continent": {"pairs": pairs},
               "shuffled": {"pairs": [[s, o] for (s, _o), o in zip(pairs, objs)]}}
    tmpl = {"continent": ["{X} is a country in"], "shuffled": ["{X} is a country in"]}
    cal = calibrate(kmodel, kmodel.tokenizer, triples, tmpl, negatives=made_up_names(40))
    assert "shuffled" in cal.templates and max(cal.accuracy["shuffled"].values()) >= MIN_ACCURACY
    assert cal.precision["continent"] >= 0.9 and cal.precision["shuffled"] < MIN_PRECISION, cal.precision
    assert set(cal.probed()) == {"continent"}
    back = Calibration.from_json(cal.to_json())
    assert back.precision == {r: round(p, 4) for r, p in cal.precision.items()} and set(back.probed()) == {"continent"}
    # a calibration stored before precision was measured probes every relation with a template
    old = cal.to_json()
    old.pop("precision")
    assert set(Calibration.from_json(old).probed()) == {"continent", "shuffled"}
