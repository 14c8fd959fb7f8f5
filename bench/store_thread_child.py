"""The child process of ``bench.store_thread``: one association served in its main thread.

``python -m bench.store_thread_child PORT ROOT SOP_CLASSES [steps]`` listens on 127.0.0.1:PORT, serves
one association into the storage root ROOT, then prints its thread's CPU per store as JSON; with
``steps``, the time per store of each of :data:`STEPS` too. It imports nothing else of ``bench``: it
runs with a snapshot of another commit first on PYTHONPATH, whose ``bench`` may differ.
"""

from __future__ import annotations

import json
import os
import socket
import sys

AE_TITLE = "STORETHREAD"

#: The steps of a C-STORE that ``steps`` times (module, function or Class.method, depth: a step
#: within the one above it at a lower depth). A name that is gone fails the run: keep them current.
STEPS = (
    ("fastscp.net.association", "Association._on_command", 0),
    ("fastscp.net.storescp", "StoreRequest.__init__", 1),
    ("fastscp.storage.area", "Storage.begin", 2),
    ("fastscp.net.association", "Association._completed", 0),
    ("fastscp.net.storescp", "StoreRequest._finish", 1),
    ("fastscp.net.storescp", "StoreRequest._walk_and_scan", 2),
    ("fastscp.storage.area", "Storage.store", 2),
    ("fastscp.storage.area", "IncomingFile.commit", 3),
    ("fastscp.storage.area", "_link_new", 4),
    ("fastscp.net.storescp", "StoreRequest._answer", 1),
    ("fastscp.net.association", "Association.send", 2),
    ("fastscp.net.storescp", "StoreRequest._hand_over", 1),
    ("fastscp.storage.area", "Storage.spare", 1),
)


def _time_steps() -> dict[str, int]:
    """Wrap each of STEPS to add its time (ns, perf_counter: the thread runs through each) to the dict returned."""
    import importlib
    import time

    spent: dict[str, int] = {}
    for module_name, name, _depth in STEPS:
        owner: object = importlib.import_module(module_name)
        *path, attribute = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        inner = getattr(owner, attribute)  # AttributeError: STEPS names a step that is gone
        spent[name] = 0

        def timed(*args: object, _inner: object = inner, _name: str = name, **kwargs: object) -> object:
            start = time.perf_counter_ns()
            try:
                return _inner(*args, **kwargs)  # type: ignore[operator]
            finally:
                spent[_name] += time.perf_counter_ns() - start

        setattr(owner, attribute, timed)
    return spent


def child(port: int, root: str, sop_classes: list[str], steps: bool = False) -> None:
    """In the child process: serve one association in this thread, then print its CPU per store (and
    with ``steps`` the time of each step per store) as JSON."""
    import logging
    import resource

    from fastscp.net.association import Association, ServiceSettings
    from fastscp.net.negotiation import AcceptancePolicy
    from fastscp.process import logs
    from fastscp.storage.area import Storage

    unread, _reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    logs.forward_to(unread)  # as in a worker: the action log's records go out in batches
    logging.getLogger().setLevel("INFO")
    storage = Storage(root, fsync=False, min_free_bytes=1 << 20)
    storage.prepare()
    settings = ServiceSettings(
        policy=AcceptancePolicy(ae_title=AE_TITLE, storage_sop_classes=frozenset(sop_classes),
                                max_pdu_size=262144),
        storage=storage, acse_timeout=30, dimse_timeout=30, max_object_size=1 << 32, max_command_set=65536,
        min_data_rate=0)
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("listening", flush=True)
        listener.settimeout(60)
        conn, (host, peer_port) = listener.accept()
    records: list[object] = []
    spent = _time_steps() if steps else {}
    association = Association(conn, f"{host}:{peer_port}", settings, records.append)
    before = resource.getrusage(resource.RUSAGE_THREAD)
    association.run()
    after = resource.getrusage(resource.RUSAGE_THREAD)
    n = max(1, len(records))
    user, system = (after.ru_utime - before.ru_utime) / n * 1e6, (after.ru_stime - before.ru_stime) / n * 1e6
    import fastscp

    print(json.dumps({"fastscp": os.path.dirname(os.path.dirname(os.path.abspath(fastscp.__file__))),
                      "stores": len(records), "cpu_us": user + system, "user_us": user, "sys_us": system,
                      "voluntary_switches": (after.ru_nvcsw - before.ru_nvcsw) / n,
                      "involuntary_switches": (after.ru_nivcsw - before.ru_nivcsw) / n,
                      "steps": {name: ns / 1000 / n for name, ns in spent.items()}}), flush=True)


if __name__ == "__main__":
    child(int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), steps=sys.argv[4:] == ["steps"])
