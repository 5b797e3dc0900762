"""Pause and resume for promotion-type ASHA / PASHA on Optuna.

Resources are 1-based: the objective trains unit e = 1..R and reports the
value at resource e. With r = 1 and eta = 3 the rungs are at 1, 3, 9, ...
"""

import multiprocessing
import os
import signal
import sys
import time
import warnings

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import gradhpo as gh
from gradhpo.integrations.resume import (
    PausingScheduler, ResumableObjective, sqlite_storage)

optuna.logging.set_verbosity(optuna.logging.WARNING)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

# Hand-worked PASHA case (epsilon = 0, r = 1, eta = 3, R = 9: rungs 1, 3;
# T = 1 caps at 3, T = 2 = n lifts the cap to 9). Linear curves.
HAND = [
    [0.65 - 0.05 * e for e in range(1, 10)],      # c0: .60 at 1
    [0.525 - 0.025 * e for e in range(1, 10)],    # c1: .50 at 1, .45 at 3
    [0.58 - 0.03 * e for e in range(1, 10)],      # c2: .55 at 1, .49 at 3
    [0.75 - 0.05 * e for e in range(1, 10)],      # c3: .70 at 1
    [0.58 - 0.06 * e for e in range(1, 10)],      # c4: .52 at 1, .40 at 3
]


def _objective(curves, sched, tmp_path, trained, **kwargs):
    def init(trial):
        trial.suggest_int("cfg", 0, len(curves) - 1)
        return {"w": np.zeros(2), "e": np.asarray(0, np.int64)}

    def step(trial, state, e):
        assert int(state["e"]) == e - 1              # continues exactly
        trained.append((trial.params["cfg"], e, trial.number))
        return ({"w": state["w"] + e, "e": np.asarray(e, np.int64)},
                curves[trial.params["cfg"]][e - 1])

    return ResumableObjective(init, step, sched,
                              checkpoint_dir=str(tmp_path), **kwargs)


def _drive(study, objective, n_configs):
    """One worker: continue queued work first, else the next config."""
    nxt = 0
    while True:
        waiting = study.get_trials(deepcopy=False,
                                   states=(TrialState.WAITING,))
        if not waiting:
            if nxt == n_configs:
                return
            study.enqueue_trial({"cfg": nxt})
            nxt += 1
        study.optimize(objective, n_trials=1)


def test_hand_worked_pasha_pauses_resumes_and_grows(tmp_path):
    sched = PausingScheduler(1, 3, max_resource=9, epsilon=0.0)
    trained, tops = [], []
    objective = _objective(HAND, sched, tmp_path, trained,
                           on_report=lambda t, e, v, m: tops.append(m))
    study = optuna.create_study()
    _drive(study, objective, len(HAND))
    rows = [(t.number, t.params["cfg"], t.state.name,
             t.user_attrs["gradhpo:status"], t.user_attrs["gradhpo:start"],
             t.last_step, t.user_attrs["gradhpo:parent"])
            for t in study.trials]
    assert rows == [
        (0, 0, "PRUNED", "paused", 0, 1, None),   # alone in rung 1
        (1, 1, "PRUNED", "paused", 0, 3, None),   # promoted in place, top
        (2, 2, "PRUNED", "paused", 0, 1, None),   # .55 > cutoff .533
        (3, 3, "PRUNED", "paused", 0, 1, None),   # cutoff .55: c2 promoted
        (4, 2, "PRUNED", "paused", 1, 3, 2),      # c2 continues from 1
        (5, 4, "COMPLETE", "complete", 0, 9, None),   # T grows at its e=3
    ]
    assert study.trials[4].user_attrs["gradhpo:reason"] == "promoted"
    # The continuation carries the curve: no value is reported twice.
    assert study.trials[4].intermediate_values == pytest.approx(
        {e: HAND[2][e - 1] for e in (1, 2, 3)})
    assert study.trials[5].user_attrs["gradhpo:top_rung"] == 2
    assert tops == [3] * 10 + [9] * 7
    # Every step is trained once; resource = sum of distinct steps.
    steps = [(c, e) for c, e, _ in trained]
    assert len(steps) == len(set(steps)) == 1 + 3 + 3 + 1 + 9
    assert sched.current_top_rung(study) == 2
    assert sched.current_max_resource(study) == 9
    assert sched.best_trial(study).number == 5
    chains = {c.number: c for c in sched.chains(study)}
    assert chains[2].tip.number == 4 and len(chains[2].segments) == 2
    assert [chains[k].status for k in (0, 1, 2, 3, 5)] == [
        "paused", "paused", "paused", "paused", "complete"]
    # Each chain's checkpoint loads and holds its last resource.
    for c in chains.values():
        if c.status == "paused":
            saved = gh.load_state(
                objective.checkpoint_path(study, c.number),
                {"state": {"w": np.zeros(2), "e": np.asarray(0, np.int64)},
                 "step": np.asarray(0, np.int64)})
            assert int(saved["step"]) == c.tip.last_step
            assert saved["state"]["w"][0] == sum(range(1, c.tip.last_step
                                                       + 1))


