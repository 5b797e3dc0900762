"""Storage heartbeat of ResumableObjective: a worker killed on another host
is failed after the grace period (reaper clocks only) and its chain retried;
a live slow segment is not; the heartbeat thread never outlives a segment.

Cheap on purpose: no JAX training, intervals of 0.02-0.1 s.
"""

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from gradhpo.integrations.resume import (
    HEARTBEAT, HEARTBEAT_THREAD, PausingScheduler, ResumableObjective,
    sqlite_storage)

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Linear curves (see test_pasha_resume.py): with ASHA, r = 1, eta = 3,
# R = 9 and configurations 1, 4, 2, 3 in turn, c4 is promoted at 1 and in
# place at 3 and trains 3 -> 9 in one segment (checkpoints at 4, 6, 8).
HAND = [
    [0.65 - 0.05 * e for e in range(1, 10)],
    [0.525 - 0.025 * e for e in range(1, 10)],
    [0.58 - 0.03 * e for e in range(1, 10)],
    [0.75 - 0.05 * e for e in range(1, 10)],
    [0.58 - 0.06 * e for e in range(1, 10)],
]
FOREIGN = "elsewhere.example"


def _objective(ckdir, slow=None, **kwargs):
    """``slow``: ``{(cfg, e): callable}`` run inside that unit of training.
    The value depends on the restored state, so a wrong resume shows."""
    sched = PausingScheduler(1, 3, max_resource=9, kind="asha")
    slow = slow or {}

    def init(trial):
        trial.suggest_int("cfg", 0, len(HAND) - 1)
        return {"w": np.zeros(2), "e": np.asarray(0, np.int64)}

    def step(trial, state, e):
        assert int(state["e"]) == e - 1              # continues exactly
        cfg = trial.params["cfg"]
        if (cfg, e) in slow:
            slow[(cfg, e)](trial)
        w = state["w"] + e
        return ({"w": w, "e": np.asarray(e, np.int64)},
                HAND[cfg][e - 1] + 1e-3 * float(w.sum()))

    return ResumableObjective(init, step, sched, checkpoint_dir=str(ckdir),
                              checkpoint_every=2, **kwargs)


def _sequence(study, objective):
    for cfg in (1, 4, 2, 3):
        study.enqueue_trial({"cfg": cfg})
        study.optimize(objective, n_trials=2 if cfg in (4, 3) else 1)


def _drain(study, objective):
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.optimize(objective, n_trials=1)


def _curves(study, objective):
    return {c.tip.params["cfg"]: (c.status, c.curve)
            for c in objective.scheduler.chains(study)}


def _journal(path):
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path)))


