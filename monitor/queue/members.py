"""`HttpMembers`: the queue's `contracts.Members` over HTTP, the only code of the queue that
talks to monitors.

- `poll`: `GET <member>/dashboard.json` (1.5 s in all, as upstream), its
  `profile_runner_counts.<key>.{idle, healthy, target}` checked, and the ids of the runners
  it lists untaken (to tell whether its counts show the queue's latest takes yet);
- `take`: `POST <member>/profile/<key>/take/<n>?unique_id&qualified_repo&run_id` with
  `Authorization: Bearer <SERVO_CI_MONITOR_API_TOKEN>`, as upstream's queue sends it, but
  waiting 15 s, not 3 (a member's take may wait on GitHub for seconds; upstream's 3 s gave up
  on takes that then reserved runners for nobody). The answer's runner ids; `null` is [];
- `release`: `DELETE <member>/reservation/<unique_id>` (our monitors' release endpoint); an
  upstream member has no such route (404 that is not our JSON error, or 405): False.

Every failure is a `MonitorError`, never a raw exception: a `TransientError` (503) for a
timeout, a refused connection, a 408, 429 or 5xx (the member's `Retry-After` kept); a
`MonitorError` 502 naming the member's status for any other answer that is not what a
monitor says, or a malformed body. Nothing retries. Runs on whichever thread calls it (the
engine's dispatcher); the connection pool is shared and thread-safe, connections are kept
alive (the queue polls every member about once a second).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from typing import Any

import urllib3

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.policy import RESERVED_FOR
from monitor.queue.contracts import Counts
from monitor.queue.contracts import MemberPoll

log = logging.getLogger(__name__)

COUNTS_TIMEOUT = 1.5
TAKE_TIMEOUT = 15.0
RELEASE_TIMEOUT = 15.0
# Kept-alive connections per member: the dispatcher's poll, a take and a release at once.
POOL_SIZE = 8
# Statuses worth trying again later (curl --retry's list, and every 5xx).
_TRANSIENT = frozenset({408, 429})
# A runner's label while it is reserved for a job (upstream's and ours).
RESERVED_LABEL = f"{RESERVED_FOR}:"
# How much of a member's error body a message repeats.
_SHOWN = 200


class HttpMembers:
    """The monitors of `[queue] servers`, reached with the monitor API token `api_token`."""

    def __init__(
        self,
        api_token: str,
        *,
        counts_timeout: float = COUNTS_TIMEOUT,
        take_timeout: float = TAKE_TIMEOUT,
        release_timeout: float = RELEASE_TIMEOUT,
    ) -> None:
        self._token = api_token
        self.counts_timeout = counts_timeout
        self.take_timeout = take_timeout
        self.release_timeout = release_timeout
        self._http = urllib3.PoolManager(retries=False, maxsize=POOL_SIZE)

    def __repr__(self) -> str:
        return "HttpMembers()"  # never the token

    def poll(self, url: str) -> MemberPoll:
        response = self._request("GET", url, "/dashboard.json", self.counts_timeout)
        if response.status != 200:
            raise _refused(url, "GET /dashboard.json", response)
        document = _json(url, "GET /dashboard.json", response)
        return MemberPoll(_parse_counts(url, document), _parse_untaken(document))

    def take(
        self, url: str, profile: str, count: int, unique_id: str, qualified_repo: str, run_id: str
    ) -> list[int]:
        query = urllib.parse.urlencode(
            {"unique_id": unique_id, "qualified_repo": qualified_repo, "run_id": run_id}
        )
        path = f"/profile/{urllib.parse.quote(profile, safe='')}/take/{int(count)}?{query}"
        what = f"take of {count} {profile} for {unique_id}"
        response = self._request("POST", url, path, self.take_timeout, authorized=True)
        if response.status != 200:
            raise _refused(url, what, response)
        return _runner_ids(url, what, _json(url, what, response))

    def release(self, url: str, unique_id: str) -> bool:
        path = f"/reservation/{urllib.parse.quote(unique_id, safe='')}"
        what = f"release of {unique_id}"
        response = self._request("DELETE", url, path, self.release_timeout, authorized=True)
        if response.status == 200:
            return True
        if response.status == 404 and _our_error(response) is not None:
            return True  # our monitor has nothing reserved for it: nothing to give back
        if response.status in (404, 405):
            log.info("member %s cannot release (upstream's monitor): %s", url, unique_id)
            return False
        raise _refused(url, what, response)

    def _request(
        self, method: str, url: str, path: str, timeout: float, *, authorized: bool = False
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json", "User-Agent": "monitor-queue"}
        if authorized:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            return self._http.request(
                method,
                url.rstrip("/") + path,
                headers=headers,
                timeout=urllib3.Timeout(total=timeout),
                retries=False,
                # A redirect could carry the token elsewhere; a member answers in place.
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as error:
            # The class only: urllib3's text repeats the URL and its query.
            raise TransientError(
                f"member {url}: {method} {path.split('?')[0]}: {type(error).__name__}"
            ) from error


def _refused(url: str, what: str, response: urllib3.BaseHTTPResponse) -> MonitorError:
    status = response.status
    message = f"member {url}: {what}: HTTP {status}"
    detail = _error_text(response)
    if detail:
        message += f": {detail}"
    if status >= 500 or status in _TRANSIENT:
        return TransientError(message, retry_after=_retry_after(response))
    return MonitorError(message, status=502)


def _error_text(response: urllib3.BaseHTTPResponse) -> str:
    """Our monitor's `{"error": …}`, else the start of a text body (never an HTML page)."""
    ours = _our_error(response)
    if ours is not None:
        return ours[:_SHOWN]
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("text/plain"):
        return response.data[:_SHOWN].decode("utf-8", "replace").strip()
    return ""


