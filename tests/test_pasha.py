"""PASHAPruner: the hand-worked cases of PASHA.md §4 and edge cases.

Common setup (PASHA.md §4): minimise, r = 1, eta = 3, s = 0, R = 27, so the
rungs are at steps 1, 3, 9 (n = 3) and T = 3 means the cap is R. Curves list
the values at steps 0, 1, 2, ...
"""

import itertools
import math
import random
import subprocess
import sys

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from gradhpo.integrations.pasha import (
    PASHADecision, PASHAPruner, estimate_epsilon, linear_percentile,
    noisy_pair_distance, noisy_pair_distances, pasha_best_trial,
    soft_ranking_consistent)

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONTINUE = PASHADecision.CONTINUE
PRUNE = PASHADecision.PRUNE
STOP = PASHADecision.STOP_AT_MAX

# Family A (PASHA.md §4.2).
T0 = (0.80, 0.50, 0.45, 0.40)
T1 = (0.85, 0.60)
T2 = (0.78, 0.40, 0.36, 0.30)
T3 = (0.90, 0.55)
T4 = (0.95, 0.70)
T2N = (0.81, 0.40, 0.47, 0.30)            # Family B's noisy t2
T5_S1 = (0.79, 0.45, 0.41, 0.38)
T5 = (0.79, 0.45, 0.33, 0.25, 0.24, 0.23, 0.22, 0.21, 0.19, 0.18)
T6 = (0.77, 0.38, 0.30, 0.22, 0.21, 0.205, 0.20, 0.195, 0.192, 0.19)
T7 = (0.83, 0.43, 0.52, 0.34)
PR, RUN = TrialState.PRUNED, TrialState.RUNNING
FAMILY_A = [(T0, PR), (T1, PR), (T2, PR), (T3, PR), (T4, PR)]
FAMILY_B = [(T0, PR), (T1, PR), (T2N, PR), (T3, PR), (T4, PR)]


def make_pruner(**kwargs):
    kwargs.setdefault("max_resource", 27)
    return PASHAPruner(1, 3, 0, **kwargs)


def build_study(history, pruner, sign=1.0):
    """A study holding ``history`` [(curve, state[, passed rungs])] in that
    order. A third item lists the rungs the trial passed in earlier
    ``prune`` calls; their attributes are written as the pruner would."""
    study = optuna.create_study(
        direction="minimize" if sign > 0 else "maximize", pruner=pruner)
    for curve, state, *passed in history:
        values = {e: sign * v for e, v in enumerate(curve)}
        final = values[len(curve) - 1] if state != RUN else None
        attrs = {}
        for k in passed[0] if passed else ():
            attrs[f"pasha:rung_{k}"] = values[pruner.rung_step(k)]
            attrs[f"pasha:passed_{k}"] = True
        study.add_trial(create_trial(state=state, value=final,
                                     intermediate_values=values,
                                     system_attrs=attrs))
    return study


def decide(study, number):
    """Runs the pruner on RUNNING trial ``number`` as should_prune does."""
    frozen = study.get_trials(deepcopy=False)[number]
    assert frozen.state == RUN
    pruned = study.pruner.prune(study, frozen)
    decision = study.pruner.last_decision(frozen.number)
    assert pruned == (decision is not CONTINUE)
    return decision


# ------------------------------------------------------ §4.1 pure functions

U1 = {"a": (10.0, 10.0), "b": (14.6, 14.2), "c": (14.3, 14.3),
      "d": (11.6, 11.6)}


@pytest.mark.parametrize("epsilon, direction, expected", [
    (0.3, "minimize", True),
    (0.03, "minimize", False),
    (0.3, "maximize", True),
])
def test_u1_soft_ranking_closed_form(epsilon, direction, expected):
    assert soft_ranking_consistent(U1.values(), epsilon,
                                   direction) is expected
    # The order in which members are given does not matter.
    assert soft_ranking_consistent(list(U1.values())[::-1], epsilon,
                                   direction) is expected


