"""Greedy against ALGORITHMS.md §6 T10/T11, T1–T2 limits and an
independent unrolled computation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gradhpo.algorithms.greedy import Greedy
from gradhpo.algorithms.t1_t2 import T1T2

import problems as pb

# -- §6 T10 toy: L_val = |w|^2 + 10 |sin w|^2, L_tr = 1/2 (w-a)^T G (w-a) ----
TOY_G = np.array([1.0, 0.5])


def toy_train_loss(w, alpha, batch):
    del batch
    return 0.5 * jnp.sum(TOY_G * (w - alpha) ** 2)


def toy_val_loss(w, alpha, batch):
    del alpha, batch
    return jnp.sum(w ** 2) + 10 * jnp.sum(jnp.sin(w) ** 2)


def _toy(horizon, gamma, outer=0.1):
    opt = Greedy(toy_train_loss, toy_val_loss, optax.sgd(0.1),
                 optax.sgd(outer), horizon=horizon, gamma=gamma)
    return opt, opt.init(jnp.array([2.0, 2.0]), jnp.array([1.0, 1.0]))


@pytest.mark.parametrize("horizon, gamma, expected", [
    (5, 0.0, (0.278720836812, -0.020076600692)),
    (5, 0.5, (0.341314958716, -0.091801555637)),
    (5, 0.9, (0.228248350665, -0.320157492958)),
    (5, 1.0, (0.144581858002, -0.424741736428)),
    (10, 0.0, (0.699503643596, 0.131947620954)),
    (10, 0.9, (2.465016675478, 0.136189244234)),
])
def test_t10_generalized_greedy_toy(x64, horizon, gamma, expected):
    opt, state = _toy(horizon, gamma)
    dummy = jnp.zeros((horizon,))
    h = opt.compute_hypergradient(state, dummy, dummy)
    np.testing.assert_allclose(h, expected, rtol=1e-10)
    new = opt.step(state, dummy, dummy)
    # step applies exactly this hypergradient through outer SGD(0.1)
    np.testing.assert_allclose(new.hyperparams, 1.0 - 0.1 * np.array(h),
                               rtol=1e-13)
    w_t = 1.0 + (2.0 - 1.0) * (1 - 0.1 * TOY_G) ** horizon
    np.testing.assert_allclose(new.params, w_t, rtol=1e-13)
    if horizon == 5:
        np.testing.assert_allclose(w_t, [1.59049, 1.7737809375], rtol=1e-13)
    np.testing.assert_allclose(new.metadata["val_loss"],
                               toy_val_loss(w_t, None, None), rtol=1e-13)
    np.testing.assert_allclose(new.metadata["hypergradient_norm"],
                               np.linalg.norm(expected), rtol=1e-10)
    assert int(new.metadata["nonfinite_count"]) == 0


def test_t10_gamma_zero_is_t1t2_term_at_last_step(x64):
    """gamma = 0: grad L_val(w_T) . eta G (the T1–T2 term), checked against
    the closed form and against T1T2 from w_{T-1}."""
    opt, state = _toy(5, 0.0)
    h = opt.compute_hypergradient(state, jnp.zeros(5), jnp.zeros(5))
    w_t = 1.0 + (1 - 0.1 * TOY_G) ** 5
    grad_val = 2 * w_t + 10 * np.sin(2 * w_t)
    np.testing.assert_allclose(h, grad_val * 0.1 * TOY_G, rtol=1e-12)
    t1t2 = T1T2(toy_train_loss, toy_val_loss, optax.sgd(0.1),
                optax.sgd(0.0))
    ref = t1t2.init(jnp.array([2.0, 2.0]), jnp.array([1.0, 1.0]))
    for _ in range(4):
        ref = t1t2.step(ref, None, None)
    np.testing.assert_allclose(h, t1t2.compute_hypergradient(ref, None, None),
                               rtol=1e-12)


def _stack(batches):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def small_train_loss(w, hp, batch):
    """Per-coordinate log-L2 and a cosine penalty (non-quadratic in w)."""
    x, y = batch
    return (0.5 * jnp.mean((x @ w - y) ** 2)
            + 0.5 * jnp.sum(jnp.exp(hp["log_l2"]) * w ** 2)
            + hp["c"] * jnp.sum(jnp.cos(w)))


def small_val_loss(w, hp, batch):
    # a direct term, so the hypergradient must include dL_val/dlambda
    x, y = batch
    return 0.5 * jnp.mean((x @ jnp.tanh(w) - y) ** 2) + 0.1 * hp["c"] ** 2


def _small_setup(key, steps):
    keys = jax.random.split(key, 1 + 2 * steps)
    batches = [(jax.random.normal(k, (4, 3)), jax.random.normal(k, (4,)))
               for k in keys[1:]]
    params = jax.random.normal(keys[0], (3,))
    hp = {"log_l2": jnp.array([-2.0, -1.0, -3.0]), "c": jnp.array(0.3)}
    return params, hp, batches[:steps], batches[steps:]


def test_gamma_zero_equals_t1t2_with_momentum_and_direct_term(x64, key):
    """Direct term in L_val, momentum state: gamma = 0 over a
    horizon of 3 equals T1T2 after two plain inner steps."""
    params, hp, train, val = _small_setup(key, 3)
    tx = optax.sgd(0.1, momentum=0.9)
    greedy = Greedy(small_train_loss, small_val_loss, tx, optax.sgd(0.1),
                    horizon=3, gamma=0.0)
    h = greedy.compute_hypergradient(greedy.init(params, hp), _stack(train),
                                     _stack(val))
    t1t2 = T1T2(small_train_loss, small_val_loss, tx, optax.sgd(0.0))
    ref = t1t2.init(params, hp)
    for t in range(2):
        ref = t1t2.step(ref, train[t], val[t])
    chex.assert_trees_all_close(
        h, t1t2.compute_hypergradient(ref, train[2], val[2]), rtol=1e-12,
        atol=1e-15)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_horizon_one_equals_t1t2(x64, key, inner):
    tx = {"sgd": optax.sgd(0.3), "adam": optax.adam(0.05)}[inner]
    params, hp, train, val = _small_setup(key, 3)
    greedy = Greedy(small_train_loss, small_val_loss, tx, optax.adam(0.1),
                    horizon=1, gamma=0.5)
    t1t2 = T1T2(small_train_loss, small_val_loss, tx, optax.adam(0.1))
    state, ref = greedy.init(params, hp), t1t2.init(params, hp)
    for t in range(3):
        chex.assert_trees_all_close(
            greedy.compute_hypergradient(state, train[t], val[t]),
            t1t2.compute_hypergradient(ref, train[t], val[t]), rtol=1e-14,
            atol=0)
        state = greedy.step(state, train[t], val[t])
        ref = t1t2.step(ref, train[t], val[t])
        # everything but the algorithms' own (empty) records
        chex.assert_trees_all_close(state.replace(algorithm_state=()),
                                    ref.replace(algorithm_state=()),
                                    rtol=1e-14, atol=0)


@pytest.mark.parametrize("unroll", [1, 2, True])
def test_matches_independent_unrolled_loop(x64, key, unroll):
    """sum_t gamma^(T-t) B_t^T a_t + direct term, with jax.vjp per step on
    optax directly (Adam inner: B_t includes the preconditioner), whatever
    the scan's unrolling."""
    horizon, gamma, tx = 4, 0.7, optax.adam(0.05)
    params, hp, train, val = _small_setup(key, horizon)
    opt = Greedy(small_train_loss, small_val_loss, tx, optax.sgd(0.1),
                 horizon=horizon, gamma=gamma, unroll=unroll)
    state = opt.init(params, hp)
    state = opt.step(state, _stack(train), _stack(val))   # non-trivial s
    h = opt.compute_hypergradient(state, _stack(train), _stack(val))

    w, s = state.params, state.inner_opt_state
    total = jax.tree.map(jnp.zeros_like, hp)
    for t in range(horizon):
        def phi(lam, w=w, s=s, t=t):
            grads = jax.grad(small_train_loss)(w, lam, train[t])
            updates, new_s = tx.update(grads, s, w)
            return optax.apply_updates(w, updates), new_s
        (w, s), pull = jax.vjp(phi, state.hyperparams)
        a_t = jax.grad(small_val_loss)(w, state.hyperparams, val[t])
        zero_s = jax.tree.map(jnp.zeros_like, s)
        term = pull((a_t, zero_s))[0]
        total = jax.tree.map(lambda x, y: x + gamma ** (horizon - 1 - t) * y,
                             total, term)
    direct = jax.grad(small_val_loss, 1)(w, state.hyperparams, val[-1])
    expected = jax.tree.map(jnp.add, total, direct)
    chex.assert_trees_all_close(h, expected, rtol=1e-10, atol=1e-14)
    assert float(direct["c"]) != 0.0


