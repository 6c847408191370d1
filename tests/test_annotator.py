import pandas as pd
import pytest
import torch

from udfs import annotator
from udfs.engines.base import Engine, FatalEngineError, Labels, is_fatal
from udfs.tokens import bucket_counts, caption_tokens, token_id


class CountingEngine(Engine):
    """The real embedding engine, recording what reaches it and failing on demand."""

    def __init__(self, inner, poison=()):
        self.inner, self.poison, self.seen = inner, set(poison), []
        self.model_name = inner.model_name

    def classify(self, texts, attribute):
        self.seen.append(list(texts))
        if self.poison & set(texts):
            raise RuntimeError("poisoned text in batch")
        return self.inner.classify(texts, attribute)

    def caption(self, texts, caption):
        self.seen.append(list(texts))
        return self.inner.caption(texts, caption)


def test_clean_text_handles_bad_input():
    assert annotator.clean_text(None, float("nan"), "  ") is None
    assert annotator.clean_text("a\x00b\x07", None, " c ") == "a b c"
    assert annotator.clean_text(b"caf\xc3\xa9") == "café"
    assert len(annotator.clean_text("x" * 10_000_000)) == annotator.MAX_CHARS
    assert annotator.clean_text("\ud800lone surrogate") is not None


def test_every_row_comes_out_once(embedding_engine, spec):
    texts = pd.Series(["Heat (1995)", None, "Heat (1995)", "", "Toy Story (1995)", "   "])
    cleaned = texts.map(annotator.clean_text)
    engine = CountingEngine(embedding_engine)
    out = annotator.annotate_texts(engine, spec.attributes["vibe"], cleaned)
    assert len(out) == len(texts)
    assert engine.seen == [["Heat (1995)", "Toy Story (1995)"]]  # de-duplicated, no empties
    assert out["error"].notna().tolist() == [False, True, False, True, False, True]
    assert out.loc[0, "label"] == out.loc[2, "label"]
    ok = out["error"].isna()
    assert out.loc[ok, "label"].isin(spec.attributes["vibe"].labels).all()
    assert out.loc[ok, "confidence"].between(0, 1).all()
    assert out.loc[~ok, "label"].isna().all()


def test_engine_failure_is_isolated_to_the_bad_rows(embedding_engine, spec):
    texts = pd.Series([f"Movie number {i}" for i in range(16)])
    engine = CountingEngine(embedding_engine, poison={"Movie number 5"})
    out = annotator.annotate_texts(engine, spec.attributes["vibe"], texts)
    assert out["error"].notna().tolist() == [i == 5 for i in range(16)]
    assert "poisoned" in out.loc[5, "error"]
    assert out.drop(index=5)["label"].notna().all()


def test_captions_and_tokens(embedding_engine, spec):
    out = annotator.caption_texts(embedding_engine, spec.caption,
                                  pd.Series(["Alien (1979). Genres: Horror, Sci-Fi", None]))
    words = out.loc[0, "caption"].split()
    assert len(words) == spec.caption.top_k and set(words) <= set(spec.caption.descriptors)
    assert out.loc[1, "caption"] is None and out.loc[1, "error"]
    toks = caption_tokens(out.loc[0, "caption"])
    assert toks == [token_id(w) for w in words] and all(0 <= t < 2**63 for t in toks)
    assert caption_tokens(None) is None and caption_tokens("") == []
    counts = bucket_counts([toks, None, []], 8)
    assert counts.shape == (3, 8) and counts[0].sum() == len(toks) and counts[1:].sum() == 0


def test_token_ids_are_stable():
    # ids must not depend on the process (unlike Python's salted hash())
    assert token_id("horror") == token_id("horror")
    assert token_id("horror") != token_id("comedy")
    assert caption_tokens("Dark, dark COMEDY") == [token_id("dark")] * 2 + [token_id("comedy")]


