"""ForwardMode (RTHO) against reverse-mode unrolls, a closed form and an
independent forward recursion."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gradhpo as gh
from gradhpo.algorithms.forward_mode import num_coordinates

import problems as pb


# -- the problems: ridge and a small MLP, stochastic batches -----------------

def _ridge_train(w, hp, batch):
    return pb.ridge_train_loss(w, hp["l2"], batch)


def _ridge_val(w, hp, batch):
    return pb.ridge_val_loss(w, hp["l2"], batch)


def _ridge_data(n_steps, dtype=jnp.float64):
    """Stacked stochastic training batches and the fixed validation batch."""
    keys = jax.random.split(jax.random.PRNGKey(4), n_steps)
    x = jnp.stack([jax.random.normal(k, (6, 2), dtype) for k in keys])
    y = jnp.stack([jax.random.normal(jax.random.fold_in(k, 1), (6,), dtype)
                   for k in keys])
    xv, yv = pb.ridge_batches()[1]
    return (x, y), (xv.astype(dtype), yv.astype(dtype))


def _ridge_start():
    return (jnp.array([0.2, -0.1]),
            {"l2": jnp.array(0.3), "log_lr": jnp.log(jnp.array(0.05)),
             "momentum": jnp.array(0.8)})


def _mlp_data(n_steps):
    keys = jax.random.split(jax.random.PRNGKey(7), n_steps + 1)
    batches = [pb.mlp_batch(k, 8) for k in keys[:n_steps]]
    x = jnp.stack([b[0] for b in batches]).astype(jnp.float64)
    y = jnp.stack([b[1] for b in batches])
    xv, yv = pb.mlp_batch(keys[-1], 16)
    return (x, y), (xv.astype(jnp.float64), yv)


def _mlp_start():
    params = jax.tree.map(lambda x: x.astype(jnp.float64),
                          pb.init_mlp(jax.random.PRNGKey(0)))
    hp = dict(pb.mlp_hyperparams(jnp.float64),
              log_lr=jnp.log(jnp.array(0.3)), momentum=jnp.array(0.7))
    return params, hp


INNER = {
    "sgd": lambda hp: optax.sgd(jnp.exp(hp["log_lr"])),
    "momentum": lambda hp: optax.sgd(jnp.exp(hp["log_lr"]),
                                     momentum=hp["momentum"]),
    "adam": lambda hp: optax.adam(jnp.exp(hp["log_lr"]), b1=hp["momentum"]),
}
PROBLEMS = {
    "ridge": (_ridge_train, _ridge_val, _ridge_data, _ridge_start),
    "mlp": (pb.mlp_train_loss, pb.mlp_val_loss, _mlp_data, _mlp_start),
}


def _recorder():
    """An outer "optimizer" that never moves lambda and keeps the last
    hypergradient it was given in its state: what step applied."""
    return optax.GradientTransformation(
        lambda lam: jax.tree.map(jnp.zeros_like, lam),
        lambda h, state, lam=None: (jax.tree.map(jnp.zeros_like, h), h))


RECORDER = _recorder()
OUTER = optax.adam(0.05)


def _at(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _unrolled_val_loss(train_loss, val_loss, make_tx, w0, train, val):
    """lambda -> L_val(w_T(lambda), lambda): T optax steps from (w0, s0),
    written independently of gradhpo (s0 = tx.init(w0) inside, so its
    dependence on lambda is differentiated too)."""
    def objective(hp):
        tx = make_tx(hp)

        def body(carry, batch):
            w, s = carry
            g = jax.grad(train_loss)(w, hp, batch)
            updates, s = tx.update(g, s, w)
            return (optax.apply_updates(w, updates), s), None
        (w, _), _ = jax.lax.scan(body, (w0, tx.init(w0)), train)
        return val_loss(w, hp, val)
    return objective


# -- exactness: reverse mode through the whole unroll ------------------------

@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_equals_reverse_mode_through_the_unroll(x64, problem, inner):
    """decay = 1, lambda fixed: the hypergradient step applies at call
    t + 1 = 21 (read back from the outer state) is the gradient of the
    (t + 1)-step validation loss in lambda (learning rate, momentum or
    Adam's b1, L2; and for the MLP label smoothing with a direct term in
    L_val)."""
    train_loss, val_loss, data, start = PROBLEMS[problem]
    steps = 21
    train, val = data(steps)
    w0, hp = start()
    if inner == "sgd":
        del hp["momentum"]
    opt = gh.ForwardMode(train_loss, val_loss, INNER[inner], RECORDER)
    state = opt.init(w0, hp)
    for t in range(steps):
        state = opt.step(state, _at(train, t), val)
    h = state.outer_opt_state
    expected = jax.jit(jax.grad(_unrolled_val_loss(
        train_loss, val_loss, INNER[inner], w0, train, val)))(hp)
    chex.assert_trees_all_close(h, expected, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_equal(state.hyperparams, hp)
    for name, value in expected.items():       # every one matters
        assert np.all(np.abs(jax.tree.leaves(value)) > 1e-6), name
    assert int(state.metadata["nonfinite_count"]) == 0


def test_initial_optimizer_state_depends_on_lambda(x64):
    """Z_0 includes ds_0/dlambda: Adagrad's initial accumulator tuned."""
    def make_tx(hp):
        return optax.adagrad(jnp.exp(hp["log_lr"]),
                             initial_accumulator_value=hp["acc"])
    train, val = _ridge_data(6)
    w0 = jnp.array([0.2, -0.1])
    hp = {"l2": jnp.array(0.3), "log_lr": jnp.array(-1.0),
          "acc": jnp.array(0.5)}
    opt = gh.ForwardMode(_ridge_train, _ridge_val, make_tx, optax.sgd(0.0))
    state = opt.init(w0, hp)
    (rss,) = [s for s in state.algorithm_state.opt_state_tangents
              if isinstance(s, optax.ScaleByRssState)]
    # column order: acc, l2, log_lr (the leaves' order); ds0/dacc = 1
    np.testing.assert_array_equal(rss.sum_of_squares,
                                  [[1, 1], [0, 0], [0, 0]])
    for t in range(5):
        state = opt.step(state, _at(train, t), val)
    h = opt.compute_hypergradient(state, _at(train, 5), val)
    expected = jax.grad(_unrolled_val_loss(
        _ridge_train, _ridge_val, make_tx, w0, train, val))(hp)
    chex.assert_trees_all_close(h, expected, rtol=1e-10, atol=1e-14)
    assert abs(float(expected["acc"])) > 1e-4


