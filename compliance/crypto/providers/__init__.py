"""Key providers: where key-encryption keys live (``local`` keyring file, ``pkcs11`` token)."""
