"""Files stored on another node of a shared index: read where every node mounts them, or fetched with C-GET.

In a shared index (``database.catalog``) every row names its node and its
path below that node's storage root, and each node registers at start where
its DICOM port and its storage root are
(:class:`fastscp.index.database.NodeAddress`). C-GET, C-MOVE and the study
browser's zip on any node take the files of other nodes' rows through
:class:`RemoteFiles`, one per request:

- the owning node registered ``storage.shared``: its file is read where it
  is (every node mounts that root at the same path);
- else the file is fetched from that node with C-GET (we are the SCU and
  take the SCP role for its storage SOP class), up to :data:`FETCH_BATCH`
  instances of one series per C-GET, into a private folder in our
  ``.incoming`` (:data:`fastscp.storage.reserved.FETCHED`); each file is
  removed once it is sent, the folder when the request ends, on every path.
  A fetched file is the data set as the owning node sent it (its file's
  bytes, never decoded) in the File Meta that node wrote for it
  (:func:`fastscp.dicom.part10.file_meta` of the same values): the stored
  file, byte for byte. (pynetdicom holds each arriving data set in memory
  until it is written: one instance at a time.);
- a node that can't be reached fails its instances (each a failed
  sub-operation), and is not tried again within the request: a node that is
  down costs at most ``retrieve.node_timeout`` per request.

A node asked by another node of the index (the calling AE title is our own
``server.ae_title``) serves its own files only (:func:`remote_files`), so
nodes never fetch from each other in a loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from fastscp.config import Config, TLSConfig
from fastscp.dicom.part10 import file_meta
from fastscp.index.database import NodeAddress
from fastscp.net import dimse
from fastscp.net.scu import SCUError, _new_ae, _open, tls_context
from fastscp.query.messages import QueryError, ServerUnavailable
from fastscp.query.retrieve import Instance
from fastscp.storage.reserved import FETCHED, INCOMING

log = logging.getLogger("fastscp.retrieve")

#: Instances of one series fetched with one C-GET: the most files the private folder holds at once.
FETCH_BATCH = 32


@dataclass(frozen=True)
class FetchSettings:
    """What fetching from the other nodes takes (:func:`fetch_settings`)."""

    #: This node's name; our AE title (the calling one of a fetch; a request from it is another node's).
    node: str
    ae_title: str
    #: Where the nodes are: each node's registered address, by name
    #: (:func:`fastscp.query.client.node_addresses`, read through the indexer).
    nodes: Callable[[], dict[str, NodeAddress]]
    #: The storage root's .incoming: the private folders go there (same disk, cleaned at start).
    incoming: str
    #: retrieve.node_timeout.
    timeout: float
    #: Our tls.* files: the client side towards a node whose port speaks TLS.
    tls: TLSConfig


def fetch_settings(config: Config, storage_root: str,
                   nodes: Callable[[], dict[str, NodeAddress]]) -> FetchSettings | None:
    """The :class:`FetchSettings` of a node of a shared index; None for an index file (one node)."""
    lake = config.lake
    if lake is None:
        return None
    return FetchSettings(lake[2], config.server.ae_title, nodes, os.path.join(storage_root, INCOMING),
                         config.retrieve.node_timeout, config.tls)


def remote_files(settings: FetchSettings | None, found: Sequence[Instance], requester: str) -> RemoteFiles | None:
    """The :class:`RemoteFiles` of a request's instances; None when it must use this node's files only
    (an index file, or a request from another node of the index)."""
    if settings is None or requester == settings.ae_title or not any(i.node for i in found):
        return None
    return RemoteFiles(settings, found)


def _shared_path(root: str, path: str) -> str:
    """The file at ``path`` below ``root`` if it is there and resolves inside it (links followed), else ""."""
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, path))
    return real if real.startswith(base.rstrip(os.sep) + os.sep) and os.path.isfile(real) else ""


class RemoteFiles:
    """Local files for the other nodes' instances of one request; close it (it is a context manager).

    Call :meth:`local` for the instances in the order of ``found``, and
    :meth:`done` once each is sent.
    """

    def __init__(self, settings: FetchSettings, found: Sequence[Instance]) -> None:
        self.settings = settings
        self._found = found
        self._position = {instance.sop_instance_uid: n for n, instance in enumerate(found)}
        self._nodes: dict[str, NodeAddress] | None = None
        self._registry_error = ""
        self._folder = ""
        self._made = 0
        #: SOP Instance UID -> the fetched file, until it is sent; -> why it could not be had.
        self._fetched: dict[str, str] = {}
        self._failed: dict[str, str] = {}
        #: Nodes that could not be reached in this request, and why.
        self._down: dict[str, str] = {}
        self._tls: ssl.SSLContext | None = None

    def __enter__(self) -> RemoteFiles:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the private folder and what is left in it."""
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = ""
        self._fetched.clear()

    def local(self, instance: Instance) -> Instance | str:
        """``instance`` with a path readable here (a shared path, or a fetched file), or why there is none."""
        uid = instance.sop_instance_uid
        if uid not in self._fetched and uid not in self._failed:
            owner = self._owner(instance.node)
            if isinstance(owner, str):
                return owner
            if owner.shared_storage:
                path = _shared_path(owner.storage_directory, instance.path)
                if path:
                    return instance._replace(path=path, node="")
            self._fetch(owner, instance)
        if uid in self._fetched:
            return instance._replace(path=self._fetched[uid], node="")
        return self._failed.pop(uid, f"node {instance.node!r} did not send it")

    def done(self, instance: Instance) -> None:
        """``instance`` is sent (or failed): its fetched file goes."""
        path = self._fetched.pop(instance.sop_instance_uid, None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass  # the folder goes at close()

    def _owner(self, node: str) -> NodeAddress | str:
        """The registered address of ``node``, or why it can't be asked."""
        if node in self._down:
            return self._down[node]
        if self._nodes is None:
            self._nodes = {}
            try:
                self._nodes = self.settings.nodes()
            except (QueryError, ServerUnavailable, ConnectionError, OSError) as exc:
                self._registry_error = f"the index did not say where the nodes are: {exc}"
                log.warning("fetching files of other nodes: %s", self._registry_error)
        address = self._nodes.get(node)
        if address is None:
            return self._registry_error or (f"its file is on node {node!r}, which has registered no address "
                                            "(it has not run since its upgrade)")
        return address

    def _fetch(self, owner: NodeAddress, first: Instance) -> None:
        """C-GET ``first`` and the next instances of its node and series (up to FETCH_BATCH) from ``owner``."""
        batch = [first]
        for other in self._found[self._position[first.sop_instance_uid] + 1:]:
            if len(batch) >= FETCH_BATCH or other.series_instance_uid != first.series_instance_uid:
                break
            if other.node == first.node and other.sop_instance_uid not in self._fetched:
                batch.append(other)
        why = f"node {owner.node!r} did not send it"
        try:
            self._get(owner, batch)
        except SCUError as exc:
            self._down[owner.node] = f"node {owner.node!r} at {owner.host}:{owner.port}: {exc}"
            log.warning("fetching files of other nodes: %s; its files fail in this request", self._down[owner.node])
        except OSError as exc:  # the private folder can't be made
            self._down[owner.node] = f"no folder for files fetched from node {owner.node!r}: {exc.strerror}"
            log.warning("fetching files of other nodes: %s", self._down[owner.node])
        except Exception as exc:  # noqa: BLE001 - pynetdicom's own errors: this batch fails, not the request
            why = f"fetching from node {owner.node!r} failed: {type(exc).__name__}: {exc}"
            log.warning("fetching files of other nodes: %s", why)
        for instance in batch:
            if instance.sop_instance_uid not in self._fetched:
                self._failed.setdefault(instance.sop_instance_uid, self._down.get(owner.node, why))

    def _get(self, owner: NodeAddress, batch: list[Instance]) -> None:
        if not self._folder:
            self._folder = tempfile.mkdtemp(prefix=FETCHED, dir=self.settings.incoming)
        settings = self.settings
        ae = _new_ae(settings.ae_title, settings.timeout)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        syntaxes: dict[str, set[str]] = {}
        for instance in batch:
            syntaxes.setdefault(instance.sop_class_uid, set()).add(instance.transfer_syntax_uid)
        for sop_class, names in syntaxes.items():
            ae.add_requested_context(sop_class, sorted(names))  # as stored: never converted on the way
        wanted = {instance.sop_instance_uid: instance for instance in batch}
        folder = self._folder

        def on_store(event: Any) -> int:
            request = event.request
            uid = str(request.AffectedSOPInstanceUID)
            instance = wanted.pop(uid, None)
            if instance is None:
                return dimse.OUT_OF_RESOURCES  # not one we asked for: not kept
            self._made += 1
            path = os.path.join(folder, f"{self._made}.dcm")
            try:
                with open(path, "xb") as f:
                    f.write(file_meta(str(request.AffectedSOPClassUID), uid, str(event.context.transfer_syntax),
                                      instance.calling_ae_title))
                    f.write(request.DataSet.getbuffer())
            except OSError as exc:
                self._failed[uid] = f"the file fetched from node {owner.node!r} could not be kept: {exc.strerror}"
                try:
                    os.unlink(path)
                except OSError:
                    pass
                return dimse.OUT_OF_RESOURCES
            self._fetched[uid] = path
            return dimse.SUCCESS

        tls = None
        if owner.tls:
            if self._tls is None:
                t = settings.tls
                self._tls = tls_context(ca_bundle=t.ca_bundle, certificate=t.certificate, private_key=t.private_key,
                                        min_version=t.min_version)
            tls = self._tls
        assoc = _open(ae, owner.host, owner.port, owner.ae_title, tls, max_pdu=0,  # fragments as large as it likes
                      ext_neg=[build_role(sop_class, scp_role=True) for sop_class in syntaxes],
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "IMAGE"
            identifier.StudyInstanceUID = batch[0].study_instance_uid
            identifier.SeriesInstanceUID = batch[0].series_instance_uid
            identifier.SOPInstanceUID = list(wanted)
            for status, _found in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                if "Status" not in status:
                    log.warning("fetching files of other nodes: no answer from node %r (association aborted or "
                                "retrieve.node_timeout)", owner.node)
                    break
        finally:
            if assoc.is_established:
                assoc.release()
