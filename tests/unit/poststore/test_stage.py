"""The post-store stage's own state: what it reports of the records kept in files for it."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastscp.config import ScansheetConfig, ThumbnailsConfig
from fastscp.index.client import IndexerClient
from fastscp.poststore.client import kept_folder
from fastscp.poststore.stage import PostStore
from fastscp.process.kept import write_kept
from fastscp.storage.files import PATIENT_DATA
from fastscp.storage.layout import LayoutOptions


def test_the_lag_counts_the_files_kept_for_the_stage(tmp_path: Path) -> None:
    """The status page's post-store lag (status.PostStoreState.kept_files): kept files, not the ones being written."""
    root = str(tmp_path)
    stage = PostStore(root, LayoutOptions(), ThumbnailsConfig(), ScansheetConfig(),
                      f"\0fastscp-test-stage-{uuid.uuid4().hex}", IndexerClient(f"\0fastscp-test-{uuid.uuid4().hex}"),
                      PATIENT_DATA)
    try:
        assert stage.state().kept_files == 0  # no folder yet
        write_kept(kept_folder(root), [b"one"])
        write_kept(kept_folder(root), [b"two", b"three"])
        (Path(kept_folder(root)) / ".tmp-1-2-3.records").write_bytes(b"being written")
        assert stage.state().kept_files == 2
    finally:
        stage.listener.close()
