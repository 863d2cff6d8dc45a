"""The store: Peewee models on one SQLite file (WAL) under `data_path`.

What survives a restart lives here: every runner the monitor created or adopted (with its
JIT config, which is a secret and never leaves this module except to the guest that owns
it), the runner id counter (ids are never reused), the policy override, and an event log of
what the monitor did and why. Imports no other project module but `errors` and `policy`.

`Model.delete()` carries `type: ignore[misc, unused-ignore]`: builds of types-peewee 4.5.1 differ
in whether class access to `delete` is "ambiguous", and the code must check under either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import cast

from peewee import AutoField
from peewee import BooleanField
from peewee import CharField
from peewee import DoubleField
from peewee import Field
from peewee import IntegerField
from peewee import Model
from peewee import SqliteDatabase
from peewee import TextField
from peewee import fn

from monitor.errors import MonitorError
from monitor.policy import Holds
from monitor.policy import Override
from monitor.policy import RunnerRecord

log = logging.getLogger(__name__)

# `Model.delete()` calls carry `type: ignore[misc]`: types-peewee declares `delete` with a
# descriptor that mypy finds "ambiguous" on any model class.

SCHEMA_VERSION = 5
DB_FILENAME = "monitor.sqlite3"
# Keep the event log bounded: a busy host writes a few events a minute.
MAX_EVENTS = 20_000
TRIM_EVERY = 1000

db = SqliteDatabase(None)


class TimestampField(DoubleField):
    """A tz-aware UTC datetime stored as float seconds since the epoch (sortable, exact)."""

    def db_value(self, value: datetime | None) -> float | None:
        return None if value is None else value.timestamp()

    def python_value(self, value: float | None) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, UTC)


class BaseModel(Model):
    class Meta:
        database = db


class Setting(BaseModel):
    """Small named values: schema version, last runner id, the override (JSON)."""

    key = CharField(primary_key=True)
    value = TextField()


class Runner(BaseModel):
    """A runner the monitor created or adopted. `destroyed_at` is set once neither its guest
    nor its registration exists any more; the row is kept as history."""

    id = IntegerField(primary_key=True)
    profile = CharField()
    guest_name = CharField()
    registration_id = IntegerField(null=True)
    # The encoded JIT config: a credential for one runner. Never logged, never in a response
    # other than the guest's own /github-jitconfig.
    jit_config = TextField(null=True)
    created_at = TimestampField()
    registered_at = TimestampField(null=True)
    started_at = TimestampField(null=True)
    destroyed_at = TimestampField(null=True, index=True)
    adopted = BooleanField(default=False)
    # The snapshot of the rebuilt base image the runner was made from (None: a prebuilt
    # `base_image`, or adopted): rolling rebuilds replace runners of older snapshots.
    image = CharField(null=True)
    # SHA-256 of the guest's own token (the token itself goes only into its domain XML) and
    # when its JIT config was served: a guest token fetches the JIT config once.
    guest_token_sha256 = CharField(null=True, index=True)
    jit_served_at = TimestampField(null=True)

    def __repr__(self) -> str:  # keep the secret out of debug output
        return f"<Runner {self.id} {self.guest_name}>"


class Event(BaseModel):
    """One thing the monitor did or saw, and why."""

    id = AutoField()  # as Peewee would add: named, so that the type checker knows it
    at = TimestampField(index=True)
    kind = CharField()
    message = TextField()
    runner_id = IntegerField(null=True, index=True)
    profile = CharField(null=True)


class Reservation(BaseModel):
    """The runners a take gave to one workflow job, so a retried request (curl --retry)
    gets the same runners back instead of a second set."""

    unique_id = CharField(primary_key=True)
    profile = CharField()
    count = IntegerField()
    runner_ids = TextField()  # JSON list, ascending
    qualified_repo = CharField()
    run_id = CharField()
    created_at = TimestampField(index=True)

    @property
    def ids(self) -> list[int]:
        return [int(i) for i in json.loads(self.runner_ids)]


class TakeRecord(BaseModel):
    """Reservation history: one row per runner a take gave (or one with no runner for a
    `null` answer or a failure), kept after the runner is gone. The times answer "why did
    this job wait?": asked → answered (the monitor), answered → started (GitHub's queue),
    started → ended (the job on the runner)."""

    id = AutoField()  # as Peewee would add: named, so that the type checker knows it
    unique_id = CharField(index=True)
    profile = CharField()
    qualified_repo = CharField()
    run_id = CharField()
    runner_id = IntegerField(null=True, index=True)
    outcome = CharField()  # "reserved", "null" or "failed"
    asked_at = TimestampField(index=True)
    answered_at = TimestampField()
    started_at = TimestampField(null=True)
    ended_at = TimestampField(null=True)


class RevokedCredential(BaseModel):
    """An API token or HMAC secret that no longer opens anything, by its SHA-256."""

    sha256 = CharField(primary_key=True)
    name = CharField()
    revoked_at = TimestampField()


MODELS = (Setting, Runner, Event, Reservation, RevokedCredential, TakeRecord)


def open_store(data_path: Path) -> Path:
    """Open (creating and migrating as needed) the store under `data_path`; returns the file."""
    data_path.mkdir(parents=True, exist_ok=True)
    path = data_path / DB_FILENAME
    # The store holds JIT configs (runner credentials): readable by the monitor's user only.
    # SQLite gives its -wal and -shm files the same mode.
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    if not db.is_closed():
        db.close()
    db.init(
        str(path),
        pragmas={"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1},
        timeout=10,
        check_same_thread=False,
    )
    db.connect(reuse_if_open=True)
    migrate()
    _import_upstream_runner_id(data_path)
    return path


def close_store() -> None:
    if not db.is_closed():
        db.close()


def schema_version() -> int:
    if not db.table_exists("setting"):
        return 0
    row = Setting.get_or_none(Setting.key == "schema_version")
    return int(row.value) if row else 0


def migrate() -> None:
    """Bring the schema up to SCHEMA_VERSION, one numbered step at a time."""
    current = schema_version()
    if current > SCHEMA_VERSION:
        raise MonitorError(
            f"{db.database}: schema version {current} is newer than this monitor "
            f"understands ({SCHEMA_VERSION}); upgrade the monitor"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with db.atomic():
            _MIGRATIONS[version]()
            _set("schema_version", str(version))
        log.info("store migrated to schema version %d", version)


def _migration_1() -> None:
    db.create_tables((Setting, Runner, Event))


def _migration_2() -> None:
    db.create_tables((Reservation,))


def _migration_3() -> None:
    # Stores made by version 1 lack the column; version 1's create_tables of a new store
    # already has it (it creates the current model).
    if "image" not in {column.name for column in db.get_columns(Runner._meta.table_name)}:
        db.execute_sql(f'ALTER TABLE "{Runner._meta.table_name}" ADD COLUMN "image" VARCHAR(255)')


def _migration_4() -> None:
    db.create_tables((RevokedCredential,))
    table = Runner._meta.table_name
    columns = {column.name for column in db.get_columns(table)}
    if "guest_token_sha256" not in columns:
        db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "guest_token_sha256" VARCHAR(255)')
        db.execute_sql(
            f'CREATE INDEX IF NOT EXISTS "runner_guest_token_sha256" '
            f'ON "{table}" ("guest_token_sha256")'
        )
    if "jit_served_at" not in columns:
        db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "jit_served_at" REAL')


def _migration_5() -> None:
    db.create_tables((TakeRecord,))


_MIGRATIONS = {
    1: _migration_1,
    2: _migration_2,
    3: _migration_3,
    4: _migration_4,
    5: _migration_5,
}


def _get(key: str) -> str | None:
    row = Setting.get_or_none(Setting.key == key)
    return row.value if row else None


def _set(key: str, value: str | None) -> None:
    if value is None:
        Setting.delete().where(Setting.key == key).execute()  # type: ignore[misc, unused-ignore]
    else:
        Setting.insert(key=key, value=value).on_conflict_replace().execute()


# Runner ids ---------------------------------------------------------------------------------


def last_runner_id() -> int | None:
    value = _get("last_runner_id")
    return None if value is None else int(value)


def allocate_runner_id() -> int:
    """The next runner id: 0 on an empty store (as upstream), else last + 1. Never reused."""
    with db.atomic("IMMEDIATE"):
        last = last_runner_id()
        next_id = 0 if last is None else last + 1
        _set("last_runner_id", str(next_id))
    return next_id


def ensure_runner_id_above(runner_id: int) -> None:
    """Make sure later allocations come after `runner_id` (after adopting or importing)."""
    with db.atomic("IMMEDIATE"):
        last = last_runner_id()
        if last is None or last < runner_id:
            _set("last_runner_id", str(runner_id))


def _import_upstream_runner_id(data_path: Path) -> None:
    """Continue upstream's numbering when its `data/last-runner-id` is found."""
    path = data_path / "last-runner-id"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return
    except OSError as error:
        log.warning("cannot read %s: %s", path, error)
        return
    try:
        upstream_last = int(text)
    except ValueError:
        log.warning("ignoring %s: not an integer", path)
        return
    before = last_runner_id()
    ensure_runner_id_above(upstream_last)
    if before is None or before < upstream_last:
        record_event("import", f"continuing upstream runner ids after {upstream_last} ({path})")


