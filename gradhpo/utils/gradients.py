r"""Shared hypergradient machinery: the inner step and its derivatives.

Every algorithm in gradhpo is built on one pure inner step

.. math::

   \Phi(w, s, \lambda; D) = (w^+, s^+), \qquad
   w^+ = w + U_\lambda\big(\nabla_w L_{tr}(w, \lambda; D), s, w\big),

where :math:`U_\lambda` is the optax update of the inner optimizer (which may
depend on :math:`\lambda`: learning rate, momentum, decoupled weight decay).
The hypergradient of one step is a vector-Jacobian product
:math:`B^\top v` with :math:`B = \partial w^+ / \partial \lambda`, obtained
with :func:`jax.vjp` (exact) or with the DARTS central difference
(:func:`finite_difference_mixed_product`).

Hyperparameters with a non-floating dtype (integer choices) are never
differentiated: they are closed over, and their hypergradient is reported as
zero.
"""

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradhpo.utils.types import DataBatch, InnerOptimizer, LossFn, PyTree
from gradhpo.utils import tree as tu


def resolve_inner_optimizer(
        inner_optimizer: InnerOptimizer,
        hyperparams: PyTree) -> optax.GradientTransformation:
    """The optax transformation for the given hyperparameters.

    Args:
      inner_optimizer: an :class:`optax.GradientTransformation`, or a callable
        ``hyperparams -> GradientTransformation``.
      hyperparams: the hyperparameter pytree :math:`\\lambda`.

    Returns:
      The transformation to apply.
    """
    if isinstance(inner_optimizer, optax.GradientTransformation):
        return inner_optimizer
    return inner_optimizer(hyperparams)


def _is_injected(x: Any) -> bool:
    return isinstance(x, (optax.InjectStatefulHyperparamsState,
                          optax.InjectHyperparamsState))


def _sync_injected_hyperparams(tx: optax.GradientTransformation,
                               opt_state: PyTree, params: PyTree) -> PyTree:
    """Refreshes numeric values held by ``optax.inject_hyperparams`` states.

    ``optax.inject_hyperparams`` stores numeric hyperparameters in its state
    at ``init`` and reads them from there in ``update``. When the inner
    optimizer is a callable of :math:`\\lambda`, the values in the state are
    stale (and carry no derivative); re-reading them from a fresh ``init`` of
    the transformation built from the current :math:`\\lambda` makes them
    both current and differentiable. The fresh moments are unused, so XLA
    removes them.
    """
    if not any(_is_injected(x)
               for x in jax.tree.leaves(opt_state, is_leaf=_is_injected)):
        return opt_state
    fresh = tx.init(params)

    def sync(old, new):
        if _is_injected(old):
            merged = dict(old.hyperparams)
            merged.update({k: jnp.asarray(v).astype(jnp.result_type(
                old.hyperparams[k])) for k, v in new.hyperparams.items()
                if k in old.hyperparams})
            return old._replace(hyperparams=merged)
        return old
    return jax.tree.map(sync, opt_state, fresh, is_leaf=_is_injected)


def init_inner_state(inner_optimizer: InnerOptimizer, params: PyTree,
                     hyperparams: PyTree) -> PyTree:
    """Initial state :math:`s_0` of the inner optimizer."""
    return resolve_inner_optimizer(inner_optimizer, hyperparams).init(params)


def apply_inner_update(inner_optimizer: InnerOptimizer, grads: PyTree,
                       opt_state: PyTree, params: PyTree,
                       hyperparams: PyTree,
                       finite: Optional[jax.Array] = None
                       ) -> Tuple[PyTree, PyTree]:
    """:math:`(w + U_\\lambda(g, s, w), s^+)`: the optimizer part of a step.

    With ``finite`` (a boolean scalar), the step is guarded: where it is
    false, ``(params, opt_state)`` are returned unchanged. The select sits
    inside the update so XLA fuses it with the update's own pass over the
    weights (a select after the step would be one more pass over
    :math:`w` and :math:`s`).
    """
    tx = resolve_inner_optimizer(inner_optimizer, hyperparams)
    synced = opt_state
    if not isinstance(inner_optimizer, optax.GradientTransformation):
        synced = _sync_injected_hyperparams(tx, opt_state, params)
    updates, new_state = tx.update(grads, synced, params)
    new_params = optax.apply_updates(params, updates)
    if finite is None:
        return new_params, new_state
    return (tu.select(finite, new_params, params),
            tu.select(finite, new_state, opt_state))