def test_u1_boundary_and_exact_order():
    # A = [x, y] by top value, p(A) = [0.5, 0.4], P = [0.4, 0.5].
    members = [(0.1, 0.5), (0.2, 0.4)]
    assert not soft_ranking_consistent(members, 0.0)
    assert not soft_ranking_consistent(members, 0.09)
    assert soft_ranking_consistent(members, 0.11)
    assert soft_ranking_consistent([(0.1, 0.4), (0.2, 0.5)], 0.0)


def test_ties_at_top_rung_are_consistent():
    # §4.3: equal rung-T values, previous values {0.40, 0.50}, epsilon = 0.
    for members in ([(0.3, 0.40), (0.3, 0.50)], [(0.3, 0.50), (0.3, 0.40)]):
        assert soft_ranking_consistent(members, 0.0)
        assert soft_ranking_consistent(members, 0.0, "maximize")


@pytest.mark.parametrize("values, expected", [
    ([0.01, 0.02, 0.05, 0.10], 0.085),
    ([0.05, 0.10], 0.095),
    ([0.10, 0.05], 0.095),
])
def test_u2_percentile(values, expected):
    assert linear_percentile(values, 90) == pytest.approx(expected, abs=1e-12)


def test_u3_noisy_pair_detection():
    a = (0.80, 0.50, 0.45, 0.40)
    assert noisy_pair_distance(a, T2N, 3) == pytest.approx(0.10)
    assert noisy_pair_distance(T2N, a, 3) == pytest.approx(0.10)
    assert noisy_pair_distance(a, T2, 3) is None
    # One crossing (at step 1) that never flips back: not noisy.
    c = (0.79, 0.45, 0.33, 0.25)
    assert noisy_pair_distance(c, T2, 3) is None
    assert noisy_pair_distance(T2, c, 3) is None


def test_noisy_pair_ties_neutral_and_nan_ignored():
    a = (0.80, 0.50, 0.45, 0.40)
    # A tie at step 2 neither flips nor restores: the pair stays not noisy.
    assert noisy_pair_distance(a, (0.81, 0.40, 0.45, 0.30), 3) is None
    # A tie between the flip and the restore is skipped.
    assert noisy_pair_distance(
        (0.8, 0.5, 0.5, 0.45, 0.4), (0.81, 0.4, 0.5, 0.47, 0.3),
        4) == pytest.approx(0.1)
    # NaN at step 1 removes the restoring step; step 0 is still opposite.
    assert noisy_pair_distance(a, (0.81, math.nan, 0.47, 0.30), 3) is None
    assert noisy_pair_distance(a, (0.81, 0.4, 0.47, math.inf), 3) is None
    # Equal values at the evaluation step: no order, not noisy.
    assert noisy_pair_distance(a, (0.81, 0.40, 0.47, 0.40), 3) is None


def _brute_force_distances(curves, low, high):
    found = []
    for a, b in itertools.combinations(curves, 2):
        common = [e for e in a if e in b and low < e <= high
                  and np.isfinite(a[e]) and np.isfinite(b[e])]
        if common:
            d = noisy_pair_distance(a, b, max(common))
            if d is not None:
                found.append(d)
    return sorted(found)


def test_vectorised_pairs_match_scalar_definition():
    rng = np.random.default_rng(0)
    for _ in range(40):
        curves = []
        for _ in range(rng.integers(2, 9)):
            length = int(rng.integers(1, 12))
            values = np.round(rng.uniform(0, 1, length), 1)  # many ties
            curve = {e: float(v) for e, v in enumerate(values)
                     if rng.uniform() > 0.15}
            if curve and rng.uniform() < 0.2:
                curve[min(curve)] = math.nan
            curves.append(curve)
        low, high = sorted(rng.choice(12, 2, replace=False).tolist())
        got = sorted(noisy_pair_distances(curves, low, high))
        assert got == pytest.approx(_brute_force_distances(curves, low, high))