def test_benchmark_gradhpo_side_reproduces_the_hand_worked_case():
    import pasha_syne_tune as bench
    out = bench.run_gradhpo(HAND, 1, 3, 9, epsilon=0.0)
    assert out["top_rung"] == [3] * 10 + [9] * 7
    assert out["reports"] == [[0, 1], [1, 1], [1, 2], [1, 3], [2, 1],
                              [3, 1], [2, 2], [2, 3], [4, 1], [4, 2]] + [
                                 [4, e] for e in range(3, 10)]
    assert out["distinct"] and sum(out["steps"].values()) == 17


def test_asha_promotion_without_growth(tmp_path):
    """kind='asha': M = R from the start; the top rung is never a cap."""
    sched = PausingScheduler(1, 3, max_resource=9, kind="asha")
    trained = []
    study = optuna.create_study()
    _drive(study, _objective(HAND[:3], sched, tmp_path, trained), 3)
    # c1 is promoted in place at 1 (cutoff .533) and, alone at 3, pauses;
    # c2 (.55 at 1) is not promoted; no rung-3 pair: c1 stays paused.
    assert [(t.params["cfg"], t.last_step) for t in study.trials] == [
        (0, 1), (1, 3), (2, 1)]
    assert sched.current_top_rung(study) == 2


def _retry_callback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback()


def test_crash_is_retried_from_the_checkpoint_and_copies_lose(tmp_path):
    """A segment that crashes is continued from its last checkpoint; a copy
    made by Optuna's retry callback (same parent) ends as a duplicate."""
    sched = PausingScheduler(1, 3, max_resource=9, kind="asha")
    trained = []
    crash = {"armed": True}
    base = _objective(HAND, sched, tmp_path, trained, checkpoint_every=2)
    inner = base.step

    def step(trial, state, e):
        if crash["armed"] and trial.params["cfg"] == 4 and e == 7:
            crash["armed"] = False
            raise RuntimeError("worker lost")
        return inner(trial, state, e)

    base.step = step
    study = optuna.create_study()
    for cfg in (1, 4, 2, 3):
        # c1 pauses at 1; c4 pauses and promotes c1, which pauses at 3;
        # c2 pauses at 1; c3 pauses and promotes c4 (.52 = cutoff), which
        # is promoted in place at 3 (.40) and crashes at 7.
        study.enqueue_trial({"cfg": cfg})
        study.optimize(base, n_trials=2 if cfg in (4, 3) else 1,
                       catch=(RuntimeError,))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["gradhpo:saved"] == 6
    # The failed trial reported step 6 and saved it; nothing beyond.
    assert max(failed[0].intermediate_values) == 6
    _retry_callback()(study, failed[0])        # Optuna's copy of the trial
    assert base.recover(study) == 1            # gradhpo's retry
    assert base.recover(study) == 0            # only once
    study.optimize(base, n_trials=2)
    by_reason = {t.user_attrs.get("gradhpo:reason"): t
                 for t in study.trials[failed[0].number + 1:]}
    retry = by_reason["retry"]
    assert retry.user_attrs["gradhpo:parent"] == failed[0].number
    assert retry.user_attrs["gradhpo:start"] == 6
    assert retry.state == TrialState.COMPLETE and retry.last_step == 9
    copy = [t for t in study.trials
            if "failed_trial" in t.system_attrs][0]
    assert copy.user_attrs["gradhpo:status"] == "duplicate"
    assert copy.state == TrialState.PRUNED
    steps = [(c, e) for c, e, _ in trained]
    assert len(steps) == len(set(steps))       # nothing trained twice
    assert sorted(e for c, e in steps if c == 4) == list(range(1, 10))
    assert sched.best_trial(study).number == retry.number


# ------------------------------------------------------------ many workers

N_WORKERS = 4
MAX_T = 27


