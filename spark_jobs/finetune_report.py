"""MovieLens genres: baselines against SmolLM2 fine-tuned, with the learning curve, one run.

    python -m spark_jobs.finetune_report [--movies 5000] [--sizes 100,300,1000,all]
        [--heldout 120] [--baselines minilm,zero-shot,few-shot] [--eval-engine vllm]
        [--out artifacts/quality/finetune] [--keep-models]
    python -m spark_jobs.finetune_report --write-inputs DIR [--movies 5000]

Human labels: the single-genre movies among the first --movies (MovieLens genres folded onto
the genre spec's labels as spark_jobs.evaluate folds them; text = title + user tags, never the
genres), less the movies a few-shot prompt shows (spark_jobs.compare_engines drops them the
same way). One seeded held-out split, of which --heldout items are scored for every row:

- the majority baseline (the held-out items' most common genre);
- --baselines, built as spark_jobs.compare_engines builds its variants: `minilm` (the
  embedded MiniLM, zero-shot), `zero-shot` (the base model), `few-shot` (the base model with
  the 6-shot spec), `few-shot-chat` (the same through the chat template); the base model's
  rows are scored by --eval-engine, as the fine-tuned models are;
- one fine-tuned model per --sizes point (spark_jobs.finetune, same seed, same held-out
  items) on a nested subset of the training split; `all` is the whole training split.

Writes <out>/learning_curve.json and <out>/smollm2-genre-<size>/card.json (the fine-tuned
weights are removed unless --keep-models; a kept directory is a model the transformers and
vllm engines load, e.g. `spark_jobs.demo --llm-model`) and prints a Markdown table.
--write-inputs writes the same human labels (DIR/human.csv: item_id,label) and item texts
(DIR/items.parquet: item_id,title,tags) for spark_jobs.finetune, and the multi-label genres
of the same movies (DIR/genres.csv: item_id,labels, "|"-separated in the `genres`
attribute's order; movies without one of its genres left out) for
`spark_jobs.finetune --attribute genres`, with DIR/genres_heldout.csv (item_id): those of
them that `spark_jobs.evaluate --movielens --sample 200 --seed 0` scores, the held-out items
of docs/QUALITY.md's multi-label table, for --heldout-ids; and stops.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from spark_jobs import finetune
from spark_jobs.compare_engines import VARIANTS, example_free_items
from spark_jobs.evaluate import (MOVIELENS_LABEL_MAP, movielens_genre_items, movielens_label_map,
                                 movielens_sample, truth_sets)
from udfs.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "movielens_genre.yaml"
TEXT_COLUMNS = ["title", "tags"]
EVAL_SAMPLE = {"sample": 200, "seed": 0}  # docs/QUALITY.md's multi-label genre draw
# --baselines: name -> (compare_engines variant, row title); the LLM rows run the report's
# --model through --eval-engine with the variant's spec and chat setting
BASELINES = {"minilm": ("minilm", "MiniLM embedding, zero-shot"),
             "zero-shot": ("smollm2-vllm", "zero-shot"),
             "few-shot": ("smollm2-vllm-fewshot", "6-shot"),
             "few-shot-chat": ("smollm2-vllm-fewshot-chat", "6-shot, chat template")}


class ReportError(ValueError):
    """A bad option; the message says what to fix."""


def human_labels(movies: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The item texts and the single-genre human labels (labels seen at least twice)."""
    items, _ = example_free_items(movies)
    attribute = load_spec(SPEC).attribute("genre")
    truth = truth_sets(items["genres"], attribute.labels, MOVIELENS_LABEL_MAP)
    single = truth.map(len) == 1
    labels = pd.DataFrame({"item_id": items["item_id"][single],
                           "label": truth[single].map(lambda s: next(iter(s)))})
    counts = labels["label"].value_counts()
    return items, labels[labels["label"].map(counts) >= 2].reset_index(drop=True)


def human_genre_sets(items: pd.DataFrame) -> pd.DataFrame:
    """item_id, labels: each movie's MovieLens genres that the `genres` attribute has, in its
    order, "|"-separated; movies with none of them (no genre listed, IMAX only) left out."""
    attribute = load_spec(SPEC).attribute("genres")
    sets = truth_sets(items["genres"], attribute.labels, movielens_label_map(attribute))
    joined = sets.map(lambda s: "|".join(lab for lab in attribute.labels if lab in s))
    keep = joined != ""
    return pd.DataFrame({"item_id": items["item_id"][keep], "labels": joined[keep]})