def test_estimate_epsilon_windows_and_fallback():
    # S3's window (1, 3]: pairs (t0, t2n) at 0.10 and (t2n, t5) at 0.05, the
    # latter found only through step 0.
    curves = [T0, T1, T2N, T3, T4, T5[:4]]
    assert sorted(noisy_pair_distances(curves, 1, 3)) == pytest.approx(
        [0.05, 0.10])
    assert estimate_epsilon(curves, [1, 3, 9], 1) == pytest.approx(0.095)
    # Window (3, 9] has no pair: fall back to (1, 3].
    assert estimate_epsilon(curves, [1, 3, 9], 2) == pytest.approx(0.095)
    # Family A has no noisy pair at all: the default.
    clean = [T0, T1, T2, T3, T4, T5[:4]]
    assert estimate_epsilon(clean, [1, 3, 9], 2, default=0.02) == 0.02
    # S4's window: (t0, t7) at 0.06, (t5, t7) at 0.09.
    s4 = [T0, T1, T2, T3, T4, T5[:5], T7, T6[:4]]
    assert sorted(noisy_pair_distances(s4, 1, 3)) == pytest.approx(
        [0.06, 0.09])
    assert estimate_epsilon(s4, [1, 3, 9], 2) == pytest.approx(0.087)


def test_pure_helpers_validate_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        soft_ranking_consistent([(1.0, 1.0)], -0.1)
    with pytest.raises(ValueError, match="direction"):
        soft_ranking_consistent([(1.0, 1.0)], 0.1, "down")
    with pytest.raises(ValueError, match="values"):
        linear_percentile([], 90)
    with pytest.raises(ValueError, match="q"):
        linear_percentile([1.0], 120)
    with pytest.raises(ValueError, match="rung_steps"):
        estimate_epsilon([T0], [1, 3], 2)


# --------------------------------------------------- §4.2 study snapshots

# (history, decided trial, pruner kwargs, decision, T, epsilon, max
# resource). The decided trial is RUNNING and carries the attributes of the
# rungs it passed in its earlier calls (as it would in a real run).
SNAPSHOTS = {
    "S0": (FAMILY_A, (T5[:2], RUN), {}, CONTINUE, 1, 0.0, 3),
    "S1": (FAMILY_A, (T5_S1, RUN, [0]), {}, STOP, 1, 0.0, 3),
    "S2": (FAMILY_A, (T5[:4], RUN, [0]), {}, CONTINUE, 2, 0.0, 9),
    "S2 epsilon=0": (FAMILY_A, (T5[:4], RUN, [0]), {"epsilon": 0.0},
                     CONTINUE, 2, 0.0, 9),
    "S2' epsilon=0.06": (FAMILY_A, (T5[:4], RUN, [0]), {"epsilon": 0.06},
                         STOP, 1, 0.06, 3),
    "S3": (FAMILY_B, (T5[:4], RUN, [0]), {}, STOP, 1, 0.095, 3),
    "S3 epsilon=0": (FAMILY_B, (T5[:4], RUN, [0]), {"epsilon": 0},
                     CONTINUE, 2, 0.0, 9),
    "S4": (FAMILY_A + [(T5[:5], RUN), (T7, PR)], (T6[:4], RUN, [0]), {},
           CONTINUE, 2, 0.087, 9),
    "S5a": (FAMILY_A + [(T5[:7], RUN)], (T6, RUN, [0, 1]), {}, STOP, 2,
            0.0, 9),
    "S5b": (FAMILY_A + [(T6, PR)], (T5, RUN, [0, 1]), {}, CONTINUE, 3, 0.0,
            27),
    "S5b epsilon=0.05": (FAMILY_A + [(T6, PR)], (T5, RUN, [0, 1]),
                         {"epsilon": 0.05}, STOP, 2, 0.05, 9),
}


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["min", "max"])
@pytest.mark.parametrize("name", list(SNAPSHOTS))
def test_snapshot(name, sign):
    """§4.2; with sign -1 every curve is negated and the study maximises."""
    history, decided, kwargs, decision, top, epsilon, cap = SNAPSHOTS[name]
    study = build_study(history + [decided], make_pruner(**kwargs), sign)
    pruner = study.pruner
    before = pruner.current_top_rung(study)
    assert decide(study, len(history)) is decision
    assert before <= pruner.current_top_rung(study) == top
    assert pruner.current_max_resource(study) == cap
    assert pruner.current_epsilon(study) == pytest.approx(epsilon, abs=1e-9)


