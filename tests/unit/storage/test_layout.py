"""Storage layouts as pure functions: header values in, relative path out. No disk."""

from __future__ import annotations

import datetime
import os
import posixpath
import warnings

import msgspec
import pydicom
import pytest

from fastscp.dicom.header import HeaderFields, parse_header
from fastscp.dicom.part10 import dataset_offset
from fastscp.storage.layout import (
    LAYOUTS,
    Accounts,
    LayoutOptions,
    PatientFolders,
    TemplateError,
    check_template,
    relative_path,
    safe_component,
    study_folder,
)

CT = HeaderFields(
    patient_id="PID1", patient_name="DOE^JANE", study_instance_uid="1.2.3", study_date="20240131",
    study_id="S7", accession_number="ACC9", series_instance_uid="1.2.3.4", series_number=5, modality="CT",
    series_description="AXIAL 5mm", sop_instance_uid="1.2.3.4.5", instance_number=42, echo_number=2,
    referring_physician_name="WHO^REFERS", requesting_physician="SMITH^JOHN",
)
TODAY = datetime.date(2026, 11, 22)


def path(naming: str, header: HeaderFields = CT, **options) -> str:  # type: ignore[no-untyped-def]
    return relative_path(LayoutOptions(naming=naming, **options), header, TODAY)


def test_hierarchical_and_flat() -> None:
    assert path("hierarchical") == "PID1/20240131_1.2.3/5_CT/1.2.3.4.5.dcm"
    assert path("flat") == "1.2.3.4.5.dcm"


def test_date_based_uses_study_date_else_received_date() -> None:
    assert path("date-based") == "2024/01/31/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    for bad in ("", "2024", "20241399", "garbage!"):
        header = HeaderFields(study_date=bad, study_instance_uid="1.2", series_instance_uid="1.3", sop_instance_uid="9")
        assert path("date-based", header) == "2026/11/22/1.2/1.3/9.dcm"
        # No received date given: the day of the store.
        before = datetime.date.today()
        stored = relative_path(LayoutOptions(naming="date-based"), header)
        assert stored in {f"{day:%Y/%m/%d}/1.2/1.3/9.dcm" for day in (before, datetime.date.today())}
    # A date and time where only a date belongs (some modalities): its date part counts.
    header = HeaderFields(study_date="20240131093000", study_instance_uid="1.2", series_instance_uid="1.3",
                          sop_instance_uid="9")
    assert path("date-based", header) == "2024/01/31/1.2/1.3/9.dcm"


def test_template_with_fallbacks_and_padding() -> None:
    template = "{PatientName|PatientID|UNKNOWN}/{StudyID|StudyInstanceUID}/{SeriesNumber:03}/{SOPInstanceUID}"
    assert path("template", template=template) == "DOE JANE/S7/005/1.2.3.4.5.dcm"
    anonymous = HeaderFields(patient_id="", study_instance_uid="1.9", series_number=None, sop_instance_uid="7")
    assert path("template", anonymous, template=template) == "UNKNOWN/1.9/UNKNOWN/7.dcm"
    only_id = HeaderFields(patient_id="P2", sop_instance_uid="7")
    assert path("template", only_id, template="{PatientName|PatientID}/{SOPInstanceUID}.dcm") == "P2/7.dcm"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{PatientNmae}/{SOPInstanceUID}", "'PatientNmae' is not a keyword"),
        ("{PatientID:x}/{SOPInstanceUID}", "width must be like :03"),
        ("{PatientID/{SOPInstanceUID}", "unbalanced braces"),
        ("PatientID}/x", "unbalanced braces"),
        ("  ", "the template is empty"),
    ],
)
def test_bad_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("(", r"\(")):
        check_template(template)


def test_patient_folders_options() -> None:
    assert path("patient-folders") == "PID1/20240131_1.2.3/5_CT/1.2.3.4.5.dcm"
    by_name = PatientFolders(top="patient_name", study_level=False, series_level=True)
    assert path("patient-folders", patient_folders=by_name) == "DOE JANE/5_CT/1.2.3.4.5.dcm"
    flat_patient = PatientFolders(study_level=False, series_level=False)
    assert path("patient-folders", patient_folders=flat_patient) == "PID1/1.2.3.4.5.dcm"


