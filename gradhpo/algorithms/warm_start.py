r"""One-shot hypergradient warm starts (OHGW) for bandit-style HPO.

Before a multi-fidelity scheduler (ASHA, Hyperband, PASHA) trains a sampled
configuration :math:`\psi`, nudge it once along a hypergradient and train the
nudged :math:`\psi'` instead. Read literally ("take
:math:`\partial L_{tr}/\partial\psi` on one mini-batch") the rule gives zero
for the learning rate and momentum and "shrink every regulariser" for the
rest (at :math:`w_0` the training loss does not depend on the learning rate
yet, and a regulariser only adds to it), so gradhpo differentiates a
:math:`K`-step lookahead evaluated on held-out data:

.. math::

   (w_k, s_k) &= \Phi(w_{k-1}, s_{k-1}, \psi; B_k), \quad k = 1..K, \\
   J(\psi) &= L_{val}(w_K, \psi; V), \qquad
   g = \nabla_\psi J(\psi), \\
   \psi &\leftarrow \Pi_{[l, u]}\big(\psi - \eta_h\, g\big),

repeated ``num_steps`` times from the same :math:`(w_0, s_0)` and batches.
:math:`K = 1` is the T1–T2 (and Baydin) hypergradient at :math:`w_0`;
:math:`K \ge 2` is needed for momentum, whose buffer is zero at step 1.
"""

from typing import Any, Callable, NamedTuple, Optional, Tuple

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

DIRECTIONS = ("hypergradient", "random")


class OneShotWarmStartState(NamedTuple):
    r""":class:`OneShotWarmStart`'s own state, written by each
    :meth:`~OneShotWarmStart.step`.

    Attributes:
      key: the PRNG key of the random direction (``direction="random"``);
        each call splits it and keeps the first half. Carried, unused,
        with ``direction="hypergradient"``.
      hypergradient: :math:`g_0 = \nabla_\psi J(\psi_0)` at the
        hyperparameters on entry of the last call, a pytree shaped like the
        hyperparameters (zeros for integer leaves; NaN before the first
        call).
      delta: :math:`\psi_N - \psi_0`, the change the last call applied,
        shaped like the hyperparameters.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def loss(w, hp, batch):
      ...     return 0.5 * (w - batch) ** 2
      >>> opt = gh.OneShotWarmStart(loss, loss,
      ...                           lambda hp: optax.sgd(hp["lr"]),
      ...                           step_size=0.1)
      >>> state = opt.init(jnp.array(1.0), {"lr": 0.5})
      >>> own = opt.step(state, jnp.array(0.0), jnp.array(0.0)).algorithm_state
      >>> print(f"{own.hypergradient['lr']:.3f} {own.delta['lr']:.3f}")
      -0.500 0.050
    """

    key: jax.Array
    hypergradient: PyTree
    delta: PyTree


