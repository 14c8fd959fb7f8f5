"""Which stored files an export takes: instances found through the index.

The index answers through the running server when one owns it, else from
the file opened read-only (:func:`fastscp.query.client.open_query_client`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from fastscp.index.database import IndexUnavailable
from fastscp.query.client import open_query_client
from fastscp.query.messages import Condition, QueryError, QueryRequest

__all__ = ["Instance", "SelectionError", "select_instances"]


class SelectionError(Exception):
    """The index can't be read, refused the request, or nothing matched (the message says which)."""


class Instance(NamedTuple):
    """One stored instance to export."""

    #: Absolute path of the stored file.
    path: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


#: The keys asked for, in :class:`Instance` order after the path.
_KEYS = ["Path", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


def select_instances(index_path: str, storage_root: str, conditions: list[Condition], *,
                     what: str = "the selection") -> list[Instance]:
    """The instances matching every condition (C-FIND matching, at the IMAGE level), in
    study, series and Instance Number order.

    Parameters
    ----------
    conditions : list of Condition
        At least one: an export of the whole index is never implied.
    what : str
        Names the selection in the error when nothing matches ("study 1.2.3").

    Raises
    ------
    SelectionError
        No condition, the index can't be read or the server stopped answering,
        an unknown keyword or bad value, or no instance matches.
    """
    if not conditions:
        raise SelectionError("select instances: give a study, a patient or a query")
    try:
        client = open_query_client(index_path)
    except IndexUnavailable as exc:
        raise SelectionError(str(exc)) from None
    try:
        with client.query(QueryRequest(level="IMAGE", conditions=conditions, keys=_KEYS)) as result:
            rows = [Instance(os.path.join(storage_root, path), *uids) for path, *uids in result]
    except QueryError as exc:
        raise SelectionError(str(exc)) from None
    except (ConnectionError, OSError) as exc:
        raise SelectionError(f"{index_path}: the server stopped answering: {exc}") from None
    finally:
        client.close()
    if not rows:
        raise SelectionError(f"{what}: no instances in the index {index_path}")
    return rows