# Runners ------------------------------------------------------------------------------------


def create_runner(
    runner_id: int,
    profile: str,
    guest_name: str,
    created_at: datetime,
    adopted: bool = False,
    image: str | None = None,
) -> Runner:
    return Runner.create(
        id=runner_id,
        profile=profile,
        guest_name=guest_name,
        created_at=created_at,
        adopted=adopted,
        image=image,
    )


def get_runner(runner_id: int) -> Runner | None:
    return Runner.get_or_none(Runner.id == runner_id)


def runners_by_id(runner_ids: Iterable[int]) -> dict[int, Runner]:
    """The rows of these runners (one query), by id; absent ids are missing."""
    ids = list(runner_ids)
    if not ids:
        return {}
    return {row.id: row for row in Runner.select().where(Runner.id.in_(ids))}


def live_runners() -> list[Runner]:
    return list(Runner.select().where(Runner.destroyed_at.is_null()).order_by(Runner.id))


def live_records() -> dict[int, RunnerRecord]:
    """What each live runner's pairing needs (every pass reads this: plain tuples, fast)."""
    query = (
        Runner.select(Runner.id, Runner.profile, Runner.created_at, Runner.image)
        .where(Runner.destroyed_at.is_null())
        .tuples()
    )
    # The stubs keep the model as the row type; `.tuples()` gives plain tuples.
    rows = cast(Iterable[tuple[int, str, datetime, str | None]], query)
    return {
        runner_id: RunnerRecord(profile=profile, created_at=created_at, image=image)
        for runner_id, profile, created_at, image in rows
    }


