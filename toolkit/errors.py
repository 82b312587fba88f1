"""The exceptions statskit's core raises; the CLI turns each into one line and an exit code."""


class StatskitError(Exception):
    """A problem the user can fix; its message is one line that names it."""

    exit_code = 1


class UsageError(StatskitError):
    """Bad input: a malformed date, a reversed range, an invalid identifier."""

    exit_code = 2


class ConnectionFailed(StatskitError):
    """The server could not be reached or refused the login."""

    exit_code = 2


class NotMigrated(StatskitError):
    """The database has no statskit deployment yet."""

    exit_code = 2

