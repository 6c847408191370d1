"""Online feature rows for the ranking service, cached until the registry changes.

Feast's `get_online_features` costs milliseconds per call, more than scoring 100 candidates.
Feature values only change when something is materialized (or applied), and both rewrite
the file registry, so rows are cached per entity and the whole cache is dropped as soon as
the registry file's (mtime, size) changes. A registry that is not a local file disables the
cache: every request then reads the online store.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

MAX_CACHED = 200_000  # rows per entity kind; the cache is cleared beyond it


class OnlineStoreUnavailable(RuntimeError):
    """The online store could not be read; the service answers 503."""


class OnlineFeatures:
    def __init__(self, store, item_refs: list[str], user_refs: list[str], cache: bool = True):
        self.store = store
        self.refs = {"item_id": item_refs, "user_id": user_refs}
        self.names = {k: [r.split(":", 1)[1] for r in v] for k, v in self.refs.items()}
        self._registry = _local_registry(store) if cache else None
        self._token = self._registry_token()
        self._rows: dict[str, dict[int, tuple | None]] = {"item_id": {}, "user_id": {}}

    def _registry_token(self) -> tuple | None:
        if self._registry is None or not self._registry.exists():
            return None
        st = self._registry.stat()
        return st.st_mtime_ns, st.st_size

    def _check_fresh(self) -> None:
        token = self._registry_token()
        if token != self._token:
            self.store.refresh_registry()
            self._rows = {"item_id": {}, "user_id": {}}
            self._token = token

    def rows(self, key: str, ids: list[int]) -> tuple[pd.DataFrame, list[bool]]:
        """Feature rows for `ids` (in order) and, per id, whether the online store knows it
        (an unknown id gets an all-missing row)."""
        self._check_fresh()
        cached = self._rows[key] if self._registry is not None else {}
        missing = list(dict.fromkeys(i for i in ids if i not in cached))
        if missing:
            cached.update(self._fetch(key, missing))
            if len(cached) > MAX_CACHED:
                self._rows[key] = {}
        names = self.names[key]
        blank = (None,) * len(names)
        records = [cached[i] or blank for i in ids]
        return pd.DataFrame.from_records(records, columns=names), [cached[i] is not None
                                                                    for i in ids]

    def _fetch(self, key: str, ids: list[int]) -> dict[int, tuple | None]:
        try:
            got = self.store.get_online_features(
                features=self.refs[key], entity_rows=[{key: i} for i in ids]).to_dict()
        except Exception as exc:  # each backend raises its own types (sqlite3, redis, ...)
            raise OnlineStoreUnavailable(f"online store read failed: "
                                         f"{type(exc).__name__}: {exc}") from exc
        columns = [got[n] for n in self.names[key]]
        return {i: (None if all(v is None for v in vals) else vals)
                for i, vals in zip(ids, zip(*columns))}


def _local_registry(store) -> Path | None:
    reg = store.config.registry
    if getattr(reg, "registry_type", "file") != "file" or "://" in str(reg.path):
        return None
    path = Path(reg.path)
    return path if path.is_absolute() else Path(store.repo_path) / path
