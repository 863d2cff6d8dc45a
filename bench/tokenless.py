"""The tokenless `/select-runner` under attack: what each abuse costs the monitor.

1. Zip bombs: the peak memory (tracemalloc, above the baseline) of checking an args artifact
   whose single member claims 10 bytes and holds far more (deflate, bzip2, lzma).
2. GitHub budget: `--repos` selects, each naming another made-up repository under the prefix,
   through the monitor's app (WebTest) and `RestGitHub` against the GitHub stand-in: the
   calls counted at the stand-in, against `--budget` (`tokenless_github_calls_per_hour`).
3. Memory: `--junk` selects with long, distinct repository names (half over GitHub's length
   limit and outside the prefix, half the longest names under it): the process' RSS growth
   and the sizes of the rate-limit tables.

Pass: every bomb refused with a peak under 1 MiB; calls <= budget; RSS growth under 20 MiB.
Exits 1 otherwise.

    .venv/bin/python -m bench.tokenless [--repos 2000 --budget 1000 --junk 20000]
"""

from __future__ import annotations

import argparse
import collections
import gc
import io
import os
import struct
import sys
import tempfile
import time
import tracemalloc
import uuid
import zipfile
from datetime import UTC
from datetime import datetime
from pathlib import Path

import webtest

from monitor import config as config_module
from monitor import loop
from monitor import models
from monitor import tokenless
from monitor import web
from monitor.errors import MonitorError
from monitor.github import Artifact
from monitor.github import RestGitHub
from monitor.standin import GitHubStandIn
from tests.fakes import FakeHypervisor
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN

UID = "0b5e3c1e-4f5a-4b8e-9d63-2a1f0c7e9b11"
BOMBS = {
    "deflate 100 MB": (100_000_000, zipfile.ZIP_DEFLATED),
    "deflate 60 MB (58 KB zipped)": (60_000_000, zipfile.ZIP_DEFLATED),
    "bzip2 100 MB": (100_000_000, zipfile.ZIP_BZIP2),
    "lzma 20 MB": (20_000_000, zipfile.ZIP_LZMA),
}
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=int, default=2000, help="made-up repositories")
    parser.add_argument("--budget", type=int, default=1000, help="GitHub calls an hour")
    parser.add_argument("--junk", type=int, default=20_000, help="junk selects")
    return parser.parse_args()


# 1. Zip bombs --------------------------------------------------------------------------------


class _OneArtifact:
    """Serves one artifact whose bytes are `data` (the bomb never crosses HTTP here)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def download_artifact(self, url: str) -> bytes:
        return self.data


def _bomb(uncompressed: int, compression: int) -> bytes:
    buffer = io.BytesIO()
    entry = zipfile.ZipInfo("args")
    entry.compress_type = compression
    with zipfile.ZipFile(buffer, "w") as archive, archive.open(entry, "w") as member:
        chunk = bytes(MIB)
        for start in range(0, uncompressed, len(chunk)):
            member.write(chunk[: uncompressed - start])
    data = bytearray(buffer.getvalue())
    # Every header claims 10 bytes uncompressed.
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = data.find(signature)
        while at != -1:
            struct.pack_into("<I", data, at + offset, 10)
            at = data.find(signature, at + 1)
    return bytes(data)


def bombs() -> bool:
    print("1. zip bombs (one member claiming 10 bytes)")
    passed = True
    artifact = Artifact(1, f"servo-ci-runners_{UID}", datetime.now(UTC), "https://x/zip", False)
    for name, (size, compression) in BOMBS.items():
        github = _OneArtifact(_bomb(size, compression))
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        try:
            tokenless.read_args(
                github,  # type: ignore[arg-type]
                artifact,
                unique_id=UID,
                qualified_repo="servo/servo",
                run_id="1",
            )
            outcome = "ACCEPTED"
        except MonitorError as error:
            outcome = error.message
        peak = tracemalloc.get_traced_memory()[1] - baseline
        tracemalloc.stop()
        ok = peak < MIB and outcome != "ACCEPTED"
        passed &= ok
        print(
            f"   {name:30} {len(github.data):>7} B zipped: peak {peak / 1024:7.0f} KiB  {outcome}"
        )
    return passed


# 2./3. Through the app --------------------------------------------------------------------------


def app(root: Path, standin: GitHubStandIn, budget: int) -> webtest.TestApp:
    path = write_config(
        root,
        github_api_url=standin.base_url,
        extra=f"tokenless_github_calls_per_hour = {budget}\n",  # the prefix is "test/"
    )
    config = config_module.load(path, environ={})
    models.open_store(config.data_path)
    github = RestGitHub(standin.base_url, config.github_api_scope, config.github_token)
    monitor = loop.Monitor(config, github, FakeHypervisor())
    return webtest.TestApp(web.make_app(config, monitor))


def made_up_repositories(
    client: webtest.TestApp, standin: GitHubStandIn, args: argparse.Namespace
) -> bool:
    print(f"2. {args.repos} selects naming {args.repos} made-up repositories, budget {args.budget}")
    statuses: collections.Counter[int] = collections.Counter()
    started = time.monotonic()
    for n in range(args.repos):
        query = f"unique_id={uuid.uuid4()}&qualified_repo=test/made-up-{n}&run_id=1"
        statuses[client.post(f"/select-runner?{query}", status="*").status_int] += 1
    calls = sum(1 for r in standin.requests if r.path.startswith("/repos/"))
    print(f"   GitHub calls at the stand-in: {calls} (budget {args.budget})")
    print(f"   answers: {dict(sorted(statuses.items()))} in {time.monotonic() - started:.1f} s")
    return calls <= args.budget


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def junk(client: webtest.TestApp, args: argparse.Namespace) -> bool:
    print(f"3. {args.junk} selects with junk repository names")
    statuses: collections.Counter[int] = collections.Counter()
    before = _rss()
    for n in range(args.junk):
        if n % 2:
            repo = f"junk-{n}-" + "x" * 4096 + "/servo"
        else:
            repo = f"test/{n:06d}" + "y" * 94
        url = f"/select-runner?unique_id={UID}&qualified_repo={repo}&run_id=1"
        statuses[client.post(url, status="*").status_int] += 1
    grown = _rss() - before
    print(f"   RSS grew {grown / MIB:.1f} MiB (limit 20 MiB)")
    print(f"   answers: {dict(sorted(statuses.items()))}")
    return grown < 20 * MIB


def main() -> int:
    args = parse_args()
    results = [bombs()]
    standin = GitHubStandIn(token=GITHUB_TOKEN)
    standin.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tokenless-") as tmp:
            client = app(Path(tmp) / "repos", standin, args.budget)
            results.append(made_up_repositories(client, standin, args))
            models.close_store()
            client = app(Path(tmp) / "junk", standin, args.budget)
            results.append(junk(client, args))
            models.close_store()
    finally:
        standin.stop()
    print("PASS" if all(results) else "FAIL")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
