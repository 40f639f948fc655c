"""An emulated USB audio headset: a microphone and a speaker (USB Audio Class 1.0).

Why 1.0 and not 2.0: a 1.0 device runs at full speed, where one packet a
millisecond carries 48 kHz stereo with room to spare, and every host has a
driver for it (Linux's snd-usb-audio, macOS, and Windows since XP, while
Windows has shipped a 2.0 driver only since Windows 10 1703). 2.0 adds clock
entities and high-speed rates that a headset does not need.

The topology (USB Audio 1.0, 3.5):

    speaker:    USB streaming IT 1 -> feature unit 2 (mute, volume) -> speaker OT 3
    microphone: microphone IT 4    -> feature unit 5 (mute, volume) -> USB streaming OT 6

Interface 0 is AudioControl; interface 1 carries the speaker's isochronous OUT
endpoint (adaptive: the device follows the host's rate), interface 2 the
microphone's isochronous IN endpoint (asynchronous: the device's clock, which
here is the server's monotonic clock). Alternate setting 0 of each streaming
interface has no endpoint, so a stream that is not running takes no bandwidth.
Each packet carries the samples of its millisecond; URBs complete when their
frames have passed (:mod:`usbipy.backends.isochronous`), so the host sees the
nominal rate with no drift.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from ..backends.base import Completion, SubmitResult
from ..backends.emulated import EmulatedDevice, Stall
from ..backends.isochronous import (
    BusClock,
    IsoSchedule,
    IsoWindow,
    in_completion,
    out_completion,
    out_packets,
)
from ..protocol import CmdSubmit, Speed
from ..protocol.constants import EPIPE, ESHUTDOWN
from ..usb import audio as uac
from ..usb.descriptors import Configuration, Device, Endpoint, Interface, TransferType
from ..usb.requests import Setup
from .sound import AudioSink, AudioSource, Tone, apply_gain

log = logging.getLogger(__name__)

#: The sample rates the headset offers when its source does not restrict them.
RATES = (48000, 44100, 32000, 16000)
EP_SPEAKER = 0x01
EP_MICROPHONE = 0x82
SPEAKER_CHANNELS = 2
MIC_CHANNELS = 1
SPEAKER_UNIT = 2
MIC_UNIT = 5
#: What the microphone holds for a host that is late: beyond, samples are lost.
MIC_FIFO_SECONDS = 0.1
#: The feature units' volume range and step, in 1/256 dB: -60 dB to 0 dB by 1 dB.
VOLUME_MIN, VOLUME_MAX, VOLUME_RES = -60 * 256, 0, 256

_ISO = TransferType.ISOCHRONOUS


def _packet_size(rates: tuple[int, ...], channels: int) -> int:
    """wMaxPacketSize: the most sample frames of one millisecond, plus one for a
    host that evens out a fractional rate (44.1 kHz is 44 and 45 frames)."""
    return (max(rates) // 1000 + 1) * 2 * channels


def _descriptor(mic_rates: tuple[int, ...], speaker_rates: tuple[int, ...]) -> Device:
    units = (
        uac.input_terminal(1, uac.TT_USB_STREAMING, SPEAKER_CHANNELS, 0x0003)  # left, right
        + uac.feature_unit(SPEAKER_UNIT, 1, uac.FU_MUTE | uac.FU_VOLUME, SPEAKER_CHANNELS)
        + uac.output_terminal(3, uac.TT_SPEAKER, SPEAKER_UNIT)
        + uac.input_terminal(4, uac.TT_MICROPHONE, MIC_CHANNELS, 0x0000)
        + uac.feature_unit(MIC_UNIT, 4, uac.FU_MUTE | uac.FU_VOLUME, MIC_CHANNELS)
        + uac.output_terminal(6, uac.TT_USB_STREAMING, MIC_UNIT)
    )
    header_length = len(uac.ac_header(0, (1, 2)))
    control = uac.ac_header(header_length + len(units), (1, 2)) + units

    def streaming(number: int, name: str, terminal: int, channels: int,
                  rates: tuple[int, ...], endpoint: Endpoint) -> tuple[Interface, Interface]:
        return (
            Interface(number, uac.AUDIO, uac.AUDIOSTREAMING, name=name),
            Interface(number, uac.AUDIO, uac.AUDIOSTREAMING, bAlternateSetting=1, name=name,
                      class_descriptors=uac.as_general(terminal)
                      + uac.format_type_i(channels, 2, rates),
                      endpoints=(endpoint,)),
        )

    speaker = Endpoint(EP_SPEAKER, uac.ISO_ADAPTIVE,
                       _packet_size(speaker_rates, SPEAKER_CHANNELS), 1, extra=b"\0\0",
                       class_descriptors=uac.cs_endpoint(uac.EP_SAMPLING_FREQ))
    mic = Endpoint(EP_MICROPHONE, uac.ISO_ASYNC, _packet_size(mic_rates, MIC_CHANNELS), 1,
                   extra=b"\0\0", class_descriptors=uac.cs_endpoint(uac.EP_SAMPLING_FREQ))
    return Device(
        idVendor=0x1209, idProduct=0x0004, bcdDevice=0x0100, speed=Speed.FULL,
        manufacturer="usbipy", product="usbipy audio", serial_number="AUDIO0001",
        configurations=(Configuration(bMaxPower=50, interfaces=(
            Interface(0, uac.AUDIO, uac.AUDIOCONTROL, class_descriptors=control),
            *streaming(1, "usbipy speaker", 1, SPEAKER_CHANNELS, speaker_rates, speaker),
            *streaming(2, "usbipy microphone", 6, MIC_CHANNELS, mic_rates, mic),
        )),),
    )


class FeatureUnit:
    """A feature unit's master mute and volume (USB Audio 1.0, 5.2.2.4)."""

    def __init__(self) -> None:
        self.muted = False
        self.volume = 0  # 1/256 dB

    def request(self, setup: Setup, data: bytes) -> bytes | None:
        control, channel = setup.wValue >> 8, setup.wValue & 0xFF
        if channel != 0:
            raise Stall  # controls on the master channel only (bmaControls(0))
        if control == uac.MUTE_CONTROL:
            if setup.bRequest == uac.SET_CUR and len(data) >= 1:
                self.muted = bool(data[0])
                return None
            if setup.bRequest == uac.GET_CUR:
                return bytes((self.muted,))
        elif control == uac.VOLUME_CONTROL:
            if setup.bRequest == uac.SET_CUR and len(data) >= 2:
                value = struct.unpack("<h", data[:2])[0]
                # 0x8000 is silence (5.2.2.4.3.2); otherwise kept within the range
                self.volume = (uac.VOLUME_SILENCE if value == uac.VOLUME_SILENCE
                               else max(VOLUME_MIN, min(VOLUME_MAX, value)))
                return None
            answers = {uac.GET_CUR: self.volume, uac.GET_MIN: VOLUME_MIN,
                       uac.GET_MAX: VOLUME_MAX, uac.GET_RES: VOLUME_RES}
            if setup.bRequest in answers:
                return struct.pack("<h", answers[setup.bRequest])
        raise Stall

    def apply(self, data: bytes) -> bytes:
        return apply_gain(data, self.volume, self.muted or self.volume == uac.VOLUME_SILENCE)


