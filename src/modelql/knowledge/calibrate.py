"""Per-model calibration of DESCRIBE's relation claims: which probe template, and when to believe it.

Why: a probe template's decoded answer is what the model *says*, for any string — on
SmolLM2-135M-Instruct "The capital of asdfgh is" still decodes to a city, and on the embedded
model a made-up name gets a capital with the same "signal" as France. So at labelling time, per
model, three things are measured and stored in `probe_meta.json` ("calibration"):

* **the template of each relation**: every candidate (the probe set's templates, each also as a
  two-shot prompt whose examples are the first two subjects of the triples, "The capital of A is
  a. The capital of B is b. The capital of {X} is") is run over up to `MAX_SUBJECTS` subjects;
  its accuracy is the fraction whose first decoded token starts one of the object's forms. The
  most accurate one is the relation's probe (ties → the shorter prompt). Relations no candidate
  answers (accuracy < `MIN_ACCURACY`) are not probed at DESCRIBE time: their claims would be noise.
* **entity familiarity**: the mean log-probability the model gives to the entity's own tokens
  after its first one (in the context "about {X}"; a single-token name is a vocabulary word: 0). Made-up names and typos ("asdfgh", "Frnace") are spelled out of pieces the model does not
  expect to follow each other; known names are not.
* **answer probability**: the probability of the decoded first token of the relation's template.
* **claim precision**: per relation, the fraction of the sampled subjects' confident claims (with
  the floors below) whose first token is right. A relation whose confident claims are wrong more
  often than right (`MIN_PRECISION`) is not probed at DESCRIBE time: on SmolLM2-135M the two-shot
  subregion and currency templates answer by the examples' prior (" Southern …", " the …":
  27 % and 22 % of their confident claims right), and each probe costs its rows in every pass of
  every DESCRIBE. Its labels are still probed and checked (a feature can write a relation the
  template rarely gets right).

Negatives are `made_up_names()` (`N_NEGATIVES` deterministic pseudo-names, seeded: a syllable
generator and keyboard runs), positives the subjects whose answer was right. The thresholds are
chosen by that measurement (`choose_floors`): each relation takes the most permissive familiarity
floor (-inf, or just above some negative's familiarity) that reaches its best recall with no
negative confident, its probability floor just above the surest negative still that familiar;
the global familiarity floor is the strictest that keeps the best mean recall. Why per relation:
with one shared familiarity floor and the probability floor at the surest negative, one made-up
name as familiar as the floor ("rtyuio", answered "New…" with probability 0.991) set the
embedded model's currency floor to 1.011 and its recall to 0. Why 120 negatives: calibrated on
40, a held-out keyboard run ("asdfg") passed every relation of the embedded model; on 120, none
of 200 held-out names did.
A claim is *confident* when its entity is familiar enough and its probability clears its
relation's floor; DESCRIBE shows the others marked low-confidence and says
in one line when the entity looks unknown.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..vindex.clusters import forms
from .prefixed import head_of

#: Subjects per relation measured when choosing templates and thresholds.
MAX_SUBJECTS = 32
#: Made-up names used as negatives.
N_NEGATIVES = 120
#: A relation whose best template answers fewer than this fraction right is not probed.
MIN_ACCURACY = 0.1
#: A relation is probed by DESCRIBE only when at least this fraction of its confident claims on the
#: calibration subjects is right (more right than wrong).
MIN_PRECISION = 0.5
#: Absolute margin added above the largest negative's probability.
PROB_MARGIN = 0.02
#: A familiarity floor sits this far above the negative that sets it.
FAMILIARITY_EPS = 1e-4

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "st", "th", "vl", "zh", "qu", "x"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x"]
_ENDINGS = ["ia", "ania", "istan", "land", "ora", "avia", "eth", "ar", "und", "oria"]
_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def made_up_names(n: int = N_NEGATIVES, seed: int = 1234) -> list[str]:
    """`n` deterministic made-up names: 3/4 pronounceable pseudo-countries, 1/4 keyboard runs."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if len(out) % 4 == 3 and tries < 50 * n:  # keyboard runs are few: past them, syllables only
            row = rng.choice(_ROWS)
            i = rng.randrange(0, len(row) - 5)
            name = row[i:i + rng.randint(5, 6)]
        else:
            syl = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                          for _ in range(rng.randint(1, 2)))
            name = (syl + rng.choice(_ENDINGS)).capitalize()
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=True)


