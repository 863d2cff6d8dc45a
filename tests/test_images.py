"""The cloud-init seed ISO (monitor/images.py), built with the real genisoimage (Debian package
`genisoimage`, installed by .ci/setup) and read back with nothing but the ISO 9660 layout."""

from __future__ import annotations

import shutil
import stat
import struct
from pathlib import Path

import pytest

from monitor import images
from monitor.errors import MonitorError
from monitor.images import make_seed_iso

USER_DATA = "#cloud-config\nruncmd:\n  - [curl, http://192.168.100.1:8000/boot]\n"
META_DATA = "instance-id: servo-ubuntu2204\n"
SECTOR = 2048

needs_genisoimage = pytest.mark.skipif(
    shutil.which("genisoimage") is None,
    reason="genisoimage is missing: apt-get install genisoimage",
)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "profiles" / "servo-ubuntu2204"
    directory.mkdir(parents=True)
    (directory / "user-data").write_text(USER_DATA)
    (directory / "meta-data").write_text(META_DATA)
    (directory / "guest.xml").write_text("<domain/>")  # not part of the seed
    return directory


def _volume_id(iso: bytes) -> str:
    # The primary volume descriptor is sector 16; its volume identifier is bytes 40..72.
    descriptor = iso[16 * SECTOR : 17 * SECTOR]
    assert descriptor[0:6] == b"\x01CD001"
    return iso[32808:32840].decode("ascii").rstrip()


def _root_files(iso: bytes) -> dict[str, bytes]:
    """The root directory's files by their Rock Ridge names (`NM` entries)."""
    descriptor = iso[16 * SECTOR : 17 * SECTOR]
    directory = _extent(iso, descriptor[156:190])  # the root directory's record
    files: dict[str, bytes] = {}
    offset = 0
    while offset < len(directory):
        length = directory[offset]
        if length == 0:  # records do not cross sectors: skip to the next one
            offset = (offset // SECTOR + 1) * SECTOR
            continue
        record = directory[offset : offset + length]
        offset += length
        name_length = record[32]
        if record[25] & 2 or name_length == 1 and record[33] in (0, 1):
            continue  # a directory, ".", ".."
        system_use = record[33 + name_length + (1 - name_length % 2) :]
        name = None
        position = 0
        while position + 4 <= len(system_use):
            tag, entry_length = system_use[position : position + 2], system_use[position + 2]
            if entry_length == 0:
                break
            if tag == b"NM":
                name = system_use[position + 5 : position + entry_length].decode()
            position += entry_length
        assert name is not None, "no Rock Ridge name: genisoimage -R was not used"
        files[name] = _extent(iso, record)
    return files


def _extent(iso: bytes, record: bytes) -> bytes:
    # A directory record's extent: its first sector and length, little-endian halves.
    sector, length = struct.unpack_from("<I", record, 2)[0], struct.unpack_from("<I", record, 10)[0]
    return iso[sector * SECTOR : sector * SECTOR + length]


@needs_genisoimage
def test_make_seed_iso_builds_a_nocloud_seed(config_dir, tmp_path):
    out = tmp_path / "data" / "profiles" / "servo-ubuntu2204" / "config.iso@snap"

    assert make_seed_iso(config_dir, out) == out

    iso = out.read_bytes()
    assert _volume_id(iso) == "CIDATA"
    assert _root_files(iso) == {
        "user-data": USER_DATA.encode(),
        "meta-data": META_DATA.encode(),
    }
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left


@needs_genisoimage
def test_make_seed_iso_follows_symlinks_and_replaces_the_old_iso(config_dir, tmp_path):
    shared = tmp_path / "shared-user-data"
    shared.write_text("#cloud-config\n{}\n")
    (config_dir / "user-data").unlink()
    (config_dir / "user-data").symlink_to(shared)
    (config_dir / "meta-data").write_text("")  # empty is fine
    out = tmp_path / "config.iso"
    out.write_bytes(b"the previous seed")

    make_seed_iso(config_dir, out)

    assert _root_files(out.read_bytes()) == {
        "user-data": b"#cloud-config\n{}\n",
        "meta-data": b"",
    }


def test_make_seed_iso_without_user_data_is_none(tmp_path):
    (tmp_path / "meta-data").write_text(META_DATA)
    out = tmp_path / "out" / "config.iso"

    assert make_seed_iso(tmp_path, out) is None
    assert not out.parent.exists()


def test_make_seed_iso_needs_meta_data(config_dir, tmp_path):
    (config_dir / "meta-data").unlink()

    with pytest.raises(MonitorError) as info:
        make_seed_iso(config_dir, tmp_path / "config.iso")

    assert "meta-data" in str(info.value) and str(config_dir) in str(info.value)
    assert not (tmp_path / "config.iso").exists()


def test_make_seed_iso_names_the_missing_tool(config_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")

    with pytest.raises(MonitorError) as info:
        make_seed_iso(config_dir, tmp_path / "config.iso")

    message = str(info.value)
    assert "genisoimage" in message and "apt-get install genisoimage" in message
    assert not (tmp_path / "config.iso").exists()


@pytest.mark.parametrize("tool", images.ISO_TOOLS)
def test_make_seed_iso_falls_back_to_other_tools(config_dir, tmp_path, monkeypatch, tool):
    # A stand-in tool on PATH that records its arguments and writes the -o file.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / tool
    script.write_text(
        '#!/bin/sh\necho "$PWD $*" > "$0.args"\n'
        'while [ "$1" != -o ]; do shift; done; echo iso > "$2"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "config.iso"

    make_seed_iso(config_dir, out)

    args = Path(f"{script}.args").read_text().split()
    assert args[0] == str(config_dir)
    assert args[1:6] == ["-V", "CIDATA", "-R", "-f", "-o"]
    assert args[7:] == ["user-data", "meta-data"]
    assert out.read_text() == "iso\n"


def test_make_seed_iso_reports_the_tools_failure(config_dir, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "genisoimage").write_text(
        "#!/bin/sh\necho 'genisoimage: No space left' >&2\nexit 5\n"
    )
    (bin_dir / "genisoimage").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "iso" / "config.iso"

    with pytest.raises(MonitorError) as info:
        make_seed_iso(config_dir, out)

    assert "exited with 5" in str(info.value) and "No space left" in str(info.value)
    assert list(out.parent.iterdir()) == []  # the partial file is gone
