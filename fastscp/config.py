"""Configuration: one frozen msgspec Struct tree, decoded from YAML.

Every key has a default, so fastscp runs with no file at all. A config file
and command-line options are merged into one mapping *before* it is decoded,
so a bad value is reported the same way wherever it came from: one line that
names the key and its source (the file, or the command-line option).
``config/fastscp.yaml`` documents every key.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import socket
import typing
from typing import Annotated, Any, Literal

import msgspec
import yaml

from fastscp.dicom.sopclasses import resolve_sop_classes
from fastscp.storage.layout import Accounts, LayoutOptions, PatientFolders, TemplateError, check_template
from fastscp.storage.policy import DuplicatePolicy
from fastscp.storage.reserved import INDEX

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
# PS3.8 9.3.1: an AE title is 1-16 characters of the default repertoire,
# not all spaces, without backslash or control characters.
_AE_TITLE_PATTERN = r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$"
AETitle = Annotated[str, msgspec.Meta(min_length=1, max_length=16, pattern=_AE_TITLE_PATTERN)]
# 0 means "no limit" in A-ASSOCIATE (PS3.8 D.1); otherwise at least one
# PDV header plus a byte, and we cap it so one PDU can't exhaust memory.
MaxPDU = Annotated[int, msgspec.Meta(ge=0, le=64 * 1024 * 1024)]
# Permission bits as octal text ("0640"); a YAML 1.1 octal number (0640
# unquoted) arrives as an int and is turned back into text first.
Mode = Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3}$")]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    port: Port = 11112
    ae_title: AETitle = "FASTSCP"
    max_associations: Positive = 64
    #: Connections still waiting for their A-ASSOCIATE-RQ (no association slot yet).
    max_pending_connections: Positive = 256
    max_pending_per_address: Positive = 32
    max_pdu_size: MaxPDU = 262144
    workers: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    #: 0: a worker runs any number of associations, one thread each; N: at most
    #: N per worker process, the pool growing past ``workers`` as needed.
    associations_per_worker: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    acse_timeout: Seconds = 30.0
    dimse_timeout: Seconds = 120.0
    shutdown_timeout: Seconds = 30.0
    #: This node's name in a shared index (database.catalog); "" means the host name.
    node: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")] = ""
    #: CPU and I/O priority of derived work (indexer, post-store stage, forwarder): fastscp.process.priority.
    derived_priority: Literal["idle", "low", "normal"] = "idle"
    #: Where the other nodes of a shared index reach our port (C-GET of our files); "": host, else the host name.
    advertise_host: Annotated[str, msgspec.Meta(max_length=253, pattern=r"^[A-Za-z0-9_.:-]*$")] = ""


class LimitsConfig(_Section):
    """What one association may cost (a hostile peer included)."""

    #: Largest data set accepted, bytes (a deflated one: inflated too); more aborts the association.
    max_object_size: Annotated[int, msgspec.Meta(ge=1024)] = 4 * 1024**3
    #: Largest command set, bytes; fragments beyond it abort the association.
    max_command_set: Annotated[int, msgspec.Meta(ge=256, le=16 * 1024 * 1024)] = 65536
    #: Bytes per second a message must average after server.dimse_timeout; 0: off.
    min_data_rate: Annotated[int, msgspec.Meta(ge=0)] = 16384


class PatientFoldersConfig(_Section):
    top: Literal["patient_id", "patient_name"] = "patient_id"
    study_level: bool = True
    series_level: bool = True


class AccountsConfig(_Section):
    physicians: dict[str, list[str]] = msgspec.field(default_factory=dict)
    guest: str = "Guest"
    unknown: str = "Unknown"


class StorageConfig(_Section):
    directory: str = "./received"
    naming: Literal["hierarchical", "flat", "date-based", "template", "patient-folders", "accounts"] = "hierarchical"
    template: str = (
        "{PatientName|PatientID|UNKNOWN}/{StudyDate}_{StudyID|StudyInstanceUID}/{SeriesNumber:03}_{Modality}"
        "/{SOPInstanceUID}.dcm"
    )
    patient_folders: PatientFoldersConfig = PatientFoldersConfig()
    accounts: AccountsConfig = AccountsConfig()
    sr_directory: str = ""
    duplicates: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    fsync: Literal["always", "never"] = "always"
    quarantine: bool = True
    #: Below this much free space, new stores get 0xA700 "Out of resources".
    min_free_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024 * 1024 * 1024
    #: Permissions of the files and folders fastscp creates (octal).
    file_mode: Mode = "0640"
    dir_mode: Mode = "0750"
    #: A shared index: directory is on storage every node mounts at this same path (they read our files there).
    shared: bool = False


class AllowedAE(_Section):
    """A calling AE title allowed to connect, optionally only from some hosts."""

    ae_title: AETitle
    #: Host names, IP addresses or networks (CIDR); empty: from anywhere.
    hosts: list[str] = msgspec.field(default_factory=list)


class AccessConfig(_Section):
    #: Empty: every calling AE title is allowed.
    allowed_calling_aets: list[AETitle | AllowedAE] = msgspec.field(default_factory=list)
    check_called_aet: bool = False
    #: Concurrent associations per calling AE title; 0: no limit.
    max_associations_per_aet: Annotated[int, msgspec.Meta(ge=0)] = 0


class TLSConfig(_Section):
    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    #: CA certificates that client certificates are checked against.
    ca_bundle: str = ""
    require_client_certificate: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"


class MoveDestination(_Section):
    """Where C-MOVE sends to, for one Move Destination AE title."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    #: Connect with TLS (checked against tls.ca_bundle; tls.certificate is our client certificate).
    tls: bool = False


