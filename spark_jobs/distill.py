"""Distill an engine's labels for one attribute into a small student classifier.

    python -m spark_jobs.distill --spec specs/movielens_genre.yaml --attribute genre \
        --annotations T --items items.parquet --text-columns title,tags --out artifacts/student

The teacher's labels (annotation rows without error) train a logistic regression on MiniLM
sentence embeddings of the same item texts. A stratified held-out split measures how often the
student agrees with the teacher (accuracy, macro-F1, kappa); the teacher engine (--teacher)
and the saved student then label the same held-out texts in this run, which gives the
throughput ratio. The student is saved as <out>/<attribute>.json + .npz and is served by the
`student` engine: {"type": "student", "path": "<out>"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from quality import distill
from quality.metrics import report
from udfs.engines.base import Engine
from udfs.spec import Attribute, SpecError, load_spec
from udfs.table import read_frame


class DistillError(ValueError):
    """Inputs that cannot be distilled; the message says what to fix."""


def teacher_rows(annotations: pd.DataFrame, items: pd.DataFrame, attribute: str,
                 text_columns: list[str]) -> pd.DataFrame:
    """item_id, text, label and model of every row the teacher labelled without error."""
    from udfs.annotator import clean_columns

    label = f"{attribute}_label"
    missing = [c for c in ("item_id", label) if c not in annotations.columns]
    missing += [f"items.{c}" for c in ["item_id", *text_columns] if c not in items.columns]
    if missing:
        raise DistillError(f"missing columns {missing}")
    ok = annotations[label].notna()
    if "error" in annotations.columns:
        ok &= annotations["error"].isna()
    cols = ["item_id", label] + (["model"] if "model" in annotations.columns else [])
    rows = annotations.loc[ok, cols].merge(items[["item_id", *text_columns]], on="item_id")
    rows["text"] = clean_columns([rows[c] for c in text_columns]).to_numpy()
    rows = rows[rows["text"].notna()].rename(columns={label: "label"}).reset_index(drop=True)
    if rows.empty:
        raise DistillError("no item has both a teacher label and a text")
    return rows


def timed_classify(engine: Engine, texts: list[str], attribute: Attribute,
                   warmup: list[str]) -> tuple[list[str], float]:
    """Labels for texts the engine has not seen, and rows per second."""
    engine.classify(warmup, attribute)  # first-call setup (label vectors, kernels) not timed
    started = time.perf_counter()
    labels = engine.classify(texts, attribute).labels
    return labels, len(texts) / (time.perf_counter() - started)


def run(attribute: Attribute, spec_version: str, rows: pd.DataFrame, out: Path,
        teacher_config: dict, holdout: float = 0.2, c: float = 10.0, seed: int = 0,
        model_path: str | None = None) -> dict:
    from udfs.engines import build_engine
    from udfs.engines.embedding import EmbeddingEngine
    from udfs.engines.student import StudentEngine

    unknown = sorted(set(rows["label"]) - set(attribute.labels))
    if unknown:
        raise DistillError(f"teacher labels {unknown} are not labels of {attribute.name!r}; "
                           "were the annotations made with another spec?")
    texts = rows["text"].tolist()
    encoder = EmbeddingEngine(model_path=model_path)
    started = time.perf_counter()
    embeddings = encoder.embed(texts)
    train, test = distill.holdout_split(rows["label"].tolist(), holdout, seed)
    if len(test) == 0:
        raise DistillError(f"{len(rows)} rows leave nothing to hold out; label more items")
    labels, coef, intercept = distill.fit(embeddings[train], rows["label"].iloc[train].tolist(),
                                          c, seed)
    train_seconds = time.perf_counter() - started
    teacher_name = (rows["model"].mode().iat[0] if "model" in rows.columns
                    else teacher_config.get("type", "teacher"))
    student = distill.Student(
        attribute=attribute.name, labels=labels, attribute_version=attribute.version,
        spec_version=spec_version, teacher=str(teacher_name), embedding=encoder.model_name,
        coef=coef, intercept=intercept)
    encoder.close()
    student.save(out)

    # Agreement and speed, both on the held-out texts, with the student as it was saved.
    held_texts = [texts[i] for i in test]
    warmup = [texts[i] for i in train[:8]]
    served = StudentEngine(str(out), model_path=model_path)
    predicted, student_rps = timed_classify(served, held_texts, attribute, warmup)
    served.close()
    teacher = build_engine(teacher_config)
    _, teacher_rps = timed_classify(teacher, held_texts, attribute, warmup)
    teacher.close()
    agreement = report(rows["label"].iloc[test].tolist(), predicted, attribute.labels)
    student.report = {
        "train_rows": int(len(train)), "heldout_rows": int(len(test)),
        "agreement": {k: agreement[k] for k in ("accuracy", "macro_f1", "kappa")},
        "per_label": agreement["per_label"],
        "teacher_label_share": rows["label"].value_counts(normalize=True).round(4).to_dict(),
        "train_seconds": round(train_seconds, 2),
        "throughput_rows_per_second": {"student": round(student_rps, 1),
                                       "teacher": round(teacher_rps, 1),
                                       "teacher_engine": teacher.model_name},
        "speedup_vs_teacher": round(student_rps / teacher_rps, 2),
        "C": c, "seed": seed,
    }
    student.save(out)
    return student.report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--attribute", required=True)
    p.add_argument("--annotations", required=True, help="teacher annotation table")
    p.add_argument("--items", required=True, help="item table with item_id and text columns")
    p.add_argument("--text-columns", default="title,description")
    p.add_argument("--out", required=True, help="student directory")
    p.add_argument("--teacher", default=None,
                   help="teacher engine config for the throughput comparison (default: embedding)")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--C", dest="c", type=float, default=10.0,
                   help="inverse L2 strength (unit-norm embeddings need large weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", default=None, help="sentence encoder directory")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from udfs.engines import parse_engine

    args = parse_args(argv)

    from spark_jobs.session import quiet

    quiet(args.verbose)
    try:
        spec = load_spec(args.spec)
        attribute = spec.attribute(args.attribute)
        if attribute.multi:
            raise DistillError(f"{attribute.name!r} is a multi-label attribute; a student "
                               "learns single-label and ordinal attributes only")
        rows = teacher_rows(read_frame(args.annotations), read_frame(args.items),
                            attribute.name, [c.strip() for c in args.text_columns.split(",")])
        result = run(attribute, spec.version, rows, Path(args.out), parse_engine(args.teacher),
                     args.holdout, args.c, args.seed, args.model_path)
    except (SpecError, DistillError, ValueError, OSError) as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    a = result["agreement"]
    print(f"[distill] {attribute.name}: held-out agreement with the teacher "
          f"accuracy={a['accuracy']:.3f} macro_f1={a['macro_f1']:.3f} kappa={a['kappa']:.3f}; "
          f"throughput student/teacher = {result['speedup_vs_teacher']}x "
          f"({json.dumps(result['throughput_rows_per_second'])}); wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
