"""Fine-tuning on human labels (spark_jobs.finetune, quality.finetune) on a tiny built LLM.

The model is tests/tiny_llm.py's Llama (byte-level BPE trained here, pieces of at most 4
characters so genre labels span several tokens), 64-wide heads so vLLM's CPU build serves it.
One module-scoped run trains a few steps on MovieLens genre labels; the transformers engine
and the vllm engine (vLLM's CPU build, in process, started once) then load the output
directory as it is. The held-out items are checked to be absent from what was trained on,
by recording every example the trainer builds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quality import finetune as core
from spark_jobs import finetune
from spark_jobs.evaluate import MOVIELENS_LABEL_MAP, movielens_genre_items, truth_sets
from tests.conftest import ROOT
from tests.tiny_llm import build_tiny_llm
from udfs.engines.hf import TransformersEngine
from udfs.engines.prompts import label_continuations, label_probabilities
from udfs.spec import load_spec

SPEC = ROOT / "specs" / "movielens_genre.yaml"
GENRE = load_spec(SPEC).attribute("genre")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_ft"), max_token_length=4,
                          hidden_size=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The first 200 MovieLens movies; human labels: the single-genre ones (genres folded
    onto the spec's labels as the evaluation folds them), labels seen twice or more."""
    base = tmp_path_factory.mktemp("ft_data")
    items = movielens_genre_items(limit=200)
    truth = truth_sets(items["genres"], GENRE.labels, MOVIELENS_LABEL_MAP)
    single = truth.map(len) == 1
    labels = pd.DataFrame({"item_id": items["item_id"][single],
                           "label": truth[single].map(lambda s: next(iter(s)))})
    labels = labels[labels["label"].map(labels["label"].value_counts()) >= 2]
    items.to_parquet(base / "items.parquet", index=False)
    labels.to_csv(base / "human.csv", index=False)
    return {"dir": base, "items": items, "labels": labels,
            "items_path": str(base / "items.parquet"), "labels_path": str(base / "human.csv")}


def args(data, out, model, *extra) -> list[str]:
    return ["--spec", str(SPEC), "--attribute", "genre", "--labels", data["labels_path"],
            "--items", data["items_path"], "--text-columns", "title,tags", "--out", str(out),
            "--model", str(model), *extra]


@pytest.fixture(scope="module")
def trained(tiny, data, tmp_path_factory):
    """One fine-tuning run, every training example it built recorded."""
    out = tmp_path_factory.mktemp("ft_run") / "model"
    seen: list[pd.DataFrame] = []
    real = finetune.examples_for
    patch = pytest.MonkeyPatch()
    patch.setattr(finetune, "examples_for",
                  lambda tok, attr, frame, n: (seen.append(frame.copy()), real(tok, attr, frame, n))[1])
    try:
        code = finetune.main(args(data, out, tiny, "--batch-size", "4", "--epochs", "2",
                                  "--lr", "3e-3", "--precision", "float32", "--seed", "7"))
    finally:
        patch.undo()
    assert code == 0
    return {"out": out, "card": json.loads((out / "card.json").read_text()), "seen": seen}


# ------------------------------------------------------------------ the pure core

