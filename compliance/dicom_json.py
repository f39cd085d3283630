"""Reading values out of DICOM JSON (PS3.18 F.2), the one place that knows its shape.

A DICOM JSON object maps an eight-hex-digit tag (``"0020000D"``) to an element
``{"vr": ..., "Value": [...]}``; ``Value`` is always an array (absent when the attribute is empty),
a sequence's items are DICOM JSON objects again, and a person name (PN) value is an object of its
``Alphabetic``, ``Ideographic`` and ``Phonetic`` representations.

Two readings, because callers differ in what a malformed document means to them:

* :func:`values`, :func:`first_value` and :func:`items` are strict: an element or ``Value`` of the
  wrong shape raises :class:`NotDicomJson` (a ``ValueError``), for callers that reject the whole
  document (a STOW-RS answer) or let the error reach the caller.
* :func:`first_text` is lenient: anything not where F.2 puts it reads as absent, for callers that
  take what they can from a search result (the audit of a QIDO-RS answer).

:func:`orthanc_string` reads Orthanc's own DICOM-as-JSON attachment (``"0010,0020": {"Name": ...,
"Type": "String", "Value": "..."}``), which is not F.2: the tag has a comma and ``Value`` is the
string itself.

This module sits at the bottom of the layers and imports nothing from ``compliance``.
"""

from __future__ import annotations

from collections.abc import Mapping


class NotDicomJson(ValueError):
    """An element or its ``Value`` is not of the shape PS3.18 F.2 gives it."""


def values(item: Mapping[str, object], tag: str) -> list[object]:
    """All values of ``tag`` in the DICOM JSON object ``item``; ``[]`` when absent or empty."""
    element = item.get(tag) or {}
    if not isinstance(element, Mapping):
        raise NotDicomJson(f"element {tag} is a {type(element).__name__}, not an object")
    found = element.get("Value") or []
    if not isinstance(found, list):
        raise NotDicomJson(f"the Value of {tag} is a {type(found).__name__}, not an array")
    return found


def first_value(item: Mapping[str, object], tag: str) -> object | None:
    """The first value of ``tag`` (a string, number or person-name object), ``None`` when empty."""
    found = values(item, tag)
    return found[0] if found else None


def items(item: Mapping[str, object], tag: str) -> list[Mapping[str, object]]:
    """The items of the sequence ``tag``, each a DICOM JSON object; ``[]`` when absent or empty."""
    found: list[Mapping[str, object]] = []
    for entry in values(item, tag):
        if not isinstance(entry, Mapping):
            raise NotDicomJson(f"an item of sequence {tag} is a {type(entry).__name__}, not an object")
        found.append(entry)
    return found


def person_name(value: object | None) -> str | None:
    """The Alphabetic (else Ideographic, else Phonetic) representation of a DICOM JSON PN value;
    any other value as its string form."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        for rep in ("Alphabetic", "Ideographic", "Phonetic"):
            if value.get(rep):
                return str(value[rep])
        return None
    return str(value)


def first_text(item: Mapping[str, object], tag: str) -> str | None:
    """The first value of ``tag`` as text (a person name by :func:`person_name`), leniently:
    ``None`` when the element or its ``Value`` is missing, empty or not of the F.2 shape."""
    element = item.get(tag)
    found = element.get("Value") if isinstance(element, Mapping) else None
    if not isinstance(found, list) or not found:
        return None
    value = found[0]
    if isinstance(value, str):
        return value
    return person_name(value) if isinstance(value, Mapping) else str(value)


def orthanc_string(document: Mapping[str, object], tag: str) -> str | None:
    """The string value of ``tag`` (``"gggg,eeee"``) in Orthanc's DICOM-as-JSON attachment, else
    ``None``. Raises :class:`NotDicomJson` when the element is present but not an object."""
    element = document.get(tag) or {}
    if not isinstance(element, Mapping):
        raise NotDicomJson(f"element {tag} is a {type(element).__name__}, not an object")
    found = element.get("Value")
    return found if isinstance(found, str) else None
