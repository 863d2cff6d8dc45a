"""The screenshot store and job: change detection, PNG files and thumbnails, atomic writes,
failures, and forgetting runners that are gone.

Pure store tests use real files in a temporary directory; the job is tested through
`Monitor.refresh_screenshots` with the hand-written fake hypervisor, and once end to end with
`LibvirtHypervisor` on libvirt's test driver (a private node file).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from monitor import loop
from monitor.errors import MonitorError
from monitor.screenshots import THUMBNAIL_SIZE
from monitor.screenshots import PassResult
from monitor.screenshots import ScreenshotStore
from monitor.screenshots import to_png
from tests.fakes import PNG
from tests.fakes import FakeGitHub
from tests.fakes import FakeHypervisor
from tests.support.clock import Clock
from tests.support.constants import NODE_XML
from tests.support.constants import TEST_GUEST_XML
from tests.support.monitor_thread import step


def image_bytes(size: tuple[int, int], color, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, size, color)
    # A mark in one corner, so that a flipped or shifted conversion would show.
    image.putpixel((0, 0), (255, 255, 255) if mode == "RGB" else 255)
    image.save(buffer, fmt)
    return buffer.getvalue()


def open_png(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


def listing(shots: ScreenshotStore, runner_id: int) -> set[str]:
    return set(os.listdir(shots.directory(runner_id)))


def identity(path: Path) -> tuple[int, int, bytes]:
    """What changes when a file is rewritten: its inode (a rename puts a new one in place),
    its modification time and its content."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


@pytest.fixture
def shots(tmp_path) -> ScreenshotStore:
    return ScreenshotStore(tmp_path / "data")


# Change detection ---------------------------------------------------------------------------


def test_unchanged_screen_is_not_re_encoded(shots):
    screen = image_bytes((64, 48), "navy")
    assert shots.save(3, screen) is True
    before = [identity(shots.screenshot_path(3)), identity(shots.thumbnail_path(3))]
    version = shots.version(3)

    assert shots.save(3, screen) is False

    assert (shots.encoded, shots.unchanged, shots.failed) == (1, 1, 0)
    # Not rewritten at all: same inode, same mtime (a rewrite would rename a new file in).
    assert [identity(shots.screenshot_path(3)), identity(shots.thumbnail_path(3))] == before
    assert shots.version(3) == version


def test_changed_screen_is_re_encoded_with_a_new_version(shots):
    shots.save(3, image_bytes((64, 48), "navy"))
    first_version = shots.version(3)
    first_thumbnail = shots.thumbnail_path(3).read_bytes()

    assert shots.save(3, image_bytes((64, 48), "darkred")) is True

    assert (shots.encoded, shots.unchanged) == (2, 0)
    assert open_png(shots.screenshot_path(3)).getpixel((10, 10)) == (139, 0, 0)
    assert open_png(shots.thumbnail_path(3)).getpixel((10, 10)) == (139, 0, 0)
    assert shots.thumbnail_path(3).read_bytes() != first_thumbnail
    assert shots.version(3) not in (None, first_version)


def test_change_detection_is_per_runner(shots):
    screen = image_bytes((64, 48), "navy")

    assert shots.save(1, screen) is True
    assert shots.save(2, screen) is True  # another runner showing the same screen
    assert shots.version(1) == shots.version(2)
    assert shots.encoded == 2


def test_version_is_none_without_a_screenshot(shots):
    assert shots.version(1) is None


def test_version_after_a_restart_comes_from_the_files(shots, tmp_path):
    shots.save(1, image_bytes((64, 48), "navy"))

    restarted = ScreenshotStore(shots.root)

    # The hash is gone with the old process, but the thumbnail is there to show.
    assert restarted.version(1) is not None
    # The same screen after a restart equals the file saved before it: not encoded again
    # (at 1000 runners that first pass cost ~15 s of CPU), and the version is the hash again.
    mtime = restarted.screenshot_path(1).stat().st_mtime_ns
    assert restarted.save(1, image_bytes((64, 48), "navy")) is False
    assert restarted.unchanged == 1 and restarted.encoded == 0
    assert restarted.screenshot_path(1).stat().st_mtime_ns == mtime
    assert restarted.version(1) == shots.version(1)
    # A changed screen is encoded.
    assert restarted.save(1, image_bytes((64, 48), "teal")) is True


