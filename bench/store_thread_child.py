"""The child process of ``bench.store_thread``: one association served in its main thread.

``python -m bench.store_thread_child PORT ROOT SOP_CLASSES`` listens on 127.0.0.1:PORT, serves one
association into the storage root ROOT, then prints its thread's CPU per store as JSON. It imports
nothing else of ``bench``: it runs with a snapshot of another commit first on PYTHONPATH, whose
``bench`` may differ.
"""

from __future__ import annotations

import json
import os
import socket
import sys

AE_TITLE = "STORETHREAD"


def child(port: int, root: str, sop_classes: list[str]) -> None:
    """In the child process: serve one association in this thread, then print its CPU per store as JSON."""
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
                      "involuntary_switches": (after.ru_nivcsw - before.ru_nivcsw) / n}), flush=True)


if __name__ == "__main__":
    child(int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","))