def _our_error(response: urllib3.BaseHTTPResponse) -> str | None:
    """The text of a JSON `{"error": "<text>"}`: our monitor's errors. Upstream's (Rocket's
    catcher) are HTML, or `{"error": {"code": …}}` when JSON is asked for."""
    try:
        body = json.loads(response.data)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else None


def _retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _json(url: str, what: str, response: urllib3.BaseHTTPResponse) -> Any:
    try:
        return json.loads(response.data)
    except ValueError:
        raise MonitorError(f"member {url}: {what}: the answer is not JSON", 502) from None


def _malformed(url: str, what: str, reason: str) -> MonitorError:
    return MonitorError(f"member {url}: {what}: malformed answer ({reason})", 502)


def _parse_counts(url: str, document: Any) -> dict[str, Counts]:
    what = "GET /dashboard.json"
    table = document.get("profile_runner_counts") if isinstance(document, dict) else None
    if not isinstance(table, dict):
        raise _malformed(url, what, "no profile_runner_counts object")
    counts = {}
    for key, value in table.items():
        if not isinstance(value, dict):
            raise _malformed(url, what, f"profile_runner_counts.{key} is not an object")
        numbers = {}
        for name in ("idle", "healthy", "target"):
            number = value.get(name)
            if type(number) is not int or number < 0:
                raise _malformed(
                    url, what, f"profile_runner_counts.{key}.{name} is not a non-negative integer"
                )
            numbers[name] = number
        counts[str(key)] = Counts(**numbers)
    return counts


def _parse_untaken(document: dict[str, Any]) -> frozenset[int] | None:
    """The ids of the runners listed as registered, not busy and not reserved. Lenient: a
    runner whose entry is not as expected is not untaken (the counts were checked)."""
    runners = document.get("runners")
    if not isinstance(runners, list):
        return None
    untaken = set()
    for entry in runners:
        runner = entry.get("runner") if isinstance(entry, dict) else None
        registration = runner.get("registration") if isinstance(runner, dict) else None
        if not isinstance(registration, dict) or registration.get("busy") is not False:
            continue
        labels = registration.get("labels")
        if not isinstance(labels, list) or any(_is_reservation(label) for label in labels):
            continue
        if type(entry.get("id")) is int:
            untaken.add(entry["id"])
    return frozenset(untaken)


def _is_reservation(label: Any) -> bool:
    name = label.get("name") if isinstance(label, dict) else None
    return isinstance(name, str) and name.startswith(RESERVED_LABEL)


def _runner_ids(url: str, what: str, answer: Any) -> list[int]:
    if answer is None:
        return []
    if not isinstance(answer, list):
        raise _malformed(url, what, "neither null nor an array")
    ids = []
    for entry in answer:
        runner_id = entry.get("id") if isinstance(entry, dict) else None
        if type(runner_id) is not int:
            raise _malformed(url, what, "a runner without an integer id")
        ids.append(runner_id)
    return ids
