"""The one exception family the command line reports as a one-line error (besides bad input)."""


class ReglueError(RuntimeError):
    """A job cannot go on for a reason the user can act on; the message says what to do."""
