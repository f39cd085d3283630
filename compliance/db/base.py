"""The declarative base every table of the project derives from.

Each domain keeps its tables in its own ``models.py`` (``compliance/audit/models.py``,
``compliance/crypto/models.py``...) on this one ``Base`` so Alembic sees a single metadata.
"""

from __future__ import annotations

from sqlalchemy import MetaData, Table
from sqlalchemy.orm import DeclarativeBase

# Stable constraint names so migrations are identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def table_of(model: type[Base]) -> Table:
    """The Core :class:`~sqlalchemy.Table` of a mapped class, typed (``Model.__table__`` is typed as
    ``FromClause``, which has no ``.insert()``)."""
    table = model.__table__
    if not isinstance(table, Table):  # a mapping onto a join or a select: none in this project
        raise TypeError(f"{model.__name__} is not mapped onto one table")
    return table
