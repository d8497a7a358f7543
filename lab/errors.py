"""The one error a user sees: a single line, exit status 2, never a traceback."""


class LabError(RuntimeError):
    """Something the lab could not do, or input it cannot use; the message is one line."""
