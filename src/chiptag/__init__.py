"""chiptag: multilabel taggers for satellite image chips (Planet Amazon task)."""

__version__ = "0.1.0"
