"""The de-identification engine: PS3.15 Annex E applied by a profile, one dataset at a time.

``Deidentifier(profile, project, secret_source).deidentify(dataset)`` walks the dataset once with
pydicom (the fast path: no recipe interpretation per element), applying to each element:

- a Table E.1-1 row (``profiles.resolve_row`` then ``profiles.resolve_compound``):
  X remove; Z empty; D dummy of the VR; U remap UIDs; K keep; C clean (dates shifted by the
  patient's offset, text with the patient's identifiers masked, sequences cleaned recursively);
  PatientID, PatientName and AccessionNumber get keyed pseudonyms instead of Z/D;
- curves (50xx) and overlays (60xx: the whole group, its data being removed) go;
- private elements go unless the profile retains safe private and the (creator, group, element)
  is on the safe list; private creators without a kept element go;
- public attributes the table has no row for are kept when the data dictionary knows them
  (the table lists what must be treated), removed when it does not (a newer edition's or an
  unknown one) unless the profile keeps them; any non-registry UID is remapped; group lengths go;
- inside a sequence resolved to D (Content Sequence, Graphic Annotation Sequence ...), every
  free-text value the table does not list is replaced by a dummy; inside one resolved to C,
  it is cleaned.

Then it sets Patient Identity Removed, De-identification Method (Code Sequence: 113100 plus the
option codes), Longitudinal Temporal Information Modified, rebuilds the file meta (the preamble is
zeroed: it is no data element and the leak gate cannot judge it), treats burned-in text
(``pixels``), and runs the leak gate over the whole output. The input dataset is consumed: it is
modified in place and becomes the output.

Speed (``benchmarks/deid_throughput.py``): elements are read without pydicom's conversion where
that provably gives the same value (``rawvalues``), removed private elements are never decoded,
replacements are stored as the raw bytes pydicom would write, and ``writer.encode`` writes the
output. ``tests/unit/deid/test_fast_paths.py`` checks the result byte for byte, findings included,
against the general path (every element converted, ``save_as``) under every profile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

from pydicom.charset import default_encoding
from pydicom.datadict import get_entry
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from compliance.deid import pixels as pixel_mod
from compliance.deid.interfaces import DeidInputError, PseudonymSecretSource
from compliance.deid.leakgate import BYTES_VRS, Finding, IdentifierCollector, scan
from compliance.deid.profiles import Profile, SafePrivate, resolve_compound
from compliance.deid.pseudonyms import Pseudonymizer, is_standard_uid, shift_da, shift_dt
from compliance.deid.rawvalues import UNDEFINED, charset_of, default_conversion, keyword, peek, raw_value, vm

PATIENT_ID, PATIENT_NAME, ACCESSION = 0x00100020, 0x00100010, 0x00080050
PSEUDONYM_TAGS = frozenset({PATIENT_ID, PATIENT_NAME, ACCESSION})
FREE_TEXT_VRS = frozenset({"AE", "AS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
DUMMY: dict[str, Any] = {
    "AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED",
    "SH": "ANONYMIZED", "ST": "ANONYMIZED", "UC": "ANONYMIZED", "UT": "ANONYMIZED",
    "UR": "urn:anonymized", "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
    "AT": 0,
}
ENGINE_NAME = "compliance-deid"

# Table lookup modes for sequences: how values the table does not list are treated inside them.
_KEEP, _CLEAN, _DUMMY = 0, 1, 2


@dataclass
class Result:
    dataset: Dataset | None
    released: bool
    reasons: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    pixels: str = "not at risk"


@lru_cache(maxsize=8192)
def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        return str(get_entry(tag)[0]).split(" or ")[0]
    except KeyError:
        return None


# --- Reading a raw element without converting it (see ``rawvalues``) ---------------------------
# Most elements the walk treats are replaced or removed: pydicom's conversion to a DataElement is
# wasted on them. The walk decodes such a raw value with pydicom's own converter and writes a
# replacement as a raw element holding the bytes pydicom's writer would produce. Anything else
# (sequences, UN, implicit VR, deferred values, customised pydicom hooks, character sets with code
# extensions) takes the general path.


@lru_cache(maxsize=128)
def _encoded(vr: str, value: Any, little_endian: bool) -> bytes:
    """The bytes pydicom's writer produces for a constant value (padding included)."""
    fp = DicomBytesIO()
    fp.is_little_endian = little_endian
    fp.is_implicit_VR = True
    write_data_element(fp, DataElement(0x00100010, vr, value))
    return fp.getvalue()[8:]  # minus tag and length


