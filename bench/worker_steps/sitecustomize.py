"""The steps of each C-STORE timed inside a running server's workers (bench/README.md, "One association's thread").

``bench.store_thread --steps`` times them in a harness without the duplicate check and the records to the
indexer and the post-store stage. With this folder and the repository first on ``PYTHONPATH`` and
``FASTSCP_STEPS_OUT=PREFIX`` set, ``fastscp serve`` wraps the same steps (``store_thread_child.STEPS``, and
:data:`WORKER_STEPS`) before it forks its workers; each worker writes ``PREFIX-<pid>.json`` (stores, and the
microseconds of each step per store, wall time) after every :data:`EVERY` stores. Without the variable it
does nothing.
"""

from __future__ import annotations

import os

#: What a worker runs beside the harness's steps (module, function or Class.method, depth).
WORKER_STEPS = (
    ("fastscp.query.client", "Locator.may_hold", 3),
    ("fastscp.net.storescp", "action_log.info", 2),
    ("fastscp.runtime.worker", "Worker._stored", 2),
)
#: A worker writes its file after every EVERY stores (it may end without running atexit).
EVERY = 500

if os.environ.get("FASTSCP_STEPS_OUT"):
    import json

    import bench.store_thread_child as child
    import fastscp.net.storescp as storescp

    child.STEPS = child.STEPS + WORKER_STEPS
    spent = child._time_steps()
    stored = [0]
    hand_over = storescp.StoreRequest._hand_over

    def _counted(request: storescp.StoreRequest) -> None:
        hand_over(request)
        n = stored[0] = stored[0] + 1
        if n % EVERY == 0:
            with open(f"{os.environ['FASTSCP_STEPS_OUT']}-{os.getpid()}.json", "w") as out:
                json.dump({"stores": n, "steps_us": {name: ns / 1000 / n for name, ns in spent.items()}}, out)

    storescp.StoreRequest._hand_over = _counted  # type: ignore[method-assign]
