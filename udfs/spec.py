"""Attribute specs: the versioned YAML that says what to annotate.

A spec declares attributes (each a closed label set with one-line definitions, a prompt
template and optional few-shot examples, of one of three kinds: `single`, one label per item;
`multi`, any subset of the labels, each with its own probability; `ordinal`, one of ordered
labels with numeric values, whose expected value is reported too), an optional caption and an optional semantic ID
(hierarchical codes quantised from item embeddings, udfs.semantic_ids). Every attribute
carries a version derived from its content, so a changed definition is a new version and the
incremental annotate job knows which rows to redo. The semantic ID's spec version covers its
settings only; the version stored per row is its fitted quantiser's (settings, embedding
model and centroids), since the same settings fitted on another sample are another code.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_PROMPT = (
    "Item: {text}\n"
    "Question: which {attribute} fits this item best? Options: {labels}.\n"
    "Answer:"
)
# A multi-label attribute asks one yes/no question per label, the item first: the item's part
# of the prompt is then the same for every label, so a prefix cache computes it once.
DEFAULT_MULTI_PROMPT = (
    "Item: {text}\n"
    "Question: is \"{label}\" ({definition}) one of this item's {attribute} labels? "
    "Answer yes or no.\n"
    "Answer:"
)
DEFAULT_CAPTION_PROMPT = "Item: {text}\nDescribe this item in a few words:"
KINDS = ("single", "multi", "ordinal")
YES_NO = ("yes", "no")


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the offending field."""


def _version(payload: dict) -> str:
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Example:
    text: str
    label: str = ""               # single and ordinal attributes
    labels: tuple[str, ...] = ()  # multi-label attributes: any subset, maybe empty


@dataclass(frozen=True)
class Attribute:
    name: str
    labels: tuple[str, ...]
    definitions: tuple[str, ...]
    prompt: str = DEFAULT_PROMPT
    examples: tuple[Example, ...] = ()
    description: str = ""
    chat: bool = False  # through the model's chat template (udfs.engines.prompts)
    kind: str = "single"
    min_labels: int = 0            # multi: the chosen set's bounds and the probability a
    max_labels: int | None = None  # label needs to be chosen
    threshold: float = 0.5
    values: tuple[float, ...] = ()  # ordinal: each label's number, increasing

    @property
    def version(self) -> str:
        kind = {} if self.kind == "single" else {"kind": self.kind}  # absent: older versions
        if self.kind == "multi":
            kind.update(min_labels=self.min_labels, max_labels=self.max_labels,
                        threshold=self.threshold)
        elif self.kind == "ordinal":
            kind.update(values=list(self.values))
        return _version({
            "name": self.name, "labels": list(self.labels),
            "definitions": list(self.definitions), "prompt": self.prompt,
            "examples": [[e.text, list(e.labels) if self.kind == "multi" else e.label]
                         for e in self.examples],
            **({"chat": True} if self.chat else {}),  # absent: the versions specs had
            **kind,
        })

    @property
    def multi(self) -> bool:
        return self.kind == "multi"

    @property
    def ordinal(self) -> bool:
        return self.kind == "ordinal"

    def _question(self, text: str) -> str:
        return self.prompt.format(text=text, attribute=self.name, labels=", ".join(self.labels))

    def questions(self, text: str) -> list[str]:
        """A multi-label attribute's prompts for one item, one yes/no question per label,
        each after the few-shot examples (the item's label set, the same for every label,
        so it is part of the shared prefix)."""
        shots = "".join(f"Item: {e.text}\n{self.name} labels: {', '.join(e.labels) or 'none'}"
                        "\n\n" for e in self.examples)
        return [shots + self.prompt.format(text=text, attribute=self.name, label=lab,
                                           definition=d, labels=", ".join(self.labels))
                for lab, d in zip(self.labels, self.definitions)]

    def yes_no(self) -> Attribute:
        """The two-label attribute a multi-label attribute's questions are scored with: its
        texts are questions() already rendered (so a chat template gets one user turn)."""
        return Attribute(name=self.name, labels=YES_NO,
                         definitions=("the label fits", "the label does not fit"),
                         prompt="{text}", chat=self.chat)

    def choose(self, probabilities) -> list[str]:
        """A multi-label attribute's chosen set from its per-label probabilities: the labels
        at or over the threshold, then the most probable added up to min_labels or kept
        down to max_labels; in spec order."""
        order = sorted(range(len(self.labels)), key=lambda i: -probabilities[i])
        chosen = [i for i in order if probabilities[i] >= self.threshold]
        chosen = order[:max(len(chosen), self.min_labels)]
        if self.max_labels is not None:
            chosen = chosen[:self.max_labels]
        return [self.labels[i] for i in sorted(chosen)]

    def expected_value(self, probabilities) -> float:
        """An ordinal attribute's expected value under a distribution over its labels."""
        return float(sum(p * v for p, v in zip(probabilities, self.values)))

    def render(self, text: str) -> str:
        """The prompt for one item, few-shot examples first."""
        shots = "".join(self._question(e.text) + f" {e.label}\n\n" for e in self.examples)
        return shots + self._question(text)

    def messages(self, text: str) -> list[dict]:
        """The chat for one item: each few-shot example a user turn answered by its label,
        then the item's question."""
        turns = []
        for e in self.examples:
            turns += [{"role": "user", "content": self._question(e.text)},
                      {"role": "assistant", "content": e.label}]
        return turns + [{"role": "user", "content": self._question(text)}]


