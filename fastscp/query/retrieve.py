"""C-MOVE and C-GET matching: a retrieve identifier in, the stored instances to send out.

The association decodes the C-MOVE-RQ / C-GET-RQ and runs the sub-operations
(:mod:`fastscp.net.retrievescp`); this module turns the identifier into an
IMAGE level :class:`~fastscp.query.messages.QueryRequest` on the index, with the
levels and unique keys of C-FIND (:data:`fastscp.query.cfind.MODEL_LEVELS`,
:data:`~fastscp.query.attributes.UNIQUE_KEYS`).

A retrieve identifier holds the Query/Retrieve Level and unique keys only
(PS3.4 C.4.2.2.1): the level's own key, one value or a list of UIDs, and,
unless relational retrieval was negotiated, the unique keys of the levels
above it. Other keys are ignored. An instance stored twice under one SOP
Instance UID (storage.duplicates: keep-both) is sent once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from pydicom.dataset import Dataset

from fastscp.dicom.sopclasses import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from fastscp.query.attributes import UNIQUE_KEYS
from fastscp.query.cfind import (
    MODEL_LEVELS,
    OUT_OF_RESOURCES,
    UNABLE_TO_PROCESS,
    FindError,
    IdentifierError,
    _text,
)
from fastscp.query.messages import Condition, IndexQueries, QueryError, QueryRequest, ServerUnavailable

#: Each retrieve information model -> the FIND model with its levels.
RETRIEVE_MODELS: dict[str, str] = {
    PATIENT_ROOT_MOVE: PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET: PATIENT_ROOT_FIND,
    STUDY_ROOT_MOVE: STUDY_ROOT_FIND,
    STUDY_ROOT_GET: STUDY_ROOT_FIND,
}
#: 0xA701 Out of Resources - Unable to calculate number of matches (PS3.4 C.4.2.1.5).
TOO_MANY_MATCHES = OUT_OF_RESOURCES + 1

_KEYS = ["SOPInstanceUID", "SOPClassUID", "TransferSyntaxUID", "Path"]
#: In a shared index, also the row's node and what fetching its file from that node takes.
_NODE_KEYS = [*_KEYS, "Node", "StudyInstanceUID", "SeriesInstanceUID", "CallingAETitle"]


class Instance(NamedTuple):
    """One stored instance to send."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    #: Absolute path of its Part 10 file; of another node's file, its path below that node's storage root.
    path: str
    #: A shared index: the node whose disk has the file, when it is another node ("": this node's file).
    node: str = ""
    #: In a shared index: its study and series (a C-GET for another node's file names them) and its sender
    #: (the Source Application Entity Title of the File Meta a fetched file is framed in again).
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    calling_ae_title: str = ""


