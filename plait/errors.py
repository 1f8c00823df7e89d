"""Errors that Plait reports to the user as one clear line, not a traceback."""


class PlaitError(Exception):
    """A problem with the user's input or environment, said in one line.

    The CLI prints ``plait: error: <message>`` for these and exits non-zero; anything else
    escaping is a bug in Plait and keeps its traceback.
    """

    follow_on = False
    """True for errors that another rank's failure may have caused (a lost connection, a server
    that stopped the run): a worker says them only if the launcher has not stopped it first."""


class ConfigError(PlaitError):
    """An invalid configuration: the message names the key."""


class CommError(PlaitError):
    """A collective or point-to-point operation failed or timed out: names rank, op and peer."""

    follow_on = True


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (torch's may go on with C++ frames), or its type."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = f"key {text}"
    return (text.splitlines()[0][:400] if text else "") or type(exc).__name__