class OneShotWarmStart(BilevelOptimizer):
    r"""One-shot hypergradient warm start (OHGW) with a lookahead.

    .. math::

       J(\psi) = L_{val}\big(\Phi^K(w_0, s_0, \psi; B_1..B_K), \psi; V\big),
       \qquad \psi_{j+1} = \Pi_{[l, u]}\big(\psi_j + \Delta_j\big),
       \quad \Delta_j = -\eta_h \nabla_\psi J(\psi_j),

    for :math:`j = 0..N-1` (``num_steps``). Every hyper-step recomputes the
    gradient at the new :math:`\psi_j` from the same :math:`w_0, s_0` and
    the same batches; :meth:`step` leaves ``params`` and
    ``inner_opt_state`` untouched (the scheduler trains from there with
    :math:`\psi_N`). The gradient is reverse-mode differentiation through
    all :math:`K` inner steps (a ``lax.scan``), so its memory is
    :math:`O(K \cdot P)`; keep :math:`K` small.

    With an outer optimizer, :math:`\Delta_j` is its update for the gradient
    (``step_size`` is then unused) and its state advances once per applied
    hyper-step. ``direction="random"`` is the paper's control: :math:`\Delta_j`
    is replaced by :math:`\lVert\Delta_j\rVert\, d_j/\lVert d_j\rVert`, with
    :math:`d_j` standard normal over the floating hyperparameters (a fresh
    key per hyper-step, split from ``state.algorithm_state.key``, which
    advances
    every call), so each random step has exactly the length the hypergradient
    step would have had at the same :math:`\psi_j` (an outer optimizer's
    state then advances exactly as along the hypergradient). A non-finite
    gradient (from a non-finite inner gradient or validation loss anywhere
    in the lookahead) skips that hyper-step (:math:`\psi` and the outer
    state unchanged) and increments ``metadata["nonfinite_count"]``.

    After :meth:`step` (all at :math:`\psi_0`, the hyperparameters on
    entry, unless stated), ``state.metadata`` holds ``val_loss``
    :math:`= J(\psi_0)`; ``train_loss``, the mean training loss over the
    :math:`K` lookahead steps; ``hypergradient_norm`` :math:`= \lVert
    g_0\rVert`; ``delta_norm`` :math:`= \lVert\psi_N - \psi_0\rVert`; and
    ``clipped``, whether the projection changed any coordinate of an
    applied hyper-step of this call. ``state.algorithm_state``
    (:class:`OneShotWarmStartState`) holds :math:`g_0` and
    :math:`\psi_N - \psi_0` as pytrees shaped like the hyperparameters.
    :meth:`compute_hypergradient` returns :math:`g_0`.

    Args:
      train_loss: :math:`L_{tr}(w, \psi; B)` (see
        :class:`~gradhpo.BilevelOptimizer`), including the regularisers,
        label smoothing and augmentation :math:`\psi` controls.
      val_loss: :math:`L_{val}(w, \psi; V)`, usually plain cross-entropy on
        held-out data. Use a validation batch, or else the *next* training
        batch :math:`B_{K+1}`; never :math:`B_1` (on the same batch a
        larger learning rate always looks better).
      inner_optimizer: optax transformation of :math:`w`, or a callable
        ``hyperparams -> GradientTransformation`` (makes the learning rate,
        momentum and decoupled weight decay part of :math:`\psi`).
      outer_optimizer: ``None`` (plain step :math:`-\eta_h g`, the paper) or
        an optax transformation of :math:`\psi`.
      step_size: :math:`\eta_h > 0`, the hyper step size (paper: 1e-3);
        unused with an outer optimizer.
      num_steps: :math:`N \ge 1`, hyper-steps per call (paper: 1; ablation
        3).
      lookahead: :math:`K \ge 1`, inner steps in :math:`J`. With
        :math:`K > 1` every leaf of ``train_batch`` has a leading axis of
        length :math:`K` (slice :math:`k` is :math:`B_{k+1}`); with
        :math:`K = 1` it is passed as it is. ``val_batch`` is always one
        batch :math:`V`, without a leading axis.
      direction: ``"hypergradient"`` or ``"random"`` (the same-length random
        control).
      bounds: ``None`` or ``(lower, upper)``, each a scalar, ``None``
        (unbounded) or a pytree shaped like the hyperparameters (``None``
        leaves unbounded). :math:`\psi` is clipped after every hyper-step.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def train_loss(w, hp, batch):
      ...     x, y = batch
      ...     return (0.5 * (w * x - y) ** 2
      ...             + 0.5 * jnp.exp(hp["log_wd"]) * w ** 2)
      >>> def val_loss(w, hp, batch):
      ...     x, y = batch
      ...     return 0.5 * (w * x - y) ** 2
      >>> opt = gh.OneShotWarmStart(
      ...     train_loss, val_loss,
      ...     lambda hp: optax.sgd(jnp.exp(hp["log_lr"])), step_size=1e-3)
      >>> hp = {"log_lr": jnp.log(0.1), "log_wd": jnp.log(0.1)}
      >>> state = opt.init(jnp.array(1.0), hp)
      >>> batch = (jnp.array(1.0), jnp.array(0.0))
      >>> g = opt.compute_hypergradient(state, batch, batch)
      >>> print(f"{g['log_lr']:.4f} {g['log_wd']:.4f}")
      -0.0979 -0.0089
      >>> new = opt.step(state, batch, batch)
      >>> print(f"{new.metadata['val_loss']:.5f}")  # J = (0.89 ** 2) / 2
      0.39605
      >>> bool(new.algorithm_state.delta["log_lr"] > 0)
      True

    References:
      Anonymous, *One-Shot Hyper-Gradient Warm-Starts for Bandit-Style
      Hyperparameter Optimisation* (no public code).

      Luketina et al, `Scalable Gradient-Based Tuning of Continuous
      Regularization Hyperparameters <https://arxiv.org/abs/1511.06727>`_,
      2016.

      Baydin et al, `Online Learning Rate Adaptation with Hypergradient
      Descent <https://arxiv.org/abs/1703.04782>`_, 2018.
    """

    def __init__(self, train_loss: LossFn, val_loss: LossFn,
                 inner_optimizer: InnerOptimizer,
                 outer_optimizer: Optional[optax.GradientTransformation]
                 = None, *, step_size: float = 1e-3, num_steps: int = 1,
                 lookahead: int = 1, direction: str = "hypergradient",
                 bounds: Optional[Tuple[Any, Any]] = None) -> None:
        super().__init__(train_loss, val_loss, inner_optimizer,
                         outer_optimizer, allow_no_outer=True)
        self.step_size = val.check_real(step_size, "step_size", low=0.0,
                                        low_open=True)
        self.num_steps = val.check_int(num_steps, "num_steps", minimum=1)
        self.lookahead = val.check_int(lookahead, "lookahead", minimum=1)
        val.check_choice(direction, "direction", DIRECTIONS)
        self.direction = direction
        self.bounds = val.check_bounds(bounds)
        # the base class checks the leading lookahead axis of train_batch
        self._train_steps = self.lookahead if self.lookahead > 1 else None

    def _flat_bounds(self, hyperparams: PyTree, dtype: Any
                     ) -> Tuple[jax.Array, jax.Array]:
        """Lower and upper bounds of the flat floating hyperparameters
        (constants built at trace time from the Python option)."""
        lower, upper = (None, None) if self.bounds is None else self.bounds
        return (tu.flat_float_option(lower, hyperparams, -jnp.inf, dtype,
                                     "bounds[0]"),
                tu.flat_float_option(upper, hyperparams, jnp.inf, dtype,
                                     "bounds[1]"))

    state_type = OneShotWarmStartState

    def init(self, params: PyTree, hyperparams: PyTree, *,
             key: Optional[jax.Array] = None) -> BilevelState:
        key = val.check_key(key)
        state = self.initial_state(
            params, hyperparams,
            metadata={"delta_norm": jnp.zeros((), float_dtype()),
                      "clipped": jnp.zeros((), bool)})
        lam_f = tu.partition_float(state.hyperparams)[0]
        self._check_bounds(state.hyperparams)
        nan = tu.fill_none(
            jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype),
                         lam_f), state.hyperparams)
        return state.replace(algorithm_state=OneShotWarmStartState(
            key=key, hypergradient=nan,
            delta=tu.zeros_like(state.hyperparams)))

    def check_state(self, state: BilevelState, train_batch: DataBatch,
                    val_batch: DataBatch) -> None:
        super().check_state(state, train_batch, val_batch)
        if self.lookahead == 1 or not jax.tree.leaves(val_batch):
            return
        # V is one batch: a val_batch laid out like train_batch (with the
        # lookahead axis) would be averaged over K copies silently
        if jax.tree.structure(val_batch) == jax.tree.structure(train_batch)\
                and all(jnp.shape(t)[:1] == (self.lookahead,)
                        for t in jax.tree.leaves(train_batch)) \
                and all(jnp.ndim(v) == jnp.ndim(t) for v, t in zip(
                    jax.tree.leaves(val_batch),
                    jax.tree.leaves(train_batch))):
            raise ValueError(
                f"val_batch must be one validation batch V without the "
                f"lookahead axis (only train_batch carries it, length "
                f"{self.lookahead}); its leaves have the ndim of "
                "train_batch's leaves, "
                f"{[jnp.ndim(v) for v in jax.tree.leaves(val_batch)]}.")

    def _check_bounds(self, hyperparams: PyTree) -> None:
        """Checks ``bounds`` against the hyperparameters' tree, once per
        tree signature and configuration: the Optuna helper calls ``init``
        for every trial, and the check ends in a device-to-host transfer."""
        if self.bounds is None:
            return
        key = ("bounds", tu.tree_signature(hyperparams))
        cache = self.host_cache()
        if key in cache:
            return
        for i, side in enumerate(self.bounds):
            val.check_option_shapes(side, hyperparams, f"bounds[{i}]")
        flat = ravel_pytree(tu.partition_float(hyperparams)[0])[0]
        lo, hi = self._flat_bounds(hyperparams, flat.dtype)
        if not np.all(np.asarray(lo <= hi)):
            raise ValueError("bounds must satisfy lower <= upper on every "
                             f"entry, got {self.bounds!r}.")
        cache.add(key)

    # -- the lookahead objective J(psi) and its gradient ---------------------

    def _value_and_grad(self, state: BilevelState, train_batch: DataBatch,
                        val_batch: DataBatch) -> Tuple[Callable, PyTree,
                                                       PyTree]:
        """``lam -> ((J, mean train loss), dJ/dlam)`` on the floating
        hyperparameter leaves ``lam`` (a pytree), with their initial value
        and the non-floating rest."""
        lam_f, rest = tu.partition_float(state.hyperparams)

        def objective(lam_f):
            lam = tu.combine(lam_f, rest)

            def inner(carry, batch):
                out = gr.inner_step(self.train_loss, self.inner_optimizer,
                                    carry[0], carry[1], lam, batch)
                return (out.params, out.opt_state), out.loss
            carry = (state.params, state.inner_opt_state)
            if self.lookahead == 1:
                (w, _), losses = inner(carry, train_batch)
            else:
                # differentiated end to end: residuals of all K steps are
                # kept, O(K P) memory (K is small by design); unrolled,
                # because on CPU XLA does not lower convolutions inside a
                # loop to its fast kernels (jax#12868)
                (w, _), losses = lax.scan(inner, carry, train_batch,
                                          unroll=True)
            return self.val_loss(w, lam, val_batch), jnp.mean(losses)

        return jax.value_and_grad(objective, has_aux=True), lam_f, rest

    @compiled
    def compute_hypergradient(self, state: BilevelState,
                              train_batch: DataBatch,
                              val_batch: DataBatch) -> PyTree:
        grad_fn, lam_f, _ = self._value_and_grad(
            state, train_batch, val_batch)
        _, g = grad_fn(lam_f)
        return tu.fill_none(g, state.hyperparams)

    # -- the hyper-steps -----------------------------------------------------

    def _proposal(self, g: PyTree, lam_f: PyTree, outer_state: PyTree,
                  rest: PyTree, like: PyTree) -> Tuple[PyTree, PyTree]:
        """The change the hypergradient direction would apply at ``lam_f``
        (leaf by leaf: no pass over a flattened copy)."""
        if self.outer_optimizer is None:
            return tu.scale(g, -self.step_size), outer_state
        new_lam, new_outer = gr.outer_update(
            self.outer_optimizer, tu.fill_none(g, like), outer_state,
            tu.combine(lam_f, rest))
        new_f = tu.partition_float(new_lam)[0]
        return jax.tree.map(jnp.subtract, new_f, lam_f), new_outer

    def _cost(self, train_batch: DataBatch, val_batch: DataBatch) -> float:
        """Per hyper-step: K inner gradients, the validation gradient, and
        reverse mode back through the K steps (a second-order product
        each)."""
        steps = 1 if self.lookahead > 1 else 0
        k = self.lookahead
        return self.num_steps * (k * (1 + cost.SECOND_ORDER)
                                 + cost.relative_size(
                                     val_batch, train_batch, 0, steps))

    def _random_like(self, key: jax.Array, delta: PyTree) -> PyTree:
        """A direction of the length of ``delta``, uniformly random: one
        standard normal vector over all floating entries (ravel order)."""
        flat, unravel = ravel_pytree(delta)
        d = jax.random.normal(key, flat.shape, flat.dtype)
        return unravel(jnp.linalg.norm(flat) * d / jnp.linalg.norm(d))

    @compiled
    def step(self, state: BilevelState, train_batch: DataBatch,
             val_batch: DataBatch) -> BilevelState:
        grad_fn, lam0, rest = self._value_and_grad(
            state, train_batch, val_batch)
        if self.bounds is not None:
            flat0, unravel = ravel_pytree(lam0)
            lo, hi = (unravel(b) for b in self._flat_bounds(
                state.hyperparams, flat0.dtype))

        def hyper_step(carry, _):
            lam, outer, key, bad, clipped = carry
            (j, train_loss), g = grad_fn(lam)
            # one reduction: the finiteness check and, kept, the norm
            g_sq = tu.sum_squares(g)
            ok = jnp.isfinite(g_sq) & jnp.isfinite(j)
            delta, new_outer = self._proposal(
                tu.select(ok, g, tu.zeros_like(g)), lam, outer, rest,
                state.hyperparams)
            if self.direction == "random":
                key, sub = jax.random.split(key)
                delta = self._random_like(sub, delta)
            proposed = tu.add(lam, delta)
            # the result too (an outer optimizer with a NaN rate, overflow)
            ok = ok & tu.all_finite(proposed)
            if self.bounds is not None:
                projected = jax.tree.map(jnp.clip, proposed, lo, hi)
                moved = jax.tree.map(lambda a, b: jnp.any(a != b),
                                     projected, proposed)
                clipped = clipped | (ok & jnp.any(jnp.stack(
                    jax.tree.leaves(moved))))
                proposed = projected
            carry = (tu.select(ok, proposed, lam),
                     tu.select(ok, new_outer, outer), key,
                     bad + jnp.logical_not(ok).astype(jnp.int32), clipped)
            return carry, (g, g_sq, j, train_loss)

        carry = (lam0, state.outer_opt_state, state.algorithm_state.key,
                 jnp.zeros((), jnp.int32), jnp.zeros((), bool))
        if self.num_steps == 1:   # the usual case: no loop at all
            carry, (g0, g0_sq, j0, tl0) = hyper_step(carry, None)
        else:   # unrolled, as the lookahead (num_steps is a handful)
            carry, outs = lax.scan(hyper_step, carry, None,
                                   length=self.num_steps, unroll=True)
            g0, g0_sq, j0, tl0 = jax.tree.map(lambda x: x[0], outs)
        lam, outer, key, bad, clipped = carry
        delta = jax.tree.map(jnp.subtract, lam, lam0)
        meta = dict(state.metadata)
        meta.update(
            train_loss=tl0, val_loss=j0,
            hypergradient_norm=jnp.sqrt(g0_sq),
            delta_norm=jnp.sqrt(tu.sum_squares(delta)),
            clipped=clipped,
            nonfinite_count=state.metadata["nonfinite_count"] + bad,
            grad_evals=state.metadata["grad_evals"] + self._cost(
                train_batch, val_batch))
        # dtypes fixed at init, so a jitted step never retraces
        meta = {k: jnp.asarray(v).astype(jnp.result_type(state.metadata[k]))
                for k, v in meta.items()}
        like = state.hyperparams
        own = OneShotWarmStartState(
            key=key, hypergradient=tu.fill_none(g0, like),
            delta=tu.fill_none(delta, like))
        return state.replace(
            hyperparams=tu.combine(lam, rest), outer_opt_state=outer,
            step=state.step + 1, metadata=meta, algorithm_state=own)
