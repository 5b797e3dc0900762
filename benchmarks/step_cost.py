r"""Cost of one gradhpo hyper-step relative to a plain training step.

Measures, side by side in one run, on the same model and batch:

* ``plain``: a jitted optax training step (the baseline, 1.0x);
* ``two_grads``: two plain gradient evaluations in sequence (the "2 G"
  reference of ALGORITHMS.md §0.3);
* ``hand_exact``: a hand-written jitted one-step exact hypergradient (one
  :func:`jax.vjp` of the inner step w.r.t. the hyperparameters, the
  validation gradient at :math:`w_{t+1}`, Adam on the hyperparameters),
  written with jax/optax only;
* ``t1t2_exact``: ``gradhpo.algorithms.t1_t2.T1T2(hypergradient="exact")``;
* ``hand_fd``: a hand-written DARTS central-difference step (Liu et al.
  2019, eq. 8);
* ``t1t2_fd``: ``T1T2(hypergradient="finite_difference")``;
* when the modules exist (skipped otherwise), each with its hand-written
  counterpart (jax/optax only, no gradhpo):

  - ``hand_greedy`` / ``greedy``: ``Greedy(horizon=H, gamma=0.9)``, per
    inner step; by hand, a ``lax.scan`` over the :math:`H` inner steps of
    :math:`G \leftarrow \gamma G + B_t^\top \nabla_w L_{val}(w_t; V_t)`
    (ALGORITHMS.md §4.2) and Adam on :math:`\rho`;
    ``hand_greedy_unrolled`` is the same with the horizon unrolled (no XLA
    while loop: on CPU a convolution inside a while loop is not lowered to
    the fast library kernels, which makes every ``scan`` row of the CNN
    ~20x slower);
  - ``hand_hyperdistill`` / ``hyperdistill``: one online HyperDistill step
    (:math:`w^*`, :math:`D^*` update, one VJP at the distilled point scaled
    by :math:`\theta S_t`, Adam);
  - ``hand_warm_start`` / ``warm_start``: ``OneShotWarmStart(lookahead=1)``,
    the whole warm start (``value_and_grad`` of the lookahead objective and
    one step :math:`\rho \leftarrow \rho - 10^{-3} g`).
  - ``hand_forward_mode`` / ``forward_mode``: one ``ForwardMode`` step
    (RTHO, ``hyper_interval=1``, ``decay=1``) on the *small-d* variant of
    the problem (below), :math:`d` columns of tangents of the weights and
    the momentum trace advanced by one :func:`jax.vmap` of a
    :func:`jax.jvp` of the real inner step, the hypergradient
    :math:`\nabla_\lambda L_{val} + Z^{w\top} \nabla_w L_{val}` and Adam;
    ``plain_small_d`` is the plain step of that variant (no goal, for
    reference) and ``hand_forward_mode_guarded`` the hand-written step
    with the library's non-finite guards added by hand (its reference is
    the unguarded row, so its ratio is what the guards cost);
  - ``hand_implicit`` / ``implicit``: one ``Implicit(solver="cg",
    terms=10)`` hyper-step (the inner step, the validation gradient at
    :math:`w_{t+1}`, :func:`jax.scipy.sparse.linalg.cg` on
    :math:`H + \delta I`, one joint forward-over-reverse product for
    :math:`M^\top x` and the solve residual, Adam), and
    ``hand_implicit_neumann`` / ``implicit_neumann`` the same with a
    10-term Neumann series: both rows of a pair make the same number of
    Hessian-vector products (see :func:`build_hand_implicit`).

Before timing, every hand-written row is checked against its library row
(``--check``, on by default): from the same state, the hypergradient each
applies, and after each of two calls the change of :math:`\rho` and the
weights, agree to ``--check-rtol`` (1e-4) in float32; the script stops
otherwise, since the ratio to a row computing other mathematics would mean
nothing.

The hyperparameters are one L2 coefficient per weight, log-parametrised:
:math:`\lambda = e^\rho` and

.. math::

   L_{tr}(w, \rho; D) = \mathrm{CE}(f_w(x), y)
       + \tfrac12 \sum_l \sum_{ij} e^{\rho_{l,ij}} W_{l,ij}^2,
   \qquad L_{val}(w; V) = \mathrm{CE}(f_w(x), y),

with :math:`\rho` a pytree shaped like the weight matrices (biases are not
penalised): about 670k hyperparameters for the MLP 784-512-512-10. The
inner optimizer is SGD with heavy-ball momentum (``--momentum``, 0.9 by
default), the outer optimizer Adam on :math:`\rho`.

ForwardMode refuses that many hyperparameters (it carries one tangent copy
of the weights per coordinate), so its rows use a *small-d* variant with
the same model and batches: one log-L2 coefficient per weight matrix, the
log learning rate and the momentum of the inner SGD (through a callable
inner optimizer, so the tangents of the momentum trace matter), i.e.
:math:`d = L + 2` hyperparameters for :math:`L` weight matrices (5 for the
MLP and the CNN).

Timing: every case is compiled and warmed up first; then for ``--rounds``
rounds each case is timed once (``calls`` consecutive calls, each fed the
previous output state) in an order rotated every round; the reported ratio
is the median over rounds of the per-round ratio (so a slow-down of the
shared machine during one round cancels). Run
``python benchmarks/step_cost.py --help`` for the options.

Example:
  python benchmarks/step_cost.py --out benchmarks/results/step_cost_mlp.json
  python benchmarks/step_cost.py --model cnn \
      --out benchmarks/results/step_cost_cnn.json
  python benchmarks/step_cost.py --quick --hlo
"""

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as cm  # noqa: E402
else:  # pragma: no cover -- imported as benchmarks.step_cost
    from benchmarks import _common as cm

from gradhpo.algorithms.t1_t2 import T1T2  # noqa: E402

BASE = "plain"

# Goals from the issues: the library within 10% of hand-written code.
GOAL_EXACT_VS_PLAIN = 2.75
GOAL_FD_VS_PLAIN = 3.0
GOAL_GREEDY_VS_PLAIN = 3.2        # per inner step
GOAL_HYPERDISTILL_VS_PLAIN = 3.2
GOAL_WARM_START_VS_PLAIN = 4.0    # the whole warm start
GOAL_FORWARD_MODE_PER_COLUMN = 1.3  # forward_mode <= 1.3 (1 + d) x plain
GOAL_VS_HAND = 1.1

# Configuration of the optional rows (library and hand-written alike).
GAMMA = 0.9            # Greedy and HyperDistill discount
THETA = 1.0            # HyperDistill size coefficient
SEED = 0               # HyperDistill subsampling key
WARM_STEP_SIZE = 1e-3  # OneShotWarmStart hyper step size
IMPLICIT_TERMS = 10    # Implicit: CG iterations / Neumann terms
IMPLICIT_DAMPING = 0.0  # Implicit: delta of (H + delta I)


# --------------------------------------------------------------------------
# Problems


@dataclasses.dataclass
class Problem:
    """Everything a case needs: model, losses, optimizers, data."""

    model: str
    params: Any
    hyperparams: Any
    train_batch: Tuple[jax.Array, jax.Array]
    val_batch: Tuple[jax.Array, jax.Array]
    train_loss: Callable[..., jax.Array]
    val_loss: Callable[..., jax.Array]
    inner: optax.GradientTransformation
    outer: optax.GradientTransformation
    inner_lr: float
    momentum: float
    fd_radius: float
    config: Dict[str, Any]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()