def test_closed_form_sgd_log_learning_rate(x64):
    """Ridge, SGD with eta = exp(log_lr), lambda = (l2, log_lr):
    Z_{t+1} = (I - eta H) Z_t - eta [w_t, g_t], H = X'X + l2 I, and
    h = Z' v, by hand in numpy."""
    (x, y), val = pb.ridge_batches()
    eta, l2 = 0.01, 0.5
    opt = gh.ForwardMode(_ridge_train, _ridge_val,
                         lambda hp: optax.sgd(jnp.exp(hp["log_lr"])),
                         optax.sgd(0.0))
    state = opt.init(jnp.array([0.2, -0.1]),
                     {"l2": jnp.array(l2), "log_lr": jnp.log(eta)})
    xn, yn = np.array(pb.RIDGE_X), np.array(pb.RIDGE_Y)
    xv, yv = np.array(pb.RIDGE_XV), np.array(pb.RIDGE_YV)
    hess = xn.T @ xn + l2 * np.eye(2)
    w, z = np.array([0.2, -0.1]), np.zeros((2, 2))
    for _ in range(6):
        h = opt.compute_hypergradient(state, (x, y), val)
        state = opt.step(state, (x, y), val)
        g = xn.T @ (xn @ w - yn) + l2 * w
        z = (np.eye(2) - eta * hess) @ z - eta * np.stack([w, g], axis=1)
        w = w - eta * g
        v = xv.T @ (xv @ w - yv)
        np.testing.assert_allclose(state.params, w, rtol=1e-13)
        np.testing.assert_allclose(state.algorithm_state.params_tangents,
                                   z.T, rtol=1e-12)
        np.testing.assert_allclose([h["l2"], h["log_lr"]], z.T @ v,
                                   rtol=1e-11)
    assert state.algorithm_state.opt_state_tangents == (
        optax.EmptyState(), optax.EmptyState())


