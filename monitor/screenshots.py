"""Runner guests' screenshots on disk: change detection, PNG conversion and thumbnails.

The screenshot job captures every runner guest's screen every few seconds, and most of the
time nothing on it has changed (a runner waiting for a job shows the same console). So the
store hashes the bytes exactly as the hypervisor produced them and decodes, converts and
thumbnails only when that hash differs from the last one it saved for the runner. The hashes
live in memory only: the first capture after a restart is encoded again, which costs one
encode per guest and needs no state file.

For runner `<id>` it owns two files under `<root>/runners/<id>/`: `screenshot.png` (the full
screen) and `thumbnail.png` (fits in `THUMBNAIL_SIZE`). Each is written to a temporary file in
the same directory and renamed over the old one, so the web layer, reading them from other
threads, never serves half a file. Nothing else in that directory is touched.

Thread-safe: the screenshot job and a "take one now" request may save the same runner at the
same time. Imports only `errors` and Pillow; the hypervisor is reached through the `capture`
function the caller passes in.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from monitor.errors import MonitorError

log = logging.getLogger(__name__)

SCREENSHOT_NAME = "screenshot.png"
THUMBNAIL_NAME = "thumbnail.png"
THUMBNAIL_SIZE = (320, 240)
VERSION_LENGTH = 10
# zlib level 1 for the full screen: on a 1024×768 text console (QEMU's PPM) it encodes in
# 18 ms instead of 30 ms (the default, 6) for a file 15 % larger (116 KB instead of 100 KB).
FULL_COMPRESS_LEVEL = 1
# Temporary files are hidden, and named so that `forget` can recognise ones a crash left.
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class PassResult:
    """What one screenshot pass did, how long it took, and the CPU time of the thread that
    ran it."""

    encoded: int = 0
    unchanged: int = 0
    failed: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0


class RecentCaptures:
    """"Take one now" for many callers at once: a capture less than `max_age` seconds old is
    served again, and each runner is captured by at most one caller at a time (the others
    wait for its picture). A capture costs a libvirt screenshot, a decode, an encode and a
    disk write, and the route asking for it is open to anyone who reaches the dashboard.

    Thread-safe; `clock` (seconds, monotonic) is injectable."""

    def __init__(self, max_age: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._runners: dict[int, _Recent] = {}

    def get(self, runner_id: int, capture: Callable[[], bytes]) -> bytes:
        """Runner `runner_id`'s picture from `capture()`, or one it returned less than
        `max_age` seconds ago. `capture`'s errors reach the caller, and nothing is kept."""
        with self._lock:
            self._prune()
            recent = self._runners.setdefault(runner_id, _Recent())
            recent.callers += 1
        try:
            with recent.capturing:
                if recent.png is not None and self._clock() - recent.taken < self.max_age:
                    return recent.png
                png = capture()
                recent.taken, recent.png = self._clock(), png
                return png
        finally:
            with self._lock:
                recent.callers -= 1

    def _prune(self) -> None:
        """Forget runners whose picture is stale and that no caller is using (ids of
        destroyed runners never come back). Under `_lock`."""
        now = self._clock()
        for runner_id, recent in list(self._runners.items()):
            if not recent.callers and (recent.png is None or now - recent.taken >= self.max_age):
                del self._runners[runner_id]


class _Recent:
    """One runner's last "take one now" picture, the lock held while taking one, and how
    many callers are after it (under `RecentCaptures._lock`)."""

    def __init__(self) -> None:
        self.capturing = threading.Lock()
        self.callers = 0
        self.taken = 0.0
        self.png: bytes | None = None


def to_png(image_data: bytes) -> bytes:
    """Return `image_data` (any format Pillow reads: QEMU gives PNG or PPM) as PNG bytes; a
    PNG as it is. Raises `MonitorError` (503) if it is not a readable image."""
    with _decode(image_data) as image:
        return image_data if image.format == "PNG" else _encode(image, FULL_COMPRESS_LEVEL)