class _Light:
    """An element the walk has read but not converted: what collecting and deciding need."""

    __slots__ = ("VR", "keyword", "value", "is_empty", "raw")

    def __init__(self, vr: str, keyword: str, value: Any, raw: RawDataElement) -> None:
        self.VR = vr
        self.keyword = keyword
        self.value = value
        self.is_empty = vm(value) == 0
        self.raw = raw


class _Walk:
    """State for one dataset."""

    def __init__(self, engine: Deidentifier, patient_key: str, scrub: re.Pattern[str] | None) -> None:
        self.e = engine
        self.profile = engine.profile
        self.pz = engine.pseudonyms
        self.patient_key = patient_key
        self.offset = self.pz.date_offset_days(patient_key)
        self.collector = IdentifierCollector()
        self.scrub = scrub
        self.notes: list[str] = []
        self.light_ok = default_conversion()
        #: per dataset being walked (innermost last): its character set, once known
        self._charsets: list[Any] = []

    # ------------------------------------------------------------------------------------------
    def dataset(self, ds: Dataset, mode: int, depth: int = 0) -> None:
        if depth > 64:
            raise DeidInputError("sequences nested deeper than 64 levels")
        private_kept_blocks: set[tuple[int, int]] = set()
        creators: dict[tuple[int, int], str] = {}
        elements = ds._dict
        actions = self.profile.actions
        safe = self.profile.safe_private
        removed_bytes = self.collector.removed_bytes
        self._charsets.append(None)
        try:
            for tag in list(elements):
                t = int(tag)
                group, elem_no = t >> 16, t & 0xFFFF
                if elem_no == 0:
                    del ds[tag]
                    continue
                if group in (0x0000, 0x0002):  # command/file meta elements do not belong in a data set
                    self.remove(ds, tag)
                    continue
                if group & 1:
                    if safe or 0x0010 <= elem_no <= 0x00FF:
                        self.private(ds, tag, group, elem_no, creators, private_kept_blocks)
                        continue
                    # No safe list: every private data element goes (``private`` would decide the same).
                    # Not decoded; its bytes feed the leak gate.
                    raw = elements[tag]
                    if (type(raw) is RawDataElement and raw.value is not None and raw.VR != "SQ"
                            and raw.length != UNDEFINED):
                        if raw.value and len(raw.value) <= 4096:
                            removed_bytes(raw.value)
                        del elements[tag]
                    else:
                        self.remove(ds, tag)
                    continue
                if (t & 0xFF010000) in (0x50000000, 0x60000000):  # curves, overlays: Annex E patterns
                    self.remove(ds, tag)
                    continue
                action = actions.get(t)
                if action is None:
                    self.unlisted(ds, tag, t, mode, depth)
                else:
                    self.listed(ds, tag, t, action, depth)
        finally:
            self._charsets.pop()
        # Private creators whose block kept nothing go (the loop above saw creators first).
        for (group, block) in creators:
            if (group, block) not in private_kept_blocks and (group << 16 | block) in ds:
                del ds[group << 16 | block]

    def light(self, ds: Dataset, tag: BaseTag) -> _Light | None:
        """The element at ``tag`` read without conversion, or None (then the general path applies)."""
        if not self.light_ok:
            return None
        charset = self._charsets[-1]
        if charset is None:
            charset = self._charsets[-1] = charset_of(ds)
        found = raw_value(ds, tag, charset)
        if found is None:
            return None
        raw, value = found
        return _Light(cast(str, raw.VR), keyword(int(tag)), value, raw)  # a VR of LIGHT_VRS: raw_value checked

    @staticmethod
    def set_raw(ds: Dataset, tag: BaseTag, light: _Light, data: bytes) -> None:
        """Replace a (public, non-pixel) element's value with already encoded bytes."""
        raw = light.raw
        ds._dict[tag] = RawDataElement(raw.tag, raw.VR, len(data), data, raw.value_tell, raw.is_implicit_VR,
                                       raw.is_little_endian)

    def element(self, ds: Dataset, tag: BaseTag) -> DataElement | None:
        try:
            return ds[tag]
        except Exception:  # an element pydicom cannot decode cannot be inspected: remove it
            self.notes.append(f"removed undecodable element {int(tag):08X}")
            del ds[tag]
            return None

    def remove(self, ds: Dataset, tag: BaseTag) -> None:
        light = self.light(ds, tag)
        if light is not None:
            self.collect_removed(light)
            del ds[tag]
            return
        el = self.element(ds, tag)
        if el is not None:
            self.collect_removed(el)
            del ds[tag]

    def collect_removed(self, el: DataElement | _Light) -> None:
        if el.VR == "SQ":
            for item in el.value or []:
                for sub in item:
                    self.collect_removed(sub)
        elif el.VR in BYTES_VRS or isinstance(el.value, (bytes, bytearray)):
            if el.value and len(el.value) <= 4096:
                self.collector.removed_bytes(bytes(el.value))
        else:
            self.collector.removed(el.VR, el.keyword, el.value)

    # ------------------------------------------------------------------------------------------
    def private(self, ds: Dataset, tag: BaseTag, group: int, elem_no: int,
                creators: dict[tuple[int, int], str], kept: set[tuple[int, int]]) -> None:
        raw = ds.get_item(tag)
        if 0x0010 <= elem_no <= 0x00FF:
            v = raw.value if raw is not None else None
            if isinstance(v, bytes):
                creators[(group, elem_no)] = v.decode("latin-1").strip(" \x00")
            elif v is not None:
                creators[(group, elem_no)] = str(v).strip()
            return
        block = elem_no >> 8
        creator = creators.get((group, block))
        safe = self.profile.safe_private
        if not (creator is not None and elem_no >= 0x1000 and SafePrivate(creator, group, elem_no & 0xFF) in safe):
            # Fast path: a removed private element is not decoded; its bytes feed the leak gate.
            if isinstance(raw, DataElement) or raw is None or raw.VR == "SQ" or raw.length == UNDEFINED:
                self.remove(ds, tag)
            else:
                if raw.value and len(raw.value) <= 4096:
                    self.collector.removed_bytes(raw.value)
                del ds[tag]
            return
        el = self.element(ds, tag)
        if el is not None:
            kept.add((group, block))
            self.keep(ds, el, _CLEAN, 0)

    def unlisted(self, ds: Dataset, tag: BaseTag, t: int, mode: int, depth: int) -> None:
        dict_vr = _dictionary_vr(t)
        if dict_vr is None and t not in self.profile.keep:
            self.remove(ds, tag)  # a newer edition's or unknown public attribute
            return
        if mode == _KEEP:
            # Fast path: a kept raw element stays undecoded (written back byte for byte); only its
            # text feeds the leak gate's list of kept tokens.
            raw = ds._dict.get(tag)
            if type(raw) is RawDataElement and raw.value is not None:
                vr = raw.VR or dict_vr
                if vr not in ("SQ", "UI", "UN", None) and raw.length != UNDEFINED:
                    if vr in FREE_TEXT_VRS or vr == "CS":
                        self.collector.kept([raw.value.decode("latin-1")] if raw.value else [])
                    return
        light = self.light(ds, tag)
        if light is not None:
            if mode == _DUMMY and light.VR in FREE_TEXT_VRS:
                self.dummy_light(ds, tag, light)
            elif light.VR == "UI":
                self.remap_light(ds, tag, light)
            else:  # a value kept (or cleaned) as it is: what the general path does
                el = self.element(ds, tag)
                if el is not None:
                    self.keep(ds, el, mode, depth)
            return
        el = self.element(ds, tag)
        if el is None:
            return
        if mode == _DUMMY and el.VR in FREE_TEXT_VRS:
            self.dummy(ds, el)
        else:
            self.keep(ds, el, mode, depth)

    def keep(self, ds: Dataset, el: DataElement, mode: int, depth: int) -> None:
        vr = el.VR
        if vr == "SQ":
            for item in el.value or []:
                self.dataset(item, mode, depth + 1)
        elif vr == "UI":
            self.remap(el, only_nonstandard=True)
        elif mode == _CLEAN and vr in FREE_TEXT_VRS:
            self.clean(ds, el)
        elif not (vr in BYTES_VRS or isinstance(el.value, (bytes, bytearray))):
            self.collector.kept(el.value)

    def listed(self, ds: Dataset, tag: BaseTag, t: int, action: str, depth: int) -> None:
        light = self.light(ds, tag)
        if light is not None and self.listed_light(ds, tag, t, action, light):
            return
        el = self.element(ds, tag)
        if el is None:
            return
        empty = el.is_empty
        row = self.profile.table.rows[t]
        action = resolve_compound(action, row.std_comp_iod, empty)
        vr = el.VR
        if action == "X":
            self.collect_removed(el)
            del ds[tag]
        elif t in PSEUDONYM_TAGS and action in ("Z", "D"):
            self.pseudonym(el, t)
        elif action == "Z":
            self.collect_removed(el)
            el.value = Sequence() if vr == "SQ" else (b"" if vr in BYTES_VRS else None)
        elif action == "D":
            if vr == "SQ":
                for item in el.value or []:
                    self.dataset(item, _DUMMY, depth + 1)
            elif vr == "UI":
                self.remap(el, only_nonstandard=False)
            else:
                self.dummy(ds, el)
        elif action == "U":
            if vr == "SQ":  # X/Z/U*: keep the references, their UIDs are remapped by their own rows
                for item in el.value or []:
                    self.dataset(item, _KEEP, depth + 1)
            else:
                self.remap(el, only_nonstandard=False)
        elif action == "C":
            if vr == "SQ":
                for item in el.value or []:
                    self.dataset(item, _CLEAN, depth + 1)
            else:
                self.clean(ds, el)
        else:  # K
            self.keep(ds, el, _KEEP, depth)

    def listed_light(self, ds: Dataset, tag: BaseTag, t: int, action: str, light: _Light) -> bool:
        """``listed`` for an unconverted (never a sequence) element; False: use the general path."""
        row = self.profile.table.rows[t]
        action = resolve_compound(action, row.std_comp_iod, light.is_empty)
        if action == "X":
            self.collect_removed(light)
            del ds[tag]
        elif t in PSEUDONYM_TAGS and action in ("Z", "D"):
            return False
        elif action == "Z":
            self.collect_removed(light)
            self.set_raw(ds, tag, light, b"")
        elif action == "D":
            if light.VR == "UI":
                self.remap_light(ds, tag, light)
            else:
                self.dummy_light(ds, tag, light)
        elif action == "U":
            self.remap_light(ds, tag, light)
        elif action == "C" or light.VR == "UI":
            return False
        else:  # K: kept as the general path keeps it
            return False
        return True

    # ------------------------------------------------------------------------------------------
    def pseudonym(self, el: DataElement, t: int) -> None:
        self.collect_removed(el)
        if el.is_empty:
            return
        if t == ACCESSION:
            el.value = self.pz.accession_number(str(el.value))
        elif t == PATIENT_ID:
            el.value = self.pz.patient_id(str(el.value).strip())
        else:
            el.value = self.pz.patient_name(self.patient_key)

    def dummy(self, ds: Dataset, el: DataElement) -> None:
        self.collect_removed(el)
        vr = el.VR
        if vr in BYTES_VRS or vr not in DUMMY:
            el.value = b"" if vr in BYTES_VRS else None
        else:
            el.value = DUMMY[vr]

    def dummy_light(self, ds: Dataset, tag: BaseTag, light: _Light) -> None:
        self.collect_removed(light)
        vr = light.VR
        data = b"" if vr in BYTES_VRS or vr not in DUMMY else _encoded(vr, DUMMY[vr], light.raw.is_little_endian)
        self.set_raw(ds, tag, light, data)

    def remap(self, el: DataElement, *, only_nonstandard: bool) -> None:
        if self.profile.has("retain_uids") or el.is_empty:
            if not el.is_empty:
                self.collector.kept(el.value)
            return
        el.value = self._remapped(el.keyword, el.value)

    def _remapped(self, keyword: str, value: Any) -> Any:
        values = value if isinstance(value, (list, MultiValue)) else [value]
        out = []
        for v in values:
            s = str(v).strip().rstrip("\x00")
            if not s or is_standard_uid(s):
                out.append(s)
                continue
            self.collector.removed("UI", keyword, s)
            out.append(self.pz.uid(s))
        return out if len(out) > 1 else out[0]

    def remap_light(self, ds: Dataset, tag: BaseTag, light: _Light) -> None:
        if self.profile.has("retain_uids") or light.is_empty:
            el = self.element(ds, tag)  # left as the general path leaves it
            if el is not None:
                self.remap(el, only_nonstandard=False)
            return
        out = self._remapped(light.keyword, light.value)
        text = "\\".join(out) if isinstance(out, list) else out
        if len(text) % 2:
            text += "\x00"  # pydicom's write_UI padding
        self.set_raw(ds, tag, light, text.encode(default_encoding))

    def clean(self, ds: Dataset, el: DataElement) -> None:
        vr = el.VR
        if vr in ("DA", "DT"):
            if not self.profile.has("retain_longitudinal_modified_dates"):
                return self.dummy(ds, el)
            self.collect_removed(el)
            shift = shift_da if vr == "DA" else shift_dt
            vals = [str(v) for v in (el.value if isinstance(el.value, MultiValue) else [el.value]) if v]
            shifted = [shift(v, self.offset) for v in vals]
            if any(s is None for s in shifted):
                del ds[el.tag]
                return
            el.value = shifted if len(shifted) > 1 else (shifted[0] if shifted else None)
        elif vr == "TM" or vr not in FREE_TEXT_VRS:
            self.collector.kept(el.value)  # times of day are kept with shifted dates
        elif vr == "PN":
            self.dummy(ds, el)
        else:
            if self.scrub is not None and isinstance(el.value, str):
                el.value = self.scrub.sub("***", el.value.upper()) if self.scrub.search(el.value.upper()) \
                    else el.value
            self.collector.kept(el.value)


