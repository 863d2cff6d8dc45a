"""Pure runner policy: which runners to destroy, how many to create, and overrides.

This is Servo's `Policy` (monitor/src/policy.rs) turned into functions of their inputs. It owns
the domain types the rest of the monitor shares (`Registration`, `Runner`, `Status`,
`RunnerChanges`, `Override`), runner naming, the pairing of registrations and guests into runners
(spec §4), and every decision of spec §5.

It imports only the standard library and `monitor.errors`. It performs no I/O, reads no clock
(`now`, a tz-aware UTC datetime, is always a parameter) and keeps no globals, so the loop can call
it freely and the tests need no fixtures. Durations are `timedelta`s, memory sizes are bytes.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Collection
from collections.abc import Container
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import MutableMapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any
from typing import Protocol

from monitor.errors import MonitorError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Label keys the reservation code writes (spec §4.6) and the status derivation reads.
RESERVED_FOR = "reserved-for"
RESERVED_SINCE = "reserved-since"
RESERVED_BY = "reserved-by"


class Status(enum.Enum):
    """What a runner is doing, derived from its guest and registration (spec §4.4)."""

    INVALID = "Invalid"
    DONE_OR_UNREGISTERED = "DoneOrUnregistered"
    BUSY = "Busy"
    RESERVED = "Reserved"
    IDLE = "Idle"
    STARTED_OR_CRASHED = "StartedOrCrashed"


# "Healthy" is every status but Invalid; "critical" runners must never be cut (spec §4.4).
HEALTHY = frozenset(Status) - {Status.INVALID}
CRITICAL = frozenset({Status.BUSY, Status.RESERVED})


@dataclass(frozen=True)
class Registration:
    """A GitHub self-hosted runner registration, holding only the fields the policy reads."""

    id: int
    name: str
    status: str
    busy: bool
    labels: tuple[str, ...] = ()

    def label_value(self, key: str) -> str | None:
        """The value after `key:` in the first label that starts with `key:`, else None."""
        prefix = f"{key}:"
        for label in self.labels:
            if label.startswith(prefix):
                return label[len(prefix) :]
        return None


@dataclass(frozen=True)
class RunnerRecord:
    """What the store knows about a runner id: its profile, when it was created, and the
    snapshot of the rebuilt image it was made from (None for a prebuilt image)."""

    profile: str
    created_at: datetime
    image: str | None = None


@dataclass(frozen=True)
class Runner:
    """One runner id with whatever live resources it has this pass.

    `in_flight` means the monitor still has a create or destroy worker running for it, so its
    live state is in the middle of changing.
    """

    id: int
    profile: str
    created_at: datetime
    registration: Registration | None
    guest_name: str | None
    in_flight: bool = False
    image: str | None = None  # the rebuilt image's snapshot it was made from
    destroying: bool = False  # in flight because a destroy worker is removing it
    # GitHub has reported it busy before. Its `busy` flag can read false for up to a minute
    # after a job starts (and flap), so such a runner stays Busy while it is online.
    seen_busy: bool = False

    @functools.cached_property
    def status(self) -> Status:
        """The status by the exact precedence of spec §4.4 (computed once: the fields are
        frozen, and a pass asks each runner many times), with what upstream cannot see: a
        runner half-way through its create or destroy."""
        if self.destroying and (self.guest_name is None or self.registration is None):
            return Status.DONE_OR_UNREGISTERED  # on its way out, whichever half went first
        if self.in_flight and not self.destroying:
            if self.guest_name is None or self.registration is None:
                # Being created: its registration and guest appear one after the other. Read
                # as Invalid, it would be unregistered under the create worker's feet.
                return Status.STARTED_OR_CRASHED
        if self.guest_name is None:
            return Status.INVALID
        if self.registration is None:
            return Status.DONE_OR_UNREGISTERED
        if self.registration.busy or (self.seen_busy and self.registration.status == "online"):
            return Status.BUSY
        if self.registration.label_value(RESERVED_FOR) is not None:
            return Status.RESERVED
        if self.registration.status == "online":
            return Status.IDLE
        return Status.STARTED_OR_CRASHED

    def age(self, now: datetime) -> timedelta | None:
        """Time since creation, or None if `created_at` lies in the future (upstream errors)."""
        if self.created_at > now:
            return None
        return now - self.created_at

    def reserved_by(self) -> str | None:
        """The `reserved-by:<owner>/<repo>/actions/runs/<id>` label's value, if any."""
        return None if self.registration is None else self.registration.label_value(RESERVED_BY)

    def reserved_for(self, now: datetime) -> timedelta | None:
        """Time since the `reserved-since:<unix secs>` label, or None if there is no
        registration or label, the value is not an integer, or it lies in the future."""
        if self.registration is None:
            return None
        value = self.registration.label_value(RESERVED_SINCE)
        if value is None or not _is_decimal(value):
            return None
        try:
            since = _EPOCH + timedelta(seconds=int(value))
        except OverflowError:
            return None
        if since > now:
            return None
        return now - since


