"""Eager argument checks with messages that say how to fix the input.

Every check raises :class:`TypeError` (wrong kind of object) or
:class:`ValueError` (right kind, wrong value), naming the argument exactly as
it is spelled in the public signature (with the path of the offending leaf,
e.g. ``hyperparams['l2']``), what was given and what is allowed. Checks run
on the host at construction and ``init``, and once per batch signature at
``step`` (:meth:`~gradhpo.BilevelOptimizer._check_call`); nothing here is
traced into a step.

What the trees may hold:

* ``params``: real floating arrays (every leaf is trained by the inner
  optimizer, so every leaf is differentiated), finite.
* ``hyperparams``: real floating leaves are tuned; integer leaves (e.g. a
  number of layers) are held fixed by design and get a zero hypergradient.
  Rejected: booleans (a flag is neither tuned nor a count: use ``0.0/1.0``
  to tune it or an ``int`` to hold it fixed), complex numbers (hypergradient
  descent is defined on real hyperparameters), ``None`` leaves (use a number
  or drop the entry), strings and other objects, NaN or infinite values, and
  a tree without any floating leaf (nothing to tune).

Example:
  >>> import jax.numpy as jnp
  >>> from gradhpo.utils import validation as val
  >>> val.check_hyperparams({"l2": 0.5, "depth": 3}, "T1T2")  # depth fixed
  >>> try:
  ...     val.check_hyperparams({"l2": 0.5, "dropout": True}, "T1T2")
  ... except TypeError as e:
  ...     print(str(e)[:60])
  hyperparams['dropout'] must be a real floating array or numb
  >>> val.check_int(0, "horizon")
  Traceback (most recent call last):
  ...
  ValueError: horizon must be an int >= 1, got 0.
"""

import functools
import math
import numbers
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradhpo.utils.types import PyTree
from gradhpo.utils import tree as tu


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (type {type(value).__name__})"


def check_callable(value: Any, name: str) -> None:
    """Raises :class:`TypeError` unless ``value`` is callable."""
    if not callable(value):
        raise TypeError(
            f"{name} must be a callable loss(params, hyperparams, batch) -> "
            f"scalar, got {_describe(value)}.")


def _optax_factory(value: Any) -> Optional[str]:
    """The dotted name of an optax function or class ``value`` is (or a
    :func:`functools.partial` of), else ``None``."""
    fn = value
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", None) or ""
    if module != "optax" and not module.startswith("optax."):
        return None
    if isinstance(fn, (optax.GradientTransformation, tuple)):
        return None
    return "optax." + getattr(fn, "__name__", type(fn).__name__)


def check_inner_optimizer(value: Any) -> None:
    """``inner_optimizer``: an optax transformation or a callable of λ.

    An optax factory passed uncalled (``optax.sgd`` instead of
    ``optax.sgd(0.1)``) is a callable too, but calling it with the
    hyperparameters would silently use them as its first argument (the
    learning rate): it is rejected.
    """
    if isinstance(value, optax.GradientTransformation):
        return
    factory = _optax_factory(value)
    if factory is not None:
        raise TypeError(
            f"inner_optimizer is the optax factory {factory}, not a "
            f"transformation: call it with its arguments ({factory}(...), "
            "e.g. optax.sgd(0.1)), or, to tune them as hyperparameters, "
            f"wrap it: lambda hp: {factory}(hp['lr']).")
    if callable(value):
        return
    raise TypeError(
        "inner_optimizer must be an optax.GradientTransformation (e.g. "
        "optax.sgd(0.1)) or a callable hyperparams -> GradientTransformation "
        f"(e.g. lambda hp: optax.sgd(hp['lr'])), got {_describe(value)}.")


