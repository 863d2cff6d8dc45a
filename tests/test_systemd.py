"""The shipped systemd unit: valid for systemd, restarts on failure, runs `monitor run`."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "monitor.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_runs_the_monitor_and_restarts_on_failure():
    service = unit()["Service"]
    assert service["ExecStart"].split()[1:] == ["run", "--config", "/etc/monitor/monitor.toml"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # bad config: don't restart-loop
    assert service["KillSignal"] == "SIGTERM"
    # The hardening must leave the libvirt socket reachable: AF_UNIX allowed, /run not hidden.
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()
    assert service["ProtectSystem"] == "strict"
    assert "libvirt" in service["SupplementaryGroups"].split()
    assert "InaccessiblePaths" not in service


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at a stand-in executable.
    text = UNIT.read_text().replace("/opt/monitor/.venv/bin/monitor", "/bin/true")
    copy = tmp_path / "monitor.service"
    copy.write_text(text)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "monitor.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
