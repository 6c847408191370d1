"""MovieLens genres: SmolLM2 zero-shot against fine-tuned, and the learning curve, one run.

    python -m spark_jobs.finetune_report [--movies 4000] [--sizes 100,300,1000]
        [--heldout 120] [--eval-engine vllm] [--out artifacts/quality/finetune]

Human labels: the single-genre movies among the first --movies (MovieLens genres folded onto
the genre spec's labels as spark_jobs.evaluate folds them; text = title + user tags, never the
genres). One seeded held-out split, of which --heldout items are scored for every row; each
learning-curve point fine-tunes the base model (spark_jobs.finetune, same seed, same held-out
items) on a nested subset of the training split. The base model's zero-shot figures and the
majority baseline are on the same held-out items. Writes <out>/learning_curve.json and
<out>/n<N>/card.json (the fine-tuned weights are removed unless --keep-models) and prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from spark_jobs import finetune
from spark_jobs.evaluate import MOVIELENS_LABEL_MAP, movielens_genre_items, truth_sets
from udfs.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "movielens_genre.yaml"


def human_labels(movies: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    items = movielens_genre_items(limit=movies)
    attribute = load_spec(SPEC).attribute("genre")
    truth = truth_sets(items["genres"], attribute.labels, MOVIELENS_LABEL_MAP)
    single = truth.map(len) == 1
    labels = pd.DataFrame({"item_id": items["item_id"][single],
                           "label": truth[single].map(lambda s: next(iter(s)))})
    counts = labels["label"].value_counts()
    return items, labels[labels["label"].map(counts) >= 2].reset_index(drop=True)


def row(name: str, m: dict, extra: dict | None = None) -> dict:
    return {"model": name, "strict_n": m["strict_n"], "strict_accuracy": m["strict_accuracy"],
            "macro_f1": m["macro_f1"], "kappa": m["kappa"], "strict_ece": m["strict_ece"],
            "hit_rate": m["hit_rate"], "rows_per_second": m["rows_per_second"],
            **(extra or {})}


def markdown(rows: list[dict], majority: float) -> str:
    lines = ["| model | trained on | train s | strict accuracy | macro-F1 | kappa | ECE | "
             "hit rate |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('train_items', 0)} | {r.get('train_seconds', '')} "
                     f"| {r['strict_accuracy']:.3f} | {r['macro_f1']:.3f} | {r['kappa']:.3f} | "
                     f"{r['strict_ece']:.3f} | {r['hit_rate']:.3f} |")
    lines.append(f"| majority baseline | | | {majority:.3f} | | 0 | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.session import quiet

    p = argparse.ArgumentParser(prog="finetune_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--movies", type=int, default=4000)
    p.add_argument("--sizes", default="100,300,1000")
    p.add_argument("--heldout", type=int, default=120, help="held-out items scored")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--model", default=finetune.DEFAULT_MODEL)
    p.add_argument("--eval-engine", default="vllm")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training (1 is steadier on a shared, loaded CPU)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "quality" / "finetune"))
    p.add_argument("--keep-models", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    quiet(args.verbose)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out = Path(args.out)
    items, labels = human_labels(args.movies)
    text_items = items[["item_id", "title", "tags"]]
    print(f"[report] {len(labels)} single-genre movies among the first {args.movies}",
          flush=True)
    started, rows, cards = time.time(), [], {}
    for i, n in enumerate(sizes):
        target = out / f"n{n}"
        shutil.rmtree(target, ignore_errors=True)
        hp = finetune.Hyper(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, threads=args.threads)
        card = finetune.run(str(SPEC), "genre", labels, text_items, ["title", "tags"], target,
                            args.model, hp, args.holdout, max_train=n,
                            max_heldout=args.heldout, evaluate_with=args.eval_engine,
                            baseline=(i == 0), sources={"labels": f"MovieLens single-genre, "
                                                                  f"first {args.movies} movies"})
        if i == 0:
            heldout = card["splits"]["heldout"]
            rows.append(row(f"{args.model} zero-shot", card["heldout_metrics_base_model"]))
            majority = card["heldout_metrics"]["majority_baseline"]
        elif card["splits"]["heldout"]["ids"] != heldout["ids"]:
            raise RuntimeError("the held-out items differ between learning-curve points")
        t = card["training"]
        rows.append(row(f"{args.model} fine-tuned", card["heldout_metrics"],
                        {"train_items": card["splits"]["train"]["count"],
                         "train_pool": card["splits"]["train"]["pool"],
                         "train_seconds": t["seconds"], "estimated_seconds":
                         t["estimated_seconds"], "final_loss": t["loss_last_tenth"]}))
        cards[n] = card
        print(f"[report] {n}: " + json.dumps(rows[-1]), flush=True)
        if not args.keep_models:
            for f in target.iterdir():
                if f.name != "card.json":
                    f.unlink()
    report = {"movies": args.movies, "labelled": len(labels), "heldout_scored": heldout["count"],
              "heldout_ids_sha256": heldout["ids_sha256"], "majority_baseline": majority,
              "eval_engine": args.eval_engine, "rows": rows,
              "command": "python -m spark_jobs.finetune_report " + " ".join(argv or sys.argv[1:]),
              "seconds": round(time.time() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning_curve.json").write_text(json.dumps(report, indent=2))
    print("\n" + markdown(rows, majority))
    print(f"\nwritten to {out / 'learning_curve.json'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