class Failing(Engine):
    """An engine that raises `error` on every batch, counting its calls."""
    model_name = "failing"

    def __init__(self, error):
        self.error, self.calls = error, 0

    def classify(self, texts, attribute):
        self.calls += 1
        raise self.error

    def caption(self, texts, caption):
        self.calls += 1
        raise self.error


def dead_engine_error():
    class EngineDeadError(Exception):  # the name vLLM's vllm/v1/engine/exceptions.py uses
        pass
    return EngineDeadError("EngineCore encountered an issue. See stack trace (above) for "
                           "the root cause.")


@pytest.mark.parametrize("error", [
    pytest.param(lambda: torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB"), id="cuda-oom"),
    pytest.param(dead_engine_error, id="engine-dead"),
    pytest.param(lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
                 id="cuda-error"),
    pytest.param(lambda: FatalEngineError("the GPU is gone"), id="declared-fatal"),
])
def test_a_fatal_error_fails_the_task_after_one_engine_call(spec, error):
    engine = Failing(error())
    texts = pd.Series([f"Movie number {i}" for i in range(32)])
    with pytest.raises(FatalEngineError, match="fatal engine error|the GPU is gone"):
        annotator.annotate_texts(engine, spec.attributes["vibe"], texts)
    assert engine.calls == 1  # not 2n - 1 = 63
    with pytest.raises(FatalEngineError):
        annotator.caption_texts(engine, spec.caption, texts)
    assert engine.calls == 2


def test_row_errors_are_not_fatal():
    from udfs.engines.prompts import MalformedOutput
    assert not is_fatal(RuntimeError("engine choked on this input"))
    assert not is_fatal(MalformedOutput("model answered 'CUDA error', not a label"))
    assert is_fatal(ValueError("wrapped")) is False
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except Exception as exc:
            raise RuntimeError("batch failed") from exc
    except RuntimeError as wrapped:
        assert is_fatal(wrapped)  # whatever it was raised from


def test_bisection_is_bounded_when_most_of_a_batch_fails(spec):
    engine = Failing(RuntimeError("engine choked on this input"))
    n = 64
    out = annotator.annotate_texts(engine, spec.attributes["vibe"],
                                   pd.Series([f"Movie number {i}" for i in range(n)]))
    assert engine.calls <= annotator.bisection_budget(n) < 2 * n - 1
    assert out["error"].notna().all() and out["label"].isna().all()
    assert out["error"].str.contains("engine choked on this input").all()
    assert out["error"].str.contains("not isolated").any()


def test_bisection_still_isolates_a_few_bad_rows(embedding_engine, spec):
    poison = {"Movie number 3", "Movie number 40", "Movie number 41", "Movie number 60"}
    engine = CountingEngine(embedding_engine, poison=poison)
    texts = pd.Series([f"Movie number {i}" for i in range(64)])
    out = annotator.annotate_texts(engine, spec.attributes["vibe"], texts)
    assert out["error"].notna().tolist() == [t in poison for t in texts]
    assert not out["error"].str.contains("not isolated").any()
    assert len(engine.seen) <= annotator.bisection_budget(64)


def test_a_fatal_error_fails_the_spark_task_with_one_engine_call(spark, spec, tmp_path):
    """Through Spark: the task fails (Spark would retry it elsewhere) after one engine call,
    instead of succeeding with every row in error after about 2n calls."""
    import udfs
    from pyspark.errors import PythonException

    calls = tmp_path / "calls.txt"
    udfs.register(spark, spec, engine={"type": "tests.faulty_engines:OutOfMemory",
                                       "calls_file": str(calls)}, prefix="oom_")
    items = pd.DataFrame({"item_id": range(40), "title": [f"Movie {i}" for i in range(40)],
                          "description": ["Genres: Drama"] * 40})
    spark.createDataFrame(items).coalesce(1).createOrReplaceTempView("oom_items")
    with pytest.raises(PythonException, match="FatalEngineError.*CUDA out of memory"):
        spark.sql("SELECT item_id, oom_annotate_all(title, description) AS a "
                  "FROM oom_items").collect()
    assert len(calls.read_text().splitlines()) == 1
