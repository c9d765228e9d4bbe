"""The one error type multisal raises for bad input.

Every message is a single line that names the thing at fault (file, key, layer, op, argument)
and what was expected, so a user never has to read a framework's stack trace to find out.
"""


class MultisalError(ValueError):
    """Bad input or configuration, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class MissingFrameworkError(MultisalError, ImportError):
    """A backend was chosen whose framework is not installed."""
