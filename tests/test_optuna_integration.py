"""The Optuna warm-start helper against hand computations (ALGORITHMS.md §6
T12-like closed forms), its records, and the schedulers' independence."""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

optuna = pytest.importorskip("optuna")

from optuna.distributions import (  # noqa: E402
    CategoricalDistribution, FloatDistribution, IntDistribution)

from gradhpo.algorithms.warm_start import OneShotWarmStart  # noqa: E402
from gradhpo.integrations.optuna import (  # noqa: E402
    OptunaWarmStart, warm_start_trial)
from gradhpo.integrations.pasha import PASHADecision, PASHAPruner  # noqa

optuna.logging.set_verbosity(optuna.logging.WARNING)

POINT = (jnp.array(1.0), jnp.array(0.0))          # (x, y) = (1, 0)


def sq_train(w, hp, batch):
    """1/2 (w x - y)^2 + 1/2 wd w^2 (coupled decay; hp["wd"] is log wd)."""
    x, y = batch
    return 0.5 * (w * x - y) ** 2 + 0.5 * jnp.exp(hp["wd"]) * w ** 2


def sq_val(w, hp, batch):
    x, y = batch
    return 0.5 * (w * x - y) ** 2


def lr_wd(**kwargs):
    return OneShotWarmStart(sq_train, sq_val,
                            lambda hp: optax.sgd(jnp.exp(hp["lr"])), **kwargs)


def frozen(params, distributions):
    return optuna.trial.create_trial(params=params, value=0.0,
                                     distributions=distributions)


LOG = FloatDistribution(1e-4, 1.0, log=True)


# -- records and log-space stepping ------------------------------------------

def test_log_space_step_matches_t12(x64):
    """T12: lr = wd = 0.1, w_0 = 1, w_1 = 0.89; dJ/dlog lr = -0.0979,
    dJ/dlog wd = -0.0089. Stepping in log space multiplies each value by
    exp(-eta_h g)."""
    eta = 0.05
    trial = frozen({"lr": 0.1, "wd": 0.1}, {"lr": LOG, "wd": LOG})
    values = warm_start_trial(trial, lr_wd(step_size=eta), jnp.array(1.0),
                              POINT, POINT)
    attrs = trial.user_attrs
    assert trial.params == {"lr": 0.1, "wd": 0.1}          # sampled kept
    assert attrs["ohgw_status"] == "applied"
    np.testing.assert_allclose(attrs["ohgw_hypergradient"]["lr"], -0.0979,
                               rtol=1e-10)
    np.testing.assert_allclose(attrs["ohgw_hypergradient"]["wd"], -0.0089,
                               rtol=1e-10)
    np.testing.assert_allclose(attrs["ohgw_step"]["lr"], eta * 0.0979,
                               rtol=1e-10)
    np.testing.assert_allclose(values["lr"], 0.1 * math.exp(eta * 0.0979),
                               rtol=1e-12)
    np.testing.assert_allclose(values["wd"], 0.1 * math.exp(eta * 0.0089),
                               rtol=1e-12)
    assert attrs["ohgw_values"] == values
    assert attrs["ohgw_sampled"] == {"lr": 0.1, "wd": 0.1}
    assert attrs["ohgw_space"] == {"lr": "log", "wd": "log"}
    np.testing.assert_allclose(attrs["ohgw_val_loss"], 0.5 * 0.89 ** 2,
                               rtol=1e-12)
    assert attrs["ohgw_nonfinite_count"] == 0
    assert attrs["ohgw_config"] == {"step_size": eta, "num_steps": 1,
                                    "lookahead": 1,
                                    "direction": "hypergradient"}
    json.dumps(attrs)                                      # storable


def test_log_and_linear_with_lookahead_two(x64):
    """K = 2, heavy ball (optax trace, zero buffer), loss 1/2 w^2, lr = 0.1
    (log), mu = 0.9 (linear): w_1 = 1 - lr, w_2 = (1 - lr)^2 - lr mu = 0.72,
    dJ/dmu = w_2 (-lr) = -0.072, dJ/dlog lr = w_2 (-2 (1 - lr) - mu) lr =
    -0.1944."""
    ws = OneShotWarmStart(
        sq_val, sq_val,
        lambda hp: optax.sgd(jnp.exp(hp["lr"]), momentum=hp["mu"]),
        step_size=0.1, lookahead=2)
    trial = frozen({"lr": 0.1, "mu": 0.9},
                   {"lr": LOG, "mu": FloatDistribution(0.0, 0.99)})
    batches = (jnp.ones(2), jnp.zeros(2))
    values = OptunaWarmStart(ws).apply(trial, jnp.array(1.0), batches, POINT)
    g = trial.user_attrs["ohgw_hypergradient"]
    np.testing.assert_allclose(g["mu"], -0.072, rtol=1e-10)
    np.testing.assert_allclose(g["lr"], -0.1944, rtol=1e-10)
    np.testing.assert_allclose(values["mu"], 0.9 + 0.1 * 0.072, rtol=1e-12)
    np.testing.assert_allclose(values["lr"], 0.1 * math.exp(0.01944),
                               rtol=1e-12)
    assert trial.user_attrs["ohgw_space"] == {"lr": "log", "mu": "linear"}


