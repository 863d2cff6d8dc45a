"""The monitor loop with hand-written fakes and a real SQLite store.

The test thread plays the monitor thread: it calls `tick(now)` and then runs what the
workers post back (`settle` in tests/support/monitor_thread.py), so every step is
deterministic.
"""

from __future__ import annotations

import itertools
from datetime import UTC
from datetime import datetime
from datetime import timedelta

import pytest

from monitor import loop
from monitor import models
from monitor import registrations
from monitor import takes
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.policy import Registration
from monitor.policy import Status
from tests.fakes import FakeGitHub
from tests.fakes import FakeGuest
from tests.fakes import FakeHypervisor
from tests.support.clock import Clock
from tests.support.monitor_thread import settle
from tests.support.monitor_thread import step


@pytest.fixture
def env(make_config, store):
    config = make_config()
    github = FakeGitHub()
    hypervisor = FakeHypervisor()
    clock = Clock()
    monitor = loop.Monitor(config, github, hypervisor, clock=clock)
    yield config, github, hypervisor, clock, monitor
    monitor.workers.shutdown()


def statuses(observation) -> dict[str, str]:
    return {f"ci-runner-{r.profile}.{r.id}": r.status.value for r in observation.runners}


def test_waits_for_first_registration_fetch(env):
    _, github, hypervisor, clock, monitor = env
    assert monitor.tick(clock()) is None
    assert ("create_guest", "ci-runner-linux.0") not in hypervisor.calls


def test_creates_runners_to_target_with_upstream_names(env):
    config, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    assert sorted(hypervisor.guests) == [
        "ci-runner-linux.0",
        "ci-runner-linux.1",
        "ci-runner-windows.2",
    ]
    assert all(g.active for g in hypervisor.guests.values())
    names = sorted(r.name for r in github.runners.values())
    assert names == [
        "ci-runner-linux.0@host",
        "ci-runner-linux.1@host",
        "ci-runner-windows.2@host",
    ]
    windows = github.by_name("ci-runner-windows.2@host")
    assert windows.labels == ("self-hosted", "X64", "self-hosted-image:windows")
    row = models.get_runner(2)
    assert row.registration_id == windows.id
    assert row.jit_config == f"jit-secret-{windows.id}"
    assert "jit-secret" not in repr(row)

    # Next pass: all three are StartedOrCrashed and healthy, so nothing more is created.
    observation = step(monitor, clock)
    assert set(statuses(observation).values()) == {"StartedOrCrashed"}
    assert observation.changes.is_empty()
    assert len(hypervisor.guests) == 3


def test_online_runners_become_idle(env):
    _, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    for registration in list(github.runners.values()):
        github.set(registration.id, status="online")
    observation = step(monitor, clock)
    assert set(statuses(observation).values()) == {"Idle"}
    assert observation.counts["linux"].idle == 2
    assert observation.counts["windows"].idle == 1


def test_finished_job_gets_guest_destroyed_and_replaced_with_new_id(env):
    _, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    finished = github.by_name("ci-runner-linux.0@host")
    github.delete_runner(finished.id)  # the ephemeral runner deregistered after its job
    observation = step(monitor, clock)
    assert statuses(observation)["ci-runner-linux.0"] == "DoneOrUnregistered"
    assert "ci-runner-linux.0" in hypervisor.destroyed
    assert "ci-runner-linux.0" not in hypervisor.guests
    step(monitor, clock)
    assert "ci-runner-linux.3" in hypervisor.guests
    assert models.get_runner(0).destroyed_at is not None


def test_guest_destroyed_behind_our_back_gets_unregistered(env):
    _, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    del hypervisor.guests["ci-runner-windows.2"]
    observation = step(monitor, clock)
    assert statuses(observation)["ci-runner-windows.2"] == "Invalid"
    assert not any(r.name == "ci-runner-windows.2@host" for r in github.runners.values())
    step(monitor, clock)
    assert "ci-runner-windows.3" in hypervisor.guests


