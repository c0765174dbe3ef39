"""Where weights are read from: a local path, or a `gs://bucket/...` URL on Cloud Storage.

A TPU pod keeps its converted checkpoints in a bucket, and every host reads the same URL:
the JSON that says what a checkpoint is and the tokenizer's file through `etils.epath`
(whose gs:// backend is gcsfs), the arrays through orbax, whose tensorstore reads the
bucket itself. `pathlib.Path` cannot stand for a URL: it folds `gs://b/x` into `gs:/b/x`.

Local paths stay `pathlib.Path`: released safetensors are memory-mapped and conversions
finish with a rename, and neither exists for an object in a bucket. So a bucket holds
converted checkpoints (convert_torch_weights.py, then copy the folder up), not released
weights; `local` says so before anything is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from magi_jax.tensor_file import CheckpointError

URL_SCHEMES = ("gs://",)


def is_url(path) -> bool:
    return path is not None and os.fspath(path).startswith(URL_SCHEMES)


def location(path):
    """`path` as something to read from: a `pathlib.Path`, or an `epath.Path` for a URL."""
    if not is_url(path):
        return Path(path)
    try:
        import gcsfs  # noqa: F401  (epath's backend for gs://; imported here to say so when it is missing)
    except ImportError:
        raise CheckpointError(
            f"{os.fspath(path)}: reading gs:// paths needs gcsfs; pip install gcsfs (or magi-jax[gcs])"
        ) from None
    from etils import epath

    return epath.Path(os.fspath(path))


def local(path, model: str) -> Path:
    """`path` (released `model` weights: DiT, VAE or T5) when it is on this machine; a
    CheckpointError with the fix when it is a URL."""
    if is_url(path):
        raise CheckpointError(
            f"{os.fspath(path)}: released {model} weights are read from local files (memory-mapped); from a "
            f"bucket only converted checkpoints are read. Convert them with convert_torch_weights.py --out <local "
            f"folder>, copy that folder to the bucket (gcloud storage cp -r), and point at the copy"
        )
    return Path(path)
