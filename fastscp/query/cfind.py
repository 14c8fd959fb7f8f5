"""C-FIND matching: a request identifier in, the matching identifiers out.

The association decodes the C-FIND-RQ and encodes the responses; this module
turns the identifier into a :class:`~fastscp.query.messages.QueryRequest` (matching
per PS3.4 C.2.2.2, done in SQL by :mod:`fastscp.query.engine`) and each row of the
answer into a response identifier holding exactly the keys the SCU asked
for, plus Query/Retrieve Level and, when a value needs it, Specific
Character Set.

Supported: Patient Root and Study Root Query/Retrieve Information Model -
FIND at PATIENT, STUDY, SERIES and IMAGE level; single value, wildcard,
universal, range and list-of-UID matching. Keys of the query level and of
the levels above it are matched and returned; so is any other top-level
attribute that the instances' attribute map holds, at every level (above
IMAGE: matched on any instance of the row, returned from its newest
instance that has it). Queries are hierarchical (the unique keys of the
levels above are required) unless the association negotiated relational
queries (PS3.4 C.4.1.2.1, C.5.1.1.1). Sequences, binary values, private
attributes and keys of a level below the query level are returned empty
and not matched; the responses then carry status 0xFF01
(:attr:`FindResponses.pending_status`).

Example
-------
>>> client = QueryClient(index_path)  # doctest: +SKIP
>>> for identifier in find(model, request_identifier, client):  # doctest: +SKIP
...     send_pending(identifier)
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import format_number_as_ds

from fastscp.dicom.sopclasses import FIND_SOP_CLASSES, PATIENT_ROOT_FIND, STUDY_ROOT_FIND
from fastscp.query.attributes import UNIQUE_KEYS, attribute_for
from fastscp.query.messages import (
    LEVELS,
    Condition,
    IndexQueries,
    QueryError,
    QueryRequest,
    QueryResult,
    ServerUnavailable,
)

#: The levels of each information model, top down.
MODEL_LEVELS: dict[str, tuple[str, ...]] = {
    PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE"),
}
assert set(MODEL_LEVELS) == FIND_SOP_CLASSES, "each FIND model offered has its levels"

# C-FIND statuses (PS3.4 C.4.1.1.4).
PENDING = 0xFF00
#: Pending, but one or more optional keys were not supported.
PENDING_WARNING = 0xFF01
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

_QUERY_RETRIEVE_LEVEL = 0x00080052
_FILLED_IN = frozenset({"RetrieveAETitle", "InstanceAvailability"})
_SPECIFIC_CHARACTER_SET = 0x00080005
_UTF8 = "ISO_IR 192"


class FindError(Exception):
    """The C-FIND fails: answer with :attr:`status` (and :attr:`comment` as Error Comment)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class IdentifierError(FindError, ValueError):
    """0xA900 Identifier Does Not Match SOP Class (a ValueError, as :mod:`fastscp.net.findscp` expects)."""

    def __init__(self, comment: str) -> None:
        super().__init__(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, comment)


class _Return(NamedTuple):
    """One element of every response."""

    tag: BaseTag
    vr: str
    #: Index of its column in the query rows; None: a constant.
    column: int | None
    constant: Any = None


def _text(value: Any) -> str:
    """A request element's value as matching text ("" = universal)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


class FindPlan(NamedTuple):
    level: str
    request: QueryRequest
    returns: list[_Return]
    #: Some requested key is not supported (returned empty, not matched).
    unsupported: bool


def plan(model: str, identifier: Dataset, *, retrieve_ae_title: str = "", relational: bool = False) -> FindPlan:
    """Check a request identifier and turn it into a query.

    ``relational``: the association negotiated relational queries, so the
    unique keys of the levels above may be absent (any key may be matched).

    Raises
    ------
    IdentifierError
        0xA900: an unknown information model or level, or (hierarchical
        query) a missing unique key of a level above the query level.
    """
    levels = MODEL_LEVELS.get(model)
    if levels is None:
        raise IdentifierError(f"not a FIND information model: {model}")
    level = _text(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in levels:
        raise IdentifierError(f"Query/Retrieve Level {level or '(missing)'!r}: use one of {', '.join(levels)}")
    depth = LEVELS.index(level)
    # Hierarchical query (PS3.4 C.4.1.2.1): the unique keys above must be given.
    for above in () if relational else levels[:levels.index(level)]:
        keyword = UNIQUE_KEYS[above]
        if not _text(identifier.get(keyword, "")).strip():
            raise IdentifierError(f"a {level} level query needs {keyword} (the unique key of the {above} level)")
    conditions: list[Condition] = []
    keys: list[str] = []
    returns: list[_Return] = []
    unsupported = False
    present = set()
    for element in identifier:
        tag = element.tag
        if tag in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET) or tag.element == 0:
            continue
        keyword = element.keyword
        present.add(keyword)
        # Filled in by fastscp, though the attribute map knows their keywords.
        attribute = attribute_for(keyword) if keyword and keyword not in _FILLED_IN else None
        if element.VR == "SQ":
            # Sequence matching is not supported: return it empty.
            returns.append(_Return(tag, "SQ", None, []))
            unsupported = unsupported or bool(element.value)
        elif attribute is not None and attribute.dicom and (attribute.tag or LEVELS.index(attribute.level) <= depth):
            value = _text(element.value).strip()
            if value and (not attribute.derived or keyword == "ModalitiesInStudy"):
                conditions.append(Condition(keyword, value))
            returns.append(_Return(tag, element.VR, len(keys)))
            keys.append(keyword)
        elif keyword == "RetrieveAETitle":
            returns.append(_Return(tag, element.VR, None, retrieve_ae_title or None))
        elif keyword == "InstanceAvailability":
            returns.append(_Return(tag, element.VR, None, "ONLINE"))
        else:
            # Not indexed, or a key of a level below the query level.
            returns.append(_Return(tag, element.VR, None, None))
            unsupported = True
    unique = UNIQUE_KEYS[level]
    if unique not in present:
        # Every response carries its level's unique key (PS3.4 C.4.1.2.2).
        tag = BaseTag(tag_for_keyword(unique))
        returns.append(_Return(tag, dictionary_VR(tag), len(keys)))
        keys.append(unique)
    if not keys:
        keys.append(unique)  # the query needs a column; nothing of it is returned
    request = QueryRequest(level=level, conditions=conditions, keys=keys, ordered=False)  # type: ignore[arg-type]
    return FindPlan(level, request, returns, unsupported)


#: VRs whose backslash is text, not a separator of values (PS3.5 6.2).
_SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})
#: The longest DS value (PS3.5 6.2).
_DS_CHARS = 16


def _value(value: Any, vr: str) -> Any:
    """A column value as pydicom wants it for the element's VR; every value of a multi-valued one."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and "\\" in value and vr not in _SINGLE_VALUED_VRS:
        # Multi-valued (Window Center, Image Type, Modalities In Study, attribute map values).
        return [_value(one, vr) if one else "" for one in value.split("\\")]
    if vr == "DS":
        if isinstance(value, float):
            return format_number_as_ds(value)
        if isinstance(value, str) and len(value) > _DS_CHARS:
            try:
                return format_number_as_ds(float(value))
            except ValueError:
                return None
    if vr in ("IS", "US", "UL", "SS", "SL", "UV", "SV") and isinstance(value, str):
        return int(value) if value.lstrip("+-").isdigit() else None
    if vr in ("FL", "FD") and isinstance(value, str):  # from the attribute map, as text
        try:
            return float(value)
        except ValueError:
            return None
    return value