def _penalty(params: Sequence[Dict[str, jax.Array]],
             rho: Sequence[jax.Array]) -> jax.Array:
    """½ Σ exp(ρ) ⊙ W² over the weight matrices (not the biases)."""
    return 0.5 * sum(jnp.sum(jnp.exp(r) * p["w"] ** 2)
                     for p, r in zip(params, rho))


def _mlp_apply(params, x):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _mlp_params(key, sizes):
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                                zip(sizes[:-1], sizes[1:])):
        params.append({
            "w": jax.random.normal(k, (n_in, n_out)) * np.sqrt(2.0 / n_in),
            "b": jnp.zeros((n_out,))})
    return params


def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cnn_apply(params, x):
    """3x3 conv (stride 1) - relu - 3x3 conv (stride 2) - relu - dense."""
    h = jax.nn.relu(_conv(x, params[0]["w"], 1) + params[0]["b"])
    h = jax.nn.relu(_conv(h, params[1]["w"], 2) + params[1]["b"])
    h = h.reshape(h.shape[0], -1)
    return h @ params[2]["w"] + params[2]["b"]


def _cnn_params(key, channels, side):
    c1, c2 = channels
    k1, k2, k3 = jax.random.split(key, 3)
    flat = ((side + 1) // 2) ** 2 * c2
    return [
        {"w": jax.random.normal(k1, (3, 3, 1, c1)) * np.sqrt(2.0 / 9),
         "b": jnp.zeros((c1,))},
        {"w": jax.random.normal(k2, (3, 3, c1, c2)) * np.sqrt(2.0 / (9 * c1)),
         "b": jnp.zeros((c2,))},
        {"w": jax.random.normal(k3, (flat, 10)) * np.sqrt(1.0 / flat),
         "b": jnp.zeros((10,))},
    ]


def make_problem(model: str, *, hidden: Sequence[int], channels: Sequence[int],
                 batch: int, side: int, inner_lr: float, momentum: float,
                 outer_lr: float, l2_init: float, fd_radius: float,
                 seed: int) -> Problem:
    """Synthetic data (timing does not depend on the values) and a model."""
    kp, kx, ky, kvx, kvy = jax.random.split(jax.random.PRNGKey(seed), 5)
    if model == "mlp":
        sizes = [side * side] + list(hidden) + [10]
        params = _mlp_params(kp, sizes)
        apply = _mlp_apply
        shape = (batch, side * side)
        arch = "-".join(map(str, sizes))
    else:
        params = _cnn_params(kp, channels, side)
        apply = _cnn_apply
        shape = (batch, side, side, 1)
        arch = (f"conv3x3({channels[0]})-conv3x3/2({channels[1]})-"
                f"dense(10) on {side}x{side}x1")
    rho = [jnp.full(p["w"].shape, np.log(l2_init), jnp.float32)
           for p in params]

    def train_loss(w, hp, data):
        x, y = data
        return _cross_entropy(apply(w, x), y) + _penalty(w, hp)

    def val_loss(w, hp, data):
        del hp  # the validation loss does not depend on the penalty
        x, y = data
        return _cross_entropy(apply(w, x), y)

    train_batch = (jax.random.normal(kx, shape),
                   jax.random.randint(ky, (batch,), 0, 10))
    val_batch = (jax.random.normal(kvx, shape),
                 jax.random.randint(kvy, (batch,), 0, 10))
    inner = optax.sgd(inner_lr, momentum=momentum or None)
    outer = optax.adam(outer_lr)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    n_hp = sum(int(np.size(x)) for x in jax.tree.leaves(rho))
    config = {
        "model": model, "architecture": arch, "batch": batch,
        "dtype": "float32", "n_params": n_params, "n_hyperparams": n_hp,
        "hyperparameters": "one L2 coefficient per weight, lambda = exp(rho)",
        "inner": f"sgd(lr={inner_lr}, momentum={momentum})",
        "outer": f"adam(lr={outer_lr})", "l2_init": l2_init,
        "fd_radius": fd_radius, "seed": seed,
    }
    return Problem(model, params, rho, train_batch, val_batch, train_loss,
                   val_loss, inner, outer, inner_lr, momentum, fd_radius,
                   config)


def small_d_problem(pb: Problem) -> Problem:
    r"""The few-hyperparameter variant of ``pb`` (ForwardMode's rows).

    Same model, weights and batches;
    :math:`\lambda = (\rho_1..\rho_L, \log\eta, \mu)`, a dict with
    ``log_l2`` (one log-L2 coefficient per weight matrix), ``log_lr`` and
    ``momentum``; :math:`L_{tr} = \mathrm{CE} + \tfrac12 \sum_l
    e^{\rho_l} \lVert W_l \rVert^2` and the inner optimizer is the callable
    ``hp -> optax.sgd(exp(hp["log_lr"]), momentum=hp["momentum"])``
    (``pb.inner`` at the initial values). ``inner`` is that callable.
    """
    n = len(pb.params)
    hp = {"log_l2": jnp.full((n,), np.log(pb.config["l2_init"]),
                             jnp.float32),
          "log_lr": jnp.asarray(np.log(pb.inner_lr), jnp.float32),
          "momentum": jnp.asarray(pb.momentum, jnp.float32)}

    def train_loss(w, hp, data):
        # pb.val_loss is the cross-entropy alone
        return pb.val_loss(w, hp, data) + 0.5 * sum(
            jnp.exp(hp["log_l2"][i]) * jnp.sum(p["w"] ** 2)
            for i, p in enumerate(w))

    def inner(hp):
        return optax.sgd(jnp.exp(hp["log_lr"]), momentum=hp["momentum"])

    return dataclasses.replace(pb, hyperparams=hp, train_loss=train_loss,
                               inner=inner)


def small_d(n_weights: int) -> int:
    """The number of hyperparameters of :func:`small_d_problem`."""
    return n_weights + 2


def forward_mode_goal(d: int) -> float:
    """The issue's goal for one ForwardMode step: 1.3 (1 + d) plain steps."""
    return round(GOAL_FORWARD_MODE_PER_COLUMN * (1 + d), 6)


# --------------------------------------------------------------------------
# Cases: each build returns (jitted fn, first carry, extra args).


def build_plain(pb: Problem):
    """A plain jitted optax training step at fixed hyperparameters."""
    @jax.jit
    def step(carry, hp, data):
        w, s = carry
        g = jax.grad(pb.train_loss)(w, hp, data)
        updates, s = pb.inner.update(g, s, w)
        return optax.apply_updates(w, updates), s
    return step, (pb.params, pb.inner.init(pb.params)), (
        pb.hyperparams, pb.train_batch)


def build_two_grads(pb: Problem):
    """Two gradient evaluations in sequence (train at w, val at w - eta g)."""
    @jax.jit
    def step(w, hp, data, val_data):
        g = jax.grad(pb.train_loss)(w, hp, data)
        w = jax.tree.map(lambda a, b: a - pb.inner_lr * b, w, g)
        v = jax.grad(pb.val_loss)(w, hp, val_data)
        return jax.tree.map(lambda a, b: a - pb.inner_lr * b, w, v)
    return step, pb.params, (pb.hyperparams, pb.train_batch, pb.val_batch)


def _hand_carry(pb: Problem):
    return (pb.params, pb.inner.init(pb.params), pb.hyperparams,
            pb.outer.init(pb.hyperparams))


def build_hand_exact(pb: Problem):
    """One-step exact hypergradient, hand-written (ALGORITHMS.md §1.8)."""
    def hypergradient(carry, data, val_data):
        w, s, rho, _ = carry
        w1, s1, h = _t1t2_term(pb, w, s, rho, data, val_data)
        return h, w1, s1

    return _adam_step(pb)(hypergradient), _hand_carry(pb), (
        pb.train_batch, pb.val_batch)


def build_hand_fd(pb: Problem):
    """DARTS second-order finite difference, hand-written (eq. 8).

    For heavy-ball SGD, dw+/dg = -eta, so u = -eta v and h = M^T u with
    M^T u ~ [grad_rho L_tr(w + eps u) - grad_rho L_tr(w - eps u)] / (2 eps),
    eps = r / ||u||.
    """
    grad_rho = jax.grad(pb.train_loss, argnums=1)

    def hypergradient(carry, data, val_data):
        w, s, rho, _ = carry
        g = jax.grad(pb.train_loss)(w, rho, data)
        updates, s1 = pb.inner.update(g, s, w)
        w1 = optax.apply_updates(w, updates)
        v = jax.grad(pb.val_loss)(w1, rho, val_data)
        u = jax.tree.map(lambda x: -pb.inner_lr * x, v)
        eps = pb.fd_radius / jnp.sqrt(sum(
            jnp.sum(x ** 2) for x in jax.tree.leaves(u)))
        plus = grad_rho(jax.tree.map(lambda a, b: a + eps * b, w, u), rho,
                        data)
        minus = grad_rho(jax.tree.map(lambda a, b: a - eps * b, w, u), rho,
                         data)
        h = jax.tree.map(lambda p, m: (p - m) / (2 * eps), plus, minus)
        return h, w1, s1

    return _adam_step(pb)(hypergradient), _hand_carry(pb), (
        pb.train_batch, pb.val_batch)


def _with_hypergradient(step, hypergradient):
    """Attaches ``step.hypergradient(carry, *args) -> h`` (jitted), the
    hypergradient the step applies, for the equivalence check."""
    step.hypergradient = jax.jit(lambda carry, *args: hypergradient(
        carry, *args)[0])
    return step


def _t1t2_term(pb: Problem, w, s, rho, data, val_data):
    """One inner step and its T1-T2 term B^T grad_w L_val(w_1; V)."""
    def phi(rho_):
        g = jax.grad(pb.train_loss)(w, rho_, data)
        updates, s1 = pb.inner.update(g, s, w)
        return optax.apply_updates(w, updates), s1

    w1, pull, s1 = jax.vjp(phi, rho, has_aux=True)
    a = jax.grad(pb.val_loss)(w1, rho, val_data)
    (b,) = pull(a)
    return w1, s1, b


def _adam_step(pb: Problem):
    """The jitted step of a hand-written hypergradient: inner weights from
    the hypergradient function, outer Adam on rho."""
    def make(hypergradient):
        @jax.jit
        def step(carry, data, val_data):
            _, _, rho, r = carry
            h, w1, s1 = hypergradient(carry, data, val_data)
            updates, r1 = pb.outer.update(h, r, rho)
            return w1, s1, optax.apply_updates(rho, updates), r1
        return _with_hypergradient(step, hypergradient)
    return make


def build_hand_greedy(horizon: int, gamma: float, unroll: bool = False):
    r"""Generalized greedy over ``horizon`` inner steps, hand-written.

    ``lax.scan`` over the horizon (or a Python loop with ``unroll``): each
    inner step :math:`w_t = \Phi(w_{t-1}, s_{t-1}, \rho; D_t)` with the
    pullback :math:`B_t^\top`, :math:`a_t = \nabla_w L_{val}(w_t; V_t)`, the
    online sum :math:`G \leftarrow \gamma G + B_t^\top a_t` (ALGORITHMS.md
    §4.2; the direct term is zero here), then Adam on :math:`\rho` with
    :math:`G`.
    """
    def build(pb: Problem):
        def hypergradient(carry, data, val_data):
            w, s, rho, _ = carry
            if horizon == 1:
                data, val_data = _stack((data, val_data), 1)

            def body(c, batches):
                w, s, acc = c
                w1, s1, b = _t1t2_term(pb, w, s, rho, *batches)
                acc = jax.tree.map(lambda x, y: gamma * x + y, acc, b)
                return (w1, s1, acc), None

            c = (w, s, jax.tree.map(jnp.zeros_like, rho))
            if unroll:
                for t in range(horizon):
                    c, _ = body(c, jax.tree.map(lambda x: x[t],
                                                (data, val_data)))
            else:
                c, _ = jax.lax.scan(body, c, (data, val_data))
            w, s, acc = c
            return acc, w, s

        args = (pb.train_batch, pb.val_batch)
        if horizon > 1:  # batches as the library takes them
            args = (_stack(pb.train_batch, horizon),
                    _stack(pb.val_batch, horizon))
        return _adam_step(pb)(hypergradient), _hand_carry(pb), args
    return build


def build_hand_hyperdistill(gamma: float, theta: float, seed: int):
    r"""One online HyperDistill step (Lee et al. 2022, Alg. 3), hand-written.

    With :math:`t` the 1-based step, :math:`S_t = (1 - \gamma^t)/(1 -
    \gamma)`, :math:`p_t = \gamma S_{t-1}/S_t`:
    :math:`w^* \leftarrow p_t w^* + w_{t-1}/S_t`; :math:`D^*` keeps
    ``round(B p_t)`` random examples of itself (``permutation(key) < k``,
    the key split as the library does) and takes the rest from :math:`D_t`;
    the real inner step :math:`w_t`; :math:`\alpha_t = \nabla_w L_{val}(w_t;
    V)`; one VJP of the inner step at :math:`(w^*, s_{t-1}, D^*)` w.r.t.
    :math:`\rho` applied to :math:`\alpha_t`, scaled by :math:`\theta S_t`;
    Adam on :math:`\rho`. (For an L2 penalty, :math:`\partial\Phi /
    \partial\rho = -\eta e^\rho w^*` does not involve the data, so XLA
    drops the gradient at :math:`D^*` from both rows; :math:`D^*` is still
    built and carried by both.)
    """
    def build(pb: Problem):
        n = int(jax.tree.leaves(pb.train_batch)[0].shape[0])

        def hypergradient(carry, data, val_data):
            w, s, rho, _, w_star, d_star, key, t = carry
            t = t + 1
            tf = t.astype(jnp.float32)
            s_t = (1.0 - gamma ** tf) / (1.0 - gamma)
            p = gamma * (1.0 - gamma ** (tf - 1.0)) / (1.0 - gamma) / s_t
            key, sub = jax.random.split(key)
            w_star = jax.tree.map(lambda a, b: p * a + b / s_t, w_star, w)
            keep = (jax.random.permutation(sub, n)
                    < jnp.round(n * p).astype(jnp.int32))
            d_star = jax.tree.map(
                lambda a, b: jnp.where(
                    keep.reshape((n,) + (1,) * (b.ndim - 1)), a, b),
                d_star, data)
            g = jax.grad(pb.train_loss)(w, rho, data)
            updates, s1 = pb.inner.update(g, s, w)
            w1 = optax.apply_updates(w, updates)
            alpha = jax.grad(pb.val_loss)(w1, rho, val_data)

            def phi(rho_):
                g = jax.grad(pb.train_loss)(w_star, rho_, d_star)
                updates, _ = pb.inner.update(g, s, w_star)
                return optax.apply_updates(w_star, updates)

            _, pull = jax.vjp(phi, rho)
            (v,) = pull(alpha)
            h = jax.tree.map(lambda x: theta * s_t * x, v)
            return h, (w1, s1, w_star, d_star, key, t)

        @jax.jit
        def step(carry, data, val_data):
            rho, r = carry[2], carry[3]
            h, (w1, s1, w_star, d_star, key, t) = hypergradient(
                carry, data, val_data)
            updates, r1 = pb.outer.update(h, r, rho)
            return (w1, s1, optax.apply_updates(rho, updates), r1, w_star,
                    d_star, key, t)

        carry = _hand_carry(pb) + (
            pb.params, jax.tree.map(jnp.zeros_like, pb.train_batch),
            jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32))
        return _with_hypergradient(step, hypergradient), carry, (
            pb.train_batch, pb.val_batch)
    return build


