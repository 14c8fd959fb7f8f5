"""An association's data phase on a real server, through what a peer and a user
see (raw PDUs from tests.rawscu, files on disk, the log): written against the
server's behaviour, not its classes, so they hold while fastscp/net/association.py
is split up. Each one kills a mutant of association.py that the other tests let
live (tests/README.md)."""

from __future__ import annotations

import time
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from fastscp.dicom.part10 import dataset_offset
from tests.rawscu import RawSCU
from tests.test_hostile import dataset

CT, EXPLICIT = str(CTImageStorage), str(ExplicitVRLittleEndian)


def test_a_slow_transfer_above_the_minimum_rate_is_stored(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # dimse_timeout of grace, plus a second per min_data_rate bytes that have arrived: 60 KB at ~15 KB/s
    # (1.5 times the minimum) take ~4 s, past the 2 s timeout, and are allowed 2 + 6 = 8 s.
    (tmp_path / "slow.yaml").write_text("server:\n  dimse_timeout: 2\nlimits:\n  min_data_rate: 10000\n")
    server = start_server(workers=1, config=tmp_path / "slow.yaml")
    data = dataset("1.2.3.5", bytes(60000))
    scu = RawSCU(server.port, CT, EXPLICIT)
    scu.begin_store("1.2.3.5")
    started = time.monotonic()
    for start in range(0, len(data), 6000):
        scu.send_data(data[start:start + 6000], last=start + 6000 >= len(data))
        time.sleep(0.4)
    assert time.monotonic() - started > 3.5
    assert scu.read_status() == 0x0000
    scu.release()
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == data
