"""Many rows in one statement: as one JSON parameter read back inside the database, or as one VALUES list.

Telemetry ingest writes hundreds of rows per transaction. Passed as one JSON array (one `json.dumps` in C, read
back by `json_each` on SQLite, `json_to_recordset` on PostgreSQL), a batch costs one parameter instead of one per
column and row: no per-value processing in SQLAlchemy or the driver, and one statement to build and parse.
The column list and each column's SQL type come from the table (`columns_of`), so a new column is one key more
in the rows and nothing else.

A value already serialised (`RawJson`: a window's sketches, several kB that pydantic writes in Rust) is spliced
into the array as it is, never decoded and encoded again. Rows with such values go to SQLite as one multi-row
`VALUES` list of plain parameters instead (`rows_values`, `values_clause`): SQLite would otherwise parse every
kB of them again in `json_each`, while a bound text is stored as it is (its JSON columns are text).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Table, TypeDecorator
from sqlalchemy.engine import Dialect

__all__ = ["Column", "RawJson", "columns_of", "rows_json", "rows_select", "rows_values", "values_clause"]

# (name, kind): kind is the PostgreSQL type a value is read as; "json" for JSON columns.
Column = tuple[str, str]

_KINDS = {BigInteger: "bigint", Integer: "integer", String: "varchar", DateTime: "timestamptz", JSON: "json"}
_INT64 = (-(2**63), 2**63 - 1)
# SQLite's bound-parameter limit (SQLITE_MAX_VARIABLE_NUMBER since 3.32) bounds the rows of one VALUES list.
SQLITE_MAX_PARAMETERS = 32766
# `json.dumps(value, separators=(",", ":"), allow_nan=False)` without building an encoder per call (two per row).
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class RawJson(str):
    """A JSON value already serialised (valid JSON, e.g. pydantic's `model_dump_json`): written as it is."""


def columns_of(table: Table, names: Iterable[str]) -> tuple[Column, ...]:
    """`names` of `table` with the kind each is read as."""
    columns = []
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, TypeDecorator):  # SQLModel's AutoString
            column_type = column_type.impl_instance
        columns.append((name, next(kind for base, kind in _KINDS.items() if isinstance(column_type, base))))
    return tuple(columns)


def rows_select(dialect: str, columns: Sequence[Column], parameter: str = "rows") -> str:
    """`SELECT <columns> FROM <the rows of the JSON array bound as :parameter>` for `dialect`."""
    names = ", ".join(name for name, _ in columns)
    if dialect == "postgresql":
        # A JSON null is read as SQL NULL, for json columns too.
        kinds = ", ".join(f"{name} {kind}" for name, kind in columns)
        return f"SELECT {names} FROM json_to_recordset(CAST(:{parameter} AS json)) AS r({kinds})"
    # `->` keeps a JSON value's text as sent (numbers verbatim; 'null' for JSON null), `->>` reads a scalar.
    # "WHERE true": without it SQLite would read a following ON CONFLICT as the join constraint of this SELECT.
    values = ", ".join(
        f"NULLIF(value -> '$.{name}', 'null') AS {name}" if kind == "json" else f"value ->> '$.{name}' AS {name}"
        for name, kind in columns
    )
    return f"SELECT {values} FROM json_each(:{parameter}) WHERE true"


def _stamp_writers(dialect: Dialect, table: Table, columns: Sequence[Column]) -> dict[str, Any]:
    """Column name → how SQLAlchemy writes its timestamps to `dialect` (None: ISO 8601, as PostgreSQL reads it)."""
    postgres = dialect.name == "postgresql"
    return {
        name: None if postgres else table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        for name, kind in columns
        if kind == "timestamptz"
    }


def _stamped(value: datetime, process: Any, written: dict[tuple[Any, Any], str]) -> str:
    # (timestamp, its offset) → its text: a batch shares its received_at, often its buckets. The offset is in the
    # key because equal instants in two zones are equal datetimes, and SQLite's form keeps the wall time.
    key = (value, value.utcoffset())
    text = written.get(key)
    if text is None:
        text = written[key] = value.isoformat() if process is None else process(value)
    return text


def rows_json(dialect: Dialect, table: Table, columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> str:
    """`rows` (dicts with `columns` as keys) as the JSON array `rows_select` reads.

    Timestamps are written as SQLAlchemy writes them to that database (SQLite: its own text form, so every reader
    parses them; PostgreSQL: ISO 8601). An integer beyond 64 bits raises `OverflowError` as a driver's binding
    would (SQLite's JSON would store it as a float); NaN raises `ValueError` (SQLite would refuse the document
    as malformed, an error that looks transient). Both are the data's fault: a retry cannot fix them."""
    stamps = _stamp_writers(dialect, table, columns)
    plain = [name for name, kind in columns if kind in ("bigint", "integer")]
    spliced = [(name, _encode(name) + ":") for name, kind in columns if kind == "json"]  # with its key, once
    written: dict[tuple[Any, Any], str] = {}
    out: list[dict[str, Any]] = []
    raws: list[list[str]] = []
    for row in rows:
        row = dict(row)
        for name, process in stamps.items():
            value = row[name]
            if value is not None:
                row[name] = _stamped(value, process, written)
        for name in plain:
            value = row[name]
            if value is not None and not _INT64[0] <= value <= _INT64[1]:
                raise OverflowError(f"{name} {value} is beyond a 64-bit integer")
        raws.append([key + row.pop(name) for name, key in spliced if isinstance(row[name], RawJson)])
        out.append(row)
    if not any(raws):
        return _encode(out)
    return "[" + ",".join(_spliced(row, raw) for row, raw in zip(out, raws, strict=True)) + "]"


def _spliced(row: dict[str, Any], raw: list[str]) -> str:
    """`row` as a JSON object with the already serialised members `raw` (`"name":value`) added as they are."""
    head = _encode(row)
    if not raw:
        return head
    return f"{head[:-1]}{',' if row else ''}{','.join(raw)}}}"


def values_clause(count: int, width: int) -> str:
    """`VALUES (?, ...), ...`: `count` rows of `width` qmark parameters (SQLite)."""
    row = "(" + ",".join("?" * width) + ")"
    return "VALUES " + ",".join([row] * count)


def rows_values(dialect: Dialect, table: Table, columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> list[Any]:
    """`rows` as the flat parameter list of `values_clause` (SQLite), each value as SQLAlchemy would bind it: JSON
    columns as their text (`RawJson` as it is; a JSON null as SQL NULL), timestamps in SQLite's text form.
    An integer beyond 64 bits raises `OverflowError` (sqlite3's binding), NaN in a JSON column `ValueError`."""
    stamps = _stamp_writers(dialect, table, columns)
    names = [name for name, _ in columns]
    # Each row's values taken at once (in C), then only the columns that need it converted, by position: a check
    # of every value cost ~2x as much (most are integers or text bound as they are).
    values_of = itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
    converted = [(i, name) for i, (name, kind) in enumerate(columns) if kind in ("json", "timestamptz")]
    written: dict[tuple[Any, Any], str] = {}
    params: list[Any] = []
    for row in rows:
        values = list(values_of(row))
        for i, name in converted:
            value = values[i]
            if value is None or isinstance(value, RawJson):
                continue
            values[i] = _stamped(value, stamps[name], written) if name in stamps else _encode(value)
        params.extend(values)
    return params
