r"""Generalized greedy hypergradients over a horizon, with an optional top-k
subset update.

Each step takes :math:`T` (``horizon``) inner steps with the hyperparameters
held at :math:`\lambda` and forms the discounted sum of one-step (T1–T2)
terms of the generalized greedy method (ICLR 2025 submission #6297, eq. 6):

.. math::

   w_t &= \Phi(w_{t-1}, s_{t-1}, \lambda; D_t), \qquad
   B_t = \frac{\partial w_t}{\partial\lambda}, \qquad
   a_t = \nabla_w L_{val}(w_t, \lambda; V_t), \\
   \hat d_\lambda &= \nabla_\lambda L_{val}(w_T, \lambda; V_T)
       + \sum_{t=1}^{T} \gamma^{T-t} B_t^\top a_t .

This is reverse-mode differentiation through the horizon with every
:math:`\partial w_{k}/\partial w_{k-1}` replaced by :math:`\gamma I` and the
final validation gradient replaced by the current one. The sum is accumulated
online, :math:`G_t = \gamma G_{t-1} + B_t^\top a_t`, so
memory is :math:`O(P + H)` whatever :math:`T`, and :math:`\gamma = 0` is
exactly the T1–T2 term of the last step (no :math:`0^0` appears).

The outer update :math:`u` of the outer optimizer (fed the full
hypergradient) is then optionally restricted to the ``top_k`` best scoring
coordinates and projected on a box:

.. math::

   \lambda \leftarrow \Pi_{[l, h]}\big(\lambda + m \odot u\big),
   \qquad m = 1_{S}, \quad S = \operatorname{top-k}(\text{score}).
"""

from typing import Any, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from gradhpo.core.base import BilevelOptimizer, compiled
from gradhpo.core.state import BilevelState, float_dtype
from gradhpo.utils.types import DataBatch, InnerOptimizer, LossFn, PyTree
from gradhpo.utils import cost
from gradhpo.utils import gradients as gr
from gradhpo.utils import tree as tu
from gradhpo.utils import validation as val

SCORES = ("magnitude", "predicted_improvement")


class GreedyState(NamedTuple):
    """:class:`Greedy`'s own state.

    Attributes:
      selected: with ``top_k``, a pytree of booleans shaped like the
        hyperparameters: ``True`` where the last outer update actually moved
        the coordinate (selected, and not held at a bound); all ``False``
        after a skipped update. ``None`` without ``top_k``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def val_loss(w, lam, batch):    # the hypergradient is (1, -3, 2)
      ...     return jnp.dot(jnp.array([1.0, -3.0, 2.0]), lam)
      >>> opt = gh.Greedy(lambda w, lam, b: jnp.sum(w ** 2), val_loss,
      ...                 optax.sgd(0.1), optax.sgd(0.1), top_k=2)
      >>> state = opt.step(opt.init(jnp.ones(1), jnp.ones(3)), None, None)
      >>> state.algorithm_state.selected
      Array([False,  True,  True], dtype=bool)
      >>> int(state.metadata["selected"])
      2
    """

    selected: Optional[PyTree] = None