def parse_sizes(value: str) -> list[int | None]:
    """'100,300,all' -> [100, 300, None] (None: the whole training split)."""
    sizes = []
    for s in (s.strip() for s in value.split(",")):
        if s == "all":
            sizes.append(None)
        elif s.isdigit() and int(s) > 0:
            sizes.append(int(s))
        elif s:
            raise ReportError(f"--sizes takes positive integers and 'all', not {s!r}")
    if not sizes or len(set(sizes)) != len(sizes):
        raise ReportError(f"--sizes needs at least one size, each once: {value!r}")
    return sizes


def parse_baselines(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in BASELINES]
    if unknown:
        raise ReportError(f"unknown --baselines {unknown}; choose from {', '.join(BASELINES)}")
    return names


def row(name: str, m: dict, extra: dict | None = None) -> dict:
    return {"model": name, "engine": m["engine"], "strict_n": m["strict_n"],
            "strict_accuracy": m["strict_accuracy"], "macro_f1": m["macro_f1"],
            "kappa": m["kappa"], "strict_ece": m["strict_ece"], "hit_rate": m["hit_rate"],
            "errors": m["errors"], "rows_per_second": m["rows_per_second"], **(extra or {})}


def baseline_rows(plan_: finetune.Plan, names: list[str], model: str,
                  eval_engine: str) -> list[dict]:
    """Each --baselines row, on the plan's held-out items."""
    from udfs.engines.models import resolve

    rows = []
    for name in names:
        variant, title = BASELINES[name]
        _, spec_path, engine, chat = VARIANTS[variant]
        attribute = dataclasses.replace(load_spec(spec_path).attribute("genre"), chat=chat)
        if engine["type"] != "embedding":
            engine, title = finetune.eval_engine(eval_engine, resolve(model)), f"{model} {title}"
        print(f"[report] {title} ...", flush=True)
        rows.append(row(title, finetune.score(dataclasses.replace(plan_, attribute=attribute),
                                              engine)))
        print(f"[report] {name}: " + json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], majority: float) -> str:
    lines = ["| model | trained on | train s | strict accuracy | macro-F1 | kappa | ECE | "
             "hit rate |", "|---|---|---|---|---|---|---|---|",
             f"| majority baseline | | | {majority:.3f} | | 0 | | |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('train_items', 0)} | {r.get('train_seconds', '')} "
                     f"| {r['strict_accuracy']:.3f} | {r['macro_f1']:.3f} | {r['kappa']:.3f} | "
                     f"{r['strict_ece']:.3f} | {r['hit_rate']:.3f} |")
    return "\n".join(lines)