class RetrieveConfig(_Section):
    """C-MOVE and C-GET (Query/Retrieve SCP)."""

    #: Move Destination AE title -> where it listens; C-MOVE to any other is refused (0xA801).
    #: Also where a storage commitment report goes when its requester released the association.
    move_destinations: dict[AETitle, MoveDestination] = msgspec.field(default_factory=dict)
    #: Most instances one C-MOVE or C-GET may select (more: 0xA701); bounds a request's memory.
    max_instances: Positive = 100000
    #: A shared index: seconds to connect to the node that has a file, and for each of its answers.
    node_timeout: Seconds = 30.0


class MonitorConfig(_Section):
    enabled: bool = True
    #: HOST:PORT of the status page, /metrics and /healthz; [::1]:PORT for IPv6.
    listen: str = "127.0.0.1:8080"
    #: The study browser (/studies, /patients): patient data, so beyond loopback only with credentials.
    browser: bool = True
    #: HTTP basic authentication of the study browser (both or neither).
    username: str = ""
    password: str = ""
    #: A bearer token for the study browser (``Authorization: Bearer TOKEN``), for scripts.
    token: str = ""


class ThumbnailsConfig(_Section):
    enabled: bool = True
    size: Annotated[int, msgspec.Meta(ge=16, le=1024)] = 128
    quality: Annotated[int, msgspec.Meta(ge=1, le=95)] = 90


class ScansheetConfig(_Section):
    enabled: bool = True
    study_timeout: Seconds = 60.0
    thumbnails_per_series: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8


class DatabaseConfig(_Section):
    path: str = ""
    wal_mode: bool = True
    batch_size: Positive = 1000
    batch_interval: Seconds = 0.2
    #: A shared index: "postgres:" and the libpq connection string of the DuckLake catalog; "" is the file.
    catalog: str = ""
    #: The shared index's Parquet folder, the same path on every node (with catalog).
    data_path: str = ""
    #: Seconds between a node's runs of the shared index's maintenance (one node at a time); 0: never.
    maintenance_interval: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    #: With catalog: seconds a node holds a study's job without renewing it; then another node takes it over.
    job_lease: Annotated[float, msgspec.Meta(ge=3)] = 60.0


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["plain", "json"] = "plain"
    #: Also write the log to this file, rotated at max_bytes; "" for stderr only.
    file: str = ""
    max_bytes: Positive = 50 * 1024 * 1024
    backups: Annotated[int, msgspec.Meta(ge=0)] = 10
    #: One action log line per stored object (path, size, outcome).
    actions: bool = True


class DestinationTLSConfig(_Section):
    """DICOM TLS towards one forwarding destination (we are the client)."""

    enabled: bool = False
    #: CA certificates the destination's certificate is checked against; "": the system's.
    ca_bundle: str = ""
    #: Our certificate and key (PEM), for a destination that requires client certificates.
    certificate: str = ""
    private_key: str = ""
    min_version: Literal["1.2", "1.3"] = "1.2"


