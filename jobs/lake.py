"""The lake layout, shared by every layer: where each table of a dataset lives, the dataset's
published version set (the table versions readers *and* writers build on), the ETL lock, and the
lake's own repairs.

An ETL run rewrites tables one commit at a time and runs its data-quality checks last; only when
they all pass does it append the versions it wrote to `<dataset>/_etl/published` (one Delta
commit). Readers take the latest published set (or a set pinned in the spec), never "the latest of
each table", so a failed or half-finished run changes nothing they see. Writers start from the
published set too: `rollback_unpublished` restores every table a failed or killed run left ahead of
it (Delta RESTORE, one commit each) before anything new is written, and a run that fails rolls its
own commits back the same way.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from jobs.files import open_nofollow
from jobs.schema import JobSpec
from jobs.spec import absolute_path, storage_options

TABLES = {
    "interactions_raw": "bronze/interactions_raw",
    "quarantine": "bronze/quarantine",
    "interactions": "silver/interactions",
    "items": "silver/items",
    "item_index": "gold/item_index",
    "user_index": "gold/user_index",
    "sequences": "gold/sequences",
    "recommendations": "gold/recommendations",
}
PUBLISHED = "_etl/published"
LOCK = "_etl/lock"
LEASE = "_etl/lease.json"


class LakeBusy(RuntimeError):
    """Another ETL holds the dataset's lock; the message names it."""


class LakeUnsupported(ValueError):
    """An object store the lake's settings can't open, or one that can't exclude concurrent ETLs
    (no conditional puts): a configuration to fix, not a lake to wait for."""


class LakeCorrupt(RuntimeError):
    """A table's Delta log can't be read; the message names the table and what is wrong."""


# ----------------------------------------------------------------------------- commits

_observers: list[Callable[[str, int], None]] = []


