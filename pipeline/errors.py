"""The errors a user can fix: bad data, a bad config or flag, an output that cannot be written.

``python -m pipeline`` prints any :class:`UserError` as one line (exit status 2) and shows a
traceback only with ``--debug``; every other exception is a bug and keeps its traceback.
Each subclass is also a ``ValueError`` so callers that caught ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (files, config, flags), fixable without a code change."""


class DataError(UserError, ValueError):
    """Bad input data; the message names file, column and row."""


class ConfigError(UserError, ValueError):
    """A bad config file or ``--set`` override; the message names the file or override and the key."""


class OutputError(UserError, ValueError):
    """The output folder cannot be written: it is a file, not ours, or another run holds it."""