class InnerStep(NamedTuple):
    """Output of one inner step :math:`\\Phi`.

    Attributes:
      params: :math:`w^+`.
      opt_state: :math:`s^+`.
      loss: the training loss :math:`L_{tr}(w, \\lambda; D)` before the step.
      finite: whether the inner gradient, the loss and :math:`w^+` are
        finite (a boolean scalar).
    """

    params: PyTree
    opt_state: PyTree
    loss: jax.Array
    finite: jax.Array


def inner_step(train_loss: LossFn, inner_optimizer: InnerOptimizer,
               params: PyTree, opt_state: PyTree, hyperparams: PyTree,
               batch: DataBatch, guard: bool = False) -> InnerStep:
    """One inner optimizer step :math:`\\Phi(w, s, \\lambda; D)`.

    Pure and differentiable in ``params`` and ``hyperparams``. ``finite``
    is false when the gradient, the loss value or the updated weights are
    non-finite (a finite gradient can still overflow the update, e.g. with
    a huge learning rate). With ``guard``, such a step leaves ``(params,
    opt_state)`` unchanged; otherwise callers decide what to do.
    """
    loss, grads = jax.value_and_grad(train_loss)(params, hyperparams, batch)
    new_params, new_state = apply_inner_update(
        inner_optimizer, grads, opt_state, params, hyperparams)
    # the results are guarded too: a finite gradient can still overflow
    # the update, and a non-finite loss value must not be recorded
    finite = (tu.all_finite(grads) & jnp.isfinite(loss)
              & tu.all_finite(new_params))
    if guard:
        new_params = tu.select(finite, new_params, params)
        new_state = tu.select(finite, new_state, opt_state)
    return InnerStep(new_params, new_state, loss, finite)


def guard_inner_step(out: InnerStep, params: PyTree,
                     opt_state: PyTree) -> InnerStep:
    """Keeps ``(params, opt_state)`` when the inner gradient is non-finite."""
    return out._replace(
        params=tu.select(out.finite, out.params, params),
        opt_state=tu.select(out.finite, out.opt_state, opt_state))


def inner_step_vjp(
        train_loss: LossFn, inner_optimizer: InnerOptimizer, params: PyTree,
        opt_state: PyTree, hyperparams: PyTree, batch: DataBatch,
        wrt_params: bool = False, guard: bool = False,
) -> Tuple[InnerStep, Callable[[PyTree], Any]]:
    """One inner step and the pullback of :math:`w^+` through it.

    The primal output is the real inner step (so it is computed once and
    reused), and the pullback maps a cotangent :math:`v` (shaped like the
    parameters) to :math:`B^\\top v = (\\partial w^+/\\partial\\lambda)^\\top
    v`, with the state :math:`s` held fixed (this freezing is the
    short-horizon truncation). The pullback is reverse-over-reverse; its cost
    is a small multiple of one gradient evaluation.

    Args:
      train_loss: :math:`L_{tr}(w, \\lambda; D)`.
      inner_optimizer: the inner optimizer (transformation or callable).
      params: :math:`w`.
      opt_state: :math:`s`.
      hyperparams: :math:`\\lambda`.
      batch: :math:`D`.
      wrt_params: also return :math:`A^\\top v = (\\partial w^+/\\partial
        w)^\\top v` (HyperDistill's DrMAD sweep needs both from one VJP).
      guard: keep :math:`(w, s)` when the inner gradient is non-finite
        (:func:`inner_step`); the pullback is then zero or non-finite, and
        the caller skips the outer update.

    Returns:
      ``(step, pullback)``. ``pullback(v)`` returns :math:`B^\\top v` shaped
      like ``hyperparams`` (zeros for non-floating leaves), or the pair
      :math:`(A^\\top v, B^\\top v)` when ``wrt_params`` is true.
    """
    lam_f, lam_rest = tu.partition_float(hyperparams)

    def phi(w, lam):
        out = inner_step(train_loss, inner_optimizer, w, opt_state,
                         tu.combine(lam, lam_rest), batch, guard)
        return out.params, (out.opt_state, out.loss, out.finite)

    if wrt_params:
        new_params, vjp_fn, aux = jax.vjp(phi, params, lam_f, has_aux=True)

        def pullback(v):
            a_v, b_v = vjp_fn(v)
            return a_v, tu.fill_none(b_v, hyperparams)
    else:
        new_params, vjp_fn, aux = jax.vjp(
            lambda lam: phi(params, lam), lam_f, has_aux=True)

        def pullback(v):
            return tu.fill_none(vjp_fn(v)[0], hyperparams)
    new_state, loss, finite = aux
    return InnerStep(new_params, new_state, loss, finite), pullback


