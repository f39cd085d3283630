"""PatientID (0010,0020) of a DICOM Part 10 file without building a dataset: the storage's fast path.

:func:`compliance.archive.storage.patient_id_of` decides which patient's data key encrypts a file,
for every file Orthanc writes; pydicom (``dcmread`` with ``specific_tags``) takes 0.7-2.5 ms per
file for that, this walk about 20-60 us. It must give *exactly* pydicom's answer, because the
answer picks the key a shred destroys, so it only answers the cases it can answer for certain and
raises :class:`Unsupported` for anything else (the caller then asks pydicom, as before):

- a Part 10 file (128-byte preamble, ``DICM``, the group 0002 meta in explicit VR little endian)
  with a transfer syntax that pydicom reads as implicit or explicit VR little endian (not big
  endian, not deflated);
- top-level tags strictly ascending. The walk goes on past PatientID up to the pixel data, or,
  when less than 64 KiB are left (a header-only file such as Orthanc's ``dicom-until-pixel-data``),
  until the rest cannot hold a top-level PatientID (or character set) out of order: their tags'
  bytes do not appear in it (where they do, in a sequence, it walks past them). An out-of-order
  PatientID, which pydicom and Orthanc would both see, is never missed;
- explicit VR elements with one of the standard VRs; undefined lengths only for sequences
  (``SQ``, ``UN`` read as implicit VR per PS3.5 6.2.2, or any implicit VR element), walked item by
  item; every length inside the buffer;
- the value: VR LO, SH or UC (or implicit VR), only printable ASCII other than backslash (plus NUL
  padding), and no Specific Character Set (0008,0005) or a single ASCII-compatible one; it is
  decoded as pydicom does (``rstrip("\\0 ")``).

An absent PatientID is ``None`` (pydicom: no element). The walk stops where ``stop_before_pixels``
stops: (7FE0,0008), (7FE0,0009), (7FE0,0010) or a top-level item delimiter.
"""

from __future__ import annotations

import struct

__all__ = ["Unsupported", "patient_id"]


class Unsupported(Exception):  # noqa: N818 - a signal to fall back, not an error
    """This walk cannot answer with certainty; ask pydicom."""


_PATIENT_ID = 0x00100020
_CHARSET = 0x00080005
_STOP = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010, 0xFFFEE00D})
_PATIENT_ID_BYTES = struct.pack("<HH", 0x0010, 0x0020)
_TAIL_SEARCH = 64 << 10
_CHARSET_BYTES = struct.pack("<HH", 0x0008, 0x0005)
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

_VRS = frozenset(vr.encode() for vr in [
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
    "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
])
#: Explicit VRs with two reserved bytes and a 4-byte length (pydicom's EXPLICIT_VR_LENGTH_32).
#: VRs pydicom decodes with ``convert_text`` (PatientID is LO; None: implicit VR, the dictionary's LO).
_TEXT_VRS = frozenset({None, b"LO", b"SH", b"UC"})
_LONG = frozenset(vr.encode() for vr in ["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"])

#: pydicom reads implicit VR for this transfer syntax, and explicit VR little endian for any other
#: except these two (and no transfer syntax at all), which are left to pydicom.
_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_EXPLICIT_LE = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
#: Specific Character Sets whose decoding of printable ASCII is ASCII (single values, no ISO 2022).
_ASCII_CHARSETS = frozenset({
    "", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127",
    "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192", "ISO_IR 203", "GB18030", "GBK",
})

_TAG_LENGTH = struct.Struct("<HHI")  # implicit VR element, item and delimiter headers
_EXPLICIT = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")


