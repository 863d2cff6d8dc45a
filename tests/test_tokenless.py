"""Tokenless select validation (spec §10.1): the pure args parsing and checks, and
`validate_select` over real HTTP against the GitHub stand-in."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import uuid
import zipfile
from collections import Counter
from datetime import UTC
from datetime import datetime
from datetime import timedelta

import pytest
import webtest

from monitor import config
from monitor import loop
from monitor import web
from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import Artifact
from monitor.github import RestGitHub
from monitor.standin import GitHubStandIn
from monitor.tokenless import TokenlessValidator
from monitor.tokenless import check_args
from monitor.tokenless import parse_args_file
from monitor.tokenless import validate_select
from tests.fakes import FakeHypervisor
from tests.support.configs import write_config
from tests.support.under_pytest import standin_fixtures

TOKEN = "ghp_tokenlesstest0123456789SECRET"
REPO = "servo/servo"
RUN = "14000000123"
UID = "0b5e3c1e-4f5a-4b8e-9d63-2a1f0c7e9b11"
NAME = f"servo-ci-runners_{UID}"
IMAGE = "servo-ubuntu2204"
MAX_AGE = timedelta(seconds=300)
# The stand-in stores created_at in whole seconds; a whole-second `now` makes ages exact.
NOW = datetime.now(UTC).replace(microsecond=0)


def args_text(
    *,
    unique_id: str = UID,
    image: str | None = IMAGE,
    count: str | None = None,
    qualified_repo: str = REPO,
    run_id: str = RUN,
) -> str:
    """An args file as the runner-select actions write it."""
    lines = [f"unique_id={unique_id}"]
    if image is not None:
        lines.append(f"self_hosted_image_name={image}")
    if count is not None:
        lines.append(f"self_hosted_runner_count={count}")
    lines += [f"qualified_repo={qualified_repo}", f"run_id={run_id}"]
    return "".join(line + "\n" for line in lines)


def good_args(**changes: str) -> dict[str, str]:
    args = {
        "unique_id": UID,
        "self_hosted_image_name": IMAGE,
        "qualified_repo": REPO,
        "run_id": RUN,
    }
    args.update(changes)
    return args


def check(args: dict[str, str]) -> tuple[str, int]:
    return check_args(args, unique_id=UID, qualified_repo=REPO, run_id=RUN)


def refused(excinfo: pytest.ExceptionInfo[MonitorError]) -> str:
    """The message of a 403 refusal (and that it was a 403, not some other failure)."""
    assert type(excinfo.value) is MonitorError
    assert excinfo.value.status == 403
    return excinfo.value.message


# -- parse_args_file ---------------------------------------------------------------------------


def test_parse_as_written_by_the_actions():
    assert parse_args_file(args_text(count="2")) == {
        "unique_id": UID,
        "self_hosted_image_name": IMAGE,
        "self_hosted_runner_count": "2",
        "qualified_repo": REPO,
        "run_id": RUN,
    }


def test_parse_strips_a_trailing_cr_only():
    text = "a=1\r\nb=2\r\nc=3\r\r\nd= 4 \r"
    assert parse_args_file(text) == {"a": "1", "b": "2", "c": "3\r", "d": " 4 "}


def test_parse_splits_at_the_first_equals_sign():
    assert parse_args_file("key=a=b==c\n=empty key\nempty value=\n") == {
        "key": "a=b==c",
        "": "empty key",
        "empty value": "",
    }


def test_parse_last_repeated_key_wins():
    assert parse_args_file("run_id=1\nrun_id=2\nother=x\nrun_id=3\n") == {
        "run_id": "3",
        "other": "x",
    }


def test_parse_ignores_lines_without_equals_sign():
    text = "# comment\n\nunique_id\nrun_id=7\n   \nno equals here"
    assert parse_args_file(text) == {"run_id": "7"}


def test_parse_keeps_keys_and_values_untrimmed():
    assert parse_args_file(" unique_id =x \n\tk=\tv") == {" unique_id ": "x ", "\tk": "\tv"}


def test_parse_splits_on_newlines_only():
    # Other line separators (str.splitlines would split on them) are part of the value.
    assert parse_args_file("a=1\x0bb=2\u2028c=3\x1cd=4") == {"a": "1\x0bb=2\u2028c=3\x1cd=4"}


def test_parse_empty():
    assert parse_args_file("") == {}


# -- check_args --------------------------------------------------------------------------------


def test_check_defaults_runner_count_to_one():
    assert check(good_args()) == (IMAGE, 1)


@pytest.mark.parametrize(("raw", "count"), [("0", 0), ("1", 1), ("3", 3), ("007", 7)])
def test_check_reads_runner_count(raw: str, count: int):
    assert check(good_args(self_hosted_runner_count=raw)) == (IMAGE, count)


def test_check_ignores_other_keys():
    assert check(good_args(extra="x", github_hosted_runner_label="ubuntu-22.04")) == (IMAGE, 1)


def test_check_allows_any_image_name():
    # The profile key is not checked here; the take finds no idle runner of an unknown profile.
    assert check(good_args(self_hosted_image_name="")) == ("", 1)


def test_check_accepts_self_hosted_profile_as_the_image_name():
    args = good_args()
    del args["self_hosted_image_name"]

    assert check({**args, "self_hosted_profile": "servo-macos15"}) == ("servo-macos15", 1)
    assert check(good_args(self_hosted_profile=IMAGE)) == (IMAGE, 1)


def test_check_refuses_two_names_for_two_profiles():
    with pytest.raises(MonitorError) as excinfo:
        check(good_args(self_hosted_profile="servo-macos15"))
    assert refused(excinfo) == "self_hosted_image_name and self_hosted_profile disagree in artifact"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("unique_id", "0b5e3c1e-0000-0000-0000-000000000000", "Wrong unique_id in artifact"),
        ("unique_id", UID + " ", "Wrong unique_id in artifact"),
        ("qualified_repo", "servo/other", "Wrong qualified_repo in artifact"),
        ("qualified_repo", "Servo/servo", "Wrong qualified_repo in artifact"),
        ("run_id", "14000000124", "Wrong run_id in artifact"),
        ("run_id", RUN + "\r", "Wrong run_id in artifact"),
    ],
)
def test_check_mismatch(key: str, value: str, message: str):
    with pytest.raises(MonitorError) as excinfo:
        check(good_args(**{key: value}))
    assert refused(excinfo) == message


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("unique_id", "Wrong unique_id in artifact"),
        ("qualified_repo", "Wrong qualified_repo in artifact"),
        ("run_id", "Wrong run_id in artifact"),
        ("self_hosted_image_name", "Missing self_hosted_image_name in artifact"),
    ],
)
def test_check_missing_key(key: str, message: str):
    args = good_args()
    del args[key]
    with pytest.raises(MonitorError) as excinfo:
        check(args)
    assert refused(excinfo) == message


def test_check_reports_the_first_failure_in_upstream_order():
    args = {"unique_id": "x", "qualified_repo": "y", "run_id": "z"}
    with pytest.raises(MonitorError, match="^Wrong unique_id in artifact$"):
        check(args)
    args["unique_id"] = UID
    with pytest.raises(MonitorError, match="^Wrong qualified_repo in artifact$"):
        check(args)
    args["qualified_repo"] = REPO
    with pytest.raises(MonitorError, match="^Wrong run_id in artifact$"):
        check(args)
    args["run_id"] = RUN
    with pytest.raises(MonitorError, match="^Missing self_hosted_image_name in artifact$"):
        check(args)
    args["self_hosted_image_name"] = IMAGE
    assert check(args) == (IMAGE, 1)


@pytest.mark.parametrize(
    "raw",
    ["-1", "x", "", " 1", "1 ", "1.0", "1e3", "0x10", "1_000", "+-1", "\u0661", "\uff11", "2" * 25]
    + [str(2**64)],
)
def test_check_bad_runner_count(raw: str):
    with pytest.raises(MonitorError) as excinfo:
        check(good_args(self_hosted_runner_count=raw))
    assert refused(excinfo).startswith("Bad self_hosted_runner_count in artifact: ")
    assert repr(raw)[:40] in refused(excinfo)


def test_check_largest_runner_count():
    assert check(good_args(self_hosted_runner_count=str(2**64 - 1))) == (IMAGE, 2**64 - 1)


# -- validate_select against the stand-in ------------------------------------------------------

server, standin = standin_fixtures(TOKEN)


@pytest.fixture
def github(standin: GitHubStandIn) -> RestGitHub:
    return RestGitHub(standin.base_url, "/repos/servo/servo", TOKEN, timeout=5.0)


def upload(
    standin: GitHubStandIn,
    text: str | bytes | None = None,
    *,
    name: str = NAME,
    run_id: str = RUN,
    repo: str = REPO,
    age: timedelta = timedelta(seconds=10),
    expired: bool = False,
    files: dict[str, str | bytes] | None = None,
) -> int:
    if files is None:
        files = {"args": args_text() if text is None else text}
    return standin.add_artifact(repo, run_id, name, files, created_at=NOW - age, expired=expired)


def select(github, **overrides) -> tuple[str, int]:
    kwargs = {
        "allowed_prefix": "servo/",
        "max_age": MAX_AGE,
        "unique_id": UID,
        "qualified_repo": REPO,
        "run_id": RUN,
        "now": NOW,
    }
    kwargs.update(overrides)
    return validate_select(github, **kwargs)


def refusal(github, **overrides) -> str:
    with pytest.raises(MonitorError) as excinfo:
        select(github, **overrides)
    return refused(excinfo)


def list_requests(standin: GitHubStandIn) -> list[str]:
    return [r.path for r in standin.requests if r.path.endswith("/artifacts")]


def test_select_without_runner_count(standin: GitHubStandIn, github: RestGitHub):
    upload(standin)
    assert select(github) == (IMAGE, 1)
    paths = [r.path for r in standin.requests]
    assert f"/repos/{REPO}/actions/runs/{RUN}/artifacts" in paths
    assert any(path.startswith("/_blob/") for path in paths)


def test_select_with_runner_count(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, args_text(image="servo-windows10", count="3"))
    assert select(github) == ("servo-windows10", 3)


def test_select_with_crlf_args_file(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, args_text(count="2").replace("\n", "\r\n"))
    assert select(github) == (IMAGE, 2)


@pytest.mark.parametrize(
    ("prefix", "qualified_repo"),
    [
        ("servo/", "evil/servo"),
        ("servo/", "servo"),
        ("servo/", "servoevil/servo"),
        ("Servo/", "servo/servo"),
        (None, REPO),
        ("servo/", "servo/../evil/servo"),
        ("servo/", "servo/.."),
        ("servo/", "servo/servo?x=1"),
        ("servo/", "servo/servo/actions"),
    ],
)
def test_select_wrong_prefix(standin: GitHubStandIn, github, prefix, qualified_repo):
    upload(standin, repo=qualified_repo if _plain(qualified_repo) else REPO)
    message = refusal(github, allowed_prefix=prefix, qualified_repo=qualified_repo)
    assert message == "Not allowed on this qualified_repo"
    assert standin.requests == []


def _plain(qualified_repo: str) -> bool:
    owner, _, repo = qualified_repo.partition("/")
    return bool(owner) and bool(repo) and "/" not in repo


def test_select_prefix_match_is_exact_prefix(standin: GitHubStandIn, github: RestGitHub):
    upload(standin)
    assert select(github, allowed_prefix="servo/servo") == (IMAGE, 1)
    assert select(github, allowed_prefix="") == (IMAGE, 1)


def test_select_artifact_missing(standin: GitHubStandIn, github: RestGitHub):
    assert refusal(github) == f"No args artifact found: {NAME}"
    assert list_requests(standin) == [f"/repos/{REPO}/actions/runs/{RUN}/artifacts"]


def test_select_run_id_not_digits(standin: GitHubStandIn, github: RestGitHub):
    for run_id in ("", "12a", "-1", "1/../2", "\u0661"):
        assert refusal(github, run_id=run_id) == f"No args artifact found: {NAME}"
    assert standin.requests == []


def test_select_other_artifacts_are_not_ours(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, name="servo-ci-runners_0b5e3c1e-0000-0000-0000-000000000000")
    upload(standin, name=NAME + "x")
    upload(standin, name=NAME.upper())
    upload(standin, name="x" + NAME)
    upload(standin, name=UID)
    upload(standin, name="servo-ci-runners")
    upload(standin, run_id="14000000124")  # ours, but on another run
    upload(standin, repo="servo/other")  # ours, but in another repository
    assert refusal(github) == f"No args artifact found: {NAME}"


def test_select_finds_ours_among_others(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, name="servo-ci-runners_0b5e3c1e-0000-0000-0000-000000000000")
    upload(standin, name="build-logs", files={"log.txt": "nothing"})
    upload(standin, args_text(count="2"))
    upload(standin, name=NAME + "x", files={"args": "junk"})
    assert select(github) == (IMAGE, 2)


def test_select_asks_github_by_name_in_one_call(standin: GitHubStandIn, github: RestGitHub):
    # Unfiltered, ours would be on page 2 of 2 (the stand-in lists newest first).
    upload(standin, args_text(count="4"), age=timedelta(seconds=200))
    for n in range(120):
        upload(standin, name=f"servo-ci-runners_other-{n}", age=timedelta(seconds=100 - n % 50))
    assert select(github) == (IMAGE, 4)
    assert list_requests(standin) == [f"/repos/{REPO}/actions/runs/{RUN}/artifacts"]


def test_select_reads_one_page_of_same_named_artifacts(standin: GitHubStandIn, github):
    # Whoever uploads many artifacts of our name gets one list call, not a page each.
    for n in range(150):
        upload(standin, args_text(count="9"), age=timedelta(seconds=100 + n), expired=True)
    assert refusal(github) == f"No args artifact found: {NAME}"
    assert len(list_requests(standin)) == 1


def test_select_too_old(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, age=timedelta(seconds=301))
    assert refusal(github) == f"Args artifact is too old (301s): {NAME}"
    assert not any(r.path.startswith("/_blob/") for r in standin.requests)


def test_select_too_old_reports_whole_seconds(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, age=timedelta(seconds=3600))
    now = NOW + timedelta(milliseconds=999)
    assert refusal(github, now=now) == f"Args artifact is too old (3600s): {NAME}"


def test_select_age_limit_is_inclusive(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, age=timedelta(seconds=300))
    assert select(github) == (IMAGE, 1)
    assert refusal(github, max_age=timedelta(seconds=299)).startswith(
        "Args artifact is too old (300s): "
    )


def test_select_created_in_the_future(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, age=-timedelta(seconds=61))
    assert refusal(github) == f"Args artifact is from the future (61s ahead): {NAME}"


def test_select_tolerates_small_clock_skew(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, age=-timedelta(seconds=60))
    assert select(github) == (IMAGE, 1)


def test_select_expired_counts_as_missing(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, expired=True)
    assert refusal(github) == f"No args artifact found: {NAME}"
    assert not any("/zip" in r.path or "/_blob/" in r.path for r in standin.requests)


def test_select_skips_an_expired_duplicate(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, args_text(count="2"), age=timedelta(seconds=20))
    upload(standin, args_text(count="9"), age=timedelta(seconds=5), expired=True)
    assert select(github) == (IMAGE, 2)


def test_select_takes_the_first_listed_duplicate(standin: GitHubStandIn, github: RestGitHub):
    # GitHub lists newest first; the first one named exactly ours is used.
    upload(standin, args_text(count="2"), age=timedelta(seconds=20))
    upload(standin, args_text(count="5"), age=timedelta(seconds=5))
    assert select(github) == (IMAGE, 5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"unique_id": "0b5e3c1e-0000-0000-0000-000000000000"}, "Wrong unique_id in artifact"),
        ({"qualified_repo": "servo/other"}, "Wrong qualified_repo in artifact"),
        ({"run_id": "14000000124"}, "Wrong run_id in artifact"),
        ({"image": None}, "Missing self_hosted_image_name in artifact"),
    ],
)
def test_select_mismatched_args(standin: GitHubStandIn, github, changes, message):
    upload(standin, args_text(**changes))
    assert refusal(github) == message


def test_select_bad_runner_count(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, args_text(count="-1"))
    assert refusal(github) == "Bad self_hosted_runner_count in artifact: '-1'"


def test_select_reads_the_first_file(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, files={"args": args_text(count="2"), "zz": args_text(count="7")})
    assert select(github) == (IMAGE, 2)
    standin.reset()
    upload(standin, files={"zz": args_text(run_id="1"), "args": args_text()})
    assert refusal(github) == "Wrong run_id in artifact"


def test_select_empty_zip(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, files={})
    assert refusal(github) == "Unreadable args artifact: the archive has no files"


def test_select_args_not_utf8(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, args_text().encode("utf-16"))
    assert refusal(github) == "Unreadable args artifact: 'args' is not UTF-8 text"


def test_select_args_file_too_large(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, args_text() + "padding=" + "x" * 70_000 + "\n")
    message = refusal(github)
    assert message == "Unreadable args artifact: 'args' is larger than 65536 bytes"


def test_select_list_failure_propagates(standin: GitHubStandIn, github: RestGitHub):
    upload(standin)
    standin.inject_fault(503, path_contains="/artifacts")
    with pytest.raises(TransientError):
        select(github)
    standin.inject_fault(404, path_contains="/artifacts")
    with pytest.raises(MonitorError) as excinfo:
        select(github)
    assert excinfo.value.status == 502
    assert select(github) == (IMAGE, 1)


def test_select_download_failure_propagates(standin: GitHubStandIn, github: RestGitHub):
    upload(standin)
    standin.inject_fault(500, path_contains="/zip")
    with pytest.raises(TransientError):
        select(github)
    assert select(github) == (IMAGE, 1)


# -- archives the stand-in cannot serve (it always stores a well-formed zip) -------------------


class OneArtifactGitHub:
    """Just enough of the `GitHub` protocol to serve one artifact with arbitrary bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.artifact = Artifact(1, NAME, NOW, "https://api.example/zip", False)

    def list_artifacts(
        self, qualified_repo: str, run_id: str, *, name: str | None = None
    ) -> list[Artifact]:
        return [self.artifact]

    def download_artifact(self, url: str) -> bytes:
        assert url == self.artifact.archive_download_url
        return self.data


