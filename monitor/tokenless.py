"""Tokenless runner select: check a workflow run's args artifact (spec §10.1).

`POST /select-runner` carries no credentials. Instead the caller's workflow uploads an
artifact named `servo-ci-runners_<unique_id>` to its own run, holding an args file of
`key=value` lines, and the monitor reads it back through the GitHub API: only someone who can
run workflows in an allowed repository can have made it. `validate_select` does that and
returns what to take, `(profile_key, runner_count)`; every refusal is a `MonitorError` with
status 403 and a message for the client. GitHub failures (`MonitorError` with 502,
`TransientError`) propagate unchanged.

Differences from upstream (which answers 500 for everything): refusals are 403; the missing
`self_hosted_image_name` message names that key (upstream says "Wrong run_id in artifact");
artifacts on every page of the run are searched, not just the first; an expired artifact, or
one dated more than a minute in the future, is refused; a `qualified_repo` that is not
`owner/repo` or a `run_id` that is not all digits is refused before GitHub is asked.

`parse_args_file` and `check_args` are pure; `validate_select` does the I/O through the
`GitHub` protocol (at most two calls). `TokenlessValidator` is what routes use: it adds the
limits that callers without credentials need (the prefix checked first, one GitHub-call
budget across every repository, refusals remembered for a minute).
"""

from __future__ import annotations

import io
import logging
import math
import re
import threading
import zipfile
import zlib
from collections.abc import Mapping
from datetime import datetime
from datetime import timedelta

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import Artifact
from monitor.github import GitHub
from monitor.ratelimit import FixedWindowLimiter
from monitor.ratelimit import SlidingWindowBudget
from monitor.ratelimit import key_digest

log = logging.getLogger(__name__)

ARTIFACT_PREFIX = "servo-ci-runners_"
# What an open upstream change renames `self_hosted_image_name` to; either is accepted.
PROFILE_KEY_NEW_NAME = "self_hosted_profile"
# A clock difference between GitHub and us that is tolerated for a created_at in the future.
MAX_CLOCK_SKEW = timedelta(seconds=60)
# The args file is five short lines; refuse to decompress anything much bigger.
MAX_ARGS_FILE_BYTES = 64 * 1024
# Upstream parses the count as a Rust `usize`.
MAX_RUNNER_COUNT = 2**64 - 1
_MAX_COUNT_DIGITS = len(str(MAX_RUNNER_COUNT))
# What `upload-artifact` writes; zipfile bounds no other method's output.
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)

FORBIDDEN = 403
# A refusal is answered again from memory for this long (a client retrying, or someone
# replaying the same made-up request, costs GitHub nothing more)...
REFUSAL_TTL = timedelta(seconds=60)
# ...and at most this many are remembered (about 2 MB), the oldest forgotten first.
MAX_REMEMBERED = 10_000

# The per-repository limit counts requests in windows of this long.
REPO_WINDOW_SECONDS = 60.0

# What GitHub allows in owner and repository names; anything else cannot have our artifact.
_QUALIFIED_REPO_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")


def artifact_name(unique_id: str) -> str:
    """The name of the args artifact for `unique_id`."""
    return ARTIFACT_PREFIX + unique_id


def parse_args_file(text: str) -> dict[str, str]:
    """Parse an args file: one `key=value` per line.

    A trailing CR is stripped from each line; lines without `=` are ignored; each line is split
    at its first `=`, keys and values are kept as they are (no trimming); for a repeated key
    the last value wins.
    """
    args: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        key, sep, value = line.partition("=")
        if sep:
            args[key] = value
    return args


