"""Demo data helpers (development only): sample instances and a STOW-RS body builder."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from compliance.dicomweb.stow import multipart_related  # noqa: F401 - re-exported for demo and test callers

#: pydicom's bundled samples used as demo data: small, real, written by nobody here.
DEMO_SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "SC_rgb_rle.dcm")


def demo_files(get_testdata_file: Callable[..., object]) -> list[str]:
    """The bundled sample files that ship inside pydicom's wheel (never downloaded)."""
    out = []
    for name in DEMO_SAMPLES:
        path = get_testdata_file(name, download=False)
        if path:
            out.append(str(path))
    return out


def synthetic_instance(*, frames: int = 1, patient_id: str = "SYNTH-0001", patient_name: str = "Synthetic^Patient",
                       pixel_fill: bytes | None = None) -> tuple[bytes, str, str, str]:
    """A PS3.10 file of ``frames`` 512x512 16-bit frames (0.5 MiB each), made here, no PHI.

    Returns (file bytes, Study, Series, SOP Instance UID). ``pixel_fill`` repeats to fill the
    pixel data (zeros by default, cheap for very large objects).
    """
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    # CT for one frame; Multi-frame Grayscale Word Secondary Capture for more.
    meta.MediaStorageSOPClassUID = cast(  # a str: pydicom makes it a UID when set
        UID, "1.2.840.10008.5.1.4.1.1.2" if frames == 1 else "1.2.840.10008.5.1.4.1.1.7.3")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.Modality = "CT" if frames == 1 else "OT"
    ds.Rows = ds.Columns = 512
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    size = 512 * 512 * 2 * frames
    fill = pixel_fill or b"\x00"
    ds.PixelData = (fill * (size // len(fill) + 1))[:size]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
