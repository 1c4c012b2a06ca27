"""The one exception type for user errors: the CLI prints it as a single line."""


class FlextronError(Exception):
    """A problem with the user's input or files, with a message that says what to do."""