def test_s4_lock_without_it_t_would_fall_back():
    """§4.2 S4: epsilon makes rungs 0/1 consistent, but t5 passed rung 1."""
    history = FAMILY_A + [(T5[:5], RUN), (T7, PR), (T6[:4], RUN, [0])]
    study = build_study(history, make_pruner())
    members = [(0.40, 0.50), (0.30, 0.40), (0.25, 0.45), (0.34, 0.43),
               (0.22, 0.38)]
    assert soft_ranking_consistent(members, 0.087)
    assert decide(study, 7) is CONTINUE
    assert study.pruner.current_top_rung(study) == 2


def test_s4_between_rungs_does_not_read_the_study():
    study = build_study(FAMILY_A + [(T5[:5], RUN)], make_pruner())
    frozen = study.get_trials(deepcopy=False)[5]
    study._storage.set_trial_system_attr(frozen._trial_id, "pasha:rung_0",
                                         0.45)
    study._storage.set_trial_system_attr(frozen._trial_id, "pasha:rung_1",
                                         0.25)
    frozen = study.get_trials(deepcopy=False)[5]

    def forbidden(*args, **kwargs):
        raise AssertionError("the study was read between rungs")

    study.get_trials = forbidden
    study._storage.get_all_trials = forbidden
    assert study.pruner.prune(study, frozen) is False
    assert study.pruner.last_decision(5) is CONTINUE


def test_order_of_trials_does_not_change_decisions():
    rng = random.Random(0)
    cases = ["S3", "S4", "S5b"]
    for name in cases:
        history, decided, _, expected = SNAPSHOTS[name][:4]
        outcomes = set()
        for _ in range(12):
            order = history + [decided]
            rng.shuffle(order)
            study = build_study(order, make_pruner())
            position = order.index(decided)
            outcomes.add((decide(study, position),
                          study.pruner.current_top_rung(study),
                          round(study.pruner.current_epsilon(study), 12)))
        assert len(outcomes) == 1
        assert outcomes.pop()[0] is expected


def test_first_call_after_several_rungs_decides_them_now():
    """A trial with no attributes yet (its first should_prune call comes
    after several rungs) is decided at every crossed rung against the
    current snapshot, as Optuna's successive halving does: S5b's t5 without
    its history meets 7 rung-0 values (t6's 0.38 included) and loses."""
    study = build_study(FAMILY_A + [(T6, PR), (T5, RUN)], make_pruner())
    assert decide(study, 6) is PRUNE


def test_sparse_should_prune_decides_rungs_in_order():
    """A call that crosses several rungs must not count the trial in a rung
    it never reached (it would lift T_floor without an inconsistency)."""
    curve = T5_S1 + (0.37, 0.36, 0.35, 0.34, 0.33, 0.32)
    study = build_study(FAMILY_A + [(curve, RUN)], make_pruner())
    assert decide(study, 5) is STOP
    attrs = study.get_trials(deepcopy=False)[5].system_attrs
    # Rung values are taken at the rung steps, not the current step.
    assert attrs["pasha:rung_0"] == 0.45 and attrs["pasha:rung_1"] == 0.38
    assert "pasha:rung_2" not in attrs and "pasha:passed_1" not in attrs
    assert study.pruner.current_top_rung(study) == 1


# ------------------------------------------------- replays in real studies

def advance(study, trial, curve, start, stop):
    """Reports curve[start:stop], calling should_prune after each report."""
    decisions = []
    for step in range(start, stop):
        trial.report(curve[step], step)
        pruned = trial.should_prune()
        decisions.append(study.pruner.last_decision(trial.number))
        assert pruned == (decisions[-1] is not CONTINUE)
        if pruned:
            break
    return decisions


def replay_family_a(study):
    expected = {0: [CONTINUE] * 3 + [STOP], 1: [CONTINUE, PRUNE],
                2: [CONTINUE] * 3 + [STOP], 3: [CONTINUE, PRUNE],
                4: [CONTINUE, PRUNE]}
    for number, curve in enumerate([T0, T1, T2, T3, T4]):
        trial = study.ask()
        assert advance(study, trial, curve, 0, len(curve)) == \
            expected[number]
        study.tell(trial, state=PR)
    assert study.pruner.current_max_resource(study) == 3