def _is_decimal(text: str) -> bool:
    # str.isdigit alone accepts non-ASCII digits such as "²", which int() then rejects.
    return text.isascii() and text.isdigit()


# --- Names (spec §4.1) ------------------------------------------------------------------------


def guest_name(runner_prefix: str, profile: str, runner_id: int) -> str:
    """The libvirt guest name of a runner: `<prefix>-<profile>.<id>`."""
    return f"{runner_prefix}-{profile}.{runner_id}"


def registration_name(guest: str, suffix: str) -> str:
    """The GitHub registration name of a runner guest: `<guest>@<suffix>`."""
    return f"{guest}@{suffix}"


def parse_guest_name(name: str, runner_prefix: str) -> tuple[str, int] | None:
    """`(profile, id)` from a runner guest name, or None if it is not `<prefix>-<profile>.<id>`.

    The name is split at its last `.`, so profile names may contain dots.
    """
    prefix = f"{runner_prefix}-"
    if not name.startswith(prefix):
        return None
    profile, dot, id_text = name[len(prefix) :].rpartition(".")
    if not dot or not profile or not _is_decimal(id_text):
        return None
    return profile, int(id_text)


def parse_registration_name(name: str, runner_prefix: str, suffix: str) -> tuple[str, int] | None:
    """`(profile, id)` from a registration name `<guest>@<suffix>`, or None.

    The name is split at its last `@`, and the left part must be a runner guest name.
    """
    guest, at, right = name.rpartition("@")
    if not at or right != suffix:
        return None
    return parse_guest_name(guest, runner_prefix)


# --- The runner set (spec §4.3) ---------------------------------------------------------------


def build_runners(
    registrations: Iterable[Registration],
    guest_names: Iterable[str],
    records: Mapping[int, RunnerRecord],
    *,
    runner_prefix: str,
    suffix: str,
    in_flight: Collection[int] = (),
    destroying: Collection[int] = (),
    seen_busy: Collection[int] = (),
) -> tuple[list[Runner], list[str]]:
    """Pair registrations and guests into runners by id; return `(runners, problems)`.

    1. Keep registrations named `...@<suffix>` and guests named `<prefix>-...`; everything else
       belongs to someone else and is skipped silently.
    2. Parse each kept item's own `(profile, id)`. Upstream zipped the parsed ids with all items,
       so one malformed name shifted every later pairing (spec §4.3 [BUG]); here it cannot.
    3. An item becomes part of a runner only if its id has a record and its profile matches the
       record's. Any other item is described in `problems` and never touched by the policy, as
       upstream skips runners with no data directory.
    4. An id with a record but neither item is a runner only while it is in flight (being created).

    The runners come back sorted by id, with `in_flight` set for ids in `in_flight` (and
    `destroying`, `seen_busy` for the ids in those).
    """
    problems: list[str] = []
    by_id_registration: dict[int, Registration] = {}
    by_id_guest: dict[int, str] = {}

    def own_id(kind: str, name: str, parsed: tuple[str, int] | None) -> int | None:
        """The item's runner id if the item belongs to a runner we know, else None."""
        if parsed is None:
            problems.append(f"{kind} {name} has no runner id")
            return None
        profile, runner_id = parsed
        record = records.get(runner_id)
        if record is None:
            problems.append(f"{kind} {name} has no runner record for id {runner_id}")
            return None
        if profile != record.profile:
            problems.append(
                f"{kind} {name} names profile {profile}, "
                f"but runner {runner_id} has profile {record.profile}"
            )
            return None
        return runner_id

    for registration in registrations:
        if not registration.name.endswith(f"@{suffix}"):
            continue
        parsed = parse_registration_name(registration.name, runner_prefix, suffix)
        runner_id = own_id("registration", registration.name, parsed)
        if runner_id is None:
            continue
        if runner_id in by_id_registration:
            problems.append(f"registration {registration.name} is another for runner {runner_id}")
            continue
        by_id_registration[runner_id] = registration

    for name in guest_names:
        if not name.startswith(f"{runner_prefix}-"):
            continue
        runner_id = own_id("guest", name, parse_guest_name(name, runner_prefix))
        if runner_id is None:
            continue
        if runner_id in by_id_guest:
            problems.append(f"guest {name} is another for runner {runner_id}")
            continue
        by_id_guest[runner_id] = name

    flying = set(in_flight)
    ids = set(by_id_registration) | set(by_id_guest) | (flying & set(records))
    runners = [
        Runner(
            id=runner_id,
            profile=records[runner_id].profile,
            created_at=records[runner_id].created_at,
            registration=by_id_registration.get(runner_id),
            guest_name=by_id_guest.get(runner_id),
            in_flight=runner_id in flying,
            image=records[runner_id].image,
            destroying=runner_id in destroying,
            seen_busy=runner_id in seen_busy,
        )
        for runner_id in sorted(ids)
    ]
    return runners, problems