@dataclass(frozen=True)
class Caption:
    prompt: str = DEFAULT_CAPTION_PROMPT
    max_tokens: int = 16
    descriptors: tuple[str, ...] = ()
    top_k: int = 4
    chat: bool = False

    @property
    def version(self) -> str:
        return _version({"prompt": self.prompt, "max_tokens": self.max_tokens,
                         "descriptors": list(self.descriptors), "top_k": self.top_k,
                         **({"chat": True} if self.chat else {})})

    def render(self, text: str) -> str:
        return self.prompt.format(text=text)

    def messages(self, text: str) -> list[dict]:
        return [{"role": "user", "content": self.render(text)}]


@dataclass(frozen=True)
class SemanticId:
    """Residual quantisation of item embeddings into `levels` codes of `codes` values each.

    `sample` items (drawn deterministically with `seed`) fit the quantiser; `max_iter` bounds
    the k-means iterations per level. Changing any of these means another quantiser."""
    levels: int = 3
    codes: int = 64
    sample: int = 10_000
    seed: int = 0
    max_iter: int = 50

    @property
    def version(self) -> str:
        return _version({"levels": self.levels, "codes": self.codes, "sample": self.sample,
                         "seed": self.seed, "max_iter": self.max_iter})


SEMANTIC_ID_LIMITS = {"levels": (1, 8), "codes": (2, 4096), "sample": (2, 10_000_000),
                      "seed": (0, 2**31 - 1), "max_iter": (1, 1000)}


@dataclass(frozen=True)
class Spec:
    attributes: dict[str, Attribute]
    caption: Caption | None = None
    semantic_id: SemanticId | None = None
    name: str = "spec"
    source: str = field(default="", compare=False)

    @property
    def version(self) -> str:
        """One version for the whole spec: any changed attribute or caption changes it."""
        parts = {n: a.version for n, a in sorted(self.attributes.items())}
        parts["__caption__"] = self.caption.version if self.caption else ""
        if self.semantic_id is not None:  # absent: the version a spec without one always had
            parts["__semantic_id__"] = self.semantic_id.version
        return _version(parts)

    def restricted(self, parts) -> Spec:
        """The same spec with only the named attributes (and the caption if "caption" is
        named, the semantic ID if "semantic_id" is): what one pass of the annotate job
        annotates."""
        parts = set(parts)
        return Spec(attributes={n: a for n, a in self.attributes.items() if n in parts},
                    caption=self.caption if "caption" in parts else None,
                    semantic_id=self.semantic_id if "semantic_id" in parts else None,
                    name=self.name, source=self.source)

    def attribute(self, name: str) -> Attribute:
        try:
            return self.attributes[name]
        except KeyError:
            raise SpecError(
                f"unknown attribute {name!r}; the spec declares {sorted(self.attributes)}"
            ) from None


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise SpecError(f"{where}: {msg}")


def _check_template(template: str, where: str, allowed: set[str]) -> None:
    import string
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise SpecError(f"{where}: malformed template ({exc})") from None
    _require("text" in names, where, "template must contain {text}")
    unknown = names - allowed
    _require(not unknown, where, f"unknown placeholders {sorted(unknown)}; allowed {sorted(allowed)}")


