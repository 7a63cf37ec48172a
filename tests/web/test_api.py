"""The web UI's routes against independent references: `knowledge.*` called directly, brute-force
torch, the LQL executor run locally; auth, the patch directory's confinement, no external URL."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from .conftest import KEY, PATCH

PROMPT = "The capital of France is"
#: the only absolute URL allowed in a served asset: the SVG namespace name (never fetched)
NAMESPACES = {"http://www.w3.org/2000/svg"}


@pytest.fixture(scope="module")
def client(web_srv):
    with httpx.Client(base_url=web_srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def test_page_is_public_and_the_api_needs_the_key(web_srv):
    page = httpx.get(web_srv.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css", "charts.js"):
        assert httpx.get(f"{web_srv.url}/ui/{name}").status_code == 200
    assert httpx.get(web_srv.url + "/ui/other.js").status_code == 401  # only the shipped files are public
    assert httpx.get(web_srv.url + "/ui/other.js", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    for path in ("/v1/describe/rows?entity=France", "/v1/patch-files", "/v1/entities/complete?prefix=Fr"):
        r = httpx.get(web_srv.url + path)
        assert r.status_code == 401 and "error" in r.json()


def test_no_external_url_in_any_served_asset(web_srv):
    from modelql.server.web import served_assets

    assets = served_assets()
    page = httpx.get(web_srv.url + "/").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and set(refs) <= set(assets), refs  # the page loads only shipped assets
    for path in assets:
        body = httpx.get(web_srv.url + path).text
        assert body == assets[path].decode()
        urls = set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'`)<>]*", body, re.I))
        assert urls <= NAMESPACES, (path, urls)
        assert not re.search(r"""(?:src|href|url)\s*[=(]\s*["']?//""", body, re.I), path  # protocol-relative
        assert "@import" not in body


def test_trace_route_is_knowledge_trace(client, kmodel):
    from modelql.knowledge.trace import trace

    got = client.post("/v1/trace", json={"prompt": PROMPT, "answer": "Paris"}).json()
    ref = trace(kmodel, PROMPT, for_token="Paris", positions="all")
    assert got["tokens"] == ref.tokens and got["answer_id"] == ref.answer_id
    assert len(got["rows"]) == len(ref.rows) == (kmodel.spec.num_layers + 1) * len(ref.tokens)
    for g, r in zip(got["rows"], ref.rows):
        assert (g["layer"], g["position"], g["answer_rank"]) == (r.layer, r.position, r.answer_rank)
        assert g["answer_prob"] == pytest.approx(r.answer_prob, abs=1e-5)
    # without an answer: the model's own top-1 at the last position (independent forward pass)
    auto = client.post("/v1/trace", json={"prompt": PROMPT}).json()
    ids = kmodel.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        top = int(kmodel.forward(torch.tensor([ids]))[0, -1].argmax())
    assert auto["answer_id"] == top
    last = [r for r in auto["rows"] if r["position"] == len(ids) - 1 and r["layer"] == kmodel.spec.num_layers - 1]
    assert last[0]["answer_rank"] == 1


@pytest.mark.parametrize("body, status", [
    ({"prompt": ""}, 400), ({"prompt": PROMPT, "answer": " "}, 400), ({"prompt": "x " * 200}, 400), ({}, 400)])
def test_trace_bad_input(client, body, status):
    r = client.post("/v1/trace", json=body)
    assert r.status_code == status and "error" in r.json()


def test_explain_a_token_by_offset(client, kmodel, kvindex):
    from modelql.knowledge.explain import VindexFeatures, attribute
    from modelql.knowledge.trace import trace

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    completion = "The capital of France is Paris."
    got = client.post("/v1/explain", json={"messages": messages, "completion": completion,
                                           "offset": completion.index("Paris") + 2, "top": 5}).json()
    j = got["index"]
    assert got["tokens"][j]["token"] == " Paris"
    prompt_ids = kmodel.tokenizer.encode_chat(messages, add_generation_prompt=True)
    comp_ids = kmodel.tokenizer.encode(completion, add_special_tokens=False)
    ref = attribute(kmodel, prompt_ids, comp_ids, VindexFeatures(kvindex), top=5)
    assert [(f["layer"], f["feature"]) for f in got["tokens"][j]["features"]] == \
        [(f.layer, f.feature) for f in ref[j].features]
    tr = trace(kmodel, prompt_ids + comp_ids[:j], answer_id=comp_ids[j], positions="last")
    assert [r["rank"] for r in got["layers"]] == [r.answer_rank for r in tr.rows]
    assert [r["attn_logit"] for r in got["layers"]] == pytest.approx([r.attn_logit for r in tr.rows], abs=1e-4)
    r = client.post("/v1/explain", json={"prompt": PROMPT, "completion": " Paris", "offset": 99})
    assert r.status_code == 400
    r = client.post("/v1/explain", json={"completion": " Paris"})
    assert r.status_code == 400


def test_describe_rows_show_paris_under_capital(client):
    got = client.get("/v1/describe/rows", params={"entity": "France"}).json()
    capital = [e for e in got["edges"] if e["relation"] == "capital"]
    assert capital and capital[0]["target"] == "Paris" and isinstance(capital[0]["feature"], int)
    assert {e["band"] for e in got["edges"]} <= {"syntax", "knowledge", "output"}


def test_feature_page_against_brute_force(client, kvindex, kmodel):
    from modelql.runtime import interp

    edge = next(e for e in client.get("/v1/describe/rows", params={"entity": "France"}).json()["edges"]
                if e["relation"] == "capital")
    layer, feat = edge["layer"], edge["feature"]
    prompts = [PROMPT, "The capital of Germany is", "Hello there"]
    got = client.get("/v1/feature", params={"layer": layer, "feature": feat, "prompt": prompts}).json()
    assert sum(b["count"] for b in got["gate_histogram"]) == kvindex.vocab_size
    g = kvindex.gate_row(layer, feat).double()
    scores = (kvindex.embeddings().double() @ g) * kvindex.embed_scale
    assert got["top_inputs"][0]["gate_score"] == pytest.approx(float(scores.max()), abs=1e-3)
    assert got["top_inputs"][0]["token"] == kvindex.token_text(int(scores.argmax()))
    meta = kvindex.feature_meta(layer, feat)
    assert [t["token"] for t in got["top_tokens"]] == [t for t, _i, _v in meta.top_k[:10]]
    name = f"blocks.{layer}.ln2.hook_normalized"
    want = {}
    for p in prompts:
        _, cache = interp.run_with_cache(kmodel, p, [name])
        want[p] = float(cache[name][-1].double() @ g)
    assert [p["prompt"] for p in got["prompts"]] == sorted(prompts, key=lambda p: -want[p])
    for p in got["prompts"]:
        assert p["gate_score"] == pytest.approx(want[p["prompt"]], abs=1e-3)
    assert client.get("/v1/feature", params={"layer": layer, "feature": 10**7}).status_code == 400
    assert client.get("/v1/feature", params={"layer": 999, "feature": 0}).status_code == 400


def test_lql_console_runs_what_local_lql_runs(client, kvindex):
    from modelql.lql import render
    from modelql.lql.executor import Executor
    from modelql.lql.parser import parse
    from modelql.lql.session import Session

    stmt = 'DESCRIBE "France";'
    got = client.post("/v1/lql", json={"statement": stmt}).json()["results"]
    s = Session(default_vindex=False, progress=False)
    s.use_vindex(kvindex.path, default=True)
    want = render.text(Executor(s).execute(parse(stmt)))
    strip = lambda t: re.sub(r"\d+(\.\d+)?\s?ms", "", t)  # noqa: E731 - timings differ
    assert strip(got[0]["output"]) == strip(want)
    assert "Paris" in got[0]["output"]


@pytest.mark.parametrize("stmt", [
    'USE "/tmp/x.vindex";', 'SAVE PATCH "/tmp/x.vlp";', 'BEGIN PATCH "x.vlp";',
    'INSERT INTO EDGES (entity, relation, target) VALUES ("a", "b", "c");', 'STATS "/etc";',
    f'TRACE "{PROMPT}" FOR "Paris" POSITIONS ALL SAVE "/tmp/web-x.png";', 'DESCRIBE "France" |> USE "/x";',
    'EXTRACT MODEL "x" INTO "y";', 'APPLY PATCH "x.vlp";'])
def test_lql_console_refuses_what_touches_files_or_edits(client, stmt):
    r = client.post("/v1/lql", json={"statement": stmt})
    assert r.status_code == 400 and "not available in the web console" in r.json()["error"]["message"]


def test_lql_syntax_error_has_a_position(client):
    r = client.post("/v1/lql", json={"statement": 'DESCRIBE "France" BOGUS;'})
    assert r.status_code == 400 and re.search(r"line 1|column|\^", r.json()["error"]["message"])


def test_lql_completion_is_the_repl_completer(client, kvindex):
    from prompt_toolkit.document import Document

    from modelql.lql.repl import LqlCompleter
    from modelql.lql.session import Session

    s = Session(default_vindex=False, progress=False)
    s.use_vindex(kvindex.path, default=True)
    comp = LqlCompleter(s)
    for text in ('DESCRIBE "Fra', "SEL", 'DESCRIBE "France" ', "SELECT * FROM "):
        want = [c.text for c in comp.get_completions(Document(text), None)][:50]
        got = [c["text"] for c in client.post("/v1/lql/complete", json={"text": text}).json()["completions"]]
        assert got == want and got, text
    ents = client.get("/v1/entities/complete", params={"prefix": "Fr"}).json()["entities"]
    assert "France" in ents and all(e.lower().startswith("fr") for e in ents)


@pytest.mark.parametrize("name, status", [
    ("../x.vlp", 400), ("/etc/passwd", 400), ("a/b.vlp", 404), (".hidden.vlp", 400), ("x.txt", 400),
    ("missing.vlp", 404), ("..\\x.vlp", 400), ("", 400)])
def test_patch_files_never_leave_the_directory(client, name, status):
    r = client.post("/v1/patch-files/apply", json={"name": name})
    assert r.status_code == status, r.text


def test_patch_symlink_out_of_the_directory_is_refused(client, patch_dir, tmp_path):
    outside = tmp_path / "outside.vlp"
    outside.write_bytes((patch_dir / PATCH).read_bytes())
    link = patch_dir / "link.vlp"
    link.symlink_to(outside)
    try:
        # not found, as for any name the directory does not hold (no probing beyond it)
        assert client.post("/v1/patch-files/apply", json={"name": "link.vlp"}).status_code == 404
        assert "link.vlp" not in [f["name"] for f in client.get("/v1/patch-files").json()["files"]]
    finally:
        link.unlink()


def test_patch_files_apply_and_remove(client):
    files = client.get("/v1/patch-files").json()["files"]
    assert [f["name"] for f in files] == [PATCH]
    r = client.post("/v1/patch-files/apply", json={"name": PATCH})
    assert r.status_code == 200 and r.json()["applied"] == PATCH and r.json()["operations"] == 1
    try:
        names = [p["name"] for p in client.get("/v1/patches").json()["patches"]]
        assert PATCH in names
        # the patch is live: INFER on the inserted fact answers from the KNN store
        inf = client.post("/v1/infer", json={"prompt": "The capital of Atlantis is", "top": 3}).json()
        assert inf.get("knn_override", {}).get("token") == "Zorbu"
        # ... and the LQL console sees what the server serves
        out = client.post("/v1/lql", json={"statement": 'INFER "The capital of Atlantis is" TOP 3;'}).json()
        assert "Zorbu" in out["results"][0]["output"], out
    finally:
        assert client.delete(f"/v1/patches/{PATCH}").status_code == 200
    assert PATCH not in [p["name"] for p in client.get("/v1/patches").json()["patches"]]
    out = client.post("/v1/lql", json={"statement": 'INFER "The capital of Atlantis is" TOP 3;'}).json()
    assert "Zorbu" not in out["results"][0]["output"]


def test_no_patch_directory_is_403(kmodel, kvindex):
    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import background

    with background(None, ServerConfig(port=0), model=kmodel, vindex_source=VindexSource.ready(kvindex)) as srv:
        r = httpx.get(srv.url + "/v1/patch-files")
        assert r.status_code == 403 and "--patch-dir" in r.json()["error"]["message"]


def test_feature_page_scores_the_entitys_probe_templates(client, kvindex):
    from modelql.knowledge.labels import probe_templates

    want = {ts[0].replace("{X}", "France") for ts in probe_templates(kvindex).values() if ts}
    assert want
    got = client.get("/v1/feature", params={"layer": 0, "feature": 0, "entity": "France"}).json()
    assert {p["prompt"] for p in got["prompts"]} == want
    assert [p["gate_score"] for p in got["prompts"]] == sorted((p["gate_score"] for p in got["prompts"]), reverse=True)


def test_explain_logit_writers_by_brute_force(client, kmodel):
    """The writers' contributions are activation × (down column · token direction): checked here by
    brute force for the top writer (its down column, the final norm frozen at the final residual)."""
    from modelql.knowledge.decode import token_direction
    from modelql.runtime import interp

    completion = "The capital of France is Paris."
    got = client.post("/v1/explain", json={"prompt": "Q: What is the capital of France?\nA:", "completion": completion,
                                           "offset": completion.index("Paris"), "top": 5}).json()
    w = got["writers"]
    assert len(w) == 5 and [x["contribution"] for x in w] == sorted((x["contribution"] for x in w), reverse=True)
    ids = kmodel.tokenizer.encode("Q: What is the capital of France?\nA:")
    comp = kmodel.tokenizer.encode(completion, add_special_tokens=False)
    j = got["index"]
    seq, tid = ids + comp[:j], comp[j]
    n = kmodel.spec.num_layers
    top = w[0]
    names = [f"blocks.{top['layer']}.mlp.hook_post", f"blocks.{n - 1}.hook_resid_post"]
    _, cache = interp.run_with_cache(kmodel, seq, names)
    a = float(cache[f"blocks.{top['layer']}.mlp.hook_post"][-1, top["feature"]])
    v = token_direction(kmodel, cache[f"blocks.{n - 1}.hook_resid_post"][-1].float(), tid)
    d = kmodel.weights[f"layers.{top['layer']}.down.weight"].float()[:, top["feature"]]
    assert top["activation"] == pytest.approx(a, abs=1e-3)
    assert top["contribution"] == pytest.approx(a * float(d @ v), rel=1e-3, abs=1e-4)