# -- top-k (§6 T11): L_val = <V, lambda> forces h = V; inner step inert ------

def _inert_train_loss(w, hp, batch):
    del hp, batch
    return 0.5 * jnp.sum(w ** 2)


def _linear_val_loss(w, hp, batch):
    del w
    return sum(jnp.vdot(c, x) for c, x in zip(jax.tree.leaves(batch),
                                              jax.tree.leaves(hp)))


def _linear(outer, **kwargs):
    return Greedy(_inert_train_loss, _linear_val_loss, optax.sgd(0.1),
                  outer, **kwargs)


@pytest.mark.parametrize("bounds", [None, (0.0, 1.0)])
def test_t11_top_k_values(x64, bounds):
    opt = _linear(optax.sgd(0.1), top_k=2, bounds=bounds)
    state = opt.init(jnp.zeros(1), 0.5 * jnp.ones(4))
    h = jnp.array([0.1, -3.0, 2.0, 0.0])
    np.testing.assert_allclose(opt.compute_hypergradient(state, None, h), h)
    new = opt.step(state, None, h)
    np.testing.assert_allclose(new.hyperparams, [0.5, 0.8, 0.3, 0.5],
                               rtol=1e-14)
    assert int(new.metadata["selected"]) == 2
    np.testing.assert_array_equal(new.algorithm_state.selected,
                                  [False, True, True, False])
    _, idx = jax.lax.top_k(jnp.abs(jnp.array([0.1, -3, 2, 0, 3])), 2)
    np.testing.assert_array_equal(idx, [1, 4])   # ties: lower index first


