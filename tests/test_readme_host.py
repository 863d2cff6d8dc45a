"""The README's "Running it for real", run as written on this Debian 12 host (CI's is a fresh
one): the set-up with `--host`, upstream's cinet network, `/etc/monitor`, `check-config
--host` on a config there, the service user and the unit. Only what CI cannot do is stood in
for: the clone (this tree is the clone), `/etc/monitor` (a directory of the test's, holding a
config for the real libvirtd and the GitHub stand-in), and the two `systemctl` lines (no
systemd runs here: the unit is checked with `systemd-analyze verify` instead). A command the
README adds or changes and this test does not know fails it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.configs import set_settings
from tests.support.configs import write_config
from tests.support.constants import GITHUB_TOKEN
from tests.support.constants import ROOT
from tests.support.daemons import clean_env
from tests.support.daemons import free_port
from tests.support.libvirtd import QEMU_GUEST_XML
from tests.support.libvirtd import URI
from tests.support.under_pytest import require_libvirtd
from tests.support.under_pytest import standin_fixtures

pytestmark = pytest.mark.libvirtd

server, standin = standin_fixtures(GITHUB_TOKEN)

NETWORK = "cinet"


def readme_steps() -> list[str]:
    """The command lines of the README's "Running it for real" block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running it for real") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no sh block under 'Running it for real'"
    return [line.strip() for line in block[1].splitlines() if line.strip()]


def run(command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env=env or clean_env(),
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def virsh_ready():
    if shutil.which("virsh") is None or shutil.which("apt-get") is None:
        require_libvirtd("no virsh or apt-get on this machine")
    probe = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        require_libvirtd(f"virsh cannot reach {URI}: {probe.stderr.strip()}")
    defined = subprocess.run(
        ["virsh", "-c", URI, "net-info", NETWORK], capture_output=True, text=True
    )
    if defined.returncode == 0:
        pytest.skip(f"this libvirtd has a network {NETWORK!r} already; the test makes its own")
    yield
    for command in (f"net-destroy {NETWORK}", f"net-undefine {NETWORK}"):
        subprocess.run(["virsh", "-c", URI, *command.split()], capture_output=True)


def test_running_it_for_real_works_as_the_readme_says(tmp_path: Path, standin, virsh_ready):
    steps = readme_steps()
    etc = tmp_path / "etc-monitor"
    env = {**clean_env(), "LIBVIRT_DEFAULT_URI": URI}
    created_user = False
    done: list[str] = []
    try:
        for step in steps:
            if step.startswith("git clone "):
                assert step.endswith("cd /opt/monitor")  # this tree is that clone
            elif step == "bash .ci/setup --host":
                run(step, ROOT, env)
                for program in ("qemu-img", "virsh", "libvirtd", "dnsmasq"):
                    assert shutil.which(program) or Path(f"/usr/sbin/{program}").exists(), program
            elif step.startswith("virsh net-define docs/cinet.xml"):
                run(step, ROOT, env)
                info = run(f"virsh net-info {NETWORK}", ROOT, env)
                assert re.search(r"Active:\s+yes", info) and re.search(r"Autostart:\s+yes", info)
            elif step == "mkdir -p /etc/monitor":
                run(step.replace("/etc/monitor", str(etc)), ROOT, env)
                write_host_config(etc, standin.base_url)
            elif step.startswith(".venv/bin/monitor check-config --host --config /etc/monitor/"):
                command = step.replace("/etc/monitor", str(etc))
                command = command.replace(".venv/bin/monitor", f"{sys.executable} -m monitor", 1)
                out = run(command, ROOT, env)
                assert "ok    profile linux: network cinet is running" in out, out
                assert "ok    profile linux: libvirt accepts its guest.xml" in out, out
                assert "ok    qemu-img: /usr/bin/qemu-img" in out, out
                assert "0 failure(s)" in out, out
            elif step == "useradd -r -G libvirt -d /var/lib/monitor monitor":
                if subprocess.run(["id", "monitor"], capture_output=True).returncode != 0:
                    run(step, ROOT, env)
                    created_user = True
                assert "libvirt" in run("id -nG monitor", ROOT, env).split()
            elif step == (
                "cp systemd/monitor.service /etc/systemd/system/ && systemctl daemon-reload"
            ):
                units = tmp_path / "units"
                units.mkdir()
                run(f"cp systemd/monitor.service {units}/", ROOT, env)
                # /opt/monitor is where the README clones to; here it is this tree.
                copy = units / "monitor.service"
                here = ROOT / ".venv/bin/monitor"
                executable = str(here if here.exists() else "/bin/true")
                copy.write_text(
                    copy.read_text().replace("/opt/monitor/.venv/bin/monitor", executable)
                )
                verify = subprocess.run(
                    ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True
                )
                problems = [line for line in verify.stderr.splitlines() if copy.name in line]
                assert verify.returncode == 0 and problems == [], verify.stderr
            elif step == "systemctl enable --now monitor":
                pass  # no systemd runs here
            else:
                pytest.fail(f"the README has a step this test does not know: {step!r}")
            done.append(step)
    finally:
        if created_user:
            subprocess.run(["userdel", "monitor"], capture_output=True)
    assert len(done) == 8, done


def write_host_config(etc: Path, github_url: str) -> None:
    """What a sysadmin puts in /etc/monitor: a profile on the cinet network, the pool key left
    out (the monitor would make `default`), a port nothing holds."""
    path = write_config(
        etc,
        github_api_url=github_url,
        targets={"linux": 1},
        guest_xml=QEMU_GUEST_XML.replace("network='monitor-test'", f"network='{NETWORK}'"),
        libvirt_uri=URI,
    )
    set_settings(path, {"listen_port": str(free_port())})
    path.write_text(re.sub(r"(?m)^libvirt_storage_pool = .*\n", "", path.read_text()))