def _heartbeat_threads():
    return [t.name for t in threading.enumerate()
            if t.name.startswith(HEARTBEAT_THREAD)]


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions raised in any thread (e.g. a late heartbeat write)."""
    errors = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: errors.append(args.exc_value))
    return errors


# ------------------------------------------------- a worker on another host

def _foreign_worker(path, ckdir, hang_mark, interval, grace):
    import socket
    socket.gethostname = lambda: FOREIGN     # the pid rule cannot apply
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def hang(trial):
        open(hang_mark, "w").close()
        time.sleep(120)                       # killed here, mid-segment

    study = optuna.load_study(study_name="s", storage=_journal(path))
    _sequence(study, _objective(ckdir, slow={(4, 7): hang},
                                heartbeat_interval=interval,
                                grace_period=grace))


def test_foreign_worker_killed_is_failed_after_grace_then_retried(
        tmp_path, thread_errors):
    interval, grace = 0.05, 1.0
    path, ckdir = tmp_path / "journal.log", tmp_path / "ck"
    ckdir.mkdir()
    hang_mark = str(tmp_path / "hanging")
    optuna.create_study(study_name="s", storage=_journal(path))
    proc = multiprocessing.get_context("spawn").Process(
        target=_foreign_worker,
        args=(str(path), str(ckdir), hang_mark, interval, grace))
    proc.start()
    try:
        deadline = time.monotonic() + 90
        while not os.path.exists(hang_mark):
            assert time.monotonic() < deadline and proc.is_alive()
            time.sleep(0.02)
        study = optuna.load_study(study_name="s", storage=_journal(path))
        victim, = study.get_trials(states=(TrialState.RUNNING,))
        while study.trials[victim.number].user_attrs[HEARTBEAT] < 3:
            assert time.monotonic() < deadline    # it beats while it hangs
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    victim = study.trials[victim.number]
    assert victim.user_attrs["gradhpo:worker"]["host"] == FOREIGN
    assert victim.user_attrs["gradhpo:saved"] == 6
    assert victim.last_step == 6

    passive = _objective(ckdir)                # the pid rule alone
    assert passive.recover(study) == 0
    assert study.trials[victim.number].state == TrialState.RUNNING
    reaper = _objective(ckdir, heartbeat_interval=interval,
                        grace_period=grace)
    first = time.monotonic()
    assert reaper.recover(study) == 0          # takes note of the counter
    time.sleep(grace / 4)
    assert reaper.recover(study) == 0
    if time.monotonic() - first < grace:       # (not if the host stalled)
        assert study.trials[victim.number].state == TrialState.RUNNING
    time.sleep(max(0.0, first + grace + 0.05 - time.monotonic()))
    assert reaper.recover(study) == 1          # failed, retry enqueued
    victim = study.trials[victim.number]
    assert victim.state == TrialState.FAIL
    _drain(study, reaper)

    retry, = [t for t in study.trials
              if t.user_attrs.get("gradhpo:parent") == victim.number]
    assert retry.user_attrs["gradhpo:reason"] == "retry"
    assert retry.user_attrs["gradhpo:start"] == 6   # from its checkpoint
    assert retry.state == TrialState.COMPLETE and retry.last_step == 9
    assert not study.get_trials(states=(TrialState.RUNNING,))

    # The same numbers as a run that was never interrupted.
    whole = optuna.create_study()
    plain = _objective(tmp_path, heartbeat_interval=interval)
    _sequence(whole, plain)
    _drain(whole, plain)
    assert _curves(study, reaper) == _curves(whole, plain)
    status, curve = _curves(study, reaper)[4]
    assert status == "complete" and curve == pytest.approx(
        {e: HAND[4][e - 1] + 1e-3 * e * (e + 1) for e in range(1, 10)})
    assert thread_errors == []
    assert _heartbeat_threads() == []


# ------------------------------------------------------ a live slow segment

def _slow_segment(tmp_path, worker_interval, units=16):
    """Trains c0 with unit 1 spending ``units * 0.05`` s in a reaper loop
    (grace 0.25 s) on its own storage object; returns the study, the trial
    and what the reaper enqueued."""
    path = tmp_path / "journal.log"
    study = optuna.create_study(study_name="s", storage=_journal(path))
    reaper = _objective(tmp_path, grace_period=0.25)   # reaps, no beats
    other = optuna.load_study(study_name="s", storage=_journal(path))
    out = {}

    def slow(trial):                           # longer than grace, busy
        out["retries"] = reaper.watch(other, duration=units * 0.05,
                                      poll=0.05)

    objective = _objective(tmp_path, slow={(0, 1): slow},
                           heartbeat_interval=worker_interval)
    study.enqueue_trial({"cfg": 0})
    try:
        study.optimize(objective, n_trials=1)
    except ValueError as err:       # Optuna: the trial was failed meanwhile
        out["error"] = str(err)
    return study, study.trials[0], out


def test_live_slow_segment_with_heartbeat_is_not_failed(tmp_path,
                                                        thread_errors):
    study, trial, out = _slow_segment(tmp_path, worker_interval=0.04)
    assert out == {"retries": 0}
    assert trial.state == TrialState.PRUNED          # paused at rung 1
    assert trial.user_attrs["gradhpo:status"] == "paused"
    assert trial.user_attrs[HEARTBEAT] >= 8          # ~0.8 s / 0.04 s
    assert thread_errors == [] and _heartbeat_threads() == []


def test_live_segment_whose_counter_stalls_is_failed(tmp_path,
                                                     thread_errors):
    """Control: the reaper above would fail a segment whose counter does
    not move (beats every 10 s); the segment then stops at its report,
    and Optuna's optimize raises (it cannot tell a trial failed meanwhile).
    """
    study, trial, out = _slow_segment(tmp_path, worker_interval=10.0)
    assert out == {"retries": 1, "error": "Cannot tell a FAIL trial."}
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[HEARTBEAT] == 0
    assert not trial.intermediate_values             # its report refused
    assert thread_errors == [] and _heartbeat_threads() == []


# ------------------------------------------------------ the thread's life

def test_heartbeat_thread_ends_with_every_kind_of_segment(
        tmp_path, thread_errors):
    seen = []

    def look(trial):
        seen.append(_heartbeat_threads())

    def crash(trial):
        raise RuntimeError("worker lost")

    objective = _objective(tmp_path, heartbeat_interval=0.02,
                           slow={(1, 1): look, (4, 5): look,
                                 (0, 1): crash})
    study = optuna.create_study()
    study.enqueue_trial({"cfg": 1})
    study.optimize(objective, n_trials=1)
    assert study.trials[-1].user_attrs["gradhpo:status"] == "paused"
    assert _heartbeat_threads() == []
    study.enqueue_trial({"cfg": 4})
    study.optimize(objective, n_trials=2)      # c4 pauses, c1 continues
    study.enqueue_trial({"cfg": 2})
    study.optimize(objective, n_trials=1)
    study.enqueue_trial({"cfg": 3})
    study.optimize(objective, n_trials=2)      # c3 pauses, c4 to 9
    complete = study.trials[-1]
    assert complete.state == TrialState.COMPLETE
    assert complete.params["cfg"] == 4
    assert _heartbeat_threads() == []
    study.enqueue_trial({"cfg": 0})            # c0 crashes
    study.optimize(objective, n_trials=1, catch=(RuntimeError,))
    assert study.trials[-1].state == TrialState.FAIL
    assert _heartbeat_threads() == []
    # One thread, named after the study and trial, while each ran.
    assert seen == [[f"{HEARTBEAT_THREAD}-{study.study_name}-0"],
                    [f"{HEARTBEAT_THREAD}-{study.study_name}-"
                     f"{complete.number}"]]
    time.sleep(0.1)                            # no late write, no error
    ran = [t for t in study.trials if "gradhpo:worker" in t.user_attrs]
    assert len(ran) == len(study.trials) == 7
    assert all(HEARTBEAT in t.user_attrs for t in ran)
    assert thread_errors == []


def test_heartbeat_through_sqlite_from_its_own_thread(tmp_path,
                                                      thread_errors):
    """RDBStorage: the thread writes with its own session; the whole
    sequence runs as without a heartbeat."""
    study = optuna.create_study(
        storage=sqlite_storage(f"sqlite:///{tmp_path / 's.db'}"))
    objective = _objective(tmp_path, heartbeat_interval=0.02,
                           slow={(4, 5): lambda trial: time.sleep(0.2)})
    _sequence(study, objective)
    complete = study.trials[-1]
    assert complete.state == TrialState.COMPLETE
    assert complete.user_attrs[HEARTBEAT] >= 4
    assert _heartbeat_threads() == [] and thread_errors == []


def test_heartbeat_of_a_trial_finished_elsewhere_stops_quietly(
        tmp_path, thread_errors):
    """A beat refused because a reaper failed the trial ends the thread
    without an error; the segment stops at its next report."""
    state = {}

    def failed_by_a_reaper(trial):
        study = trial.study
        study._storage.set_trial_state_values(trial._trial_id,
                                              TrialState.FAIL)
        deadline = time.monotonic() + 5
        while _heartbeat_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        state["threads"] = _heartbeat_threads()

    objective = _objective(tmp_path, heartbeat_interval=0.02,
                           slow={(0, 1): failed_by_a_reaper})
    study = optuna.create_study()
    study.enqueue_trial({"cfg": 0})
    with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):
        study.optimize(objective, n_trials=1)
    assert state["threads"] == []              # ended on its own
    assert study.trials[0].state == TrialState.FAIL
    assert thread_errors == []


# ------------------------------------------------------ the reaper's rule

def _foreign_running(study, **attrs):
    trial = study.ask()
    trial.set_user_attr("gradhpo:worker", {"host": FOREIGN, "pid": 1})
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial


def test_segment_without_counter_is_left_to_the_pid_rule(tmp_path):
    reaper = _objective(tmp_path, heartbeat_interval=0.02,
                        grace_period=0.05)
    study = optuna.create_study(study_name="rule")
    bare = _foreign_running(study)             # older worker: no counter
    beating = _foreign_running(study, **{HEARTBEAT: 7})
    assert reaper.watch(study, duration=0.2, poll=0.02) == 0
    assert study.trials[bare.number].state == TrialState.RUNNING
    assert study.trials[beating.number].state == TrialState.FAIL
    # Only RUNNING trials with a counter are remembered.
    assert reaper._seen == {}
    third = _foreign_running(study, **{HEARTBEAT: 1})
    reaper.recover(study)
    assert set(reaper._seen) == {("rule", third._trial_id)}
    study.tell(third, 1.0)
    reaper.recover(study)
    assert reaper._seen == {}
    study.tell(bare, 1.0)
    # Without a grace period an objective never applies the rule.
    passive = _objective(tmp_path)
    stale = _foreign_running(study, **{HEARTBEAT: 0})
    for _ in range(2):
        passive.recover(study)
        time.sleep(0.05)
    assert study.trials[stale.number].state == TrialState.RUNNING
    with pytest.raises(ValueError, match="grace_period"):
        passive.watch(study, duration=1.0)


def test_a_changing_counter_restarts_the_grace_period(tmp_path):
    reaper = _objective(tmp_path, grace_period=0.15)
    study = optuna.create_study()
    trial = _foreign_running(study, **{HEARTBEAT: 0})
    for count in range(1, 6):                  # 0.25 s, a beat per 0.05 s
        reaper.recover(study)
        time.sleep(0.05)
        trial.set_user_attr(HEARTBEAT, count)
    assert study.trials[trial.number].state == TrialState.RUNNING
    assert reaper.watch(study, duration=0.5, poll=0.02,
                        stop_when_idle=True) == 0    # not a chain
    assert study.trials[trial.number].state == TrialState.FAIL


# ------------------------------------------------------ arguments

@pytest.mark.parametrize("kwargs, error, match", [
    ({"heartbeat_interval": 0}, ValueError, "heartbeat_interval"),
    ({"heartbeat_interval": -1.0}, ValueError, "heartbeat_interval"),
    ({"heartbeat_interval": float("nan")}, ValueError,
     "heartbeat_interval"),
    ({"heartbeat_interval": "1"}, TypeError, "heartbeat_interval"),
    ({"heartbeat_interval": True}, TypeError, "heartbeat_interval"),
    ({"grace_period": 0.0}, ValueError, "grace_period"),
    ({"grace_period": float("inf")}, ValueError, "grace_period"),
    ({"heartbeat_interval": 1.0, "grace_period": 1.0}, ValueError,
     "grace_period must be greater than heartbeat_interval"),
    ({"heartbeat_interval": 1.0, "grace_period": 0.5}, ValueError,
     "grace_period must be greater than heartbeat_interval"),
])
def test_arguments_are_checked(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        _objective(tmp_path, **kwargs)


def test_defaults_and_watch_arguments(tmp_path):
    assert _objective(tmp_path).grace_period is None
    assert _objective(tmp_path, heartbeat_interval=0.5).grace_period == 2.0
    reaper = _objective(tmp_path, grace_period=3)
    assert (reaper.heartbeat_interval, reaper.grace_period) == (None, 3.0)
    study = optuna.create_study()
    with pytest.raises(ValueError, match="duration"):
        reaper.watch(study, duration=-1.0)
    with pytest.raises(ValueError, match="poll"):
        reaper.watch(study, duration=1.0, poll=0.0)
    assert reaper.watch(study, duration=0.0) == 0
