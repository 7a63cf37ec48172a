"""Calibration on the real pretrained model (SmolLM2-135M-Instruct): the probe template is chosen by
measured accuracy, the floors keep every calibration negative out, and made-up names the
calibration never saw get no confident capital claim while known countries do."""

from __future__ import annotations

import pytest
import torch

from modelql.knowledge.calibrate import calibrate, familiarity, made_up_names
from modelql.knowledge.labels import default_templates, default_triples


@pytest.fixture(scope="module")
def capital_calibration(real_model):
    torch.set_num_threads(1)
    tri = {"capital": default_triples()["capital"]}
    return calibrate(real_model, real_model.tokenizer, tri, default_templates(tri))  # what `modelql label` runs


def _claim(model, template, name):
    ids = model.tokenizer.encode(template.replace("{X}", name))
    p = torch.softmax(model.forward(torch.tensor([ids]), logits="last")[0].double(), -1)
    return float(p.max())


def test_template_chosen_by_accuracy_and_floors_exclude_negatives(capital_calibration):
    cal = capital_calibration
    accs = cal.accuracy["capital"]
    assert cal.templates["capital"] in accs and accs[cal.templates["capital"]] == max(accs.values())
    assert accs[cal.templates["capital"]] > 0.1
    assert cal.negatives_passing == 0 and cal.recall["capital"] > 0.5


def test_unseen_made_up_names_are_not_confident(capital_calibration, real_model):
    cal = capital_calibration
    seen = {n.lower() for n in made_up_names()}
    # (not typos of known names: calibrated on capital alone, "Frnace" → Paris clears the floors;
    # the seven-relation calibration `modelql label` runs sets a familiarity floor that stops it)
    names = [n for n in made_up_names(30, seed=99) if n.lower() not in seen][:12] + ["asdfgh"]
    fams = familiarity(real_model, real_model.tokenizer, names)
    t = cal.templates["capital"]
    confident = [n for n, f in zip(names, fams) if cal.confident("capital", _claim(real_model, t, n), f)]
    assert not confident
    known = ["France", "Germany", "Japan", "Italy"]
    fams = familiarity(real_model, real_model.tokenizer, known)
    assert sum(cal.confident("capital", _claim(real_model, t, n), f) for n, f in zip(known, fams)) >= 3
