"""What a hook is told about an event, and which hooks an event matches.

No I/O: records in, an :class:`Event` out. Every value may come from a peer
(tag values, AE titles), so a hook gets them only as environment variables
and JSON, never in a command line or through a shell, and never altered
except where the carrier forbids a character (an environment variable can't
hold NUL: dropped there, kept in the JSON).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import msgspec

from fastscp.config import HookConfig
from fastscp.dicom.fields import HeaderFields
from fastscp.dicom.sopclasses import resolve_sop_classes
from fastscp.index.records import InstanceRecord
from fastscp.status import AssociationReport
from fastscp.storage.layout import LayoutOptions, study_folder

#: The header fields a hook gets as environment variables (FASTSCP_<NAME>).
ENV_HEADER_FIELDS: tuple[str, ...] = (
    "sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "patient_id",
    "patient_name", "patient_birth_date", "patient_sex", "modality", "accession_number", "study_date",
    "study_time", "study_description", "series_description", "series_number", "instance_number",
)
#: Instances an association-ended or study-complete document lists at most (the count is always exact).
MAX_LISTED = 10_000
#: Associations and studies followed at once for those events; the oldest is forgotten beyond.
MAX_TRACKED = 10_000


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # instance-stored | association-ended | study-complete
    #: Environment variables (FASTSCP_*), values as received.
    env: dict[str, str]
    #: The JSON document's event part.
    document: dict[str, Any]
    #: For the log line: what the event is about.
    subject: str
    #: What a hook's match looks at.
    sop_classes: frozenset[str]
    modalities: frozenset[str]
    calling_aets: frozenset[str]
    #: instance-stored: the file (absolute) and its path below its storage root (built-in actions).
    path: str = ""
    relative_path: str = ""
    #: study-complete: the storage root (the built-in nifti action writes beside the study).
    storage_dir: str = ""


def _header_document(header: HeaderFields) -> dict[str, Any]:
    fields = msgspec.structs.asdict(header)
    del fields["attributes"], fields["pixel_data_offset"]  # stripped in transit; an offset means nothing to a hook
    return fields


def _text(value: object) -> str:
    return "" if value is None else str(value)


def instance_event(record: InstanceRecord, root: str, sr_root: str = "") -> Event:
    """The instance-stored event of a stored instance (``record.path`` relative to ``root``, or absolute)."""
    path = record.path if os.path.isabs(record.path) else os.path.join(root, record.path)
    base = sr_root if os.path.isabs(record.path) and sr_root else root
    header = record.header
    env = {
        "FASTSCP_PATH": path,
        "FASTSCP_RELATIVE_PATH": os.path.relpath(path, base),
        "FASTSCP_STORAGE_DIR": base,
        "FASTSCP_SIZE": str(record.size),
        "FASTSCP_TRANSFER_SYNTAX_UID": record.transfer_syntax_uid,
        "FASTSCP_CALLING_AE": record.calling_ae_title,
        "FASTSCP_CALLED_AE": record.called_ae_title,
        "FASTSCP_PEER_ADDRESS": record.peer_address,
        "FASTSCP_RECEIVED_AT": f"{record.received_at:.6f}",
    }
    env.update((f"FASTSCP_{name.upper()}", _text(getattr(header, name))) for name in ENV_HEADER_FIELDS)
    document = {
        "path": path,
        "relative_path": env["FASTSCP_RELATIVE_PATH"],
        "storage_dir": base,
        "size": record.size,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "calling_ae_title": record.calling_ae_title,
        "called_ae_title": record.called_ae_title,
        "peer_address": record.peer_address,
        "received_at": record.received_at,
        "header": _header_document(header),
    }
    return Event(
        kind="instance-stored", env=env, document=document, subject=f"{path} from {record.calling_ae_title}",
        sop_classes=frozenset({header.sop_class_uid}), modalities=frozenset({header.modality}),
        calling_aets=frozenset({record.calling_ae_title}), path=path, relative_path=env["FASTSCP_RELATIVE_PATH"],
    )


class _Instances:
    """What an association or a study brought so far (bounded)."""

    def __init__(self) -> None:
        self.count = 0
        self.paths: list[str] = []
        self.sop_classes: set[str] = set()
        self.modalities: set[str] = set()
        self.calling_aets: set[str] = set()
        self.first: InstanceRecord | None = None

    def add(self, record: InstanceRecord, path: str) -> None:
        self.count += 1
        if len(self.paths) < MAX_LISTED:
            self.paths.append(path)
        if self.first is None:
            self.first = record
        # Sets of a handful of values; bounded like the paths against a peer inventing them.
        if len(self.sop_classes) < MAX_LISTED:
            self.sop_classes.add(record.header.sop_class_uid)
            self.modalities.add(record.header.modality)
            self.calling_aets.add(record.calling_ae_title)


class Tracker:
    """The instances of open associations and of settling studies, for the events that end them."""

    def __init__(self, root: str, layout: LayoutOptions) -> None:
        self.root = root
        self.layout = layout
        self.associations: collections.OrderedDict[tuple[str, str], _Instances] = collections.OrderedDict()
        self.studies: collections.OrderedDict[str, _Instances] = collections.OrderedDict()

    def stored(self, record: InstanceRecord, associations: bool, studies: bool) -> None:
        path = record.path if os.path.isabs(record.path) else os.path.join(self.root, record.path)
        if associations:
            # The peer's address and port name one TCP connection: one association at a time.
            _entry(self.associations, (record.calling_ae_title, record.peer_address)).add(record, path)
        if studies and record.header.study_instance_uid:
            _entry(self.studies, record.header.study_instance_uid).add(record, path)

    def association_ended(self, report: AssociationReport) -> Event | None:
        """The association-ended event of an accepted association (None for rejected ones and probes)."""
        state = report.state
        seen = self.associations.pop((state.calling_ae_title, state.peer_address), None) or _Instances()
        if report.probe or state.outcome.startswith("rejected"):
            return None
        env = {
            "FASTSCP_CALLING_AE": state.calling_ae_title,
            "FASTSCP_CALLED_AE": state.called_ae_title,
            "FASTSCP_PEER_ADDRESS": state.peer_address,
            "FASTSCP_INSTANCES": str(state.instances),
            "FASTSCP_FAILURES": str(state.failures),
            "FASTSCP_BYTES": str(state.bytes),
            "FASTSCP_OUTCOME": state.outcome,
            "FASTSCP_STARTED": f"{state.started:.6f}",
            "FASTSCP_ENDED": f"{state.ended:.6f}",
        }
        document = {
            **msgspec.structs.asdict(state),
            "by_modality": report.by_modality,
            "stored": seen.paths,
            "stored_count": seen.count,
        }
        return Event(
            kind="association-ended", env=env, document=document,
            subject=f"association {state.calling_ae_title} ({state.peer_address}): {state.instances} instances",
            sop_classes=frozenset(seen.sop_classes), modalities=frozenset(seen.modalities),
            calling_aets=frozenset({state.calling_ae_title}),
        )

    def study_complete(self, study_uid: str) -> Event | None:
        """The study-complete event of a study quiet for scansheet.study_timeout (None if none of it was seen)."""
        seen = self.studies.pop(study_uid, None)
        if seen is None or seen.first is None:
            return None
        header = seen.first.header
        folder = study_folder(self.layout, seen.first.path) if not os.path.isabs(seen.first.path) else None
        env = {
            "FASTSCP_STUDY_INSTANCE_UID": study_uid,
            "FASTSCP_PATIENT_ID": header.patient_id,
            "FASTSCP_PATIENT_NAME": header.patient_name,
            "FASTSCP_STUDY_DATE": header.study_date,
            "FASTSCP_ACCESSION_NUMBER": header.accession_number,
            "FASTSCP_STUDY_DESCRIPTION": header.study_description,
            "FASTSCP_MODALITIES": "\\".join(sorted(seen.modalities)),
            "FASTSCP_CALLING_AES": "\\".join(sorted(seen.calling_aets)),
            "FASTSCP_INSTANCES": str(seen.count),
            "FASTSCP_STUDY_DIR": os.path.join(self.root, folder) if folder else "",
        }
        document = {
            "study_instance_uid": study_uid,
            "study_dir": env["FASTSCP_STUDY_DIR"],
            "modalities": sorted(seen.modalities),
            "calling_ae_titles": sorted(seen.calling_aets),
            "stored": seen.paths,
            "stored_count": seen.count,
            "header": _header_document(header),
        }
        return Event(
            kind="study-complete", env=env, document=document, subject=f"study {study_uid}: {seen.count} instances",
            sop_classes=frozenset(seen.sop_classes), modalities=frozenset(seen.modalities),
            calling_aets=frozenset(seen.calling_aets), storage_dir=self.root,
        )


def _entry(table: collections.OrderedDict[Any, _Instances], key: Any) -> _Instances:
    found = table.get(key)
    if found is None:
        if len(table) >= MAX_TRACKED:
            table.popitem(last=False)
        found = table[key] = _Instances()
    return found


class Matcher:
    """A hook's match, its SOP class entries resolved once."""

    def __init__(self, hook: HookConfig) -> None:
        match = hook.match
        self.sop_classes = frozenset(resolve_sop_classes(match.sop_classes)) if match.sop_classes else None
        self.modalities = frozenset(m.upper() for m in match.modalities) or None
        self.calling_aets = frozenset(match.calling_aets) or None

    def __call__(self, event: Event) -> bool:
        """True if the event concerns one of each listed value (an association or a study: any of its instances)."""
        return ((self.sop_classes is None or not self.sop_classes.isdisjoint(event.sop_classes))
                and (self.modalities is None or not self.modalities.isdisjoint(m.upper() for m in event.modalities))
                and (self.calling_aets is None or not self.calling_aets.isdisjoint(event.calling_aets)))


def environment(event: Event, hook: str, attempt: int) -> dict[bytes, bytes]:
    """The hook program's environment: the server's, without its own FASTSCP_* variables, plus the event's."""
    env = {key: value for key, value in os.environb.items() if not key.startswith(b"FASTSCP_")}
    for key, value in (*event.env.items(), ("FASTSCP_EVENT", event.kind), ("FASTSCP_HOOK", hook),
                       ("FASTSCP_ATTEMPT", str(attempt))):
        env[key.encode()] = _env_bytes(value)
    return env


def _env_bytes(value: str) -> bytes:
    # NUL ends a C string: the one byte an environment variable can't carry.
    value = value.replace("\0", "")
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no decoder made: keep the rest readable
        return value.encode("utf-8", "backslashreplace")


def document(event: Event, hook: str, attempt: int) -> bytes:
    """The JSON document on the hook program's standard input (one object, a newline after it)."""
    body = {"event": event.kind, "hook": hook, "attempt": attempt, event.kind.split("-")[0]: event.document}
    try:
        return msgspec.json.encode(body) + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (msgspec refuses it): JSON's \\u escape
        return json.dumps(body).encode() + b"\n"
