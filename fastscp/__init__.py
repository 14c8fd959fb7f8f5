"""fastscp: a high-throughput DICOM Storage SCP."""

__version__ = "0.1.0"