_IDENTIFYING_TOP = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
                    "PatientMotherBirthName", "AccessionNumber", "ReferringPhysicianName", "PatientBirthDate",
                    "PatientAddress", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
                    "InstitutionName", "StudyID", "MedicalRecordLocator", "PatientTelephoneNumbers")


_MISSING = object()  # int(_MISSING) raises, as ds.Rows does when Rows is absent


def _truncated_pixels(ds: Dataset) -> str | None:
    """Native (uncompressed) pixel data shorter than its header says: a truncated file."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if "PixelData" not in ds or (ts is not None and ts.is_compressed):
        return None
    try:
        expected = (int(peek(ds, "Rows", _MISSING)) * int(peek(ds, "Columns", _MISSING))
                    * int(peek(ds, "BitsAllocated", _MISSING)) * int(peek(ds, "SamplesPerPixel", 1) or 1)
                    * int(peek(ds, "NumberOfFrames", 1) or 1) + 7) // 8
        actual = len(peek(ds, "PixelData"))
    except Exception:
        return "pixel data or image pixel description unreadable"
    if actual < expected:
        return f"pixel data truncated ({actual} of {expected} bytes)"
    return None


class Deidentifier:
    def __init__(self, profile: Profile, project: str, secret_source: PseudonymSecretSource,
                 pixel_policy: pixel_mod.PixelPolicy | None = None) -> None:
        self.profile = profile
        self.project = project
        self.pseudonyms = Pseudonymizer(secret_source.secret_for_project(project))
        self.pixel_policy = pixel_policy or pixel_mod.load_pixel_policy()
        self._needs_scrub = any(a == "C" for a in profile.actions.values())

    def _scrub_pattern(self, ds: Dataset) -> re.Pattern[str] | None:
        if not self._needs_scrub:
            return None
        c = IdentifierCollector()
        for kw in _IDENTIFYING_TOP:
            el = ds.get(kw)
            if el is not None and not isinstance(el, Dataset):
                try:
                    value = ds[kw].value
                    vr = ds[kw].VR
                except Exception:  # noqa: S112 - undecodable: the walk removes it
                    continue
                c.removed(vr, kw if vr != "SH" else kw + "ID", value)
        c.hard = {k: v for k, v in c.hard.items() if len(k) >= 3}
        return c.scrub_pattern()

    def deidentify(self, ds: Dataset) -> Result:
        missing = [k for k in REQUIRED_UIDS if not str(peek(ds, k, "") or "").strip()]
        if missing:
            return Result(None, False, [f"missing required UID attributes: {', '.join(missing)}"])
        truncated = _truncated_pixels(ds)
        if truncated:
            return Result(None, False, [truncated])
        try:
            patient_key = str(peek(ds, "PatientID", "") or "").strip() or str(peek(ds, "PatientName", "") or "")
        except Exception:
            patient_key = ""
        walk = _Walk(self, patient_key, self._scrub_pattern(ds))
        reasons: list[str] = []

        # Burned-in text: decided on the source header, before the walk removes Manufacturer etc.
        risk = self.pixel_policy.at_risk(ds)
        regions: list[dict[str, Any]] = []
        if risk is not None and self.profile.has("clean_pixel_data"):
            try:
                regions = pixel_mod.matching_regions(ds, self.pixel_policy)
            except Exception as exc:  # deid could not evaluate: fail closed below
                reasons.append(f"pixel rules could not be evaluated: {type(exc).__name__}")

        old_meta = getattr(ds, "file_meta", None)
        if old_meta is not None:
            for el in old_meta:
                if el.tag not in (0x00020001, 0x00020002, 0x00020010, 0x00020012, 0x00020013):
                    walk.collect_removed(el)
        walk.dataset(ds, _KEEP)
        if getattr(ds, "preamble", None):
            # The 128-byte preamble is free for applications (a TIFF header, a vendor's text): it is
            # not a data element, the leak gate cannot judge it, so it is never carried over.
            ds.preamble = b"\x00" * 128
        self._mark(ds, cleaned_pixels=False)

        pixel_state = "not at risk"
        if risk is not None:
            if not self.profile.has("clean_pixel_data"):
                reasons.append(f"burned-in text risk ({risk}) and the profile has no Clean Pixel Data option")
                pixel_state = "held back"
            elif not regions:
                reasons.append(f"burned-in text risk ({risk}) and no region rule in pixels.deid matches")
                pixel_state = "held back"
            else:
                try:
                    labels = pixel_mod.clean_regions(ds, regions)
                    pixel_state = "cleaned: " + "; ".join(labels)
                    ds.BurnedInAnnotation = "NO"
                    self._mark(ds, cleaned_pixels=True)
                except Exception as exc:
                    reasons.append(f"pixel cleaning failed ({type(exc).__name__}: {exc})")
                    pixel_state = "held back"
                if not reasons and self.profile.ocr:
                    text = pixel_mod.ocr_text(ds)
                    if text is None:
                        reasons.append("OCR gate required by the profile but tesseract is not installed")
                    elif re.search(r"[A-Za-z0-9]{4,}", text):
                        reasons.append("OCR found text in the cleaned pixels")

        ts = ExplicitVRLittleEndian if pixel_state.startswith("cleaned") else (
            old_meta.get("TransferSyntaxUID") if old_meta is not None else None) or ImplicitVRLittleEndian
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "COMPLIANCE_DEID"
        ds.file_meta = meta
        walk.collector.kept([self.pseudonyms.patient_name(patient_key), ds.DeidentificationMethod,
                             "VERSION_NAME COMPLIANCE_DEID"])
        walk.collector.kept([i.CodeMeaning for i in ds.DeidentificationMethodCodeSequence])

        findings = scan(ds, walk.collector)
        if findings:
            reasons.append(f"leak gate: {len(findings)} identifying value(s) found in the output")
        released = not reasons
        return Result(ds if released else None, released, reasons + walk.notes if not released else walk.notes,
                      findings, pixel_state)

    def _mark(self, ds: Dataset, *, cleaned_pixels: bool) -> None:
        """PS3.15 E.1.1 / PS3.3 C.7.1.1: record what was done (CID 7050 codes)."""
        p = self.profile
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"{ENGINE_NAME} {p.name} (PS3.15 Annex E {p.table.edition})"[:64]
        items = []
        for opt in p.options:
            if opt == "clean_pixel_data" and not cleaned_pixels:
                continue
            info = p.table.options[opt]
            item = Dataset()
            item.CodeValue = info["code"]
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = info["meaning"]
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if p.has("retain_longitudinal_full_dates"):
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif p.has("retain_longitudinal_modified_dates"):
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"
