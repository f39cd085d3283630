"""The engine's fast paths change nothing: same output bytes, same findings, as pydicom's general path.

The walk reads most elements without converting them (``rawvalues``) and the writer writes raw
elements itself (``writer.encode``). Both are checked here against the general path (every element
converted by pydicom, the file written by ``save_as``) on real sample files nobody here wrote,
with identifying values injected everywhere, under every site profile.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files

from compliance.deid import engine as engine_mod
from compliance.deid.profiles import available_profiles
from compliance.deid.writer import encode, save_as_bytes

from .conftest import deid_data
from .test_engine import inject


def _corpus() -> list[tuple[str, bytes]]:
    paths = sorted(set(get_testdata_files()) | set(get_charset_files()))
    paths += sorted(str(p) for p in deid_data("").rglob("*.dcm"))
    out = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: S112 - not a PS3.10 file: the batch tests cover those
            continue
        if "SOPClassUID" not in ds or Path(p).stat().st_size > 4 << 20:
            continue
        out.append((Path(p).name, Path(p).read_bytes()))
    # the same files with an identifying value in every attribute we can set (as test_engine does)
    for name, data in out[:: max(1, len(out) // 12)]:
        ds = pydicom.dcmread(io.BytesIO(data))
        try:
            inject(ds)
            for tag in [t for t in ds.keys() if t.group in (0x0000, 0x0002)]:
                del ds[tag]  # command elements cannot be written to a file; the rest round-trips as raw
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
        except Exception:  # noqa: S112 - some samples cannot take every value (big endian, odd VRs)
            continue
        out.append((name + "+injected", buf.getvalue()))
    return out


CORPUS = _corpus()


def _outcome(engine, data: bytes, *, fast_writer: bool):  # type: ignore[no-untyped-def]
    result = engine.deidentify(pydicom.dcmread(io.BytesIO(data)))
    out = None
    if result.dataset is not None:
        out = encode(result.dataset) if fast_writer else save_as_bytes(result.dataset)
    return result.released, result.reasons, [f.as_dict() for f in result.findings], result.pixels, out


@pytest.mark.parametrize("profile", available_profiles())
def test_fast_paths_give_the_general_paths_bytes_and_findings(engine_for, monkeypatch, profile):  # type: ignore[no-untyped-def]
    assert len(CORPUS) > 150 and sum(name.endswith("+injected") for name, _ in CORPUS) >= 10
    fast, general = engine_for(profile, project="alpha"), engine_for(profile, project="alpha")
    fast_results = [_outcome(fast, data, fast_writer=True) for _, data in CORPUS]
    monkeypatch.setattr(engine_mod, "default_conversion", lambda: False)  # every element converted
    released = 0
    for (name, data), got in zip(CORPUS, fast_results, strict=True):
        want = _outcome(general, data, fast_writer=False)
        assert got[:4] == want[:4], name
        assert got[4] == want[4], name  # byte for byte
        released += bool(got[0])
    assert released > 30  # the comparison is about released files, not only refusals


def test_writer_is_save_as_byte_for_byte(engine_for):  # type: ignore[no-untyped-def]
    engine = engine_for("research")
    compared = 0
    for name, data in CORPUS:
        result = engine.deidentify(pydicom.dcmread(io.BytesIO(data)))
        if result.dataset is None:
            continue
        twin = copy.deepcopy(result.dataset)
        assert encode(result.dataset) == save_as_bytes(twin), name
        compared += 1
    assert compared > 30


def test_pixel_cleaning_keeps_the_pseudonymised_sop_instance_uid(engine_for):  # type: ignore[no-untyped-def]
    """Cleaning burned-in pixels used to let pydicom mint a random SOP Instance UID: repeated exports
    then disagreed, and references to the instance pointed nowhere."""
    path = deid_data("ultrasounds/RGB_IMAGE.dcm")
    uids = set()
    for _ in range(2):
        result = engine_for("research").deidentify(pydicom.dcmread(path))
        assert result.released and result.pixels.startswith("cleaned"), result.reasons
        out = pydicom.dcmread(io.BytesIO(encode(result.dataset)))
        assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID
        uids.add(out.SOPInstanceUID)
    (uid,) = uids
    source = pydicom.dcmread(path).SOPInstanceUID
    assert uid.startswith("2.25.") and uid == engine_for("research").pseudonyms.uid(source)


def test_fast_path_used_on_the_benchmark_instance(engine_for, monkeypatch):  # type: ignore[no-untyped-def]
    """Guard the speed-up itself: on CT_small the walk converts only the few elements it must."""
    converted: list[int] = []
    original = engine_mod._Walk.element

    def counting(self, ds, tag):  # type: ignore[no-untyped-def]
        converted.append(int(tag))
        return original(self, ds, tag)

    monkeypatch.setattr(engine_mod._Walk, "element", counting)
    result = engine_for("basic").deidentify(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    assert result.released
    assert len(converted) < 20, [f"{t:08X}" for t in converted]


def test_writer_falls_back_to_pydicom_for_other_file_meta(engine_for):  # type: ignore[no-untyped-def]
    result = engine_for("basic").deidentify(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    ds = result.dataset
    ds.file_meta.SourceApplicationEntityTitle = "DEID"  # not one of the engine's own meta elements
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1"  # and out of step with the dataset: dcmwrite syncs it
    before = copy.deepcopy(ds.file_meta)
    data = encode(ds)
    assert data == save_as_bytes(copy.deepcopy(ds))
    assert ds.file_meta == before  # encode never changes the caller's file meta
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != "2.25.1"