def test_replay_s2_s4_real_study():
    study = optuna.create_study(pruner=make_pruner())
    replay_family_a(study)
    t5 = study.ask()
    assert advance(study, t5, T5, 0, 4) == [CONTINUE] * 4      # S2
    assert study.pruner.current_max_resource(study) == 9
    assert advance(study, t5, T5, 4, 5) == [CONTINUE]
    t7 = study.ask()
    assert advance(study, t7, T7, 0, 4) == [CONTINUE] * 3 + [PRUNE]
    study.tell(t7, state=PR)
    t6 = study.ask()
    assert advance(study, t6, T6, 0, 4) == [CONTINUE] * 4      # S4
    assert study.pruner.current_top_rung(study) == 2
    assert study.pruner.current_epsilon(study) == pytest.approx(0.087)


def test_replay_s5_unlocks_r_and_t_is_monotone():
    study = optuna.create_study(pruner=make_pruner())
    pruner = study.pruner
    replay_family_a(study)
    tops = []
    t5 = study.ask()
    tops += [pruner.current_top_rung(study)]
    assert advance(study, t5, T5, 0, 7) == [CONTINUE] * 7
    t6 = study.ask()
    assert advance(study, t6, T6, 0, 10) == [CONTINUE] * 9 + [STOP]  # S5a
    tops += [pruner.current_top_rung(study)]
    study.tell(t6, state=PR)
    assert advance(study, t5, T5, 7, 10) == [CONTINUE] * 3         # S5b
    tops += [pruner.current_top_rung(study)]
    assert pruner.current_max_resource(study) == 27
    tail = [0.18 - 0.001 * (e - 9) for e in range(10, 28)]
    long_t5 = list(T5) + tail
    assert advance(study, t5, long_t5, 10, 27) == [CONTINUE] * 17
    # Beyond the cap R the trial is stopped.
    assert advance(study, t5, long_t5, 27, 28) == [STOP]
    study.tell(t5, long_t5[26])
    tops += [pruner.current_top_rung(study)]
    assert tops == [1, 2, 3, 3]
    best = pasha_best_trial(study)
    assert best.number == 5 and best.state == TrialState.COMPLETE


def test_stateless_across_workers(tmp_path):
    """Two pruner instances (two workers) sharing one journal storage."""
    backend = optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "journal.log"))
    storage = optuna.storages.JournalStorage(backend)
    worker_a = optuna.create_study(study_name="s", storage=storage,
                                   pruner=make_pruner())
    replay_family_a(worker_a)
    worker_b = optuna.load_study(study_name="s", storage=storage,
                                 pruner=make_pruner())
    t5 = worker_b.ask()
    assert advance(worker_b, t5, T5, 0, 4) == [CONTINUE] * 4
    assert worker_a.pruner.last_decision(t5.number) is None
    assert worker_a.pruner.current_top_rung(worker_a) == 2
    t6 = worker_a.ask()
    assert advance(worker_a, t6, T6, 0, 4) == [CONTINUE] * 4


def test_cooperative_pattern_and_best_trial():
    pruner = make_pruner()

    def objective(trial):
        x = trial.suggest_float("x", -2.0, 2.0)
        for step in range(27):
            loss = (x - 0.5) ** 2 + 1.0 / (step + 1)
            trial.report(loss, step)
            if trial.should_prune():
                if pruner.last_decision(trial.number) is STOP:
                    return loss
                raise optuna.TrialPruned()
        return loss

    study = optuna.create_study(pruner=pruner)
    for x in [-1.5, 1.0, 0.0, 2.0, 0.6, -0.5, 0.4, 1.5, 0.45]:
        study.enqueue_trial({"x": x})
    study.optimize(objective, n_trials=9)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete and all(t.last_step == 3 for t in complete)
    assert pasha_best_trial(study).params == {"x": 0.45}


# ----------------------------------------------------------- §4.3 edges