def _padded(model, prompts: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of prompts of any lengths, padded at the end by repeating their last token
    (causal attention keeps the padding out of the real positions): the final residual [B, T, H]
    and each prompt's last index."""
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    ids = torch.tensor([list(p) + [p[-1]] * (width - len(p)) for p in prompts])
    return model.forward(ids, logits="none"), lens - 1


def _top1(model, tok, rows: Sequence[tuple[str, list[int]]]) -> tuple[list[int], list[float]]:
    """Each prompt's decoded first token and its probability (rows: (template head, ids); the
    heads run once, `knowledge.prefixed`)."""
    from .prefixed import last_states

    finals, _ = last_states(model, tok, rows)
    ids: list[int] = []
    probs: list[float] = []
    for b in range(0, finals.shape[0], 256):
        p = torch.softmax(model.unembed(finals[b:b + 256]).double(), -1)
        v, i = p.max(dim=-1)
        ids += i.tolist()
        probs += v.tolist()
    return ids, probs


def _forward_last(model, prompts: Sequence[list[int]], batch: int = 64) -> list[torch.Tensor]:
    """Last-position logits of each prompt."""
    out: list[torch.Tensor] = []
    for b in range(0, len(prompts), batch):
        h, last = _padded(model, prompts[b:b + batch])
        out += list(model.unembed(h[torch.arange(len(last)), last]).float())
    return out


#: The quantile of a relation's object lengths its answer phrases are capped at (+1 for an article).
ANSWER_QUANTILE = 0.9

#: The context a name's familiarity is read in (mid-sentence: the tokenizer's leading-space form).
FAMILIARITY_CONTEXT = "about {X}"


def _prefix_len(tok) -> int:
    return len(_encode(tok, FAMILIARITY_CONTEXT.split("{X}")[0].rstrip()))


def familiarity_from(tok, logprobs: Sequence[float]) -> float:
    """`familiarity` from the log-probabilities of the context's tokens after the first (what
    `queries.residual_query(..., token_logprobs=...)` keeps): the entity's tokens after its first."""
    got = list(logprobs)[_prefix_len(tok):]
    return sum(got) / len(got) if got else 0.0


def familiarity(model, tok, names: Sequence[str], batch: int = 64) -> list[float]:
    """Mean log-probability of each name's tokens after its first, in `FAMILIARITY_CONTEXT`;
    0.0 for a name of one token (a vocabulary word)."""
    enc = [_encode(tok, FAMILIARITY_CONTEXT.replace("{X}", n)) for n in names]
    pre = _prefix_len(tok)
    plain = [ids[pre:] for ids in enc]
    out = [0.0] * len(names)
    for b in range(0, len(enc), batch):
        chunk = [i for i in range(b, min(b + batch, len(enc))) if len(plain[i]) > 1]
        if not chunk:
            continue
        h, _last = _padded(model, [enc[i] for i in chunk])
        # every scored position of the batch through one unembedding (the vocabulary matrix is
        # read once per batch, not once per name)
        hs = torch.cat([h[r, pre:len(enc[i]) - 1] for r, i in enumerate(chunk)])  # predict tokens pre+1..L-1
        nxt = torch.tensor([t for i in chunk for t in enc[i][pre + 1:]])
        got = torch.cat([_logprob_of(model, hs[k:k + 256], nxt[k:k + 256]) for k in range(0, hs.shape[0], 256)])
        at = 0
        for i in chunk:
            n = len(enc[i]) - 1 - pre
            out[i] = float(got[at:at + n].mean())
            at += n
    return out


def _logprob_of(model, hs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[j] | residual hs[j]) for each row (double precision)."""
    lp = torch.log_softmax(model.unembed(hs).double(), dim=-1)
    return lp[torch.arange(hs.shape[0]), ids]


def two_shot(template: str, examples: Sequence[tuple[str, str]]) -> str:
    """`template` preceded by two worked examples: "T(A) a. T(B) b. T({X})"."""
    parts = [template.replace("{X}", s).rstrip() + " " + o.strip() + "." for s, o in examples[:2]]
    return " ".join(parts + [template])


def objects_by_frequency(triples: Mapping[str, Any]) -> dict[str, list[str]]:
    """relation → its distinct objects, most frequent first (ties: first seen): what DESCRIBE
    drafts an answer's continuation from (`decode.draft_index`)."""
    from collections import Counter

    out = {}
    for rel, body in triples.items():
        c = Counter(str(o).strip() for _s, o in body["pairs"] if str(o).strip())
        out[rel] = [o for o, _n in c.most_common()]
    return out


def answer_lengths(tok, triples: Mapping[str, Any]) -> dict[str, int]:
    """relation → the longest phrase DESCRIBE grows its answer into, in tokens: the
    `ANSWER_QUANTILE` quantile of its objects' lengths (mid-sentence form) plus one for an article
    ("the euro"). Why: the phrase is grown one batched forward pass per token until the model
    stops naming the thing, and a rambling continuation ("the Arab Republic of the North
    African") cost most of a DESCRIBE's passes; the longest object ("Sri Jayawardenepura Kotte",
    7 tokens on SmolLM2) would not cap anything. A longer answer is cut to a whole-word prefix."""
    from .decode import MAX_PHRASE_TOKENS

    out = {}
    for rel, body in triples.items():
        objs = sorted({str(o).strip() for _s, o in body["pairs"] if str(o).strip()})
        if objs:
            lens = sorted(len(tok.encode(" " + o, add_special_tokens=False)) for o in objs)
            n = lens[min(len(lens) - 1, int(ANSWER_QUANTILE * len(lens)))]
            out[rel] = min(MAX_PHRASE_TOKENS + 1, n + 1)
    return out


def first_token_right(tok, token_id: int, targets: Sequence[str]) -> bool:
    """The decoded first token (≥ 2 chars) starts one of the targets' forms."""
    s = tok.decode([int(token_id)], skip_special_tokens=True).strip().lower()
    if len(s) < 2:
        return False
    return any(f.startswith(s) for t in targets for f in forms(t))


@dataclass
class Calibration:
    """What `probe_meta.json["calibration"]` stores (see the module docstring)."""

    templates: dict[str, str] = field(default_factory=dict)  # relation → chosen template
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # relation → template → accuracy
    min_prob: dict[str, float] = field(default_factory=dict)
    min_familiarity: float = -math.inf
    min_familiarity_rel: dict[str, float] = field(default_factory=dict)  # stricter floors per relation
    recall: dict[str, float] = field(default_factory=dict)  # positives passing, per relation
    #: relation → fraction of the calibration subjects' confident claims that are right (None: no claim)
    precision: dict[str, float | None] = field(default_factory=dict)
    negatives_passing: int = 0
    negatives: int = 0
    subjects: list[str] = field(default_factory=list)  # the labelling subjects (near-miss suggestions)
    answer_tokens: dict[str, int] = field(default_factory=dict)  # relation → longest answer phrase (tokens)
    objects: dict[str, list[str]] = field(default_factory=dict)  # relation → its objects, most frequent first
    #: relation → (subject, objects) the chosen template answers right (not stored; the label check)
    right: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"templates": self.templates, "accuracy": self.accuracy,
                "min_prob": {r: round(v, 4) for r, v in self.min_prob.items()},
                "min_familiarity": None if self.min_familiarity == -math.inf else round(self.min_familiarity, 4),
                "min_familiarity_by_relation": {r: round(v, 4) for r, v in self.min_familiarity_rel.items()},
                "recall": {r: round(v, 4) for r, v in self.recall.items()},
                "precision": {r: None if v is None else round(v, 4) for r, v in self.precision.items()},
                "negatives": self.negatives, "negatives_passing": self.negatives_passing,
                "subjects": self.subjects, "answer_tokens": self.answer_tokens, "objects": self.objects}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Calibration | None:
        if not isinstance(d, Mapping) or not isinstance(d.get("templates"), Mapping):
            return None
        mf = d.get("min_familiarity")
        return cls(templates={str(k): str(v) for k, v in d["templates"].items()},
                   accuracy={str(k): dict(v) for k, v in (d.get("accuracy") or {}).items()},
                   min_prob={str(k): float(v) for k, v in (d.get("min_prob") or {}).items()},
                   min_familiarity=-math.inf if mf is None else float(mf),
                   min_familiarity_rel={str(k): float(v)
                                        for k, v in (d.get("min_familiarity_by_relation") or {}).items()},
                   recall={str(k): float(v) for k, v in (d.get("recall") or {}).items()},
                   precision={str(k): None if v is None else float(v) for k, v in (d.get("precision") or {}).items()},
                   negatives=int(d.get("negatives") or 0), negatives_passing=int(d.get("negatives_passing") or 0),
                   subjects=[str(s) for s in d.get("subjects") or []],
                   answer_tokens={str(k): int(v) for k, v in (d.get("answer_tokens") or {}).items()},
                   objects={str(k): [str(o) for o in v] for k, v in (d.get("objects") or {}).items()})

    def confident(self, relation: str, prob: float, fam: float) -> bool:
        floor = self.min_prob.get(relation)
        fam_floor = max(self.min_familiarity, self.min_familiarity_rel.get(relation, -math.inf))
        return floor is not None and fam >= fam_floor and prob >= floor

    def familiar(self, fam: float) -> bool:
        return fam >= self.min_familiarity

    def probed(self) -> dict[str, str]:
        """relation → template of the relations DESCRIBE probes: those whose confident claims were
        right at least `MIN_PRECISION` of the time at calibration (a vindex calibrated before this
        was measured: every relation with a template)."""
        return {r: t for r, t in self.templates.items()
                if (p := self.precision.get(r)) is None or p >= MIN_PRECISION}


