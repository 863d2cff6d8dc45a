"""Runner guests' boot logs on disk: what a guest's console printed, uploaded in chunks.

A guest sends `POST /boot-log` with the text its console printed since its last upload (the
monitor knows the guest by its address, as for `/boot`). `BootLogStore` appends each chunk to
`<root>/runners/<id>/boot.log`, up to `max_bytes` per runner: a chunk that would go past it is
refused whole (413), so a log is never cut in the middle of a chunk.

The log matters most after its guest is gone (one that never came up), so it outlives the
runner; the logs of the newest `keep` runners are kept, and older ones are deleted when a new
one starts. Nothing else in a runner's directory (the screenshots) is touched.

Thread-safe: waitress serves a guest's uploads on any of its threads. Imports only `errors`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from monitor.errors import MonitorError

log = logging.getLogger(__name__)

BOOT_LOG_NAME = "boot.log"
# A console log of a full boot is tens of KB; 1 MiB leaves room for a chatty one.
MAX_BYTES = 1024 * 1024
# Logs of this many runners (the newest ids) are kept.
KEEP = 200


class BootLogStore:
    """Boot logs of runner guests under `<root>/runners/<id>/boot.log`.

    `generation` goes up whenever a runner's log appears or is deleted: the dashboard, which
    links to the logs that exist, needs rendering again only then.
    """

    def __init__(self, root: Path, *, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.keep = keep
        self.generation = 0
        self._lock = threading.Lock()

    def path(self, runner_id: int) -> Path:
        """The boot log of runner `runner_id`; it may not exist."""
        return self.root / "runners" / str(runner_id) / BOOT_LOG_NAME

    def exists(self, runner_id: int) -> bool:
        """Whether runner `runner_id` has uploaded any of its boot log."""
        return self.path(runner_id).is_file()

    def append(self, runner_id: int, chunk: bytes) -> int:
        """Append `chunk` to the runner's boot log; return the log's size in bytes.

        `MonitorError` 413 if the log would grow past `max_bytes` (nothing is written), 503
        if the file cannot be written.
        """
        path = self.path(runner_id)
        with self._lock:
            try:
                size: int | None = path.stat().st_size
            except FileNotFoundError:
                size = None
            except OSError as error:
                raise _unusable(runner_id, error) from error
            total = (size or 0) + len(chunk)
            if total > self.max_bytes:
                raise MonitorError(
                    f"boot log of runner {runner_id} would exceed {self.max_bytes} bytes "
                    f"({size or 0} stored, {len(chunk)} more sent)",
                    413,
                )
            if not chunk:
                return total
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "ab") as file:
                    file.write(chunk)
            except OSError as error:
                raise _unusable(runner_id, error) from error
            if size is None:
                self.generation += 1
                self._prune()
        return total

    def read(self, runner_id: int) -> bytes:
        """The runner's boot log; `MonitorError` 404 if it has none."""
        try:
            return self.path(runner_id).read_bytes()
        except FileNotFoundError:
            raise MonitorError(f"runner {runner_id} has no boot log", 404) from None
        except OSError as error:
            raise _unusable(runner_id, error) from error

    def _prune(self) -> None:
        """Delete the logs of all but the newest `keep` runners (lock held). Runner ids are
        never reused, so their order is their age."""
        runners = self.root / "runners"
        try:
            ids = sorted(int(entry.name) for entry in os.scandir(runners) if entry.name.isdigit())
        except OSError:
            return
        with_log = [runner_id for runner_id in ids if self.exists(runner_id)]
        for runner_id in with_log[: max(0, len(with_log) - self.keep)]:
            try:
                self.path(runner_id).unlink()
                self.generation += 1
            except OSError as error:
                log.warning("cannot delete the boot log of runner %d: %s", runner_id, error)
                continue
            try:
                self.path(runner_id).parent.rmdir()
            except OSError:
                pass  # The screenshots still live there (or it is gone already).


def _unusable(runner_id: int, error: OSError) -> MonitorError:
    return MonitorError(
        f"cannot store the boot log of runner {runner_id}: {error.strerror or error}", 503
    )
