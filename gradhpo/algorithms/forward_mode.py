r"""Forward-mode hypergradients: real-time hyperparameter optimisation.

Franceschi et al. (2017) carry the total derivative of the training state
:math:`x_t = (w_t, s_t)` (weights and inner optimizer state) with respect to
the hyperparameters forward in time, alongside training:

.. math::

   x_{t+1} &= \Phi(x_t, \lambda; D_t), \qquad
   Z_t = \frac{d x_t}{d\lambda}, \\
   Z_{t+1} &= A_t Z_t + B_t, \qquad
   A_t = \frac{\partial\Phi}{\partial x}(x_t, \lambda; D_t), \quad
   B_t = \frac{\partial\Phi}{\partial\lambda}(x_t, \lambda; D_t), \\
   h_{t+1} &= \nabla_\lambda L_{val}(w_{t+1}, \lambda; V)
   + \big(Z^w_{t+1}\big)^{\!\top} \nabla_w L_{val}(w_{t+1}, \lambda; V),

with one column of :math:`Z` per floating hyperparameter coordinate.
:math:`h_{t+1}` is the exact gradient of the validation loss after
:math:`t + 1` steps with respect to a :math:`\lambda` held fixed over the
whole run (no truncation, no short-horizon bias). Their *real-time*
hyperparameter optimisation (RTHO) updates :math:`\lambda` along
:math:`h` every few steps without resetting :math:`Z`; the tangents then
mix derivatives taken at successive values of :math:`\lambda`, which is the
RTHO approximation. The cost is one Jacobian-vector product of the inner
step per hyperparameter coordinate and the memory one copy of
:math:`x` per coordinate, so it suits a few hyperparameters (learning rate,
momentum, a handful of regularisation strengths).
"""

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from gradhpo.core.base import BilevelOptimizer, compiled
from gradhpo.core.state import BilevelState
from gradhpo.utils.types import DataBatch, InnerOptimizer, LossFn, PyTree
from gradhpo.utils import cost
from gradhpo.utils import gradients as gr
from gradhpo.utils import tree as tu
from gradhpo.utils import validation as val


class ForwardModeState(NamedTuple):
    r""":class:`ForwardMode`'s own state: the tangents
    :math:`Z_t = dx_t/d\lambda`.

    Column :math:`j` of :math:`Z` is the derivative of the training state
    with respect to the :math:`j`-th floating hyperparameter coordinate,
    counting the entries of the floating leaves of ``hyperparams`` in the
    order of :func:`jax.tree.leaves` (each leaf flattened in row-major
    order; integer leaves are held fixed and have no column). There are
    :math:`d` columns in all.

    Attributes:
      params_tangents: :math:`Z^w_t = dw_t/d\lambda`, shaped like the params
        with a leading axis of length :math:`d` on every leaf.
      opt_state_tangents: :math:`Z^s_t = ds_t/d\lambda`, shaped like the
        inner optimizer state with a leading axis of length :math:`d` on
        every floating leaf, and ``None`` in place of its integer leaves
        (e.g. Adam's step count, which has no derivative).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> loss = lambda w, hp, b: hp["l2"] * jnp.sum(w ** 2)
      >>> opt = gh.ForwardMode(loss, loss, optax.adam(0.1), optax.sgd(0.1))
      >>> state = opt.init(jnp.ones(3), {"l2": jnp.array([0.1, 0.2])})
      >>> own = state.algorithm_state           # d = 2 columns
      >>> own.params_tangents.shape, own.opt_state_tangents[0].count
      ((2, 3), None)
      >>> own.opt_state_tangents[0].mu.shape
      (2, 3)
    """

    params_tangents: PyTree
    opt_state_tangents: PyTree


def num_coordinates(hyperparams: PyTree) -> int:
    """The number :math:`d` of floating hyperparameter coordinates (the
    columns of the tangents); integer leaves do not count.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.algorithms.forward_mode import num_coordinates
      >>> num_coordinates({"l2": jnp.zeros(3), "lr": 0.1, "depth": 4})
      4
    """
    return tu.size(tu.partition_float(hyperparams)[0])


def _basis_column(lam_f: PyTree, j: jax.Array) -> PyTree:
    r""":math:`e_j` shaped like the floating hyperparameters (``None`` for
    integer leaves), in :func:`jax.flatten_util.ravel_pytree` order."""
    flat, unravel = ravel_pytree(lam_f)
    return unravel((jnp.arange(flat.size) == j).astype(flat.dtype))