class FindResponses:
    """The response identifiers of one C-FIND, read as the index answers.

    An iterator of :class:`pydicom.dataset.Dataset`; :attr:`pending_status`
    is the status to send with each (0xFF01 when some requested key is not
    supported, else 0xFF00). Call :meth:`close` when stopping early (C-CANCEL).
    """

    def __init__(self, found: FindPlan, result: QueryResult) -> None:
        self.plan = found
        self.pending_status = PENDING_WARNING if found.unsupported else PENDING
        self._result = result
        self._rows = iter(result)
        self._seen: set[tuple[Any, ...]] = set()

    def __iter__(self) -> FindResponses:
        return self

    def __next__(self) -> Dataset:
        while True:
            try:
                row = next(self._rows)
            except StopIteration:
                self.close()
                raise
            except (QueryError, ConnectionError, OSError) as exc:
                self.close()
                raise FindError(UNABLE_TO_PROCESS, f"query failed: {exc}") from None
            key = tuple(row)
            if key in self._seen:
                continue  # e.g. one SOP instance stored twice (storage.duplicates: keep-both)
            self._seen.add(key)
            return self._identifier(row)

    def _identifier(self, row: list[Any]) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = self.plan.level
        non_ascii = False
        for tag, vr, column, constant in self.plan.returns:
            value = _value(row[column], vr) if column is not None else constant
            if isinstance(value, str) and not value.isascii():
                non_ascii = True
            elif isinstance(value, list) and any(isinstance(v, str) and not v.isascii() for v in value):
                non_ascii = True
            ds.add_new(tag, vr, value)
        if non_ascii:
            ds.SpecificCharacterSet = _UTF8
        return ds

    def close(self) -> None:
        self._result.close()


def find(model: str, identifier: Dataset, client: IndexQueries, *, retrieve_ae_title: str = "",
         relational: bool = False) -> FindResponses:
    """Match a C-FIND request identifier against the index.

    Parameters
    ----------
    model : str
        The Affected SOP Class UID: :data:`PATIENT_ROOT_FIND` or :data:`STUDY_ROOT_FIND`.
    identifier : pydicom.dataset.Dataset
        The request identifier, with Query/Retrieve Level.
    client : QueryClient or LocalQueryClient
        Runs the query: in a worker, one :class:`~fastscp.query.client.QueryClient`
        shared by all its association threads (it is thread-safe; :func:`fastscp.query.client.finder`).
    retrieve_ae_title : str, optional
        The value of Retrieve AE Title (0008,0054) when the SCU asks for it.
    relational : bool, optional
        The association negotiated relational queries for ``model``.

    Returns
    -------
    FindResponses
        Iterates the response identifiers (each a Dataset to send with
        status :attr:`FindResponses.pending_status`); the final response is
        the caller's (0x0000 Success).

    Raises
    ------
    IdentifierError
        Before any response: the identifier does not fit the model (0xA900).
    FindError
        Before any response, the index can't be asked (0xA700 / 0xC000);
        while iterating, the query failed (0xC000).
    """
    found = plan(model, identifier, retrieve_ae_title=retrieve_ae_title, relational=relational)
    try:
        result = client.query(found.request)
    except ServerUnavailable as exc:
        raise FindError(OUT_OF_RESOURCES, f"the index is not available: {exc}") from None
    except (QueryError, ConnectionError, OSError) as exc:
        raise FindError(UNABLE_TO_PROCESS, f"query failed: {exc}") from None
    return FindResponses(found, result)
