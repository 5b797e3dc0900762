"""OneShotWarmStart (OHGW) against ALGORITHMS.md §6 T12, T1–T2, finite
differences and independent optax computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gradhpo.algorithms.t1_t2 import T1T2
from gradhpo.algorithms.warm_start import OneShotWarmStart

import problems as pb


def flat(tree):
    """A pytree as one vector, in ``jax.tree.leaves`` order."""
    return ravel_pytree(tree)[0]

# -- §6 T12: squared loss 1/2 (w x - y)^2 on the point (x = 1, y = 0) --------


def sq_train_loss(w, hp, batch):
    """Coupled weight decay: wd enters the training loss."""
    x, y = batch
    wd = jnp.exp(hp["log_wd"]) if "log_wd" in hp else 0.0
    return 0.5 * (w * x - y) ** 2 + 0.5 * wd * w ** 2


def sq_val_loss(w, hp, batch):
    """Plain squared loss, no weight decay (the §6 T12 values assume this)."""
    del hp
    x, y = batch
    return 0.5 * (w * x - y) ** 2


def point():
    return jnp.array(1.0), jnp.array(0.0)


def stacked(batch, k):
    return jax.tree.map(lambda x: jnp.stack([x] * k), batch)


def t12_lr_wd(**kwargs):
    opt = OneShotWarmStart(
        sq_train_loss, sq_val_loss,
        lambda hp: optax.sgd(jnp.exp(hp["log_lr"])), **kwargs)
    hp = {"log_lr": jnp.log(0.1), "log_wd": jnp.log(0.1)}
    return opt, opt.init(jnp.array(1.0), hp)


def test_t12_log_lr_log_wd(x64):
    """§6 T12 with V = the data point itself (B_1 = B_2 = V = (1, 0)).

    The §6 values use the *unregularised* squared loss on V:
    v = dL_val/dw(w_1) = w_1 = 0.89 gives dJ/dlog lr = -0.1 * 1.1 * 0.89 =
    -0.0979 and dJ/dlog wd = -0.1 * 0.1 * 0.89 = -0.0089. (With the decay
    term in L_val, v would be 0.979 and dJ/dlog lr = -0.1077.)
    """
    opt, state = t12_lr_wd(step_size=1e-3)
    g = opt.compute_hypergradient(state, point(), point())
    np.testing.assert_allclose(g["log_lr"], -0.0979, rtol=1e-10)
    np.testing.assert_allclose(g["log_wd"], -0.0089, rtol=1e-10)
    new = opt.step(state, point(), point())
    meta = new.metadata
    # J = w_1^2 / 2 with w_1 = 1 - 0.1 (1 + 0.1) = 0.89
    np.testing.assert_allclose(np.sqrt(2 * meta["val_loss"]), 0.89,
                               rtol=1e-12)
    np.testing.assert_allclose(meta["train_loss"], 0.55, rtol=1e-12)
    # flat vectors in key order (log_lr, log_wd)
    np.testing.assert_allclose(flat(new.algorithm_state.hypergradient),
                               [-0.0979, -0.0089],
                               rtol=1e-10)
    np.testing.assert_allclose(meta["hypergradient_norm"],
                               np.hypot(0.0979, 0.0089), rtol=1e-10)
    np.testing.assert_allclose(flat(new.algorithm_state.delta),
                               [9.79e-5, 8.9e-6], rtol=1e-9)
    np.testing.assert_allclose(meta["delta_norm"], np.hypot(9.79e-5, 8.9e-6),
                               rtol=1e-9)
    np.testing.assert_allclose(new.hyperparams["log_lr"],
                               np.log(0.1) + 9.79e-5, rtol=1e-12)
    np.testing.assert_allclose(new.hyperparams["log_wd"],
                               np.log(0.1) + 8.9e-6, rtol=1e-12)
    assert not bool(meta["clipped"]) and int(meta["nonfinite_count"]) == 0
    assert int(new.step) == 1
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.inner_opt_state, state.inner_opt_state)
    # the literal rule (dL_tr(w_0)/dpsi): zero for lr, "shrink wd" for wd
    literal = jax.grad(sq_train_loss, argnums=1)(jnp.array(1.0),
                                                 state.hyperparams, point())
    assert float(literal["log_lr"]) == 0.0
    np.testing.assert_allclose(literal["log_wd"], 0.05, rtol=1e-12)


def test_t12_momentum_needs_two_steps(x64):
    """§6 T12: mu = 0.9, lr 0.1, w_0 = 1, zero buffer, no weight decay:
    dJ/dmu = 0 with one step, -0.072 with two (w_2 = 0.72, dw_2/dmu =
    -lr * m_1 = -0.1)."""
    def make(k):
        return OneShotWarmStart(
            sq_train_loss, sq_val_loss,
            lambda hp: optax.sgd(0.1, momentum=hp["mu"]), lookahead=k)
    one = make(1)
    state = one.init(jnp.array(1.0), {"mu": jnp.array(0.9)})
    assert float(one.compute_hypergradient(state, point(), point())["mu"]) \
        == 0.0
    two = make(2)
    state = two.init(jnp.array(1.0), {"mu": jnp.array(0.9)})
    g = two.compute_hypergradient(state, stacked(point(), 2), point())
    np.testing.assert_allclose(g["mu"], -0.072, rtol=1e-10)
    new = two.step(state, stacked(point(), 2), point())
    np.testing.assert_allclose(new.metadata["val_loss"], 0.5 * 0.72 ** 2,
                               rtol=1e-12)
    np.testing.assert_allclose(new.hyperparams["mu"], 0.9 + 0.072e-3,
                               rtol=1e-12)


def _smoothed_ce(w, hp, batch):
    del batch
    labels = optax.smooth_labels(jax.nn.one_hot(0, 3), hp["eps"])
    return optax.softmax_cross_entropy(w, labels)


def _plain_ce(w, hp, batch):
    del hp, batch
    return optax.softmax_cross_entropy_with_integer_labels(w, 0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_t12_label_smoothing(x64, eps):
    """§6 T12: logits (2, 0.5, -1), true class 0: dL/deps = 1.5 =
    CE_uniform - CE_true for every eps (a zero-learning-rate lookahead with
    the smoothed loss as L_val is the literal rule). With a real step and
    plain CE on V, §5.3: dJ/deps = -eta <v, e_0 - 1/3>."""
    logits = jnp.array([2.0, 0.5, -1.0])
    hp = {"eps": jnp.array(eps)}
    literal = OneShotWarmStart(_smoothed_ce, _smoothed_ce, optax.sgd(0.0))
    g = literal.compute_hypergradient(literal.init(logits, hp), None, None)
    np.testing.assert_allclose(g["eps"], 1.5, rtol=1e-12)

    eta = 0.5
    opt = OneShotWarmStart(_smoothed_ce, _plain_ce, optax.sgd(eta))
    g = opt.compute_hypergradient(opt.init(logits, hp), None, None)
    z = np.array([2.0, 0.5, -1.0])
    e0 = np.array([1.0, 0.0, 0.0])
    target = (1 - eps) * e0 + eps / 3
    w1 = z - eta * (np.exp(z) / np.exp(z).sum() - target)
    v = np.exp(w1) / np.exp(w1).sum() - e0
    np.testing.assert_allclose(g["eps"], -eta * v @ (e0 - 1 / 3), rtol=1e-10)


# -- MLP: T1–T2 at K = 1, finite differences at K > 1 ------------------------


def mlp_setup(key, k=1):
    keys = jax.random.split(key, k + 2)
    params = pb.init_mlp(keys[0])
    hp = dict(pb.mlp_hyperparams(jnp.float64), log_lr=jnp.log(0.2))
    trains = [pb.mlp_batch(kk) for kk in keys[1:k + 1]]
    train = (trains[0] if k == 1 else
             jax.tree.map(lambda *xs: jnp.stack(xs), *trains))
    return params, hp, train, trains, pb.mlp_batch(keys[-1])


def mlp_inner(hp):
    return optax.sgd(jnp.exp(hp["log_lr"]), momentum=0.9)


def test_lookahead_one_equals_t1t2(x64, key):
    params, hp, train, _, val = mlp_setup(key)
    for inner in [mlp_inner, lambda hp: optax.adam(jnp.exp(hp["log_lr"]))]:
        t1t2 = T1T2(pb.mlp_train_loss, pb.mlp_val_loss, inner,
                    optax.sgd(0.0))
        expected = t1t2.compute_hypergradient(t1t2.init(params, hp), train,
                                              val)
        opt = OneShotWarmStart(pb.mlp_train_loss, pb.mlp_val_loss, inner)
        state = opt.init(params, hp)
        got = opt.compute_hypergradient(state, train, val)
        chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-14)
        new = opt.step(state, train, val)
        np.testing.assert_allclose(flat(new.algorithm_state.hypergradient),
                                   ravel_pytree(expected)[0], rtol=1e-10,
                                   atol=1e-14)


def test_lookahead_three_equals_central_difference(x64, key):
    k = 3
    params, hp, train, trains, val = mlp_setup(key, k)

    def objective(hp):
        """J written independently: a Python loop over optax updates."""
        tx = mlp_inner(hp)
        w, s = params, tx.init(params)
        for batch in trains:
            grads = jax.grad(pb.mlp_train_loss)(w, hp, batch)
            updates, s = tx.update(grads, s, w)
            w = optax.apply_updates(w, updates)
        return pb.mlp_val_loss(w, hp, val)

    opt = OneShotWarmStart(pb.mlp_train_loss, pb.mlp_val_loss, mlp_inner,
                           lookahead=k)
    state = opt.init(params, hp)
    g = ravel_pytree(opt.compute_hypergradient(state, train, val))[0]
    flat, unravel = ravel_pytree(hp)
    j = jax.jit(lambda f: objective(unravel(f)))
    delta = 1e-5
    fd = np.array([(j(flat.at[i].add(delta)) - j(flat.at[i].add(-delta)))
                   / (2 * delta) for i in range(flat.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-10)
    assert np.all(np.abs(fd) > 1e-6)    # every coordinate is exercised
    np.testing.assert_allclose(opt.step(state, train, val).metadata[
        "val_loss"], j(flat), rtol=1e-12)


# -- several hyper-steps, outer optimizer -------------------------------------


def test_three_hyper_steps_equal_sequential_manual_steps(x64, key):
    params, hp, train, _, val = mlp_setup(key, 2)
    opt = OneShotWarmStart(pb.mlp_train_loss, pb.mlp_val_loss, mlp_inner,
                           step_size=0.5, num_steps=3, lookahead=2)
    state = opt.init(params, hp)
    new = opt.step(state, train, val)

    lam, grads = state.hyperparams, []
    for _ in range(3):
        g = opt.compute_hypergradient(state.replace(hyperparams=lam), train,
                                      val)
        grads.append(g)
        lam = jax.tree.map(lambda x, h: x - 0.5 * h, lam, g)
    chex.assert_trees_all_close(new.hyperparams, lam, rtol=1e-12)
    # the gradient changed between hyper-steps: it was recomputed
    assert not np.allclose(ravel_pytree(grads[0])[0],
                           ravel_pytree(grads[2])[0], rtol=1e-3)
    np.testing.assert_allclose(flat(new.algorithm_state.hypergradient),
                               ravel_pytree(grads[0])[0], rtol=1e-12)
    np.testing.assert_allclose(
        flat(new.algorithm_state.delta),
        ravel_pytree(lam)[0] - ravel_pytree(state.hyperparams)[0],
        rtol=1e-10, atol=1e-15)
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.inner_opt_state, state.inner_opt_state)


def test_outer_optimizer_equals_independent_optax(x64, key):
    params, hp, train, _, val = mlp_setup(key)
    opt = OneShotWarmStart(pb.mlp_train_loss, pb.mlp_val_loss, mlp_inner,
                           optax.adam(0.05), step_size=123.0, num_steps=3)
    state = opt.init(params, hp)
    new = opt.step(state, train, val)

    adam = optax.adam(0.05)
    lam, adam_state = hp, adam.init(hp)
    for _ in range(3):
        g = opt.compute_hypergradient(state.replace(hyperparams=lam), train,
                                      val)
        updates, adam_state = adam.update(g, adam_state, lam)
        lam = optax.apply_updates(lam, updates)
    chex.assert_trees_all_close(new.hyperparams, lam, rtol=1e-12)
    chex.assert_trees_all_close(new.outer_opt_state, adam_state, rtol=1e-12)
    chex.assert_trees_all_equal(new.params, state.params)


# -- the random-direction control ---------------------------------------------


def ridge_train_loss(w, hp, batch):
    """Ridge with one L2 coefficient per weight (log-parametrised)."""
    x, y = batch
    return (0.5 * jnp.sum((x @ w - y) ** 2)
            + 0.5 * jnp.sum(jnp.exp(hp["log_l2"]) * w ** 2))


def ridge_setup(k=1):
    """T1 ridge data; psi = (log lr, two log L2 coefficients), heavy ball."""
    train, val = pb.ridge_batches()
    hp = {"log_l2": jnp.log(jnp.array([0.5, 2.0])), "log_lr": jnp.log(0.01)}
    return (jnp.array([0.2, -0.1]), hp,
            train if k == 1 else stacked(train, k), val)


def ridge_opt(*args, **kwargs):
    return OneShotWarmStart(
        ridge_train_loss, pb.ridge_val_loss,
        lambda hp: optax.sgd(jnp.exp(hp["log_lr"]), momentum=0.9),
        *args, **kwargs)


def _delta(opt, params, hp, train, val, key=None):
    return flat(opt.step(opt.init(params, hp, key=key), train,
                         val).algorithm_state.delta)


@pytest.mark.parametrize("outer", [None, optax.adam(0.05)],
                         ids=["plain", "adam"])
def test_random_direction_has_the_same_length(x64, outer):
    params, hp, train, val = ridge_setup()
    d_h = _delta(ridge_opt(outer, step_size=0.1), params, hp, train, val)
    d_0 = _delta(ridge_opt(outer, step_size=0.1, direction="random"),
                 params, hp, train, val)
    np.testing.assert_allclose(np.linalg.norm(d_0), np.linalg.norm(d_h),
                               rtol=1e-10)
    assert np.linalg.norm(d_h) > 1e-3
    cosine = d_0 @ d_h / (np.linalg.norm(d_0) * np.linalg.norm(d_h))
    assert abs(cosine) < 0.99
    d_1 = _delta(ridge_opt(outer, step_size=0.1, direction="random"),
                 params, hp, train, val, key=jax.random.PRNGKey(1))
    assert not np.allclose(d_0, d_1)
    np.testing.assert_allclose(np.linalg.norm(d_1), np.linalg.norm(d_h),
                               rtol=1e-10)
    np.testing.assert_array_equal(
        _delta(ridge_opt(outer, step_size=0.1, direction="random"),
               params, hp, train, val), d_0)


def test_random_key_advances_and_length_matches_per_step(x64):
    """Two calls of one hyper-step equal one call of two (the key is split
    once per hyper-step and carried), and the second step's length is
    step_size * |g(psi_1)| at the randomly moved psi_1."""
    params, hp, train, val = ridge_setup()
    one = ridge_opt(step_size=0.1, direction="random")
    s1 = one.step(one.init(params, hp), train, val)
    s2 = one.step(s1, train, val)
    assert not np.allclose(flat(s1.algorithm_state.delta),
                           flat(s2.algorithm_state.delta))
    two = ridge_opt(step_size=0.1, num_steps=2, direction="random")
    both = two.step(two.init(params, hp), train, val)
    chex.assert_trees_all_close(both.hyperparams, s2.hyperparams,
                                rtol=1e-12)
    np.testing.assert_array_equal(both.algorithm_state.key,
                                  s2.algorithm_state.key)
    g1 = ravel_pytree(one.compute_hypergradient(s1, train, val))[0]
    np.testing.assert_allclose(np.linalg.norm(flat(s2.algorithm_state.delta)),
                               0.1 * np.linalg.norm(g1), rtol=1e-10)


# -- bounds, non-finite values, compilation, vmap, validation ----------------


def test_bounds_hold_and_clipped_flag(x64):
    """Step size 10: the unbounded change is (+0.979, +0.089)."""
    lr0 = np.log(0.1)
    opt, state = t12_lr_wd(step_size=10.0)
    free = opt.step(state, point(), point())
    np.testing.assert_allclose(flat(free.algorithm_state.delta), [0.979, 0.089],
                               rtol=1e-10)
    assert not bool(free.metadata["clipped"])

    opt, state = t12_lr_wd(step_size=10.0, bounds=(
        None, {"log_lr": lr0 + 0.5, "log_wd": None}))
    new = opt.step(state, point(), point())
    np.testing.assert_allclose(new.hyperparams["log_lr"], lr0 + 0.5,
                               rtol=1e-12)
    np.testing.assert_allclose(new.hyperparams["log_wd"], lr0 + 0.089,
                               rtol=1e-12)
    np.testing.assert_allclose(flat(new.algorithm_state.delta), [0.5, 0.089],
                               rtol=1e-10)
    assert bool(new.metadata["clipped"])

    # scalar bounds: the lower one lifts log_wd (-2.21 -> -2.0)
    opt, state = t12_lr_wd(step_size=10.0, bounds=(-2.0, 0.0))
    new = opt.step(state, point(), point())
    np.testing.assert_allclose(new.hyperparams["log_lr"], lr0 + 0.979,
                               rtol=1e-12)
    np.testing.assert_allclose(new.hyperparams["log_wd"], -2.0, rtol=1e-12)
    assert bool(new.metadata["clipped"])

    opt, state = t12_lr_wd(step_size=10.0, bounds=(-10.0, 10.0))
    assert not bool(opt.step(state, point(), point()).metadata["clipped"])


def test_nan_validation_batch_leaves_psi_unchanged(x64):
    opt, state = t12_lr_wd(outer_optimizer=optax.adam(0.1), num_steps=2)
    bad = (jnp.array(1.0), jnp.array(jnp.nan))
    new = jax.jit(opt.step)(state, point(), bad)
    assert int(new.metadata["nonfinite_count"]) == 2     # per hyper-step
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(new.outer_opt_state, state.outer_opt_state)
    chex.assert_trees_all_equal(new.params, state.params)
    np.testing.assert_array_equal(flat(new.algorithm_state.delta), [0.0, 0.0])
    good = jax.jit(opt.step)(new, point(), point())
    assert int(good.metadata["nonfinite_count"]) == 2
    assert np.all(np.asarray(flat(good.algorithm_state.delta)) > 0)


# log_lr is deliberately unread here (a plain optax.sgd inner optimizer)
@pytest.mark.filterwarnings("ignore:.*is read by neither")
def test_no_retrace_over_ten_calls():
    traces = []

    def counting(params, hp, batch):
        traces.append(1)
        return ridge_train_loss(params, hp, batch)
    params, hp, train, val = ridge_setup(2)
    opt = OneShotWarmStart(counting, pb.ridge_val_loss, optax.sgd(0.01),
                           optax.adam(0.01), num_steps=2, lookahead=2,
                           direction="random", bounds=(-5.0, 5.0))
    state = opt.init(params, hp)
    state = opt.step(state, train, val)
    first = len(traces)
    assert first > 0
    for i in range(10):
        state = opt.step(state, jax.tree.map(lambda x: x * (1 + 0.1 * i),
                                             train), val)
    assert len(traces) == first
    assert int(state.step) == 11


def test_vmap_population_equals_loop(x64):
    params, hp, train, val = ridge_setup(2)
    opt = ridge_opt(optax.adam(0.05), num_steps=2, lookahead=2,
                    direction="random", bounds=(-4.0, 4.0))
    states = [opt.init(params, jax.tree.map(lambda x, o=o: x + o, hp))
              for o in [-0.5, 0.0, 0.5]]
    population = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    step = jax.vmap(opt.step, in_axes=(0, None, None))
    for _ in range(2):
        population = step(population, train, val)
        states = [opt.step(s, train, val) for s in states]
    for i, single in enumerate(states):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], population), single, rtol=1e-9,
            atol=1e-12)
    # the population members moved differently
    assert not np.allclose(flat(states[0].algorithm_state.delta),
                           flat(states[2].algorithm_state.delta))


def test_invalid_options_name_the_argument():
    args = (sq_train_loss, sq_val_loss, optax.sgd(0.1))
    cases = [({"step_size": 0.0}, ValueError, "step_size must be in"),
             ({"step_size": "big"}, TypeError, "step_size must be a real"),
             ({"num_steps": 0}, ValueError, "num_steps must be an int >= 1"),
             ({"lookahead": 1.5}, TypeError, "lookahead must be an int"),
             ({"direction": "sign"}, ValueError,
              "direction must be one of 'hypergradient', 'random'"),
             ({"bounds": (0.0,)}, ValueError, "bounds must be None or a pair")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            OneShotWarmStart(*args, **kwargs)
    with pytest.raises(TypeError, match="outer_optimizer must be"):
        OneShotWarmStart(*args, 0.1)
    hp = {"log_lr": jnp.array(0.0), "log_wd": jnp.array(0.0)}
    with pytest.raises(ValueError, match="lower <= upper"):
        OneShotWarmStart(*args, bounds=(1.0, 0.0)).init(jnp.array(1.0), hp)
    with pytest.raises(ValueError, match="bounds\\[1\\] must be a scalar"):
        OneShotWarmStart(*args, bounds=(None, [1.0, 2.0, 3.0])).init(
            jnp.array(1.0), hp)
    with pytest.raises(ValueError, match="at least one floating leaf"):
        OneShotWarmStart(*args).init(jnp.array(1.0), {"n": jnp.array(3)})
    opt = OneShotWarmStart(*args, lookahead=2)
    state = opt.init(jnp.array(1.0), hp)
    with pytest.raises(ValueError, match="train_batch must have a leading "
                       "axis of length 2"):
        opt.step(state, stacked(point(), 3), point())