def test_runner_stuck_offline_past_start_timeout_is_replaced(env):
    config, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    github.set(github.by_name("ci-runner-linux.1@host").id, status="online")
    github.set(github.by_name("ci-runner-windows.2@host").id, status="online")
    clock.advance(config.monitor_start_timeout.total_seconds() + 1)
    step(monitor, clock)
    assert hypervisor.destroyed == ["ci-runner-linux.0"]
    step(monitor, clock)
    assert sorted(hypervisor.guests) == [
        "ci-runner-linux.1",
        "ci-runner-linux.3",
        "ci-runner-windows.2",
    ]


def test_github_list_failure_backs_off_and_recovers(env):
    _, github, hypervisor, clock, monitor = env
    github.fail_next("list_runners", TransientError("rate limited", status=429, retry_after=30))
    assert monitor.registrations.refresh() is False
    assert "rate limited" in monitor.registrations.error
    # Backing off: the cache is not due again until Retry-After has passed.
    clock.advance(10)
    assert monitor.registrations.refresh() is False
    assert [c for c in github.calls if c[0] == "list_runners"] == [("list_runners", None)]
    clock.advance(25)
    assert monitor.registrations.refresh() is True
    assert monitor.registrations.error is None
    kinds = [e.kind for e in models.recent_events()]
    assert "github-error" in kinds and "github-ok" in kinds


def test_repeated_github_list_failures_back_off_exponentially_up_to_a_cap(env):
    _, github, _, clock, monitor = env
    github.fail_next("list_runners", TransientError("502 Bad Gateway", status=502), times=100)

    def attempts() -> int:
        return len([c for c in github.calls if c[0] == "list_runners"])

    # Step one second at a time and note when each retry happened.
    started = clock()
    tried_at = []
    for _ in range(20 * 60):
        before = attempts()
        monitor.registrations.refresh()
        if attempts() > before:
            tried_at.append((clock() - started).total_seconds())
        clock.advance(1)
    gaps = [later - earlier for earlier, later in itertools.pairwise(tried_at)]
    base = registrations.GITHUB_BACKOFF_BASE.total_seconds()
    cap = registrations.GITHUB_BACKOFF_CAP.total_seconds()
    doubling = [base * 2**n for n in range(10) if base * 2**n < cap]
    assert gaps[: len(doubling)] == doubling and len(doubling) >= 5
    assert set(gaps[len(doubling) :]) == {cap}
    # The fault ends: the next try succeeds and the spacing starts from the base again.
    github._failures.clear()
    clock.advance(registrations.GITHUB_BACKOFF_CAP.total_seconds())
    assert monitor.registrations.refresh() is True
    assert monitor.registrations.error is None
    github.fail_next("list_runners", TransientError("502 Bad Gateway", status=502))
    assert monitor.registrations.refresh(force=True) is False
    assert monitor.registrations.cache.not_before == clock() + registrations.GITHUB_BACKOFF_BASE


def test_libvirt_list_failure_skips_the_pass(env):
    _, github, hypervisor, clock, monitor = env
    monitor.registrations.refresh(force=True)
    hypervisor.fail_next("list_guests", MonitorError("libvirt: connection reset", status=503))
    assert monitor.tick(clock()) is None
    assert "connection reset" in monitor.observation.error
    assert not any(c[0] == "create_guest" for c in hypervisor.calls)
    step(monitor, clock)
    assert len(hypervisor.guests) == 3


def test_failed_create_leaks_no_registration_and_is_retried(env):
    _, github, hypervisor, clock, monitor = env
    hypervisor.fail_next("create_guest", MonitorError("no space left", status=503))
    step(monitor, clock)
    assert len(hypervisor.guests) == 2
    assert len(github.runners) == 2  # the failed runner's registration was deleted again
    failed = [e for e in models.recent_events() if e.kind == "create-failed"]
    assert len(failed) == 1 and "no space left" in failed[0].message
    clock.advance(6)  # past the profile's back-off
    step(monitor, clock)
    assert len(hypervisor.guests) == 3
    assert len(github.runners) == 3


def test_failed_registration_creates_no_guest(env):
    _, github, hypervisor, clock, monitor = env
    github.fail_next("generate_jitconfig", TransientError("GitHub 502"), times=3)
    step(monitor, clock)
    assert hypervisor.guests == {}
    step(monitor, clock)
    assert hypervisor.guests == {}  # backing off: no immediate retry
    clock.advance(11)
    step(monitor, clock)
    assert len(hypervisor.guests) == 3
    # ids of the failed attempts are not reused
    assert sorted(hypervisor.guests) == [
        "ci-runner-linux.3",
        "ci-runner-linux.4",
        "ci-runner-windows.5",
    ]


