"""A mixture-of-experts vindex, end to end through LQL on a tiny *trained* Mixtral-style model:
EXTRACT → DESCRIBE → INSERT → COMPILE INTO MODEL, the edit present in transformers afterwards.

The model learns five capitals at test time (`tests.edit.moe_model`); the reference is
transformers itself, loading the source and the compiled checkpoints."""

from __future__ import annotations

import pytest
import torch

from modelql.lql import render
from modelql.lql.executor import Executor
from modelql.lql.session import Session
from tests.edit.moe_model import CAPITALS, TEMPLATES, make_trained_mixtral


def run(session: Session, text: str) -> list[str]:
    return [line for r in Executor(session).run(text) for line in render.lines(r)]


def predictions(directory) -> dict[str, str]:
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(str(directory))
    out = {}
    for country in CAPITALS:
        ids = tok(f"The capital of {country} is", return_tensors="pt").input_ids
        with torch.no_grad():
            out[country] = tok.decode([int(hf(ids).logits[0, -1].argmax())]).strip()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe") / "mixtral"
    make_trained_mixtral(d)
    return d


@pytest.fixture(scope="module")
def vindex_path(trained, tmp_path_factory):
    from modelql.vindex import extract

    out = tmp_path_factory.mktemp("moe-vindex") / "v.vindex"
    extract(trained, out, level="inference", dtype="f32", clusters=False)
    return out