# --- Inputs -----------------------------------------------------------------------------------


class ProfileLike(Protocol):
    """The profile fields the policy reads (`config.Profile` satisfies it)."""

    @property
    def profile_name(self) -> str: ...
    @property
    def target_count(self) -> int: ...
    @property
    def requires_1g_hugepages(self) -> int: ...
    @property
    def requires_normal_memory(self) -> int: ...
    @property
    def base_image(self) -> object | None: ...
    @property
    def rebuild_mode(self) -> str: ...


class SettingsLike(Protocol):
    """The settings the policy reads (`config.Config` satisfies it)."""

    @property
    def available_1g_hugepages(self) -> int: ...
    @property
    def available_normal_memory(self) -> int: ...
    @property
    def monitor_start_timeout(self) -> timedelta: ...
    @property
    def monitor_reserve_timeout(self) -> timedelta: ...
    @property
    def github_busy_lag(self) -> timedelta: ...
    @property
    def base_image_max_age(self) -> timedelta: ...
    @property
    def dont_create_runners(self) -> bool: ...
    @property
    def dont_register_runners(self) -> bool: ...
    @property
    def destroy_all_non_busy_runners(self) -> bool: ...


@dataclass(frozen=True)
class Holds:
    """What the operator has put on hold (persisted): drained profiles, a paused host (no
    creates, no rebuilds) and maintenance (every profile drained)."""

    drained: frozenset[str] = frozenset()
    paused: bool = False
    maintenance: bool = False

    def drained_profiles(self, keys: Iterable[str]) -> frozenset[str]:
        keys = frozenset(keys)
        return keys if self.maintenance else self.drained & keys

    def to_json(self) -> dict[str, Any]:
        return {
            "drained_profiles": sorted(self.drained),
            "paused": self.paused,
            "maintenance": self.maintenance,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Holds:
        drained = data.get("drained_profiles", [])
        if not isinstance(drained, list) or not all(isinstance(k, str) for k in drained):
            raise ValueError(f"drained_profiles: expected a list of profile keys, got {drained!r}")
        return cls(
            drained=frozenset(drained),
            paused=bool(data.get("paused", False)),
            maintenance=bool(data.get("maintenance", False)),
        )


@dataclass
class Override:
    """An operator's temporary replacement of the static targets (spec §5.6, experimental).

    `profile_override_counts` is what was granted per requested profile, `profile_target_counts`
    the target of every profile while the override lasts, and `actual_runner_ids_by_profile_key`
    the Idle runners claimed for it so far (§5.7).
    """

    profile_override_counts: dict[str, int]
    profile_target_counts: dict[str, int]
    actual_runner_ids_by_profile_key: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The upstream JSON shape: fields in declaration order, map keys sorted, ids ascending."""
        return {
            "profile_override_counts": dict(sorted(self.profile_override_counts.items())),
            "profile_target_counts": dict(sorted(self.profile_target_counts.items())),
            "actual_runner_ids_by_profile_key": {
                k: sorted(ids) for k, ids in sorted(self.actual_runner_ids_by_profile_key.items())
            },
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Override:
        """The inverse of `to_json`."""
        return cls(
            profile_override_counts={k: int(v) for k, v in d["profile_override_counts"].items()},
            profile_target_counts={k: int(v) for k, v in d["profile_target_counts"].items()},
            actual_runner_ids_by_profile_key={
                k: sorted(int(i) for i in v)
                for k, v in d.get("actual_runner_ids_by_profile_key", {}).items()
            },
        )


@dataclass(frozen=True)
class PolicyInput:
    """Everything a decision depends on, apart from `now`.

    `profiles` maps key to profile (keys equal profile names). `runners` is None until the loop
    has observed them once. `snapshots` maps a profile key to its base-image snapshot name; a
    missing key means the profile has no image yet.
    """

    profiles: Mapping[str, ProfileLike]
    settings: SettingsLike
    runners: Sequence[Runner] | None
    snapshots: Mapping[str, str] = field(default_factory=dict)
    override: Override | None = None
    # `reserved-by` values (`owner/repo/actions/runs/N`) of workflow runs GitHub reports
    # completed: a runner still Reserved for one will never be used and is reclaimed.
    # `reserved-by` value -> the run's conclusion.
    finished_runs: Mapping[str, str] = field(default_factory=dict)
    # Operator holds (persisted by the loop): drained profiles have target 0 (their Idle
    # runners go, Busy and Reserved ones finish, nothing new is made, no image is rebuilt);
    # a paused host creates nothing and rebuilds nothing, and keeps the runners it has.
    drained: frozenset[str] = frozenset()
    paused: bool = False
    # Runners the operator asked to destroy (`monitor destroy ID`), destroyed first; those
    # asked with `--force` are destroyed even when Busy, and without looking at GitHub first.
    destroy_requested: frozenset[int] = frozenset()
    destroy_forced: frozenset[int] = frozenset()


@dataclass(frozen=True)
class RunnerCounts:
    """Per-profile quantities of spec §5.2, as shown on the dashboard."""

    target: int
    healthy: int
    started_or_crashed: int
    idle: int
    reserved: int
    busy: int
    done_or_unregistered: int
    excess_healthy: int
    wanted: int
    critical: int
    image_age: timedelta | None


@dataclass(frozen=True)
class RunnerChanges:
    """The outcome of a policy pass: runner ids to unregister and destroy, in order, and how
    many runners to create per profile key."""

    destroy: list[int]
    create: dict[str, int]
    # Why each runner in `destroy` goes, for the log and the event log (not compared: two
    # decisions are the same when they change the same runners).
    reasons: Mapping[int, str] = field(default_factory=dict, compare=False)
    # Runners in `destroy` that the cached list shows Idle or Reserved: GitHub's `busy` flag
    # lags a job's start, so the worker asks GitHub about each of them afresh and destroys
    # it only if that answer says it is not busy.
    look_first: frozenset[int] = field(default_factory=frozenset, compare=False)

    def is_empty(self) -> bool:
        """True when nothing is destroyed and the create counts sum to 0."""
        return not self.destroy and sum(self.create.values()) == 0


# --- Resources (spec §1.6, §5.3) --------------------------------------------------------------


def validate_counts(
    counts: Mapping[str, int], profiles: Mapping[str, ProfileLike], settings: SettingsLike
) -> bool:
    """Whether `counts` runners per profile fit both resource budgets (a missing key counts 0)."""
    return _resource_error(counts, profiles, settings) is None


@dataclass(frozen=True)
class ResourceNeeds:
    """What some runners need together: 1G hugepages (a count) and normal memory (bytes)."""

    hugepages_1g: int
    normal_memory: int


def resource_needs(
    counts: Mapping[str, int], profiles: Mapping[str, ProfileLike]
) -> ResourceNeeds:
    """What `counts` runners per profile need together (a missing key counts 0)."""
    return ResourceNeeds(
        hugepages_1g=sum(counts.get(k, 0) * p.requires_1g_hugepages for k, p in profiles.items()),
        normal_memory=sum(counts.get(k, 0) * p.requires_normal_memory for k, p in profiles.items()),
    )


def static_counts(profiles: Mapping[str, ProfileLike]) -> dict[str, int]:
    """Each profile's static `target_count`: the counts the budgets are checked for."""
    return {k: p.target_count for k, p in profiles.items()}


def _resource_error(
    counts: Mapping[str, int], profiles: Mapping[str, ProfileLike], settings: SettingsLike
) -> str | None:
    needs = resource_needs(counts, profiles)
    if needs.hugepages_1g > settings.available_1g_hugepages:
        return "Profile configuration requires too many 1G hugepages"
    if needs.normal_memory > settings.available_normal_memory:
        return "Profile configuration requires too much normal memory"
    return None


def validate_static(profiles: Mapping[str, ProfileLike], settings: SettingsLike) -> None:
    """Check that the static targets fit the budgets; raise `MonitorError` if not (§1.6)."""
    error = _resource_error(static_counts(profiles), profiles, settings)
    if error is not None:
        raise MonitorError(error)


# --- Per-profile quantities (spec §5.2) -------------------------------------------------------


_SNAPSHOT = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})"
)


