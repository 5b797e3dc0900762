"""Second round of reliability: the step guards the results of its updates
(not only the gradients), diverging training says so once, and bad inputs
to the remaining public entry points are clear errors."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optuna
import pytest

import gradhpo as gh
from gradhpo.integrations.optuna import OptunaWarmStart, warm_start_trial
from gradhpo.integrations.pasha import PASHAPruner

import problems as pb

TL, VL = pb.ridge_train_loss, pb.ridge_val_loss
W0 = jnp.array([0.2, -0.1])
LAM = jnp.array(0.5)
TRAIN, VAL = pb.ridge_batches()


def _hp_loss(w, hp, batch):
    return TL(w, hp["l2"], batch)


# -- guards on the results ----------------------------------------------------

def test_an_overflowing_inner_update_is_skipped_and_counted():
    """With optax.sgd(1e10) and large data the gradient is finite but the
    update overflows float32: the weights used to become inf for good."""
    opt = gh.T1T2(TL, VL, optax.sgd(1e10), optax.adam(0.1))
    state = opt.init(W0, LAM)
    x, y = TRAIN
    huge = (x * 1e18, y * 1e18)
    grads = jax.grad(TL)(W0, LAM, huge)
    assert np.all(np.isfinite(grads))                 # finite gradient ...
    assert not np.all(np.isfinite(W0 - 1e10 * grads))  # ... that overflows
    new = opt.step(state, huge, VAL)
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.inner_opt_state, state.inner_opt_state)
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    assert int(new.metadata["nonfinite_count"]) == 2   # inner and outer


@pytest.mark.parametrize("make", [
    lambda: gh.T1T2(TL, VL, optax.sgd(0.01), optax.adam(float("nan"))),
    lambda: gh.T1T2(TL, VL, optax.sgd(0.01), optax.sgd(1e38)),
    lambda: gh.Greedy(TL, VL, optax.sgd(0.01), optax.adam(float("nan"))),
    lambda: gh.HyperDistill(TL, VL, optax.sgd(0.01),
                            optax.adam(float("nan"))),
], ids=["adam-nan", "sgd-overflow", "greedy-adam-nan", "distill-adam-nan"])
def test_a_non_finite_outer_result_is_skipped_and_counted(make):
    opt = make()
    kwargs = {"batch": TRAIN} if isinstance(opt, gh.HyperDistill) else {}
    state = opt.init(W0, LAM, **kwargs)
    # (a huge validation loss makes sgd(1e38)'s step overflow)
    val = (VAL[0], VAL[1] * 1e10)
    new = opt.step(state, TRAIN, val)
    assert np.all(np.isfinite(new.hyperparams))
    # entries whose update is non-finite keep their value (element by
    # element, so the guard costs no extra pass), and the event is counted
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    assert int(new.metadata["nonfinite_count"]) == 1
    # the inner step itself was fine and is kept
    assert not np.allclose(new.params, state.params)


def test_warm_start_outer_result_is_guarded():
    opt = gh.OneShotWarmStart(TL, VL, optax.sgd(0.01),
                              optax.adam(float("nan")))
    state = opt.init(W0, LAM)
    new = opt.step(state, TRAIN, VAL)
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    assert int(new.metadata["nonfinite_count"]) == 1
    np.testing.assert_array_equal(new.algorithm_state.delta, 0.0)


def test_a_nan_loss_with_a_finite_gradient_is_not_applied():
    def nan_value(w, lam, batch):
        # the value is NaN, the gradient (of the first term) is finite
        return TL(w, lam, batch) + jax.lax.stop_gradient(jnp.nan)
    opt = gh.T1T2(nan_value, VL, optax.sgd(0.1), optax.adam(0.1))
    state = opt.init(W0, LAM)
    assert np.all(np.isfinite(jax.grad(nan_value)(W0, LAM, TRAIN)))
    new = opt.step(state, TRAIN, VAL)
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.hyperparams, state.hyperparams)
    assert int(new.metadata["nonfinite_count"]) == 2


def test_diverging_training_warns_once_with_the_count():
    opt = gh.T1T2(TL, VL, optax.sgd(0.01), optax.adam(0.1))
    state = opt.init(W0, LAM)
    bad = (TRAIN[0].at[0, 0].set(jnp.nan), TRAIN[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3 * 64):
            state = opt.step(state, bad, VAL)
        jax.block_until_ready(state)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    count = int(messages[0].split(":")[1].split()[0])
    assert 0 < count <= int(state.metadata["nonfinite_count"])
    assert "training may be diverging" in messages[0]
    # a new optimizer with the same configuration shares the (once) flag
    # only while the first is alive; a clean run never warns
    clean = gh.T1T2(TL, VL, optax.sgd(0.01), optax.adam(0.2))
    s = clean.init(W0, LAM)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(130):
            s = clean.step(s, TRAIN, VAL)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


# -- losses that fail inside --------------------------------------------------

def test_unused_hyperparameter_is_reported():
    opt = gh.T1T2(_hp_loss, VL, optax.sgd(0.1), optax.adam(0.1))
    state = opt.init(W0, {"l2": LAM, "l2_typo": LAM, "n": 3})
    with pytest.warns(UserWarning, match=r"T1T2: hyperparams\['l2_typo'\] "
                      r"is read by neither train_loss, val_loss nor "
                      r"inner_optimizer"):
        opt.step(state, TRAIN, VAL)
    # read by the inner optimizer only: not reported
    by_optimizer = gh.T1T2(_hp_loss, VL,
                           lambda hp: optax.sgd(hp["lr"]), optax.adam(0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_optimizer.step(by_optimizer.init(W0, {"l2": LAM, "lr": 0.1}),
                          TRAIN, VAL)


# -- the bad-input table ------------------------------------------------------

def _trial(params=None):
    dist = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    return optuna.trial.create_trial(
        params=params or {"l2": 0.1}, value=0.0,
        distributions={"l2": dist})


def _warm(**kw):
    return gh.OneShotWarmStart(lambda w, hp, b: TL(w, jnp.exp(hp["l2"]), b),
                               VL, optax.sgd(0.1), **kw)


def _step(opt, hp=LAM, train=TRAIN, val=VAL):
    return opt.step(opt.init(W0, hp), train, val)


MESH = gh.make_mesh()
BAD_INPUTS = [
    # -- losses, at the first call ---------------------------------------------
    ("loss-missing-hyperparameter",
     lambda: _step(gh.T1T2(_hp_loss, VL, optax.sgd(0.1), optax.sgd(0.1)),
                   hp={"l3": LAM}), ValueError,
     r"train_loss\(params, hyperparams, batch\) raised KeyError: 'l2' .*"
     r"The state holds hyperparams\['l3'\]: add the missing hyperparameter"),
    ("loss-swapped-arguments",
     lambda: gh.T1T2(TL, VL, optax.sgd(0.1), optax.sgd(0.1)).step(
         gh.T1T2(TL, VL, optax.sgd(0.1), optax.sgd(0.1)).init(
             {"w": W0}, LAM), TRAIN, VAL), TypeError,
     r"train_loss\(params, hyperparams, batch\) failed on the state's "
     r"arrays with TypeError: .*check the argument order"),
    ("loss-returns-tuple",
     lambda: _step(gh.T1T2(lambda w, h, b: (TL(w, h, b), 0.0), VL,
                           optax.sgd(0.1), optax.sgd(0.1))), ValueError,
     r"train_loss must return one floating scalar, got a tuple of 2 values "
     r"\(e.g. \(loss, aux\)\)"),
    ("val-loss-returns-dict",
     lambda: _step(gh.Greedy(TL, lambda w, h, b: {"loss": VL(w, h, b)},
                             optax.sgd(0.1), optax.sgd(0.1))), ValueError,
     r"val_loss must return one floating scalar, got a dict of 1 values"),
    ("warm-val-batch-with-lookahead-axis",
     lambda: _warm(lookahead=2).step(
         _warm(lookahead=2).init(W0, {"l2": jnp.array(-2.0)}),
         jax.tree.map(lambda x: jnp.stack([x, x]), TRAIN),
         jax.tree.map(lambda x: jnp.stack([x, x]), VAL)), ValueError,
     r"val_batch must be one validation batch V without the lookahead "
     r"axis \(only train_batch carries it, length 2\)"),
    ("inner-callable-returns-non-transformation",
     lambda: gh.T1T2(TL, VL, lambda hp: 0.1, optax.sgd(0.1)).init(W0, LAM),
     TypeError, r"inner_optimizer\(hyperparams\) must return an "
     r"optax.GradientTransformation, got float"),
    # -- populations and devices ----------------------------------------------
    ("population-none-optimizer",
     lambda: gh.init_population(None, W0, [LAM]), TypeError,
     r"optimizer must be a gradhpo.BilevelOptimizer .*got NoneType"),
    ("population-dict-hyperparams",
     lambda: gh.init_population(gh.T1T2(TL, VL, optax.sgd(0.1),
                                        optax.sgd(0.1)), W0, {"l2": LAM}),
     TypeError, r"hyperparams must be a list or tuple of hyperparameter "
     r"pytrees \(one per member\), got dict"),
    ("population-empty",
     lambda: gh.init_population(gh.T1T2(TL, VL, optax.sgd(0.1),
                                        optax.sgd(0.1)), W0, []),
     ValueError, r"hyperparams must hold at least one setting"),
    ("population-keys-wrong-count",
     lambda: gh.init_population(
         gh.T1T2(TL, VL, optax.sgd(0.1), optax.sgd(0.1)), W0, [LAM, LAM],
         key=jax.random.split(jax.random.PRNGKey(0), 3)), ValueError,
     r"key must be one PRNG key or a stack of 2 keys"),
    ("mesh-empty", lambda: gh.make_mesh([]), ValueError,
     r"devices must be a non-empty list of jax.Device"),
    ("mesh-string", lambda: gh.make_mesh("cpu"), TypeError,
     r"devices must be None \(all devices\) or a non-empty list of "
     r"jax.Device .*got 'cpu'"),
    ("mesh-not-devices", lambda: gh.make_mesh([0, 1]), ValueError,
     r"devices must be a non-empty list of jax.Device .*got \[0, 1\]"),
    ("mesh-axis-name", lambda: gh.make_mesh(axis_name=""), TypeError,
     r"axis_name must be a non-empty str"),
    ("replicate-no-mesh", lambda: gh.replicate(W0, None), TypeError,
     r"mesh must be a jax.sharding.Mesh \(from gradhpo.make_mesh\(\)\), "
     r"got NoneType"),
    ("shard-axis-name", lambda: gh.shard_batch(TRAIN, MESH, axis_name="x"),
     ValueError, r"axis_name must be an axis of the mesh, one of "
     r"\['batch'\]; got 'x'"),
    ("shard-negative-axis", lambda: gh.shard_batch(TRAIN, MESH, axis=-5),
     ValueError, r"axis must be an int >= 0 \(the example axis of every "
     r"leaf\), got -5"),
    ("shard-axis-out-of-range", lambda: gh.shard_batch(TRAIN, MESH, axis=3),
     ValueError, r"batch leaves must have an axis 3 divisible by"),
    ("shard-no-mesh", lambda: gh.shard_batch(TRAIN, "mesh"), TypeError,
     r"mesh must be a jax.sharding.Mesh"),
    # -- Optuna ---------------------------------------------------------------
    ("trial-none", lambda: warm_start_trial(None, _warm(), W0, TRAIN, VAL),
     TypeError, r"trial must be an optuna Trial or FrozenTrial .*got "
     r"NoneType"),
    ("trial-warm-start-none",
     lambda: warm_start_trial(_trial(), None, W0, TRAIN, VAL), TypeError,
     r"warm_start must be a gradhpo.OneShotWarmStart, got NoneType"),
    ("trial-warm-start-with-bounds",
     lambda: OptunaWarmStart(_warm(bounds=(0.0, 1.0))), ValueError,
     r"warm_start must be built with bounds=None"),
    ("trial-key-int", lambda: OptunaWarmStart(_warm(), key=0), TypeError,
     r"key must be a single PRNG key"),
    ("trial-names-str", lambda: OptunaWarmStart(_warm(), names="l2"),
     TypeError, r"names must be a sequence of parameter names"),
    ("pasha-max-below-min",
     lambda: PASHAPruner(min_resource=5, max_resource=3), ValueError,
     r"max_resource must be an int >= 5, got 3"),
    ("pasha-min-zero", lambda: PASHAPruner(min_resource=0), ValueError,
     r"min_resource must be an int >= 1, got 0"),
    ("pasha-eta-one",
     lambda: PASHAPruner(min_resource=1, reduction_factor=1), ValueError,
     r"reduction_factor must be an int >= 2, got 1"),
    # -- checkpoints ----------------------------------------------------------
    ("save-string-leaf",
     lambda: gh.save_state("/tmp/gradhpo-bad.npz", {"note": "x"}),
     TypeError, r"state\['note'\] is str with dtype <U1; checkpoints hold "
     r"numeric arrays only"),
    ("load-missing-file",
     lambda: gh.load_state("/nonexistent/run.npz", like={"a": W0}),
     FileNotFoundError, r"/nonexistent/run.npz"),
]


def test_table_is_large_and_ids_are_unique():
    ids = [row[0] for row in BAD_INPUTS]
    assert len(set(ids)) == len(ids) >= 25


@pytest.mark.parametrize("thunk,error,message",
                         [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_a_clear_error(thunk, error, message):
    with pytest.raises(error, match=message) as info:
        thunk()
    assert type(info.value) is error


def test_estimate_theta_names_its_own_argument():
    opt = gh.HyperDistill(TL, VL, optax.sgd(0.1), optax.sgd(0.1))
    state = opt.init(W0, LAM, batch=TRAIN)
    with pytest.raises(ValueError, match=r"train_batches must stack T "
                       r"training batches on a leading axis.*\(3, 2\), "
                       r"\(3,\)"):
        opt.estimate_theta(state, TRAIN, VAL)     # the T axis forgotten
