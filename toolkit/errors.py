"""The exceptions statskit's core raises; the CLI turns each into one line and an exit code."""

import re

# An option a message's advice names, written {name} in it: shown as the Python API takes it,
# unless the caller names it otherwise (the CLI: its flag, cli.FLAGS).
OPTIONS = {
    "cron_dsn": "cron_dsn", "no_cron": "cron=False", "no_capture": "capture=False", "roles": "roles=True",
    "job_suffix": "job_suffix", "break_lock": "break_lock=True", "lock_timeout": "LockPolicy.lock_timeout",
    "retries": "LockPolicy.retries", "sql_dir": "the project's sql_dir",
}
_OPTION = re.compile(r"\{(" + "|".join(OPTIONS) + r")\}")


class StatskitError(Exception):
    """A problem the user can fix; its message is one line that names it.

    `field` is the parameter it concerns (the Python API's name, e.g. "first"), when one does:
    the message then starts with its value, and str() puts the field's name in front. The CLI
    puts the flag's name there instead (`named`), and in place of each {option} of OPTIONS."""

    exit_code = 1

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field

    def named(self, names: dict[str, str]) -> str:
        """The one line, with the field and the options called what `names` calls them (flags),
        else by their Python names."""
        text = _OPTION.sub(lambda m: names.get(m.group(1), OPTIONS[m.group(1)]), self.message)
        if self.field is None:
            return text
        return f"{names.get(self.field, self.field)} {text}"

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

