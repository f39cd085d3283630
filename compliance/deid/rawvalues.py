"""Reading raw (not yet converted) pydicom elements without converting them.

pydicom reads a file into ``RawDataElement``s and converts one into a ``DataElement`` (VR hooks,
value conversion, validation, a new object stored back into the dataset) the first time it is
accessed. The de-identification engine removes or replaces most elements it looks at, so that
conversion is mostly wasted work: here a value is decoded with pydicom's own converter
(``pydicom.values.convert_value``, the exact value the DataElement would hold) and the element is
left as it was. Only the cases where that is provably the same as pydicom's conversion qualify:
an explicit VR from the list below, a value present (not deferred) and of defined length, the
default conversion hooks, and a character set in which ASCII text encodes as itself; anything
else returns None and the caller takes pydicom's general path.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom import hooks as pydicom_hooks
from pydicom.datadict import dictionary_has_tag, dictionary_keyword, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import PIXEL_KEYWORDS, Dataset
from pydicom.tag import _LUT_DESCRIPTOR_TAGS, BaseTag
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, PersonName
from pydicom.values import convert_value, converters

LIGHT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT", "OB", "OD", "OF", "OL", "OV", "OW", "FD", "FL", "SL", "SS", "SV", "UL", "US",
                       "UV"})
#: Python codecs (pydicom's names) in which every ASCII text encodes as itself, without escapes.
ASCII_TRANSPARENT = frozenset({"iso8859", "latin_1", "iso8859_2", "iso8859_3", "iso8859_4", "iso_ir_126",
                               "iso_ir_127", "iso_ir_138", "iso_ir_144", "iso_ir_148", "iso_ir_166", "UTF8",
                               "GB18030", "GBK"})
#: Never written back raw by the engine: the character set itself, LUT descriptors (pydicom fixes
#: their sign after conversion), pixel data (the dataset caches arrays for them).
NOT_LIGHT_TAGS = frozenset({0x00080005, *_LUT_DESCRIPTOR_TAGS, *(int(t) for t in PIXEL_KEYWORDS)})
UNDEFINED = 0xFFFFFFFF
#: Text VRs whose converter validates each value only to warn (unless pydicom is set to raise).
_TEXT = frozenset(CUSTOMIZABLE_CHARSET_VR) - {"PN"}
#: pydicom's converters by VR (its keys are ``VR`` str enums, so a plain VR string finds them)
_CONVERTERS = cast(dict[str, Callable[..., Any]], converters)


def default_conversion() -> bool:
    """pydicom converts raw elements with its default hooks (nobody customised them)."""
    h = pydicom_hooks.hooks
    return (h.raw_element_vr is pydicom_hooks.raw_element_vr and h.raw_element_value is pydicom_hooks.raw_element_value
            and not h.raw_element_kwargs and not pydicom_config.data_element_callback)


@lru_cache(maxsize=8192)
def keyword(tag: BaseTag) -> str:
    """``DataElement.keyword`` of a tag, without building the element."""
    return dictionary_keyword(tag) if dictionary_has_tag(tag) else ""


def vm(value: Any) -> int:
    """``DataElement.VM`` of a converted (non-sequence) value."""
    if value is None:
        return 0
    if isinstance(value, (str, bytes, PersonName)):
        return 1 if value else 0
    try:
        iter(value)
    except TypeError:
        return 1
    return len(value)


def charset_of(ds: Dataset) -> Any:
    """What ``Dataset.__getitem__`` decodes text with; False when ASCII is not written as itself."""
    enc = ds.original_character_set or ds._character_set
    names = [enc] if isinstance(enc, str) else list(enc)
    return enc if len(names) == 1 and names[0] in ASCII_TRANSPARENT else False


def raw_value(ds: Dataset, tag: BaseTag, charset: Any, *, pixels: bool = False) -> tuple[RawDataElement, Any] | None:
    """(raw element, decoded value) of an unconverted element, or None (then convert it as usual)."""
    raw = ds._dict.get(tag)
    if type(raw) is not RawDataElement:
        return None
    vr = raw.VR
    if vr not in LIGHT_VRS or raw.value is None or raw.length == UNDEFINED or charset is False:
        return None
    t = int(tag)
    if t in NOT_LIGHT_TAGS and not (pixels and t not in (0x00080005, *_LUT_DESCRIPTOR_TAGS)):
        return None
    try:
        if vr in _TEXT and raw.length and pydicom_config.settings.reading_validation_mode != pydicom_config.RAISE:
            # pydicom's own converter, without the validation that could only warn
            try:
                return raw, _CONVERTERS[vr](raw.value, [charset] if isinstance(charset, str) else charset, None)
            except ValueError:
                pass  # convert_value retries other VRs: let it
        return raw, convert_value(vr, raw, charset)
    except Exception:  # the general path reports (or removes) what pydicom cannot decode
        return None


@lru_cache(maxsize=256)
def _tag(kw: str) -> BaseTag | None:
    tag = tag_for_keyword(kw)
    return None if tag is None else BaseTag(tag)


def peek(ds: Dataset, kw: str, default: Any = None) -> Any:
    """``ds.get(kw, default)`` without converting (and storing) the element when it is raw."""
    tag = _tag(kw)
    if tag is not None and default_conversion():
        if tag not in ds._dict:
            return default
        found = raw_value(ds, tag, charset_of(ds), pixels=True)
        if found is not None:
            return found[1]
    return ds.get(kw, default)