def parse_snapshot_time(snapshot: str) -> datetime:
    """The instant a snapshot name (RFC 3339, up to nanoseconds) denotes, in UTC.

    Digits beyond microseconds are truncated, since `datetime` cannot hold them. Raises
    `ValueError` if the name is not RFC 3339.
    """
    match = _SNAPSHOT.fullmatch(snapshot)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {snapshot!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7), match.group(8)
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    if offset in ("Z", "z"):
        tz_offset = timedelta(0)
    else:
        sign = -1 if offset[0] == "-" else 1
        tz_offset = sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
    local = datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
    return local - tz_offset


def image_age(snapshot: str | None, now: datetime) -> timedelta | None:
    """Age of a base image from its snapshot name, or None if there is no snapshot.

    Raises `ValueError` if the name does not parse or lies before the epoch. A snapshot in the
    future has age 0 (upstream panics there).
    """
    if snapshot is None:
        return None
    created = parse_snapshot_time(snapshot)
    if created < _EPOCH:
        raise ValueError(f"snapshot time before the epoch: {snapshot!r}")
    return max(now - created, timedelta(0))


def target_with_override(key: str, inp: PolicyInput) -> int:
    """The override's target for `key` (0 if it lacks one) while one is active, else the
    profile's static `target_count`."""
    if inp.override is not None:
        return inp.override.profile_target_counts.get(key, 0)
    return inp.profiles[key].target_count