def test_projection_into_bounds_is_clipped():
    """A step out of the box ends exactly on the bound, status clipped."""
    box = FloatDistribution(0.01, 0.1005, log=True)
    trial = frozen({"lr": 0.1, "wd": 0.1}, {"lr": box, "wd": LOG})
    values = warm_start_trial(trial, lr_wd(step_size=1.0), jnp.array(1.0),
                              POINT, POINT)
    assert trial.user_attrs["ohgw_status"] == "clipped"
    assert values["lr"] == 0.1005                         # exactly the bound
    np.testing.assert_allclose(trial.user_attrs["ohgw_step"]["lr"],
                               math.log(0.1005 / 0.1), atol=1e-6)  # f32
    assert values["wd"] > 0.1                              # not clipped
    # num_steps = 3: projected after every hyper-step, still in the box
    trial = frozen({"lr": 0.1, "wd": 0.1}, {"lr": box, "wd": LOG})
    values = warm_start_trial(trial, lr_wd(step_size=1.0, num_steps=3),
                              jnp.array(1.0), POINT, POINT)
    assert values["lr"] == 0.1005
    assert trial.user_attrs["ohgw_status"] == "clipped"


def test_nonfinite_loss_is_skipped():
    def nan_val(w, hp, batch):
        return sq_val(w, hp, batch) * jnp.nan
    ws = OneShotWarmStart(sq_train, nan_val,
                          lambda hp: optax.sgd(jnp.exp(hp["lr"])))
    trial = frozen({"lr": 0.1, "wd": 0.1}, {"lr": LOG, "wd": LOG})
    values = warm_start_trial(trial, ws, jnp.array(1.0), POINT, POINT)
    attrs = trial.user_attrs
    assert attrs["ohgw_status"] == "skipped_nonfinite"
    assert values == {"lr": 0.1, "wd": 0.1}               # bit-for-bit
    assert attrs["ohgw_hypergradient"] == {"lr": None, "wd": None}
    assert attrs["ohgw_step"] == {"lr": 0.0, "wd": 0.0}
    assert attrs["ohgw_val_loss"] is None
    assert attrs["ohgw_nonfinite_count"] == 1
    json.dumps(attrs, allow_nan=False)


def test_discrete_parameters_pass_through(x64):
    dists = {"lr": LOG, "wd": LOG, "layers": IntDistribution(1, 4),
             "act": CategoricalDistribution(["relu", "tanh"]),
             "drop": FloatDistribution(0.0, 0.5, step=0.1)}
    params = {"lr": 0.1, "wd": 0.1, "layers": 3, "act": "tanh", "drop": 0.2}
    trial = frozen(params, dists)
    helper = OptunaWarmStart(lr_wd(step_size=0.05))
    assert sorted(helper.to_hyperparams(trial)) == ["lr", "wd"]
    values = helper.apply(trial, jnp.array(1.0), POINT, POINT)
    assert {k: values[k] for k in ("layers", "act", "drop")} == \
        {"layers": 3, "act": "tanh", "drop": 0.2}
    np.testing.assert_allclose(values["lr"], 0.1 * math.exp(0.05 * 0.0979),
                               rtol=1e-12)
    assert sorted(trial.user_attrs["ohgw_hypergradient"]) == ["lr", "wd"]
    # only discrete names: nothing to step
    trial = frozen(params, dists)
    values = helper.apply(trial, jnp.array(1.0), POINT, POINT,
                          names=["layers", "act"])
    assert values == {"layers": 3, "act": "tanh"}
    assert trial.user_attrs["ohgw_status"] == "skipped_discrete"