@contextmanager
def observe_commits(observer: Callable[[str, int], None]) -> Iterator[None]:
    """Call `observer(table path, version)` after every Delta commit this process makes to a lake
    (writes, MERGEs, RESTOREs, publications) while the block runs: the crash-consistency harness
    stops a run after its n-th commit this way."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def committed(path: str, version: int | None) -> None:
    """Tell the observers that `path` now has the commit `version` (every writer calls this)."""
    if version is not None:
        for observer in list(_observers):
            observer(path, version)


def delta_error_line(exc: BaseException) -> str:
    """The first line of a delta-rs error (its messages carry a Rust backtrace after it)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_table(path: str, version: int | None = None, options: dict | None = None, table: str | None = None):
    """`deltalake.DeltaTable` at `path` (None when there is no table there); a log delta-rs cannot
    read is `LakeCorrupt`, naming the table, never a traceback from inside delta-rs."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError
    try:
        return DeltaTable(path, version=version, storage_options=options or None)
    except TableNotFoundError:
        return None
    except Exception as exc:  # delta-rs raises DeltaError / DeltaProtocolError / OSError for an unreadable log
        name = table or path
        at = f" at version {version}" if version is not None else ""
        raise LakeCorrupt(f"table {name} ({path}){at}: its Delta log cannot be read ({delta_error_line(exc)}); "
                          "see the operator guide's failure table (a torn commit beyond the published version is "
                          "repaired by the next `llmrec etl` or `llmrec ingest`)") from None


def read_rows(table) -> list[dict]:
    """Every row of a (small) table at its loaded version, read by delta-rs' own query engine. Not
    `to_pyarrow_table`: pyarrow's scanner over delta-rs' filesystem handler can leave I/O threads
    running when the interpreter exits, and a command that read through it then sometimes aborts
    after its work is done ("terminate called without an active exception", exit 134;
    delta-io/delta-rs#2184) — `llmrec tables` did, one run in two on a replayed lake."""
    import pyarrow as pa
    from deltalake import QueryBuilder
    return pa.RecordBatchReader.from_stream(QueryBuilder().register("t", table).execute("SELECT * FROM t")
                                            ).read_all().to_pylist()


def latest_version(path: str, options: dict | None = None, table: str | None = None) -> int | None:
    t = open_table(path, options=options, table=table)
    return None if t is None else t.version()


# ----------------------------------------------------------------------------- the lock

_local = threading.local()  # per thread: lock file -> nesting depth (a full run ingests landed days under its lock)


def _depths() -> dict[str, int]:
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


@contextmanager
def etl_lock(spec: JobSpec) -> Iterator[None]:
    """One ETL at a time per dataset, taken without waiting; a second run (another process, or
    another Dagster run) gets `LakeBusy` naming the holder and writes nothing.

    Local lakes: an exclusive `flock` on `<dataset>/_etl/lock`, opened without following a symlink
    (a planted link can't make the lock truncate another file); the kernel drops it when its holder
    dies, so a killed run never leaves the lake locked. Object-store lakes (`s3://`, `gs://`,
    `az://`, ...): a lease object `<dataset>/_etl/lease.json` created with a conditional put (fails
    when it exists), renewed while held, taken over only once expired (a compare-and-swap on its
    version), deleted at the end (`ObjectStoreLease`)."""
    root = dataset_root(spec)
    key = f"{root}/{LOCK}"
    _held = _depths()
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    if "://" in root:
        lease = ObjectStoreLease(root, storage_options(spec) or {}, spec.data.name)
        with lease.held():
            _held[key], _leases[root] = 1, lease
            try:
                yield
            finally:
                del _held[key]
                _leases.pop(root, None)
        return
    os.makedirs(os.path.dirname(key), exist_ok=True)
    fd = open_nofollow(key, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise LakeBusy(f"dataset {spec.data.name} at {root} is being written by another ETL ({holder}); "
                           f"nothing was changed: run again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder_line()}\n".encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder_line() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}"


CLIENT_OPTIONS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "timeout", "proxy_url",
                  "pool_idle_timeout", "pool_max_idle_per_host", "user_agent", "read_timeout"}
RENAMED = {"endpoint_url": "endpoint"}


def object_store(root: str, options: dict, dataset: str):
    """An obstore store for a lake root with the lake's storage options, written the way delta-rs takes
    them (`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...): client options apart,
    provider prefixes dropped; a few retries, so an unreachable store fails within a minute."""
    from datetime import timedelta

    from obstore.store import from_url
    config, client = {}, {}
    for key, value in options.items():
        k = key.lower()
        for prefix in ("aws_", "google_", "azure_"):
            k = k.removeprefix(prefix)
        k = RENAMED.get(k, k)
        if k in CLIENT_OPTIONS:
            client[k] = value.lower() == "true" if k.startswith("allow_") else value
        else:
            config[k] = value
    try:
        return from_url(root, config=config or None, client_options=client or None,
                        retry_config={"max_retries": 2, "backoff": {"init_backoff": timedelta(seconds=1)},
                                      "retry_timeout": timedelta(seconds=30)})
    except BaseException as exc:  # obstore raises (and panics, a BaseException) on options it does not know
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise LakeUnsupported(f"dataset {dataset} at {root}: the object store can't be opened with lake.storage_options "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); nothing was written"
                       ) from None


_leases: dict[str, "ObjectStoreLease"] = {}  # object-store dataset root -> the lease this process holds on it


def check_lease(spec: JobSpec) -> None:
    """Before a commit that others must not race (a publication, a rollback): an object-store lake's
    lease must still be this process's — one lost to an outage longer than its expiry may have been
    taken over, and then this run stops instead of publishing over the new holder's work."""
    lease = _leases.get(dataset_root(spec))
    if lease is not None:
        lease.check()


