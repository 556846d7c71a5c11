"""The one error type, shared by the core and the harness: bad input, reported as one line (stop.run_main)."""


class UserError(Exception):
    """Bad input: printed as one line (`error: ...`), exit code 2, no traceback."""