# -- decay and hyper_interval: an independent forward recursion --------------

def _reference(make_tx, w0, hp, train, val, decay, interval, beta, calls):
    """Flat-vector RTHO: x = (w, s) raveled, Z by jax.jacfwd of
    lambda' -> Phi(x + rho Z (lambda' - lambda), lambda'), h by jax.grad of
    lambda' -> L_val(x+ + Z+ (lambda' - lambda), lambda'), outer SGD(beta)
    on calls k * interval. Returns the trajectory of (x, Z, lambda)."""
    lam, unravel_hp = ravel_pytree(hp)
    x, unravel_x = ravel_pytree((w0, make_tx(hp).init(w0)))

    def phi(x_, lam_, batch):
        hp_ = unravel_hp(lam_)
        w, s = unravel_x(x_)
        g = jax.grad(_ridge_train)(w, hp_, batch)
        updates, s = make_tx(hp_).update(g, s, w)
        return ravel_pytree((optax.apply_updates(w, updates), s))[0]

    def val_of(x_, lam_):
        return _ridge_val(unravel_x(x_)[0], unravel_hp(lam_), val)

    @jax.jit
    def one(x, z, lam, batch):
        z = jax.jacfwd(lambda l_: phi(x + decay * z @ (l_ - lam), l_,
                                      batch))(lam)
        x = phi(x, lam, batch)
        h = jax.grad(lambda l_: val_of(x + z @ (l_ - lam), l_))(lam)
        return x, z, h
    z = jnp.zeros((x.size, lam.size))
    out = []
    for k in range(1, calls + 1):
        x, z, h = one(x, z, lam, _at(train, k - 1))
        if k % interval == 0:
            lam = lam - beta * h
        out.append((x, z, lam, h))
    return out


@pytest.mark.parametrize("decay,interval,beta", [
    (0.5, 1, 0.0), (0.8, 3, 0.5)])
