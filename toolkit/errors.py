"""The exceptions statskit's core raises; the CLI turns each into one line and an exit code."""


class StatskitError(Exception):
    """A problem the user can fix; its message is one line that names it.

    `field` is the parameter it concerns (the Python API's name, e.g. "first"), when one does:
    the message then starts with its value, and str() puts the field's name in front. The CLI
    puts the flag's name there instead (`named`)."""

    exit_code = 1

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field

    def named(self, names: dict[str, str]) -> str:
        """The one line, with the field called what `names` calls it (a flag), else by its own name."""
        if self.field is None:
            return self.message
        return f"{names.get(self.field, self.field)} {self.message}"

    def __str__(self) -> str:
        return self.named({})


class UsageError(StatskitError):
    """Bad input: a malformed date, a reversed range, an invalid identifier."""

    exit_code = 2


class ConnectionFailed(StatskitError):
    """The server could not be reached or refused the login."""

    exit_code = 2


class NotMigrated(StatskitError):
    """The database has no statskit deployment yet."""

    exit_code = 2

