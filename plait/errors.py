"""Errors that Plait reports to the user as one clear line, not a traceback."""


class PlaitError(Exception):
    """A problem with the user's input or environment, said in one line.

    The CLI prints ``plait: error: <message>`` for these and exits non-zero; anything else
    escaping is a bug in Plait and keeps its traceback.
    """


class ConfigError(PlaitError):
    """An invalid configuration: the message names the key."""


class CommError(PlaitError):
    """A collective or point-to-point operation failed or timed out: names rank, op and peer."""
