"""Strict conversion of upstream PyTorch state dicts into our parameter trees.

A model's conversion is an explicit table: one `Rule` per upstream key (or key template
over layer indices), naming the leaf of our parameter tree it fills and the `Transform`
that turns the torch layout into ours. The engine

  1. checks the table against our abstract parameter tree (every leaf filled exactly once),
  2. checks the checkpoint header against the table before reading any data: a missing,
     unexpected or duplicate key, or a shape that is not what our config implies, is an
     error naming the key, its shape and the expected shape (all problems in one message),
  3. streams tensors shard by shard into preallocated arrays (layers are stacked on a
     leading axis for `lax.scan`), so the host holds one copy of the model at most.

Model-specific tables live next to their models (`dit_table` here, the VAE's and T5's in
their modules); this file holds only the machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from magi_jax.safetensors_io import FLOAT_DTYPES
from magi_jax.torch_weights import TorchWeights

Path = tuple  # a path into a parameter tree, as nnx.State flattens it: ('blocks', 'q', 'kernel')


class ConversionError(ValueError):
    """The checkpoint does not match the model the config describes."""


@dataclass(frozen=True)
class Transform:
    """torch array -> our array, with the inverse shape map used to validate headers first."""

    name: str
    apply: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple], tuple]


IDENTITY = Transform("identity", lambda a: a, lambda s: tuple(s))
# nn.Linear stores (out, in); we multiply x @ kernel with kernel (in, out).
LINEAR = Transform("linear", lambda a: a.T, lambda s: (s[1], s[0]))


def permuted_linear(perm: np.ndarray) -> Transform:
    """A Linear whose input features arrive in `perm` order upstream: ours[j] = torch[perm[j]].

    Reordering the kernel rows once here spares a transpose of activations on every call.
    """
    return Transform("linear[in-perm]", lambda a: a.T[perm], lambda s: (s[1], s[0]))


@dataclass(frozen=True)
class Rule:
    """`torch_key` (with `{i}` for layer templates) fills leaf `path` of our tree.

    With `layers`, the template is expanded for each upstream layer index i in order and the
    arrays are stacked on a new leading axis (our scanned layer axis).
    """

    torch_key: str
    path: Path
    transform: Transform = IDENTITY
    layers: Sequence[int] | None = None
    exact_dtype: bool = False  # the file must already hold our dtype (fp8 weights and scales)

    def keys(self) -> list[tuple[str, int | None]]:
        if self.layers is None:
            return [(self.torch_key, None)]
        return [(self.torch_key.format(i=i), slot) for slot, i in enumerate(self.layers)]


def _leaf_shape(expected_shape: tuple, rule: Rule) -> tuple:
    return tuple(expected_shape[1:]) if rule.layers is not None else tuple(expected_shape)


def plan(rules: Iterable[Rule], expected: dict) -> dict[str, tuple[Rule, int | None]]:
    """torch key -> (rule, stack slot); validates the table against `expected` (path -> shape/dtype)."""
    rules = list(rules)
    by_key: dict[str, tuple[Rule, int | None]] = {}
    filled: dict[Path, int] = {}
    problems = []
    for rule in rules:
        if rule.path not in expected:
            problems.append(f"table maps {rule.torch_key!r} to {rule.path}, which the model does not have")
            continue
        want = expected[rule.path]
        if rule.layers is not None and len(rule.layers) != want.shape[0]:
            problems.append(f"{rule.path}: {len(rule.layers)} layers in the table, {want.shape[0]} in the model")
        for key, slot in rule.keys():
            if key in by_key:
                problems.append(f"table lists {key!r} twice")
            by_key[key] = (rule, slot)
        filled[rule.path] = filled.get(rule.path, 0) + 1
    problems += [f"model leaf {p} has no rule" for p in expected if p not in filled]
    problems += [f"model leaf {p} is filled by {n} rules" for p, n in filled.items() if n > 1]
    if problems:
        raise AssertionError("conversion table is inconsistent:\n  " + "\n  ".join(problems))
    return by_key


def check(ckpt: TorchWeights, by_key: dict, expected: dict, ignore: Callable[[str], bool] | None = None, source=""):
    """Header-only validation: names every missing / unexpected / duplicate / mis-shaped key."""
    problems = []
    for key, first, second in ckpt.duplicates:
        problems.append(f"duplicate key {key!r} in {first.name} and {second.name}")
    present = set(ckpt.keys())
    for key, (rule, _) in by_key.items():
        want = rule.transform.torch_shape(_leaf_shape(expected[rule.path].shape, rule))
        if key not in present:
            problems.append(f"missing key {key!r} (expected shape {list(want)})")
            continue
        info = ckpt.info(key)
        if tuple(info.shape) != tuple(want):
            problems.append(f"key {key!r} has shape {list(info.shape)}, expected {list(want)}")
        want_dtype = np.dtype(expected[rule.path].dtype)
        if rule.exact_dtype and info.dtype != want_dtype:
            problems.append(f"key {key!r} has dtype {info.dtype}, expected {want_dtype}")
        elif info.dtype not in FLOAT_DTYPES:  # casting integers/bools into weights would be silent garbage
            problems.append(f"key {key!r} in {info.file.name} has dtype {info.dtype}, which the converter cannot use")
    for key in present - set(by_key):
        if ignore is None or not ignore(key):
            problems.append(f"unexpected key {key!r} with shape {list(ckpt.info(key).shape)}")
    if problems:
        head = f"{source}: " if source else ""
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise ConversionError(
            f"{head}checkpoint does not match the model config ({len(problems)} problem(s)):\n  "
            + "\n  ".join(shown)
            + "\nCheck that --config names the variant these weights belong to."
        )


def convert(
    ckpt: TorchWeights,
    rules: Iterable[Rule],
    expected: dict,
    ignore: Callable[[str], bool] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    source: str = "",
) -> dict[Path, np.ndarray]:
    """Fills every leaf of `expected` (path -> object with .shape/.dtype) from `ckpt`.

    Returns path -> numpy array in our dtype. `progress(shard_name, done, total)` is called
    once per shard.
    """
    by_key = plan(rules, expected)
    check(ckpt, by_key, expected, ignore, source)
    out = {p: np.empty(s.shape, np.dtype(s.dtype)) for p, s in expected.items()}
    shards = list(ckpt.keys_by_file())
    for n, (shard, keys) in enumerate(shards):
        for key in keys:
            if key not in by_key:
                continue
            rule, slot = by_key[key]
            arr = rule.transform.apply(ckpt.get(key))
            target = out[rule.path] if slot is None else out[rule.path][slot]
            target[...] = arr.astype(target.dtype, copy=False)
        ckpt.release(shard)
        if progress is not None:
            progress(shard.name, n + 1, len(shards))
    return out
