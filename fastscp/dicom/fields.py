"""What a header scan yields: :class:`HeaderFields`, the table of kept elements, the attribute map's kinds, errors.

Both scanner twins (:mod:`fastscp.dicom._header_py`, ``_header_cext.pyx``)
produce these; the index, the layout, queries and forwarding rules read them.
The numbers are part of the contract with the compiled twin, which checks its
C copies against them at import time.
"""

from __future__ import annotations

from typing import Final

import msgspec


class HeaderError(ValueError):
    """The data is not a well-formed DICOM dataset in the given transfer syntax.

    The message says what is wrong and at which byte offset of ``data``.
    """


class IncompleteHeader(HeaderError):
    """The data ends before Pixel Data or the end of the dataset.

    Raised only with ``complete=False``: the caller should supply more bytes of
    the same dataset and parse again.
    """


class HeaderFields(msgspec.Struct, frozen=True, kw_only=True):
    """Top-level attributes of one dataset that the index and layout need.

    Strings are ``""`` and numbers ``None`` when the element is absent or empty.
    Multi-valued strings keep their backslash separators; multi-valued numbers
    give their first value, and the ``*_values`` field of a number that has
    one (:data:`ALL_VALUES`) holds all of them as text (``"40\\400"``; ``""``
    when there is one value).
    """

    specific_character_set: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_instance_uid: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    accession_number: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    requesting_physician: str = ""
    series_instance_uid: str = ""
    series_number: int | None = None
    modality: str = ""
    series_description: str = ""
    body_part_examined: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    instance_number: int | None = None
    echo_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    pixel_representation: int | None = None
    samples_per_pixel: int | None = None
    planar_configuration: int | None = None
    number_of_frames: int | None = None
    window_center: float | None = None
    window_width: float | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    photometric_interpretation: str = ""
    pixel_data_offset: int | None = None
    image_type: str = ""
    window_center_values: str = ""
    window_width_values: str = ""
    #: The attribute map: every other top-level attribute with a text form, as
    #: a JSON object text keyed by tag (:func:`build_map`), e.g.
    #: ``{"00180050":"5.0","00080080":"General Hospital"}``.
    attributes: str = "{}"


# How a kept element's value bytes become a field value.  The numbers are part
# of the contract with fastscp/dicom/_header_cext.pyx, which reads FIELDS at import time.
KIND_STR: Final = 0  # AE/CS/DA/TM/UI: pydicom decodes these as latin-1, no charset
KIND_TEXT: Final = 1  # LO/SH: decoded per Specific Character Set
KIND_PN: Final = 2  # PN: decoded per Specific Character Set, as str(PersonName)
KIND_US: Final = 3  # US: first value, in the transfer syntax's byte order
KIND_IS: Final = 4  # IS: first value as int, None if not an integer
KIND_DS: Final = 5  # DS: first value as float, None if not a finite number