def record_registration(
    runner_id: int, registration_id: int, jit_config: str, at: datetime
) -> None:
    Runner.update(registration_id=registration_id, jit_config=jit_config, registered_at=at).where(
        Runner.id == runner_id
    ).execute()


def set_guest_token(runner_id: int, sha256: str) -> None:
    """Remember the hash of the token a runner's guest will be given (before it is made)."""
    Runner.update(guest_token_sha256=sha256).where(Runner.id == runner_id).execute()


def runner_by_guest_token(sha256: str) -> Runner | None:
    """The live runner whose guest was given the token with this hash."""
    return Runner.get_or_none((Runner.guest_token_sha256 == sha256) & Runner.destroyed_at.is_null())


def claim_jit_config(runner_id: int, at: datetime) -> bool:
    """Mark a runner's JIT config served; False if it was already (one atomic UPDATE, so
    two requests racing for it cannot both win)."""
    served = (
        Runner.update(jit_served_at=at)
        .where((Runner.id == runner_id) & Runner.jit_served_at.is_null())
        .execute()
    )
    return served == 1


def record_started(runner_id: int, at: datetime) -> None:
    Runner.update(started_at=at).where(Runner.id == runner_id).execute()


def mark_destroyed(runner_ids: Iterable[int], at: datetime) -> None:
    """Record that these runners are gone; their JIT configs are no use to anyone now."""
    ids = list(runner_ids)
    if ids:
        Runner.update(destroyed_at=at, jit_config=None).where(Runner.id.in_(ids)).execute()


