"""Errors raised by the protocol codec.

::

    UsbipError                      (usbipy.errors, the root of every project error)
     └── ProtocolError
          ├── LocalProtocolError    we were asked to send something illegal
          └── RemoteProtocolError   the peer sent something illegal; its connection ends
               ├── UnsupportedVersion
               ├── UnknownCommand
               ├── UnexpectedMessage   a valid message in the wrong phase, or an unknown seqnum
               ├── DuplicateSeqnum     a CMD_SUBMIT whose seqnum is still in flight
               ├── BadDevid
               ├── BadLength           negative, oversized or impossible lengths
               ├── TooManyIsoPackets
               ├── BadIsoDescriptors
               └── BadFrame            a resumable stream's frame that cannot be

Once a connection object has raised a RemoteProtocolError, it stays broken:
every later call raises the same error again. A LocalProtocolError from
``send`` breaks it too: every later ``send`` refuses.
"""

from __future__ import annotations

from ..errors import UsbipError


class ProtocolError(UsbipError):
    """A violation of USB/IP 1.1.1."""


class LocalProtocolError(ProtocolError):
    """This side tried to send a message that is not allowed now, or cannot be encoded."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not valid USB/IP 1.1.1."""


class UnsupportedVersion(RemoteProtocolError):
    """An OP message carried a version other than 0x0111."""


class UnknownCommand(RemoteProtocolError):
    """An OP code or URB command that this phase does not know."""


class UnexpectedMessage(RemoteProtocolError):
    """A known message in the wrong phase, or a reply to a seqnum never sent."""


class DuplicateSeqnum(RemoteProtocolError):
    """A CMD_SUBMIT reusing the seqnum of a URB that has not been answered yet."""


class BadDevid(RemoteProtocolError):
    """A URB addressed to a devid other than the imported device's."""


class BadLength(RemoteProtocolError):
    """A length that is negative, above the configured cap, or does not add up."""


class TooManyIsoPackets(RemoteProtocolError):
    """number_of_packets above the kernel's limit of 1024."""


class BadIsoDescriptors(RemoteProtocolError):
    """Isochronous packet descriptors whose offsets or lengths do not add up."""


class BadFrame(RemoteProtocolError):
    """A frame of the resumable stream (:mod:`.resume`) of an unknown kind, of an
    impossible length, or at an offset that loses or invents bytes."""
