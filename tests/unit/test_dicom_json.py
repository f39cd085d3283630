"""Reading DICOM JSON values (compliance/dicom_json.py, PS3.18 F.2): strict and lenient readings."""

from __future__ import annotations

import pytest

from compliance import dicom_json
from compliance.dicom_json import NotDicomJson

ITEM = {
    "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane", "Ideographic": "D^J"}]},
    "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
    "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}]},
    "00080050": {"vr": "SH"},  # empty: no Value
    "00201208": {"vr": "IS", "Value": [12]},
}


def test_values_first_value_and_items() -> None:
    assert dicom_json.values(ITEM, "00080061") == ["CT", "MR"]
    assert dicom_json.first_value(ITEM, "0020000D") == "1.2.3"
    assert dicom_json.first_value(ITEM, "00080050") is None and dicom_json.values(ITEM, "99999999") == []
    assert [dicom_json.first_value(i, "00081155") for i in dicom_json.items(ITEM, "00081199")] == ["1.2.3.4"]


@pytest.mark.parametrize("bad", [{"0020000D": "1.2.3"}, {"0020000D": {"Value": "1.2.3"}},
                                 {"00081199": {"Value": ["not an item"]}}])
def test_the_strict_reading_refuses_what_is_not_f2(bad: dict[str, object]) -> None:
    with pytest.raises(NotDicomJson):
        dicom_json.items(bad, "00081199") if "00081199" in bad else dicom_json.values(bad, "0020000D")


def test_person_names_and_the_lenient_reading() -> None:
    assert dicom_json.person_name({"Alphabetic": "Doe^Jane"}) == "Doe^Jane"
    assert dicom_json.person_name({"Ideographic": "D^J"}) == "D^J"
    assert dicom_json.person_name({}) is None and dicom_json.person_name(None) is None
    assert dicom_json.first_text(ITEM, "00100010") == "Doe^Jane"
    assert dicom_json.first_text(ITEM, "00201208") == "12"
    assert dicom_json.first_text({"0020000D": "1.2.3"}, "0020000D") is None  # not F.2: absent, no error


def test_orthancs_own_form() -> None:
    assert dicom_json.orthanc_string({"0010,0020": {"Name": "PatientID", "Type": "String", "Value": "P1"}},
                                     "0010,0020") == "P1"
    assert dicom_json.orthanc_string({}, "0010,0020") is None
    with pytest.raises(NotDicomJson):
        dicom_json.orthanc_string({"0010,0020": "P1"}, "0010,0020")
