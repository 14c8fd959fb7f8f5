"""fastscp from a git commit, built beside the working tree (``--fastscp-ref``).

Benchmark a committed state while the working tree is being edited, or two
commits against each other: ``git archive REF`` is unpacked into a cache
folder, its Cython extensions are built in place with the venv's Python,
and fastscp receivers then run with that folder first on PYTHONPATH (the
editable install's finder comes after the path entries, so it loses).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build(ref: str, log=print) -> Path:  # type: ignore[no-untyped-def]
    """Unpack and build ``ref``; returns the folder to put on PYTHONPATH."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"fastscp-bench-src-{sha[:12]}"
    done = dest / ".built"
    if done.exists():
        return dest
    log(f"building fastscp {ref} ({sha[:12]}) in {dest} ...")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha],
                             capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    # Extensions lived in cext/ before the subpackages, beside their twins since.
    if (dest / "setup.py").exists() and (list((dest / "cext").glob("*.pyx")) or list(dest.glob("fastscp/**/*.pyx"))):
        # Only the extensions are needed; without pyproject.toml setuptools
        # does not validate metadata the venv's (older) setuptools may reject.
        (dest / "pyproject.toml").unlink(missing_ok=True)
        build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                               capture_output=True, text=True)
        if build.returncode:
            raise RuntimeError(f"building the extensions of {ref} failed:\n{build.stdout}\n{build.stderr}")
    done.write_text(sha + "\n")
    return dest