def test_split_is_stratified_seeded_and_order_free():
    ids = list(range(40))
    labels = ["a"] * 30 + ["b"] * 8 + ["c"] * 2
    s = core.split(ids, labels, 0.25, seed=1)
    assert sorted(s.train + s.heldout) == ids and not set(s.train) & set(s.heldout)
    held = [labels[i] for i in s.heldout]
    assert (held.count("a"), held.count("b"), held.count("c")) == (8, 2, 1)
    shuffled = np.random.default_rng(0).permutation(40).tolist()
    assert core.split(shuffled, [labels[i] for i in shuffled], 0.25, seed=1) == s
    assert core.split(ids, labels, 0.25, seed=2) != s
    # items with the same text stay on one side
    groups = [i // 2 for i in ids]
    g = core.split(ids, labels, 0.25, seed=1, groups=groups)
    assert all((i in g.heldout) == (i + 1 in g.heldout) for i in range(0, 40, 2))


def test_subsets_nest():
    train = list(range(500))
    small, large = core.subset(train, 100, 0), core.subset(train, 300, 0)
    assert len(small) == 100 and len(large) == 300 and set(small) <= set(large)
    assert core.subset(train, None, 0) == tuple(train) == core.subset(train, 900, 0)


def test_a_training_example_is_what_the_engines_score(tiny):
    """The trained sequence is the engine's context then the label's tokens in context; the
    loss of a one-example batch is minus the transformers engine's score of that label."""
    import torch
    engine = TransformersEngine(str(tiny), dtype="float32")
    try:
        text, label = "Heat (1995) Tags: heist", "Crime"
        prompt = engine.prompt(GENRE, text)
        ex = core.example(engine.encoder(GENRE), prompt, GENRE, label, 512,
                          engine.tokenizer.bos_token_id)
        context, conts = label_continuations(engine.encoder(GENRE), prompt, GENRE.labels)
        assert ex.ids == tuple(context) + tuple(conts[GENRE.labels.index(label)])
        assert ex.label_tokens == len(conts[GENRE.labels.index(label)]) >= 2
        with torch.no_grad():
            loss = finetune.batch_loss(torch, engine.model, [ex], engine.tokenizer.pad_token_id,
                                       "cpu")
        score = engine.label_loglik([text], GENRE)[0, GENRE.labels.index(label)]
        assert float(loss) == pytest.approx(-score, abs=1e-4)
        # padded beside a longer example, the loss is the same (left padding, position ids)
        other = core.example(engine.encoder(GENRE), engine.prompt(GENRE, "Up " * 30), GENRE,
                             "Drama", 512, engine.tokenizer.bos_token_id)
        with torch.no_grad():
            pair = finetune.batch_loss(torch, engine.model, [ex, other],
                                       engine.tokenizer.pad_token_id, "cpu")
            alone = finetune.batch_loss(torch, engine.model, [other],
                                        engine.tokenizer.pad_token_id, "cpu")
        assert float(pair) == pytest.approx((float(loss) + float(alone)) / 2, abs=1e-4)
    finally:
        engine.close()


# ------------------------------------------------------------------ one run, end to end

def test_the_held_out_items_are_never_trained_on(trained, data):
    card, seen = trained["card"], trained["seen"]
    train, held = card["splits"]["train"], card["splits"]["heldout"]
    assert train["count"] + held["count"] == len(data["labels"])
    assert not set(train["ids"]) & set(held["ids"]) and held["count"] > 0
    assert train["ids_sha256"] == core.ids_hash(train["ids"])
    trained_ids = set().union(*(set(f["item_id"]) for f in seen))
    trained_texts = set().union(*(set(f["text"]) for f in seen))
    assert trained_ids == set(train["ids"])
    held_texts = set(data["items"].set_index("item_id").loc[held["ids"]]
                     .pipe(lambda f: (f["title"] + " " + f["tags"].fillna("")).str.strip()))
    assert not trained_texts & held_texts
    # a held-out label per label that has items: stratified
    labels = data["labels"].set_index("item_id")["label"]
    assert set(labels.loc[held["ids"]]) == set(labels)


def test_the_card_says_what_was_trained(trained, data, tiny):
    card = trained["card"]
    assert card["base_model"]["name"] == str(tiny)
    assert card["attribute"] == "genre" and card["attribute_version"] == GENRE.version
    assert len(card["data"]["sha256"]) == 64
    hp = card["hyperparameters"]
    assert (hp["epochs"], hp["lr"], hp["batch_size"], hp["seed"]) == (2, 3e-3, 4, 7)
    t = card["training"]
    assert t["steps"] == 2 * -(-card["splits"]["train"]["count"] // 4)
    assert len(t["losses"]) == t["steps"] and t["estimated_seconds"] > 0
    m = card["heldout_metrics"]
    assert m["items"] == card["splits"]["heldout"]["count"] and m["errors"] == 0
    assert 0 <= m["strict_accuracy"] <= 1 and 0 < m["majority_baseline"] <= 1


def test_the_annotate_job_says_what_a_tuned_model_was_not_trained_on(trained):
    """Its card tells the annotate job: other attributes, or the attribute redefined."""
    import dataclasses
    from spark_jobs.annotate import tuned_model_notes
    engine = {"type": "vllm", "model": str(trained["out"])}
    spec = load_spec(SPEC)
    only_genre = spec.restricted(["genre"])
    assert tuned_model_notes(only_genre, [engine]) == []  # asked what it was trained for
    # the genre spec's multi-label genres attribute is another attribute: said so
    (note,) = tuned_model_notes(spec, [engine])
    assert note == ("model was fine-tuned on genre only; it answers genres "
                    "(and any caption) untrained")
    demo = load_spec(ROOT / "specs" / "movielens.yaml")
    (note,) = tuned_model_notes(demo, [engine, {"type": "embedding"}])
    assert note == ("model was fine-tuned on genre only; it answers vibe, audience "
                    "(and any caption) untrained")
    redefined = dataclasses.replace(spec, attributes={"genre": dataclasses.replace(
        GENRE, definitions=("Another definition.", *GENRE.definitions[1:]))})
    assert redefined.attribute("genre").version != GENRE.version
    (note,) = tuned_model_notes(redefined, [engine])
    assert f"fine-tuned on genre version {GENRE.version}" in note and "changed since" in note


def test_the_transformers_engine_loads_what_was_learned(trained, tiny, data):
    """The saved model, loaded as it is, scores the training labels higher than the base."""
    card = trained["card"]
    rows = finetune.plan(GENRE, data["labels"], data["items"], ["title", "tags"],
                         seed=7).frame(card["splits"]["train"]["ids"])
    columns = [GENRE.labels.index(lab) for lab in rows["label"]]

    def mean_true_loglik(model) -> float:
        engine = TransformersEngine(str(model), dtype="float32")
        try:
            ll = engine.label_loglik(rows["text"].tolist(), GENRE)
        finally:
            engine.close()
        return float(np.log(label_probabilities(ll))[np.arange(len(rows)), columns].mean())

    assert mean_true_loglik(trained["out"]) > mean_true_loglik(tiny) + 0.5
    config = json.loads((trained["out"] / "config.json").read_text())
    assert "quantization_config" not in config


def test_the_vllm_engine_serves_it_as_transformers_does(trained, data):
    from udfs.engines import build_engine
    out = trained["out"]
    texts = data["items"]["title"].head(6).tolist()
    engine = build_engine({"type": "vllm", "model": str(out), "max_model_len": 512,
                           "engine_args": {"dtype": "float32", "enforce_eager": True}})
    try:
        got = label_probabilities(engine.label_loglik(texts, GENRE))
    finally:
        engine.close()
    reference = TransformersEngine(str(out), dtype="float32")
    try:
        expected = label_probabilities(reference.label_loglik(texts, GENRE))
    finally:
        reference.close()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_progress_and_estimate_are_printed(tiny, data, tmp_path, capsys):
    assert finetune.main(args(data, tmp_path / "m", tiny, "--max-train", "12",
                              "--batch-size", "4", "--eval-engine", "none")) == 0
    printed = capsys.readouterr().out
    assert "[finetune] estimate: 3 steps at about" in printed
    assert printed.index("estimate:") < printed.index("step 1/3")
    assert "loss " in printed and "s/step" in printed
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["splits"]["train"]["count"] == 12 and card["heldout_metrics"] is None


# ------------------------------------------------------------------ bad input, refused first

@pytest.mark.parametrize("case, message", [
    ("outside", "labels outside the spec's label set for 'genre': 'Cartoon'"),
    ("unknown", "unknown item ids (not in the items table): 999999"),
    ("few", "too few items per label (at least 2 each, to train on and to hold out): "
            "Western 1"),
    ("overlap", "held-out split overlaps training: held-out items"),
])
def test_bad_input_is_refused_before_training_with_one_line(case, message, data, tmp_path,
                                                            capsys):
    labels, items = data["labels"].copy(), data["items"].copy()
    extra = []
    if case == "outside":
        labels.iloc[0, 1] = "Cartoon"
    elif case == "unknown":
        labels = pd.concat([labels, pd.DataFrame({"item_id": [999999], "label": ["Drama"]})])
    elif case == "few":
        western = items[~items["item_id"].isin(labels["item_id"])].iloc[0]["item_id"]
        labels = pd.concat([labels, pd.DataFrame({"item_id": [western], "label": ["Western"]})])
    elif case == "overlap":  # a held-out item whose text is a training item's text
        a, b = labels["item_id"].iloc[:2]
        items.loc[items["item_id"] == b, ["title", "tags"]] = \
            items.loc[items["item_id"] == a, ["title", "tags"]].to_numpy()
        pd.DataFrame({"item_id": [b]}).to_csv(tmp_path / "held.csv", index=False)
        extra = ["--heldout-ids", str(tmp_path / "held.csv")]
    labels.to_csv(tmp_path / "human.csv", index=False)
    items.to_parquet(tmp_path / "items.parquet", index=False)
    bad = {**data, "labels_path": str(tmp_path / "human.csv"),
           "items_path": str(tmp_path / "items.parquet")}
    # no such model: the inputs are refused before any model is looked for
    assert finetune.main(args(bad, tmp_path / "out", tmp_path / "no-model", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finetune: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_one_per_line():
    problems = core.check_inputs([1, 2, 2, 3, 4], ["Drama", "Drama", "Comedy", "Cartoon", "War"],
                                 GENRE, {1, 2, 3})
    assert len(problems) == 4
    assert problems[0].startswith("labels outside the spec's label set")
    assert problems[1] == "unknown item ids (not in the items table): 4"
    assert problems[2].startswith("item ids labelled more than once: 2")
    assert problems[3].startswith("too few items per label") and "Comedy 1, War 1" in problems[3]
    assert core.check_split([1, 2], [2, 3], {1: "a", 2: "b", 3: "c"}) == [
        "held-out split overlaps training: item ids 2 are in both"]


# ------------------------------------------------------------------ the report and the demo

def test_the_report_scores_every_row_on_the_same_held_out_items(tiny, tmp_path, capsys):
    """Baselines (MiniLM, zero-shot, 6-shot) and fine-tuned points, `all` included, on one
    held-out sample; the few-shot prompt's example movies are never among the labels."""
    from spark_jobs import finetune_report
    from spark_jobs.compare_engines import FEWSHOT
    from udfs.engines import model_name
    from spark_jobs.demo import llm_engine

    out = tmp_path / "report"
    assert finetune_report.main([
        "--movies", "200", "--sizes", "8,all", "--heldout", "10", "--model", str(tiny),
        "--baselines", "minilm,zero-shot,few-shot", "--eval-engine", "transformers",
        "--lr", "3e-3", "--out", str(out), "--keep-models"]) == 0
    report = json.loads((out / "learning_curve.json").read_text())
    assert [r["model"] for r in report["rows"]] == [
        "MiniLM embedding, zero-shot", f"{tiny} zero-shot", f"{tiny} 6-shot",
        f"{tiny} fine-tuned", f"{tiny} fine-tuned"]
    assert all(r["strict_n"] == 10 and r["errors"] == 0 for r in report["rows"])
    small, whole = report["rows"][3:]
    assert (small["size"], small["train_items"]) == (8, 8)
    assert whole["size"] == "all" and whole["train_items"] == report["train_pool"] > 8
    shown = {e.text for e in load_spec(FEWSHOT).attribute("genre").examples}
    for size in (8, "all"):
        card = json.loads((out / f"smollm2-genre-{size}" / "card.json").read_text())
        assert card["splits"]["heldout"]["ids_sha256"] == report["heldout_ids_sha256"]
    items, labels = finetune_report.human_labels(200)
    assert not set(finetune.plan(GENRE, labels, items, ["title", "tags"]).rows["text"]) & shown
    printed = capsys.readouterr().out
    assert f"| majority baseline | | | {report['majority_baseline']:.3f} |" in printed
    assert f"| {tiny} fine-tuned | {report['train_pool']} |" in printed
    # the kept `all` model is what the demo's --llm-model points vLLM at
    config = llm_engine("smollm2", str(out / "smollm2-genre-all"))
    assert config["type"] == "vllm" and config["model"] == str(out / "smollm2-genre-all")
    assert model_name(config) == "vllm:smollm2-genre-all"


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "100,abc"], "--sizes takes positive integers and 'all', not 'abc'"),
    (["--sizes", "0"], "--sizes takes positive integers and 'all', not '0'"),
    (["--sizes", "all,all"], "--sizes needs at least one size, each once"),
    (["--baselines", "gpt5"], "unknown --baselines ['gpt5']"),
])
def test_report_options_are_refused_with_one_line(argv, message, tmp_path, capsys):
    from spark_jobs import finetune_report
    assert finetune_report.main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finetune_report: error: ") and message in err[0]
    assert not (tmp_path / "r").exists()