def zipped(files: dict[str, bytes], **kwargs) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", **kwargs) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_fake_serves_a_good_artifact():
    assert select(OneArtifactGitHub(zipped({"args": args_text().encode()}))) == (IMAGE, 1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a zip at all",
        b'{"message": "Not Found"}',
        zipped({"args": args_text().encode()})[:40],  # truncated
    ],
)
def test_select_not_a_zip(data: bytes):
    message = refusal(OneArtifactGitHub(data))
    assert message.startswith("Unreadable args artifact: not a valid zip archive (")


def test_select_corrupt_zip_member():
    good = zipped({"args": args_text().encode()}, compression=zipfile.ZIP_DEFLATED)
    start = good.index(b"PK\x03\x04") + 30 + len(b"args")
    corrupt = good[:start] + bytes(b ^ 0xFF for b in good[start : start + 8]) + good[start + 8 :]
    message = refusal(OneArtifactGitHub(corrupt))
    assert message.startswith("Unreadable args artifact: not a valid zip archive (")


def test_select_skips_directory_entries():
    data = zipped({"dir/": b"", "dir/args": args_text(count="2").encode()})
    assert select(OneArtifactGitHub(data)) == (IMAGE, 2)


def test_select_refuses_a_zip_bomb_without_inflating_it():
    data = zipped({"args": b"a" * 50_000_000}, compression=zipfile.ZIP_DEFLATED)
    assert len(data) < 100_000
    message = refusal(OneArtifactGitHub(data))
    assert message == "Unreadable args artifact: 'args' is larger than 65536 bytes"


