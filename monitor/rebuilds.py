"""Base-image rebuilds (spec §7): the monitor thread decides, a rebuild worker carries out.

A profile without a prebuilt `base_image` gets its image from a rebuild guest: made from the
profile's `guest.xml` on a fresh disk volume, served the profile's `boot-script` at `/boot`
(its address belongs to a rebuild guest, not a runner), it builds the image and powers off.
The volume is then the profile's new base image, named after its snapshot (the rebuild's
start time, RFC 3339); `data/profiles/<profile>/snapshot` points at the current one, as
upstream's does. Runners are overlays on it. The three newest images are kept (and any that
still backs a runner); older ones go.

Owned by `loop.Monitor`: `start_due` and `sweep` run on the monitor thread; the worker runs
on the monitor's rebuild pool and reports back through `post`. A failed rebuild backs off
exponentially (upstream retried on every loop, forever) and says why on the dashboard.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from monitor import images
from monitor import models
from monitor import policy
from monitor.config import Config
from monitor.errors import MonitorError
from monitor.ratelimit import Backoff
from monitor.screenshots import to_png

log = logging.getLogger(__name__)

# Images of a profile kept after a rebuild (upstream: 3), the current one included.
KEEP_IMAGES = 3
# How often the worker looks whether the rebuild guest has powered off, and how often it
# saves its screen (served at /profile/<key>/screenshot.png).
POLL_SECONDS = 1.0
SCREENSHOT_SECONDS = 5.0


def snapshot_name(at: datetime) -> str:
    """A snapshot name as upstream makes them: RFC 3339 in UTC with nanoseconds and `Z`."""
    at = at.astimezone(UTC)
    return f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond:06d}000Z"


def _compact(snapshot: str) -> str:
    # Colons in disk paths trip QEMU's "protocol:" parsing of backing files; drop them.
    return snapshot.replace(":", "")


def image_volume(template_prefix: str, profile: str, snapshot: str) -> str:
    """The storage-pool volume holding a profile's base image of `snapshot`."""
    return f"{template_prefix}-{profile}@{_compact(snapshot)}.qcow2"


def rebuild_guest_name(rebuild_prefix: str, profile: str, snapshot: str) -> str:
    return f"{rebuild_prefix}-{profile}@{_compact(snapshot)}"


def read_snapshots(data_path: Path, profile_keys: list[str]) -> dict[str, str]:
    """Each profile's current snapshot: the target text of `data/profiles/<p>/snapshot`, a
    symlink as upstream's (the target need not exist)."""
    snapshots = {}
    for key in profile_keys:
        try:
            snapshots[key] = os.readlink(data_path / "profiles" / key / "snapshot")
        except OSError:
            continue
    return snapshots


def write_snapshot(data_path: Path, profile: str, snapshot: str) -> None:
    """Point `data/profiles/<p>/snapshot` at `snapshot` atomically (a new link, renamed)."""
    directory = data_path / "profiles" / profile
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".snapshot.{os.getpid()}.{threading.get_ident()}"
    temporary.unlink(missing_ok=True)
    os.symlink(snapshot, temporary)
    os.replace(temporary, directory / "snapshot")


def save_profile_screenshot(data_path: Path, profile: str, png: bytes) -> None:
    """The rebuild guest's latest screen, as `/profile/<p>/screenshot.png` serves it."""
    directory = data_path / "profiles" / profile
    directory.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".screenshot.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(png)
        os.replace(temporary, directory / "screenshot.png")
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Build:
    """A rebuild in progress."""

    profile: str
    snapshot: str
    guest: str
    volume: str
    started_at: datetime
    # The rebuild guest's own token for /boot (in memory only: a rebuild guest left behind
    # by a restart is swept, not resumed).
    guest_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)


