"""The emulated headset (USB Audio 1.0) through the server and the userspace client,
and its sources and sinks."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import pytest

from tests.helpers import write_wav
from usbipy.client import import_device
from usbipy.client.errors import Stalled
from usbipy.devices.audio import EP_MICROPHONE, EP_SPEAKER, UsbAudio
from usbipy.devices.sound import Tone, WavSink, WavSource, apply_gain
from usbipy.server import UsbipServer
from usbipy.usb import audio as uac
from usbipy.usb.parse import parse_configuration

HOST = "127.0.0.1"
MIC_PACKET = 98  # wMaxPacketSize: 49 mono frames


def test_the_descriptors_are_what_snd_usb_audio_reads() -> None:
    device = UsbAudio()
    raw = device.descriptors.configuration_descriptors[0]
    config = parse_configuration(raw)  # strict: every length adds up
    assert [len(alts) for alts in config.interfaces] == [1, 2, 2]
    control = config.interfaces[0][0]
    assert (control.bInterfaceClass, control.bInterfaceSubClass) == (uac.AUDIO,
                                                                      uac.AUDIOCONTROL)
    # the AC header's wTotalLength covers it and its units and terminals
    header = control.extra
    assert header[2] == uac.HEADER and struct.unpack_from("<H", header, 5)[0] == len(header)
    assert list(header[8:10]) == [1, 2]  # its streaming interfaces
    subtypes = []
    offset = header[0]
    while offset < len(header):
        subtypes.append((header[offset + 2], header[offset + 3]))
        offset += header[offset]
    assert subtypes == [(uac.INPUT_TERMINAL, 1), (uac.FEATURE_UNIT, 2),
                        (uac.OUTPUT_TERMINAL, 3), (uac.INPUT_TERMINAL, 4),
                        (uac.FEATURE_UNIT, 5), (uac.OUTPUT_TERMINAL, 6)]
    for number, address, attributes, size in ((1, EP_SPEAKER, uac.ISO_ADAPTIVE, 196),
                                              (2, EP_MICROPHONE, uac.ISO_ASYNC, MIC_PACKET)):
        idle, streaming = config.interfaces[number]
        assert idle.bNumEndpoints == 0  # alternate setting 0: no bandwidth
        (endpoint,) = streaming.endpoints
        assert (endpoint.bEndpointAddress, endpoint.bmAttributes, endpoint.wMaxPacketSize,
                endpoint.bInterval, endpoint.bLength) == (address, attributes, size, 1, 9)
        assert endpoint.extra[1:3] == bytes((uac.CS_ENDPOINT, uac.EP_GENERAL))
        # AS_GENERAL, then the Type I format with its four rates
        assert streaming.extra[2] == uac.AS_GENERAL and streaming.extra[9] == uac.FORMAT_TYPE
        rates = streaming.extra[7 + 8:]
        assert [int.from_bytes(rates[i:i + 3], "little") for i in range(0, 12, 3)] == [
            48000, 44100, 32000, 16000]


async def open_mic(server: UsbipServer, rate: int = 48000):
    dev = await import_device(HOST, "1-1", server.port)
    await dev.control(0x00, 9, 1, 0, b"")  # SET_CONFIGURATION 1
    await dev.control(0x01, 11, 1, 2, b"")  # SET_INTERFACE 2, alternate 1
    await dev.control(0x22, uac.SET_CUR, 0x0100, EP_MICROPHONE, rate.to_bytes(3, "little"))
    return dev


def test_the_microphone_sends_its_tone_a_millisecond_a_packet(serve) -> None:
    tone = Tone(441.0)

    async def test(server: UsbipServer) -> None:
        dev = await open_mic(server)
        assert await dev.control(0xA2, uac.GET_CUR, 0x0100, EP_MICROPHONE, 3) == \
            (48000).to_bytes(3, "little")
        first = await dev.iso_read(EP_MICROPHONE, [MIC_PACKET] * 10)
        # 48 frames of 2 bytes in each 98-byte packet: short packets, status 0
        assert [(r.actual_length, r.status) for r in first] == [(96, 0)] * 10
        # the next URB comes a little late (this client waits for each): the
        # milliseconds between went by on the microphone's clock, and their samples
        # follow with one more frame a packet while catching up
        second = await dev.iso_read(EP_MICROPHONE, [MIC_PACKET] * 10)
        assert {r.actual_length for r in second} <= {96, 98}
        received = b"".join(r.data for r in first + second)
        assert received == tone.samples(0, len(received) // 2, 48000)
        # 44.1 kHz: 44 or 45 frames a millisecond, 441 every 10
        await dev.control(0x22, uac.SET_CUR, 0x0100, EP_MICROPHONE,
                          (44100).to_bytes(3, "little"))
        packets = await dev.iso_read(EP_MICROPHONE, [MIC_PACKET] * 20)
        assert {r.actual_length for r in packets} == {88, 90}
        assert sum(r.actual_length for r in packets) == 2 * 882
        await dev.close()

    serve(test, [UsbAudio(tone)])


def test_a_urb_longer_than_the_file_gets_what_there_is(serve, tmp_path: Path) -> None:
    samples = struct.pack("<100h", *range(1, 101))
    path = write_wav(tmp_path / "short.wav", samples)

    async def test(server: UsbipServer) -> None:
        dev = await open_mic(server)
        ret = await dev.iso_read(EP_MICROPHONE, [MIC_PACKET] * 4)
        # 48 + 48 + 4 frames, then an empty packet: what the file has, no error
        assert [(r.actual_length, r.status) for r in ret] == [(96, 0), (96, 0), (8, 0), (0, 0)]
        assert b"".join(r.data for r in ret) == samples
        await dev.close()

    serve(test, [UsbAudio(WavSource(path, loop=False))])


def test_volume_and_mute_act_on_the_samples(serve) -> None:
    tone = Tone(1000.0)

    async def test(server: UsbipServer) -> None:
        dev = await open_mic(server)
        unit = 5 << 8  # the microphone's feature unit, on interface 0
        volume, mute = uac.VOLUME_CONTROL << 8, uac.MUTE_CONTROL << 8
        ranges = [struct.unpack("<h", await dev.control(0xA1, request, volume, unit, 2))[0]
                  for request in (uac.GET_MIN, uac.GET_MAX, uac.GET_RES, uac.GET_CUR)]
        assert ranges == [-60 * 256, 0, 256, 0]
        await dev.control(0x21, uac.SET_CUR, volume, unit, struct.pack("<h", -6 * 256))
        assert await dev.control(0xA1, uac.GET_CUR, volume, unit, 2) == struct.pack("<h",
                                                                                   -1536)
        quieter = b"".join(r.data for r in await dev.iso_read(EP_MICROPHONE, [MIC_PACKET]))
        expected = struct.unpack("<48h", tone.samples(0, 48, 48000))
        got = struct.unpack("<48h", quieter)
        assert all(abs(g - e * 10 ** (-6 / 20)) <= 1 for g, e in zip(got, expected,
                                                                     strict=True))
        await dev.control(0x21, uac.SET_CUR, mute, unit, b"\x01")
        assert await dev.control(0xA1, uac.GET_CUR, mute, unit, 1) == b"\x01"
        silent = await dev.iso_read(EP_MICROPHONE, [MIC_PACKET])
        assert len(silent[0].data) >= 96 and silent[0].data == bytes(len(silent[0].data))
        # no control on a single channel; no unit 9; no rate the format does not list
        with pytest.raises(Stalled):
            await dev.control(0xA1, uac.GET_CUR, volume | 1, unit, 2)
        with pytest.raises(Stalled):
            await dev.control(0xA1, uac.GET_CUR, volume, 9 << 8, 2)
        with pytest.raises(Stalled):
            await dev.control(0x22, uac.SET_CUR, 0x0100, EP_MICROPHONE,
                              (96000).to_bytes(3, "little"))
        await dev.close()

    serve(test, [UsbAudio(tone)])


def test_the_speaker_hands_what_it_plays_to_its_sink(serve) -> None:
    heard: list[tuple[bytes, int]] = []

    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        await dev.control(0x00, 9, 1, 0, b"")
        await dev.control(0x01, 11, 1, 1, b"")  # SET_INTERFACE 1, alternate 1
        packets = [bytes([i]) * 192 for i in range(1, 6)]
        results = await dev.iso_write(EP_SPEAKER, packets)
        assert [(r.status, r.actual_length) for r in results] == [(0, 192)] * 5
        assert b"".join(data for data, _rate in heard) == b"".join(packets)
        assert {rate for _data, rate in heard} == {48000}
        await dev.close()

    serve(test, [UsbAudio(speaker=lambda data, rate: heard.append((data, rate)))])


def test_a_stream_the_host_stopped_is_not_served() -> None:
    from tests.helpers import urb
    from usbipy.backends.base import Completion
    from usbipy.protocol import Direction, IsoPacket
    from usbipy.protocol.constants import ESHUTDOWN

    device = UsbAudio()
    device.submit(urb(1, 0, Direction.OUT, setup=bytes((0, 9, 1, 0, 0, 0, 0, 0))))
    # alternate setting 0: the streaming endpoint is not there
    result = device.submit(urb(2, 2, Direction.IN, 98, iso=[IsoPacket(0, 98)]))
    assert isinstance(result, Completion) and result.status == ESHUTDOWN


def test_wav_sink_writes_a_valid_file_and_restarts_on_a_new_rate(tmp_path: Path) -> None:
    sink = WavSink(tmp_path / "out.wav")
    sink(b"\x01\x00\x02\x00" * 10, 48000)
    sink.flush()
    with wave.open(str(tmp_path / "out.wav")) as wav:  # valid while still open
        assert (wav.getnchannels(), wav.getframerate(), wav.getnframes()) == (2, 48000, 10)
    sink(b"\x03\x00\x04\x00" * 4, 44100)
    sink.close()
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert (wav.getframerate(), wav.readframes(10)) == (44100, b"\x03\x00\x04\x00" * 4)


def test_sources_refuse_what_a_microphone_cannot_play(tmp_path: Path) -> None:
    stereo = write_wav(tmp_path / "stereo.wav", bytes(8), channels=2)
    with pytest.raises(ValueError, match="mono 16-bit"):
        WavSource(stereo)
    with pytest.raises(ValueError, match="frequency"):
        Tone(0)
    with pytest.raises(ValueError, match="amplitude"):
        Tone(440, amplitude=2)


def test_a_looping_source_wraps_and_gain_is_exact_at_0_db(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "loop.wav", struct.pack("<3h", 7, 8, 9), rate=16000)
    source = WavSource(path)
    assert source.rates == (16000,)
    assert struct.unpack("<8h", source.read(8, 16000)) == (7, 8, 9, 7, 8, 9, 7, 8)
    assert struct.unpack("<2h", source.read(2, 16000)) == (9, 7)
    data = struct.pack("<4h", 1, 2, 3, 4)
    assert apply_gain(data, 0, False) == data
    assert apply_gain(data, 0, True) == bytes(8)
    assert struct.unpack("<4h", apply_gain(struct.pack("<4h", 1000, -1000, 32767, -32768),
                                           -20 * 256, False)) == (100, -100, 3277, -3277)


def test_a_late_host_gets_the_missed_samples_until_the_fifo_overflows() -> None:
    import asyncio

    from tests.helpers import urb
    from usbipy.backends.base import Completion
    from usbipy.devices.audio import MIC_FIFO_SECONDS
    from usbipy.protocol import Direction, IsoPacket

    tone = Tone(441.0)
    device = UsbAudio(tone)
    for setup in (bytes((0, 9, 1, 0, 0, 0, 0, 0)), bytes((1, 11, 1, 0, 2, 0, 0, 0))):
        device.submit(urb(1, 0, Direction.OUT, setup=setup))

    async def read(packets: int) -> list[int]:
        iso = [IsoPacket(i * MIC_PACKET, MIC_PACKET) for i in range(packets)]
        future = device.submit(urb(2, 2, Direction.IN, MIC_PACKET * packets, iso=iso))
        assert isinstance(future, asyncio.Future)
        done: Completion = await future
        return [p.actual_length // 2 for p in done.iso_packets or []]

    async def main() -> None:
        assert await read(10) == [48] * 10
        # the host is away 20 ms: those 960 samples wait, and go out one more a packet
        device._clock.origin -= 0.020
        assert await read(100) == [49] * 100
        assert device.samples_lost == 0
        # away for longer than the FIFO holds: the time beyond it is lost, no more;
        # the tone is not read for it, and goes on where it was
        device._clock.origin -= 0.5
        before, backlog = tone.position, 960 - 100
        got = await read(10)
        assert got == [49] * 10
        lost = device.samples_lost
        fifo = int(48000 * MIC_FIFO_SECONDS)
        # (the frames from the last URB's end to this one's start: 500 ms, and as
        # long again as a busy machine took between the two URBs)
        assert 500 * 48 + backlog - fifo <= lost < 1500 * 48 + backlog - fifo
        assert tone.position - before == 10 * 49

    asyncio.run(main())


def test_the_server_closing_writes_out_what_the_speaker_played(tmp_path: Path) -> None:
    from tests.helpers import urb
    from usbipy.protocol import Direction, IsoPacket

    async def play() -> None:
        device.submit(urb(1, 0, Direction.OUT, setup=bytes((0, 9, 1, 0, 0, 0, 0, 0))))
        device.submit(urb(1, 0, Direction.OUT, setup=bytes((1, 11, 1, 0, 1, 0, 0, 0))))
        future = device.submit(urb(2, 1, Direction.OUT, data=b"\x05\x00\x06\x00" * 48,
                                   iso=[IsoPacket(0, 192)]))
        await future  # type: ignore[misc]

    import asyncio

    device = UsbAudio(speaker=WavSink(tmp_path / "played.wav"))
    asyncio.run(play())
    device.close()  # what the server does when it stops
    with wave.open(str(tmp_path / "played.wav")) as wav:
        assert wav.readframes(100) == b"\x05\x00\x06\x00" * 48


def test_odd_bytes_from_a_client_do_not_shift_the_speaker(serve) -> None:
    heard: list[bytes] = []

    async def test(server: UsbipServer) -> None:
        dev = await import_device(HOST, "1-1", server.port)
        await dev.control(0x00, 9, 1, 0, b"")
        await dev.control(0x01, 11, 1, 1, b"")
        await dev.iso_write(EP_SPEAKER, [b"\x01\x00\x02\x00" * 47 + b"\x09", b"\x03\x00\x04\x00"])
        assert b"".join(heard) == b"\x01\x00\x02\x00" * 47 + b"\x03\x00\x04\x00"
        await dev.close()

    serve(test, [UsbAudio(speaker=lambda data, rate: heard.append(data))])


def test_a_wav_sink_made_before_a_fork_writes_in_the_child(tmp_path: Path) -> None:
    """usbipyd -D makes its devices, then forks: the sink's writer must be the child's."""
    import os

    sink = WavSink(tmp_path / "forked.wav")
    pid = os.fork()
    if pid == 0:  # the child: what the daemon does
        try:
            sink(b"\x07\x00\x08\x00" * 10, 48000)
            sink.close()
        finally:
            os._exit(0)
    _pid, status = os.waitpid(pid, 0)
    assert status == 0
    with wave.open(str(tmp_path / "forked.wav")) as wav:
        assert wav.readframes(20) == b"\x07\x00\x08\x00" * 10


def test_a_sink_that_fails_drops_and_counts_but_never_truncates(tmp_path: Path) -> None:
    sink = WavSink(tmp_path / "out.wav")
    sink(b"\x01\x00\x02\x00" * 10, 48000)
    sink.flush()

    def failing(data: bytes, rate: int) -> None:
        raise OSError(28, "No space left on device")

    sink._write = failing  # type: ignore[method-assign]
    sink(b"\x03\x00\x04\x00" * 5, 48000)
    sink(b"\x05\x00\x06\x00" * 7, 48000)
    sink.flush()  # the writer is alive: this returns
    assert sink.frames_dropped == 7
    sink.close()
    with wave.open(str(tmp_path / "out.wav")) as wav:  # what was written stays
        assert wav.readframes(100) == b"\x01\x00\x02\x00" * 10


def test_the_control_interface_has_no_stream_to_end() -> None:
    import asyncio

    from tests.helpers import urb
    from usbipy.protocol import Direction, IsoPacket

    async def main() -> None:
        device = UsbAudio(Tone(441.0))
        for setup in (bytes((0, 9, 1, 0, 0, 0, 0, 0)), bytes((1, 11, 1, 0, 2, 0, 0, 0))):
            device.submit(urb(1, 0, Direction.OUT, setup=setup))
        queued = device.submit(urb(2, 2, Direction.IN, 98 * 20,
                                   iso=[IsoPacket(98 * i, 98) for i in range(20)]))
        device.submit(urb(3, 0, Direction.OUT, setup=bytes((1, 11, 0, 0, 0, 0, 0, 0))))
        done = await queued  # type: ignore[misc]
        assert done.status == 0 and len(done.data) >= 20 * 96

    asyncio.run(main())