def build_hand_warm_start(lookahead: int, step_size: float):
    r"""One-shot warm start, hand-written: ``jax.value_and_grad`` of the
    lookahead objective :math:`J(\rho) = L_{val}(\Phi^K(w_0, s_0, \rho;
    B_1..B_K); V)` (a Python loop over the :math:`K` inner steps), then one
    hyper-step :math:`\rho \leftarrow \rho - \eta_h \nabla J`; the weights
    and inner state are left as they are."""
    def build(pb: Problem):
        def hypergradient(carry, data, val_data):
            w, s, rho, _ = carry

            def objective(rho_):
                w_, s_ = w, s
                for k in range(lookahead):
                    batch = (data if lookahead == 1 else
                             jax.tree.map(lambda x: x[k], data))
                    g = jax.grad(pb.train_loss)(w_, rho_, batch)
                    updates, s_ = pb.inner.update(g, s_, w_)
                    w_ = optax.apply_updates(w_, updates)
                return pb.val_loss(w_, rho_, val_data)

            j, g = jax.value_and_grad(objective)(rho)
            return g, j

        @jax.jit
        def step(carry, data, val_data):
            w, s, rho, _ = carry
            g, j = hypergradient(carry, data, val_data)
            return w, s, jax.tree.map(lambda r, d: r - step_size * d, rho,
                                      g), j

        carry = (pb.params, pb.inner.init(pb.params), pb.hyperparams,
                 jnp.zeros((), jnp.float32))
        train = (_stack(pb.train_batch, lookahead) if lookahead > 1
                 else pb.train_batch)
        return _with_hypergradient(step, hypergradient), carry, (
            train, pb.val_batch)
    return build