def write_inputs(out: Path, movies: int) -> None:
    items, labels = human_labels(movies)
    genres = human_genre_sets(items)
    out.mkdir(parents=True, exist_ok=True)
    labels.to_csv(out / "human.csv", index=False)
    genres.to_csv(out / "genres.csv", index=False)
    drawn = movielens_sample(movielens_genre_items(), None, **EVAL_SAMPLE)["item_id"]
    heldout = genres[genres["item_id"].isin(set(drawn))][["item_id"]]
    heldout.to_csv(out / "genres_heldout.csv", index=False)
    items[["item_id", *TEXT_COLUMNS]].to_parquet(out / "items.parquet", index=False)
    print(f"[report] wrote {out / 'human.csv'} ({len(labels)} single-genre movies among the "
          f"first {movies}), {out / 'genres.csv'} ({len(genres)} movies' genre sets; "
          f"{out / 'genres_heldout.csv'}: {len(heldout)} of them), and "
          f"{out / 'items.parquet'} ({len(items)} movies)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--movies", type=int, default=5000,
                   help="the first N MovieLens movies (5000: 1,256 training items, so the "
                        "1000 point is not the whole split)")
    p.add_argument("--sizes", default="100,300,1000,all",
                   help="training items per learning-curve point; 'all': the whole split")
    p.add_argument("--heldout", type=int, default=120, help="held-out items scored")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--baselines", default="minilm,zero-shot,few-shot",
                   help=f"comma-separated, from {', '.join(BASELINES)}")
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
    p.add_argument("--write-inputs", default=None, metavar="DIR",
                   help="write DIR/human.csv, DIR/genres.csv and DIR/items.parquet for "
                        "spark_jobs.finetune; nothing else")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.session import quiet

    args = parse_args(argv)
    quiet(args.verbose)
    if args.write_inputs:
        write_inputs(Path(args.write_inputs), args.movies)
        return 0
    try:
        sizes, baselines = parse_sizes(args.sizes), parse_baselines(args.baselines)
    except ReportError as exc:
        print(f"finetune_report: error: {exc}", file=sys.stderr)
        return 2
    out, started = Path(args.out), time.time()
    items, labels = human_labels(args.movies)
    text_items = items[["item_id", *TEXT_COLUMNS]]
    attribute = load_spec(SPEC).attribute("genre")
    plan_ = finetune.plan(attribute, labels, text_items, TEXT_COLUMNS, args.holdout, args.seed,
                          max_heldout=args.heldout)
    heldout = {"count": len(plan_.heldout), "pool": plan_.heldout_pool,
               "ids_sha256": finetune.core.ids_hash(plan_.heldout)}
    print(f"[report] {len(labels)} single-genre movies among the first {args.movies} "
          f"({plan_.train_pool} in the training split, {plan_.heldout_pool} held out, "
          f"{len(plan_.heldout)} of them scored)", flush=True)
    rows, majority, tuned = [], _majority(plan_), []

    def save() -> list[dict]:
        """learning_curve.json with the rows so far (the fine-tuned ones by training size)."""
        table = rows + sorted(tuned, key=lambda r: r["train_items"])  # any --sizes order
        report = {"movies": args.movies, "labelled": len(labels), "train_pool": plan_.train_pool,
                  "heldout_scored": heldout["count"], "heldout_pool": heldout["pool"],
                  "heldout_ids_sha256": heldout["ids_sha256"], "majority_baseline": majority,
                  "eval_engine": args.eval_engine, "rows": table,
                  "command": "python -m spark_jobs.finetune_report " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  "seconds": round(time.time() - started, 1)}
        out.mkdir(parents=True, exist_ok=True)
        (out / "learning_curve.json").write_text(json.dumps(report, indent=2))
        return table

    for n in sizes:
        size = "all" if n is None else n
        target = out / f"smollm2-genre-{size}"
        shutil.rmtree(target, ignore_errors=True)
        hp = finetune.Hyper(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, threads=args.threads)
        card = finetune.run(str(SPEC), "genre", labels, text_items, TEXT_COLUMNS, target,
                            args.model, hp, args.holdout, max_train=n,
                            max_heldout=args.heldout, evaluate_with=args.eval_engine,
                            sources={"labels": f"MovieLens single-genre, first {args.movies} "
                                               f"movies less the few-shot examples"})
        if card["splits"]["heldout"]["ids_sha256"] != heldout["ids_sha256"]:
            raise RuntimeError("the held-out items differ between rows of the report")
        t = card["training"]
        tuned.append(row(f"{args.model} fine-tuned", card["heldout_metrics"],
                        {"size": size, "train_items": card["splits"]["train"]["count"],
                         "train_pool": card["splits"]["train"]["pool"],
                         "train_seconds": t["seconds"], "estimated_seconds":
                         t["estimated_seconds"], "final_loss": t["loss_last_tenth"],
                         "model_dir": str(target) if args.keep_models else None}))
        print(f"[report] {size}: " + json.dumps(tuned[-1]), flush=True)
        if not args.keep_models:
            for f in target.iterdir():
                if f.name != "card.json":
                    f.unlink()
        save()  # after every point: a run stopped early keeps what it measured
    # the baselines last: a kept model directory is ready for use (e.g. the demo) sooner
    rows = baseline_rows(plan_, baselines, args.model, args.eval_engine)
    print("\n" + markdown(save(), majority))
    print(f"\nwritten to {out / 'learning_curve.json'} in {time.time() - started:.1f} s")
    return 0


def _majority(plan_: finetune.Plan) -> float:
    """The share of the held-out items' most common label (what always guessing it scores)."""
    held = plan_.frame(plan_.heldout)["label"]
    return float(held.value_counts().iloc[0] / len(held))


if __name__ == "__main__":
    sys.exit(main())
