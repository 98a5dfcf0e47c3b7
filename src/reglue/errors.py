"""The exception families the command line reports as one-line errors (besides other bad input)."""


class ReglueError(RuntimeError):
    """A job cannot go on for a reason the user can act on; the message says what to do."""


class DamagedFileError(ValueError):
    """A file is not what it should be (truncated, overwritten, missing, unreadable); the message names
    the file, what was expected and found, and the command that rebuilds it (docs/data-format.md)."""
