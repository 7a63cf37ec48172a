"""Everything modelql adds to LARQL's protocols, in one list.

LARQL is the reference for LQL, the HTTP knowledge API, the `.vlp` patch format and the vindex
files: where it defines a behaviour, modelql behaves the same by default. What it does not define
is an *extension*: opt-in (a field, parameter, statement or clause a LARQL client never sends), and
listed here. `docs/api.md` and `docs/lql.md` render this list; `HELP EXTENSIONS` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Extension:
    area: str     # "LQL" | "HTTP" | "patch" | "vindex"
    name: str     # what a user writes or sends
    what: str     # what it does, and what a LARQL peer does with it


EXTENSIONS: tuple[Extension, ...] = (
    # -- LQL (the parser accepts these exactly as LARQL's does; what they do is modelql's) --
    Extension("LQL", "HELP [statement]", "prints this reference (a modelql meta-statement, handled before "
              "parsing: LARQL has no HELP)"),
    Extension("LQL", "INSERT ... VALUES (...), (...)", "several facts in one statement, solved together as one "
              "batch (LARQL inserts one row)"),
    Extension("LQL", "INSERT ... MODE MEMIT", "a weight-level edit of the down projection (LARQL: KNN or COMPOSE)"),
    Extension("LQL", "SAVE PATCH \"path\"", "save the recording to a path given at save time (without one: the "
              "BEGIN PATCH path, as LARQL)"),
    Extension("LQL", "EXTRACT ... WITH ATTENTION", "extract the attention weights too (level attention)"),
    Extension("LQL", "EXPLAIN INFER ... WITH ATTENTION", "adds each layer's attended token and logit-lens top"),
    Extension("LQL", "SELECT col, ... FROM EDGES / WHERE target = ...", "the column list picks the output "
              "columns; `target` names the token column as in INSERT INTO EDGES"),
    Extension("LQL", "USE REMOTE with DELETE / UPDATE", "matched on the server (POST /v1/edges/match), applied "
              "as an inline patch"),
    # -- HTTP (LARQL clients never send these; LARQL servers ignore them) --
    Extension("HTTP", "POST /v1/insert {\"facts\": [...]}", "several facts as one batch, by default one MEMIT "
              "solve (LARQL: one fact)"),
    Extension("HTTP", "POST /v1/insert {\"mode\": \"memit\"}", "the weight-level edit; LARQL's modes are knn "
              "(the default) and compose"),
    Extension("HTTP", "POST /v1/insert → knn_total", "the overlay's KNN facts after the insert"),
    Extension("HTTP", "GET /v1/describe?min_score=adaptive", "modelql's scale-free per-layer threshold instead "
              "of LARQL's absolute 5.0 (which finds nothing on models with small embedding norms)"),
    Extension("HTTP", "GET /v1/describe?variant=lql&layer=n", "LQL DESCRIBE semantics (what USE REMOTE sends)"),
    Extension("HTTP", "GET /v1/describe → mode, unit, threshold, found, max_gate, signal, bands, total, known, "
                      "note, suggestion",
              "extra fields of the describe body (known / note / suggestion: the calibrated verdict on the entity)"),
    Extension("HTTP", "GET /v1/describe?variant=lql → edges' decoded, confidence, confident, patch",
              "calibrated claims and overlay facts per edge (the server variant keeps LARQL's edge fields)"),
    Extension("HTTP", "POST /v1/select {\"features\": [ids]} → top_tokens", "filter by feature id; each edge's "
              "top tokens"),
    Extension("HTTP", "POST /v1/edges/match", "what a DELETE / UPDATE WHERE selects in the session's overlay"),
    Extension("HTTP", "POST /v1/warmup {\"editing\": true} → edit_statistics", "also computes the MEMIT "
              "statistics ahead of the first weight-level insert"),
    Extension("HTTP", "POST /v1/patches/apply {\"url\": NAME}", "NAME is a .vlp file inside the server's "
              "--patch-dir (LARQL reads any path or URL)"),
    Extension("HTTP", "GET /v1/stream (WebSocket) generate", "token streaming with cancel, next to LARQL's "
              "describe and infer messages"),
    Extension("HTTP", "X-Session-Id on walk-ffn / infer", "a session's own overlay for every route"),
    Extension("HTTP", "/v1/{model_id}/... (multi-model mode)", "knowledge routes of several served models"),
    # -- .vlp patches --
    Extension("patch", "op \"down_delta\"", "a MEMIT weight edit: a low-rank update of a layer's down "
              "projection (`u_b64`, `v_b64`), or new gated FFN neurons (`u_b64` their down columns, `gate_b64`, "
              "`up_b64` their gate and up rows `[rank, H]`, `method` \"memit-neurons\"; COMPILE grows the FFN by "
              "their number). Not one of LARQL's ops, so only modelql applies a patch holding one"),
    # -- vindex files --
    Extension("vindex", "checksums of every file", "index.json lists a SHA-256 for every file, not only "
              "LARQL's ten (LARQL reads the ones it knows)"),
    Extension("vindex", "*.safetensors, model.safetensors.index.json, knn_store.bin",
              "inference-level weights in the HF layout; the KNN store of compiled KNN facts"),
)


def by_area(area: str) -> tuple[Extension, ...]:
    return tuple(e for e in EXTENSIONS if e.area == area)


def markdown_table(area: str | None = None) -> str:
    rows = EXTENSIONS if area is None else by_area(area)
    out = ["| area | extension | what it does |", "|---|---|---|"]
    out += [f"| {e.area} | `{e.name}` | {e.what} |" for e in rows]
    return "\n".join(out)
