"""fastscp's own UIDs and names, as it writes them into File Meta and A-ASSOCIATE."""

from fastscp import __version__

#: fastscp's Implementation Class UID (under pydicom's implementation root
#: 1.2.826.0.1.3680043.8.498, which allows sub-UIDs for applications).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.5.70.83.67.80.1"
IMPLEMENTATION_VERSION_NAME = f"FASTSCP_{__version__}"[:16]
