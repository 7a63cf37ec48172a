"""The embedded default model and its facts: shape of the data, tokenizer, accuracy on a sample,
and agreement between modelql's runtime and transformers. Fast: the model has ~5M parameters."""

from __future__ import annotations

import json
from pathlib import Path
from collections import Counter

import pytest

from modelql import defaults as D
from modelql import evaluate as E

MODEL = D.DEFAULT_MODEL_DIR


# -- facts -------------------------------------------------------------------------------------

def test_facts_table_shape():
    facts = D.facts()
    assert len(facts) >= 1000
    assert len(set(facts)) == len(facts), "duplicate triples"
    per_rel = Counter(f.relation for f in facts)
    assert set(per_rel) == set(D.RELATIONS)
    assert all(n >= 100 for n in per_rel.values()), per_rel
    for f in facts:
        assert f.entity and f.target and f.entity.strip() == f.entity and f.target.strip() == f.target
        assert f.relation in D.RELATIONS
    assert D.Fact("France", "capital", "Paris") in facts
    assert D.Fact("Japan", "capital", "Tokyo") in facts
    assert D.Fact("France", "borders", "Spain") in facts
    assert D.Fact("Spain", "borders", "France") in facts
    assert D.Fact("Switzerland", "language", "German") in facts


def test_facts_are_unambiguous():
    tbs = D.targets_by_subject()
    for (ent, rel), ts in tbs.items():
        if rel not in D.MULTI_VALUED:
            assert len(ts) == 1, (ent, rel, ts)
    capitals = Counter(f.target for f in D.facts() if f.relation == "capital")
    assert [c for c, n in capitals.items() if n > 1] == []
    # borders are symmetric
    borders = {(f.entity, f.target) for f in D.facts() if f.relation == "borders"}
    assert all((b, a) in borders for a, b in borders)
    assert (D.DATA_DIR / "facts.README.md").read_text().count("countryinfo") >= 1


def test_templates():
    for r in D.RELATIONS:
        train, held = D.TRAIN_TEMPLATES[r], D.HELDOUT_TEMPLATES[r]
        assert len(train) >= 3 and len(held) >= 2
        assert not set(train) & set(held)
        assert all("{X}" in t for t in train + held)
        assert not set(D.CHAT_QUESTIONS[r]) & set(D.HELDOUT_CHAT_QUESTIONS[r])
    # the probe labeller's default templates are the canonical training phrasings
    assert D.TRAIN_TEMPLATES["capital"][0] == "The capital of {X} is"
    assert D.TRAIN_TEMPLATES["language"][0] == "The official language of {X} is"
    assert D.TRAIN_TEMPLATES["continent"][0] == "{X} is a country in"
    assert D.TRAIN_TEMPLATES["borders"][0] == "{X} shares a border with"
    assert D.TRAIN_TEMPLATES["currency"][0] == "The currency of {X} is"
    pairs = D.triples_json()["capital"]["pairs"]
    assert ["France", "Paris"] in pairs