def plan(model: str, identifier: Dataset, *, relational: bool = False) -> QueryRequest:
    """The IMAGE level query that finds the instances a retrieve identifier names.

    Raises
    ------
    IdentifierError
        0xA900: an unknown model or level, the level's unique key missing,
        empty or with wildcards, or (hierarchical) a unique key above missing.
    """
    find_model = RETRIEVE_MODELS.get(model)
    if find_model is None:
        raise IdentifierError(f"not a MOVE or GET information model: {model}")
    levels = MODEL_LEVELS[find_model]
    level = _text(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in levels:
        raise IdentifierError(f"Query/Retrieve Level {level or '(missing)'!r}: use one of {', '.join(levels)}")
    conditions = []
    for above in levels[: levels.index(level) + 1]:
        keyword = UNIQUE_KEYS[above]
        value = _text(identifier.get(keyword, "")).strip()
        if not value:
            if above == level or not relational:
                raise IdentifierError(f"a {level} level retrieve needs {keyword} (the unique key of the {above} level)")
            continue
        if "*" in value or "?" in value:
            # Unique keys are single values or lists of UIDs (PS3.4 C.4.2.2.1), never wildcards.
            raise IdentifierError(f"{keyword}: wildcards are not allowed in a retrieve")
        conditions.append(Condition(keyword, value))
    return QueryRequest(level="IMAGE", conditions=conditions, keys=list(_KEYS), ordered=True)


def instances(model: str, identifier: Dataset, client: IndexQueries, storage_root: str, *,
              relational: bool = False, limit: int = 0, node: str = "") -> list[Instance]:
    """The stored instances a C-MOVE or C-GET identifier names, each once, in study/series/instance order.

    Parameters
    ----------
    limit : int, optional
        More instances than this is 0xA701 (0: no limit); bounds the memory
        of one request.
    node : str, optional
        This node's name in a shared index: rows of other nodes become
        instances with their :attr:`Instance.node`, and an instance stored
        on several nodes is taken from this one's disk when it has it.

    Raises
    ------
    IdentifierError
        The identifier does not fit the model (0xA900).
    FindError
        The index can't be asked (0xA700), fails (0xC000), or more than
        ``limit`` instances match (0xA701).
    """
    request = plan(model, identifier, relational=relational)
    if limit or node:
        request = QueryRequest(level=request.level, conditions=request.conditions,
                               keys=list(_NODE_KEYS) if node else request.keys, ordered=True,
                               limit=limit + 1 if limit else 0)
    return list(_run(request, client, storage_root, limit, node).values())


def stored(sop_instance_uids: list[str], client: IndexQueries, storage_root: str) -> dict[str, Instance]:
    """The indexed instances among ``sop_instance_uids`` (Storage Commitment), by SOP Instance UID.

    Raises
    ------
    FindError
        The index can't be asked (0xA700) or fails (0xC000).
    """
    found: dict[str, Instance] = {}
    for start in range(0, len(sop_instance_uids), _UIDS_PER_QUERY):
        uids = "\\".join(sop_instance_uids[start : start + _UIDS_PER_QUERY])
        found.update(_run(QueryRequest(level="IMAGE", conditions=[Condition("SOPInstanceUID", uids)],
                                       keys=list(_KEYS), ordered=False), client, storage_root))
    return found


#: UIDs in one list of UID matching (a Storage Commitment request may name thousands).
_UIDS_PER_QUERY = 500


def _run(request: QueryRequest, client: IndexQueries, storage_root: str, limit: int = 0,
         node: str = "") -> dict[str, Instance]:
    """Run an IMAGE level query of :data:`_KEYS` (``node``: :data:`_NODE_KEYS`): each SOP Instance UID
    once (the first row; this node's own first)."""
    try:
        result = client.query(request)
    except ServerUnavailable as exc:
        raise FindError(OUT_OF_RESOURCES, f"the index is not available: {exc}") from None
    except (QueryError, ConnectionError, OSError) as exc:
        raise FindError(UNABLE_TO_PROCESS, f"query failed: {exc}") from None
    found: dict[str, Instance] = {}
    try:
        for count, row in enumerate(result, 1):
            if limit and count > limit:
                raise FindError(TOO_MANY_MATCHES, f"more than {limit} instances match (retrieve.max_instances)")
            uid, sop_class, syntax, path = row[:4]
            owner = str(row[4] or "") if node else ""
            if owner == node:
                owner = ""
            known = found.get(uid)
            if known is not None and (owner or not known.node):
                continue
            found[uid] = Instance(str(uid), str(sop_class or ""), str(syntax or ""),
                                  str(path) if owner else os.path.join(storage_root, str(path)), owner,
                                  *(str(value or "") for value in row[5:8]))
    except (QueryError, ConnectionError, OSError) as exc:
        raise FindError(UNABLE_TO_PROCESS, f"query failed: {exc}") from None
    finally:
        result.close()
    return found


#: ``select(model, identifier, relational) -> instances``: the query behind C-MOVE and C-GET.
Selector = Callable[[str, Dataset, bool], list[Instance]]


#: ``lookup(sop_instance_uids) -> {uid: instance}``: the indexed ones (Storage Commitment).
Lookup = Callable[[list[str]], dict[str, Instance]]
