"""``python -m compliance.cli``: the ``compliance`` command."""

import sys

from compliance.cli import app

sys.exit(app())