def _element(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element header at ``pos``."""
    if pos + 8 > len(data):
        raise Unsupported
    if implicit:
        group, elem, length = _TAG_LENGTH.unpack_from(data, pos)
        return group << 16 | elem, None, length, pos + 8
    group, elem, vr, length = _EXPLICIT.unpack_from(data, pos)
    if vr not in _VRS:
        raise Unsupported
    if vr in _LONG:
        if pos + 12 > len(data):
            raise Unsupported
        return group << 16 | elem, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    return group << 16 | elem, vr, length, pos + 8


def _skip_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Skip an undefined-length sequence's items from ``pos``; return the offset after its delimiter."""
    if depth > 16:
        raise Unsupported
    while True:
        if pos + 8 > len(data):
            raise Unsupported
        group, elem, length = _TAG_LENGTH.unpack_from(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise Unsupported
        if length != _UNDEFINED:
            pos += length
            continue
        first = True
        while True:  # an undefined-length item: its elements up to the item delimiter
            if pos + 8 > len(data):
                raise Unsupported
            group, elem, _ = _TAG_LENGTH.unpack_from(data, pos)
            if group << 16 | elem == _ITEM_END:
                pos += 8
                break
            if implicit and first and 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B:
                raise Unsupported  # pydicom would read this item as explicit VR
            first = False
            tag, vr, length, pos = _element(data, pos, implicit)
            pos = _skip_value(data, pos, vr, length, implicit, depth)


def _skip_value(data: bytes, pos: int, vr: bytes | None, length: int, implicit: bool, depth: int) -> int:
    if length == _UNDEFINED:
        if vr is None or vr == b"SQ":
            return _skip_sequence(data, pos, implicit, depth + 1)
        if vr == b"UN":
            return _skip_sequence(data, pos, True, depth + 1)
        raise Unsupported
    end = pos + length
    if end > len(data):
        raise Unsupported
    return end


def _meta(data: bytes) -> tuple[bool, int]:
    """(implicit VR dataset?, offset of the dataset) from the file meta information."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise Unsupported
    pos, syntax = 132, None
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        tag, vr, length, value = _element(data, pos, False)
        if length == _UNDEFINED or value + length > len(data):
            raise Unsupported
        if tag == 0x00020010:
            syntax = data[value : value + length].rstrip(b"\0 ")
        pos = value + length
    if syntax is None:
        raise Unsupported
    uid = syntax.decode("latin-1")
    if uid in _NOT_EXPLICIT_LE:
        raise Unsupported
    if pos + 2 <= len(data) and data[pos : pos + 2] == b"\x00\x00":
        raise Unsupported  # a command set (group 0000), which pydicom reads apart
    if uid == _IMPLICIT_LE:
        # pydicom reads a dataset that starts with an explicit-looking VR as explicit: not our case.
        if pos + 6 <= len(data) and 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B:
            raise Unsupported
        return True, pos
    return False, pos


def _ascii_text(value: bytes) -> str:
    for byte in value:
        if byte == 0x5C or (byte < 0x20 and byte != 0) or byte > 0x7E:
            raise Unsupported
    return value.decode("ascii").rstrip("\0 ")


def patient_id(data: bytes) -> str | None:
    """PatientID as ``pydicom.dcmread(..., stop_before_pixels=True).get("PatientID")`` reads it."""
    implicit, pos = _meta(data)
    found: bytes | None = None
    charset: bytes | None = None
    previous = -1
    horizon = next_patient_id = next_charset = -1
    end = len(data)
    implicit_header, explicit_header, u32 = _TAG_LENGTH.unpack_from, _EXPLICIT.unpack_from, _U32.unpack_from
    vrs, long_vrs, stop = _VRS, _LONG, _STOP
    # The element loop is inlined (this runs for every top-level element of every stored file).
    while pos < end:
        if pos + 8 > end:
            raise Unsupported
        if implicit:
            group, elem, length = implicit_header(data, pos)
            vr = None
            value = pos + 8
        else:
            group, elem, vr, length = explicit_header(data, pos)
            if vr not in vrs:
                raise Unsupported
            if vr in long_vrs:
                if pos + 12 > end:
                    raise Unsupported
                length = u32(data, pos + 8)[0]
                value = pos + 12
            else:
                value = pos + 8
        tag = group << 16 | elem
        if tag in stop:
            break
        if tag <= previous:
            raise Unsupported
        previous = tag
        if tag > _PATIENT_ID and pos > horizon and end - pos <= _TAIL_SEARCH:
            # Past PatientID in ascending order: a top-level PatientID (or character set) further on
            # would be out of order, and its tag's bytes would be at its header's offset. Where they
            # are not in what is left, stop; where they are (in a sequence, in pixel data), walk on past
            # them. Only for a short rest (a header-only file): a long one is walked, not searched.
            if next_patient_id < pos:
                next_patient_id = data.find(_PATIENT_ID_BYTES, pos)
                if next_patient_id < 0:
                    next_patient_id = end
            if found is not None and next_charset < pos:
                next_charset = data.find(_CHARSET_BYTES, pos)
                if next_charset < 0:
                    next_charset = end
            horizon = min(next_patient_id, next_charset) if found is not None else next_patient_id
            if horizon >= end:
                break
        if length == _UNDEFINED:
            if tag in (_PATIENT_ID, _CHARSET):
                raise Unsupported
            pos = _skip_value(data, value, vr, length, implicit, 0)
            continue
        pos = value + length
        if pos > end:
            raise Unsupported
        if tag == _PATIENT_ID:
            if vr not in _TEXT_VRS:
                raise Unsupported
            found = data[value:pos]
        elif tag == _CHARSET:
            charset = data[value:pos]
    if charset is not None:
        try:
            name = charset.decode("ascii").strip("\0 ")
        except UnicodeDecodeError:
            raise Unsupported from None
        if name not in _ASCII_CHARSETS:
            raise Unsupported
    if found is None:
        return None
    return _ascii_text(found)