def test_accounts_preset_resolution_order() -> None:
    accounts = Accounts(physicians={"cardio": ("SMITH^JOHN",), "radio": ("WHO^REFERS",)})
    tail = "20240131_DOE JANE_ACC9/Dicom/005_AXIAL 5mm/005-002-000042.dcm"
    assert path("accounts", accounts=accounts) == f"cardio/{tail}"
    # The requesting physician has no account: the referring one's.
    no_requesting = Accounts(physicians={"radio": ("who^refers",)})
    assert path("accounts", accounts=no_requesting) == f"radio/{tail}"
    # Neither has one: the Guest account, in a folder named after the physician.
    assert path("accounts", accounts=Accounts()) == f"Guest/SMITH JOHN/{tail}"
    nobody = HeaderFields(study_date="20240131", patient_name="DOE^JANE", accession_number="ACC9",
                          series_number=5, series_description="AXIAL 5mm", instance_number=42, echo_number=2)
    assert path("accounts", nobody, accounts=accounts) == f"Unknown/{tail}"
    # An account named like the physician matches without a list.
    assert path("accounts", accounts=Accounts(physicians={"SMITH^JOHN": ()})).startswith("SMITH JOHN/")
    # Accounts exist, but neither physician has one: Guest.
    assert path("accounts", accounts=Accounts(physicians={"cardio": ("NOBODY^ELSE",)})) == f"Guest/SMITH JOHN/{tail}"
    # No Series Number, Echo Number or Instance Number: zeros, and the SOP Instance UID keeps names apart.
    bare = HeaderFields(study_date="20240131", patient_name="DOE^JANE", accession_number="ACC9",
                        series_description="AXIAL", sop_instance_uid="1.2.9")
    assert path("accounts", bare) == "Unknown/20240131_DOE JANE_ACC9/Dicom/000_AXIAL/000-000-1.2.9.dcm"


def test_study_folder_of_each_layout() -> None:
    """Where a study's scan sheet goes: the study's own folder, or None when the layout has none."""
    def folder(naming: str, **options) -> str | None:  # type: ignore[no-untyped-def]
        return study_folder(LayoutOptions(naming=naming, **options), path(naming, **options))

    assert folder("hierarchical") == "PID1/20240131_1.2.3"
    assert folder("date-based") == "2024/01/31/1.2.3"
    accounts = Accounts(physicians={"cardio": ("SMITH^JOHN",)})
    assert folder("accounts", accounts=accounts) == "cardio/20240131_DOE JANE_ACC9"
    assert folder("patient-folders") == "PID1/20240131_1.2.3"
    study_only = PatientFolders(study_level=True, series_level=False)
    assert folder("patient-folders", patient_folders=study_only) == "PID1/20240131_1.2.3"
    assert folder("patient-folders", patient_folders=PatientFolders(study_level=False)) is None
    assert folder("flat") is None and folder("template", template="{PatientID}/{SOPInstanceUID}") is None
    # A path too short to hold a study folder (made by another layout): none.
    assert study_folder(LayoutOptions(naming="hierarchical"), "a/b.dcm") is None


HOSTILE = ["../../etc", "/etc/passwd", "..", ".", "", " ", "a/../../b", "C:\\Windows\\system32", "x" * 10_000,
           "nul\x00byte", "ctrl\x01\x1f\x7f", "CON", "lpt1.txt", "...", "\u00e9\u00e8" * 200, "a\\..\\..\\b"]


@pytest.mark.parametrize("naming", sorted(LAYOUTS))
@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_tag_values_never_leave_the_root(naming: str, value: str) -> None:
    header = HeaderFields(
        patient_id=value, patient_name=value, study_instance_uid=value, study_date=value, study_id=value,
        accession_number=value, series_instance_uid=value, modality=value, series_description=value,
        sop_instance_uid=value, referring_physician_name=value, requesting_physician=value,
    )
    template = "{PatientName}/{StudyID}/{Modality}/{SOPInstanceUID}.dcm"
    result = path(naming, header, template=template, patient_folders=PatientFolders(top="patient_name"))
    assert not result.startswith("/")
    parts = result.split("/")
    assert all(p not in ("", ".", "..") for p in parts), result
    assert all(len(p.encode()) <= 124 for p in parts), result  # 120 + ".dcm"
    assert not any(c in result for c in "\x00\x01\x1f\x7f\\:")
    assert posixpath.normpath(result) == result
    assert not any(p.split(".")[0].upper() in ("CON", "NUL", "LPT1") for p in parts)


