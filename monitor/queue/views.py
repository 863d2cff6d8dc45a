"""What people and scrapers see of the global queue, rendered from a `contracts.Snapshot`:
upstream's `/dashboard.txt` (`dashboard_text`), the JSON of `/queue.json` and
`monitor queue-status` (`snapshot_json`), the Prometheus text of `/metrics` (`metrics_text`)
and the view-model of the queue page (`page_model`, rendered by views/queue_fragment.tpl).

Pure: a snapshot in, text or plain data out; nothing here reads a clock (the snapshot's
`taken_at` is "now"). The one piece of state is `WaitTally`, the cumulative histogram of
waits that a Prometheus histogram needs, fed the snapshots the web threads take (see its
docstring for why it is cumulative rather than computed from `recent`).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from monitor.queue.contracts import Entry
from monitor.queue.contracts import MemberView
from monitor.queue.contracts import Snapshot

# The outcomes always present in metrics and JSON, at 0 until they happen.
OUTCOMES = ("served", "expired", "refused", "failed")
# Upper bounds (seconds) of the wait histogram: from a runner already idle (well under a
# second: the issue asks p50 <= 1.5 s, p99 <= 3 s from idle to the client's success) to a
# queue backed up for an hour.
WAIT_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                1800.0, 3600.0)  # fmt: skip
# A waiting entry whose client has not polled for this long is shown as silent on the page
# (it expires at contracts.ENTRY_EXPIRY_SECONDS; clients poll every second).
SILENT_AFTER = timedelta(seconds=5)
# Only a repository and run id of these shapes become a link to the workflow run.
_REPO = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_RUN_ID = re.compile(r"[0-9]+")


def run_url(qualified_repo: str, run_id: str) -> str | None:
    """The workflow run's page on GitHub, or None if either part is not of a safe shape."""
    if _REPO.fullmatch(qualified_repo) and _RUN_ID.fullmatch(run_id):
        return f"https://github.com/{qualified_repo}/actions/runs/{run_id}"
    return None


def wait_seconds(entry: Entry) -> float | None:
    """From enqueue to all its runners reserved; None for an entry never served."""
    if entry.served_at is None:
        return None
    return max(0.0, (entry.served_at - entry.enqueued_at).total_seconds())


def queue_lengths(snapshot: Snapshot) -> dict[str, int]:
    """Entries waiting or reserving, per profile: every profile a member knows or an entry
    asks for, 0 included (so a series does not vanish when its queue empties)."""
    lengths = {key: 0 for member in snapshot.members for key in member.counts}
    for entry in snapshot.entries:
        lengths[entry.profile] = lengths.get(entry.profile, 0) + 1
    return dict(sorted(lengths.items()))


# Upstream's /dashboard.txt -----------------------------------------------------------------


def dashboard_text(snapshot: Snapshot) -> str:
    """Upstream's dashboard text (spec §10.2 step 3), entries in serving order, members (and
    their profiles) sorted as upstream's BTreeMaps are."""
    lines = [">>> queue"]
    for entry in snapshot.entries:
        last = entry.last_poll_at or entry.enqueued_at
        lines.append(
            f"- {entry.unique_id} (last request {rust_duration(snapshot.taken_at - last)} ago)"
        )
        lines.append(
            f"  QueueEntry {{ unique_id: UniqueId({rust_str(entry.unique_id)}), "
            f"qualified_repo: {rust_str(entry.qualified_repo)}, run_id: {rust_str(entry.run_id)}, "
            f"profile_key: {rust_str(entry.profile)}, runner_count: {entry.count} }}"
        )
    lines += ["", ">>> servers"]
    for member in sorted(snapshot.members, key=lambda m: m.url):
        lines.append(f"- {member.url}" + ("" if member.fresh else " (stale!)"))
        for key, counts in sorted(member.counts.items()):
            lines.append(f"    - {key}")
            lines.append(
                f"      {counts.idle} idle, {counts.healthy} healthy, {counts.target} target"
            )
    return "\n".join(lines) + "\n"


def rust_duration(value: timedelta) -> str:
    """A duration as Rust's `Duration` Debug format prints it: `1.234567s`, `12.5ms`, `7µs`
    (no trailing zeros; negative durations, from clocks apart, as 0)."""
    nanos = max(0, (value.days * 86_400 + value.seconds) * 10**9 + value.microseconds * 1000)
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("µs", 10**3)):
        if nanos >= scale:
            whole, part = divmod(nanos, scale)
            digits = len(str(scale)) - 1
            fraction = str(part).rjust(digits, "0").rstrip("0")
            return f"{whole}.{fraction}{unit}" if fraction else f"{whole}{unit}"
    return f"{nanos}ns"