def patched(data: bytes, signature: bytes, offset: int, fmt: str, value: int) -> bytes:
    """`data` with a field of every zip header with `signature` overwritten."""
    out = bytearray(data)
    start = out.find(signature)
    while start != -1:
        struct.pack_into(fmt, out, start + offset, value)
        start = out.find(signature, start + 1)
    return bytes(out)


def _streamed(uncompressed: int, compression: int) -> bytes:
    """A zip of one member `args` holding `uncompressed` zero bytes, written in chunks (the
    test itself must not hold 100 MB at once)."""
    buffer = io.BytesIO()
    entry = zipfile.ZipInfo("args")
    entry.compress_type = compression
    with zipfile.ZipFile(buffer, "w") as archive:
        with archive.open(entry, "w") as member:
            chunk = bytes(1 << 20)
            for start in range(0, uncompressed, len(chunk)):
                member.write(chunk[: uncompressed - start])
    return buffer.getvalue()


def _claiming(data: bytes, size: int) -> bytes:
    """`data` with every header of its single member claiming `size` bytes uncompressed."""
    data = patched(data, b"PK\x01\x02", 24, "<I", size)  # central directory
    return patched(data, b"PK\x03\x04", 22, "<I", size)  # local header


BOMBS = {
    # Over the args file's limit even compressed (deflate tops out at ~1:1000).
    "deflate 100 MB": (100_000_000, zipfile.ZIP_DEFLATED),
    # Within the limit compressed (58 KB): only a bounded read stops it.
    "deflate 60 MB": (60_000_000, zipfile.ZIP_DEFLATED),
    "bzip2 100 MB": (100_000_000, zipfile.ZIP_BZIP2),
    "lzma 20 MB": (20_000_000, zipfile.ZIP_LZMA),
}