def test_r3_single_rung_is_successive_halving():
    pruner = make_pruner(max_resource=3)
    assert pruner.n_rungs == 1
    curves = [(0.8, 0.5, 0.4), (0.9, 0.6, 0.5), (0.7, 0.3, 0.2),
              (0.9, 0.7, 0.6), (0.6, 0.35, 0.3), (0.95, 0.2, 0.1)]
    last_steps = {}
    for name, p in [("pasha", pruner),
                    ("sh", optuna.pruners.SuccessiveHalvingPruner(1, 3))]:
        study = optuna.create_study(pruner=p)
        for curve in curves:
            trial = study.ask()
            pruned = False
            for step, value in enumerate(curve):
                trial.report(value, step)
                if trial.should_prune():
                    pruned = True
                    break
            study.tell(trial, state=PR if pruned else TrialState.COMPLETE,
                       values=None if pruned else curve[-1])
        last_steps[name] = [(t.state, t.last_step) for t in study.trials]
    assert last_steps["pasha"] == last_steps["sh"]
    assert pruner.current_max_resource(study) == 3


def test_r9_two_rungs_can_unlock_r():
    pruner = make_pruner(max_resource=9)
    assert pruner.n_rungs == 2
    study = build_study(FAMILY_A + [(T5[:4], RUN)], pruner)
    assert decide(study, 5) is CONTINUE
    assert pruner.current_top_rung(study) == 2
    assert pruner.current_max_resource(study) == 9


@pytest.mark.parametrize("max_resource", [1])
def test_r_le_1_never_prunes(max_resource):
    pruner = make_pruner(max_resource=max_resource)
    assert pruner.n_rungs == 0
    study = build_study(FAMILY_A + [((0.9, math.nan, 5.0), RUN)], pruner)
    assert decide(study, 5) is CONTINUE
    assert pruner.current_max_resource(study) == 1


def test_nan_at_rung_prunes_and_is_not_recorded():
    study = build_study(FAMILY_A + [((0.79, 0.45, 0.4, math.nan), RUN)],
                        make_pruner())
    assert decide(study, 5) is PRUNE
    attrs = study.get_trials(deepcopy=False)[5].system_attrs
    assert "pasha:rung_1" not in attrs
    assert study.pruner.current_top_rung(study) == 1
    assert study.pruner.current_epsilon(study) == 0.0
    # Between rungs a NaN is not a decision point (as in Optuna).
    study = build_study([((0.5, 0.4, math.nan), RUN, [0])], make_pruner())
    assert decide(study, 0) is CONTINUE


def test_bootstrap_count_prunes_first_arrivals():
    for third, expected in [(T1, PRUNE), (T2, CONTINUE)]:
        study = build_study([], make_pruner(bootstrap_count=2))
        decisions = []
        for number, curve in enumerate([T0[:2], T2[:2], third[:2]]):
            study.add_trial(create_trial(
                state=RUN, intermediate_values=dict(enumerate(curve))))
            decisions.append(decide(study, number))
        assert decisions == [PRUNE, PRUNE, expected]


def test_unbounded_rungs_without_max_resource():
    pruner = PASHAPruner(1)
    assert pruner.n_rungs is None
    assert [pruner.rung_step(k) for k in range(4)] == [1, 3, 9, 27]
    study = build_study(FAMILY_A + [(T5[:4], RUN)], pruner)
    assert decide(study, 5) is CONTINUE
    assert pruner.current_max_resource(study) == 9


# ------------------------------------------------------ PASHA against ASHA

def _noisy_curves(n_trials, n_steps, seed):
    """Noisy exponential learning curves and their noise-free last values."""
    rng = np.random.default_rng(seed)
    curves, finals = [], []
    for _ in range(n_trials):
        base, speed = rng.uniform(0.1, 0.6), rng.uniform(0.05, 2.0)
        noise = rng.normal(0.0, 0.01, n_steps)
        curves.append([base + 0.8 * math.exp(-speed * e) + noise[e]
                       for e in range(n_steps)])
        finals.append(base + 0.8 * math.exp(-speed * (n_steps - 1)))
    return curves, finals


def _top_rung_floor(study, n_rungs):
    """T_floor (PASHA.md §3.4) from the attributes the pruner wrote."""
    floor = 1
    for trial in study.trials:
        for key in trial.system_attrs:
            kind, _, k = key.rpartition("_")
            if kind == "pasha:rung":
                floor = max(floor, int(k))
            elif kind == "pasha:passed":
                floor = max(floor, int(k) + 1)
    return min(floor, n_rungs)