def revive_runner(runner_id: int) -> None:
    Runner.update(destroyed_at=None).where(Runner.id == runner_id).execute()


# Reservations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReservationRecord:
    """What a take gave a workflow job (the monitor keeps these in memory)."""

    profile: str
    count: int
    runner_ids: list[int]
    created_at: datetime
    qualified_repo: str = ""
    run_id: str = ""


def get_reservation(unique_id: str) -> Reservation | None:
    return Reservation.get_or_none(Reservation.unique_id == unique_id)


def load_reservations(since: datetime) -> dict[str, ReservationRecord]:
    """Reservations made since `since`, by unique_id."""
    query = Reservation.select().where(Reservation.created_at >= since)
    return {
        row.unique_id: ReservationRecord(
            row.profile, row.count, row.ids, row.created_at, row.qualified_repo, row.run_id
        )
        for row in query
    }


def save_reservations(records: dict[str, ReservationRecord]) -> None:
    """Store takes (by unique_id) and a `reserve` event per runner they gave, in one
    transaction. A burst of takes is written at once, on the monitor thread, so each row
    costs a bound tuple, not a statement compiled for it."""
    reservations = [
        (
            unique_id,
            record.profile,
            record.count,
            json.dumps(sorted(record.runner_ids)),
            record.qualified_repo,
            record.run_id,
            record.created_at,
        )
        for unique_id, record in records.items()
    ]
    events = [
        (
            record.created_at,
            "reserve",
            f"reserved for {unique_id} ({record.qualified_repo}/actions/runs/{record.run_id})",
            runner_id,
            record.profile,
        )
        for unique_id, record in records.items()
        for runner_id in sorted(record.runner_ids)
    ]
    reservation_fields = (
        Reservation.unique_id,
        Reservation.profile,
        Reservation.count,
        Reservation.runner_ids,
        Reservation.qualified_repo,
        Reservation.run_id,
        Reservation.created_at,
    )
    event_fields = (Event.at, Event.kind, Event.message, Event.runner_id, Event.profile)
    with db.atomic():
        _insert_rows(reservation_fields, reservations, replace=True)
        if events:
            last_id = _insert_rows(event_fields, events)
            _trim_events_if_crossed(last_id, len(events))


def _insert_rows(fields: tuple[Field, ...], rows: list[tuple], *, replace: bool = False) -> int:
    """INSERT (OR REPLACE) `rows` into the fields' table with one prepared statement, each
    value converted by its field as Peewee would; returns the last row id."""
    table = fields[0].model._meta.table_name
    columns = ", ".join(f'"{field.column_name}"' for field in fields)
    marks = ", ".join("?" for _ in fields)
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    values = [
        tuple(field.db_value(value) for field, value in zip(fields, row, strict=True))
        for row in rows
    ]
    cursor = db.cursor()
    cursor.executemany(f'{verb} INTO "{table}" ({columns}) VALUES ({marks})', values)
    # (executemany leaves cursor.lastrowid alone; the connection knows.)
    return cursor.execute("SELECT last_insert_rowid()").fetchone()[0]


def forget_reservation(unique_id: str, kept: list[int]) -> None:
    """A reservation (partly) released: it holds only the runners `kept`; none, it is gone."""
    if kept:
        Reservation.update(runner_ids=json.dumps(sorted(kept))).where(
            Reservation.unique_id == unique_id
        ).execute()
    else:
        Reservation.delete().where(Reservation.unique_id == unique_id).execute()


def prune_reservations(before: datetime) -> int:
    """Forget reservations older than `before` (their runners are long gone)."""
    return Reservation.delete().where(  # type: ignore[misc, unused-ignore]
        Reservation.created_at < before
    ).execute()


# Override -----------------------------------------------------------------------------------