def image_needs_rebuild(key: str, inp: PolicyInput, now: datetime) -> bool | None:
    """Whether the profile's base image must be (re)built: True, False, or None if unknown.

    A profile whose target is 0 never rebuilds, nor does one that uses a prebuilt
    `base_image`. Otherwise a missing snapshot or one older than `base_image_max_age` needs a
    rebuild, and an unparseable snapshot is unknown.
    """
    if target_with_override(key, inp) == 0:
        return False
    if inp.profiles[key].base_image is not None:
        return False
    try:
        age = image_age(inp.snapshots.get(key), now)
    except ValueError:
        return None
    if age is None:
        return True
    return age > inp.settings.base_image_max_age


def effective_target(key: str, inp: PolicyInput, now: datetime) -> int:
    """The number of healthy runners the profile should have right now.

    0 when creating is switched off, the profile is drained, or the image needs (or may need)
    a rebuild, so an expiring
    image drains its profile before the rebuild starts (upstream, `rebuild_mode = "drain"`);
    else `target_with_override`. In "rolling" mode an aged image keeps serving while its
    successor is built: only a profile with no usable image at all has target 0.
    """
    if inp.settings.dont_create_runners or key in inp.drained:
        return 0
    needs = image_needs_rebuild(key, inp, now)
    if needs is False or (needs is True and _keeps_serving(key, inp)):
        return target_with_override(key, inp)
    return 0


def _keeps_serving(key: str, inp: PolicyInput) -> bool:
    """Whether an aged image of a rolling profile may still make runners (it has one)."""
    return inp.profiles[key].rebuild_mode == "rolling" and key in inp.snapshots


def rebuilds_to_start(inp: PolicyInput, now: datetime, building: Container[str]) -> list[str]:
    """Profiles whose image rebuild should start now (spec §7.2 step 3), in config order.

    A profile needs one (`image_needs_rebuild` is True: not unknown) and has none in progress.
    In "drain" mode it must also have no runner left at all, whatever its status; in
    "rolling" mode its runners keep serving meanwhile.
    """
    runners = inp.runners
    if runners is None or inp.paused:
        return []
    started = []
    for key, profile in inp.profiles.items():
        if key in building or key in inp.drained:
            continue
        if image_needs_rebuild(key, inp, now) is not True:
            continue
        if profile.rebuild_mode == "drain" and any(r.profile == key for r in runners):
            continue
        started.append(key)
    return started


def outdated_to_replace(inp: PolicyInput, now: datetime) -> list[int]:
    """Runners of rolling profiles to destroy now because a newer image exists: at most one
    per profile, and only while nothing of the profile is starting or in flight, so Idle
    runners are replaced one at a time (each replacement comes from the new image) and busy
    or reserved ones are never touched."""
    if inp.runners is None or inp.paused:
        return []  # a replacement could not be made: keep the runner
    chosen = []
    for key, profile in inp.profiles.items():
        current = inp.snapshots.get(key)
        if profile.rebuild_mode != "rolling" or current is None:
            continue
        if image_needs_rebuild(key, inp, now) is not False:
            continue  # the newest image is aged too: a rebuild comes first
        mine = [r for r in inp.runners if r.profile == key]
        if any(r.in_flight or r.status is Status.STARTED_OR_CRASHED for r in mine):
            continue
        outdated = [
            r.id
            for r in mine
            if r.status is Status.IDLE and r.image is not None and r.image != current
        ]
        if outdated:
            chosen.append(min(outdated))
    return chosen


def _count_statuses(runners: Iterable[Runner], key: str) -> dict[Status, int]:
    counts = dict.fromkeys(Status, 0)
    for runner in runners:
        if runner.profile == key:
            counts[runner.status] += 1
    return counts


def _critical_count(runners: Iterable[Runner], key: str) -> int:
    return sum(1 for r in runners if r.profile == key and r.status in CRITICAL)