def _relation_floors(pos: Sequence[tuple[str, float]], neg_p: Sequence[float], neg_f: Sequence[float],
                     fam: Mapping[str, float]) -> list[tuple[float, float, float]]:
    """Every (familiarity floor, probability floor, recall) pair that lets no negative through:
    the familiarity floor is -inf or just above a negative's familiarity (a negative that sets
    it is out however sure its answer), the probability floor `PROB_MARGIN` above the surest
    negative still in."""
    out = []
    for t in sorted({-math.inf} | {f + FAMILIARITY_EPS for f in neg_f}):
        over = [p for p, f in zip(neg_p, neg_f) if f >= t]
        floor = (max(over) + PROB_MARGIN) if over else 0.0
        rec = sum(1 for s, p in pos if fam[s] >= t and p >= floor) / max(1, len(pos))
        out.append((t, floor, rec))
    return out


def choose_floors(pos_probs: Mapping[str, Sequence[tuple[str, float]]], fam: Mapping[str, float],
                  neg_probs: Mapping[str, Sequence[float]], neg_fam: Sequence[float],
                  ) -> tuple[float, dict[str, tuple[float, float, float]]]:
    """The global familiarity floor and, per relation, (familiarity floor, probability floor,
    recall of its positives) such that no negative is confident.

    Each relation takes the most permissive familiarity floor that reaches its best recall (so
    its probability floor stays as high as the negatives ask): a made-up name answered
    near-certainly for one relation is shut out by familiarity, not by a probability floor no
    answer can clear. The global floor ("the model does not seem to know X") is the strictest
    that keeps the best mean recall."""
    picks = {}
    for rel, pos in pos_probs.items():
        t, floor, _rec = max(_relation_floors(pos, neg_probs[rel], neg_fam, fam), key=lambda c: (c[2], -c[0]))
        picks[rel] = (t, floor)

    def recall(rel: str, tf: float) -> float:
        t, floor = picks[rel]
        pos = pos_probs[rel]
        return sum(1 for s, p in pos if fam[s] >= max(t, tf) and p >= floor) / max(1, len(pos))

    best = (-1.0, -math.inf)
    for tf in sorted({-math.inf} | {f + FAMILIARITY_EPS for f in neg_fam}):
        score = sum(recall(rel, tf) for rel in picks) / max(1, len(picks))
        if score >= best[0] - 1e-12:
            best = (score, tf)
    tf = best[1]
    return tf, {rel: (t, floor, recall(rel, tf)) for rel, (t, floor) in picks.items()}


