"""Media export: stored instances as a DICOM media set (DICOMDIR) or a NIfTI volume.

* :mod:`fastscp.media.selection` finds the instances through the index (the
  running server's, else the file read-only).
* :mod:`fastscp.media.dicomdir` writes a PS3.10 File-set with its DICOMDIR
  (the General Purpose CD-R profile's layout) and, optionally, an ISO 9660
  image of it.
* :mod:`fastscp.media.nifti` converts a series with dcm2niix.

Every export copies the stored files (never modifies them) into a temp
folder beside its output and renames at the end: no partial output.
"""

import os


def current_umask() -> int:
    """The process umask (read by setting it and back): exports give their files the modes others get."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