def build_plain_small_d(pb: Problem):
    """A plain jitted step of :func:`small_d_problem` at fixed
    hyperparameters (its optimizer built from them, as ForwardMode does)."""
    sp = small_d_problem(pb)

    @jax.jit
    def step(carry, hp, data):
        w, s = carry
        g = jax.grad(sp.train_loss)(w, hp, data)
        updates, s = sp.inner(hp).update(g, s, w)
        return optax.apply_updates(w, updates), s
    return step, (sp.params, sp.inner(sp.hyperparams).init(sp.params)), (
        sp.hyperparams, sp.train_batch)


def build_hand_forward_mode(pb: Problem, guarded: bool = False):
    r"""One RTHO forward-mode step on :func:`small_d_problem`, hand-written.

    The hyperparameters raveled into :math:`\lambda \in \mathbb{R}^d`
    (:func:`jax.flatten_util.ravel_pytree`); the inner step
    :math:`\Phi(w, s, \lambda)` (gradient, then ``optax.sgd`` built from
    :math:`\lambda`) and its tangents :math:`Z_{t+1} = A_t Z_t + B_t` of
    the weights *and* the momentum trace by one ``jax.vmap`` over the
    :math:`d` columns of a ``jax.jvp`` with tangent :math:`(Z^w_j, Z^s_j,
    e_j)` (primal computed once: ``out_axes=None``); :math:`h =
    \nabla_\lambda L_{val}(w_{t+1}) + Z^{w\top}_{t+1} \nabla_w
    L_{val}(w_{t+1})`; Adam on :math:`\lambda`. Carry ``(w, s, hp,
    adam, Z^w, Z^s)``.

    ``guarded=True`` adds the library's non-finite guards, written by hand:
    one reduction over the new weights, state and tangents, a select that
    keeps the old ones where any is non-finite, and the outer update
    skipped on a non-finite hypergradient (the ``hand_forward_mode_guarded``
    row: what the guards cost, measured against the unguarded row).
    """
    sp = small_d_problem(pb)
    lam0, unravel = jax.flatten_util.ravel_pytree(sp.hyperparams)
    d = int(lam0.size)
    basis = jnp.eye(d, dtype=lam0.dtype)

    def hypergradient(carry, data, val_data):
        w, s, hp, _, z_w, z_s = carry
        lam, _ = jax.flatten_util.ravel_pytree(hp)

        def phi(w_, s_, lam_):
            hp_ = unravel(lam_)
            g = jax.grad(sp.train_loss)(w_, hp_, data)
            updates, s1 = sp.inner(hp_).update(g, s_, w_)
            return optax.apply_updates(w_, updates), s1

        def column(zw_j, zs_j, e_j):
            return jax.jvp(phi, (w, s, lam), (zw_j, zs_j, e_j))

        (w1, s1), (z_w1, z_s1) = jax.vmap(column, out_axes=(None, 0))(
            z_w, z_s, basis)
        if guarded:
            new, old = (w1, s1, z_w1, z_s1), (w, s, z_w, z_s)
            ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                    for x in jax.tree.leaves(new)]))
            w1, s1, z_w1, z_s1 = jax.tree.map(
                lambda a, b: jnp.where(ok, a, b), new, old)
        v, direct = jax.grad(sp.val_loss, argnums=(0, 1))(w1, hp, val_data)
        h = jax.flatten_util.ravel_pytree(direct)[0] + sum(
            jnp.tensordot(z, g, axes=g.ndim)
            for z, g in zip(jax.tree.leaves(z_w1), jax.tree.leaves(v)))
        return unravel(h), (w1, s1, z_w1, z_s1)

    @jax.jit
    def step(carry, data, val_data):
        hp, r = carry[2], carry[3]
        h, (w1, s1, z_w1, z_s1) = hypergradient(carry, data, val_data)
        updates, r1 = sp.outer.update(h, r, hp)
        new_hp = optax.apply_updates(hp, updates)
        if guarded:
            ok = jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(h)[0]))
            new_hp, r1 = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                                      (new_hp, r1), (hp, r))
        return w1, s1, new_hp, r1, z_w1, z_s1

    s0 = sp.inner(sp.hyperparams).init(sp.params)
    zeros = functools.partial(jax.tree.map,
                              lambda x: jnp.zeros((d,) + x.shape, x.dtype))
    carry = (sp.params, s0, sp.hyperparams, sp.outer.init(sp.hyperparams),
             zeros(sp.params), zeros(s0))
    return _with_hypergradient(step, hypergradient), carry, (
        sp.train_batch, sp.val_batch)


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def build_hand_implicit(solver: str, terms: int, damping: float):
    r"""One implicit (IFT) hyper-step, hand-written, with the library's
    number of Hessian-vector products.

    The inner step :math:`w_{t+1}`; :math:`v = \nabla_w L_{val}(w_{t+1};
    V)` (and the direct term); :math:`x \approx (H + \delta I)^{-1} v` with
    :math:`H = \nabla^2_{ww} L_{tr}(w_{t+1}; D)` by forward-over-reverse
    products: ``solver="cg"`` is :func:`jax.scipy.sparse.linalg.cg` with
    ``maxiter=terms`` and no tolerance, which makes ``terms + 1`` products
    (the initial residual :math:`v - A x_0` at :math:`x_0 = 0` is one);
    ``solver="neumann"`` is Lorraine et al.'s Alg. 3, :math:`p \leftarrow
    v`, ``terms - 1`` times :math:`v \leftarrow v - \alpha A v,\ p
    \leftarrow p + v`, then :math:`x = \alpha p` (``terms - 1``
    products), :math:`\alpha` the inner learning rate. Then one joint
    forward-over-reverse product :math:`(Hx, M^\top x)` (a ``jax.jvp`` of
    :math:`(\nabla_w L_{tr}, \nabla_\rho L_{tr})` along :math:`x`), the
    hypergradient :math:`\nabla_\rho L_{val} - M^\top x`, the relative
    residual :math:`\lVert (H + \delta I)x - v\rVert / \lVert v\rVert`
    (carried, like the library's ``solve_residual``) and Adam. With
    ``terms=10``: 12 products for CG, 10 for Neumann, as the library.
    """
    def build(pb: Problem):
        alpha = pb.inner_lr

        def hypergradient(carry, data, val_data):
            w, s, rho = carry[:3]
            g = jax.grad(pb.train_loss)(w, rho, data)
            updates, s1 = pb.inner.update(g, s, w)
            w1 = optax.apply_updates(w, updates)
            v, direct = jax.grad(pb.val_loss, argnums=(0, 1))(
                w1, rho, val_data)
            grad_w = jax.grad(pb.train_loss)

            def matvec(u):
                hu = jax.jvp(lambda w_: grad_w(w_, rho, data), (w1,),
                             (u,))[1]
                return hu if damping == 0.0 else jax.tree.map(
                    lambda a, b: a + damping * b, hu, u)

            if solver == "cg":
                x = jax.scipy.sparse.linalg.cg(
                    matvec, v, tol=0.0, atol=0.0, maxiter=terms)[0]
            else:
                def body(_, c):
                    cur, acc = c
                    cur = jax.tree.map(lambda a, b: a - alpha * b, cur,
                                       matvec(cur))
                    return cur, jax.tree.map(jnp.add, acc, cur)
                _, acc = jax.lax.fori_loop(0, terms - 1, body, (v, v))
                x = jax.tree.map(lambda a: alpha * a, acc)
            grads = jax.grad(pb.train_loss, argnums=(0, 1))
            h_x, m_x = jax.jvp(lambda w_: grads(w_, rho, data), (w1,),
                               (x,))[1]
            r = jax.tree.map(lambda a, b, c: a + damping * b - c, h_x, x, v)
            residual = _norm(r) / _norm(v)
            h = jax.tree.map(jnp.subtract, direct, m_x)
            return h, (w1, s1, residual)

        @jax.jit
        def step(carry, data, val_data):
            rho, r = carry[2], carry[3]
            h, (w1, s1, residual) = hypergradient(carry, data, val_data)
            updates, r1 = pb.outer.update(h, r, rho)
            return w1, s1, optax.apply_updates(rho, updates), r1, residual

        carry = _hand_carry(pb) + (jnp.zeros((), jnp.float32),)
        return _with_hypergradient(step, hypergradient), carry, (
            pb.train_batch, pb.val_batch)
    return build