#: The transfer syntaxes a stored file may be converted to when a destination refuses its own
#: (only between these uncompressed ones: nothing is decompressed).
CONVERTIBLE_TRANSFER_SYNTAXES: dict[str, str] = {
    "ExplicitVRLittleEndian": "1.2.840.10008.1.2.1",
    "ImplicitVRLittleEndian": "1.2.840.10008.1.2",
}


class DestinationConfig(_Section):
    """A DICOM node that forwarded instances are sent to with C-STORE."""

    ae_title: AETitle
    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    #: Associations open to it at once.
    max_associations: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    #: Offered after the file's own transfer syntax, for a file in an uncompressed one: what it is
    #: converted to when the destination refuses its own (keywords of CONVERTIBLE_TRANSFER_SYNTAXES or
    #: their UIDs); []: never converted.
    transfer_syntaxes: list[str] = msgspec.field(
        default_factory=lambda: ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"])
    tls: DestinationTLSConfig = DestinationTLSConfig()
    #: Seconds to wait for the connection, the association and each C-STORE response.
    timeout: Seconds = 60.0

    @property
    def fallback_syntaxes(self) -> tuple[str, ...]:
        return tuple(CONVERTIBLE_TRANSFER_SYNTAXES.get(ts, ts) for ts in self.transfer_syntaxes)


class ForwardRuleConfig(_Section):
    """Which stored instances go where: every condition given must match (an empty one matches all)."""

    #: Destinations (names under forwarding.destinations) a matching instance is queued for.
    destinations: list[str]
    #: Calling AE titles of the sender (any of them).
    calling_ae_titles: list[str] = msgspec.field(default_factory=list)
    #: Modality (0008,0060) values (any of them).
    modalities: list[str] = msgspec.field(default_factory=list)
    #: SOP classes, as accepted_sop_classes takes them (modalities, names, short names, UIDs).
    sop_classes: list[str] = msgspec.field(default_factory=list)
    #: Any indexed header field by DICOM keyword (or fastscp's own keys, as `fastscp query` takes them) ->
    #: the value to match, with the C-FIND rules: * and ? wildcards, a backslash between alternatives.
    fields: dict[str, str] = msgspec.field(default_factory=dict)


class ForwardingConfig(_Section):
    #: The durable queue (SQLite); "": FORWARD.sqlite beside the index (index.duckdb -> index.forward.sqlite).
    queue: str = ""
    #: Our AE title as the sender; "": server.ae_title.
    ae_title: str = ""
    #: Instances sent on one association at most.
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100
    #: Seconds before the first retry; doubled after each failure up to retry_max.
    retry_initial: Seconds = 2.0
    retry_max: Seconds = 300.0
    destinations: dict[str, DestinationConfig] = msgspec.field(default_factory=dict)
    rules: list[ForwardRuleConfig] = msgspec.field(default_factory=list)
HookEvent = Literal["instance-stored", "association-ended", "study-complete"]


class HookMatch(_Section):
    """Which events a hook takes; an empty list matches everything."""

    #: Entries as in accepted_sop_classes (modalities, names, keywords, UIDs).
    sop_classes: list[str] = msgspec.field(default_factory=list)
    #: Modality (0008,0060) values, e.g. [CT, MR].
    modalities: list[str] = msgspec.field(default_factory=list)
    calling_aets: list[str] = msgspec.field(default_factory=list)


class HookConfig(_Section):
    """One post-receive hook: a program, or a built-in action, run after an event (fastscp.hooks)."""

    #: Names the hook in logs, the status page and /metrics.
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    event: HookEvent
    #: The program and its arguments (argv, never a shell command line).
    program: list[str] = msgspec.field(default_factory=list)
    #: A built-in action instead of a program (jpeg, copy: instance-stored; nifti: study-complete).
    action: Literal["", "jpeg", "copy", "nifti"] = ""
    #: jpeg and copy: the folder they write to, mirroring the storage layout; nifti: its volumes'
    #: folder ("": <storage.directory>/nifti).
    directory: str = ""
    #: jpeg: JPEG quality.
    quality: Annotated[int, msgspec.Meta(ge=1, le=95)] = 90
    match: HookMatch = HookMatch()
    #: A program's wall-clock limit; nifti: the converter's, per series.
    timeout: Seconds = 60.0
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    #: Runs after a failed one (0: none); the n-th waits retry_backoff * 2**(n-1) seconds.
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    retry_backoff: Seconds = 5.0


class Config(_Section):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    limits: LimitsConfig = LimitsConfig()
    database: DatabaseConfig = DatabaseConfig()
    thumbnails: ThumbnailsConfig = ThumbnailsConfig()
    scansheet: ScansheetConfig = ScansheetConfig()
    access: AccessConfig = AccessConfig()
    tls: TLSConfig = TLSConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    monitor: MonitorConfig = MonitorConfig()
    logging: LoggingConfig = LoggingConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    accepted_sop_classes: list[str] = msgspec.field(default_factory=lambda: ["all"])
    hooks: list[HookConfig] = msgspec.field(default_factory=list)

    @property
    def worker_count(self) -> int:
        """``server.workers``, with 0 meaning one per CPU."""
        return self.server.workers or os.cpu_count() or 1

    @property
    def index_path(self) -> str:
        """``database.path``; empty means ``index.duckdb`` inside the storage folder."""
        return self.database.path or os.path.join(self.storage.directory, INDEX)

    @property
    def lake(self) -> tuple[str, str, str] | None:
        """(libpq catalog string, data path, node name) of a shared index; None for the index file."""
        catalog = self.database.catalog
        if not catalog:
            return None
        return catalog.removeprefix("postgres:"), self.database.data_path, self.server.node or socket.gethostname()

    @property
    def sop_class_uids(self) -> tuple[str, ...]:
        return resolve_sop_classes(self.accepted_sop_classes)

    @property
    def forward_queue_path(self) -> str:
        """``forwarding.queue``; empty means beside the index, ``<index>.forward.sqlite``."""
        return self.forwarding.queue or os.path.splitext(self.index_path)[0] + ".forward.sqlite"


#: Keys a running server takes from its config file on SIGHUP (a section name: all its keys).
#: Each is read when an association starts (the limits: when a connection
#: is accepted or admitted; shutdown_timeout: when a stop begins), so it
#: applies to new associations while open ones finish with the values they
#: started with. Every other key needs a restart: it shapes something made
#: once at start, which would have to be torn down under open associations:
#: the listening socket (server.host/port), the AE title (the C-FIND service
#: and the status page carry it too), the worker pool, the storage folders
#: and layout (files already named by it), the index and its processes,
#: thumbnails and scan sheets (their process), TLS (its context), the
#: monitor and the log output (handlers). Forwarding rules and destinations
#: are read by the forwarder process when it gets the reload (queued
#: instances keep their destination name); turning forwarding on or off
#: (the first destination, the queue file) needs a restart.
#: monitor and the log output (handlers). Hooks go to the post-store process,
#: which runs them from then on (runs already started finish as they were).
LIVE_KEYS: frozenset[str] = frozenset({
    "access",  # allowed_calling_aets, check_called_aet, max_associations_per_aet
    "accepted_sop_classes",
    "server.max_associations",
    "server.max_pending_connections",
    "server.max_pending_per_address",
    "server.max_pdu_size",
    "server.acse_timeout",
    "server.dimse_timeout",
    "server.shutdown_timeout",
    "storage.duplicates",
    "storage.min_free_bytes",
    "limits",
    "logging.level",
    "logging.actions",
    "forwarding.rules",
    "forwarding.destinations",
    "forwarding.batch_size",
    "forwarding.retry_initial",
    "forwarding.retry_max",
    "hooks",
})


def _is_live(key: str) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:n]) in LIVE_KEYS for n in range(1, len(parts) + 1))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for name in sorted(old.keys() | new.keys()):
            found += _differences(old.get(name), new.get(name), f"{prefix}.{name}" if prefix else name)
        return found
    return [] if old == new else [prefix]


