"""Where an emulated microphone's samples come from and a speaker's go.

Samples are signed 16-bit little-endian PCM (S16_LE), channels interleaved.
A source is any object with ``read(frames, rate) -> bytes`` (and a ``rates``
tuple, or None for any rate); a sink is any callable ``(data, rate)``.
"""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import wave
from array import array
from pathlib import Path
from typing import BinaryIO, Protocol

log = logging.getLogger(__name__)

#: The longest period (in samples) a tone keeps as a table rather than computing.
MAX_TONE_PERIOD = 1 << 18
#: A WAV file a microphone plays is read whole into memory: refuse bigger ones.
MAX_WAV_BYTES = 256 << 20


class AudioSource(Protocol):
    #: The sample rates this source can give, or None for any.
    rates: tuple[int, ...] | None

    def read(self, frames: int, rate: int) -> bytes:
        """The next ``frames`` sample frames at ``rate``; fewer (or none) at the end."""
        ...


class AudioSink(Protocol):
    def __call__(self, data: bytes, rate: int) -> None:
        """Samples the host played, in order."""
        ...


class Tone:
    """A sine tone, mono, sample-exact: sample ``n`` is always the same value, so a
    recording can be checked against :meth:`samples` for gaps and repeats."""

    rates: tuple[int, ...] | None = None

    def __init__(self, frequency: float = 1000.0, amplitude: float = 0.5) -> None:
        if not 0 < frequency:
            raise ValueError(f"a tone's frequency must be positive, not {frequency}")
        if not 0 <= amplitude <= 1:
            raise ValueError(f"a tone's amplitude is 0..1, not {amplitude}")
        self.frequency = frequency
        self.amplitude = amplitude
        self._whole = float(frequency).is_integer()
        self._tables: dict[int, bytes] = {}
        #: The index of the next sample :meth:`read` gives.
        self.position = 0

    def samples(self, start: int, count: int, rate: int) -> bytes:
        """Samples ``start`` .. ``start + count - 1`` at ``rate``."""
        table = self._table(rate)
        if table is None:
            return self._compute(start, count, rate)
        period = len(table) // 2
        offset = 2 * (start % period)
        out = bytearray()
        while len(out) < 2 * count:
            piece = table[offset:offset + 2 * count - len(out)]
            out += piece
            offset = 0
        return bytes(out)

    def _compute(self, start: int, count: int, rate: int) -> bytes:
        step = 2 * math.pi * self.frequency / rate
        scale = 32767 * self.amplitude
        return _le(array("h", (round(scale * math.sin(step * (n % rate if self._whole else n)))
                               for n in range(start, start + count))))

    def _table(self, rate: int) -> bytes | None:
        """One period of the tone at ``rate``, when it has a short one: a tone of a
        whole number of hertz repeats every rate / gcd(rate, hz) samples."""
        if not self._whole:
            return None
        table = self._tables.get(rate)
        if table is None:
            period = rate // math.gcd(rate, int(self.frequency))
            if period > MAX_TONE_PERIOD:
                return None
            table = self._tables[rate] = self._compute(0, period, rate)
        return table

    def read(self, frames: int, rate: int) -> bytes:
        data = self.samples(self.position, frames, rate)
        self.position += frames
        return data


class WavSource:
    """A mono 16-bit WAV file, played once or in a loop, at the file's own rate."""

    def __init__(self, path: str | Path, *, loop: bool = True) -> None:
        with wave.open(str(path), "rb") as wav:
            if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
                raise ValueError(f"{path}: a microphone plays mono 16-bit WAV files, this one "
                                 f"has {wav.getnchannels()} channels of "
                                 f"{8 * wav.getsampwidth()} bits")
            if wav.getnframes() * 2 > MAX_WAV_BYTES:
                raise ValueError(f"{path}: above {MAX_WAV_BYTES >> 20} MB")
            self.rates: tuple[int, ...] | None = (wav.getframerate(),)
            self._data = wav.readframes(wav.getnframes())
        self.loop = loop
        self._offset = 0

    def read(self, frames: int, rate: int) -> bytes:
        want = 2 * frames
        pieces = []
        while want and self._data:
            if self._offset >= len(self._data):
                if not self.loop:
                    break
                self._offset = 0
            piece = self._data[self._offset:self._offset + want]
            pieces.append(piece)
            self._offset += len(piece)
            want -= len(piece)
        return b"".join(pieces)


