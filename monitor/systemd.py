"""systemd integration for `Type=notify` units, without libsystemd: the sd_notify protocol is
one datagram of `KEY=value` lines to the socket named by `$NOTIFY_SOCKET`.

- `READY=1` once the monitor has made its first reconcile (its pool is being kept);
- `WATCHDOG=1` every half `$WATCHDOG_USEC`, but only while the monitor thread answers: a
  watchdog thread queues a ping on the monitor thread's queue and feeds systemd only when the
  ping came back in time, so a wedged monitor thread stops the feeding and systemd restarts
  the service (`WatchdogSec=`, `Restart=on-failure`);
- `STATUS=…` with a one-line summary, `STOPPING=1` on shutdown.

Outside systemd (no `$NOTIFY_SOCKET`) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET") or None
        self.address: str | bytes | None = None
        if path is not None:
            self.address = b"\0" + path[1:].encode() if path.startswith("@") else path

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send `lines` as one message; False (logged) if it could not be sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode())
        except OSError as error:
            log.warning("cannot notify systemd (%s): %s", self.address, error)
            return False
        return True


def watchdog_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process (`$WATCHDOG_USEC`, honouring
    `$WATCHDOG_PID`), or None when there is no watchdog."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


class Watchdog:
    """Feeds systemd's watchdog while `ping` gets answered.

    `ping(timeout)` must return True when the monitor thread handled a no-op request within
    `timeout` seconds (Monitor.ping). Every `timeout / 2` seconds one ping is made; an answered
    ping sends `WATCHDOG=1`, an unanswered one is logged and sends nothing, so systemd's
    timer runs out if the monitor thread stays stuck."""

    def __init__(self, notifier: Notifier, timeout: float, ping: Callable[[float], bool]) -> None:
        self.notifier = notifier
        self.timeout = timeout
        self.ping = ping
        self.fed = 0
        self.missed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout)

    def _run(self) -> None:
        interval = self.timeout / 2
        while not self._stop.is_set():
            started = time.monotonic()
            if self.ping(interval):
                self.notifier.send("WATCHDOG=1")
                self.fed += 1
            else:
                self.missed += 1
                log.error(
                    "the monitor thread did not answer within %.1f s; not feeding systemd's "
                    "watchdog (it restarts the service after %.1f s)",
                    interval,
                    self.timeout,
                )
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))
