"""archive domain: the archive's encryption at rest (Orthanc storage-area plugin) and its key custody.

- :mod:`compliance.archive.storage`: :class:`EncryptedFilesystemStorage`, what every file Orthanc
  writes goes through (testable without Orthanc);
- :mod:`compliance.archive.keystore`: builds the archive's key service from settings; its set-up
  command is :mod:`compliance.archive.keystore_setup` (``python -m compliance.archive.keystore_setup``);
- :mod:`compliance.archive.key_service`: :class:`ArchiveKeyService`, the key service of the write
  path (cached data keys, group-committed new ones);
- :mod:`compliance.archive.volume`: the passwords of the local stack's encrypted volumes, kept as
  data keys in the archive's key store (``python -m compliance.archive.volume``);
- :mod:`compliance.archive.dicom_header`: the PatientID of a stored file without a full parse;
- :mod:`compliance.archive.control`: the key operations the plugin serves to the gateway;
- :mod:`compliance.archive.orthanc_plugin`: the glue Orthanc loads (``PythonScript``);
- :mod:`compliance.archive.client`: the gateway's side (key operations, erasure state, verify);
- ``compliance keys ...`` and ``compliance shred ...`` (:mod:`compliance.cli.keys`): the operator's commands;
- :mod:`compliance.archive.operations`: the audited operator operations (API and CLI share them);
- :mod:`compliance.archive.shred` (table in :mod:`compliance.archive.models`): crypto-shred requests,
  one administrator asks and a different one approves, refused under a legal hold.
"""