@pytest.fixture(scope="module", params=list(BOMBS))
def bomb(request: pytest.FixtureRequest) -> bytes:
    uncompressed, compression = BOMBS[request.param]
    return _claiming(_streamed(uncompressed, compression), 10)


def test_select_refuses_a_member_that_claims_10_bytes_without_inflating_it(bomb: bytes):
    github = OneArtifactGitHub(bomb)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        with pytest.raises(MonitorError) as excinfo:
            select(github)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    message = refused(excinfo)
    print(f"\npeak {peak / 1024:.0f} KiB above baseline for a {len(bomb)}-byte zip: {message}")
    assert message.startswith("Unreadable args artifact: ")
    assert peak < 1 << 20


def test_select_member_larger_than_it_claims():
    # Both headers claim 10 bytes; the member inflates to far more and fails its CRC.
    data = zipped({"args": args_text().encode() * 1000}, compression=zipfile.ZIP_DEFLATED)
    data = patched(data, b"PK\x01\x02", 24, "<I", 10)
    data = patched(data, b"PK\x03\x04", 22, "<I", 10)
    message = refusal(OneArtifactGitHub(data))
    assert message.startswith("Unreadable args artifact: not a valid zip archive (BadZipFile")


def test_select_unsupported_compression():
    data = zipped({"args": args_text().encode()}, compression=zipfile.ZIP_DEFLATED)
    data = patched(data, b"PK\x01\x02", 10, "<H", 99)
    data = patched(data, b"PK\x03\x04", 8, "<H", 99)
    message = refusal(OneArtifactGitHub(data))
    assert message == (
        "Unreadable args artifact: 'args' uses compression method 99 "
        "(only stored and deflated files are read)"
    )


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_select_refuses_methods_whose_output_zipfile_does_not_bound(compression: int):
    data = zipped({"args": args_text().encode()}, compression=compression)
    assert "only stored and deflated files are read" in refusal(OneArtifactGitHub(data))


