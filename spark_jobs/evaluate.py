"""Score an attribute's annotations against human labels.

    python -m spark_jobs.evaluate --spec specs/movielens_genre.yaml --attribute genre \
        --annotations T --truth truth.csv --out artifacts/quality/genre
    python -m spark_jobs.evaluate ... --items items.parquet --engine embedding --truth ...
    python -m spark_jobs.evaluate ... --movielens [--limit N | --sample N] [--engine CONFIG]

Predictions come from an annotation table (item_id, <attr>_label, <attr>_confidence, and an
optional error column; for a multi-label attribute <attr>_labels and <attr>_scores), or are
made first by any engine through udfs.annotator, the code path the annotate job's UDFs use.
Human truth is a table of item ids with "|"-separated labels; --label-map folds human labels
onto spec labels. --movielens uses the shipped MovieLens data: text = --text-columns of
title, description (the Wikipedia lead, where one exists) and tags (never the genres; default
title + description), `--lead-only` keeps the movies with a lead; truth = the genres. Writes metrics.json, confusion_matrix.json/.png and
reliability.png (a multi-label attribute: metrics.json, per_label.png and reliability.png;
plus annotations.parquet and items.parquet when it annotated), and prints the headline numbers.

A multi-label attribute is scored on its sets and per-label probabilities
(quality.metrics.multilabel_report), beside two baselines fitted on the truth of the items
that were not scored (the rest of the catalogue; the scored items themselves, said so in the
report, when the truth has no other item): majority and label frequency.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from quality.metrics import (indicator, multilabel_baselines, multilabel_report,
                             score_against_truth)
from udfs.spec import Attribute, SpecError, load_spec
from udfs.table import TableError, read_frame

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "movielens"
# MovieLens genres without a label of their own in specs/movielens_genre.yaml (IMAX: ignored)
MOVIELENS_LABEL_MAP = {"Adventure": "Action", "Children": "Animation",
                       "Mystery": "Crime", "Film-Noir": "Crime"}
MAX_TAGS = 10


class EvaluateError(ValueError):
    """Inputs that cannot be scored; the message says what to fix."""


def movielens_genre_items(data_dir: Path = DATA_DIR, limit: int | None = None) -> pd.DataFrame:
    """item_id, title, description (the Wikipedia lead or None), has_lead, tags ("Tags: a, b"
    or None) and the human genres, per movie: the demo's catalogue (spark_jobs.movielens)
    plus the user tags."""
    from spark_jobs.movielens import load_items

    movies = load_items(data_dir)
    if limit:
        movies = movies.head(limit)
    tags = pd.read_csv(data_dir / "tags.csv")
    tags["tag"] = tags["tag"].astype(str).str.strip().str.lower()
    # the most applied tags first, at most MAX_TAGS: a few movies carry hundreds
    counts = tags.groupby(["movieId", "tag"]).size().rename("n").reset_index()
    counts = counts.sort_values(["movieId", "n", "tag"], ascending=[True, False, True])
    joined = (counts.groupby("movieId").head(MAX_TAGS).groupby("movieId")["tag"]
              .agg(lambda t: "Tags: " + ", ".join(t)))
    return pd.DataFrame({
        "item_id": movies["item_id"],
        "title": movies["title"],
        "description": movies["description"],
        "has_lead": movies["has_lead"],
        "tags": movies["item_id"].map(joined).astype(object).where(
            movies["item_id"].isin(joined.index), None),
        # "(no genres listed)" as MovieLens writes it: no truth, left out of the scores
        "genres": movies["genres"].fillna("(no genres listed)"),
    }).reset_index(drop=True)


def movielens_label_map(attribute: Attribute) -> dict[str, str]:
    """The MovieLens folds this attribute needs: only genres it has no label of its own for,
    onto labels it has (the multi-label genres attribute has every genre: none)."""
    return {h: s for h, s in MOVIELENS_LABEL_MAP.items()
            if h not in attribute.labels and s in attribute.labels}


def movielens_sample(items: pd.DataFrame, limit: int | None, sample: int | None,
                     seed: int) -> pd.DataFrame:
    """The first `limit` movies, or `sample` drawn at random with `seed` (in id order)."""
    if limit and sample:
        raise EvaluateError("give --limit (the first N movies) or --sample (N at random), "
                            "not both")
    if sample:
        if sample > len(items):
            raise EvaluateError(f"--sample {sample} is more than the {len(items)} movies")
        return (items.sample(n=sample, random_state=seed).sort_values("item_id")
                .reset_index(drop=True))
    return items.head(limit).reset_index(drop=True) if limit else items


def parse_label_map(value: str | None) -> dict[str, str]:
    """'Human=Spec,Other=Spec' -> mapping."""
    pairs = [p.split("=", 1) for p in (value or "").split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise EvaluateError(f"--label-map must look like 'Human=Spec,Other=Spec', got {value!r}")
    return {h.strip(): s.strip() for h, s in pairs}


def truth_sets(human: pd.Series, labels: tuple[str, ...],
               label_map: dict[str, str]) -> pd.Series:
    """Each item's human labels ("|"-separated), mapped onto the spec's labels."""
    bad = sorted(set(label_map.values()) - set(labels))
    if bad:
        raise EvaluateError(f"--label-map targets {bad}, which are not labels of the attribute")

    def one(value) -> frozenset:
        if not isinstance(value, str):
            return frozenset()
        mapped = (label_map.get(h.strip(), h.strip()) for h in value.split("|"))
        return frozenset(m for m in mapped if m in labels)
    return human.map(one)


def annotate(items: pd.DataFrame, attribute: Attribute, engine_config: dict,
             text_columns: list[str]) -> tuple[pd.DataFrame, dict]:
    """Annotation columns for `items` through udfs.annotator, plus timing."""
    from udfs.annotator import annotate_texts, clean_columns
    from udfs.engines import build_engine, can_tag

    missing = [c for c in ["item_id", *text_columns] if c not in items.columns]
    if missing:
        raise EvaluateError(f"items lack columns {missing}; they have {list(items.columns)}")
    if attribute.multi and not can_tag(engine_config):
        raise EvaluateError(f"engine {engine_config.get('type')!r} cannot score multi-label "
                            f"attributes such as {attribute.name!r}; use the embedding, "
                            "transformers, vllm or openai engine")
    engine = build_engine(engine_config)
    try:
        texts = clean_columns([items[c] for c in text_columns])
        started = time.perf_counter()
        if attribute.multi:
            from udfs.annotator import tag_texts
            out = tag_texts(engine, attribute, texts)
        else:
            out = annotate_texts(engine, attribute, texts)
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    name = attribute.name
    if attribute.multi:
        values = {f"{name}_labels": out["labels"], f"{name}_scores": out["scores"]}
    else:
        values = {f"{name}_label": out["label"], f"{name}_confidence": out["confidence"]}
    table = pd.DataFrame({"item_id": items["item_id"].to_numpy(), **{
        col: v.to_numpy() if isinstance(v, pd.Series) else v for col, v in values.items()},
        "model": engine.model_name,
        "error": out["error"].to_numpy() if isinstance(out["error"], pd.Series)
        else out["error"]})
    return table, {"model": engine.model_name, "rows": len(items),
                   "seconds": round(seconds, 2), "rows_per_second": round(len(items) / seconds, 1)}


def evaluate(annotations: pd.DataFrame, truth: pd.DataFrame, attribute: Attribute,
             label_map: dict[str, str], truth_column: str = "labels") -> dict:
    """Join annotations to truth on item_id and score them."""
    if attribute.multi:
        return evaluate_multi(annotations, truth, attribute, label_map, truth_column)
    label_col, conf_col = f"{attribute.name}_label", f"{attribute.name}_confidence"
    missing = [c for c in ("item_id", label_col, conf_col) if c not in annotations.columns]
    if missing:
        raise EvaluateError(f"annotations lack columns {missing}")
    if truth_column not in truth.columns or "item_id" not in truth.columns:
        raise EvaluateError(f"truth needs columns item_id and {truth_column!r}")
    ok = annotations[label_col].notna()
    if "error" in annotations.columns:
        ok &= annotations["error"].isna()
    rows = annotations[ok].merge(truth[["item_id", truth_column]], on="item_id", how="inner")
    if rows.empty:
        raise EvaluateError("no annotated item without error has a human label")
    result = score_against_truth(rows[label_col].tolist(), rows[conf_col].to_numpy(float),
                                 truth_sets(rows[truth_column], attribute.labels, label_map)
                                 .tolist(), attribute.labels)
    result["annotations"] = int(len(annotations))
    result["annotation_errors"] = int((~ok).sum())
    result["items_without_human_row"] = int(ok.sum() - len(rows))
    return result


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def evaluate_multi(annotations: pd.DataFrame, truth: pd.DataFrame, attribute: Attribute,
                   label_map: dict[str, str], truth_column: str = "labels") -> dict:
    """A multi-label attribute's sets and scores against the human label sets, and the
    majority and label-frequency baselines fitted on the truth of the other items."""
    name, labels = attribute.name, attribute.labels
    labels_col, scores_col = f"{name}_labels", f"{name}_scores"
    missing = [c for c in ("item_id", labels_col, scores_col) if c not in annotations.columns]
    if missing:
        raise EvaluateError(f"annotations lack columns {missing} (a multi-label attribute's "
                            f"table has {labels_col} and {scores_col})")
    if truth_column not in truth.columns or "item_id" not in truth.columns:
        raise EvaluateError(f"truth needs columns item_id and {truth_column!r}")
    ok = annotations[labels_col].map(_present) & annotations[scores_col].map(_present)
    if "error" in annotations.columns:
        ok &= annotations["error"].isna()
    rows = annotations[ok].merge(truth[["item_id", truth_column]], on="item_id", how="inner")
    if rows.empty:
        raise EvaluateError("no annotated item without error has a human label")
    sets = truth_sets(rows[truth_column], labels, label_map)
    known = (sets.map(len) > 0).to_numpy()
    true = indicator(sets[known].tolist(), labels)
    try:
        predicted = indicator([list(v) for v in rows[labels_col][known]], labels)
    except ValueError as exc:
        raise EvaluateError(f"{labels_col}: {exc}") from None
    score_rows = [np.asarray(v, dtype=float) for v in rows[scores_col][known]]
    if any(r.shape != (len(labels),) for r in score_rows):
        raise EvaluateError(f"{scores_col} must hold one probability per label "
                            f"({len(labels)}, in spec order)")
    scores = np.array(score_rows, dtype=float).reshape(-1, len(labels))
    if np.isnan(scores).any() or (scores < 0).any() or (scores > 1).any():
        raise EvaluateError(f"{scores_col} must be probabilities in [0, 1]")
    # the baselines learn from the human labels of every item that is not being scored
    others = truth[~truth["item_id"].isin(annotations["item_id"])]
    train_sets = truth_sets(others[truth_column], labels, label_map)
    train_sets = train_sets[train_sets.map(len) > 0]
    fit = "other items"
    if train_sets.empty:
        train_sets, fit = sets[known], "scored items (in-sample: no other item has truth)"
    baselines = multilabel_baselines(indicator(train_sets.tolist(), labels), true, attribute)
    baselines["fit"] = fit
    return {
        "kind": "multi",
        "items": int(len(rows)),
        "items_without_truth": int((~known).sum()),
        "multi": multilabel_report(true, predicted, scores, labels),
        "baselines": baselines,
        "annotations": int(len(annotations)),
        "annotation_errors": int((~ok).sum()),
        "items_without_human_row": int(ok.sum() - len(rows)),
    }


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 0.6 * len(labels)))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("human (single-label items)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of the human label's items")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(curves: dict[str, dict], path: Path, title: str,
                     xlabel: str = "mean confidence in bin",
                     ylabel: str = "share correct in bin") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, table in curves.items():
        used = np.asarray(table["count"]) > 0
        ax.plot(np.asarray(table["confidence"])[used], np.asarray(table["accuracy"])[used],
                marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_label(result: dict, path: Path, title: str) -> None:
    """Each label's F1 and AUC, the label-frequency baseline's F1 beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["multi"]["per_label"]
    base = result["baselines"]["label_frequency"]["per_label"]
    labels = list(per)
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7, 1 + 0.35 * len(labels)))
    ax.barh(y - 0.27, [per[lab]["f1"] for lab in labels], height=0.27, label="F1")
    ax.barh(y, [per[lab]["auc"] if per[lab]["auc"] is not None else 0 for lab in labels],
            height=0.27, label="AUC")
    ax.barh(y + 0.27, [base[lab]["f1"] for lab in labels], height=0.27,
            label="F1, label-frequency baseline", color="grey")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(y, [f"{lab} ({per[lab]['support']})" for lab in labels])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (AUC 0.5 = chance); label (items with it)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path, attribute: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if result.get("kind") == "multi":
        m, b = result["multi"], result["baselines"]["label_frequency"]
        plot_per_label(result, out / "per_label.png", f"{attribute}: per label")
        plot_reliability({f"engine (ECE {m['ece']:.3f})": m["reliability"],
                          f"label frequency (ECE {b['ece']:.3f})": b["reliability"]},
                         out / "reliability.png",
                         f"{attribute}: calibration of the per-label probabilities",
                         "mean probability in bin", "share of item x label pairs that are true")
        return
    cm = result["strict"]["confusion_matrix"]
    (out / "confusion_matrix.json").write_text(json.dumps(cm, indent=2))
    plot_confusion(np.asarray(cm["counts"]), cm["labels"], out / "confusion_matrix.png",
                   f"{attribute}: confusion on single-label items")
    plot_reliability({f"strict (ECE {result['strict']['ece']:.3f})":
                      result["strict"]["reliability"],
                      f"hit (ECE {result['hit']['ece']:.3f})": result["hit"]["reliability"]},
                     out / "reliability.png", f"{attribute}: reliability of the confidence")


