r"""Implicit hypergradients: the implicit function theorem at the current
weights, with a truncated Neumann series or conjugate gradients.

At a stationary point :math:`w^*(\lambda)` of the training loss,
:math:`\nabla_w L_{tr}(w^*, \lambda) = 0`, and the implicit function
theorem gives the hypergradient without unrolling training (Pedregosa 2016;
Lorraine et al. 2020):

.. math::

   \frac{d L_{val}}{d\lambda}
   = \nabla_\lambda L_{val} - M^\top H^{-1} \nabla_w L_{val},
   \qquad H = \frac{\partial^2 L_{tr}}{\partial w^2},\quad
   M = \frac{\partial^2 L_{tr}}{\partial w\, \partial\lambda}.

The inverse-Hessian-vector product :math:`x \approx (H + \delta I)^{-1} v`,
:math:`v = \nabla_w L_{val}`, is approximated with a fixed number :math:`K`
of Hessian-vector products: a truncated Neumann series (Lorraine et al.
2020, Alg. 3)

.. math::

   x_K = \alpha \sum_{j=0}^{K-1} (I - \alpha A)^j v,
   \qquad A = H + \delta I,\qquad
   A^{-1}v - x_K = (I - \alpha A)^K A^{-1} v,

which converges when :math:`0 < \alpha < 2/\lambda_{max}(A)` and
:math:`A` is positive definite, or :math:`K` iterations of conjugate
gradients (Pedregosa 2016), exact after :math:`\dim w` iterations when
:math:`A` is symmetric positive definite. Every product is
forward-over-reverse; no matrix is ever formed.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradhpo.core.base import BilevelOptimizer, compiled
from gradhpo.core.state import BilevelState, float_dtype
from gradhpo.utils.types import DataBatch, InnerOptimizer, LossFn, PyTree
from gradhpo.utils import cost
from gradhpo.utils import gradients as gr
from gradhpo.utils import tree as tu
from gradhpo.utils import validation as val

SOLVERS = ("neumann", "cg")


def linear_solve(matvec: Callable[[PyTree], PyTree], vector: PyTree, *,
                 solver: str, terms: int,
                 neumann_scale: Optional[float] = None,
                 init: Optional[PyTree] = None) -> PyTree:
    r"""Approximates :math:`A^{-1} v` with ``terms`` products by :math:`A`.

    ``solver="neumann"`` is the Richardson iteration
    :math:`x \leftarrow x + \alpha (v - A x)`; from :math:`x = 0` its
    :math:`K`-th iterate is the truncated Neumann series
    :math:`x_K = \alpha \sum_{j=0}^{K-1} (I - \alpha A)^j v` (Lorraine et
    al. 2020, Alg. 3, whose :math:`i` is :math:`K - 1`), with error
    :math:`(I - \alpha A)^K A^{-1} v`: it needs :math:`K - 1` products from
    zero and :math:`K` from ``init``. ``solver="cg"`` runs
    :func:`jax.scipy.sparse.linalg.cg` for ``terms`` iterations (no
    tolerance: it stops early only at an exactly zero residual), one
    product each plus one for the initial residual.

    Args:
      matvec: :math:`u \mapsto A u` on pytrees shaped like ``vector``
        (symmetric; positive definite for CG and for the series to
        converge).
      vector: :math:`v`.
      solver: ``"neumann"`` or ``"cg"``.
      terms: :math:`K \ge 1`, the number of series terms or CG iterations.
      neumann_scale: :math:`\alpha`, required by ``"neumann"``; the series
        converges when :math:`0 < \alpha < 2/\lambda_{max}(A)`.
      init: the starting point (a warm start), shaped like ``vector``;
        ``None`` starts from zero.

    Returns:
      :math:`x \approx A^{-1} v`, shaped like ``vector``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.algorithms.implicit import linear_solve
      >>> A = jnp.array([[2.0, 0.0], [0.0, 1.0]])
      >>> v = jnp.array([1.0, 1.0])
      >>> # alpha = 0.5: I - alpha A = diag(0, 0.5), so x_K = (0.5, 1 - 2^-K)
      >>> print(linear_solve(lambda u: A @ u, v, solver="neumann", terms=3,
      ...                    neumann_scale=0.5))
      [0.5   0.875]
      >>> x = linear_solve(lambda u: A @ u, v, solver="cg", terms=2)
      >>> print(jnp.round(x, 6))                     # exact after 2 steps
      [0.5 1. ]
    """
    if solver == "cg":
        return jax.scipy.sparse.linalg.cg(
            matvec, vector, x0=init, tol=0.0, atol=0.0, maxiter=terms)[0]
    if neumann_scale is None:
        raise ValueError("solver='neumann' needs neumann_scale.")
    alpha = neumann_scale
    if init is None:
        x, r = tu.zeros_like(vector), vector          # no product for A 0
    else:
        x, r = init, jax.tree.map(jnp.subtract, vector, matvec(init))

    def body(_, carry):
        x, r = carry
        # x_{k+1} = x_k + alpha r_k,  r_{k+1} = r_k - alpha A r_k
        return tu.axpy(alpha, r, x), tu.axpy(-alpha, matvec(r), r)
    x, r = lax.fori_loop(0, terms - 1, body, (x, r))
    return tu.axpy(alpha, r, x)


class _Hyper(NamedTuple):
    """What one implicit hypergradient evaluation produces."""

    hypergradient: PyTree
    val_loss: jax.Array
    residual: jax.Array
    solution: PyTree


class ImplicitState(NamedTuple):
    r""":class:`Implicit`'s own state.

    Attributes:
      solution: with ``warm_start=True``, the last accepted solution
        :math:`x \approx (H + \delta I)^{-1}\nabla_w L_{val}` of the linear
        solve (shaped like the params, zeros at :meth:`Implicit.init`), from
        which the next solve starts; it is kept when an outer update is
        skipped, so a non-finite solve never poisons the next one. ``None``
        without ``warm_start``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> loss = lambda w, lam, b: 0.5 * jnp.sum((w - 1.0) ** 2) + lam * w[0]
      >>> opt = gh.Implicit(loss, loss, optax.sgd(0.1), optax.sgd(0.1),
      ...                   solver="cg", terms=2, warm_start=True)
      >>> state = opt.step(opt.init(jnp.zeros(2), 0.5), None, None)
      >>> print(state.algorithm_state.solution)     # H = I, so x = v
      [-0.45 -0.9 ]
      >>> print(f"{float(state.hyperparams):.2f}")  # h = 0.05 + 0.45
      0.45
    """

    solution: Optional[PyTree] = None


class Implicit(BilevelOptimizer):
    r"""Implicit-differentiation hypergradients (Lorraine et al. 2020;
    Pedregosa 2016).

    .. math::

       w_{t+1} &= \Phi(w_t, s_t, \lambda_t; D_t), \qquad
       v = \nabla_w L_{val}(w_{t+1}, \lambda_t; V_t), \\
       x &\approx \big(H_t + \delta I\big)^{-1} v, \qquad
       H_t = \nabla^2_{ww} L_{tr}(w_{t+1}, \lambda_t; D_t), \\
       h_t &= \nabla_\lambda L_{val}(w_{t+1}, \lambda_t; V_t) - M_t^\top x,
       \qquad M_t = \nabla^2_{w\lambda} L_{tr}(w_{t+1}, \lambda_t; D_t).

    Each :meth:`step` takes one inner step; every ``hyper_interval``-th call
    (the calls with ``(state.step + 1) % hyper_interval == 0``) it also
    evaluates :math:`h_t` and updates :math:`\lambda` along it with the
    outer optimizer. :math:`h_t` is the implicit-function-theorem
    hypergradient with three approximations: the weights after this call's
    inner step stand in for :math:`w^*(\lambda)` (so the outer update is
    only as good as the inner optimisation has converged); :math:`H` and
    :math:`M` come from this call's training batch :math:`D_t`, and
    :math:`\nabla_w L_{val}` from :math:`V_t`; and :math:`x` is the result
    of ``terms`` Neumann terms or CG iterations (``solver``). Hyperparameters
    that do not enter ``train_loss`` (the inner optimizer's learning rate,
    momentum) get only the direct term :math:`\nabla_\lambda L_{val}`: at a
    stationary point they do not move :math:`w^*`.

    Cost of an update call: the inner step's gradient, one validation
    gradient, about ``terms`` Hessian-vector products (each about two
    gradient evaluations: ``terms - 1`` for a Neumann series from zero,
    ``terms`` from a warm start, ``terms + 1`` for CG), and one more
    forward-over-reverse product that gives both :math:`M^\top x` and the
    residual. Memory is that of a few copies of the weights plus the
    hyperparameters, :math:`O(P + |\lambda|)`, whatever the number of
    hyperparameters. The linear solve and the validation gradient run inside a
    :func:`jax.lax.cond`, only on update calls; under :func:`jax.vmap` over
    a population of states the condition is batched and both branches run.

    Diagnostics: ``metadata["solve_residual"]`` is the relative residual
    :math:`\lVert (H + \delta I)x - v\rVert / \lVert v\rVert` of the last
    solve (NaN until the first update; the absolute residual when
    :math:`v = 0`). On calls without an outer update, ``val_loss``,
    ``hypergradient_norm`` and ``solve_residual`` keep the values of the
    last update call (``train_loss`` is that of the call). A non-finite
    inner gradient skips the inner step (and the outer update, when it is
    an update call); a non-finite validation gradient, solve or
    hypergradient skips the outer update; each skip increments
    ``metadata["nonfinite_count"]``.

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)` (see
        :class:`~gradhpo.BilevelOptimizer`); twice differentiable in
        :math:`w` and in :math:`(w, \lambda)`.
      val_loss: :math:`L_{val}(w, \lambda; V)`.
      inner_optimizer: optax transformation of :math:`w`, or a callable of
        the hyperparameters returning one.
      outer_optimizer: optax transformation of :math:`\lambda`.
      hyper_interval: the number of inner steps per outer update (Lorraine
        et al.'s inner steps per hyper-step), an int :math:`\ge 1`.
      solver: ``"neumann"`` (Lorraine et al.'s truncated Neumann series:
        robust for non-convex losses, where :math:`H` is indefinite, if
        :math:`\alpha` is small) or ``"cg"`` (conjugate gradients:
        much faster when :math:`H + \delta I` is symmetric positive
        definite, e.g. convex losses; on an indefinite :math:`H` add
        ``damping`` :math:`\delta > -\lambda_{min}(H)`).
      terms: :math:`K`, the number of Neumann terms or CG iterations, an
        int :math:`\ge 1`.
      damping: :math:`\delta \ge 0`, added to the Hessian: the solve
        approximates :math:`(H + \delta I)^{-1} v`. It makes an indefinite or
        singular :math:`H` invertible at the price of a biased hypergradient.
      neumann_scale: :math:`\alpha > 0`, the step of the Neumann series;
        required with ``solver="neumann"`` and not accepted with ``"cg"``.
        The series converges when :math:`0 < \alpha < 2/\lambda_{max}(H +
        \delta I)`; Lorraine et al. use the inner learning rate, which
        satisfies it wherever plain SGD on :math:`L_{tr}` is stable.
      warm_start: start each solve from the previous update's solution
        (kept in :class:`ImplicitState`), instead of from zero. When
        :math:`H` and :math:`v` change little between updates, the same
        ``terms`` then reach a smaller residual. It costs a copy of the
        weights in the state, and one more Hessian-vector product per
        Neumann solve (none for CG, which computes its initial residual
        anyway).

    Example:
      Ridge regression with one penalty per weight, started at the ridge
      solution: 2 CG iterations solve the 2-by-2 system exactly, so the
      hypergradient is the exact one,
      :math:`-e^{\rho_i} w^*_i [H^{-1}\nabla_w L_{val}]_i`.

      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> X = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> y = jnp.array([1., 2., 2.])
      >>> def train_loss(w, rho, batch):
      ...     x, t = batch
      ...     return (0.5 * jnp.sum((x @ w - t) ** 2)
      ...             + 0.5 * jnp.sum(jnp.exp(rho) * w ** 2))
      >>> def val_loss(w, rho, batch):
      ...     x, t = batch
      ...     return 0.5 * jnp.sum((x @ w - t) ** 2)
      >>> opt = gh.Implicit(train_loss, val_loss, optax.sgd(0.01),
      ...                   optax.sgd(1.0), solver="cg", terms=2)
      >>> w_star = jnp.array([1 / 116, 44 / 116])          # at rho = 0
      >>> state = opt.init(w_star, jnp.zeros(2))
      >>> val_batch = (jnp.array([[1., 0.], [1., 1.]]), jnp.array([.5, 1.]))
      >>> h = opt.compute_hypergradient(state, (X, y), val_batch)
      >>> print(jnp.round(h, 4))
      [ 0.0027 -0.0867]
      >>> print(f"{float(h.sum()):.4f}")   # a shared L2: dL_val/d log lam
      -0.0840
      >>> state = opt.step(state, (X, y), val_batch)
      >>> bool(state.metadata["solve_residual"] < 1e-4)
      True

    References:
      Lorraine, Vicol, Duvenaud, `Optimizing Millions of Hyperparameters by
      Implicit Differentiation <https://arxiv.org/abs/1911.02590>`_,
      AISTATS 2020.

      Pedregosa, `Hyperparameter optimization with approximate gradient
      <https://arxiv.org/abs/1602.02355>`_, ICML 2016.
    """

    def __init__(self, train_loss: LossFn, val_loss: LossFn,
                 inner_optimizer: InnerOptimizer,
                 outer_optimizer: optax.GradientTransformation, *,
                 hyper_interval: int = 1, solver: str = "neumann",
                 terms: int = 20, damping: float = 0.0,
                 neumann_scale: Optional[float] = None,
                 warm_start: bool = False) -> None:
        super().__init__(train_loss, val_loss, inner_optimizer,
                         outer_optimizer)
        self.hyper_interval = val.check_int(hyper_interval, "hyper_interval")
        val.check_choice(solver, "solver", SOLVERS)
        self.solver = solver
        self.terms = val.check_int(terms, "terms")
        self.damping = val.check_real(damping, "damping", low=0.0)
        if solver == "neumann":
            if neumann_scale is None:
                raise ValueError(
                    "neumann_scale is required with solver='neumann': the "
                    "step alpha of the series, with 0 < alpha < 2 / "
                    "lambda_max(H + damping I); Lorraine et al. use the "
                    "inner learning rate (e.g. neumann_scale=0.1 for "
                    "optax.sgd(0.1)). Or use solver='cg'.")
            neumann_scale = val.check_real(neumann_scale, "neumann_scale",
                                           low=0.0, low_open=True)
        elif neumann_scale is not None:
            raise ValueError(
                "neumann_scale applies to solver='neumann' only; drop it "
                f"for solver='cg' (got {neumann_scale!r}).")
        self.neumann_scale = neumann_scale
        val.check_choice(warm_start, "warm_start", (False, True))
        self.warm_start = warm_start

    state_type = ImplicitState

    def init(self, params: PyTree, hyperparams: PyTree, *,
             key: Optional[jax.Array] = None) -> BilevelState:
        val.check_key(key)   # the implicit method draws no random numbers
        state = self.initial_state(
            params, hyperparams,
            metadata={"solve_residual": jnp.full((), jnp.nan, float_dtype())})
        solution = tu.zeros_like(state.params) if self.warm_start else None
        return state.replace(algorithm_state=ImplicitState(solution))

    def check_state(self, state: BilevelState, train_batch: DataBatch,
                    val_batch: DataBatch) -> None:
        super().check_state(state, train_batch, val_batch)
        has = state.algorithm_state.solution is not None
        if has != self.warm_start or "solve_residual" not in state.metadata:
            raise ValueError(
                "state was built by an Implicit with"
                + ("out" if self.warm_start else "")
                + " warm_start; build it with this optimizer's init.")

    # -- hypergradient ------------------------------------------------------

    def _implicit(self, state: BilevelState, params: PyTree,
                  train_batch: DataBatch, val_batch: DataBatch) -> _Hyper:
        """The implicit hypergradient at ``params`` (the weights after the
        inner step), with the solve's residual and solution."""
        lam = state.hyperparams
        val_loss, v, direct = gr.value_and_grads(
            self.val_loss, params, lam, val_batch)

        def matvec(u):
            h_u = gr.hvp(self.train_loss, params, lam, train_batch, u)
            return h_u if self.damping == 0.0 else tu.axpy(
                self.damping, u, h_u)
        x = linear_solve(matvec, v, solver=self.solver, terms=self.terms,
                         neumann_scale=self.neumann_scale,
                         init=state.algorithm_state.solution)
        x = jax.tree.map(lambda a, b: a.astype(b.dtype), x, params)
        h_x, m_x = gr.curvature_products(self.train_loss, params, lam,
                                         train_batch, x)
        # (H + delta I) x - v
        r = jax.tree.map(lambda hx, xi, vi: hx + self.damping * xi - vi,
                         h_x, x, v)
        v_norm, r_norm = tu.norm(v), tu.norm(r)
        residual = r_norm / jnp.where(v_norm > 0, v_norm, 1.0)
        hypergradient = jax.tree.map(jnp.subtract, direct, m_x)
        # a non-finite v or solve poisons the whole hypergradient, also
        # where M^T x happens to be finite (a leaf independent of w, or CG
        # stopping at once on a NaN right-hand side), so the step skips
        ok = tu.all_finite(v) & tu.all_finite(x)
        hypergradient = jax.tree.map(
            lambda g: jnp.where(ok, g, jnp.nan).astype(g.dtype)
            if tu.is_float_leaf(g) else g, hypergradient)
        fdt = float_dtype()
        return _Hyper(hypergradient, jnp.asarray(val_loss).astype(fdt),
                      residual.astype(fdt), x if self.warm_start else None)

    def _solve_cost(self, train_batch: DataBatch, val_batch: DataBatch,
                    warm: bool) -> float:
        """A hyper-step beyond the inner gradient: the validation gradient,
        the solve's Hessian-vector products (CG: ``terms`` iterations and
        its initial residual; Neumann: ``terms - 1`` from zero, ``terms``
        from a warm start) and one joint product for M^T x and the
        residual."""
        if self.solver == "cg":
            products = self.terms + 1
        else:
            products = self.terms if warm else self.terms - 1
        return (cost.relative_size(val_batch, train_batch)
                + (products + 1) * cost.SECOND_ORDER)

    @compiled
    def compute_hypergradient(self, state: BilevelState,
                              train_batch: DataBatch,
                              val_batch: DataBatch) -> PyTree:
        """The implicit hypergradient :math:`h_t` at the weights after this
        call's inner step. :meth:`step` applies exactly this vector on its
        update calls (every ``hyper_interval``-th); on the other calls it
        applies none, but this method still returns :math:`h_t`."""
        inner = gr.inner_step(self.train_loss, self.inner_optimizer,
                              state.params, state.inner_opt_state,
                              state.hyperparams, train_batch, guard=True)
        return self._implicit(state, inner.params, train_batch,
                              val_batch).hypergradient

    @compiled
    def step(self, state: BilevelState, train_batch: DataBatch,
             val_batch: DataBatch) -> BilevelState:
        inner = gr.inner_step(self.train_loss, self.inner_optimizer,
                              state.params, state.inner_opt_state,
                              state.hyperparams, train_batch, guard=True)
        own, meta = state.algorithm_state, state.metadata

        def update(_):
            return self._implicit(state, inner.params, train_batch,
                                  val_batch)

        def keep(_):
            # a finite placeholder loss (the metadata keeps the last one)
            return _Hyper(tu.zeros_like(state.hyperparams),
                          jnp.zeros_like(meta["val_loss"]),
                          meta["solve_residual"], own.solution)

        if self.hyper_interval == 1:
            is_update = jnp.array(True)
            out = update(None)
            outer = None
        else:
            is_update = (state.step + 1) % self.hyper_interval == 0
            out = lax.cond(is_update, update, keep, None)

            def outer(st, safe):
                hp, opt_state = gr.outer_update(
                    self.outer_optimizer, safe, st.outer_opt_state,
                    st.hyperparams)
                return (tu.select(is_update, hp, st.hyperparams),
                        tu.select(is_update, opt_state, st.outer_opt_state),
                        {})
        new = self.finish_step(
            state, inner, out.hypergradient, out.val_loss,
            grad_evals=1 + jnp.where(is_update, self._solve_cost(
                train_batch, val_batch, own.solution is not None), 0.0),
            metadata={"solve_residual": out.residual}, outer=outer,
            inner_guarded=True)
        new_meta = dict(new.metadata)
        # a call without an outer update keeps the last update's
        # diagnostics, and counts only a skipped inner step
        for name in ("val_loss", "hypergradient_norm", "solve_residual"):
            new_meta[name] = jnp.where(is_update, new_meta[name], meta[name])
        new_meta["nonfinite_count"] = jnp.where(
            is_update, new_meta["nonfinite_count"],
            meta["nonfinite_count"]
            + jnp.logical_not(inner.finite).astype(jnp.int32))
        if own.solution is not None:
            accepted = (is_update & inner.finite
                        & jnp.isfinite(new_meta["hypergradient_norm"]))
            own = own._replace(
                solution=tu.select(accepted, out.solution, own.solution))
        return new.replace(metadata=new_meta, algorithm_state=own)