# Reservation history ----------------------------------------------------------------------

# Orders the history can be read in: name -> SQL expression (durations NULL when unknown).
HISTORY_SORTS = {
    "asked_at": TakeRecord.asked_at,
    "waited": TakeRecord.started_at - TakeRecord.asked_at,
    "ran": TakeRecord.ended_at - TakeRecord.started_at,
    "profile": TakeRecord.profile,
    "qualified_repo": TakeRecord.qualified_repo,
    "runner_id": TakeRecord.runner_id,
}
# History is kept this long (a busy host makes a few thousand takes a day).
HISTORY_KEEP_ROWS = 200_000


def record_take(
    unique_id: str,
    profile: str,
    qualified_repo: str,
    run_id: str,
    runner_ids: list[int],
    outcome: str,
    asked_at: datetime,
    answered_at: datetime,
) -> None:
    """One take's answer; a retried take (same unique_id) that got the same runners adds
    nothing."""
    # IMMEDIATE: a deferred transaction that reads, then writes after another connection
    # wrote, fails at once with "database is locked" (WAL snapshot) instead of waiting.
    with db.atomic("IMMEDIATE"):
        known = {
            row.runner_id
            for row in TakeRecord.select(TakeRecord.runner_id).where(
                TakeRecord.unique_id == unique_id
            )
        }
        given: list[int | None] = [*runner_ids] or [None]  # one row without a runner
        rows = [
            (unique_id, profile, qualified_repo, run_id, runner_id, outcome, asked_at, answered_at)
            for runner_id in given
            if runner_id is None or runner_id not in known
        ]
        fields = (
            TakeRecord.unique_id,
            TakeRecord.profile,
            TakeRecord.qualified_repo,
            TakeRecord.run_id,
            TakeRecord.runner_id,
            TakeRecord.outcome,
            TakeRecord.asked_at,
            TakeRecord.answered_at,
        )
        if rows:
            last_id = _insert_rows(fields, rows)
            if last_id % TRIM_EVERY < len(rows):
                TakeRecord.delete().where(  # type: ignore[misc, unused-ignore]
                    TakeRecord.id <= last_id - HISTORY_KEEP_ROWS
                ).execute()


def recent_takes(limit: int) -> list[TakeRecord]:
    """The newest history rows (for the dashboard: no count of them all)."""
    return list(TakeRecord.select().order_by(TakeRecord.id.desc()).limit(limit))


def last_take_id() -> int | None:
    """The newest history row (its other changes come with a new observation)."""
    return TakeRecord.select(fn.MAX(TakeRecord.id)).scalar()


def record_job_started(runner_ids: Iterable[int], at: datetime) -> None:
    _stamp_takes(TakeRecord.started_at, runner_ids, at)


def record_runner_ended(runner_ids: Iterable[int], at: datetime) -> None:
    _stamp_takes(TakeRecord.ended_at, runner_ids, at)


def _stamp_takes(field: Field, runner_ids: Iterable[int], at: datetime) -> None:
    """Set `field` to `at` in these runners' history rows where it is not set yet."""
    ids = list(runner_ids)
    if ids:
        TakeRecord.update({field: at}).where(
            TakeRecord.runner_id.in_(ids) & field.is_null()
        ).execute()


def take_history(
    *,
    page: int,
    per_page: int,
    sort: str = "asked_at",
    descending: bool = True,
    profile: str | None = None,
    qualified_repo: str | None = None,
) -> tuple[int, list[TakeRecord]]:
    """(total rows matching, the rows of `page`), ordered by `sort` (HISTORY_SORTS), unknown
    durations last either way, ties in the order the takes were recorded."""
    query = TakeRecord.select()
    if profile is not None:
        query = query.where(TakeRecord.profile == profile)
    if qualified_repo is not None:
        query = query.where(fn.LOWER(TakeRecord.qualified_repo) == qualified_repo.lower())
    key = HISTORY_SORTS[sort]
    order = key.desc(nulls="LAST") if descending else key.asc(nulls="LAST")
    total = query.count()
    then = TakeRecord.id.desc() if descending else TakeRecord.id.asc()
    rows = list(query.order_by(order, then).paginate(page, per_page))
    return total, rows


