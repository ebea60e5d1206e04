"""The one exception type the command turns into a single line and a non-zero exit."""


class DdpmError(Exception):
    """A user-facing error: bad input, missing data, a broken checkpoint.

    The CLI prints ``error: <message>`` and exits with status 2; the library raises it so
    that Python callers can catch it too.
    """
