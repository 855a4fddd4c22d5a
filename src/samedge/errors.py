"""The exception family for input a user can fix.

Everything samedge refuses because of what it was given (a setting, a data file, a checkpoint,
a run directory) raises a subclass of :class:`BadInput` whose message is one line naming the
problem.  The command line turns a ``BadInput`` into ``samedge: error: <message>`` and exit 2;
any other exception is a bug of ours and ends in a traceback and exit 1.

The library core raises plain ``ValueError`` for bad arguments (the Python convention); the
experiment layer validates what a user typed before it reaches the core.
"""

from __future__ import annotations

__all__ = ["BadInput", "ConfigError", "DataError", "CheckpointError", "RunDirError"]


class BadInput(Exception):
    """Input the user can fix; the message is one line that names the problem."""


class ConfigError(BadInput, ValueError):
    """A setting, a configuration key or a command-line combination that is not allowed."""


class DataError(BadInput, ValueError):
    """Missing, malformed or mismatched data files (the message names the file and the problem)."""


class CheckpointError(BadInput, ValueError):
    """A checkpoint that is missing, corrupted, or does not belong to this run's configuration."""


class RunDirError(BadInput):
    """A run directory that cannot be created, replaced or resumed as asked."""
