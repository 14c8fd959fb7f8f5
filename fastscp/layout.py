"""Storage layouts: header fields -> a relative path. Pure functions, no disk.

``storage.naming`` picks one:

- ``hierarchical``: ``{PatientID}/{StudyDate}_{StudyInstanceUID}/{SeriesNumber}_{Modality}/{SOPInstanceUID}.dcm``
- ``flat``: ``{SOPInstanceUID}.dcm``

Every component is sanitised, so whatever a sender puts in a tag the path
stays below the storage root.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from fastscp.header import HeaderFields

#: Longest path component we create (bytes of UTF-8); ext4 allows 255.
MAX_COMPONENT_BYTES = 120
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")
# Windows reserves these names whatever the extension; the tree may be
# shared over SMB, so avoid them everywhere.
_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?$", re.IGNORECASE)


def safe_component(value: str, fallback: str = "UNKNOWN") -> str:
    """One path component from a tag value: no separators, controls, ``..``
    or reserved names, bounded length; ``fallback`` when nothing is left."""
    text = unicodedata.normalize("NFC", value)
    text = text.replace("^", " ").strip()
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"\s+", " ", text).strip(" .")
    if _RESERVED.match(text):
        text = "_" + text
    encoded = text.encode("utf-8")[:MAX_COMPONENT_BYTES]
    text = encoded.decode("utf-8", "ignore").strip(" .")
    return text or fallback


def _hierarchical(h: HeaderFields) -> str:
    series_number = "" if h.series_number is None else str(h.series_number)
    return "/".join(
        (
            safe_component(h.patient_id),
            safe_component(f"{h.study_date}_{h.study_instance_uid}".strip("_")),
            safe_component(f"{series_number}_{h.modality}".strip("_")),
            safe_component(h.sop_instance_uid) + ".dcm",
        )
    )


def _flat(h: HeaderFields) -> str:
    return safe_component(h.sop_instance_uid) + ".dcm"


LAYOUTS: dict[str, Callable[[HeaderFields], str]] = {
    "hierarchical": _hierarchical,
    "flat": _flat,
}


def relative_path(naming: str, header: HeaderFields) -> str:
    """The path, relative to the storage root, for an instance with ``header``."""
    return LAYOUTS[naming](header)