class Greedy(BilevelOptimizer):
    r"""Generalized greedy hypergradient descent over a horizon of inner steps.

    .. math::

       \hat d_\lambda = \nabla_\lambda L_{val}(w_T, \lambda; V_T)
           + \sum_{t=1}^{T} \gamma^{T-t}\,
             \Big(\frac{\partial w_t}{\partial\lambda}\Big)^\top
             \nabla_w L_{val}(w_t, \lambda; V_t),
       \qquad \lambda \leftarrow \Pi\big(\lambda + m\odot
       \mathrm{outer}(\hat d_\lambda)\big).

    One :meth:`step` takes ``horizon`` inner steps (continuing from
    ``state.params``; for the paper's episodic mode, reset ``params`` between
    steps) and one outer update. The outer optimizer always sees the full
    hypergradient, so its moments evolve for every coordinate; the top-k,
    ``trainable`` and box restrictions act on the update it produces. A
    non-finite inner gradient skips that inner step (its :math:`B_t` counts
    as zero) and a non-finite hypergradient skips the outer update; each skip
    increments ``metadata["nonfinite_count"]``. When every inner step of the
    horizon is skipped, the outer update is skipped too (``params``,
    ``hyperparams`` and both optimizer states unchanged; the count grows by
    ``horizon + 1``), as in T1–T2. ``metadata["train_loss"]`` is
    the mean of the pre-step training losses over the horizon,
    ``metadata["val_loss"]`` is :math:`L_{val}(w_T; V_T)`, and with ``top_k``
    ``metadata["selected"]`` counts the coordinates the outer update
    actually moved (0 when skipped; a selected coordinate held at its bound
    does not count) and ``state.algorithm_state.selected``
    (:class:`GreedyState`) marks them, shaped like the hyperparameters.

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)` (see
        :class:`~gradhpo.BilevelOptimizer`).
      val_loss: :math:`L_{val}(w, \lambda; V)`.
      inner_optimizer: optax transformation of :math:`w`, or a callable of
        the hyperparameters returning one.
      outer_optimizer: optax transformation of :math:`\lambda`.
      horizon: :math:`T`, inner steps per call. With ``horizon > 1`` every
        leaf of ``train_batch`` and ``val_batch`` has a leading axis of
        length :math:`T` (slice :math:`t` is :math:`D_t`, resp.
        :math:`V_t`); with ``horizon == 1`` batches are passed as they are.
      gamma: :math:`\gamma \in [0, 1]`, the discount of older one-step terms
        (0: T1–T2 at the last step; the paper reports 0.9).
      top_k: if set, only the ``top_k`` best scoring coordinates (over all
        floating hyperparameter leaves, flattened) move; ``None`` moves all.
      score: ``"magnitude"`` ranks :math:`|h_i|`; ``"predicted_improvement"``
        ranks :math:`-h_i\Delta_i` with :math:`\Delta_i` the projected step
        of coordinate :math:`i` (0 for a coordinate pinned at a bound and
        pushed outward, which then takes no slot).
      bounds: ``(lower, upper)``, each a scalar, ``None`` (unbounded) or a
        pytree shaped like the hyperparameters (or a prefix of it, ``None``
        leaves unbounded; array leaves broadcast against the leaf). The
        hyperparameters are clipped after every update.
      trainable: a pytree of booleans (or boolean arrays) shaped like the
        hyperparameters, or a prefix of it; ``False`` freezes the entries
        (their hypergradient is still reported). Integer leaves are always
        frozen.
      unroll: passed to :func:`jax.lax.scan` over the horizon: ``1`` (a
        loop, compiled once whatever the horizon), an int :math:`k` (k
        inner steps per loop iteration) or ``True`` (fully unrolled; compile
        time grows with the horizon). On CPU, XLA does not lower
        convolutions inside a loop to its fast kernels (jax issue #12868):
        a convolutional model on CPU runs about 20x faster per inner step
        with ``unroll=True``. Memory stays :math:`O(P + H)` either way.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> G = jnp.array([1.0, 0.5])
      >>> def train_loss(w, alpha, batch):
      ...     return 0.5 * jnp.sum(G * (w - alpha) ** 2)
      >>> def val_loss(w, alpha, batch):
      ...     return jnp.sum(w ** 2) + 10 * jnp.sum(jnp.sin(w) ** 2)
      >>> opt = gh.Greedy(train_loss, val_loss, optax.sgd(0.1),
      ...                 optax.sgd(0.1), horizon=5, gamma=0.9)
      >>> state = opt.init(jnp.array([2.0, 2.0]), jnp.array([1.0, 1.0]))
      >>> batches = jnp.zeros(5)      # the losses ignore the data
      >>> h = opt.compute_hypergradient(state, batches, batches)
      >>> print(f"{h[0]:.4f} {h[1]:.4f}")
      0.2282 -0.3202
      >>> int(opt.step(state, batches, batches).step)
      1

    References:
      Anonymous, *Generalized Greedy Gradient-Based Hyperparameter
      Optimization*, ICLR 2025 submission #6297 (OpenReview).

      Luketina et al, `Scalable Gradient-Based Tuning of Continuous
      Regularization Hyperparameters <https://arxiv.org/abs/1511.06727>`_,
      2016.
    """

    def __init__(self, train_loss: LossFn, val_loss: LossFn,
                 inner_optimizer: InnerOptimizer,
                 outer_optimizer: optax.GradientTransformation, *,
                 horizon: int = 1, gamma: float = 0.9,
                 top_k: Optional[int] = None, score: str = "magnitude",
                 bounds: Optional[Tuple[Any, Any]] = None,
                 trainable: Optional[PyTree] = None,
                 unroll: Union[int, bool] = 1) -> None:
        super().__init__(train_loss, val_loss, inner_optimizer,
                         outer_optimizer)
        self.horizon = val.check_int(horizon, "horizon", minimum=1)
        self.gamma = val.check_real(gamma, "gamma", low=0.0, high=1.0)
        self.top_k = (None if top_k is None
                      else val.check_int(top_k, "top_k", minimum=1))
        val.check_choice(score, "score", SCORES)
        self.score = score
        self.bounds = val.check_bounds(bounds)
        self.trainable = trainable
        self.unroll = (unroll if isinstance(unroll, bool)
                       else val.check_int(unroll, "unroll", minimum=1))
        # the base class checks the leading step axis of the batches
        steps = self.horizon if self.horizon > 1 else None
        self._train_steps = self._val_steps = steps

    # -- per-leaf options, resolved against the hyperparameter structure ----

    def _leaf_masks(self, hyperparams: PyTree
                    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """Flat lower/upper bounds and trainable mask of the floating leaves.

        Built at trace time from Python options, so they are constants.
        """
        lower, upper = (None, None) if self.bounds is None else self.bounds
        dtype = ravel_pytree(tu.partition_float(hyperparams)[0])[0].dtype
        return (
            tu.flat_float_option(lower, hyperparams, -jnp.inf, dtype,
                                 "bounds[0]"),
            tu.flat_float_option(upper, hyperparams, jnp.inf, dtype,
                                 "bounds[1]"),
            tu.flat_float_option(self.trainable, hyperparams, True, bool,
                                 "trainable"))

    state_type = GreedyState

    def init(self, params: PyTree, hyperparams: PyTree, *,
             key: Optional[jax.Array] = None) -> BilevelState:
        val.check_key(key)   # Greedy draws no random numbers
        state = self.initial_state(
            params, hyperparams,
            metadata=(None if self.top_k is None
                      else {"selected": jnp.zeros((), jnp.int32)}))
        if self.top_k is not None:
            state = state.replace(algorithm_state=GreedyState(
                jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), bool),
                             state.hyperparams)))
        else:
            state = state.replace(algorithm_state=GreedyState())
        # (the base checked hyperparams has a floating leaf)
        for i, side in enumerate(self.bounds or ()):
            val.check_option_shapes(side, state.hyperparams, f"bounds[{i}]")
        val.check_option_shapes(self.trainable, state.hyperparams,
                                "trainable")
        for flag in tu.broadcast_prefix(self.trainable, state.hyperparams,
                                        "trainable"):
            if flag is not None and np.asarray(flag).dtype != bool:
                raise TypeError(
                    "trainable must hold booleans (True to tune, False to "
                    f"freeze) on every leaf, got {flag!r}.")
        lo, hi, _ = self._leaf_masks(state.hyperparams)
        if not np.all(np.asarray(lo <= hi)):
            raise ValueError(
                "bounds must satisfy lower <= upper on every entry, got "
                f"{self.bounds!r}.")
        return state

    def check_state(self, state: BilevelState, train_batch: DataBatch,
                    val_batch: DataBatch) -> None:
        super().check_state(state, train_batch, val_batch)
        if (self.top_k is None) != (state.algorithm_state.selected is None) \
                or (self.top_k is not None
                    and "selected" not in state.metadata):
            raise ValueError(
                "state was built by a Greedy with"
                + ("out" if self.top_k is not None else "")
                + " top_k; build it with this optimizer's init.")

    # -- hypergradient ------------------------------------------------------

    def _hypergradient(self, state: BilevelState, train_batch: DataBatch,
                       val_batch: DataBatch):
        """Runs the horizon; returns the hypergradient and the step's output.

        Returns:
          ``(h, inner, val_loss, skipped)``: ``inner`` holds the guarded
          :math:`w_T, s_T` and the mean training loss; ``skipped`` counts
          the non-finite inner steps.
        """
        lam, fdt = state.hyperparams, float_dtype()

        def body(carry, batches):
            w, s, acc, loss_sum, skipped, _, _ = carry
            d_t, v_t = batches
            # guarded inside the update: a non-finite gradient keeps (w, s)
            inner, pullback = gr.inner_step_vjp(
                self.train_loss, self.inner_optimizer, w, s, lam, d_t,
                guard=True)
            value, a_t, direct = gr.value_and_grads(
                self.val_loss, inner.params, lam, v_t)
            # A skipped step is the identity map: its B_t is zero. The select
            # also keeps a NaN pullback of a bad inner gradient out of G.
            term = tu.select(inner.finite, pullback(a_t), tu.zeros_like(acc))
            acc = tu.axpy(self.gamma, acc, term)   # G <- gamma G + B_t^T a_t
            return (inner.params, inner.opt_state, acc,
                    loss_sum + inner.loss.astype(fdt),
                    skipped + jnp.logical_not(inner.finite).astype(jnp.int32),
                    value.astype(fdt), direct), None

        zeros = tu.zeros_like(lam)
        carry = (state.params, state.inner_opt_state, zeros,
                 jnp.zeros((), fdt), jnp.zeros((), jnp.int32),
                 jnp.zeros((), fdt), zeros)
        if self.horizon == 1:
            carry, _ = body(carry, (train_batch, val_batch))
        else:
            carry, _ = lax.scan(body, carry, (train_batch, val_batch),
                                length=self.horizon, unroll=self.unroll)
        w, s, acc, loss_sum, skipped, val_loss, direct = carry
        # the direct term once, at w_T on V_T (the last iteration's value)
        hypergradient = jax.tree.map(lambda a, b: a + b, direct, acc)
        # every step was guarded in the scan; when all of them were skipped
        # the outer update is skipped too (as T1-T2 does), so a fully
        # poisoned horizon moves nothing (not even the outer momentum)
        inner = gr.InnerStep(w, s, loss_sum / self.horizon,
                             skipped < self.horizon)
        return hypergradient, inner, val_loss, skipped

    # -- masked, projected outer update -------------------------------------

    def _outer(self, state: BilevelState, hypergradient: PyTree
               ) -> Tuple[PyTree, PyTree, jax.Array]:
        """The outer update restricted to the selected coordinates, projected.

        Returns ``(new_hyperparams, new_outer_opt_state, {})``.
        """
        lam = state.hyperparams
        proposed, new_outer = gr.outer_update(
            self.outer_optimizer, hypergradient, state.outer_opt_state, lam)
        if self.top_k is None and self.bounds is None and (
                self.trainable is None):
            # nothing to mask or project: skip the passes over the
            # flattened hyperparameters
            return proposed, new_outer, {}
        lam_f, lam_rest = tu.partition_float(lam)
        flat_lam, unravel = ravel_pytree(lam_f)
        flat_new = ravel_pytree(tu.partition_float(proposed)[0])[0]
        flat_h = ravel_pytree(
            tu.partition_float(hypergradient)[0])[0].astype(flat_lam.dtype)
        lo, hi, mask = self._leaf_masks(lam)
        if self.top_k is not None:
            if self.score == "magnitude":
                score = jnp.abs(flat_h)
            else:
                score = -flat_h * (jnp.clip(flat_new, lo, hi) - flat_lam)
            score = jnp.where(mask, score, -jnp.inf)
            _, idx = lax.top_k(score, min(self.top_k, flat_lam.size))
            mask = mask & jnp.zeros(flat_lam.shape, bool).at[idx].set(True)
        flat_out = jnp.clip(jnp.where(mask, flat_new, flat_lam), lo, hi)
        return tu.combine(unravel(flat_out), lam_rest), new_outer, {}

    @compiled
    def compute_hypergradient(self, state: BilevelState,
                              train_batch: DataBatch,
                              val_batch: DataBatch) -> PyTree:
        return self._hypergradient(state, train_batch, val_batch)[0]

    @compiled
    def step(self, state: BilevelState, train_batch: DataBatch,
             val_batch: DataBatch) -> BilevelState:
        hypergradient, inner, val_loss, skipped = self._hypergradient(
            state, train_batch, val_batch)
        # per inner step: its gradient, its VJP, one validation gradient
        steps = 1 if self.horizon > 1 else 0
        evals = self.horizon * (1 + cost.SECOND_ORDER + cost.relative_size(
            val_batch, train_batch, steps))
        new = self.finish_step(state, inner, hypergradient, val_loss,
                               grad_evals=evals, outer=self._outer,
                               inner_skips=skipped, inner_guarded=True)
        if self.top_k is None:
            return new
        # what actually moved (a skipped update or a coordinate held at a
        # bound moves nothing), leaf by leaf
        moved = jax.tree.map(jnp.not_equal, new.hyperparams,
                             state.hyperparams)
        count = sum(jnp.sum(m, dtype=jnp.int32)
                    for m in jax.tree.leaves(moved))
        return new.replace(
            metadata=dict(new.metadata, selected=count),
            algorithm_state=GreedyState(moved))
