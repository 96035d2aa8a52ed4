"""Errors that reach the user as one line and exit status 2."""


class UsageError(Exception):
    """A user mistake (bad file, field or argument): reported as one line, no traceback."""
