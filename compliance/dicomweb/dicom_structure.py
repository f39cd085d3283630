"""The element framing of a STOW-RS part, walked as it streams: no recursion, no value held.

The gateway reads a part's identifying attributes with pydicom and the archive (Orthanc, DCMTK) then
parses the same bytes again. Where a file's encoding leaves room for the two to read it differently,
or for a parser to recurse without bound, the part is refused before pydicom sees it:

* sequences nested deeper than ``max_depth`` levels (pydicom's reader and DCMTK both recurse once per
  level: thousands of levels were a ``RecursionError``, a 500 and no audit event) ->
  :class:`NestingTooDeep`. Counted are SQ elements of defined or undefined length, UN of undefined
  length (PS3.5 6.2.2), UN and implicit VR elements whose tag the data dictionary gives as SQ, and
  undefined-length implicit VR elements, anywhere in the part, including after the Pixel Data;
* anything else that is not a plainly encoded PS3.10 file -> :class:`StructureError`: no 128-byte
  preamble and ``DICM``; File Meta Information that is not explicit VR little endian, lacks a Transfer
  Syntax UID, or disagrees with its own group length; a command set (group 0000); the deflated
  transfer syntax (the whole dataset would have to be inflated to be read, which pydicom does without
  bound); a data set whose first element is encoded otherwise than its transfer syntax says (pydicom
  switches silently, DCMTK may not); an unknown explicit VR; an undefined length other than a
  sequence's, UN's or the Pixel Data's fragments; tags not strictly ascending in any data set (PS3.5
  7.1: with a duplicate, pydicom keeps the last element, DCMTK the first); a delimiter or item where
  none may stand; an element, item or sequence that overruns the one containing it; and a part that
  ends anywhere but after a complete top-level element.

:attr:`DicomStructure.header_end` is the offset where ``dcmread(stop_before_pixels=True)`` stops: the
first top-level element at or past (7FE0,0008). pydicom only ever parses bytes this walk has passed.

Hand-written: neither pydicom nor any library found walks a file's framing iteratively while it
streams (pydicom recurses and reads whole values; ``compliance/archive/dicom_header.py`` works on a
complete buffer and gives up rather than refuses).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import DicomDictionary

__all__ = ["DEFAULT_MAX_DEPTH", "DicomStructure", "NestingTooDeep", "StructureError"]

#: Levels of sequence nesting accepted by default (``COMPLIANCE_STOW_MAX_SEQUENCE_DEPTH``).
DEFAULT_MAX_DEPTH = 32

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
#: pydicom's ``stop_before_pixels`` stops at (7FE0,0008), (7FE0,0009) and (7FE0,0010); with tags in
#: ascending order, at the first top-level tag from (7FE0,0008) on.
_HEADER_STOP = 0x7FE00008

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"

_VRS = frozenset(vr.encode() for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
    "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"))
#: Explicit VRs with two reserved bytes and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                                             "UT", "UV"))
#: Public tags the data dictionary gives as SQ (plus the 50xx,2600 repeater, tested apart).
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


def _is_sq_tag(tag: int) -> bool:
    return tag in _SQ_TAGS or (tag & 0xFF00FFFF) == 0x50002600


def _looks_explicit(header: bytes) -> bool:
    """pydicom's test (``filereader._is_implicit_vr``): bytes 4-5 of an element are two capitals."""
    return 0x40 < header[4] < 0x5B and 0x40 < header[5] < 0x5B


class StructureError(ValueError):
    """The part is not an acceptably encoded PS3.10 file; the message says why."""


class NestingTooDeep(StructureError):
    def __init__(self, depth: int, limit: int, offset: int) -> None:
        super().__init__(f"sequences nested more than {limit} levels deep (at byte {offset})")
        self.depth = depth
        self.limit = limit


# Frame kinds
_DATASET, _ITEMS, _FRAGMENTS = 0, 1, 2
# What the next token is
_PREAMBLE, _META, _META_EXT, _META_VALUE, _ELEMENT, _ELEMENT_EXT = range(6)


