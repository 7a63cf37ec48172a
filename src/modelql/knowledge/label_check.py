"""Causal check of relation labels: does ablating a feature labelled R hurt R's right answers?

A probe label says a feature *fires* on R's prompts and *promotes* R's objects; neither says the
model uses it to answer R. The check: for each labelled feature (L, f, R), run R's calibrated
template on subjects the model answers right — first those whose probes earned the label (where
the feature fired), then others — once with feature f of layer L zeroed (its activation after the
nonlinearity, at every position after the template's head — the head, a two-shot prompt's
examples, is run once per model and reused, `knowledge.prefixed`) and once with a random feature of the same layer zeroed; the
label passes when zeroing f lowers the right first tokens' mean log-odds more than zeroing the
random one (`measure="prob"`: their probability). Why those subjects: relation features are
subject-specific (on the embedded model a "capital" feature of layer 0 moves Egypt's capital by
0.85 in log-odds and France's by nothing), so on six fixed subjects a label's effect was chance
(50 % passed). Why log-odds: answered with probability ≈ 1 a single feature moves the probability
by less than float noise. All ablated runs go through the model in padded batches (each row
zeroes its own feature), so checking a few hundred labels costs a handful of forward passes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .prefixed import head_of, last_states

#: Subjects per relation the check runs on (answered right by the model).
CHECK_SUBJECTS = 6


@dataclass
class CheckResult:
    passed: dict[tuple[int, int], bool] = field(default_factory=dict)
    drop: dict[tuple[int, int], float] = field(default_factory=dict)  # feature's drop − random's drop
    unchecked: list[tuple[int, int]] = field(default_factory=list)  # relation without right answers

    @property
    def checked(self) -> int:
        return len(self.passed)

    @property
    def pass_rate(self) -> float | None:
        return sum(self.passed.values()) / len(self.passed) if self.passed else None


def _first_ids(tok, target: str) -> set[int]:
    out = set()
    for t in (" " + target.strip(), target.strip()):
        ids = tok.encode(t, add_special_tokens=False)
        if ids:
            out.add(int(ids[0]))
    return out


def _score(logits: torch.Tensor, right: Sequence[int], measure: str) -> float:
    """The right answers' probability (`prob`) or its log-odds (`log_odds`) from one row of logits."""
    lse = torch.logsumexp(logits, dim=-1)
    idx = torch.tensor(right, dtype=torch.long)
    if measure == "prob":
        return float(torch.exp(logits[idx] - lse).sum())
    rest = logits.clone()
    rest[idx] = -torch.inf
    return float(torch.logsumexp(logits[idx], dim=-1) - torch.logsumexp(rest, dim=-1))


#: How the check compares runs: the right answers' log-odds (default; on a model that answers with
#: probability ≈ 1 one feature moves the probability by less than the arithmetic's noise, while its
#: log-odds still move) or their probability.
MEASURES = ("log_odds", "prob")


def _zero(pairs: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]] | None):
    """A hook zeroing feature f of row r at all its positions, for each (r, f): padded rows
    [B, T, F] (`spans` None) or one packed row [1, N, F] where row r holds `spans[r]`."""
    if spans is None:
        r_idx = torch.tensor([p[0] for p in pairs])
        f_idx = torch.tensor([p[1] for p in pairs])

        def fn(t: torch.Tensor, n: str) -> torch.Tensor:
            t = t.clone()
            t[r_idx, :, f_idx] = 0
            return t

        return fn
    pos = torch.tensor([o + j for r, _f in pairs for o, n in [spans[r]] for j in range(n)], dtype=torch.long)
    feat = torch.tensor([f for r, f in pairs for _j in range(spans[r][1])], dtype=torch.long)

    def packed(t: torch.Tensor, n: str) -> torch.Tensor:
        t = t.clone()
        t[0, pos, feat] = 0
        return t

    return packed