class ScreenshotStore:
    """Screenshots and thumbnails of runner guests under `<root>/runners/<id>/`.

    Counters since the store was made: `encoded` and `unchanged` count saves, `failed` the
    saves and `refresh` captures that failed. `last_pass` is the `PassResult` of the latest
    `refresh` (None before the first).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.encoded = 0
        self.unchanged = 0
        self.failed = 0
        self.last_pass: PassResult | None = None
        # Goes up whenever any runner's files change: the dashboard re-renders only then.
        self.generation = 0
        self._lock = threading.Lock()
        # runner id -> hex digest of the raw screen last written for it.
        self._hashes: dict[int, str] = {}
        # Runner ids that may have files on disk; seeded from the disk by the first `forget`
        # (a restart forgets `_hashes`, but the files of runners destroyed meanwhile remain).
        self._on_disk: set[int] = set()
        self._scanned = False

    # Paths and versions (any thread) -------------------------------------------------------

    def directory(self, runner_id: int) -> Path:
        return self.root / "runners" / str(runner_id)

    def screenshot_path(self, runner_id: int) -> Path:
        """The full screenshot (PNG) of runner `runner_id`; it may not exist."""
        return self.directory(runner_id) / SCREENSHOT_NAME

    def thumbnail_path(self, runner_id: int) -> Path:
        """The thumbnail (PNG, within `THUMBNAIL_SIZE`) of runner `runner_id`; it may not
        exist."""
        return self.directory(runner_id) / THUMBNAIL_NAME

    def version(self, runner_id: int) -> str | None:
        """A short string that changes whenever the runner's screenshot does (for cache-busting
        URLs), or None when there is no screenshot.

        The first hex digits of the raw screen's hash; for a thumbnail written before a restart
        (no hash in memory yet), its modification time in hex, until the next capture.
        """
        # No lock: one dict read is atomic, and the old hash or the new one is right. The
        # dashboard asks for every runner on every render (24 % of the samples under load).
        digest = self._hashes.get(runner_id)
        if digest is not None:
            return digest[:VERSION_LENGTH]
        try:
            mtime = self.thumbnail_path(runner_id).stat().st_mtime_ns
        except OSError:
            return None
        return f"{mtime:x}"[-VERSION_LENGTH:]

    # Saving ------------------------------------------------------------------------------

    def save(self, runner_id: int, raw: bytes) -> bool:
        """Save runner `runner_id`'s screen `raw` (PNG, PPM or anything Pillow reads, as the
        hypervisor produced it). Return True if it was encoded and written, False if it is the
        screen last saved for this runner (nothing is decoded or written then).

        Raises `MonitorError` (503) if `raw` is not a readable image (the old files stay), or
        if the files cannot be written (each file is the old one or the new one, never a
        mixture; the screen is written again at the next save). Every outcome is counted.
        """
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            known = self._hashes.get(runner_id)
            if known == digest:
                self.unchanged += 1
                return False
        if known is None and self._saved_before(runner_id, raw):
            # After a restart nothing is in memory: a screen equal to the file already saved
            # (a PNG is stored as captured) is not encoded again. Measured by bench/scale.py:
            # the first pass after a restart re-encoded 100 unchanged screens in 1.5 s.
            with self._lock:
                self._hashes[runner_id] = digest
                self.unchanged += 1
            return False
        try:
            full, thumbnail = _render(raw)
            self._write(runner_id, digest, full, thumbnail)
        except MonitorError:
            with self._lock:
                self.failed += 1
            raise
        with self._lock:
            self.encoded += 1
        return True

    def _saved_before(self, runner_id: int, raw: bytes) -> bool:
        try:
            return (
                self.thumbnail_path(runner_id).is_file()
                and self.screenshot_path(runner_id).read_bytes() == raw
            )
        except OSError:
            return False

    def refresh(self, guests: Mapping[int, str], capture: Callable[[str], bytes]) -> PassResult:
        """One screenshot pass: for every `runner id -> guest name` in `guests`, `capture(name)`
        and `save` it; then `forget` every runner not in `guests`.

        A guest whose capture or save fails (`MonitorError`: not running, libvirt trouble, an
        unreadable image) is counted in `failed` and logged, and the pass goes on.
        """
        wall_started = time.perf_counter()
        # The CPU of this thread only: the scheduler runs other jobs on other threads at the
        # same time, and process time would charge them to this pass.
        cpu_started = time.thread_time()
        encoded = unchanged = failed = 0
        for runner_id, guest_name in guests.items():
            try:
                raw = capture(guest_name)
            except MonitorError as error:
                with self._lock:
                    self.failed += 1  # `save` counts its own failures, not the capture's
                failed += 1
                log.debug("no screenshot of %s: %s", guest_name, error)
                continue
            try:
                if self.save(runner_id, raw):
                    encoded += 1
                else:
                    unchanged += 1
            except MonitorError as error:
                failed += 1
                log.debug("cannot save the screenshot of %s: %s", guest_name, error)
        self.forget(guests.keys())
        result = PassResult(
            encoded,
            unchanged,
            failed,
            wall_seconds=time.perf_counter() - wall_started,
            cpu_seconds=time.thread_time() - cpu_started,
        )
        self.last_pass = result
        return result

    def forget(self, live_runner_ids: Iterable[int]) -> list[int]:
        """Drop every runner not in `live_runner_ids`: its hash, and its screenshot and
        thumbnail files (a destroyed guest's screen means nothing). Return their ids, sorted.

        Only this store's files go; the runner's directory is removed only if that leaves it
        empty (runner ids are never reused, so empty ones would pile up forever).
        """
        live = set(live_runner_ids)
        with self._lock:
            if not self._scanned:
                self._on_disk |= self._scan()
                self._scanned = True
            gone = sorted(self._on_disk - live)
            for runner_id in gone:
                self._on_disk.discard(runner_id)
                self._hashes.pop(runner_id, None)
            if gone:
                self.generation += 1
        for runner_id in gone:
            self._remove_files(runner_id)
        return gone

    # Internals ---------------------------------------------------------------------------

    def _write(self, runner_id: int, digest: str, full: bytes, thumbnail: bytes) -> None:
        """Write both files atomically and record `digest` as the runner's current screen."""
        directory = self.directory(runner_id)
        temporaries: list[str] = []
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in ((SCREENSHOT_NAME, full), (THUMBNAIL_NAME, thumbnail)):
                temporaries.append(_write_temporary(directory, name, data))
            # The renames and the hash change together: when the job and a "take one now"
            # save the same runner at once, the files and the hash end up from the same one.
            with self._lock:
                self._on_disk.add(runner_id)  # first: the first rename may be all that works
                os.replace(temporaries[0], directory / SCREENSHOT_NAME)
                os.replace(temporaries[1], directory / THUMBNAIL_NAME)
                self._hashes[runner_id] = digest
                self.generation += 1
        except OSError as error:
            raise MonitorError(
                f"cannot write the screenshot of runner {runner_id}: {error}", 503
            ) from error
        finally:
            for temporary in temporaries:
                _unlink_quietly(Path(temporary))  # only still there when a rename failed

    def _scan(self) -> set[int]:
        """Runner ids whose directory under `<root>/runners` holds files of this store."""
        found: set[int] = set()
        try:
            entries = list(os.scandir(self.root / "runners"))
        except OSError:
            return found  # No runners directory yet.
        for entry in entries:
            if entry.name.isdigit() and any(_ours(name) for name in _listdir(entry.path)):
                found.add(int(entry.name))
        return found

    def _remove_files(self, runner_id: int) -> None:
        directory = self.directory(runner_id)
        for name in _listdir(directory):
            if _ours(name):
                _unlink_quietly(directory / name)
        try:
            directory.rmdir()
        except OSError:
            pass  # Something else lives there (or it is gone already): leave it.


def _render(raw: bytes) -> tuple[bytes, bytes]:
    """Return (full PNG, thumbnail PNG) of the image `raw`. A PNG is kept as it is."""
    with _decode(raw) as image:
        full = raw if image.format == "PNG" else _encode(image, FULL_COMPRESS_LEVEL)
        small = image
        if small.mode not in ("L", "RGB"):
            # Pillow resizes bilevel and palette images with the nearest pixel only, and a
            # screen is opaque: an alpha channel would only make the file bigger.
            small = small.convert("RGB")
        # Keeps the aspect ratio, never enlarges; resizes in place (`image` is not needed
        # again). Lanczos: the sharpest of Pillow's filters for shrinking (console text).
        small.thumbnail(THUMBNAIL_SIZE, Image.Resampling.LANCZOS)
        return full, _encode(small)


def _decode(image_data: bytes) -> Image.Image:
    """Open and fully decode `image_data` (a PNG kept as it is is still checked whole), or
    raise MonitorError (503)."""
    try:
        image = Image.open(io.BytesIO(image_data))
        image.load()
        return image
    # Pillow reports a truncated or corrupt image with whichever error its decoder hit:
    # OSError, ValueError, SyntaxError ("broken PNG file"), struct.error,
    # DecompressionBombError... The bytes come from a guest's screen, so any of them is "not
    # a usable picture", never a bug of ours.
    except Exception as error:  # noqa: BLE001
        raise MonitorError(f"unreadable image ({len(image_data)} bytes): {error}", 503) from error


def _encode(image: Image.Image, compress_level: int = 6) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def _write_temporary(directory: Path, name: str, data: bytes) -> str:
    """Write `data` to a new hidden temporary file next to `directory/name`; return its path.
    The file is removed again if writing fails."""
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=_TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except BaseException:
        _unlink_quietly(Path(path))
        raise
    # No fsync: a screenshot lost to a power cut is simply taken again 5 s later.
    return path


def _ours(name: str) -> bool:
    """Whether `name` in a runner's directory is one of this store's files (or a temporary
    file of one that a crash left behind)."""
    if name in (SCREENSHOT_NAME, THUMBNAIL_NAME):
        return True
    return name.endswith(_TEMP_SUFFIX) and name.startswith(
        (f".{SCREENSHOT_NAME}.", f".{THUMBNAIL_NAME}.")
    )


def _listdir(path: str | Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("cannot remove %s: %s", path, error)
