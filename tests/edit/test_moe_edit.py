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
from tests.edit.moe_model import CAPITALS, make_trained_mixtral


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
