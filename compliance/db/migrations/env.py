"""Alembic environment: URL from settings or the caller.

The migrations are plain scripts and need no models. Autogenerate compares against every domain's tables,
which only the composition root knows (:func:`compliance.wiring.metadata`): pass it in the config's
attributes, ``alembic_config(url).attributes["target_metadata"] = compliance.wiring.metadata()``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from compliance.db.session import make_engine

config = context.config
target_metadata = config.attributes.get("target_metadata")


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
