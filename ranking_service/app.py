"""The ranking service: POST /rank scores candidate items for a user.

    POST /rank {"user_id": 1, "item_ids": [1, 2, 3], "k": 2}
      -> {"user_id": 1, "model": "...", "items": [{"item_id": 2, "score": 0.41}, ...],
          "unknown_user": false, "unknown_items": []}

Online features come from Feast, encoded by the same `FeatureSet` code as training and
cached per entity until the registry changes (see online.py); a request joins the cached
item and user rows (`FeatureSet.assemble`) and scores all candidates in one XGBoost call.
Ids the online store does not know get all-missing features (XGBoost routes missing values)
and are flagged. Bad requests get 422 with the reason; an unreadable online store gets 503.
"""
from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from typing import Annotated

from ranking_service import model as ranker_model
from ranking_service.online import OnlineFeatures, OnlineStoreUnavailable

MAX_CANDIDATES = 1000
# Settings for `app_from_env`, the factory each worker process calls (`--workers N`).
ENV_REPO, ENV_MODEL, ENV_CACHE = "ANNOFEAT_RANK_REPO", "ANNOFEAT_RANK_MODEL", "ANNOFEAT_RANK_CACHE"
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


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


def create_app(repo_path: str, model_dir: str, cache: bool = True) -> FastAPI:
    from feast import FeatureStore

    ranker = ranker_model.load(model_dir)
    store = FeatureStore(repo_path=str(repo_path))
    fs = ranker.features
    check_registry(store, fs.item_refs() + fs.user_refs())
    online = OnlineFeatures(store, {
        "item_id": (fs.item_refs(), fs.encode_items, len(fs.item_columns)),
        "user_id": (fs.user_refs(), fs.encode_users, len(fs.user_columns))}, cache=cache)
    app = FastAPI(title="annofeat ranking service")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": ranker.name, "n_features": len(fs.columns),
                "max_candidates": MAX_CANDIDATES, "pid": os.getpid()}

    # async on purpose: requests run one at a time on the event loop thread, so the
    # cache and the online store connection are never shared across threads.
    @app.post("/rank", response_model=RankResponse)
    async def rank(req: RankRequest):
        if len(set(req.item_ids)) != len(req.item_ids):
            return JSONResponse({"detail": "item_ids must not repeat an id"}, status_code=422)
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
    """The app for one worker process, configured by ANNOFEAT_RANK_{REPO,MODEL,CACHE}."""
    return create_app(os.environ[ENV_REPO], os.environ[ENV_MODEL],
                      cache=os.environ.get(ENV_CACHE, "1") != "0")
