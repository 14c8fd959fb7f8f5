"""Storage SOP classes and transfer syntaxes that fastscp accepts.

``accepted_sop_classes`` (config) and ``--accept`` (CLI) take a list of
entries, each one of:

- ``all``: every storage SOP class pynetdicom knows (PS3.4 Annex B);
- a modality name (``CT``, ``MR``, ``US`` ...; see :data:`MODALITY_SOP_CLASSES`);
- a SOP class keyword (``CTImageStorage``) or name (``CT Image Storage``), or
  that name with the common short modality words (``US Image Storage``,
  ``NM Image Storage``, ``DX Image Storage``: see :data:`SHORT_NAMES`);
- a SOP class UID (``1.2.840.10008.5.1.4.1.1.2``).
"""

from __future__ import annotations

import re

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom.sop_class import _STORAGE_CLASSES

#: Verification SOP Class (C-ECHO), always accepted.
VERIFICATION_SOP_CLASS: str = "1.2.840.10008.1.1"

#: Patient Root Query/Retrieve Information Model - FIND (PS3.4 C.6.1).
PATIENT_ROOT_FIND: str = "1.2.840.10008.5.1.4.1.2.1.1"
#: Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2).
STUDY_ROOT_FIND: str = "1.2.840.10008.5.1.4.1.2.2.1"
#: The Query/Retrieve FIND models fastscp answers (their levels:
#: :data:`fastscp.query.cfind.MODEL_LEVELS`).
FIND_SOP_CLASSES: frozenset[str] = frozenset({PATIENT_ROOT_FIND, STUDY_ROOT_FIND})

#: Every storage SOP class, keyword -> UID.
STORAGE_SOP_CLASSES: dict[str, str] = dict(_STORAGE_CLASSES)

#: Datasets are stored as received, so every transfer syntax pydicom knows
#: can be accepted: nothing is ever decoded or re-encoded.
SUPPORTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(str(ts) for ts in AllTransferSyntaxes)

# Modality (0008,0060) defined terms -> the keyword patterns of their storage
# SOP classes. A pattern is a regular expression matched against the keyword.
_MODALITY_PATTERNS: dict[str, str] = {
    "CT": r"^(Enhanced|Legacy)?.*CTImageStorage|^CTImageStorage|^Enhanced.*CT",
    "MR": r"MRImageStorage|MRSpectroscopyStorage|^EnhancedMRColor",
    "US": r"^(Enhanced)?UltrasoundImageStorage|^UltrasoundMultiFrameImageStorage|Ultrasound",
    "CR": r"^ComputedRadiographyImageStorage$",
    "DX": r"^DigitalXRayImageStorage",
    "MG": r"^DigitalMammographyXRayImageStorage|BreastTomosynthesis|BreastProjection",
    "IO": r"^DigitalIntraOralXRayImageStorage",
    "NM": r"^NuclearMedicineImageStorage",
    "PT": r"^PositronEmissionTomographyImageStorage$|PETImageStorage",
    "XA": r"XAImageStorage|^XRayAngiographic|XRay3DAngiographic",
    "RF": r"^XRayRadiofluoroscopicImageStorage|XRFImageStorage",
    "SC": r"SecondaryCapture",
    "OT": r"SecondaryCapture",
    "SR": r"SRStorage$|^MacularGridThicknessAndVolumeReport|^KeyObjectSelectionDocument",
    "KO": r"^KeyObjectSelectionDocumentStorage$",
    "PR": r"PresentationStateStorage$",
    "RT": r"^RT",
    "SEG": r"^SegmentationStorage$|^SurfaceSegmentationStorage$",
    "REG": r"RegistrationStorage$",
    "ECG": r"ECGWaveformStorage$",
    "HD": r"^HemodynamicWaveformStorage$",
    "DOC": r"^Encapsulated(PDF|CDA)Storage$",
    "VL": r"^VL",
    "XC": r"^VLPhotographicImageStorage$|^VideoPhotographicImageStorage$",
    "ES": r"^VLEndoscopicImageStorage$|^VideoEndoscopicImageStorage$",
    "OP": r"^Ophthalmic(Photography|Tomography)",
    "SM": r"^VLWholeSlideMicroscopyImageStorage$",
}


