r"""T1–T2: one-step hypergradients (Luketina et al. 2016), exact or DARTS.

Each step takes one inner step with the current hyperparameters and
differentiates the validation loss after it through that single step,
treating everything before :math:`w_t` as constant:

.. math::

   w_{t+1} &= \Phi(w_t, s_t, \lambda_t; D_t), \\
   h_t &= \frac{d}{d\lambda} L_{val}\big(\Phi(w_t, s_t, \lambda; D_t),
          \lambda; V_t\big)\Big|_{\lambda_t}
        = \nabla_\lambda L_{val}(w_{t+1}, \lambda_t)
          + B_t^\top \nabla_w L_{val}(w_{t+1}, \lambda_t), \\
   \lambda_{t+1} &= \lambda_t + \mathrm{outer}(h_t),

with :math:`B_t = \partial w_{t+1}/\partial\lambda`. For plain SGD,
:math:`B_t = -\eta M_t` with :math:`M_t = \partial^2 L_{tr}/\partial w
\partial\lambda`, which gives Luketina's update
:math:`\lambda_{t+1} = \lambda_t + \beta\eta M_t^\top v_t`. The DARTS
variant (Liu et al. 2019) replaces :math:`M_t^\top v` by a central finite
difference of :math:`\nabla_\lambda L_{tr}` around :math:`w_t`.
"""

from typing import NamedTuple, Optional, Tuple

import jax
import optax

from gradhpo.core.base import BilevelOptimizer, compiled
from gradhpo.core.state import BilevelState
from gradhpo.utils.types import DataBatch, InnerOptimizer, LossFn, PyTree
from gradhpo.utils import cost
from gradhpo.utils import gradients as gr
from gradhpo.utils import validation as val

HYPERGRADIENT_MODES = ("exact", "finite_difference")


class T1T2State(NamedTuple):
    """:class:`T1T2`'s own state: none (one-step hypergradients carry
    nothing from step to step). An empty record, so that every algorithm's
    state has a type of its own.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> loss = lambda w, hp, b: hp * jnp.sum(w ** 2)
      >>> opt = gh.T1T2(loss, loss, optax.sgd(0.1), optax.sgd(0.1))
      >>> opt.init(jnp.ones(2), 0.5).algorithm_state
      T1T2State()
    """


