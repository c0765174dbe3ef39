"""What every weight reader shares: the one error for bad weight files and a tensor's header.

`CheckpointError` covers released (torch-format) weights and our converted orbax
checkpoints alike: a file or folder that is missing, malformed, inconsistent, or holds
another model or variant than the config asks for. Its message names the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A weight file or checkpoint is missing, malformed, inconsistent or of another model."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape and dtype, read from a file header without loading it."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path
