"""Encoding a de-identified dataset as a PS3.10 file, in memory.

``encode(ds)`` returns exactly the bytes of ``ds.save_as(buffer, enforce_file_format=True)``
(a unit test compares them on every sample file), faster for what the engine produces: most
elements of its output are raw elements (kept byte for byte, or replacement values the engine
encoded itself), and pydicom's writer spends most of its time on per-element machinery (a buffer
object per element) that raw values do not need. Raw elements are written here (tag, VR, length,
value); every converted element, sequence and undefined-length value goes through pydicom's own
``write_data_element``; the preamble and file meta are pydicom's. Any case the fast path does not
cover (a transfer syntax other than little endian uncompressed or encapsulated, deflate, a dataset
whose encoding or character set differs from the one it was read with) is left to ``save_as``.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import cast

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info  # validates the meta
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_UNDEFINED = 0xFFFFFFFF
_TAG = struct.Struct("<HH")
_EXPLICIT_16 = struct.Struct("<HH2sH")  # tag, VR, 16-bit length
_EXPLICIT_32 = struct.Struct("<HH2sHL")  # tag, VR, reserved, 32-bit length
_IMPLICIT = struct.Struct("<HHL")  # tag, 32-bit length


def save_as_bytes(ds: Dataset) -> bytes:
    """The reference: pydicom's writer."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _little_endian_ts(ds: Dataset) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) when the fast path applies, else None."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or ts.is_private or not ts.is_transfer_syntax or ts == DeflatedExplicitVRLittleEndian:
        return None
    if not ts.is_little_endian:
        return None
    return ts == ImplicitVRLittleEndian, True


def _synced(meta: FileMetaDataset, ds: Dataset, meta_kw: str, ds_kw: str) -> object:
    """dcmwrite's rule: the meta's Media Storage UID, replaced by the dataset's when that differs."""
    meta_value = meta.get(meta_kw, None)
    ds_value = ds.get(ds_kw, None)
    return ds_value if meta_value is None or (ds_value and ds_value != meta_value) else meta_value


#: The file meta the engine writes: tag -> (VR, padding). Any other meta goes through pydicom.
_ENGINE_META = {0x00020002: ("UI", b"\x00"), 0x00020003: ("UI", b"\x00"), 0x00020010: ("UI", b"\x00"),
                0x00020012: ("UI", b"\x00"), 0x00020013: ("SH", b" ")}


def _element(tag: int, vr: str, value: bytes) -> bytes:
    if vr in EXPLICIT_VR_LENGTH_32:
        return _EXPLICIT_32.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, len(value)) + value
    return _EXPLICIT_16.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(value)) + value


def _engine_meta(meta: FileMetaDataset, media: dict[int, object]) -> bytes | None:
    """write_file_meta_info's bytes for the engine's own file meta (group length, version and the five
    elements the engine sets, all non-empty ASCII strings); None for anything else."""
    if {int(t) for t in meta._dict} != set(_ENGINE_META):
        return None
    body = _element(0x00020001, "OB", b"\x00\x01")  # validate_file_meta adds the version
    for tag, (vr, pad) in _ENGINE_META.items():
        el = meta[tag]
        value = media.get(tag, el.value)
        if vr != el.VR or not isinstance(value, str) or not value or not value.isascii():
            return None
        data = value.encode("ascii")
        body += _element(tag, vr, data + pad if len(data) % 2 else data)
    return _element(0x00020000, "UL", struct.pack("<L", len(body))) + body


def encode(ds: Dataset) -> bytes:
    encoding = _little_endian_ts(ds)
    if (encoding is None or ds.original_encoding != encoding
            or ds.original_character_set != ds._character_set
            or any(t >> 16 in (0, 2) for t in ds._dict)):
        return save_as_bytes(ds)  # pydicom converts (or refuses) what the fast path does not cover
    implicit = encoding[0]
    meta = ds.file_meta
    ts = meta.TransferSyntaxUID

    # -- what dcmwrite(enforce_file_format=True) does before writing (never changing ds.file_meta) --
    media = {0x00020002: _synced(meta, ds, "MediaStorageSOPClassUID", "SOPClassUID"),
             0x00020003: _synced(meta, ds, "MediaStorageSOPInstanceUID", "SOPInstanceUID")}
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        return save_as_bytes(ds)  # pydicom raises the error
    preamble = preamble or b"\x00" * 128
    if "PixelData" in ds:
        ds["PixelData"].is_undefined_length = ts.is_compressed

    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = encoding
    fp.write(preamble)
    fp.write(b"DICM")
    header = _engine_meta(meta, media)
    if header is not None:
        fp.write(header)
    else:  # pydicom's, on a copy
        file_meta = FileMetaDataset()
        for el in meta:
            file_meta.add(DataElement(el.tag, el.VR, el.value))
        for tag, value in media.items():
            file_meta[tag] = DataElement(tag, "UI", value)
        write_file_meta_info(fp, file_meta, enforce_standard=True)

    # -- write_dataset ------------------------------------------------------------------------
    fp.is_implicit_VR, fp.is_little_endian = encoding
    charset = ds.get("SpecificCharacterSet", "iso8859")
    elements = ds._dict
    write = fp.write
    for tag in sorted(elements, key=int):
        if tag.element == 0 and tag.group > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        elem = elements[tag]
        if type(elem) is RawDataElement and elem.value is not None and elem.length != _UNDEFINED \
                and (implicit or elem.VR not in ("SQ", None)):
            value = elem.value
            vr = cast(str, elem.VR)  # None only when implicit, where it is not used
            n = len(value)
            if implicit:
                write(_IMPLICIT.pack(tag.group, tag.element, n))
            elif vr in EXPLICIT_VR_LENGTH_32:
                write(_EXPLICIT_32.pack(tag.group, tag.element, vr.encode("ascii"), 0, n))
            elif n <= 0xFFFF and len(vr) == 2:
                write(_EXPLICIT_16.pack(tag.group, tag.element, vr.encode("ascii"), n))
            else:
                write_data_element(fp, elem, charset)  # pydicom's UN fallback or its error
                continue
            write(value)
        else:
            write_data_element(fp, ds.get_item(tag), charset)  # get_item: a deferred value is read
    return fp.getvalue()