def test_moe_vindex_layout_follows_larql(trained, vindex_path):
    """gate_vectors.bin holds every expert's gate rows in expert order (LARQL's MoE layout), the
    router is recorded, and a feature is addressed by (layer, expert, feature)."""
    from safetensors.torch import load_file

    from modelql.vindex import Vindex

    vx = Vindex.load(vindex_path)
    w = load_file(str(trained / "model.safetensors"))
    info = vx.layer_info(1)
    assert (info.num_experts, info.num_features_per_expert, info.num_features) == (8, 64, 512)
    assert vx.index.model_config["moe"]["num_experts"] == 8 and vx.index.model_config["moe"]["top_k"] == 2
    for e in (0, 5):
        rows = vx.expert_range(1, e)
        assert torch.equal(vx.gate(1)[rows.start:rows.stop], w[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"])
    assert vx.expert_of(1, 5 * 64 + 3) == (5, 3)
    assert torch.equal(vx.router(1), w["model.layers.1.block_sparse_moe.gate.weight"])
    assert vx.verify().ok


def test_extract_describe_insert_compile_into_model(trained, tmp_path):
    before = predictions(trained)
    assert before == CAPITALS  # the training took: the model knows its five capitals
    s = Session(default_vindex=False, cwd=tmp_path)
    run(s, f'EXTRACT MODEL "{trained}" INTO "m.vindex" WITH INFERENCE')
    run(s, 'USE "m.vindex"')
    described = run(s, 'DESCRIBE "France"')
    assert described and not any(line.startswith("Error") for line in described)
    run(s, 'INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Tokyo") MODE COMPOSE')
    # the overlay already answers with the edit, through the MoE model
    assert any("Tokyo" in line for line in run(s, 'INFER "The capital of France is" TOP 1'))
    run(s, 'COMPILE CURRENT INTO MODEL "edited"')
    after = predictions(tmp_path / "edited")
    assert after["France"] == "Tokyo"
    assert {c: after[c] for c in CAPITALS if c != "France"} == {c: v for c, v in CAPITALS.items() if c != "France"}


def test_select_where_expert_and_expert_routes_over_http(vindex_path, tmp_path):
    """`WHERE expert = n` keeps exactly expert n's features (brute force over down_meta), in LQL and
    in POST /v1/select; rows carry their expert."""
    import httpx
    import numpy as np

    from modelql.runtime import load_model
    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_base import VindexSource
    from modelql.server.serve import background
    from modelql.vindex import Vindex

    vx = Vindex.load(vindex_path)
    _, _, present = vx.meta_arrays(1)
    rng = vx.expert_range(1, 3)
    want = sorted(f for f in rng if f < len(present) and np.asarray(present, dtype=bool)[f])
    s = Session(default_vindex=False, cwd=tmp_path)
    run(s, f'USE "{vindex_path}"')
    lines = run(s, "SELECT layer, expert, feature FROM FEATURES WHERE layer = 1 AND expert = 3 LIMIT 1000")
    rows = [line.split() for line in lines if line.strip().startswith("L1")]
    assert sorted(int(r[2].lstrip("F")) for r in rows) == want and {r[1] for r in rows} == {"3"}
    with background(None, ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0),
                    model=load_model(vindex_path), vindex_source=VindexSource.open_path(vindex_path)) as srv:
        body = httpx.post(f"{srv.url}/v1/select", json={"layer": 1, "expert": 3, "limit": 1000}, timeout=60).json()
        assert sorted(e["feature"] for e in body["edges"]) == want and {e["expert"] for e in body["edges"]} == {3}
        check_expert_routes(srv.url, vindex_path)


def check_expert_routes(url: str, vindex_path) -> None:
    """LARQL's /v1/expert/{layer}/{id} and /v1/expert/batch: one expert's SwiGLU output, computed
    here from the checkpoint's own w1/w3/w2 tensors; bad layer/expert/width are 400s."""
    import httpx
    from safetensors.torch import load_file

    w = load_file(str(vindex_path / "model.safetensors")) if (vindex_path / "model.safetensors").exists() else {}
    if not w:
        import json

        index = json.loads((vindex_path / "model.safetensors.index.json").read_text())
        for name in set(index["weight_map"].values()):
            w.update(load_file(str(vindex_path / name)))
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    p = "model.layers.1.block_sparse_moe.experts.3."
    ref = w[p + "w2.weight"] @ (torch.nn.functional.silu(w[p + "w1.weight"] @ x) * (w[p + "w3.weight"] @ x))
    one = httpx.post(f"{url}/v1/expert/1/3", json={"residual": x.tolist()}, timeout=60).json()
    assert (torch.tensor(one["output"]) - ref).abs().max().item() < 1e-5 and one["latency_ms"] >= 0
    batch = httpx.post(f"{url}/v1/expert/batch", json={"requests": [
        {"layer": 1, "expert_id": 3, "residual": x.tolist()}, {"layer": 0, "expert_id": 0, "residual": x.tolist()}]},
        timeout=60).json()
    assert [(r["layer"], r["expert_id"]) for r in batch["results"]] == [(1, 3), (0, 0)]
    assert batch["results"][0]["output"] == one["output"]
    for path, body in (("/v1/expert/1/8", {"residual": x.tolist()}), ("/v1/expert/2/0", {"residual": x.tolist()}),
                       ("/v1/expert/1/0", {"residual": [0.0] * 3}), ("/v1/expert/1/0", {"x": 1})):
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 400 and "message" in r.json()["error"], (path, r.status_code)


def test_overlay_and_compiled_experts_compute_the_same(trained, vindex_path, tmp_path):
    """The patched MoE FFN (edited copies of the touched experts) and the compiled checkpoint
    agree to float32 rounding: both apply the compiler's algebra to the same features."""
    from modelql.knowledge import edit
    from modelql.runtime import load_model
    from modelql.vindex import Vindex
    from modelql.vindex.compile import compile_model
    from modelql.vindex.overlay import PatchSession

    ps = PatchSession(Vindex.load(vindex_path))
    r = edit.insert(ps, "Spain", "capital", "Rome", mode="compose")
    expert, _ = ps.base.expert_of(r.layer, r.feature)
    assert expert is not None
    edit.delete(ps, [("layer", "=", 1), ("feature", "=", 7)])  # a tombstone in expert 0
    compile_model(ps, tmp_path / "out", dtype="float32", materialise_knn=False)
    compiled = load_model(tmp_path / "out")
    for prompt in ("The capital of Spain is", "Germany has its capital in"):
        ids = compiled.tokenizer.encode(prompt)
        a = compiled.forward([ids], logits="last")[0]
        b = ps.model().forward([ids], logits="last")[0]
        assert (a - b).abs().max().item() < 1e-4


def _hf(trained):
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32).eval()
    return hf, T.AutoTokenizer.from_pretrained(str(trained))


def test_trace_reads_the_experts_output(trained, vindex_path):
    """TRACE on the MoE model: each layer's FFN and attention logit-lens values are transformers' own
    MoE-block and attention outputs read through its final norm and lm_head, and the final row is its
    prediction (Paris, rank 1)."""
    from modelql.knowledge.trace import trace
    from modelql.runtime import load_model

    hf, tok = _hf(trained)
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    paris = tok.convert_tokens_to_ids("Paris")
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(f"mlp{i}", o)))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(f"attn{i}", o[0])))
    with torch.no_grad():
        probs = torch.softmax(hf(ids).logits[0, -1].double(), -1)
        lens = lambda v: hf.lm_head(hf.model.norm(v[0, -1]))[paris].item()  # noqa: E731
        want = [(lens(outs[f"attn{i}"]), lens(outs[f"mlp{i}"])) for i in range(len(hf.model.layers))]
    for h in handles:
        h.remove()
    t = trace(load_model(vindex_path), prompt, for_token="Paris")
    rows = [r for r in t.rows if r.layer >= 0]
    assert [r.layer for r in rows] == [0, 1]
    for r, (attn, ffn) in zip(rows, want):
        assert r.attn_logit == pytest.approx(attn, abs=1e-3) and r.ffn_logit == pytest.approx(ffn, abs=1e-3)
    assert rows[-1].answer_rank == 1 and rows[-1].answer_prob == pytest.approx(float(probs[paris]), abs=1e-5)


