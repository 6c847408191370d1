"""python -m ranking_service --repo feature_repo --model artifacts/ranker --port 8000"""
from __future__ import annotations

import argparse
import sys

import uvicorn

from ranking_service.app import create_app
from ranking_service.model import ModelError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve the ranker over HTTP.")
    p.add_argument("--repo", default="feature_repo", help="Feast repo directory")
    p.add_argument("--model", default="artifacts/ranker", help="model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-cache", action="store_true", help="read the online store per request")
    args = p.parse_args(argv)
    try:
        app = create_app(args.repo, args.model, cache=not args.no_cache)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
