"""ONNX Runtime variants of the packaged MiniLM against the torch engine, on the bench's rows:
agreement (labels per attribute, captions = the top-k descriptors in order) and speed.

    .venv/bin/python bench/onnx_variants.py [--rows 4000] [--variants a,b,...] [--interleave]

Every variant is a graph built here from the packaged fp32 export (quantised with
onnxruntime.quantization: dynamic or static, signed or unsigned weights, per channel or per
tensor, reduce_range, all MatMuls or a subset via nodes_to_exclude) run through the engine's
own OnnxEncoder; torch (sentence-transformers) is the reference. Speed: rows/s of encoding
every row once with the engine's batch size (128), cold cache, `--threads` threads (default:
all cores, as the raw bench engine); torch is timed first (and again after each variant with
`--interleave`). Agreement: the same rows' labels for every attribute of specs/movielens.yaml
and captions, scored from those vectors, against torch's. docs/PERFORMANCE.md has the table.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def fp32_dir() -> Path:
    from udfs.engines.models import resolve
    return Path(resolve("all-minilm-l6-v2-onnx"))


def matmuls(graph: Path) -> list[tuple[str, str]]:
    """(node name, weight initializer name) of every MatMul with a constant weight."""
    import onnx
    model = onnx.load(str(graph), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [(n.name, n.input[1]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits]


def _quiet():
    logging.getLogger().setLevel(logging.ERROR)


def dynamic(src: Path, out: Path, *, weight="QInt8", per_channel=True, reduce_range=False,
            include=None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    _quiet()
    nodes = [n for n, _ in matmuls(src)]
    exclude = [n for n in nodes if include is not None and not include(n)]
    quantize_dynamic(str(src), str(out), weight_type=getattr(QuantType, weight),
                     per_channel=per_channel, reduce_range=reduce_range,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude)


class _Calibration:
    """Feeds for static calibration: catalogue texts other than the evaluated rows."""

    def __init__(self, model_dir: Path, texts: list[str], batch: int = 32):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(256)
        self.feeds = []
        for i in range(0, len(texts), batch):
            enc = tok.encode_batch(texts[i:i + batch])
            width = max(len(e.ids) for e in enc)
            ids = np.zeros((len(enc), width), np.int64)
            mask = np.zeros_like(ids)
            for r, e in enumerate(enc):
                ids[r, :len(e.ids)], mask[r, :len(e.ids)] = e.ids, 1
            self.feeds.append({"input_ids": ids, "attention_mask": mask,
                               "token_type_ids": np.zeros_like(ids)})
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def static(src: Path, out: Path, calib_texts, *, include=None, per_channel=True,
           method="MinMax", fmt="QDQ") -> None:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    _quiet()
    nodes = [n for n, _ in matmuls(src)]
    exclude = [n for n in nodes if include is not None and not include(n)]
    quantize_static(str(src), str(out), _Calibration(src.parent, calib_texts),
                    quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                    calibrate_method=getattr(CalibrationMethod, method))


def ffn(name: str) -> bool:
    """The feed-forward MatMuls (intermediate + output dense), not attention's."""
    return "intermediate" in name or ("output" in name and "attention" not in name)


def attention(name: str) -> bool:
    """The attention projections (query, key, value, output dense), not the FFN's."""
    return "/attention/" in name


def one_matmul(name: str) -> bool:
    """A single MatMul (layer 2's FFN intermediate): how much does one quantised MatMul move?"""
    return "layer.2/intermediate" in name


