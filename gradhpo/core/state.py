"""The state shared by every bilevel optimizer."""

import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp

from gradhpo.utils.types import PyTree

#: Metadata keys every algorithm maintains.
BASE_METADATA_KEYS = (
    "train_loss", "val_loss", "hypergradient_norm", "nonfinite_count",
    "grad_evals")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BilevelState:
    r"""State of a bilevel (hyperparameter) optimization, as a pytree.

    Every field is a pytree of arrays, so a state can be passed through
    :func:`jax.jit`, stacked along a leading axis and :func:`jax.vmap`-ed over
    (a population of configurations), saved, and restored. Configuration
    (losses, optimizers, options) lives on the optimizer object, never here.

    With the notation of Luketina et al. (2016), one step maps
    :math:`(w_t, \lambda_t, s_t, r_t, t)` to
    :math:`(w_{t+1}, \lambda_{t+1}, s_{t+1}, r_{t+1}, t + 1)`.

    Attributes:
      params: model parameters :math:`w` (any pytree).
      hyperparams: hyperparameters :math:`\lambda` (any pytree).
      inner_opt_state: state :math:`s` of the inner (optax) optimizer.
      outer_opt_state: state :math:`r` of the outer (optax) optimizer.
      step: number of completed steps :math:`t`, an ``int32`` scalar array
        (never a Python ``int``, which would recompile every step).
      metadata: diagnostics, a dict of scalar arrays with at least
        ``train_loss``, ``val_loss``, ``hypergradient_norm``,
        ``nonfinite_count`` and ``grad_evals`` (the compute spent since
        ``init``, in gradient evaluations on one training batch, counted as
        :mod:`gradhpo.utils.cost` documents); some algorithms add scalar
        entries of their own (Greedy's ``selected``, the warm start's
        ``delta_norm``).
      algorithm_state: the algorithm's own carried arrays, one typed record
        per algorithm (a :class:`~typing.NamedTuple`, as optax has one state
        type per transformation): :class:`~gradhpo.T1T2State`,
        :class:`~gradhpo.GreedyState`, :class:`~gradhpo.HyperDistillState`,
        :class:`~gradhpo.OneShotWarmStartState`. Its fields are documented
        with each type; diagnostics in it are pytrees shaped like the
        hyperparameters.

    Example:
      >>> import jax.numpy as jnp
      >>> import gradhpo as gh
      >>> state = gh.BilevelState(
      ...     params=jnp.zeros(3), hyperparams={"l2": jnp.array(0.1)},
      ...     inner_opt_state=(), outer_opt_state=(),
      ...     step=jnp.array(0, jnp.int32), metadata={},
      ...     algorithm_state=gh.T1T2State())
      >>> int(state.replace(step=state.step + 1).step)
      1
    """

    params: PyTree
    hyperparams: PyTree
    inner_opt_state: PyTree
    outer_opt_state: PyTree
    step: jax.Array
    metadata: Dict[str, jax.Array]
    algorithm_state: Any = ()

    def replace(self, **fields: Any) -> "BilevelState":
        """Returns a copy of the state with the given fields replaced.

        Args:
          **fields: new values, keyed by field name.

        Returns:
          A new :class:`BilevelState`; ``self`` is unchanged.

        Raises:
          TypeError: if a key is not a field of :class:`BilevelState`.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(
                f"BilevelState.replace got unknown field(s) {unknown}; "
                f"the fields are {sorted(names)}.")
        return dataclasses.replace(self, **fields)


def initial_metadata(**more: jax.Array) -> Dict[str, jax.Array]:
    """The metadata dict of a freshly initialised state.

    Losses and norms are stored in the default floating dtype (``float32``, or
    ``float64`` with ``jax_enable_x64``) so that the dtypes never change
    between steps (a change would retrace a jitted step).

    Args:
      **more: algorithm-specific entries to add.

    Returns:
      A dict with ``train_loss``, ``val_loss``, ``hypergradient_norm`` (NaN
      until the first step), ``nonfinite_count`` (0) and ``grad_evals``
      (0.0), plus ``more``.
    """
    nan = jnp.full((), jnp.nan, dtype=float_dtype())
    meta = {
        "train_loss": nan,
        "val_loss": nan,
        "hypergradient_norm": nan,
        "nonfinite_count": jnp.zeros((), jnp.int32),
        "grad_evals": jnp.zeros((), float_dtype()),
    }
    meta.update(more)
    return meta


def float_dtype() -> Any:
    """The default floating dtype (``float64`` when x64 is enabled)."""
    return jnp.zeros(()).dtype
