"""Pictures for an emulated webcam: a test pattern that carries its frame number.

A frame source is any callable ``(number, fmt, width, height) -> bytes`` where
``fmt`` is "yuyv" (YUY2: Y0 U Y1 V per two pixels, width * height * 2 bytes) or
"mjpeg" (one JPEG image). :class:`TestPattern` is the default one.
"""

from __future__ import annotations

import io
from typing import Protocol

#: Cells of the frame number's bands: 8 pixels wide (one JPEG block) and 16 rows high.
CELL_WIDTH = 8
BAND_HEIGHT = 16
#: Bits of the frame number a band carries (the number modulo 2**16).
NUMBER_BITS = 16
#: Luma of a 1 and a 0 cell; a reader takes anything above 128 as 1.
WHITE, BLACK = 235, 16

#: 75% colour bars (ITU-R BT.801) as (Y, U, V): white, yellow, cyan, green,
#: magenta, red, blue, black.
BARS = ((180, 128, 128), (162, 44, 142), (131, 156, 44), (112, 72, 58),
        (84, 184, 198), (65, 100, 212), (35, 212, 114), (16, 128, 128))


class FrameSource(Protocol):
    def __call__(self, number: int, fmt: str, width: int, height: int) -> bytes:
        """Frame ``number`` (0, 1, 2 ... as sent) in format ``fmt``."""
        ...


def _yuyv(pixels: list[tuple[int, int, int]]) -> bytes:
    """One row of YUY2 from (Y, U, V) pixels, chroma taken from the even pixel."""
    out = bytearray()
    for i in range(0, len(pixels) - 1, 2):
        (y0, u, v), (y1, _u, _v) = pixels[i], pixels[i + 1]
        out += bytes((y0, u, y1, v))
    return bytes(out)


class TestPattern:
    """Colour bars with the frame number in two bands, at the top and the bottom.

    Each band is a row of 16 cells (bit 0 leftmost), white for 1 and black for 0,
    with gray beyond. A reader checks both bands: a frame whose bands disagree was
    torn (its top from one frame, its bottom from another). :func:`read_number`
    reads them back from luma.

    MJPEG frames need Pillow (``pip install 'usbipy[webcam]'``).
    """

    __test__ = False  # (not a pytest class)

    def __init__(self, quality: int = 90) -> None:
        self.quality = quality
        self._bars: dict[tuple[int, int], bytes] = {}

    def __call__(self, number: int, fmt: str, width: int, height: int) -> bytes:
        frame = self.yuyv(number, width, height)
        if fmt == "yuyv":
            return frame
        if fmt == "mjpeg":
            return self._jpeg(frame, width, height)
        raise ValueError(f"no {fmt!r} frames in the test pattern")

    def yuyv(self, number: int, width: int, height: int) -> bytes:
        key = (width, height)
        bars = self._bars.get(key)
        if bars is None:
            row = _yuyv([BARS[x * len(BARS) // width] for x in range(width)])
            bars = self._bars[key] = row * height
        frame = bytearray(bars)
        band = self._band(number, width)
        stride = 2 * width
        for top in (0, height - BAND_HEIGHT):
            for y in range(top, top + BAND_HEIGHT):
                frame[y * stride:(y + 1) * stride] = band
        return bytes(frame)

    @staticmethod
    def _band(number: int, width: int) -> bytes:
        pixels = []
        for x in range(width):
            cell = x // CELL_WIDTH
            if cell < NUMBER_BITS:
                pixels.append((WHITE if number >> cell & 1 else BLACK, 128, 128))
            else:
                pixels.append((128, 128, 128))
        return _yuyv(pixels)

    def _jpeg(self, frame: bytes, width: int, height: int) -> bytes:
        try:
            from PIL import Image
        except ImportError:
            raise RuntimeError("MJPEG frames need Pillow: pip install 'usbipy[webcam]'") from None
        # YUY2 to planar 4:4:4 YCbCr, each chroma sample used for its two pixels
        luma = Image.frombytes("L", (width, height), frame[0::2])
        half = (width // 2, height)
        chroma = [Image.frombytes("L", half, frame[i::4]).resize((width, height),
                                                                  Image.Resampling.NEAREST)
                  for i in (1, 3)]
        image = Image.merge("YCbCr", [luma, *chroma])
        out = io.BytesIO()
        # 4:2:2 sampling, as webcams send MJPEG (and as uvcvideo expects none other)
        image.save(out, "JPEG", quality=self.quality, subsampling=1)
        return out.getvalue()


def read_number(luma: bytes, width: int, height: int) -> tuple[int, int]:
    """The frame numbers in the top and bottom bands of a frame's luma plane
    (one byte per pixel), read at the centre of each cell."""
    numbers = []
    for top in (0, height - BAND_HEIGHT):
        y = top + BAND_HEIGHT // 2
        value = 0
        for bit in range(NUMBER_BITS):
            x = bit * CELL_WIDTH + CELL_WIDTH // 2
            if luma[y * width + x] > 128:
                value |= 1 << bit
        numbers.append(value)
    return numbers[0], numbers[1]