def test_decay_and_interval_follow_independent_recursion(
        x64, decay, interval, beta):
    """Z_{t+1} = rho A Z_t + B through heavy ball (w and its buffer),
    outer updates exactly on calls k * interval, tangents never reset."""
    make_tx = INNER["momentum"]
    calls = 7
    train, val = _ridge_data(calls)
    w0, hp = _ridge_start()
    opt = gh.ForwardMode(_ridge_train, _ridge_val, make_tx, optax.sgd(beta),
                         decay=decay, hyper_interval=interval)
    state = opt.init(w0, hp)
    reference = _reference(make_tx, w0, hp, train, val, decay, interval,
                           beta, calls)
    for k, (x, z, lam, h_ref) in enumerate(reference, start=1):
        h = opt.compute_hypergradient(state, _at(train, k - 1), val)
        np.testing.assert_allclose(ravel_pytree(h)[0], h_ref, rtol=1e-10)
        new = opt.step(state, _at(train, k - 1), val)
        own = new.algorithm_state
        columns = [ravel_pytree((_at(own.params_tangents, j),
                                 _at(own.opt_state_tangents, j)))[0]
                   for j in range(3)]
        np.testing.assert_allclose(np.stack(columns, axis=1), z,
                                   rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(
            ravel_pytree((new.params, new.inner_opt_state))[0], x,
            rtol=1e-12)
        np.testing.assert_allclose(ravel_pytree(new.hyperparams)[0], lam,
                                   rtol=1e-12)
        moved = not np.array_equal(ravel_pytree(new.hyperparams)[0],
                                   ravel_pytree(state.hyperparams)[0])
        assert moved == (beta > 0 and k % interval == 0), k
        if k % interval == 0:
            np.testing.assert_allclose(new.metadata["hypergradient_norm"],
                                       np.linalg.norm(h_ref), rtol=1e-10)
        state = new
    assert np.abs(z).max() > 1e-3       # the tangents are not trivial


# -- options and errors ------------------------------------------------------

def test_max_hyperparams_refusal_and_options():
    args = (pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.1),
            optax.sgd(0.1))
    opt = gh.ForwardMode(*args, max_hyperparams=4)
    with pytest.raises(ValueError) as err:
        opt.init(jnp.zeros(2), {"l2": jnp.ones(5), "depth": 3})
    message = str(err.value)
    for part in ["5 floating coordinates", "max_hyperparams=4",
                 "gh.Implicit"]:
        assert part in message
    state = opt.init(jnp.zeros(2), {"l2": jnp.ones(4), "depth": 3})
    assert state.algorithm_state.params_tangents.shape == (4, 2)
    assert num_coordinates({"a": jnp.ones((2, 3)), "b": 1.0, "c": 2}) == 7
    assert gh.ForwardMode(*args).max_hyperparams == 1024
    with pytest.raises(ValueError, match=r"decay must be in \(0.0, 1.0\]"):
        gh.ForwardMode(*args, decay=0.0)
    with pytest.raises(ValueError, match="hyper_interval must be an int"):
        gh.ForwardMode(*args, hyper_interval=0)
    with pytest.raises(TypeError, match="max_hyperparams must be an int"):
        gh.ForwardMode(*args, max_hyperparams=2.5)
    with pytest.raises(ValueError, match="must be a ForwardModeState"):
        opt.step(gh.T1T2(*args).init(jnp.zeros(2), 1.0),
                 pb.ridge_batches()[0], pb.ridge_batches()[1])


def test_integer_leaf_held_fixed_and_state_mismatch_refused():
    train, val = pb.ridge_batches()

    def train_loss(w, hp, batch):
        return pb.ridge_train_loss(w, hp["l2"] * hp["k"], batch)
    opt = gh.ForwardMode(train_loss, pb.ridge_val_loss, optax.sgd(0.01),
                         optax.sgd(1.0))
    state = opt.init(jnp.zeros(2), {"l2": 0.5, "k": 2})
    state = opt.step(state, train, val)
    h = opt.compute_hypergradient(state, train, val)
    assert h["k"].dtype == jnp.int32 and int(h["k"]) == 0
    assert float(h["l2"]) != 0.0
    state = opt.step(state, train, val)
    assert int(state.hyperparams["k"]) == 2
    wrong = state.replace(hyperparams={"l2": jnp.ones(2), "k": 2})
    with pytest.raises(ValueError, match="params_tangents does not match"):
        opt.step(wrong, train, val)


# -- non-finite values -------------------------------------------------------

def _ridge_opt(**options):
    return gh.ForwardMode(_ridge_train, _ridge_val, INNER["momentum"],
                          OUTER, **options)


def _f32_ridge():
    train, val = _ridge_data(12, jnp.float32)
    w0, hp = _ridge_start()
    return train, val, w0.astype(jnp.float32), jax.tree.map(
        lambda x: x.astype(jnp.float32), hp)


