"""One pattern for every model's weights (DiT, VAE, T5): abstract -> arrays -> build.

  abstract_model(make)        the module's structure with shapes and dtypes only (nothing is
                              allocated): what converters check against, what shardings
                              are computed from, what orbax restores into;
  expected_leaves(abstract)   {parameter path: ShapeDtypeStruct-like} of that structure;
  convert_torch(src, rules, abstract)
                              released torch-format weights -> {path: numpy array}, strict
                              (convert.py's key table engine);
  build_model(abstract, arrays, shardings)
                              the module with those arrays as parameters; with shardings,
                              each host array goes straight into its shards.
Each model's loader (dit_weights.py, vae_weights.py, t5.py) is these four plus its key table
and, for converted checkpoints, checkpoint.restore(path, expected_leaves(...), ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.convert import Rule, convert
from magi_jax.torch_weights import open_torch_weights

M = TypeVar("M", bound=nnx.Module)


def abstract_model(make: Callable[[], M]) -> M:
    """`make()` (a module built without rngs) traced for shapes only."""
    return nnx.eval_shape(make)


def expected_leaves(abstract: nnx.Module) -> dict:
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(abstract))}


def convert_torch(src, rules: list[Rule], abstract: nnx.Module, **options) -> dict[tuple, np.ndarray]:
    """Reads torch-format weights (file or folder) into {our path: numpy array}; `options`
    go to convert.convert (ignore, progress)."""
    weights = open_torch_weights(src)
    try:
        return convert(weights, rules, expected_leaves(abstract), source=str(src), **options)
    finally:
        weights.close()


def build_model(abstract: M, arrays: dict, shardings: dict | None = None) -> M:
    """`abstract` with `arrays` ({path: array}) as its parameters; `shardings` ({path:
    Sharding}) places each array directly into its shards."""
    graphdef, state = nnx.split(abstract)
    put = (lambda p, a: jax.device_put(a, shardings[p])) if shardings else (lambda p, a: jnp.asarray(a))
    filled = [(path, var.replace(value=put(path, arrays[path]))) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