def parse_spec(data: dict, source: str = "") -> Spec:
    """Validate a spec mapping (as loaded from YAML) and build a Spec."""
    _require(isinstance(data, dict), "spec", "must be a mapping with an 'attributes' key")
    attrs_raw = data.get("attributes")
    _require(isinstance(attrs_raw, dict) and attrs_raw, "attributes",
             "must be a non-empty mapping of attribute name -> definition")
    chat = _flag(data.get("chat", False), "chat")
    attributes = {}
    for name, body in attrs_raw.items():
        where = f"attributes.{name}"
        _require(isinstance(name, str) and name.isidentifier(), where,
                 "attribute names must be identifiers (letters, digits, underscore)")
        _require(name != "caption", where, "'caption' names the spec's caption; "
                 "choose another attribute name")
        _require(name != "semantic_id", where, "'semantic_id' names the spec's semantic ID; "
                 "choose another attribute name")
        _require(isinstance(body, dict), where, "must be a mapping")
        labels_raw = body.get("labels")
        _require(labels_raw is not None, f"{where}.labels", "is required")
        if isinstance(labels_raw, dict):
            pairs = list(labels_raw.items())
        elif isinstance(labels_raw, list):
            pairs = []
            for i, item in enumerate(labels_raw):
                _require(isinstance(item, dict) and len(item) == 1, f"{where}.labels[{i}]",
                         "each entry must be a single 'label: definition' pair")
                pairs.extend(item.items())
        else:
            raise SpecError(f"{where}.labels: must be a mapping or list of label: definition")
        _require(len(pairs) >= 2, f"{where}.labels", "needs at least two labels")
        labels = [str(k).strip() for k, _ in pairs]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        _require(not dupes, f"{where}.labels", f"duplicate labels {dupes}")
        for lab, definition in pairs:
            _require(bool(str(lab).strip()), f"{where}.labels", "labels must be non-empty")
            _require(isinstance(definition, str) and definition.strip(),
                     f"{where}.labels.{lab}", "needs a one-line definition")
        kind = body.get("kind", "single")
        _require(kind in KINDS, f"{where}.kind", f"must be one of {list(KINDS)}, not {kind!r}")
        kind_fields = _kind_fields(body, kind, labels, where)
        if kind == "multi":
            prompt = body.get("prompt", DEFAULT_MULTI_PROMPT)
            _check_template(prompt, f"{where}.prompt",
                            {"text", "attribute", "labels", "label", "definition"})
            _require("{label}" in prompt, f"{where}.prompt", "a multi-label attribute's prompt "
                     "asks about one label: it must contain {label}")
        else:
            prompt = body.get("prompt", DEFAULT_PROMPT)
            _check_template(prompt, f"{where}.prompt", {"text", "attribute", "labels"})
        examples = [_example(ex, kind, labels, f"{where}.examples[{i}]")
                    for i, ex in enumerate(body.get("examples") or [])]
        attributes[name] = Attribute(
            name=name, labels=tuple(labels),
            definitions=tuple(str(d).strip() for _, d in pairs),
            prompt=prompt, examples=tuple(examples),
            description=str(body.get("description", "")),
            chat=_flag(body.get("chat", chat), f"{where}.chat"), kind=kind, **kind_fields)
    caption = None
    cap_raw = data.get("caption")
    if cap_raw is not None:
        _require(isinstance(cap_raw, dict), "caption", "must be a mapping")
        prompt = cap_raw.get("prompt", DEFAULT_CAPTION_PROMPT)
        _check_template(prompt, "caption.prompt", {"text"})
        max_tokens = cap_raw.get("max_tokens", 16)
        _require(isinstance(max_tokens, int) and 1 <= max_tokens <= 512,
                 "caption.max_tokens", "must be an integer in [1, 512]")
        top_k = cap_raw.get("top_k", 4)
        _require(isinstance(top_k, int) and top_k >= 1, "caption.top_k", "must be a positive integer")
        descriptors = cap_raw.get("descriptors") or []
        _require(isinstance(descriptors, list) and all(isinstance(d, str) for d in descriptors),
                 "caption.descriptors", "must be a list of strings")
        caption = Caption(prompt=prompt, max_tokens=max_tokens,
                          descriptors=tuple(descriptors), top_k=top_k,
                          chat=_flag(cap_raw.get("chat", chat), "caption.chat"))
    return Spec(attributes=attributes, caption=caption,
                semantic_id=_semantic_id(data.get("semantic_id", None), "semantic_id" in data),
                name=str(data.get("name", Path(source).stem if source else "spec")), source=source)