@pytest.mark.parametrize("interval", [1, 2])
def test_nan_injection_skips_and_counts(interval):
    train, val, w0, hp = _f32_ridge()
    opt = _ridge_opt(hyper_interval=interval)
    state = opt.init(w0, hp)
    state = opt.step(state, _at(train, 0), val)           # call 1
    x, y = _at(train, 1)
    # call 2 updates lambda for both intervals
    bad = opt.step(state, (x.at[0, 0].set(jnp.nan), y), val)
    assert int(bad.metadata["nonfinite_count"]) == 2   # inner and outer
    for name in ["params", "hyperparams", "inner_opt_state",
                 "outer_opt_state", "algorithm_state"]:
        chex.assert_trees_all_equal(getattr(bad, name), getattr(state, name))
    assert int(bad.step) == 2
    bad_val = (val[0].at[0, 0].set(jnp.nan), val[1])
    good = opt.step(state, (x, y), val)
    only_outer = opt.step(state, (x, y), bad_val)
    assert int(only_outer.metadata["nonfinite_count"]) == 1
    chex.assert_trees_all_equal(only_outer.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(only_outer.params, good.params)
    chex.assert_trees_all_equal(only_outer.algorithm_state,
                                good.algorithm_state)
    assert not np.array_equal(good.hyperparams["l2"], state.hyperparams["l2"])
    if interval == 2:
        # call 3 has no outer update: a NaN train batch is one event, and a
        # NaN validation batch is not even read
        x, y = _at(train, 2)
        skip = opt.step(good, (x.at[0, 0].set(jnp.nan), y), val)
        assert int(skip.metadata["nonfinite_count"]) == 1
        chex.assert_trees_all_equal(skip.params, good.params)
        chex.assert_trees_all_equal(skip.algorithm_state,
                                    good.algorithm_state)
        ignored = opt.step(good, (x, y), bad_val)
        assert int(ignored.metadata["nonfinite_count"]) == 0
        assert float(ignored.metadata["val_loss"]) == float(
            good.metadata["val_loss"])


def test_nonfinite_tangents_are_kept_out():
    """Adam through a weight whose gradient is exactly zero: sqrt'(0) * 0
    makes the tangent update NaN. The inner step is taken, the tangents keep
    their previous value, the outer update is skipped and counted; with
    eps_root > 0 the derivative exists and nothing is skipped."""
    def train_loss(w, hp, batch):
        del batch
        return hp["l2"] * w[0] ** 2 + (w[0] - 1.0) ** 2

    def val_loss(w, hp, batch):
        del hp, batch
        return (w[0] - 0.5) ** 2
    hp = {"l2": jnp.array(0.1), "log_lr": jnp.array(-2.0)}
    for eps_root, count in [(0.0, 3), (1e-12, 0)]:
        opt = gh.ForwardMode(
            train_loss, val_loss,
            lambda h, e=eps_root: optax.adam(jnp.exp(h["log_lr"]),
                                             eps_root=e),
            optax.sgd(0.1))
        state = opt.init(jnp.array([0.3, 0.2]), hp)
        for _ in range(3):
            new = opt.step(state, None, None)
            assert float(new.params[0]) != float(state.params[0])
            state = new
        assert int(state.metadata["nonfinite_count"]) == count
        for leaf in jax.tree.leaves(state.algorithm_state):
            assert np.all(np.isfinite(leaf))
        moved = not np.array_equal(state.hyperparams["l2"], hp["l2"])
        assert moved == (count == 0)


# -- compilation, populations, scan, checkpoints -----------------------------

def test_no_retrace_over_ten_calls():
    traces = []

    def train_loss(w, hp, batch):
        traces.append(1)
        return _ridge_train(w, hp, batch)
    train, val, w0, hp = _f32_ridge()
    opt = gh.ForwardMode(train_loss, _ridge_val, INNER["adam"],
                         OUTER, hyper_interval=2)
    state = opt.init(w0, {k: float(v) for k, v in hp.items()})
    state = opt.step(state, _at(train, 0), val)
    first = len(traces)
    assert first > 0
    for i in range(10):
        state = opt.step(state, _at(train, i + 1), val)
    assert len(traces) == first
    assert int(state.step) == 11


def test_vmap_population_equals_loop():
    train, val, w0, hp = _f32_ridge()
    opt = _ridge_opt(hyper_interval=2)
    settings = [dict(hp, l2=jnp.array(v, jnp.float32)) for v in
                [0.05, 0.3, 1.0]]
    stacked = gh.init_population(opt, w0, settings)
    states = [opt.init(w0, s) for s in settings]
    step = jax.vmap(opt.step, in_axes=(0, None, None))
    for t in range(5):
        stacked = step(stacked, _at(train, t), val)
        states = [opt.step(s, _at(train, t), val) for s in states]
    for i, s in enumerate(states):
        chex.assert_trees_all_close(_at(stacked, i), s, rtol=1e-5,
                                    atol=1e-7)
    assert not np.array_equal(states[0].hyperparams["l2"], settings[0]["l2"])


def test_scan_from_init_equals_loop(x64):
    train, val = _ridge_data(6)
    w0, hp = _ridge_start()
    opt = gh.ForwardMode(_ridge_train, _ridge_val, INNER["adam"],
                         OUTER, hyper_interval=2, decay=0.9)
    state = opt.init(w0, hp)

    def body(s, batch):
        return opt.step(s, batch, val), None
    scanned, _ = jax.jit(lambda s: jax.lax.scan(body, s, train))(state)
    for t in range(6):
        state = opt.step(state, _at(train, t), val)
    chex.assert_trees_all_close(scanned, state, rtol=1e-12, atol=1e-15)
    assert int(scanned.step) == 6


def test_save_load_resumes_bit_exactly(tmp_path):
    train, val, w0, hp = _f32_ridge()
    opt = gh.ForwardMode(_ridge_train, _ridge_val, INNER["adam"],
                         OUTER, hyper_interval=2)
    state = opt.init(w0, hp)
    for t in range(3):
        state = opt.step(state, _at(train, t), val)
    path = tmp_path / "forward.npz"
    gh.save_state(path, state)
    restored = gh.load_state(path, like=opt.init(w0 + 1.0, hp))
    chex.assert_trees_all_equal(restored, state)
    a, b = state, restored
    for t in range(3, 6):
        a = opt.step(a, _at(train, t), val)
        b = opt.step(b, _at(train, t), val)
    chex.assert_trees_all_equal(a, b)


# -- end to end --------------------------------------------------------------

def test_tuning_learning_rate_and_l2_lowers_validation_loss():
    """Noisy linear regression with fewer examples than features: forward
    mode raises the (too small) learning rate and tunes the L2 strength;
    after the same 100 steps the validation loss is well below that of the
    hyperparameters frozen at their start."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(2), 4)
    w_true = jax.random.normal(k1, (12,))
    xt = jax.random.normal(k2, (10, 12))
    yt = xt @ w_true + 0.5 * jax.random.normal(k3, (10,))
    xv = jax.random.normal(k4, (100, 12))
    yv = xv @ w_true

    def train_loss(w, hp, batch):
        x, y = batch
        return (0.5 * jnp.mean((x @ w - y) ** 2)
                + 0.5 * jnp.exp(hp["log_l2"]) * jnp.sum(w ** 2))

    def val_loss(w, hp, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ w - y) ** 2)

    start = {"log_l2": jnp.array(-4.0), "log_lr": jnp.log(0.01)}
    opt = gh.ForwardMode(train_loss, val_loss,
                         lambda hp: optax.sgd(jnp.exp(hp["log_lr"])),
                         optax.adam(0.1), hyper_interval=5)
    state = opt.init(jnp.zeros(12), start)
    for _ in range(100):
        state = opt.step(state, (xt, yt), (xv, yv))
    tuned_loss = float(val_loss(state.params, None, (xv, yv)))

    @jax.jit
    def frozen(w):                       # the same 100 SGD steps, by hand
        def body(w, _):
            g = jax.grad(train_loss)(w, start, (xt, yt))
            return w - jnp.exp(start["log_lr"]) * g, None
        return val_loss(jax.lax.scan(body, w, None, length=100)[0], None,
                        (xv, yv))
    frozen_loss = float(frozen(jnp.zeros(12)))
    assert float(state.hyperparams["log_lr"]) > np.log(0.01) + 1.0
    assert tuned_loss < 0.7 * frozen_loss
    assert int(state.metadata["nonfinite_count"]) == 0
