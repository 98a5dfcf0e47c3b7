"""Data: reading source images, the prepared dataset format and its reader."""

from reglue.data.dataset import PreparedDataset

__all__ = ["PreparedDataset"]
