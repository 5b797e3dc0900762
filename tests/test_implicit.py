"""Implicit (IFT) hypergradients: closed forms on ridge regression, the
convergence theory of the Neumann series and of CG, and the contract
(hyper_interval, non-finite guards, jit/vmap/scan, checkpoints)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

import gradhpo as gh
from gradhpo.algorithms.implicit import linear_solve
from gradhpo.utils import gradients as gr

import problems as pb

P = 5   # weights of the per-coordinate ridge problem


def _ridge_data(seed=0, noise=1.5):
    """A well-posed ridge problem whose validation-optimal L2 is interior."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, P))
    w_true = rng.normal(size=P)
    y = x @ w_true + noise * rng.normal(size=20)
    xv = rng.normal(size=(15, P))
    yv = xv @ w_true + noise * rng.normal(size=15)
    return (x, y), (xv, yv)


def _jnp(batch):
    return tuple(jnp.asarray(a) for a in batch)


def per_weight_train_loss(w, rho, batch):
    """Ridge with L2 e^rho (rho a scalar, or one per weight)."""
    x, y = batch
    return (0.5 * jnp.sum((x @ w - y) ** 2)
            + 0.5 * jnp.sum(jnp.exp(rho) * w ** 2))


def _ift(rho, train, val, damping=0.0):
    """w*(rho) and dL_val(w*)/d rho_i = -e^rho_i w*_i [(H + dI)^-1 v]_i,
    by dense linear algebra."""
    (x, y), (xv, yv) = train, val
    d = np.exp(rho) * np.ones(P)
    hess = x.T @ x + np.diag(d)
    w = np.linalg.solve(hess, x.T @ y)
    v = xv.T @ (xv @ w - yv)
    return -d * w * np.linalg.solve(hess + damping * np.eye(P), v), w


def _val_of_rho(rho, train, val):
    (x, y), (xv, yv) = train, val
    w = np.linalg.solve(x.T @ x + np.diag(np.exp(rho) * np.ones(P)),
                        x.T @ y)
    return 0.5 * np.sum((xv @ w - yv) ** 2)


# -- the hypergradient at a converged inner solution -----------------------

def test_cg_equals_closed_form_ift_at_ridge_solution(x64):
    train, val = _ridge_data()
    rho = np.linspace(-1.0, 1.0, P)
    expected, w_star = _ift(rho, train, val)
    # the closed form is the derivative of L_val(w*(rho)) (central FD)
    for i in range(P):
        e = np.zeros(P)
        e[i] = 1e-5
        fd = (_val_of_rho(rho + e, train, val)
              - _val_of_rho(rho - e, train, val)) / 2e-5
        np.testing.assert_allclose(expected[i], fd, rtol=1e-6)
    opt = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                      optax.sgd(0.01), optax.sgd(0.5), solver="cg",
                      terms=P)
    state = opt.init(jnp.asarray(w_star), jnp.asarray(rho))
    h = opt.compute_hypergradient(state, _jnp(train), _jnp(val))
    np.testing.assert_allclose(h, expected, rtol=1e-8)
    new = opt.step(state, _jnp(train), _jnp(val))
    # the inner step stays at the stationary point; step applies h
    np.testing.assert_allclose(new.params, w_star, rtol=1e-10)
    np.testing.assert_allclose(new.hyperparams, rho - 0.5 * expected,
                               rtol=1e-8)
    assert float(new.metadata["solve_residual"]) < 1e-10
    np.testing.assert_allclose(new.metadata["hypergradient_norm"],
                               np.linalg.norm(expected), rtol=1e-8)
    # fewer CG iterations than weights: not converged, a visibly wrong h
    short = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                        optax.sgd(0.01), optax.sgd(0.5), solver="cg",
                        terms=2)
    h2 = short.compute_hypergradient(state, _jnp(train), _jnp(val))
    assert np.max(np.abs(h2 - expected)) > 1e-4 * np.max(np.abs(expected))


