r"""HyperDistill: online hypergradients distilled to one VJP per step.

Lee et al. (2022) approximate the second-order part of the online
hypergradient :math:`g^{SO}_t = \alpha_t \sum_{i \le t}
(\prod_{j > i} A_j) B_i` by a single vector-Jacobian product at a distilled
point :math:`(w^*_t, D^*_t)`, scaled by a fitted size. With the identity
Hessian approximation :math:`\prod_{j=i+1}^t A_j \approx \gamma^{t-i} I`
(Lee et al. 2022, Sections 3.2–3.3):

.. math::

   S_t &= \textstyle\sum_{j=0}^{t-1} \gamma^j, \qquad
   p_t = \gamma S_{t-1} / S_t, \qquad 1 - p_t = 1 / S_t, \\
   w^*_t &= p_t\, w^*_{t-1} + (1 - p_t)\, w_{t-1}, \qquad
   D^*_t = SS(D^*_{t-1}, p_t) \cup SS(D_t, 1 - p_t), \\
   w_t &= \Phi(w_{t-1}, s_{t-1}, \lambda; D_t), \qquad
   \alpha_t = \nabla_w L_{val}(w_t, \lambda), \\
   v_t &= \Big(\frac{\partial \Phi(w^*_t, s_{t-1}, \lambda; D^*_t)}
          {\partial \lambda}\Big)^{\!\top} \alpha_t, \qquad
   g_t = \nabla_\lambda L_{val}(w_t, \lambda) + \theta\, S_t\, v_t,

with the episode step :math:`t` 1-based (:math:`S_1 = 1`, :math:`w^*_1 =
w_0`, :math:`D^*_1 = D_1`). The scale :math:`\theta` is fitted by least
squares over one DrMAD backward sweep (the paper's ``LinearEstimation``,
Alg. 4). :math:`\gamma = 0` gives the T1–T2 hypergradient scaled by
:math:`\theta`; :math:`\gamma = 1` averages all past weights uniformly.
"""

import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from gradhpo.core.base import BilevelOptimizer, compiled
from gradhpo.core.state import BilevelState, float_dtype
from gradhpo.utils.types import DataBatch, InnerOptimizer, LossFn, PyTree
from gradhpo.utils import cost
from gradhpo.utils import gradients as gr
from gradhpo.utils import tree as tu
from gradhpo.utils import validation as val


def geometric_sum(gamma: float, t: Any) -> jax.Array:
    r""":math:`S_t = \sum_{j=0}^{t-1} \gamma^j`, without 0/0 at the ends.

    .. math::

       S_t = \frac{1 - \gamma^t}{1 - \gamma}
           = \frac{\operatorname{expm1}(t \log\gamma)}
                  {\operatorname{expm1}(\log\gamma)},
       \qquad S_t = t \;(\gamma = 1), \qquad S_t = [t \ge 1] \;(\gamma = 0).

    The ``expm1`` form keeps full relative precision for :math:`\gamma`
    close to 1, where :math:`1 - \gamma^t` would cancel in float32.

    Args:
      gamma: :math:`\gamma \in [0, 1]`, a Python float (configuration).
      t: the number of terms :math:`t \ge 0`, an integer array or int.

    Returns:
      :math:`S_t` in the default floating dtype (:math:`S_0 = 0`).

    Example:
      >>> from gradhpo.algorithms.online import geometric_sum
      >>> print(f"{float(geometric_sum(0.9, 3)):.4f}")
      2.7100
    """
    t = jnp.asarray(t).astype(float_dtype())
    if gamma == 1.0:
        return t
    if gamma == 0.0:
        return (t >= 1).astype(t.dtype)
    log_gamma = math.log(gamma)
    return jnp.expm1(t * log_gamma) / math.expm1(log_gamma)