def _flatten_floats(tree: PyTree, lam_f: PyTree) -> jax.Array:
    """The floating leaves of ``tree`` (where ``lam_f`` has them) as one
    vector of length :math:`d`."""
    floats = jax.tree.map(lambda a, b: None if b is None else a, tree,
                          lam_f, is_leaf=lambda x: x is None)
    return ravel_pytree(floats)[0]


def _unflatten(vector: jax.Array, hyperparams: PyTree) -> PyTree:
    """A vector of length :math:`d` as a tree shaped like ``hyperparams``
    (zeros for integer leaves, each leaf in its own dtype)."""
    flat, unravel = ravel_pytree(tu.partition_float(hyperparams)[0])
    return tu.fill_none(unravel(vector.astype(flat.dtype)), hyperparams)


def _float_part(tangent: PyTree, primal: PyTree) -> PyTree:
    """The tangents of the floating leaves of ``primal``; ``None`` for the
    others (whose tangents are ``float0``)."""
    return jax.tree.map(lambda t, x: t if tu.is_float_leaf(x) else None,
                        tangent, primal)


def _full_tangent(float_tangent: PyTree, primal: PyTree) -> PyTree:
    """Inverse of :func:`_float_part`: ``float0`` zeros for the integer
    leaves of ``primal``, as :func:`jax.jvp` requires."""
    return jax.tree.map(
        lambda x, t: t if tu.is_float_leaf(x) else np.zeros(
            np.shape(x), jax.dtypes.float0),
        primal, float_tangent, is_leaf=lambda x: x is None)


def _project(params_tangents: PyTree, v: PyTree) -> jax.Array:
    r""":math:`(Z^w)^\top v`: one inner product per column, a vector of
    length :math:`d`."""
    terms = [jnp.tensordot(z, g, axes=jnp.ndim(g))
             for z, g in zip(jax.tree.leaves(params_tangents),
                             jax.tree.leaves(v))]
    return sum(terms[1:], terms[0])