class UsbAudio(EmulatedDevice):
    """A full-speed USB Audio 1.0 headset.

    ``microphone`` gives the samples the host records (mono S16_LE; a
    :class:`~usbipy.devices.sound.Tone` by default, or a
    :class:`~usbipy.devices.sound.WavSource`); ``speaker`` receives what the
    host plays (stereo S16_LE), for instance a
    :class:`~usbipy.devices.sound.WavSink` or any function ``(data, rate)``.
    """

    def __init__(self, microphone: AudioSource | None = None,
                 speaker: AudioSink | None = None) -> None:
        self.microphone = microphone if microphone is not None else Tone()
        self.speaker = speaker
        self.mic_rates = tuple(self.microphone.rates or RATES)
        self.speaker_rates = RATES
        self.descriptor = _descriptor(self.mic_rates, self.speaker_rates)
        super().__init__()
        self.units = {SPEAKER_UNIT: FeatureUnit(), MIC_UNIT: FeatureUnit()}
        #: The sample rate of each streaming endpoint (SET_CUR SAMPLING_FREQ_CONTROL).
        self.rates = {EP_SPEAKER: self.speaker_rates[0], EP_MICROPHONE: self.mic_rates[0]}
        self._clock = BusClock(Speed.FULL)
        self._schedules: dict[int, IsoSchedule] = {}
        #: Sample frames the host has played to the speaker and recorded from the microphone.
        self.frames_played = 0
        self.frames_recorded = 0
        #: Microphone time lost to overruns (the host away too long), in samples.
        self.samples_lost = 0
        #: The (micro)frame the microphone's stream started in, and the sample
        #: frames sent since.
        self._mic_start: int | None = None
        self._mic_sent = 0

    # --- streaming ------------------------------------------------------------

    def _schedule(self, endpoint: Endpoint) -> IsoSchedule:
        schedule = self._schedules.get(endpoint.bEndpointAddress)
        if schedule is None:
            schedule = self._schedules[endpoint.bEndpointAddress] = IsoSchedule(
                self._clock, endpoint)
        return schedule

    def transfer(self, endpoint: Endpoint, urb: CmdSubmit) -> SubmitResult:
        if endpoint.transfer_type is not _ISO or urb.iso_packets is None:
            return Completion(status=EPIPE)
        schedule = self._schedule(endpoint)
        window = schedule.place(urb)
        if window.status:
            return Completion(status=window.status)
        if endpoint.bEndpointAddress == EP_MICROPHONE:
            return self._record(urb, window, schedule)
        return self._play(urb, window, schedule)

    def _record(self, urb: CmdSubmit, window: IsoWindow,
                schedule: IsoSchedule) -> asyncio.Future[Completion]:
        def recorded() -> Completion:
            # read when the URB completes, as a live microphone would be: an
            # unlinked URB takes no samples
            unit = self.units[MIC_UNIT]
            room = schedule.endpoint.wMaxPacketSize // (2 * MIC_CHANNELS)
            payloads = [unit.apply(self._mic_samples(frame, min(room, packet.length // 2)))
                        for frame, packet in zip(window.frames, urb.iso_packets or [],
                                                 strict=True)]
            completion = in_completion(urb, window, payloads)
            self.frames_recorded += len(completion.data) // (2 * MIC_CHANNELS)
            return completion

        return schedule.complete(window, recorded)

    def _mic_samples(self, frame: int, room: int) -> bytes:
        """The samples sent in ``frame``: those the microphone's clock made by the
        frame's end and not yet sent, up to ``room``.

        As an asynchronous endpoint does (USB Audio 1.0, 3.7.2.2), packet sizes
        follow the device's clock: 48 frames a millisecond at 48 kHz, 44 or 45 at
        44.1 kHz, and one more while catching up on milliseconds the host left
        without a URB. So a late host loses no samples and sees no drift, until
        more than :data:`MIC_FIFO_SECONDS` pile up: then the time beyond is lost
        (an overrun, counted in :attr:`samples_lost`). The source is not read for
        that time, so a tone or a file goes on where it was.
        """
        rate = self.rates[EP_MICROPHONE]
        if self._mic_start is None:
            self._mic_start = frame
        made = (frame + 1 - self._mic_start) * rate // 1000
        backlog = made - self._mic_sent
        fifo = int(rate * MIC_FIFO_SECONDS)
        if backlog > fifo:
            self.samples_lost += backlog - fifo
            self._mic_sent += backlog - fifo
            backlog = fifo
        data = self.microphone.read(max(0, min(backlog, room)), rate)
        self._mic_sent += len(data) // (2 * MIC_CHANNELS)
        return data

    def _play(self, urb: CmdSubmit, window: IsoWindow,
              schedule: IsoSchedule) -> asyncio.Future[Completion]:
        rate = self.rates[EP_SPEAKER]
        packets = out_packets(urb)
        completion = out_completion(urb, window)

        frame_size = 2 * SPEAKER_CHANNELS
        # whole sample frames only: a client's odd bytes would shift every later sample
        packets = [p[:len(p) - len(p) % frame_size] for p in packets]

        def played() -> Completion:
            data = self.units[SPEAKER_UNIT].apply(b"".join(packets))
            self.frames_played += len(data) // (2 * SPEAKER_CHANNELS)
            if self.speaker is not None and data:
                self.speaker(data, rate)
            return completion

        return schedule.complete(window, played)

    def on_interface(self, interface: int, alternate: int) -> None:
        # a stream starts or stops: its URBs still queued end -ESHUTDOWN
        address = {1: EP_SPEAKER, 2: EP_MICROPHONE}.get(interface)
        if address is None:
            return  # (the AudioControl interface has no stream)
        schedule = self._schedules.pop(address, None)
        if schedule is not None:
            schedule.shutdown(ESHUTDOWN)
        if interface == 2:
            self._mic_start, self._mic_sent = None, 0

    def close(self) -> None:
        """The server shuts down: what the speaker played is written out."""
        close = getattr(self.speaker, "close", None)
        if callable(close):
            close()

    def on_configuration(self, value: int) -> None:
        for schedule in self._schedules.values():
            schedule.shutdown(ESHUTDOWN)
        self._schedules.clear()
        self._mic_start, self._mic_sent = None, 0

    # --- class requests ------------------------------------------------------------

    def interface_request(self, interface: int, setup: Setup, data: bytes) -> bytes | None:
        unit = self.units.get(setup.wIndex >> 8)
        if interface != 0 or unit is None or setup.bmRequestType not in (0x21, 0xA1):
            raise Stall
        return unit.request(setup, data)

    def control_request(self, setup: Setup, data: bytes) -> bytes | None:
        # the sampling frequency of a streaming endpoint (USB Audio 1.0, 5.2.3.2.3.1)
        address = setup.wIndex & 0xFF
        if (setup.bmRequestType not in (0x22, 0xA2) or address not in self.rates
                or setup.wValue >> 8 != uac.SAMPLING_FREQ_CONTROL):
            raise Stall
        rates = self.speaker_rates if address == EP_SPEAKER else self.mic_rates
        if setup.bRequest == uac.SET_CUR and len(data) >= 3:
            rate = int.from_bytes(data[:3], "little")
            if rate not in rates:
                log.info("audio: the host asked for %d Hz on endpoint %#04x; offered: %s",
                         rate, address, rates)
                raise Stall
            self.rates[address] = rate
            if address == EP_MICROPHONE:
                self._mic_start, self._mic_sent = None, 0  # its clock starts afresh
            return None
        if setup.bRequest == uac.GET_CUR:
            return self.rates[address].to_bytes(3, "little")
        raise Stall