def _storage(kind, path):
    if kind == "journal":
        return optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(path))
    return sqlite_storage(f"sqlite:///{path}")


def _worker_objective(ckdir, marks):
    sched = PausingScheduler(1, 3, max_resource=MAX_T, epsilon=0.0)

    def init(trial):
        trial.suggest_float("x", 0.0, 1.0)
        return {"w": np.zeros(3), "e": np.asarray(0, np.int64)}

    def step(trial, state, e):
        assert int(state["e"]) == e - 1
        chain = trial.user_attrs["gradhpo:chain"]
        name = f"{chain}_{e}_{os.getpid()}_{trial.number}"
        with open(os.path.join(marks, name), "x"):
            pass
        time.sleep(0.004)
        x = trial.params["x"]
        return ({"w": state["w"] + 1.0, "e": np.asarray(e, np.int64)},
                (x - 0.5) ** 2 + 1.0 / e + 0.01 * np.sin(37 * x * e))

    return ResumableObjective(init, step, sched, checkpoint_dir=ckdir,
                              checkpoint_every=2)


def _worker(kind, path, ckdir, marks, seed, n_trials):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name="s", storage=_storage(kind, path),
        sampler=optuna.samplers.RandomSampler(seed))
    study.optimize(_worker_objective(ckdir, marks), n_trials=n_trials)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_workers_share_storage_and_survive_a_kill(tmp_path, kind):
    path = str(tmp_path / ("journal.log" if kind == "journal" else "s.db"))
    ckdir, marks = tmp_path / "ck", tmp_path / "marks"
    ckdir.mkdir()
    marks.mkdir()
    optuna.create_study(study_name="s", storage=_storage(kind, path))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(kind, path, str(ckdir),
                                               str(marks), i, 12))
             for i in range(N_WORKERS)]
    for p in procs:
        p.start()
    victim = procs[0]
    deadline = time.time() + 60
    while time.time() < deadline and sum(
            name.split("_")[2] == str(victim.pid)
            for name in os.listdir(marks)) < 8:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)        # mid-run
    for p in procs:
        p.join(120)
    assert victim.exitcode == -signal.SIGKILL
    assert all(p.exitcode == 0 for p in procs[1:])

    study = optuna.load_study(study_name="s", storage=_storage(kind, path))
    objective = _worker_objective(str(ckdir), str(marks))
    # The other workers (same host) may have failed and retried it already.
    killed = [t for t in study.trials
              if t.user_attrs.get("gradhpo:worker", {}).get("pid")
              == victim.pid and t.state in (TrialState.RUNNING,
                                            TrialState.FAIL)]
    assert len(killed) == 1
    killed_chain = killed[0].user_attrs["gradhpo:chain"]
    objective.recover(study)
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.optimize(objective, n_trials=1)

    trials = study.trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    killed = study.trials[killed[0].number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials
               if t.user_attrs.get("gradhpo:parent") == killed.number
               and t.user_attrs.get("gradhpo:status") != "duplicate"]
    assert len(retries) == 1
    sched = objective.scheduler
    chains = sched.chains(study)
    assert {c.status for c in chains} <= {"paused", "complete"}
    # Per chain, steps 1..last are each trained once, except at most
    # checkpoint_every steps of the killed chain after its last checkpoint.
    trained = {}
    for name in os.listdir(marks):
        chain, e = map(int, name.split("_")[:2])
        trained.setdefault(chain, []).append(e)
    like = {"state": {"w": np.zeros(3), "e": np.asarray(0, np.int64)},
            "step": np.asarray(0, np.int64)}
    saved_at_kill = killed.user_attrs["gradhpo:saved"]
    for c in chains:
        last = c.tip.last_step
        assert sorted(c.curve) == list(range(1, last + 1))
        assert sorted(set(trained[c.number])) == list(range(1, last + 1))
        twice = sorted(e for e in set(trained[c.number])
                       if trained[c.number].count(e) > 1)
        if c.number == killed_chain:
            assert all(saved_at_kill < e <= saved_at_kill + 2
                       for e in twice), twice
        else:
            assert twice == []
        # No torn checkpoint: every one loads and matches its chain.
        ck = objective.checkpoint_path(study, c.number)
        if os.path.exists(ck):
            saved = gh.load_state(ck, like)
            assert int(saved["step"]) <= last
            assert saved["state"]["w"][0] == int(saved["step"])
    assert all(c.status == "complete" or c.tip.last_step in
               sched.rung_levels for c in chains)
