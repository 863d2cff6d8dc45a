"""A hand-written fake of `monitor.queue.contracts.Members`: monitors that keep real state
(runner ids, idle or reserved for a unique_id), idempotent takes, releases, and faults a test
switches on (a member down, slow, failing its takes, with counts lagging its takes, or
answering from a render made before its latest takes)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from dataclasses import field

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.queue.contracts import Counts
from monitor.queue.contracts import MemberPoll


@dataclass
class FakeHost:
    idle: dict[str, list[int]] = field(default_factory=dict)  # profile -> idle runner ids
    busy: dict[str, int] = field(default_factory=dict)
    target: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # uid -> ids
    # Runners taken since the member last rendered (see FakeMembers.rendering_late): its
    # answers still show them idle and untaken. profile -> ids
    unrendered: dict[str, list[int]] = field(default_factory=dict)


class FakeMembers:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hosts: dict[str, FakeHost] = {}
        self.next_id = 1
        self.takes: list[tuple[str, str, list[int]]] = []  # (url, unique_id, ids), in order
        self.take_calls: list[tuple[str, str, int]] = []  # (url, unique_id, count)
        self.releases: list[tuple[str, str]] = []
        self.down: set[str] = set()
        self.slow: dict[str, float] = {}
        self.failing_takes: set[str] = set()
        # (url, profile) -> idle runners its counts report that a take cannot get (a
        # monitor's counts are of its last look: runners taken since still show idle).
        self.lagging: dict[tuple[str, str], int] = {}
        # Members that answer polls from their render before their latest takes (until
        # `render`), as a monitor does for a moment after a take; `unlisted` members answer
        # with counts only, no runners.
        self.rendering_late: set[str] = set()
        self.unlisted: set[str] = set()
        self.counts_calls = 0

    def add(self, url: str, profile: str, *, idle: int = 0, busy: int = 0, target: int = 0) -> None:
        with self.lock:
            host = self.hosts.setdefault(url, FakeHost())
            host.idle.setdefault(profile, [])
            host.busy[profile] = host.busy.get(profile, 0) + busy
            host.target[profile] = target or idle + busy
            host.idle[profile] += range(self.next_id, self.next_id + idle)
            self.next_id += idle

    def free(self, url: str, profile: str, n: int = 1) -> list[int]:
        """`n` runners of `profile` on `url` become idle (a busy one finished, or a new one
        registered)."""
        with self.lock:
            host = self.hosts[url]
            ids = list(range(self.next_id, self.next_id + n))
            self.next_id += n
            host.idle[profile] += ids
            host.busy[profile] = max(0, host.busy[profile] - n)
        return ids

    def reserved_for(self, unique_id: str) -> dict[str, list[int]]:
        with self.lock:
            return {
                url: host.reserved[unique_id][1]
                for url, host in self.hosts.items()
                if unique_id in host.reserved
            }

    def all_reserved(self) -> list[int]:
        with self.lock:
            return [i for h in self.hosts.values() for _, ids in h.reserved.values() for i in ids]

    # -- Members -------------------------------------------------------------------------

    def render(self, url: str) -> None:
        """A member rendering late renders: its answers show its takes."""
        with self.lock:
            self.hosts[url].unrendered.clear()

    def poll(self, url: str) -> MemberPoll:
        delay = self.slow.get(url, 0.0)
        if delay:
            time.sleep(delay)
        with self.lock:
            self.counts_calls += 1
            if url in self.down:
                raise TransientError(f"{url}: connection refused")
            host = self.hosts[url]
            counts = {}
            untaken: set[int] = set()
            for profile, idle in host.idle.items():
                shown = idle + host.unrendered.get(profile, [])
                untaken.update(shown)
                reserved = sum(len(ids) for p, ids in host.reserved.values() if p == profile)
                healthy = len(idle) + reserved + host.busy[profile]
                lag = self.lagging.get((url, profile), 0)
                counts[profile] = Counts(len(shown) + lag, healthy + lag, host.target[profile])
            return MemberPoll(counts, None if url in self.unlisted else frozenset(untaken))

    def take(
        self, url: str, profile: str, count: int, unique_id: str, qualified_repo: str, run_id: str
    ) -> list[int]:
        with self.lock:
            self.take_calls.append((url, unique_id, count))
            if url in self.down or url in self.failing_takes:
                raise TransientError(f"{url}: take failed")
            host = self.hosts[url]
            if unique_id in host.reserved:  # a retry: the same runners, never more
                return list(host.reserved[unique_id][1])
            idle = host.idle.get(profile, [])
            if len(idle) < count:
                return []
            ids, host.idle[profile] = idle[:count], idle[count:]
            host.reserved[unique_id] = (profile, ids)
            if url in self.rendering_late:
                host.unrendered.setdefault(profile, []).extend(ids)
            self.takes.append((url, unique_id, ids))
            return list(ids)

    def release(self, url: str, unique_id: str) -> bool:
        with self.lock:
            if url in self.down:
                raise MonitorError(f"{url}: connection refused", status=502)
            self.releases.append((url, unique_id))
            host = self.hosts[url]
            if unique_id in host.reserved:
                profile, ids = host.reserved.pop(unique_id)
                host.idle[profile] = sorted(host.idle[profile] + ids)
                late = host.unrendered.get(profile, [])
                host.unrendered[profile] = [i for i in late if i not in ids]
            return True


class Recording:
    """One queue process's view of a shared fleet of fakes: says which calls it made."""

    def __init__(self, fleet: FakeMembers) -> None:
        self.fleet = fleet
        self.calls: list[str] = []

    def poll(self, url: str) -> MemberPoll:
        self.calls.append("poll")
        return self.fleet.poll(url)

    def take(
        self, url: str, profile: str, count: int, unique_id: str, qualified_repo: str, run_id: str
    ) -> list[int]:
        self.calls.append("take")
        return self.fleet.take(url, profile, count, unique_id, qualified_repo, run_id)

    def release(self, url: str, unique_id: str) -> bool:
        self.calls.append("release")
        return self.fleet.release(url, unique_id)