def check_args(
    args: Mapping[str, str], *, unique_id: str, qualified_repo: str, run_id: str
) -> tuple[str, int]:
    """Check parsed args against the request; return `(profile_key, runner_count)`.

    `unique_id`, `qualified_repo` and `run_id` must equal the request's;
    `self_hosted_image_name` (the profile key) must be present, or `self_hosted_profile`, its
    new name in an open upstream change (both present: they must agree);
    `self_hosted_runner_count` is optional (default 1) and must be a non-negative integer.
    Other keys are ignored. Raises
    `MonitorError` with status 403 on the first failure.
    """
    if args.get("unique_id") != unique_id:
        raise MonitorError("Wrong unique_id in artifact", status=FORBIDDEN)
    if args.get("qualified_repo") != qualified_repo:
        raise MonitorError("Wrong qualified_repo in artifact", status=FORBIDDEN)
    if args.get("run_id") != run_id:
        raise MonitorError("Wrong run_id in artifact", status=FORBIDDEN)
    profile_key = args.get("self_hosted_image_name")
    renamed = args.get(PROFILE_KEY_NEW_NAME)
    if profile_key is None:
        profile_key = renamed
    elif renamed is not None and renamed != profile_key:
        raise MonitorError(
            f"self_hosted_image_name and {PROFILE_KEY_NEW_NAME} disagree in artifact",
            status=FORBIDDEN,
        )
    if profile_key is None:
        raise MonitorError("Missing self_hosted_image_name in artifact", status=FORBIDDEN)
    raw_count = args.get("self_hosted_runner_count")
    if raw_count is None:
        return profile_key, 1
    return profile_key, _runner_count(raw_count)


def _runner_count(raw: str) -> int:
    # ASCII digits only: `int()` would also take signs, spaces, underscores and other scripts'
    # digits, and upstream's usize parse takes none of those (bar a leading "+").
    if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_COUNT_DIGITS:
        count = int(raw)
        if count <= MAX_RUNNER_COUNT:
            return count
    raise MonitorError(f"Bad self_hosted_runner_count in artifact: {raw[:40]!r}", status=FORBIDDEN)


def validate_select(
    github: GitHub,
    *,
    allowed_prefix: str | None,
    max_age: timedelta,
    unique_id: str,
    qualified_repo: str,
    run_id: str,
    now: datetime,
) -> tuple[str, int]:
    """Validate a tokenless select request against its args artifact (spec §10.1), with no
    limits of its own (`TokenlessValidator` adds them).

    Returns `(profile_key, runner_count)`. Raises `MonitorError` (403) if `qualified_repo`
    does not start with `allowed_prefix` (None allows nothing) or is not `owner/repo`; if the
    run (`run_id` must be all digits) has no unexpired artifact named
    `servo-ci-runners_<unique_id>`; if that artifact is older than `max_age` or dated more than
    a minute after `now`; if its first file is not readable UTF-8 text; or if its args do not
    match the request (`check_args`). Errors from `github` propagate unchanged. At most two
    GitHub calls: the run's artifacts by name, and the download.
    """
    check_repo(allowed_prefix, qualified_repo)
    artifact = find_artifact(
        github,
        max_age=max_age,
        unique_id=unique_id,
        qualified_repo=qualified_repo,
        run_id=run_id,
        now=now,
    )
    return read_args(
        github, artifact, unique_id=unique_id, qualified_repo=qualified_repo, run_id=run_id
    )


def check_repo(allowed_prefix: str | None, qualified_repo: str) -> None:
    """Refuse (403) a `qualified_repo` outside `allowed_prefix` (None allows nothing) or not
    `owner/repo`: the check that costs nothing, made before anything is counted."""
    if (
        allowed_prefix is None
        or not qualified_repo.startswith(allowed_prefix)
        or not _is_qualified_repo(qualified_repo)
    ):
        raise MonitorError("Not allowed on this qualified_repo", status=FORBIDDEN)


def find_artifact(
    github: GitHub,
    *,
    max_age: timedelta,
    unique_id: str,
    qualified_repo: str,
    run_id: str,
    now: datetime,
) -> Artifact:
    """The run's unexpired args artifact for `unique_id`, if not too old nor from the future
    (one GitHub call: the run's artifacts filtered by name); else `MonitorError` 403."""
    name = artifact_name(unique_id)
    if not (run_id.isascii() and run_id.isdigit()):
        # Run ids are integers; anything else has no artifacts (and must not reach a URL).
        raise MonitorError(f"No args artifact found: {name}", status=FORBIDDEN)
    artifact = next(
        (
            a
            for a in github.list_artifacts(qualified_repo, run_id, name=name)
            if a.name == name and not a.expired
        ),
        None,
    )
    if artifact is None:
        raise MonitorError(f"No args artifact found: {name}", status=FORBIDDEN)

    age = now - artifact.created_at
    if age > max_age:
        raise MonitorError(
            f"Args artifact is too old ({int(age.total_seconds())}s): {name}", status=FORBIDDEN
        )
    if -age > MAX_CLOCK_SKEW:
        raise MonitorError(
            f"Args artifact is from the future ({int(-age.total_seconds())}s ahead): {name}",
            status=FORBIDDEN,
        )
    return artifact