class WavSink:
    """Writes what a speaker plays to a WAV file (S16_LE, the speaker's channels).

    Writing happens on a thread of its own, so the server's event loop never
    waits on the disk; :meth:`flush` waits until everything given is written.
    The file is a valid WAV after every write. A change of sample rate starts
    the file afresh, since a WAV file has one rate. After a write fails (a
    full disk), the samples that follow are dropped and counted in
    :attr:`frames_dropped`, as are those that come while the writer is
    :data:`MAX_QUEUED` writes behind.
    """

    #: Writes waiting for the thread (about 4 s of 1 ms packets); beyond, samples
    #: are dropped and counted rather than held without bound.
    MAX_QUEUED = 4096

    def __init__(self, path: str | Path, channels: int = 2) -> None:
        self.path = Path(path)
        self.channels = channels
        self._queue: queue.Queue[tuple[bytes, int] | None] = queue.Queue(self.MAX_QUEUED)
        #: Sample frames dropped because the writer was behind.
        self.frames_dropped = 0
        self._failure: str | None = None
        self._wav: wave.Wave_write | None = None
        self._file: BinaryIO | None = None
        self._rate = 0
        self.frames_written = 0
        # started with the first samples, not here: usbipyd -D makes its devices
        # before it forks, and a thread does not survive a fork
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, data: bytes, rate: int) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="usbipy-wav-sink",
                                                    daemon=True)
                    self._thread.start()
        try:
            self._queue.put_nowait((data, rate))
        except queue.Full:  # (never wait: this runs on the server's event loop)
            self.frames_dropped += len(data) // (2 * self.channels)

    def flush(self) -> None:
        """Wait until every sample given so far is in the file."""
        self._queue.join()

    def close(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)  # (waits for room: the writer is running)
            thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    self._close_file()
                    return
                if self._failure is None:
                    self._write(*item)
                else:
                    self.frames_dropped += len(item[0]) // (2 * self.channels)
            except Exception as exc:
                # (a full disk; a file past WAV's 4 GiB: struct.error). The thread
                # goes on, taking and counting what comes, so nothing piles up; the
                # file is not opened again, which would truncate what it holds.
                self._failure = f"{type(exc).__name__}: {exc}"
                log.error("%s: %s; the speaker's samples from here on are dropped",
                          self.path, self._failure)
                self._close_file()
            finally:
                self._queue.task_done()

    def _close_file(self) -> None:
        wav, self._wav = self._wav, None
        file, self._file = self._file, None
        try:
            if wav is not None:
                wav.close()
        except Exception as exc:  # (its header cannot be written: the file stays as is)
            log.error("%s: %s", self.path, exc)
        finally:
            if file is not None:
                file.close()

    def _write(self, data: bytes, rate: int) -> None:
        if self._wav is None or rate != self._rate:
            if self._wav is not None:
                log.warning("%s: the sample rate changed from %d to %d Hz; starting afresh",
                            self.path, self._rate, rate)
                self._close_file()
            self._file = open(self.path, "wb")  # (closed in _close_file)
            self._wav = wave.open(self._file, "wb")
            self._wav.setnchannels(self.channels)
            self._wav.setsampwidth(2)
            self._wav.setframerate(rate)
            self._rate = rate
            self.frames_written = 0
        assert self._file is not None
        # writeframes patches the header; the flush makes the file whole on disk
        self._wav.writeframes(data)
        self._file.flush()
        self.frames_written += len(data) // (2 * self.channels)


def apply_gain(data: bytes, volume: int, muted: bool) -> bytes:
    """S16_LE samples through a feature unit: ``volume`` in 1/256 dB (USB Audio
    1.0, 5.2.2.4.3.2), 0 dB passes them bit for bit."""
    if muted:
        return bytes(len(data))
    if volume == 0:
        return data
    factor = 10 ** (volume / 256 / 20)
    samples = array("h", data)
    if _BIG_ENDIAN:
        samples.byteswap()
    return _le(array("h", (max(-32768, min(32767, round(s * factor))) for s in samples)))


_BIG_ENDIAN = sys.byteorder == "big"


def _le(samples: array[int]) -> bytes:
    """The samples as S16_LE, whatever this machine's byte order."""
    if _BIG_ENDIAN:
        samples.byteswap()
    return samples.tobytes()
