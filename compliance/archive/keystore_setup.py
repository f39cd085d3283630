"""``python -m compliance.archive.keystore_setup``: create the archive's key store (idempotent).

Run by ``deploy/local/up`` as the archive's user before Orthanc starts: creates
``{stack_dir}/archive-keys/`` (0700), the keyring (0600, ``local`` provider) or checks the token
(``pkcs11``), the key tables, and a first active KEK when there is none. Prints non-secret facts.
"""

from __future__ import annotations

import json
import sys

from compliance.archive.keystore import open_key_store
from compliance.config import Settings


def main() -> int:
    settings = Settings()
    store = open_key_store(settings, create=True)
    try:
        status = store.keys.status()
        print(json.dumps({"provider": status.provider.get("provider"),
                          "active_kek": next(k.id for k in status.keks if k.state == "active"),
                          "keks": len(status.keks), "live_data_keys": status.live_data_keys}))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