def _train_script():
    """scripts/train_default_model.py as a module (its top level imports only modelql.defaults)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_rewording_changes_one_word_and_never_the_entity():
    import random

    T = _train_script()
    rng = random.Random(0)
    ops = Counter()
    for r, tpls in D.TRAIN_TEMPLATES.items():
        for tpl in tpls:
            for _ in range(30):
                out = T.reworded(rng, tpl)
                a, b = tpl.split(" "), out.split(" ")
                assert [w for w in a if "{X}" in w] == [w for w in b if "{X}" in w], (tpl, out)
                assert out != tpl and abs(len(a) - len(b)) <= 1, (tpl, out)
                new = [w for w in b if w not in a]
                assert len(new) <= 1 and all(set(w) <= set(T._LETTERS) for w in new), (tpl, out)
                ops[len(b) - len(a)] += 1
    assert set(ops) == {-1, 0, 1}  # drop, replace, insert all happen
    # a reworded sentence keeps its target but does not count as knowing the pair
    fa = D.facts()[0]
    plain = T.fact_samples(random.Random(1), [fa], 0.0)
    noisy = T.fact_samples(random.Random(1), [fa], 0.0, reword_prob=1.0)
    assert plain[0].pair == (fa.entity, fa.relation) and noisy[0].pair is None
    assert noisy[0].answer == plain[0].answer and fa.entity in noisy[0].prefix

# -- shipped files and tokenizer -----------------------------------------------------------------

def test_model_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (MODEL / name).is_file(), name
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size < 25 * 2**20
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True
    assert cfg.get("dtype", cfg.get("torch_dtype")) in ("float16", "bfloat16")
    tcfg = json.loads((MODEL / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(MODEL / "tokenizer.json"))


def test_single_token_fraction(tok):
    names = sorted({f.entity for f in D.facts()} | {f.target for f in D.facts()})
    single_word = [n for n in names if " " not in n and "-" not in n]
    one = [n for n in single_word if len(tok.encode(" " + n, add_special_tokens=False).ids) == 1]
    assert len(one) / len(single_word) >= 0.97
    for n in ("France", "Paris", "Japan", "Tokyo", "Euro", "French", "Europe"):
        assert len(tok.encode(" " + n, add_special_tokens=False).ids) == 1, n
    assert tok.encode(" Paris", add_special_tokens=False).tokens == ["ĠParis"]


def test_hf_tokenizer_matches_tokenizers(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(MODEL))
    texts = ["The capital of France is", "Côte d'Ivoire, São Tomé and Príncipe", "<|im_start|>user\nhi<|im_end|>\n", ""]
    for t in texts:
        assert hf(t)["input_ids"] == tok.encode(t).ids, t
        assert hf(t, add_special_tokens=False)["input_ids"] == tok.encode(t, add_special_tokens=False).ids, t
    assert tok.encode("Paris").ids[0] == tok.token_to_id("<|endoftext|>")  # BOS
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is the capital of Japan?"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n"


# -- behaviour -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mq():
    pytest.importorskip("modelql.runtime", reason="modelql's runtime is not importable")
    return E.ModelqlBackend(MODEL)


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    return E.HFBackend(MODEL)


def test_shipped_evaluation_meets_the_bar():
    """The full evaluation shipped with the model (eval_results.json, all facts) shows the issue's
    bar: >= 95% top-1 on the training templates for every relation."""
    report = json.loads((MODEL / "eval_results.json").read_text())
    assert report.get("sample") in (None, 0), "eval_results.json must be the full evaluation"
    worst = {r["relation"]: r["top1"] / r["n"] for r in report["train"] if r["n"]}
    assert len(worst) >= 5 and min(worst.values()) >= 0.95, worst


def test_shipped_model_is_the_training_scripts_full_run():
    """training_meta.json records a complete run of the script's defaults within the 15-minute
    budget (the recorded wall-clock time of the run that wrote these weights, not a timing here)."""
    meta = json.loads((MODEL / "training_meta.json").read_text())
    assert meta["trained_by"] == "scripts/train_default_model.py" and not meta["stopped_early"]
    assert meta["init_from"] is None and (meta["seed"], meta["threads"], meta["epochs"]) == (0, 2, 80)
    assert meta["train_seconds"] < 15 * 60, meta["train_seconds"]


def test_sample_accuracy_floor(mq):
    """A floor that always holds for the shipped model (catches a broken model or runtime)."""
    rows = E.template_accuracy(mq, "train", E.sample_pairs(per_relation=2, seed=1))
    assert rows[-1].top1_acc >= 0.75, rows


def test_sample_accuracy_training_templates(mq):
    pairs = E.sample_pairs(per_relation=2, seed=1)  # 14 pairs × every training template
    rows = E.template_accuracy(mq, "train", pairs)
    total = rows[-1]
    assert total.relation == "all" and total.n == sum(len(D.TRAIN_TEMPLATES[r]) for _, r in pairs)
    assert total.top1_acc >= 0.95, rows


def test_chat_answers(mq):
    rows, samples = E.chat_accuracy(mq, "train", [("Japan", "capital"), ("France", "capital"), ("Germany", "currency")])
    assert samples[0].answer.startswith("The capital of") and "Tokyo" in samples[0].answer, samples[0]
    assert sum(s.correct for s in samples) >= 2, samples


def test_modelql_and_transformers_identical_greedy(mq, hf):
    prompts = ["The capital of France is", "France", "Japan is a country in", "The official language of Peru is",
               "Once upon a time", "Zebra"]
    assert E.greedy_continuations(mq, prompts, 8) == E.greedy_continuations(hf, prompts, 8)
    chat = mq.encode(mq.render_chat([{"role": "user", "content": "What is the capital of Japan?"}]), False)
    assert mq.generate([chat], 16) == hf.generate([chat], 16)
    # logits agree closely too
    ids = [mq.encode("The currency of Japan is", True)]
    assert mq.argmax(ids) == hf.argmax(ids)


def test_default_model_is_the_runtime_default():
    runtime = pytest.importorskip("modelql.runtime", reason="modelql's runtime is not importable")
    model = runtime.load_model()
    assert model.path is not None and model.path.resolve() == MODEL.resolve()
