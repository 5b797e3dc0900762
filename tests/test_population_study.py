"""gh.run_population_study: a PopulationSearch with one Optuna trial per
member (starts from the sampler, reports, prunes, PBT lineage, cost)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

optuna = pytest.importorskip("optuna")

import gradhpo as gh  # noqa: E402
from gradhpo.integrations.population_study import (  # noqa: E402
    hyperparams_record)

TrialState = optuna.trial.TrialState
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: the problem of test_population.py (its val_loss, batches and T1T2 cost
#: per step); train_loss here also counts its traces
from test_population import (  # noqa: E402
    DIM, PER_STEP, batches, val_loss)

TRACES = []


def train_loss(w, hp, batch):
    TRACES.append(1)
    fit = 0.5 * jnp.mean(jnp.sum((w - batch) ** 2, axis=-1))
    return fit + 0.5 * jnp.sum(jnp.exp(hp["log_l2"]) * w ** 2)


VB = batches(0)[1]
W0 = jnp.zeros(DIM)


def make_opt(outer=None):
    return gh.T1T2(train_loss, val_loss, optax.sgd(0.3, momentum=0.5),
                   outer if outer is not None else optax.adam(0.1))


def suggest(trial):
    return {"log_l2": jnp.array(trial.suggest_float("log_l2", -3.0, 2.0))}


@pytest.fixture(scope="module")
def halving():
    return gh.PopulationSearch(make_opt(), size=9, rung_steps=(2, 5))


def by_member(trials):
    """{member: [its trials in order]}."""
    out = {}
    for t in trials:
        out.setdefault(t.user_attrs["gradhpo:member"], []).append(t)
    return out


def test_halving_trials_match_an_independent_run(halving):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    out = gh.run_population_study(halving, study, W0, suggest, batches, 8,
                                  score_batch=VB)
    trials = study.trials
    assert [t.number for t in out.trials] == list(range(9))
    assert [t.user_attrs["gradhpo:member"] for t in trials] == list(range(9))
    stops = [(t.state, t.user_attrs["gradhpo:stop"]) for t in trials]
    assert stops.count((TrialState.PRUNED, 2)) == 6
    assert stops.count((TrialState.PRUNED, 5)) == 2
    assert stops.count((TrialState.COMPLETE, 8)) == 1
    assert {t.user_attrs["gradhpo:status"] for t in trials
            if t.state == TrialState.PRUNED} == {"dropped"}

    # the same search from the starts the trials hold, run alone
    traces = len(TRACES)
    starts = [{"log_l2": jnp.array(t.params["log_l2"])} for t in trials]
    ref = halving.run(W0, starts, batches, 8, score_batch=VB)
    assert len(TRACES) == traces        # nothing new compiled
    assert len(ref.history) == 2
    for rung in ref.history:
        for member, score in zip(rung.ids.tolist(), rung.scores.tolist()):
            assert trials[member].intermediate_values[rung.step] == \
                pytest.approx(score, rel=1e-6)
    for t in trials:   # no other reports: the rungs the member reached
        reached = [r.step for r in ref.history
                   if t.user_attrs["gradhpo:member"] in r.ids.tolist()]
        assert sorted(t.intermediate_values) == reached
    # a dropped trial's value is its last report (Optuna's rule)
    for t in trials:
        if t.state == TrialState.PRUNED:
            assert t.value == t.intermediate_values[t.last_step]

    best = out.best_trial
    assert best.user_attrs["gradhpo:member"] == ref.best_id \
        == out.result.best_id
    assert study.best_trial.number == best.number
    assert best.state == TrialState.COMPLETE
    want = float(val_loss(ref.best.params, None, VB))
    assert best.value == pytest.approx(want, rel=1e-6)
    assert best.user_attrs["gradhpo:hyperparams"]["log_l2"] == \
        pytest.approx(float(ref.best.hyperparams["log_l2"]), rel=1e-6)
    assert best.user_attrs["gradhpo:start_hyperparams"]["log_l2"] == \
        pytest.approx(best.params["log_l2"], rel=1e-6)
    assert [r.survivors.tolist() for r in out.result.history] == \
        [r.survivors.tolist() for r in ref.history]

    # cost: each trial spent its member's steps; they add up
    spent = [t.user_attrs["gradhpo:grad_evals"] for t in trials]
    for t, g in zip(trials, spent):
        assert g == pytest.approx(t.user_attrs["gradhpo:stop"] * PER_STEP)
    assert sum(spent) == pytest.approx(out.result.grad_evals)
    assert out.result.grad_evals == pytest.approx(
        (9 * 2 + 3 * 3 + 1 * 3) * PER_STEP)
    assert ref.grad_evals == pytest.approx(out.result.grad_evals)


def test_the_sampler_and_the_queue_choose_the_starts():
    # outer learning rate 0: the members keep their starts, so the scored
    # hyperparameters of the first rung are what the members were given
    search = gh.PopulationSearch(make_opt(optax.sgd(0.0)), size=3,
                                 rung_steps=1)

    def log_suggest(trial):
        return {"log_l2": jnp.log(trial.suggest_float("l2", 1e-3, 1.0,
                                                      log=True))}

    study = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=7))
    out = gh.run_population_study(search, study, W0, log_suggest, batches,
                                  2, score_batch=VB)
    values = [t.params["l2"] for t in study.trials]
    alone = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=7))
    assert values == [alone.ask().suggest_float("l2", 1e-3, 1.0, log=True)
                      for _ in range(3)]
    given = out.result.history[0].hyperparams["log_l2"]
    np.testing.assert_allclose(given, np.log(values), rtol=1e-6)
    for t in study.trials:
        assert t.user_attrs["gradhpo:start_hyperparams"]["log_l2"] == \
            pytest.approx(math.log(t.params["l2"]), rel=1e-6)

    queued = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=7))
    for v in (0.5, 0.01):
        queued.enqueue_trial({"l2": v})
    out = gh.run_population_study(search, queued, W0, log_suggest, batches,
                                  2, score_batch=VB)
    params = [t.params["l2"] for t in queued.trials]
    assert params[:2] == [0.5, 0.01] and params[2] == values[0]
    np.testing.assert_allclose(out.result.history[0].hyperparams["log_l2"],
                               np.log(params), rtol=1e-6)


def test_pbt_copies_are_new_trials_with_their_lineage():
    sigma = 0.2
    search = gh.PopulationSearch(make_opt(), size=4, rung_steps=2,
                                 mode="pbt", perturb_scale=sigma)

    def vector_suggest(trial):
        v = trial.suggest_float("log_l2", -2.0, 1.0)
        return {"log_l2": jnp.full((DIM,), v)}

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    out = gh.run_population_study(search, study, W0, vector_suggest,
                                  batches, 7, score_batch=VB,
                                  key=jax.random.PRNGKey(4))
    history = out.result.history
    rungs = [r for r in history if not r.final]
    assert [r.step for r in rungs] == [2, 4, 6]
    replaced = sum(int(np.sum(r.parents != r.survivors)) for r in rungs)
    assert replaced == 3
    trials = study.trials
    assert len(trials) == len(out.trials) == 4 + replaced

    # replay the lineage from the history
    current = {m: m for m in range(4)}      # member -> its trial number
    for r in rungs:
        position = {m: i for i, m in enumerate(r.ids.tolist())}
        for slot, parent in zip(r.survivors.tolist(), r.parents.tolist()):
            if slot == parent:
                continue
            old, copy = trials[current[slot]], None
            assert old.state == TrialState.PRUNED
            assert old.user_attrs["gradhpo:status"] == "replaced"
            assert old.user_attrs["gradhpo:stop"] == r.step
            np.testing.assert_allclose(
                old.user_attrs["gradhpo:hyperparams"]["log_l2"],
                r.hyperparams["log_l2"][position[slot]], rtol=1e-6)
            copy = trials[old.user_attrs["gradhpo:replaced_by"]]
            assert copy.number > old.number
            assert copy.user_attrs["gradhpo:member"] == slot
            assert copy.user_attrs["gradhpo:parent"] == current[parent]
            assert copy.user_attrs["gradhpo:start"] == r.step
            assert copy.params == trials[current[parent]].params
            start = np.asarray(
                copy.user_attrs["gradhpo:start_hyperparams"]["log_l2"])
            ratio = start / r.hyperparams["log_l2"][position[parent]]
            assert np.all(np.isclose(ratio, 1 - sigma, rtol=1e-5)
                          | np.isclose(ratio, 1 + sigma, rtol=1e-5)), ratio
            current[slot] = copy.number
    finals = history[-1]
    assert finals.final
    for m, number in current.items():
        t = trials[number]
        assert t.state == TrialState.COMPLETE
        i = finals.ids.tolist().index(m)
        assert t.value == pytest.approx(float(finals.scores[i]), rel=1e-6)
    assert sorted(current.values()) == sorted(
        t.number for t in trials if t.state == TrialState.COMPLETE)
    assert out.best_trial.number == current[out.result.best_id] \
        == study.best_trial.number
    for t in trials:
        start, stop = (t.user_attrs["gradhpo:start"],
                       t.user_attrs["gradhpo:stop"])
        assert sorted(t.intermediate_values) == [
            r.step for r in rungs if start < r.step <= stop]
        assert t.user_attrs["gradhpo:grad_evals"] == pytest.approx(
            (stop - start) * PER_STEP)
    assert sum(t.user_attrs["gradhpo:grad_evals"] for t in trials) == \
        pytest.approx(out.result.grad_evals) == pytest.approx(
            4 * 7 * PER_STEP)


def test_hyperparams_record_summarises_big_leaves():
    tree = {"a": np.float32(0.25), "b": [np.arange(3.0), np.arange(20.0)],
            "c": np.array([1.0, np.nan])}
    rec = hyperparams_record(tree, max_recorded_size=16)
    assert rec == {"a": 0.25, "b/0": [0.0, 1.0, 2.0],
                   "b/1": {"shape": [20], "mean": 9.5, "min": 0.0,
                           "max": 19.0},
                   "c": [1.0, None]}
    assert hyperparams_record(np.float32(2.0)) == {"value": 2.0}


def test_errors_name_the_argument(halving):
    study = optuna.create_study()
    args = (W0, suggest, batches, 3)
    with pytest.raises(TypeError, match="search"):
        gh.run_population_study(make_opt(), study, *args, score_batch=VB)
    with pytest.raises(TypeError, match="study"):
        gh.run_population_study(halving, "study", *args, score_batch=VB)
    with pytest.raises(ValueError, match="direction='minimize'"):
        gh.run_population_study(
            halving, optuna.create_study(direction="maximize"), *args,
            score_batch=VB)
    with pytest.raises(ValueError, match="study must be single-objective"):
        gh.run_population_study(
            halving, optuna.create_study(directions=["minimize"] * 2),
            *args, score_batch=VB)
    with pytest.raises(TypeError, match="suggest"):
        gh.run_population_study(halving, study, W0, {"log_l2": 0.0},
                                batches, 3, score_batch=VB)
    with pytest.raises(ValueError, match="score_batch"):
        gh.run_population_study(halving, study, *args)
    assert study.trials == []      # nothing asked for these

    def mixed(trial):
        v = jnp.array(trial.suggest_float("log_l2", -1.0, 1.0))
        return {"log_l2": v} if trial.number else {"l2": v}

    with pytest.raises(ValueError, match="suggest must return .* one "
                                         "structure"):
        gh.run_population_study(halving, study, W0, mixed, batches, 3,
                                score_batch=VB)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 9

    def shapes(trial):
        v = trial.suggest_float("log_l2", -1.0, 1.0)
        return {"log_l2": jnp.full((1,) if trial.number else (), v)}

    with pytest.raises(ValueError, match=r"suggest .*\['log_l2'\] has "
                                         "shape"):
        gh.run_population_study(halving, optuna.create_study(), W0, shapes,
                                batches, 3, score_batch=VB)

    # an error during the run fails the open trials
    failing = optuna.create_study()
    with pytest.raises(ValueError, match="batches ran out after 1"):
        gh.run_population_study(halving, failing, W0, suggest,
                                [batches(0)], 3, score_batch=VB)
    assert [t.state for t in failing.trials] == [TrialState.FAIL] * 9

    pbt = gh.PopulationSearch(make_opt(), size=2, rung_steps=1, mode="pbt")
    queued = optuna.create_study()
    for v in (0.0, 0.1, 0.2):
        queued.enqueue_trial({"log_l2": v})
    with pytest.raises(ValueError, match="3 waiting"):
        gh.run_population_study(pbt, queued, *args, score_batch=VB)


def test_a_single_member_is_scored_for_its_value():
    search = gh.PopulationSearch(make_opt(), size=1, rung_steps=2)
    study = optuna.create_study()
    study.enqueue_trial({"log_l2": -1.0})
    out = gh.run_population_study(search, study, W0, suggest, batches, 5,
                                  score_batch=VB)
    (trial,) = study.trials
    assert out.result.history == [] and trial.intermediate_values == {}
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(
        float(val_loss(out.result.best.params, None, VB)), rel=1e-6)
    assert trial.user_attrs["gradhpo:grad_evals"] == pytest.approx(
        5 * PER_STEP) == pytest.approx(out.result.grad_evals)
    assert out.best_trial.number == 0
