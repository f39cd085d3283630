from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from compliance.deid.engine import Deidentifier
from compliance.deid.interfaces import StaticPseudonymSecretSource
from compliance.deid.profiles import load_profile

SECRETS = StaticPseudonymSecretSource({"alpha": b"alpha-secret-0123456789", "beta": b"beta-secret-0123456789"})


def deid_data(rel: str) -> Path:
    import deid_data

    return Path(deid_data.__file__).parent / "data" / rel


def pynetdicom_file(name: str) -> Path:
    import pynetdicom

    return Path(pynetdicom.__file__).parent / "tests" / "dicom_files" / name


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore", UserWarning)


@pytest.fixture
def engine_for():  # type: ignore[no-untyped-def]
    def make(profile: str = "basic", project: str = "alpha", **kw):  # type: ignore[no-untyped-def]
        return Deidentifier(load_profile(profile), project, SECRETS, **kw)

    return make