# Conversion and thumbnails -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1120, 832), (320, 238)),  # libvirt's test driver
        ((1024, 768), (320, 240)),  # QEMU's std VGA in graphics mode: exactly 4:3
        ((720, 400), (320, 178)),  # VGA text mode
        ((400, 1000), (96, 240)),  # taller than wide: the height limits
        ((100, 50), (100, 50)),  # smaller than the box: never enlarged
    ],
)
def test_thumbnail_fits_the_box_and_keeps_the_aspect_ratio(shots, size, expected):
    shots.save(1, image_bytes(size, "navy"))

    thumbnail = open_png(shots.thumbnail_path(1))
    full = open_png(shots.screenshot_path(1))

    assert thumbnail.size == expected
    assert thumbnail.width <= THUMBNAIL_SIZE[0] and thumbnail.height <= THUMBNAIL_SIZE[1]
    assert full.size == size


def test_png_screen_is_stored_as_it_is(shots):
    screen = image_bytes((1120, 832), 128, mode="L")  # like the test driver's grayscale PNG

    shots.save(1, screen)

    assert shots.screenshot_path(1).read_bytes() == screen
    assert open_png(shots.thumbnail_path(1)).mode == "L"


def test_ppm_screen_like_qemus_is_converted_to_png(shots):
    screen = image_bytes((1024, 768), (200, 10, 10), fmt="PPM")
    assert screen.startswith(b"P6")

    assert shots.save(1, screen) is True

    full = open_png(shots.screenshot_path(1))
    assert full.size == (1024, 768)
    assert full.getpixel((0, 0)) == (255, 255, 255)
    assert full.getpixel((500, 400)) == (200, 10, 10)
    thumbnail = open_png(shots.thumbnail_path(1))
    assert thumbnail.size == (320, 240)
    assert thumbnail.getpixel((160, 120)) == (200, 10, 10)


def test_palette_screen_gets_an_rgb_thumbnail(shots):
    screen = image_bytes((640, 480), 3, mode="P")

    shots.save(1, screen)

    assert open_png(shots.thumbnail_path(1)).mode == "RGB"


def test_to_png_keeps_png_and_converts_ppm():
    png = image_bytes((8, 6), "navy")
    assert to_png(png) == png
    converted = to_png(image_bytes((8, 6), (200, 10, 10), fmt="PPM"))
    with Image.open(io.BytesIO(converted)) as image:
        assert image.format == "PNG" and image.getpixel((3, 3)) == (200, 10, 10)


# Atomic writes and failures -----------------------------------------------------------------


def test_saving_leaves_only_the_two_files(shots):
    (shots.directory(1)).mkdir(parents=True)
    (shots.directory(1) / "console.log").write_text("kept")

    shots.save(1, image_bytes((64, 48), "navy"))
    shots.save(1, image_bytes((64, 48), "darkred"))

    assert listing(shots, 1) == {"console.log", "screenshot.png", "thumbnail.png"}


@pytest.mark.parametrize(
    "garbage",
    [
        b"not an image",
        b"",
        image_bytes((64, 48), "navy")[:-30],  # a PNG cut short, in its image data
        image_bytes((64, 48), "navy", fmt="PPM")[:-100],  # a PPM cut short
    ],
)
def test_unreadable_screen_is_counted_and_keeps_the_old_files(shots, garbage):
    shots.save(1, image_bytes((64, 48), "navy"))
    before = [identity(shots.screenshot_path(1)), identity(shots.thumbnail_path(1))]

    with pytest.raises(MonitorError) as info:
        shots.save(1, garbage)

    assert info.value.status == 503
    assert (shots.encoded, shots.failed) == (1, 1)
    assert [identity(shots.screenshot_path(1)), identity(shots.thumbnail_path(1))] == before
    assert listing(shots, 1) == {"screenshot.png", "thumbnail.png"}