class ForwardMode(BilevelOptimizer):
    r"""Forward-mode hypergradients: real-time hyperparameter optimisation.

    Each :meth:`step` takes one inner step and advances the tangents
    :math:`Z = dx/d\lambda` of the training state :math:`x = (w, s)`
    (weights and inner optimizer state) through it (Franceschi et al.
    2017, RTHO):

    .. math::

       x_{t+1} &= \Phi(x_t, \lambda_t; D_t), \qquad
       Z_{t+1} = \rho\, A_t Z_t + B_t, \qquad Z_0 = \frac{dx_0}
       {d\lambda}, \\
       h_{t+1} &= \nabla_\lambda L_{val}(w_{t+1}, \lambda_t; V_t)
       + \big(Z^w_{t+1}\big)^{\!\top}\nabla_w L_{val}(w_{t+1}, \lambda_t;
       V_t),

    with :math:`A_t = \partial\Phi/\partial x` and :math:`B_t =
    \partial\Phi/\partial\lambda` at :math:`(x_t, \lambda_t)`. All
    :math:`d` columns come from one :func:`jax.vmap` of a Jacobian-vector
    product through the real inner step (the optimizer's state and its
    dependence on :math:`\lambda` included, so the learning rate and the
    momentum of a callable ``inner_optimizer`` are differentiable
    hyperparameters). Every ``hyper_interval``-th call (calls
    ``hyper_interval``, ``2 * hyper_interval``, ...) then moves
    :math:`\lambda` along :math:`h_{t+1}` with the outer optimizer; the
    tangents are never reset.

    With :math:`\rho = 1` and :math:`\lambda` held fixed, :math:`h_{t+1}`
    is exactly :math:`\frac{d}{d\lambda} L_{val}(w_{t+1}(\lambda),
    \lambda; V_t)` through all :math:`t + 1` steps from ``init`` (the
    dependence of :math:`s_0` on :math:`\lambda`, if the inner optimizer's
    ``init`` reads it, included). While :math:`\lambda` moves, :math:`Z`
    accumulates derivatives taken at the successive values of
    :math:`\lambda`: the real-time approximation of the paper, good when
    :math:`\lambda` changes slowly. :math:`\rho < 1` discounts the past,
    :math:`Z_t = \sum_{i<t} \rho^{t-1-i} (\prod_{i<j<t} A_j) B_i` (plus the
    discounted :math:`Z_0`): a soft truncation that forgets stale
    derivatives but brings back a short-horizon bias.

    Cost per step: the inner step and :math:`d` Jacobian-vector products of
    it (each about a Hessian-vector product, two to three gradient
    evaluations, batched into one program), plus one validation gradient on
    update calls. Memory: the state holds :math:`(1 + d)` copies of
    :math:`x`, and the batched pass :math:`d` tangent copies of one
    batch's activations. Hyperparameter trees with more than ``max_hyperparams``
    floating coordinates are refused at :meth:`init`; use
    implicit differentiation (``gh.Implicit``) for many hyperparameters.

    Non-finite values: a non-finite inner gradient skips the inner step and
    keeps the tangents; a non-finite hypergradient skips the outer update;
    a non-finite tangent update (a finite gradient whose derivative
    overflows, or Adam's square root at an exactly zero second moment,
    see ``eps_root`` in :func:`optax.adam`) keeps the previous tangents and
    counts as a non-finite hypergradient. Each event increments
    ``metadata["nonfinite_count"]`` once. ``metadata["val_loss"]`` and
    ``metadata["hypergradient_norm"]`` are those of the latest update call
    (NaN before the first).

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)`.
      val_loss: :math:`L_{val}(w, \lambda; V)`.
      inner_optimizer: :math:`\Phi`: an optax transformation of :math:`w`,
        or a callable of the hyperparameters returning one (e.g.
        ``lambda hp: optax.sgd(jnp.exp(hp["log_lr"]),
        momentum=hp["momentum"])``).
      outer_optimizer: optax transformation of :math:`\lambda`.
      hyper_interval: :math:`\Delta \ge 1`, the number of inner steps per
        outer update (the paper's hyperparameter update interval).
        Validation batches of the other calls are not used.
      decay: :math:`\rho \in (0, 1]`, the discount of the tangents
        (1: exact forward mode).
      max_hyperparams: the largest number :math:`d` of floating
        hyperparameter coordinates accepted at :meth:`init`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def train_loss(w, hp, batch):        # SGD: w+ = (1 - eta) w + eta
      ...     return 0.5 * jnp.sum((w - 1.0) ** 2)
      >>> def val_loss(w, hp, batch):
      ...     return 0.5 * jnp.sum(w ** 2)
      >>> opt = gh.ForwardMode(train_loss, val_loss,
      ...                      lambda hp: optax.sgd(hp["lr"]),
      ...                      optax.sgd(0.0))
      >>> state = opt.init(jnp.zeros(1), {"lr": jnp.array(0.5)})
      >>> state = opt.step(state, None, None)
      >>> # w2 = 1 - (1 - eta)^2 = 0.75 and dw2/deta = 2 (1 - eta) = 1,
      >>> # so h = w2 * dw2/deta = 0.75
      >>> h = opt.compute_hypergradient(state, None, None)
      >>> print(f"{float(h['lr']):.4f}")
      0.7500
      >>> state.algorithm_state.params_tangents     # dw1/deta = 1
      Array([[1.]], dtype=float32)

    References:
      Franceschi et al, `Forward and Reverse Gradient-Based Hyperparameter
      Optimization <https://arxiv.org/abs/1703.01785>`_, ICML 2017.
    """

    def __init__(self, train_loss: LossFn, val_loss: LossFn,
                 inner_optimizer: InnerOptimizer,
                 outer_optimizer: optax.GradientTransformation, *,
                 hyper_interval: int = 1, decay: float = 1.0,
                 max_hyperparams: int = 1024) -> None:
        super().__init__(train_loss, val_loss, inner_optimizer,
                         outer_optimizer)
        self.hyper_interval = val.check_int(hyper_interval, "hyper_interval")
        self.decay = val.check_real(decay, "decay", low=0.0, high=1.0,
                                    low_open=True)
        self.max_hyperparams = val.check_int(max_hyperparams,
                                             "max_hyperparams")

    state_type = ForwardModeState

    def init(self, params: PyTree, hyperparams: PyTree, *,
             key: Optional[jax.Array] = None) -> BilevelState:
        r"""Creates the initial state, with the tangents
        :math:`Z_0 = dx_0/d\lambda`.

        :math:`Z^w_0 = 0` (:math:`w_0` is given), and :math:`Z^s_0 =
        ds_0/d\lambda` is the derivative of the inner optimizer's ``init``
        at :math:`\lambda_0` (zero for the optax optimizers, whose initial
        state does not depend on their hyperparameters; non-zero e.g. for a
        tuned ``initial_accumulator_value`` of :func:`optax.adagrad`).

        Args:
          params: :math:`w_0`.
          hyperparams: :math:`\lambda_0`; at most ``max_hyperparams``
            floating coordinates.
          key: accepted for a uniform interface; forward mode draws no
            random numbers.

        Returns:
          The state, ``algorithm_state`` a :class:`ForwardModeState`.

        Raises:
          ValueError: as :meth:`gradhpo.BilevelOptimizer.init`, and if
            ``hyperparams`` has more than ``max_hyperparams`` floating
            coordinates (or none).
        """
        val.check_key(key)   # forward mode draws no random numbers
        val.check_hyperparams(hyperparams, type(self).__name__)
        d = num_coordinates(hyperparams)
        if d > self.max_hyperparams:
            raise ValueError(
                f"hyperparams has {d} floating coordinates, more than "
                f"max_hyperparams={self.max_hyperparams}: ForwardMode "
                f"carries one tangent copy of the weights and optimizer "
                f"state per coordinate, so its memory and time grow as "
                f"(1 + {d}) x the model. For many hyperparameters use "
                "implicit differentiation, gh.Implicit (or a one-step "
                "method such as gh.T1T2); to accept the cost, raise "
                "max_hyperparams.")
        if d == 0:
            raise ValueError(
                "hyperparams has no floating coordinate to tune (every "
                "floating leaf is empty).")
        state = self.initial_state(params, hyperparams)
        params_tangents = jax.tree.map(
            lambda x: jnp.zeros((d,) + jnp.shape(x), x.dtype), state.params)
        return state.replace(algorithm_state=ForwardModeState(
            params_tangents=params_tangents,
            opt_state_tangents=self._initial_state_tangents(
                state.params, state.hyperparams, state.inner_opt_state, d)))

    def _initial_state_tangents(self, params: PyTree, hyperparams: PyTree,
                                opt_state: PyTree, d: int) -> PyTree:
        r""":math:`Z^s_0 = ds_0/d\lambda`, one column per coordinate."""
        if isinstance(self.inner_optimizer, optax.GradientTransformation):
            return jax.tree.map(
                lambda x: jnp.zeros((d,) + jnp.shape(x), jnp.result_type(x))
                if tu.is_float_leaf(x) else None, opt_state)
        lam_f, lam_rest = tu.partition_float(hyperparams)

        def init(lam):
            return gr.init_inner_state(self.inner_optimizer, params,
                                       tu.combine(lam, lam_rest))

        def column(j):
            _, dot = jax.jvp(init, (lam_f,), (_basis_column(lam_f, j),))
            return _float_part(dot, opt_state)
        return jax.vmap(column)(jnp.arange(d))

    def check_state(self, state: BilevelState, train_batch: DataBatch,
                    val_batch: DataBatch) -> None:
        super().check_state(state, train_batch, val_batch)
        d = num_coordinates(state.hyperparams)
        own = state.algorithm_state
        for name, tangents, like in [
                ("params_tangents", own.params_tangents, state.params),
                ("opt_state_tangents", own.opt_state_tangents,
                 _float_part(state.inner_opt_state, state.inner_opt_state))]:
            want = jax.tree.map(lambda x: (d,) + tuple(np.shape(x)), like)
            ok = jax.tree.structure(tangents) == jax.tree.structure(like)
            if ok:
                got = jax.tree.map(lambda x: tuple(np.shape(x)), tangents)
                ok = got == want
            if not ok:
                raise ValueError(
                    f"state.algorithm_state.{name} does not match the state "
                    f"({d} floating hyperparameter coordinates): expected "
                    f"leaf shapes {want}; build the state with "
                    "ForwardMode.init (after changing the hyperparameter "
                    "tree or the params, start from a new init).")

    # -- the recursion -------------------------------------------------------

    def _advance(self, state: BilevelState, train_batch: DataBatch
                 ) -> Tuple[gr.InnerStep, PyTree, jax.Array,
                            ForwardModeState]:
        r"""The inner step and :math:`Z_{t+1} = \rho A_t Z_t + B_t`.

        Returns ``(inner, params_tangents, tangents_finite, own)``: the
        guarded inner step, the new :math:`Z^w` (unprotected, for the
        hypergradient), whether the new tangents are finite, and the new
        algorithm state (the previous tangents where the step or the
        tangents are non-finite).
        """
        own = state.algorithm_state
        lam_f, _ = tu.partition_float(state.hyperparams)
        opt_state = state.inner_opt_state
        d = num_coordinates(state.hyperparams)

        def discount(tree):
            return tree if self.decay == 1.0 else tu.scale(tree, self.decay)

        def column(z_w, z_s, j):
            s_dot = _full_tangent(discount(z_s), opt_state)
            step, (w_dot, s_dot) = gr.inner_step_jvp(
                self.train_loss, self.inner_optimizer, state.params,
                opt_state, state.hyperparams, train_batch,
                (discount(z_w), s_dot, _basis_column(lam_f, j)))
            return step, (w_dot, _float_part(s_dot, opt_state))

        # the primal step does not depend on the column: computed once.
        # Unguarded inside the vmap (a select per tangent copy would be a
        # pass over all d copies): the weights and state are guarded once
        # here, and the tangents by the select below
        inner, (z_w, z_s) = jax.vmap(column, out_axes=(None, 0))(
            own.params_tangents, own.opt_state_tangents, jnp.arange(d))
        inner = gr.guard_inner_step(inner, state.params, opt_state)
        finite = tu.all_finite((z_w, z_s))
        kept = tu.select(inner.finite & finite,
                         ForwardModeState(z_w, z_s), own)
        return inner, z_w, finite, kept

    def _hypergradient(self, state: BilevelState, inner: gr.InnerStep,
                       params_tangents: PyTree, tangents_finite: jax.Array,
                       val_batch: DataBatch) -> Tuple[jax.Array, jax.Array]:
        r"""``(val_loss, h)`` with :math:`h = \nabla_\lambda L_{val} +
        (Z^w)^\top \nabla_w L_{val}` as a vector of length :math:`d`, NaN
        where the tangents are not finite."""
        lam_f, _ = tu.partition_float(state.hyperparams)
        val_loss, v, direct = gr.value_and_grads(
            self.val_loss, inner.params, state.hyperparams, val_batch)
        h = _flatten_floats(direct, lam_f) + _project(params_tangents, v)
        return val_loss, jnp.where(tangents_finite, h, jnp.nan)

    @compiled
    def compute_hypergradient(self, state: BilevelState,
                              train_batch: DataBatch,
                              val_batch: DataBatch) -> PyTree:
        inner, z_w, finite, _ = self._advance(state, train_batch)
        _, h = self._hypergradient(state, inner, z_w, finite, val_batch)
        return _unflatten(h, state.hyperparams)

    @compiled
    def step(self, state: BilevelState, train_batch: DataBatch,
             val_batch: DataBatch) -> BilevelState:
        inner, z_w, finite, own = self._advance(state, train_batch)
        # the inner gradient and one JVP of the step per coordinate; the
        # validation gradient on update calls only
        d = num_coordinates(state.hyperparams)
        tangents = 1 + d * cost.SECOND_ORDER
        validation = cost.relative_size(val_batch, train_batch)
        if self.hyper_interval == 1:
            val_loss, h = self._hypergradient(state, inner, z_w, finite,
                                              val_batch)
            return self.finish_step(state, inner,
                                    _unflatten(h, state.hyperparams),
                                    val_loss, algorithm_state=own,
                                    grad_evals=tangents + validation,
                                    inner_guarded=True)

        update = (state.step + 1) % self.hyper_interval == 0
        previous = state.metadata["val_loss"]
        h_dtype = jnp.result_type(*jax.tree.leaves(
            tu.partition_float(state.hyperparams)[0]))

        def with_update():
            loss, h = self._hypergradient(state, inner, z_w, finite,
                                          val_batch)
            return loss.astype(previous.dtype), h.astype(h_dtype)

        def without_update():
            # no validation gradient; a non-finite tangent update still
            # shows (as a NaN hypergradient) and is counted once
            h = jnp.where(finite, 0.0, jnp.nan)
            return previous, jnp.broadcast_to(h, (d,)).astype(h_dtype)

        val_loss, h = jax.lax.cond(update, with_update, without_update)
        hypergradient = _unflatten(h, state.hyperparams)

        def outer(st, safe):
            new_hp, new_outer = gr.outer_update(
                self.outer_optimizer, safe, st.outer_opt_state,
                st.hyperparams)
            return (tu.select(update, new_hp, st.hyperparams),
                    tu.select(update, new_outer, st.outer_opt_state), {})

        norm = jnp.sqrt(jnp.sum(jnp.square(h)))
        # a skipped inner step also skips the outer update (finish_step);
        # on a call without an outer update that is one event, not two
        skips = (jnp.logical_not(inner.finite) & update).astype(jnp.int32)
        # finish_step skips (and counts) an outer update whose validation
        # loss is not finite; a call without one has no validation loss to
        # check (the recorded one, NaN before the first update, is kept)
        checked_loss = jnp.where(update, val_loss, jnp.zeros_like(val_loss))
        return self.finish_step(
            state, inner, hypergradient, checked_loss, algorithm_state=own,
            grad_evals=tangents + jnp.where(update, validation, 0.0),
            outer=outer, inner_skips=skips, inner_guarded=True,
            metadata={"val_loss": val_loss, "hypergradient_norm": jnp.where(
                update, norm, state.metadata["hypergradient_norm"])})