def test_failed_unregister_is_retried_next_pass(env):
    _, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    del hypervisor.guests["ci-runner-linux.1"]
    github.fail_next("delete_runner", TransientError("GitHub 500"))
    step(monitor, clock)
    assert any(r.name == "ci-runner-linux.1@host" for r in github.runners.values())
    clock.advance(6)
    step(monitor, clock)
    assert not any(r.name == "ci-runner-linux.1@host" for r in github.runners.values())


def test_adopts_existing_runners_and_continues_ids(env):
    _, github, hypervisor, clock, monitor = env
    hypervisor.guests["ci-runner-linux.41"] = FakeGuest("ci-runner-linux.41", True)
    github.runners[7] = Registration(7, "ci-runner-linux.41@host", "online", False, ())
    observation = step(monitor, clock)
    assert statuses(observation) == {"ci-runner-linux.41": "Idle"}
    assert models.get_runner(41).adopted
    assert sorted(hypervisor.guests) == [
        "ci-runner-linux.41",
        "ci-runner-linux.42",
        "ci-runner-windows.43",
    ]


def test_unknown_profiles_and_foreign_names_are_left_alone(env):
    _, github, hypervisor, clock, monitor = env
    hypervisor.guests["ci-runner-macos.5"] = FakeGuest("ci-runner-macos.5", True)
    hypervisor.guests["ci-runner-linux"] = FakeGuest("ci-runner-linux", True)
    hypervisor.guests["someone-else"] = FakeGuest("someone-else", True)
    github.runners[9] = Registration(9, "ci-runner-macos.6@host", "online", False, ())
    github.runners[10] = Registration(10, "ci-runner-linux.8@elsewhere", "online", False, ())
    step(monitor, clock)
    step(monitor, clock)
    assert {"ci-runner-macos.5", "ci-runner-linux", "someone-else"} <= set(hypervisor.guests)
    assert {9, 10} <= set(github.runners)
    assert hypervisor.destroyed == []
    ignored = monitor.observation.ignored
    assert any("ci-runner-macos.5" in item for item in ignored)
    assert any("ci-runner-macos.6@host" in item for item in ignored)
    assert models.get_runner(5) is None


def test_destroy_all_non_busy_runners(make_config, store):
    config = make_config(extra="destroy_all_non_busy_runners = true\n")
    github, hypervisor, clock = FakeGitHub(), FakeHypervisor(), Clock()
    for runner_id, busy in ((1, True), (2, False)):
        name = f"ci-runner-linux.{runner_id}"
        hypervisor.guests[name] = FakeGuest(name, True)
        github.runners[runner_id] = Registration(runner_id, name + "@host", "online", busy, ())
    monitor = loop.Monitor(config, github, hypervisor, clock=clock)
    step(monitor, clock)
    assert sorted(hypervisor.guests) == ["ci-runner-linux.1"]
    step(monitor, clock)
    assert sorted(hypervisor.guests) == ["ci-runner-linux.1"]  # dont_create_runners implied


def test_dont_register_runners(make_config, store):
    config = make_config(extra="dont_register_runners = true\n")
    github, hypervisor, clock = FakeGitHub(), FakeHypervisor(), Clock()
    monitor = loop.Monitor(config, github, hypervisor, clock=clock)
    step(monitor, clock)
    observation = step(monitor, clock)
    assert len(hypervisor.guests) == 3
    assert github.runners == {}
    assert set(statuses(observation).values()) == {Status.DONE_OR_UNREGISTERED.value}
    assert hypervisor.destroyed == []


def test_override_is_persisted_across_monitors(env, make_config):
    config, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    override = monitor.set_override({"linux": 3})
    assert override.profile_override_counts == {"linux": 3}
    again = loop.Monitor(config, FakeGitHub(), FakeHypervisor(), clock=clock)
    assert again.override == override
    assert again.clear_override() == override
    assert loop.Monitor(config, FakeGitHub(), FakeHypervisor(), clock=clock).override is None