def config_changes(running: Config, new: Config) -> tuple[list[str], list[str]]:
    """The dotted keys whose values differ: (those in :data:`LIVE_KEYS`, those that need a restart)."""
    changed = _differences(to_builtins(running), to_builtins(new))
    return [k for k in changed if _is_live(k)], [k for k in changed if not _is_live(k)]


def with_live_keys(running: Config, new: Config) -> Config:
    """``running`` with the values of :data:`LIVE_KEYS` taken from ``new``: the config a reload puts in force."""
    result = running
    for key in sorted(LIVE_KEYS):
        section, _, name = key.partition(".")
        if name:
            value = msgspec.structs.replace(getattr(result, section), **{name: getattr(getattr(new, section), name)})
        else:
            value = getattr(new, section)
        result = msgspec.structs.replace(result, **{section: value})
    return result


class ConfigError(Exception):
    """A config file or option that can't be used; the message says which and why."""


#: Dotted config key -> (the ``fastscp serve`` option that overrides it, its help).
CLI_OPTIONS: dict[str, tuple[str, str]] = {
    "server.port": ("PORT", "TCP port (default 11112)"),
    "server.ae_title": ("AE_TITLE", "our AE title (default FASTSCP)"),
    "server.host": ("--host", "address to listen on (default 0.0.0.0)"),
    "storage.directory": ("--storage-dir", "folder received files are stored in (default ./received)"),
    "database.path": ("--index-db", "DuckDB index file (default STORAGE_DIR/index.duckdb)"),
    "accepted_sop_classes": (
        "--accept",
        "comma-separated modalities (CT,MR,US...), SOP class names or UIDs (default all)",
    ),
    "server.workers": ("--workers", "worker processes (default: one per CPU)"),
    "server.associations_per_worker": (
        "--associations-per-worker",
        "associations one worker process runs at once; 1: a process per association (default 0: no limit)",
    ),
    "server.max_associations": ("--max-associations", "open associations across all workers (default 64)"),
    "server.max_pdu_size": ("--max-pdu-size", "Maximum Length Received we announce, bytes (default 262144)"),
    "storage.fsync": ("--fsync", "always (default) or never"),
    "storage.naming": (
        "--naming",
        "storage layout: hierarchical (default), flat, date-based, template, patient-folders or accounts",
    ),
    "storage.duplicates": (
        "--duplicates",
        "the same SOP instance again with other content: keep-first (default), reject, overwrite or keep-both",
    ),
    "logging.level": ("--log-level", "DEBUG, INFO (default), WARNING or ERROR"),
    "logging.file": ("--log-file", "also log to this file, rotated (logging.max_bytes, logging.backups)"),
    "monitor.listen": ("--monitor", "HOST:PORT of the status page and /metrics (default 127.0.0.1:8080), or off"),
}


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, last = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def _key_of(msgspec_path: str) -> str:
    """``$.server.port`` -> ``server.port``; ``$.accepted_sop_classes[2]`` kept as is."""
    return msgspec_path.removeprefix("$.").removeprefix("$")


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Decode the config from an optional YAML file plus command-line overrides.

    Parameters
    ----------
    path : str, optional
        A YAML file; keys it omits keep their defaults.
    overrides : dict, optional
        Dotted keys (``server.port``) from the command line; ``None`` values
        are ignored. They win over the file.

    Raises
    ------
    ConfigError
        One line naming the key, its source and what is wrong with it.
    """
    raw = _read_yaml(path) if path else {}
    source = path or "built-in defaults"
    from_cli: set[str] = set()
    overrides = dict(overrides or {})
    if overrides.get("monitor.listen") == "off":
        overrides["monitor.listen"] = None
        overrides["monitor.enabled"] = False
    for key, value in overrides.items():
        if value is not None:
            _set_dotted(raw, key, value)
            from_cli.add(key)
    storage = raw.get("storage")
    if isinstance(storage, dict):
        for key in ("file_mode", "dir_mode"):
            value = storage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
                storage[key] = f"0{value:03o}"  # YAML read 0640 as an octal number
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r" - at `([^`]*)`$", message)
        key = _key_of(match.group(1)) if match else ""
        detail = message[: match.start()] if match else message
        unknown = re.match(r"Object contains unknown field `([^`]*)`", detail)
        if unknown:
            full = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            raise ConfigError(
                f"{source}: unknown key '{full}': check its spelling against config/fastscp.yaml"
            ) from None
        base = re.sub(r"\[\d+\]$", "", key)
        where = f"command-line option {CLI_OPTIONS[base][0]}" if base in from_cli else source
        value = _lookup(raw, key)
        choices = _choices(key)
        hint = f"; use one of {', '.join(map(repr, choices))}" if choices else ""
        if key.endswith("_mode"):
            hint = "; write the permission bits in octal, quoted, like '0640'"
        raise ConfigError(f"{where}: {key}: {detail} (got {value!r}){hint}") from None
    for key, needed in (("file_mode", 0o600), ("dir_mode", 0o700)):
        if int(getattr(config.storage, key), 8) & needed != needed:
            raise ConfigError(
                f"{source}: storage.{key}: {getattr(config.storage, key)!r} leaves the owner (fastscp) without "
                f"read and write{' and search' if key == 'dir_mode' else ''} permission; use at least '0{needed:o}'"
            )
    try:
        resolve_sop_classes(config.accepted_sop_classes)
    except ValueError as exc:
        where = "command-line option --accept" if "accepted_sop_classes" in from_cli else source
        raise ConfigError(f"{where}: accepted_sop_classes: {exc}") from None
    _check_forwarding(config.forwarding, source)
    _check_monitor_credentials(config.monitor, source)
    database = config.database
    if database.catalog and not (database.catalog.startswith("postgres:") and database.data_path):
        raise ConfigError(f"{source}: database.catalog: a shared index needs 'postgres:' and the catalog's libpq "
                          "connection string (postgres:dbname=fastscp host=db1), and database.data_path: the "
                          "folder of its Parquet files, the same on every node")
    if database.data_path and not database.catalog:
        raise ConfigError(f"{source}: database.data_path: set database.catalog too (or remove data_path)")
    if config.storage.naming == "template":
        try:
            check_template(config.storage.template)
        except TemplateError as exc:
            raise ConfigError(f"{source}: storage.template: {exc}") from None
    for n, hook in enumerate(config.hooks):
        problem = _hook_problem(config, hook, config.hooks[:n])
        if problem:
            key, detail = problem
            raise ConfigError(f"{source}: hooks[{n}].{key}: {detail}")
    return config


def _check_forwarding(forwarding: ForwardingConfig, source: str) -> None:
    """What msgspec can't check in ``forwarding``: names that must refer to something."""
    for name, destination in forwarding.destinations.items():
        for n, syntax in enumerate(destination.transfer_syntaxes):
            if syntax not in CONVERTIBLE_TRANSFER_SYNTAXES and syntax not in CONVERTIBLE_TRANSFER_SYNTAXES.values():
                raise ConfigError(
                    f"{source}: forwarding.destinations.{name}.transfer_syntaxes[{n}]: {syntax!r} is not one a "
                    f"file can be converted to; use {', '.join(CONVERTIBLE_TRANSFER_SYNTAXES)} (or their UIDs)")
        tls = destination.tls
        if bool(tls.certificate) != bool(tls.private_key):
            raise ConfigError(f"{source}: forwarding.destinations.{name}.tls: certificate and private_key go "
                              f"together (PEM files)")
    ae_title = forwarding.ae_title
    if ae_title and not (len(ae_title) <= 16 and re.match(_AE_TITLE_PATTERN, ae_title)):
        raise ConfigError(f"{source}: forwarding.ae_title: {ae_title!r} is not an AE title (1 to 16 "
                          f"characters, no backslash or control characters); or leave it empty for server.ae_title")
    if forwarding.retry_max < forwarding.retry_initial:
        raise ConfigError(f"{source}: forwarding.retry_max: {forwarding.retry_max} is below forwarding.retry_initial "
                          f"({forwarding.retry_initial}); make it at least as long")
    for n, rule in enumerate(forwarding.rules):
        key = f"forwarding.rules[{n}]"
        if not rule.destinations:
            raise ConfigError(f"{source}: {key}.destinations: empty; name at least one of forwarding.destinations")
        for d, name in enumerate(rule.destinations):
            if name not in forwarding.destinations:
                known = ", ".join(sorted(forwarding.destinations)) or "none is defined"
                raise ConfigError(f"{source}: {key}.destinations[{d}]: no destination {name!r} under "
                                  f"forwarding.destinations ({known})")
        try:
            if rule.sop_classes:
                resolve_sop_classes(rule.sop_classes)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}.sop_classes: {exc}") from None