def read_args(
    github: GitHub, artifact: Artifact, *, unique_id: str, qualified_repo: str, run_id: str
) -> tuple[str, int]:
    """Download `artifact` (one GitHub call) and check its args file against the request."""
    text = _first_file_text(github.download_artifact(artifact.archive_download_url))
    profile_key, runner_count = check_args(
        parse_args_file(text), unique_id=unique_id, qualified_repo=qualified_repo, run_id=run_id
    )
    log.info(
        "Tokenless select for %s run %s (%s): %d x %r",
        qualified_repo,
        run_id,
        artifact.name,
        runner_count,
        profile_key,
    )
    return profile_key, runner_count


def repo_limiter(per_minute: int) -> FixedWindowLimiter | None:
    """The per-repository limit of tokenless requests (`select_runner_rate_limit`; 0: none)."""
    return FixedWindowLimiter(per_minute, REPO_WINDOW_SECONDS) if per_minute else None


def count_repo_request(
    limiter: FixedWindowLimiter | None, qualified_repo: str, now: float, what: str
) -> dict[str, str]:
    """Count one tokenless request (`what`, e.g. "selects") for `qualified_repo` (case-
    insensitive); its `X-RateLimit-*` headers, or a `MonitorError` 429 with them and
    `Retry-After` once the repository is past its limit this minute. Call after
    `check_repo`, so only repositories under the prefix are counted."""
    if limiter is None:
        return {}
    decision = limiter.hit(qualified_repo.lower(), now)
    headers = decision.headers()
    if not decision.allowed:
        headers["Retry-After"] = str(decision.retry_after(now))
        raise MonitorError(
            f"too many tokenless {what} for {qualified_repo}: at most {decision.limit} a minute",
            429,
            headers,
        )
    return headers


class TokenlessValidator:
    """`validate_select` with limits for callers without credentials, shared by everything
    that validates tokenless requests (`/select-runner`, and the queue's `/enqueue`).

    - The repository is checked against the prefix before anything else (`check_repo`).
    - A refusal is remembered for `refusal_ttl` and answered again without asking GitHub (at
      most `MAX_REMEMBERED` of them, the oldest forgotten first).
    - GitHub calls come out of one budget across every repository: `calls_per_hour` in any
      hour. A validation reserves its two calls before the first; past the budget it is a
      `MonitorError` 429 with `Retry-After`, and GitHub is not asked.
    Thread-safe; the times are the caller's `now`.
    """

    CALLS_PER_VALIDATION = 2  # the run's artifacts by name, and the download

    def __init__(
        self,
        github: GitHub,
        *,
        allowed_prefix: str | None,
        max_age: timedelta,
        calls_per_hour: int,
        refusal_ttl: timedelta = REFUSAL_TTL,
    ) -> None:
        self.github = github
        self.allowed_prefix = allowed_prefix
        self.max_age = max_age
        self.budget = SlidingWindowBudget(calls_per_hour, 3600.0)
        self.refusal_ttl = refusal_ttl.total_seconds()
        self._lock = threading.Lock()
        # digest of (repo, run, unique_id) -> (expiry, message, status); in expiry order.
        self._refusals: dict[bytes, tuple[float, str, int]] = {}

    def check_repo(self, qualified_repo: str) -> None:
        """Refuse (403) a repository outside the allowed prefix, before any counting."""
        check_repo(self.allowed_prefix, qualified_repo)

    def validate(
        self, *, unique_id: str, qualified_repo: str, run_id: str, now: datetime
    ) -> tuple[str, int]:
        """As `validate_select`, within the limits above."""
        self.check_repo(qualified_repo)
        at = now.timestamp()
        key = key_digest(f"{qualified_repo}\n{run_id}\n{unique_id}")
        remembered = self._remembered(key, at)
        if remembered is not None:
            log.debug("Tokenless select for %s run %s: refused again", qualified_repo, run_id)
            raise remembered
        wait = self.budget.take(self.CALLS_PER_VALIDATION, at)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise MonitorError(
                "Too many tokenless requests: this monitor's GitHub budget for them "
                f"({self.budget.limit} calls an hour) is spent; try again in {seconds} s",
                429,
                {"Retry-After": str(seconds)},
            )
        downloaded = False
        try:
            artifact = find_artifact(
                self.github,
                max_age=self.max_age,
                unique_id=unique_id,
                qualified_repo=qualified_repo,
                run_id=run_id,
                now=now,
            )
            downloaded = True
            return read_args(
                self.github,
                artifact,
                unique_id=unique_id,
                qualified_repo=qualified_repo,
                run_id=run_id,
            )
        except TransientError:
            raise  # GitHub's trouble, not the request's: not remembered
        except MonitorError as refusal:
            self._remember(key, at, refusal)
            raise
        finally:
            if not downloaded:
                self.budget.give_back(1)

    def _remembered(self, key: bytes, at: float) -> MonitorError | None:
        with self._lock:
            entry = self._refusals.get(key)
        if entry is None or at >= entry[0]:
            return None
        return MonitorError(entry[1], entry[2])  # a fresh one: callers add headers

    def _remember(self, key: bytes, at: float, refusal: MonitorError) -> None:
        with self._lock:
            refusals = self._refusals
            refusals.pop(key, None)
            refusals[key] = (at + self.refusal_ttl, refusal.message, refusal.status)
            while refusals:
                oldest = next(iter(refusals))
                if at < refusals[oldest][0] and len(refusals) <= MAX_REMEMBERED:
                    break
                del refusals[oldest]


