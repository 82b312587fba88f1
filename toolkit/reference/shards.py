"""The reference marketplace split over a fleet's shards by the layout the application keeps
(docs/contract.md, "Sharding"): a shard holds its own users' profiles and every row that counts
for one of them, so a row that counts for users of two shards is on both."""

import re

from ..catalog import Catalog
from .marketplace import TABLE_COLUMNS, Marketplace, reference_schema_sql


def shard_schema_sql() -> str:
    """The reference tables as a shard holds them: no foreign keys, since a booking's client or a
    message's sender may live on another shard."""
    return re.sub(r" references \w+", "", reference_schema_sql())


def split(market: Marketplace, catalog: Catalog, shard_of: dict, shards: int) -> list[Marketplace]:
    """One Marketplace per shard: each row on the shard of every user it counts for, by its
    catalog `users` columns and, through `owners`, the home user of the row it references."""
    parts = [Marketplace(market.first_day, market.last_day) for _ in range(shards)]
    home_shards: dict[str, dict] = {}  # table -> key -> shard of the row's home user
    for table, columns in TABLE_COLUMNS.items():  # referenced tables come first
        spec = catalog.source_tables[table]
        users = [columns.index(c) for c in spec.users]
        owners = [(columns.index(c), owned) for c, owned in spec.owners.items()]
        key, home = columns.index(spec.key), columns.index(spec.home)
        for row in market.rows[table]:
            held = {shard_of[row[i]] for i in users if row[i] is not None}
            held |= {home_shards[owned][row[i]] for i, owned in owners if row[i] is not None}
            if spec.home in spec.users:
                home_shards.setdefault(table, {})[row[key]] = shard_of[row[home]]
            for shard in sorted(held):
                parts[shard].rows[table].append(row)
    return parts