# (tag, HeaderFields attribute, kind), sorted by tag.  Slot 0 must be Specific
# Character Set: the text kinds are decoded with it.
FIELDS: Final[tuple[tuple[int, str, int], ...]] = (
    (0x00080005, "specific_character_set", KIND_STR),  # CS
    (0x00080008, "image_type", KIND_STR),  # CS, 2-n
    (0x00080016, "sop_class_uid", KIND_STR),  # UI
    (0x00080018, "sop_instance_uid", KIND_STR),  # UI
    (0x00080020, "study_date", KIND_STR),  # DA
    (0x00080030, "study_time", KIND_STR),  # TM
    (0x00080050, "accession_number", KIND_TEXT),  # SH
    (0x00080060, "modality", KIND_STR),  # CS
    (0x00080090, "referring_physician_name", KIND_PN),
    (0x00081030, "study_description", KIND_TEXT),  # LO
    (0x0008103E, "series_description", KIND_TEXT),  # LO
    (0x00100010, "patient_name", KIND_PN),
    (0x00100020, "patient_id", KIND_TEXT),  # LO
    (0x00100030, "patient_birth_date", KIND_STR),  # DA
    (0x00100040, "patient_sex", KIND_STR),  # CS
    (0x00180015, "body_part_examined", KIND_STR),  # CS
    (0x00180086, "echo_number", KIND_IS),  # EchoNumbers
    (0x0020000D, "study_instance_uid", KIND_STR),  # UI
    (0x0020000E, "series_instance_uid", KIND_STR),  # UI
    (0x00200010, "study_id", KIND_TEXT),  # SH
    (0x00200011, "series_number", KIND_IS),
    (0x00200013, "instance_number", KIND_IS),
    (0x00280002, "samples_per_pixel", KIND_US),
    (0x00280004, "photometric_interpretation", KIND_STR),  # CS
    (0x00280006, "planar_configuration", KIND_US),
    (0x00280008, "number_of_frames", KIND_IS),
    (0x00280010, "rows", KIND_US),
    (0x00280011, "columns", KIND_US),
    (0x00280100, "bits_allocated", KIND_US),
    (0x00280101, "bits_stored", KIND_US),
    (0x00280103, "pixel_representation", KIND_US),
    (0x00281050, "window_center", KIND_DS),
    (0x00281051, "window_width", KIND_DS),
    (0x00281052, "rescale_intercept", KIND_DS),
    (0x00281053, "rescale_slope", KIND_DS),
    (0x00321032, "requesting_physician", KIND_PN),
)

# The attribute map (HeaderFields.attributes): every other top-level element
# of a VR with a text form. How its value becomes text (fastscp/dicom/_header_cext.pyx reads
# these numbers at import time):
MAP_STRIP: Final = 0  # AE AS CS DA DS DT IS TM UI: latin-1, each value stripped of spaces
MAP_TEXT: Final = 1  # LO SH UC: per Specific Character Set, each value stripped of trailing spaces
MAP_PN: Final = 2  # PN: as MAP_TEXT, decoded as a person name
MAP_LONG_TEXT: Final = 3  # LT ST UT: per Specific Character Set, one value (a backslash is text)
MAP_UR: Final = 4  # UR: latin-1, one value
# Binary numbers: every value, in decimal.
MAP_US: Final = 5
MAP_SS: Final = 6
MAP_UL: Final = 7
MAP_SL: Final = 8
MAP_UV: Final = 9
MAP_SV: Final = 10
MAP_FL: Final = 11
MAP_FD: Final = 12
#: The VRs the map keeps; the others (SQ, AT, the O* and UN bytes) are left out.
MAP_KINDS: Final[dict[bytes, int]] = {
    **dict.fromkeys((b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"TM", b"UI"), MAP_STRIP),
    **dict.fromkeys((b"LO", b"SH", b"UC"), MAP_TEXT), b"PN": MAP_PN,
    **dict.fromkeys((b"LT", b"ST", b"UT"), MAP_LONG_TEXT), b"UR": MAP_UR,
    b"US": MAP_US, b"SS": MAP_SS, b"UL": MAP_UL, b"SL": MAP_SL, b"UV": MAP_UV, b"SV": MAP_SV,
    b"FL": MAP_FL, b"FD": MAP_FD,
}

#: Bounds against hostile headers: a longer value is left out; the map holds
#: at most MAP_MAX_ELEMENTS elements and MAP_MAX_CHARS characters (elements
#: past that are left out).
MAP_MAX_VALUE: Final = 4096
MAP_MAX_ELEMENTS: Final = 512
MAP_MAX_CHARS: Final = 65536


def map_eligible(group: int, element: int) -> bool:
    """A top-level element the map may hold: not private, not File Meta, not a group length, no item tag."""
    return group & 1 == 0 and 0x0002 < group < 0xFFFE and element != 0


#: Multi-valued numbers whose every value is kept (as text) beside the first.
ALL_VALUES: Final[dict[str, str]] = {"window_center": "window_center_values", "window_width": "window_width_values"}
