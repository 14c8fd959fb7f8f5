"""What a query can match and return, by DICOM keyword: the index's columns and the attribute map."""

from __future__ import annotations

from typing import NamedTuple

from pydicom.datadict import dictionary_VR, tag_for_keyword

from fastscp.dicom.fields import FIELDS, MAP_KINDS, map_eligible


class Attribute(NamedTuple):
    """A key a query may match or return."""

    level: str
    #: SQL over the aliases st (studies, which carry their patient
    #: attributes), se (series), i (instances); for derived keys, a column
    #: of the level's aggregate.
    sql: str
    #: Value representation: decides the matching rules.
    vr: str
    #: Computed from the instances (counts): returned, never matched.
    derived: bool = False
    #: A DICOM keyword (C-FIND may use it), not one of fastscp's own columns.
    dicom: bool = True
    #: SQL of the backslash-separated text of every value, where the column
    #: (``sql``) holds one value of a multi-valued number; ``sql`` itself when
    #: the column holds every value (strings). A single value then matches
    #: if any value matches.
    values: str = ""
    #: The tag of an attribute read from the instances' attribute map
    #: (:func:`map_attribute`); 0 for a column.
    tag: int = 0


def _a(level: str, sql: str, vr: str, *, derived: bool = False, dicom: bool = True, values: str = "") -> Attribute:
    return Attribute(level, sql, vr, derived, dicom, values)


ATTRIBUTES: dict[str, Attribute] = {
    # Patient
    "PatientID": _a("PATIENT", "st.patient_id", "LO"),
    "PatientName": _a("PATIENT", "st.patient_name", "PN"),
    "PatientBirthDate": _a("PATIENT", "st.patient_birth_date", "DA"),
    "PatientSex": _a("PATIENT", "st.patient_sex", "CS"),
    "NumberOfPatientRelatedStudies": _a("PATIENT", "number_of_patient_related_studies", "IS", derived=True),
    "NumberOfPatientRelatedSeries": _a("PATIENT", "number_of_patient_related_series", "IS", derived=True),
    "NumberOfPatientRelatedInstances": _a("PATIENT", "number_of_patient_related_instances", "IS", derived=True),
    # Study
    "StudyInstanceUID": _a("STUDY", "st.study_instance_uid", "UI"),
    "StudyDate": _a("STUDY", "st.study_date", "DA"),
    "StudyTime": _a("STUDY", "st.study_time", "TM"),
    "StudyID": _a("STUDY", "st.study_id", "SH"),
    "AccessionNumber": _a("STUDY", "st.accession_number", "SH"),
    "StudyDescription": _a("STUDY", "st.study_description", "LO"),
    "ReferringPhysicianName": _a("STUDY", "st.referring_physician_name", "PN"),
    "RequestingPhysician": _a("STUDY", "st.requesting_physician", "PN"),
    # Matched through the series (see _study_modality_match); returned from the aggregate.
    "ModalitiesInStudy": _a("STUDY", "modalities_in_study", "CS", derived=True),
    "SOPClassesInStudy": _a("STUDY", "sop_classes_in_study", "UI", derived=True),
    "NumberOfStudyRelatedSeries": _a("STUDY", "number_of_study_related_series", "IS", derived=True),
    "NumberOfStudyRelatedInstances": _a("STUDY", "number_of_study_related_instances", "IS", derived=True),
    # Series
    "SeriesInstanceUID": _a("SERIES", "se.series_instance_uid", "UI"),
    "SeriesNumber": _a("SERIES", "se.series_number", "IS"),
    "Modality": _a("SERIES", "se.modality", "CS"),
    "SeriesDescription": _a("SERIES", "se.series_description", "LO"),
    "BodyPartExamined": _a("SERIES", "se.body_part_examined", "CS"),
    "NumberOfSeriesRelatedInstances": _a("SERIES", "number_of_series_related_instances", "IS", derived=True),
    # Instance
    "SOPInstanceUID": _a("IMAGE", "i.sop_instance_uid", "UI"),
    "SOPClassUID": _a("IMAGE", "i.sop_class_uid", "UI"),
    "InstanceNumber": _a("IMAGE", "i.instance_number", "IS"),
    "EchoNumbers": _a("IMAGE", "i.echo_number", "IS"),
    "Rows": _a("IMAGE", 'i."rows"', "US"),
    "Columns": _a("IMAGE", 'i."columns"', "US"),
    "BitsAllocated": _a("IMAGE", "i.bits_allocated", "US"),
    "BitsStored": _a("IMAGE", "i.bits_stored", "US"),
    "PixelRepresentation": _a("IMAGE", "i.pixel_representation", "US"),
    "SamplesPerPixel": _a("IMAGE", "i.samples_per_pixel", "US"),
    "PlanarConfiguration": _a("IMAGE", "i.planar_configuration", "US"),
    "NumberOfFrames": _a("IMAGE", "i.number_of_frames", "IS"),
    "PhotometricInterpretation": _a("IMAGE", "i.photometric_interpretation", "CS"),
    "ImageType": _a("IMAGE", "i.image_type", "CS", values="i.image_type"),
    # The first value as a number, every value as text (HeaderFields.window_center_values).
    "WindowCenter": _a("IMAGE", "i.window_center", "DS", values="i.window_center_values"),
    "WindowWidth": _a("IMAGE", "i.window_width", "DS", values="i.window_width_values"),
    "RescaleIntercept": _a("IMAGE", "i.rescale_intercept", "DS"),
    "RescaleSlope": _a("IMAGE", "i.rescale_slope", "DS"),
    "AvailableTransferSyntaxUID": _a("IMAGE", "i.transfer_syntax_uid", "UI"),
    "TransferSyntaxUID": _a("IMAGE", "i.transfer_syntax_uid", "UI"),
    # fastscp's own columns (not DICOM keywords): the received file.
    "Path": _a("IMAGE", "i.path", "LO", dicom=False),
    "ContentHash": _a("IMAGE", "i.content_hash", "LO", dicom=False),
    "CallingAETitle": _a("IMAGE", "i.calling_ae_title", "AE", dicom=False),
    "CalledAETitle": _a("IMAGE", "i.called_ae_title", "AE", dicom=False),
    "PeerAddress": _a("IMAGE", "i.peer_address", "LO", dicom=False),
    "ReceivedAt": _a("IMAGE", "strftime(i.received_at, '%Y-%m-%dT%H:%M:%S.%fZ')", "DT", dicom=False),
    "ThumbnailPath": _a("IMAGE", "t.thumbnail_path", "LO", dicom=False),
    # A shared index only (database.catalog): the node whose storage root Path is below.
    "Node": _a("IMAGE", "i.node", "LO", dicom=False),
    # Bytes of the files, at every level: one file at IMAGE level, a sum above it.
    "Bytes": _a("PATIENT", "bytes", "UV", derived=True, dicom=False),
}

