"""WebSocket `GET /v1/stream` (server-api.md §6): describe per layer, infer, generate with cancel.

Text frames carry JSON; binary frames are ignored. One reader task parses incoming frames into a
queue, so a `{"type":"cancel"}` arriving while tokens stream is seen within one decode step.
Generation goes through the engine like any chat request (greedy, stops at EOS); describe and
infer call the same `modelql.knowledge` functions as the HTTP routes and LQL.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ..errors import ModelqlError
from .engine import Failed, Finished, Token
from .body import BodyError, read_json
from .errors import modelql_error_parts

router = APIRouter(tags=["knowledge"])

SUPPORTED = "describe, infer, generate"
MAX_WS_TOKENS = 4096
DESCRIBE_K = 20


class _Closed(Exception):
    pass


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 1)


async def _reader(ws: WebSocket, inbox: asyncio.Queue) -> None:
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            text = msg.get("text")
            if text is None:
                continue  # binary frames are ignored
            try:
                data = read_json(text)
            except BodyError:
                data = {"type": "__invalid__"}
            if not isinstance(data, dict):
                data = {"type": "__invalid__"}
            await inbox.put(data)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await inbox.put(None)


async def _send(ws: WebSocket, obj: dict) -> None:
    await ws.send_text(json.dumps(obj, ensure_ascii=False))


async def _error(ws: WebSocket, message: str) -> None:
    await _send(ws, {"type": "error", "message": message})


def _unavailable(st, group: str, route: str) -> str | None:
    return st.config.unavailable_reason(route, group)


async def _describe(ws: WebSocket, msg: dict) -> None:
    from .. import knowledge
    from .knowledge_routes import _can_run_model, _source, run_describe

    st = ws.app.state.modelql
    reason = _unavailable(st, "browse", "WS describe")
    if reason:
        return await _error(ws, reason)
    entity = msg.get("entity")
    if not isinstance(entity, str) or not entity.strip():
        return await _error(ws, "missing entity")
    src = _source(ws)
    if src.vindex is None:
        return await _error(ws, src.loading or src.error or src.reason or "no vindex loaded")
    vx = src.view()
    band = msg.get("band", "all")
    band = band.lower() if isinstance(band, str) else "all"
    t0 = time.perf_counter()
    from ..knowledge.queries import entity_ids

    if not entity_ids(vx, entity):
        return await _send(ws, {"type": "done", "total_edges": 0, "latency_ms": 0})
    try:
        layers = knowledge.scan_layers(vx, None if band == "all" else band)
    except ModelqlError as exc:
        return await _error(ws, str(exc))
    mode = "auto" if _can_run_model(st) else "embedding"
    total = 0
    for layer in layers:
        res = await run_describe(st, vx, entity, layer=layer, k=DESCRIBE_K, token_filter="light", probe_only=True,
                                 mode=mode, knn_entries=src.knn())
        edges = []
        for e in res.to_json()["edges"]:
            row: dict[str, Any] = {"target": e["target"], "gate_score": round(e["gate"], 1), "feature": e["feature"]}
            if e["relation"]:
                row["relation"] = e["relation"]
                row["source"] = e["source"]
            edges.append(row)
        total += len(edges)
        await _send(ws, {"type": "layer", "layer": layer, "edges": edges})
    await _send(ws, {"type": "done", "entity": entity, "total_edges": total, "latency_ms": _ms(t0)})


async def _infer(ws: WebSocket, msg: dict) -> None:
    from ..knowledge.infer import infer

    st = ws.app.state.modelql
    reason = _unavailable(st, "generate", "WS infer")
    if reason:
        return await _error(ws, reason)
    if st.engine is None:
        return await _error(ws, "no model loaded")
    prompt = msg.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return await _error(ws, "empty prompt")
    top = msg.get("top", 5)
    mode = msg.get("mode", "walk")
    if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= 1000:
        return await _error(ws, "top must be an integer between 1 and 1000")
    if mode not in ("walk", "dense"):
        return await _error(ws, f"invalid mode {mode!r} (use walk or dense)")
    t0 = time.perf_counter()
    from .knowledge_routes import _source

    knn = _source(ws).knn()
    res = await st.engine.run(lambda m: infer(m, prompt, top=top, mode=mode, knn=knn))
    preds = [{"token": p.token, "probability": round(p.prob, 4)} for p in res.predictions]
    for rank, p in enumerate(preds, 1):
        await _send(ws, {"type": "prediction", "rank": rank, **p})
    await _send(ws, {"type": "infer_done", "prompt": prompt, "mode": res.mode, "predictions": preds,
                     "latency_ms": _ms(t0)})


async def _generate(ws: WebSocket, msg: dict, inbox: asyncio.Queue) -> bool:
    """Stream tokens; → False if the client went away."""
    from ..runtime.generate import Sequence
    from ..runtime.sampling import SamplingParams

    st = ws.app.state.modelql
    reason = _unavailable(st, "generate", "WS generate")
    if reason:
        await _error(ws, reason)
        return True
    if st.engine is None:
        await _error(ws, "no model loaded")
        return True
    prompt = msg.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        await _error(ws, "empty prompt")
        return True
    max_tokens = msg.get("max_tokens", 256)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_WS_TOKENS:
        await _error(ws, f"max_tokens must be an integer between 1 and {MAX_WS_TOKENS}")
        return True
    model = st.engine.model
    t0 = time.perf_counter()
    seq = Sequence(model, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    handle = st.engine.submit([seq])
    index = 0
    cancelled = False
    events = handle.events()
    next_event = asyncio.ensure_future(events.__anext__())
    next_msg = asyncio.ensure_future(inbox.get())
    consumed = [False]
    try:
        while True:
            done, _ = await asyncio.wait({next_event, next_msg}, return_when=asyncio.FIRST_COMPLETED)
            if next_msg in done:
                consumed[0] = True
                incoming = next_msg.result()
                if incoming is None:  # client gone
                    handle.cancel()
                    return False
                if incoming.get("type") == "cancel":
                    handle.cancel()
                    cancelled = True
                    break
                await _error(ws, "a generation is in progress: send {\"type\":\"cancel\"} first")
                next_msg = asyncio.ensure_future(inbox.get())
                consumed[0] = False
            if next_event in done:
                try:
                    batch = next_event.result()
                except StopAsyncIteration:
                    break
                finished = False
                for ev in batch or ():
                    if isinstance(ev, Token) and ev.delta.text:
                        await _send(ws, {"type": "token", "text": ev.delta.text, "index": index})
                        index += 1
                    elif isinstance(ev, Finished):
                        finished = True
                    elif isinstance(ev, Failed):
                        _status, message, _c, _p = modelql_error_parts(ev.error)
                        await _error(ws, message)
                        return True
                if finished:
                    break
                next_event = asyncio.ensure_future(events.__anext__())
    finally:
        handle.cancel()  # no-op once finished
        unread = next_msg.done() and not next_msg.cancelled() and not consumed[0]
        for task in (next_event, next_msg):
            if not task.done():
                task.cancel()
            try:
                await task
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
            except Exception:  # noqa: BLE001 - already reported
                pass
        if unread:  # a message that arrived as the generation finished: handled next
            inbox.put_nowait(next_msg.result())
        await events.aclose()
    out: dict[str, Any] = {"type": "done", "tokens": index}
    if cancelled:
        out["cancelled"] = True
    out["latency_ms"] = _ms(t0)
    await _send(ws, out)
    return True


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    await ws.accept()
    inbox: asyncio.Queue = asyncio.Queue()
    reader = asyncio.create_task(_reader(ws, inbox))
    try:
        while True:
            msg = await inbox.get()
            if msg is None:
                break
            kind = msg.get("type")
            try:
                if kind == "__invalid__":
                    await _error(ws, "invalid JSON")
                elif kind == "describe":
                    await _describe(ws, msg)
                elif kind == "infer":
                    await _infer(ws, msg)
                elif kind == "generate":
                    if not await _generate(ws, msg, inbox):
                        break
                elif kind == "cancel":
                    continue  # nothing running: nothing to cancel
                else:
                    await _error(ws, f"unknown message type: {kind}. Supported: {SUPPORTED}")
            except (WebSocketDisconnect, RuntimeError):
                break
            except Exception as exc:  # noqa: BLE001 - reported on the socket, the connection stays
                _status, message, _c, _p = modelql_error_parts(exc)
                try:
                    await _error(ws, message)
                except Exception:  # noqa: BLE001
                    break
    finally:
        reader.cancel()
        try:
            await ws.close()
        except Exception:  # noqa: BLE001 - already closed
            pass
