"""statskit: a SQL-first migration and aggregation toolkit for a daily statistics rollup."""

__version__ = "0.1.0"