def runner_counts(inp: PolicyInput, now: datetime) -> dict[str, RunnerCounts]:
    """Spec §5.2 quantities for every configured profile (none observed yet counts as none)."""
    runners = inp.runners or ()
    result = {}
    for key in inp.profiles:
        by_status = _count_statuses(runners, key)
        target = effective_target(key, inp, now)
        healthy = sum(by_status[s] for s in HEALTHY)
        try:
            age = image_age(inp.snapshots.get(key), now)
        except ValueError:
            age = None
        result[key] = RunnerCounts(
            target=target,
            healthy=healthy,
            started_or_crashed=by_status[Status.STARTED_OR_CRASHED],
            idle=by_status[Status.IDLE],
            reserved=by_status[Status.RESERVED],
            busy=by_status[Status.BUSY],
            done_or_unregistered=by_status[Status.DONE_OR_UNREGISTERED],
            excess_healthy=max(0, healthy - target),
            wanted=max(0, target - healthy),
            critical=by_status[Status.BUSY] + by_status[Status.RESERVED],
            image_age=age,
        )
    return result


# --- Decisions (spec §5.4, §5.5, §5.9) --------------------------------------------------------


def compute_runner_changes(inp: PolicyInput, now: datetime) -> RunnerChanges:
    """Which runners to destroy and how many to create (spec §5.4, step for step).

    1. Destroy Invalid runners first; they are not healthy, so they do not count.
    2. Then DoneOrUnregistered (unless `dont_register_runners`), StartedOrCrashed older than
       `monitor_start_timeout` (or with an unknown age), and Reserved longer than
       `monitor_reserve_timeout + github_busy_lag` (or with an unknown reservation time, or
       whose workflow run has finished without them: `finished_runs`), counting these per
       profile as proposed healthy destroys. The lag: a job that started just before the
       reserve timeout shows as busy on GitHub only that much later.
    3. Then, per profile in key order, the first `excess_healthy - proposed` Idle runners.
    4. Create `wanted` per profile, cut to fit the resource budgets with critical runners kept,
       but create nothing at all while anything is being destroyed.

    Runners in flight are never put in the destroy list, but they still count, so a destroy
    still running is not "replaced" by destroying another runner.
    """
    if inp.runners is None:
        raise MonitorError("Policy has no Runners!")
    runners = sorted(inp.runners, key=lambda r: r.id)
    settings = inp.settings
    counts = runner_counts(inp, now)

    def of_status(status: Status) -> list[Runner]:
        return [r for r in runners if r.status == status]

    invalid = of_status(Status.INVALID)
    # Without registrations every finished guest looks DoneOrUnregistered; keep them (§5.9).
    done = [] if settings.dont_register_runners else of_status(Status.DONE_OR_UNREGISTERED)
    started_too_old = [
        r
        for r in of_status(Status.STARTED_OR_CRASHED)
        if (age := r.age(now)) is None or age > settings.monitor_start_timeout
    ]
    longest_hold = settings.monitor_reserve_timeout + settings.github_busy_lag
    reserved_too_long = [
        r
        for r in of_status(Status.RESERVED)
        if (held := r.reserved_for(now)) is None
        or held > longest_hold
        or r.reserved_by() in inp.finished_runs
    ]

    # A runner that turned Busy after the operator's request runs its job, unless forced.
    requested = [
        r
        for r in runners
        if r.id in inp.destroy_requested
        and (r.status is not Status.BUSY or r.id in inp.destroy_forced)
    ]
    destroy = [r.id for r in requested if not r.in_flight]
    destroy += [r.id for r in invalid if not r.in_flight and r.id not in destroy]
    proposed = dict.fromkeys(inp.profiles, 0)
    for runner in requested:
        # A runner the operator removes is replaced, as one whose job is done would be.
        if runner.profile in proposed and runner.status is not Status.INVALID:
            proposed[runner.profile] += 1
    for runner in [*done, *started_too_old, *reserved_too_long]:
        if runner.id in inp.destroy_requested:
            continue  # counted above
        if not runner.in_flight:
            destroy.append(runner.id)
        # Upstream panics on a runner of an unconfigured profile here; we destroy it and leave
        # it out of the tally, which only offsets excess Idle runners of configured profiles.
        if runner.profile in proposed:
            proposed[runner.profile] += 1

    for key in sorted(inp.profiles):
        # IDLE -> DESTROY: beyond the target, net of destroys already proposed. Saturating:
        # more proposed destroys than excess must not turn negative (S15-S18).
        excess = max(0, counts[key].excess_healthy - proposed[key])
        idle = [r for r in runners if r.profile == key and r.status == Status.IDLE][:excess]
        destroy.extend(r.id for r in idle if not r.in_flight)

    scenario = {k: max(c.target, c.critical) for k, c in counts.items()}
    targets = {k: c.target for k, c in counts.items()}
    wanted = {k: c.wanted for k, c in counts.items()}
    critical = {k: c.critical for k, c in counts.items()}
    adjust_for_resource_limits(scenario, targets, wanted, critical, inp.profiles, settings)

    # Destroys may fail, so their resources are not assumed freed: create nothing this pass.
    create = {} if destroy or inp.paused else {k: wanted[k] for k in sorted(inp.profiles)}
    return RunnerChanges(destroy=destroy, create=create)