def test_second_call_reuses_the_record():
    trial = frozen({"lr": 0.1, "wd": 0.1}, {"lr": LOG, "wd": LOG})
    helper = OptunaWarmStart(lr_wd(step_size=0.05))
    first = helper.apply(trial, jnp.array(1.0), POINT, POINT)
    # a record is read, not recomputed: a changed record comes back as is
    trial.set_user_attr("ohgw_values", {"lr": 0.123, "wd": 0.1})
    assert helper.apply(trial, jnp.array(1.0), POINT, POINT) == \
        {"lr": 0.123, "wd": 0.1}
    # a record for other sampled values is not reused
    trial.set_user_attr("ohgw_sampled", {"lr": 0.2, "wd": 0.1})
    again = helper.apply(trial, jnp.array(1.0), POINT, POINT)
    np.testing.assert_allclose(again["lr"], first["lr"], rtol=1e-6)


def test_retried_trial_trains_the_recorded_values():
    """RetryHeartbeatStaleTrialCallback (formerly RetryFailedTrialCallback)
    re-queues a failed trial with its user attributes; the retry reuses the
    recorded values."""
    helper = OptunaWarmStart(lr_wd(step_size=0.05), names=["lr", "wd"])
    seen = []

    def objective(trial):
        trial.suggest_float("lr", 1e-4, 1.0, log=True)
        trial.suggest_float("wd", 1e-4, 1.0, log=True)
        values = helper.apply(trial, jnp.array(1.0), POINT, POINT)
        seen.append((values, trial.user_attrs["ohgw_seconds"]))
        if len(seen) == 1:
            raise RuntimeError("worker lost")
        return values["lr"]

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    study.optimize(objective, n_trials=1, catch=(RuntimeError,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    retry(study, study.trials[0])
    study.optimize(objective, n_trials=1)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params
    assert seen[1] == seen[0]                  # same values, same timing
    assert study.trials[1].value == seen[0][0]["lr"]


def test_rejects_bounded_warm_start_and_unknown_names():
    with pytest.raises(ValueError, match="bounds=None"):
        OptunaWarmStart(lr_wd(bounds=(-1.0, 1.0)))
    with pytest.raises(TypeError, match="OneShotWarmStart"):
        OptunaWarmStart(object())
    trial = frozen({"lr": 0.1}, {"lr": LOG})
    with pytest.raises(ValueError, match="suggest"):
        warm_start_trial(trial, lr_wd(), jnp.array(1.0), POINT, POINT,
                         names=["lr", "wd"])


def test_random_direction_differs_per_trial_with_the_same_length():
    ws = lr_wd(step_size=0.05, direction="random")
    steps = []
    for number in range(2):
        trial = optuna.trial.create_trial(
            params={"lr": 0.1, "wd": 0.1}, value=0.0,
            distributions={"lr": LOG, "wd": LOG})
        trial.number = number
        warm_start_trial(trial, ws, jnp.array(1.0), POINT, POINT,
                         key=jax.random.PRNGKey(3))
        steps.append(np.array(list(trial.user_attrs["ohgw_step"].values())))
    length = 0.05 * math.hypot(0.0979, 0.0089)
    for s in steps:
        np.testing.assert_allclose(np.linalg.norm(s), length, rtol=1e-4)
    assert not np.allclose(steps[0], steps[1])


# -- the scheduler is unmodified ---------------------------------------------

def curve(x, step):
    """A reported value depending only on the *sampled* x."""
    return (x - 0.3) ** 2 + 1.0 / (step + 1) + 0.01 * math.sin(7 * x * step)


def run_study(pruner, warm, n_trials=20, steps=27):
    helper = OptunaWarmStart(lr_wd(step_size=0.05))

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_float("lr", 1e-3, 1.0, log=True)
        trial.suggest_float("wd", 1e-3, 1.0, log=True)
        if warm:
            values = helper.apply(trial, jnp.array(1.0), POINT, POINT,
                                  names=["lr", "wd"])
            assert values["lr"] != trial.params["lr"]     # really nudged
        for step in range(steps):
            value = curve(x, step)
            trial.report(value, step)
            if trial.should_prune():
                if (isinstance(pruner, PASHAPruner) and
                        pruner.last_decision(trial.number)
                        is PASHADecision.STOP_AT_MAX):
                    return value
                raise optuna.TrialPruned()
        return value

    study = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=1), pruner=pruner)
    study.optimize(objective, n_trials=n_trials)
    return [(t.state.name, t.last_step, t.value) for t in study.trials]


@pytest.mark.parametrize("make_pruner", [
    lambda: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=3),
    lambda: PASHAPruner(min_resource=1, reduction_factor=3, max_resource=27),
], ids=["asha", "pasha"])
def test_pruning_decisions_do_not_change(make_pruner):
    without = run_study(make_pruner(), warm=False)
    with_ws = run_study(make_pruner(), warm=True)
    assert with_ws == without
    assert any(state == "PRUNED" for state, _, _ in without)
    assert len({step for _, step, _ in without}) > 1
