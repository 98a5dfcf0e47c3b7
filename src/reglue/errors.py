"""The errors the command line reports in one line (exit status 2): the user can act on them.

Everything reglue refuses on purpose raises one of these, with a message that names the problem
and the fix. Any other exception is a bug (or a library's own failure) and the command line shows
its traceback (exit status 1). ``REGLUE_DEBUG=1`` shows the traceback of these too.
"""


class ReglueError(RuntimeError):
    """A job cannot go on for a reason the user can act on; the message says what to do."""


class InputError(ReglueError, ValueError):
    """Bad input: an argument, setting, file content or combination of them that cannot work. A
    ValueError too, so callers that catch bad values catch it."""


class MissingExtraError(ReglueError, ImportError):
    """An option needs a package that is not installed; the message names the ``pip install``."""


class DamagedFileError(InputError):
    """A file is not what it should be (truncated, overwritten, missing, unreadable); the message names
    the file, what was expected and found, and the command that rebuilds it (docs/data-format.md)."""