def runs_to_check(runners: Sequence[Runner], now: datetime, min_held: timedelta) -> list[str]:
    """The workflow runs (`reserved-by` values) worth asking GitHub about: those that Reserved
    runners have been held for longer than `min_held` (a job takes a moment to be picked up),
    sorted and without repeats."""
    runs = {
        run
        for r in runners
        if r.status == Status.RESERVED
        and (run := r.reserved_by()) is not None
        and (held := r.reserved_for(now)) is not None
        and held > min_held
    }
    return sorted(runs)


def decide(inp: PolicyInput, now: datetime) -> RunnerChanges:
    """The changes for this pass, each destroy with its reason: `compute_runner_changes`,
    unless the operator asked to destroy every runner that is not Busy (§5.9), which ignores
    targets and timeouts."""
    if not inp.settings.destroy_all_non_busy_runners:
        changes = compute_runner_changes(inp, now)
        replace = [i for i in outdated_to_replace(inp, now) if i not in changes.destroy]
        if replace:
            changes = RunnerChanges(destroy=changes.destroy + replace, create=changes.create)
    else:
        if inp.runners is None:
            raise MonitorError("Policy has no Runners!")
        destroy = sorted(r.id for r in inp.runners if r.status != Status.BUSY and not r.in_flight)
        changes = RunnerChanges(destroy=destroy, create={})
    by_id = {runner.id: runner for runner in inp.runners or ()}
    reasons = {i: destroy_reason(by_id[i], inp) for i in changes.destroy if i in by_id}
    look_first = frozenset(
        i
        for i in changes.destroy
        if i in by_id and by_id[i].status in LOOK_FIRST and i not in inp.destroy_forced
    )
    return RunnerChanges(
        destroy=changes.destroy, create=changes.create, reasons=reasons, look_first=look_first
    )


# Statuses whose runner may be running a job that GitHub does not report yet.
LOOK_FIRST = frozenset({Status.IDLE, Status.RESERVED})


def destroy_reason(runner: Runner, inp: PolicyInput) -> str:
    """Why `decide` destroys `runner`, in words for the log and the event log."""
    run = runner.reserved_by() if runner.status is Status.RESERVED else None
    if run is not None and run in inp.finished_runs:
        return f"its workflow run {run} ended ({inp.finished_runs[run]}) without using it"
    if runner.id in inp.destroy_requested:
        return "the operator asked for it"
    if inp.settings.destroy_all_non_busy_runners:
        return f"destroy_all_non_busy_runners is set (runner is {runner.status.value})"
    image = inp.snapshots.get(runner.profile)
    if runner.status is Status.IDLE and image and runner.image and runner.image != image:
        return f"its image {runner.image} is outdated (the profile's is {image})"
    return _STATUS_REASONS[runner.status]


_STATUS_REASONS = {
    Status.INVALID: "its guest is gone; unregistering",
    Status.DONE_OR_UNREGISTERED: "its job is done (no registration)",
    Status.STARTED_OR_CRASHED: "it did not come online in time",
    Status.RESERVED: "it stayed reserved too long",
    Status.IDLE: "more idle runners than the target",
    Status.BUSY: "destroy requested",
}


def adjust_for_resource_limits(
    scenario: MutableMapping[str, int],
    adjusted: MutableMapping[str, int],
    extra: MutableMapping[str, int],
    critical: Mapping[str, int],
    profiles: Mapping[str, ProfileLike],
    settings: SettingsLike,
) -> None:
    """Shrink `scenario` one runner at a time until it fits the budgets (spec §5.5).

    Candidates go by scenario count descending, ties by key descending, so common profiles
    shrink before niche ones. Profiles not in `adjusted` shrink first (pass A); then those in
    `adjusted` that still have `extra` to give (pass B, which also decrements `adjusted` and
    `extra`). No profile goes below its critical count. Stops when nothing more can shrink,
    possibly still over budget. Mutates the three maps.
    """
    while not validate_counts(scenario, profiles, settings):
        candidates = sorted(scenario, key=lambda k: (scenario[k], k), reverse=True)
        spare = [k for k in candidates if scenario[k] > critical.get(k, 0)]
        pass_a = next((k for k in spare if k not in adjusted), None)
        if pass_a is not None:
            scenario[pass_a] -= 1
            continue
        pass_b = next((k for k in spare if k in adjusted and extra.get(k, 0) > 0), None)
        if pass_b is None:
            return
        scenario[pass_b] -= 1
        adjusted[pass_b] -= 1
        extra[pass_b] -= 1


