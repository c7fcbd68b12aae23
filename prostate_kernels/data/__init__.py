"""Data: SimpleITK volume I/O, dataset discovery, z-score + balanced patch sampling, phantoms.

Nothing here knows a network. SimpleITK is imported only when a file is read or written.
"""

from prostate_kernels.data.cases import Case, discover_cases
from prostate_kernels.data.errors import ConfigError, DataError, TrainingStopped
from prostate_kernels.data.io import (
    Volume,
    check_binary,
    check_image,
    check_same_grid,
    read_channels,
    read_mask,
    read_volume,
    write_volume,
)

__all__ = [
    "Case",
    "ConfigError",
    "DataError",
    "TrainingStopped",
    "Volume",
    "check_binary",
    "check_image",
    "check_same_grid",
    "discover_cases",
    "read_channels",
    "read_mask",
    "read_volume",
    "write_volume",
]
