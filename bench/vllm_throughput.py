"""vLLM throughput: this project's vllm engine against vLLM's own generate, in one run, on the
same model, prompts and cores.

    .venv/bin/python bench/vllm_throughput.py [--rows 120] [--model smollm2-135m-instruct]

(a) vLLM alone: `LLM.generate` of the captions (greedy, the spec's max_tokens), and for each
    attribute guided choice (`StructuredOutputsParams(choice=labels)`, what Ray Data LLM and
    SQL `ai_classify`-style functions do: one label, no distribution)
(b) VLLMEngine directly (the same LLM object): `classify` per attribute (the exact label
    distribution, udfs/engines/prompts.py) and `caption`
(c) the annotate job through Spark (local[1]: one Python worker, one engine, like (a) and
    (b)), caption only and every attribute + the caption, on a warm worker
The prefix cache is reset before every timed run, and warm-ups use other items, so no path
reads another's KV. Attributes: specs/movielens.yaml (vibe, audience, caption; title and
genres as the text), specs/movielens_genre.yaml (genre, 14 labels; the title as the
text) and the multi-label `genres` of specs/movielens_kinds.yaml (5 labels, each a yes/no
question whose prompt starts with the item: guided choice of yes/no per question against
`VLLMEngine.tag`; rows are items, each 5 questions). Figures go to stdout and artifacts/bench/vllm_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

WARMUP = 24  # items used only to warm up, never timed


def engine_config(model: str, max_model_len: int) -> dict:
    # The model's own dtype, vLLM's defaults otherwise (torch.compile on; the engine picks
    # the CPU block size): the same engine for (a), (b) and (c).
    return {"type": "vllm", "model": model, "max_model_len": max_model_len, "seed": 0}


def texts_for(items, spec_name: str) -> list[str]:
    from udfs.annotator import clean_text
    if spec_name == "movielens_genre":
        return [clean_text(t) for t in items["title"]]
    return [clean_text(t, d) for t, d in zip(items["title"], items["description"])]


def tokens(outputs) -> dict:
    return {"prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def timed_generate(llm, prompts, params) -> tuple[float, dict]:
    llm.reset_prefix_cache()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return seconds, {**tokens(outputs), "outputs": outputs}


def row(name: str, rows: int, seconds: float, counts: dict) -> dict:
    out = {"path": name, "rows": rows, "seconds": round(seconds, 3),
           "rows_per_s": round(rows / seconds, 2)}
    for key in ("prompt_tokens", "cached_tokens", "generated_tokens"):
        if key in counts:
            out[key] = counts[key]
    if "prompt_tokens" in counts:
        out["tokens_per_s"] = round((counts["prompt_tokens"] - counts.get("cached_tokens", 0)
                                     + counts["generated_tokens"]) / seconds, 1)
    return out


def in_process(model: str, specs: dict, items, rows: int, caption_rows: int,
               max_model_len: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from udfs.engines import build_engine
    from udfs.engines.prompts import caption_request
    from udfs.spec import YES_NO

    started = time.perf_counter()
    engine = build_engine(engine_config(model, max_model_len))
    print(f"engine start {time.perf_counter() - started:.1f} s", flush=True)
    llm, results = engine.llm, []
    try:
        for spec_name, spec in specs.items():
            texts = texts_for(items, spec_name)
            warm, timed = texts[:WARMUP], texts[WARMUP:WARMUP + rows]
            for name, attribute in spec.attributes.items():
                # a multi-label attribute: one yes/no question per label (guided: the
                # answer only; tag: P(yes) against P(no), the questions sharing the item)
                choices = YES_NO if attribute.multi else attribute.labels
                render = ((lambda ts, a=attribute: [q for t in ts for q in a.questions(t)])
                          if attribute.multi else
                          (lambda ts, a=attribute: [a.render(t) for t in ts]))
                score = engine.tag if attribute.multi else engine.classify
                params = SamplingParams(temperature=0.0, max_tokens=16,
                                        structured_outputs=StructuredOutputsParams(
                                            choice=list(choices)))
                llm.generate(render(warm), params, use_tqdm=False)
                seconds, counts = timed_generate(llm, render(timed), params)
                answers = [o.outputs[0].text for o in counts.pop("outputs")]
                guided = row(f"(a) guided choice: {name}", len(timed), seconds, counts)
                guided["outside_labels"] = sum(a not in choices for a in answers)
                score(warm, attribute)
                llm.reset_prefix_cache()
                before = engine.usage().get(name, {})
                t0 = time.perf_counter()
                score(timed, attribute)
                seconds = time.perf_counter() - t0
                counts = {k: n - before.get(k, 0) for k, n in engine.usage()[name].items()}
                exact = row(f"(b) VLLMEngine.{score.__name__}: {name}", len(timed), seconds,
                            counts)
                exact["vs_guided"] = round(exact["rows_per_s"] / guided["rows_per_s"], 2)
                results += [guided, exact]
                print(json.dumps(guided), json.dumps(exact), sep="\n", flush=True)
            if spec.caption is not None:
                timed = texts[WARMUP:WARMUP + caption_rows]
                params = SamplingParams(**caption_request(spec.caption))
                prompts = [spec.caption.render(t) for t in timed]
                llm.generate([spec.caption.render(t) for t in warm], params, use_tqdm=False)
                seconds, counts = timed_generate(llm, prompts, params)
                counts.pop("outputs")
                raw = row("(a) LLM.generate: caption", len(timed), seconds, counts)
                llm.reset_prefix_cache()
                before = engine.usage().get("caption", {})
                t0 = time.perf_counter()
                engine.caption(timed, spec.caption)
                seconds = time.perf_counter() - t0
                counts = {k: n - before.get(k, 0) for k, n in engine.usage()["caption"].items()}
                ours = row("(b) VLLMEngine.caption", len(timed), seconds, counts)
                ours["vs_generate"] = round(ours["rows_per_s"] / raw["rows_per_s"], 2)
                results += [raw, ours]
                print(json.dumps(raw), json.dumps(ours), sep="\n", flush=True)
    finally:
        engine.close()
    return results


def through_spark(model: str, spec, items, rows: int, caption_rows: int, max_model_len: int,
                  batch: int) -> list[dict]:
    """The annotate job: caption only on the rows (a) and (b) captioned, then the labels and
    the caption on `rows` others; the worker's engine is loaded by a warm-up job on other
    items first, and has seen none of the timed rows."""
    from spark_jobs.annotate import run
    from spark_jobs.session import get_spark

    spark = get_spark("bench-vllm", "local[1]", {
        "spark.python.worker.reuse": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(batch),
        "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"})
    cfg = engine_config(model, max_model_len)
    frame = items[["item_id", "title", "description"]].copy()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            quiet = lambda *a, **k: None  # noqa: E731
            started = time.perf_counter()
            run(spark, spec.restricted(["caption"]), spark.createDataFrame(frame[:WARMUP]),
                f"{tmp}/warm", engine=cfg, progress=quiet)
            print(f"warm-up job (engine start in the worker) {time.perf_counter() - started:.1f} s",
                  flush=True)
            slices = {"caption": frame[WARMUP:WARMUP + caption_rows],
                      "all": frame[WARMUP + caption_rows:WARMUP + caption_rows + rows]}
            for name, part in slices.items():
                # the spec's labels and caption (its semantic IDs need an encoder, not vLLM)
                sub = spec.restricted(["caption"] if name == "caption" else
                                      [*spec.attributes, "caption"])
                report = run(spark, sub, spark.createDataFrame(part), f"{tmp}/{name}",
                             engine=cfg, progress=quiet)
                counts = {}
                for p in report["parts"].values():
                    for key in ("prompt_tokens", "cached_tokens", "generated_tokens"):
                        counts[key] = counts.get(key, 0) + p.get(key, 0)
                r = row(f"(c) annotate job: {'caption' if name == 'caption' else 'labels+caption'}",
                        report["rows_written"], report["annotate_seconds"], counts)
                r["engine_seconds"] = report["engine_seconds"]
                r["job_seconds"] = report["seconds"]
                r["parts"] = report["parts"]
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        spark.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=120, help="timed items per label path")
    parser.add_argument("--caption-rows", type=int, default=480,
                        help="timed items per caption path (enough that the job's fixed "
                             "costs show in proportion)")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a packaged model's name or a local HF directory")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1024, help="Arrow batch in (c)")
    parser.add_argument("--skip-spark", action="store_true")
    args = parser.parse_args()

    from spark_jobs.movielens import load_items
    from udfs.engines.models import resolve
    from udfs.spec import load_spec

    model = resolve(args.model)
    items = load_items().sample(frac=1.0, random_state=0).reset_index(drop=True)
    items = items[items["description"].notna()].head(
        WARMUP + args.caption_rows + max(args.rows, 1))
    specs = {"movielens": load_spec(ROOT / "specs" / "movielens.yaml"),
             # the single-label genre (the spec's 18-label genres would change this row)
             "movielens_genre": load_spec(ROOT / "specs" / "movielens_genre.yaml")
             .restricted(["genre"]),
             # the multi-label genres (5 labels, a yes/no question each)
             "movielens_kinds": load_spec(ROOT / "specs" / "movielens_kinds.yaml")
             .restricted(["genres"])}
    results = in_process(model, specs, items, args.rows, args.caption_rows, args.max_model_len)
    if not args.skip_spark:
        results += through_spark(model, specs["movielens"], items, args.rows, args.caption_rows,
                                 args.max_model_len, args.batch_size)
        caption_raw = next(r for r in results if r["path"] == "(a) LLM.generate: caption")
        job = next(r for r in results if r["path"] == "(c) annotate job: caption")
        job["vs_generate"] = round(job["rows_per_s"] / caption_raw["rows_per_s"], 2)
    print("\n{:<40} {:>6} {:>9} {:>10} {:>10} {:>9} {:>7}".format(
        "path", "rows", "rows/s", "prompt tk", "cached tk", "gen tk", "ratio"))
    for r in results:
        ratio = r.get("vs_guided", r.get("vs_generate", ""))
        print("{:<40} {:>6} {:>9} {:>10} {:>10} {:>9} {:>7}".format(
            r["path"], r["rows"], r["rows_per_s"], r.get("prompt_tokens", ""),
            r.get("cached_tokens", ""), r.get("generated_tokens", ""), ratio))
    out = ROOT / "artifacts" / "bench" / "vllm_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "rows": args.rows, "cpus": os.cpu_count(),
                               "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