#: The VRs the attribute map keeps (fastscp.dicom._header_py.MAP_KINDS), as text.
_MAP_VRS = frozenset(vr.decode() for vr in MAP_KINDS)
#: Tags with a column of their own: never in the map.
_COLUMN_TAGS = frozenset(tag for tag, _name, _kind in FIELDS)


def _map_path(tag: int) -> str:
    return f"'$.\"{tag:08X}\"'"


def map_joins(tags: set[int]) -> str:
    """SQL joins that bring the base map's value of each tag to an instance row (alias i), as am<tag>.v.

    PERF: the value is read from each base map once, not from the base map
    of every instance (~2.5 KB of JSON each): a STUDY query matching a map
    attribute over 100k instances took 0.4 s with one join of the maps.
    """
    return "".join(f" LEFT JOIN (SELECT id, json_extract_string(attributes, {_map_path(tag)}) AS v "
                   f"FROM attribute_maps) am{tag:08X} ON am{tag:08X}.id = i.attributes_base" for tag in sorted(tags))


def map_sql(tag: int) -> str:
    """SQL: the text of attribute ``tag`` in an instance's attribute map (NULL if it has none).

    The instance's own entries (i.attributes, where null means "absent")
    over its series' base map (:func:`map_joins`).
    """
    path = _map_path(tag)
    return (f"CASE WHEN json_exists(i.attributes, {path}) THEN json_extract_string(i.attributes, {path}) "
            f"ELSE am{tag:08X}.v END")


def map_attribute(keyword: str) -> Attribute | None:
    """The key of a DICOM keyword that has no column: read from the instances' attribute map.

    None for keywords the map never holds (no such keyword, a sequence, a VR
    without a text form, or an attribute with a column of its own). Its
    level is IMAGE: a query at a level above matches it on any instance of
    the row and returns the newest instance's value (:func:`build_query`).
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag in _COLUMN_TAGS or not map_eligible(tag >> 16, tag & 0xFFFF):
        return None
    vr = dictionary_VR(tag)
    if vr not in _MAP_VRS:
        return None
    sql = map_sql(tag)
    return Attribute("IMAGE", sql, vr, values=sql, tag=tag)


def attribute_for(keyword: str) -> Attribute | None:
    """The key ``keyword`` names: a column (:data:`ATTRIBUTES`) or the attribute map; None if neither."""
    return ATTRIBUTES.get(keyword) or map_attribute(keyword)


#: Columns of ``fastscp query`` per level when no keys are given.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies",
                "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances", "Bytes"),
    "STUDY": ("PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "Bytes",
              "StudyInstanceUID"),
    "SERIES": ("PatientID", "StudyDate", "SeriesNumber", "Modality", "SeriesDescription",
               "NumberOfSeriesRelatedInstances", "Bytes", "StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("PatientID", "StudyDate", "Modality", "SeriesNumber", "InstanceNumber", "SOPInstanceUID",
              "TransferSyntaxUID", "CallingAETitle", "ReceivedAt", "Bytes", "Path"),
}

#: The unique key of each level (PS3.4 C.6.1.1).
UNIQUE_KEYS: dict[str, str] = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                               "IMAGE": "SOPInstanceUID"}