def test_the_readme_inputs_train_as_written(tiny, tmp_path):
    """--write-inputs gives the human.csv and items.parquet README's fine-tuning example
    passes to spark_jobs.finetune."""
    from spark_jobs import finetune_report
    assert finetune_report.main(["--write-inputs", str(tmp_path / "in"), "--movies", "200"]) == 0
    labels = pd.read_csv(tmp_path / "in" / "human.csv")
    items = pd.read_parquet(tmp_path / "in" / "items.parquet")
    assert list(labels.columns) == ["item_id", "label"] and set(labels["label"]) <= set(GENRE.labels)
    assert list(items.columns) == ["item_id", "title", "tags"] and len(items) > len(labels)
    assert finetune.main(["--spec", str(SPEC), "--attribute", "genre",
                          "--labels", str(tmp_path / "in" / "human.csv"),
                          "--items", str(tmp_path / "in" / "items.parquet"),
                          "--text-columns", "title,tags", "--out", str(tmp_path / "m"),
                          "--model", str(tiny), "--max-train", "8",
                          "--eval-engine", "none"]) == 0
    assert (tmp_path / "m" / "config.json").exists()


def test_the_demo_refuses_a_bad_llm_model_with_one_line(tmp_path):
    from spark_jobs.demo import LLM_ENGINES, llm_engine
    assert llm_engine("smollm2") == LLM_ENGINES["smollm2"] and llm_engine("embedding") is None
    with pytest.raises(SystemExit, match=r"^demo: error: --llm-model .*: not a Hugging Face "
                                         r"model directory \(no config.json\)$"):
        llm_engine("smollm2", str(tmp_path))
    with pytest.raises(SystemExit, match=r"^demo: error: --llm-model needs an LLM --engine"):
        llm_engine("embedding", str(tmp_path))