def build(variant: str, work: Path, src_dir: Path, calib) -> Path:
    """The model directory of a variant (graph + the fp32 export's tokenizer files)."""
    import shutil
    out = work / variant
    if out.exists():
        return out
    shutil.copytree(src_dir, out, ignore=shutil.ignore_patterns("model.onnx"))
    graph, src = out / "model.onnx", src_dir / "model.onnx"
    recipes = {
        "fp32": lambda: shutil.copyfile(src, graph),
        "dyn-s8-pc": lambda: dynamic(src, graph),
        "dyn-s8-pc-rr": lambda: dynamic(src, graph, reduce_range=True),
        "dyn-u8-pc": lambda: dynamic(src, graph, weight="QUInt8"),
        "dyn-s8-pt": lambda: dynamic(src, graph, per_channel=False),
        "dyn-u8-pc-ffn": lambda: dynamic(src, graph, weight="QUInt8", include=ffn),
        "dyn-s8-pc-rr-ffn": lambda: dynamic(src, graph, reduce_range=True, include=ffn),
        "dyn-u8-pc-attn": lambda: dynamic(src, graph, weight="QUInt8", include=attention),
        "dyn-u8-pc-one": lambda: dynamic(src, graph, weight="QUInt8", include=one_matmul),
        "static-qdq": lambda: static(src, graph, calib),
    }
    recipes[variant]()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--variants", default="fp32,dyn-s8-pc,dyn-s8-pc-rr,dyn-u8-pc")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--interleave", action="store_true",
                   help="time torch again after each variant (else once, first)")
    p.add_argument("--work", default=None, help="where variant graphs are kept (reused)")
    args = p.parse_args(argv)

    from spark_jobs.movielens import load_items
    from udfs.annotator import clean_columns
    from udfs.engines import build_engine
    from udfs.engines.encoders import OnnxEncoder
    from udfs.spec import load_spec
    spec = load_spec(ROOT / "specs" / "movielens.yaml")
    items = load_items()
    texts = clean_columns([items["title"], items["description"]]).tolist()
    rows, calib = texts[:args.rows], texts[args.rows:args.rows + 512]
    work = Path(args.work or tempfile.mkdtemp(prefix="annofeat-onnx-variants-"))
    work.mkdir(parents=True, exist_ok=True)
    src = fp32_dir()
    print(f"rows {len(rows)}, threads {args.threads or os.cpu_count()}, work {work}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)

    def make(**options):
        return build_engine({"type": "embedding", "cache_size": len(rows) + 1024, **options,
                             **({"threads": args.threads} if args.threads else {})})

    def run(engine):
        """(rows/s of encoding every row once, cold cache; labels and captions; vectors)"""
        engine.embed(rows[:64])
        engine._cache.clear()
        t = time.perf_counter()
        vec = engine.embed(rows)
        rate = len(rows) / (time.perf_counter() - t)
        out = {n: engine.classify(rows, a).labels for n, a in spec.attributes.items()}
        out["caption"] = engine.caption(rows, spec.caption)
        engine._cache.clear()
        return rate, out, vec

    torch_engine = make(backend="torch")
    torch_rate, ref, ref_vec = run(torch_engine)
    print(f"{'variant':<22} {'MB':>5} {'cos min':>8} {'cos mean':>9} "
          + " ".join(f"{k:>8}" for k in ref) + f" {'rows/s':>8} {'torch':>8} {'ratio':>6} "
          f"{'load':>5}", flush=True)
    for variant in args.variants.split(","):
        directory = build(variant, work, src, calib)
        engine = make(model_path=str(directory), backend="onnx")
        assert isinstance(engine.encoder, OnnxEncoder)
        rate, got, vec = run(engine)
        if args.interleave:  # torch again beside each variant: the same load for both
            torch_rate = run(torch_engine)[0]
        cos = (vec * ref_vec).sum(axis=1)
        agree = {k: float(np.mean([x == y for x, y in zip(got[k], ref[k])])) for k in ref}
        size = (directory / "model.onnx").stat().st_size / 1e6
        print(f"{variant:<22} {size:5.0f} {cos.min():8.5f} {cos.mean():9.6f} "
              + " ".join(f"{agree[k]:8.4f}" for k in ref)
              + f" {rate:8.1f} {torch_rate:8.1f} {rate / torch_rate:6.2f} "
              f"{os.getloadavg()[0]:5.1f}", flush=True)
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
