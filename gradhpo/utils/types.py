"""Type aliases shared by the whole library.

The aliases document intent; JAX pytrees cannot be checked statically, so they
are deliberately loose (``Any``) where the structure is user-defined.
"""

from typing import Any, Callable, Union

import jax
import optax

#: Any JAX pytree (nested dicts, lists, tuples, dataclasses of arrays).
PyTree = Any

#: A batch of data: any pytree of arrays. Algorithms that take several inner
#: steps in one call expect every leaf to carry a leading axis of that length.
DataBatch = PyTree

#: A scalar JAX array (a loss value).
Scalar = jax.Array

#: A loss ``loss(params, hyperparams, batch) -> scalar``.
LossFn = Callable[[PyTree, PyTree, DataBatch], Scalar]

#: An inner optimizer: an optax transformation, or a callable mapping the
#: hyperparameter pytree to one (which makes optimizer hyperparameters such as
#: the learning rate differentiable).
InnerOptimizer = Union[
    optax.GradientTransformation,
    Callable[[PyTree], optax.GradientTransformation],
]

__all__ = ["PyTree", "DataBatch", "Scalar", "LossFn", "InnerOptimizer"]
