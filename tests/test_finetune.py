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
GENRES = load_spec(SPEC).attribute("genres")  # multi-label, all 18 MovieLens genres


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


def test_the_estimate_times_the_update_without_changing_a_weight(tiny):
    """The update (clipping, AdamW) is timed on a throwaway optimizer whose step leaves every
    weight bit for bit as it was, and is added once per step to the estimate."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    seconds = finetune.update_seconds(torch, params, grad_clip=1.0)
    assert seconds > 0 and all(p.grad is None for p in params)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert core.estimate_seconds([100, 300], 100, 1.0, 0.5) == pytest.approx(4.0 + 2 * 0.5)


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


# ------------------------------------------------------------------ multi-label attributes

@pytest.fixture(scope="module")
def genre_sets(tmp_path_factory) -> dict:
    """The first 400 MovieLens movies' genre sets (every one of the 18 labels on 2 or more)."""
    from spark_jobs.finetune_report import human_genre_sets
    base = tmp_path_factory.mktemp("ft_multi_data")
    items = movielens_genre_items(limit=400)
    labels = human_genre_sets(items)
    items.to_parquet(base / "items.parquet", index=False)
    labels.to_csv(base / "genres.csv", index=False)
    return {"items": items, "labels": labels, "items_path": str(base / "items.parquet"),
            "labels_path": str(base / "genres.csv")}


def multi_args(data, out, model, *extra) -> list[str]:
    return ["--spec", str(SPEC), "--attribute", "genres", "--labels", data["labels_path"],
            "--items", data["items_path"], "--text-columns", "title,tags", "--out", str(out),
            "--model", str(model), *extra]