def test_top_k_moves_exactly_k_across_leaves(x64):
    hp = {"a": jnp.full(3, 0.5), "b": [jnp.array(0.5), jnp.full((2, 2), .5)]}
    h = {"a": jnp.array([0.3, -0.05, 0.7]),
         "b": [jnp.array(-0.9), jnp.array([[0.1, -0.6], [0.2, 0.01]])]}
    opt = _linear(optax.sgd(1.0), top_k=3)
    new = opt.step(opt.init(jnp.zeros(1), hp), None, h)
    moved = ravel_pytree(new.hyperparams)[0] - ravel_pytree(hp)[0]
    flat_h = ravel_pytree(h)[0]
    expected = np.where(np.abs(flat_h) >= 0.6, -flat_h, 0.0)
    assert np.count_nonzero(expected) == 3
    np.testing.assert_allclose(moved, expected, rtol=1e-14, atol=1e-15)
    # k >= H is the full update, identical to top_k=None
    full = _linear(optax.sgd(1.0), top_k=100)
    plain = _linear(optax.sgd(1.0))
    chex.assert_trees_all_equal(
        full.step(full.init(jnp.zeros(1), hp), None, h).hyperparams,
        plain.step(plain.init(jnp.zeros(1), hp), None, h).hyperparams)


def test_top_k_masks_adam_update_not_gradient(x64):
    """Unselected coordinates' Adam moments keep updating: checked against
    optax with the mask applied to the update, and shown to differ from
    feeding the masked gradient."""
    hs = np.array([[3.0, 0.1, -0.2, 0.05], [0.1, 2.0, -0.1, 0.3],
                   [0.2, -0.1, 1.0, 0.0], [1.0, 0.9, -0.5, 4.0],
                   [0.5, 3.0, 0.1, -0.2]])
    opt = _linear(optax.adam(0.1), top_k=1)
    state = opt.init(jnp.zeros(1), jnp.zeros(4))
    adam = optax.adam(0.1)
    lam, r = jnp.zeros(4), adam.init(jnp.zeros(4))
    lam_g, r_g = lam, r                   # the wrong variant, for contrast
    for h in hs:
        state = opt.step(state, None, jnp.array(h))
        mask = np.arange(4) == np.argmax(np.abs(h))
        updates, r = adam.update(jnp.array(h), r, lam)
        lam = lam + jnp.where(mask, updates, 0.0)
        updates_g, r_g = adam.update(jnp.where(mask, h, 0.0), r_g, lam_g)
        lam_g = lam_g + updates_g
    np.testing.assert_allclose(state.hyperparams, lam, rtol=1e-12)
    chex.assert_trees_all_close(state.outer_opt_state, r, rtol=1e-12)
    assert np.max(np.abs(np.asarray(lam) - np.asarray(lam_g))) > 1e-2


