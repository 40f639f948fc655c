"""Isochronous streams end to end: the emulated headset and webcam as Linux's
snd-usb-audio and uvcvideo use them through vhci-hcd, with arecord, aplay and
v4l2-ctl in the guest."""

from __future__ import annotations

import io
import random
import shutil
import struct
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import write_wav
from usbipy.devices.audio import UsbAudio
from usbipy.devices.pattern import read_number
from usbipy.devices.sound import Tone, WavSink
from usbipy.devices.webcam import Webcam
from usbipy.server import ServerThread

from .conftest import skip_or_fail
from .guest import attach, ports, wait_for, wait_output
from .vm import SERVER_ALIAS, Vm

RATE = 48000
#: A tone whose samples repeat only every 16000 (48000 / gcd(441, 48000)): a block
#: of samples lost or sent twice cannot line up with the tone again by chance.
TONE_HZ = 441.0
CARD = "hw:CARD=audio,DEV=0"  # ALSA's id for the card "usbipy audio"
#: Ceiling of a wait on the host for the guest to make progress (generous: a slow
#: host runs the guest three times slower; the wait ends as soon as it holds).
HOST_WAIT = 120.0


@pytest.fixture(scope="module")
def media(vm: Vm) -> Vm:
    for tool in ("arecord", "aplay", "v4l2-ctl"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is missing (scripts/setup.sh --test installs it)")
    try:
        import PIL  # noqa: F401
    except ImportError:
        skip_or_fail("Pillow is missing (pip install -e '.[test]')")
    vm.check("modprobe -a snd-usb-audio uvcvideo")
    return vm


@pytest.fixture
def clean(media: Vm) -> Iterator[Vm]:
    """The guest with nothing attached afterwards, whatever the test did."""
    yield media
    media.run("pkill arecord; pkill aplay; pkill v4l2-ctl; true")
    for port in ports(media):
        media.run(f"usbip detach -p {port}")
    wait_for(media, "! usbip port | grep -q 'Port in Use'")


def unlinks_sent(vm: Vm) -> int:
    """USBIP_CMD_UNLINKs vhci-hcd has sent so far (it logs each, vhci_hcd.c)."""
    return int(vm.check("dmesg | grep -c 'vhci_hcd: unlink->seqnum'; true").split()[0])


def host_wait(condition: Callable[[], bool], what: str, timeout: float = HOST_WAIT) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def attach_audio(vm: Vm, busid: str) -> None:
    attach(vm, busid)
    wait_for(vm, "[ -e /proc/asound/audio ]")


def samples_of(path: Path) -> tuple[bytes, int, int]:
    with wave.open(str(path), "rb") as wav:
        return wav.readframes(wav.getnframes()), wav.getnchannels(), wav.getframerate()


def check_tone(recording: bytes, tone: Tone, produced: int) -> None:
    """The recording is the tone's samples, in order, with none lost or repeated."""
    assert len(recording) % 2 == 0
    # the frequency, from the rising zero crossings
    values = struct.unpack(f"<{len(recording) // 2}h", recording)
    crossings = [i for i in range(1, len(values)) if values[i - 1] < 0 <= values[i]]
    measured = (len(crossings) - 1) * RATE / (crossings[-1] - crossings[0])
    assert abs(measured - TONE_HZ) / TONE_HZ < 0.01, measured
    # sample for sample: where the recording starts in what the microphone made,
    # and that everything after lines up
    expected = tone.samples(0, produced, RATE)
    start = expected.find(recording[:512])
    while start % 2:  # (a match must fall on a sample)
        start = expected.find(recording[:512], start + 1)
    assert start >= 0, "the recording does not start with the tone's samples"
    window = expected[start:start + len(recording)]
    if window != recording:
        bad = next(i for i in range(0, len(recording), 2)
                   if window[i:i + 2] != recording[i:i + 2])
        raise AssertionError(f"the recording departs from the tone at sample {bad // 2} "
                             f"of {len(recording) // 2}: a block lost or repeated")


def test_microphone_records_the_tone_with_no_gap(clean: Vm, tmp_path: Path) -> None:
    vm = clean
    tone = Tone(TONE_HZ)
    device = UsbAudio(tone)
    with ServerThread([device], port=vm.server_port):
        attach_audio(vm, "1-1")
        assert "usbipy audio" in vm.check("cat /proc/asound/cards")
        # snd-usb-audio holds the control and both streaming interfaces
        bound = vm.check("ls /sys/bus/usb/drivers/snd-usb-audio/").split()
        assert sum(":1." in name for name in bound) == 3, bound
        vm.check(f"arecord -q -D {CARD} -f S16_LE -r {RATE} -c 1 -d 5 /run/vm/mic.wav",
                 timeout=300)
        data, channels, rate = samples_of(vm.io_dir / "mic.wav")
        assert (channels, rate) == (1, RATE)
        # 5 s at 48 kHz: every sample, counted
        assert len(data) == 5 * RATE * 2
        assert device.frames_recorded >= 5 * RATE
        check_tone(data, tone, tone.position)


def strip_silence(data: bytes, frame: int) -> bytes:
    start, end = 0, len(data)
    while start < end and data[start:start + frame] == bytes(frame):
        start += frame
    while end > start and data[end - frame:end] == bytes(frame):
        end -= frame
    return data[start:end]


def test_speaker_plays_a_wav_file_bit_for_bit(clean: Vm, tmp_path: Path) -> None:
    vm = clean
    rng = random.Random(17)
    frames = 2 * RATE  # 2 s of stereo noise with no silent frame in it
    noise = struct.pack(f"<{2 * frames}h",
                        *(rng.randint(-20000, 20000) or 1 for _ in range(2 * frames)))
    # then 250 ms of silence: ALSA's drain may end the stream before the last few
    # milliseconds are sent (snd-usb-audio counts them played once queued), which
    # must not cut into the noise
    write_wav(vm.io_dir / "play.wav", noise + bytes(RATE // 4 * 4), channels=2, rate=RATE)
    sink = WavSink(tmp_path / "speaker.wav")
    device = UsbAudio(Tone(), sink)
    with ServerThread([device], port=vm.server_port):
        attach_audio(vm, "1-1")
        vm.check(f"aplay -q -D {CARD} /run/vm/play.wav", timeout=300)
        sink.flush()
        assert device.frames_played >= frames
    sink.close()
    heard, channels, rate = samples_of(tmp_path / "speaker.wav")
    assert (channels, rate) == (2, RATE)
    # the noise, bit for bit, with silence before and after it only
    got = strip_silence(heard, 4)
    assert len(got) == len(noise), (len(got), len(noise))
    assert got == noise


def video_node(vm: Vm) -> str:
    script = ("for d in /sys/class/video4linux/video*; do grep -q 'usbipy webcam' $d/name "
              "2>/dev/null && [ \"$(cat $d/index)\" = 0 ] && echo /dev/$(basename $d); done")
    return wait_output(vm, script).split()[0]


def capture(vm: Vm, node: str, fmt: str, width: int, height: int, count: int) -> bytes:
    out = f"/run/vm/{fmt}-{width}.raw"
    vm.check(f"v4l2-ctl -d {node} --set-fmt-video=width={width},height={height},"
             f"pixelformat={fmt} --set-parm=30 --stream-mmap --stream-count={count} "
             f"--stream-to={out}", timeout=300)
    return (vm.io_dir / Path(out).name).read_bytes()


def in_order(numbers: list[int]) -> bool:
    """Frames sent one after another, as the guest received them: distinct, and none
    behind the frame two places before it. (uvcvideo copies each URB's payload on an
    unbound workqueue, drivers/media/usb/uvc/uvc_driver.c's "uvcvideo" async_wq, so on
    a guest of two CPUs two frames' buffers may complete swapped; usbipy numbers and
    sends them in order, which a frame further back would contradict.)"""
    return len(set(numbers)) == len(numbers) and all(
        later > earlier for earlier, later in zip(numbers, numbers[2:], strict=False))


def frame_numbers(data: bytes, fmt: str, width: int, height: int) -> list[int]:
    """The frame number of each captured frame, checking that it decodes and is whole."""
    from PIL import Image

    if fmt == "YUYV":
        size = width * height * 2
        assert len(data) % size == 0, f"{len(data)} bytes is not a whole number of frames"
        frames = [data[i:i + size][0::2] for i in range(0, len(data), size)]
    else:
        frames = []
        for jpeg in data.split(b"\xff\xd8")[1:]:
            image = Image.open(io.BytesIO(b"\xff\xd8" + jpeg))
            image.load()  # decodes, or raises on a truncated image
            assert image.size == (width, height)
            frames.append(image.convert("YCbCr").getchannel(0).tobytes())
    numbers = []
    for luma in frames:
        top, bottom = read_number(luma, width, height)
        assert top == bottom, f"a torn frame: {top} at the top, {bottom} at the bottom"
        numbers.append(top)
    return numbers


@pytest.mark.parametrize("transport", ["iso", "bulk"])
def test_webcam_streams_numbered_frames_in_yuy2_and_mjpeg(clean: Vm, transport: str) -> None:
    vm = clean
    with ServerThread([Webcam(transport=transport)], port=vm.server_port):
        attach(vm, "1-1")
        node = video_node(vm)
        formats = vm.check(f"v4l2-ctl -d {node} --list-formats-ext")
        assert "'YUYV'" in formats and "'MJPG'" in formats and "320x240" in formats
        seen: list[int] = []
        for fmt, width, height in (("YUYV", 320, 240), ("MJPG", 160, 120)):
            numbers = frame_numbers(capture(vm, node, fmt, width, height, 30), fmt, width,
                                    height)
            assert len(numbers) == 30, numbers
            assert in_order(numbers), f"frames out of order: {numbers}"
            assert not seen or min(numbers) > max(seen)
            seen += numbers


def test_unlink_mid_stream_then_the_stream_resumes(clean: Vm) -> None:
    vm = clean
    tone = Tone(TONE_HZ)
    audio = UsbAudio(tone)
    camera = Webcam(formats=("yuyv",))
    with ServerThread([audio, camera], port=vm.server_port):
        attach_audio(vm, "1-1")
        # closing the PCM mid-stream: snd-usb-audio kills its URBs (USBIP_CMD_UNLINK)
        vm.check(f"(arecord -q -D {CARD} -f S16_LE -r {RATE} -c 1 -d 60 /dev/null "
                 "> /dev/null 2>&1 &)")
        host_wait(lambda: audio.frames_recorded > RATE // 2, "the microphone to stream")
        unlinks = unlinks_sent(vm)
        vm.check("pkill -INT arecord; while pgrep arecord >/dev/null; do sleep 0.1; done")
        assert unlinks_sent(vm) > unlinks
        vm.check(f"arecord -q -D {CARD} -f S16_LE -r {RATE} -c 1 -d 2 /run/vm/again.wav",
                 timeout=300)
        data, _channels, _rate = samples_of(vm.io_dir / "again.wav")
        assert len(data) == 2 * RATE * 2
        check_tone(data, tone, tone.position)

        attach(vm, "1-2")
        node = video_node(vm)
        vm.check(f"(v4l2-ctl -d {node} --set-fmt-video=width=160,height=120,pixelformat=YUYV "
                 "--stream-mmap --stream-count=100000 > /dev/null 2>&1 &)")
        host_wait(lambda: camera.stream is not None and camera.stream.frames_sent > 10,
                  "the webcam to stream")
        unlinks = unlinks_sent(vm)
        vm.check("pkill v4l2-ctl; while pgrep v4l2-ctl >/dev/null; do sleep 0.1; done")
        assert unlinks_sent(vm) > unlinks
        before = camera.frame_number if camera.stream is None else camera.stream.number
        numbers = frame_numbers(capture(vm, node, "YUYV", 160, 120, 10), "YUYV", 160, 120)
        assert len(numbers) == 10 and in_order(numbers), numbers
        assert min(numbers) >= before, (before, numbers)


def test_detach_mid_stream_leaves_the_server_serving(clean: Vm) -> None:
    vm = clean
    tone = Tone(TONE_HZ)
    audio = UsbAudio(tone)
    camera = Webcam(formats=("yuyv",))
    with ServerThread([audio, camera], port=vm.server_port) as server:
        attach_audio(vm, "1-1")
        attach(vm, "1-2")
        node = video_node(vm)
        vm.check(f"(arecord -q -D {CARD} -f S16_LE -r {RATE} -c 1 -d 60 /dev/null "
                 "> /dev/null 2>&1 &)")
        vm.check(f"(v4l2-ctl -d {node} --set-fmt-video=width=160,height=120,pixelformat=YUYV "
                 "--stream-mmap --stream-count=100000 > /dev/null 2>&1 &)")
        host_wait(lambda: audio.frames_recorded > RATE // 2
                  and camera.stream is not None and camera.stream.frames_sent > 5,
                  "both devices to stream")
        for port in ports(vm):
            vm.check(f"usbip detach -p {port}")
        wait_for(vm, "! usbip port | grep -q 'Port in Use'")
        vm.run("pkill arecord; pkill v4l2-ctl; true")
        # both offered again, and both stream again
        wait_for(vm, f"usbip list -r {SERVER_ALIAS} | grep -q ' 1-1:' && "
                     f"usbip list -r {SERVER_ALIAS} | grep -q ' 1-2:'")
        assert server.loop.is_running()
        attach_audio(vm, "1-1")
        vm.check(f"arecord -q -D {CARD} -f S16_LE -r {RATE} -c 1 -d 1 /run/vm/after.wav",
                 timeout=300)
        data, _channels, _rate = samples_of(vm.io_dir / "after.wav")
        check_tone(data, tone, tone.position)
        attach(vm, "1-2")
        node = video_node(vm)
        numbers = frame_numbers(capture(vm, node, "YUYV", 160, 120, 5), "YUYV", 160, 120)
        assert len(numbers) == 5 and in_order(numbers), numbers