def test_walk_is_the_brute_force_top_k_over_every_experts_gate_rows(trained, vindex_path):
    """WALK's features and scores are the top |w1_e · E[last token]| over all experts' gate rows of the
    checkpoint (feature e·F + j = expert e's row j), per layer."""
    from safetensors.torch import load_file

    from modelql.knowledge.browse import walk
    from modelql.vindex import Vindex

    vx = Vindex.load(vindex_path)
    w = load_file(str(trained / "model.safetensors"))
    hf, tok = _hf(trained)
    r = walk(vx, "The capital of France is", top=6)
    q = w["model.embed_tokens.weight"][tok("The capital of France is").input_ids[-1]].double()
    for layer in (0, 1):
        gates = torch.cat([w[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"] for e in range(8)]).double()
        scores = gates @ q
        order = [int(f) for f in scores.abs().argsort(descending=True) if vx.feature_meta(layer, int(f))][:6]
        got = [row for row in r.rows if row.layer == layer]
        assert [row.feature for row in got] == order
        assert [row.gate_score for row in got] == pytest.approx([float(scores[f]) for f in order], abs=1e-4)


def test_describe_feature_edges_come_from_the_routed_experts(trained, vindex_path):
    """DESCRIBE on the MoE vindex finds feature edges (it found none while the experts' activations
    reached it flattened), and each edge's feature belongs to an expert transformers' router chose
    for the entity in one of DESCRIBE's contexts ("{X}", "about {X}")."""
    from modelql.knowledge.describe import describe
    from modelql.knowledge.queries import DEFAULT_CONTEXTS
    from modelql.vindex import Vindex

    vx = Vindex.load(vindex_path)
    hf, tok = _hf(trained)
    for country in ("France", "Japan"):
        chosen: dict[int, set[int]] = {0: set(), 1: set()}
        for ctx in DEFAULT_CONTEXTS:
            ids = tok(ctx.replace("{X}", country), return_tensors="pt").input_ids
            seen = {}
            hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[2]))
                     for i, layer in enumerate(hf.model.layers)]
            with torch.no_grad():
                hf(ids)
            for h in hooks:
                h.remove()
            for i, index in seen.items():
                chosen[i] |= set(index[-1].tolist())
        edges = describe(vx, country).edges
        assert edges, country
        for e in edges:
            assert vx.expert_of(e.layer, e.feature)[0] in chosen[e.layer], (country, e.layer, e.feature, chosen)


def test_infer_trace_lists_only_features_of_the_routed_experts(trained, vindex_path):
    """INFER's "features that fired" on an MoE layer come from the experts transformers' router chose
    at the last position (the other experts did not run), ranked by |gate · x| among them; and the
    routing hooks see [B, T, k] like every other hook."""
    from modelql.knowledge.infer import infer
    from modelql.runtime import interp, load_model
    from modelql.vindex import Vindex

    vx, model = Vindex.load(vindex_path), load_model(vindex_path)
    hf, tok = _hf(trained)
    prompt = "The capital of Japan is"
    seen = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[2][-1].tolist()))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(tok(prompt, return_tensors="pt").input_ids)
    for h in hooks:
        h.remove()
    r = infer(model, prompt, vindex=vx, per_layer=4)
    _, cache = interp.run_with_cache(model, prompt, ["blocks.0.mlp.hook_expert_ids", "blocks.1.ln2.hook_normalized"])
    assert cache["blocks.0.mlp.hook_expert_ids"][-1].tolist() == seen[0]
    x = cache["blocks.1.ln2.hook_normalized"][-1]
    gates = torch.cat([vx.gate(1)[vx.expert_range(1, e).start:vx.expert_range(1, e).stop] for e in sorted(seen[1])])
    feats = [f for e in sorted(seen[1]) for f in vx.expert_range(1, e)]
    scores = gates @ x
    want = [feats[i] for i in scores.abs().argsort(descending=True).tolist() if vx.feature_meta(1, feats[i])][:4]
    assert [f.feature for f in r.trace if f.layer == 1] == want
    for f in r.trace:
        assert vx.expert_of(f.layer, f.feature)[0] in seen[f.layer]