def headline_multi(name: str, result: dict) -> str:
    m, b = result["multi"], result["baselines"]

    def auc(r):
        return "n/a" if r.get("macro_auc") is None else f"{r['macro_auc']:.3f}"
    maj, freq = b["majority"], b["label_frequency"]
    return (f"[evaluate] {name}: multi n={m['n']} micro_f1={m['micro_f1']:.3f} "
            f"macro_f1={m['macro_f1']:.3f} jaccard={m['jaccard']:.3f} macro_auc={auc(m)} "
            f"ece={m['ece']:.3f} mean_labels={m['mean_labels']:.2f} "
            f"(true {m['mean_true_labels']:.2f}); "
            f"majority {maj['labels']} micro_f1={maj['micro_f1']:.3f} "
            f"jaccard={maj['jaccard']:.3f}; label frequency {freq['labels']} "
            f"micro_f1={freq['micro_f1']:.3f} jaccard={freq['jaccard']:.3f} "
            f"ece={freq['ece']:.3f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--attribute", required=True)
    p.add_argument("--out", required=True, help="output directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--annotations", help="table with item_id, <attr>_label, <attr>_confidence")
    src.add_argument("--items", help="item table to annotate first (item_id + text columns)")
    src.add_argument("--movielens", action="store_true",
                     help="annotate the shipped MovieLens items (--text-columns of title, "
                          "description = the Wikipedia lead, tags); truth = genres")
    p.add_argument("--engine", default=None,
                   help="engine type, inline JSON or YAML/JSON file (default: embedding)")
    p.add_argument("--text-columns", default="title,description",
                   help="columns joined into the item text (default: title,description)")
    p.add_argument("--lead-only", action="store_true",
                   help="--movielens: only the movies with a Wikipedia lead (before --limit/--sample)")
    p.add_argument("--limit", type=int, default=None, help="--movielens: first N movies only")
    p.add_argument("--sample", type=int, default=None,
                   help="--movielens: N movies drawn at random (seeded) instead")
    p.add_argument("--seed", type=int, default=0, help="--sample's seed")
    p.add_argument("--truth", help="table with item_id and human labels (csv or parquet)")
    p.add_argument("--truth-column", default="labels", help='"|"-separated human labels')
    p.add_argument("--label-map", default=None, help="fold human labels: 'Human=Spec,...'")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from udfs.engines import parse_engine

    args = parse_args(argv)

    from spark_jobs.session import quiet

    quiet(args.verbose)
    out = Path(args.out)
    try:
        attribute = load_spec(args.spec).attribute(args.attribute)
        label_map = parse_label_map(args.label_map)
        run_info = None
        if args.movielens:
            catalogue = movielens_genre_items()
            pool = catalogue[catalogue["has_lead"]] if args.lead_only else catalogue
            items = movielens_sample(pool.reset_index(drop=True), args.limit, args.sample,
                                     args.seed)
            # the whole catalogue's genres: the baselines of a multi-label attribute learn
            # from the movies that are not scored
            truth = pd.DataFrame({"item_id": catalogue["item_id"],
                                  "labels": catalogue["genres"]})
            truth_column = "labels"
            label_map = {**movielens_label_map(attribute), **label_map}
        else:
            if not args.truth:
                raise EvaluateError("--truth is required unless --movielens")
            if args.lead_only:
                raise EvaluateError("--lead-only is for --movielens")
            truth, truth_column = read_frame(args.truth), args.truth_column
        text_columns = [c.strip() for c in args.text_columns.split(",") if c.strip()]
        if args.annotations:
            annotations = read_frame(args.annotations)
        else:
            items = items if args.movielens else read_frame(args.items)
            annotations, run_info = annotate(items, attribute, parse_engine(args.engine),
                                             text_columns)
            out.mkdir(parents=True, exist_ok=True)
            annotations.to_parquet(out / "annotations.parquet", index=False)
            items.to_parquet(out / "items.parquet", index=False)
        result = evaluate(annotations, truth, attribute, label_map, truth_column)
    except (SpecError, EvaluateError, TableError, OSError, json.JSONDecodeError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    result["attribute"] = attribute.name
    result["attribute_version"] = attribute.version
    result["label_map"] = label_map
    if run_info:
        result["annotation_run"] = run_info
    write_outputs(result, out, attribute.name)
    if result.get("kind") == "multi":
        print(headline_multi(attribute.name, result) + f"; wrote {out}", flush=True)
        return 0
    s, h = result["strict"], result["hit"]
    print(f"[evaluate] {attribute.name}: strict n={s['n']} accuracy={s['accuracy']:.3f} "
          f"macro_f1={s['macro_f1']:.3f} kappa={s['kappa']:.3f} ece={s['ece']:.3f} "
          f"(majority baseline {s['majority_baseline']:.3f}); "
          f"hit n={h['n']} hit_rate={h['hit_rate']:.3f}; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
