"""Hand-written fakes for unit tests of the loop: stateful, they record calls and can be armed
to fail. Integration tests use the real stand-in and libvirt's test driver instead."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError
from monitor.errors import TransientError
from monitor.github import Artifact
from monitor.github import JitConfig
from monitor.github import RateLimit
from monitor.hypervisor import Guest
from monitor.policy import Registration
from monitor.preflight import Check


class Armable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, list[Exception]] = {}
        self.calls: list[tuple[str, object]] = []

    def fail_next(self, method: str, error: Exception, times: int = 1) -> None:
        with self._lock:
            self._failures.setdefault(method, []).extend([error] * times)

    def _call(self, method: str, arg: object = None) -> None:
        with self._lock:
            self.calls.append((method, arg))
            pending = self._failures.get(method)
            if pending:
                raise pending.pop(0)


class FakeGitHub(Armable):
    """A `monitor.github.GitHub`: registrations and workflow runs kept in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.runners: dict[int, Registration] = {}
        # Workflow runs by `reserved-by` value ("owner/repo/actions/runs/N"): (status, conclusion).
        self.runs: dict[str, tuple[str, str | None]] = {}
        self._ids = itertools.count(1000)
        self.label_delay = 0.0  # seconds each add_labels call takes
        self.rate_limit: RateLimit | None = None  # as RestGitHub keeps the latest
        # No REST calls are made here: nothing is counted.
        self.api_calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def list_runners(self) -> list[Registration]:
        self._call("list_runners")
        with self._lock:
            return list(self.runners.values())

    def generate_jitconfig(
        self,
        name: str,
        labels: Sequence[str],
        *,
        runner_group_id: int = 1,
        work_folder: str = "_work",
    ) -> JitConfig:
        self._call("generate_jitconfig", name)
        with self._lock:
            if any(r.name == name for r in self.runners.values()):
                raise MonitorError(f"GitHub: runner {name} already exists", status=502)
            registration = Registration(next(self._ids), name, "offline", False, tuple(labels))
            self.runners[registration.id] = registration
        return JitConfig(registration, f"jit-secret-{registration.id}")

    def get_runner(self, registration_id: int) -> Registration | None:
        self._call("get_runner", registration_id)
        with self._lock:
            return self.runners.get(registration_id)

    def delete_runner(self, registration_id: int) -> bool:
        self._call("delete_runner", registration_id)
        with self._lock:
            return self.runners.pop(registration_id, None) is not None

    def add_labels(self, registration_id: int, labels: Sequence[str]) -> tuple[str, ...]:
        self._call("add_labels", (registration_id, tuple(labels)))
        time.sleep(self.label_delay)
        from dataclasses import replace

        with self._lock:
            if registration_id not in self.runners:
                raise MonitorError(f"GitHub: runner {registration_id}: 404", status=502)
            runner = self.runners[registration_id]
            runner = replace(runner, labels=runner.labels + tuple(labels))
            self.runners[registration_id] = runner
            return runner.labels

    def remove_label(self, registration_id: int, name: str) -> bool:
        self._call("remove_label", (registration_id, name))
        from dataclasses import replace

        with self._lock:
            runner = self.runners.get(registration_id)
            if runner is None or name not in runner.labels:
                return False
            labels = tuple(label for label in runner.labels if label != name)
            self.runners[registration_id] = replace(runner, labels=labels)
            return True

    def set(self, registration_id: int, **changes: Any) -> None:
        from dataclasses import replace

        with self._lock:
            self.runners[registration_id] = replace(self.runners[registration_id], **changes)

    def list_artifacts(
        self, qualified_repo: str, run_id: str, *, name: str | None = None
    ) -> list[Artifact]:
        """No workflow run has artifacts here (test_tokenless.py uses the real stand-in)."""
        self._call("list_artifacts", qualified_repo)
        return []

    def download_artifact(self, url: str) -> bytes:
        """There is no artifact to download: GitHub's answer to an unknown one."""
        self._call("download_artifact", url)
        raise MonitorError(f"GitHub GET {url}: 404 Not Found", status=502)

    def workflow_run_status(self, qualified_repo: str, run_id: str) -> tuple[str, str | None]:
        """A run is in progress until a test puts (status, conclusion) in `runs`."""
        self._call("workflow_run_status", f"{qualified_repo}/actions/runs/{run_id}")
        return self.runs.get(f"{qualified_repo}/actions/runs/{run_id}", ("in_progress", None))

    def by_name(self, name: str) -> Registration:
        return next(r for r in self.runners.values() if r.name == name)


@dataclass
class FakeGuest:
    name: str
    active: bool
    # A rebuild guest's disk (the image volume it writes) and seed ISO.
    image_volume: str | None = None
    seed_iso: Path | None = None


@dataclass(frozen=True)
class FakeImageVolume:
    size: int
    source: Path | None = None


# Where the fake storage pool keeps its volumes.
FAKE_POOL = Path("/fake-pool")