#: A bearer token shorter than this is refused: it must not be guessable.
MIN_TOKEN_LENGTH = 16


def _check_monitor_credentials(monitor: MonitorConfig, source: str) -> None:
    """Credentials that HTTP can carry: both halves of basic auth, tokens long enough, no separators."""
    if bool(monitor.username) != bool(monitor.password):
        given, missing = ("username", "password") if monitor.username else ("password", "username")
        raise ConfigError(f"{source}: monitor.{missing}: empty, but monitor.{given} is set; basic authentication "
                          f"needs both (or neither)")
    if ":" in monitor.username or not monitor.username.isprintable():
        raise ConfigError(f"{source}: monitor.username: no ':' or control characters (basic authentication "
                          f"separates the name from the password with ':')")
    if not monitor.password.isprintable():
        raise ConfigError(f"{source}: monitor.password: no control characters")
    token = monitor.token
    if token and (len(token) < MIN_TOKEN_LENGTH or not re.fullmatch(r"[!-~]+", token)):
        raise ConfigError(f"{source}: monitor.token: use at least {MIN_TOKEN_LENGTH} printable ASCII characters "
                          f"without spaces (for example the output of 'openssl rand -hex 24')")


def _hook_problem(config: Config, hook: HookConfig, before: list[HookConfig]) -> tuple[str, str] | None:
    """(the key below ``hooks[n]``, what is wrong) for a hook that can't run, else None."""
    if any(other.name == hook.name for other in before):
        return "name", f"{hook.name!r} names an earlier hook too; give each hook its own name"
    if bool(hook.program) == bool(hook.action):
        return "program", ("give a hook either a program (an argv list) or a built-in action (jpeg, copy, nifti), "
                           "not both")
    if hook.program:
        program = hook.program[0]
        found = program if "/" in program else shutil.which(program)
        if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
            return "program", (f"{program!r} is not an executable file{'' if '/' in program else ' on PATH'}; "
                               "give its absolute path")
    else:
        event = "study-complete" if hook.action == "nifti" else "instance-stored"
        if hook.event != event:
            return "event", f"the {hook.action} action runs on {event} only (got {hook.event!r})"
        if not hook.directory and hook.action != "nifti":
            return "directory", f"the {hook.action} action needs the folder it writes to"
        if hook.directory and hook.action in ("copy", "nifti"):
            target = os.path.realpath(hook.directory)
            root = os.path.realpath(config.storage.directory)
            if os.path.commonpath([target, root]) in (target, root):
                outside = ("copy to a folder outside it" if hook.action == "copy" else
                           "leave directory empty for its reserved folder there (nifti/), or give one outside it")
                return "directory", (f"{hook.directory!r} overlaps storage.directory {config.storage.directory!r}; "
                                     f"{outside}")
    try:
        if hook.match.sop_classes:
            resolve_sop_classes(hook.match.sop_classes)
    except ValueError as exc:
        return "match.sop_classes", str(exc)
    return None