def value_and_grads(loss: LossFn, params: PyTree, hyperparams: PyTree,
                    batch: DataBatch) -> Tuple[jax.Array, PyTree, PyTree]:
    """A loss and its gradients in both the parameters and hyperparameters.

    Returns:
      ``(value, grad_params, grad_hyperparams)``: for the validation loss
      these are :math:`L_{val}`, :math:`v = \\nabla_w L_{val}` and the direct
      term :math:`\\nabla_\\lambda L_{val}` (zeros for non-floating leaves,
      and zeros when :math:`\\lambda` does not enter the loss).
    """
    lam_f, lam_rest = tu.partition_float(hyperparams)
    value, (g_w, g_lam) = jax.value_and_grad(
        lambda w, lam: loss(w, tu.combine(lam, lam_rest), batch),
        argnums=(0, 1))(params, lam_f)
    return value, g_w, tu.fill_none(g_lam, hyperparams)


def finite_difference_mixed_product(
        train_loss: LossFn, params: PyTree, hyperparams: PyTree,
        batch: DataBatch, direction: PyTree, radius: float) -> PyTree:
    r"""DARTS central difference for the mixed product :math:`M^\top u`.

    .. math::

       M^\top u \approx \frac{\nabla_\lambda L_{tr}(w + \epsilon u, \lambda)
       - \nabla_\lambda L_{tr}(w - \epsilon u, \lambda)}{2\epsilon},
       \qquad \epsilon = \frac{r}{\lVert u \rVert_2},

    with :math:`M = \partial^2 L_{tr} / \partial w \partial\lambda` and the
    norm taken over all leaves (the global norm), so the perturbation of the
    weights always has Euclidean length :math:`r` whatever the scale of
    :math:`u` (Liu et al. 2019, footnote 2). The error is
    :math:`O(\epsilon^2)`, and zero when :math:`\nabla_\lambda L_{tr}` is at
    most quadratic in :math:`w` (an L2 penalty). For :math:`u = 0` the
    product is zero; the guard avoids the division by zero.

    Args:
      train_loss: :math:`L_{tr}`.
      params: the pre-step weights :math:`w` (the paper perturbs these, not
        the unrolled weights).
      hyperparams: :math:`\lambda`.
      batch: the training batch :math:`D` of the inner step.
      direction: :math:`u`, shaped like ``params``.
      radius: :math:`r`, the length of the perturbation.

    Returns:
      :math:`M^\top u`, shaped like ``hyperparams`` (zeros for non-floating
      leaves).
    """
    u_norm = tu.norm(direction)
    # test for an exact zero (not u_norm > 0), so a NaN direction gives a
    # NaN product and the step is skipped rather than silently zeroed
    zero = u_norm == 0
    eps = radius / jnp.where(zero, 1.0, u_norm)
    lam_f, lam_rest = tu.partition_float(hyperparams)
    grad_lam = jax.grad(
        lambda lam, w: train_loss(w, tu.combine(lam, lam_rest), batch))
    plus = grad_lam(lam_f, tu.axpy(eps, direction, params))
    minus = grad_lam(lam_f, tu.axpy(-eps, direction, params))
    mtu = jax.tree.map(
        lambda p, m: jnp.where(zero, 0.0, (p - m) / (2 * eps)).astype(
            p.dtype), plus, minus)
    return tu.fill_none(mtu, hyperparams)


