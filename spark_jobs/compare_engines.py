"""Genre quality of several engines side by side, on the same MovieLens items, in one run.

    python -m spark_jobs.compare_engines [--limit 1000] [--out artifacts/quality/side_by_side]
        [--variants minilm,smollm2-vllm,smollm2-transformers,smollm2-vllm-fewshot,
                    smollm2-vllm-chat,smollm2-vllm-fewshot-chat]
        [--distill-head 600] [--distill-from smollm2-vllm]

Each variant annotates the same movies (the first --limit; with --lead-only, the default,
the first --limit of those with a Wikipedia lead) from the same text (--text-columns, default
title + description = the lead; never the genres) with one engine and spec, and is scored against the human genres exactly as spark_jobs.evaluate
scores (strict accuracy, macro-F1, kappa and ECE on single-genre movies; hit rate on all;
the strict majority baseline). SmolLM2 runs in float32 under both vLLM and transformers, so
the two can be compared number for number (the report gives their label agreement and the
largest confidence difference). The chat variants put the same questions through the model's
chat template (`chat: true`; the few-shot examples as earlier turns). The few-shot spec's
example movies are dropped from every variant's items, so no variant is scored on a movie
its prompt shows.

Distillation as the seeds do it (teacher: --distill-from, the smollm2-vllm variant by
default): the teacher's labels of the --distill-head most popular of these movies (by
MovieLens ratings) train the student (spark_jobs.distill: logistic regression on MiniLM
embeddings), which labels the rest, the tail. The report gives the student's agreement with its teacher on the tail, both against
the human genres on the tail, and the LLM time the student saved there.

Writes <out>/<variant>/ (evaluate's outputs), <out>/side_by_side.json and a Markdown table
on stdout (docs/QUALITY.md quotes it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd

from quality.metrics import report as agreement_report
from spark_jobs import distill
from spark_jobs.evaluate import (DATA_DIR, MOVIELENS_LABEL_MAP, annotate, evaluate,
                                 movielens_genre_items, write_outputs)
from udfs.annotator import clean_columns
from udfs.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
GENRE = ROOT / "specs" / "movielens_genre.yaml"
FEWSHOT = ROOT / "specs" / "movielens_genre_fewshot.yaml"
SMOLLM2 = "smollm2-135m-instruct"
TEXT_COLUMNS = ["title", "description"]  # description: the Wikipedia lead, or null
# float32 in both engines: the same numbers, so their agreement is a check, not a hope
VLLM = {"type": "vllm", "model": SMOLLM2, "max_model_len": 2048, "seed": 0,
        "gpu_memory_utilization": 0.5, "engine_args": {"dtype": "float32"}}
TRANSFORMERS = {"type": "transformers", "model": SMOLLM2, "dtype": "float32",
                "batch_size": 8}
# name: (title, spec, engine, through the model's chat template)
VARIANTS = {
    "minilm": ("MiniLM embedding, zero-shot (the default)", GENRE, {"type": "embedding"}, False),
    "smollm2-vllm": ("SmolLM2-135M-Instruct via vLLM, zero-shot", GENRE, VLLM, False),
    "smollm2-transformers": ("SmolLM2-135M-Instruct via transformers, zero-shot", GENRE,
                             TRANSFORMERS, False),
    "smollm2-vllm-fewshot": ("SmolLM2-135M-Instruct via vLLM, 6-shot", FEWSHOT, VLLM, False),
    "smollm2-vllm-chat": ("SmolLM2-135M-Instruct via vLLM, zero-shot, chat template", GENRE,
                          VLLM, True),
    "smollm2-vllm-fewshot-chat": ("SmolLM2-135M-Instruct via vLLM, 6-shot, chat template",
                                  FEWSHOT, VLLM, True),
}


def example_free_items(limit: int, text_columns: list[str] = TEXT_COLUMNS,
                       lead_only: bool = False) -> tuple[pd.DataFrame, int]:
    """The first `limit` movies (of those with a lead, `lead_only`) less any whose text or
    title a few-shot prompt shows."""
    items = movielens_genre_items()
    if lead_only:
        items = items[items["has_lead"]]
    items = items.head(limit).reset_index(drop=True)
    shown = {e.text for path in (GENRE, FEWSHOT) for a in load_spec(path).attributes.values()
             for e in a.examples}
    texts = clean_columns([items[c] for c in text_columns])
    titles = {t.split(")")[0] + ")" for t in shown if ")" in t}
    keep = ~(texts.isin(shown) | items["title"].isin(titles)).to_numpy()
    return items[keep].reset_index(drop=True), int((~keep).sum())


def summary_row(name: str, title: str, result: dict) -> dict:
    s, h, run = result["strict"], result["hit"], result.get("annotation_run", {})
    return {"variant": name, "engine": title, "model": run.get("model"),
            "strict_n": s["n"], "strict_accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
            "kappa": s["kappa"], "strict_ece": s["ece"], "majority_baseline":
            s["majority_baseline"], "hit_n": h["n"], "hit_rate": h.get("hit_rate"),
            "hit_ece": h["ece"], "errors": result["annotation_errors"],
            "rows_per_second": run.get("rows_per_second")}


def agreement(a: pd.DataFrame, b: pd.DataFrame, attribute: str) -> dict:
    both = a.merge(b, on="item_id", suffixes=("_a", "_b"))
    label, conf = f"{attribute}_label", f"{attribute}_confidence"
    return {"items": len(both),
            "labels_equal": float((both[label + "_a"] == both[label + "_b"]).mean()),
            "max_confidence_difference":
                float((both[conf + "_a"] - both[conf + "_b"]).abs().max())}


def distil_head(items: pd.DataFrame, truth: pd.DataFrame, teacher: pd.DataFrame, head: int,
                out: Path, teacher_engine: dict, teacher_title: str,
                text_columns: list[str] = TEXT_COLUMNS) -> dict:
    """The teacher's labels of the `head` most popular items train a student that labels
    the tail; both scored on the tail against human labels, and against each other."""
    spec = load_spec(GENRE)
    attribute = spec.attribute("genre")
    ratings = pd.read_csv(DATA_DIR / "ratings.csv", usecols=["movieId"])["movieId"]
    popularity = items["item_id"].map(ratings.value_counts()).fillna(0)
    order = items.assign(p=popularity).sort_values(["p", "item_id"], ascending=[False, True])
    head_ids, tail = set(order["item_id"][:head]), order[head:].drop(columns="p")
    if tail.empty:
        raise ValueError(f"--distill-head {head} leaves no tail among {len(items)} movies")
    rows = distill.teacher_rows(teacher[teacher["item_id"].isin(head_ids)], items, "genre",
                                text_columns)
    card = distill.run(attribute, spec.version, rows, out / "student", teacher_engine)
    student_table, run = annotate(tail, attribute,
                                  {"type": "student", "path": str(out / "student")},
                                  text_columns)
    tail_teacher = teacher[teacher["item_id"].isin(set(tail["item_id"]))]
    scored = {}
    for name, table in (("teacher", tail_teacher), ("student", student_table)):
        r = evaluate(table, truth, attribute, MOVIELENS_LABEL_MAP)
        scored[name] = {"strict_accuracy": r["strict"]["accuracy"],
                        "kappa": r["strict"]["kappa"], "hit_rate": r["hit"]["hit_rate"],
                        "strict_ece": r["strict"]["ece"]}
    both = tail_teacher.merge(student_table, on="item_id", suffixes=("_t", "_s"))
    agree = agreement_report(both["genre_label_t"].tolist(), both["genre_label_s"].tolist(),
                             attribute.labels)
    teacher_rps = card["throughput_rows_per_second"]["teacher"]
    return {"teacher": teacher_title, "head_items": len(head_ids), "trained_on": card["train_rows"],
            "tail_items": len(tail), "student_vs_teacher_on_tail": {
                k: agree[k] for k in ("accuracy", "macro_f1", "kappa")},
            "against_human_on_tail": scored,
            "student_rows_per_second": run["rows_per_second"],
            "teacher_rows_per_second": teacher_rps,
            "teacher_seconds_saved_on_tail": round(len(tail) / teacher_rps - run["seconds"], 1),
            "student_card": card}


def distillation_markdown(d: dict) -> str:
    t, st = d["against_human_on_tail"]["teacher"], d["against_human_on_tail"]["student"]
    agree = d["student_vs_teacher_on_tail"]
    return "\n".join([
        f"Distillation: the teacher labelled the {d['head_items']} most popular movies; the "
        f"student ({d['trained_on']} training labels) labelled the {d['tail_items']} others.",
        "", "| on the tail | strict accuracy | kappa | hit rate | strict ECE | rows/s |",
        "|---|---|---|---|---|---|",
        f"| teacher ({d['teacher']}) | {t['strict_accuracy']:.3f} | {t['kappa']:.3f} | "
        f"{t['hit_rate']:.3f} | {t['strict_ece']:.3f} | {d['teacher_rows_per_second']} |",
        f"| student (MiniLM + logistic regression) | {st['strict_accuracy']:.3f} | "
        f"{st['kappa']:.3f} | {st['hit_rate']:.3f} | {st['strict_ece']:.3f} | "
        f"{d['student_rows_per_second']} |",
        "", f"Student against teacher on the tail: accuracy {agree['accuracy']:.3f}, macro-F1 "
        f"{agree['macro_f1']:.3f}, kappa {agree['kappa']:.3f}; teacher time saved on the tail: "
        f"{d['teacher_seconds_saved_on_tail']} s."])


def markdown(rows: list[dict]) -> str:
    lines = ["| engine | strict accuracy | macro-F1 | kappa | strict ECE | hit rate | rows/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['strict_accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['kappa']:.3f} | {r['strict_ece']:.3f} | {r['hit_rate']:.3f} | "
                     f"{r['rows_per_second']} |")
    base = rows[0]
    lines.append(f"| majority baseline (always the most common strict genre) | "
                 f"{base['majority_baseline']:.3f} | | 0 | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.session import quiet

    p = argparse.ArgumentParser(prog="compare_engines", description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=1000, help="the first N movies")
    p.add_argument("--text-columns", default=",".join(TEXT_COLUMNS),
                   help="item text: title, description (the Wikipedia lead), tags")
    p.add_argument("--lead-only", action=argparse.BooleanOptionalAction, default=True,
                   help="only movies with a Wikipedia lead (default; --no-lead-only: all)")
    p.add_argument("--distill-head", type=int, default=600,
                   help="the teacher labels this many most popular movies, a student "
                        "distilled from them labels the rest (0: no distillation)")
    p.add_argument("--distill-from", default="smollm2-vllm",
                   help="the variant whose labels teach the student (one of --variants)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "quality" / "side_by_side"))
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    quiet(args.verbose)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        print(f"compare_engines: error: unknown variants {unknown}; choose from "
              f"{', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.distill_head and args.distill_from not in names:
        print(f"compare_engines: error: --distill-from {args.distill_from} is not among the "
              f"variants run ({', '.join(names)}); add it, or --distill-head 0",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    text_columns = [c.strip() for c in args.text_columns.split(",") if c.strip()]
    items, dropped = example_free_items(args.limit, text_columns, args.lead_only)
    truth = pd.DataFrame({"item_id": items["item_id"], "labels": items["genres"]})
    print(f"[compare] {len(items)} movies ({dropped} shown as few-shot examples dropped)",
          flush=True)
    rows, tables, started = [], {}, time.time()
    for name in names:
        title, spec_path, engine, chat = VARIANTS[name]
        attribute = dataclasses.replace(load_spec(spec_path).attribute("genre"), chat=chat)
        print(f"[compare] {name}: {title} ...", flush=True)
        table, run = annotate(items, attribute, engine, text_columns)
        result = evaluate(table, truth, attribute, MOVIELENS_LABEL_MAP)
        result.update(attribute="genre", attribute_version=attribute.version,
                      label_map=MOVIELENS_LABEL_MAP, annotation_run=run)
        write_outputs(result, out / name, "genre")
        table.to_parquet(out / name / "annotations.parquet", index=False)
        tables[name] = table
        rows.append(summary_row(name, title, result))
        print(f"[compare] {name}: " + json.dumps(rows[-1]), flush=True)
    report = {"movies": len(items), "dropped_examples": dropped, "rows": rows,
              "text_columns": text_columns, "lead_only": args.lead_only,
              "seconds": round(time.time() - started, 1)}
    if {"smollm2-vllm", "smollm2-transformers"} <= set(tables):
        report["vllm_vs_transformers"] = agreement(tables["smollm2-vllm"],
                                                   tables["smollm2-transformers"], "genre")
    if args.distill_head:
        print(f"[compare] distilling {args.distill_from}'s labels of the {args.distill_head} "
              "most popular movies ...", flush=True)
        title, _, engine, _ = VARIANTS[args.distill_from]
        report["distillation"] = distil_head(items, truth, tables[args.distill_from],
                                             args.distill_head, out, engine, title,
                                             text_columns)
        print("[compare] distillation: " + json.dumps(
            {k: v for k, v in report["distillation"].items() if k != "student_card"}),
            flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "side_by_side.json").write_text(json.dumps(report, indent=2))
    print("\n" + markdown(rows))
    if "distillation" in report:
        print("\n" + distillation_markdown(report["distillation"]))
    if "vllm_vs_transformers" in report:
        print(f"\nvLLM against transformers on the same float32 weights: "
              f"{json.dumps(report['vllm_vs_transformers'])}")
    print(f"\nwritten to {out / 'side_by_side.json'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