class FakeHypervisor(Armable):
    def __init__(self) -> None:
        super().__init__()
        self.guests: dict[str, FakeGuest] = {}
        self.volumes: set[str] = set()  # runner overlays, `<guest>.qcow2`
        self.backing: dict[str, Path] = {}  # runner overlay -> its base image
        self.image_volumes: dict[str, FakeImageVolume] = {}
        # Volumes a test declares to back some runner's overlay: delete_volume refuses them.
        self.in_use: set[str] = set()
        self.addresses: dict[str, str] = {}
        self.destroyed: list[str] = []
        # What each guest's screen shows (raw bytes, as a hypervisor gives them); a test
        # changes an entry to change the screen. Guests not in it show `PNG`.
        self.screens: dict[str, bytes] = {}
        # The token each guest was given (None: created without one).
        self.guest_tokens: dict[str, str | None] = {}
        self.errors = 0  # failed hypervisor calls, as /metrics reads them
        # What `creation_blocker` answers, by the domain XML asked about (absent: nothing
        # blocks); a test sets an entry to make a profile impossible and removes it to mend it.
        self.blockers: dict[str, Check] = {}
        # A check of a domain XML in here waits for its event first (to order checks).
        self.check_gates: dict[str, threading.Event] = {}

    def list_guests(self, prefix: str) -> list[Guest]:
        self._call("list_guests", prefix)
        with self._lock:
            guests = [g for g in self.guests.values() if g.name.startswith(prefix)]
            return [Guest(g.name, g.active) for g in guests]

    def create_guest(
        self, name: str, template_xml: str, base_image: Path, guest_token: str | None = None
    ) -> None:
        self._call("create_guest", name)
        with self._lock:
            self.guest_tokens[name] = guest_token
            if name in self.guests:
                raise MonitorError(f"domain {name} already exists", status=503)
            self.guests[name] = FakeGuest(name, False)
            self.volumes.add(f"{name}.qcow2")
            self.backing[f"{name}.qcow2"] = Path(base_image)

    def start_guest(self, name: str) -> None:
        self._call("start_guest", name)
        with self._lock:
            self.guests[name].active = True

    def destroy_guest(self, name: str) -> None:
        self._call("destroy_guest", name)
        with self._lock:
            self.guests.pop(name, None)
            self.volumes.discard(f"{name}.qcow2")
            self.backing.pop(f"{name}.qcow2", None)
            self.destroyed.append(name)

    def ipv4_address(self, name: str) -> str | None:
        self._call("ipv4_address", name)
        with self._lock:
            return self.addresses.get(name)

    def screenshot_png(self, name: str) -> bytes:
        self._call("screenshot_png", name)
        with self._lock:
            if name not in self.guests:
                raise MonitorError(f"guest {name} does not exist", status=404)
        return PNG

    def screenshot_raw(self, name: str) -> bytes:
        self._call("screenshot_raw", name)
        with self._lock:
            guest = self.guests.get(name)
            if guest is None:
                raise MonitorError(f"guest {name} does not exist", status=404)
            if not guest.active:  # as LibvirtHypervisor (the test driver would answer)
                raise MonitorError(f"cannot take a screenshot of guest {name}: not running", 409)
            return self.screens.get(name, PNG)

    def list_volumes(self, prefix: str) -> list[str]:
        self._call("list_volumes", prefix)
        with self._lock:
            return sorted(v for v in self.volumes if v.startswith(prefix))

    def create_image_guest(
        self,
        name: str,
        template_xml: str,
        volume: str,
        size: int,
        source: Path | None = None,
        seed_iso: Path | None = None,
        guest_token: str | None = None,
    ) -> Path:
        self._call("create_image_guest", name)
        with self._lock:
            self.guest_tokens[name] = guest_token
            if name in self.guests:
                raise MonitorError(f"cannot create guest {name}: it already exists", 409)
            if volume in self.image_volumes or volume in self.volumes:
                raise MonitorError(f"cannot create image volume {volume}: it already exists", 409)
            self.image_volumes[volume] = FakeImageVolume(size, source)
            self.guests[name] = FakeGuest(name, False, image_volume=volume, seed_iso=seed_iso)
            return FAKE_POOL / volume

    def guest_state(self, name: str) -> str | None:
        self._call("guest_state", name)
        with self._lock:
            guest = self.guests.get(name)
            if guest is None:
                return None
            return "running" if guest.active else "shutoff"

    def power_off(self, name: str) -> None:
        """Test hook: the guest shuts itself down, as a finished rebuild guest does."""
        with self._lock:
            self.guests[name].active = False

    def remove_image_guest(self, name: str) -> None:
        self._call("remove_image_guest", name)
        with self._lock:
            self.guests.pop(name, None)

    def volume_path(self, volume: str) -> Path | None:
        self._call("volume_path", volume)
        with self._lock:
            if volume in self.image_volumes or volume in self.volumes:
                return FAKE_POOL / volume
            return None

    def list_image_volumes(self, prefix: str) -> list[str]:
        self._call("list_image_volumes", prefix)
        with self._lock:
            return sorted(v for v in {*self.image_volumes, *self.volumes} if v.startswith(prefix))

    def delete_volume(self, volume: str) -> None:
        self._call("delete_volume", volume)
        with self._lock:
            users = sorted(o for o, base in self.backing.items() if base == FAKE_POOL / volume)
            if volume in self.in_use:
                users.append("a runner's overlay")
            if users:
                raise MonitorError(
                    f"cannot delete volume {volume}: it is the backing file of {', '.join(users)}",
                    409,
                )
            self.image_volumes.pop(volume, None)
            self.volumes.discard(volume)
            self.backing.pop(volume, None)

    def creation_blocker(self, template_xml: str, base_image: Path | None) -> Check | None:
        self._call("creation_blocker", template_xml)
        gate = self.check_gates.get(template_xml)
        if gate is not None:
            gate.wait(10)
        with self._lock:
            return self.blockers.get(template_xml)

    def close(self) -> None:
        pass


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), "navy").save(buffer, "PNG")
    return buffer.getvalue()


PNG = _tiny_png()
TRANSIENT = TransientError("GitHub is having a moment", retry_after=None)