def _is_qualified_repo(qualified_repo: str) -> bool:
    if not _QUALIFIED_REPO_RE.fullmatch(qualified_repo):
        return False
    return not any(part in (".", "..") for part in qualified_repo.split("/"))


def _first_file_text(data: bytes) -> str:
    """The first file (directories skipped) of a zip archive, decoded as UTF-8.

    The archive is the caller's: its headers may lie. Only stored and deflated members are
    read (zipfile inflates BZIP2 and LZMA members whole, whatever the headers claim), a
    member claiming more than `MAX_ARGS_FILE_BYTES` compressed or uncompressed is refused
    unread, and the member is read with a bound, so that a member holding more than it claims
    costs at most that many bytes before its CRC check fails.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entry = next((i for i in archive.infolist() if not i.is_dir()), None)
            if entry is None:
                raise _unreadable("the archive has no files")
            if entry.compress_type not in _READABLE_METHODS:
                raise _unreadable(
                    f"{_shown(entry)} uses compression method {entry.compress_type} "
                    "(only stored and deflated files are read)"
                )
            if max(entry.file_size, entry.compress_size) > MAX_ARGS_FILE_BYTES:
                raise _unreadable(f"{_shown(entry)} is larger than {MAX_ARGS_FILE_BYTES} bytes")
            with archive.open(entry) as member:
                # Inflates at most this much (zipfile passes the bound to zlib); stops at the
                # claimed size, where a member holding more fails its CRC check.
                raw = member.read(MAX_ARGS_FILE_BYTES + 1)
            if len(raw) > MAX_ARGS_FILE_BYTES:  # a lying header that zipfile did not catch
                raise _unreadable(f"{_shown(entry)} is larger than {MAX_ARGS_FILE_BYTES} bytes")
    except MonitorError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        RuntimeError,  # encrypted entries; NotImplementedError: unknown compression methods
    ) as e:
        raise _unreadable(f"not a valid zip archive ({type(e).__name__}: {e})"[:200]) from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _unreadable(f"{_shown(entry)} is not UTF-8 text") from e


def _shown(entry: zipfile.ZipInfo) -> str:
    # The file name comes from the caller's artifact: quoted and bounded for messages and logs.
    return repr(entry.filename[:100])


def _unreadable(reason: str) -> MonitorError:
    return MonitorError(f"Unreadable args artifact: {reason}", status=FORBIDDEN)