def test_predicted_improvement_skips_coordinate_pinned_at_bound(x64):
    hp, h = jnp.array([1.0, 0.5, 0.5]), jnp.array([-5.0, 1.0, 0.5])
    results, moved = {}, {}
    for score in ["magnitude", "predicted_improvement"]:
        opt = _linear(optax.sgd(0.1), top_k=1, bounds=(0.0, 1.0),
                      score=score)
        new = opt.step(opt.init(jnp.zeros(1), hp), None, h)
        results[score] = np.asarray(new.hyperparams)
        moved[score] = np.asarray(new.algorithm_state.selected)
        # only coordinates that actually moved count
        assert int(new.metadata["selected"]) == moved[score].sum()
    np.testing.assert_array_equal(moved["magnitude"], [False] * 3)
    np.testing.assert_array_equal(moved["predicted_improvement"],
                                  [False, True, False])
    # |h| picks the pinned coordinate 0: its step is clipped away
    np.testing.assert_allclose(results["magnitude"], [1.0, 0.5, 0.5])
    # -h * Delta scores it 0, so coordinate 1 (score 0.1) moves
    np.testing.assert_allclose(results["predicted_improvement"],
                               [1.0, 0.4, 0.5], rtol=1e-14)


def test_bounds_hold_after_many_steps(x64):
    hp = {"x": jnp.array([0.5, 0.5, 0.9]), "y": jnp.array(0.0),
          "z": jnp.array(0.0)}
    c = {"x": jnp.array([1.0, -1.0, 0.0]), "y": jnp.array(1.0),
         "z": jnp.array(-1.0)}
    opt = _linear(optax.adam(0.1), horizon=2,
                  bounds=({"x": 0.0, "y": None, "z": -1.0},
                          {"x": 1.0, "y": None, "z": jnp.array(2.0)}))
    state = opt.init(jnp.zeros(1), hp)
    c2 = jax.tree.map(lambda x: jnp.stack([x, x]), c)
    for _ in range(40):
        state = opt.step(state, None, c2)
        x = np.asarray(state.hyperparams["x"])
        assert np.all((x >= 0.0) & (x <= 1.0))
        assert -1.0 <= float(state.hyperparams["z"]) <= 2.0
    np.testing.assert_allclose(state.hyperparams["x"], [0.0, 1.0, 0.9])
    np.testing.assert_allclose(state.hyperparams["z"], 2.0)
    assert float(state.hyperparams["y"]) < -3.0    # unbounded: keeps going


def test_integer_and_frozen_leaves_never_change(x64):
    hp = {"x": jnp.array([0.5, 0.5]), "n": jnp.array(3, jnp.int32),
          "frozen": jnp.array(0.25)}
    c = {"x": jnp.array([1.0, -2.0]), "n": jnp.array(7.0),
         "frozen": jnp.array(3.0)}
    opt = _linear(optax.adam(0.1), top_k=2,
                  trainable={"x": jnp.array([True, False]), "n": True,
                             "frozen": False})
    state = opt.init(jnp.zeros(1), hp)
    h = opt.compute_hypergradient(state, None, c)
    # frozen entries still report their hypergradient; integers report 0
    np.testing.assert_allclose(h["x"], [1.0, -2.0])
    np.testing.assert_allclose(h["frozen"], 3.0)
    assert h["n"].dtype == jnp.int32 and int(h["n"]) == 0
    for _ in range(5):
        state = opt.step(state, None, c)
        # top-2 would pick "frozen" and x[1]; only x[0] is eligible
        assert int(state.metadata["selected"]) == 1
    assert state.hyperparams["n"].dtype == jnp.int32
    assert int(state.hyperparams["n"]) == 3
    assert float(state.hyperparams["frozen"]) == 0.25
    assert float(state.hyperparams["x"][1]) == 0.5
    assert float(state.hyperparams["x"][0]) < 0.1


def test_no_retrace_over_ten_steps(key):
    traces = []

    def train_loss(params, hp, batch):
        traces.append(1)
        return small_train_loss(params, hp, batch)
    params, _, train, val = _small_setup(key, 3)
    opt = Greedy(train_loss, small_val_loss, optax.adam(1e-2),
                 optax.adam(1e-2), horizon=3, top_k=2, bounds=(-5.0, 5.0))
    # a Python float: weakly typed, must not retrace after an update
    state = opt.init(params, {"log_l2": jnp.array([-3.0, -2.0, -1.0]),
                              "c": 0.3})
    train, val = _stack(train), _stack(val)
    state = opt.step(state, train, val)
    after_first = len(traces)
    assert after_first > 0
    for _ in range(10):
        state = opt.step(state, train, val)
    assert len(traces) == after_first
    assert int(state.step) == 11