def distill_coefficients(gamma: float, t: Any, backward: bool = False
                         ) -> Tuple[jax.Array, jax.Array]:
    r"""The mixing weights :math:`(p, 1 - p)` of the :math:`w^*` recursion.

    Forward (online, eq. 13: the newest weight enters last)
    :math:`p_t = \gamma S_{t-1}/S_t`, :math:`1 - p_t = 1/S_t`; backward
    (``LinearEstimation``, the oldest weight enters last)
    :math:`p_s = S_{s-1}/S_s`, :math:`1 - p_s = \gamma^{s-1}/S_s`. Both
    give :math:`p_1 = 0`. The complement is computed directly (not as
    :math:`1 - p`) so that :math:`w^*_1 = w_0` exactly.

    Args:
      gamma: :math:`\gamma \in [0, 1]`.
      t: the 1-based step :math:`t` (or :math:`s`).
      backward: whether to return the backward weights.

    Returns:
      ``(p, one_minus_p)``, arrays of the default floating dtype.

    Example:
      >>> from gradhpo.algorithms.online import distill_coefficients
      >>> p, q = distill_coefficients(0.9, 2)
      >>> print(f"{float(p):.6f} {float(q):.6f}")
      0.473684 0.526316
    """
    t = jnp.asarray(t)
    s_prev, s_t = geometric_sum(gamma, t - 1), geometric_sum(gamma, t)
    if backward:
        decay = jnp.power(jnp.asarray(gamma, s_t.dtype),
                          (t - 1).astype(s_t.dtype))
        return s_prev / s_t, decay / s_t
    return gamma * s_prev / s_t, 1.0 / s_t


def _average(p: jax.Array, q: jax.Array, old: PyTree, new: PyTree) -> PyTree:
    """``p * old + q * new`` leafwise, in the dtype of ``old``."""
    return jax.tree.map(lambda a, b: (p * a + q * b).astype(a.dtype),
                        old, new)


