"""Imports every domain's tables so ``Base.metadata`` is complete (Alembic, tests)."""

from compliance.audit import models as audit_models  # noqa: F401
from compliance.crypto import models as crypto_models  # noqa: F401
