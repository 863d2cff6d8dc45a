"""The queue's store: entries, tokens (as SHA-256), order, member counts and the dispatcher's
lease, in SQLite (one process) or PostgreSQL (several queue processes sharing one database).

Its own Peewee database, not the monitor's (`monitor.models`): a queue may run on a host that
is no hypervisor, and several may share PostgreSQL. Every model class is bound per store
(`_bind`), so one process can open several stores (the tests run two engines side by side).

Any thread may call a store: Peewee keeps one connection per thread. On PostgreSQL a call
borrows one from a pool of POOL_CONNECTIONS and gives it back when it returns: a queue
process has dozens of web threads per address, and PostgreSQL's 100 connections are shared
by every queue process (and whatever else runs there). A database that cannot be reached (or
a pool that stays exhausted) raises `TransientError` (503), and the connection of the thread
that saw it is dropped, so the next call connects again: the store recovers by itself once
the server is back. Transitions of an entry's state are conditional updates (`WHERE state =
...`), so two processes never both move one entry; on PostgreSQL the dispatcher claims entries with
`SELECT ... FOR UPDATE SKIP LOCKED`, never waiting behind a client's poll.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from typing import ParamSpec
from typing import TypeVar
from typing import cast
from urllib.parse import urlsplit

from peewee import AutoField
from peewee import BooleanField
from peewee import CharField
from peewee import Database
from peewee import DoubleField
from peewee import IntegerField
from peewee import IntegrityError
from peewee import InterfaceError
from peewee import Model
from peewee import OperationalError
from peewee import SqliteDatabase
from peewee import TextField
from peewee import fn
from playhouse.pool import MaxConnectionsExceeded
from playhouse.pool import PooledPostgresqlDatabase

from monitor.errors import ConfigError
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.queue.contracts import Counts
from monitor.queue.contracts import Entry
from monitor.queue.contracts import EntryState
from monitor.queue.contracts import MemberView
from monitor.queue.contracts import Waiting

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_FILENAME = "queue.sqlite3"
LEASE = "dispatcher"
ACTIVE: tuple[EntryState, ...] = ("waiting", "reserving")
FINISHED: tuple[EntryState, ...] = ("expired", "cancelled", "failed")
# Connecting to an unreachable server fails within this, and no statement runs longer: a
# client's request gets its 503 well inside its 30 s.
CONNECT_TIMEOUT = 3
STATEMENT_TIMEOUT_MS = 10_000
# Connections a queue process holds at most on PostgreSQL; a call waits up to CONNECT_TIMEOUT
# for one (each call is a few milliseconds), then answers 503. An idle one is closed after
# POOL_STALE_SECONDS.
POOL_CONNECTIONS = 8
POOL_STALE_SECONDS = 300

P = ParamSpec("P")
R = TypeVar("R")


class TimestampField(DoubleField):
    """A tz-aware UTC datetime stored as float seconds since the epoch (sortable, exact)."""

    def db_value(self, value: datetime | None) -> float | None:
        return None if value is None else value.timestamp()

    def python_value(self, value: float | None) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, UTC)


class EntryRow(Model):
    seq = AutoField()  # the enqueue order: increasing across every process sharing the store
    unique_id = CharField(unique=True)
    token_sha256 = CharField()
    profile = CharField()
    count = IntegerField()
    qualified_repo = CharField()
    run_id = CharField()
    priority = IntegerField(default=0)
    state = CharField(index=True)
    enqueued_at = TimestampField()
    last_poll_at = TimestampField(null=True)
    served_at = TimestampField(null=True)
    # When a poll first answered "served": a served entry nobody was told about expires like
    # a waiting one, releasing its runners (its client fell back).
    answered_at = TimestampField(null=True)
    finished_at = TimestampField(null=True, index=True)
    reserved = TextField(default="{}")  # JSON: member url -> runner ids
    plan = TextField(default="{}")  # JSON: member url -> runners, while reserving
    attempt = IntegerField(default=0)  # bumped by each claim; a late result of an old one is void
    failures = IntegerField(default=0)
    error = TextField(null=True)


class MemberRow(Model):
    url = CharField(primary_key=True)
    counts = TextField(default="{}")  # JSON: profile -> {idle, healthy, target}
    fresh = BooleanField(default=False)
    polled_at = TimestampField(null=True)
    error = TextField(null=True)


class LeaseRow(Model):
    name = CharField(primary_key=True)
    holder = CharField()
    expires_at = TimestampField()


class SettingRow(Model):
    key = CharField(primary_key=True)
    value = TextField()


@dataclass(frozen=True)
class Record:
    """An entry as the engine needs it: the public `Entry` plus what stays inside."""

    entry: Entry
    token_sha256: str
    answered_at: datetime | None
    plan: dict[str, int]
    attempt: int
    failures: int

    @property
    def waiting(self) -> Waiting:
        e = self.entry
        return Waiting(e.unique_id, e.profile, e.count, e.priority, e.seq)


@dataclass(frozen=True)
class Claimed:
    unique_id: str
    attempt: int
    plan: dict[str, int]
    qualified_repo: str
    run_id: str
    profile: str
    count: int


def _bind(
    database: Database,
) -> tuple[type[EntryRow], type[MemberRow], type[LeaseRow], type[SettingRow]]:
    """Subclasses of the row models bound to `database` (one set per store)."""

    def bound(base: type[Model], table: str) -> type[Any]:
        meta = type("Meta", (), {"database": database, "table_name": table})
        return type(base.__name__, (base,), {"Meta": meta, "__module__": __name__})

    return (
        bound(EntryRow, "queue_entry"),
        bound(MemberRow, "queue_member"),
        bound(LeaseRow, "queue_lease"),
        bound(SettingRow, "queue_setting"),
    )


class LendingPool(PooledPostgresqlDatabase):
    """Peewee's pool, lending a connection on its local state only. Peewee checks each
    connection it lends with a `SELECT 1` round trip while holding the pool's lock, so every
    borrow of every thread queued behind one round trip at a time: with 500 clients polling
    once a second, the answer's p50 was 135 ms (bench/queue.py). A connection that broke
    while idle in the pool is found on use instead: `_guarded` drops it and answers 503 (the
    client retries), and the next call gets another."""

    def _is_closed(self, conn: Any) -> bool:
        from psycopg2.extensions import TRANSACTION_STATUS_UNKNOWN  # type: ignore[import-untyped]

        return bool(conn.closed) or conn.get_transaction_status() == TRANSACTION_STATUS_UNKNOWN


def database_for(url: str, data_path: Path | None = None) -> Database:
    """`sqlite:////abs/path` (WAL), `postgresql://user:password@host:port/name`, or "" for
    `<data_path>/queue.sqlite3`."""
    if not url:
        if data_path is None:
            raise ConfigError("queue store: no database URL and no data_path")
        data_path.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{data_path.resolve() / DEFAULT_FILENAME}"
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # As SQLAlchemy and playhouse.db_url read it: sqlite:////abs/path (four slashes) is
        # absolute; sqlite:///rel/path is relative, here to data_path (the daemon's cwd is /).
        raw = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
        if not raw or raw.endswith("/"):
            raise ConfigError(f"queue store: {url!r} names no file (sqlite:////abs/path)")
        path = Path(raw) if raw.startswith("/") else (data_path or Path.cwd()) / raw
        path.parent.mkdir(parents=True, exist_ok=True)
        # Tokens are stored only hashed, but entries say which repositories run what.
        path.touch(mode=0o600, exist_ok=True)
        return SqliteDatabase(
            str(path),
            pragmas={"journal_mode": "wal", "synchronous": "normal"},
            timeout=10,
            check_same_thread=False,
            # Every transaction here reads then writes: take the write lock at BEGIN, so two
            # processes wait for each other (busy timeout) instead of failing on the upgrade.
            lock_type="IMMEDIATE",
        )
    if parts.scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            raise ConfigError(f"queue store: {redact(url)} names no database")
        return LendingPool(
            parts.path.lstrip("/"),
            max_connections=POOL_CONNECTIONS,
            stale_timeout=POOL_STALE_SECONDS,
            timeout=CONNECT_TIMEOUT,
            user=parts.username,
            password=parts.password,
            host=parts.hostname,
            port=parts.port,
            connect_timeout=CONNECT_TIMEOUT,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            # Notice a server that vanished without closing the connection.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
    raise ConfigError(
        f"queue store: unsupported database URL {redact(url)} "
        "(expected sqlite:////absolute/path or postgresql://user:password@host/database)"
    )


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Turn a lost or unreachable database into `TransientError` and drop the connection; on
    PostgreSQL, give the connection back to the pool after the outermost call."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        store = cast("QueueStore", args[0])
        borrowed = store.postgres and store.db.is_closed()
        try:
            return method(*args, **kwargs)
        except (OperationalError, InterfaceError, MaxConnectionsExceeded) as error:
            store.drop_connection()
            raise TransientError(f"queue store unreachable: {str(error).strip()}") from error
        finally:
            if borrowed and not store.db.is_closed() and not store.db.in_transaction():
                store.db.close()  # back to the pool

    return guarded


def _json_ids(text: str) -> dict[str, list[int]]:
    return {url: [int(i) for i in ids] for url, ids in json.loads(text or "{}").items()}


class QueueStore:
    """The queue's rows. Methods are small transactions; see the module docstring."""

    def __init__(self, url: str = "", data_path: Path | None = None) -> None:
        self.url = redact(url) if url else f"sqlite:///{data_path}/{DEFAULT_FILENAME}"
        self.db = database_for(url, data_path)
        self.postgres = isinstance(self.db, PooledPostgresqlDatabase)
        self.E, self.M, self.L, self.S = _bind(self.db)
        self.migrate()

    # -- connection ---------------------------------------------------------------------

    def drop_connection(self) -> None:
        try:
            if isinstance(self.db, PooledPostgresqlDatabase):
                self.db.manual_close()  # closed, not back to the pool: it may be broken
            else:
                self.db.close()
        except Exception:  # the connection is broken anyway: forget it
            self.db.dispose()

    def close(self) -> None:
        self.drop_connection()
        if isinstance(self.db, PooledPostgresqlDatabase):
            self.db.close_all()

    @_guarded
    def migrate(self) -> None:
        with self.db.atomic():
            if self.postgres:
                # Two queue processes starting together would race on CREATE TABLE.
                self.db.execute_sql("SELECT pg_advisory_xact_lock(1414)")
            self.db.create_tables([self.E, self.M, self.L, self.S], safe=True)
            row = self.S.get_or_none(self.S.key == "schema_version")
            if row is None:
                self.S.create(key="schema_version", value=str(SCHEMA_VERSION))
            elif int(row.value) > SCHEMA_VERSION:
                raise MonitorError(
                    f"queue store {self.url}: schema version {row.value} is newer than this "
                    f"queue's ({SCHEMA_VERSION}); upgrade the monitor"
                )

    def _locked(self, query: Any) -> Any:
        """`query` with its rows locked for this transaction, skipping rows another holds
        (PostgreSQL; SQLite's IMMEDIATE transaction already excludes other writers)."""
        return query.for_update(skip_locked=True) if self.postgres else query

    # -- entries ------------------------------------------------------------------------

    def _record(self, row: EntryRow) -> Record:
        entry = Entry(
            unique_id=row.unique_id,
            profile=row.profile,
            count=row.count,
            qualified_repo=row.qualified_repo,
            run_id=row.run_id,
            priority=row.priority,
            seq=row.seq,
            state=cast(EntryState, row.state),
            enqueued_at=cast(datetime, row.enqueued_at),
            last_poll_at=cast("datetime | None", row.last_poll_at),
            served_at=cast("datetime | None", row.served_at),
            reserved=_json_ids(row.reserved),
        )
        plan = {url: int(n) for url, n in json.loads(row.plan or "{}").items()}
        return Record(
            entry=entry,
            token_sha256=row.token_sha256,
            answered_at=cast("datetime | None", row.answered_at),
            plan=plan,
            attempt=row.attempt,
            failures=row.failures,
        )

    @_guarded
    def add(
        self,
        *,
        unique_id: str,
        token_sha256: str,
        profile: str,
        count: int,
        qualified_repo: str,
        run_id: str,
        priority: int,
        now: datetime,
    ) -> Record:
        """A new waiting entry (last in its priority's order); 409 if the id is known."""
        try:
            with self.db.atomic():
                row = self.E.create(
                    unique_id=unique_id,
                    token_sha256=token_sha256,
                    profile=profile,
                    count=count,
                    qualified_repo=qualified_repo,
                    run_id=run_id,
                    priority=priority,
                    state="waiting",
                    enqueued_at=now,
                    last_poll_at=now,
                )
        except IntegrityError as error:
            raise MonitorError(f"Already in queue: {unique_id}", status=409) from error
        return self._record(row)

    @functools.cached_property
    def _get_sql(self) -> str:
        """`get`'s SELECT, made once. Every client poll runs it (500 clients: 500 a second),
        and Peewee building the same query each time cost 60 % of a poll's CPU."""
        E = self.E
        sql, _ = E.select(*E._meta.sorted_fields).where(E.unique_id == "").sql()
        return str(sql)

    @functools.cached_property
    def _active_sql(self) -> tuple[str, list[Any]]:
        """`active`'s SELECT, made once (the dispatcher runs it twice a second)."""
        E = self.E
        query = E.select(*E._meta.sorted_fields).where(E.state.in_(ACTIVE))
        sql, params = query.order_by(E.priority.desc(), E.seq).sql()
        return str(sql), list(params)

    def _from_columns(self, found: Sequence[Any]) -> Record:
        """A Record from a row of `SELECT <every column, in sorted_fields order>`, without
        making a Peewee model instance."""
        fields = self.E._meta.sorted_fields
        values = {f.name: f.python_value(value) for f, value in zip(fields, found, strict=True)}
        return self._record(cast(EntryRow, SimpleNamespace(**values)))

    @functools.cached_property
    def _touch_sql(self) -> str:
        E = self.E
        sql, _ = (
            E.update(last_poll_at=datetime.fromtimestamp(0, UTC)).where(E.unique_id == "").sql()
        )
        return str(sql)

    @_guarded
    def get(self, unique_id: str) -> Record | None:
        found = self.db.execute_sql(self._get_sql, (unique_id,)).fetchone()
        return None if found is None else self._from_columns(found)

    @_guarded
    def touch(self, unique_id: str, now: datetime) -> None:
        """A poll keeps the entry alive."""
        self.db.execute_sql(self._touch_sql, (now.timestamp(), unique_id))

    @_guarded
    def answer(self, unique_id: str, now: datetime) -> bool:
        """Note that a poll answered "served"; False when the entry is no longer served (it
        expired or was cancelled meanwhile: the answer must not be "served" then)."""
        E = self.E
        query = E.update(last_poll_at=now, answered_at=fn.COALESCE(E.answered_at, now.timestamp()))
        return bool(query.where(E.unique_id == unique_id, E.state == "served").execute())

    @_guarded
    def active(self) -> list[Record]:
        """Waiting and reserving entries, in serving order."""
        sql, params = self._active_sql
        return [self._from_columns(found) for found in self.db.execute_sql(sql, params)]

    @_guarded
    def claim(self, planned: Sequence[tuple[Waiting, Mapping[str, int]]]) -> list[Claimed]:
        """Move planned entries from waiting to reserving, with their plan. An entry that is
        no longer waiting, or locked by another transaction, is skipped, and so is every
        later one of its profile (they must not overtake it)."""
        if not planned:
            return []
        E = self.E
        ids = [waiting.unique_id for waiting, _ in planned]
        claimed: list[Claimed] = []
        with self.db.atomic():
            query = E.select().where(E.unique_id.in_(ids), E.state == "waiting")
            rows = {row.unique_id: row for row in self._locked(query)}
            held_back: set[str] = set()
            for waiting, shares in planned:
                row = rows.get(waiting.unique_id)
                if row is None or waiting.profile in held_back:
                    held_back.add(waiting.profile)
                    continue
                attempt = row.attempt + 1
                E.update(state="reserving", plan=json.dumps(dict(shares)), attempt=attempt).where(
                    E.seq == row.seq
                ).execute()
                claimed.append(
                    Claimed(
                        row.unique_id,
                        attempt,
                        dict(shares),
                        row.qualified_repo,
                        row.run_id,
                        row.profile,
                        row.count,
                    )
                )
        return claimed

    @_guarded
    def reserving(self) -> list[Claimed]:
        """Every entry in the reserving state (a new dispatcher finishes what an old one left)."""
        E = self.E
        rows = E.select().where(E.state == "reserving").order_by(E.seq)
        return [
            Claimed(
                row.unique_id,
                row.attempt,
                {url: int(n) for url, n in json.loads(row.plan).items()},
                row.qualified_repo,
                row.run_id,
                row.profile,
                row.count,
            )
            for row in rows
        ]

    @_guarded
    def serve(
        self, unique_id: str, attempt: int, reserved: Mapping[str, Sequence[int]], now: datetime
    ) -> EntryState | None:
        """Reserving -> served with the runners reserved; None on success, else the state the
        entry is in now (an attempt that is no longer current must not serve it)."""
        E = self.E
        with self.db.atomic():
            changed = (
                E.update(
                    state="served",
                    served_at=now,
                    reserved=json.dumps({url: list(ids) for url, ids in reserved.items()}),
                    plan="{}",
                )
                .where(E.unique_id == unique_id, E.state == "reserving", E.attempt == attempt)
                .execute()
            )
            if changed:
                return None
            row = E.get_or_none(E.unique_id == unique_id)
        return cast(EntryState, row.state) if row is not None else "cancelled"

    @_guarded
    def put_back(
        self,
        unique_id: str,
        attempt: int,
        error: str,
        *,
        give_up: bool,
        now: datetime,
        failed: bool = True,
    ) -> bool:
        """Reserving -> waiting (same seq: it keeps its place) after a take that did not get
        every runner, or -> failed when it has failed too often. `failed=False`: the members
        only had fewer runners than they said, which does not count as a failure."""
        E = self.E
        values: dict[str, Any] = {"plan": "{}", "reserved": "{}", "error": error}
        if failed:
            values["failures"] = E.failures + 1
        if give_up:
            values.update(state="failed", finished_at=now)
        else:
            values["state"] = "waiting"
        query = E.update(**values).where(
            E.unique_id == unique_id, E.state == "reserving", E.attempt == attempt
        )
        return bool(query.execute())

    @_guarded
    def expire(self, now: datetime, after: float) -> list[Record]:
        """Waiting entries, and served ones never answered, with no poll for `after` seconds
        -> expired. Returns them (what was reserved for them is to be released)."""
        E = self.E
        cutoff = now - timedelta(seconds=after)
        waiting = (E.state == "waiting") & (E.last_poll_at < cutoff)
        unanswered = (
            (E.state == "served")
            & E.answered_at.is_null()
            & (E.last_poll_at < cutoff)
            & (E.served_at < cutoff)
        )
        expired: list[Record] = []
        with self.db.atomic():
            for row in self._locked(E.select().where(waiting | unanswered)):
                changed = (
                    E.update(state="expired", finished_at=now)
                    .where(E.seq == row.seq, E.state == row.state)
                    .execute()
                )
                if changed:
                    expired.append(self._record(row))
        return expired

    @_guarded
    def cancel(self, unique_id: str, now: datetime) -> Record | None:
        """Any unfinished entry -> cancelled; returns it as it was (None if unknown)."""
        E = self.E
        with self.db.atomic():
            row = E.get_or_none(E.unique_id == unique_id)
            if row is None:
                return None
            if row.state in FINISHED:
                return self._record(row)
            E.update(state="cancelled", finished_at=now).where(E.seq == row.seq).execute()
        return self._record(row)

    @_guarded
    def recent(self, limit: int = 50) -> list[Entry]:
        """The latest finished or served entries, newest first."""
        E = self.E
        order = fn.COALESCE(E.finished_at, E.served_at)
        query = E.select().where(E.state.not_in(ACTIVE)).order_by(order.desc()).limit(limit)
        return [self._record(row).entry for row in query]

    @_guarded
    def served_since(self, since: datetime) -> list[Entry]:
        """Entries served at or after `since` (still served: not cancelled or expired since),
        oldest first."""
        E = self.E
        query = E.select().where(E.state == "served", E.served_at >= since).order_by(E.seq)
        return [self._record(row).entry for row in query]

    @_guarded
    def prune(self, before: datetime) -> int:
        """Forget entries that ended (or were served) before `before`."""
        E = self.E
        ended = fn.COALESCE(E.finished_at, E.served_at) < before.timestamp()
        return int(E.delete().where(E.state.not_in(ACTIVE), ended).execute())  # type: ignore[misc, unused-ignore]

    # -- members ------------------------------------------------------------------------

    @_guarded
    def save_members(self, views: Iterable[MemberView]) -> None:
        M = self.M
        with self.db.atomic():
            for view in views:
                counts = {
                    profile: {"idle": c.idle, "healthy": c.healthy, "target": c.target}
                    for profile, c in view.counts.items()
                }
                M.insert(
                    url=view.url,
                    counts=json.dumps(counts),
                    fresh=view.fresh,
                    polled_at=view.polled_at,
                    error=view.error,
                ).on_conflict(
                    conflict_target=[M.url],
                    preserve=[M.counts, M.fresh, M.polled_at, M.error],
                ).execute()

    @_guarded
    def members(self, now: datetime, fresh_for: float) -> list[MemberView]:
        """Members as last polled by any queue process; fresh only if polled successfully
        within `fresh_for` seconds (a dead dispatcher leaves no member fresh for long)."""
        cutoff = now - timedelta(seconds=fresh_for)
        views = []
        for row in self.M.select().order_by(self.M.url):
            polled_at = cast("datetime | None", row.polled_at)
            counts = {
                profile: Counts(int(c["idle"]), int(c["healthy"]), int(c["target"]))
                for profile, c in json.loads(row.counts).items()
            }
            fresh = bool(row.fresh) and polled_at is not None and polled_at >= cutoff
            views.append(MemberView(row.url, fresh, counts, polled_at, row.error))
        return views

    # -- the dispatcher's lease ----------------------------------------------------------

    @_guarded
    def acquire_lease(self, holder: str, now: datetime, seconds: float) -> bool:
        """Take or renew the lease: True while `holder` holds it (until now + seconds)."""
        L = self.L
        expires = now + timedelta(seconds=seconds)
        with self.db.atomic():
            taken = (
                L.update(holder=holder, expires_at=expires)
                .where(L.name == LEASE, (L.holder == holder) | (L.expires_at < now))
                .execute()
            )
            if taken:
                return True
            if L.get_or_none(L.name == LEASE) is not None:
                return False
            inserted = (
                L.insert(name=LEASE, holder=holder, expires_at=expires).on_conflict_ignore()
            ).execute()
        return bool(inserted) and self.lease_holder(now) == holder

    @_guarded
    def lease_holder(self, now: datetime) -> str | None:
        row = self.L.get_or_none(self.L.name == LEASE)
        if row is None or cast(datetime, row.expires_at) < now:
            return None
        return str(row.holder)

    @_guarded
    def release_lease(self, holder: str) -> None:
        L = self.L
        L.update(expires_at=datetime.fromtimestamp(0, UTC)).where(
            L.name == LEASE, L.holder == holder
        ).execute()
