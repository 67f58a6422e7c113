"""The project's exception hierarchy: one base class, one subclass per concern."""

from __future__ import annotations


class EdgeqError(Exception):
    """Base class of every error edgeq raises on purpose."""


class ConfigError(EdgeqError, ValueError):
    """A configuration file, environment override or option is invalid."""


class DatasetError(EdgeqError):
    """A dataset file is missing or malformed (bad magic, truncated, count mismatch)."""


class SourceError(EdgeqError):
    """A frame source cannot produce frames (missing directory, camera, extra)."""


class FrameDecodeError(EdgeqError):
    """A frame on the wire is malformed.

    `reason` is a short fixed token (for example ``bad_magic``) used as a
    bounded metric label; the message names the offending values.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class FrameEncodeError(EdgeqError, ValueError):
    """A frame cannot be encoded (unsupported dtype, shape or device id)."""


class BrokerError(EdgeqError, RuntimeError):
    """The MQTT broker could not be started, reached or stopped."""
