"""Online feature rows for the ranking service, encoded once and cached until the registry
changes.

Feast's `get_online_features` costs milliseconds per call, more than scoring 100 candidates,
and turning its rows into model inputs costs as much again. Feature values only change when
something is materialized (or applied), and both rewrite the file registry, so each entity's
row is fetched once, encoded (`FeatureSet.encode_items` / `encode_users`) and kept as a
float64 vector; the whole cache is dropped as soon as the registry file's (mtime, size)
changes. A registry that is not a local file disables the cache: every request then reads
the online store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

MAX_CACHED = 200_000  # rows per entity kind; the cache is cleared beyond it

Encoder = Callable[[pd.DataFrame], np.ndarray]


class OnlineStoreUnavailable(RuntimeError):
    """The online store could not be read; the service answers 503."""


class OnlineFeatures:
    """`block(key, ids)`: the encoded rows for entity ids of one kind ("item_id", "user_id").

    `kinds` maps the entity key to (feature refs, encoder, width of an encoded row)."""

    def __init__(self, store, kinds: dict[str, tuple[list[str], Encoder, int]],
                 cache: bool = True):
        self.store = store
        self.kinds = kinds
        self._registry = _local_registry(store) if cache else None
        self._token = self._registry_token()
        self._rows: dict[str, dict[int, np.ndarray | None]] = {k: {} for k in kinds}

    def _registry_token(self) -> tuple | None:
        if self._registry is None or not self._registry.exists():
            return None
        st = self._registry.stat()
        return st.st_mtime_ns, st.st_size

    def _check_fresh(self) -> None:
        token = self._registry_token()
        if token != self._token:
            self.store.refresh_registry()
            self._rows = {k: {} for k in self.kinds}
            self._token = token

    def block(self, key: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Encoded rows for `ids` (in order) and, per id, whether the online store knows it
        (an unknown id gets an all-NaN row, which XGBoost routes as missing)."""
        self._check_fresh()
        cached = self._rows[key] if self._registry is not None else {}
        missing = list(dict.fromkeys(i for i in ids if i not in cached))
        if missing:
            cached.update(self._fetch(key, missing))
            if len(cached) > MAX_CACHED:
                self._rows[key] = {}
        rows = [cached[i] for i in ids]
        known = np.array([r is not None for r in rows])
        blank = np.full(self.kinds[key][2], np.nan)
        return np.stack([blank if r is None else r for r in rows]), known

    def _fetch(self, key: str, ids: list[int]) -> dict[int, np.ndarray | None]:
        refs, encode, _ = self.kinds[key]
        try:
            got = self.store.get_online_features(
                features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
        except Exception as exc:  # each backend raises its own types (sqlite3, redis, ...)
            raise OnlineStoreUnavailable(f"online store read failed: "
                                         f"{type(exc).__name__}: {exc}") from exc
        names = [r.split(":", 1)[1] for r in refs]
        rows = pd.DataFrame({n: got[n] for n in names})
        # Feast returns an all-null row for an id it does not know
        known = rows.notna().any(axis=1).to_numpy() if names else np.zeros(len(ids), bool)
        encoded = encode(rows)
        return {i: (encoded[j] if known[j] else None) for j, i in enumerate(ids)}


def _local_registry(store) -> Path | None:
    reg = store.config.registry
    if getattr(reg, "registry_type", "file") != "file" or "://" in str(reg.path):
        return None
    path = Path(reg.path)
    return path if path.is_absolute() else Path(store.repo_path) / path
