import dataclasses

import pytest

from udfs.spec import Example, SpecError, load_spec, parse_spec


def base():
    return {"attributes": {"vibe": {"labels": {"dark": "grim", "light": "cheerful"}}},
            "caption": {"descriptors": ["a", "b"], "max_tokens": 8}}


def test_shipped_spec_loads(spec):
    assert set(spec.attributes) == {"vibe", "audience"}
    assert spec.attributes["vibe"].labels[0] == "dark"
    assert spec.caption is not None and spec.caption.descriptors


def test_version_follows_content():
    a = parse_spec(base())
    same = parse_spec(base())
    changed = base()
    changed["attributes"]["vibe"]["labels"]["dark"] = "grim and violent"
    b = parse_spec(changed)
    assert a.attributes["vibe"].version == same.attributes["vibe"].version
    assert a.attributes["vibe"].version != b.attributes["vibe"].version
    assert a.version != b.version
    cap = base()
    cap["caption"]["max_tokens"] = 9
    assert parse_spec(cap).version != a.version
    assert parse_spec(cap).attributes["vibe"].version == a.attributes["vibe"].version


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["attributes"]["vibe"].update(labels=[{"dark": "x"}, {"dark": "y"}]),
     "attributes.vibe.labels"),
    (lambda d: d["attributes"]["vibe"]["labels"].update(dark=""), "attributes.vibe.labels.dark"),
    (lambda d: d["attributes"]["vibe"].update(labels={"only": "one"}), "attributes.vibe.labels"),
    (lambda d: d["attributes"]["vibe"].update(prompt="no placeholder"), "attributes.vibe.prompt"),
    (lambda d: d["attributes"]["vibe"].update(prompt="{text} {nope}"), "attributes.vibe.prompt"),
    (lambda d: d["attributes"]["vibe"].update(examples=[{"text": "t", "label": "zzz"}]),
     "attributes.vibe.examples[0].label"),
    (lambda d: d["caption"].update(max_tokens=0), "caption.max_tokens"),
    (lambda d: d.update(chat="yes"), "chat"),
    (lambda d: d["attributes"]["vibe"].update(chat=1), "attributes.vibe.chat"),
    (lambda d: d.update(attributes={}), "attributes"),
    (lambda d: d["attributes"].update({"bad-name": {"labels": {"a": "x", "b": "y"}}}),
     "attributes.bad-name"),
])
def test_invalid_specs_name_the_field(mutate, field):
    data = base()
    mutate(data)
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert str(err.value).startswith(field + ":")


def test_duplicate_labels_are_reported(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("attributes:\n  vibe:\n    labels:\n      - dark: a\n      - dark: b\n")
    with pytest.raises(SpecError, match=r"duplicate labels \['dark'\]"):
        load_spec(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("attributes: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_render_includes_examples_and_labels(spec):
    vibe = dataclasses.replace(spec.attributes["vibe"],
                               examples=(Example("The Exorcist (1973)", "dark"),))
    prompt = vibe.render("Heat (1995)")
    assert prompt.index("The Exorcist") < prompt.index("Heat (1995)")
    assert "dark, light-hearted" in prompt and prompt.endswith("Answer:")


def test_chat_is_per_spec_or_per_part_and_part_of_the_version():
    plain = parse_spec(base())
    data = base()
    data["chat"] = True
    data["attributes"]["vibe"]["chat"] = False  # a part may opt out
    chat = parse_spec(data)
    assert not plain.attributes["vibe"].chat and not plain.caption.chat
    assert not chat.attributes["vibe"].chat and chat.caption.chat
    assert chat.attributes["vibe"].version == plain.attributes["vibe"].version
    assert chat.caption.version != plain.caption.version
    data["attributes"]["vibe"]["chat"] = True
    data["attributes"]["vibe"]["examples"] = [{"text": "Heat", "label": "dark"}]
    vibe = parse_spec(data).attributes["vibe"]
    turns = vibe.messages("Up")
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    question = dataclasses.replace(vibe, examples=()).render  # the question, no shots
    assert turns[0]["content"] == question("Heat") and turns[1]["content"] == "dark"
    assert turns[2]["content"] == question("Up")