def finite_difference_step(
        train_loss: LossFn, inner_optimizer: InnerOptimizer, params: PyTree,
        opt_state: PyTree, hyperparams: PyTree, batch: DataBatch,
        radius: float, guard: bool = False,
) -> Tuple[InnerStep, Callable[[PyTree], Any]]:
    r"""One inner step and a pullback whose mixed term is a finite difference.

    Writes :math:`w^+ = w + U_\lambda(g, s, w)` with
    :math:`g = \nabla_w L_{tr}(w, \lambda; D)`, so

    .. math::

       B^\top v = \Big(\frac{\partial U}{\partial\lambda}\Big)^\top v
       + M^\top u, \qquad
       u = \Big(\frac{\partial U}{\partial g}\Big)^\top v .

    Both optimizer Jacobians are first-order VJPs of the optax update (cheap,
    exact); only the second-order product :math:`M^\top u` is replaced by
    the DARTS central difference. For plain SGD, :math:`u = -\eta v` and this
    is exactly DARTS' eq. (8); for Adam or momentum, :math:`u` is ``v``
    passed through the optimizer's preconditioner at fixed state. Optimizer
    hyperparameters (learning rate, momentum) are handled by the exact first
    term, so no second-order differentiation happens anywhere.

    Returns:
      ``(step, pullback)`` as :func:`inner_step_vjp`.
    """
    lam_f, lam_rest = tu.partition_float(hyperparams)
    loss, grads = jax.value_and_grad(train_loss)(params, hyperparams, batch)

    def update(g, lam):
        # unguarded: the VJP of a guarded update would materialise the
        # selected cotangent as one more array; the guard is applied to the
        # outputs below, where XLA fuses it with the update
        return apply_inner_update(inner_optimizer, g, opt_state, params,
                                  tu.combine(lam, lam_rest))

    if isinstance(inner_optimizer, optax.GradientTransformation):
        # lambda does not enter the optimizer: no first-order term
        new_params, vjp_g, new_state = jax.vjp(
            lambda g: update(g, lam_f), grads, has_aux=True)

        def vjp_fn(v):
            return vjp_g(v)[0], None
    else:
        new_params, vjp_fn, new_state = jax.vjp(update, grads, lam_f,
                                                has_aux=True)

    def pullback(v):
        u, opt_term = vjp_fn(v)
        mixed = finite_difference_mixed_product(
            train_loss, params, hyperparams, batch, u, radius)
        if opt_term is None:
            return mixed
        return tu.add(tu.fill_none(opt_term, hyperparams), mixed)

    finite = (tu.all_finite(grads) & jnp.isfinite(loss)
              & tu.all_finite(new_params))
    step = InnerStep(new_params, new_state, loss, finite)
    if guard:
        step = guard_inner_step(step, params, opt_state)
    return step, pullback


def tangent_zeros(tree: PyTree) -> PyTree:
    """Zero tangents for ``tree``: zeros for floating leaves and ``float0``
    zeros for integer ones (as :func:`jax.jvp` requires for, e.g., Adam's
    step count)."""
    def zero(x):
        if tu.is_float_leaf(x):
            return jnp.zeros_like(x)
        return np.zeros(np.shape(x), jax.dtypes.float0)
    return jax.tree.map(zero, tree)