def test_failed_write_leaves_no_temporary_file_and_is_retried(shots, monkeypatch):
    shots.save(1, image_bytes((64, 48), "navy"))
    old_version = shots.version(1)
    real_replace = os.replace

    def replace_fails(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("monitor.screenshots.os.replace", replace_fails)
    new_screen = image_bytes((64, 48), "darkred")

    with pytest.raises(MonitorError, match="No space left"):
        shots.save(1, new_screen)

    assert listing(shots, 1) == {"screenshot.png", "thumbnail.png"}
    assert shots.failed == 1
    assert shots.version(1) == old_version
    # The hash was not taken for the screen that never reached the disk: it is tried again.
    monkeypatch.setattr("monitor.screenshots.os.replace", real_replace)
    assert shots.save(1, new_screen) is True
    assert open_png(shots.screenshot_path(1)).getpixel((10, 10)) == (139, 0, 0)


# Passes ---------------------------------------------------------------------------------------


def capture_from(screens: dict[str, bytes | Exception]):
    def capture(name: str) -> bytes:
        screen = screens[name]
        if isinstance(screen, Exception):
            raise screen
        return screen

    return capture


def test_pass_counts_each_outcome_and_goes_on_after_a_failure(shots):
    screens: dict[str, bytes | Exception] = {
        "g1": image_bytes((64, 48), "navy"),
        "g2": MonitorError("cannot take a screenshot of guest g2: not running", 409),
        "g3": b"garbage",
        "g4": image_bytes((64, 48), "darkred"),
    }
    guests = {1: "g1", 2: "g2", 3: "g3", 4: "g4"}

    first = shots.refresh(guests, capture_from(screens))

    assert (first.encoded, first.unchanged, first.failed) == (2, 0, 2)
    assert first.wall_seconds > 0 and first.cpu_seconds >= 0
    assert shots.last_pass == first
    assert shots.screenshot_path(4).exists()  # after the two failures
    assert not shots.directory(2).exists() and not shots.directory(3).exists()

    screens["g2"] = image_bytes((64, 48), "green")
    second = shots.refresh(guests, capture_from(screens))

    assert (second.encoded, second.unchanged, second.failed) == (1, 2, 1)
    assert (shots.encoded, shots.unchanged, shots.failed) == (3, 2, 3)


def test_pass_forgets_runners_that_are_gone(shots):
    capture = capture_from({"g1": image_bytes((64, 48), "navy"), "g2": PNG})
    shots.refresh({1: "g1", 2: "g2"}, capture)
    (shots.directory(2) / "console.log").write_text("not ours")

    result = shots.refresh({1: "g1"}, capture)

    assert result == PassResult(0, 1, 0, result.wall_seconds, result.cpu_seconds)
    assert listing(shots, 1) == {"screenshot.png", "thumbnail.png"}
    # Runner 2's screen is gone; what else is in its directory stays.
    assert listing(shots, 2) == {"console.log"}
    assert shots.version(2) is None


def test_forget_removes_the_empty_directory(shots):
    shots.save(1, PNG)

    assert shots.forget([]) == [1]

    assert not shots.directory(1).exists()
    assert shots.directory(1).parent.is_dir()


def test_forget_after_a_restart_removes_files_left_on_disk(shots):
    shots.save(1, PNG)
    shots.save(2, PNG)
    # A temporary file a crash left behind, mid-write.
    (shots.directory(2) / ".thumbnail.png.k3j4h5.tmp").write_bytes(b"half")
    (shots.root / "runners" / "notes").mkdir()

    restarted = ScreenshotStore(shots.root)
    gone = restarted.forget([1])

    assert gone == [2]
    assert listing(restarted, 1) == {"screenshot.png", "thumbnail.png"}
    assert not restarted.directory(2).exists()
    assert (shots.root / "runners" / "notes").is_dir()
    assert restarted.forget([1]) == []


# The job, through the monitor ----------------------------------------------------------------


@pytest.fixture
def env(make_config, store):
    config = make_config()  # profiles linux (2 runners) and windows (1)
    hypervisor = FakeHypervisor()
    clock = Clock()
    monitor = loop.Monitor(config, FakeGitHub(), hypervisor, clock=clock)
    step(monitor, clock)  # registers, creates and starts the three guests
    step(monitor, clock)  # and observes them
    yield monitor, hypervisor, clock
    monitor.workers.shutdown()


def guest_names(monitor: loop.Monitor) -> dict[int, str]:
    return {r.id: r.guest_name for r in monitor.observation.runners if r.guest_name}


def test_job_encodes_only_changed_screens(env):
    monitor, hypervisor, _clock = env
    guests = guest_names(monitor)
    assert len(guests) == 3

    assert monitor.guests.refresh_screenshots() == 3
    assert monitor.guests.refresh_screenshots() == 0
    assert monitor.guests.screenshots.last_pass.unchanged == 3

    changed_id, changed_name = next(iter(guests.items()))
    hypervisor.screens[changed_name] = image_bytes((64, 48), "darkred", fmt="PPM")
    old_version = monitor.guests.screenshot_version(changed_id)

    assert monitor.guests.refresh_screenshots() == 1
    assert monitor.guests.screenshots.last_pass.unchanged == 2
    assert monitor.guests.screenshot_version(changed_id) != old_version
    assert (monitor.config.data_path / "runners" / str(changed_id) / "thumbnail.png").exists()


def test_job_goes_on_when_one_guest_fails(env):
    monitor, hypervisor, _clock = env
    hypervisor.fail_next("screenshot_raw", MonitorError("libvirt: cannot take it", 503))

    assert monitor.guests.refresh_screenshots() == 2
    assert monitor.guests.screenshots.last_pass.failed == 1
    assert sum(call[0] == "screenshot_raw" for call in hypervisor.calls) == 3


def test_job_drops_the_screenshot_of_a_destroyed_runner(env):
    monitor, hypervisor, clock = env
    monitor.guests.refresh_screenshots()
    victim_id, victim_name = next(iter(guest_names(monitor).items()))
    hypervisor.destroy_guest(victim_name)  # behind the monitor's back

    step(monitor, clock)
    monitor.guests.refresh_screenshots()

    assert monitor.guests.screenshot_version(victim_id) is None
    assert not (monitor.config.data_path / "runners" / str(victim_id)).exists()


def test_screenshot_now_returns_png_and_updates_the_thumbnail(env):
    monitor, hypervisor, _clock = env
    runner_id, name = next(iter(guest_names(monitor).items()))
    monitor.guests.refresh_screenshots()
    hypervisor.screens[name] = image_bytes((640, 480), (200, 10, 10), fmt="PPM")

    png = monitor.guests.screenshot_now(runner_id)

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (640, 480)
    thumbnail = open_png(monitor.guests.screenshots.thumbnail_path(runner_id))
    assert thumbnail.getpixel((100, 100)) == (200, 10, 10)
    # The next pass finds that screen already saved.
    assert monitor.guests.refresh_screenshots() == 0


def test_screenshot_now_of_a_stopped_guest_is_409(env):
    monitor, hypervisor, _clock = env
    runner_id, name = next(iter(guest_names(monitor).items()))
    hypervisor.guests[name].active = False

    with pytest.raises(MonitorError) as info:
        monitor.guests.screenshot_now(runner_id)

    assert info.value.status == 409


# End to end on libvirt's test driver ---------------------------------------------------------


def test_pass_over_test_driver_guests_skips_unchanged_screens(tmp_path):
    pytest.importorskip("libvirt")
    from monitor.hypervisor.libvirt_hypervisor import LibvirtHypervisor

    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 65536)
    hypervisor = LibvirtHypervisor(f"test://{node}", "default-pool")
    try:
        guests = {1: "linux.1", 2: "linux.2"}
        for name in guests.values():
            hypervisor.create_guest(name, TEST_GUEST_XML.format(profile="linux"), base)
            hypervisor.start_guest(name)
        shots = ScreenshotStore(tmp_path / "data")

        first = shots.refresh(guests, hypervisor.screenshot_raw)
        second = shots.refresh(guests, hypervisor.screenshot_raw)

        assert (first.encoded, first.unchanged, first.failed) == (2, 0, 0)
        assert (second.encoded, second.unchanged, second.failed) == (0, 2, 0)
        # The test driver's fixed picture: a 1120×832 grayscale PNG, stored as it came.
        raw = hypervisor.screenshot_raw("linux.1")
        assert shots.screenshot_path(1).read_bytes() == raw
        assert open_png(shots.screenshot_path(1)).size == (1120, 832)
        assert open_png(shots.thumbnail_path(2)).size == (320, 238)
    finally:
        hypervisor.close()
