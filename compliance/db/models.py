"""Imports every domain's tables so ``Base.metadata`` is complete (Alembic, tests)."""

from compliance.archive import models as archive_models  # noqa: F401
from compliance.audit import models as audit_models  # noqa: F401
from compliance.audit import review_models as audit_review_models  # noqa: F401
from compliance.crypto import models as crypto_models  # noqa: F401
from compliance.exports import models as export_models  # noqa: F401
