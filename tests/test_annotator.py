import pandas as pd

from udfs import annotator
from udfs.engines.base import Engine, Labels
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