class ObjectStoreLease:
    """A lease on an object-store lake: `<root>/_etl/lease.json` holding who holds it and until when.

    Taken with a create-only put (the store refuses it when the object exists: S3 `If-None-Match`,
    GCS generation 0, Azure `If-None-Match`); renewed every `ttl / 3` by a compare-and-swap on the
    object's version, so a holder that died lets the next ETL in once `ttl` has passed; released by
    deleting it after checking it is still ours. A store that can't do conditional puts refuses the
    ETL with an error that says so (never an unguarded write)."""

    def __init__(self, root: str, options: dict, dataset: str, ttl: float = 1800.0, store=None) -> None:
        self.store = store if store is not None else object_store(root, options, dataset)
        self.root, self.dataset, self.ttl = root, dataset, ttl
        self.token = uuid.uuid4().hex
        self.version: dict | None = None
        self.lost = False
        self._stop = threading.Event()

    def _body(self) -> bytes:
        return json.dumps({"holder": holder_line(), "token": self.token,
                           "expires": time.time() + self.ttl}).encode()

    def _put(self, mode) -> None:
        import obstore
        from obstore.exceptions import (
            GenericError,
            PermissionDeniedError,
            UnauthenticatedError,
        )
        try:
            result = obstore.put(self.store, LEASE, self._body(), mode=mode)
        except (GenericError, PermissionDeniedError, UnauthenticatedError) as exc:  # unreachable, refused
            raise ConnectionError(f"dataset {self.dataset}: the object store at {self.root} could not be written "
                                  f"({str(exc).splitlines()[0]}); nothing was changed") from None
        self.version = {"e_tag": result["e_tag"], "version": result.get("version")}

    @staticmethod
    def _update(meta: dict) -> dict:
        """A put mode that succeeds only over exactly this version of the object (compare-and-swap)."""
        return {k: meta[k] for k in ("e_tag", "version") if meta.get(k) is not None}

    def acquire(self) -> None:
        import obstore
        from obstore.exceptions import (
            AlreadyExistsError,
            NotSupportedError,
            PreconditionError,
        )
        try:
            self._put("create")
            return
        except (NotSupportedError, NotImplementedError):
            raise LakeUnsupported(f"dataset {self.dataset} at {self.root}: this object store cannot create an object only if "
                           "it is absent, so concurrent ETLs cannot be excluded; refusing to write "
                           "(configure the store's conditional puts, e.g. S3 with If-None-Match)") from None
        except AlreadyExistsError:
            pass
        try:
            current = obstore.get(self.store, LEASE)
        except FileNotFoundError:  # released between our create and our read: try once more
            self._put("create")
            return
        doc = json.loads(bytes(current.bytes()))
        if doc.get("expires", 0) > time.time():
            raise LakeBusy(f"dataset {self.dataset} at {self.root} is being written by another ETL ({doc.get('holder')}, "
                           f"lease until {datetime.fromtimestamp(doc['expires'], timezone.utc).isoformat(timespec='seconds')}); "
                           "nothing was changed: run again when it has finished")
        meta = current.meta
        try:
            self._put(self._update(meta))
        except (PreconditionError, AlreadyExistsError):
            raise LakeBusy(f"dataset {self.dataset} at {self.root}: another ETL took the expired lease first; "
                           "nothing was changed") from None
        except (NotSupportedError, NotImplementedError):
            raise LakeUnsupported(f"dataset {self.dataset} at {self.root}: the lease {LEASE} of {doc.get('holder')} expired, "
                           "but this store cannot replace it atomically; delete it once you are sure no ETL runs") from None

    def renew(self) -> None:
        """Push the expiry forward: a compare-and-swap on the version this holder wrote last."""
        self._put(self._update(self.version))

    def check(self) -> None:
        """The lease is still this holder's and unexpired (`LakeBusy` otherwise)."""
        import obstore
        try:
            doc = json.loads(bytes(obstore.get(self.store, LEASE).bytes()))
        except FileNotFoundError:
            doc = {}
        if self.lost or doc.get("token") != self.token or doc.get("expires", 0) <= time.time():
            self.lost = True
            raise LakeBusy(f"dataset {self.dataset} at {self.root}: this ETL lost its lease (held now by "
                           f"{doc.get('holder', 'nobody')}); it stops before publishing anything")

    def release(self) -> None:
        """Delete the lease when it is still ours. (Object stores have no conditional delete: between the
        check and the delete another holder can only have taken it over if ours had expired.)"""
        import obstore
        try:
            doc = json.loads(bytes(obstore.get(self.store, LEASE).bytes()))
        except FileNotFoundError:
            return
        if doc.get("token") == self.token:
            obstore.delete(self.store, LEASE)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()

        def keep() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.renew()
                except Exception:  # taken over after an outage longer than the expiry: publication is refused
                    self.lost = True
                    return
        renewer = threading.Thread(target=keep, name="etl-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            self._stop.set()
            renewer.join(timeout=10)
            self.release()


# ----------------------------------------------------------------------------- paths

@dataclass(frozen=True)
class Lake:
    """One dataset's tables: `<lake.root>/<data.name>/<layer>/<table>` (absolute for local paths),
    with the storage options they are read and written with."""
    root: str
    storage_options: dict

    @classmethod
    def of(cls, spec: JobSpec) -> "Lake":
        return cls(absolute_path(f"{spec.lake.root.rstrip('/')}/{spec.data.name}"), storage_options(spec) or {})

    def path(self, table: str) -> str:
        if table not in TABLES:
            raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}")
        return f"{self.root}/{TABLES[table]}"

    def open(self, table: str, version: int | None = None):
        """The table (delta-rs) at `version` (default: its latest), None when it does not exist."""
        return open_table(self.path(table), version, self.storage_options, table)

    def version(self, table: str) -> int | None:
        return latest_version(self.path(table), self.storage_options, table)

    def count(self, table: str, version: int | None = None) -> int:
        """Row count from the Delta log's file statistics (no scan)."""
        return self.open(table, version).count()

    @property
    def summary_path(self) -> str:
        return f"{self.root}/_etl/summary.json"