def test_vmap_population_equals_loop(key):
    params, _, train, val = _small_setup(key, 2)
    opt = Greedy(small_train_loss, small_val_loss,
                 optax.sgd(0.1, momentum=0.9), optax.adam(0.05), horizon=2,
                 top_k=2, bounds=(-4.0, 0.0))
    train, val = _stack(train), _stack(val)
    states = [opt.init(params, {"log_l2": jnp.array([s, -2.0, -1.0]),
                                "c": jnp.array(-0.3)})
              for s in [-3.5, -2.0, -0.5]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    step = jax.vmap(opt.step, in_axes=(0, None, None))
    for _ in range(3):
        stacked = step(stacked, train, val)
        states = [opt.step(s, train, val) for s in states]
    for i, s in enumerate(states):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], stacked), s, rtol=1e-5, atol=1e-6)


def _ridge_horizon(train_loss=pb.ridge_train_loss, horizon=3):
    opt = Greedy(train_loss, pb.ridge_val_loss, optax.sgd(0.01),
                 optax.adam(0.1), horizon=horizon, gamma=0.9)
    train, val = pb.ridge_batches()
    stack = lambda b: jax.tree.map(   # noqa: E731
        lambda x: jnp.stack([x] * horizon), b)
    return opt, opt.init(jnp.array([0.2, -0.1]), jnp.array(1.0)), \
        stack(train), stack(val)


def test_nonfinite_validation_batch_skips_outer_update():
    opt, state, train, val = _ridge_horizon()
    bad_val = (val[0], val[1].at[1, 0].set(jnp.nan))
    new = jax.jit(opt.step)(state, train, bad_val)
    clean = opt.step(state, train, val)
    assert int(new.metadata["nonfinite_count"]) == 1
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    chex.assert_trees_all_equal(new.outer_opt_state, state.outer_opt_state)
    chex.assert_trees_all_close(new.params, clean.params)   # inner went on
    assert int(new.step) == 1


def test_nonfinite_inner_gradient_skips_that_inner_step(x64):
    opt, state, train, val = _ridge_horizon()
    bad_train = (train[0], train[1].at[1, 0].set(jnp.nan))
    new = jax.jit(opt.step)(state, bad_train, val)
    assert int(new.metadata["nonfinite_count"]) == 1
    # params: the two finite inner steps only; the hyperparameter moved
    short, s2, train2, _ = _ridge_horizon(horizon=2)
    ref = short.step(s2, train2, jax.tree.map(lambda x: x[:2], val))
    np.testing.assert_allclose(new.params, ref.params, rtol=1e-13)
    assert np.isfinite(float(new.hyperparams))
    assert float(new.hyperparams) != 1.0


def test_invalid_options_name_the_argument():
    args = (pb.ridge_train_loss, pb.ridge_val_loss, optax.sgd(0.1),
            optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\]"):
        Greedy(*args, gamma=1.5)
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        Greedy(*args, horizon=0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        Greedy(*args, top_k=1.5)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        Greedy(*args, top_k=0)
    with pytest.raises(ValueError, match="score must be one of 'magnitude', "
                       "'predicted_improvement'; got 'abs'"):
        Greedy(*args, score="abs")
    with pytest.raises(ValueError, match="bounds must be None or a pair"):
        Greedy(*args, bounds=0.0)
    with pytest.raises(ValueError, match="lower <= upper"):
        Greedy(*args, bounds=(1.0, 0.0)).init(jnp.zeros(2), jnp.array(0.5))
    with pytest.raises(ValueError, match="trainable must be a scalar, None "
                       "or a pytree shaped like hyperparams"):
        Greedy(*args, trainable={"a": True}).init(jnp.zeros(2),
                                                  {"b": jnp.array(0.5)})
    with pytest.raises(TypeError, match="trainable must hold booleans"):
        Greedy(*args, trainable=1.0).init(jnp.zeros(2), jnp.array(0.5))
    opt, state, train, val = _ridge_horizon(horizon=3)
    with pytest.raises(ValueError, match="train_batch must have a leading "
                       "axis of length 3 on every leaf"):
        opt.step(state, jax.tree.map(lambda x: x[:2], train), val)