def test_select_reads_a_stored_member():
    data = zipped({"args": args_text(count="3").encode()}, compression=zipfile.ZIP_STORED)
    assert select(OneArtifactGitHub(data)) == (IMAGE, 3)


def test_select_refuses_a_member_whose_compressed_size_is_over_the_limit():
    # Claims a small file, but its compressed data alone is past what an args file can be.
    data = zipped({"args": os.urandom(70_000)}, compression=zipfile.ZIP_DEFLATED)
    data = _claiming(data, 100)
    assert refusal(OneArtifactGitHub(data)) == (
        "Unreadable args artifact: 'args' is larger than 65536 bytes"
    )


def test_select_bounds_the_file_name_in_messages():
    data = zipped({"é" * 500: b"\xff"})
    message = refusal(OneArtifactGitHub(data))
    assert message == f"Unreadable args artifact: {'é' * 100!r} is not UTF-8 text"


# -- TokenlessValidator: the limits for callers without credentials ----------------------------


def validator(github, *, calls_per_hour: int = 1000) -> TokenlessValidator:
    return TokenlessValidator(
        github, allowed_prefix="servo/", max_age=MAX_AGE, calls_per_hour=calls_per_hour
    )


def validate(checker: TokenlessValidator, now: datetime = NOW, **overrides) -> tuple[str, int]:
    kwargs = {"unique_id": UID, "qualified_repo": REPO, "run_id": RUN, "now": now, **overrides}
    return checker.validate(**kwargs)