def test_late_reply_is_dropped_without_crashing(env):
    _, github, hypervisor, clock, monitor = env
    calls = []
    with pytest.raises(MonitorError) as raised:
        monitor.call(lambda: calls.append(1), timeout=0.05)
    assert raised.value.status == 503
    monitor.handle(monitor.next_request(timeout=0))  # the thread gets to it after all
    assert calls == []  # abandoned: not run, and nothing raised


def test_monitor_thread_answers_calls_and_survives_errors(env):
    _, github, hypervisor, clock, monitor = env
    monitor.start()
    try:
        assert monitor.call(lambda: 42, timeout=5) == 42
        with pytest.raises(ZeroDivisionError):
            monitor.call(lambda: 1 / 0, timeout=5)
        monitor.post(lambda: 1 / 0)  # an unexpected error in the thread is logged only
        assert monitor.call(lambda: "alive", timeout=5) == "alive"
    finally:
        monitor.stop()


def test_upstream_last_runner_id_is_continued(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "last-runner-id").write_text("1233")
    models.open_store(data)
    try:
        assert models.allocate_runner_id() == 1234
        assert models.allocate_runner_id() == 1235
    finally:
        models.close_store()
    models.open_store(data)  # reopening does not go back to upstream's number
    try:
        assert models.allocate_runner_id() == 1236
    finally:
        models.close_store()


def test_persistent_create_failure_backs_off_and_honours_retry_after(env):
    _, github, hypervisor, clock, monitor = env
    github.fail_next(
        "generate_jitconfig", TransientError("secondary rate limit", retry_after=120), times=1000
    )
    for _ in range(20):
        step(monitor, clock)
        clock.advance(1)
    # One attempt per runner wanted, then nothing until Retry-After has passed.
    assert sum(c[0] == "generate_jitconfig" for c in github.calls) == 3
    clock.advance(120)
    step(monitor, clock)
    assert sum(c[0] == "generate_jitconfig" for c in github.calls) == 6
    ids = [models.get_runner(i) for i in range(6)]
    assert all(row is not None for row in ids) and models.get_runner(6) is None


def test_busy_runner_survives_a_github_outage(env):
    config, github, hypervisor, clock, monitor = env
    step(monitor, clock)  # the cache now holds the three runners as created (offline)
    busy = github.by_name("ci-runner-linux.0@host")
    github.set(busy.id, status="online", busy=True)  # GitHub gave it a job; we can't see it
    github.fail_next("list_runners", TransientError("GitHub is down"), times=1000)
    for _ in range(10):
        clock.advance(60)  # far past monitor_start_timeout
        monitor.registrations.refresh()
        monitor.tick(clock())
        settle(monitor)
    assert "ci-runner-linux.0" in hypervisor.guests
    assert hypervisor.destroyed == []
    assert "stale" in {e.kind for e in models.recent_events(200)}


def test_guest_is_kept_when_github_refuses_to_unregister(env):
    _, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    clock.advance(121)  # all three look stuck offline
    github.fail_next(
        "delete_runner", MonitorError("GitHub DELETE: 422 runner is busy", status=502), times=3
    )
    step(monitor, clock)
    assert len(hypervisor.guests) == 3 and hypervisor.destroyed == []
    failed = [e for e in models.recent_events() if e.kind == "destroy-failed"]
    assert len(failed) == 3 and "unregister" in failed[0].message


def test_crashing_workers_report_and_do_not_wedge_the_pool(env):
    _, github, hypervisor, clock, monitor = env
    hypervisor.fail_next("start_guest", RuntimeError("bug in a library"), times=3)
    step(monitor, clock)
    assert monitor.in_flight == {}
    assert hypervisor.guests == {}  # undone
    clock.advance(11)  # past the back-off
    step(monitor, clock)
    assert len(hypervisor.guests) == 3
    github.delete_runner(github.by_name("ci-runner-linux.3@host").id)
    hypervisor.fail_next("destroy_guest", RuntimeError("bug in a library"))
    step(monitor, clock)
    assert monitor.in_flight == {}
    clock.advance(6)
    step(monitor, clock)
    step(monitor, clock)
    assert "ci-runner-linux.3" not in hypervisor.guests
    assert len(hypervisor.guests) == 3