_KIND_KEYS = {"multi": {"min_labels", "max_labels", "threshold"}, "ordinal": {"values"}}


def _kind_fields(body: dict, kind: str, labels: list[str], where: str) -> dict:
    """The settings of a multi-label or ordinal attribute, checked; {} for a single one."""
    for other, keys in _KIND_KEYS.items():
        stray = sorted(keys & set(body)) if other != kind else []
        _require(not stray, f"{where}.{stray[0] if stray else ''}",
                 f"is a setting of {other} attributes; this one is {kind}")
    if kind == "multi":
        lo, hi = body.get("min_labels", 0), body.get("max_labels", len(labels))
        for key, value in (("min_labels", lo), ("max_labels", hi)):
            _require(isinstance(value, int) and not isinstance(value, bool)
                     and 0 <= value <= len(labels), f"{where}.{key}",
                     f"must be an integer in [0, {len(labels)}], not {value!r}")
        _require(lo <= hi, f"{where}.min_labels", f"{lo} is more than max_labels ({hi})")
        _require(hi >= 1, f"{where}.max_labels", "must be at least 1")
        threshold = body.get("threshold", 0.5)
        _require(isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                 and 0 < threshold < 1, f"{where}.threshold",
                 f"must be a probability strictly between 0 and 1, not {threshold!r}")
        return {"min_labels": lo, "max_labels": hi, "threshold": float(threshold)}
    if kind == "ordinal":
        raw = body.get("values")
        if raw is None:
            try:
                values = [float(lab) for lab in labels]
            except ValueError:
                raise SpecError(
                    f"{where}.labels: an ordinal attribute's labels must be numbers in "
                    f"increasing order (e.g. 1..5), or give values: [...] one number per label; "
                    f"{labels} do not parse as numbers") from None
            what = "labels"
        else:
            _require(isinstance(raw, list) and len(raw) == len(labels)
                     and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             for v in raw), f"{where}.values",
                     f"must be a list of {len(labels)} numbers, one per label")
            values, what = [float(v) for v in raw], "values"
        _require(all(a < b for a, b in zip(values, values[1:])), f"{where}.{what}",
                 f"an ordinal attribute's labels must be in increasing order; {values} is not")
        return {"values": tuple(values)}
    return {}


def _example(ex, kind: str, labels: list[str], where: str) -> Example:
    key = "labels" if kind == "multi" else "label"
    _require(isinstance(ex, dict) and "text" in ex and key in ex, where,
             f"needs 'text' and '{key}'" + (" (a list: a multi-label attribute's examples "
                                            "carry a set of labels)" if kind == "multi" else ""))
    if kind != "multi":
        _require(ex["label"] in labels, f"{where}.label", f"{ex['label']!r} is not one of {labels}")
        return Example(str(ex["text"]), str(ex["label"]))
    chosen = ex["labels"]
    _require(isinstance(chosen, list), f"{where}.labels", "must be a list of labels (maybe empty)")
    outside = [lab for lab in chosen if lab not in labels]
    _require(not outside, f"{where}.labels", f"{outside} are not among {labels}")
    return Example(str(ex["text"]), labels=tuple(lab for lab in labels if lab in chosen))


def _flag(value, where: str) -> bool:
    _require(isinstance(value, bool), where, f"must be true or false, not {value!r}")
    return value


def _semantic_id(raw, present: bool) -> SemanticId | None:
    """The optional `semantic_id:` section; `semantic_id: {}` takes every default."""
    if not present:
        return None
    raw = {} if raw is None else raw
    _require(isinstance(raw, dict), "semantic_id", "must be a mapping (e.g. {levels: 3, "
             "codes: 64, sample: 10000, seed: 0})")
    unknown = sorted(set(raw) - set(SEMANTIC_ID_LIMITS))
    _require(not unknown, "semantic_id", f"unknown keys {unknown}; allowed "
             f"{sorted(SEMANTIC_ID_LIMITS)}")
    values = {}
    for key, (lo, hi) in SEMANTIC_ID_LIMITS.items():
        value = raw.get(key, getattr(SemanticId, key))
        _require(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
                 f"semantic_id.{key}", f"must be an integer in [{lo}, {hi}], not {value!r}")
        values[key] = value
    _require(values["sample"] >= values["codes"], "semantic_id.sample",
             f"must be at least semantic_id.codes ({values['codes']}): k-means needs a point "
             "per code")
    return SemanticId(**values)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    return parse_spec(data, source=str(path))
