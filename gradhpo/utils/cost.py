r"""Counting the cost of a step in gradient evaluations.

Every algorithm adds what its step costs to ``metadata["grad_evals"]``, so a
comparison with a black-box search can be made at equal compute from the
library's own accounting. The unit :math:`G` is one forward and backward
pass of the training loss on one training batch; the counts are fixed by
the algorithm's mathematics and the batch sizes (computed when the step is
compiled, so counting costs nothing at run time):

* a gradient (with its value) on the training batch: :math:`1\,G`;
* a gradient on a batch of :math:`n` examples when the training batch has
  :math:`m`: :math:`n/m\,G` (validation batches are counted by size);
* a second-order product — a Hessian–vector product, the mixed product
  :math:`M^\top v`, or the vector–Jacobian or Jacobian–vector product of an
  inner step beyond its own gradient: :math:`2\,G` each
  (:data:`SECOND_ORDER`; Pearlmutter 1994 bounds it by a small multiple of
  a gradient, and forward-over-reverse measures about two);
* optimizer arithmetic, tree operations and the outer update: free.

A batch's size is the length of the leading example axis of its first leaf
(after the step axis of algorithms that take several inner steps per call);
a batch without leaves (``None``) counts as one example.

Example:
  >>> import jax.numpy as jnp
  >>> from gradhpo.utils import cost
  >>> train = (jnp.zeros((128, 784)), jnp.zeros(128))
  >>> val = (jnp.zeros((512, 784)), jnp.zeros(512))
  >>> cost.relative_size(val, train)
  4.0
  >>> stacked = jnp.zeros((5, 32, 3))      # 5 inner steps of 32 examples
  >>> cost.relative_size(stacked, train, steps=1, reference_steps=0)
  0.25
"""

from typing import Optional

import jax
import numpy as np

from gradhpo.utils.types import DataBatch

#: Gradient evaluations charged for one second-order product.
SECOND_ORDER = 2.0


def batch_size(batch: DataBatch, steps: int = 0) -> int:
    """The number of examples of ``batch``: the length of axis ``steps`` of
    its first leaf (1 for a batch without leaves or a scalar leaf)."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        return 1
    shape = np.shape(leaves[0])
    return int(shape[steps]) if len(shape) > steps else 1


def relative_size(batch: DataBatch, reference: DataBatch, steps: int = 0,
                  reference_steps: Optional[int] = None) -> float:
    """``batch_size(batch) / batch_size(reference)``: the cost, in
    gradient evaluations on ``reference``, of one gradient on ``batch``.

    Args:
      batch: e.g. the validation batch.
      reference: the training batch (one inner step's).
      steps: the number of leading step axes of ``batch`` to skip.
      reference_steps: the same for ``reference`` (default ``steps``).
    """
    if reference_steps is None:
        reference_steps = steps
    return batch_size(batch, steps) / batch_size(reference, reference_steps)
