"""Online feature rows for the ranking service, encoded once, cached, and refreshed in place
when the registry changes.

Feast's `get_online_features` costs milliseconds per call, more than scoring 100 candidates,
and turning its rows into model inputs costs as much again. Feature values only change when
something is materialized (or applied), and both rewrite the file registry, so each entity's
row is fetched once, encoded (`FeatureSet.encode_items` / `encode_users`) and kept as a
float64 vector until the registry file's (mtime, size) changes. A registry that is not a
local file disables the cache: every request then reads the online store. With the cache
on, the service is the only one to re-read the registry (Feast's own re-reads, on every
read once the file changed, are turned off: they could catch the file mid-write).

What happens when the registry changes is the `refresh` mode:

* "background" (default): requests go on being answered from the cached rows while a
  background thread, with its own `FeatureStore` (its own SQLite connection or Redis
  client), re-reads the cached ids in chunks of `REFRESH_CHUNK`, encodes them and swaps
  each chunk into the cache under a lock; while requests are coming in it pauses between
  chunks (`REFRESH_PAUSE`), so that it takes about a third of the interpreter, not half
  (one GIL for both threads). A request therefore never waits for the re-fetch;
  until the refresh ends an answer may mix, item by item, rows from before and after the
  change (each row is whole: one read, one encoding). Ids never seen before are read on the
  request path, as always. The thread acts once the registry has been still for
  `SETTLE_S` (a materialization rewrites it twice per view) and re-reads only the kinds
  (items, users) one of whose feature views changed (state, last update, materialized
  intervals), and only once none of those views is MATERIALIZING: Feast marks a view so
  while it writes its rows, and the old rows are served until it is done. A newer change
  during a refresh restarts it; a failed read (the store down, or the registry caught
  mid-write: Feast rewrites it in place) keeps the old rows and retries within `RETRY_S`.
  It also looks at the registry every `POLL_S` by itself, so an idle worker refreshes too.
  Answers carry the new rows `SETTLE_S` plus the re-read time after the materialization
  ends (ten thousand rows: about 2 s on an idle worker, about 10 s on a loaded one);
  `status()["fresh"]` says when.
* "drop": the whole cache is dropped as soon as a request notices the change, and rows are
  read again on demand by the requests that need them (no answer uses an old row, but the
  first requests afterwards pay Feast's fetch).
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

MAX_CACHED = 200_000  # rows per entity kind; the cache is cleared beyond it
REFRESH_MODES = ("background", "drop")
REFRESH_CHUNK = 250   # ids per Feast read when refreshing in the background
# While requests are coming in, the refresh thread pauses after each chunk for this many
# times the chunk's duration, leaving most of the interpreter (one GIL) to the requests.
REFRESH_PAUSE = 2.0
BUSY_S = 0.25         # a worker is busy if it served a request this recently
POLL_S = 0.5          # how often the refresh thread looks at the registry by itself
RETRY_S = 2.0         # wait after a failed background read
SETTLE_S = 0.5        # a change is acted on once the registry has been still this long
REGISTRY_READS = 5    # tries at reading a registry that is not being rewritten
MAX_POSTPONE_S = 600  # rows of a view that stays MATERIALIZING longer are re-read anyway

Encoder = Callable[[pd.DataFrame], np.ndarray]
log = logging.getLogger("ranking_service.online")
_ABSENT = object()  # not in the cache (None in the cache means: the store does not know it)


class OnlineStoreUnavailable(RuntimeError):
    """The online store could not be read; the service answers 503."""


class OnlineFeatures:
    """`block(key, ids)`: the encoded rows for entity ids of one kind ("item_id", "user_id").

    `kinds` maps the entity key to (feature refs, encoder, width of an encoded row).
    `store_factory` builds the refresh thread's own FeatureStore (default: one on the same
    repo). `block` and `status` are for one thread (the event loop's); the refresh thread is
    started by the first `block` call and stopped by `close`."""

    def __init__(self, store, kinds: dict[str, tuple[list[str], Encoder, int]],
                 cache: bool = True, refresh: str = "background",
                 store_factory: Callable[[], object] | None = None):
        if refresh not in REFRESH_MODES:
            raise ValueError(f"refresh must be one of {REFRESH_MODES}, not {refresh!r}")
        self.store = store
        self.kinds = kinds
        self.refresh = refresh
        self._new_store = store_factory or (lambda: _same_repo_store(store))
        self._registry = _local_registry(store) if cache else None
        if self._registry is not None:
            _own_registry_reads(store)
        self._lock = threading.Lock()  # guards everything below that both threads touch
        self._token = self._registry_token()
        self._gen = 0        # bumped on every new registry token
        self._fresh_gen = 0  # every cached row was read after this generation began
        self._store_gen = 0  # generation self.store's registry was last refreshed for
        self._rows: dict[str, dict[int, np.ndarray | None]] = {k: {} for k in kinds}
        # per kind: the feature views its rows come from, their registry entries as of the
        # cached rows (state, last update, materializations), and since when one has been
        # MATERIALIZING (refresh thread only, after this)
        self._views = {k: sorted({r.split(":", 1)[0] for r in refs})
                       for k, (refs, _, _) in kinds.items()}
        sigs = _view_signatures(store) if self._registry is not None else {}
        self._done_sigs = {k: self._kind_sig(sigs, k) for k in kinds}
        self._busy_since: dict[str, float] = {}
        self._last_request = 0.0
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"fetched_on_request": 0, "refreshed_in_background": 0,
                         "refreshes": 0, "refresh_errors": 0}
        self.last_refresh_s: float | None = None

    # -- the request path (event loop thread) ------------------------------------------------

    def block(self, key: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Encoded rows for `ids` (in order) and, per id, whether the online store knows it
        (an unknown id gets an all-NaN row, which XGBoost routes as missing)."""
        if self._registry is None:  # no cache: read everything
            got = self._fetch(self.store, key, list(dict.fromkeys(ids)))
            return self._stack(key, [got[i] for i in ids])
        self._last_request = time.monotonic()
        gen = self._observe()
        self._refresh_definitions(gen)
        if self.refresh == "background" and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="feature-refresh",
                                            daemon=True)
            self._thread.start()
        with self._lock:  # a consistent view: a refreshed chunk is swapped in all at once
            cached = self._rows[key]
            rows = [cached.get(i, _ABSENT) for i in ids]
        missing = list(dict.fromkeys(i for i, r in zip(ids, rows) if r is _ABSENT))
        if missing:
            got = self._fetch(self.store, key, missing)
            self.counters["fetched_on_request"] += len(missing)
            with self._lock:
                # A read that began before a registry change someone noticed meanwhile may
                # hold old rows that the refresh would not see: serve them, keep them not.
                if self._gen == gen:
                    if len(self._rows[key]) + len(got) > MAX_CACHED:
                        self._rows[key] = {}
                    self._rows[key].update(got)
            rows = [got[i] if r is _ABSENT else r for i, r in zip(ids, rows)]
        return self._stack(key, rows)

    def _refresh_definitions(self, gen: int) -> None:
        """Re-read the registry into the request path's store after a change (`feast apply`
        may change definitions). In background mode only once the refresh thread has read
        the same registry without error."""
        target = gen if self.refresh == "drop" else self._fresh_gen
        if target == self._store_gen:
            return
        self._store_gen = target  # a read caught mid-write is followed by a new token
        try:
            self._reread_registry(self.store)
        except Exception as exc:
            log.warning("registry re-read failed: %s: %s", type(exc).__name__, exc)

    def _reread_registry(self, store) -> dict[str, tuple]:
        """`store.refresh_registry()`, safe against Feast rewriting the file in place (open
        for writing truncates it): read again until the file did not change during the read
        and holds every view the features come from; failing that, the store keeps the
        registry it had (the writer finishing changes the token, so it is read again).
        Returns the views' signatures."""
        views = {v for vs in self._views.values() for v in vs}
        good = getattr(store.registry, "cached_registry_proto", None)
        for _ in range(REGISTRY_READS):
            before = self._registry_token()
            store.refresh_registry()
            if self._registry_token() == before:
                sigs = _view_signatures(store)
                if views <= sigs.keys():
                    return sigs
            time.sleep(0.002)
        if good is not None:  # a writer stalled mid-write: keep the last good registry
            store.registry.cached_registry_proto = good
        raise RuntimeError(f"the registry {self._registry} kept changing or lacked views "
                           f"{sorted(views)} in {REGISTRY_READS} reads")

    def _stack(self, key: str, rows: list) -> tuple[np.ndarray, np.ndarray]:
        known = np.array([r is not None for r in rows])
        blank = np.full(self.kinds[key][2], np.nan)
        return np.stack([blank if r is None else r for r in rows]), known

    def status(self) -> dict:
        """For /health: the refresh mode, whether every cached row postdates the newest
        registry change, cache sizes and counters."""
        with self._lock:
            return {"enabled": self._registry is not None, "refresh": self.refresh,
                    "generation": self._gen, "fresh": self._fresh_gen == self._gen,
                    "rows": {k: len(v) for k, v in self._rows.items()},
                    **self.counters, "last_refresh_s": self.last_refresh_s}

    def close(self) -> None:
        """Stop the refresh thread (if any) and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- registry changes ----------------------------------------------------------------------

    def _registry_token(self) -> tuple | None:
        if self._registry is None:
            return None
        try:
            st = self._registry.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _observe(self) -> int:
        """The current generation, bumped first if the registry changed since last seen."""
        token = self._registry_token()
        with self._lock:
            if token != self._token:
                self._token, self._gen = token, self._gen + 1
                if self.refresh == "drop":
                    self._rows = {k: {} for k in self.kinds}
                    self._fresh_gen = self._gen
                self._wake.set()
            return self._gen

    def _run(self) -> None:
        """The refresh thread: re-read the cached ids after every registry change."""
        store = None
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            gen = self._observe()
            if self._fresh_gen == gen or self._stop.is_set():
                continue
            for _ in range(20):  # let the writer finish: a materialization writes it in bursts
                self._stop.wait(SETTLE_S)
                newer = self._observe()
                if newer == gen or self._stop.is_set():
                    break
                gen = newer
            try:
                if store is None:
                    store = self._new_store()
                    _own_registry_reads(store)
                self._refresh(store, gen, self._reread_registry(store))
            except Exception as exc:  # keep serving the old rows; try again
                self.counters["refresh_errors"] += 1
                log.warning("feature refresh failed (old rows kept, retry within %.0f s): "
                            "%s: %s", RETRY_S, type(exc).__name__, exc)
                self._wake.wait(RETRY_S)  # or sooner if the registry changes again

    def _kind_sig(self, sigs: dict[str, tuple], key: str) -> tuple:
        return tuple(sigs.get(v) for v in self._views[key])

    def _refresh(self, store, gen: int, sigs: dict[str, tuple]) -> bool:
        """Bring the cache up to generation `gen`, whose registry has views `sigs`: re-read,
        one chunk at a time, every cached id of each kind one of whose views changed, once
        none of them is MATERIALIZING (its rows are being rewritten: the old ones are served
        until it is done, at most MAX_POSTPONE_S). False when a newer registry change (or
        close) cut it short."""
        started, n, postponed = time.perf_counter(), 0, False
        for key in self.kinds:
            sig = self._kind_sig(sigs, key)
            if sig == self._done_sigs[key]:
                continue  # nothing this kind reads changed (another view, or no view)
            if any(s is not None and s[0] == "MATERIALIZING" for s in sig):
                since = self._busy_since.setdefault(key, time.monotonic())
                if time.monotonic() - since < MAX_POSTPONE_S:
                    postponed = True
                    continue
            with self._lock:
                ids = list(self._rows[key])
            for start in range(0, len(ids), REFRESH_CHUNK):
                if self._stop.is_set() or self._observe() != gen:
                    return False
                chunk_started = time.monotonic()
                got = self._fetch(store, key, ids[start:start + REFRESH_CHUNK])
                with self._lock:
                    if self._gen != gen:
                        return False
                    cached = self._rows[key]
                    for i, row in got.items():
                        if i in cached:  # not evicted meanwhile
                            cached[i] = row
                    self.counters["refreshed_in_background"] += len(got)
                n += len(got)
                if time.monotonic() - self._last_request < BUSY_S:
                    self._stop.wait(REFRESH_PAUSE * (time.monotonic() - chunk_started))
            self._done_sigs[key] = sig
            self._busy_since.pop(key, None)
        with self._lock:
            if self._gen != gen:
                return False
            if not postponed:
                self._fresh_gen = gen
            if n:
                self.counters["refreshes"] += 1
                self.last_refresh_s = round(time.perf_counter() - started, 3)
        return True

    # -- reading Feast ---------------------------------------------------------------------------

    def _fetch(self, store, key: str, ids: list[int]) -> dict[int, np.ndarray | None]:
        refs, encode, _ = self.kinds[key]
        try:
            got = store.get_online_features(
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


def _own_registry_reads(store) -> None:
    """Make `store` re-read its registry only when told (`refresh_registry`, which
    `_reread_registry` guards). Feast 0.67's file registry otherwise re-reads the file
    itself, unguarded, inside any online read once the file's mtime moved ("sync" cache
    mode) or after `cache_ttl_seconds`, and can catch it mid-write: an empty registry, and a
    503 ("Feature view ... does not exist"). The service watches the file itself."""
    registry = store.registry
    if hasattr(registry, "cache_mode"):
        registry.cache_mode = "service"  # not "sync": no mtime check per read
    if hasattr(registry, "cached_registry_proto_ttl"):
        registry.cached_registry_proto_ttl = timedelta(0)  # 0: never expires


def _view_signatures(store) -> dict[str, tuple]:
    """Per feature view in the store's (cached) registry: (state name, last update,
    number of materialized intervals); any materialization or apply changes it."""
    out = {}
    for v in store.registry.list_feature_views(store.project, allow_cache=True):
        state = getattr(v, "state", None)
        out[v.name] = (getattr(state, "name", None), v.last_updated_timestamp,
                       len(v.materialization_intervals))
    return out


def _same_repo_store(store):
    from feast import FeatureStore
    return FeatureStore(repo_path=str(store.repo_path))


def _local_registry(store) -> Path | None:
    reg = store.config.registry
    if getattr(reg, "registry_type", "file") != "file" or "://" in str(reg.path):
        return None
    path = Path(reg.path)
    return path if path.is_absolute() else Path(store.repo_path) / path