def _library_step(opt):
    """The library's own compiled step, called exactly as a user would."""
    def step(state, data, val_data):
        return opt.step(state, data, val_data)
    # Expose the underlying jit for HLO inspection.
    step.lower = jax.jit(opt.step).lower
    step.hypergradient = opt.compute_hypergradient
    return step


def build_t1t2(mode: str):
    def build(pb: Problem):
        opt = T1T2(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                   hypergradient=mode, fd_radius=pb.fd_radius)
        state = opt.init(pb.params, pb.hyperparams)
        return _library_step(opt), state, (pb.train_batch, pb.val_batch)
    return build


def _stack(batch, k):
    return jax.tree.map(lambda x: jnp.stack([x] * k), batch)


def build_greedy(horizon: int, gamma: float, unroll: Any = 1):
    def build(pb: Problem):
        from gradhpo.algorithms.greedy import Greedy
        opt = Greedy(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                     horizon=horizon, gamma=gamma, unroll=unroll)
        state = opt.init(pb.params, pb.hyperparams)
        # One train and one validation slice per inner step (a leading axis
        # only for horizon > 1).
        if horizon == 1:
            return _library_step(opt), state, (pb.train_batch, pb.val_batch)
        return _library_step(opt), state, (_stack(pb.train_batch, horizon),
                                           _stack(pb.val_batch, horizon))
    return build


def build_hyperdistill(gamma: float, theta: float, seed: int):
    def build(pb: Problem):
        from gradhpo.algorithms.online import HyperDistill
        opt = HyperDistill(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                           gamma=gamma, theta=theta)
        state = opt.init(pb.params, pb.hyperparams, batch=pb.train_batch,
                         key=jax.random.PRNGKey(seed))
        return _library_step(opt), state, (pb.train_batch, pb.val_batch)
    return build


def build_warm_start(lookahead: int, step_size: float):
    def build(pb: Problem):
        from gradhpo.algorithms.warm_start import OneShotWarmStart
        opt = OneShotWarmStart(pb.train_loss, pb.val_loss, pb.inner,
                               step_size=step_size, num_steps=1,
                               lookahead=lookahead)
        state = opt.init(pb.params, pb.hyperparams)
        # K > 1 lookahead steps take a leading axis; one validation batch
        train = (_stack(pb.train_batch, lookahead) if lookahead > 1
                 else pb.train_batch)
        return _library_step(opt), state, (train, pb.val_batch)
    return build


def build_forward_mode(hyper_interval: int = 1, decay: float = 1.0):
    def build(pb: Problem):
        from gradhpo.algorithms.forward_mode import ForwardMode
        sp = small_d_problem(pb)
        opt = ForwardMode(sp.train_loss, sp.val_loss, sp.inner, sp.outer,
                          hyper_interval=hyper_interval, decay=decay)
        state = opt.init(sp.params, sp.hyperparams)
        return _library_step(opt), state, (sp.train_batch, sp.val_batch)
    return build


def build_implicit(solver: str, terms: int, damping: float):
    def build(pb: Problem):
        from gradhpo.algorithms.implicit import Implicit
        opt = Implicit(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                       hyper_interval=1, solver=solver, terms=terms,
                       damping=damping,
                       neumann_scale=(pb.inner_lr if solver == "neumann"
                                      else None))
        state = opt.init(pb.params, pb.hyperparams)
        return _library_step(opt), state, (pb.train_batch, pb.val_batch)
    return build


def optional_modules() -> Dict[str, bool]:
    """Which optional algorithm modules import in this checkout."""
    found = {}
    for mod in ("greedy", "online", "warm_start", "forward_mode",
                "implicit"):
        try:
            __import__(f"gradhpo.algorithms.{mod}")
            found[mod] = True
        except ImportError:
            found[mod] = False
    return found


