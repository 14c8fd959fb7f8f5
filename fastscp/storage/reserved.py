"""The storage root's reserved names: what fastscp itself keeps at the top of the root.

The one owner of these names. The storage area makes the dot-folders, the
post-store stage writes thumbnails, scan sheets and NIfTI volumes, the index file sits in
the root by default; a layout never names a stored instance's top folder
after one of them (:func:`fastscp.storage.layout.relative_path`), and the
walks over stored instances (reindex, scan sheets from a folder) skip the
folders.
"""

from __future__ import annotations

from typing import Final

#: Temp files of data sets being received (the same filesystem as the final paths).
INCOMING: Final = ".incoming"
#: In INCOMING: the name prefix of the private folders of files fetched from other nodes (fastscp.net.fetch).
FETCHED: Final = "fetched-"
#: In INCOMING: the records a worker kept for a lagging post-store stage beyond its backlog
#: in memory (fastscp.poststore.client); the stage takes them from there.
POSTSTORE_BACKLOG: Final = "poststore-backlog"
#: In INCOMING: the same for a lagging indexer (fastscp.index.client); the indexer takes them.
INDEX_BACKLOG: Final = "index-backlog"
#: In INCOMING: the same for a lagging forwarder (fastscp.forward.process); the forwarder takes them.
FORWARD_BACKLOG: Final = "forward-backlog"
#: The folders of kept records (fastscp.process.kept).
BACKLOGS: Final = frozenset({POSTSTORE_BACKLOG, INDEX_BACKLOG, FORWARD_BACKLOG})
#: Data sets that could not be understood, each with a ``.reason.txt`` (storage.quarantine).
QUARANTINE: Final = ".quarantine"
#: JPEG thumbnails, mirroring the layout (thumbnails.enabled).
THUMBNAILS: Final = "thumbnails"
#: Scan sheets of layouts without a study folder (scansheet.enabled).
SCANSHEETS: Final = "scansheets"
#: NIfTI volumes of the nifti hook action when its hooks[].directory is empty.
NIFTI: Final = "nifti"
#: The DuckDB index when database.path is empty.
INDEX: Final = "index.duckdb"

#: Folders under the root that hold no stored instances.
NOT_INSTANCES: Final = frozenset({INCOMING, QUARANTINE, THUMBNAILS, SCANSHEETS, NIFTI})
#: Every top-level name fastscp writes itself, lower case: DuckDB keeps its
#: write-ahead log and its spill folder beside the index file.
RESERVED: Final = NOT_INSTANCES | {INDEX, f"{INDEX}.wal", f"{INDEX}.tmp"}