def calibrate(model, tok, triples: Mapping[str, Any], templates: Mapping[str, Sequence[str]], *,
              max_subjects: int = MAX_SUBJECTS, negatives: Sequence[str] | None = None,
              progress=None) -> Calibration:
    """Choose each relation's template and the confidence floors on `model` (module docstring)."""
    negs = list(negatives) if negatives is not None else made_up_names()
    cal = Calibration(negatives=len(negs))
    per_rel: dict[str, tuple[list[str], list[list[str]]]] = {}
    subjects_all: dict[str, None] = {}
    for rel, body in triples.items():
        objs: dict[str, list[str]] = {}
        for s, o in body["pairs"]:
            objs.setdefault(s, []).append(o)
        for s in objs:
            subjects_all.setdefault(s, None)
        subs = sorted(objs)
        if len(subs) > max_subjects:
            subs = sorted(random.Random(0).sample(subs, max_subjects))
        per_rel[rel] = (subs, [objs[s] for s in subs])
    cal.subjects = list(subjects_all)
    cal.answer_tokens = answer_lengths(tok, triples)
    cal.objects = objects_by_frequency(triples)
    pos_probs: dict[str, list[tuple[str, float]]] = {}
    neg_probs: dict[str, list[float]] = {}
    cands_of: dict[str, list[str]] = {}
    sampled: dict[str, list[tuple[str, int, float, bool]]] = {}  # relation → (subject, top id, prob, right)
    for rel, (subs, _objs) in per_rel.items():
        examples = []
        for s, o in triples[rel]["pairs"]:
            if s not in subs and all(s != e for e, _ in examples):
                examples.append((s, o))
            if len(examples) == 2:
                break
        cands: list[str] = []
        for t in templates.get(rel, []):
            cands.append(t)
            if len(examples) == 2:
                cands.append(two_shot(t, examples))
        cands_of[rel] = cands
    if progress is not None:
        progress(0, 3, "templates: " + ", ".join(per_rel))
    # every candidate of every relation in the same passes (each row forks its template's head)
    rows = [(head_of(t), _encode(tok, t.replace("{X}", s)))
            for rel, (subs, _o) in per_rel.items() for t in cands_of[rel] for s in subs]
    top, prob = _top1(model, tok, rows)
    at = 0
    for rel, (subs, objs) in per_rel.items():
        best = None
        accs = {}
        for t in cands_of[rel]:
            ids, probs = top[at:at + len(subs)], prob[at:at + len(subs)]
            at += len(subs)
            right = [first_token_right(tok, i, o) for i, o in zip(ids, objs)]
            acc = sum(right) / max(1, len(right))
            accs[t] = round(acc, 4)
            key = (acc, -len(t))
            if best is None or key > best[0]:
                best = (key, t, [(s, p) for s, p, ok in zip(subs, probs, right) if ok],
                        [(s, o) for s, o, ok in zip(subs, objs, right) if ok],
                        list(zip(subs, ids, probs, right)))
        cal.accuracy[rel] = accs
        if best is None or best[0][0] < MIN_ACCURACY:
            continue
        cal.templates[rel] = best[1]
        pos_probs[rel] = best[2]
        cal.right[rel] = best[3]
        sampled[rel] = best[4]
    if progress is not None:
        progress(1, 3, f"made-up names ({len(negs)} per relation)")
    chosen_t = list(cal.templates.items())
    _ids, nprob = _top1(model, tok, [(head_of(t), _encode(tok, t.replace("{X}", s))) for _r, t in chosen_t for s in negs])
    for k, (rel, _t) in enumerate(chosen_t):
        neg_probs[rel] = nprob[k * len(negs):(k + 1) * len(negs)]
    if progress is not None:
        progress(2, 3, "familiarity")
    pos_names = sorted({s for v in sampled.values() for s, _i, _p, _ok in v})
    fam = dict(zip(pos_names, familiarity(model, tok, pos_names)))
    neg_fam = familiarity(model, tok, negs)
    tf, chosen = choose_floors(pos_probs, fam, neg_probs, neg_fam)
    cal.min_familiarity = tf
    for rel, (t, floor, rec) in chosen.items():
        cal.min_prob[rel], cal.recall[rel] = floor, rec
        if t > tf:
            cal.min_familiarity_rel[rel] = t
    for rel, rows in sampled.items():
        conf = [ok for s, _i, p, ok in rows if cal.confident(rel, p, fam[s])]
        cal.precision[rel] = sum(conf) / len(conf) if conf else None
    if chosen:
        cal.negatives_passing = sum(1 for rel in pos_probs for p, f in zip(neg_probs[rel], neg_fam)
                                    if cal.confident(rel, p, f))
    return cal


__all__ = ["Calibration", "calibrate", "made_up_names", "familiarity", "two_shot", "first_token_right"]