def check_outer_optimizer(value: Any, allow_none: bool = False) -> None:
    """``outer_optimizer``: an optax transformation (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, optax.GradientTransformation):
        return
    factory = _optax_factory(value)
    if factory is not None:
        raise TypeError(
            f"outer_optimizer is the optax factory {factory}, not a "
            f"transformation: call it with its arguments ({factory}(...), "
            "e.g. optax.adam(1e-2)).")
    allowed = "an optax.GradientTransformation (e.g. optax.adam(1e-2))"
    if allow_none:
        allowed += " or None"
    raise TypeError(
        f"outer_optimizer must be {allowed}, got {_describe(value)}.")


def check_key(key: Any, name: str = "key") -> jax.Array:
    """A PRNG key (typed, ``jax.random.key``, or raw ``uint32[2]``,
    ``jax.random.PRNGKey``); ``None`` gives ``jax.random.PRNGKey(0)``.

    Returns:
      The key as a JAX array (typed keys stay typed).
    """
    if key is None:
        return jax.random.PRNGKey(0)
    if isinstance(key, (jax.Array, np.ndarray)):
        dtype = key.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            if key.shape == ():
                return key
        elif dtype == np.uint32 and key.shape == (2,):
            return jnp.asarray(key)
    got = (f"an array of shape {tuple(key.shape)} and dtype {key.dtype}"
           if isinstance(key, (jax.Array, np.ndarray)) else _describe(key))
    raise TypeError(
        f"{name} must be a single PRNG key, jax.random.key(seed) or "
        f"jax.random.PRNGKey(seed) (split one key per member of a "
        f"population), got {got}.")


def check_choice(value: Any, name: str, choices: Iterable[str]) -> None:
    """Raises :class:`ValueError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    try:
        ok = any(isinstance(value, type(c)) and value == c
                 for c in choices)
    except (TypeError, ValueError):    # e.g. an array: truth is ambiguous
        ok = False
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}.")


def check_real(value: Any, name: str, low: Optional[float] = None,
               high: Optional[float] = None, low_open: bool = False,
               high_open: bool = False) -> float:
    """Checks a real scalar option lies in an interval; returns it as float.

    Args:
      value: the value given.
      name: the argument's name in the signature.
      low, high: bounds (``None`` for unbounded).
      low_open, high_open: whether the bound itself is excluded.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got "
                        f"{_describe(value)}.")
    value = float(value)
    lo = "(" if low_open or low is None else "["
    hi = ")" if high_open or high is None else "]"
    interval = (f"{lo}{'-inf' if low is None else low}, "
                f"{'inf' if high is None else high}{hi}")
    bad = (not math.isfinite(value)
           or (low is not None and (value < low or (low_open and value == low)))
           or (high is not None
               and (value > high or (high_open and value == high))))
    if bad:
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    return value


def check_int(value: Any, name: str, minimum: int = 1,
              maximum: Optional[int] = None) -> int:
    """Checks an integer option lies in ``[minimum, maximum]``; returns it.

    ``maximum=None`` leaves it unbounded above.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}.")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], "
                         f"got {value}.")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
    return int(value)


#: Largest seed :func:`jax.random.PRNGKey` keeps distinct without x64 (a
#: larger one is silently truncated, e.g. ``2 ** 32`` gives the key of 0).
MAX_SEED = 2 ** 32 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """A PRNG seed: an int in ``[0, 2**32 - 1]``; returns it."""
    return check_int(value, name, minimum=0, maximum=MAX_SEED)


def check_finite_tree(tree: PyTree, name: str) -> None:
    """Raises :class:`ValueError` if ``tree`` is empty or holds NaN/inf.

    Runs on concrete values only (at ``init``); traced values are skipped.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array, got an "
                         f"empty pytree {tree!r}.")
    for path, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            continue
        arr = np.asarray(leaf)
        if arr.dtype == object or not (
                np.issubdtype(arr.dtype, np.number)
                or np.issubdtype(arr.dtype, np.bool_)):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} must be an array or a "
                f"number, got {_describe(leaf)}.")
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(
                np.isfinite(arr)):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} must be finite, got a "
                "value containing NaN or inf.")


def _leaf_dtype(leaf: Any) -> Optional[np.dtype]:
    """The dtype of an array-like leaf, or ``None`` for other objects."""
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        return np.dtype(leaf.dtype) if not jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key) else None
    if isinstance(leaf, (bool, numbers.Number)):
        # the dtype init will give it (int32/float32 without x64)
        return np.dtype(jax.dtypes.canonicalize_dtype(np.asarray(leaf).dtype))
    return None


def _nonfinite(leaf: Any) -> bool:
    if isinstance(leaf, jax.core.Tracer):
        return False
    return not bool(np.all(np.isfinite(np.asarray(leaf))))


def check_params(tree: PyTree, name: str = "params") -> None:
    """The model parameters: a non-empty tree of finite real floating arrays.

    Raises:
      TypeError: for a leaf that is not a real floating array or number
        (integers, booleans, complex numbers, strings). ``None`` subtrees
        (empty to JAX, e.g. an absent bias) are allowed.
      ValueError: for an empty tree or a NaN/infinite entry.
    """
    _check_numeric_tree(tree, name, allow_int=False, allow_none=True, what=(
        "a real floating array (every leaf of params is trained by "
        "inner_optimizer)"))


def check_hyperparams(tree: PyTree, owner: str,
                      name: str = "hyperparams") -> None:
    """The hyperparameters: floating leaves (tuned) and integer leaves (held
    fixed), finite, with at least one floating leaf.

    Args:
      tree: the hyperparameters given to ``init``.
      owner: the algorithm's name, for the message.
      name: the argument's name.

    Raises:
      TypeError: for a boolean, complex, ``None``, string or other
        non-numeric leaf.
      ValueError: for an empty tree, a NaN/infinite entry, or no floating
        leaf at all.
    """
    what = ("a real floating array or number (tuned) or an integer (held "
            "fixed)")
    dtypes = _check_numeric_tree(tree, name, allow_int=True,
                                 allow_none=False, what=what)
    if not any(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        raise ValueError(
            f"{name} must contain at least one floating leaf for {owner} to "
            f"tune (integer leaves are held fixed), got dtypes "
            f"{sorted({d.name for d in dtypes})}; write 1.0, not 1.")


def _check_numeric_tree(tree: PyTree, name: str, allow_int: bool,
                        allow_none: bool, what: str) -> list:
    """Checks every leaf of ``tree``; returns the leaves' dtypes.

    ``None`` is an empty subtree to JAX; ``allow_none=False`` rejects it
    (a hyperparameter set to ``None`` is a mistake, not an absent one).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=None if allow_none else (lambda x: x is None))
    if not leaves:
        raise ValueError(f"{name} must contain at least one array, got an "
                         f"empty pytree {_describe(tree)}.")
    dtypes = []
    for path, leaf in leaves:
        where = f"{name}{jax.tree_util.keystr(path)}"
        if leaf is None:
            raise TypeError(
                f"{where} must be {what}, got None; give it a value or "
                "remove the entry.")
        dtype = _leaf_dtype(leaf)
        # jnp.issubdtype also classifies the ml_dtypes floats (bfloat16)
        if dtype is None or not (jnp.issubdtype(dtype, np.number)
                                 or dtype == np.bool_):
            raise TypeError(f"{where} must be {what}, got {_describe(leaf)}.")
        if dtype == np.bool_:
            raise TypeError(
                f"{where} must be {what}, got a boolean"
                + ("; use 0.0/1.0 to tune it or an int to hold it fixed."
                   if allow_int else "."))
        if jnp.issubdtype(dtype, np.complexfloating):
            raise TypeError(f"{where} must be {what}, got complex dtype "
                            f"{dtype.name}; complex values are not supported.")
        if jnp.issubdtype(dtype, np.integer) and not allow_int:
            raise TypeError(f"{where} must be {what}, got integer dtype "
                            f"{dtype.name}; write 1.0, not 1.")
        if jnp.issubdtype(dtype, np.floating) and _nonfinite(leaf):
            raise ValueError(f"{where} must be finite, got a value "
                             "containing NaN or inf.")
        dtypes.append(dtype)
    return dtypes


def check_bounds(bounds: Any, name: str = "bounds") -> Optional[tuple]:
    """Box constraints ``(lower, upper)``; returns them as a tuple or None.

    Each side is ``None`` (unbounded), a real number, or a pytree of
    ``None`` / real numbers / real arrays (no NaN, no booleans). Their match
    with the hyperparameters is checked at ``init``
    (:func:`check_option_shapes`).
    """
    if bounds is None:
        return None
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(
            f"{name} must be None or a pair (lower, upper) of scalars or "
            f"pytrees (None for unbounded), got {_describe(bounds)}.")
    for i, side in enumerate(bounds):
        leaves, _ = jax.tree_util.tree_flatten_with_path(side)
        for path, leaf in leaves:
            where = f"{name}[{i}]{jax.tree_util.keystr(path)}"
            dtype = _leaf_dtype(leaf)
            if dtype is None or not (np.issubdtype(dtype, np.integer)
                                     or np.issubdtype(dtype, np.floating)):
                raise TypeError(
                    f"{where} must be None, a real number or a real array, "
                    f"got {_describe(leaf)}.")
            if np.any(np.isnan(np.asarray(leaf, dtype=float))):
                raise ValueError(f"{where} must not be NaN (use None or "
                                 "+-inf for unbounded), got a NaN.")
    return tuple(bounds)


def check_option_shapes(option: Any, hyperparams: PyTree,
                        name: str) -> None:
    """Checks a per-leaf option matches the hyperparameters.

    Args:
      option: a scalar, ``None`` or a pytree prefix of ``hyperparams``
        (``bounds[0]``, ``bounds[1]``, ``trainable``).
      hyperparams: the hyperparameters (after ``init``'s conversion).
      name: the option's name, e.g. ``bounds[0]`` or ``trainable``.

    Raises:
      ValueError: if ``option`` is not a prefix of the hyperparameters'
        tree (from :func:`gradhpo.utils.tree.broadcast_prefix`), or an
        entry's shape does not broadcast to its hyperparameter's shape.
    """
    values = tu.broadcast_prefix(option, hyperparams, name)
    leaves, _ = jax.tree_util.tree_flatten_with_path(hyperparams)
    for (path, leaf), value in zip(leaves, values):
        if value is None:
            continue
        shape, target = np.shape(value), np.shape(leaf)
        try:
            ok = np.broadcast_shapes(shape, target) == target
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} has an entry of shape {shape} for "
                f"hyperparams{jax.tree_util.keystr(path)} of shape {target}; "
                "it must broadcast to the hyperparameter's shape.")


def check_scalar_loss(out: Any, name: str) -> None:
    """A loss output (from :func:`jax.eval_shape`) is a floating scalar."""
    if isinstance(out, (tuple, list, dict)):
        raise ValueError(
            f"{name} must return one floating scalar, got a "
            f"{type(out).__name__} of {len(out)} values (e.g. (loss, aux)); "
            "return only the loss and compute auxiliary values in a "
            "separate function.")
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype,
                                                          jnp.floating):
        raise ValueError(
            f"{name} must return a floating scalar, got "
            + (f"shape {shape} and dtype {dtype}" if shape is not None
               else _describe(out))
            + "; reduce the per-example losses (e.g. with .mean()).")


def check_batch_like(batch: Any, template: Any, name: str,
                     template_name: str) -> None:
    """Checks ``batch`` has the tree and leaf shapes of ``template``.

    Used where the state holds an array allocated from an earlier batch
    (HyperDistill's :math:`D^*`), so a batch of another shape cannot be
    mixed into it.
    """
    def shapes(tree):
        return jax.tree.map(lambda x: tuple(np.shape(x)), tree)
    if jax.tree.structure(batch) != jax.tree.structure(template):
        raise ValueError(
            f"{name} must have the tree structure of {template_name} "
            f"({jax.tree.structure(template)}), got "
            f"{jax.tree.structure(batch)}.")
    got, want = shapes(batch), shapes(template)
    if got != want:
        raise ValueError(
            f"{name} must have the leaf shapes {template_name} was allocated "
            f"with, {want}, got {got}; keep the batch size fixed (e.g. drop "
            "the last partial batch) or start from a new init.")
