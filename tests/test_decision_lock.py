"""The decision lock of ResumableObjective (``serialize=True``): workers
decide one at a time, so the study's events form one total order and every
decision (PASHA's epsilon and top-rung records, promotions, pauses, claims)
is the one a central scheduler makes for that order.

Cheap on purpose: no JAX training; the fake objectives and the worker
helpers of test_pasha_resume.py are reused.
"""

import contextlib
import json
import logging
import math
import multiprocessing
import os
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from gradhpo.integrations.pasha import (linear_percentile,
                                        noisy_pair_distances,
                                        soft_ranking_consistent)
from gradhpo.integrations.resume import (
    EPSILON, TOP, PausingScheduler, ResumableObjective)
from test_pasha_resume import (HAND, MAX_T, N_WORKERS, _drive, _objective,
                               _storage, _worker_objective)

optuna.logging.set_verbosity(optuna.logging.WARNING)

PASHA = dict(min_resource=1, reduction_factor=3, max_resource=MAX_T)


# ---------------------------------------------------------- many workers

def _logged_worker(path, ckdir, marks, log, seed, n_trials):
    """A worker of test_pasha_resume (PASHA with epsilon "auto") that
    appends, inside the lock, when it enters and leaves every decision
    section and every report and epsilon / top-rung record it makes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pid = os.getpid()

    def write(*fields):
        with open(log, "a") as f:
            f.write(" ".join(map(str, fields)) + "\n")

    section = ResumableObjective._decision

    @contextlib.contextmanager
    def logged(self, study):
        with section(self, study):
            write("enter", pid, time.monotonic_ns())
            try:
                yield
            finally:
                write("exit", pid, time.monotonic_ns())

    report, set_attr = optuna.Trial.report, optuna.Trial.set_user_attr

    def logged_report(trial, value, step):
        report(trial, value, step)
        write("report", pid, trial.user_attrs["gradhpo:chain"], step,
              repr(float(value)))

    def logged_attr(trial, key, value):
        set_attr(trial, key, value)
        if key in (EPSILON, TOP):
            write(key, pid, trial.user_attrs["gradhpo:chain"],
                  json.dumps(value, separators=(",", ":")))

    ResumableObjective._decision = logged
    optuna.Trial.report = logged_report
    optuna.Trial.set_user_attr = logged_attr
    objective = _worker_objective(ckdir, marks)
    objective.scheduler = PausingScheduler(**PASHA)      # epsilon "auto"
    inner = objective.step

    def step(trial, state, e):      # rung 1 ranks apart from later rungs
        state, value = inner(trial, state, e)
        if e == 1:
            value += 0.1 * np.sin(53 * trial.params["x"])
        return state, value

    objective.step = step
    study = optuna.load_study(
        study_name="s", storage=_storage("journal", path),
        sampler=optuna.samplers.RandomSampler(seed))
    study.optimize(objective, n_trials=n_trials)


def _replay(reports, sched):
    """A central PASHA scheduler fed the reports one by one, written from
    the rules (not the module's code): the epsilon records ``(clock,
    epsilon)`` and top-rung raises ``(chain, T)`` it makes."""
    levels, n = sched.rung_levels, sched.n_rungs
    curves, top, epsilon = {}, 1, sched.epsilon_init
    epsilons, raises = [], []
    for clock, (chain, e, value) in enumerate(reports, start=1):
        curves.setdefault(chain, {})[e] = value
        if top >= n:
            continue
        low, high = levels[top - 1], levels[top]
        if low < e <= high:
            found = noisy_pair_distances(list(curves.values()), low, high)
            if found:
                new = linear_percentile(found, sched.epsilon_percentile)
                if new != epsilon:
                    epsilon = new
                    epsilons.append((clock, epsilon))
        members = [(c[high], c[low]) for c in curves.values()
                   if high in c and low in c]
        if len(members) >= 2 and not soft_ranking_consistent(
                members, 0.0, "minimize") and not soft_ranking_consistent(
                    members, epsilon, "minimize"):
            top += 1
            raises.append((chain, top))
    return curves, epsilons, raises


def test_workers_decide_one_at_a_time_like_a_central_scheduler(tmp_path):
    path = str(tmp_path / "journal.log")
    ckdir, marks, log = tmp_path / "ck", tmp_path / "marks", tmp_path / "log"
    ckdir.mkdir()
    marks.mkdir()
    study = optuna.create_study(study_name="s",
                                storage=_storage("journal", path))
    for x in np.random.default_rng(5).uniform(size=16):
        study.enqueue_trial({"x": float(x)})   # then random ones
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_logged_worker,
                         args=(path, str(ckdir), str(marks), str(log), i, 12))
             for i in range(N_WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)

    # One section at a time: enter and exit alternate, by one worker each,
    # and no section starts before the previous one ended.
    lines = [line.split(" ") for line in log.read_text().splitlines()]
    reports, records, holder, last_exit, sections = [], [], None, 0, 0
    for kind, pid, *rest in lines:
        if kind == "enter":
            assert holder is None, "two decision sections overlap"
            holder, start = pid, int(rest[0])
            assert start >= last_exit
            sections += 1
            in_section = []
        elif kind == "exit":
            assert holder == pid
            holder, last_exit = None, int(rest[0])
            assert last_exit >= start
            assert len(in_section) <= 1       # a report per section
        else:
            assert holder == pid, f"{kind} outside a decision section"
            if kind == "report":
                chain, e, value = int(rest[0]), int(rest[1]), float(rest[2])
                reports.append((chain, e, value))
                in_section.append(e)
            else:
                records.append((kind, int(rest[0]), json.loads(rest[1]),
                                len(reports)))
    assert holder is None and sections > len(reports) > 50
    workers = {pid for kind, pid, *_ in lines if kind == "enter"}
    assert len(workers) == N_WORKERS

    study = optuna.load_study(study_name="s",
                              storage=_storage("journal", path))
    sched = PausingScheduler(**PASHA)
    curves, epsilons, raises = _replay(reports, sched)
    # The log holds every report once; the study's curves are these.
    assert {c.number: c.curve for c in sched.chains(study)} == curves
    assert sum(len(c) for c in curves.values()) == len(reports)
    # The epsilon clock is a sequence number: the number of reports made
    # when the record was written, strictly increasing in writing order.
    written = [(value[0], value[1]) for kind, _, value, _ in records
               if kind == EPSILON]
    assert [clock for clock, _ in written] == [
        count for kind, _, _, count in records if kind == EPSILON]
    clocks = [clock for clock, _ in written]
    assert clocks == sorted(set(clocks))
    # (A trial keeps its last record: a later one overwrites the first.)
    stored = sorted(tuple(t.user_attrs[EPSILON]) for t in study.trials
                    if EPSILON in t.user_attrs)
    assert set(stored) <= set(written) and stored[-1] == written[-1]
    assert len({clock for clock, _ in stored}) == len(stored)
    # A central scheduler fed the same reports in lock order makes the
    # same records: epsilon values at the same clocks, the same raises.
    assert written == epsilons and epsilons
    assert [(chain, value) for kind, chain, value, _ in records
            if kind == TOP] == raises and raises
    assert sched.current_top_rung(study) == 1 + len(raises)
    # Claims never race: no duplicate.
    statuses = {t.user_attrs.get("gradhpo:status") for t in study.trials}
    assert "duplicate" not in statuses
    # The lock is free; every rung checkpoint was put in place.
    assert sorted(os.listdir(ckdir)) == sorted(
        f"s-chain{c}.npz" for c in curves)


# ---------------------------------------------------------- one process

def _held(objective, study):
    return os.path.exists(objective.lock_path(study))


def test_lock_is_held_in_decisions_only_and_released_on_errors(tmp_path):
    sched = PausingScheduler(1, 3, max_resource=9, epsilon=0.0)
    trained = []
    objective = _objective(HAND, sched, tmp_path, trained)
    study = optuna.create_study(study_name="a/b c")
    assert objective.lock_path(study) == str(tmp_path / "a_b_c"
                                             "-decisions.lock")
    inner_step, inner_top = objective.step, sched._top
    seen = {"step": [], "top": [], "report": []}
    fail = {"step": False, "top": False}

    def step(trial, state, e):                 # training: lock free
        seen["step"].append(_held(objective, study))
        if fail["step"]:
            raise RuntimeError("step failed")
        return inner_step(trial, state, e)

    def top(*args, **kwargs):                  # a decision: lock held
        seen["top"].append(_held(objective, study))
        if fail["top"]:
            raise RuntimeError("top failed")
        return inner_top(*args, **kwargs)

    objective.step, sched._top = step, top
    objective.on_report = lambda t, e, v, m: seen["report"].append(
        _held(objective, study))
    begin = time.monotonic()
    _drive(study, objective, len(HAND))        # pauses: TrialPruned
    assert [t.user_attrs["gradhpo:status"] for t in study.trials] == [
        "paused"] * 5 + ["complete"]
    assert seen["step"] and not any(seen["step"])
    assert seen["report"] and not any(seen["report"])
    assert seen["top"] and all(seen["top"])
    assert not _held(objective, study)

    # A copy of a continuation ends as a duplicate (TrialPruned inside
    # the start section).
    cont = study.trials[4]
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=cont.params,
        distributions=cont.distributions,
        user_attrs={k: cont.user_attrs[k] for k in (
            "gradhpo:chain", "gradhpo:parent", "gradhpo:reason")}))
    study.optimize(objective, n_trials=1)
    assert study.trials[-1].user_attrs["gradhpo:status"] == "duplicate"
    assert study.trials[-1].state == TrialState.PRUNED
    assert not _held(objective, study)

    for where in ("step", "top"):              # an exception in either
        fail[where] = True
        number = len(study.trials)
        study.enqueue_trial({"cfg": 0})
        with pytest.raises(RuntimeError, match=f"{where} failed"):
            study.optimize(objective, n_trials=1)
        fail[where] = False
        assert study.trials[number].state == TrialState.FAIL
        assert not _held(objective, study)
    # The first crash's retry was enqueued when the second trial started.
    assert objective.recover(study) == 1       # the lock is free
    _drive(study, objective, 0)
    assert [t.user_attrs["gradhpo:reason"] for t in study.trials
            if t.state == TrialState.PRUNED and
            t.user_attrs.get("gradhpo:parent") in (number - 1, number)
            ] == ["retry", "retry"]
    assert not _held(objective, study)
    # Nothing waited for a stale lock (the default grace period is 30 s).
    assert time.monotonic() - begin < 20


def test_stale_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    sched = PausingScheduler(1, 3, max_resource=9, epsilon=0.0)
    objective = _objective(HAND, sched, tmp_path, [],
                           lock_grace_period=0.5)
    study = optuna.create_study(study_name="stale")
    lock = objective.lock_path(study)
    open(lock, "x").close()                    # left by a killed holder
    study.enqueue_trial({"cfg": 1})
    begin = time.monotonic()
    study.optimize(objective, n_trials=1)
    waited = time.monotonic() - begin
    assert 0.5 <= waited < 15
    assert study.trials[0].user_attrs["gradhpo:status"] == "paused"
    assert not os.path.exists(lock)

    # A holder whose lock was taken over meanwhile warns when it leaves.
    with caplog.at_level(logging.WARNING, "gradhpo.integrations.resume"):
        with objective._decision(study):
            os.remove(lock)                    # "taken over"
    assert "taken over" in caplog.text


def _hold_and_hang(ckdir, ready):
    objective = _objective(HAND, PausingScheduler(1, 3, max_resource=9),
                           ckdir, [])
    with objective._decision(optuna.create_study(study_name="killed")):
        open(ready, "w").close()
        time.sleep(120)                        # killed here


def test_lock_of_a_dead_holder_on_this_host_is_taken_over_at_once(
        tmp_path, caplog):
    ready = str(tmp_path / "ready")
    proc = multiprocessing.get_context("spawn").Process(
        target=_hold_and_hang, args=(str(tmp_path), ready))
    proc.start()
    objective = _objective(HAND, PausingScheduler(1, 3, max_resource=9),
                           tmp_path, [])             # grace period 30 s
    study = optuna.create_study(study_name="killed")
    lock = objective.lock_path(study)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            assert time.monotonic() < deadline and proc.is_alive()
            time.sleep(0.02)
        with open(lock) as f:
            assert json.load(f)["pid"] == proc.pid   # the holder's mark
    finally:
        proc.kill()
        proc.join(30)
    begin = time.monotonic()
    with caplog.at_level(logging.WARNING, "gradhpo.integrations.resume"):
        with objective._decision(study):
            waited = time.monotonic() - begin
            with open(lock) as f:
                assert json.load(f)["pid"] == os.getpid()
    assert waited < 5 and not os.path.exists(lock)
    assert "dead process of this host" in caplog.text
    assert not [name for name in os.listdir(tmp_path) if "dead" in name]


def test_serialize_false_takes_no_lock_and_decides_the_same(
        tmp_path, monkeypatch):
    def rows(study):
        return [(t.number, t.params["cfg"], t.state.name,
                 t.user_attrs["gradhpo:status"],
                 t.user_attrs["gradhpo:start"], t.last_step,
                 t.user_attrs["gradhpo:parent"],
                 t.user_attrs.get(TOP), t.intermediate_values)
                for t in study.trials]

    out = {}
    for serialize in (True, False):
        sched = PausingScheduler(1, 3, max_resource=9, epsilon=0.0)
        tops = []
        (tmp_path / str(serialize)).mkdir()
        objective = _objective(HAND, sched, tmp_path / str(serialize), [],
                               serialize=serialize,
                               on_report=lambda t, e, v, m: tops.append(m))
        study = optuna.create_study()
        if not serialize:
            def no_lock(self):
                raise AssertionError("lock taken with serialize=False")
            monkeypatch.setattr(
                optuna.storages.journal.JournalFileOpenLock, "acquire",
                no_lock)
        _drive(study, objective, len(HAND))
        out[serialize] = rows(study), tops
    assert out[True] == out[False]
    assert out[False][1] == [3] * 10 + [9] * 7  # the hand-worked case


@pytest.mark.parametrize("kwargs, error, match", [
    ({"serialize": "yes"}, TypeError, "serialize must be a bool"),
    ({"serialize": 1}, TypeError, "serialize must be a bool"),
    ({"serialize": None}, TypeError, "serialize must be a bool"),
    ({"lock_grace_period": 0}, ValueError, "lock_grace_period"),
    ({"lock_grace_period": -1.0}, ValueError, "lock_grace_period"),
    ({"lock_grace_period": math.nan}, ValueError, "lock_grace_period"),
    ({"lock_grace_period": "30"}, TypeError, "lock_grace_period"),
])
def test_arguments_are_checked(tmp_path, kwargs, error, match):
    sched = PausingScheduler(1, 3, max_resource=9)
    with pytest.raises(error, match=match):
        _objective(HAND, sched, tmp_path, [], **kwargs)


def test_defaults(tmp_path):
    objective = _objective(HAND, PausingScheduler(1, 3, max_resource=9),
                           tmp_path, [])
    assert objective.serialize is True
    assert objective.lock_grace_period == 30.0
    assert np.isclose(_objective(
        HAND, PausingScheduler(1, 3, max_resource=9), tmp_path, [],
        lock_grace_period=2).lock_grace_period, 2.0)