def _check_monotone(tops):
    """T_floor never decreases; T is T_floor or T_floor + 1 (§3.4: an
    inconsistency that no trial acted on may vanish again)."""
    floors = [floor for _, floor in tops]
    assert floors == sorted(floors)
    assert all(floor <= top <= floor + 1 for top, floor in tops)


def _run(pruner, curves):
    study = optuna.create_study(pruner=pruner)
    tops = []
    for curve in curves:
        trial = study.ask()
        pruned = False
        for step, value in enumerate(curve):
            trial.report(value, step)
            if trial.should_prune():
                pruned = True
                break
        study.tell(trial, state=PR if pruned else TrialState.COMPLETE,
                   values=None if pruned else curve[-1])
        if isinstance(pruner, PASHAPruner):
            tops.append((pruner.current_top_rung(study),
                         _top_rung_floor(study, pruner.n_rungs)))
    return study, tops


def test_pasha_prunes_no_more_than_asha_with_two_rungs():
    """With R = 9 (rungs at steps 1, 3) PASHA applies Optuna's rule at rung
    0 to the same arrivals, and at rung 1 either the same rule or a stop;
    so, on the same curves run in the same order, every trial PASHA prunes
    is pruned by ASHA and no trial trains longer under PASHA (§3.1)."""
    curves, _ = _noisy_curves(24, 9, seed=3)
    pasha = make_pruner(max_resource=9)
    pasha_study, tops = _run(pasha, curves)
    asha_study, _ = _run(optuna.pruners.SuccessiveHalvingPruner(1, 3),
                         curves)
    pruned_by_pasha = {t.number for t in pasha_study.trials
                       if pasha.last_decision(t.number) is PRUNE}
    pruned_by_asha = {t.number for t in asha_study.trials if t.state == PR}
    assert pruned_by_pasha <= pruned_by_asha
    # Not vacuous: T grew, and PASHA both pruned and stopped at rung 1.
    assert any(top == 2 for top, _ in tops)
    at_rung_1 = [pasha.last_decision(t.number) for t in pasha_study.trials
                 if t.last_step == 3]
    assert PRUNE in at_rung_1 and STOP in at_rung_1
    steps = [(p.last_step, a.last_step)
             for p, a in zip(pasha_study.trials, asha_study.trials)]
    assert all(p <= a for p, a in steps)
    assert sum(p for p, _ in steps) < sum(a for _, a in steps)
    _check_monotone(tops)


def test_pasha_uses_fewer_steps_than_asha_and_t_is_monotone():
    """§5 acceptance on synthetic curves (R = 27): fewer steps than Optuna's
    successive halving, T monotone, and a comparable selected configuration
    (judged on the noise-free curve at the full budget). Not a guarantee:
    an anchor on one seed where T grows once."""
    curves, finals = _noisy_curves(30, 27, seed=0)
    pasha = make_pruner()
    pasha_study, tops = _run(pasha, curves)
    asha_study, _ = _run(optuna.pruners.SuccessiveHalvingPruner(1, 3),
                         curves)
    pasha_steps = sum(t.last_step + 1 for t in pasha_study.trials)
    asha_steps = sum(t.last_step + 1 for t in asha_study.trials)
    assert pasha_steps < asha_steps
    _check_monotone(tops)
    assert tops[-1] == (2, 2)
    chosen = finals[pasha_best_trial(pasha_study).number]
    assert chosen <= finals[asha_study.best_trial.number] + 0.05


