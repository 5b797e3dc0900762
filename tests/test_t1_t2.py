"""T1–T2 against ALGORITHMS.md §6 closed forms and finite differences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh
from gradhpo.utils import gradients as gr

import problems as pb

MODES = ["exact", "finite_difference"]


@pytest.mark.parametrize("mode", MODES)
def test_t2_quadratic_scalar(x64, mode):
    """§6 T2: h = -eta <w0, v> = -0.16, so lambda increases."""
    opt = gh.T1T2(pb.quad_train_loss, pb.quad_val_loss, optax.sgd(0.1),
                  optax.sgd(1.0), hypergradient=mode)
    state = opt.init(jnp.array([1.0, -1.0]), jnp.array(0.5))
    h = opt.compute_hypergradient(state, None, None)
    np.testing.assert_allclose(h, -0.16, rtol=1e-10)
    new = opt.step(state, None, None)
    np.testing.assert_allclose(new.params, [0.85, -0.75], rtol=1e-12)
    np.testing.assert_allclose(new.hyperparams, 0.66, rtol=1e-12)
    np.testing.assert_allclose(new.metadata["hypergradient_norm"], 0.16,
                               rtol=1e-10)
    np.testing.assert_allclose(new.metadata["val_loss"],
                               0.5 * (0.35 ** 2 + 1.25 ** 2), rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_t2_quadratic_per_coordinate(x64, mode):
    opt = gh.T1T2(pb.quad_train_loss, pb.quad_val_loss, optax.sgd(0.1),
                  optax.sgd(1.0), hypergradient=mode)
    state = opt.init(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.5]))
    h = opt.compute_hypergradient(state, None, None)
    np.testing.assert_allclose(h, [-0.035, -0.125], rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_t2_heavy_ball_frozen_buffer(x64, mode):
    """§6 T2: heavy ball with buffer m0 = (0.3, -0.2), mu = 0.9: -0.1555."""
    opt = gh.T1T2(pb.quad_train_loss, pb.quad_val_loss,
                  optax.sgd(0.1, momentum=0.9), optax.sgd(1.0),
                  hypergradient=mode)
    state = opt.init(jnp.array([1.0, -1.0]), jnp.array(0.5))
    (trace,) = [s for s in state.inner_opt_state
                if isinstance(s, optax.TraceState)]
    buffered = tuple(
        s._replace(trace=jnp.array([0.3, -0.2]))
        if isinstance(s, optax.TraceState) else s
        for s in state.inner_opt_state)
    state = state.replace(inner_opt_state=buffered)
    h = opt.compute_hypergradient(state, None, None)
    np.testing.assert_allclose(h, -0.1555, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_t2_ridge_one_step_sign(x64, mode):
    """§6 T2 ridge: +0.000885, opposite in sign to the IFT value."""
    train, val = pb.ridge_batches()
    opt = gh.T1T2(pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.01),
                  optax.sgd(1.0), hypergradient=mode)
    state = opt.init(jnp.array([0.2, -0.1]), jnp.array(1.0))
    np.testing.assert_allclose(opt.compute_hypergradient(state, train, val),
                               0.000885, rtol=1e-9)
    np.testing.assert_allclose(opt.step(state, train, val).params,
                               [0.342, 0.089], rtol=1e-12)


def _ridge_ift(lam):
    """dL_val/dlambda at w*(lambda) by the implicit function theorem."""
    x, y = np.array(pb.RIDGE_X), np.array(pb.RIDGE_Y)
    xv, yv = np.array(pb.RIDGE_XV), np.array(pb.RIDGE_YV)
    a = x.T @ x + lam * np.eye(2)
    w = np.linalg.solve(a, x.T @ y)
    return -(xv.T @ (xv @ w - yv)) @ np.linalg.solve(a, w), w


def test_t1_ridge_closed_form_and_sign(x64):
    """§6 T1: the IFT values, and the sign test: from lambda = 0.05 and from
    lambda = 20 (where the converged one-step hypergradient agrees in sign
    with the IFT one) T1–T2 moves lambda toward lambda* = 5.602."""
    g, w = _ridge_ift(1.0)
    np.testing.assert_allclose(w, [1 / 116, 44 / 116], rtol=1e-12)
    np.testing.assert_allclose(g, -0.084036348354, rtol=1e-10)
    np.testing.assert_allclose(_ridge_ift(2.0)[0], -0.020330417881,
                               rtol=1e-10)
    train, val = pb.ridge_batches()
    for start, sign in [(0.05, 1.0), (20.0, -1.0)]:
        assert sign * _ridge_ift(start)[0] < 0
        state = _converged_ridge_state(start)
        opt = gh.T1T2(pb.log_ridge_train_loss, pb.ridge_val_loss,
                      optax.sgd(0.015), optax.sgd(1.0))
        h = opt.compute_hypergradient(state, train, val)["log_l2"]
        assert sign * float(h) < 0
        state = opt.step(state, train, val)
        assert sign * (float(state.hyperparams["log_l2"]) - np.log(start)) > 0


def _converged_ridge_state(lam):
    train, val = pb.ridge_batches()
    frozen = gh.T1T2(pb.log_ridge_train_loss, pb.ridge_val_loss,
                     optax.sgd(0.015), optax.sgd(0.0))
    state = frozen.init(jnp.zeros(2), {"log_l2": jnp.array(np.log(lam))})
    for _ in range(15000):
        state = frozen.step(state, train, val)
    np.testing.assert_allclose(state.params, _ridge_ift(lam)[1], rtol=1e-6)
    return state


def test_t1_ridge_converges_to_one_step_fixed_point(x64):
    """T1–T2 fixed points satisfy M^T v = 0, i.e. <grad L_val(w*), w*> = 0
    (Luketina §2.1), not dL_val/dlambda = 0: on the T1 data that is
    lambda = 0.2155515 (root found independently below), not 5.6."""
    def one_step_condition(lam):
        w = _ridge_ift(lam)[1]
        x, y = np.array(pb.RIDGE_XV), np.array(pb.RIDGE_YV)
        return (x.T @ (x @ w - y)) @ w
    lo, hi = 0.1, 0.3
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if one_step_condition(mid) > 0 else (lo, mid)
    np.testing.assert_allclose(lo, 0.21555152614, rtol=1e-9)
    train, val = pb.ridge_batches()
    opt = gh.T1T2(pb.log_ridge_train_loss, pb.ridge_val_loss,
                  optax.sgd(0.01), optax.sgd(10.0))
    state = opt.init(jnp.zeros(2), {"log_l2": jnp.array(0.0)})
    for _ in range(20000):
        state = opt.step(state, train, val)
    np.testing.assert_allclose(jnp.exp(state.hyperparams["log_l2"]), lo,
                               rtol=1e-4)


def test_t1_diagonal_toy_converges_to_optimum(x64):
    """§6 T1 diagonal toy: X = I, so the T1–T2 fixed point <v, w*> = 0 is
    the IFT optimum lambda* = 2/3; many steps must reach it."""
    train = (jnp.eye(2), jnp.array([1.0, 2.0]))
    val = (jnp.eye(2), jnp.array([1.0, 1.0]))
    opt = gh.T1T2(pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.2),
                  optax.sgd(2.0))
    state = opt.init(jnp.zeros(2), jnp.array(1.5))
    for _ in range(3000):
        state = opt.step(state, train, val)
    np.testing.assert_allclose(state.hyperparams, 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(state.params, [0.6, 1.2], rtol=1e-6)


def _sin_loss(w, lam, batch):
    del batch
    return 0.5 * jnp.sum(w ** 2) + lam * jnp.sum(jnp.cos(w))


def test_t4_finite_difference_values(x64):
    """§6 T4: FD(eps) = -sum sin(w) sin(eps v) / eps, error O(eps^2)."""
    w = jnp.array([0.3, -1.2, 2.0])
    v = jnp.array([1.0, 0.5, -2.0])
    exact = 1.989094189973637
    vnorm = float(jnp.linalg.norm(v))
    for eps, expected in [(0.1, 1.977292586064), (0.01, 1.988975936308),
                          (0.001, 1.989093007413)]:
        fd = gr.finite_difference_mixed_product(
            _sin_loss, w, jnp.array(1.0), None, v, radius=eps * vnorm)
        np.testing.assert_allclose(fd, expected, rtol=1e-10)
        np.testing.assert_allclose((fd - exact) / eps ** 2, -1.182560682,
                                   rtol=2e-2)
    # the three exact routes to M^T v agree
    jvp = jax.jvp(lambda w_: jax.grad(_sin_loss, 1)(w_, 1.0, None), (w,),
                  (v,))[1]
    vjp = jax.vjp(lambda lam: jax.grad(_sin_loss)(w, lam, None), 1.0)[1](v)[0]
    np.testing.assert_allclose([jvp, vjp], [exact, exact], rtol=1e-12)
    # zero direction: guarded, no 0/0
    zero = gr.finite_difference_mixed_product(
        _sin_loss, w, jnp.array(1.0), None, jnp.zeros(3), radius=0.01)
    assert float(zero) == 0.0


def test_t4_whole_step_fd_error_is_quadratic(x64):
    """FD-mode hypergradient -> exact as O(radius^2) on a non-quadratic
    problem (cos penalty), through the whole T1T2 step."""
    def val_loss(w, lam, batch):
        del lam, batch
        return jnp.sum(jnp.sin(w) + 0.5 * w ** 2)
    w0, lam0 = jnp.array([0.3, -1.2, 2.0]), jnp.array(0.7)
    exact = gh.T1T2(_sin_loss, val_loss, optax.sgd(0.5), optax.sgd(1.0))
    h_exact = exact.compute_hypergradient(exact.init(w0, lam0), None, None)
    errors = []
    for radius in [0.4, 0.04]:
        fd = gh.T1T2(_sin_loss, val_loss, optax.sgd(0.5), optax.sgd(1.0),
                     hypergradient="finite_difference", fd_radius=radius)
        h = fd.compute_hypergradient(fd.init(w0, lam0), None, None)
        errors.append(float(h - h_exact))
    assert abs(errors[0]) > 1e-4
    np.testing.assert_allclose(errors[0] / errors[1], 100.0, rtol=0.02)


def _one_step_objective(train_loss, val_loss, tx, params, opt_state, hp,
                        train, val):
    """lambda -> L_val(Phi(w, s, lambda; D), lambda), written independently
    of the library with optax directly."""
    grads = jax.grad(train_loss)(params, hp, train)
    updates, _ = tx.update(grads, opt_state, params)
    return val_loss(optax.apply_updates(params, updates), hp, val)


@pytest.mark.parametrize("inner", ["sgd", "momentum", "adam"])
def test_exact_equals_central_difference_per_coordinate(x64, key, inner):
    txs = {"sgd": optax.sgd(0.3), "momentum": optax.sgd(0.1, momentum=0.9),
           "adam": optax.adam(0.05)}
    tx = txs[inner]
    k1, k2, k3 = jax.random.split(key, 3)
    params = pb.init_mlp(k1)
    hp = pb.mlp_hyperparams(jnp.float64)
    train, val = pb.mlp_batch(k2), pb.mlp_batch(k3)
    opt = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss, tx, optax.sgd(0.0))
    state = opt.init(params, hp)
    for _ in range(3):   # a non-trivial optimizer state (moments, counts)
        state = opt.step(state, train, val)
    h = opt.compute_hypergradient(state, train, val)

    flat, unravel = jax.flatten_util.ravel_pytree(state.hyperparams)
    objective = jax.jit(lambda f: _one_step_objective(
        pb.mlp_train_loss, pb.mlp_val_loss, tx, state.params,
        state.inner_opt_state, unravel(f), train, val))
    delta = 1e-5
    fd = np.array([(objective(flat.at[i].add(delta))
                    - objective(flat.at[i].add(-delta))) / (2 * delta)
                   for i in range(flat.size)])
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(h)[0], fd,
                               rtol=1e-6, atol=1e-10)


def test_finite_difference_mode_close_to_exact_on_mlp(x64, key):
    k1, k2, k3 = jax.random.split(key, 3)
    params, hp = pb.init_mlp(k1), pb.mlp_hyperparams(jnp.float64)
    train, val = pb.mlp_batch(k2), pb.mlp_batch(k3)
    hs = []
    for mode in MODES:
        opt = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss,
                      optax.sgd(0.1, momentum=0.9), optax.sgd(0.0),
                      hypergradient=mode, fd_radius=1e-3)
        hs.append(jax.flatten_util.ravel_pytree(
            opt.compute_hypergradient(opt.init(params, hp), train, val))[0])
    np.testing.assert_allclose(hs[1], hs[0], rtol=1e-4, atol=1e-9)


def _half_quadratic(w, hp, batch):
    del hp, batch
    return 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * w ** 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factory", [
    lambda hp: optax.sgd(hp["lr"]),
    lambda hp: optax.inject_hyperparams(optax.sgd)(learning_rate=hp["lr"]),
], ids=["closure", "inject_hyperparams"])
def test_t5_learning_rate_hypergradient(x64, mode, factory):
    """§6 T5: dL(w1)/d eta = -(H w1)^T (H w0) = -7.2 for H = diag(1, 3)."""
    opt = gh.T1T2(_half_quadratic, _half_quadratic, factory, optax.sgd(0.01),
                  hypergradient=mode)
    state = opt.init(jnp.array([1.0, 1.0]), {"lr": jnp.array(0.1)})
    h = opt.compute_hypergradient(state, None, None)
    np.testing.assert_allclose(h["lr"], -7.2, rtol=1e-10)
    state = opt.step(state, None, None)
    np.testing.assert_allclose(state.hyperparams["lr"], 0.1 + 0.072,
                               rtol=1e-10)
    # the next step uses the updated learning rate, through the state too
    np.testing.assert_allclose(state.params, [0.9, 0.7], rtol=1e-12)
    state = opt.step(state, None, None)
    np.testing.assert_allclose(state.params,
                               [0.9 * (1 - 0.172), 0.7 * (1 - 3 * 0.172)],
                               rtol=1e-10)


def test_t5_adam_first_step(x64):
    opt = gh.T1T2(_half_quadratic, _half_quadratic,
                  lambda hp: optax.adam(hp["lr"]), optax.sgd(0.01))
    state = opt.init(jnp.array([1.0, 1.0]), {"lr": jnp.array(0.1)})
    np.testing.assert_allclose(
        opt.compute_hypergradient(state, None, None)["lr"], -3.599999984,
        rtol=1e-8)


def test_t6_adam_first_step_kills_loss_hypergradient(x64):
    """§6 T6: through a first Adam step dw1/dlambda ~ 1e-11, not 1e-3."""
    def train_loss(w, lam, batch):
        del batch
        return 0.25 * jnp.sum(w ** 2) + 0.5 * lam * jnp.sum(w ** 2)

    def val_loss(w, lam, batch):
        del lam, batch
        return jnp.sum(w)          # v = (1, 1): h = sum of dw1/dlambda
    w0, lam = jnp.array([1.0, -2.0]), jnp.array(0.1)
    adam = gh.T1T2(train_loss, val_loss, optax.adam(1e-3), optax.sgd(1.0))
    sgd = gh.T1T2(train_loss, val_loss, optax.sgd(1e-3), optax.sgd(1.0))
    g = w0 * 0.6
    expected = np.sum(-1e-3 * 1e-8 / (np.abs(g) + 1e-8) ** 2 * w0)
    np.testing.assert_allclose(
        adam.compute_hypergradient(adam.init(w0, lam), None, None),
        expected, rtol=1e-6)
    np.testing.assert_allclose(
        sgd.compute_hypergradient(sgd.init(w0, lam), None, None),
        -1e-3 + 2e-3, rtol=1e-10)


def test_no_retrace_over_twenty_steps(key):
    traces = []

    def train_loss(params, hp, batch):
        traces.append(1)
        return pb.mlp_train_loss(params, hp, batch)
    k1, k2, k3 = jax.random.split(key, 3)
    opt = gh.T1T2(train_loss, pb.mlp_val_loss, optax.adam(1e-2),
                  optax.adam(1e-2))
    state = opt.init(pb.init_mlp(k1), {"log_l2": [-3.0, -2.0],
                                       "smooth_logit": -2.0})
    train, val = pb.mlp_batch(k2), pb.mlp_batch(k3)
    state = opt.step(state, train, val)
    after_first = len(traces)
    assert after_first > 0
    for _ in range(20):
        state = opt.step(state, train, val)
    assert len(traces) == after_first
    assert int(state.step) == 21


def test_vmap_population_equals_loop(key):
    k1, k2, k3 = jax.random.split(key, 3)
    opt = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss,
                  optax.sgd(0.1, momentum=0.9), optax.adam(0.05))
    params = pb.init_mlp(k1)
    train, val = pb.mlp_batch(k2), pb.mlp_batch(k3)
    settings = [-4.0, -2.0, 0.0]
    states = [opt.init(params, {"log_l2": [jnp.array(s)] * 2,
                                "smooth_logit": jnp.array(-2.0)})
              for s in settings]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    step = jax.vmap(opt.step, in_axes=(0, None, None))
    for _ in range(3):
        stacked = step(stacked, train, val)
        states = [opt.step(s, train, val) for s in states]
    for i, s in enumerate(states):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], stacked), s, rtol=1e-5, atol=1e-6)


def test_user_jit_matches_internal():
    train, val = pb.ridge_batches()
    opt = gh.T1T2(pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.01),
                  optax.adam(0.1))
    state = opt.init(jnp.array([0.2, -0.1]), jnp.array(1.0))
    chex.assert_trees_all_close(jax.jit(opt.step)(state, train, val),
                                opt.step(state, train, val))


def test_state_round_trips_through_flatten(key):
    opt = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss, optax.adam(1e-2),
                  optax.adam(1e-2))
    state = opt.init(pb.init_mlp(key), pb.mlp_hyperparams())
    leaves, treedef = jax.tree_util.tree_flatten(state)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, gh.BilevelState)
    chex.assert_trees_all_equal(back, state)
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    for name in ["train_loss", "val_loss", "hypergradient_norm",
                 "nonfinite_count"]:
        assert name in state.metadata
    with pytest.raises(TypeError, match="unknown field"):
        state.replace(stepp=1)


def test_unknown_mode_lists_valid_choices():
    with pytest.raises(ValueError, match="hypergradient must be one of "
                       "'exact', 'finite_difference'; got 'darts'"):
        gh.T1T2(pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.1),
                optax.sgd(0.1), hypergradient="darts")
    with pytest.raises(ValueError, match="fd_radius must be in"):
        gh.T1T2(pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.1),
                optax.sgd(0.1), fd_radius=0.0)
    with pytest.raises(TypeError, match="train_loss must be a callable"):
        gh.T1T2(None, pb.ridge_val_loss, optax.sgd(0.1), optax.sgd(0.1))
    with pytest.raises(TypeError, match="outer_optimizer must be"):
        gh.T1T2(pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.1), 0.1)


def test_nonfinite_hypergradient_is_skipped_and_counted():
    def val_loss(w, lam, batch):
        x, y = batch      # a NaN in the validation batch poisons h
        return 0.5 * jnp.sum((x @ w - y) ** 2)
    train, val = pb.ridge_batches()
    opt = gh.T1T2(pb.ridge_train_loss, val_loss, optax.sgd(0.01),
                  optax.adam(0.1))
    state = opt.init(jnp.array([0.2, -0.1]), jnp.array(1.0))
    bad_val = (val[0], val[1].at[0].set(jnp.nan))
    new = jax.jit(opt.step)(state, train, bad_val)
    assert int(new.metadata["nonfinite_count"]) == 1
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(new.outer_opt_state, state.outer_opt_state)
    np.testing.assert_allclose(new.params, [0.342, 0.089], rtol=1e-5)
    # a NaN in the training batch: both updates skipped, both counted
    bad_train = (train[0].at[0, 0].set(jnp.nan), train[1])
    new = opt.step(state, bad_train, val)
    assert int(new.metadata["nonfinite_count"]) == 2
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.inner_opt_state, state.inner_opt_state)
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)


def test_integer_hyperparameters_are_held_fixed(x64):
    def train_loss(w, hp, batch):
        return pb.quad_train_loss(w, hp["l2"], batch) * hp["scale"]
    opt = gh.T1T2(train_loss, pb.quad_val_loss, optax.sgd(0.1),
                  optax.adam(0.1))
    state = opt.init(jnp.array([1.0, -1.0]),
                     {"l2": 0.5, "scale": jnp.array(1, jnp.int32)})
    h = opt.compute_hypergradient(state, None, None)
    assert h["scale"].dtype == jnp.int32 and int(h["scale"]) == 0
    np.testing.assert_allclose(h["l2"], -0.16, rtol=1e-10)
    for _ in range(3):
        state = opt.step(state, None, None)
    assert int(state.hyperparams["scale"]) == 1
    assert state.hyperparams["scale"].dtype == jnp.int32
    assert float(state.hyperparams["l2"]) > 0.5


def test_loss_must_return_a_scalar():
    train, val = pb.ridge_batches()

    def per_example(w, lam, batch):
        x, y = batch
        return 0.5 * (x @ w - y) ** 2
    opt = gh.T1T2(per_example, pb.ridge_val_loss, optax.sgd(0.01),
                  optax.sgd(1.0))
    state = opt.init(jnp.zeros(2), jnp.array(1.0))
    with pytest.raises(ValueError, match=r"train_loss must return a floating "
                       r"scalar, got shape \(3,\)"):
        opt.step(state, train, val)
    opt = gh.T1T2(pb.ridge_train_loss, per_example, optax.sgd(0.01),
                  optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"val_loss must return a floating "
                       r"scalar, got shape \(2,\)"):
        opt.compute_hypergradient(state, train, val)
    with pytest.raises(TypeError, match="state must be a gradhpo."
                       "BilevelState"):
        opt.step(state.params, train, val)


def test_hyperparams_must_match_the_inner_optimizer():
    opt = gh.T1T2(_half_quadratic, _half_quadratic,
                  lambda hp: optax.sgd(hp["lr"]), optax.sgd(0.01))
    with pytest.raises(ValueError, match=r"hyperparams do not match what "
                       r"inner_optimizer expects: .*KeyError: 'lr'"):
        opt.init(jnp.ones(2), {"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"hyperparams\['lr'\] must be "
                       "finite"):
        opt.init(jnp.ones(2), {"lr": jnp.nan})
    with pytest.raises(ValueError, match="params must contain at least one"):
        opt.init({}, {"lr": 0.1})
