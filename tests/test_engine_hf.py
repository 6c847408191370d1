"""The transformers engine on a tiny local Llama: label scoring, padding, captions, Spark."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import udfs
from tests.tiny_llm import build_tiny_llm, tiny_llm_dir  # noqa: F401 - session fixture
from udfs.engines import build_engine, model_name
from udfs.annotator import annotate_texts
from udfs.engines.hf import TransformersEngine, label_probabilities
from udfs.engines.prompts import label_continuations
from udfs.spec import Attribute, Example

TEXTS = [
    "Alien (1979). Genres: Horror, Sci-Fi",
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "Up",
    "Casablanca (1942). Genres: Drama, Romance, War",
    "Ω ☃ unusual → text with ümlauts",
]


@pytest.fixture(scope="module")
def engine(tiny_llm_dir):
    # batch_size 4 is smaller than texts x labels, so batches mix texts and prompt lengths
    eng = build_engine({"type": "transformers", "model": str(tiny_llm_dir), "batch_size": 4})
    yield eng
    eng.close()


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TransformersEngine(str(missing))


def test_model_name_names_the_directory(engine, tiny_llm_dir):
    assert engine.model_name == f"transformers:{tiny_llm_dir.name}"
    # known without building, as the annotate job compares it with each row's model
    assert model_name({"type": "transformers", "model": str(tiny_llm_dir)}) == engine.model_name


def test_labels_are_declared_and_confidence_is_their_probability(engine, spec):
    for attribute in spec.attributes.values():
        out = engine.classify(TEXTS, attribute)
        assert len(out.labels) == len(out.confidences) == len(TEXTS)
        assert set(out.labels) <= set(attribute.labels)
        probs = label_probabilities(engine.label_loglik(TEXTS, attribute))
        for label, conf, row in zip(out.labels, out.confidences, probs):
            assert 0 < conf <= 1
            # the chosen label is the most likely one and its confidence is its probability
            assert conf == pytest.approx(row.max())
            assert label == attribute.labels[int(row.argmax())]


def test_scores_are_log_likelihoods_and_probabilities_sum_to_one(engine, spec):
    attribute = spec.attributes["vibe"]
    loglik = engine.label_loglik(TEXTS, attribute)
    assert loglik.shape == (len(TEXTS), len(attribute.labels))
    assert np.isfinite(loglik).all() and (loglik < 0).all()
    probs = label_probabilities(loglik)
    assert np.all(probs > 0) and np.all(probs <= 1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_label_probabilities_is_stable_for_extreme_scores():
    probs = label_probabilities(np.array([[-1e4, 0.0, -1e4], [-5e3, -5e3, -5e3]]))
    np.testing.assert_allclose(probs, [[0, 1, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-12)


def test_batched_scoring_equals_one_by_one(engine, spec):
    """Left padding with position ids from the mask must not change any score."""
    attribute = spec.attributes["vibe"]
    batched = engine.label_loglik(TEXTS, attribute)
    single = np.concatenate([engine.label_loglik([t], attribute) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    assert engine.classify(TEXTS, attribute).labels == [
        engine.classify([t], attribute).labels[0] for t in TEXTS]


def test_one_token_labels_read_from_one_sequence_equal_each_labels_own_sequence(engine):
    """Labels of one token each are read from the next-token distribution after the context,
    one sequence per prompt: the log-probabilities a full forward pass of prompt + label
    gives each label, batched with labels of several tokens."""
    import torch
    short = Attribute(name="pick", labels=("a", "b", "c"), definitions=("x", "y", "z"))
    mixed = Attribute(name="mixed", labels=("a", "bcdefgh"), definitions=("x", "y"))
    tok, model = engine.tokenizer, engine.model
    for attribute in (short, mixed):
        got = engine.label_loglik(TEXTS, attribute)
        for row, text in zip(got, TEXTS):
            context, conts = label_continuations(lambda s: tok(s).input_ids,
                                                 attribute.render(text), attribute.labels)
            assert (attribute is mixed) == any(len(c) > 1 for c in conts)
            for value, ids in zip(row, conts):
                with torch.inference_mode():
                    logp = model(torch.tensor([context + ids])).logits[0].log_softmax(-1)
                expected = sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(ids))
                assert value == pytest.approx(expected, abs=1e-4)
    before = engine.usage()["pick"]["prompt_tokens"]
    engine.label_loglik(TEXTS[:1], short)
    context, _ = label_continuations(lambda s: tok(s).input_ids, short.render(TEXTS[0]),
                                     short.labels)
    assert engine.usage()["pick"]["prompt_tokens"] - before == len(context)  # one sequence


def test_long_prompts_are_cut_from_the_left(tiny_llm_dir, spec):
    eng = TransformersEngine(str(tiny_llm_dir), max_prompt_tokens=24)
    attribute = spec.attributes["audience"]
    long_text = "A very long synopsis. " * 200
    prompt = attribute.render(long_text)
    ids = eng._encode(attribute, prompt)
    full = eng.tokenizer(prompt).input_ids
    assert len(full) > 24 and ids == full[-24:]  # the question at the end survives
    out = eng.classify([long_text], attribute)
    assert out.labels[0] in attribute.labels


def test_captions_are_bounded_strings_and_batching_does_not_change_them(engine, spec):
    caps = engine.caption(TEXTS, spec.caption)
    assert len(caps) == len(TEXTS) and all(isinstance(c, str) for c in caps)
    vocab = engine.tokenizer.convert_ids_to_tokens(list(range(len(engine.tokenizer))))
    longest_token = max(len(engine.tokenizer.convert_tokens_to_string([t])) for t in vocab)
    assert all(len(c) <= spec.caption.max_tokens * longest_token for c in caps)
    assert all(c == c.strip() for c in caps)
    assert caps == [engine.caption([t], spec.caption)[0] for t in TEXTS]


def test_runs_inside_spark_sql(spark, spec, tiny_llm_dir):
    udfs.register(spark, spec, engine={"type": "transformers", "model": str(tiny_llm_dir)},
                  prefix="hf_")
    items = pd.DataFrame({"item_id": [1, 2, 3, 4, 5],
                          "title": [TEXTS[0], TEXTS[1], None, "   ", TEXTS[3]],
                          "description": ["Genres: Horror", None, None, "", "Genres: Drama"]})
    # one partition: one Python worker loads the model (and no ORDER BY, whose range
    # sampling would run the UDFs a second time)
    spark.createDataFrame(items).coalesce(1).createOrReplaceTempView("hf_items")
    out = spark.sql("""
        SELECT item_id, hf_annotate('vibe', title, description) AS vibe,
               hf_caption(title, description) AS cap
        FROM hf_items""").toPandas().sort_values("item_id", ignore_index=True)
    assert out["item_id"].tolist() == [1, 2, 3, 4, 5]
    vibes = {r.item_id: r.vibe for r in out.itertuples()}
    for item_id in (1, 2, 5):
        row = vibes[item_id]
        assert row["error"] is None
        assert row["label"] in spec.attributes["vibe"].labels
        assert 0 < row["confidence"] <= 1
        assert row["model"] == f"transformers:{tiny_llm_dir.name}"
    for item_id in (3, 4):  # null and blank text: a row error, never a lost batch
        assert vibes[item_id]["label"] is None and vibes[item_id]["error"]
    caps = {r.item_id: r.cap for r in out.itertuples()}
    assert all(isinstance(caps[i]["caption"], str) and caps[i]["error"] is None
               for i in (1, 2, 5))
    assert caps[3]["caption"] is None and caps[3]["error"]


@pytest.fixture(scope="module")
def sentencepiece_llm(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_unigram"), family="unigram",
                          max_token_length=4)


def test_labels_are_scored_as_tokenised_in_context(sentencepiece_llm, spec):
    """A SentencePiece tokenizer writes " dark" alone as "▁▁dark" but after the prompt as
    "▁dark": the label is scored as the model sees it after the prompt."""
    import torch

    eng = TransformersEngine(str(sentencepiece_llm))
    tok, attribute = eng.tokenizer, spec.attributes["vibe"]
    prompt = attribute.render("Heat (1995)")
    context, full = tok(prompt).input_ids, tok(prompt + " dark").input_ids
    assert full[:len(context)] == context
    assert full[len(context):] != tok(" dark", add_special_tokens=False).input_ids
    with torch.inference_mode():  # one unpadded forward pass over prompt + label
        logp = eng.model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
    expected = sum(float(logp[i - 1, full[i]]) for i in range(len(context), len(full)))
    got = eng.label_loglik(["Heat (1995)"], attribute)[0, attribute.labels.index("dark")]
    assert got == pytest.approx(expected, abs=1e-4)


def chat_attribute(attribute):
    """The attribute asked through the chat template, with one few-shot turn."""
    return dataclasses.replace(attribute, chat=True,
                               examples=(Example("Heat (1995)", attribute.labels[1]),))


def test_a_chat_attribute_scores_the_label_as_the_assistants_answer(sentencepiece_llm, spec):
    """chat: true renders the question through the model's own template (the few-shot
    example as a user turn answered by the assistant), and scores each label as the
    assistant's reply: the same numbers as transformers' own tokenisation of the whole
    conversation, a BOS once."""
    import torch
    eng = TransformersEngine(str(sentencepiece_llm), dtype="float32")
    tok = eng.tokenizer
    attribute = chat_attribute(spec.attributes["vibe"])
    text = "Toy Story (1995)"
    prompt = eng.prompt(attribute, text)
    assert prompt.startswith("<s>user:\n") and prompt.endswith("assistant:\n")
    assert f"assistant:\n{attribute.labels[1]}</s>" in prompt  # the example's answer
    messages = attribute.messages(text)
    context = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert eng.encoder(attribute)(prompt) == context and context.count(tok.bos_token_id) == 1
    expected = []
    for label in attribute.labels:
        ids = tok.apply_chat_template(messages + [{"role": "assistant", "content": label}],
                                      continue_final_message=True)["input_ids"]
        assert ids[:len(context)] == context
        with torch.inference_mode():
            logp = eng.model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        expected.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(context), len(ids))))
    got = eng.label_loglik([text], attribute)
    np.testing.assert_allclose(label_probabilities(got),
                               label_probabilities(np.array([expected])), atol=1e-5)
    # the plain prompt is another question: its version differs, so tables redo it
    assert attribute.version != spec.attributes["vibe"].version
    caption = eng.caption([text], dataclasses.replace(spec.caption, chat=True))
    assert len(caption) == 1 and isinstance(caption[0], str)


def test_a_model_without_a_chat_template_says_so(tmp_path, spec):
    path = build_tiny_llm(tmp_path / "plain")
    config = path / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    eng = TransformersEngine(str(path))
    out = annotate_texts(eng, chat_attribute(spec.attributes["vibe"]), pd.Series(["Heat"]))
    assert out["label"].isna().all()
    assert "chat template (chat: true)" in out["error"][0] and "has none" in out["error"][0]