def test_explain_contributions_split_the_experts_logit_exactly(vindex_path):
    """Direct logit attribution over an MoE layer's features (every expert's down columns, routed
    activations): summed over all features it equals the MoE blocks' direct contribution to the
    answer's logit (hook_mlp_out · v), as for a dense model."""
    from modelql.knowledge.decode import attribute as dla
    from modelql.knowledge.decode import token_direction
    from modelql.runtime import interp, load_model

    model = load_model(vindex_path)
    ids = model.tokenizer.encode("The capital of Italy is")
    rome = model.tokenizer.encode("Rome", add_special_tokens=False)[0]
    names = [f"blocks.{i}.mlp.hook_post" for i in range(2)] + [f"blocks.{i}.hook_mlp_out" for i in range(2)] + \
        ["blocks.1.hook_resid_post"]
    _, cache = interp.run_with_cache(model, torch.tensor([ids]), names)
    final = cache["blocks.1.hook_resid_post"][-1]
    c = dla(model, {i: cache[f"blocks.{i}.mlp.hook_post"][-1][None] for i in range(2)}, final[None], rome)
    v = token_direction(model, final, rome)
    ffn = sum(float(cache[f"blocks.{i}.hook_mlp_out"][-1].float() @ v) for i in range(2))
    assert set(c) == {0, 1} and sum(float(x.sum()) for x in c.values()) == pytest.approx(ffn, rel=1e-3, abs=1e-3)


def test_describe_of_a_labelled_moe_vindex_claims_the_capitals(vindex_path, tmp_path):
    """Probe-labelled with the five capitals it was trained on, DESCRIBE of each country on the MoE
    vindex claims its capital (decoded from the residual, attributed to expert features)."""
    import shutil

    from modelql.knowledge.describe import describe
    from modelql.knowledge.labels import label_vindex
    from modelql.vindex import Vindex
    from tests.edit.moe_model import TEMPLATES

    lab = tmp_path / "lab.vindex"
    shutil.copytree(vindex_path, lab)
    label_vindex(lab, {"capital": {"pairs": [[c, p] for c, p in CAPITALS.items()]}}, {"capital": list(TEMPLATES)},
                 clusters=False, causal_check=False)
    vx = Vindex.load(lab)
    for country, city in CAPITALS.items():
        claims = [e for e in describe(vx, country).edges if e.relation == "capital"]
        assert claims and claims[0].target.split()[0] == city, (country, claims)
        assert vx.expert_of(claims[0].layer, claims[0].feature)[0] is not None


def test_memit_insert_adds_a_neuron_transformers_states_it_and_delete_restores(trained, tmp_path):
    """MODE MEMIT on a mixture of experts: the tiny model recalls at the prompt's last token (the
    causal trace's key), where a down_proj update, acting only through the routed experts, broke
    the other capitals; the edit is a new neuron in every routed expert instead. It states the
    fact in the trained phrasings, leaves the other four capitals, shows in DESCRIBE, compiles
    into a checkpoint transformers answers alike, and DELETE restores the logits exactly."""
    s = Session(default_vindex=False, cwd=tmp_path)
    run(s, f'EXTRACT MODEL "{trained}" INTO "m.vindex" WITH INFERENCE')
    run(s, 'USE "m.vindex"')
    prompts = [t.replace("{X}", c) for c in CAPITALS for t in TEMPLATES]

    def logits():
        m = s.model("INFER")
        return {p: m.forward(m.tokenizer.encode(p), logits="last")[0] for p in prompts}

    def answers(lg):
        return {p: s.model("INFER").tokenizer.decode([int(v.argmax())]).strip() for p, v in lg.items()}

    before = logits()
    out = run(s, 'INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Tokyo") MODE MEMIT')
    assert any("new FFN neuron" in line for line in out), out
    after = answers(logits())
    for p, a in after.items():
        assert a == ("Tokyo" if "France" in p else answers({p: before[p]})[p]), p
    assert any("Tokyo" in line for line in run(s, 'DESCRIBE "France"'))
    run(s, 'COMPILE CURRENT INTO MODEL "edited"')
    assert predictions(tmp_path / "edited") == {**CAPITALS, "France": "Tokyo"}
    run(s, 'DELETE FROM EDGES WHERE entity = "France" AND relation = "capital"')
    assert all(torch.equal(v, before[p]) for p, v in logits().items())
