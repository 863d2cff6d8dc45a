"""Which waiting entry gets which members' idle runners: pure decisions, no I/O, no clock.

The engine's dispatcher calls `plan` once per cycle with the entries waiting in the store,
the members as it last polled them and the runners it is still reserving; `satisfiable`
decides whether an enqueue is refused.

Rules (issue 14, "first come, first served"):
- Serving order is (-priority, seq): a higher priority first, then the order of enqueueing.
- Per profile, entries are served in that order from the idle runners of FRESH members only
  (a stale member's counts are last known, not current), less the runners being reserved.
- An entry that cannot be served in full holds back every later entry of its profile: a
  large entry is never overtaken forever by small ones (head-of-line). Other profiles go on.
- An entry for more runners than one member has idle is split across members, all or
  nothing: the fewest members (the ones with the most idle runners first), ties by URL so a
  plan is the same every time.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

from monitor.queue.contracts import MemberView
from monitor.queue.contracts import Waiting

# member url -> profile -> runners being reserved there (takes in flight, or done but not yet
# seen in the member's counts)
Reserving = Mapping[str, Mapping[str, int]]


def serving_order(waiting: Sequence[Waiting]) -> list[Waiting]:
    return sorted(waiting, key=lambda entry: (-entry.priority, entry.seq))


def available(members: Sequence[MemberView], profile: str, reserving: Reserving) -> dict[str, int]:
    """member url -> idle runners of `profile` that may be planned on (fresh members only)."""
    free: dict[str, int] = {}
    for member in members:
        counts = member.counts.get(profile)
        if not member.fresh or counts is None:
            continue
        idle = counts.idle - reserving.get(member.url, {}).get(profile, 0)
        if idle > 0:
            free[member.url] = idle
    return free


def split(count: int, free: Mapping[str, int]) -> dict[str, int] | None:
    """`count` runners from `free` on the fewest members, or None if there are too few.
    Taking from the members with the most idle runners first gives the fewest members."""
    if count > sum(free.values()):
        return None
    shares: dict[str, int] = {}
    remaining = count
    for url, idle in sorted(free.items(), key=lambda item: (-item[1], item[0])):
        if remaining == 0:
            break
        if idle <= 0:
            continue
        share = min(idle, remaining)
        shares[url] = share
        remaining -= share
    return shares


def plan(
    waiting: Sequence[Waiting],
    members: Sequence[MemberView],
    reserving: Reserving | None = None,
) -> list[tuple[Waiting, dict[str, int]]]:
    """The entries to serve now, in serving order, each with member url -> runners to take.
    An entry for 0 runners is served with an empty split (as upstream)."""
    reserving = reserving or {}
    free: dict[str, dict[str, int]] = {}  # profile -> member url -> idle runners left
    held_back: set[str] = set()
    planned: list[tuple[Waiting, dict[str, int]]] = []
    for entry in serving_order(waiting):
        if entry.profile in held_back:
            continue
        if entry.profile not in free:
            free[entry.profile] = available(members, entry.profile, reserving)
        pool = free[entry.profile]
        shares = split(entry.count, pool)
        if shares is None:
            held_back.add(entry.profile)
            continue
        for url, share in shares.items():
            pool[url] -= share
        planned.append((entry, shares))
    return planned


def satisfiable(profile: str, members: Sequence[MemberView]) -> bool:
    """Whether an entry for `profile` may be queued: some fresh member has a target for it
    (as upstream: before the first poll nothing is satisfiable)."""
    for member in members:
        counts = member.counts.get(profile)
        if member.fresh and counts is not None and counts.target > 0:
            return True
    return False