@dataclass
class _Frame:
    kind: int
    #: absolute offset where a defined-length container ends (None: undefined length, or the top level)
    end: int | None
    #: the smallest end of this frame and its ancestors: nothing inside may reach past it
    limit: int | None
    implicit: bool
    last_tag: int = -1
    #: an item of undefined length: ends at an item delimiter
    open_item: bool = False
    #: the first element of an implicit VR item in an explicit VR file is checked for pydicom's switch
    check_first: bool = False


class DicomStructure:
    """Feed a part's bytes in order (:meth:`feed`), then :meth:`close` at its end. Raises
    :class:`StructureError` (or :class:`NestingTooDeep`) as soon as the bytes seen cannot be accepted."""

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.max_depth = max_depth
        #: bytes consumed so far
        self.offset = 0
        #: offset of the first top-level element from (7FE0,0008) on (where pydicom stops), once seen
        self.header_end: int | None = None
        self.transfer_syntax: str | None = None
        self._state = _PREAMBLE
        self._need = 132
        self._buf = bytearray()
        self._skip = 0
        self._stack: list[_Frame] = []
        self._depth = 0
        self._little = True
        # file meta information
        self._meta_tag = 0
        self._meta_vr = b""
        self._meta_group_length: int | None = None
        self._meta_group_start = 0
        # an explicit VR element whose 4-byte length is still to come
        self._pending: tuple[int, bytes, int] | None = None

    # -- feeding ------------------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, size = 0, len(view)
        while pos < size:
            if self._skip:
                take = min(self._skip, size - pos)
                self._skip -= take
                pos += take
                self.offset += take
                if not self._skip:
                    self._settle()
                continue
            take = min(self._need - len(self._buf), size - pos)
            if not self._buf and take == self._need:  # the whole token is in this chunk
                token = bytes(view[pos : pos + take])
            else:
                self._buf += view[pos : pos + take]
                if len(self._buf) < self._need:
                    self.offset += take
                    return
                token = bytes(self._buf)
                self._buf.clear()
            pos += take
            self.offset += take
            self._step(token)

    def close(self) -> None:
        """The part ended: it must end after a complete top-level element."""
        if self._state in (_PREAMBLE, _META, _META_EXT, _META_VALUE):
            raise StructureError("the part ends inside the file meta information: not a complete PS3.10 file")
        if self._buf or self._skip or self._pending is not None:
            raise StructureError(f"the part ends inside an element (at byte {self.offset})")
        if len(self._stack) != 1:
            raise StructureError(f"the part ends inside a sequence or item (at byte {self.offset})")
        if self.header_end is None:
            self.header_end = self.offset

    # -- the walk -----------------------------------------------------------------------------------
    def _step(self, token: bytes) -> None:
        state = self._state
        if state == _ELEMENT:
            self._element(token)
        elif state == _ELEMENT_EXT:
            assert self._pending is not None
            tag, vr, start = self._pending
            self._pending = None
            self._state, self._need = _ELEMENT, 8
            length = struct.unpack("<I" if self._little else ">I", token)[0]
            self._value(tag, vr, length, start)
        elif state == _PREAMBLE:
            if token[128:132] != b"DICM":
                raise StructureError("not a DICOM PS3.10 file: no 128-byte preamble followed by DICM")
            self._state, self._need = _META, 8
        elif state == _META:
            self._meta_element(token)
        elif state == _META_EXT:
            self._meta_length(struct.unpack("<I", token)[0])
        else:  # _META_VALUE
            self._meta_value(token)

    def _settle(self) -> None:
        """Close every defined-length container that ends here; refuse what reaches past one."""
        stack = self._stack
        while stack:
            top = stack[-1]
            if top.limit is not None and self.offset > top.limit:
                raise StructureError(f"an element overruns the sequence or item containing it (at byte {self.offset})")
            if top.end is None or self.offset != top.end:
                return
            stack.pop()
            if top.kind == _ITEMS:
                self._depth -= 1
        return

    def _push(self, kind: int, end: int | None, implicit: bool, **extra: bool) -> None:
        parent = self._stack[-1].limit if self._stack else None
        limit = end if parent is None else (parent if end is None else min(end, parent))
        if end is not None and parent is not None and end > parent:
            raise StructureError(f"a sequence or item overruns the one containing it (at byte {self.offset})")
        self._stack.append(_Frame(kind, end, limit, implicit, **extra))
        if kind == _ITEMS:
            self._depth += 1
            if self._depth > self.max_depth:
                raise NestingTooDeep(self._depth, self.max_depth, self.offset)

    # -- file meta information (explicit VR little endian, group 0002) --------------------------------
    def _meta_element(self, token: bytes) -> None:
        group, elem, vr, length = struct.unpack("<HH2sH", token)
        if group != 0x0002:
            if self.transfer_syntax is None:
                raise StructureError("the file meta information has no Transfer Syntax UID (0002,0010)")
            if self._meta_group_length is not None and \
                    self.offset - 8 - self._meta_group_start != self._meta_group_length:
                raise StructureError("the File Meta Information Group Length (0002,0000) disagrees with the "
                                     "file meta information")
            self._start_dataset(token)
            return
        tag = group << 16 | elem
        if tag <= self._meta_tag:
            raise StructureError("file meta information elements out of order or repeated")
        if vr not in _VRS:
            raise StructureError(f"unknown VR in the file meta information ({tag:08X})")
        self._meta_tag, self._meta_vr = tag, vr
        if vr in _LONG_VRS:
            self._state, self._need = _META_EXT, 4
        else:
            self._meta_length(length)

    def _meta_length(self, length: int) -> None:
        if length == _UNDEFINED:
            raise StructureError("an undefined length in the file meta information")
        if self._meta_tag in (0x00020000, 0x00020010):
            if length > 256:
                raise StructureError("an oversized file meta information element")
            if length == 0:
                self._meta_value(b"")
                return
            self._state, self._need = _META_VALUE, length
            return
        self._state, self._need = _META, 8
        self._skip = length

    def _meta_value(self, value: bytes) -> None:
        if self._meta_tag == 0x00020000:
            if len(value) != 4:
                raise StructureError("a File Meta Information Group Length that is not 4 bytes")
            self._meta_group_length = struct.unpack("<I", value)[0]
            self._meta_group_start = self.offset
        else:
            self.transfer_syntax = value.rstrip(b"\0 ").decode("latin-1")
            if self.transfer_syntax == _DEFLATED:
                raise StructureError("the deflated transfer syntax is not accepted by this gateway")
            if not self.transfer_syntax:
                raise StructureError("an empty Transfer Syntax UID (0002,0010)")
        self._state, self._need = _META, 8

    def _start_dataset(self, token: bytes) -> None:
        implicit = self.transfer_syntax == _IMPLICIT_LE
        self._little = self.transfer_syntax != _EXPLICIT_BE
        if implicit == _looks_explicit(token) and token[0:2] != b"\xfe\xff":
            raise StructureError("the data set is not encoded as its transfer syntax says "
                                 "(implicit and explicit VR disagree)")
        self._push(_DATASET, None, implicit)
        self._state, self._need = _ELEMENT, 8
        self._element(token)

    # -- data sets, sequences, items -------------------------------------------------------------------
    def _element(self, token: bytes) -> None:
        frame = self._stack[-1]
        start = self.offset - 8
        if frame.limit is not None and self.offset > frame.limit:
            raise StructureError(f"an element overruns the sequence or item containing it (at byte {start})")
        little = self._little
        group, elem, length = struct.unpack("<HHI" if little else ">HHI", token)
        tag = group << 16 | elem
        if frame.kind == _ITEMS:
            self._in_sequence(frame, tag, length, start)
            return
        if frame.kind == _FRAGMENTS:
            if tag == _ITEM and length != _UNDEFINED:
                self._skip = length
                if frame.limit is not None and self.offset + length > frame.limit:
                    raise StructureError(f"a fragment overruns its container (at byte {start})")
                if not length:
                    self._settle()
                return
            if tag == _SEQUENCE_END and length == 0:
                self._stack.pop()
                self._settle()
                return
            raise StructureError(f"not a fragment of encapsulated pixel data (at byte {start})")
        # a data set: the top level or an item
        if group == 0xFFFE:
            if tag == _ITEM_END and frame.open_item and length == 0:
                self._stack.pop()
                self._settle()
                return
            raise StructureError(f"a delimiter or item tag where a data element must stand (at byte {start})")
        if tag <= frame.last_tag:
            raise StructureError(f"data elements out of order or repeated: ({group:04X},{elem:04X}) after "
                                 f"({frame.last_tag >> 16:04X},{frame.last_tag & 0xFFFF:04X}) (at byte {start})")
        if frame.check_first:
            frame.check_first = False
            if _looks_explicit(token):
                raise StructureError(f"an item of an implicit VR sequence looks explicit VR (at byte {start})")
        frame.last_tag = tag
        top = len(self._stack) == 1
        if top:
            if group < 0x0008:
                raise StructureError(f"group {group:04X} in the data set (at byte {start})")
            if self.header_end is None and tag >= _HEADER_STOP:
                self.header_end = start
        if frame.implicit:
            self._value(tag, None, length, start)
            return
        vr = token[4:6]
        if vr not in _VRS:
            raise StructureError(f"unknown VR {vr!r} for ({group:04X},{elem:04X}) (at byte {start})")
        if vr in _LONG_VRS:
            self._pending = (tag, vr, start)
            self._state, self._need = _ELEMENT_EXT, 4
            return
        self._value(tag, vr, struct.unpack("<H" if little else ">H", token[6:8])[0], start)

    def _value(self, tag: int, vr: bytes | None, length: int, start: int) -> None:
        frame = self._stack[-1]
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and vr in (None, b"OB", b"OW"):
                self._push(_FRAGMENTS, None, frame.implicit)
            elif vr == b"SQ" or (vr is None and (_is_sq_tag(tag) or tag not in DicomDictionary)):
                self._push(_ITEMS, None, frame.implicit)
            elif vr == b"UN":
                self._push(_ITEMS, None, True, check_first=True)
            else:
                raise StructureError(f"an undefined length for ({tag >> 16:04X},{tag & 0xFFFF:04X}), "
                                     f"which is not a sequence (at byte {start})")
            return
        end = self.offset + length
        if frame.limit is not None and end > frame.limit:
            raise StructureError(f"an element overruns the sequence or item containing it (at byte {start})")
        if vr == b"SQ" or (vr is None and _is_sq_tag(tag)):
            self._push(_ITEMS, end, frame.implicit)
            self._settle()
        elif vr == b"UN" and _is_sq_tag(tag):
            # pydicom reads it as an implicit VR sequence when the element is used (PS3.5 6.2.2)
            self._push(_ITEMS, end, True)
            self._settle()
        else:
            self._skip = length
            if not length:
                self._settle()

    def _in_sequence(self, frame: _Frame, tag: int, length: int, start: int) -> None:
        if tag == _ITEM:
            if length == _UNDEFINED:
                self._push(_DATASET, None, frame.implicit, open_item=True,
                           check_first=frame.implicit and not self._stack[0].implicit)
            else:
                self._push(_DATASET, self.offset + length, frame.implicit,
                           check_first=frame.implicit and not self._stack[0].implicit)
                self._settle()
            return
        if tag == _SEQUENCE_END and frame.end is None and length == 0:
            self._stack.pop()
            self._depth -= 1
            self._settle()
            return
        raise StructureError(f"not an item of a sequence (at byte {start})")