# Revoked API credentials ------------------------------------------------------------------


def revoke_credential(sha256: str, name: str, at: datetime) -> None:
    RevokedCredential.insert(sha256=sha256, name=name, revoked_at=at).on_conflict_ignore().execute()


def unrevoke_credential(sha256: str) -> None:
    RevokedCredential.delete().where(  # type: ignore[misc, unused-ignore]
        RevokedCredential.sha256 == sha256
    ).execute()


def revoked_credentials() -> set[str]:
    return {row.sha256 for row in RevokedCredential.select(RevokedCredential.sha256)}


def load_override() -> Override | None:
    value = _get("override")
    if value is None:
        return None
    try:
        return Override.from_json(json.loads(value))
    except (ValueError, KeyError, TypeError) as error:
        log.error("ignoring unreadable stored override: %s", error)
        return None


def save_override(override: Override | None) -> None:
    _set("override", None if override is None else json.dumps(override.to_json(), sort_keys=True))


def load_holds() -> Holds:
    value = _get("holds")
    if value is None:
        return Holds()
    try:
        return Holds.from_json(json.loads(value))
    except (ValueError, TypeError) as error:
        log.error("ignoring unreadable stored drain/pause/maintenance state: %s", error)
        return Holds()


def save_holds(holds: Holds) -> None:
    _set("holds", json.dumps(holds.to_json(), sort_keys=True))


def load_seen_busy() -> set[int]:
    """Live runners GitHub has reported busy at least once. Without a stored set (a store
    from before it was kept), those whose take history says their job started and did not
    end."""
    value = _get("seen_busy")
    if value is not None:
        try:
            return {int(i) for i in json.loads(value)}
        except (ValueError, TypeError) as error:
            log.error("rebuilding the unreadable set of runners seen busy: %s", error)
    started = TakeRecord.select(TakeRecord.runner_id).where(
        TakeRecord.started_at.is_null(False)
        & TakeRecord.ended_at.is_null()
        & TakeRecord.runner_id.is_null(False)
    )
    live = {row.id for row in Runner.select(Runner.id).where(Runner.destroyed_at.is_null())}
    return {row.runner_id for row in started if row.runner_id is not None} & live


def save_seen_busy(runner_ids: Iterable[int]) -> None:
    _set("seen_busy", json.dumps(sorted(runner_ids)))


# Events -------------------------------------------------------------------------------------


def record_event(
    kind: str,
    message: str,
    *,
    runner_id: int | None = None,
    profile: str | None = None,
    at: datetime | None = None,
) -> None:
    """Append to the event log (and trim it). Never raises: the log must not break the loop."""
    try:
        event = Event.create(
            at=at or datetime.now(UTC),
            kind=kind,
            message=message,
            runner_id=runner_id,
            profile=profile,
        )
        _trim_events_if_crossed(event.id, 1)
    except Exception:  # noqa: BLE001 - logging the failure is all we can do
        log.exception("could not record event %s: %s", kind, message)


def _trim_events_if_crossed(last_id: int, inserted: int) -> None:
    """Trim the log now and then, not on every insert (a COUNT(*) per event is not free):
    when the ids just inserted reached a multiple of TRIM_EVERY."""
    if last_id // TRIM_EVERY == (last_id - inserted) // TRIM_EVERY:
        return
    cutoff = Event.select(Event.id).order_by(Event.id.desc()).offset(MAX_EVENTS).limit(1)
    Event.delete().where(Event.id <= cutoff).execute()  # type: ignore[misc, unused-ignore]


def last_event_id() -> int | None:
    """The id of the newest event (a cheap check whether there are new ones)."""
    return Event.select(fn.MAX(Event.id)).scalar()


def recent_events(limit: int = 50, runner_id: int | None = None) -> list[Event]:
    query = Event.select().order_by(Event.id.desc()).limit(limit)
    if runner_id is not None:
        query = query.where(Event.runner_id == runner_id)
    return list(query)