def inner_step_jvp(
        train_loss: LossFn, inner_optimizer: InnerOptimizer, params: PyTree,
        opt_state: PyTree, hyperparams: PyTree, batch: DataBatch,
        tangents: Tuple[PyTree, PyTree, PyTree], guard: bool = False,
) -> Tuple[InnerStep, Tuple[PyTree, PyTree]]:
    r"""One inner step and its forward derivative along a direction.

    .. math::

       (\dot w^+, \dot s^+) = \frac{\partial \Phi}{\partial (w, s)}
       (\dot w, \dot s) + \frac{\partial \Phi}{\partial \lambda}
       \dot\lambda,

    by :func:`jax.jvp` through the real inner step (the optimizer's state,
    preconditioner and :math:`\lambda`-dependent update included): the
    recursion of forward-mode hypergradients (Franceschi et al. 2017),
    :math:`Z_{t+1} = A_t Z_t + B_t`, one tangent per call. ``jax.vmap`` it
    over a stack of tangents for several hyperparameter coordinates at
    once. Its cost is a small multiple of one gradient evaluation (the
    gradient's JVP is a Hessian-vector product).

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)`.
      inner_optimizer: the inner optimizer (transformation or callable).
      params: :math:`w`.
      opt_state: :math:`s`.
      hyperparams: :math:`\lambda` (integer leaves are held fixed).
      batch: :math:`D`.
      tangents: ``(w_dot, s_dot, lam_dot)`` shaped like ``params``,
        ``opt_state`` (integer leaves: ``float0`` zeros, see
        :func:`tangent_zeros`) and the *floating part* of ``hyperparams``
        (:func:`gradhpo.utils.tree.partition_float`, ``None`` for integer
        leaves).
      guard: keep :math:`(w, s)` and their tangents when the inner gradient
        is non-finite.

    Returns:
      ``(step, (w_dot_plus, s_dot_plus))``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo.utils import gradients as gr
      >>> loss = lambda w, lam, b: 0.5 * jnp.sum(w ** 2) - lam * jnp.sum(w)
      >>> tx = optax.sgd(0.1)      # w+ = w - 0.1 (w - lam): dw+/dlam = 0.1
      >>> out, (w_dot, _) = gr.inner_step_jvp(
      ...     loss, tx, jnp.ones(2), tx.init(jnp.ones(2)), jnp.array(2.0),
      ...     None, (jnp.zeros(2), gr.tangent_zeros(tx.init(jnp.ones(2))),
      ...            jnp.array(1.0)))
      >>> print(w_dot, out.params)
      [0.1 0.1] [1.1 1.1]
    """
    lam_f, lam_rest = tu.partition_float(hyperparams)
    w_dot, s_dot, lam_dot = tangents

    def phi(w, s, lam):
        out = inner_step(train_loss, inner_optimizer, w, s,
                         tu.combine(lam, lam_rest), batch)
        return (out.params, out.opt_state), (out.loss, out.finite)

    (new_params, new_state), (d_params, d_state), (loss, finite) = jax.jvp(
        phi, (params, opt_state, lam_f), (w_dot, s_dot, lam_dot),
        has_aux=True)
    step = InnerStep(new_params, new_state, loss, finite)
    if guard:
        step = guard_inner_step(step, params, opt_state)
        d_params = tu.select(finite, d_params, w_dot)
        d_state = jax.tree.map(
            lambda new, old: new if getattr(new, "dtype", None) ==
            jax.dtypes.float0 else jnp.where(finite, new, old),
            d_state, s_dot)
    return step, (d_params, d_state)


def hvp(train_loss: LossFn, params: PyTree, hyperparams: PyTree,
        batch: DataBatch, vector: PyTree) -> PyTree:
    r"""Hessian-vector product :math:`H v` with :math:`H = \partial^2
    L_{tr} / \partial w^2`, forward-over-reverse (a JVP of the gradient).

    Its cost is about two gradient evaluations and its memory that of one;
    :math:`H` is never formed.

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)`.
      params: :math:`w`.
      hyperparams: :math:`\lambda`.
      batch: :math:`D`.
      vector: :math:`v`, shaped like ``params``.

    Returns:
      :math:`H v`, shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import gradients as gr
      >>> loss = lambda w, lam, b: jnp.sum(lam * w ** 2)      # H = 2 lam I
      >>> gr.hvp(loss, jnp.ones(2), 3.0, None, jnp.array([1.0, -1.0]))
      Array([ 6., -6.], dtype=float32)
    """
    return jax.jvp(lambda w: jax.grad(train_loss)(w, hyperparams, batch),
                   (params,), (vector,))[1]


