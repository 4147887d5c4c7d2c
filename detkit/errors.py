"""Typed errors. The CLI turns every DetkitError into one line and exit code 2."""

from __future__ import annotations


class DetkitError(Exception):
    """Base class of every error detkit raises on bad input."""


class CfgError(DetkitError):
    """A .cfg file is malformed or describes a network detkit cannot build faithfully."""


class WeightsError(DetkitError):
    """A .weights or checkpoint file does not fit the network it is loaded into."""


class SourceError(DetkitError):
    """An image, video, camera or stream cannot be opened or read."""


class DataError(DetkitError):
    """A data set file (.data, labels, annotations) is missing or malformed."""


class CfgWarning(UserWarning):
    """A cfg key nobody reads (darknet's "Unused field") or a key whose effect is approximated."""
