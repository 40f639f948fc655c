"""The USB specification's vocabulary: descriptors, control requests, URB flags."""

from .descriptors import (
    Configuration,
    DescriptorSet,
    DescriptorType,
    Device,
    Endpoint,
    Interface,
    TransferType,
)
from .requests import SETUP, Setup
from .speed import Speed
from .urb import UrbFlag

__all__ = [
    "Configuration",
    "DescriptorSet",
    "DescriptorType",
    "Device",
    "Endpoint",
    "Interface",
    "SETUP",
    "Setup",
    "Speed",
    "TransferType",
    "UrbFlag",
]