def api_requests(standin: GitHubStandIn) -> list[str]:
    """The calls that count against GitHub's rate limit (not the blob downloads)."""
    return [r.path for r in standin.requests if r.path.startswith("/repos/")]


def test_validator_costs_two_calls_for_a_select(standin: GitHubStandIn, github: RestGitHub):
    upload(standin, args_text(count="2"))
    checker = validator(github)
    assert validate(checker) == (IMAGE, 2)
    assert len(api_requests(standin)) == 2
    assert checker.budget.spent(NOW.timestamp()) == 2


def test_validator_remembers_a_refusal_for_a_minute(standin: GitHubStandIn, github: RestGitHub):
    checker = validator(github)
    first = refusal_of(checker)
    assert first == f"No args artifact found: {NAME}"
    assert checker.budget.spent(NOW.timestamp()) == 1  # the download it never needed
    upload(standin)  # too late for the next minute: the refusal is remembered
    for seconds in (1, 30, 59):
        assert refusal_of(checker, NOW + timedelta(seconds=seconds)) == first
    assert len(api_requests(standin)) == 1
    # Another request is not refused by it; the same one a minute later asks again.
    assert refusal_of(checker, run_id="14000000124") == f"No args artifact found: {NAME}"
    assert validate(checker, NOW + timedelta(seconds=60)) == (IMAGE, 1)