# --- Overrides (spec §5.6, §5.7) --------------------------------------------------------------


def try_override(inp: PolicyInput, counts: Mapping[str, int], now: datetime) -> Override:
    """A new override granting `counts` runners per profile key, scaled to fit (spec §5.6).

    The request is first reduced by what the static targets already provide beyond critical
    runners; the rest is extra demand. Other profiles then shrink (down to their critical
    count) to make room, and the request itself shrinks only after them. Raises `MonitorError`
    when runners are not observed yet, an override is active, the request is empty, names an
    unknown profile, or asks (or ends up asking) for nothing extra.
    """
    try:
        compute_runner_changes(inp, now)
    except MonitorError as e:
        raise MonitorError("Please wait a few seconds", status=503) from e
    if inp.override is not None:
        raise MonitorError("Unable to set override while another override is active", status=409)
    if not counts:
        raise MonitorError("No point in setting an empty override", status=422)

    runners = inp.runners or ()
    critical = {k: _critical_count(runners, k) for k in inp.profiles}
    extra: dict[str, int] = {}
    for key in sorted(counts):
        if key not in inp.profiles:
            raise MonitorError(f"No profile with key: {key}", status=422)
        # Uses the static target, ignoring image state, as upstream does.
        covered = max(0, inp.profiles[key].target_count - critical[key])
        extra[key] = max(0, counts[key] - covered)
    if sum(extra.values()) == 0:
        raise MonitorError("Requested override is meaningless", status=422)

    scenario = {k: p.target_count + extra.get(k, 0) for k, p in sorted(inp.profiles.items())}
    adjusted = dict(sorted(counts.items()))
    adjust_for_resource_limits(scenario, adjusted, extra, critical, inp.profiles, inp.settings)
    if sum(extra.values()) == 0:
        raise MonitorError(
            "Requested override had to be adjusted so far that it became meaningless",
            status=422,
        )
    return Override(
        profile_override_counts=adjusted,
        profile_target_counts=scenario,
        actual_runner_ids_by_profile_key={},
    )


def update_override(override: Override | None, runners: Sequence[Runner]) -> Override | None:
    """The override after this pass's bookkeeping (spec §5.7), or None once it is finished.

    Finished means every granted runner was claimed and none of the claimed runners exists any
    more. Otherwise each requested profile claims its next unclaimed Idle runners (ascending
    id) until its granted count is reached. Claiming protects nothing; it only tracks delivery.
    Returns a new object; the argument is not modified.
    """
    if override is None:
        return None
    claimed = {k: sorted(ids) for k, ids in override.actual_runner_ids_by_profile_key.items()}
    current_ids = {r.id for r in runners}
    granted = sum(override.profile_override_counts.values())
    all_claimed = [i for ids in claimed.values() for i in ids]
    if len(all_claimed) == granted and not any(i in current_ids for i in all_claimed):
        return None

    ordered = sorted(runners, key=lambda r: r.id)
    for key, count in override.profile_override_counts.items():
        ids = claimed.setdefault(key, [])
        for runner in ordered:
            if len(ids) >= count:
                break
            if runner.profile == key and runner.status == Status.IDLE and runner.id not in ids:
                ids.append(runner.id)
        ids.sort()
    return Override(
        profile_override_counts=dict(override.profile_override_counts),
        profile_target_counts=dict(override.profile_target_counts),
        actual_runner_ids_by_profile_key=dict(sorted(claimed.items())),
    )


# --- What a pass saw, and the labels a take writes ----------------------------------------------


@dataclass
class Observation:
    """What the last pass saw and decided: read by the dashboard, never mutated after."""

    at: datetime
    runners: list[Runner]
    counts: dict[str, RunnerCounts]
    ignored: list[str]
    changes: RunnerChanges | None
    override: Override | None
    error: str | None = None


def reservation_labels(
    unique_id: str, qualified_repo: str, run_id: str, now: datetime
) -> list[str]:
    """Upstream's reservation labels (spec §4.6)."""
    return [
        f"{RESERVED_FOR}:{unique_id}",
        f"{RESERVED_SINCE}:{int(now.timestamp())}",
        f"{RESERVED_BY}:{qualified_repo}/actions/runs/{run_id}",
    ]


# Upstream's JIT work folders by image kind; everything else is Linux-like.
WORK_FOLDERS = {"windows": "C:\\a", "macos": "/Users/servo/a"}


def work_folder(profile_name: str) -> str:
    """The runner's work folder for a profile, by the kind of image its name says."""
    for marker, folder in WORK_FOLDERS.items():
        if marker in profile_name:
            return folder
    return "/a"