def dataset_root(spec: JobSpec) -> str:
    """`<lake.root>/<data.name>`, absolute for local paths."""
    return Lake.of(spec).root


def table_path(spec: JobSpec, table: str) -> str:
    return Lake.of(spec).path(table)


# ----------------------------------------------------------------------------- the published set

@dataclass
class Publication:
    number: int              # commit order: the highest number is the published set
    versions: dict[str, int]
    source: str
    lineage: str | None      # the id lineage (`llmrec etl --renumber` starts a new one)
    days: dict[str, str]     # landed days this publication includes -> their content fingerprints
    inputs: str | None = None  # what a full build read (source, data settings, ETL code: `spark.etl.etl_inputs`)


def publications(spec: JobSpec) -> list[Publication]:
    """Every publication of the spec's dataset, oldest first, in commit order. Rows written before
    publications were numbered count in the order of their Delta commits (each is one append)."""
    path = f"{dataset_root(spec)}/{PUBLISHED}"
    table = open_table(path, options=storage_options(spec), table=PUBLISHED)
    if table is None:
        return []
    try:
        rows = read_rows(table)
    except Exception as exc:
        raise LakeCorrupt(f"table {PUBLISHED} ({path}): its data cannot be read ({delta_error_line(exc)})") from None
    if any(r.get("publication") is None for r in rows):  # written before numbering: one commit per row
        rows = _rows_in_commit_order(path, table.version(), storage_options(spec))
    out = []
    for i, r in enumerate(sorted(rows, key=lambda r: r["publication"] if r.get("publication") is not None else -1)):
        try:
            versions = {k: int(v) for k, v in json.loads(r["versions"]).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise LakeCorrupt(f"table {PUBLISHED} ({path}): publication {r.get('publication', i)} holds no version "
                              f"set ({exc})") from None
        out.append(Publication(r.get("publication") if r.get("publication") is not None else i, versions,
                               r.get("source") or "", r.get("lineage"), json.loads(r.get("landed_days") or "{}"),
                               r.get("inputs")))
    return sorted(out, key=lambda p: p.number)


def _rows_in_commit_order(path: str, latest: int, options: dict | None) -> list[dict]:
    """Rows of an append-only log, numbered by the commit that added each (its version): each
    version's rows less the previous version's, as multisets (row order in a snapshot means nothing).
    Only a log written before publications were numbered needs this, once: the next publication
    rewrites it numbered (`publish`)."""
    from collections import Counter
    rows, before = [], Counter()
    for v in range(latest + 1):
        snapshot = read_rows(open_table(path, v, options, PUBLISHED))
        keyed = {json.dumps(r, sort_keys=True, default=str): r for r in snapshot}
        now = Counter(json.dumps(r, sort_keys=True, default=str) for r in snapshot)
        for key, n in (now - before).items():
            rows += [{**keyed[key], "publication": v}] * n
        before = now
    return rows


def publish(spec: JobSpec, versions: dict[str, int], source: str, lineage: str | None = None,
            days: dict[str, str] | None = None, inputs: str | None = None) -> int:
    """Make `versions` the dataset's published set (one atomic append, numbered by the commit it
    becomes: commit order, never a wall clock, decides which set is current); returns that number.
    `inputs`: the fingerprint of what the build read (None: not known), which lets a full rebuild
    from the same inputs be skipped. Called under the ETL lock, so numbers never race."""
    import pyarrow as pa
    from deltalake import write_deltalake
    check_lease(spec)
    path = f"{dataset_root(spec)}/{PUBLISHED}"
    previous = publications(spec)
    opts = storage_options(spec)
    head = latest_version(path, opts, PUBLISHED)
    number = 0 if head is None else head + 1  # the commit this append becomes (no other writer: the lock)
    lineage = lineage or (previous[-1].lineage if previous else None) or uuid.uuid4().hex[:12]

    def rows(pubs: list[Publication]) -> pa.Table:
        return pa.table({"published_at": pa.array([datetime.now(timezone.utc)] * len(pubs), pa.timestamp("us", tz="UTC")),
                         "versions": [json.dumps(p.versions, sort_keys=True) for p in pubs],
                         "source": [p.source for p in pubs], "publication": pa.array([p.number for p in pubs], pa.int64()),
                         "lineage": [p.lineage for p in pubs],
                         "landed_days": [json.dumps(p.days, sort_keys=True) for p in pubs],
                         "inputs": pa.array([p.inputs for p in pubs], pa.string())})
    new = Publication(number, versions, source, lineage, days or {}, inputs)
    table = open_table(path, options=opts, table=PUBLISHED)
    if table is not None and "publication" not in table.schema().to_arrow().names:
        # a log written before publications were numbered: rewritten once, numbered, in this one commit
        write_deltalake(path, rows([*previous, new]), mode="overwrite", storage_options=opts, schema_mode="overwrite")
    else:
        write_deltalake(path, rows([new]), mode="append", storage_options=opts, schema_mode="merge")
    committed(path, latest_version(path, opts, PUBLISHED))
    return number


def current_publication(spec: JobSpec) -> Publication | None:
    pubs = publications(spec)
    return pubs[-1] if pubs else None


def published_versions(spec: JobSpec) -> dict[str, int] | None:
    """The published version set of the spec's dataset (the last publication in commit order), or
    None when nothing was published."""
    p = current_publication(spec)
    return dict(p.versions) if p else None


def ingested_days(spec: JobSpec, versions: dict[str, int] | None = None) -> dict[str, str]:
    """Landed days the published data includes -> the fingerprint of the files that were ingested:
    those of the current lineage's last full build (`llmrec etl` replays every day in the landing
    folder) and of every ingest after it — what the landing sensor, the nightly schedule, `llmrec
    ingest` and a full build's skip (`spark.etl.built_from`) compare the landing folder with. With
    `versions` (a model's data, a pinned set): the days that set includes (`included_days`)."""
    return included_days(publications(spec), versions)


def included_days(pubs: list[Publication], versions: dict[str, int] | None = None) -> dict[str, str]:
    """The landed days (-> fingerprints) of the newest publication, or of the newest one whose versions
    match `versions` on every table both name: its lineage's last full build before it and every
    ingest from there to it. Empty when no publication matches (a set this log never published)."""
    if versions is not None:
        matches = [i for i, p in enumerate(pubs)
                   if all(p.versions[k] == int(v) for k, v in versions.items() if k in p.versions)
                   and set(versions) & set(p.versions)]
        pubs = pubs[:matches[-1] + 1] if matches else []
    if not pubs:
        return {}
    lineage = [p for p in pubs if p.lineage == pubs[-1].lineage]
    full = max((i for i, p in enumerate(lineage) if p.source.startswith("etl")), default=0)
    days: dict[str, str] = {}
    for p in lineage[full:]:
        days.update(p.days)
    return days


def read_versions(spec: JobSpec) -> dict[str, int]:
    """The version set a reader of the spec's dataset uses: `data.pinned_versions` when set, else the
    latest published set; an error naming the dataset when there is neither."""
    versions = spec.data.pinned_versions or published_versions(spec)
    if not versions:
        raise FileNotFoundError(f"dataset {spec.data.name} at {dataset_root(spec)} has no published version set: "
                                "run `llmrec etl` (a set is published only when its data-quality checks pass)")
    return dict(versions)


# ----------------------------------------------------------------------------- writers' repairs

_COMMIT_FILE = re.compile(r"^(\d{20})\.json$")


@dataclass
class Repair:
    table: str
    action: str     # restored | torn_commit_set_aside
    detail: str


def rollback_unpublished(spec: JobSpec, tables: list[str]) -> list[Repair]:
    """Bring every table of the published set back to its published version before a writer starts
    (call it under the ETL lock): a torn commit file beyond the published version (a writer that
    died inside a commit) is moved aside into `_delta_log/_torn/`, and a table whose latest version
    is ahead of the published one (commits of a run that failed or was killed) is restored to it
    with Delta RESTORE — one new commit whose contents are the published version's. A torn commit
    at or below the published version is real corruption: `LakeCorrupt`. Tables with no published
    version are left to the writer (a full ETL overwrites them)."""
    check_lease(spec)
    repairs = set_aside_torn_commits(f"{dataset_root(spec)}/{PUBLISHED}", -1, PUBLISHED)
    published = published_versions(spec) or {}
    opts = storage_options(spec)
    for name in tables:
        if name not in published:
            continue
        path = table_path(spec, name)
        repairs += set_aside_torn_commits(path, published[name], name)
        table = open_table(path, options=opts, table=name)
        if table is None:
            raise LakeCorrupt(f"table {name} ({path}) is in the published set (version {published[name]}) but missing")
        if not at_published(table, published[name]):
            ahead = table.version()
            table.restore(published[name])
            committed(path, table.version())
            repairs.append(Repair(name, "restored", f"version {ahead} -> contents of published version "
                                                    f"{published[name]} (commit {table.version()})"))
    return repairs


def at_published(table, version: int) -> bool:
    """Whether the table's contents are its published version's: it is that version, or its newest
    commit is a RESTORE to it (an earlier rollback: restoring again would only add a commit)."""
    if table.version() == version:
        return True
    if table.version() < version:
        raise LakeCorrupt(f"table {table.table_uri}: its latest version {table.version()} is older than the "
                          f"published {version}")
    last = table.history(1)[0]
    return last.get("operation") == "RESTORE" and \
        str((last.get("operationParameters") or {}).get("version")) == str(version)


def set_aside_torn_commits(path: str, published: int, name: str) -> list[Repair]:
    """Local tables: commit files beyond `published` that are not whole JSON lines (a torn write)
    are moved into `_delta_log/_torn/`; object stores write a commit in one put, so they have none."""
    log = os.path.join(path, "_delta_log")
    if "://" in path or not os.path.isdir(log):
        return []
    repairs = []
    for entry in sorted(os.listdir(log), reverse=True):
        m = _COMMIT_FILE.match(entry)
        if not m:
            continue
        version = int(m.group(1))
        if _whole_commit(os.path.join(log, entry)):
            break  # only the newest commits can be torn: a writer commits one version at a time
        if version <= published:
            raise LakeCorrupt(f"table {name} ({path}): commit {version} of its published data is not readable JSON; "
                              "restore the table from a backup")
        aside = os.path.join(log, "_torn")
        os.makedirs(aside, exist_ok=True)
        os.replace(os.path.join(log, entry), os.path.join(aside, f"{entry}.{int(time.time())}"))
        repairs.append(Repair(name, "torn_commit_set_aside", f"commit {version} (beyond published {published}) "
                                                           f"moved to {aside}"))
    return repairs


def _whole_commit(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    try:
        return bool(lines) and all(isinstance(json.loads(line), dict) for line in lines if line.strip())
    except ValueError:
        return False