def cases(horizon: int = 5, lookahead: int = 1, model: str = "mlp",
          n_weights: int = 3) -> List[cm.Case]:
    """The registry of rows. Add a :class:`~_common.Case` to add a row.

    The goals relative to ``plain`` are stated for the MLP only; every
    library row has the goal <= 1.1x its hand-written counterpart on both
    models. ``n_weights`` (the model's weight matrices) sets the
    ForwardMode problem's :math:`d` and so its goal.
    """
    def vs_plain(goal):
        return goal if model == "mlp" else None

    rows = [
        cm.Case(BASE, build_plain,
                description="jitted optax step, fixed lambda (1 G)"),
        cm.Case("two_grads", build_two_grads,
                description="two sequential gradient evaluations (2 G)"),
        cm.Case("hand_exact", build_hand_exact,
                description="hand-written vjp through the step + Adam"),
        cm.Case("t1t2_exact", build_t1t2("exact"), reference="hand_exact",
                goal_vs_base=vs_plain(GOAL_EXACT_VS_PLAIN),
                goal_vs_reference=GOAL_VS_HAND,
                description="T1T2(hypergradient='exact').step"),
        cm.Case("hand_fd", build_hand_fd,
                description="hand-written DARTS central difference + Adam"),
        cm.Case("t1t2_fd", build_t1t2("finite_difference"),
                reference="hand_fd", goal_vs_base=vs_plain(GOAL_FD_VS_PLAIN),
                goal_vs_reference=GOAL_VS_HAND,
                description="T1T2(hypergradient='finite_difference').step"),
    ]
    found = optional_modules()
    if found["greedy"]:
        rows += [
            cm.Case("hand_greedy", build_hand_greedy(horizon, GAMMA),
                    per_call=horizon,
                    description=f"hand-written greedy, lax.scan over "
                    f"{horizon} steps + Adam, per inner step"),
            cm.Case("hand_greedy_unrolled",
                    build_hand_greedy(horizon, GAMMA, unroll=True),
                    per_call=horizon,
                    description="hand_greedy with the horizon unrolled "
                    "(no XLA while loop), per inner step"),
            cm.Case("greedy", build_greedy(horizon, GAMMA), per_call=horizon,
                    reference="hand_greedy",
                    goal_vs_base=vs_plain(GOAL_GREEDY_VS_PLAIN),
                    goal_vs_reference=GOAL_VS_HAND,
                    description=f"Greedy(horizon={horizon}).step, per inner "
                    "step"),
            cm.Case("greedy_unrolled", build_greedy(horizon, GAMMA, True),
                    per_call=horizon, reference="hand_greedy_unrolled",
                    goal_vs_base=vs_plain(GOAL_GREEDY_VS_PLAIN),
                    goal_vs_reference=GOAL_VS_HAND,
                    description=f"Greedy(horizon={horizon}, unroll=True)"
                    ".step, per inner step")]
    if found["online"]:
        rows += [
            cm.Case("hand_hyperdistill",
                    build_hand_hyperdistill(GAMMA, THETA, SEED),
                    description="hand-written online HyperDistill step "
                    "+ Adam"),
            cm.Case("hyperdistill", build_hyperdistill(GAMMA, THETA, SEED),
                    reference="hand_hyperdistill",
                    goal_vs_base=vs_plain(GOAL_HYPERDISTILL_VS_PLAIN),
                    goal_vs_reference=GOAL_VS_HAND,
                    description="HyperDistill.step (online step)")]
    if found["warm_start"]:
        rows += [
            cm.Case("hand_warm_start",
                    build_hand_warm_start(lookahead, WARM_STEP_SIZE),
                    description="hand-written value_and_grad of the "
                    "lookahead + one hyper-step"),
            cm.Case("warm_start", build_warm_start(lookahead, WARM_STEP_SIZE),
                    reference="hand_warm_start",
                    goal_vs_base=vs_plain(GOAL_WARM_START_VS_PLAIN),
                    goal_vs_reference=GOAL_VS_HAND,
                    description=f"OneShotWarmStart(lookahead={lookahead}), "
                    "total")]
    if found["forward_mode"]:
        d = small_d(n_weights)
        rows += [
            cm.Case("plain_small_d", build_plain_small_d,
                    description=f"plain step of the d={d} problem (one L2 "
                    "per weight matrix, sgd from log_lr and momentum)"),
            cm.Case("hand_forward_mode", build_hand_forward_mode,
                    description=f"hand-written vmap over {d} columns of a "
                    "jvp of the step (w and momentum tangents) + Adam"),
            cm.Case("hand_forward_mode_guarded",
                    functools.partial(build_hand_forward_mode, guarded=True),
                    reference="hand_forward_mode",
                    description="the same with the library's non-finite "
                    "guards by hand (reduction + select over the d tangent "
                    "copies)"),
            cm.Case("forward_mode", build_forward_mode(1, 1.0),
                    reference="hand_forward_mode",
                    goal_vs_base=vs_plain(forward_mode_goal(d)),
                    goal_vs_reference=GOAL_VS_HAND,
                    description=f"ForwardMode(hyper_interval=1, decay=1)"
                    f".step, d={d}, per inner step (goal 1.3 (1 + d))")]
    if found["implicit"]:
        k = IMPLICIT_TERMS
        rows += [
            cm.Case("hand_implicit",
                    build_hand_implicit("cg", k, IMPLICIT_DAMPING),
                    description=f"hand-written IFT: jax cg, {k} iterations "
                    f"({k + 1} HVPs) + 1 joint (Hx, M^T x) product, "
                    "residual, Adam"),
            cm.Case("implicit", build_implicit("cg", k, IMPLICIT_DAMPING),
                    reference="hand_implicit",
                    goal_vs_reference=GOAL_VS_HAND,
                    description=f"Implicit(solver='cg', terms={k}).step "
                    f"({k + 2} forward-over-reverse products)"),
            cm.Case("hand_implicit_neumann",
                    build_hand_implicit("neumann", k, IMPLICIT_DAMPING),
                    description=f"hand-written IFT: {k}-term Neumann series "
                    f"({k - 1} HVPs) + 1 joint product, residual, Adam"),
            cm.Case("implicit_neumann",
                    build_implicit("neumann", k, IMPLICIT_DAMPING),
                    reference="hand_implicit_neumann",
                    goal_vs_reference=GOAL_VS_HAND,
                    description=f"Implicit(solver='neumann', terms={k}, "
                    f"neumann_scale=inner lr).step ({k} products)")]
    return rows


# Rows a --quick run leaves out unless --cases names them: variants of rows
# it runs (compiling, not timing, is most of a quick run: about 4-10 s per
# checked pair on two cores).
QUICK_SKIP = ("hand_greedy_unrolled", "greedy_unrolled", "plain_small_d",
              "hand_forward_mode_guarded", "hand_implicit_neumann",
              "implicit_neumann")

# Extra equivalence checks beyond (row, reference): the unrolled hand-written
# greedy must compute what the library does too.
EXTRA_CHECKS = (("greedy", "hand_greedy_unrolled"),
                ("greedy_unrolled", "hand_greedy"))

# The check's tolerance is multiplied by this for a (library, hand) pair.
# * The DARTS central difference in float32 is itself only accurate to about
#   4e-4 here (relative to the exact one-step hypergradient, which it equals
#   in exact arithmetic for an L2 penalty): a one-ulp difference of rho
#   between the two rows after the first call is amplified to that level at
#   the second.
# * On CPU, XLA lowers a convolution inside a while loop (lax.scan) with its
#   generic loop emitter and outside with the library kernel, which round
#   differently: on the CNN the unrolled greedy row differs from the scanned
#   ones by 3e-5 in the weights and 3e-4 in the hypergradient after two calls
#   (10 inner steps) in float32, and by 2e-15 in float64.
CHECK_RTOL_SCALE = {("t1t2_fd", "hand_fd"): 10.0,
                    ("greedy", "hand_greedy_unrolled"): 20.0,
                    ("greedy_unrolled", "hand_greedy"): 20.0}


# --------------------------------------------------------------------------
# Equivalence of the hand-written rows with the library