class T1T2(BilevelOptimizer):
    r"""One-step (T1–T2) hypergradient descent, exact or finite-difference.

    .. math::

       h_t = \nabla_\lambda L_{val}(w_{t+1}, \lambda_t; V_t)
             + \Big(\frac{\partial w_{t+1}}{\partial\lambda}\Big)^\top
               \nabla_w L_{val}(w_{t+1}, \lambda_t; V_t),
       \qquad w_{t+1} = \Phi(w_t, s_t, \lambda_t; D_t).

    ``hypergradient="exact"`` obtains the product by one vector-Jacobian
    product through the real inner step (any optax optimizer, with its
    preconditioner; optimizer hyperparameters included), reusing the step's
    primal output. ``hypergradient="finite_difference"`` is DARTS' second
    order approximation (Liu et al. 2019, eq. 8): the mixed second
    derivative is replaced by

    .. math::

       M^\top u \approx \frac{\nabla_\lambda L_{tr}(w_t + \epsilon u)
       - \nabla_\lambda L_{tr}(w_t - \epsilon u)}{2\epsilon},\qquad
       \epsilon = r / \lVert u\rVert_2,

    where :math:`u = (\partial U/\partial g)^\top v` is the validation
    gradient passed back through the optimizer update :math:`U` (for SGD
    :math:`u = -\eta v`, exactly DARTS), and the optimizer's own dependence on
    :math:`\lambda` (learning rate, momentum) is differentiated exactly, at
    first order. With a non-SGD inner optimizer the approximation therefore
    keeps the preconditioner at its current state, as the exact mode does;
    it needs no second-order differentiation, and it is exact for
    hyperparameters whose :math:`\nabla_\lambda L_{tr}` is at most quadratic
    in :math:`w` (L2 penalties).

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)` (see
        :class:`~gradhpo.BilevelOptimizer`).
      val_loss: :math:`L_{val}(w, \lambda; V)`.
      inner_optimizer: optax transformation of :math:`w`, or a callable of
        the hyperparameters returning one.
      outer_optimizer: optax transformation of :math:`\lambda`.
      hypergradient: ``"exact"`` or ``"finite_difference"``.
      fd_radius: :math:`r`, the Euclidean length of the weight perturbation
        in finite-difference mode (DARTS uses 0.01; keep it in float32).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> X = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> y = jnp.array([1., 2., 2.])
      >>> def train_loss(w, hp, batch):
      ...     x, t = batch
      ...     return 0.5 * jnp.sum((x @ w - t) ** 2) + 0.5 * hp * jnp.sum(w**2)
      >>> def val_loss(w, hp, batch):
      ...     x, t = batch
      ...     return 0.5 * jnp.sum((x @ w - t) ** 2)
      >>> opt = gh.T1T2(train_loss, val_loss, optax.sgd(0.01),
      ...               optax.sgd(1.0))
      >>> state = opt.init(jnp.array([0.2, -0.1]), jnp.array(1.0))
      >>> val_batch = (jnp.array([[1., 0.], [1., 1.]]), jnp.array([.5, 1.]))
      >>> h = opt.compute_hypergradient(state, (X, y), val_batch)
      >>> print(f"{float(h):.6f}")
      0.000885
      >>> state = opt.step(state, (X, y), val_batch)
      >>> int(state.step)
      1

    References:
      Luketina et al, `Scalable Gradient-Based Tuning of Continuous
      Regularization Hyperparameters <https://arxiv.org/abs/1511.06727>`_,
      2016.

      Liu et al, `DARTS: Differentiable Architecture Search
      <https://arxiv.org/abs/1806.09055>`_, 2019.
    """

    def __init__(self, train_loss: LossFn, val_loss: LossFn,
                 inner_optimizer: InnerOptimizer,
                 outer_optimizer: optax.GradientTransformation, *,
                 hypergradient: str = "exact",
                 fd_radius: float = 0.01) -> None:
        super().__init__(train_loss, val_loss, inner_optimizer,
                         outer_optimizer)
        val.check_choice(hypergradient, "hypergradient", HYPERGRADIENT_MODES)
        self.hypergradient = hypergradient
        self.fd_radius = val.check_real(fd_radius, "fd_radius", low=0.0,
                                        low_open=True)

    state_type = T1T2State

    def init(self, params: PyTree, hyperparams: PyTree, *,
             key: Optional[jax.Array] = None) -> BilevelState:
        val.check_key(key)   # T1-T2 draws no random numbers
        return self.initial_state(params, hyperparams, T1T2State())

    def _hypergradient(self, state: BilevelState, train_batch: DataBatch,
                       val_batch: DataBatch
                       ) -> Tuple[PyTree, gr.InnerStep, jax.Array]:
        if self.hypergradient == "exact":
            inner, pullback = gr.inner_step_vjp(
                self.train_loss, self.inner_optimizer, state.params,
                state.inner_opt_state, state.hyperparams, train_batch,
                guard=True)
        else:
            inner, pullback = gr.finite_difference_step(
                self.train_loss, self.inner_optimizer, state.params,
                state.inner_opt_state, state.hyperparams, train_batch,
                self.fd_radius, guard=True)
        val_loss, v, direct = gr.value_and_grads(
            self.val_loss, inner.params, state.hyperparams, val_batch)
        hypergradient = jax.tree.map(lambda a, b: a + b, direct, pullback(v))
        return hypergradient, inner, val_loss

    @compiled
    def compute_hypergradient(self, state: BilevelState,
                              train_batch: DataBatch,
                              val_batch: DataBatch) -> PyTree:
        return self._hypergradient(state, train_batch, val_batch)[0]

    @compiled
    def step(self, state: BilevelState, train_batch: DataBatch,
             val_batch: DataBatch) -> BilevelState:
        hypergradient, inner, val_loss = self._hypergradient(
            state, train_batch, val_batch)
        # the inner gradient, the validation gradient, and the VJP through
        # the step (or the two gradients of the finite difference)
        evals = (1 + cost.SECOND_ORDER
                 + cost.relative_size(val_batch, train_batch))
        return self.finish_step(state, inner, hypergradient, val_loss,
                                grad_evals=evals, inner_guarded=True)
