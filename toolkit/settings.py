"""Deployment settings: schemas, statistics time zone, cron job names, lookback."""

import re
from dataclasses import asdict, dataclass, fields

from .errors import UsageError

# Identifiers are spliced into SQL, so only plain lowercase names are accepted: no quote,
# no semicolon, nothing that needs escaping, at most PostgreSQL's 63 bytes.
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
JOB_SUFFIX = re.compile(r"^([a-z0-9][a-z0-9_-]{0,39})?$")
TIME_ZONE = re.compile(r"^[A-Za-z0-9_+\-/]{1,64}$")
# The DBA's expression for "the current user's id" goes into a policy as it is; a single
# expression only: no statement separator, no comment that could hide the rest of the policy.
ROW_SECURITY = re.compile(r"^(?!.*(;|--|/\*))[\w\s.'():,=<>+\-]{1,200}$")
# The rollup's partitions each hold one period of days (date_trunc's unit); "none": one plain table.
PARTITION_PERIODS = ("week", "month", "quarter", "year", "none")
# each period's length as an interval (date_trunc knows weeks and quarters, an interval no quarter)
PERIOD_LENGTHS = {"week": "7 days", "month": "1 months", "quarter": "3 months", "year": "12 months"}
RETENTION = re.compile(r"^([1-9][0-9]{0,3}) (day|month|year)s?$")

# statskit's own bookkeeping (yoyo's tables, function checksums, settings, backfill ledger)
# lives here, apart from the rollup and the application's tables.
STATSKIT_SCHEMA = "statskit"
# The optional roles of `migrate --roles` (access/access.sql).
READER_ROLE = "statskit_reader"
WRITER_ROLE = "statskit_writer"
# A fleet's router logs into every shard as this role, which may only run the routed functions
# (fleet/shard.sql); the router's PL/Proxy cluster (its SQL/MED server) is this.
ROUTER_ROLE = "statskit_router"
FLEET_CLUSTER = "statskit_fleet"


def check_identifier(value: str, what: str) -> str:
    """Return value when it is a safe SQL identifier, else raise UsageError naming it."""
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise UsageError(
            f"invalid {what} {value!r}: use lowercase letters, digits and _, starting with a letter or _"
        )
    return value


def default_lookback(capture: bool) -> int:
    return 1 if capture else 3


@dataclass(frozen=True)
class Settings:
    """What a deployment is rendered with; stored in statskit.settings at the first migrate."""

    schema: str = "public"
    source_schema: str = "public"
    time_zone: str = "UTC"
    job_suffix: str = ""
    # Days the nightly user job writes: yesterday and the days before it, for late data. 0 = chosen
    # by capture: with it the change log repairs every late row, so yesterday alone; without, 3.
    lookback_days: int = 0
    roles: bool = False  # create statskit_reader and statskit_writer, grant and hand over ownership
    row_security: str = ""  # SQL expression of the current user's id; "" = no row-level security
    capture: bool = True  # triggers log late and corrected source rows; the nightly jobs re-aggregate them
    cron: bool = True  # pg_cron runs the nightly jobs; False (migrate --no-cron): the DBA schedules them
    # The database pg_cron lives in (on the target's server), as migrate found it: later commands
    # connect there with the target's login instead of asking again. "" = not known yet.
    cron_database: str = ""
    cron_user: str = ""  # the role the jobs run as (pg_cron shows a role only its own jobs)
    # Each rollup table is partitioned by range of date, one partition per period ("none": not
    # partitioned); a deployment made before partitioning is converted in place by its next migrate.
    partition_period: str = "month"
    # Days older than this ("25 months") are past retention: never written again, and their
    # partitions are dropped whole. "" = kept forever.
    retention: str = ""
    # The shard's name when the database is one shard of a fleet (docs/scaling.md): its platform
    # table keeps the sums of its own rows for the router. "" = one server, the whole platform.
    shard: str = ""

    def __post_init__(self):
        check_identifier(self.schema, "schema")
        check_identifier(self.source_schema, "source schema")
        if not TIME_ZONE.match(self.time_zone):
            raise UsageError(f"invalid time zone {self.time_zone!r}")
        if self.lookback_days == 0:
            object.__setattr__(self, "lookback_days", default_lookback(self.capture))
        if not 1 <= self.lookback_days <= 31:
            raise UsageError(f"{self.lookback_days}: use 1 to 31 (1 writes yesterday only)", field="lookback_days")
        if self.row_security and not ROW_SECURITY.match(self.row_security):
            raise UsageError(
                f"invalid row security expression {self.row_security!r}: one expression, without ; or comments"
            )
        if self.row_security and not self.roles:
            raise UsageError("needs the statskit roles ({roles}): the policy is written for the reader role",
                             field="row_security")
        if self.cron_database:
            check_identifier(self.cron_database, "pg_cron database")
        if self.partition_period not in PARTITION_PERIODS:
            raise UsageError(f"{self.partition_period!r}: use {', '.join(PARTITION_PERIODS)}", field="partition_period")
        if self.retention:
            if not RETENTION.match(self.retention):
                raise UsageError(f"{self.retention!r}: use a number of days, months or years, e.g. '25 months'",
                                 field="retention")
            if not self.partitioned:
                raise UsageError(f"{self.retention!r} needs a partitioned rollup (partition_period is 'none'): old "
                                 f"days go with their partitions, never by DELETE", field="retention")
        if not JOB_SUFFIX.match(self.shard):
            raise UsageError(f"invalid shard name {self.shard!r}: use lowercase letters, digits, - and _")
        if not JOB_SUFFIX.match(self.job_suffix):
            raise UsageError(
                f"invalid job suffix {self.job_suffix!r}: use lowercase letters, digits, - and _, starting with a letter or digit"
            )

    @property
    def partitioned(self) -> bool:
        return self.partition_period != "none"

    def _job_name(self, base: str) -> str:
        return f"{base}-{self.job_suffix}" if self.job_suffix else base

    @property
    def platform_job(self) -> str:
        return self._job_name("aggregate-platform-statistics")

    @property
    def user_job(self) -> str:
        return self._job_name("aggregate-user-statistics")

    @property
    def partitions_job(self) -> str:
        return self._job_name("statistics-partitions")

    def as_dict(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        """From stored text values (statskit.settings) or typed ones."""
        typed = {}
        for f in fields(cls):
            if f.name in values:
                value = values[f.name]
                if f.type in (bool, "bool"):
                    value = value in (True, "True", "true")
                elif f.type in (int, "int"):
                    value = int(value)
                typed[f.name] = value
        return cls(**typed)

    def merged(self, **overrides) -> "Settings":
        """Return a copy with every override that is not None applied."""
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**self.as_dict(), **given}
        if "lookback_days" not in given and self.lookback_days == default_lookback(self.capture):
            values["lookback_days"] = 0  # the default follows a change of capture
        return Settings.from_dict(values)
