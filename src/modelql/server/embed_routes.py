"""POST /v1/embed, GET /v1/embed/{token_id}, POST /v1/logits (JSON or LARQL's binary wire), and the
token routes GET /v1/token/encode, /v1/token/decode."""

from __future__ import annotations

import math
import struct
import time

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from .body import OFFLOAD_BYTES, BodyError, JsonRoute, read_json
from .errors import HttpError
from .knowledge_base import (ERRORS, FFN_MEDIA, MAX_TOKEN_IDS, MAX_TOP, EMBED_CACHE, _ms, _model, _on_model, _r, _st,
                             _text)

router = APIRouter(tags=["knowledge"], route_class=JsonRoute)

# -- /v1/embed, /v1/embed/{token_id}, /v1/logits ---------------------------------------------------------

class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token_ids: list[int]


def _check_ids(ids: list[int], vocab: int) -> None:
    if not ids:
        raise HttpError(400, "token_ids must be non-empty")
    if len(ids) > MAX_TOKEN_IDS:
        raise HttpError(400, f"at most {MAX_TOKEN_IDS} token ids per request")
    for t in ids:
        if not 0 <= t < vocab:
            raise HttpError(400, f"token_id {t} out of range (vocab={vocab})")


def embed_rows(model, ids: list[int]):
    """`s·E[id]` rows [n, H] float32 — the scaled embeddings the forward pass starts from (the same
    `embed_tokens` that `/v1/embeddings` static pooling averages)."""
    import torch

    with torch.inference_mode():
        return model.embed_tokens(torch.tensor([ids]), [0])[0].float()


def _is_binary(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == FFN_MEDIA


async def _json_body(request: Request, cls):
    raw = await request.body()
    try:
        data = read_json(raw or b"null") if len(raw) < OFFLOAD_BYTES else await run_in_threadpool(read_json, raw)
    except BodyError as exc:
        raise HttpError(400, f"We could not parse the JSON body of your request: {exc.msg}") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the request body must be a JSON object (Content-Type: application/json)")
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "missing":
            raise HttpError(400, f"missing required parameter: '{loc}'") from None
        raise HttpError(400, f"invalid value for '{loc}': {err.get('msg', 'invalid value')}") from None


def _binary_schema(json_model) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_model.model_json_schema()},
        FFN_MEDIA: {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/v1/embed", responses=ERRORS, openapi_extra=_binary_schema(EmbedRequest))
async def embed(request: Request):
    t0 = time.perf_counter()
    model = _model(request, "/v1/embed", "embed")
    vocab = model.spec.vocab_size
    binary = _is_binary(request)
    if binary:
        raw = await request.body()
        if len(raw) < 4:
            raise HttpError(400, "binary: body too short (need ≥ 4 bytes)")
        (n,) = struct.unpack_from("<I", raw, 0)
        if len(raw) < 4 + 4 * n:
            raise HttpError(400, f"binary: truncated token list ({n} ids declared, {(len(raw) - 4) // 4} present)")
        ids = list(struct.unpack_from(f"<{n}I", raw, 4))
    else:
        ids = (await _json_body(request, EmbedRequest)).token_ids
    _check_ids(ids, vocab)
    rows = embed_rows(model, ids)
    H = int(rows.shape[1])
    if binary:
        payload = struct.pack("<II", len(ids), H) + rows.numpy().astype("<f4").tobytes()
        return Response(payload, media_type=FFN_MEDIA)
    return {"residual": rows.tolist(), "seq_len": len(ids), "hidden_size": H, "latency_ms": _ms(t0)}


@router.get("/v1/embed/{token_id}", responses={
    **ERRORS, 200: {"content": {"application/json": {}, FFN_MEDIA: {}}, "description": "H × f32 LE, or JSON"}})
async def embed_token(token_id: int, request: Request):
    model = _model(request, "/v1/embed/{token_id}", "embed")
    _check_ids([token_id], model.spec.vocab_size)
    row = embed_rows(model, [token_id])[0]
    headers = {"Cache-Control": EMBED_CACHE, "Vary": "Accept"}
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"token_id": token_id, "embedding": row.tolist(), "hidden_size": int(row.shape[0])},
                            headers=headers)
    return Response(row.numpy().astype("<f4").tobytes(), media_type=FFN_MEDIA, headers=headers)


class LogitsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    residual: list[float]
    top_k: int = Field(5, ge=1, le=MAX_TOP)
    temperature: float = Field(1.0, gt=0, le=1e6)


def logits_top(model, residual: list[float], top_k: int, temperature: float) -> list[tuple[int, float]]:
    """`softmax(unembed(r) / T)` top-k: final norm, lm_head, the family's scaling and soft-cap
    (the model's own `unembed`, as the forward pass applies it)."""
    import torch

    with torch.inference_mode():
        r = torch.tensor(residual, dtype=model.dtype)[None]
        logits = model.unembed(r)[0].double() / temperature
        probs = torch.softmax(logits, -1)
        vals, idx = torch.topk(probs, min(top_k, probs.shape[-1]))
    return [(int(i), float(v)) for v, i in zip(vals, idx)]


@router.post("/v1/logits", responses=ERRORS, openapi_extra=_binary_schema(LogitsRequest))
async def logits(request: Request):
    t0 = time.perf_counter()
    st = _st(request)
    model = _model(request, "/v1/logits", "embed")
    H = model.spec.hidden_size
    if _is_binary(request):
        raw = await request.body()
        if len(raw) % 4:
            raise HttpError(400, "binary: residual bytes are not a multiple of 4")
        residual = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        req = LogitsRequest(residual=[], top_k=5, temperature=1.0)
    else:
        req = await _json_body(request, LogitsRequest)
        residual = req.residual
    if len(residual) != H:
        raise HttpError(400, f"residual length {len(residual)} != hidden_size {H}")
    if not all(math.isfinite(x) for x in residual):
        raise HttpError(400, "residual must contain only finite numbers")
    top = await _on_model(st, lambda m: logits_top(m, residual, req.top_k, req.temperature)) \
        if st.engine is not None and st.engine.running else logits_top(model, residual, req.top_k, req.temperature)
    tok = model.tokenizer
    return {"top_k": [{"token_id": i, "token": tok.decode([i]), "prob": _r(p, 4)} for i, p in top],
            "latency_ms": _ms(t0)}


# -- /v1/token/encode, /v1/token/decode ----------------------------------------------------------------

@router.get("/v1/token/encode", responses=ERRORS)
async def token_encode(request: Request, text: str = Query(...)):
    model = _model(request, "/v1/token/encode", "embed")
    _text(text, "text")
    return {"token_ids": model.tokenizer.encode(text, add_special_tokens=False), "text": text}


@router.get("/v1/token/decode", responses=ERRORS)
async def token_decode(request: Request, ids: str = Query(..., description="comma-separated token ids")):
    model = _model(request, "/v1/token/decode", "embed")
    out: list[int] = []
    vocab = model.spec.vocab_size
    for part in ids.split(","):
        p = part.strip()
        if not p:
            continue
        try:
            t = int(p)
        except ValueError:
            raise HttpError(400, f"invalid token id: '{p}'") from None
        if not 0 <= t < vocab:
            raise HttpError(400, f"token_id {t} out of range (vocab={vocab})")
        out.append(t)
    return {"text": model.tokenizer.decode(out, skip_special_tokens=True), "token_ids": out}

