"""HyperDistill against ALGORITHMS.md §6 T7–T9, T1–T2 and hand computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh
from gradhpo.algorithms.online import (
    HyperDistill, distill_coefficients, geometric_sum)

import problems as pb


# -- T7: scalars and the w* recursion -----------------------------------------

def test_t7_scalars(x64):
    t = jnp.arange(1, 5)
    p, q = distill_coefficients(0.9, t)
    np.testing.assert_allclose(
        p, [0, 0.473684210526, 0.630996309963, 0.709217795871], atol=1e-12)
    np.testing.assert_allclose(p + q, 1.0, rtol=1e-14)
    pb_, qb = distill_coefficients(0.9, t, backward=True)
    np.testing.assert_allclose(
        pb_, [0, 0.526315789474, 0.701107011070, 0.788019773190],
        atol=1e-12)
    np.testing.assert_allclose(pb_ + qb, 1.0, rtol=1e-14)
    np.testing.assert_allclose(geometric_sum(0.9, t),
                               [1, 1.9, 2.71, 3.439], rtol=1e-14)
    assert float(geometric_sum(0.9, 0)) == 0.0


def test_t7_limits_have_no_zero_over_zero(x64):
    t = jnp.arange(0, 6)
    s0, s1 = geometric_sum(0.0, t), geometric_sum(1.0, t)
    np.testing.assert_array_equal(s0, [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(s1, [0, 1, 2, 3, 4, 5])
    t = t[1:]
    p, q = distill_coefficients(0.0, t)
    np.testing.assert_array_equal(p, 0.0)
    np.testing.assert_array_equal(q, 1.0)
    p, q = distill_coefficients(1.0, t)
    np.testing.assert_allclose(p, (t - 1) / t, rtol=1e-15)
    np.testing.assert_allclose(q, 1 / t, rtol=1e-15)
    # backward at gamma = 0 keeps the newest weight w_{T-1}: p_s = 1, s >= 2
    p, q = distill_coefficients(0.0, t, backward=True)
    np.testing.assert_array_equal(p, [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(q, [1, 0, 0, 0, 0])
    p, _ = distill_coefficients(1.0, t, backward=True)
    np.testing.assert_allclose(p, (t - 1) / t, rtol=1e-15)
    # gamma close to 1: the expm1 form keeps full precision
    assert abs(float(geometric_sum(0.9999, 100)) - (1 - 0.9999 ** 100)
               / 1e-4) < 1e-8


def _zero_loss(w, lam, batch):
    del batch
    return 0.0 * jnp.sum(w) * jnp.sum(lam)


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_t7_w_star_by_the_step_equals_weighted_average(x64, gamma):
    """Feed w_0..w_3 of §6 T7 as the pre-step params; the step's w*_4 is
    the closed-form gamma-weighted average sum gamma^(4-i) w_(i-1)."""
    ws = np.array([[1., 0.], [0., 1.], [2., 2.], [-1., 3.]])
    opt = HyperDistill(_zero_loss, _zero_loss, optax.sgd(0.1),
                       optax.sgd(0.0), gamma=gamma)
    state = opt.init(jnp.zeros(2), jnp.array(1.0), batch=None)
    for w in ws:
        state = opt.step(state.replace(params=jnp.asarray(w)), None, None)
    weights = gamma ** np.arange(3, -1, -1.0)
    expected = weights @ ws / weights.sum()
    np.testing.assert_allclose(state.algorithm_state.w_star, expected,
                               rtol=1e-12)
    if gamma == 0.9:
        np.testing.assert_allclose(
            expected, [0.444605990113, 1.631288165164], rtol=1e-11)
    assert int(state.algorithm_state.episode_step) == 4


# -- T8 / T9: exactness when A = gamma I and B is affine in w -----------------

C8 = jnp.array([0.5, 0.5])


def _t8_losses(k):
    def train_loss(w, lam, batch):
        del batch
        return 0.5 * k * jnp.sum(w ** 2) - jnp.sum(lam * w)

    def val_loss(w, lam, batch):
        del lam, batch
        return 0.5 * jnp.sum((w - C8) ** 2)
    return train_loss, val_loss


def _unrolled_exact(train_loss, val_loss, w0, lam, t, eta=0.1):
    """dL_val(w_t(lam), lam)/dlam by differentiating the unrolled loop."""
    def objective(lam_):
        w = w0
        for _ in range(t):
            w = w - eta * jax.grad(train_loss)(w, lam_, None)
        return val_loss(w, lam_, None)
    return jax.grad(objective)(lam)


def test_t8_exact_values(x64):
    """§6 T8 (gamma = 0.9): theta = 1 reproduces eta S_t (w_t - c)."""
    train_loss, val_loss = _t8_losses(1.0)
    opt = HyperDistill(train_loss, val_loss, optax.sgd(0.1),
                       optax.sgd(0.0), gamma=0.9)
    state = opt.init(jnp.zeros(2), jnp.array([1.0, 2.0]), batch=None)
    expected = {1: [-0.04, -0.03], 3: [-0.062059, 0.011382],
                5: [-0.0370565599, 0.1306418802]}
    for t in range(1, 6):
        h = opt.compute_hypergradient(state, None, None)
        if t in expected:
            np.testing.assert_allclose(h, expected[t], rtol=1e-9)
        state = opt.step(state, None, None)
        if t == 3:
            np.testing.assert_allclose(state.params, [0.271, 0.542],
                                       rtol=1e-12)
    np.testing.assert_allclose(state.params, [0.40951, 0.81902], rtol=1e-12)
    np.testing.assert_allclose(state.hyperparams, [1.0, 2.0], rtol=0)


@pytest.mark.parametrize("gamma,k", [(0.0, 10.0), (0.9, 1.0), (1.0, 0.0)])
def test_exact_when_a_equals_gamma_identity(x64, gamma, k):
    """A = (1 - eta k) I = gamma I, constant B: every online value equals
    the unrolled derivative, and LinearEstimation fits theta = 1 exactly
    (x = y), including the limits gamma = 0 and gamma = 1."""
    train_loss, val_loss = _t8_losses(k)
    opt = HyperDistill(train_loss, val_loss, optax.sgd(0.1),
                       optax.sgd(0.0), gamma=gamma, theta=0.3)
    lam, w0 = jnp.array([1.0, 2.0]), jnp.array([0.2, -0.4])
    state = opt.init(w0, lam, batch=None)
    fitted = opt.estimate_theta(state, jnp.zeros((5, 1)), None)
    np.testing.assert_allclose(fitted.algorithm_state.theta, 1.0, rtol=1e-10)
    chex.assert_trees_all_equal(fitted.params, state.params)
    assert not np.array_equal(fitted.algorithm_state.key,
                              state.algorithm_state.key)
    state = fitted
    for t in range(1, 5):
        h = opt.compute_hypergradient(state, None, None)
        np.testing.assert_allclose(
            h, _unrolled_exact(train_loss, val_loss, w0, lam, t),
            rtol=1e-10)
        state = opt.step(state, None, None)


C9 = jnp.array([2.0, -1.0])


def _t9_train(w, lam, batch):
    del batch
    return 0.75 * jnp.sum(w ** 2) - jnp.sum(lam * (w + 0.5 * w ** 2))


def _t9_val(w, lam, batch):
    del batch
    return 0.5 * jnp.sum((w - C9) ** 2) + 0.1 * jnp.sum(lam ** 2)


def test_t9_affine_b_and_direct_term(x64):
    """§6 T9: B = eta diag(1 + w) depends on w; the direct term is 0.2 lam."""
    opt = HyperDistill(_t9_train, _t9_val, optax.sgd(0.1), optax.sgd(0.0),
                       gamma=0.9)
    w0, lam = jnp.array([0.3, -0.7]), jnp.array([0.5, 0.5])
    state = opt.init(w0, lam, batch=None)
    expected = {1: [-0.1184, 0.1126], 2: [-0.313838, 0.136432],
                4: [-0.64633209, 0.21825499], 6: [-0.91514153, 0.33944027]}
    for t in range(1, 7):
        h = opt.compute_hypergradient(state, None, None)
        np.testing.assert_allclose(
            h, _unrolled_exact(_t9_train, _t9_val, w0, lam, t), rtol=1e-10)
        if t in expected:
            np.testing.assert_allclose(h, expected[t], rtol=2e-6)
        state = opt.step(state, None, None)
        if t == 2:
            np.testing.assert_allclose(state.algorithm_state.w_star,
                                       [0.31052632, -0.63684211], rtol=1e-7)


# -- gamma = 0 is T1–T2 ------------------------------------------------------

def _mlp_setup(key, n=8):
    k1, k2 = jax.random.split(key)
    keys = jax.random.split(k2, 20)
    batches = [(pb.mlp_batch(keys[2 * i], n), pb.mlp_batch(keys[2 * i + 1]))
               for i in range(10)]
    return pb.init_mlp(k1), pb.mlp_hyperparams(jnp.float64), batches


def test_gamma_zero_theta_one_equals_t1t2(x64, key):
    """gamma = 0, theta = 1: the hypergradient each step applies (read back
    from an SGD outer update) is T1-T2's on the same state, at every step of
    a stochastic run (momentum inner optimizer, direct term in L_val)."""
    params, hp, batches = _mlp_setup(key)
    inner, beta = optax.sgd(0.2, momentum=0.9), 0.5
    hd = HyperDistill(pb.mlp_train_loss, pb.mlp_val_loss, inner,
                      optax.sgd(beta), gamma=0.0, theta=1.0)
    t12 = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss, inner, optax.sgd(beta))
    state = hd.init(params, hp, batch=batches[0][0])
    for train, val in batches[:5]:
        expected = t12.compute_hypergradient(
            state.replace(algorithm_state=gh.T1T2State()), train, val)
        new = hd.step(state, train, val)
        applied = jax.tree.map(lambda a, b: (a - b) / beta,
                               state.hyperparams, new.hyperparams)
        chex.assert_trees_all_close(applied, expected, rtol=1e-9,
                                    atol=1e-13)
        assert float(jax.tree.leaves(expected)[0]) != 0.0
        state = new
    assert int(state.algorithm_state.episode_step) == 5


def test_d_star_keeps_round_b_p_old_examples(key):
    """D*_2 = SS(D_1, p_2) u SS(D_2, 1 - p_2): round(8 * 0.4737) = 4 rows
    of D_1, 4 of D_2, at the same positions in every leaf."""
    def loss(w, lam, batch):
        return jnp.sum(w * lam) * jnp.mean(batch["x"])

    def val_loss(w, lam, batch):
        del batch
        return jnp.sum(w * lam)
    ids = [{"x": jnp.arange(8.0) + 100 * i, "y": jnp.arange(8) + 100 * i}
           for i in range(2)]
    opt = HyperDistill(loss, val_loss, optax.sgd(0.1), optax.sgd(0.0),
                       gamma=0.9)
    state = opt.init(jnp.ones(2), jnp.ones(2), batch=ids[0])
    state = opt.step(state, ids[0], None)
    np.testing.assert_array_equal(state.algorithm_state.d_star["x"],
                                  ids[0]["x"])
    state = opt.step(state, ids[1], None)
    d = state.algorithm_state.d_star
    np.testing.assert_array_equal(d["x"], d["y"].astype(d["x"].dtype))
    old = np.asarray(d["x"]) < 100
    assert old.sum() == 4
    np.testing.assert_array_equal(np.asarray(d["x"]) % 100, np.arange(8))


# -- LinearEstimation, checked by an independent loop --------------------------

def _independent_theta(state, batches, val, gamma, eta):
    """Alg. 4 written out: Python loops, jax.vjp of an SGD step per step."""
    hp = state.hyperparams

    def phi(w, lam, batch):
        g = jax.grad(pb.mlp_train_loss)(w, lam, batch)
        return jax.tree.map(lambda a, b: a - eta * b, w, g)

    @jax.jit
    def pullback(w, lam, batch, a):
        return jax.vjp(lambda w_, lam_: phi(w_, lam_, batch), w, lam)[1](a)
    n = batches[0].shape[0]
    w_t = state.params
    for i in range(n):
        w_t = jax.jit(phi)(w_t, hp, jax.tree.map(lambda x: x[i], batches))
    w0 = state.params
    alpha = jax.grad(pb.mlp_val_loss)(w_t, hp, val)
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
    keys = jax.random.split(state.algorithm_state.key, n + 1)
    a, g_so, xs, ys = alpha, 0.0, [], []
    w_star = d_star = None
    for s in range(1, n + 1):
        t = n - s + 1
        batch = jax.tree.map(lambda x: x[t - 1], batches)
        f = (t - 1) / n
        w_hat = jax.tree.map(lambda u, v: (1 - f) * u + f * v, w0, w_t)
        a, b_a = pullback(w_hat, hp, batch, a)
        g_so = g_so + flat(b_a)
        big_s = sum(gamma ** j for j in range(s))
        p = sum(gamma ** j for j in range(s - 1)) / big_s
        if s == 1:
            w_star, d_star = w_hat, batch
        else:
            w_star = jax.tree.map(lambda u, v: p * u + (1 - p) * v,
                                  w_star, w_hat)
            size = batch[0].shape[0]
            keep = np.asarray(jax.random.permutation(keys[s], size)) < round(
                size * p)
            d_star = tuple(np.where(keep.reshape((-1,) + (1,) * (o.ndim - 1)),
                                    o, b) for o, b in zip(d_star, batch))
        v = flat(pullback(w_star, hp, d_star, alpha)[1])
        xs.append(np.linalg.norm(v) * big_s)
        ys.append(np.dot(v, g_so) / np.linalg.norm(v))
    xs, ys = np.array(xs), np.array(ys)
    return xs @ ys / (xs @ xs), keys[0]


def test_estimate_theta_matches_independent_loop(x64, key):
    params, hp, batches = _mlp_setup(key)
    stacked = jax.tree.map(lambda *x: jnp.stack(x),
                           *[b[0] for b in batches[:4]])
    val = batches[0][1]
    opt = HyperDistill(pb.mlp_train_loss, pb.mlp_val_loss, optax.sgd(0.5),
                       optax.sgd(0.1), gamma=0.9)
    state = opt.init(params, hp, batch=batches[0][0],
                     key=jax.random.PRNGKey(3))
    fitted = opt.estimate_theta(state, stacked, val)
    theta, new_key = _independent_theta(state, stacked, val, 0.9, 0.5)
    assert abs(theta - 1.0) > 1e-3      # a non-trivial fit
    np.testing.assert_allclose(fitted.algorithm_state.theta, theta, rtol=1e-10)
    np.testing.assert_array_equal(fitted.algorithm_state.key, new_key)
    chex.assert_trees_all_equal(fitted.params, state.params)
    chex.assert_trees_all_equal(fitted.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(fitted.algorithm_state.w_star,
                                state.algorithm_state.w_star)


# -- state handling (a cheap ridge problem, stochastic batches) ---------------

def _ridge_setup(key, n=6):
    keys = jax.random.split(key, 10)
    val = pb.ridge_batches()[1]
    batches = [((jax.random.normal(k, (n, 2)),
                 jax.random.normal(jax.random.fold_in(k, 1), (n,))), val)
               for k in keys]
    return jnp.array([0.2, -0.1]), {"log_l2": jnp.array(0.0)}, batches


def _ridge_opt(train_loss=pb.log_ridge_train_loss, **options):
    return HyperDistill(train_loss, pb.ridge_val_loss,
                        optax.sgd(0.05, momentum=0.9), optax.adam(0.05),
                        **options)


def test_init_requires_a_batch_template(key):
    """D* is allocated at init, so the state's tree never changes: a step
    returns the structure and dtypes it was given."""
    params, hp, batches = _ridge_setup(key)
    train, val = batches[0]
    opt = _ridge_opt(gamma=0.9)
    with pytest.raises(TypeError, match="HyperDistill.init needs batch="):
        opt.init(params, hp)
    state = opt.init(params, hp, batch=train)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        opt.step(state, train, val), state)
    for leaf in jax.tree.leaves(state.algorithm_state.d_star):
        assert not np.any(np.asarray(leaf))


def test_step_applies_compute_hypergradient(x64, key):
    """compute_hypergradient is the g of the next online step (t = episode
    step + 1, no off-by-one): an SGD(1) outer step moves lambda by -g."""
    params, hp, batches = _ridge_setup(key)
    opt = HyperDistill(pb.log_ridge_train_loss, pb.ridge_val_loss,
                       optax.sgd(0.05, momentum=0.9), optax.sgd(1.0),
                       gamma=0.9, theta=0.8)
    state = opt.init(params, hp, batch=batches[0][0])
    for train, val in batches[:4]:
        h = opt.compute_hypergradient(state, train, val)
        new = opt.step(state, train, val)
        np.testing.assert_allclose(
            new.hyperparams["log_l2"],
            state.hyperparams["log_l2"] - h["log_l2"], rtol=1e-13)
        np.testing.assert_allclose(new.metadata["hypergradient_norm"],
                                   abs(h["log_l2"]), rtol=1e-13)
        state = new


def test_reset_episode(x64, key):
    params, hp, batches = _ridge_setup(key)
    opt = _ridge_opt(gamma=0.9, theta=0.7)
    state = opt.init(params, hp, batch=batches[0][0])
    for train, val in batches[:3]:
        state = opt.step(state, train, val)
    assert int(state.algorithm_state.episode_step) == 3
    phi = jnp.array([1.0, -2.0])
    reset = opt.reset_episode(state, phi)
    assert int(reset.algorithm_state.episode_step) == 0
    assert int(reset.step) == 3
    np.testing.assert_array_equal(reset.params, phi)
    np.testing.assert_array_equal(reset.algorithm_state.w_star, phi)
    for leaf in jax.tree.leaves(reset.algorithm_state.d_star):
        assert not np.any(leaf)
    (trace,) = [s for s in reset.inner_opt_state
                if isinstance(s, optax.TraceState)]
    assert not np.any(trace.trace)      # a fresh inner optimisation
    chex.assert_trees_all_equal(reset.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(reset.outer_opt_state, state.outer_opt_state)
    assert float(reset.algorithm_state.theta) == 0.7
    # the next step is t = 1 of a fresh episode: it equals a fresh init
    fresh = opt.init(phi, state.hyperparams, batch=batches[0][0])
    train, val = batches[3]
    h = opt.compute_hypergradient(reset, train, val)
    chex.assert_trees_all_close(
        h, opt.compute_hypergradient(fresh, train, val), rtol=1e-12)
    # and it is T1-T2 scaled by theta (S_1 = 1, w*_1 = w_0, D*_1 = D_1)
    t12 = gh.T1T2(pb.log_ridge_train_loss, pb.ridge_val_loss,
                  optax.sgd(0.05, momentum=0.9), optax.adam(0.05))
    h12 = t12.compute_hypergradient(t12.init(phi, state.hyperparams),
                                    train, val)
    # (ridge_val_loss does not depend on lambda: no direct term)
    np.testing.assert_allclose(h["log_l2"], 0.7 * h12["log_l2"], rtol=1e-12)
    nxt = opt.step(reset, train, val)
    assert int(nxt.algorithm_state.episode_step) == 1
    np.testing.assert_array_equal(nxt.algorithm_state.w_star, phi)
    chex.assert_trees_all_equal(nxt.algorithm_state.d_star, train)


def test_no_retrace_over_ten_steps(key):
    traces = []

    def train_loss(params, hp, batch):
        traces.append(1)
        return pb.log_ridge_train_loss(params, hp, batch)
    params, _, batches = _ridge_setup(key)
    opt = _ridge_opt(train_loss, gamma=0.99)
    state = opt.init(params, {"log_l2": 0.0}, batch=batches[0][0])
    state = opt.step(state, *batches[0])
    first = len(traces)
    assert first > 0
    for i in range(10):
        state = opt.step(state, *batches[i])
    assert len(traces) == first
    assert int(state.step) == 11
    assert int(state.algorithm_state.episode_step) == 11


def test_vmap_population_equals_loop(key):
    params, _, batches = _ridge_setup(key)
    opt = _ridge_opt(gamma=0.9)
    states = [opt.init(params, {"log_l2": jnp.array(s)}, batch=batches[0][0])
              for s in [-2.0, 0.0, 1.0]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    step = jax.vmap(opt.step, in_axes=(0, None, None))
    for train, val in batches[:4]:
        stacked = step(stacked, train, val)
        states = [opt.step(s, train, val) for s in states]
    for i, s in enumerate(states):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], stacked), s, rtol=1e-5, atol=1e-6)


def test_nan_injection_skips_and_counts(key):
    params, hp, batches = _ridge_setup(key)
    opt = _ridge_opt(gamma=0.9)
    state = opt.init(params, hp, batch=batches[0][0])
    state = opt.step(state, *batches[0])
    step = jax.jit(opt.step)
    (x, y), val = batches[1]
    bad = step(state, (x.at[0, 0].set(jnp.nan), y), val)
    assert int(bad.metadata["nonfinite_count"]) == 2   # inner and outer
    for name in ["params", "hyperparams", "inner_opt_state",
                 "outer_opt_state"]:
        chex.assert_trees_all_equal(getattr(bad, name), getattr(state, name))
    for name in ["w_star", "d_star", "episode_step"]:
        chex.assert_trees_all_equal(getattr(bad.algorithm_state, name),
                                    getattr(state.algorithm_state, name))
    assert int(bad.step) == 2
    bad_val = (val[0].at[0, 0].set(jnp.nan), val[1])
    only_outer = step(state, (x, y), bad_val)
    assert int(only_outer.metadata["nonfinite_count"]) == 1
    chex.assert_trees_all_equal(only_outer.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(only_outer.params,
                                opt.step(state, (x, y), val).params)
    assert int(only_outer.algorithm_state.episode_step) == 2


def test_option_validation():
    args = (pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.1),
            optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\]"):
        HyperDistill(*args, gamma=1.5)
    with pytest.raises(ValueError, match="theta must be in"):
        HyperDistill(*args, theta=float("nan"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'seed'"):
        HyperDistill(*args, seed=1)
    with pytest.raises(TypeError, match="key must be a single PRNG key"):
        HyperDistill(*args).init(jnp.zeros(2), 1.0, batch=None, key=3)
    with pytest.raises(ValueError, match="batch must have a leading axis"):
        HyperDistill(*args).init(jnp.zeros(2), 1.0, batch=jnp.array(1.0))
