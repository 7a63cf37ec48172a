"""The real pretrained model fixture: present in CI, and it knows the facts the knowledge tests build on."""

from __future__ import annotations


def test_real_model_generates_a_known_fact(real_model):
    from modelql.runtime.generate import generate

    out = generate(real_model, "The capital of France is", max_tokens=3, temperature=0).text  # greedy: no RNG
    assert out.lstrip().startswith("Paris")
