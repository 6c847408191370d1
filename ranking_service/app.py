"""The ranking service: POST /rank scores candidate items for a user.

    POST /rank {"user_id": 1, "item_ids": [1, 2, 3], "k": 2}
      -> {"user_id": 1, "model": "...", "items": [{"item_id": 2, "score": 0.41}, ...],
          "unknown_user": false, "unknown_items": []}

Online features come from Feast, encoded by the same `FeatureSet` code as training and
cached per entity; when the registry changes (a materialization) the cached rows are
refreshed in place by a background thread (see online.py). A request joins the cached item
and user rows (`FeatureSet.assemble`) and scores all candidates in one XGBoost call.
Ids the online store does not know get all-missing features (XGBoost routes missing values)
and are flagged. Bad requests get 422 with the reason (where, what, and a short excerpt of
the offending value, never the whole body); a body over MAX_BODY_BYTES gets 413 before it
is read whole; an unreadable online store gets 503.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from ranking_service import model as ranker_model
from ranking_service.online import REFRESH_MODES, OnlineFeatures, OnlineStoreUnavailable

MAX_CANDIDATES = 1000
# Settings for `app_from_env`, the factory each worker process calls (`--workers N`).
ENV_REPO, ENV_MODEL, ENV_CACHE = "ANNOFEAT_RANK_REPO", "ANNOFEAT_RANK_MODEL", "ANNOFEAT_RANK_CACHE"
ENV_REFRESH = "ANNOFEAT_RANK_REFRESH"
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
# A 422 names where each problem is and quotes at most this much of the offending value
# (and at most this many problems): a 5 MB body gets a short answer, not itself back.
EXCERPT_CHARS = 80
MAX_ERRORS_SHOWN = 5
# A valid request is at most ~21 kB of JSON (MAX_CANDIDATES int64 ids); 1 MiB leaves room for
# any formatting and refuses a runaway client before its body is buffered and parsed.
MAX_BODY_BYTES = 1 << 20


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Int64
    item_ids: list[Int64] = Field(min_length=1, max_length=MAX_CANDIDATES)
    k: StrictInt | None = Field(default=None, ge=1, description="return the top k (default all)")


class ScoredItem(BaseModel):
    item_id: int
    score: float


class RankResponse(BaseModel):
    user_id: int
    model: str
    items: list[ScoredItem]
    unknown_user: bool
    unknown_items: list[int]


def check_registry(store, refs: list[str]) -> None:
    """Fail fast when the repo lacks a feature the model needs."""
    views = {v.name: {f.name for f in v.features} for v in store.list_feature_views()}
    lacking = [r for r in refs
               if r.split(":", 1)[1] not in views.get(r.split(":", 1)[0], set())]
    if lacking:
        raise ranker_model.ModelError(
            f"the feature repo lacks features the model needs: {lacking} "
            f"(has views {sorted(views)}); run `feast apply`")


def serving_store(repo_path: str):
    """A FeatureStore that keeps serving a view's last-materialized rows while the view is
    being materialized. Feast 0.67 marks each view MATERIALIZING in the registry for the
    length of a `feast materialize` and refuses to read it meanwhile: every read of the
    online store during a materialization was a 503. The registry's
    `serve_features_while_materializing` lifts that (in this process only:
    feature_store.yaml is left alone)."""
    from feast import FeatureStore
    store = FeatureStore(repo_path=str(repo_path))
    store.registry.serve_features_while_materializing = True
    return store


def create_app(repo_path: str, model_dir: str, cache: bool = True,
               refresh: str = "background") -> FastAPI:
    ranker = ranker_model.load(model_dir)
    store = serving_store(repo_path)
    fs = ranker.features
    check_registry(store, fs.item_refs() + fs.user_refs())
    online = OnlineFeatures(store, {
        "item_id": (fs.item_refs(), fs.encode_items, len(fs.item_columns)),
        "user_id": (fs.user_refs(), fs.encode_users, len(fs.user_columns))},
        cache=cache, refresh=refresh,
        store_factory=lambda: serving_store(repo_path))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        online.close()

    app = FastAPI(title="annofeat ranking service", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, unparsable_body)
    app.state.online = online

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": ranker.name, "n_features": len(fs.columns),
                "max_candidates": MAX_CANDIDATES, "pid": os.getpid(),
                "cache": online.status()}

    # async on purpose: requests run one at a time on the event loop thread, so the
    # request path's store connection is never shared across threads (the background
    # refresh has its own FeatureStore; online.py).
    @app.post("/rank", response_model=RankResponse)
    async def rank(req: RankRequest):
        if len(set(req.item_ids)) != len(req.item_ids):
            return repeated_ids(req.item_ids)
        try:
            items, item_known = online.block("item_id", req.item_ids)
            user, user_known = online.block("user_id", [req.user_id])
        except OnlineStoreUnavailable as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        scores = ranker.predict(fs.assemble(items, user))
        top = np.argsort(-scores, kind="stable")[:req.k]
        return {"user_id": req.user_id, "model": ranker.name,
                "items": [{"item_id": req.item_ids[i], "score": float(scores[i])} for i in top],
                "unknown_user": not user_known[0],
                "unknown_items": [i for i, ok in zip(req.item_ids, item_known) if not ok]}

    return app


def app_from_env() -> FastAPI:
    """The app for one worker process, configured by the environment:
    ANNOFEAT_RANK_{REPO,MODEL,CACHE,REFRESH}."""
    return create_app(os.environ[ENV_REPO], os.environ[ENV_MODEL],
                      cache=os.environ.get(ENV_CACHE, "1") != "0",
                      refresh=os.environ.get(ENV_REFRESH, REFRESH_MODES[0]))


# -- 413 and 422 answers ---------------------------------------------------------------------------------

async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """Replaces FastAPI's 422, which echoes the whole rejected input (a 5 MB body got a
    5 MB answer) and fails with a 500 when that input holds NaN or Infinity (Python's json
    accepts them; the JSON answer cannot carry them). Each problem: `loc` (where), `msg`
    (what), `type` (pydantic's error type) and `input`, a short excerpt of the offending
    value as text; at most MAX_ERRORS_SHOWN problems, `more_errors` counts the rest."""
    errors = list(exc.errors())
    content: dict[str, Any] = {"detail": [describe_error(e, exc.body)
                                          for e in errors[:MAX_ERRORS_SHOWN]]}
    if len(errors) > MAX_ERRORS_SHOWN:
        content["more_errors"] = len(errors) - MAX_ERRORS_SHOWN
    return JSONResponse(content, status_code=422)


async def unparsable_body(request: Request, exc: StarletteHTTPException):
    """FastAPI answers 400 "There was an error parsing the body" when Python's json fails
    with something other than a decode error: nesting too deep for its recursion limit, an
    integer of more than 4,300 digits. That is a malformed body too: 422 with the reason."""
    cause = exc.__cause__
    if exc.status_code != 400 or not isinstance(cause, (RecursionError, ValueError)):
        return await http_exception_handler(request, exc)
    reason = "nested too deeply" if isinstance(cause, RecursionError) else str(cause)
    return JSONResponse({"detail": [{"loc": ["body"], "type": "json_invalid", "input": "",
                                     "msg": f"JSON decode error: {_clip(reason, 120)}"}]},
                        status_code=422)


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, decided from its
    Content-Length before any of it is read, or, for a chunked body, as soon as the bytes
    received pass the limit (the route's body read raises; FastAPI answers with it). The
    connection is closed after a 413: the rest of the body is never read."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = JSONResponse({"detail": self.detail(f"{int(length):,} bytes declared")},
                                    status_code=413,
                                    headers={"connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise StarletteHTTPException(413, self.detail(f"more than {self.limit:,} bytes sent"),
                                             headers={"connection": "close"})
            return message

        return await self.app(scope, limited_receive, send)

    def detail(self, size: str) -> str:
        return (f"request body too large: {size}; at most {self.limit:,} bytes are accepted "
                f"(a request holds at most {MAX_CANDIDATES} item ids)")


def describe_error(err: dict, body: Any) -> dict:
    loc = [x if isinstance(x, int) else _clip(str(x), 40) for x in err.get("loc", ())]
    msg, value = _clip(str(err.get("msg", "")), 200), err.get("input")
    if err.get("type") == "json_invalid":
        pos = loc[-1] if loc and isinstance(loc[-1], int) else 0
        reason = (err.get("ctx") or {}).get("error")
        msg = f"{msg}: {_clip(str(reason), 100)} at character {pos}" if reason else msg
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
        lo, hi = max(0, pos - EXCERPT_CHARS // 2), pos + EXCERPT_CHARS // 2
        near = ("..." if lo else "") + text[lo:hi] + ("..." if hi < len(text) else "")
        return {"loc": loc, "msg": msg, "type": "json_invalid", "input": near}
    if isinstance(value, float) and not math.isfinite(value):
        msg += f" (got {excerpt(value)}: NaN and Infinity are not JSON numbers)"
    return {"loc": loc, "msg": msg, "type": str(err.get("type", "")), "input": excerpt(value)}


def repeated_ids(item_ids: list[int]) -> JSONResponse:
    seen: dict[int, int] = {}
    for n, i in enumerate(item_ids):
        if i in seen:
            return JSONResponse({"detail": [{
                "loc": ["body", "item_ids", n], "type": "repeated_id", "input": str(i),
                "msg": f"item_ids must not repeat an id: {i} is also at index {seen[i]}"}]},
                status_code=422)
        seen[i] = n
    raise AssertionError("no repeated id")


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """`value` as JSON-like text of at most `limit` characters: long strings and containers
    are cut (with the container's length), NaN and Infinity spelled as in the request."""
    return _clip(_render(value, limit, 0), limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _render(v: Any, budget: int, depth: int) -> str:
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, int):
        return str(v) if v.bit_length() <= 256 else f"<an integer of {v.bit_length()} bits>"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return repr(v) if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, (bytes, bytearray)):
        v = bytes(v[:budget]).decode("utf-8", "replace") + ("..." if len(v) > budget else "")
    if isinstance(v, str):
        return json.dumps(v[:budget]) + ("..." if len(v) > budget else "")
    if isinstance(v, (list, tuple, dict)):
        pairs = v.items() if isinstance(v, dict) else ((None, x) for x in v)
        opening, closing = "{}" if isinstance(v, dict) else "[]"
        if depth >= 3 and v:
            return f"{opening}...{len(v)} items{closing}"
        parts, used, room = [], 2, budget - 18  # room for ", ...1000000 items]"
        for key, x in pairs:
            part = f"{_render(str(key), 20, depth + 1)}: " if isinstance(v, dict) else ""
            part += _render(x, max(room - used - len(part), 8), depth + 1)
            if used + len(part) > room:
                parts.append(f"...{len(v)} items")
                break
            parts.append(part)
            used += len(part) + 2
        return opening + ", ".join(parts) + closing
    return f"<{type(v).__name__}>"
