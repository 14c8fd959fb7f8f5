"""Messages between processes (msgspec, MessagePack on the wire)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from fastscp.dicom.fields import HeaderFields
from fastscp.status import AssociationReport


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True, tag="instance"):
    """One stored instance, sent by a worker to the indexer after its rename."""

    path: str  # relative to the storage root
    size: int  # bytes of the whole Part 10 file
    transfer_syntax_uid: str
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    received_at: float  # seconds since the epoch
    header: HeaderFields
    #: The content hash of the data set bytes as received (dicom.part10.dataset_content_hash); "" if not computed.
    content_hash: str = ""
    #: The C-STORE's Affected SOP Instance UID (the File Meta's) when it
    #: differs from the data set's (``header.sop_instance_uid``), else "".
    affected_sop_instance_uid: str = ""


class DuplicateConflict(msgspec.Struct, frozen=True, kw_only=True, tag="conflict"):
    """An instance arrived again with different content (``storage.duplicates``)."""

    sop_instance_uid: str
    path: str  # the existing file, relative to the storage root
    existing_hash: str
    new_hash: str
    policy: str  # reject | keep-first | overwrite | keep-both
    #: What happened: "rejected", "kept-first", "overwritten", "kept-both".
    outcome: str
    #: Where the new copy went (keep-both, overwrite), else "".
    new_path: str
    calling_ae_title: str
    received_at: float


class ThumbnailMade(msgspec.Struct, frozen=True, kw_only=True, tag="thumbnail"):
    """The post-store stage made a thumbnail for a stored instance."""

    path: str  # the instance, relative to the storage root
    thumbnail_path: str  # relative to the storage root


#: What workers and the post-store stage tell the indexer.
IndexRecord = InstanceRecord | DuplicateConflict | ThumbnailMade


#: The columns of a batch of instances: InstanceRecord's fields (its header
#: excepted), then HeaderFields', then the id of the attribute map the
#: ``attributes`` column is relative to (:func:`split_maps`).
INSTANCE_COLUMNS: tuple[str, ...] = (
    *(name for name in InstanceRecord.__struct_fields__ if name != "header"),
    *HeaderFields.__struct_fields__,
    "attributes_base",
)
_HEADER_AT = InstanceRecord.__struct_fields__.index("header")
_ATTRIBUTES_AT = INSTANCE_COLUMNS.index("attributes")
_SERIES_AT = INSTANCE_COLUMNS.index("series_instance_uid")


def map_id(text: str) -> int:
    """The id of an attribute map: a 64-bit hash of its text (equal maps share one row of ``attribute_maps``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _entries(text: str) -> list[str]:
    # '{"T":"v","U":"w"}' -> ['T":"v', 'U":"w']: '","' is never inside a value,
    # whose quotes are escaped (header.build_map).
    return text[2:-2].split('","') if len(text) > 2 else []


#: A series' base attribute map in :func:`split_maps`: its id, text, entries and their tags.
Base = tuple[int, str, frozenset[str], frozenset[str]]
#: Series whose base a sender keeps (:func:`split_maps`' ``known``); more clear them all.
KNOWN_SERIES = 64
#: A base map longer than this (characters) is not kept: each message that refers to it carries it.
KNOWN_BASE_CHARS = 16 * 1024


def split_maps(maps: Sequence[str], series: Sequence[str],
               known: dict[str, Base] | None = None) -> tuple[list[str], list[int], dict[int, str]]:
    """Each instance's attribute map as a base shared by its series and its own entries over it.

    PERF: a CT's ~100 attributes are ~2.5 KB of JSON, nearly all of it the
    same in every instance of its series; written whole, the indexer's
    rate fell to a quarter (bench/test_bench_index.py). The first map of
    each series in ``maps`` is the base; an instance keeps the entries that
    differ from it, and ``null`` for those it lacks (a JSON merge patch).
    ``known``: the bases of earlier calls by Series Instance UID (a sender's,
    kept between its messages; updated here), so that a series keeps one
    base and the indexer writes its text once. PERF: with a base per
    message, each batch's INSERT into ``attribute_maps`` cost the indexer
    ~5.5 ms of CPU (a batch of a 400 images/s load: ~80 instances); the
    indexer's CPU per image went 0.59 -> 0.46 ms (README, Performance).
    Every message still carries the text of each base it refers to.

    Returns
    -------
    deltas : list of str
        Per instance: a JSON object text.
    base_ids : list of int
        Per instance.
    bases : dict
        Base id (:func:`map_id`) -> the base map's text.
    """
    first: dict[str, Base] = {}
    bases: dict[int, str] = {}
    deltas: list[str] = []
    base_ids: list[int] = []
    for text, uid in zip(maps, series, strict=True):
        base = first.get(uid)
        if base is None:
            base = known.get(uid) if known is not None else None
            if base is None:
                entries = _entries(text)
                base = (map_id(text), text, frozenset(entries), frozenset(e[:8] for e in entries))
                if known is not None and len(text) <= KNOWN_BASE_CHARS:
                    if len(known) >= KNOWN_SERIES:
                        known.clear()
                    known[uid] = base
            first[uid] = base
            bases[base[0]] = base[1]
        base_ids.append(base[0])
        if text == base[1]:
            deltas.append("{}")
            continue
        entries = _entries(text)
        own = sorted(set(entries).difference(base[2]))  # set operations, at C speed
        parts = [f'"{entry}"' for entry in own]
        if len(entries) - len(own) != len(base[2]):  # some entry of the base is not the instance's
            parts += [f'"{tag}":null' for tag in sorted(base[3].difference(entry[:8] for entry in entries))]
        deltas.append("{" + ",".join(parts) + "}")
    return deltas, base_ids, bases


def transpose(records: Sequence[InstanceRecord],
              known: dict[str, Base] | None = None) -> tuple[list[tuple[Any, ...]], dict[int, str]]:
    """The records' values by column (:data:`INSTANCE_COLUMNS`), one tuple per column, and the base maps.

    The ``attributes`` column holds each instance's entries over its base
    map (:func:`split_maps`, with ``known``); ``attributes_base`` the base's id.
    """
    if not records:
        return [() for _ in INSTANCE_COLUMNS], {}
    # PERF: transposed at C speed (astuple + zip): ~10x faster than a dict per row.
    by_field = list(zip(*map(msgspec.structs.astuple, records), strict=True))
    header = by_field.pop(_HEADER_AT)
    columns = [*by_field, *zip(*map(msgspec.structs.astuple, header), strict=True)]
    deltas, base_ids, bases = split_maps(columns[_ATTRIBUTES_AT], columns[_SERIES_AT], known)
    columns[_ATTRIBUTES_AT] = tuple(deltas)
    columns.append(tuple(base_ids))
    return columns, bases


class InstanceColumns(msgspec.Struct, frozen=True, array_like=True):
    """Instance records column by column (:data:`INSTANCE_COLUMNS`), each run-length coded when that is shorter.

    PERF: the instances of one series share most values (patient, study and
    series, AE titles, image geometry), so the indexer decodes a few values
    per record, not ~45, and no struct per record: decoding was its largest
    cost (bench/test_bench_index.py::test_indexer_sustained_rate).
    """

    count: int
    #: Per column: one value per record, or one per run.
    values: list[list[Any]]
    #: Per column: the lengths of the runs of ``values``; None: one value per record.
    run_lengths: list[list[int] | None]
    #: The base attribute maps of the records, by id (``attributes_base``).
    maps: dict[int, str] = msgspec.field(default_factory=dict)

    @classmethod
    def of(cls, records: Sequence[InstanceRecord], known: dict[str, Base] | None = None) -> InstanceColumns:
        """``known``: see :func:`split_maps`."""
        values: list[list[Any]] = []
        run_lengths: list[list[int] | None] = []
        columns, maps = transpose(records, known)
        for column in columns:
            if column and column.count(column[0]) == len(column):  # the common case, at C speed
                values.append([column[0]])
                run_lengths.append([len(column)])
                continue
            runs = [(value, len(list(group))) for value, group in itertools.groupby(column)]
            if len(runs) * 2 <= len(column):
                values.append([value for value, _ in runs])
                run_lengths.append([length for _, length in runs])
            else:
                values.append(list(column))
                run_lengths.append(None)
        return cls(len(records), values, run_lengths, maps)

    def column(self, name: str) -> list[Any]:
        """One column (:data:`INSTANCE_COLUMNS`), a value per record."""
        at = INSTANCE_COLUMNS.index(name)
        values, run_lengths = self.values[at], self.run_lengths[at]
        if run_lengths is None:
            return values
        if len(values) == 1:
            return values * self.count
        return [value for value, length in zip(values, run_lengths, strict=True) for _ in range(length)]


class RecordBatch(msgspec.Struct, frozen=True, tag="batch"):
    """Several index records in one message (one datagram, one wake-up of the indexer)."""

    instances: InstanceColumns
    #: Duplicate conflicts and thumbnails, in the order they were made.
    others: list[DuplicateConflict | ThumbnailMade]

    @classmethod
    def of(cls, records: Iterable[IndexRecord], known: dict[str, Base] | None = None) -> RecordBatch:
        """``known``: a sender's base maps by series (:func:`split_maps`)."""
        instances: list[InstanceRecord] = []
        others: list[DuplicateConflict | ThumbnailMade] = []
        for record in records:
            if isinstance(record, InstanceRecord):
                instances.append(record)
            else:
                others.append(record)
        return cls(InstanceColumns.of(instances, known), others)


#: What travels on the sockets of the index and the post-store stage (the
#: supervisor's control messages are fastscp.runtime.messages).
Message = InstanceRecord | DuplicateConflict | ThumbnailMade | RecordBatch
ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(Message)
#: The indexer's decoder: workers and the post-store stage send only batches.
BATCH_DECODER = msgspec.msgpack.Decoder(RecordBatch)
#: The post-store stage's decoder: workers send it instance records and each association's final
#: report (for the association-ended hooks), several a message (fastscp.poststore.client); one alone
#: is read too (a file kept by an earlier version).
POSTSTORE_DECODER = msgspec.msgpack.Decoder(list[InstanceRecord | AssociationReport] | InstanceRecord
                                            | AssociationReport)