@pytest.mark.parametrize(("value", "expected"), [
    ("..CON", "_CON"), (". .nul.txt", "_nul.txt"), ("CON..", "_CON"), ("..", "UNKNOWN"), ("a..b", "a..b"),
    (".hidden", "hidden"), ("  Lpt9 ", "_Lpt9"), ("COM", "COM"), ("CONSOLE", "CONSOLE"),
])
def test_leading_and_trailing_dots_go_before_the_reserved_name_check(value: str, expected: str) -> None:
    assert safe_component(value) == expected


@pytest.mark.parametrize("naming", ["hierarchical", "patient-folders", "template"])
@pytest.mark.parametrize("patient_id", ["thumbnails", "Thumbnails", "scansheets", "index.duckdb", "index.duckdb.wal"])
def test_a_patient_named_like_a_reserved_top_folder_gets_a_prefix(naming: str, patient_id: str) -> None:
    header = HeaderFields(patient_id=patient_id, study_instance_uid="1.2", study_date="20240131",
                          series_number=1, modality="CT", sop_instance_uid="9")
    result = path(naming, header, template="{PatientID}/{SOPInstanceUID}.dcm")
    assert result.split("/")[0] == f"_{patient_id}", result
    assert path(naming, HeaderFields(patient_id="thumbnails2", sop_instance_uid="9"),
                template="{PatientID}/{SOPInstanceUID}.dcm").startswith("thumbnails2/")


def test_safe_component_keeps_readable_unicode() -> None:
    assert safe_component("Yamada^Tarou=山田^太郎=やまだ^たろう") == "Yamada Tarou=山田 太郎=やまだ たろう"
    assert safe_component("Ölçü/Ğ") == "Ölçü_Ğ"
    assert safe_component("", "NONE") == "NONE"


CHARSET_DIR = os.path.join(os.path.dirname(pydicom.data.__file__), "charset_files")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CHARSET_DIR) if f.endswith(".dcm")))
def test_charset_files_give_readable_utf8_folder_names(name: str) -> None:
    path_ = os.path.join(CHARSET_DIR, name)
    with open(path_, "rb") as f:
        raw = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some charset files are deliberately odd
        ds = pydicom.dcmread(path_)
        expected = str(ds.get("PatientName", ""))
    header = parse_header(raw[dataset_offset(raw):], str(ds.file_meta.TransferSyntaxUID))
    folder = relative_path(LayoutOptions("patient-folders", patient_folders=PatientFolders(top="patient_name")),
                           header, TODAY).split("/")[0]
    assert folder == safe_component(expected)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in folder), "a valid UTF-8 name (no lone surrogates)"
    if any(ord(c) > 127 for c in expected):
        assert any(ord(c) > 127 for c in folder), "decoded, not escaped"


@pytest.mark.parametrize("value", [
    "1.2.826.0.1.3680043.8.498.1", "PAT-001_a", "CON", "con.txt", "LPT1", "NUL.", "COM1.dcm", "1.2.3.", ".1.2",
    "-x", "_", "a" * 120, "a" * 121, "A.b-C_d", "a b", "a/b", "ab\\", "é", "x" * 119 + ".", "AUX.x.y",
])
def test_a_plain_value_takes_the_short_way_to_the_same_component(value: str) -> None:
    """safe_component returns a plain value as it is (PERF: four calls a C-STORE): exactly what the
    full sanitizing makes of it, for the values at the edges of "plain"."""
    from fastscp.storage.layout import _sanitized

    assert safe_component(value) == _sanitized(value, "UNKNOWN")


def test_a_series_folder_is_kept_for_the_next_instance_but_not_for_huge_values() -> None:
    """The hierarchical layout keeps each series' folder for its next instance (a bounded cache); values a
    peer made megabytes long give the same folder as ever, but are not kept there."""
    from fastscp.storage import layout

    layout._cached_folder.cache_clear()
    assert path("hierarchical") == "PID1/20240131_1.2.3/5_CT/1.2.3.4.5.dcm"
    assert layout._cached_folder.cache_info().currsize == 1
    huge = msgspec.structs.replace(CT, patient_id="P" * 1_000_000)
    assert path("hierarchical", huge) == f"{'P' * layout.MAX_COMPONENT_BYTES}/20240131_1.2.3/5_CT/1.2.3.4.5.dcm"
    assert layout._cached_folder.cache_info().currsize == 1
