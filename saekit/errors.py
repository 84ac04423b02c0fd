"""User-facing errors: one line that names the file, field or value and says what to do."""


class UserError(Exception):
    """Bad input or a mismatched piece. The CLI prints the message alone, without a traceback."""