@pytest.fixture(scope="module")
def trained_multi(tiny, genre_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_multi_run") / "model"
    seen: list[pd.DataFrame] = []
    real = finetune.examples_for
    patch = pytest.MonkeyPatch()
    patch.setattr(finetune, "examples_for",
                  lambda tok, attr, frame, n: (seen.append(frame.copy()), real(tok, attr, frame, n))[1])
    try:
        code = finetune.main(multi_args(genre_sets, out, tiny, "--max-train", "24",
                                        "--max-heldout", "12", "--max-dev", "16",
                                        "--batch-size", "8",
                                        "--epochs", "2", "--lr", "3e-3", "--precision",
                                        "float32", "--seed", "7"))
    finally:
        patch.undo()
    assert code == 0
    return {"out": out, "card": json.loads((out / "card.json").read_text()), "seen": seen}


def test_multi_label_examples_are_the_yes_no_answers_engine_tag_scores(tiny):
    """One example per item and label: the label's question (Attribute.questions) then yes
    when the label is the item's, no otherwise; its loss is minus the engine's score."""
    import torch
    engine = TransformersEngine(str(tiny), dtype="float32")
    try:
        frame = pd.DataFrame({"text": ["Heat (1995) Tags: heist", "Up (2009)"],
                              "label": ["Action|Crime|Thriller", "Animation"]})
        examples = finetune.examples_for(engine.tokenizer, GENRES, frame, 512)
        assert len(examples) == 2 * len(GENRES.labels)
        yes_no = GENRES.yes_no()
        for k, (text, chosen) in enumerate([(t, set(lab.split("|"))) for t, lab in
                                            zip(frame["text"], frame["label"])]):
            questions = GENRES.questions(text)
            scores = engine.label_loglik(questions, yes_no)  # [labels, (yes, no)]
            for j, lab in enumerate(GENRES.labels):
                ex = examples[k * len(GENRES.labels) + j]
                answer = 0 if lab in chosen else 1
                context, conts = label_continuations(engine.encoder(yes_no),
                                                     engine.prompt(yes_no, questions[j]),
                                                     yes_no.labels)
                assert ex.ids == tuple(context) + tuple(conts[answer])
                with torch.no_grad():
                    loss = finetune.batch_loss(torch, engine.model, [ex],
                                               engine.tokenizer.pad_token_id, "cpu")
                assert float(loss) == pytest.approx(-scores[j, answer], abs=1e-4)
    finally:
        engine.close()


def test_a_multi_label_split_holds_out_every_label(genre_sets):
    plan = finetune.plan(GENRES, genre_sets["labels"], genre_sets["items"], ["title", "tags"],
                         seed=3)
    sets = plan.rows.set_index("item_id")["label"].map(lambda v: set(v.split("|")))
    held = set().union(*sets.loc[list(plan.heldout)])
    assert held == set(GENRES.labels)  # Film-Noir, on 3 of the 400, too
    assert not set(plan.train) & set(plan.heldout)
    # the rest of the training split is the development split (the per-label thresholds)
    assert len(plan.train) + len(plan.dev) + len(plan.heldout) == len(genre_sets["labels"])
    # stored in spec order, whatever order the table gave
    shuffled = genre_sets["labels"].assign(labels=genre_sets["labels"]["labels"].map(
        lambda v: "|".join(reversed(v.split("|")))))
    again = finetune.plan(GENRES, shuffled, genre_sets["items"], ["title", "tags"], seed=3)
    assert again.rows["label"].tolist() == plan.rows["label"].tolist()
    assert (again.train, again.heldout, again.data_hash) == (plan.train, plan.heldout,
                                                             plan.data_hash)


def test_a_multi_label_run_never_trains_on_held_out_items(trained_multi, genre_sets):
    card, seen = trained_multi["card"], trained_multi["seen"]
    train, held = card["splits"]["train"], card["splits"]["heldout"]
    assert (train["count"], held["count"]) == (24, 12)
    assert not set(train["ids"]) & set(held["ids"])
    assert set().union(*(set(f["item_id"]) for f in seen)) == set(train["ids"])
    texts = finetune.plan(GENRES, genre_sets["labels"], genre_sets["items"],
                          ["title", "tags"]).rows.set_index("item_id")["text"]
    assert not set().union(*(set(f["text"]) for f in seen)) & set(texts.loc[held["ids"]])
    assert card["kind"] == "multi" and card["attribute"] == "genres"
    assert card["attribute_version"] == GENRES.version and "yes/no" in card["objective"]
    assert card["data"]["label_counts"]["Drama"] == int(
        genre_sets["labels"]["labels"].str.split("|").map(lambda s: "Drama" in s).sum())
    t = card["training"]
    assert t["examples"] == 24 * len(GENRES.labels)
    assert t["steps"] == 2 * -(-24 * len(GENRES.labels) // 8)
    m = card["heldout_metrics"]
    assert m["kind"] == "multi" and m["n"] == 12 and m["errors"] == 0
    assert 0 <= m["micro_f1"] <= 1 and 0 <= m["ece"] <= 1
    # the baselines are fitted on every labelled item but the scored ones
    assert m["baselines_fitted_on"] == len(genre_sets["labels"]) - 12
    assert m["baselines"]["majority"]["labels"] == ["Drama"]


def test_the_engines_load_what_a_multi_label_run_learned(trained_multi, tiny, genre_sets):
    """Engine.tag on the saved model gives the training items' true answers (yes for their
    labels, no for the others) a higher likelihood than the base model does."""
    from spark_jobs.annotate import tuned_model_notes
    card = trained_multi["card"]
    rows = finetune.plan(GENRES, genre_sets["labels"], genre_sets["items"],
                         ["title", "tags"]).frame(card["splits"]["train"]["ids"])
    truth = np.array([[lab in v.split("|") for lab in GENRES.labels] for v in rows["label"]])

    def mean_true_loglik(model) -> float:
        engine = TransformersEngine(str(model), dtype="float32")
        engine.model_dir = None  # the model's own P(yes): its card's thresholds move them
        try:
            p = engine.tag(rows["text"].tolist(), GENRES)
        finally:
            engine.close()
        return float(np.log(np.where(truth, p, 1 - p)).mean())

    assert mean_true_loglik(trained_multi["out"]) > mean_true_loglik(tiny) + 0.2
    engine = {"type": "transformers", "model": str(trained_multi["out"])}
    assert tuned_model_notes(load_spec(SPEC).restricted(["genres"]), [engine]) == []
    (note,) = tuned_model_notes(load_spec(SPEC), [engine])
    assert note == "model was fine-tuned on genres only; it answers genre (and any caption) untrained"


# ------------------------------------------------------------------ balance and thresholds

def test_balance_weights_give_each_label_equal_yes_and_no_totals():
    sets = [("Drama",), ("Drama", "Comedy"), (), ("Comedy",), ("Drama",), ("Drama", "War")]
    labels = ("Comedy", "Drama", "War", "Western")
    w = core.balance_weights(sets, labels)
    truth = np.array([[lab in s for lab in labels] for s in sets])
    for j, lab in enumerate(labels[:3]):
        yes, no = w[truth[:, j], j], w[~truth[:, j], j]
        assert len(set(yes)) == len(set(no)) == 1  # one weight per answer and label
        assert yes.sum() == pytest.approx(no.sum()) == pytest.approx(len(sets) / 2)
    assert w[:, 2].tolist() == pytest.approx([0.6] * 5 + [3.0])  # War: 1 yes, 5 no
    assert w[:, 3].tolist() == [1.0] * 6  # no item has Western: nothing to balance
    assert w.mean(axis=0) == pytest.approx(1.0)  # the loss keeps its scale


def test_a_weighted_example_weighs_its_loss(tiny):
    import dataclasses
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    frame = pd.DataFrame({"text": ["Heat (1995)"], "label": ["Crime"]})
    a, b = finetune.examples_for(tokenizer, GENRES, frame, 512)[:2]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        la, lb = (float(finetune.batch_loss(torch, model, [e], pad, "cpu")) for e in (a, b))
        both = finetune.batch_loss(torch, model, [dataclasses.replace(a, weight=3.0),
                                                  dataclasses.replace(b, weight=0.5)], pad, "cpu")
    assert float(both) == pytest.approx((3.0 * la + 0.5 * lb) / 2, abs=1e-5)


def test_the_thresholds_maximise_each_label_s_dev_f1():
    p = np.array([[0.9, 0.9, 0.9, 0.4], [0.8, 0.5, 0.1, 0.3], [0.7, 0.4, 0.2, 0.2],
                  [0.6, 0.3, 0.3, 0.1], [0.3, 0.2, 0.4, 0.5], [0.2, 0.1, 0.5, 0.6]])
    y = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0],
                  [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=bool)
    # label 0: at 0.6 three of four chosen are right, F1 6/7 (0.8 gives 4/5)
    # label 1: F1 2/3 at 0.9 and at 0.3: the tie keeps the higher threshold
    # label 2: 0.2 (both positives among five chosen, F1 4/7) beats 0.5 and 0.1 (1/2)
    # label 3: no positive in dev: the spec's threshold
    assert core.fit_thresholds(p, y, 0.5) == [0.6, 0.9, 0.2, 0.5]
    # and against a brute force over every cut, on random scores
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(0)
    p, y = rng.random((40, 5)).round(2), rng.random((40, 5)) < 0.3
    for j, t in enumerate(core.fit_thresholds(p, y, 0.5)):
        best = max(f1_score(y[:, j], p[:, j] >= c) for c in np.unique(p[:, j]))
        assert f1_score(y[:, j], p[:, j] >= t) == best
        assert all(f1_score(y[:, j], p[:, j] >= c) < best for c in np.unique(p[:, j]) if c > t)


@pytest.mark.parametrize("target", [0.5, 0.3, 0.77])
def test_the_calibration_moves_each_fitted_threshold_onto_the_spec_s(target):
    from udfs.engines.calibration import shift
    thresholds = [0.2, target, 0.83, 0.0123]
    t = np.array(thresholds)
    # each threshold lands on the target exactly; a hair below stays below it
    assert shift(t[None], thresholds, target)[0].tolist() == [target] * 4
    below = np.nextafter(t, 0)[None]
    assert (shift(below, thresholds, target) < target).all()
    # the decision is the fitted threshold's, for any score; the logit moves by the offset
    rng = np.random.default_rng(1)
    p = np.vstack([rng.random((500, 4)), t, np.nextafter(t, 1), below[0]])
    q = shift(p, thresholds, target)
    np.testing.assert_array_equal(q >= target, p >= t)
    logit = lambda x: np.log(x) - np.log1p(-x)  # noqa: E731
    offsets = logit(target) - logit(t)
    np.testing.assert_allclose(logit(q) - logit(p), np.broadcast_to(offsets, p.shape),
                               atol=1e-8)
    assert (q[:, 1] == p[:, 1]).all()  # the label at the spec's threshold: untouched


def test_the_dev_split_is_seeded_and_apart_from_training_and_held_out(genre_sets,
                                                                     trained_multi):
    def plan(seed, **kw):
        return finetune.plan(GENRES, genre_sets["labels"], genre_sets["items"],
                             ["title", "tags"], seed=seed, **kw)
    p = plan(3, max_train=50)
    assert p.dev and p.dev_pool == len(p.dev)  # fewer than --max-dev: all of it
    text = p.rows.set_index("item_id")["text"]
    for other in (p.train, p.heldout):
        assert not set(p.dev) & set(other)
        assert not set(text.loc[list(p.dev)]) & set(text.loc[list(other)])
    assert plan(3, max_train=50).dev == p.dev and plan(4, max_train=50).dev != p.dev
    # carved before --max-train draws: the same dev for any training size
    assert plan(3).dev == p.dev and plan(3, max_dev=10).dev == core.subset(p.dev, 10, 3, 5)
    assert plan(3, dev=0).dev == () and plan(3, dev=0).data_hash != p.data_hash
    with pytest.raises(core.FinetuneError, match="--dev is for multi-label attributes"):
        finetune.plan(GENRE, genre_sets["labels"].rename(columns={"labels": "label"}),
                      genre_sets["items"], ["title", "tags"], dev=0.2)
    # the run: the card's dev items were never trained on, nor held out
    card, seen = trained_multi["card"], trained_multi["seen"]
    dev = card["splits"]["dev"]
    assert dev["count"] > 0 and dev["ids_sha256"] == core.ids_hash(dev["ids"])
    assert not set(dev["ids"]) & set().union(*(set(f["item_id"]) for f in seen))
    assert not set(dev["ids"]) & set(card["splits"]["heldout"]["ids"])


def test_a_multi_label_run_balances_its_answers_and_fits_thresholds_on_dev(trained_multi,
                                                                           genre_sets):
    card = trained_multi["card"]
    assert card["hyperparameters"]["balance"] is True and "equal totals" in card["objective"]
    sets = finetune.plan(GENRES, genre_sets["labels"], genre_sets["items"], ["title", "tags"]
                         ).rows.set_index("item_id")["label"].map(lambda v: v.split("|"))
    train = sets.loc[card["splits"]["train"]["ids"]]
    for lab, w in card["training"]["answer_weights"].items():
        yes = int(train.map(lambda s: lab in s).sum())
        if 0 < yes < len(train):  # per label, the yes answers weigh as much as the no
            assert w["yes"] * yes == pytest.approx(w["no"] * (len(train) - yes), rel=1e-3)
        else:
            assert 1.0 in (w["yes"], w["no"])
    # the thresholds: those that maximise F1 on the dev items, scored by the model as saved
    cal = card["calibration"]
    assert (cal["attribute"], cal["attribute_version"]) == ("genres", GENRES.version)
    dev = card["splits"]["dev"]["ids"]
    assert cal["fitted_on"]["split"] == "dev" and cal["fitted_on"]["items"] == len(dev)
    engine = TransformersEngine(str(trained_multi["out"]), dtype="float32")
    engine.model_dir = None  # the model's own probabilities
    try:
        texts = finetune.plan(GENRES, genre_sets["labels"], genre_sets["items"],
                              ["title", "tags"]).frame(dev)["text"].tolist()
        raw = engine.tag(texts, GENRES)
    finally:
        engine.close()
    truth = np.array([[lab in sets.loc[i] for lab in GENRES.labels] for i in dev])
    expected = core.fit_thresholds(raw, truth, GENRES.threshold)
    np.testing.assert_allclose([cal["thresholds"][lab] for lab in GENRES.labels], expected,
                               atol=1e-6)
    assert any(t != GENRES.threshold for t in expected)
    # the held-out metrics: with the thresholds, and without them for comparison
    m = card["heldout_metrics"]
    assert "dev split" in m["thresholds"] and m["uncalibrated"]["micro_f1"] is not None
    assert set(m["uncalibrated"]) >= {"micro_f1", "macro_f1", "jaccard", "ece", "per_label"}


def test_the_transformers_engine_applies_the_calibration(trained_multi, genre_sets):
    """Loading the tuned directory, Engine.tag gives the model's probabilities with each
    label's logit moved by logit(spec threshold) - logit(fitted threshold): the fitted
    thresholds decide, through Attribute.choose's one rule."""
    thresholds = np.array([trained_multi["card"]["calibration"]["thresholds"][lab]
                           for lab in GENRES.labels])
    texts = genre_sets["items"]["title"].head(8).tolist()
    engine = TransformersEngine(str(trained_multi["out"]), dtype="float32")
    try:
        assert engine.model_dir == str(trained_multi["out"])
        calibrated = engine.tag(texts, GENRES)
        engine.model_dir = None
        raw = engine.tag(texts, GENRES).astype(float)  # the engine's float32
    finally:
        engine.close()
    logit = lambda x: np.log(x) - np.log1p(-x)  # noqa: E731
    moved = thresholds != GENRES.threshold
    assert moved.any()
    np.testing.assert_allclose(logit(calibrated) - logit(raw),
                               np.broadcast_to(logit(GENRES.threshold) - logit(thresholds),
                                               raw.shape), atol=1e-9)
    np.testing.assert_array_equal(calibrated[:, ~moved], raw[:, ~moved])
    np.testing.assert_array_equal(calibrated >= GENRES.threshold, raw >= thresholds)


def test_the_calibration_is_not_applied_to_another_attribute_version(trained_multi,
                                                                     genre_sets, caplog):
    import dataclasses
    other = dataclasses.replace(GENRES, threshold=0.4)  # another definition: another version
    assert other.version != GENRES.version
    texts = genre_sets["items"]["title"].head(4).tolist()
    engine = TransformersEngine(str(trained_multi["out"]), dtype="float32")
    try:
        with caplog.at_level("WARNING", logger="udfs.engines.calibration"):
            first, again = engine.tag(texts, other), engine.tag(texts, other)
        engine.model_dir = None
        raw = engine.tag(texts, other)
    finally:
        engine.close()
    np.testing.assert_array_equal(first, raw)
    np.testing.assert_array_equal(again, raw)
    (record,) = [r for r in caplog.records if r.name == "udfs.engines.calibration"]
    assert f"fitted for genres version {GENRES.version}" in record.getMessage()
    assert "scored without them" in record.getMessage()


@pytest.mark.parametrize("case, message", [
    ("outside", "labels outside the spec's label set for 'genres': 'Cartoon'"),
    ("few", "too few items per label (at least 2 each, to train on and to hold out): "
            "Film-Noir 1"),
    ("common", "too few items without a label (at least 2 each): Drama 0"),
    ("column", "the labels table needs item_id and a 'labels' (or 'genres_labels') column"),
])
def test_bad_multi_label_input_is_refused_before_training(case, message, genre_sets, tmp_path,
                                                          capsys):
    labels = genre_sets["labels"].copy()
    split = labels["labels"].str.split("|")
    if case == "outside":
        labels.iloc[0, 1] += "|Cartoon"
    elif case == "few":
        noir = split.map(lambda s: "Film-Noir" in s)
        first = noir.idxmax()
        labels["labels"] = [v if i == first else "|".join(x for x in s if x != "Film-Noir")
                            for i, (v, s) in enumerate(zip(labels["labels"], split))]
        labels = labels[labels["labels"] != ""]
    elif case == "common":
        labels["labels"] = split.map(lambda s: "|".join(sorted(set(s) | {"Drama"})))
    elif case == "column":
        labels = labels.rename(columns={"labels": "genre_set"})
    labels.to_csv(tmp_path / "genres.csv", index=False)
    bad = {**genre_sets, "labels_path": str(tmp_path / "genres.csv")}
    assert finetune.main(multi_args(bad, tmp_path / "out", tmp_path / "no-model")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finetune: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


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
    genres = pd.read_csv(tmp_path / "in" / "genres.csv")
    assert list(genres.columns) == ["item_id", "labels"] and set(genres["item_id"]) <= set(items["item_id"])
    assert set("|".join(genres["labels"]).split("|")) <= set(GENRES.labels)
    # the held-out file: those of them spark_jobs.evaluate --movielens --sample 200 --seed 0 scores
    from spark_jobs.evaluate import movielens_sample
    drawn = movielens_sample(movielens_genre_items(), None, 200, 0)["item_id"]
    held = pd.read_csv(tmp_path / "in" / "genres_heldout.csv")
    assert set(held["item_id"]) == set(drawn) & set(genres["item_id"])
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