def _mix_batches(key: jax.Array, p: jax.Array, old: DataBatch,
                 new: DataBatch) -> DataBatch:
    r""":math:`SS(D_{old}, p) \cup SS(D_{new}, 1 - p)` with a static shape.

    Keeps :math:`k = \mathrm{round}(B p)` examples of ``old`` (those whose
    slot in a random permutation of :math:`B` falls below :math:`k`) and
    takes the other :math:`B - k` slots from ``new``, per example along the
    leading batch axis of every leaf (so that :math:`D^*` keeps a static
    shape, which the paper's set union does not need). A batch
    without leaves (``None``) is returned as is.
    """
    if not jax.tree.leaves(new):
        return new
    size = tu.first_axis_length(new, "train_batch")
    k = jnp.round(size * p).astype(jnp.int32)
    keep = jax.random.permutation(key, size) < k

    def pick(a, b):
        mask = keep.reshape((size,) + (1,) * (jnp.ndim(b) - 1))
        return jnp.where(mask, a, b).astype(jnp.result_type(a))
    return jax.tree.map(pick, old, new)


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product over the floating leaves of two trees."""
    terms = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b))
             if tu.is_float_leaf(x)]
    return sum(terms[1:], terms[0]) if terms else jnp.zeros(())


_REQUIRED = object()   # marks an argument that has no default


class HyperDistillState(NamedTuple):
    r""":class:`HyperDistill`'s own state.

    Attributes:
      w_star: the distilled weights :math:`w^*_t`, shaped like the params.
      d_star: the distilled batch :math:`D^*_t`, shaped like a training
        batch (allocated at :meth:`HyperDistill.init` from its ``batch``).
      key: the PRNG key of the subsampling of :math:`D^*`; each step splits
        it in two, keeps the first and subsamples with the second.
      episode_step: the number of online steps taken in the current episode
        (``int32``); the next step uses :math:`t` = that + 1.
      theta: the size coefficient :math:`\theta` of the linear estimator,
        refitted by :meth:`HyperDistill.estimate_theta`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> loss = lambda w, lam, batch: jnp.sum((w - lam) ** 2)
      >>> opt = gh.HyperDistill(loss, loss, optax.sgd(0.1), optax.sgd(0.1),
      ...                       theta=0.5)
      >>> state = opt.init(jnp.ones(2), jnp.zeros(2), batch=None,
      ...                  key=jax.random.PRNGKey(1))
      >>> state = opt.step(state, None, None)
      >>> own = state.algorithm_state
      >>> int(own.episode_step), float(own.theta), own.w_star.tolist()
      (1, 0.5, [1.0, 1.0])
    """

    w_star: PyTree
    d_star: PyTree
    key: jax.Array
    episode_step: jax.Array
    theta: jax.Array


class HyperDistill(BilevelOptimizer):
    r"""HyperDistill: an online hypergradient from one distilled VJP.

    One :meth:`step` is one online step of Alg. 3 (Lee et al. 2022):

    .. math::

       w^*_t &= p_t w^*_{t-1} + (1 - p_t) w_{t-1}, \qquad
       D^*_t = SS(D^*_{t-1}, p_t) \cup SS(D_t, 1 - p_t), \\
       w_t &= \Phi(w_{t-1}, s_{t-1}, \lambda; D_t), \\
       g_t &= \nabla_\lambda L_{val}(w_t, \lambda)
       + \theta S_t \big(\partial_\lambda \Phi(w^*_t, s_{t-1}, \lambda;
         D^*_t)\big)^{\!\top} \nabla_w L_{val}(w_t, \lambda),

    followed by the outer update of :math:`\lambda` along :math:`g_t`. Here
    :math:`S_t = \sum_{j<t}\gamma^j` and :math:`p_t = \gamma S_{t-1}/S_t`,
    with :math:`t` the 1-based step of the current episode; the paper's
    projection :math:`\pi^* f_t` reduces to :math:`\theta S_t v_t` (the
    normalisation cancels), so nothing is divided by :math:`\lVert v_t
    \rVert`. :math:`D^*_t` keeps :math:`\mathrm{round}(B p_t)` random
    examples of :math:`D^*_{t-1}` and the rest from :math:`D_t`, per example
    along the leading batch axis (a static shape). Batches therefore need a
    leading example axis on every leaf, of the same length every step: a
    ``train_batch`` whose shapes differ from those :math:`D^*` was
    allocated with (at :meth:`init`) raises a :class:`ValueError` (checked
    once per compilation); start from a new :meth:`init` to change them.

    State: ``state.algorithm_state`` is a :class:`HyperDistillState`
    (:math:`w^*`, :math:`D^*`, the PRNG key, the episode step and
    :math:`\theta`); :meth:`estimate_theta` refits :math:`\theta`.

    Episodes (Alg. 3, Reptile-style meta-learning): call
    :meth:`estimate_theta` every few episodes, then :meth:`reset_episode`
    with the meta-initialisation :math:`\phi`, then :math:`T` steps. Without
    resets, :math:`t` keeps growing and :math:`S_t` saturates at
    :math:`1/(1 - \gamma)` (for :math:`\gamma < 1`).

    When an inner gradient is non-finite the step is skipped as the contract
    says, and the episode state (:math:`w^*`, :math:`D^*`, :math:`t`) is kept
    too, so a poisoned batch never enters :math:`D^*`.

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)`.
      val_loss: :math:`L_{val}(w, \lambda; V)`.
      inner_optimizer: :math:`\Phi`: an optax transformation of :math:`w`, or
        a callable of the hyperparameters returning one. The distilled VJP
        uses the current optimizer state :math:`s_{t-1}` at :math:`w^*_t`.
      outer_optimizer: optax transformation of :math:`\lambda` (the paper
        uses SGD with momentum 0.9, or Adam).
      gamma: :math:`\gamma \in [0, 1]`, the decay of the Hessian-identity
        approximation :math:`\prod A_j \approx \gamma^{t-i} I` (paper:
        0.9–0.9999, 0.99 best; for SGD :math:`\gamma \approx 1 - \eta k`).
      theta: the initial size coefficient :math:`\theta` of the linear
        estimator :math:`\pi^*_t \approx \theta \lVert v_t\rVert S_t`;
        :math:`\theta = 1, \gamma = 0` is exactly T1–T2.

    The PRNG key that subsamples :math:`D^*` comes in through
    ``init(..., key=...)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def train_loss(w, lam, batch):          # A = 0.9 I, B = 0.1 I
      ...     return 0.5 * jnp.sum(w ** 2) - jnp.sum(lam * w)
      >>> def val_loss(w, lam, batch):
      ...     return 0.5 * jnp.sum((w - 0.5) ** 2)
      >>> opt = gh.HyperDistill(train_loss, val_loss, optax.sgd(0.1),
      ...                       optax.sgd(0.0), gamma=0.9)
      >>> state = opt.init(jnp.zeros(2), jnp.array([1.0, 2.0]), batch=None)
      >>> for _ in range(2):
      ...     state = opt.step(state, None, None)
      >>> h = opt.compute_hypergradient(state, None, None)   # t = 3
      >>> print(jnp.round(h, 6))
      [-0.062059  0.011382]

    References:
      Lee et al, `Online Hyperparameter Meta-Learning with Hypergradient
      Distillation <https://arxiv.org/abs/2110.02508>`_, 2022.
    """

    def __init__(self, train_loss: LossFn, val_loss: LossFn,
                 inner_optimizer: InnerOptimizer,
                 outer_optimizer: optax.GradientTransformation, *,
                 gamma: float = 0.99, theta: float = 1.0) -> None:
        super().__init__(train_loss, val_loss, inner_optimizer,
                         outer_optimizer)
        self.gamma = val.check_real(gamma, "gamma", low=0.0, high=1.0)
        self.theta = val.check_real(theta, "theta")

    state_type = HyperDistillState

    def init(self, params: PyTree, hyperparams: PyTree, *,
             batch: DataBatch = _REQUIRED,
             key: Optional[jax.Array] = None) -> BilevelState:
        r"""Creates the initial state (episode step 0, :math:`w^* = w_0`).

        Args:
          params: :math:`w_0`.
          hyperparams: :math:`\lambda_0`.
          batch: a training batch, used only for its shapes and dtypes:
            :math:`D^*` is allocated as zeros shaped like it, so the state's
            tree never changes (and it can start a :func:`jax.lax.scan`
            over :meth:`step`). Required; pass ``batch=None`` when the
            losses take no data.
          key: the PRNG key of the subsampling of :math:`D^*` (default
            ``jax.random.PRNGKey(0)``).

        Returns:
          The state; ``algorithm_state.theta`` is the constructor's
          ``theta``.

        Raises:
          TypeError: if ``batch`` is not given.
        """
        if batch is _REQUIRED:
            raise TypeError(
                "HyperDistill.init needs batch=: a training batch (e.g. "
                "the first one), whose shapes allocate the distilled batch "
                "D*; pass batch=None when the losses take no data.")
        key = val.check_key(key)
        state = self.initial_state(params, hyperparams)
        if jax.tree.leaves(batch):
            tu.first_axis_length(batch, "batch")
        batch = tu.as_strong_arrays(batch)
        self._check_loss("train_loss", self.train_loss, state.params,
                         state.hyperparams, batch)
        return state.replace(algorithm_state=HyperDistillState(
            w_star=jax.tree.map(jnp.copy, state.params),
            d_star=tu.zeros_like(batch), key=key,
            episode_step=jnp.zeros((), jnp.int32),
            theta=jnp.asarray(self.theta, float_dtype())))

    def check_state(self, state: BilevelState, train_batch: DataBatch,
                    val_batch: DataBatch) -> None:
        super().check_state(state, train_batch, val_batch)
        if jax.tree.leaves(train_batch):
            tu.first_axis_length(train_batch, "train_batch")
        # D* has the shape of the batch it was allocated from; a batch of
        # another shape cannot be mixed into it
        val.check_batch_like(train_batch, state.algorithm_state.d_star,
                             "train_batch", "state.algorithm_state.d_star")

    def _online(self, state: BilevelState, train_batch: DataBatch,
                val_batch: DataBatch
                ) -> Tuple[PyTree, gr.InnerStep, jax.Array, HyperDistillState]:
        own = state.algorithm_state
        t = own.episode_step + 1           # 1-based: S_1 = 1, w*_1 = w_0
        p, q = distill_coefficients(self.gamma, t)
        key, sub = jax.random.split(own.key)
        # w*_t and D*_t are built from w_{t-1} and D_t (before the step).
        w_star = _average(p, q, own.w_star, state.params)
        d_star = _mix_batches(sub, p, own.d_star, train_batch)
        # guarded inside the update (one pass): a non-finite gradient keeps
        # (w, s), and finish_step then skips the outer update as well
        inner = gr.inner_step(self.train_loss, self.inner_optimizer,
                              state.params, state.inner_opt_state,
                              state.hyperparams, train_batch, guard=True)
        # a skipped inner step leaves the episode where it was; the VJP
        # below reads the selected (w*, D*) too, so only one version of
        # them is materialised (when the step is skipped, so is the
        # hypergradient it feeds)
        w_star, d_star, t_kept = tu.select(
            inner.finite, (w_star, d_star, t),
            (own.w_star, own.d_star, own.episode_step))
        new_own = own._replace(w_star=w_star, d_star=d_star, key=key,
                               episode_step=t_kept)
        val_loss, alpha, direct = gr.value_and_grads(
            self.val_loss, inner.params, state.hyperparams, val_batch)
        _, pullback = gr.inner_step_vjp(
            self.train_loss, self.inner_optimizer, w_star,
            state.inner_opt_state, state.hyperparams, d_star)
        scale = own.theta * geometric_sum(self.gamma, t)
        hypergradient = tu.axpy(scale, pullback(alpha), direct)
        return hypergradient, inner, val_loss, new_own

    @compiled
    def compute_hypergradient(self, state: BilevelState,
                              train_batch: DataBatch,
                              val_batch: DataBatch) -> PyTree:
        return self._online(state, train_batch, val_batch)[0]

    @compiled
    def step(self, state: BilevelState, train_batch: DataBatch,
             val_batch: DataBatch) -> BilevelState:
        hypergradient, inner, val_loss, own = self._online(
            state, train_batch, val_batch)
        # the inner gradient, the validation gradient, and a VJP through a
        # separate step at the distilled point (its gradient and the VJP)
        evals = (2 + cost.SECOND_ORDER
                 + cost.relative_size(val_batch, train_batch))
        return self.finish_step(state, inner, hypergradient, val_loss,
                                grad_evals=evals, algorithm_state=own,
                                inner_guarded=True)

    # not (state, train_batch, val_batch): no batch checks
    @compiled(check_batches=False)
    def reset_episode(self, state: BilevelState,
                      params: PyTree) -> BilevelState:
        r"""Starts a new inner optimisation from ``params`` (Reptile's
        :math:`w_0 \leftarrow \phi`).

        The next :meth:`step` is episode step :math:`t = 1`; :math:`w^*` is
        reset to ``params``, :math:`D^*` to zeros, and the inner optimizer
        state to its initial value at the current :math:`\lambda` (a fresh
        inner optimisation, as in Alg. 3). Hyperparameters, the outer state,
        :math:`\theta`, the PRNG key and the global ``step`` carry over.

        Args:
          state: the current state.
          params: :math:`\phi`, with the structure of ``state.params``
            (cast to its dtypes).

        Returns:
          The state at the start of the new episode.
        """
        params = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype),
                              params, state.params)
        own = state.algorithm_state._replace(
            w_star=params, d_star=tu.zeros_like(state.algorithm_state.d_star),
            episode_step=jnp.zeros((), jnp.int32))
        return state.replace(
            params=params, algorithm_state=own,
            inner_opt_state=gr.init_inner_state(
                self.inner_optimizer, params, state.hyperparams))

    # the batches carry a leading T axis the base's checks do not know
    @compiled(check_batches=False)
    def estimate_theta(self, state: BilevelState, train_batches: DataBatch,
                       val_batch: DataBatch) -> BilevelState:
        r"""Refits :math:`\theta` by ``LinearEstimation`` (Alg. 4).

        From :math:`w_0` = ``state.params`` it runs :math:`T` inner steps on
        ``train_batches`` (every leaf has a leading axis of length
        :math:`T`), keeping only :math:`w_0` and :math:`w_T`, then one
        backward DrMAD sweep :math:`t = T, \dots, 1` with
        :math:`s = T - t + 1`:

        .. math::

           \hat w &= (1 - \tfrac{t-1}{T}) w_0 + \tfrac{t-1}{T} w_T, \qquad
           (a, g^{SO}) \leftarrow (a \hat A_t,\; g^{SO} + a \hat B_t),
           \qquad a_0 = \alpha_T = \nabla_w L_{val}(w_T), \\
           w^*_s &= p_s w^*_{s-1} + (1 - p_s)\hat w, \quad
           D^*_s = SS(D^*_{s-1}, p_s) \cup SS(D_t, 1 - p_s), \quad
           p_s = S_{s-1}/S_s, \\
           v_s &= \alpha_T\, \partial_\lambda\Phi(w^*_s, \lambda; D^*_s),
           \quad x_s = \lVert v_s\rVert S_s, \quad
           y_s = \langle v_s, g^{SO}\rangle / \lVert v_s\rVert, \quad
           \theta = \frac{x^\top y}{x^\top x}
           = \frac{\sum_s S_s \langle v_s, g^{SO}_s\rangle}
                  {\sum_s S_s^2 \lVert v_s\rVert^2}.

        The right-hand form is used, so a zero :math:`v_s` adds nothing
        instead of 0/0. Design choices: :math:`w^*_s`
        averages the interpolated :math:`\hat w_{T-s}`, not the true
        trajectory, so memory stays constant in :math:`T`; every VJP holds
        the optimizer state at :math:`s_T` (the state after the forward
        pass; for SGD and heavy ball it does not enter :math:`A` or
        :math:`B`). The PRNG key is split into :math:`T + 1` keys
        ``k_0, ..., k_T``: ``k_0`` is stored, ``k_s`` subsamples
        :math:`D^*_s`. If the fit is non-finite or every :math:`v_s` is zero,
        :math:`\theta` is kept and ``metadata["nonfinite_count"]`` counts it.

        Call it at the start of an episode (as Alg. 3 does every
        ``EstimationPeriod`` episodes).

        Args:
          state: the current state; :math:`w_0` = ``state.params``,
            :math:`s_0` = ``state.inner_opt_state``, :math:`\lambda` =
            ``state.hyperparams``.
          train_batches: :math:`D_1, \dots, D_T` stacked on a leading axis.
          val_batch: the validation batch of :math:`\alpha_T`.

        Returns:
          ``state`` with ``algorithm_state.theta`` refitted and a new PRNG
          key;
          params, hyperparameters and the episode are unchanged.
        """
        lam = state.hyperparams
        horizon = tu.first_axis_length(train_batches, "train_batches")
        if any(jnp.ndim(x) < 2 for x in jax.tree.leaves(train_batches)):
            raise ValueError(
                "train_batches must stack T training batches on a leading "
                "axis, so every leaf has the T axis and the example axis "
                "(ndim >= 2); got leaf shapes "
                f"{[jnp.shape(x) for x in jax.tree.leaves(train_batches)]}. "
                "Stack them with jax.tree.map(lambda *x: jnp.stack(x), "
                "*batches).")

        def forward(carry, batch):
            out = gr.inner_step(self.train_loss, self.inner_optimizer,
                                carry[0], carry[1], lam, batch)
            return (out.params, out.opt_state), None
        (w_end, s_end), _ = jax.lax.scan(
            forward, (state.params, state.inner_opt_state), train_batches)
        _, alpha, _ = gr.value_and_grads(self.val_loss, w_end, lam,
                                         val_batch)
        keys = jax.random.split(state.algorithm_state.key, horizon + 1)

        def backward(carry, xs):
            a, g_so, w_star, d_star, xy, xx = carry
            batch, s, key = xs
            frac = (horizon - s).astype(float_dtype()) / horizon  # (t-1)/T
            w_hat = _average(1.0 - frac, frac, state.params, w_end)
            _, pull = gr.inner_step_vjp(
                self.train_loss, self.inner_optimizer, w_hat, s_end, lam,
                batch, wrt_params=True)
            a, b_a = pull(a)
            g_so = tu.add(g_so, b_a)
            p, q = distill_coefficients(self.gamma, s, backward=True)
            w_star = _average(p, q, w_star, w_hat)
            d_star = _mix_batches(key, p, d_star, batch)
            _, pull_star = gr.inner_step_vjp(
                self.train_loss, self.inner_optimizer, w_star, s_end, lam,
                d_star)
            v = pull_star(alpha)
            size = geometric_sum(self.gamma, s)
            return (a, g_so, w_star, d_star, xy + size * _vdot(v, g_so),
                    xx + size ** 2 * _vdot(v, v)), None

        reverse = jax.tree.map(lambda x: x[::-1], train_batches)
        first = jax.tree.map(lambda x: x[0], reverse)
        zero = jnp.zeros((), float_dtype())
        carry = (alpha, tu.zeros_like(lam), w_end, first, zero, zero)
        (*_, xy, xx), _ = jax.lax.scan(
            backward, carry,
            (reverse, jnp.arange(1, horizon + 1, dtype=jnp.int32), keys[1:]))
        old = state.algorithm_state.theta
        fit = xy / jnp.where(xx > 0, xx, 1.0)
        ok = jnp.isfinite(fit) & (xx > 0)
        meta = dict(state.metadata)
        meta["nonfinite_count"] = (state.metadata["nonfinite_count"]
                                   + jnp.logical_not(ok).astype(jnp.int32))
        # T forward gradients, the validation gradient, and per backward
        # step two VJPs through a step (each a gradient and the VJP)
        one = jax.tree.map(lambda x: x[0], train_batches)
        meta["grad_evals"] = meta["grad_evals"] + (
            horizon * (1 + 2 * (1 + cost.SECOND_ORDER))
            + cost.relative_size(val_batch, one))
        return state.replace(metadata=meta,
                             algorithm_state=state.algorithm_state._replace(
                                 theta=jnp.where(ok, fit, old).astype(
                                     old.dtype),
                                 key=keys[0]))
