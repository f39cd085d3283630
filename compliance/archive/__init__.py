"""archive domain: the archive's encryption at rest (Orthanc storage-area plugin) and its key custody.

- :mod:`compliance.archive.storage`: :class:`EncryptedFilesystemStorage`, what every file Orthanc
  writes goes through (testable without Orthanc);
- :mod:`compliance.archive.keystore`: builds the archive's :class:`~compliance.crypto.keys.KeyService`
  from settings and sets the key store up (``python -m compliance.archive.setup``);
- :mod:`compliance.archive.control`: the key operations the plugin serves to the gateway;
- :mod:`compliance.archive.orthanc_plugin`: the glue Orthanc loads (``PythonScript``);
- :mod:`compliance.archive.client`: the gateway's side (key operations, erasure state, verify);
- :mod:`compliance.archive.cli`: the operator's `compliance keys ...` and `compliance shred ...` commands;
- :mod:`compliance.archive.operations`: the audited operator operations (API and CLI share them);
- :mod:`compliance.archive.shred` (table in :mod:`compliance.archive.models`): crypto-shred requests,
  one administrator asks and a different one approves, refused under a legal hold.
"""
