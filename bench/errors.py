"""One error type for everything a user can get wrong; the CLI prints it as one line."""


class BenchError(Exception):
    """A problem with the user's input, stated with what to do about it."""
