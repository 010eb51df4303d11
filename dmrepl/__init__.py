"""dmrepl: block-device replication built from mainline device-mapper targets."""

__version__ = "0.1.0"
