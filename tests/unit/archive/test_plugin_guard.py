"""The storage plugin refuses to run with Orthanc's storage cache on (pure logic, a stand-in ``orthanc``).

The gateway trusts a 2xx retrieve to mean a live key just decrypted the files; Orthanc's storage
cache would keep serving a shredded patient's decrypted files from memory.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from compliance.archive import orthanc_plugin


def _fake_orthanc(config: dict, registered: list) -> types.ModuleType:
    module = types.ModuleType("orthanc")
    module.GetConfiguration = lambda: json.dumps(config)  # type: ignore[attr-defined]
    module.RegisterStorageArea = lambda *a: registered.append(("storage", a))  # type: ignore[attr-defined]
    module.RegisterRestCallback = lambda *a: registered.append(("rest", a))  # type: ignore[attr-defined]
    module.LogWarning = module.LogError = lambda *a: None  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("config", [{}, {"MaximumStorageCacheSize": 128}])
def test_a_storage_cache_stops_the_plugin_before_anything_is_registered(monkeypatch, tmp_path, config):
    registered: list = []
    monkeypatch.setitem(sys.modules, "orthanc",
                        _fake_orthanc({"StorageDirectory": str(tmp_path), **config}, registered))
    with pytest.raises(RuntimeError, match="MaximumStorageCacheSize"):
        orthanc_plugin._install()
    assert registered == [], "refused before anything is registered (_main then stops Orthanc)"
