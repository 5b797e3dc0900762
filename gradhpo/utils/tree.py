"""Pytree helpers used by every algorithm.

All helpers are whole-tree operations traced once under ``jit``: the Python
``tree.map`` calls below run at trace time only, never per step.
"""

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.utils.types import PyTree


def is_float_leaf(x: Any) -> bool:
    """Whether ``x`` is an inexact (floating or complex) array or scalar."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def as_strong_arrays(tree: PyTree) -> PyTree:
    """Converts every leaf to a JAX array with a concrete (non-weak) dtype.

    Python floats become weakly typed arrays under JAX; after one update they
    turn strongly typed and a jitted step would be traced a second time. This
    pins the dtype once, at ``init``.
    """
    def strong(x):
        x = jnp.asarray(x)
        return jnp.asarray(x, dtype=x.dtype)
    return jax.tree.map(strong, tree)


def tree_signature(tree: PyTree) -> Any:
    """The tree structure and every leaf's shape and dtype, hashable (a key
    for host-side caches of checks)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def partition_float(tree: PyTree) -> Tuple[PyTree, PyTree]:
    """Splits ``tree`` into its floating leaves and all the other leaves.

    Returns:
      ``(floats, rest)``: two trees of the same structure as ``tree`` where
      the leaves that belong to the other part are ``None``. Differentiate
      with respect to ``floats`` and close over ``rest``; :func:`combine`
      puts them back together.
    """
    floats = jax.tree.map(lambda x: x if is_float_leaf(x) else None, tree)
    rest = jax.tree.map(lambda x: None if is_float_leaf(x) else x, tree)
    return floats, rest


def combine(floats: PyTree, rest: PyTree) -> PyTree:
    """Inverse of :func:`partition_float`."""
    return jax.tree.map(
        lambda a, b: b if a is None else a, floats, rest,
        is_leaf=lambda x: x is None)


def fill_none(tree: PyTree, like: PyTree) -> PyTree:
    """Replaces the ``None`` leaves of ``tree`` by zeros shaped like ``like``.

    Used to report a zero hypergradient for hyperparameters held fixed
    (integer leaves), with the leaf's own dtype.
    """
    return jax.tree.map(
        lambda a, b: jnp.zeros_like(b) if a is None else a, tree, like,
        is_leaf=lambda x: x is None)


def all_finite(tree: PyTree) -> jax.Array:
    """A boolean scalar: every floating entry of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if is_float_leaf(x)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack(leaves))


def select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """``on_true if pred else on_false`` leafwise, keeping ``on_false`` dtypes.

    The dtype of the result equals that of ``on_false`` so a state's dtypes
    never drift (which would retrace a jitted step).
    """
    return jax.tree.map(
        lambda a, b: jnp.where(pred, a, b).astype(jnp.result_type(b)),
        on_true, on_false)


def zeros_like(tree: PyTree) -> PyTree:
    """Zeros shaped and typed like every leaf of ``tree``."""
    return jax.tree.map(jnp.zeros_like, tree)


def float0_to_zeros(cotangent: PyTree, like: PyTree) -> PyTree:
    """Replaces ``float0`` cotangents (of integer primals) by typed zeros."""
    def fix(c, x):
        if getattr(c, "dtype", None) == jax.dtypes.float0:
            return jnp.zeros_like(x)
        return c
    return jax.tree.map(fix, cotangent, like)


def scale(tree: PyTree, factor: Any) -> PyTree:
    """Multiplies every leaf by ``factor``, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def add(*trees: PyTree) -> PyTree:
    """Leafwise sum of trees of the same structure."""
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """``a * x + y`` leafwise, in the dtype of ``y``."""
    return jax.tree.map(lambda u, v: (a * u + v).astype(v.dtype), x, y)


def sum_squares(tree: PyTree) -> jax.Array:
    """Sum of squared magnitudes over all floating leaves (0 for none).

    One reduction gives both a finiteness check (the sum is finite exactly
    when every entry is, barring overflow of the square) and the norm.
    """
    leaves = [jnp.sum(jnp.square(jnp.abs(x))) for x in jax.tree.leaves(tree)
              if is_float_leaf(x)]
    if not leaves:
        return jnp.zeros(())
    return sum(leaves[1:], leaves[0])


def norm(tree: PyTree) -> jax.Array:
    """Global Euclidean norm over all floating leaves (0 for no leaves)."""
    return jnp.sqrt(sum_squares(tree))


def size(tree: PyTree) -> int:
    """Total number of entries over all leaves (a Python int)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def first_axis_length(tree: PyTree, name: str) -> int:
    """Length of the common leading axis of every leaf of ``tree``.

    Raises:
      ValueError: if a leaf is a scalar or the leaves disagree; the message
        names the argument ``name``.
    """
    lengths = set()
    for leaf in jax.tree.leaves(tree):
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(
                f"{name} must have a leading axis on every leaf, got a scalar "
                "leaf.")
        lengths.add(shape[0])
    if len(lengths) != 1:
        raise ValueError(
            f"{name} must have one common leading axis length on every leaf, "
            f"got lengths {sorted(lengths)}.")
    return lengths.pop()


def broadcast_prefix(option: Any, tree: PyTree, name: str) -> list:
    """Broadcasts an option to a list aligned with ``jax.tree.leaves(tree)``.

    Args:
      option: a scalar, ``None``, or a pytree prefix of ``tree`` (``None``
        leaves allowed), e.g. bounds or a trainable mask.
      tree: the hyperparameters.
      name: the argument's name, for the error message.

    Raises:
      ValueError: if ``option`` is not a prefix of ``tree``.
    """
    leaves, treedef = jax.tree.flatten(option, is_leaf=lambda x: x is None)
    try:
        subtrees = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} must be a scalar, None or a pytree shaped like "
            f"hyperparams (or a prefix of it); got structure {treedef} for "
            f"hyperparams structure {jax.tree.structure(tree)}.") from err
    out = []
    for leaf, sub in zip(leaves, subtrees):
        out.extend([leaf] * len(jax.tree.leaves(sub)))
    return out


def flat_float_option(option: Any, tree: PyTree, default: Any, dtype: Any,
                      name: str) -> jax.Array:
    """An option broadcast over the floating leaves of ``tree``, flattened.

    The entries follow the order of
    ``jax.flatten_util.ravel_pytree(partition_float(tree)[0])``; ``None``
    entries take ``default``. Built at trace time from Python options, so
    the result is a constant.
    """
    parts = []
    for leaf, value in zip(jax.tree.leaves(tree),
                           broadcast_prefix(option, tree, name)):
        if not is_float_leaf(leaf):
            continue
        value = default if value is None else value
        parts.append(jnp.broadcast_to(jnp.asarray(value, dtype),
                                      jnp.shape(leaf)).ravel())
    if not parts:
        return jnp.zeros((0,), dtype)
    return jnp.concatenate(parts)
