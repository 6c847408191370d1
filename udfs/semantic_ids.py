"""Semantic IDs: item embeddings quantised into a short path of codes, by residual k-means.

A quantiser of L levels and K codes per level is fitted on a sample of item embeddings:
level 1 is k-means on the embeddings, level 2 k-means on what level 1 leaves over (each
vector minus its nearest level-1 centroid), and so on. An item's semantic ID is its code path
(c1, ..., cL): items whose embeddings are close share a prefix, so a new item shares the
statistics of similar old ones, from its first day, instead of starting from nothing as a
hash of its id would. Each prefix becomes one stable int64 token ("l2:c1-c2" hashed together
with the quantiser's version, `prefix_tokens`), usable as a categorical or a hashed bucket.

Pure numpy: the fit runs on the driver over a sample that Spark draws and embeds
(udfs.semantic_fit), assignment runs per Arrow batch in the SQL function (udfs.functions).

Determinism. The fit is seeded (k-means++ from `seed`, Lloyd iterations in float64 over the
sample sorted by id, empty clusters re-seeded with the farthest point), so the same sample
gives the same centroids. Assignment of a vector does not depend on the other vectors of its
batch (`assign` computes each distance with its own loop, not a blocked matrix product), so
a re-run assigns the same codes. The quantiser's `version` is a hash of what the fit is a
function of: the settings, the embedding model, the embedding size and the sample (ids and
content hashes). A refit of the same inputs is therefore the same version (and is checked to
reproduce the saved centroids); a different sample, model or setting is a new version, and
the annotate job re-assigns codes exactly then.

Storage: `<table>/_quantizers/<version>/centroids.npy` then `quantizer.json`, the JSON moved
into place last (a quantiser without it is incomplete and never read).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from udfs.spec import SemanticId
from udfs.tokens import token_id

QUANTIZERS = "_quantizers"
META_FILE, CENTROIDS_FILE = "quantizer.json", "centroids.npy"
FORMAT = 1
# a refit of the same inputs must reproduce the saved centroids to within this (embeddings of
# the same text can differ in their last bits with the batch they were computed in)
REPRODUCE_TOLERANCE = 1e-4


class QuantizerError(ValueError):
    """A quantiser that cannot be fitted, read or used; the message says what to do."""


@dataclass(frozen=True, eq=False)
class Quantizer:
    """A fitted residual quantiser: `centroids[l, :sizes[l]]` are level l's codes."""
    config: SemanticId
    embedder: str            # the engine's embedding_model the centroids live in
    centroids: np.ndarray    # (levels, codes, dim) float32; rows past sizes[l] unused
    sizes: tuple[int, ...]   # fitted codes per level (< codes when the sample was too small)
    version: str
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[2])

    def __eq__(self, other) -> bool:
        return isinstance(other, Quantizer) and (
            (self.version, self.config, self.embedder, self.sizes)
            == (other.version, other.config, other.embedder, other.sizes)
            and np.array_equal(self.centroids, other.centroids))

    __hash__ = None

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """(n, levels) int32 codes: at each level the nearest centroid to the residual.

        Distances are computed row by row (einsum's own loop, not BLAS), so a vector's
        codes never depend on the batch it arrives in."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise QuantizerError(f"expected vectors of size {self.dim} ({self.embedder}), got "
                                 f"shape {x.shape}")
        if not np.isfinite(x).all():
            raise QuantizerError("embedding holds NaN or infinite values")
        codes = np.empty((len(x), self.config.levels), dtype=np.int32)
        residual = x.copy()
        for level in range(self.config.levels):
            c = self.centroids[level, :self.sizes[level]].astype(np.float64)
            # |r - c|^2 = |r|^2 - 2 r.c + |c|^2; |r|^2 is the same for every code
            dist = np.einsum("kd,kd->k", c, c)[None, :] - 2.0 * np.einsum(
                "nd,kd->nk", residual, c, optimize=False)
            best = dist.argmin(axis=1)
            codes[:, level] = best
            residual -= c[best]
        return codes

    def tokens(self, codes) -> list[int]:
        return prefix_tokens(codes, self.version)

    def describe(self) -> dict:
        return {"format": FORMAT, "version": self.version, "embedder": self.embedder,
                "dim": self.dim, "sizes": list(self.sizes),
                "config": {"levels": self.config.levels, "codes": self.config.codes,
                           "sample": self.config.sample, "seed": self.config.seed,
                           "max_iter": self.config.max_iter},
                "config_version": self.config.version,
                "centroids_sha256": _centroid_digest(self.centroids), **self.meta}


def prefix_tokens(codes, version: str) -> list[int]:
    """One int64 token per prefix of a code path: hash("<version>/l1:c1"),
    hash("<version>/l2:c1-c2"), ... The version is part of the token, so a code of a
    refitted quantiser (which means another region) never shares a token with the old one."""
    out, path = [], []
    for level, code in enumerate(codes, start=1):
        path.append(str(int(code)))
        out.append(token_id(f"{version}/l{level}:{'-'.join(path)}"))
    return out


# --- fitting ---------------------------------------------------------------------------------

def sample_fingerprint(ids, content_hashes) -> str:
    """What a fit is a function of, besides settings and model: the sampled items and texts."""
    pairs = sorted(zip(map(str, ids), map(str, content_hashes)))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def input_version(config: SemanticId, embedder: str, dim: int, fingerprint: str) -> str:
    payload = {"config": config.version, "embedder": embedder, "dim": int(dim),
               "sample": fingerprint, "format": FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def fit(vectors: np.ndarray, config: SemanticId, embedder: str, fingerprint: str,
        extra: dict | None = None) -> Quantizer:
    """Fit a residual k-means quantiser on `vectors` (n, dim), rows in a fixed order."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise QuantizerError("no embeddings to fit the semantic-ID quantiser on (every "
                             "sampled item has an empty text?)")
    if not np.isfinite(x).all():
        raise QuantizerError("the sampled embeddings hold NaN or infinite values")
    n, dim = x.shape
    centroids = np.zeros((config.levels, config.codes, dim), dtype=np.float32)
    sizes, residual, iterations = [], x.copy(), []
    for level in range(config.levels):
        c, labels, its = kmeans(residual, config.codes, config.seed + level, config.max_iter)
        c32 = c.astype(np.float32)
        centroids[level, :len(c)] = c32
        sizes.append(len(c))
        iterations.append(its)
        residual -= c32.astype(np.float64)[labels]
    meta = {"fitted_at": datetime.now(timezone.utc).isoformat(), "sample_size": int(n),
            "sample_fingerprint": fingerprint, "iterations": iterations, **(extra or {})}
    q = Quantizer(config, embedder, centroids, tuple(sizes),
                  input_version(config, embedder, dim, fingerprint), meta)
    return Quantizer(q.config, q.embedder, q.centroids, q.sizes, q.version,
                     {**meta, "usage_on_sample": usage(q.assign(x), config.codes)})


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def kmeans(x: np.ndarray, k: int, seed: int, max_iter: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Seeded k-means++ then Lloyd: (centroids (k', dim), labels, iterations), k' = min(k,
    distinct rows). Deterministic for the same rows in the same order."""
    # (rounded: float32 centroids leave residuals of ~1e-8 where a level fitted every point)
    distinct = np.unique(np.round(x, 6), axis=0)
    if len(distinct) <= k:  # fewer points than codes: every distinct point is a code
        return distinct, _sq_dist(x, distinct).argmin(1), 0
    rng = np.random.default_rng(seed)
    n = len(x)
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = _sq_dist(x, centers[:1])[:, 0]
    for i in range(1, k):  # k-means++: the next center drawn in proportion to D(x)^2
        total = closest.sum()
        j = int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n))
        centers[i] = x[j]
        closest = np.minimum(closest, _sq_dist(x, centers[i:i + 1])[:, 0])
    labels = np.full(n, -1)
    its = 0
    for its in range(1, max_iter + 1):
        d = _sq_dist(x, centers)
        new = d.argmin(1)
        counts = np.bincount(new, minlength=k)
        for empty in np.flatnonzero(counts == 0):  # re-seed with the worst-served point
            far = int(d[np.arange(n), new].argmax())
            centers[empty] = x[far]
            new[far] = empty
            d[far] = 0.0
            counts = np.bincount(new, minlength=k)
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, x)
        centers = sums / np.bincount(labels, minlength=k)[:, None]
    return centers, labels, its


# --- code usage ------------------------------------------------------------------------------

def usage(codes, k: int) -> dict:
    """How evenly the codes are used: per level, codes used of K, normalised entropy (1 =
    uniform over K codes), perplexity (exp entropy: the effective number of codes) and the
    largest code's share; over whole paths, distinct paths and the largest path's share."""
    arr = np.asarray([list(c) for c in codes if c is not None], dtype=np.int64)
    if arr.size == 0:
        return {"items": 0, "levels": []}
    levels = []
    for level in range(arr.shape[1]):
        counts = np.bincount(arr[:, level], minlength=k).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        entropy = max(0.0, float(-(p * np.log(p)).sum()))
        levels.append({"level": level + 1, "used": int((counts > 0).sum()), "codes": k,
                       "entropy": round(entropy / math.log(k), 4),
                       "perplexity": round(math.exp(entropy), 2),
                       "largest_share": round(float(p.max()), 4)})
    _, path_counts = np.unique(arr, axis=0, return_counts=True)
    return {"items": int(len(arr)), "levels": levels, "distinct_paths": int(len(path_counts)),
            "largest_path_share": round(float(path_counts.max() / len(arr)), 4)}


def describe_usage(u: dict) -> str:
    """One line: 'L1 64/64 codes, entropy 0.95, perplexity 52.3, largest 4.1%; ...'."""
    if not u.get("items"):
        return "no codes"
    parts = [f"L{lv['level']} {lv['used']}/{lv['codes']} codes, entropy {lv['entropy']:.2f}, "
             f"perplexity {lv['perplexity']:.1f}, largest {lv['largest_share']:.1%}"
             for lv in u["levels"]]
    return "; ".join(parts) + (f"; {u['distinct_paths']} distinct paths for {u['items']} items"
                               f" (largest {u['largest_path_share']:.1%})")


# --- storage ---------------------------------------------------------------------------------

def _centroid_digest(centroids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(centroids, dtype="<f4").tobytes()).hexdigest()


def _fs(path: str):
    from udfs.table import _split
    return _split(path)


def quantizers_dir(table_root: str) -> str:
    return f"{table_root.rstrip('/')}/{QUANTIZERS}"


def save(q: Quantizer, table_root: str) -> str:
    """Write the quantiser under the table (centroids first, the JSON last, each moved into
    place whole); returns its directory. A directory that already holds this version is
    left as it is (a version names one fit)."""
    import pyarrow.fs as pafs

    from udfs.table import new_run_id

    directory = f"{quantizers_dir(table_root)}/{q.version}"
    fs, p = _fs(directory)
    if fs.get_file_info(f"{p}/{META_FILE}").type == pafs.FileType.File:
        return directory
    fs.create_dir(p, recursive=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(q.centroids, dtype="<f4"), allow_pickle=False)
    for name, data in ((CENTROIDS_FILE, buf.getvalue()),
                       (META_FILE, json.dumps(q.describe(), indent=2).encode())):
        tmp = f"{p}/.{name}.{new_run_id()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, f"{p}/{name}")
    return directory


def load(directory: str) -> Quantizer:
    """A saved quantiser (its directory, as `save` returns it)."""
    import pyarrow.fs as pafs

    fs, p = _fs(directory)
    if fs.get_file_info(f"{p}/{META_FILE}").type != pafs.FileType.File:
        raise QuantizerError(f"{directory}: no {META_FILE} (not a saved quantiser, or one "
                             "whose save did not finish)")
    with fs.open_input_stream(f"{p}/{META_FILE}") as f:
        meta = json.loads(f.read().decode())
    if meta.get("format") != FORMAT:
        raise QuantizerError(f"{directory}: format {meta.get('format')!r}, expected {FORMAT}")
    with fs.open_input_stream(f"{p}/{CENTROIDS_FILE}") as f:
        centroids = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if _centroid_digest(centroids) != meta["centroids_sha256"]:
        raise QuantizerError(f"{directory}: {CENTROIDS_FILE} does not match its checksum")
    config = SemanticId(**meta["config"])
    own = {k: v for k, v in meta.items() if k not in (
        "format", "version", "embedder", "dim", "sizes", "config", "config_version",
        "centroids_sha256")}
    return Quantizer(config, meta["embedder"], centroids, tuple(meta["sizes"]),
                     meta["version"], own)


def saved(table_root: str) -> list[dict]:
    """The complete quantisers saved under a table, newest fit first (their JSON, plus
    `path`)."""
    import pyarrow.fs as pafs

    fs, p = _fs(quantizers_dir(table_root))
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(p)):
        meta_path = f"{info.path}/{META_FILE}"
        if info.type != pafs.FileType.Directory or \
                fs.get_file_info(meta_path).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(meta_path) as f:
            meta = json.loads(f.read().decode())
        found.append({**meta, "path": f"{quantizers_dir(table_root)}/{info.base_name}"})
    return sorted(found, key=lambda m: m.get("fitted_at", ""), reverse=True)


def find(table_root: str, config: SemanticId, embedder: str) -> Quantizer | None:
    """The newest saved quantiser for these settings and this embedding model, if any."""
    for meta in saved(table_root):
        if meta.get("config_version") == config.version and meta.get("embedder") == embedder:
            return load(meta["path"])
    return None


def same_centroids(a: Quantizer, b: Quantizer) -> float | None:
    """The largest centroid difference of two fits of one shape (None: shapes differ)."""
    if a.centroids.shape != b.centroids.shape or a.sizes != b.sizes:
        return None
    return float(np.abs(a.centroids.astype(np.float64) - b.centroids).max())
