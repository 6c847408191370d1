"""python -m ranking_service --repo feature_repo --model artifacts/ranker --port 8000 [--workers 2]
[--refresh background|drop] [--no-cache]"""
from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from ranking_service.app import ENV_CACHE, ENV_MODEL, ENV_REFRESH, ENV_REPO, create_app
from ranking_service.model import ModelError
from ranking_service.online import REFRESH_MODES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve the ranker over HTTP.")
    p.add_argument("--repo", default="feature_repo", help="Feast repo directory")
    p.add_argument("--model", default="artifacts/ranker", help="model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1,
                   help="server processes, each with its own feature cache (about one per core)")
    p.add_argument("--no-cache", action="store_true", help="read the online store per request")
    p.add_argument("--refresh", choices=REFRESH_MODES, default=REFRESH_MODES[0],
                   help="after a materialization: re-read the cached rows in a background "
                        "thread and swap them in, serving the old ones meanwhile (background), "
                        "or drop the cache and re-read on demand (drop; docs/RANKER.md)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    try:  # in this process first, so a bad model or repo fails once with a clear message
        app = create_app(args.repo, args.model, cache=not args.no_cache, refresh=args.refresh)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = dict(host=args.host, port=args.port, log_level="warning", access_log=False)
    if args.workers == 1:
        uvicorn.run(app, **run)
    else:  # uvicorn starts each worker from an import string; the settings go by environment
        os.environ.update({ENV_REPO: os.path.abspath(args.repo),
                           ENV_MODEL: os.path.abspath(args.model),
                           ENV_CACHE: "0" if args.no_cache else "1",
                           ENV_REFRESH: args.refresh})
        uvicorn.run("ranking_service.app:app_from_env", factory=True, workers=args.workers, **run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