def mixed_product(train_loss: LossFn, params: PyTree, hyperparams: PyTree,
                  batch: DataBatch, vector: PyTree) -> PyTree:
    r"""The mixed product :math:`M^\top v` with :math:`M =
    \partial^2 L_{tr} / \partial w\, \partial\lambda`, exactly.

    .. math::

       M^\top v = \nabla_\lambda \langle \nabla_w L_{tr}(w, \lambda), v
       \rangle = \frac{d}{d\epsilon} \nabla_\lambda L_{tr}(w + \epsilon v,
       \lambda) \Big|_{\epsilon = 0},

    the right-hand form by forward-over-reverse (a JVP of
    :math:`\nabla_\lambda L_{tr}` along :math:`v` in :math:`w`), about two
    gradient evaluations. :func:`finite_difference_mixed_product` is the
    DARTS approximation of the same quantity.

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)`.
      params: :math:`w`.
      hyperparams: :math:`\lambda`.
      batch: :math:`D`.
      vector: :math:`v`, shaped like ``params``.

    Returns:
      :math:`M^\top v`, shaped like ``hyperparams`` (zeros for integer
      leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import gradients as gr
      >>> loss = lambda w, lam, b: 0.5 * lam * jnp.sum(w ** 2)  # M = w
      >>> float(gr.mixed_product(loss, jnp.array([1.0, 2.0]), 0.5, None,
      ...                        jnp.array([3.0, 1.0])))
      5.0
    """
    lam_f, lam_rest = tu.partition_float(hyperparams)
    grad_lam = jax.grad(
        lambda lam, w: train_loss(w, tu.combine(lam, lam_rest), batch))
    _, out = jax.jvp(lambda w: grad_lam(lam_f, w), (params,), (vector,))
    return tu.fill_none(out, hyperparams)


def curvature_products(train_loss: LossFn, params: PyTree,
                       hyperparams: PyTree, batch: DataBatch,
                       vector: PyTree) -> Tuple[PyTree, PyTree]:
    r""":math:`(H v, M^\top v)` from one forward-over-reverse product.

    Both are the derivative along :math:`v` (in :math:`w`) of the joint
    gradient :math:`(\nabla_w L_{tr}, \nabla_\lambda L_{tr})`, so one JVP
    gives both for about the cost of one of :func:`hvp` and
    :func:`mixed_product` (whose values it equals). The implicit
    hypergradient needs both at the solution of its linear solve.

    Returns:
      ``(H v, M^T v)``, shaped like ``params`` and ``hyperparams`` (zeros
      for integer leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import gradients as gr
      >>> loss = lambda w, lam, b: 0.5 * lam * jnp.sum(w ** 2)
      >>> h_v, m_v = gr.curvature_products(loss, jnp.array([1.0, 2.0]), 0.5,
      ...                                  None, jnp.array([3.0, 1.0]))
      >>> print(h_v, float(m_v))                  # H = 0.5 I, M = w
      [1.5 0.5] 5.0
    """
    lam_f, lam_rest = tu.partition_float(hyperparams)
    grads = jax.grad(
        lambda w, lam: train_loss(w, tu.combine(lam, lam_rest), batch),
        argnums=(0, 1))
    _, (h_v, m_v) = jax.jvp(lambda w: grads(w, lam_f), (params,), (vector,))
    return h_v, tu.fill_none(m_v, hyperparams)


def outer_update(outer_optimizer: optax.GradientTransformation,
                 hypergradient: PyTree, outer_opt_state: PyTree,
                 hyperparams: PyTree) -> Tuple[PyTree, PyTree]:
    """Applies the outer optimizer to the floating hyperparameters only.

    Non-floating leaves (integer choices) are carried unchanged; the outer
    state is built on the floating part (see :func:`init_outer_state`).

    Returns:
      ``(new_hyperparams, new_outer_opt_state)``.
    """
    lam_f, lam_rest = tu.partition_float(hyperparams)
    h_f, _ = tu.partition_float(hypergradient)
    h_f = jax.tree.map(lambda h, x: h.astype(x.dtype), h_f, lam_f)
    updates, new_state = outer_optimizer.update(h_f, outer_opt_state, lam_f)
    return tu.combine(optax.apply_updates(lam_f, updates), lam_rest), new_state


def init_outer_state(outer_optimizer: optax.GradientTransformation,
                     hyperparams: PyTree) -> PyTree:
    """Outer optimizer state for the floating hyperparameters."""
    return outer_optimizer.init(tu.partition_float(hyperparams)[0])