def _sop_classes_matching(pattern: str) -> tuple[str, ...]:
    regex = re.compile(pattern)
    return tuple(uid for kw, uid in STORAGE_SOP_CLASSES.items() if regex.search(kw))


#: Modality name -> storage SOP class UIDs.
MODALITY_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    modality: _sop_classes_matching(pattern) for modality, pattern in _MODALITY_PATTERNS.items()
}


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


#: Words of the standard's SOP class names -> the short forms other
#: products' configs use for them ("US Image Storage").
SHORT_NAMES: dict[str, tuple[str, ...]] = {
    "Ultrasound": ("US",),
    "Computed Radiography": ("CR",),
    "Digital X-Ray": ("DX",),
    "Digital Mammography X-Ray": ("MG", "Mammography"),
    "Digital Intra-Oral X-Ray": ("IO",),
    "Nuclear Medicine": ("NM",),
    "Positron Emission Tomography": ("PET", "PT"),
    "X-Ray Angiographic": ("XA",),
    "X-Ray Radiofluoroscopic": ("RF", "XRF"),
    "X-Ray 3D Angiographic": ("XA 3D",),
    "Secondary Capture": ("SC",),
}
#: A name without this suffix means both classes (For Presentation and For Processing).
_FOR_SUFFIXES = (" - For Presentation", " - For Processing")


def _aliases(name: str) -> set[str]:
    names = {name}
    for long, shorts in SHORT_NAMES.items():
        if long in name:
            names.update(name.replace(long, short) for short in shorts)
    for alias in list(names):
        for suffix in _FOR_SUFFIXES:
            if alias.endswith(suffix):
                names.add(alias.removesuffix(suffix))
    return names


#: Normalised keyword, name or alias -> its UIDs (an alias may name two).
_BY_NAME: dict[str, tuple[str, ...]] = {}
for _keyword, _uid in STORAGE_SOP_CLASSES.items():
    _BY_NAME[_normalise_name(_keyword)] = (_uid,)
    _BY_NAME[_normalise_name(UID(_uid).name)] = (_uid,)
_EXACT = frozenset(_BY_NAME)
for _uid in STORAGE_SOP_CLASSES.values():
    for _alias in map(_normalise_name, _aliases(UID(_uid).name)):
        if _alias not in _EXACT:  # a standard name always means its own class
            _BY_NAME[_alias] = tuple(dict.fromkeys((*_BY_NAME.get(_alias, ()), _uid)))


def resolve_sop_classes(entries: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Turn ``accepted_sop_classes`` entries into storage SOP class UIDs.

    Parameters
    ----------
    entries : list of str
        Modality names, SOP class keywords, names or short names, UIDs, or ``all``.

    Returns
    -------
    tuple of str
        The UIDs, without duplicates, in a stable order.

    Raises
    ------
    ValueError
        If an entry is none of the above; the message names the entry.
    """
    uids: dict[str, None] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        if entry.lower() == "all":
            uids.update(dict.fromkeys(STORAGE_SOP_CLASSES.values()))
        elif entry.upper() in MODALITY_SOP_CLASSES:
            uids.update(dict.fromkeys(MODALITY_SOP_CLASSES[entry.upper()]))
        elif re.fullmatch(r"[0-9]+(\.[0-9]+)+", entry):
            # Any syntactically valid UID is allowed: private SOP classes exist.
            uids[entry] = None
        elif _normalise_name(entry) in _BY_NAME:
            uids.update(dict.fromkeys(_BY_NAME[_normalise_name(entry)]))
        else:
            known = ", ".join(sorted(MODALITY_SOP_CLASSES))
            raise ValueError(
                f"unknown SOP class or modality {entry!r}: use 'all', a modality "
                f"({known}), a storage SOP class name such as 'CT Image Storage', or a UID"
            )
    if not uids:
        raise ValueError("no SOP class accepted: give at least one entry, or 'all'")
    return tuple(uids)