def test_validator_does_not_remember_github_failures(standin: GitHubStandIn, github):
    upload(standin)
    checker = validator(github)
    standin.inject_fault(503, path_contains="/artifacts")
    with pytest.raises(TransientError):
        validate(checker)
    assert validate(checker) == (IMAGE, 1)


def test_validator_refuses_outside_the_prefix_for_free(standin: GitHubStandIn, github):
    checker = validator(github, calls_per_hour=2)
    for repo in ("evil/servo", "servo", "servo/" + "x" * 101):
        assert refusal_of(checker, qualified_repo=repo) == "Not allowed on this qualified_repo"
    assert standin.requests == [] and checker.budget.spent(NOW.timestamp()) == 0


def test_validator_budget_is_shared_by_every_repository(standin: GitHubStandIn, github):
    checker = validator(github, calls_per_hour=3)  # one refusal costs 1, a select 2
    upload(standin)
    refusal_of(checker, qualified_repo="servo/made-up")
    assert validate(checker) == (IMAGE, 1)
    with pytest.raises(MonitorError) as excinfo:
        validate(checker, qualified_repo="servo/another", now=NOW + timedelta(minutes=10))
    error = excinfo.value
    assert error.status == 429 and error.headers == {"Retry-After": "3000"}
    assert error.message == (
        "Too many tokenless requests: this monitor's GitHub budget for them (3 calls an hour) "
        "is spent; try again in 3000 s"
    )
    assert len(api_requests(standin)) == 3
    # An hour after the first calls, the budget has room again.
    later = NOW + timedelta(hours=1)
    assert refusal_of(checker, later, run_id="14000000999").startswith("No args artifact")
    assert len(api_requests(standin)) == 4


def refusal_of(checker: TokenlessValidator, now: datetime = NOW, **overrides) -> str:
    with pytest.raises(MonitorError) as excinfo:
        validate(checker, now, **overrides)
    return refused(excinfo)


def test_500_made_up_repositories_cost_at_most_the_budget_at_the_standin(
    standin: GitHubStandIn, tmp_path, store
):
    """Each name under the prefix is a fresh per-repository window, and (before the budget)
    cost a GitHub call each; now they share the budget, and the rest are 429s."""
    budget = 50
    path = write_config(
        tmp_path,
        github_api_url=standin.base_url,
        extra=f"tokenless_github_calls_per_hour = {budget}\n",  # the prefix is "test/"
    )
    loaded = config.load(path, environ={})
    github = RestGitHub(standin.base_url, loaded.github_api_scope, TOKEN, timeout=5.0)
    client = webtest.TestApp(web.make_app(loaded, loop.Monitor(loaded, github, FakeHypervisor())))

    statuses: Counter[int] = Counter()
    for n in range(500):
        query = f"unique_id={uuid.uuid4()}&qualified_repo=test/made-up-{n}&run_id={RUN}"
        response = client.post(f"/select-runner?{query}", status="*")
        statuses[response.status_int] += 1
        if response.status_int == 429:
            assert 1 <= int(response.headers["Retry-After"]) <= 3600
            assert "GitHub budget" in response.json["error"]
    calls = len(api_requests(standin))
    print(f"\n500 selects for 500 made-up repositories: {calls} GitHub calls, {dict(statuses)}")
    assert calls <= budget
    # Each refusal cost one call; a validation starts only with two calls left in the budget.
    assert statuses[403] == calls >= budget - 1
    assert statuses[429] == 500 - calls