def check_labels(model, tok, labels: Mapping[tuple[int, int], str], templates: Mapping[str, str],
                 subjects: Mapping[str, Sequence[tuple[str, Sequence[str]]]], *, seed: int = 0,
                 n_subjects: int = CHECK_SUBJECTS, batch: int = 96, measure: str = "log_odds",
                 evidence: Mapping[tuple[int, int], Sequence[str]] | None = None) -> CheckResult:
    """Check `labels` {(layer, feature): relation}; `subjects[R]` are (subject, objects) pairs the
    model answers right with `templates[R]`. A label is checked on up to `n_subjects` of them: those
    of `evidence[(layer, feature)]` (the subjects whose probes earned the label) first, then the
    others in order. It passes when zeroing its feature lowers the right answers' mean `measure`
    (`MEASURES`) more than zeroing a random feature of its layer."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}")
    rng = random.Random(seed)
    res = CheckResult()
    n_feat = {}
    rows: list[tuple[list[int], set[int], int, int, tuple, str, str]] = []  # ids, right, layer, feat, key, kind, template
    base_rows: dict[tuple[str, str], int] = {}
    uses: dict[tuple[int, int], list[int]] = {}  # label → its prompts' base rows
    for key, rel in sorted(labels.items()):
        L, f = key
        pairs = list(subjects.get(rel, ()))
        if evidence is not None and evidence.get(key):
            first = {s: i for i, s in enumerate(dict.fromkeys(evidence[key]))}
            pairs.sort(key=lambda p: first.get(p[0], len(first)))
        pairs = pairs[:n_subjects]
        if rel not in templates or not pairs:
            res.unchecked.append(key)
            continue
        if L not in n_feat:
            w = model.weights.get(f"layers.{L}.down.weight")
            n_feat[L] = int(w.shape[1]) if w is not None else 0
        if not n_feat[L]:
            res.unchecked.append(key)
            continue
        rnd = rng.randrange(n_feat[L] - 1)
        rnd = rnd + 1 if rnd >= f else rnd
        for s, objs in pairs:
            ids = tok.encode(templates[rel].replace("{X}", s), add_special_tokens=True)
            right = set().union(*[_first_ids(tok, o) for o in objs])
            rows.append((ids, right, L, f, key, "feature", templates[rel]))
            rows.append((ids, right, L, rnd, key, "random", templates[rel]))
            if (rel, s) not in base_rows:  # the unablated run, once per prompt
                base_rows[(rel, s)] = len(rows)
                rows.append((ids, right, -1, -1, (rel, s), "base", templates[rel]))
            uses.setdefault(key, []).append(base_rows[(rel, s)])
    probs: list[float] = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for b in range(0, len(order), batch):
        chunk = order[b:b + batch]

        def ablations(batch_rows: list[int], spans, _chunk=chunk) -> dict:
            """Each row of the pass zeroes its own feature (rows: indices into `_chunk`)."""
            per_layer: dict[int, list[tuple[int, int]]] = {}
            for row, j in enumerate(batch_rows):
                i = _chunk[j]
                if rows[i][2] >= 0:
                    per_layer.setdefault(rows[i][2], []).append((row, rows[i][3]))
            return {f"blocks.{L}.mlp.hook_post": _zero(p, spans) for L, p in per_layer.items()}

        # each row forks its template's head (run once, `knowledge.prefixed`): the ablation zeroes
        # the feature at the entity's and the template tail's positions
        h, _ = last_states(model, tok, [(head_of(rows[i][6]), rows[i][0]) for i in chunk], hooks=ablations,
                           batch=len(chunk))
        lg = model.unembed(h).double()
        for row, i in enumerate(chunk):
            probs[i] = _score(lg[row], sorted(rows[i][1]), measure)
    acc: dict[tuple[int, int], dict[str, list[float]]] = {}
    for (ids, _r, _L, _f, key, kind, _t), pr in zip(rows, probs):
        if kind != "base":
            acc.setdefault(key, {}).setdefault(kind, []).append(pr)
    for key, d in acc.items():
        base = sum(probs[i] for i in uses[key]) / len(uses[key])
        drop_f = base - sum(d["feature"]) / len(d["feature"])
        drop_r = base - sum(d["random"]) / len(d["random"])
        res.drop[key] = drop_f - drop_r
        res.passed[key] = drop_f > drop_r
    return res


__all__ = ["CheckResult", "check_labels", "CHECK_SUBJECTS", "MEASURES"]