def test_orphaned_volumes_of_our_runners_are_swept(env):
    _, github, hypervisor, clock, monitor = env
    hypervisor.volumes |= {"ci-runner-linux.50.qcow2", "ci-runner-macos.51.qcow2", "other.qcow2"}
    step(monitor, clock)
    assert "ci-runner-linux.50.qcow2" not in hypervisor.volumes
    # unknown profile and foreign volumes are left alone; live runners keep theirs
    assert {"ci-runner-macos.51.qcow2", "other.qcow2"} <= hypervisor.volumes
    assert {f"{g}.qcow2" for g in hypervisor.guests} <= hypervisor.volumes


class TestRegistrationCache:
    """Spec §9.2: expiry at api_cache_timeout, forced expiries only ever earlier, and the
    monitor's own writes surviving a fetch that began before them."""

    T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def fresh(self) -> registrations.RegistrationCache:
        cache = registrations.RegistrationCache(timedelta(seconds=30))
        cache.store([], self.T0, cache.begin_fetch())
        return cache

    def at(self, seconds: float) -> datetime:
        return self.T0 + timedelta(seconds=seconds)

    def test_due_at_api_cache_timeout(self):
        cache = self.fresh()
        assert not cache.is_due(self.at(29.9))
        assert cache.is_due(self.at(30))

    def test_forced_expiry_only_brings_expiry_earlier(self):
        cache = self.fresh()
        cache.invalidate_in(timedelta(seconds=10), self.at(0))
        cache.invalidate_in(timedelta(seconds=20), self.at(0))  # later: ignored
        assert not cache.is_due(self.at(9.9))
        assert cache.is_due(self.at(10))
        cache.invalidate_in(timedelta(seconds=5), self.at(1))  # earlier: wins
        assert cache.is_due(self.at(6))

    def test_invalidate_makes_it_due_but_keeps_the_list(self):
        cache = self.fresh()
        cache.upsert(Registration(1, "ci-runner-linux.0@host", "offline", False))
        cache.invalidate()
        assert cache.is_due(self.at(1))
        assert [r.id for r in cache.snapshot()] == [1]
        assert cache.fetched_at == self.T0  # staleness is measured from the last fetch

    def test_back_off_delays_the_next_fetch(self):
        cache = self.fresh()
        cache.invalidate()
        cache.back_off(self.at(60))
        assert not cache.is_due(self.at(59))
        assert cache.is_due(self.at(60))

    def test_own_writes_survive_a_fetch_that_began_before_them(self):
        cache = self.fresh()
        old = Registration(1, "ci-runner-linux.0@host", "online", False)
        new = Registration(2, "ci-runner-linux.1@host", "offline", False)
        began = cache.begin_fetch()
        cache.remove(1)  # we deleted it while GitHub was answering
        cache.upsert(new)  # and created this one
        cache.store([old], self.at(1), began)  # GitHub's answer predates both
        assert [r.id for r in cache.snapshot()] == [2]
        # A fetch that began after the writes is taken as it is.
        cache.store([old], self.at(2), cache.begin_fetch())
        assert [r.id for r in cache.snapshot()] == [1]

    def test_a_created_registration_never_hides_a_newer_one(self):
        # GitHub's answer to the create says offline; a list fetched since may already show
        # the agent online, with or without the fetch having begun before the create ended.
        cache = self.fresh()
        created = Registration(2, "ci-runner-linux.1@host", "offline", False)
        online = Registration(2, "ci-runner-linux.1@host", "online", False)
        began = cache.begin_fetch()
        cache.store([online], self.at(1), cache.begin_fetch())
        cache.add(created)  # the create worker reports back after that fetch
        assert cache.get(2) == online
        cache.store([online], self.at(2), began)  # a fetch older than the add, but has it
        assert cache.get(2) == online
        cache.store([], self.at(3), began)  # one that predates the registration: added
        assert cache.get(2) == created

    def test_an_invalidation_during_a_fetch_outlives_it(self):
        # A create finished (its offline registration written through, the list invalidated
        # so its agent is seen online) while a fetch was in flight: that fetch's list predates
        # it, so another fetch is still due; one that began after it clears the flag.
        cache = self.fresh()
        began = cache.begin_fetch()
        cache.upsert(Registration(2, "ci-runner-linux.1@host", "offline", False))
        cache.invalidate()
        cache.store([], self.at(1), began)
        assert cache.is_due(self.at(1))
        cache.store([], self.at(2), cache.begin_fetch())
        assert not cache.is_due(self.at(2))


