"""BootLogStore on a real directory: appending, the size cap, and which logs are kept."""

from __future__ import annotations

import pytest

from monitor.bootlog import BootLogStore
from monitor.errors import MonitorError


def test_chunks_are_appended_in_order(tmp_path):
    store = BootLogStore(tmp_path)
    assert not store.exists(7) and store.generation == 0
    assert store.append(7, b"one\n") == 4
    assert store.append(7, b"") == 4  # nothing to add: no change
    assert store.append(7, b"two\n") == 8
    assert store.read(7) == b"one\ntwo\n"
    assert store.path(7) == tmp_path / "runners" / "7" / "boot.log"
    # Only a new log changes what the dashboard shows.
    assert store.exists(7) and store.generation == 1


def test_a_chunk_past_the_cap_is_refused_whole(tmp_path):
    store = BootLogStore(tmp_path, max_bytes=10)
    store.append(1, b"123456")
    with pytest.raises(MonitorError) as refused:
        store.append(1, b"12345")
    assert refused.value.status == 413
    assert store.read(1) == b"123456"
    assert store.append(1, b"1234") == 10


def test_a_runner_without_a_log_is_404(tmp_path):
    with pytest.raises(MonitorError) as missing:
        BootLogStore(tmp_path).read(3)
    assert missing.value.status == 404


def test_only_the_newest_runners_logs_are_kept(tmp_path):
    store = BootLogStore(tmp_path, keep=2)
    # Runner 1's directory also holds its screenshot: only the log goes.
    screenshot = tmp_path / "runners" / "1" / "screenshot.png"
    screenshot.parent.mkdir(parents=True)
    screenshot.write_bytes(b"png")
    for runner_id in (1, 2, 10):
        store.append(runner_id, b"booting\n")

    assert [store.exists(n) for n in (1, 2, 10)] == [False, True, True]
    assert screenshot.exists()
    store.append(11, b"booting\n")
    assert not (tmp_path / "runners" / "2").exists()  # nothing else there: removed
    assert sorted(p.parent.name for p in tmp_path.glob("runners/*/boot.log")) == ["10", "11"]