def test_damping_solves_the_shifted_system(x64):
    train, val = _ridge_data()
    rho = np.zeros(P)
    _, w_star = _ift(rho, train, val)
    hs = {}
    for damping in [0.0, 7.0]:
        opt = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                          optax.sgd(0.01), optax.sgd(0.5), solver="cg",
                          terms=P, damping=damping)
        state = opt.init(jnp.asarray(w_star), jnp.asarray(rho))
        hs[damping] = np.asarray(opt.compute_hypergradient(
            state, _jnp(train), _jnp(val)))
        np.testing.assert_allclose(
            hs[damping], _ift(rho, train, val, damping)[0], rtol=1e-8)
    assert np.max(np.abs(hs[7.0] - hs[0.0])) > 0.05 * np.max(np.abs(hs[0.0]))


def test_pytree_hypergradient_equals_dense_ift_on_mlp(x64, key):
    """List-of-dicts weights, list + scalar hyperparameters and a direct
    term in L_val: equal to -M^T (H + dI)^-1 v + grad_lambda L_val built
    from dense Hessians, at the weights after the inner step."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = pb.init_mlp(k1, sizes=(5, 4, 3))
    hp = pb.mlp_hyperparams(jnp.float64)
    train, val = pb.mlp_batch(k2), pb.mlp_batch(k3)
    lr = 0.1

    @jax.jit
    def dense_parts(params, hp):
        w_plus = jax.tree.map(
            lambda w, g: w - lr * g, params,
            jax.grad(pb.mlp_train_loss)(params, hp, train))
        flat_w, unravel_w = ravel_pytree(w_plus)
        flat_h, unravel_h = ravel_pytree(hp)

        def loss_flat(fw, fh):
            return pb.mlp_train_loss(unravel_w(fw), unravel_h(fh), train)
        hess = jax.hessian(loss_flat)(flat_w, flat_h)
        mixed = jax.jacfwd(jax.grad(loss_flat, 1), 0)(flat_w, flat_h)
        v = ravel_pytree(jax.grad(pb.mlp_val_loss)(w_plus, hp, val))[0]
        direct = ravel_pytree(
            jax.grad(pb.mlp_val_loss, 1)(w_plus, hp, val))[0]
        return flat_w, hess, mixed, v, direct
    flat_w, hess, mixed, v, direct = map(np.asarray, dense_parts(params, hp))
    damping = max(0.0, -float(np.linalg.eigvalsh(hess).min())) + 0.5
    dense = direct - mixed @ np.linalg.solve(
        hess + damping * np.eye(flat_w.size), v)
    opt = gh.Implicit(pb.mlp_train_loss, pb.mlp_val_loss, optax.sgd(lr),
                      optax.sgd(0.0), solver="cg", terms=4 * flat_w.size,
                      damping=damping)
    h = opt.compute_hypergradient(opt.init(params, hp), train, val)
    np.testing.assert_allclose(ravel_pytree(h)[0], dense, rtol=1e-7,
                               atol=1e-12)
    assert abs(float(h["smooth_logit"])) > 1e-4   # the direct term is in


def test_curvature_products_equal_the_shared_helpers(x64, key):
    k1, k2, k3 = jax.random.split(key, 3)
    params, hp = pb.init_mlp(k1), pb.mlp_hyperparams(jnp.float64)
    batch = pb.mlp_batch(k2)
    direction = jax.tree.map(
        lambda w: jax.random.normal(k3, w.shape, w.dtype), params)
    args = (pb.mlp_train_loss, params, hp, batch, direction)
    joint, hvp, mixed = (jax.jit(f, static_argnums=0)(*args) for f in (
        gr.curvature_products, gr.hvp, gr.mixed_product))
    chex.assert_trees_all_close(joint, (hvp, mixed), rtol=1e-12,
                                atol=1e-14)


def test_integer_hyperparameters_get_zero(x64):
    def train_loss(w, hp, batch):
        return pb.quad_train_loss(w, hp["l2"], batch) * hp["scale"]
    opt = gh.Implicit(train_loss, pb.quad_val_loss, optax.sgd(0.1),
                      optax.sgd(0.1), neumann_scale=0.1)
    state = opt.init(jnp.array([1.0, -1.0]),
                     {"l2": 0.5, "scale": jnp.array(1, jnp.int32)})
    h = opt.compute_hypergradient(state, None, None)
    assert h["scale"].dtype == jnp.int32 and int(h["scale"]) == 0
    state = opt.step(state, None, None)
    assert int(state.hyperparams["scale"]) == 1
    assert float(state.hyperparams["l2"]) != 0.5


# -- the linear solvers against their convergence theory --------------------

def _spd(seed=1):
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    eig = np.array([0.5, 0.8, 1.2, 1.9, 2.5, 3.0])
    return q @ np.diag(eig) @ q.T, eig, rng.normal(size=6)


def test_neumann_error_bound_and_geometric_rate(x64):
    a, eig, v = _spd()
    exact = np.linalg.solve(a, v)
    alpha = 0.5
    contraction = np.max(np.abs(1 - alpha * eig))     # ||I - alpha A||
    assert contraction == pytest.approx(0.75)
    step = np.eye(6) - alpha * a
    a_j, v_j = jnp.asarray(a), jnp.asarray(v)
    errors = []
    for k in [1, 2, 3, 5, 8, 13, 21, 34, 35]:
        x = linear_solve(lambda u: a_j @ u, v_j, solver="neumann", terms=k,
                         neumann_scale=alpha)
        err = np.linalg.norm(x - exact)
        # the error is exactly (I - alpha A)^K A^-1 v ...
        np.testing.assert_allclose(
            err, np.linalg.norm(np.linalg.matrix_power(step, k) @ exact),
            rtol=1e-9)
        # ... so it obeys the bound ||I - alpha A||^K ||A^-1 v||
        assert err <= contraction ** k * np.linalg.norm(exact) * (1 + 1e-12)
        errors.append(err)
    # the rate tends to the contraction (the slowest eigendirection)
    np.testing.assert_allclose(errors[-1] / errors[-2], contraction,
                               rtol=1e-3)
    # past 2 / lambda_max the series diverges
    x = linear_solve(lambda u: a_j @ u, v_j, solver="neumann", terms=40,
                     neumann_scale=0.8)
    assert np.linalg.norm(x - exact) > 100 * errors[0]


def test_neumann_from_a_warm_start_contracts_the_initial_error(x64):
    a, _, v = _spd()
    exact = np.linalg.solve(a, v)
    init = exact + np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    x = linear_solve(lambda u: jnp.asarray(a) @ u, jnp.asarray(v),
                     solver="neumann", terms=7, neumann_scale=0.5,
                     init=jnp.asarray(init))
    expected = exact + np.linalg.matrix_power(
        np.eye(6) - 0.5 * a, 7) @ (init - exact)
    np.testing.assert_allclose(x, expected, rtol=1e-10)
    for solver, kw in [("neumann", {"neumann_scale": 0.5}), ("cg", {})]:
        x = linear_solve(lambda u: jnp.asarray(a) @ u, jnp.asarray(v),
                         solver=solver, terms=3, init=jnp.asarray(exact),
                         **kw)
        np.testing.assert_allclose(x, exact, rtol=1e-12)


def test_cg_error_decreases_and_is_exact_after_dim_iterations(x64):
    a, eig, v = _spd()
    exact = np.linalg.solve(a, v)
    kappa = eig.max() / eig.min()
    rate = (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)

    def a_norm(e):
        return np.sqrt(e @ a @ e)
    errors = []
    for k in range(1, 7):
        x = np.asarray(linear_solve(lambda u: jnp.asarray(a) @ u,
                                    jnp.asarray(v), solver="cg", terms=k))
        errors.append(np.linalg.norm(x - exact))
        # the Chebyshev bound in the A-norm
        assert a_norm(x - exact) <= 2 * rate ** k * a_norm(exact)
        neumann = linear_solve(lambda u: jnp.asarray(a) @ u,
                               jnp.asarray(v), solver="neumann", terms=k,
                               neumann_scale=0.5)
        if k > 1:
            assert errors[-1] < np.linalg.norm(neumann - exact)
    assert all(b < a_ for a_, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10 * np.linalg.norm(exact)


def test_solve_residual_is_the_relative_residual(x64):
    """Neumann on a quadratic: ||(I - alpha A)^K v|| / ||v||, exactly, with
    A = X^T X + diag(e^rho) the Hessian at any w."""
    train, val = _ridge_data()
    (x, y), (xv, yv) = train, val
    rho, lr, alpha, k = np.zeros(P), 0.01, 0.02, 9
    a = x.T @ x + np.eye(P)
    w0 = np.linspace(-0.5, 0.5, P)
    w1 = w0 - lr * (x.T @ (x @ w0 - y) + w0)
    v = xv.T @ (xv @ w1 - yv)
    opt = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                      optax.sgd(lr), optax.sgd(0.1), neumann_scale=alpha,
                      terms=k)
    state = opt.init(jnp.asarray(w0), jnp.asarray(rho))
    assert np.isnan(float(state.metadata["solve_residual"]))
    new = opt.step(state, _jnp(train), _jnp(val))
    expected = np.linalg.norm(np.linalg.matrix_power(
        np.eye(P) - alpha * a, k) @ v) / np.linalg.norm(v)
    assert 1e-3 < expected < 1
    np.testing.assert_allclose(new.metadata["solve_residual"], expected,
                               rtol=1e-8)
    x_k = alpha * sum(np.linalg.matrix_power(np.eye(P) - alpha * a, j) @ v
                      for j in range(k))
    np.testing.assert_allclose(
        opt.compute_hypergradient(state, _jnp(train), _jnp(val)),
        -w1 * x_k, rtol=1e-9)


# -- tuning -----------------------------------------------------------------

@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_steps_reach_the_validation_optimal_l2(x64, solver):
    """A scalar log-L2 tuned online from w = 0 converges to the minimiser
    of L_val(w*(rho)), found independently by scipy."""
    train, val = _ridge_data()
    best = scipy.optimize.minimize_scalar(
        lambda r: _val_of_rho(r, train, val), bounds=(-8.0, 8.0),
        method="bounded", options={"xatol": 1e-10})
    assert -6 < best.x < 6 and best.x > 1.0   # interior, far from rho_0
    lr = 1.0 / np.linalg.eigvalsh(train[0].T @ train[0]).max()
    kw = {"neumann_scale": lr, "terms": 60} if solver == "neumann" else {
        "terms": P}
    opt = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                      optax.sgd(lr), optax.sgd(0.5), solver=solver, **kw)
    state = opt.init(jnp.zeros(P), jnp.array(0.0))
    for _ in range(400):
        state = opt.step(state, _jnp(train), _jnp(val))
    np.testing.assert_allclose(state.hyperparams, best.x, atol=1e-6)
    np.testing.assert_allclose(state.params,
                               _ift(float(best.x), train, val)[1],
                               rtol=1e-5)


# -- the contract -------------------------------------------------------------

def test_hyper_interval_updates_every_kth_call(x64):
    train, val = _ridge_data()
    train, val = _jnp(train), _jnp(val)
    k, lr, outer_lr = 3, 0.01, 0.5
    opt = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                      optax.sgd(lr), optax.sgd(outer_lr), solver="cg",
                      terms=P, hyper_interval=k)
    plain = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                        optax.sgd(lr), optax.adam(0.1), solver="cg",
                        terms=P, hyper_interval=k)
    state = opt.init(jnp.zeros(P), jnp.zeros(P))
    adam = plain.init(jnp.zeros(P), jnp.zeros(P))
    last = None
    for call in range(1, 8):
        h = opt.compute_hypergradient(state, train, val)
        new = opt.step(state, train, val)
        grad = jax.grad(per_weight_train_loss)(state.params,
                                               state.hyperparams, train)
        np.testing.assert_allclose(new.params, state.params - lr * grad,
                                   rtol=1e-12)   # one inner step per call
        new_adam = plain.step(adam, train, val)
        counts, new_counts = ([int(c) for c in jax.tree.leaves(
            s.outer_opt_state) if jnp.issubdtype(c.dtype, jnp.integer)]
            for s in (adam, new_adam))
        if call % k == 0:
            np.testing.assert_allclose(
                new.hyperparams, state.hyperparams - outer_lr * h,
                rtol=1e-12)
            np.testing.assert_allclose(new.metadata["hypergradient_norm"],
                                       np.linalg.norm(h), rtol=1e-10)
            assert new_counts == [c + 1 for c in counts]
            last = new.metadata
        else:
            chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
            chex.assert_trees_all_equal(new_adam.hyperparams,
                                        adam.hyperparams)
            chex.assert_trees_all_equal(new_adam.outer_opt_state,
                                        adam.outer_opt_state)
            assert new_counts == counts
            for name in ["val_loss", "hypergradient_norm",
                         "solve_residual"]:
                if last is None:
                    assert np.isnan(float(new.metadata[name]))
                else:
                    assert float(new.metadata[name]) == float(last[name])
        assert int(new.step) == call
        state, adam = new, new_adam
    # a NaN training batch counts once on a call without an outer update,
    # twice (inner and outer) on an update call
    bad = (train[0].at[0, 0].set(jnp.nan), train[1])
    assert int(state.step) % k == 1
    skipped = opt.step(state, bad, val)
    assert int(skipped.metadata["nonfinite_count"]) == 1
    chex.assert_trees_all_equal(skipped.params, state.params)
    state = opt.step(state, train, val)      # step 8 -> call 9 is an update
    skipped = opt.step(state, bad, val)
    assert int(skipped.metadata["nonfinite_count"]) == 2
    chex.assert_trees_all_equal(skipped.hyperparams, state.hyperparams)


def test_nonfinite_values_are_skipped_and_counted():
    train, val = _ridge_data()
    train, val = _jnp(train), _jnp(val)
    train = tuple(a.astype(jnp.float32) for a in train)
    val = tuple(a.astype(jnp.float32) for a in val)
    opt = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                      optax.sgd(0.01), optax.adam(0.1), solver="cg",
                      terms=P, warm_start=True)
    state = opt.init(jnp.full(P, 0.3), jnp.zeros(P))
    state = opt.step(state, train, val)
    solution = state.algorithm_state.solution
    assert float(jnp.abs(solution).max()) > 0
    # a NaN validation batch: v, the solve and h are NaN -> outer skipped
    bad_val = (val[0], val[1].at[0].set(jnp.nan))
    new = opt.step(state, train, bad_val)
    assert int(new.metadata["nonfinite_count"]) == 1
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(new.outer_opt_state, state.outer_opt_state)
    chex.assert_trees_all_equal(new.algorithm_state.solution, solution)
    assert not np.allclose(new.params, state.params)   # inner step taken
    # a NaN training batch: both skipped
    bad_train = (train[0].at[0, 0].set(jnp.nan), train[1])
    new = opt.step(state, bad_train, val)
    assert int(new.metadata["nonfinite_count"]) == 2
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.inner_opt_state, state.inner_opt_state)
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(new.algorithm_state.solution, solution)
    # a diverging Neumann series overflows float32: the solve is skipped
    wild = gh.Implicit(per_weight_train_loss, pb.ridge_val_loss,
                       optax.sgd(0.01), optax.adam(0.1), terms=12,
                       neumann_scale=1e6)
    state = wild.init(jnp.full(P, 0.3), jnp.zeros(P))
    assert not np.all(np.isfinite(
        wild.compute_hypergradient(state, train, val)))
    new = wild.step(state, train, val)
    assert int(new.metadata["nonfinite_count"]) == 1
    assert not np.isfinite(float(new.metadata["solve_residual"]))
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)


def test_a_hundred_thousand_per_weight_penalties_run():
    n, p = 4, 100_000
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (n, p)) / jnp.sqrt(p)
    y = jax.random.normal(k2, (n,))

    def train_loss(w, hp, batch):
        xb, yb = batch
        return (0.5 * jnp.sum((xb @ w - yb) ** 2)
                + 0.5 * jnp.sum(jnp.exp(hp["log_l2"]) * w ** 2))
    opt = gh.Implicit(train_loss, pb.ridge_val_loss, optax.sgd(0.1),
                      optax.adam(0.01), neumann_scale=0.1, terms=3)
    state = opt.init(jnp.zeros(p), {"log_l2": jnp.full(p, -2.0)})
    new = opt.step(state, (x, y), (x, y))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    assert new.hyperparams["log_l2"].dtype == jnp.float32
    assert np.all(np.isfinite(new.hyperparams["log_l2"]))
    assert np.isfinite(float(new.metadata["solve_residual"]))
    assert int(new.metadata["nonfinite_count"]) == 0


def _mlp_case(**options):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    opt = gh.Implicit(pb.mlp_train_loss, pb.mlp_val_loss,
                      optax.sgd(0.1, momentum=0.5), optax.adam(0.05),
                      **options)
    return opt, pb.init_mlp(k1), pb.mlp_batch(k2), pb.mlp_batch(k3)


def test_no_retrace_over_ten_calls():
    traces = []

    def train_loss(w, rho, batch):
        traces.append(1)
        return per_weight_train_loss(w, rho, batch)
    train, val = _ridge_data()
    train = tuple(jnp.asarray(a, jnp.float32) for a in train)
    val = tuple(jnp.asarray(a, jnp.float32) for a in val)
    opt = gh.Implicit(train_loss, pb.ridge_val_loss, optax.adam(1e-2),
                      optax.adam(1e-2), solver="cg", terms=4, damping=0.1,
                      hyper_interval=2, warm_start=True)
    state = opt.init(jnp.zeros(P), jnp.full(P, -2.0))
    state = opt.step(state, train, val)
    first = len(traces)
    assert first > 0
    for _ in range(10):
        state = opt.step(state, train, val)
    assert len(traces) == first
    assert int(state.step) == 11


#: a Neumann and a warm-started CG configuration, both with interval 2
OPTIONS = [{"neumann_scale": 0.1, "terms": 5, "hyper_interval": 2},
           {"solver": "cg", "terms": 4, "damping": 0.5, "warm_start": True,
            "hyper_interval": 2}]


def test_vmap_population_equals_loop():
    opt, params, train, val = _mlp_case(**OPTIONS[1])
    settings = [{"log_l2": [jnp.array(s), jnp.array(s)],
                 "smooth_logit": jnp.array(-1.0)} for s in (-3.0, -1.0, 0.5)]
    stacked = gh.init_population(opt, params, settings)
    states = [opt.init(params, hp) for hp in settings]
    step = jax.vmap(opt.step, in_axes=(0, None, None))
    for _ in range(4):
        stacked = step(stacked, train, val)
        states = [opt.step(s, train, val) for s in states]
    for i, single in enumerate(states):
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], stacked),
                                    single, rtol=2e-5, atol=2e-6)
    assert not np.allclose(stacked.hyperparams["smooth_logit"], -1.0)


def test_scan_from_init_equals_loop():
    opt, params, train, val = _mlp_case(**OPTIONS[0])
    state = opt.init(params, pb.mlp_hyperparams())
    steps = 5
    stacked = jax.tree.map(lambda x: jnp.stack([x] * steps), (train, val))

    def body(carry, batches):
        return opt.step(carry, *batches), None
    scanned, _ = jax.lax.scan(body, state, stacked)
    looped = state
    for _ in range(steps):
        looped = opt.step(looped, train, val)
    chex.assert_trees_all_close(scanned, looped, rtol=1e-5, atol=1e-6)
    assert int(scanned.step) == steps


def test_save_load_round_trip_continues_identically(tmp_path):
    opt, params, train, val = _mlp_case(
        solver="cg", terms=4, damping=0.5, warm_start=True)
    state = opt.init(params, pb.mlp_hyperparams())
    for _ in range(3):
        state = opt.step(state, train, val)
    path = tmp_path / "implicit.npz"
    gh.save_state(path, state)
    restored = gh.load_state(path, like=opt.init(params,
                                                 pb.mlp_hyperparams()))
    chex.assert_trees_all_equal(restored, state)
    a, b = state, restored
    for _ in range(2):
        a, b = opt.step(a, train, val), opt.step(b, train, val)
    chex.assert_trees_all_equal(a, b)


# -- configuration errors -----------------------------------------------------

SGD = optax.sgd(0.1)


def _build(**options):
    return gh.Implicit(pb.ridge_train_loss, pb.ridge_val_loss, SGD, SGD,
                       **options)


@pytest.mark.parametrize("options,error,match", [
    ({"solver": "lu", "neumann_scale": 0.1}, ValueError,
     "solver must be one of 'neumann', 'cg'; got 'lu'"),
    ({"solver": "cg", "terms": 0}, ValueError, "terms must be an int >= 1"),
    ({"solver": "cg", "terms": 2.0}, TypeError, "terms must be an int"),
    ({"solver": "cg", "terms": True}, TypeError, "terms must be an int"),
    ({"solver": "cg", "damping": -1.0}, ValueError, r"damping must be in"),
    ({"solver": "cg", "damping": float("nan")}, ValueError,
     "damping must be in"),
    ({"solver": "cg", "damping": float("inf")}, ValueError,
     "damping must be in"),
    ({}, ValueError, "neumann_scale is required with solver='neumann'"),
    ({"neumann_scale": 0.0}, ValueError, r"neumann_scale must be in \(0"),
    ({"neumann_scale": -0.1}, ValueError, "neumann_scale must be in"),
    ({"neumann_scale": "0.1"}, TypeError, "neumann_scale must be a real"),
    ({"solver": "cg", "neumann_scale": 0.1}, ValueError,
     "neumann_scale applies to solver='neumann' only"),
    ({"solver": "cg", "hyper_interval": 0}, ValueError,
     "hyper_interval must be an int >= 1"),
    ({"solver": "cg", "warm_start": 1}, ValueError,
     "warm_start must be one of False, True"),
])
def test_invalid_options_name_the_argument(options, error, match):
    with pytest.raises(error, match=match):
        _build(**options)


def test_state_from_another_algorithm_or_configuration_is_rejected():
    train, val = pb.ridge_batches()
    t1t2 = gh.T1T2(pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.1),
                   optax.sgd(0.1))
    opt = _build(solver="cg", terms=2)
    with pytest.raises(ValueError, match="must be a ImplicitState"):
        opt.step(t1t2.init(jnp.zeros(2), 1.0), train, val)
    warm = _build(solver="cg", terms=2, warm_start=True)
    with pytest.raises(ValueError, match="with warm_start"):
        opt.step(warm.init(jnp.zeros(2), 1.0), train, val)
    with pytest.raises(ValueError, match="without warm_start"):
        warm.step(opt.init(jnp.zeros(2), 1.0), train, val)
    assert opt.init(jnp.zeros(2), 1.0).algorithm_state == gh.ImplicitState()
    assert opt == _build(solver="cg", terms=2)
    assert opt != _build(solver="cg", terms=3)