def layout_options(config: Config) -> LayoutOptions:
    """The layout part of the config, as :mod:`fastscp.storage.layout` takes it."""
    storage = config.storage
    return LayoutOptions(
        naming=storage.naming,
        template=storage.template,
        patient_folders=PatientFolders(**msgspec.structs.asdict(storage.patient_folders)),
        accounts=Accounts(
            physicians={k: tuple(v) for k, v in storage.accounts.physicians.items()},
            guest=storage.accounts.guest,
            unknown=storage.accounts.unknown,
        ),
    )


def _choices(key: str) -> tuple[object, ...]:
    """The allowed values of a Literal- or enum-typed key, else ()."""
    node: Any = Config
    for part in key.split("."):
        name = re.sub(r"\[\d+\]$", "", part)  # hooks[2] -> hooks, an item of its list
        hints = typing.get_type_hints(node) if isinstance(node, type) else {}
        if name not in hints:
            return ()
        node = hints[name]
        if name != part and typing.get_origin(node) is list:
            node = typing.get_args(node)[0]
    if isinstance(node, type) and issubclass(node, enum.Enum):
        return tuple(member.value for member in node)
    return typing.get_args(node) if typing.get_origin(node) is Literal else ()


def _lookup(tree: Any, key: str) -> Any:
    node = tree
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def to_builtins(config: Config) -> dict[str, Any]:
    """The config as plain data (for logs, the status page, ``fastscp config``)."""
    return msgspec.to_builtins(config)