def test_github_connection_pool_covers_every_concurrent_caller():
    from monitor import github
    from monitor import scheduler

    workers = 4  # Monitor's default create/destroy pool
    assert github.POOL_SIZE >= takes.RESERVE_WORKERS + workers + 2  # + scheduler threads
    assert scheduler is not None


def test_client_requests_and_outcomes_are_served_in_order_before_a_reconcile(env):
    _, github, hypervisor, clock, monitor = env
    monitor.request_reconcile()
    outcome = lambda: None  # noqa: E731
    monitor.post(outcome)
    asked = lambda: None  # noqa: E731
    with pytest.raises(MonitorError):  # nobody runs the queue: the call times out, queued
        monitor.call(asked, timeout=0.01)
    items = [monitor.next_request(timeout=0) for _ in range(3)]
    assert items[0] is outcome
    assert isinstance(items[1], loop.Request) and items[1].func is asked
    assert items[2] is loop.RECONCILE


def test_polling_delay_spreads_a_low_budget_until_its_reset():
    from monitor.github import RateLimit
    from monitor.registrations import polling_delay

    now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    normal = timedelta(seconds=30)
    reset = now + timedelta(minutes=40)
    assert polling_delay(None, now, normal) is None
    assert polling_delay(RateLimit(5000, 500, 4500, reset, "core"), now, normal) is None
    # 40 minutes over half of the 240 calls left: one look every 20 s, but never more often
    # than normal; 20 left: one every 4 minutes.
    assert polling_delay(RateLimit(5000, 240, 4760, reset, "core"), now, normal) == normal
    low = RateLimit(5000, 20, 4980, reset, "core")
    assert polling_delay(low, now, normal) == timedelta(minutes=4)
    assert polling_delay(RateLimit(5000, 0, 5000, reset, "core"), now, normal) == reset - now
    assert polling_delay(low, reset + timedelta(seconds=1), normal) is None  # reset now


def test_a_low_github_budget_slows_the_runner_list_down(env):
    from monitor.github import RateLimit

    _, github, hypervisor, clock, monitor = env
    github.rate_limit = RateLimit(5000, 20, 4980, clock() + timedelta(minutes=40), "core")
    assert monitor.registrations.refresh()
    clock.advance(monitor.config.api_cache_timeout.total_seconds() + 1)
    assert not monitor.registrations.refresh()  # due normally, but the budget is low
    clock.advance(4 * 60)
    assert monitor.registrations.refresh()


def test_a_runner_reserved_for_a_cancelled_run_is_reclaimed_at_once(env):
    _, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    for registration in list(github.runners.values()):
        github.set(registration.id, status="online")
    step(monitor, clock)
    cancelled, running = "servo/servo/actions/runs/11", "servo/servo/actions/runs/12"
    since = int(clock().timestamp())
    linux = sorted((r for r in github.runners.values() if "linux" in r.name), key=lambda r: r.name)
    for registration, run in zip(linux, (cancelled, running), strict=True):
        labels = ("reserved-for:u", f"reserved-since:{since}", f"reserved-by:{run}")
        github.set(registration.id, labels=labels)
    monitor.observation = step(monitor, clock)

    # Just taken: nothing is asked yet (the job may still be picked up).
    assert monitor.registrations.check_reserved_runs() == []
    clock.advance(registrations.RUN_CHECK_AFTER.total_seconds() + 1)
    github.runs[cancelled] = ("completed", "cancelled")
    assert monitor.registrations.check_reserved_runs() == [cancelled, running]
    assert monitor.registrations.finished_runs == {cancelled: "cancelled"}
    # Asked at most once a minute per run.
    assert monitor.registrations.check_reserved_runs() == []

    step(monitor, clock)
    gone = linux[0].name.removesuffix("@host")
    assert gone not in hypervisor.guests and linux[0].id not in github.runners
    assert linux[1].name.removesuffix("@host") in hypervisor.guests  # its run goes on
    (event,) = [e for e in models.recent_events() if e.kind == "destroy"]
    assert f"its workflow run {cancelled} ended (cancelled) without using it" in event.message


