"""Fine-tune a local causal LM on human labels for one attribute, served by the same engines.

    python -m spark_jobs.finetune --spec specs/movielens_genre.yaml --attribute genre \
        --labels human.csv --items items.parquet --text-columns title,tags --out DIR \
        [--model smollm2-135m-instruct] [--seed 0] [--holdout 0.2] [--max-train N] \
        [--max-heldout N] [--epochs 1] [--lr 1e-4] [--batch-size 8] [--precision auto] \
        [--train-layers all] [--eval-engine transformers|vllm|none] [--baseline] \
        [--dev 0.2] [--max-dev 200] [--no-balance]

Supervised fine-tuning on exactly the scoring the transformers and vllm engines do
(quality.finetune.example): the spec's own prompt (through the model's chat template when the
spec says `chat: true`, few-shot examples included), then the human label's tokens in
context; the loss is the label tokens' negative log-likelihood, nothing else. Full
fine-tuning by default (`--train-layers K` trains only the top K decoder layers and the final
norm, which is cheaper per step); no adapter, so there is nothing to merge.

--labels: a table (CSV or Parquet) with item_id and label (or <attribute>_label), one label
per item; for a multi-label attribute item_id and labels (or <attribute>_labels), the item's
labels "|"-separated (or a list), trained as the yes/no answer to each label's question
(Attribute.questions), exactly what Engine.tag scores, and split stratified by each item's
rarest label. Rows without a label are not labelled items (the command says how many).
A multi-label attribute's answers are weighted so that each label's yes and no answers carry
equal totals (quality.finetune.balance_weights; --no-balance: unweighted), and a development
split (--dev of the training split, stratified and seeded, --max-dev of it scored; never
trained on, never held out) gives each label the decision threshold with the highest F1
there, written into card.json's "calibration", which the transformers and vllm engines apply
when they load <out> (udfs.engines.calibration; --dev 0: none).
--items: item_id and the text columns, built into the item text as the annotate job
builds it. A stratified held-out split (--holdout, seeded) is never trained on; --max-train
takes a nested, seeded subset of the training split (learning curves), --max-heldout a
seeded sample of the held-out split to score. Bad input is refused before any model is
loaded, one line per problem.

Before training, three probe steps (forward and backward, no update) and the update on a
throwaway optimizer with learning rate 0 (weights untouched) time a step, and the command
prints how long training will take; every few steps it prints the loss and s/step.
bf16 autocast is used where the CPU (or GPU) supports it (--precision auto); the weights stay
float32 and are saved as float32.

<out> is a plain Hugging Face model directory (config.json, model.safetensors, tokenizer,
the base model's LICENSE), loaded as it is by {"type": "transformers", "model": "<out>"} and
{"type": "vllm", "model": "<out>"}, plus card.json: base model, data hash, spec and attribute
versions, the splits (ids, their hash and counts), hyper-parameters, training log and the
held-out metrics (strict accuracy, macro-F1, kappa, ECE, hit rate; a multi-label attribute:
micro/macro-F1, Jaccard, macro AUC, ECE, Brier beside the majority and label-frequency
baselines fitted on the other labelled items, with the dev thresholds and, under
"uncalibrated", without; --baseline adds the base model's zero-shot figures on the same
items), scored by --eval-engine on <out> as saved.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from quality import finetune as core
from quality.finetune import FinetuneError
from udfs.engines import calibration
from udfs.engines.prompts import LabelScoringEngine
from udfs.spec import Attribute, SpecError, load_spec
from udfs.table import TableError, read_frame

DEFAULT_MODEL = "smollm2-135m-instruct"
DEV = 0.2      # a multi-label attribute's development split: this fraction of the training
MAX_DEV = 200  # split, at most this many items scored (as many as the held-out draw)


def log(msg: str) -> None:
    print(f"[finetune] {msg}", flush=True)


# ---------------------------------------------------------------- inputs (pure once read)

@dataclass
class Plan:
    """What will be trained on and held out, checked before any model is loaded."""
    attribute: Attribute
    rows: pd.DataFrame          # item_id, text, label: every labelled item
    train: tuple                # item ids trained on (after --max-train)
    heldout: tuple              # item ids scored (after --max-heldout)
    train_pool: int             # the training split's size before --max-train
    heldout_pool: int           # the held-out split's size before --max-heldout
    data_hash: str
    settings: dict = field(default_factory=dict)
    dev: tuple = ()             # item ids the thresholds are fitted on (after --max-dev)
    dev_pool: int = 0           # the development split's size before --max-dev

    def frame(self, ids) -> pd.DataFrame:
        return self.rows.set_index("item_id").loc[list(ids)].reset_index()


def label_column(labels: pd.DataFrame, attribute: Attribute) -> str:
    names = (("labels", f"{attribute.name}_labels", "label") if attribute.multi
             else ("label", f"{attribute.name}_label"))
    for name in names:
        if name in labels.columns:
            return name
    raise FinetuneError(f"the labels table needs item_id and a {names[0]!r} (or "
                        f"{names[1]!r}) column; it has {list(labels.columns)}")


def _labelled(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not hasattr(value, "__len__") or len(value) > 0


def plan(attribute: Attribute, labels: pd.DataFrame, items: pd.DataFrame,
         text_columns: list[str], holdout: float = 0.2, seed: int = 0,
         max_train: int | None = None, max_heldout: int | None = None,
         min_per_label: int = core.MIN_PER_LABEL, heldout_ids=None, dev: float | None = None,
         max_dev: int | None = MAX_DEV) -> Plan:
    """Check the inputs and split them; FinetuneError lists every problem, one per line.

    heldout_ids: a held-out split given instead of drawn (e.g. another run's); it must not
    overlap the training items. dev: the fraction of the training split carved out as a
    development split before --max-train draws from the rest (default DEV for a multi-label
    attribute, whose thresholds it fits; a single-label attribute has none)."""
    from udfs.annotator import clean_columns

    dev = (DEV if attribute.multi else 0.0) if dev is None else dev
    if dev and not attribute.multi:
        raise FinetuneError("--dev is for multi-label attributes (it fits their per-label "
                            "thresholds)")
    if not 0 <= dev < 1:
        raise FinetuneError(f"--dev must be a fraction in [0, 1), not {dev}")
    missing = [c for c in ("item_id",) if c not in labels.columns]
    missing += [f"items.{c}" for c in ["item_id", *text_columns] if c not in items.columns]
    if missing:
        raise FinetuneError(f"missing columns {missing}")
    column = label_column(labels, attribute)
    given = labels[column].map(_labelled)
    if not given.all():
        log(f"{int((~given).sum())} rows without a label in {column!r}: not labelled items")
    labels = labels[given]
    ids = labels["item_id"].tolist()
    texts = pd.Series(clean_columns([items[c] for c in text_columns]).to_numpy(),
                      index=items["item_id"].to_numpy())
    if attribute.multi:
        sets = [core.label_set(v) for v in labels[column]]
        problems = core.check_label_sets(ids, sets, attribute, set(texts.index), min_per_label)
        # stored in spec order, "|"-separated (labels outside the set were refused above)
        values = ["|".join(lab for lab in attribute.labels if lab in s) for s in sets]
        keys = core.strata(sets, attribute.labels)
    else:
        values = labels[column].astype(str).str.strip().tolist()
        problems = core.check_inputs(ids, values, attribute, set(texts.index), min_per_label)
        keys = values
    empty = sorted({i for i in ids if i in texts.index and texts.get(i) is None}, key=str)
    if empty:
        problems.append(f"labelled items with an empty text: {core._ids_text(empty)}")
    if problems:
        raise FinetuneError("\n".join(problems))
    rows = pd.DataFrame({"item_id": ids, "text": texts.loc[ids].to_list(), "label": values})
    if heldout_ids is not None:
        heldout_ids = list(heldout_ids)
        unknown = sorted(set(heldout_ids) - set(ids), key=str)
        if unknown:
            raise FinetuneError(f"held-out ids without a human label: {core._ids_text(unknown)}")
        rest = rows[~rows["item_id"].isin(set(heldout_ids))]
        drawn = core.Split(tuple(rest["item_id"]), tuple(heldout_ids))
    else:
        drawn = core.split(ids, keys, holdout, seed, groups=rows["text"].tolist())
    carved = carve_dev(drawn.train, dict(zip(ids, keys)), dict(zip(ids, rows["text"])), dev,
                       seed)
    train = core.subset(carved.train, max_train, seed, stream=1)
    heldout = core.subset(drawn.heldout, max_heldout, seed, stream=3)
    dev_ids = core.subset(carved.heldout, max_dev, seed, stream=5) if carved.heldout else ()
    text_of = dict(zip(rows["item_id"], rows["text"]))
    # the thresholds are fitted on dev: it must not see the held-out items either
    problems = core.check_split(train + dev_ids, heldout, text_of)
    if problems:
        raise FinetuneError("\n".join(problems))
    triples = list(rows.itertuples(index=False, name=None))
    return Plan(attribute, rows, train, heldout, len(carved.train), len(drawn.heldout),
                core.data_hash(triples, train, heldout, dev_ids),
                {"holdout": holdout, "seed": seed, "max_train": max_train,
                 "max_heldout": max_heldout, "min_per_label": min_per_label,
                 "heldout_given": heldout_ids is not None,
                 **({"dev": dev, "max_dev": max_dev} if attribute.multi else {})},
                dev_ids, len(carved.heldout))


def carve_dev(train: tuple, key_of: dict, text_of: dict, fraction: float,
              seed: int) -> core.Split:
    """The training split as (what --max-train draws from, the development split): `fraction`
    of it stratified as the held-out split is (same keys, same texts on one side), drawn
    from its own stream of the seed; fraction 0: no development split."""
    if not fraction:
        return core.Split(train, ())
    return core.split(train, [key_of[i] for i in train], fraction, seed,
                      groups=[text_of[i] for i in train], stream=4)


# ---------------------------------------------------------------- the model (I/O, torch)

class _Prompts(LabelScoringEngine):
    """The engines' own prompt rendering and encoding (udfs.engines.prompts), without a
    model: what is trained is what they will score."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.model_name = name

    def caption(self, texts, caption):  # pragma: no cover - never called
        raise NotImplementedError


def examples_for(tokenizer, attribute: Attribute, frame: pd.DataFrame,
                 max_prompt_tokens: int | None) -> list[core.TrainingExample]:
    """One example per item, or for a multi-label attribute one per item and label: the
    label's question answered yes or no, as Engine.tag asks it."""
    prompts = _Prompts(tokenizer, "finetune")
    if attribute.multi:
        yes_no = attribute.yes_no()
        encode = prompts.encoder(yes_no)
        return [core.example(encode, prompts.prompt(yes_no, question), yes_no,
                             "yes" if lab in chosen else "no", max_prompt_tokens,
                             tokenizer.bos_token_id)
                for text, label in zip(frame["text"], frame["label"])
                for chosen in [set(core.label_set(label))]
                for question, lab in zip(attribute.questions(text), attribute.labels)]
    encode = prompts.encoder(attribute)
    return [core.example(encode, prompts.prompt(attribute, text), attribute, label,
                         max_prompt_tokens, tokenizer.bos_token_id)
            for text, label in zip(frame["text"], frame["label"])]


def balanced(examples: list[core.TrainingExample], frame: pd.DataFrame, attribute: Attribute
             ) -> tuple[list[core.TrainingExample], dict]:
    """examples_for's multi-label examples (item by item, each item's labels in spec order)
    weighted by quality.finetune.balance_weights, and each label's (yes, no) weight."""
    sets = [core.label_set(v) for v in frame["label"]]
    weights = core.balance_weights(sets, attribute.labels)
    out = [dataclasses.replace(e, weight=float(w)) for e, w in zip(examples, weights.ravel())]
    per_label = {}
    for j, lab in enumerate(attribute.labels):
        yes = np.array([lab in s for s in sets], dtype=bool)
        per_label[lab] = {"yes": _first(weights[yes, j]), "no": _first(weights[~yes, j])}
    return out, per_label


def _first(weights: np.ndarray) -> float | None:
    """An answer's weight (all of one label's yes, or no, answers weigh the same)."""
    return round(float(weights[0]), 4) if len(weights) else None


def _bf16_supported(torch, device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    check = getattr(cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def _decoder_layers(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, decoder.layers


def freeze_below(model, train_layers: int | None) -> int:
    """Train only the top `train_layers` decoder layers and the final norm (None: all
    parameters); returns the number of trainable parameters."""
    if train_layers is not None:
        decoder, layers = _decoder_layers(model)
        if not 1 <= train_layers <= len(layers):
            raise FinetuneError(f"--train-layers must be in [1, {len(layers)}], not "
                                f"{train_layers}")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - train_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        norm = getattr(decoder, "norm", None)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def update_seconds(torch, params: list, grad_clip: float) -> float:
    """The time of a step's update (gradient clipping, AdamW), which the probe steps leave
    out: timed on a throwaway AdamW with learning rate 0, whose update leaves the weights
    exactly as they are (the fastest of three steps: the first allocates the optimizer's
    state). The
    gradients are small, not zero: all-zero ones take a slower path (twice the time on
    SmolLM2) than a real step's."""
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    throwaway = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    seconds = math.inf
    for _ in range(3):
        started = time.perf_counter()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        throwaway.step()
        seconds = min(seconds, time.perf_counter() - started)
    for p in params:
        p.grad = None
    return seconds


def batch_loss(torch, model, chunk: list[core.TrainingExample], pad_id: int, device: str):
    """Mean over the batch of each example's label negative log-likelihood times its weight,
    computed as the transformers engine computes label scores (left padding, position ids
    from the mask, the logits of the last label positions only)."""
    width = max(len(e.ids) for e in chunk)
    ids = torch.tensor([[pad_id] * (width - len(e.ids)) + list(e.ids) for e in chunk],
                       device=device)
    mask = torch.tensor([[0] * (width - len(e.ids)) + [1] * len(e.ids) for e in chunk],
                        device=device)
    n = max(e.label_tokens for e in chunk)
    logits = model(input_ids=ids, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   logits_to_keep=n + 1).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    token_lp = logp.gather(-1, ids[:, -n:, None]).squeeze(-1)
    lengths = torch.tensor([e.label_tokens for e in chunk], device=device)
    is_label = torch.arange(n, device=device) >= n - lengths[:, None]
    weights = torch.tensor([e.weight for e in chunk], device=device)
    return -((token_lp * is_label).sum(-1) * weights).sum() / len(chunk)


@dataclass
class Hyper:
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_prompt_tokens: int = 512  # the transformers engine's default truncation
    precision: str = "auto"       # auto | float32 | bf16 (autocast; weights stay float32)
    train_layers: int | None = None
    balance: bool = True          # multi-label: each label's yes and no answers weigh alike
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None


def train(model_path: str, plan_: Plan, hp: Hyper, out: Path) -> dict:
    """Fine-tune, save <out> (model + tokenizer + LICENSE, published by one rename) and
    return the training log."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if hp.threads:
        torch.set_num_threads(hp.threads)
    torch.manual_seed(hp.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    frame = plan_.frame(plan_.train)
    examples = examples_for(tokenizer, plan_.attribute, frame, hp.max_prompt_tokens)
    answer_weights = None
    if plan_.attribute.multi and hp.balance:
        examples, answer_weights = balanced(examples, frame, plan_.attribute)
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True,
                                                 dtype=torch.float32).to(hp.device)
    model.train()
    trainable = freeze_below(model, hp.train_layers)
    if hp.precision == "auto":
        bf16 = _bf16_supported(torch, hp.device)
    elif hp.precision in ("bf16", "float32"):
        bf16 = hp.precision == "bf16"
    else:
        raise FinetuneError(f"--precision must be auto, bf16 or float32, not {hp.precision!r}")
    autocast = (lambda: torch.autocast(hp.device.split(":")[0], dtype=torch.bfloat16,
                                       enabled=bf16))
    steps = core.batches(len(examples), hp.batch_size, hp.epochs, hp.seed)
    tokens = [sum(len(examples[i].ids) for i in b) for b in steps]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / len(steps)))  # linear decay to 0
    log(f"{len(examples)} training examples ({sum(len(e.ids) for e in examples)} tokens, "
        f"{sum(e.label_tokens for e in examples)} of them label tokens), "
        f"{len(plan_.heldout)} held out; {len(steps)} steps of batch {hp.batch_size} x "
        f"{hp.epochs} epoch(s); {trainable:,} trainable parameters; "
        f"{'bf16 autocast' if bf16 else 'float32'} on {hp.device}")

    # Probe steps (forward and backward, gradients discarded): the fastest time per token
    # (the first steps pay one-off kernel set-up) sizes the whole run.
    probe_times = []
    for b in steps[:3]:
        started = time.perf_counter()
        with autocast():
            loss = batch_loss(torch, model, [examples[i] for i in b], pad_id, hp.device)
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        probe_times.append((time.perf_counter() - started, sum(len(examples[i].ids) for i in b)))
    probe_s, probe_tokens = min(probe_times, key=lambda t: t[0] / max(t[1], 1))
    update_s = update_seconds(torch, params, hp.grad_clip)
    estimate = core.estimate_seconds(tokens, probe_tokens, probe_s, update_s)
    log(f"estimate: {len(steps)} steps at about {estimate / len(steps):.2f} s/step "
        f"= {_duration(estimate)} of training (probe step: {probe_s:.2f} s for {probe_tokens} "
        f"tokens, then {update_s:.2f} s for the update), then saving and scoring the "
        "held-out items")

    every = max(1, len(steps) // 20)
    losses, window, started, t_window = [], [], time.perf_counter(), time.perf_counter()
    for step, b in enumerate(steps, 1):
        with autocast():
            loss = batch_loss(torch, model, [examples[i] for i in b], pad_id, hp.device)
        loss.backward()
        if hp.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FinetuneError(f"the loss became {value} at step {step}; lower --lr")
        losses.append(value)
        window.append(value)
        if step % every == 0 or step == len(steps):
            now = time.perf_counter()
            per_step = (now - t_window) / len(window)
            log(f"step {step}/{len(steps)} epoch {1 + (step - 1) * hp.epochs // len(steps)} "
                f"loss {sum(window) / len(window):.4f} {per_step:.2f} s/step, "
                f"{_duration(now - started)} elapsed, "
                f"about {_duration(per_step * (len(steps) - step))} left")
            window, t_window = [], now
    seconds = time.perf_counter() - started

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if (Path(model_path) / "LICENSE").exists():
        shutil.copy2(Path(model_path) / "LICENSE", tmp / "LICENSE")
    del model, optimizer
    os.replace(tmp, out)
    first = losses[:max(1, len(losses) // 10)]
    last = losses[-max(1, len(losses) // 10):]
    return {"steps": len(steps), "examples": len(examples), "tokens": sum(tokens),
            "trainable_parameters": trainable, "precision": "bf16-autocast" if bf16 else "float32",
            "seconds": round(seconds, 1), "seconds_per_step": round(seconds / len(steps), 3),
            "estimated_seconds": round(estimate, 1),
            "loss_first_tenth": round(sum(first) / len(first), 4),
            "loss_last_tenth": round(sum(last) / len(last), 4), "losses": [round(x, 4) for x in losses],
            **({"answer_weights": answer_weights} if answer_weights else {}),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- held-out scoring

EVAL_ENGINES = {
    "transformers": {"type": "transformers", "dtype": "float32", "batch_size": 8},
    "vllm": {"type": "vllm", "max_model_len": 2048, "seed": 0, "gpu_memory_utilization": 0.5,
             "engine_args": {"dtype": "float32"}},
}


def eval_engine(name_or_config, model: str) -> dict | None:
    """The engine config that scores `model`: a name above, or a config whose model is set."""
    if name_or_config in (None, "none"):
        return None
    if isinstance(name_or_config, str):
        from udfs.engines import parse_engine
        name_or_config = (dict(EVAL_ENGINES[name_or_config]) if name_or_config in EVAL_ENGINES
                          else parse_engine(name_or_config))
    return {**name_or_config, "model": str(model)}


def score(plan_: Plan, engine: dict, truth: pd.DataFrame | None = None,
          label_map: dict | None = None) -> dict:
    """The held-out items annotated by `engine` and scored as spark_jobs.evaluate scores.

    truth: item_id and "|"-separated labels (default: each item's human label)."""
    from spark_jobs.evaluate import annotate, evaluate

    items = plan_.frame(plan_.heldout)
    if plan_.attribute.multi:
        return _score_multi(plan_, items, engine, truth, label_map)
    if truth is None:
        truth = pd.DataFrame({"item_id": items["item_id"], "labels": items["label"]})
    table, run = annotate(items[["item_id", "text"]], plan_.attribute, engine, ["text"])
    result = evaluate(table, truth, plan_.attribute, label_map or {})
    s, h = result["strict"], result["hit"]
    return {"engine": run["model"], "items": len(items), "strict_n": s["n"],
            "strict_accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "kappa": s["kappa"],
            "strict_ece": s["ece"], "majority_baseline": s["majority_baseline"],
            "hit_n": h["n"], "hit_rate": h["hit_rate"], "hit_ece": h["ece"],
            "errors": result["annotation_errors"], "rows_per_second": run["rows_per_second"],
            "per_label": s["per_label"], "confusion_matrix": s["confusion_matrix"]}


MULTI_METRICS = ("micro_precision", "micro_recall", "micro_f1", "macro_f1", "jaccard",
                 "exact_match", "macro_auc", "ece", "brier", "mean_labels", "mean_true_labels")


def _score_multi(plan_: Plan, items: pd.DataFrame, engine: dict, truth, label_map) -> dict:
    """The held-out items' sets and per-label probabilities scored as spark_jobs.evaluate
    scores them."""
    from spark_jobs.evaluate import annotate

    table, run = annotate(items[["item_id", "text"]], plan_.attribute, engine, ["text"])
    return _multi_metrics(plan_, table, run, truth, label_map)


def _multi_metrics(plan_: Plan, table: pd.DataFrame, run: dict, truth, label_map) -> dict:
    """An annotation table's metrics; truth defaults to every labelled item, so the
    baselines are fitted on the labelled items that are not scored, never on the scored
    ones."""
    from spark_jobs.evaluate import evaluate

    if truth is None:
        truth = pd.DataFrame({"item_id": plan_.rows["item_id"], "labels": plan_.rows["label"]})
    result = evaluate(table, truth, plan_.attribute, label_map or {})
    m, b = result["multi"], result["baselines"]
    return {"engine": run["model"], "items": len(table), "kind": "multi", "n": m["n"],
            **{k: m.get(k) for k in MULTI_METRICS},
            "baselines": {name: {k: b[name].get(k) for k in (*MULTI_METRICS, "labels")}
                          for name in ("majority", "label_frequency")},
            "baselines_fitted_on": b["train_items"],
            "errors": result["annotation_errors"], "rows_per_second": run["rows_per_second"],
            "per_label": m["per_label"]}


def score_with_thresholds(plan_: Plan, engine: dict, truth: pd.DataFrame | None = None,
                          label_map: dict | None = None) -> tuple[dict, dict]:
    """A multi-label run's per-label thresholds, fitted on its development split, as the
    card's "calibration" entry, and the held-out metrics with them (and, under
    "uncalibrated", without).

    The dev and held-out items go through `engine` in one pass while <out>'s card has no
    calibration yet, so their probabilities are the model's own; the thresholds see the dev
    items only. The held-out probabilities are then calibrated as an engine loading <out>
    calibrates them (udfs.engines.calibration.shift) and their sets chosen again."""
    from spark_jobs.evaluate import annotate

    attribute = plan_.attribute
    items = plan_.frame(plan_.heldout + plan_.dev)
    table, run = annotate(items[["item_id", "text"]], attribute, engine, ["text"])
    dev = table[table["item_id"].isin(set(plan_.dev))]
    probabilities, answers = _scored(plan_, dev)
    thresholds = core.fit_thresholds(probabilities, answers, attribute.threshold)
    entry = calibration.card_entry(attribute, thresholds, {
        "split": "dev", "items": len(probabilities), "ids_sha256": core.ids_hash(plan_.dev),
        "choice": "per label, the threshold with the highest F1 there (ties: the higher); "
                  "the spec's threshold for a label with no positive there"})
    held = table[table["item_id"].isin(set(plan_.heldout))]
    raw = _multi_metrics(plan_, held, run, truth, label_map)
    tuned = _multi_metrics(plan_, calibrated(held, attribute, thresholds), run, truth,
                           label_map)
    return entry, {**tuned, "thresholds": "per label, fitted on the dev split "
                                          "(card.json's calibration)",
                   "uncalibrated": {k: raw[k] for k in (*MULTI_METRICS, "per_label")}}


def _scored(plan_: Plan, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The [items, labels] P(yes) of a table's rows scored without error, and their human
    answers."""
    from spark_jobs.evaluate import _present

    labels = plan_.attribute.labels
    scores = table[f"{plan_.attribute.name}_scores"]
    ok = scores.map(_present) & table["error"].isna()
    human = plan_.rows.set_index("item_id")["label"].loc[table["item_id"][ok]]
    answers = np.array([[lab in core.label_set(v) for lab in labels] for v in human],
                       dtype=bool).reshape(-1, len(labels))
    return np.array(scores[ok].tolist(), dtype=float).reshape(-1, len(labels)), answers


def calibrated(table: pd.DataFrame, attribute: Attribute, thresholds) -> pd.DataFrame:
    """An annotation table as an engine loading the calibrated model would give it: each
    scored row's probabilities shifted by the thresholds, its set chosen again."""
    from spark_jobs.evaluate import _present

    name = attribute.name
    shifted = [calibration.shift(np.asarray(v, dtype=float)[None], thresholds,
                                 attribute.threshold)[0] if _present(v) else None
               for v in table[f"{name}_scores"]]
    return table.assign(**{
        f"{name}_scores": [None if p is None else p.tolist() for p in shifted],
        f"{name}_labels": [None if p is None else attribute.choose(p) for p in shifted]})


# ---------------------------------------------------------------- the command

def base_model_info(model: str, path: str) -> dict:
    info = {"name": model, "path": str(path)}
    manifest = Path(path) / "annofeat-model.json"
    if manifest.exists():  # a packaged model: where its files came from
        info["source"] = json.loads(manifest.read_text()).get("source")
    return info


def run(spec_path: str, attribute_name: str, labels: pd.DataFrame, items: pd.DataFrame,
        text_columns: list[str], out: Path, model: str = DEFAULT_MODEL, hp: Hyper | None = None,
        holdout: float = 0.2, max_train: int | None = None, max_heldout: int | None = None,
        min_per_label: int = core.MIN_PER_LABEL, heldout_ids=None,
        evaluate_with="transformers", baseline: bool = False, sources: dict | None = None,
        truth: pd.DataFrame | None = None, label_map: dict | None = None,
        dev: float | None = None, max_dev: int | None = MAX_DEV) -> dict:
    """Plan, train, save and score; returns the card (also written to <out>/card.json)."""
    from udfs.engines.models import resolve

    spec = load_spec(spec_path)
    attribute = spec.attribute(attribute_name)
    hp = hp or Hyper()
    hp = dataclasses.replace(hp, balance=hp.balance and attribute.multi)  # as trained
    plan_ = plan(attribute, labels, items, text_columns, holdout, hp.seed, max_train,
                 max_heldout, min_per_label, heldout_ids, dev, max_dev)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FinetuneError(f"--out {out} exists and is not empty; choose a new directory")
    path = resolve(model)
    if not Path(path).is_dir():
        raise FinetuneError(f"model directory not found: {path}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    log(f"{attribute.name} (version {attribute.version}): {len(plan_.rows)} labelled items, "
        f"{plan_.train_pool} in the training split ({len(plan_.train)} used), "
        + (f"{plan_.dev_pool} in the dev split ({len(plan_.dev)} scored), " if plan_.dev
           else "")
        + f"{plan_.heldout_pool} held out ({len(plan_.heldout)} scored); base model {model}")
    training = train(path, plan_, hp, out)
    card = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model_info(model, path),
        "spec": {"path": str(spec_path), "name": spec.name, "version": spec.version},
        "attribute": attribute.name, "attribute_version": attribute.version,
        "kind": attribute.kind, "labels": list(attribute.labels), "chat": attribute.chat,
        "data": {"sha256": plan_.data_hash, "labelled_items": len(plan_.rows),
                 "text_columns": text_columns, **(sources or {}),
                 "label_counts": _label_counts(plan_)},
        "splits": {**plan_.settings,
                   "train": {"count": len(plan_.train), "pool": plan_.train_pool,
                             "ids_sha256": core.ids_hash(plan_.train),
                             "ids": [_plain(i) for i in plan_.train]},
                   "heldout": {"count": len(plan_.heldout), "pool": plan_.heldout_pool,
                               "ids_sha256": core.ids_hash(plan_.heldout),
                               "ids": [_plain(i) for i in plan_.heldout]},
                   **({"dev": {"count": len(plan_.dev), "pool": plan_.dev_pool,
                               "ids_sha256": core.ids_hash(plan_.dev),
                               "ids": [_plain(i) for i in plan_.dev]}} if plan_.dev else {})},
        "objective": ("negative log-likelihood of the yes/no answer's tokens after each "
                      "label's question (Attribute.questions)"
                      + (", weighted so that each label's yes and no answers carry equal "
                         "totals" if hp.balance else "") if attribute.multi else
                      "negative log-likelihood of the human label's tokens after the spec's "
                      "prompt") + ", tokenised in context as udfs.engines.prompts scores labels",
        "hyperparameters": {k: v for k, v in vars(hp).items() if k != "threads"},
        "training": training,
        "heldout_metrics": None,
    }
    _write_card(out, card)  # no calibration yet: what is scored next is the model's own
    engine = eval_engine(evaluate_with, out)
    if engine is None:
        if plan_.dev:
            log("--eval-engine none: the dev split is not scored, no thresholds are fitted")
        return card
    if plan_.dev:
        log(f"scoring the {len(plan_.dev)} dev and {len(plan_.heldout)} held-out items with "
            f"{engine['type']} ...")
        card["calibration"], card["heldout_metrics"] = score_with_thresholds(
            plan_, engine, truth, label_map)
        log("per-label thresholds fitted on the dev split: " + ", ".join(
            f"{lab} {t:.3f}" for lab, t in card["calibration"]["thresholds"].items()))
    else:
        log(f"scoring the {len(plan_.heldout)} held-out items with {engine['type']} ...")
        card["heldout_metrics"] = score(plan_, engine, truth, label_map)
    if baseline:
        log("scoring the base model on the same items ...")
        card["heldout_metrics_base_model"] = score(plan_, eval_engine(evaluate_with, path),
                                                   truth, label_map)
    _write_card(out, card)
    return card


def _label_counts(plan_: Plan) -> dict:
    """Items per label (a multi-label attribute: the items whose set holds it)."""
    if plan_.attribute.multi:
        sets = [set(core.label_set(v)) for v in plan_.rows["label"]]
        return {lab: sum(lab in s for s in sets) for lab in plan_.attribute.labels}
    return plan_.rows["label"].value_counts().sort_index().to_dict()


def summary(m: dict | None) -> str:
    """The closing line's held-out figures."""
    if not m:
        return "held-out items not scored (--eval-engine none)"
    if m.get("kind") == "multi":
        b = m["baselines"]["majority"]
        return (f"held-out micro-F1 {m['micro_f1']:.3f} (majority baseline {b['micro_f1']:.3f}), "
                f"macro-F1 {m['macro_f1']:.3f} ({b['macro_f1']:.3f}), Jaccard "
                f"{m['jaccard']:.3f} ({b['jaccard']:.3f}), macro AUC "
                + (f"{m['macro_auc']:.3f}" if m["macro_auc"] is not None else "n/a")
                + f", ECE {m['ece']:.3f} on {m['n']} items" + _without_thresholds(m))
    return (f"held-out strict accuracy {m['strict_accuracy']:.3f} (majority baseline "
            f"{m['majority_baseline']:.3f}), kappa {m['kappa']:.3f}, ECE "
            f"{m['strict_ece']:.3f}, hit rate {m['hit_rate']:.3f} on {m['items']} items")


def _without_thresholds(m: dict) -> str:
    u = m.get("uncalibrated")
    if not u:
        return ""
    return (f", with the thresholds fitted on the dev split (without them: micro-F1 "
            f"{u['micro_f1']:.3f}, macro-F1 {u['macro_f1']:.3f}, Jaccard {u['jaccard']:.3f})")


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _write_card(out: Path, card: dict) -> None:
    tmp = out / "card.json.tmp"
    tmp.write_text(json.dumps(card, indent=2, default=_plain))
    os.replace(tmp, out / "card.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--attribute", required=True)
    p.add_argument("--labels", required=True, help="item_id + label table (CSV or Parquet)")
    p.add_argument("--items", required=True, help="item_id + text columns")
    p.add_argument("--text-columns", default="title,description")
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="base model: a packaged model's name or a local HF directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction per label")
    p.add_argument("--heldout-ids", default=None,
                   help="a table with item_id: this held-out split instead of a drawn one")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-heldout", type=int, default=None)
    p.add_argument("--min-per-label", type=int, default=core.MIN_PER_LABEL)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "float32"])
    p.add_argument("--train-layers", default="all",
                   help="'all' (full fine-tuning) or K: only the top K decoder layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-engine", default="transformers",
                   help="transformers, vllm, none, or an engine config (its model is <out>)")
    p.add_argument("--baseline", action="store_true",
                   help="also score the base model on the held-out items")
    p.add_argument("--dev", type=float, default=None,
                   help=f"multi-label: the fraction of the training split that fits the "
                        f"per-label thresholds (default {DEV}; 0: no thresholds)")
    p.add_argument("--max-dev", type=int, default=MAX_DEV,
                   help="multi-label: at most this many dev items scored")
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="multi-label: do not weight each label's yes and no answers alike")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spark_jobs.session import quiet

    quiet(args.verbose)
    try:
        layers = None if args.train_layers == "all" else int(args.train_layers)
        hp = Hyper(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   max_prompt_tokens=args.max_prompt_tokens, precision=args.precision,
                   train_layers=layers, balance=args.balance, seed=args.seed,
                   device=args.device, threads=args.threads)
        heldout = (read_frame(args.heldout_ids)["item_id"].tolist() if args.heldout_ids
                   else None)
        card = run(args.spec, args.attribute, read_frame(args.labels), read_frame(args.items),
                   [c.strip() for c in args.text_columns.split(",")], Path(args.out),
                   args.model, hp, args.holdout, args.max_train, args.max_heldout,
                   args.min_per_label, heldout, args.eval_engine, args.baseline,
                   sources={"labels_file": args.labels, "items_file": args.items},
                   dev=args.dev, max_dev=args.max_dev)
    except FinetuneError as exc:
        for line in str(exc).splitlines():
            print(f"finetune: error: {line}", file=sys.stderr)
        return 2
    except (SpecError, TableError, OSError, ValueError) as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    log(f"wrote {args.out}: {summary(card['heldout_metrics'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