class Rebuilds:
    """The rebuilds of every profile: which are running, which failed and when they retry."""

    def __init__(
        self,
        config: Config,
        hypervisor: Any,
        *,
        post: Callable[[Callable[[], None]], None],
        backoff: Backoff,
        stopping: threading.Event,
        clock: Callable[[], datetime],
    ) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self._post = post
        self._backoff = backoff
        self._stopping = stopping
        self._clock = clock
        self.snapshots = read_snapshots(config.data_path, list(config.profiles))
        self.building: dict[str, Build] = {}
        # profile -> (why the last rebuild failed, when the next try may start)
        self.failures: dict[str, tuple[str, datetime]] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="monitor-rebuild")

    def shutdown(self) -> None:
        """Stop waiting for rebuild guests (they are cleaned up at the next start)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # Monitor thread -------------------------------------------------------------------------

    def start_due(self, inp: policy.PolicyInput, now: datetime) -> list[str]:
        """Start the rebuilds the policy asks for whose back-off has passed; return them."""
        started = []
        for key in policy.rebuilds_to_start(inp, now, self.building):
            if self._stopping.is_set() or not self._backoff.ready(key, now):
                continue
            snapshot = snapshot_name(now)
            build = Build(
                key,
                snapshot,
                rebuild_guest_name(self.config.libvirt_rebuild_guest_prefix, key, snapshot),
                image_volume(self.config.libvirt_template_guest_prefix, key, snapshot),
                now,
            )
            self.building[key] = build
            reason = "no image yet" if key not in self.snapshots else "the image is too old"
            log.info("rebuilding the image of %s (%s) in %s", key, reason, build.guest)
            models.record_event("rebuild", f"building {build.volume}: {reason}", profile=key)
            self._pool.submit(self._worker, build)
            started.append(key)
        return started

    def sweep(self, guest_names: list[str]) -> None:
        """Remove rebuild guests that no rebuild in progress owns (a monitor restart or a
        crash interrupted them), and their unfinished volumes."""
        own = {build.guest for build in self.building.values()}
        prefix = f"{self.config.libvirt_rebuild_guest_prefix}-"
        for name in guest_names:
            if not name.startswith(prefix) or name in own:
                continue
            profile, _, compact = name[len(prefix) :].partition("@")
            volume = f"{self.config.libvirt_template_guest_prefix}-{profile}@{compact}.qcow2"
            current = self.snapshots.get(profile)
            keep = current is not None and _compact(current) == compact
            models.record_event("sweep", f"removing the stale rebuild guest {name}")
            self._pool.submit(self._remove, name, None if keep else volume)

    def state(self, key: str, now: datetime) -> str:
        """The profile's rebuild state for the dashboard."""
        profile = self.config.profiles[key]
        if profile.base_image is not None:
            return "prebuilt image"
        build = self.building.get(key)
        if build is not None:
            return f"building since {build.started_at:%H:%M:%S} UTC ({build.guest})"
        failure = self.failures.get(key)
        if failure is not None:
            reason, retry = failure
            when = "now" if retry <= now else f"at {retry:%H:%M:%S} UTC"
            return f"failed: {reason}; next try {when}"
        return f"{profile.rebuild_mode}, up to date" if key in self.snapshots else "no image yet"

    def image_address_owner(self, address: str) -> str | None:
        """The profile whose rebuild guest has `address` (for `/boot`), or None."""
        for build in list(self.building.values()):
            try:
                if self.hypervisor.ipv4_address(build.guest) == address:
                    return build.profile
            except MonitorError:
                continue
        return None

    def token_owner(self, token: str) -> str | None:
        """The profile whose running rebuild guest was given `token` (for `/boot`), or None."""
        owner = None
        for build in list(self.building.values()):
            if hmac.compare_digest(build.guest_token.encode(), token.encode()):
                owner = build.profile
        return owner

    def _done(self, build: Build, error: BaseException | None) -> None:
        now = self._clock()
        if self.building.get(build.profile) is build:
            del self.building[build.profile]
        if error is None:
            write_snapshot(self.config.data_path, build.profile, build.snapshot)
            self.snapshots[build.profile] = build.snapshot
            self.failures.pop(build.profile, None)
            self._backoff.succeeded(build.profile)
            log.info("the image of %s is rebuilt: %s", build.profile, build.volume)
            models.record_event("rebuilt", f"new image {build.volume}", profile=build.profile)
            self._pool.submit(self.prune_images, build.profile, build.snapshot)
        else:
            delay = self._backoff.failed(build.profile, now)
            self.failures[build.profile] = (str(error), now + delay)
            log.error("rebuilding the image of %s failed: %s", build.profile, error)
            models.record_event(
                "rebuild-failed",
                f"{build.guest}: {error} (next try in {int(delay.total_seconds())} s)",
                profile=build.profile,
            )

    # Rebuild pool ---------------------------------------------------------------------------

    def _worker(self, build: Build) -> None:
        error: BaseException | None = None
        profile_data = self.config.data_path / "profiles" / build.profile
        seed = profile_data / f"seed@{_compact(build.snapshot)}.iso"
        try:
            self._build(build, seed)
        except Exception as failure:  # noqa: BLE001 - reported, never lost
            if not isinstance(failure, (MonitorError, OSError)):
                log.exception("rebuild worker for %s crashed", build.guest)
            error = failure
            self._remove(build.guest, build.volume)
        finally:
            seed.unlink(missing_ok=True)  # only its rebuild guest used it, and it is gone
            self._post(lambda: self._done(build, error))

    def _build(self, build: Build, seed_path: Path) -> None:
        profile = self.config.profiles[build.profile]
        seed = images.make_seed_iso(profile.config_dir, seed_path)
        self.hypervisor.create_image_guest(
            build.guest,
            profile.guest_xml.read_text(),
            build.volume,
            profile.rebuild_disk_size,
            profile.rebuild_source_image,
            seed,
            build.guest_token if self.config.guest_auth == "token" else None,
        )
        self.hypervisor.start_guest(build.guest)
        timeout = profile.rebuild_timeout.total_seconds()
        started = time.monotonic()
        last_screenshot = 0.0
        while True:
            state = self.hypervisor.guest_state(build.guest)
            if state == "shutoff":
                break
            if state is None:
                raise MonitorError(f"the rebuild guest {build.guest} disappeared")
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise MonitorError(f"the rebuild guest did not power off within {timeout:.0f} s")
            if self._stopping.is_set():
                raise MonitorError("the monitor is stopping")
            if elapsed - last_screenshot >= SCREENSHOT_SECONDS:
                last_screenshot = elapsed
                self._save_screen(build)
            self._stopping.wait(POLL_SECONDS)
        self.hypervisor.remove_image_guest(build.guest)

    def _save_screen(self, build: Build) -> None:
        try:
            png = to_png(self.hypervisor.screenshot_raw(build.guest))
            save_profile_screenshot(self.config.data_path, build.profile, png)
        except (MonitorError, OSError) as error:
            log.debug("no screenshot of %s: %s", build.guest, error)

    def _remove(self, guest: str, volume: str | None) -> None:
        """Remove a rebuild guest and, unless None, its unfinished volume (best effort)."""
        try:
            self.hypervisor.remove_image_guest(guest)
            if volume is not None:
                self.hypervisor.delete_volume(volume)
        except (MonitorError, OSError) as error:
            log.warning("cleaning up the rebuild guest %s failed: %s", guest, error)

    def prune_images(self, profile: str, current: str) -> None:
        """Keep the KEEP_IMAGES newest images of `profile` (and the current one); delete
        older ones, except one that still backs a runner (the hypervisor refuses: 409)."""
        prefix = f"{self.config.libvirt_template_guest_prefix}-{profile}@"
        current_volume = image_volume(self.config.libvirt_template_guest_prefix, profile, current)
        try:
            volumes = self.hypervisor.list_image_volumes(prefix)
        except MonitorError as error:
            log.warning("listing the images of %s failed: %s", profile, error)
            return
        # Names sort by time: the snapshot is an RFC 3339 time of fixed width.
        for volume in sorted(volumes)[:-KEEP_IMAGES]:
            if volume == current_volume:
                continue
            try:
                self.hypervisor.delete_volume(volume)
                log.info("deleted the old image %s", volume)
            except MonitorError as error:
                log.info("kept the old image %s: %s", volume, error)
