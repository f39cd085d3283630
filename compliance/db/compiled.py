"""An INSERT compiled once for an engine's dialect and run as driver SQL, for hot write paths.

Going through SQLAlchemy's execution layer for every statement costs several times what the database
itself does for a small insert (the audit outbox's group commits, a new patient's data key in the
archive). The SQL is still SQLAlchemy's own compilation (any dialect and paramstyle) and the values
are converted by the column types' own bind processors, so the rows stored are the ones the ORM
would store (tested in tests/unit/audit/test_outbox_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, Table, insert


class CompiledInsert:
    """``INSERT INTO table (columns...)``: ``sql`` and ``params(row)`` for ``cursor.execute(many)``."""

    def __init__(self, engine: Engine, table: Table, columns: Sequence[str]) -> None:
        dialect = engine.dialect
        compiled = insert(table).compile(dialect=dialect, column_keys=list(columns))
        self.sql = str(compiled)
        self.positional = bool(compiled.positional)
        names = list(compiled.positiontup or ()) if self.positional else list(columns)
        if self.positional and sorted(names) != sorted(columns):
            raise RuntimeError(f"unexpected INSERT parameters {names} for {table.name}")
        self.names = names
        self.processors = {name: table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                           for name in columns}
        self._converting = tuple((n, p) for n, p in self.processors.items() if p is not None)

    def convert(self, name: str, value: Any) -> Any:
        processor = self.processors[name]
        return value if processor is None else processor(value)

    def params(self, row: dict[str, Any], *, converted: tuple[str, ...] = ()) -> tuple[Any, ...] | dict[str, Any]:
        """Driver parameters of one row (``converted``: columns whose values are converted already)."""
        for name, processor in self._converting:
            if name not in converted:
                row[name] = processor(row[name])
        return tuple([row[n] for n in self.names]) if self.positional else row
