"""One exception type for problems the user can fix (bad file, bad flag, missing asset).

The CLI prints these as one clear line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class RtuneError(Exception):
    """A user-facing error: the message names the file, line or field at fault."""


class DataError(RtuneError):
    """A record or file that cannot be read; the message carries `path:line`."""
