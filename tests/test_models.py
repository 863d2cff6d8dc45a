"""The store on a real SQLite file: schema version, ids, override, events."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime

import pytest

from monitor import models
from monitor.errors import MonitorError
from monitor.policy import Override

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def test_new_store_is_at_current_schema_version_in_wal_mode(store, tmp_path):
    assert models.schema_version() == models.SCHEMA_VERSION
    assert models.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    path = tmp_path / "data" / models.DB_FILENAME
    assert path.stat().st_mode & 0o777 == 0o600  # it holds runner credentials


def test_store_from_a_newer_monitor_is_refused(tmp_path):
    models.open_store(tmp_path)
    models._set("schema_version", str(models.SCHEMA_VERSION + 1))
    models.close_store()
    with pytest.raises(MonitorError, match="newer than this monitor"):
        models.open_store(tmp_path)
    models.close_store()


def test_runner_ids_start_at_zero_and_are_never_reused(store):
    assert [models.allocate_runner_id() for _ in range(3)] == [0, 1, 2]
    models.ensure_runner_id_above(1)  # lower than the last: no effect
    assert models.allocate_runner_id() == 3
    models.ensure_runner_id_above(10)
    assert models.allocate_runner_id() == 11


def test_runner_rows_keep_the_jit_config_out_of_repr(store):
    row = models.create_runner(5, "linux", "ci-runner-linux.5", NOW)
    models.record_registration(5, 77, "SECRET-JIT", NOW)
    row = models.get_runner(5)
    assert row.jit_config == "SECRET-JIT" and row.registration_id == 77
    assert "SECRET" not in repr(row)
    assert row.created_at == NOW  # tz-aware UTC round trip
    assert [r.id for r in models.live_runners()] == [5]
    models.mark_destroyed([5], NOW)
    assert models.live_runners() == []
    assert models.get_runner(5).jit_config is None  # a gone runner's credential is dropped
    models.revive_runner(5)
    assert list(models.live_records()) == [5]


def test_override_round_trips_and_clears(store):
    assert models.load_override() is None
    override = Override({"linux": 3}, {"linux": 3, "windows": 1}, {"linux": [4]})
    models.save_override(override)
    assert models.load_override() == override
    models.save_override(None)
    assert models.load_override() is None


def test_unreadable_override_is_ignored_not_fatal(store):
    models._set("override", "{not json")
    assert models.load_override() is None


def test_event_log_is_trimmed(store, monkeypatch):
    monkeypatch.setattr(models, "MAX_EVENTS", 5)
    for number in range(1010):
        models.record_event("test", f"event {number}", runner_id=number)
    assert models.Event.select().count() <= 5 + 1000
    newest = models.recent_events(3)
    assert [e.message for e in newest] == ["event 1009", "event 1008", "event 1007"]
    assert [e.runner_id for e in models.recent_events(5, runner_id=1008)] == [1008]


def test_takes_saved_in_one_batch_load_back_with_an_event_per_runner(store):
    first = models.ReservationRecord("linux", 2, [7, 3], NOW, "servo/servo", "101")
    second = models.ReservationRecord("windows", 1, [9], NOW, "servo/other", "202")
    models.save_reservations({"id-1": first, "id-2": second})

    loaded = models.load_reservations(NOW)
    assert loaded["id-1"] == models.ReservationRecord("linux", 2, [3, 7], NOW, "servo/servo", "101")
    assert loaded["id-2"] == second
    assert models.load_reservations(datetime(2026, 11, 2, tzinfo=UTC)) == {}
    events = [(e.kind, e.runner_id, e.profile, e.at) for e in models.recent_events(10)]
    assert sorted(events) == [
        ("reserve", 3, "linux", NOW),
        ("reserve", 7, "linux", NOW),
        ("reserve", 9, "windows", NOW),
    ]
    assert "servo/servo/actions/runs/101" in models.recent_events(1, runner_id=7)[0].message

    # Saving a unique_id again replaces its row (a retry after a failed write).
    models.save_reservations({"id-1": first})
    assert len(models.load_reservations(NOW)) == 2


def test_batched_events_trim_the_log_when_they_cross_the_mark(store, monkeypatch):
    monkeypatch.setattr(models, "MAX_EVENTS", 5)
    for number in range(models.TRIM_EVERY - 2):
        models.record_event("test", f"event {number}")
    record = models.ReservationRecord("linux", 4, [1, 2, 3, 4], NOW, "servo/servo", "1")
    models.save_reservations({"id": record})  # ids TRIM_EVERY - 1 .. TRIM_EVERY + 2
    assert models.Event.select().count() <= 5 + 3
    assert [e.runner_id for e in models.recent_events(4)] == [4, 3, 2, 1]


def test_runners_seen_busy_survive_a_restart_or_come_back_from_take_history(store):
    for runner_id in (1, 2, 3, 4):
        models.create_runner(runner_id, "linux", f"ci-runner-linux.{runner_id}", NOW)
    for runner_id in (1, 2, 3):
        unique_id = f"id-{runner_id}"
        models.record_take(unique_id, "linux", "servo/servo", "7", [runner_id], "ok", NOW, NOW)
    models.record_job_started([1, 2, 3], NOW)  # 4: taken by nobody
    models.record_runner_ended([2], NOW)  # its job is over
    models.mark_destroyed([3], NOW)  # gone
    # A store from before the set was kept: the runners whose job started and did not end.
    assert models.load_seen_busy() == {1}

    models.save_seen_busy([4, 1])
    assert models.load_seen_busy() == {1, 4}
