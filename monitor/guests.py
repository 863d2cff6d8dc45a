"""What web and scheduler threads may ask about runner guests: their addresses, the guest
that holds a guest token, boot scripts, JIT configs and screenshots.

Everything here is a read of libvirt, the store or the profile's files, safe off the monitor
thread: it decides nothing about VMs or GitHub. The address map and the last observation are
replaced whole by their writers, so a reader sees one or the other, never half of one.
Threads: `refresh_addresses` and `refresh_screenshots` run on the scheduler's threads; the
lookups on the web threads that serve guests (`/boot`, `/github-jitconfig`) and screenshots.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from datetime import datetime
from datetime import timedelta

from monitor import metrics
from monitor import models
from monitor import policy
from monitor.config import Config
from monitor.errors import MonitorError
from monitor.hypervisor import Hypervisor
from monitor.rebuilds import Rebuilds
from monitor.registrations import RegistrationCache
from monitor.screenshots import RecentCaptures
from monitor.screenshots import ScreenshotStore
from monitor.screenshots import to_png

log = logging.getLogger(__name__)

# How soon to look at GitHub again after serving a JIT config: the runner is about to come
# online (spec §9.2).
JIT_SERVED_REFRESH = timedelta(seconds=10)
# Unknown guest addresses trigger a fresh lookup of all guests at most this often.
ADDRESS_REFRESH_MIN_SECONDS = 1.0


class Guests:
    """Lookups about the guests of the runners in the monitor's last observation
    (`observe()` returns it)."""

    def __init__(
        self,
        config: Config,
        hypervisor: Hypervisor,
        *,
        observe: Callable[[], policy.Observation | None],
        registrations: RegistrationCache,
        rebuilds: Rebuilds,
        metrics: metrics.Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.observe = observe
        self.registrations = registrations
        self.rebuilds = rebuilds
        self.metrics = metrics
        self.clock = clock
        self.screenshots = ScreenshotStore(config.data_path)
        self.recent_captures = RecentCaptures()
        self._addresses: dict[str, str] = {}
        self._last_address_refresh = 0.0

    @property
    def addresses(self) -> dict[str, str]:
        """Guest name -> IPv4 address, as the address job last found them (a read of a dict
        the job replaces whole, safe from any thread)."""
        return self._addresses

    def refresh_addresses(self) -> dict[str, str]:
        """Look up the IPv4 address of every runner guest (libvirt reads only)."""
        observation = self.observe()
        if observation is None:
            return {}
        addresses: dict[str, str] = {}
        for runner in observation.runners:
            if runner.guest_name is None:
                continue
            try:
                address = self.hypervisor.ipv4_address(runner.guest_name)
            except MonitorError as error:
                log.debug("no address for %s: %s", runner.guest_name, error)
                continue
            if address is not None:
                addresses[runner.guest_name] = address
        for name, address in addresses.items():
            if self._addresses.get(name) != address:
                log.info("%s has address %s", name, address)
        self._addresses = addresses
        return addresses

    def runner_for_address(self, address: str) -> policy.Runner:
        """The runner whose guest has `address` (looked up again on a miss: the DHCP lease
        may be newer than the last refresh). MonitorError(503) if there is none."""
        wanted = ipv4(address)
        moved = False
        for attempt in range(2):
            if attempt == 1:
                # Anyone can ask: a full lookup (one libvirt call per guest) at most once a
                # second for unknown addresses, at once when a known one has moved.
                now = time.monotonic()
                recent = now - self._last_address_refresh < ADDRESS_REFRESH_MIN_SECONDS
                if recent and not moved:
                    break
                self._last_address_refresh = now
                self.refresh_addresses()
            observation = self.observe()
            if wanted is None or observation is None:
                break
            for runner in observation.runners:
                name = runner.guest_name
                if name and self._addresses.get(name) == wanted:
                    if self._still_at(name, wanted):
                        return runner
                    moved = True
        raise MonitorError(f"No runner found with IP address: {address}", status=503)

    def _still_at(self, guest_name: str, address: str) -> bool:
        """Ask libvirt again before trusting a remembered address: DHCP may have given a
        destroyed guest's address to a new one since the last refresh."""
        try:
            return self.hypervisor.ipv4_address(guest_name) == address
        except MonitorError:
            return False

    def runner_for_guest_token(self, token: str) -> models.Runner:
        """The live runner whose guest was given `token`: MonitorError 403 if none."""
        row = models.runner_by_guest_token(hashlib.sha256(token.encode()).hexdigest())
        if row is None:
            raise MonitorError("unknown or expired guest token", status=403)
        return row

    def jit_config_for_token(self, token: str) -> str | None:
        """The JIT config of the runner whose guest holds `token`, served once: a second
        request (a replayed or stolen token) is 410 Gone."""
        row = self.runner_for_guest_token(token)
        if not models.claim_jit_config(row.id, self.clock()):
            raise MonitorError(
                f"the JIT config of runner {row.id} has already been served", status=410
            )
        if row.jit_config is not None:
            log.info(
                "serving the JIT config of runner %d to its guest (token)",
                row.id,
                extra={"runner_id": row.id},
            )
            self.registrations.invalidate_in(JIT_SERVED_REFRESH, self.clock())
        return row.jit_config

    def boot_script_for_token(self, token: str) -> str:
        """The boot script for the runner or image rebuild guest that holds `token`; 410
        once the runner's JIT config has been served (its token is spent)."""
        profile = self.rebuilds.token_owner(token)
        if profile is None:
            profile = self.runner_for_unspent_token(token).profile
        return self._boot_script(profile)

    def runner_for_unspent_token(self, token: str) -> models.Runner:
        """The runner whose guest holds `token`, while its JIT config has not been served:
        403 for an unknown token, 410 for a spent one. Once the runner agent has its config,
        a job's code runs in the guest and may read the token, so it opens nothing more (not
        even the boot log: a job could fill it with anything)."""
        row = self.runner_for_guest_token(token)
        if row.jit_served_at is not None:
            raise MonitorError(f"the guest token of runner {row.id} is spent", status=410)
        return row

    def jit_config_for(self, address: str) -> str | None:
        """The JIT config of the runner at `address` (None if it has none)."""
        runner = self.runner_for_address(address)
        row = models.get_runner(runner.id)
        config = row.jit_config if row is not None else None
        if config is not None:
            log.info(
                "serving the JIT config of runner %d to %s",
                runner.id,
                address,
                extra={"runner_id": runner.id},
            )
            self.registrations.invalidate_in(JIT_SERVED_REFRESH, self.clock())
        return config

    def boot_script_for(self, address: str) -> str:
        """The boot script of the profile of the runner, or of the image rebuild guest, at
        `address` (upstream recognised rebuild guests by their address too)."""
        profile: str | None
        try:
            profile = self.runner_for_address(address).profile
        except MonitorError:
            profile = self.rebuilds.image_address_owner(ipv4(address) or "")
            if profile is None:
                raise
        return self._boot_script(profile)

    def _boot_script(self, profile: str) -> str:
        if profile not in self.config.profiles:
            raise MonitorError(f"profile {profile} is no longer configured", status=404)
        path = self.config.profiles[profile].config_dir / "boot-script"
        try:
            return path.read_text()
        except OSError as error:
            raise MonitorError(f"cannot read {path}: {error.strerror}", status=503) from None

    def screenshot_now(self, runner_id: int) -> bytes:
        """A fresh screenshot of a runner's guest (less than a second old), as PNG. It is
        saved too (unless unchanged), so the page's thumbnail shows it at once."""
        observation = self.observe()
        runner = (
            next((r for r in observation.runners if r.id == runner_id), None)
            if observation
            else None
        )
        if runner is None:
            raise MonitorError(f"No runner with id: {runner_id}", status=404)
        if runner.guest_name is None:
            raise MonitorError(f"Runner {runner_id} has no libvirt guest", status=404)
        guest_name = runner.guest_name
        return self.recent_captures.get(runner_id, lambda: self._capture(runner_id, guest_name))

    def _capture(self, runner_id: int, guest_name: str) -> bytes:
        raw = self.hypervisor.screenshot_raw(guest_name)
        try:
            self.screenshots.save(runner_id, raw)
        except MonitorError as error:
            # Not saved (say the disk is full), but the picture may be fine: the click gets it.
            log.warning(
                "cannot save the screenshot of runner %d: %s",
                runner_id,
                error,
                extra={"runner_id": runner_id},
            )
        # A PNG (what QEMU 7.1+ and the test driver give) is returned as it is, not encoded
        # again; only a PPM pays a second encode, on a click.
        return to_png(raw)

    def refresh_screenshots(self) -> int:
        """One screenshot pass (libvirt reads only): save the screen of every runner guest
        under data/runners/<id>/ unless it is unchanged, and drop the files of runners that
        are gone. A guest that fails is logged and skipped. Returns how many screenshots were
        encoded (the pass's other counts are in `screenshots.last_pass`)."""
        observation = self.observe()
        if observation is None:
            return 0  # Nothing observed yet: no runner is known to be gone either.
        guests = {r.id: r.guest_name for r in observation.runners if r.guest_name is not None}
        started = time.perf_counter()
        encoded = self.screenshots.refresh(guests, self.hypervisor.screenshot_raw).encoded
        self.metrics.screenshot_pass_seconds.observe(time.perf_counter() - started)
        return encoded

    def screenshot_version(self, runner_id: int) -> str | None:
        """A short string that changes with the runner's saved screenshot (for cache-busting
        thumbnail URLs), or None while it has none."""
        return self.screenshots.version(runner_id)


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, with an IPv4-mapped IPv6 one unwrapped to IPv4; None if not one."""
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def ipv4(address: str) -> str | None:
    """An IPv4 address as text (IPv4-mapped IPv6 unwrapped); None for anything else."""
    parsed = parse_address(address)
    return str(parsed) if isinstance(parsed, ipaddress.IPv4Address) else None
