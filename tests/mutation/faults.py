"""Hand-written faults (issue 18): realistic mistakes that once went unnoticed.

Each one replaces one exact piece of source text; the runner applies it to a
copy of the tree, runs the tests named here, and expects them to fail. A fault
whose ``old`` text is no longer in the source fails the run: the list must be
kept in step with the code it guards.
"""

from __future__ import annotations

from typing import NamedTuple


class Fault(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    #: pytest node ids (or files) that must fail with the fault in place.
    tests: tuple[str, ...]
    #: Seconds or so (on an idle machine); the CI subset takes the quick ones.
    quick: bool = True


DURABILITY = ("tests/e2e/test_durability.py",)
#: Association.run between its two uses of server.acse_timeout.
ACSE_MIDDLE = (
    "            if self.settings.tls is not None:\n"
    "                # CPython runs the whole handshake against one deadline of the\n"
    "                # socket's timeout; what it took comes off the request's time.\n"
    "                self.sock = self.settings.tls.wrap_socket(self.sock, server_side=True)\n"
    "            self.stream = PDUStream(self.sock, self.settings.policy.max_pdu_size)\n"
    "            # acse_timeout bounds the whole A-ASSOCIATE-RQ (and TLS handshake), not each read.\n"
    "            self.stream.deadline(\n"
)
PROTOCOL = "tests/e2e/test_protocol_paths.py::"

FAULTS: tuple[Fault, ...] = (
    # -- durability --------------------------------------------------------------------------
    Fault("file fsync removed", "fastscp/storage/area.py",
          "            if storage.fsync:\n                os.fsync(self._fd)\n",
          "            if storage.fsync:\n                pass\n", DURABILITY),
    Fault("folder fsync removed", "fastscp/storage/area.py",
          "                fsync_dir(os.path.dirname(outcome.path))", "                pass", DURABILITY),
    Fault("fsync under never", "fastscp/runtime/supervisor.py",
          'fsync=config.storage.fsync == "always"', "fsync=True", DURABILITY),
    # -- reconcile ---------------------------------------------------------------------------
    Fault("indexer not given the storage root", "fastscp/runtime/supervisor.py",
          "db.batch_interval, self.storage.root, self.storage.sr_root, self.config.lake,",
          "db.batch_interval, None, self.storage.sr_root, self.config.lake,",
          ("tests/e2e/test_index_server.py::test_kill_9_of_the_indexer_while_storing_loses_no_record",), quick=False),
    Fault("changed judged by size alone", "fastscp/index/reindex.py",
          "known[0] != state.size or state.mtime_ns // 1000 > known[1]", "known[0] != state.size",
          ("tests/unit/index/test_index.py::test_plan_finds_a_file_of_the_same_size_written_after_its_row",)),
    # -- protocol paths ----------------------------------------------------------------------
    Fault("Affected SOP Class not checked against the context (0x0122)", "fastscp/net/storescp.py",
          "        if sop_class != self._context.abstract_syntax:\n", "        if False:\n",
          (PROTOCOL + "test_store_whose_affected_sop_class_differs_from_its_context_gets_0122",), quick=False),
    Fault("unsupported command answered with success", "fastscp/net/association.py",
          "status = (dimse.UNRECOGNIZED_OPERATION,", "status = (dimse.SUCCESS,",
          (PROTOCOL + "test_unsupported_commands_get_0211_and_the_association_carries_on",), quick=False),
    # Both places that apply it: the socket's timeout per read and the deadline for the whole request
    # (with either left, a silent peer is still dropped in time).
    Fault("acse_timeout ignored", "fastscp/net/association.py",
          "self.sock.settimeout(self.settings.acse_timeout)\n" + ACSE_MIDDLE
          + "                self.settings.acse_timeout - (time.monotonic() - started),",
          "self.sock.settimeout(None)\n" + ACSE_MIDDLE + "                1e9,",
          (PROTOCOL + "test_a_peer_that_never_associates_is_dropped_after_the_acse_timeout",), quick=False),
    Fault("shutdown_timeout never expires in the worker", "fastscp/runtime/worker.py",
          "(0 if now else self.shutdown_timeout)", "(0 if now else 1e9)",
          (PROTOCOL + "test_shutdown_timeout_aborts_an_association_that_does_not_finish",), quick=False),
    Fault("C-CANCEL of a C-FIND ignored", "fastscp/net/association.py",
          'return command["CommandField"] == dimse.C_CANCEL_RQ', "return False",
          (PROTOCOL + "test_c_cancel_stops_a_c_find",), quick=False),
    Fault("C-CANCEL already read into the PDU buffer missed", "fastscp/net/association.py",
          "if not self.stream.buffered and not select.select(", "if not select.select(",
          (PROTOCOL + "test_c_cancel_stops_a_c_find",), quick=False),
    # -- storage and layout ------------------------------------------------------------------
    Fault("root-escape backstop removed", "fastscp/storage/area.py",
          "        if not final.startswith(root.rstrip(os.sep) + os.sep):\n", "        if False:\n",
          ("tests/unit/storage/test_storage.py",)),
    Fault("keep-both limited to .v2", "fastscp/storage/area.py",
          "range(2, 10000)", "range(2, 3)", ("tests/unit/storage/test_storage.py",)),
    Fault("leading-dot strip dropped before the reserved-name check", "fastscp/storage/layout.py",
          'text = re.sub(r"\\s+", " ", text).strip(" .")', 'text = re.sub(r"\\s+", " ", text).strip(" ")',
          ("tests/unit/storage/test_layout.py",)),
    Fault("no _ prefix for a reserved top-level folder name", "fastscp/storage/layout.py",
          "if top.lower() in RESERVED else path", "if False else path", ("tests/unit/storage/test_layout.py",)),
    Fault("reserved top-level folder names matched case-sensitively", "fastscp/storage/layout.py",
          "if top.lower() in RESERVED else path", "if top in RESERVED else path",
          ("tests/unit/storage/test_layout.py",)),
    Fault("structured reports stored under the storage root", "fastscp/storage/area.py",
          "root = self.sr_root if self.sr_root and sop_class_uid in SR_SOP_CLASSES else None", "root = None",
          ("tests/unit/storage/test_storage_area.py",)),
    Fault("file named by the data set's UID, not the command's", "fastscp/storage/area.py",
          "named = msgspec.structs.replace(header, sop_instance_uid=affected_sop_instance_uid)",
          "named = header", ("tests/unit/storage/test_storage_area.py",)),
    Fault("free-space watermark ignored", "fastscp/storage/area.py",
          "        if free < self.min_free_bytes:\n", "        if False:\n",
          ("tests/unit/storage/test_storage_area.py", "tests/unit/net/test_association.py")),
    Fault("quarantine: false ignored", "fastscp/storage/area.py",
          "if not self._storage.quarantine or self.error is not None:", "if self.error is not None:",
          ("tests/unit/storage/test_storage.py",)),
    Fault("no .reason.txt", "fastscp/storage/area.py",
          '                f.write(reason + "\\n")', "                pass", ("tests/unit/storage/test_storage.py",)),
    # -- access and config -------------------------------------------------------------------
    Fault("IPv4-mapped peer addresses not unmapped", "fastscp/net/access.py",
          "            address = address.ipv4_mapped", "            pass",
          ("tests/e2e/test_access.py::test_ipv4_mapped_peer_addresses_match_ipv4_networks",)),
    Fault("AE-title pattern dropped", "fastscp/config.py",
          ", pattern=_AE_TITLE_PATTERN)]", ")]", ("tests/unit/test_config.py",)),
    Fault("templates not checked at load", "fastscp/config.py",
          "            check_template(config.storage.template)", "            pass", ("tests/unit/test_config.py",)),
)
