"""Files that base-image rebuilds need besides libvirt: the cloud-init seed ISO.

Upstream's ubuntu profiles boot their rebuild guest with a NoCloud seed: an ISO 9660 image
labelled CIDATA holding the profile's `user-data` and `meta-data` (spec §7.3), which
cloud-init in the guest reads at first boot. Building it runs an external tool, so it lives
here rather than in `hypervisor/`, which only talks to libvirt.

Imports only `errors` and the standard library.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from monitor.errors import MonitorError

log = logging.getLogger(__name__)

# The NoCloud files, in upstream's order; both must be present.
SEED_FILES = ("user-data", "meta-data")
# genisoimage is what upstream runs; xorriso's and cdrtools' mkisofs take the same flags.
ISO_TOOLS = ("genisoimage", "xorrisofs", "mkisofs")
ISO_TOOL_TIMEOUT = 60.0


def make_seed_iso(config_dir: Path, out: Path) -> Path | None:
    """Build the NoCloud seed ISO of profile config dir `config_dir` at `out`; return `out`.

    Returns None, touching nothing, when `config_dir` has no `user-data` (a profile without
    cloud-init). With `user-data`, `meta-data` must be there too (upstream passes both; an
    empty file is fine). Runs upstream's `genisoimage -V CIDATA -R -f -o <out> user-data
    meta-data` in `config_dir` (`-f` follows symlinks, `-R` keeps the names' case and
    hyphens), or `xorrisofs`/`mkisofs` with the same flags when genisoimage is missing.
    The ISO is written to a temporary file beside `out` and renamed, so `out` is never
    half-written: a guest may still be reading the previous one.

    Raises `MonitorError` naming the problem: a missing `meta-data`, no ISO tool (with the
    Debian package that provides one), or the tool's own failure.
    """
    config_dir = Path(config_dir)
    out = Path(out)
    if not (config_dir / "user-data").is_file():
        return None
    missing = [name for name in SEED_FILES if not (config_dir / name).is_file()]
    if missing:
        raise MonitorError(
            f"cannot build the cloud-init seed ISO: {config_dir} has user-data but no "
            f"{' or '.join(missing)} (an empty file will do)"
        )
    tool = _iso_tool()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        command = [tool, "-V", "CIDATA", "-R", "-f", "-o", partial, *SEED_FILES]
        try:
            result = subprocess.run(
                command,
                cwd=config_dir,
                capture_output=True,
                text=True,
                timeout=ISO_TOOL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise MonitorError(
                f"cannot build the seed ISO {out}: {Path(tool).name} did not finish in "
                f"{ISO_TOOL_TIMEOUT:g} s"
            ) from e
        except OSError as e:
            raise MonitorError(f"cannot build the seed ISO {out}: cannot run {tool}: {e}") from e
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise MonitorError(
                f"cannot build the seed ISO {out}: {Path(tool).name} exited with "
                f"{result.returncode}: {output}"
            )
        os.chmod(partial, 0o644)  # mkstemp's 0600 would keep a non-root QEMU out
        os.replace(partial, out)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    log.info("built seed ISO %s from %s with %s", out, config_dir, Path(tool).name)
    return out


def _iso_tool() -> str:
    for name in ISO_TOOLS:
        path = shutil.which(name)
        if path is not None:
            return path
    raise MonitorError(
        "cannot build the cloud-init seed ISO: none of "
        f"{', '.join(ISO_TOOLS)} is installed (on Debian: apt-get install genisoimage)"
    )
