"""SQL persistence: the declarative base, sessions and Alembic migrations."""
