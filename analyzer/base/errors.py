"""The project's error hierarchy.

Malformed packets are counted outcomes, not exceptions; these errors are for inputs that
cannot be handled at all.
"""


class NwcapError(Exception):
    """Base of every error nwcap raises on purpose."""


class UnsupportedFormatError(NwcapError):
    """The stream is not a capture format nwcap reads (a permanent failure)."""


class CorruptCaptureError(NwcapError):
    """The capture's file header itself is broken, so nothing can be read (a permanent failure)."""


class PolicyError(NwcapError):
    """A policy or service-tag file is invalid; the message names the offending field."""
