"""The hot path's statements: compiled once, run with the least work per call.

SQLAlchemy's execution of even a prebuilt Core statement (its execution context, parameter
processing and result set-up) costs about 40 µs; SQLite itself runs the same statement in about
9 µs. The event log's writer runs a dozen statements per run in its database thread, holding
the GIL the event loop needs, and that overhead was the largest single cost of a run
(bench/README.md). So on SQLite a `HotStatement` runs its SQL (compiled once, by SQLAlchemy)
on the driver's connection, inside the transaction the SQLAlchemy connection began, with the
values converted by SQLAlchemy's own bind processors: they are stored exactly as SQLAlchemy
stores them (a datetime as its text form, which the history's order relies on). On other
databases SQLAlchemy executes it as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

Params = Mapping[str, Any]
_REQUIRED = object()
# Parameters per statement within the limit of every SQLite build (999 before 3.32).
_SQLITE_VARIABLES = 999
# Each parameter in order: its name, SQLAlchemy's bind processor for its type, and the value the
# statement itself gives it (a literal such as `status == 'running'`), if any.
_Binds = tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]


class HotStatement:
    """One statement of the hot path. Results are plain rows (tuples): read them by position."""

    def __init__(self, statement: ClauseElement, *, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        # An INSERT names the columns it is given values for (SQLAlchemy learns them from the
        # first row's keys; compiled once here, they are fixed).
        self._columns = list(columns) if columns is not None else None
        self._sqlite: tuple[str, _Binds] | None = None

    def rows(self, connection: Connection, params: Params) -> Sequence[Sequence[Any]]:
        if connection.dialect.name != "sqlite":
            return connection.execute(self.statement, params).all()  # type: ignore[call-overload,no-any-return]
        with self._sqlite_cursor(connection, params) as cursor:
            return cursor.fetchall()  # type: ignore[no-any-return]

    def run(self, connection: Connection, params: Params) -> int:
        """Runs the statement; returns the number of rows it changed."""
        if connection.dialect.name != "sqlite":
            return int(connection.execute(self.statement, params).rowcount)  # type: ignore[call-overload]
        with self._sqlite_cursor(connection, params) as cursor:
            return int(cursor.rowcount)

    def many(self, connection: Connection, rows: Sequence[Params]) -> None:
        """Runs the statement (an INSERT) for every row. On SQLite as multi-row INSERTs: a
        statement per row would let go of the GIL, and wait to win it back from the event
        loop, once per row."""
        if connection.dialect.name != "sqlite":
            connection.execute(self.statement, list(rows))  # type: ignore[call-overload]
            return
        sql, binds = self._compiled(connection.dialect)
        head, values, group = sql.rpartition(" VALUES ")
        if not values or not group.endswith(")"):
            raise ValueError(f"not an INSERT ... VALUES statement: {sql}")
        start = 0
        # A batch's rows share values that cost a conversion each (its time stamp, a datetime
        # formatted as text: ~2 µs a row): each object is converted once.
        memo: dict[tuple[int, int], Any] = {}
        for size in _row_groups(len(rows), max(1, _SQLITE_VARIABLES // len(binds))):
            statement = f"{head} VALUES {', '.join([group] * size)}"
            arguments = [
                v for row in rows[start : start + size] for v in _arguments(binds, row, memo)
            ]
            with _as_sqlalchemy_errors(connection, statement, arguments):
                _driver(connection).execute(statement, arguments).close()
            start += size

    @contextlib.contextmanager
    def _sqlite_cursor(self, connection: Connection, params: Params) -> Iterator[Any]:
        """The driver's cursor after running the statement once with `params`."""
        sql, binds = self._compiled(connection.dialect)
        arguments = _arguments(binds, params)
        # Reading the rows steps the statement on: its errors are translated too.
        with _as_sqlalchemy_errors(connection, sql, arguments):
            cursor = _driver(connection).execute(sql, arguments)
            try:
                yield cursor
            finally:
                cursor.close()

    def _compiled(self, dialect: Dialect) -> tuple[str, _Binds]:
        if self._sqlite is None:
            compiled = cast(
                SQLCompiler, self.statement.compile(dialect=dialect, column_keys=self._columns)
            )
            names = compiled.positiontup or []
            binds = tuple(
                (
                    name,
                    compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect),
                    _REQUIRED if compiled.binds[name].required else compiled.binds[name].value,
                )
                for name in names
            )
            self._sqlite = (str(compiled), binds)
        return self._sqlite


def _row_groups(rows: int, most: int) -> Iterator[int]:
    """`rows` split into groups of powers of two of at most `most` rows (200 = 128 + 64 + 8):
    a handful of statement texts, which the driver keeps prepared, serve every batch."""
    largest = 1 << (most.bit_length() - 1)
    while rows >= largest:
        yield largest
        rows -= largest
    for bit in reversed(range(largest.bit_length())):
        if rows & (1 << bit):
            yield 1 << bit


def _arguments(
    binds: _Binds, params: Params, memo: dict[tuple[int, int], Any] | None = None
) -> tuple[Any, ...]:
    """The driver's values for `params`; with `memo`, each (parameter, object) pair is converted
    once (the objects must outlive the memo)."""
    values = []
    for index, (name, process, literal) in enumerate(binds):
        value = params[name] if literal is _REQUIRED else params.get(name, literal)
        if process is None or value is None:
            values.append(value)
        elif memo is None:
            values.append(process(value))
        else:
            key = (index, id(value))
            if key not in memo:
                memo[key] = process(value)
            values.append(memo[key])
    return tuple(values)


@contextlib.contextmanager
def _as_sqlalchemy_errors(connection: Connection, sql: str, arguments: Any) -> Iterator[None]:
    """Driver errors raised as SQLAlchemy raises them (`IntegrityError`, `OperationalError`
    for "database is locked", ...): the event log tells a transient failure from a refusal by
    those types (store/outage.py)."""
    driver_error = connection.dialect.loaded_dbapi.Error
    try:
        yield
    except driver_error as exc:
        raise DBAPIError.instance(sql, arguments, exc, driver_error) from exc


def _driver(connection: Connection) -> Any:
    """The DBAPI (sqlite3) connection under `connection`, in the transaction it began."""
    return connection.connection.dbapi_connection