# -- GitHub's busy flag lags a job's start: look before destroying -----------------------------


def reserved_past_its_timeout(env) -> Registration:
    """All three runners online, ci-runner-linux.0 Reserved, the clock past
    monitor_reserve_timeout + github_busy_lag, and GitHub's list fetched just now."""
    config, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    for registration in list(github.runners.values()):
        github.set(registration.id, status="online")
    target = github.by_name("ci-runner-linux.0@host")
    since = int(clock().timestamp())
    github.set(target.id, labels=("reserved-for:u", f"reserved-since:{since}"))
    assert statuses(step(monitor, clock))["ci-runner-linux.0"] == "Reserved"
    clock.advance((config.monitor_reserve_timeout + config.github_busy_lag).total_seconds() + 1)
    monitor.registrations.refresh(force=True)
    github.calls.clear()
    return target


def test_a_reserved_runner_github_now_says_is_busy_is_kept_and_stays_busy(env, make_config):
    config, github, hypervisor, clock, monitor = env
    target = reserved_past_its_timeout(env)
    github.set(target.id, busy=True)  # its job started since the list was fetched

    monitor.tick(clock())
    settle(monitor)

    assert "ci-runner-linux.0" in hypervisor.guests and target.id in github.runners
    assert ("get_runner", target.id) in github.calls
    assert ("delete_runner", target.id) not in github.calls
    (aborted,) = [e for e in models.recent_events() if e.kind == "destroy-aborted"]
    assert aborted.runner_id == 0 and "busy" in aborted.message
    # Its flag reading false again (as GitHub's does) changes nothing, nor does a restart.
    github.set(target.id, busy=False)
    clock.advance(600)
    assert statuses(step(monitor, clock))["ci-runner-linux.0"] == "Busy"
    monitor.workers.shutdown()
    again = loop.Monitor(config, github, hypervisor, clock=clock)
    try:
        assert statuses(step(again, clock))["ci-runner-linux.0"] == "Busy"
        assert "ci-runner-linux.0" in hypervisor.guests
    finally:
        again.workers.shutdown()


def test_a_runner_github_no_longer_knows_loses_only_its_guest(env):
    config, github, hypervisor, clock, monitor = env
    target = reserved_past_its_timeout(env)
    del github.runners[target.id]  # gone from GitHub since the list was fetched

    monitor.tick(clock())
    settle(monitor)

    assert ("get_runner", target.id) in github.calls
    assert ("delete_runner", target.id) not in github.calls
    assert "ci-runner-linux.0" not in hypervisor.guests
    assert "destroyed" in {e.kind for e in models.recent_events()}


def test_a_failed_look_destroys_nothing_and_is_tried_again_after_the_back_off(env):
    config, github, hypervisor, clock, monitor = env
    target = reserved_past_its_timeout(env)
    github.fail_next("get_runner", TransientError("GitHub GET: 502"))

    monitor.tick(clock())
    settle(monitor)

    assert "ci-runner-linux.0" in hypervisor.guests and target.id in github.runners
    assert ("delete_runner", target.id) not in github.calls
    (failed,) = [e for e in models.recent_events() if e.kind == "destroy-failed"]
    assert failed.message.startswith("look at GitHub: GitHub GET: 502")
    monitor.tick(clock())  # within the back-off: not asked again
    settle(monitor)
    assert github.calls.count(("get_runner", target.id)) == 1
    clock.advance(6)
    step(monitor, clock)
    assert "ci-runner-linux.0" not in hypervisor.guests and target.id not in github.runners


def test_a_forced_operator_destroy_does_not_look_first(env):
    config, github, hypervisor, clock, monitor = env
    step(monitor, clock)
    for registration in list(github.runners.values()):
        github.set(registration.id, status="online")
    step(monitor, clock)
    github.calls.clear()
    monitor.request_destroy(1, force=True)
    monitor.request_destroy(2)
    step(monitor, clock)
    assert "ci-runner-linux.1" not in hypervisor.guests
    assert "ci-runner-windows.2" not in hypervisor.guests
    looked = [arg for call, arg in github.calls if call == "get_runner"]
    assert looked == [models.get_runner(2).registration_id]  # only the one asked without force
