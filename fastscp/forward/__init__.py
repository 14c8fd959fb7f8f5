"""Forwarding and routing: stored instances that match the rules go on to other DICOM nodes.

- :mod:`fastscp.forward.rules`: which instance goes where (no I/O);
- :mod:`fastscp.forward.queue`: the durable queue (a SQLite file beside the index);
- :mod:`fastscp.forward.sender`: C-STORE to one destination, retries and backoff;
- :mod:`fastscp.forward.process`: the forwarder process (:func:`~fastscp.forward.process.forward_main`).
"""
