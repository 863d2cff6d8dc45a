"""Tests for monitor.policy: every upstream scenario S1-S59 of spec §6, then the proposed extras.

Conventions follow spec §6: settings from monitor.toml.example, the fake at list index i is runner
id i with guest `ci-runner-<profile>.<i>` and registration `ci-runner-<profile>.<i>@host`, and
idle/busy/reserved/done fakes were created 9001 s ago. Runners are always built through
`build_runners` from registrations and guest names, so the pairing code is exercised too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from monitor import policy
from monitor.errors import MonitorError
from monitor.policy import Override
from monitor.policy import PolicyInput
from monitor.policy import Registration
from monitor.policy import Runner
from monitor.policy import RunnerChanges
from monitor.policy import RunnerCounts
from monitor.policy import RunnerRecord
from monitor.policy import Status

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
GIB = 2**30
PREFIX = "ci-runner"
SUFFIX = "host"

INVALID = Status.INVALID
DONE = Status.DONE_OR_UNREGISTERED
BUSY = Status.BUSY
RESERVED = Status.RESERVED
IDLE = Status.IDLE
STARTED = Status.STARTED_OR_CRASHED


@dataclass(frozen=True)
class Profile:
    profile_name: str
    target_count: int
    requires_1g_hugepages: int
    requires_normal_memory: int
    base_image: object | None = None
    rebuild_mode: str = "drain"  # upstream's only behaviour, which its scenarios describe


@dataclass(frozen=True)
class Settings:
    available_1g_hugepages: int = 96
    available_normal_memory: int = 16 * GIB
    monitor_start_timeout: timedelta = timedelta(seconds=120)
    monitor_reserve_timeout: timedelta = timedelta(seconds=60)
    github_busy_lag: timedelta = timedelta(0)  # upstream's scenarios know no lag
    base_image_max_age: timedelta = timedelta(seconds=86400)
    dont_create_runners: bool = False
    dont_register_runners: bool = False
    destroy_all_non_busy_runners: bool = False


def profiles(*specs: tuple[str, int, int, int]) -> dict[str, Profile]:
    """`profile(key, target, hugepages, memory)` of spec §6, for each spec, keyed by name."""
    return {key: Profile(key, target, pages, memory) for key, target, pages, memory in specs}


@dataclass(frozen=True)
class Fake:
    profile: str
    status: Status
    created_ago: int = 9001
    reserved_ago: int | None = None


def idle(p: str) -> Fake:
    return Fake(p, IDLE)


def busy(p: str) -> Fake:
    return Fake(p, BUSY)


def reserved(p: str) -> Fake:
    return Fake(p, RESERVED, reserved_ago=0)


def done(p: str) -> Fake:
    return Fake(p, DONE)


def epoch_secs(ago: int) -> int:
    return int((NOW - timedelta(seconds=ago)).timestamp())


def install(fakes: Sequence[Fake | None], in_flight: Sequence[int] = ()) -> list[Runner]:
    """The runner set for `fakes` (index = id; None leaves a gap), encoded as in spec §6."""
    registrations: list[Registration] = []
    guests: list[str] = []
    records: dict[int, RunnerRecord] = {}
    for i, fake in enumerate(fakes):
        if fake is None:
            continue
        guest = policy.guest_name(PREFIX, fake.profile, i)
        records[i] = RunnerRecord(fake.profile, NOW - timedelta(seconds=fake.created_ago))
        registration = Registration(
            id=0, name=policy.registration_name(guest, SUFFIX), status="", busy=False
        )
        if fake.status == BUSY:
            registration = replace(registration, busy=True)
        elif fake.status == RESERVED:
            labels: tuple[str, ...] = ("reserved-for:",)
            if fake.reserved_ago is not None:
                labels += (f"reserved-since:{epoch_secs(fake.reserved_ago)}",)
            registration = replace(registration, labels=labels)
        elif fake.status == IDLE:
            registration = replace(registration, status="online")
        if fake.status != DONE:
            registrations.append(registration)
        if fake.status != INVALID:
            guests.append(guest)
    runners, problems = policy.build_runners(
        registrations, guests, records, runner_prefix=PREFIX, suffix=SUFFIX, in_flight=in_flight
    )
    assert problems == []
    assert [r.id for r in runners] == sorted(records)
    return runners


def snap(ago: int) -> str:
    """A snapshot name for `NOW - ago` seconds, RFC 3339 with nanoseconds and `Z`."""
    t = NOW - timedelta(seconds=ago)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond:06d}000Z"


FRESH = snap(0)
TOO_OLD = snap(86500)


def zeros(profs: dict[str, Profile], nonzero: dict[str, int] | None = None) -> dict[str, int]:
    return {k: (nonzero or {}).get(k, 0) for k in profs}


def changes(destroy: list[int], create: dict[str, int]) -> RunnerChanges:
    return RunnerChanges(destroy=destroy, create=create)


def granted(request: dict[str, int], targets: dict[str, int]) -> Override:
    return Override(
        profile_override_counts=request,
        profile_target_counts=targets,
        actual_runner_ids_by_profile_key={},
    )


# --- T1 test_new_policy: static validation (S1-S5) ---------------------------------------------

HUGE = "Profile configuration requires too many 1G hugepages"
MEMORY = "Profile configuration requires too much normal memory"


@pytest.mark.parametrize(
    ("profs", "error"),
    [
        pytest.param({}, None, id="S1"),
        pytest.param(
            profiles(
                ("linux", 2, 24, 0), ("windows", 1, 24, 0), ("macos", 1, 24, 0), ("wpt", 0, 12, 0)
            ),
            None,
            id="S2",
        ),
        pytest.param(
            profiles(
                ("linux", 2, 24, 0), ("windows", 1, 24, 0), ("macos", 1, 24, 0), ("wpt", 1, 12, 0)
            ),
            HUGE,
            id="S3",
        ),
        pytest.param(
            profiles(
                ("linux", 2, 0, 4 * GIB),
                ("windows", 1, 0, 4 * GIB),
                ("macos", 1, 0, 4 * GIB),
                ("wpt", 0, 0, 4 * GIB),
            ),
            None,
            id="S4",
        ),
        pytest.param(
            profiles(
                ("linux", 2, 0, 4 * GIB),
                ("windows", 1, 0, 4 * GIB),
                ("macos", 1, 0, 4 * GIB),
                ("wpt", 1, 0, 4 * GIB),
            ),
            MEMORY,
            id="S5",
        ),
    ],
)
def test_static_validation(profs: dict[str, Profile], error: str | None) -> None:
    static = {k: p.target_count for k, p in profs.items()}
    assert policy.validate_counts(static, profs, Settings()) is (error is None)
    if error is None:
        policy.validate_static(profs, Settings())
    else:
        with pytest.raises(MonitorError) as raised:
            policy.validate_static(profs, Settings())
        assert str(raised.value) == error


def test_resource_needs_add_up_the_runners_of_each_profile() -> None:
    profs = profiles(("linux", 2, 1, 4 * GIB), ("windows", 1, 3, 8 * GIB))

    assert policy.static_counts(profs) == {"linux": 2, "windows": 1}
    assert policy.resource_needs(policy.static_counts(profs), profs) == policy.ResourceNeeds(
        hugepages_1g=5, normal_memory=16 * GIB
    )
    assert policy.resource_needs({"windows": 2}, profs) == policy.ResourceNeeds(6, 16 * GIB)


# --- T2, T3 and the compute half of T4: compute_runner_changes (S6-S20, S28-S30) ---------------

T2 = profiles(("linux", 5, 0, 0), ("windows", 3, 0, 0), ("macos", 3, 0, 0), ("wpt", 0, 0, 0))
T2_OLD = {k: TOO_OLD for k in T2}
T2_FRESH = {"linux": FRESH, "windows": FRESH, "macos": FRESH, "wpt": TOO_OLD}
S10_FAKES = [
    Fake("linux", INVALID, created_ago=0),  # [0] destroy
    Fake("linux", DONE, created_ago=0),  # [1] destroy
    Fake("linux", STARTED, created_ago=0),  # [2] keep (1/5)
    Fake("linux", STARTED, created_ago=130),  # [3] too old: destroy
    Fake("linux", RESERVED, reserved_ago=0),  # [4] keep (2/5)
    Fake("linux", RESERVED, reserved_ago=210),  # [5] too long: destroy
    *[idle("linux")] * 7,  # [6]-[9] excess: destroy; [10]-[12] keep (3/5)-(5/5)
]
S12_FAKES = [f for i, f in enumerate(S10_FAKES) if i not in {0, 1, 3, 5, 6, 7, 8, 9}]
S15_FAKES = [*[idle("linux")] * 5, *[idle("windows")] * 3, done("macos"), done("macos")]

T3 = profiles(("linux", 5, 8, 0), ("windows", 4, 8, 0), ("macos", 3, 8, 0), ("wpt", 0, 24, 0))

T4 = profiles(
    ("linux", 2, 24, GIB), ("windows", 1, 24, GIB), ("macos", 1, 24, GIB), ("wpt", 0, 12, GIB)
)
T4_SNAPSHOTS = {"linux": FRESH, "windows": FRESH, "macos": FRESH}
T4_FAKES = [idle("linux"), busy("linux"), reserved("windows"), idle("macos")]


def override_s26() -> Override:
    return granted({"wpt": 4}, {"linux": 1, "macos": 0, "windows": 1, "wpt": 4})


@pytest.mark.parametrize(
    ("profs", "snapshots", "fakes", "override", "expected"),
    [
        pytest.param(T2, {}, None, None, "Policy has no Runners!", id="S6"),
        pytest.param(T2, {}, [], None, changes([], zeros(T2)), id="S7"),
        pytest.param(T2, T2_OLD, [], None, changes([], zeros(T2)), id="S8"),
        pytest.param(
            T2,
            T2_FRESH,
            [],
            None,
            changes([], zeros(T2, {"linux": 5, "windows": 3, "macos": 3})),
            id="S9",
        ),
        pytest.param(
            T2, T2_FRESH, S10_FAKES, None, changes([0, 1, 3, 5, 6, 7, 8, 9], {}), id="S10"
        ),
        # The same policy asked again after the destroys "failed": the same answer.
        pytest.param(
            T2, T2_FRESH, S10_FAKES, None, changes([0, 1, 3, 5, 6, 7, 8, 9], {}), id="S11"
        ),
        pytest.param(
            T2,
            T2_FRESH,
            S12_FAKES,
            None,
            changes([], zeros(T2, {"windows": 3, "macos": 3})),
            id="S12",
        ),
        pytest.param(
            T2,
            T2_FRESH,
            S12_FAKES,
            None,
            changes([], zeros(T2, {"windows": 3, "macos": 3})),
            id="S13",
        ),
        pytest.param(
            T2,
            T2_FRESH,
            [busy("linux")] * 9,
            None,
            changes([], zeros(T2, {"windows": 3, "macos": 3})),
            id="S14",
        ),
        pytest.param(T2, T2_FRESH, S15_FAKES, None, changes([8, 9], {}), id="S15"),
        pytest.param(
            T2, T2_FRESH, [*S15_FAKES, idle("macos")], None, changes([8, 9], {}), id="S16"
        ),
        pytest.param(
            T2, T2_FRESH, [*S15_FAKES, *[idle("macos")] * 2], None, changes([8, 9], {}), id="S17"
        ),
        pytest.param(
            T2, T2_FRESH, [*S15_FAKES, *[idle("macos")] * 3], None, changes([8, 9], {}), id="S18"
        ),
        pytest.param(
            T2,
            T2_FRESH,
            [*S15_FAKES, *[idle("macos")] * 4],
            None,
            changes([8, 9, 10], {}),
            id="S19",
        ),
        pytest.param(
            T3,
            {k: FRESH for k in T3},
            [busy("wpt"), reserved("wpt")],
            None,
            changes([], zeros(T3, {"linux": 2, "windows": 2, "macos": 2})),
            id="S20",
        ),
        pytest.param(T4, T4_SNAPSHOTS, T4_FAKES, override_s26(), changes([0, 3], {}), id="S28"),
        pytest.param(
            T4,
            T4_SNAPSHOTS,
            [busy("linux"), reserved("windows")],
            override_s26(),
            changes([], zeros(T4)),
            id="S29",
        ),
        pytest.param(
            T4,
            {**T4_SNAPSHOTS, "wpt": FRESH},
            [busy("linux"), reserved("windows")],
            override_s26(),
            changes([], zeros(T4, {"wpt": 4})),
            id="S30",
        ),
    ],
)
def test_compute_runner_changes(
    profs: dict[str, Profile],
    snapshots: dict[str, str],
    fakes: list[Fake] | None,
    override: Override | None,
    expected: RunnerChanges | str,
) -> None:
    runners = None if fakes is None else install(fakes)
    if runners is not None:
        # Installing a runner set runs the override bookkeeping, as upstream set_runners does.
        override = policy.update_override(override, runners)
    inp = PolicyInput(profs, Settings(), runners, snapshots, override)
    if isinstance(expected, str):
        for decision in (policy.compute_runner_changes, policy.decide):
            with pytest.raises(MonitorError) as raised:
                decision(inp, NOW)
            assert str(raised.value) == expected
    else:
        assert policy.compute_runner_changes(inp, NOW) == expected
        assert policy.decide(inp, NOW) == expected


# --- T4, T5, T6: try_override (S21-S27, S31-S59) ----------------------------------------------

T5 = profiles(
    ("linux", 1, 24, GIB), ("windows", 1, 24, GIB), ("macos", 1, 24, GIB), ("wpt", 2, 12, GIB)
)
T6 = profiles(
    ("a-niche", 2, 6, 0),
    ("b-common", 6, 6, 0),
    ("override", 0, 6, 0),
    ("y-common", 6, 6, 0),
    ("z-niche", 2, 6, 0),
)
MEANINGLESS = "Requested override is meaningless"


def t5_case(case_id: str, key: str, count: int, expected: Override | str) -> object:
    return pytest.param(T5, {}, [], None, {key: count}, expected, id=case_id)


def t5_targets(linux: int, macos: int, windows: int, wpt: int) -> dict[str, int]:
    return {"linux": linux, "macos": macos, "windows": windows, "wpt": wpt}


@pytest.mark.parametrize(
    ("profs", "snapshots", "fakes", "override", "request_counts", "expected"),
    [
        pytest.param(T4, T4_SNAPSHOTS, None, None, {}, "Please wait a few seconds", id="S21"),
        pytest.param(
            T4, T4_SNAPSHOTS, T4_FAKES, None, {}, "No point in setting an empty override", id="S22"
        ),
        pytest.param(T4, T4_SNAPSHOTS, T4_FAKES, None, {"wpt": 0}, MEANINGLESS, id="S23"),
        pytest.param(T4, T4_SNAPSHOTS, T4_FAKES, None, {"linux": 0}, MEANINGLESS, id="S24"),
        pytest.param(T4, T4_SNAPSHOTS, T4_FAKES, None, {"linux": 1}, MEANINGLESS, id="S25"),
        pytest.param(T4, T4_SNAPSHOTS, T4_FAKES, None, {"wpt": 9}, override_s26(), id="S26"),
        pytest.param(
            T4,
            T4_SNAPSHOTS,
            T4_FAKES,
            override_s26(),
            {"wpt": 8},
            "Unable to set override while another override is active",
            id="S27",
        ),
        t5_case("S31", "linux", 0, MEANINGLESS),
        t5_case("S32", "linux", 1, MEANINGLESS),
        t5_case("S33", "linux", 2, granted({"linux": 2}, t5_targets(2, 1, 1, 0))),
        t5_case("S34", "linux", 3, granted({"linux": 3}, t5_targets(3, 1, 0, 0))),
        t5_case("S35", "linux", 4, granted({"linux": 4}, t5_targets(4, 0, 0, 0))),
        t5_case("S36", "linux", 5, granted({"linux": 4}, t5_targets(4, 0, 0, 0))),
        t5_case("S37", "windows", 0, MEANINGLESS),
        t5_case("S38", "windows", 1, MEANINGLESS),
        t5_case("S39", "windows", 2, granted({"windows": 2}, t5_targets(1, 1, 2, 0))),
        t5_case("S40", "windows", 3, granted({"windows": 3}, t5_targets(1, 0, 3, 0))),
        t5_case("S41", "windows", 4, granted({"windows": 4}, t5_targets(0, 0, 4, 0))),
        t5_case("S42", "windows", 5, granted({"windows": 4}, t5_targets(0, 0, 4, 0))),
        t5_case("S43", "macos", 0, MEANINGLESS),
        t5_case("S44", "macos", 1, MEANINGLESS),
        t5_case("S45", "macos", 2, granted({"macos": 2}, t5_targets(1, 2, 1, 0))),
        t5_case("S46", "macos", 3, granted({"macos": 3}, t5_targets(1, 3, 0, 0))),
        t5_case("S47", "macos", 4, granted({"macos": 4}, t5_targets(0, 4, 0, 0))),
        t5_case("S48", "macos", 5, granted({"macos": 4}, t5_targets(0, 4, 0, 0))),
        t5_case("S49", "wpt", 0, MEANINGLESS),
        t5_case("S50", "wpt", 1, MEANINGLESS),
        t5_case("S51", "wpt", 2, MEANINGLESS),
        t5_case("S52", "wpt", 3, granted({"wpt": 3}, t5_targets(1, 1, 0, 3))),
        t5_case("S53", "wpt", 4, granted({"wpt": 4}, t5_targets(1, 1, 0, 4))),
        t5_case("S54", "wpt", 5, granted({"wpt": 5}, t5_targets(1, 0, 0, 5))),
        t5_case("S55", "wpt", 6, granted({"wpt": 6}, t5_targets(1, 0, 0, 6))),
        t5_case("S56", "wpt", 7, granted({"wpt": 7}, t5_targets(0, 0, 0, 7))),
        t5_case("S57", "wpt", 8, granted({"wpt": 8}, t5_targets(0, 0, 0, 8))),
        t5_case("S58", "wpt", 9, granted({"wpt": 8}, t5_targets(0, 0, 0, 8))),
        pytest.param(
            T6,
            {},
            [],
            None,
            {"override": 2},
            granted(
                {"override": 2},
                {"a-niche": 2, "b-common": 5, "override": 2, "y-common": 5, "z-niche": 2},
            ),
            id="S59",
        ),
        # Not upstream: critical runners are not covered by the static target, so one more
        # linux runner than the busy one plus the static target is extra demand.
        pytest.param(
            T4,
            T4_SNAPSHOTS,
            T4_FAKES,
            None,
            {"linux": 2},
            granted({"linux": 2}, {"linux": 3, "macos": 0, "windows": 1, "wpt": 0}),
            id="critical-not-covered",
        ),
        # Not upstream: the remaining error messages of spec §5.6.
        pytest.param(
            T4, T4_SNAPSHOTS, T4_FAKES, None, {"nope": 3}, "No profile with key: nope", id="unknown"
        ),
        pytest.param(
            profiles(("linux", 2, 48, 0), ("wpt", 0, 48, 0)),
            {},
            [busy("linux"), busy("linux")],
            None,
            {"wpt": 1},
            "Requested override had to be adjusted so far that it became meaningless",
            id="adjusted-away",
        ),
    ],
)
def test_try_override(
    profs: dict[str, Profile],
    snapshots: dict[str, str],
    fakes: list[Fake] | None,
    override: Override | None,
    request_counts: dict[str, int],
    expected: Override | str,
) -> None:
    runners = None if fakes is None else install(fakes)
    inp = PolicyInput(profs, Settings(), runners, snapshots, override)
    if isinstance(expected, str):
        with pytest.raises(MonitorError) as raised:
            policy.try_override(inp, request_counts, NOW)
        assert str(raised.value) == expected
    else:
        result = policy.try_override(inp, request_counts, NOW)
        assert result == expected
        assert policy.validate_counts(result.profile_target_counts, profs, Settings())


# --- Extra: status, labels, ages (spec §4.4) --------------------------------------------------


def runner(
    registration: Registration | None,
    guest: bool = True,
    in_flight: bool = False,
    created_at: datetime = NOW - timedelta(seconds=9001),
) -> Runner:
    return Runner(
        id=1,
        profile="linux",
        created_at=created_at,
        registration=registration,
        guest_name="ci-runner-linux.1" if guest else None,
        in_flight=in_flight,
    )


def reg(status: str = "", busy: bool = False, labels: tuple[str, ...] = ()) -> Registration:
    return Registration(7, "ci-runner-linux.1@host", status, busy, labels)


@pytest.mark.parametrize(
    ("registration", "guest", "in_flight", "status"),
    [
        pytest.param(reg(), False, False, INVALID, id="registration-only"),
        pytest.param(
            reg("online", True), False, False, INVALID, id="registration-only-busy-online"
        ),
        pytest.param(None, True, False, DONE, id="guest-only"),
        pytest.param(reg(busy=True, labels=("reserved-for:x",)), True, False, BUSY, id="busy-wins"),
        pytest.param(
            reg("online", labels=("reserved-for:",)), True, False, RESERVED, id="reserved"
        ),
        pytest.param(reg(labels=("reserved-for:abc",)), True, False, RESERVED, id="reserved-off"),
        pytest.param(reg("online", labels=("reserved-fork",)), True, False, IDLE, id="not-a-key"),
        pytest.param(reg("online"), True, False, IDLE, id="idle"),
        pytest.param(reg("offline"), True, False, STARTED, id="offline"),
        pytest.param(reg(""), True, False, STARTED, id="no-status"),
        pytest.param(None, False, True, STARTED, id="in-flight-nothing-yet"),
        pytest.param(reg(), False, True, STARTED, id="in-flight-registered-no-guest"),
        # Being created: the guest may be listed before GitHub's list has the registration.
        pytest.param(None, True, True, STARTED, id="in-flight-guest-only"),
        pytest.param(reg("online"), True, True, IDLE, id="in-flight-idle"),
    ],
)
def test_status(
    registration: Registration | None, guest: bool, in_flight: bool, status: Status
) -> None:
    assert runner(registration, guest, in_flight).status is status


@pytest.mark.parametrize(
    ("registration", "guest", "status"),
    [
        pytest.param(None, True, DONE, id="unregistered-guest-left"),
        pytest.param(reg("online"), False, DONE, id="guest-gone-first"),
        pytest.param(None, False, DONE, id="both-gone"),
        pytest.param(reg("online", True), True, BUSY, id="not-started-yet"),
    ],
)
def test_status_of_a_runner_being_destroyed(
    registration: Registration | None, guest: bool, status: Status
) -> None:
    assert replace(runner(registration, guest, True), destroying=True).status is status


def test_label_value_takes_the_first_match() -> None:
    registration = reg(labels=("self-hosted", "reserved-by:a/b", "reserved-by:c", "reserved-by"))
    assert registration.label_value("reserved-by") == "a/b"
    assert registration.label_value("self-hosted") is None
    assert registration.label_value("reserved-for") is None


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param(("reserved-for:",), None, id="missing"),
        pytest.param(("reserved-since:soon",), None, id="not-a-number"),
        pytest.param(("reserved-since:-5",), None, id="negative"),
        pytest.param(("reserved-since:",), None, id="empty"),
        pytest.param((f"reserved-since:{epoch_secs(-5)}",), None, id="future"),
        pytest.param((f"reserved-since:{epoch_secs(30)}",), timedelta(seconds=30), id="30s"),
        pytest.param((f"reserved-since:{epoch_secs(0)}",), timedelta(0), id="now"),
    ],
)
def test_reserved_for(labels: tuple[str, ...], expected: timedelta | None) -> None:
    assert runner(reg(labels=labels)).reserved_for(NOW) == expected


def test_reserved_for_without_registration_is_none() -> None:
    assert runner(None).reserved_for(NOW) is None


def test_age() -> None:
    assert runner(None, created_at=NOW - timedelta(seconds=5)).age(NOW) == timedelta(seconds=5)
    assert runner(None, created_at=NOW).age(NOW) == timedelta(0)
    assert runner(None, created_at=NOW + timedelta(seconds=1)).age(NOW) is None


# --- Extra: names and pairing (spec §4.1, §4.3) -----------------------------------------------


def test_names() -> None:
    guest = policy.guest_name("ci-runner", "servo-ubuntu2204", 1234)
    assert guest == "ci-runner-servo-ubuntu2204.1234"
    assert policy.registration_name(guest, "ci0") == "ci-runner-servo-ubuntu2204.1234@ci0"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ci-runner-servo-ubuntu2204.1234", ("servo-ubuntu2204", 1234)),
        ("ci-runner-a.b.7", ("a.b", 7)),
        ("ci-runner-linux.0", ("linux", 0)),
        ("ci-runner-x", None),
        ("ci-runner-.5", None),
        ("ci-runner-linux.", None),
        ("ci-runner-linux.-1", None),
        ("ci-runner-linux.1x", None),
        ("ci-runner-linux.²", None),
        ("ci-rebuild-linux.1", None),
        ("ci-runnerlinux.1", None),
    ],
)
def test_parse_guest_name(name: str, expected: tuple[str, int] | None) -> None:
    assert policy.parse_guest_name(name, "ci-runner") == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ci-runner-linux.3@ci0", ("linux", 3)),
        ("ci-runner-linux.3@ci1", None),
        ("ci-runner-linux.3@ci0@ci0", None),
        ("ci-runner-linux.3", None),
        ("foo@ci0", None),
        ("ci-other-linux.3@ci0", None),
    ],
)
def test_parse_registration_name(name: str, expected: tuple[str, int] | None) -> None:
    assert policy.parse_registration_name(name, "ci-runner", "ci0") == expected


def test_malformed_and_mismatched_names_do_not_shift_pairing() -> None:
    online = Registration(11, "ci-runner-linux.1@host", "online", False)
    registrations = [
        Registration(10, "foo@host", "online", False),
        online,
        Registration(12, "ci-runner-x@host", "", False),
        Registration(13, "ci-runner-windows.2@host", "online", False),
        Registration(14, "ci-runner-linux.0@elsewhere", "online", True),
    ]
    guests = [
        "ci-runner-x",
        "ci-runner-linux.0",
        "other-vm",
        "ci-runner-linux.1",
        "ci-runner-linux.2",
    ]
    records = {i: RunnerRecord("linux", NOW) for i in range(3)}

    runners, problems = policy.build_runners(
        registrations, guests, records, runner_prefix=PREFIX, suffix=SUFFIX
    )

    # Upstream zipped the parsed ids [1, 2] with all four registrations for this host, so id 1
    # got foo@host and id 2 got ci-runner-linux.1@host.
    assert runners == [
        Runner(0, "linux", NOW, None, "ci-runner-linux.0"),
        Runner(1, "linux", NOW, online, "ci-runner-linux.1"),
        Runner(2, "linux", NOW, None, "ci-runner-linux.2"),
    ]
    assert [r.status for r in runners] == [DONE, IDLE, DONE]
    assert problems == [
        "registration foo@host has no runner id",
        "registration ci-runner-x@host has no runner id",
        "registration ci-runner-windows.2@host names profile windows, "
        "but runner 2 has profile linux",
        "guest ci-runner-x has no runner id",
    ]


def test_items_without_a_record_are_ignored() -> None:
    registrations = [
        Registration(1, "ci-runner-linux.0@host", "online", False),
        Registration(2, "ci-runner-linux.8@host", "", False),
    ]
    guests = ["ci-runner-linux.0", "ci-runner-linux.7"]
    records = {0: RunnerRecord("linux", NOW)}

    runners, problems = policy.build_runners(
        registrations, guests, records, runner_prefix=PREFIX, suffix=SUFFIX
    )

    assert [r.id for r in runners] == [0]
    assert problems == [
        "registration ci-runner-linux.8@host has no runner record for id 8",
        "guest ci-runner-linux.7 has no runner record for id 7",
    ]
    # Neither the stray Invalid registration 8 nor the stray guest 7 is destroyed.
    inp = PolicyInput(profiles(("linux", 1, 0, 0)), Settings(), runners, {"linux": FRESH})
    assert policy.compute_runner_changes(inp, NOW) == changes([], {"linux": 0})


def test_duplicate_items_are_described() -> None:
    registrations = [
        Registration(1, "ci-runner-linux.0@host", "online", False),
        Registration(2, "ci-runner-linux.0@host", "", False),
    ]
    guests = ["ci-runner-linux.0", "ci-runner-linux.0"]
    records = {0: RunnerRecord("linux", NOW)}

    runners, problems = policy.build_runners(
        registrations, guests, records, runner_prefix=PREFIX, suffix=SUFFIX
    )

    assert runners == [Runner(0, "linux", NOW, registrations[0], "ci-runner-linux.0")]
    assert problems == [
        "registration ci-runner-linux.0@host is another for runner 0",
        "guest ci-runner-linux.0 is another for runner 0",
    ]


def test_in_flight_ids_with_a_record_are_runners_even_without_items() -> None:
    records = {3: RunnerRecord("linux", NOW), 5: RunnerRecord("linux", NOW)}

    runners, problems = policy.build_runners(
        [], ["ci-runner-linux.5"], records, runner_prefix=PREFIX, suffix=SUFFIX, in_flight={3, 4}
    )

    # 3: in flight, nothing yet. 4: in flight but no record. 5: not in flight.
    assert runners == [
        Runner(3, "linux", NOW, None, None, in_flight=True),
        Runner(5, "linux", NOW, None, "ci-runner-linux.5"),
    ]
    assert problems == []
    assert runners[0].status is STARTED


# --- Extra: destroy rules (spec §5.4, §5.9) ---------------------------------------------------

LINUX_1 = profiles(("linux", 1, 0, 0))
LINUX_2 = profiles(("linux", 2, 0, 0))
LINUX_3 = profiles(("linux", 3, 0, 0))


def decide(
    profs: dict[str, Profile],
    runners: list[Runner],
    settings: Settings | None = None,
    snapshots: dict[str, str] | None = None,
) -> RunnerChanges:
    snapshots = {k: FRESH for k in profs} if snapshots is None else snapshots
    return policy.decide(PolicyInput(profs, settings or Settings(), runners, snapshots), NOW)


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param(("reserved-for:x",), id="no-reserved-since"),
        pytest.param(("reserved-for:x", "reserved-since:soon"), id="non-numeric"),
        pytest.param(("reserved-for:x", f"reserved-since:{epoch_secs(-60)}"), id="future"),
    ],
)
def test_reserved_without_a_usable_since_is_destroyed(labels: tuple[str, ...]) -> None:
    registration = Registration(0, "ci-runner-linux.0@host", "online", False, labels)
    runners, _ = policy.build_runners(
        [registration],
        ["ci-runner-linux.0"],
        {0: RunnerRecord("linux", NOW - timedelta(seconds=9001))},
        runner_prefix=PREFIX,
        suffix=SUFFIX,
    )
    assert runners[0].status is RESERVED
    assert decide(LINUX_1, runners) == changes([0], {})


def test_reserved_within_the_timeout_is_kept() -> None:
    runners = install([Fake("linux", RESERVED, reserved_ago=60)])
    assert decide(LINUX_1, runners) == changes([], {"linux": 0})


def test_started_with_future_creation_time_is_destroyed() -> None:
    runners = install([Fake("linux", STARTED, created_ago=-60), Fake("linux", STARTED, 120)])
    assert runners[0].age(NOW) is None
    # [1] is exactly at the timeout, not beyond it, so it is kept.
    assert decide(LINUX_3, runners) == changes([0], {})


@pytest.mark.parametrize(
    ("dont_register", "expected"),
    [
        pytest.param(False, changes([0, 1], {}), id="registering"),
        pytest.param(True, changes([], {"linux": 0}), id="dont-register"),
    ],
)
def test_dont_register_runners_keeps_done_runners(
    dont_register: bool, expected: RunnerChanges
) -> None:
    runners = install([done("linux"), done("linux"), idle("linux")])
    assert decide(LINUX_3, runners, Settings(dont_register_runners=dont_register)) == expected


def test_dont_create_runners_makes_every_idle_runner_excess() -> None:
    runners = install([idle("linux"), busy("linux"), idle("linux")])
    assert decide(LINUX_3, runners, Settings(dont_create_runners=True)) == changes([0, 2], {})
    assert decide(LINUX_3, runners) == changes([], {"linux": 0})


def test_destroy_all_non_busy_runners() -> None:
    fakes = [
        Fake("linux", INVALID),
        done("linux"),
        busy("linux"),
        reserved("linux"),
        idle("linux"),
        Fake("linux", STARTED, created_ago=0),
        idle("linux"),
    ]
    runners = install(fakes, in_flight=[6])
    settings = Settings(destroy_all_non_busy_runners=True, dont_create_runners=True)

    assert decide(LINUX_3, runners, settings) == changes([0, 1, 3, 4, 5], {})
    with pytest.raises(MonitorError) as raised:
        policy.decide(PolicyInput(LINUX_3, settings, None), NOW)
    assert str(raised.value) == "Policy has no Runners!"


def test_in_flight_runners_are_never_destroyed_but_still_count() -> None:
    # [0] is Done and being destroyed already: it still counts as a proposed destroy, so only
    # one of the two Idle runners is excess.
    runners = install([done("linux"), idle("linux"), idle("linux")], in_flight=[0])
    assert decide(LINUX_1, runners) == changes([1], {})

    # [0] is the excess Idle runner but its destroy is still running: destroy no other instead.
    runners = install([idle("linux"), idle("linux")], in_flight=[0])
    assert decide(LINUX_1, runners) == changes([], {"linux": 0})

    # Invalid and too old, but mid-create: a registration without a guest yet is not Invalid.
    runners = install(
        [Fake("linux", INVALID), Fake("linux", STARTED, created_ago=500)], in_flight=[0, 1]
    )
    assert [r.status for r in runners] == [STARTED, STARTED]
    assert decide(LINUX_3, runners) == changes([], {"linux": 1})


def test_runner_of_unconfigured_profile_is_destroyed_without_crash() -> None:
    fakes = [
        done("gone"),
        Fake("gone", STARTED, created_ago=500),
        Fake("gone", RESERVED, reserved_ago=None),
        idle("gone"),
        idle("linux"),
        Fake("gone", INVALID),
    ]
    runners = install(fakes)
    # The idle "gone" runner [3] is not excess of any configured profile, so it stays.
    assert decide(LINUX_1, runners) == changes([5, 0, 1, 2], {})
    inp = PolicyInput(LINUX_1, Settings(), runners, {"linux": FRESH})
    assert list(policy.runner_counts(inp, NOW)) == ["linux"]
    assert policy.runner_counts(inp, NOW)["linux"].healthy == 1


def test_runner_counts_before_runners_are_observed() -> None:
    inp = PolicyInput(LINUX_1, Settings(), None, {"linux": FRESH})
    counts = policy.runner_counts(inp, NOW)["linux"]
    assert (counts.healthy, counts.target, counts.wanted) == (0, 1, 1)


# --- Extra: per-profile quantities (spec §5.2) ------------------------------------------------


def test_runner_counts() -> None:
    inp = PolicyInput(T2, Settings(), install(S10_FAKES), T2_FRESH)

    counts = policy.runner_counts(inp, NOW)

    assert list(counts) == ["linux", "windows", "macos", "wpt"]
    assert counts["linux"] == RunnerCounts(
        target=5,
        healthy=12,
        started_or_crashed=2,
        idle=7,
        reserved=2,
        busy=0,
        done_or_unregistered=1,
        excess_healthy=7,
        wanted=0,
        critical=2,
        image_age=timedelta(0),
    )
    assert counts["windows"] == RunnerCounts(3, 0, 0, 0, 0, 0, 0, 0, 3, 0, timedelta(0))
    assert counts["wpt"] == RunnerCounts(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, timedelta(seconds=86500))


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param("2025-03-01T11:59:00.123456789Z", timedelta(seconds=59, microseconds=876544)),
        pytest.param("2025-03-01T11:59:00.5Z", timedelta(seconds=59.5), id="short-fraction"),
        pytest.param("2025-03-01T11:59:00Z", timedelta(seconds=60), id="no-fraction"),
        pytest.param("2025-03-01T12:59:00+01:00", timedelta(seconds=60), id="offset"),
        pytest.param("2025-03-01T12:00:01.000000001Z", timedelta(0), id="future"),
    ],
)
def test_image_age(snapshot: str | None, expected: timedelta | None) -> None:
    assert policy.image_age(snapshot, NOW) == expected


@pytest.mark.parametrize(
    "snapshot", ["yesterday", "2025-03-01 11:59", "2025-13-01T00:00:00Z", "1969-12-31T23:59:59Z"]
)
def test_image_age_rejects(snapshot: str) -> None:
    with pytest.raises(ValueError):
        policy.image_age(snapshot, NOW)


@pytest.mark.parametrize(
    ("target", "snapshot", "base_image", "needs_rebuild", "effective"),
    [
        pytest.param(2, None, None, True, 0, id="no-snapshot"),
        pytest.param(2, TOO_OLD, None, True, 0, id="too-old"),
        pytest.param(2, snap(86400), None, False, 2, id="at-max-age"),
        pytest.param(2, FRESH, None, False, 2, id="fresh"),
        pytest.param(2, "garbage", None, None, 0, id="unparseable"),
        pytest.param(2, snap(-3600), None, False, 2, id="future"),
        pytest.param(0, None, None, False, 0, id="target-0"),
        pytest.param(2, None, Path("/images/base.qcow2"), False, 2, id="base-image"),
        pytest.param(2, TOO_OLD, Path("/images/base.qcow2"), False, 2, id="base-image-old"),
    ],
)
def test_image_needs_rebuild(
    target: int,
    snapshot: str | None,
    base_image: Path | None,
    needs_rebuild: bool | None,
    effective: int,
) -> None:
    profs = {"linux": Profile("linux", target, 0, 0, base_image)}
    snapshots = {} if snapshot is None else {"linux": snapshot}
    inp = PolicyInput(profs, Settings(), [], snapshots)

    assert policy.image_needs_rebuild("linux", inp, NOW) is needs_rebuild
    assert policy.effective_target("linux", inp, NOW) == effective
    assert policy.compute_runner_changes(inp, NOW) == changes([], {"linux": effective})


# --- Rebuilds: drain (upstream) and rolling (ours) -----------------------------------------------


def rebuilt(mode: str, target: int = 2) -> dict[str, Profile]:
    return {"linux": Profile("linux", target, 0, 0, None, mode)}


def with_images(fakes: Sequence[Fake], images: Sequence[str | None]) -> list[Runner]:
    return [replace(r, image=image) for r, image in zip(install(fakes), images, strict=True)]


@pytest.mark.parametrize(
    ("mode", "snapshot", "effective"),
    [
        pytest.param("drain", TOO_OLD, 0, id="drain-aged: drains first"),
        pytest.param("rolling", TOO_OLD, 2, id="rolling-aged: keeps serving"),
        pytest.param("rolling", None, 0, id="rolling-no-image: nothing to serve"),
        pytest.param("rolling", "garbage", 0, id="rolling-unknown: as upstream"),
        pytest.param("rolling", FRESH, 2, id="rolling-fresh"),
    ],
)
def test_effective_target_by_rebuild_mode(mode: str, snapshot: str | None, effective: int):
    snapshots = {} if snapshot is None else {"linux": snapshot}
    inp = PolicyInput(rebuilt(mode), Settings(), [], snapshots)
    assert policy.effective_target("linux", inp, NOW) == effective


def test_drain_rebuilds_only_once_no_runner_is_left() -> None:
    aged = {"linux": TOO_OLD}
    busy_left = PolicyInput(rebuilt("drain"), Settings(), install([busy("linux")]), aged)
    assert policy.rebuilds_to_start(busy_left, NOW, building=set()) == []
    done_left = PolicyInput(rebuilt("drain"), Settings(), install([done("linux")]), aged)
    assert policy.rebuilds_to_start(done_left, NOW, building=set()) == []
    empty = PolicyInput(rebuilt("drain"), Settings(), [], aged)
    assert policy.rebuilds_to_start(empty, NOW, building=set()) == ["linux"]
    assert policy.rebuilds_to_start(empty, NOW, building={"linux"}) == []
    assert policy.rebuilds_to_start(replace(empty, runners=None), NOW, building=set()) == []


def test_rolling_rebuilds_while_runners_serve() -> None:
    runners = install([busy("linux"), idle("linux")])
    aged = PolicyInput(rebuilt("rolling"), Settings(), runners, {"linux": TOO_OLD})
    assert policy.rebuilds_to_start(aged, NOW, building=set()) == ["linux"]
    fresh = replace(aged, snapshots={"linux": FRESH})
    assert policy.rebuilds_to_start(fresh, NOW, building=set()) == []
    unknown = replace(aged, snapshots={"linux": "garbage"})
    assert policy.rebuilds_to_start(unknown, NOW, building=set()) == []
    prebuilt = {"linux": Profile("linux", 2, 0, 0, Path("/images/base.qcow2"), "rolling")}
    assert policy.rebuilds_to_start(replace(aged, profiles=prebuilt), NOW, set()) == []


def test_rolling_replaces_outdated_idle_runners_one_at_a_time() -> None:
    old = TOO_OLD
    runners = with_images(
        [busy("linux"), reserved("linux"), idle("linux"), idle("linux"), idle("linux")],
        [old, old, old, old, FRESH],
    )
    inp = PolicyInput(rebuilt("rolling", target=5), Settings(), runners, {"linux": FRESH})
    # The lowest outdated Idle runner goes; busy and reserved ones are never touched.
    assert policy.outdated_to_replace(inp, NOW) == [2]
    assert policy.decide(inp, NOW) == changes([2], {"linux": 0})

    # While a replacement is starting (or anything is in flight), nothing more goes.
    starting = with_images([idle("linux"), Fake("linux", STARTED)], [old, FRESH])
    assert policy.outdated_to_replace(replace(inp, runners=starting), NOW) == []
    flying = [replace(r, in_flight=(r.id == 1)) for r in with_images(
        [idle("linux"), idle("linux")], [old, FRESH]
    )]  # fmt: skip
    assert policy.outdated_to_replace(replace(inp, runners=flying), NOW) == []

    # Runners of a prebuilt image (no snapshot) and drain profiles are left alone.
    prebuilt = with_images([idle("linux")], [None])
    assert policy.outdated_to_replace(replace(inp, runners=prebuilt), NOW) == []
    drain = replace(inp, profiles=rebuilt("drain", target=5))
    assert policy.outdated_to_replace(drain, NOW) == []


def test_target_with_override() -> None:
    override = granted({"linux": 3}, {"linux": 3})
    inp = PolicyInput(T2, Settings(), [], T2_FRESH, override)
    assert policy.target_with_override("linux", inp) == 3
    assert policy.target_with_override("windows", inp) == 0
    assert policy.target_with_override("windows", replace(inp, override=None)) == 3


# --- Extra: adjustment and changes (spec §5.4, §5.5) ------------------------------------------


def test_adjust_for_resource_limits_shrinks_unrequested_profiles_first() -> None:
    profs = profiles(("a", 0, 24, 0), ("b", 0, 24, 0), ("c", 0, 24, 0))
    scenario = {"a": 3, "b": 2, "c": 1}
    adjusted = {"a": 3}
    extra = {"a": 2}

    policy.adjust_for_resource_limits(
        scenario, adjusted, extra, {"b": 1, "c": 1}, profs, Settings(available_1g_hugepages=72)
    )

    # b drops to its critical 1 (pass A); c is already critical; then a gives up both of its
    # extra runners (pass B).
    assert (scenario, adjusted, extra) == ({"a": 1, "b": 1, "c": 1}, {"a": 1}, {"a": 0})


def test_adjust_for_resource_limits_stops_when_nothing_can_shrink() -> None:
    profs = profiles(("a", 0, 48, 0), ("b", 0, 48, 0))
    scenario = {"a": 3, "b": 1}
    adjusted = {"a": 3}
    extra = {"a": 1}

    policy.adjust_for_resource_limits(scenario, adjusted, extra, {"b": 1}, profs, Settings())

    # a gives up its one extra runner and then nothing more; the scenario stays over budget.
    assert (scenario, adjusted, extra) == ({"a": 2, "b": 1}, {"a": 2}, {"a": 0})


@pytest.mark.parametrize(
    ("destroy", "create", "empty"),
    [
        ([], {}, True),
        ([], {"a": 0, "b": 0}, True),
        ([], {"a": 0, "b": 1}, False),
        ([3], {}, False),
    ],
)
def test_runner_changes_is_empty(destroy: list[int], create: dict[str, int], empty: bool) -> None:
    assert changes(destroy, create).is_empty() is empty


# --- Extra: override bookkeeping and JSON (spec §5.6, §5.7) -----------------------------------


def test_override_lifecycle() -> None:
    start = granted({"linux": 2}, {"linux": 3, "windows": 1})

    # Claims the Idle linux runner it finds, leaving Busy and other profiles alone.
    first = policy.update_override(start, install([busy("linux"), idle("linux"), idle("windows")]))
    assert first == Override({"linux": 2}, {"linux": 3, "windows": 1}, {"linux": [1]})
    assert start.actual_runner_ids_by_profile_key == {}

    # Claims up to the granted count, in ascending id order.
    fakes = [busy("linux"), idle("linux"), idle("windows"), idle("linux"), idle("linux")]
    second = policy.update_override(first, install(fakes))
    assert second is not None
    assert second.actual_runner_ids_by_profile_key == {"linux": [1, 3]}

    # A claimed runner that still exists (now Busy) keeps the override alive, unchanged.
    third = policy.update_override(
        second, install([None, busy("linux"), None, None, idle("linux")])
    )
    assert third == second

    # Every granted runner was claimed and all of them are gone: finished.
    assert policy.update_override(third, install([None, None, None, None, idle("linux")])) is None
    assert policy.update_override(None, []) is None


def test_override_is_not_finished_before_every_runner_was_claimed() -> None:
    partial = Override({"linux": 2}, {"linux": 2}, {"linux": [3]})
    assert policy.update_override(partial, []) == partial

    # A lower id claimed later still comes back in ascending order.
    claimed = policy.update_override(partial, install([None, idle("linux"), None, idle("linux")]))
    assert claimed == Override({"linux": 2}, {"linux": 2}, {"linux": [1, 3]})


def test_override_json_round_trip() -> None:
    override = Override(
        profile_override_counts={"wpt": 4, "linux": 1},
        profile_target_counts={"wpt": 4, "linux": 1, "macos": 0},
        actual_runner_ids_by_profile_key={"wpt": [9, 2], "linux": []},
    )

    data = override.to_json()

    assert json.dumps(data) == (
        '{"profile_override_counts": {"linux": 1, "wpt": 4}, '
        '"profile_target_counts": {"linux": 1, "macos": 0, "wpt": 4}, '
        '"actual_runner_ids_by_profile_key": {"linux": [], "wpt": [2, 9]}}'
    )
    assert Override.from_json(json.loads(json.dumps(data))) == Override(
        {"linux": 1, "wpt": 4}, {"linux": 1, "macos": 0, "wpt": 4}, {"linux": [], "wpt": [2, 9]}
    )


@pytest.mark.parametrize(
    "runners, override, counts, status",
    [
        (None, None, {"linux": 3}, 503),  # nothing observed yet: "Please wait"
        ([], "active", {"linux": 3}, 409),  # another override is active
        ([], None, {}, 422),  # empty
        ([], None, {"nope": 3}, 422),  # unknown profile
        ([], None, {"linux": 0}, 422),  # meaningless
    ],
)
def test_try_override_errors_carry_http_statuses(runners, override, counts, status):
    configured = profiles(("linux", 1, 0, 0))
    active = policy.Override({"linux": 2}, {"linux": 2}) if override else None
    inp = policy.PolicyInput(configured, Settings(), runners, {}, active)
    with pytest.raises(MonitorError) as raised:
        policy.try_override(inp, counts, NOW)
    assert raised.value.status == status


# --- Extra: a reserved runner whose workflow run is over is reclaimed ------------------------


def reserved_runner(runner_id: int, run: str, held: int) -> Runner:
    labels = ("reserved-for:u", f"reserved-since:{epoch_secs(held)}", f"reserved-by:{run}")
    return replace(
        runner(
            Registration(runner_id, f"ci-runner-linux.{runner_id}@host", "online", False, labels)
        ),
        id=runner_id,
        guest_name=f"ci-runner-linux.{runner_id}",
    )


def test_a_reserved_runner_whose_run_finished_is_destroyed_before_its_timeout():
    cancelled, running = "servo/servo/actions/runs/1", "servo/servo/actions/runs/2"
    runners = [reserved_runner(1, cancelled, 40), reserved_runner(2, running, 40)]
    inp = PolicyInput(
        profiles=profiles(("linux", 2, 0, 0)),
        settings=Settings(),
        runners=runners,
        finished_runs={cancelled: "cancelled"},
    )
    assert policy.decide(inp, NOW).destroy == [1]
    # Without the news, both wait out monitor_reserve_timeout (60 s) as before.
    assert policy.decide(replace(inp, finished_runs={}), NOW).destroy == []


def test_runs_worth_checking_are_those_runners_waited_for_long_enough():
    runners = [
        reserved_runner(1, "a/b/actions/runs/1", 40),
        reserved_runner(2, "a/b/actions/runs/1", 35),  # the same run: asked about once
        reserved_runner(3, "a/b/actions/runs/3", 10),  # just taken: its job may start yet
        runner(reg("online")),  # Idle
    ]
    assert policy.runs_to_check(runners, NOW, timedelta(seconds=30)) == ["a/b/actions/runs/1"]


# --- Extra: drain and pause -------------------------------------------------------------------


def test_a_drained_profile_loses_its_idle_runners_keeps_busy_and_reserved_and_makes_none():
    runners = install([idle("linux"), busy("linux"), reserved("linux"), idle("mac")])
    inp = PolicyInput(
        profiles={
            k: Profile(k, t, 0, 0, base_image="prebuilt") for k, t in (("linux", 4), ("mac", 1))
        },
        settings=Settings(),
        runners=runners,
        drained=frozenset({"linux"}),
    )
    changes = policy.decide(inp, NOW)
    assert changes.destroy == [0]
    assert policy.runner_counts(inp, NOW)["linux"].target == 0
    assert policy.runner_counts(inp, NOW)["mac"].target == 1


def test_a_paused_host_creates_nothing_and_replaces_nothing():
    inp = PolicyInput(
        profiles={"linux": Profile("linux", 3, 0, 0, base_image="prebuilt")},
        settings=Settings(),
        runners=install([idle("linux")]),
        paused=True,
    )
    changes = policy.decide(inp, NOW)
    assert changes.create == {} and changes.destroy == []
    assert policy.decide(replace(inp, paused=False), NOW).create == {"linux": 2}
    assert policy.Holds(frozenset({"linux"}), maintenance=True).drained_profiles(
        ["linux", "mac"]
    ) == {"linux", "mac"}
    assert policy.Holds.from_json(policy.Holds(frozenset({"a"}), True).to_json()) == policy.Holds(
        frozenset({"a"}), True
    )


# --- Extra: GitHub's busy flag lags a job's start ------------------------------------------------


@pytest.mark.parametrize(
    ("registration", "status"),
    [
        pytest.param(reg("online"), BUSY, id="online-flag-false"),
        pytest.param(reg("online", labels=("reserved-for:x",)), BUSY, id="reserved-flag-false"),
        pytest.param(reg("online", True), BUSY, id="flag-true"),
        # Offline with the flag down: the agent is gone, the job with it.
        pytest.param(reg("offline"), STARTED, id="offline"),
        pytest.param(None, DONE, id="unregistered-after-its-job"),
    ],
)
def test_a_runner_once_seen_busy_is_never_idle_or_reserved_again(
    registration: Registration | None, status: Status
) -> None:
    assert replace(runner(registration), seen_busy=True).status is status


def test_build_runners_marks_the_runners_seen_busy() -> None:
    runners, _ = policy.build_runners(
        [Registration(i, f"ci-runner-linux.{i}@host", "online", False) for i in (1, 2)],
        ["ci-runner-linux.1", "ci-runner-linux.2"],
        {i: RunnerRecord("linux", NOW) for i in (1, 2)},
        runner_prefix=PREFIX,
        suffix=SUFFIX,
        seen_busy={2},
    )
    assert [r.status for r in runners] == [IDLE, BUSY]


LAG = Settings(github_busy_lag=timedelta(seconds=60))


@pytest.mark.parametrize(
    ("held", "settings", "destroyed"),
    [
        pytest.param(61, Settings(), True, id="no-lag-past-timeout"),
        pytest.param(61, LAG, False, id="lag-past-timeout"),
        pytest.param(120, LAG, False, id="lag-at-timeout-plus-lag"),
        pytest.param(121, LAG, True, id="lag-past-timeout-plus-lag"),
        # The case: reserve timeout 30 s, busy shows 45 s after the job started.
        pytest.param(
            46,
            Settings(
                monitor_reserve_timeout=timedelta(seconds=30),
                github_busy_lag=timedelta(seconds=60),
            ),
            False,
            id="30s-timeout-job-busy-after-45s",
        ),
    ],
)
def test_a_reserved_runner_is_destroyed_only_after_the_reserve_timeout_plus_the_busy_lag(
    held: int, settings: Settings, destroyed: bool
) -> None:
    runners = install([Fake("linux", RESERVED, reserved_ago=held)])
    changes = decide(LINUX_1, runners, settings)
    assert changes.destroy == ([0] if destroyed else [])
    assert changes.look_first == (frozenset({0}) if destroyed else frozenset())


def look_first_input(**kwargs: Any) -> PolicyInput:
    fakes = [
        idle("linux"),  # [0] excess (target 2: six healthy, three going anyway)
        Fake("linux", RESERVED, reserved_ago=500),  # [1] reserved too long
        Fake("linux", STARTED, created_ago=500),  # [2] never came online
        done("linux"),  # [3] its job is done
        Fake("linux", INVALID),  # [4] its guest is gone
        busy("linux"),  # [5] running a job
        idle("linux"),  # [6] kept
    ]
    return PolicyInput(LINUX_2, Settings(), install(fakes), {"linux": FRESH}, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "destroy", "look_first"),
    [
        pytest.param({}, [4, 3, 2, 1, 0], {0, 1}, id="policy"),
        pytest.param(
            {"destroy_requested": frozenset({6})}, [6, 4, 3, 2, 1], {6, 1}, id="operator"
        ),
        pytest.param(
            {"destroy_requested": frozenset({6}), "destroy_forced": frozenset({6})},
            [6, 4, 3, 2, 1],
            {1},
            id="operator-force",
        ),
        # Busy since the operator asked without force: it finishes its job.
        pytest.param(
            {"destroy_requested": frozenset({5})}, [4, 3, 2, 1, 0], {0, 1}, id="operator-busy"
        ),
        pytest.param(
            {"destroy_requested": frozenset({5}), "destroy_forced": frozenset({5})},
            [5, 4, 3, 2, 1],
            {1},
            id="operator-busy-force",
        ),
        pytest.param({"drained": frozenset({"linux"})}, [4, 3, 2, 1, 0, 6], {0, 1, 6}, id="drain"),
    ],
)
def test_destroys_of_runners_that_look_idle_or_reserved_look_at_github_first(
    kwargs: dict[str, Any], destroy: list[int], look_first: set[int]
) -> None:
    changes = policy.decide(look_first_input(**kwargs), NOW)
    assert changes.destroy == destroy
    assert changes.look_first == look_first


def test_outdated_and_destroy_all_non_busy_destroys_look_first() -> None:
    rolling = {"linux": Profile("linux", 1, 0, 0, rebuild_mode="rolling")}
    runners = [replace(r, image=snap(600)) for r in install([idle("linux")])]
    changes = policy.decide(PolicyInput(rolling, Settings(), runners, {"linux": FRESH}), NOW)
    assert (changes.destroy, changes.look_first) == ([0], {0})

    everything = install([idle("linux"), busy("linux"), Fake("linux", RESERVED, reserved_ago=0)])
    settings = Settings(destroy_all_non_busy_runners=True)
    changes = decide(LINUX_1, everything, settings)
    assert (changes.destroy, changes.look_first) == ([0, 2], {0, 2})