def _params_and_hyperparams(carry):
    """``(params, hyperparams)`` of a library state or a hand-written carry
    (``(w, s, rho, ...)``)."""
    if hasattr(carry, "hyperparams"):
        return carry.params, carry.hyperparams
    return carry[0], carry[2]


def relative_error(a, b, slack: Any = None) -> float:
    """Max over leaves and entries of ``|a - b| / (|b| + max|b|)``.

    ``<= rtol`` is ``allclose(a, b, rtol, atol=rtol * max|b|)`` leafwise:
    relative to each entry, with a floor at the scale of the leaf (so entries
    that cancel to nearly zero do not count as large relative errors).
    ``slack`` (a tree like ``b``, or ``None``) is subtracted from ``|a - b|``
    first: the rounding that cannot be avoided.
    """
    worst = 0.0
    slacks = (jax.tree.leaves(slack) if slack is not None
              else [0.0] * len(jax.tree.leaves(b)))
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), slacks):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        diff = np.maximum(np.abs(x - y) - np.asarray(z, np.float64), 0.0)
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        if scale == 0.0:
            err = float(np.max(diff)) if diff.size else 0.0
        else:
            err = float(np.max(diff / (np.abs(y) + scale)))
        if not np.isfinite(err):
            return float("inf")
        worst = max(worst, err)
    return worst


def _change(rho, rho0):
    return jax.tree.map(lambda x, y: np.asarray(x, np.float64)
                        - np.asarray(y, np.float64), rho, rho0)


def _vary(args, i):
    """The batches of call ``i``: floating leaves scaled by ``1 + i / 4``
    (the timed calls reuse one batch; here successive batches differ, so
    HyperDistill's subsampled mixture :math:`D^*` of two batches matters)."""
    return jax.tree.map(
        lambda x: x * (1.0 + 0.25 * i)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, args)


def check_equivalence(prebuilt: Dict[str, Tuple[Any, Any, Tuple[Any, ...]]],
                      pairs: Sequence[Tuple[str, str]], steps: int = 2,
                      rtol: float = 1e-4,
                      log: Callable[[str], None] = print
                      ) -> Dict[str, Dict[str, Any]]:
    """Checks each hand-written row computes what its library row does.

    From the same initial state, for ``steps`` calls: the hypergradient each
    would apply (``fn.hypergradient``: the library's
    ``compute_hypergradient`` and the hand-written row's own hypergradient
    function, the one its timed step calls), then one step of each, after
    which the hyperparameters' change and the weights are compared. Every
    comparison is :func:`relative_error` ``<= rtol`` in float32. Comparing
    the hypergradient itself matters: Adam's first step is about
    ``-lr * sign(h)`` whatever the size of ``h``, and the warm start's step
    ``1e-3 * h`` is below float32 resolution of ``rho``.

    Args:
      prebuilt: ``{name: (fn, carry0, args)}`` from the cases' builds (not
        modified: every pair starts from ``carry0``).
      pairs: ``(library row, hand-written row)`` names.
      steps: calls compared (2 exercises HyperDistill's mixing of
        :math:`D^*` and Adam's second moment).
      rtol: tolerance.

    Returns:
      ``{"lib~hand": {"hypergradient": err, "hyperparams_change": err,
      "params": err, "ok": bool}}`` with the worst error over the calls.
    """
    results = {}
    for lib, hand in pairs:
        if lib not in prebuilt or hand not in prebuilt:
            continue
        (lf, lc, la), (hf, hc, ha) = prebuilt[lib], prebuilt[hand]
        rho0 = _params_and_hyperparams(hc)[1]
        worst = {"hypergradient": 0.0, "hyperparams_change": 0.0,
                 "params": 0.0}
        for i in range(steps):
            la_i, ha_i = _vary(la, i), _vary(ha, i)
            errs = {"hypergradient": relative_error(
                lf.hypergradient(lc, *la_i), hf.hypergradient(hc, *ha_i))}
            lc, hc = lf(lc, *la_i), hf(hc, *ha_i)
            (lw, lrho), (hw, hrho) = (_params_and_hyperparams(lc),
                                      _params_and_hyperparams(hc))
            errs["hyperparams_change"] = relative_error(
                _change(lrho, rho0), _change(hrho, rho0),
                # rho_t - rho_0 is resolved to one float32 ulp of rho_t
                # (Adam moves rho ~ -9 by ~0.01: 1e-4 relative)
                slack=jax.tree.map(lambda r: np.spacing(np.abs(
                    np.asarray(r, np.float32))), hrho))
            errs["params"] = relative_error(lw, hw)
            worst = {k: max(v, errs[k]) for k, v in worst.items()}
        tol = rtol * CHECK_RTOL_SCALE.get((lib, hand), 1.0)
        ok = all(v <= tol for v in worst.values())
        results[f"{lib}~{hand}"] = dict(worst, ok=ok, steps=steps, rtol=tol)
        log(f"  check {lib} vs {hand}: hypergradient "
            f"{worst['hypergradient']:.1e}, hyperparams change "
            f"{worst['hyperparams_change']:.1e}, params "
            f"{worst['params']:.1e} over {steps} calls "
            f"(rtol {tol:g}): {'ok' if ok else 'MISMATCH'}")
    return results


def prebuild(registry: Sequence[cm.Case], pb: Problem,
             log: Callable[[str], None] = print
             ) -> Dict[str, Tuple[Any, Any, Tuple[Any, ...]]]:
    """Builds every case once (skipping a row whose build raises)."""
    built = {}
    for case in registry:
        try:
            built[case.name] = case.build(pb)
        except Exception as err:  # noqa: BLE001 -- report and skip the row
            log(f"  skipping {case.name}: {type(err).__name__}: {err}")
    return built


def check_pairs(registry: Sequence[cm.Case]) -> List[Tuple[str, str]]:
    """``(library row, hand-written row)`` pairs to check."""
    names = {c.name for c in registry}
    pairs = [(c.name, c.reference) for c in registry
             if c.reference is not None and c.reference in names]
    pairs += [p for p in EXTRA_CHECKS if set(p) <= names]
    return pairs