# ------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, error, name", [
    ({"min_resource": "auto"}, TypeError, "min_resource"),
    ({"min_resource": 0}, ValueError, "min_resource"),
    ({"min_resource": 1.5}, TypeError, "min_resource"),
    ({"reduction_factor": 1}, ValueError, "reduction_factor"),
    ({"reduction_factor": True}, TypeError, "reduction_factor"),
    ({"min_early_stopping_rate": -1}, ValueError,
     "min_early_stopping_rate"),
    ({"max_resource": 0}, ValueError, "max_resource"),
    ({"max_resource": 9.0}, TypeError, "max_resource"),
    ({"epsilon": "fixed"}, ValueError, "epsilon"),
    ({"epsilon": -0.1}, ValueError, "epsilon"),
    ({"epsilon": math.nan}, ValueError, "epsilon"),
    ({"epsilon": [0.1]}, TypeError, "epsilon"),
    ({"epsilon_percentile": 101}, ValueError, "epsilon_percentile"),
    ({"epsilon_init": -1.0}, ValueError, "epsilon_init"),
    ({"bootstrap_count": -1}, ValueError, "bootstrap_count"),
])
def test_constructor_validation(kwargs, error, name):
    args = {"min_resource": 1, **kwargs}
    with pytest.raises(error, match=name):
        PASHAPruner(**args)


def test_best_trial_errors():
    with pytest.raises(TypeError, match="pruner"):
        pasha_best_trial(optuna.create_study())
    with pytest.raises(ValueError, match="first rung"):
        pasha_best_trial(optuna.create_study(pruner=make_pruner()))


def test_integrations_package_does_not_import_optuna():
    code = ("import sys, gradhpo.integrations; "
            "assert 'optuna' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _retry_callback():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback()


@pytest.mark.filterwarnings("ignore:The reported value is ignored")
@pytest.mark.parametrize("inherit", [False, True])
def test_retried_trial_does_not_inherit_rung_records(inherit):
    """A trial pruned at rung 0 that crashed before it could stop is
    re-queued with its system attributes; the retry must earn rung 0
    again (and is pruned there again), not skip it."""
    pruner = make_pruner()
    study = build_study(FAMILY_A, pruner)
    loser = (0.99, 0.95, 0.9, 0.85)          # worst at rung 0 (step 1)
    trial = study.ask()
    decisions = []
    for step, value in enumerate(loser[:2]):
        trial.report(value, step)
        trial.should_prune()
        decisions.append(pruner.last_decision(trial.number))
    assert decisions == [CONTINUE, PRUNE]
    study.tell(trial, state=TrialState.FAIL)         # crashed, not pruned
    failed = study.trials[-1]
    assert failed.system_attrs["pasha:rung_0"] == 0.95
    callback = _retry_callback()
    callback._inherit_intermediate_values = inherit
    callback(study, failed)
    retry = study.ask()
    assert retry.number == failed.number + 1
    copied = study.trials[retry.number].system_attrs
    assert copied["pasha:rung_0"] == 0.95            # the copy is there
    decisions = []
    for step, value in enumerate(loser):
        retry.report(value, step)
        retry.should_prune()
        decisions.append(pruner.last_decision(retry.number))
        if decisions[-1] is not CONTINUE:
            break
    assert decisions == [CONTINUE, PRUNE] or (
        inherit and decisions == [PRUNE])
    frozen = study.trials[retry.number]
    assert frozen.system_attrs["pasha:owner"] == frozen._trial_id
    assert frozen.system_attrs["pasha:rung_0"] == 0.95  # earned again
    # The retry ranks once at rung 0, the failed original not at all.
    tables, _ = pruner._read(study)
    assert sorted(tables.rungs[0]) == [0, 1, 2, 3, 4, retry.number]


def test_retried_trial_with_passed_rungs_is_decided_again():
    """A copied passed flag lets nothing through: the retry of a trial that
    passed rung 0 and crashed is decided at rung 0 from scratch."""
    pruner = make_pruner()
    study = build_study(FAMILY_A, pruner)
    trial = study.ask()
    for step, value in enumerate(T2[:3]):
        trial.report(value, step)
        trial.should_prune()
    assert study.trials[-1].system_attrs["pasha:passed_0"] is True
    study.tell(trial, state=TrialState.FAIL)
    _retry_callback()(study, study.trials[-1])
    retry = study.ask()
    tables, _ = pruner._read(study)
    assert retry.number not in tables.rungs.get(0, {})
    retry.report(T2[0], 0)
    assert retry.should_prune() is False
    retry.report(T2[1], 1)
    retry.should_prune()
    assert pruner.last_decision(retry.number) is CONTINUE
    attrs = study.trials[retry.number].system_attrs
    assert attrs["pasha:passed_0"] is True and "pasha:rung_1" not in attrs
