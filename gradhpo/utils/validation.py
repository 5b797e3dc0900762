"""Eager argument checks with messages that say how to fix the input.

Every check raises :class:`TypeError` (wrong kind of object) or
:class:`ValueError` (right kind, wrong value), naming the argument exactly as
it is spelled in the public signature, what was given and what is allowed.
Checks run on the host at construction and ``init``; nothing here is traced.
"""

import math
import numbers
from typing import Any, Iterable, Optional

import jax
import numpy as np
import optax

from gradhpo.core.types import PyTree


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


def check_inner_optimizer(value: Any) -> None:
    """``inner_optimizer``: an optax transformation or a callable of λ."""
    if isinstance(value, optax.GradientTransformation) or callable(value):
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
    allowed = "an optax.GradientTransformation (e.g. optax.adam(1e-2))"
    if allow_none:
        allowed += " or None"
    raise TypeError(
        f"outer_optimizer must be {allowed}, got {_describe(value)}.")


def check_choice(value: Any, name: str, choices: Iterable[str]) -> None:
    """Raises :class:`ValueError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
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
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = (f"{lo}{'-inf' if low is None else low}, "
                f"{'inf' if high is None else high}{hi}")
    bad = (not math.isfinite(value)
           or (low is not None and (value < low or (low_open and value == low)))
           or (high is not None
               and (value > high or (high_open and value == high))))
    if bad:
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    return value


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """Checks an integer option is at least ``minimum``; returns it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}.")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
    return int(value)


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