_RUST_ESCAPES = {"\0": "\\0", "\t": "\\t", "\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def rust_str(text: str) -> str:
    """`text` as Rust's `{:?}` prints a string: quoted, with `"`, `\\` and control
    characters escaped."""
    out = []
    for char in text:
        if char in _RUST_ESCAPES:
            out.append(_RUST_ESCAPES[char])
        elif unicodedata.category(char) in _UNPRINTABLE:
            out.append(f"\\u{{{ord(char):x}}}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# JSON: /queue.json and `monitor queue-status --json` ----------------------------------------


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as JSON-able data. Times are RFC 3339 (UTC); `waiting_seconds` and
    `wait_seconds` are as of `taken_at`. No tokens: they are not in a snapshot."""
    now = snapshot.taken_at
    entries = []
    for position, entry in enumerate(snapshot.entries, start=1):
        item = _entry_json(entry)
        item["position"] = position
        item["waiting_seconds"] = round(max(0.0, (now - entry.enqueued_at).total_seconds()), 3)
        entries.append(item)
    recent = []
    for entry in snapshot.recent:
        item = _entry_json(entry)
        waited = wait_seconds(entry)
        item["wait_seconds"] = None if waited is None else round(waited, 3)
        recent.append(item)
    return {
        "taken_at": _iso(now),
        "entries": entries,
        "members": [_member_json(member) for member in snapshot.members],
        "recent": recent,
        "outcomes": _outcomes(snapshot.outcomes),
        "queue_lengths": queue_lengths(snapshot),
    }


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "unique_id": entry.unique_id,
        "profile": entry.profile,
        "count": entry.count,
        "qualified_repo": entry.qualified_repo,
        "run_id": entry.run_id,
        "run_url": run_url(entry.qualified_repo, entry.run_id),
        "priority": entry.priority,
        "seq": entry.seq,
        "state": entry.state,
        "enqueued_at": _iso(entry.enqueued_at),
        "last_poll_at": _iso(entry.last_poll_at),
        "served_at": _iso(entry.served_at),
        "reserved": {url: list(ids) for url, ids in sorted(entry.reserved.items())},
    }


def _member_json(member: MemberView) -> dict[str, Any]:
    return {
        "url": member.url,
        "fresh": member.fresh,
        "polled_at": _iso(member.polled_at),
        "error": member.error,
        "counts": {
            key: {"idle": c.idle, "healthy": c.healthy, "target": c.target}
            for key, c in sorted(member.counts.items())
        },
    }


def _outcomes(outcomes: Mapping[str, int]) -> dict[str, int]:
    return {**{name: 0 for name in OUTCOMES}, **dict(sorted(outcomes.items()))}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


# Prometheus ----------------------------------------------------------------------------------


class WaitTally:
    """The cumulative histogram of waits (enqueue to all runners reserved) per profile, since
    this tally was made: each served entry counted once, when a snapshot first shows it.

    Why cumulative: a Prometheus histogram is a set of counters; `rate()` and
    `histogram_quantile()` need bucket counts that only grow (a restart resets them, which
    Prometheus handles). Buckets computed from `Snapshot.recent`, a sliding window, would
    shrink as entries leave it and give nonsense rates. So served entries are counted as they
    appear in `recent`, keyed by (unique_id, seq), and entries served before the tally
    began are ignored (after a restart, the store's history is not counted twice).

    What it misses: entries served and pushed out of `recent` between two snapshots (each
    page poll, scrape or `/queue.json` takes one; the page polls every second) are in the
    `served` outcome but not here. Thread-safe: web threads feed it concurrently.
    """

    # Entries served this long before the newest one seen are forgotten (and ignored if a
    # late snapshot shows them again): bounds memory to an hour of entries.
    FORGET_AFTER = timedelta(hours=1)

    def __init__(self, since: datetime, buckets: Sequence[float] = WAIT_BUCKETS) -> None:
        self.since = since
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int], datetime] = {}
        self._newest = since
        # profile -> (count per bucket, not cumulative; the last is +Inf), sum, count
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, snapshot: Snapshot) -> None:
        with self._lock:
            horizon = self._newest - self.FORGET_AFTER
            for entry in snapshot.recent:
                waited = wait_seconds(entry)
                key = (entry.unique_id, entry.seq)
                served = entry.served_at
                if entry.state != "served" or served is None or waited is None:
                    continue
                if served < self.since or served < horizon or key in self._seen:
                    continue
                self._seen[key] = served
                self._newest = max(self._newest, served)
                counts = self._counts.setdefault(entry.profile, [0] * (len(self.buckets) + 1))
                counts[_bucket_index(self.buckets, waited)] += 1
                self._sums[entry.profile] = self._sums.get(entry.profile, 0.0) + waited
            horizon = self._newest - self.FORGET_AFTER
            if any(at < horizon for at in self._seen.values()):
                self._seen = {k: at for k, at in self._seen.items() if at >= horizon}

    def histograms(self) -> dict[str, tuple[list[tuple[str, float]], float]]:
        """profile -> (cumulative buckets as Prometheus labels them, sum)."""
        with self._lock:
            result = {}
            for profile, counts in sorted(self._counts.items()):
                cumulative, total = [], 0
                for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                    total += count
                    cumulative.append((_le(bound), float(total)))
                result[profile] = (cumulative, self._sums[profile])
            return result


def _bucket_index(buckets: Sequence[float], value: float) -> int:
    return next((i for i, bound in enumerate(buckets) if value <= bound), len(buckets))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def metrics_text(snapshot: Snapshot, waits: WaitTally | None = None) -> str:
    """The queue's metrics in Prometheus' text format (0.0.4; `monitor.metrics.CONTENT_TYPE`).
    Without `waits`, the wait histogram is absent."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, waits))
    return generate_latest(registry).decode()


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot, waits: WaitTally | None) -> None:
        self.snapshot = snapshot
        self.waits = waits

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        yield from _queue_metrics(snapshot)
        outcomes = CounterMetricFamily(
            "monitor_queue_outcomes",
            "Entries by how they ended since the queue started: served (all runners "
            "reserved), expired (no take request for 30 s), refused (enqueue refused), "
            "failed (gave up on an error).",
            labels=["outcome"],
        )
        for name, count in _outcomes(snapshot.outcomes).items():
            outcomes.add_metric([name], count)
        yield outcomes
        if self.waits is not None:
            waits = HistogramMetricFamily(
                "monitor_queue_wait_seconds",
                "Wait of served entries from enqueue to all their runners reserved.",
                labels=["profile"],
            )
            for profile, (buckets, total) in self.waits.histograms().items():
                waits.add_metric([profile], buckets, total)
            yield waits
        yield from _member_metrics(snapshot.members)


def _queue_metrics(snapshot: Snapshot) -> Iterable[Metric]:
    length = GaugeMetricFamily(
        "monitor_queue_length", "Entries waiting or reserving, per profile.", labels=["profile"]
    )
    wanted = GaugeMetricFamily(
        "monitor_queue_runners_wanted",
        "Runners the waiting and reserving entries ask for, per profile.",
        labels=["profile"],
    )
    oldest = GaugeMetricFamily(
        "monitor_queue_oldest_wait_seconds",
        "How long the longest-waiting entry of each profile has waited (absent when none).",
        labels=["profile"],
    )
    runners: dict[str, int] = {}
    first: dict[str, datetime] = {}
    for entry in snapshot.entries:
        runners[entry.profile] = runners.get(entry.profile, 0) + entry.count
        first[entry.profile] = min(first.get(entry.profile, entry.enqueued_at), entry.enqueued_at)
    for profile, count in queue_lengths(snapshot).items():
        length.add_metric([profile], count)
        wanted.add_metric([profile], runners.get(profile, 0))
        if profile in first:
            age = (snapshot.taken_at - first[profile]).total_seconds()
            oldest.add_metric([profile], max(0.0, age))
    return (length, wanted, oldest)


def _member_metrics(members: Sequence[MemberView]) -> Iterable[Metric]:
    fresh = GaugeMetricFamily(
        "monitor_queue_member_fresh",
        "1 if the member's last /dashboard.json poll succeeded, else 0 (its counts are then "
        "the last good ones and it is not planned on).",
        labels=["member"],
    )
    polled = GaugeMetricFamily(
        "monitor_queue_member_polled_timestamp_seconds",
        "When the member's counts were last read successfully (Unix time).",
        labels=["member"],
    )
    kinds = {
        kind: GaugeMetricFamily(
            f"monitor_queue_member_{kind}",
            f"The member's {kind} runners per profile, as it last said "
            f"(`profile_runner_counts.<profile>.{kind}`).",
            labels=["member", "profile"],
        )
        for kind in ("idle", "healthy", "target")
    }
    for member in sorted(members, key=lambda m: m.url):
        fresh.add_metric([member.url], 1 if member.fresh else 0)
        if member.polled_at is not None:
            polled.add_metric([member.url], member.polled_at.timestamp())
        for profile, counts in sorted(member.counts.items()):
            kinds["idle"].add_metric([member.url, profile], counts.idle)
            kinds["healthy"].add_metric([member.url, profile], counts.healthy)
            kinds["target"].add_metric([member.url, profile], counts.target)
    return (fresh, polled, *kinds.values())


# The queue page ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryRow:
    position: int
    unique_id: str
    profile: str
    count: int
    qualified_repo: str
    run_id: str
    run_url: str | None
    priority: int
    state: str
    enqueued_at: datetime
    reserved: int  # runners reserved so far
    reserved_on: tuple[tuple[str, tuple[int, ...]], ...]
    silent_since: datetime | None  # the client's last poll, if it is overdue


@dataclass(frozen=True)
class MemberRow:
    url: str
    fresh: bool
    stale_since: datetime | None  # the last good poll, shown only while stale
    error: str | None
    profiles: tuple[tuple[str, int, int, int], ...]  # (profile, idle, healthy, target)


@dataclass(frozen=True)
class RecentRow:
    unique_id: str
    profile: str
    count: int
    qualified_repo: str
    run_id: str
    run_url: str | None
    state: str
    enqueued_at: datetime
    served_at: datetime | None
    wait: str  # from enqueue to reserved, or "—"
    members: tuple[str, ...]


@dataclass(frozen=True)
class QueuePage:
    """What the queue page shows. Nothing in it depends on the time of the request (waiting
    times are counted up by the page's script from `enqueued_at`), and a fresh member's poll
    time is left out, so an unchanged queue makes an equal page: the fragment's memo and its
    ETag rest on that."""

    entries: tuple[EntryRow, ...]
    members: tuple[MemberRow, ...]
    recent: tuple[RecentRow, ...]
    outcomes: tuple[tuple[str, int], ...]
    lengths: tuple[tuple[str, int, int], ...]  # (profile, entries, runners wanted)
    no_fresh_member: bool


def page_model(snapshot: Snapshot) -> QueuePage:
    now = snapshot.taken_at
    entries = []
    wanted: dict[str, int] = {}
    for position, entry in enumerate(snapshot.entries, start=1):
        wanted[entry.profile] = wanted.get(entry.profile, 0) + entry.count
        last = entry.last_poll_at or entry.enqueued_at
        entries.append(
            EntryRow(
                position=position,
                unique_id=entry.unique_id,
                profile=entry.profile,
                count=entry.count,
                qualified_repo=entry.qualified_repo,
                run_id=entry.run_id,
                run_url=run_url(entry.qualified_repo, entry.run_id),
                priority=entry.priority,
                state=entry.state,
                enqueued_at=entry.enqueued_at,
                reserved=sum(len(ids) for ids in entry.reserved.values()),
                reserved_on=_reserved_on(entry),
                silent_since=last if now - last > SILENT_AFTER else None,
            )
        )
    members = tuple(
        MemberRow(
            url=member.url,
            fresh=member.fresh,
            stale_since=None if member.fresh else member.polled_at,
            error=None if member.fresh else member.error,
            profiles=tuple(
                (key, c.idle, c.healthy, c.target) for key, c in sorted(member.counts.items())
            ),
        )
        for member in sorted(snapshot.members, key=lambda m: m.url)
    )
    recent = tuple(
        RecentRow(
            unique_id=entry.unique_id,
            profile=entry.profile,
            count=entry.count,
            qualified_repo=entry.qualified_repo,
            run_id=entry.run_id,
            run_url=run_url(entry.qualified_repo, entry.run_id),
            state=entry.state,
            enqueued_at=entry.enqueued_at,
            served_at=entry.served_at,
            wait=format_wait(wait_seconds(entry)),
            members=tuple(url for url, ids in sorted(entry.reserved.items()) if ids),
        )
        for entry in snapshot.recent
    )
    lengths = tuple(
        (profile, count, wanted.get(profile, 0))
        for profile, count in queue_lengths(snapshot).items()
    )
    return QueuePage(
        entries=tuple(entries),
        members=members,
        recent=recent,
        outcomes=tuple(_outcomes(snapshot.outcomes).items()),
        lengths=lengths,
        no_fresh_member=not any(member.fresh for member in snapshot.members),
    )


def _reserved_on(entry: Entry) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((url, tuple(ids)) for url, ids in sorted(entry.reserved.items()) if ids)


def format_wait(seconds: float | None) -> str:
    """A wait for people: `0.8 s` under a minute (the interesting range), then `4m05s`."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def clock(value: datetime) -> str:
    """A time as the page shows it: UTC, to the second."""
    return value.astimezone(UTC).strftime("%H:%M:%S UTC")


def epoch(value: datetime) -> int:
    return int(value.timestamp())