# --------------------------------------------------------------------------
# Driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, few rounds and, unless --cases is "
                   "given, one row pair per algorithm (without the variant "
                   "rows " + ", ".join(QUICK_SKIP) + "): a smoke test, "
                   "< 30 s on an idle machine")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds (default 40, quick 4)")
    p.add_argument("--calls", type=int, default=0,
                   help="calls per timed sample for every case; 0 = "
                   "calibrate each case to about --sample-seconds")
    p.add_argument("--sample-seconds", type=float, default=None,
                   help="target length of one timed sample "
                   "(default 0.05, quick 0.005)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per case after compiling "
                   "(default 3, quick 1)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 128, quick 16)")
    p.add_argument("--hidden", default=None,
                   help="MLP hidden sizes (default 512,512, quick 32,32)")
    p.add_argument("--channels", default=None,
                   help="CNN channels (default 16,32, quick 4,8)")
    p.add_argument("--momentum", type=float, default=0.9,
                   help="inner heavy-ball momentum (0 = plain SGD)")
    p.add_argument("--inner-lr", type=float, default=0.05)
    p.add_argument("--outer-lr", type=float, default=1e-2)
    p.add_argument("--l2-init", type=float, default=1e-4)
    p.add_argument("--fd-radius", type=float, default=0.01)
    p.add_argument("--horizon", type=int, default=5,
                   help="Greedy horizon (if gradhpo.algorithms.greedy exists)")
    p.add_argument("--lookahead", type=int, default=1,
                   help="OneShotWarmStart lookahead (if it exists)")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of rows (plain is always in)")
    p.add_argument("--hlo", action="store_true",
                   help="also report XLA flops, bytes and op counts per case")
    p.add_argument("--check", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="before timing, check that every hand-written row "
                   "gives the library row's hypergradient, hyperparameters "
                   "and weights (exit with an error if not)")
    p.add_argument("--check-steps", type=int, default=2,
                   help="calls compared by the check")
    p.add_argument("--check-rtol", type=float, default=1e-4,
                   help="tolerance of the check (float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write a JSON report here")
    return p.parse_args(argv)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The problem the options describe (``--quick``: tiny sizes)."""
    quick = args.quick
    return make_problem(
        args.model,
        hidden=_ints(args.hidden or ("32,32" if quick else "512,512")),
        channels=_ints(args.channels or ("4,8" if quick else "16,32")),
        batch=args.batch or (16 if quick else 128), side=28,
        inner_lr=args.inner_lr, momentum=args.momentum,
        outer_lr=args.outer_lr, l2_init=args.l2_init,
        fd_radius=args.fd_radius, seed=args.seed)


def extra_config(pb: Problem) -> Dict[str, Any]:
    """The configuration of the ForwardMode and Implicit rows."""
    k = IMPLICIT_TERMS
    return {
        "forward_mode": {
            "d": small_d(len(pb.params)),
            "hyperparameters": "log_l2 (one per weight matrix), log_lr, "
            "momentum; inner sgd(exp(log_lr), momentum)",
            "hyper_interval": 1, "decay": 1.0,
            "goal_vs_plain": "1.3 * (1 + d)"},
        "implicit": {
            "hyperparameters": pb.config["hyperparameters"],
            "terms": k, "damping": IMPLICIT_DAMPING,
            "neumann_scale": pb.inner_lr, "hyper_interval": 1,
            "warm_start": False,
            "products_cg": f"{k + 1} HVPs in jax's cg (initial residual "
            "included) + 1 joint (Hx, M^T x) product",
            "products_neumann": f"{k - 1} HVPs + 1 joint product"},
    }


def _prebuilt(result):
    return lambda pb: result


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (4 if quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    sample_seconds = args.sample_seconds or (0.005 if quick else 0.05)
    pb = problem_from_args(args)
    batch = pb.config["batch"]
    d = small_d(len(pb.params))

    registry = cases(args.horizon, args.lookahead, args.model,
                     n_weights=len(pb.params))
    if quick and not args.cases:  # compiling dominates a quick run
        registry = [c for c in registry if c.name not in QUICK_SKIP]
    if args.cases:
        wanted = set(args.cases.split(",")) | {BASE}
        unknown = wanted - {c.name for c in registry}
        if unknown:
            raise SystemExit(f"--cases: unknown row(s) {sorted(unknown)}; "
                             f"known: {[c.name for c in registry]}")
        registry = [c for c in registry if c.name in wanted]

    print(f"step_cost: {pb.config['architecture']}, batch {batch}, "
          f"{pb.config['n_params']:,} params, "
          f"{pb.config['n_hyperparams']:,} hyperparams, "
          f"inner {pb.config['inner']}, outer {pb.config['outer']}")
    print(f"jax {jax.__version__} on {jax.default_backend()}; "
          "compiling and warming up...")
    start = time.perf_counter()
    prebuilt = prebuild(registry, pb)
    equivalence: Dict[str, Dict[str, Any]] = {}
    if args.check:
        equivalence = check_equivalence(
            prebuilt, check_pairs(registry), steps=args.check_steps,
            rtol=args.check_rtol)
        bad = sorted(k for k, v in equivalence.items() if not v["ok"])
        if bad:
            raise SystemExit(
                f"equivalence check failed for {bad}: a hand-written row "
                "does not compute what the library does, so its ratio "
                "would be meaningless (--no-check to time anyway)")
    # every case starts timing from its first state (the check ran copies)
    registry = [dataclasses.replace(c, build=_prebuilt(prebuilt[c.name]))
                for c in registry if c.name in prebuilt]
    built = cm.build_cases(registry, pb, warmup=warmup)
    calls = cm.calibrate_calls(built, sample_seconds, args.calls)
    print(f"timing {len(built)} cases x {rounds} rounds, alternating; calls "
          "per sample: " + ", ".join(f"{k} {v}" for k, v in calls.items()))
    times = cm.time_alternating(built, rounds)
    rows = cm.summarize(built, times, BASE)
    elapsed = time.perf_counter() - start

    hlo = {}
    if args.hlo:
        for b in built:
            hlo[b.case.name] = cm.hlo_stats(b.fn, b.carry, *b.args)
            for row in rows:
                if row["name"] == b.case.name:
                    row["hlo"] = hlo[b.case.name]

    print()
    print(cm.format_table(rows, BASE))
    if hlo:
        print()
        print(format_hlo(hlo))
    goals = [r for r in rows if r["pass_vs_base"] is not None
             or r["pass_vs_reference"] is not None]
    all_pass = all(v is not False for r in goals
                   for v in (r["pass_vs_base"], r["pass_vs_reference"]))
    print(f"\ngoals {'met' if all_pass else 'NOT met'}; "
          f"{elapsed:.1f} s total (ratios: median over rounds of per-round "
          "ratios; IQR over rounds)")

    report = {
        "benchmark": "step_cost",
        "command": " ".join([os.path.basename(sys.argv[0])]
                            + list(argv if argv is not None
                                   else sys.argv[1:])),
        "config": dict(pb.config, **extra_config(pb),
                       rounds=rounds, calls=calls,
                       warmup=warmup, quick=quick,
                       sample_seconds=sample_seconds,
                       optional_modules=optional_modules()),
        "environment": cm.environment(),
        "base": BASE,
        "goals": {"t1t2_exact_vs_plain": GOAL_EXACT_VS_PLAIN,
                  "t1t2_fd_vs_plain": GOAL_FD_VS_PLAIN,
                  "greedy_per_inner_step_vs_plain": GOAL_GREEDY_VS_PLAIN,
                  "hyperdistill_vs_plain": GOAL_HYPERDISTILL_VS_PLAIN,
                  "warm_start_total_vs_plain": GOAL_WARM_START_VS_PLAIN,
                  "forward_mode_per_inner_step_vs_plain":
                      forward_mode_goal(d),
                  "forward_mode_vs_plain_rule":
                      f"{GOAL_FORWARD_MODE_PER_COLUMN} * (1 + d), d = {d}",
                  "vs_plain_goals_apply_to": "mlp",
                  "library_vs_hand_written": GOAL_VS_HAND},
        "equivalence": equivalence,
        "rows": rows,
        "all_goals_pass": all_pass,
        "seconds_total": elapsed,
    }
    if args.out:
        cm.write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


def format_hlo(hlo: Dict[str, Dict[str, Any]]) -> str:
    ops = list(next(iter(hlo.values()))["ops"])
    header = (f"{'case':<22} {'GFLOP':>8} {'MB moved':>9} "
              + " ".join(f"{o[:7]:>7}" for o in ops))
    lines = [header, "-" * len(header)]
    for name, st in hlo.items():
        lines.append(
            f"{name:<22} {st['flops'] / 1e9:>8.3f} "
            f"{st['bytes_accessed'] / 1e6:>9.1f} "
            + " ".join(f"{st['ops'][o]:>7d}" for o in ops))
    lines.append("(XLA's estimate counts the body of a while loop, i.e. a "
                 "lax.scan, once: compare such a row with its reference "
                 "only)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
